"""The paper's DDPM++ (ambient.nets.songunet) timed side by side with the reference code's own network.

    git --git-dir=<fetched giannisdaras/ambient-diffusion> archive HEAD | tar -x -C /tmp/seed
    python benchmarks/bench_ddpmpp_vs_seed.py --seed /tmp/seed --threads 1
    python benchmarks/bench_ddpmpp_vs_seed.py --seed /tmp/seed --threads 2 --precisions fp32 --modes train

Nothing of the reference code is in this repository: ``--seed`` is a checkout of it (only its
``training/networks.py`` is loaded, with an empty stand-in for its ``torch_utils.persistence``
decorator), and the script refuses to run without one.

Configuration: the reference's CIFAR-10 DDPM++ (``train.py --arch ddpmpp``: 128 channels, channel_mult
[2, 2, 2], 4 blocks, attention at 16 px, [1, 1] resampling, dropout 0.13, ``augment_dim`` 9 as with
``--augment``; 6 channels in and out, image and mask), gated and ungated, batch 4 at 3×32×32. Ours
is the same network (:class:`ambient.nets.songunet.SongUNet` as in :class:`ambient.nets.ddpmpp.ReferenceDenoiser`)
with the reference's weights loaded, so both compute the same function; the script checks that first.
Both backbones are called through the same written-out EDM preconditioning (the reference's
``EDMPrecond`` asserts a float32 output, which bf16 autocast does not give).

A training step is what ``bench_speed.py`` times: the ambient loss (noisy image under the further
mask Ã, Ã as the second input half, loss on Ã's pixels), backward, gradient clipping and Adam. A
forward is one no-grad call in eval mode. Precisions: fp32, and bf16 under ``torch.autocast``.
Steps of the two networks alternate (seed, ours, then ours, seed, …) after one warm-up step each,
so that load changes hit both alike; reported: median img/s from wall time and from process CPU
time (the CPU time is the better measure on a shared machine, where wall time also counts the
time the process waits for a core) and the ratio ours / seed of each.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
import types
from datetime import datetime, timezone
from pathlib import Path

import torch

from ambient.nets.ddpmpp import ReferenceDenoiser, song_config
from ambient.nets.songunet import SongUNet
from ambient.store.statedict import load_state_dict_strict

CIFAR = dict(model_type="SongUNet", embedding_type="positional", encoder_type="standard", decoder_type="standard",
             channel_mult_noise=1, resample_filter=[1, 1], model_channels=128, channel_mult=[2, 2, 2],
             augment_dim=9, dropout=0.13, use_fp16=False)


def load_seed_networks(seed: Path) -> types.ModuleType:
    """The reference's ``training/networks.py`` as a module, its persistence decorator a no-op."""
    path = seed / "training" / "networks.py"
    if not path.is_file():
        raise SystemExit(f"--seed {seed}: no training/networks.py there (give a checkout of "
                         "giannisdaras/ambient-diffusion)")
    persistence = types.ModuleType("torch_utils.persistence")
    persistence.persistent_class = lambda cls: cls
    package = types.ModuleType("torch_utils")
    package.__path__, package.persistence = [], persistence
    sys.modules.setdefault("torch_utils", package)
    sys.modules.setdefault("torch_utils.persistence", persistence)
    spec = importlib.util.spec_from_file_location("seed_training_networks", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_pair(seed_nets: types.ModuleType, gated: bool) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(reference EDMPrecond, our ReferenceDenoiser) of the CIFAR config with the same weights."""
    torch.manual_seed(0)
    seed = seed_nets.EDMPrecond(img_resolution=32, img_channels=6, gated=gated, **CIFAR)
    song = song_config("ddpmpp-cifar" if gated else "ddpmpp-cifar-ungated", resolution=32, in_channels=6,
                       out_channels=6, dropout=CIFAR["dropout"], overrides={"augment_dim": CIFAR["augment_dim"]})
    ours = ReferenceDenoiser(SongUNet(song), 3)
    load_state_dict_strict(ours.model, seed.model.state_dict(), "reference network")
    return seed, ours


def _data(batch: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked images y and the further masks Ã (dust-like, p = 0.5, then δ = 0.1)."""
    y = torch.rand(batch, 3, 32, 32, generator=g) * 2 - 1
    a = (torch.rand(batch, 1, 32, 32, generator=g) > 0.5).float().expand(batch, 3, 32, 32).contiguous()
    return y * a, a * (torch.rand(batch, 1, 32, 32, generator=g) > 0.1).float()


def same_function(seed, ours, batch: int) -> float:
    """Relative max difference of the two backbones' eval outputs on one input (before any training step)."""
    y, a_further = _data(batch, torch.Generator().manual_seed(1))
    seed.eval()
    ours.eval()
    with torch.no_grad():
        inp, c_noise = torch.cat([a_further * y, a_further], 1), torch.full((batch,), -0.3)
        fs, fo = seed.model(inp, c_noise, None), ours.model(inp, c_noise)
    return float((fs - fo).abs().max() / fs.abs().max())


def closures(seed, ours, batch: int, mode: str, bf16: bool) -> dict:
    """{'seed': step, 'ours': step}: a training step or a forward of each network."""
    g = torch.Generator().manual_seed(1)
    y, a_further = _data(batch, g)
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext

    def make(net):
        opt = torch.optim.Adam(net.parameters(), lr=1e-4)

        def denoise(x, sigma):
            # EDM's preconditioning written out around either backbone (the reference's EDMPrecond
            # refuses a bf16 output under autocast)
            s = sigma.reshape(-1, 1, 1, 1)
            c_in, c_skip, c_out = (s**2 + 0.25).rsqrt(), 0.25 / (s**2 + 0.25), s * 0.5 * (s**2 + 0.25).rsqrt()
            inp = torch.cat([a_further * x, a_further], 1)
            return (c_skip * inp + c_out * net.model(c_in * inp, sigma.log() / 4, None).float())[:, :3]

        def train():
            net.train()
            sigma = (torch.randn(batch, generator=g) * 1.2 - 1.2).exp()
            noise = torch.randn(y.shape, generator=g) * sigma.reshape(-1, 1, 1, 1)
            weight = ((sigma**2 + 0.25) / (sigma * 0.5) ** 2).reshape(-1, 1, 1, 1)
            with autocast():
                d = denoise(y + noise, sigma)
                loss = weight * (a_further * (d.float() - y)) ** 2
            opt.zero_grad(set_to_none=True)
            loss.sum().backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()

        def forward():
            net.eval()
            with torch.no_grad(), autocast():
                denoise(y + torch.randn(y.shape, generator=g), torch.ones(batch))

        return train if mode == "train" else forward

    return {"seed": make(seed), "ours": make(ours)}


def interleaved(fns: dict, reps: int) -> dict:
    """Per-step wall and CPU seconds of each closure, alternating the order every repetition."""
    for fn in fns.values():
        fn()  # warm-up
    times = {k: {"wall": [], "cpu": []} for k in fns}
    order = list(fns)
    for r in range(reps):
        for k in order if r % 2 == 0 else order[::-1]:
            wall, cpu = time.perf_counter(), time.process_time()
            fns[k]()
            times[k]["wall"].append(time.perf_counter() - wall)
            times[k]["cpu"].append(time.process_time() - cpu)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", required=True, type=Path,
                        help="a checkout of giannisdaras/ambient-diffusion (nothing of it is in this repository)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--reps", type=int, default=3,
                        help="timed training steps per network and row (after one warm-up)")
    parser.add_argument("--fwd-reps", type=int, default=6, help="timed forwards per network and row")
    parser.add_argument("--variants", default="gated,ungated")
    parser.add_argument("--modes", default="train,fwd")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "ddpmpp_vs_seed.json"))
    args = parser.parse_args()
    seed_nets = load_seed_networks(args.seed)
    torch.set_num_threads(args.threads)
    started, load_before = time.time(), os.getloadavg()
    rows = []
    for variant in args.variants.split(","):
        seed, ours = build_pair(seed_nets, variant == "gated")
        params = [sum(p.numel() for p in m.parameters()) for m in (seed, ours)]
        rel = same_function(seed, ours, args.batch)  # the networks train apart from here on
        for mode in args.modes.split(","):
            for precision in args.precisions.split(","):
                fns = closures(seed, ours, args.batch, mode, precision == "bf16")
                times = interleaved(fns, args.reps if mode == "train" else args.fwd_reps)
                row = {"variant": variant, "mode": mode, "precision": precision, "params": params[1],
                       "params_seed": params[0], "backbone_rel_max_diff_before_training": rel, "steps": times}
                for clock in ("wall", "cpu"):
                    med = {k: statistics.median(times[k][clock]) for k in times}
                    row[f"{clock}_img_s"] = {k: args.batch / v for k, v in med.items()}
                    row[f"{clock}_ours_over_seed"] = med["seed"] / med["ours"]
                rows.append(row)
                write(args, started, load_before, rows)
                print(f"{variant:8s} {mode:5s} {precision}: seed {row['cpu_img_s']['seed']:.3f} ours "
                      f"{row['cpu_img_s']['ours']:.3f} img/s (CPU time), ours/seed {row['cpu_ours_over_seed']:.3f} "
                      f"(wall {row['wall_ours_over_seed']:.3f}); outputs before training differ by {rel:.1e}",
                      flush=True)
    print(f"wrote {args.out}")


def write(args, started: float, load_before, rows: list[dict]) -> None:
    report = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "command": " ".join(sys.argv),
              "torch": torch.__version__, "threads": torch.get_num_threads(), "batch": args.batch,
              "cpu": platform.processor() or platform.machine(), "load_average_before": load_before,
              "load_average_after": os.getloadavg(), "seconds": time.time() - started, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
