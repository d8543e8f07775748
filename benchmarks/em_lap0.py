"""How should EM's lap 0 complete the observations? Scores candidate completions directly (issue 16).

On the first N Fashion-MNIST training observations at p = 0.8 (ambient train's dust masks, seed 0),
completes the hidden pixels with: the Gaussian prior's exact posterior draws, its posterior mean, an
ambient model's posterior mean, that mean plus the Gaussian posterior's residual (whole or half), and
(with --mmps) MMPS posterior samples that use the ambient model as prior. Each set is scored like
benchmarks/validate.py (KID, FID against 1000 clean test images) and by PSNR on the hidden pixels.

    python benchmarks/em_lap0.py runs/validate/medium/ambient-p0.8-d0.1 runs/em/medium/em-p0.8/gaussian.npz \
        --num 1000 --mmps        # the table in docs/em_full.md (about 25 min on one busy core)

The Gaussian file is a lap-0 prior written by ``ambient em`` (RUN/gaussian.npz); the ambient model any
mask-input model trained on the same observations.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from ambient.data.datasets import load_images
from ambient.data.images import float_to_uint8
from ambient.io import read_npz
from ambient.learners.em import EMConfig, load_observations
from ambient.learners.gaussian_prior import GaussianPrior
from ambient.sampling.posterior import ambient_mean, mmps_samples
from ambient.store.models import load_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
import validate  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("ambient", help="an ambient (mask-input) model folder")
    ap.add_argument("gaussian", help="a lap-0 prior: RUN/gaussian.npz of an `ambient em` run")
    ap.add_argument("--num", type=int, default=1000)
    ap.add_argument("--mmps", action="store_true", help="also MMPS with the ambient model as prior (slow)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = EMConfig(data=validate.DATA, outdir="unused", corruption_probability=0.8, laps=1, lap_kimg=1)
    y, mask = load_observations(cfg).batch(torch.arange(args.num))
    clean = load_images(validate.DATA, max_size=args.num).float() / 127.5 - 1
    prior = GaussianPrior.from_arrays(read_npz(Path(args.gaussian)))
    scorer = validate.Scorer(1000, 0)

    def report(name: str, x: torch.Tensor) -> None:
        x = mask * y + (1 - mask) * x.float()
        u8 = float_to_uint8(x)
        mse = float(((u8.float() / 127.5 - 1 - clean)[mask == 0] ** 2).mean())
        s = scorer.score(u8)
        print(f"| {name} | {1e3 * s['kid']:.1f} | {s['fid']:.1f} | {10 * np.log10(4 / mse):.2f} |", flush=True)

    print("| lap-0 completion | KID ×10³ | FID | hidden PSNR (dB) |\n| --- | --- | --- | --- |")
    seeds = list(range(args.num))
    draws, mean = prior.sample_posterior(y, mask, seeds), prior.posterior_mean(y, mask)
    report("Gaussian posterior draws", draws)
    report("Gaussian posterior mean", mean)
    model = load_model(args.ambient)
    amb = ambient_mean(model.denoiser, y, mask)
    report("ambient posterior mean", amb)
    report("ambient mean + Gaussian residual", amb + draws - mean)
    report("ambient mean + half the residual", amb + 0.5 * (draws - mean))
    if args.mmps:
        out = [mmps_samples(model.denoiser, y[s:s + 64], mask[s:s + 64], seeds[s:s + 64], steps=14, cg_iters=1,
                            sigma_y=1e-3)[0] for s in range(0, args.num, 64)]
        report("MMPS, ambient model as prior", torch.cat(out))


if __name__ == "__main__":
    main()
