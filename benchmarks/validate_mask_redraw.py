"""Sampler check for docs/results.md: hold the sampler's mask fixed along the trajectory (the method's
sampler) or redraw it at every step?

Loads an ambient model trained by ``benchmarks/validate.py`` and draws N samples twice with a Heun
sampler written out here (18 steps, EDM schedule; one mask per sample of the training law of Ã):
``fixed`` uses the sample's mask at every network call, ``redraw`` a fresh mask per step. Both are
scored like validate.py's rows (FID/KID against the first 500 clean test images, pixel SWD).

    python benchmarks/validate_mask_redraw.py --model runs/validate/medium/ambient-p0.8-d0.1
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from ambient.data.corruption import sampling_masks
from ambient.data.images import float_to_uint8
from ambient.nets.schedules import edm_sigmas
from ambient.rng import mix_seed
from ambient.store.models import load_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from validate import Scorer  # noqa: E402


def heun(den, corruption, seeds: list[int], mode: str, steps: int, noise_seed: int) -> torch.Tensor:
    sig = edm_sigmas(steps, 0.002, 80.0, 7.0)
    n = len(seeds)
    x = torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(noise_seed), dtype=torch.float64) * sig[0]

    def denoise(x: torch.Tensor, sigma: float, step: int) -> torch.Tensor:
        keys = seeds if mode == "fixed" else [mix_seed(s, 1000 + step) for s in seeds]
        m = sampling_masks(corruption, x.shape, keys).float()
        with torch.no_grad():
            return den((m * x).float(), torch.full((n,), float(sigma)), m).double()

    for i in range(steps):
        s0, s1 = float(sig[i]), float(sig[i + 1])
        d0 = (x - denoise(x, s0, i)) / s0
        x_next = x + (s1 - s0) * d0
        if s1 > 0:
            x_next = x + (s1 - s0) * 0.5 * (d0 + (x_next - denoise(x_next, s1, i)) / s1)
        x = x_next
    return x.float()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="an ambient model folder written by validate.py")
    ap.add_argument("--num-samples", type=int, default=250)
    ap.add_argument("--num-ref", type=int, default=500)
    ap.add_argument("--steps", type=int, default=18)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="JSON file for the two rows")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_model(args.model)
    scorer = Scorer(args.num_ref, 0)
    rows = {}
    for mode in ("fixed", "redraw"):
        t0 = time.time()
        parts = [heun(loaded.denoiser, loaded.sampling.corruption, list(range(b, min(b + 125, args.num_samples))),
                      mode, args.steps, 1234 + b) for b in range(0, args.num_samples, 125)]
        rows[mode] = {**scorer.score(float_to_uint8(torch.cat(parts))), "seconds": time.time() - t0}
        r = rows[mode]
        print(f"{mode}: FID {r['fid']:.1f}  KID {r['kid']:.4f} ± {r['kid_std']:.4f}  SWD {r['swd']:.4f}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
