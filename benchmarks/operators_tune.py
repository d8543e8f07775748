"""Restoring k-space with a diffusion prior: MMPS settings chosen on validation phantoms, then scored on test.

benchmarks/operators.py restores the held-out phantoms of its MRI case with one MMPS draw at fixed settings (σ_y of
the data = 0, its CG iterations), and the diffusion priors lose to TV-CS there. This script asks what the same
priors (its cached ``em-R<R>`` and ``clean`` runs; run operators.py first) give when restore is tuned the way TV-CS's
λ is: on the validation phantoms, by PSNR against their clean images.

Grid: ``--sigma-y`` (MMPS's assumed measurement noise, model units; the data are noiseless) × ``--cg-iters``; each
setting draws ``--draws`` restorations per phantom and is scored as one draw and as the mean of the draws (an
estimate of the posterior mean, the PSNR-optimal answer, as the Gaussian row and TV-CS are point estimates), each
with and without a final data-consistency step x ← x + A⁺(y − A x) (the acquired lines put back exactly). The
setting with the best validation PSNR of the mean of draws (with data consistency) is then run on the test phantoms.

    python benchmarks/operators_tune.py --mode quick --threads 1

Writes docs/operators_tune_<mode>.json and prints a markdown table (docs/operators_quick.md quotes it by hand).
Every restoration set is cached under <out-dir>/tune/.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ambient.io import atomic_write_text
from ambient.operators.measurements import load_measurements
from ambient.sampling.restore import RestoreConfig, restore
from ambient.store.models import load_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
import operators as bench  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SIGMA_Y_GRID = (0.0, 0.02, 0.05)
CG_GRID = (1, 3)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mode", choices=("smoke", "quick", "full"), default="quick")
    ap.add_argument("--out-dir", default=None, help="operators.py's runs folder (default runs/operators/<mode>)")
    ap.add_argument("--docs-dir", default=str(ROOT / "docs"))
    ap.add_argument("--draws", type=int, default=4)
    ap.add_argument("--priors", nargs="+", default=["em", "clean"], choices=("em", "clean"))
    ap.add_argument("--accelerations", type=int, nargs="+", default=None)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    base = bench.parse_args(["--mode", args.mode] + (["--out-dir", args.out_dir] if args.out_dir else []))
    for key, value in vars(base).items():  # the MRI case's settings (size, sets, restore steps, …)
        if key not in ("accelerations", "out_dir", "docs_dir", "threads", "mode"):
            setattr(args, key, value)
    args.accelerations = args.accelerations or list(base.accelerations)
    args.out_dir = base.out_dir
    return args


def data_consistent(x: torch.Tensor, meas, index: torch.Tensor) -> torch.Tensor:
    """x + A⁺(y − A x) per restoration (single-coil k-space: the acquired lines replaced by y)."""
    y, op = meas.batch(index)
    x64 = x.to(torch.float64)
    return (x64 + op.pinv(y.to(torch.float64) - op(x64))).to(torch.float32)


def restorations(args, model_dir: Path, meas_path: Path, tag: str, sigma_y: float, cg: int) -> torch.Tensor:
    """(N, draws, 1, H, W) MMPS restorations in model units, cached."""
    cache = args.out_dir / "tune" / f"{tag}-sy{sigma_y:g}-cg{cg}-d{args.draws}.npz"
    if cache.is_file():
        with np.load(cache) as z:
            return torch.from_numpy(z["images"])
    meas = load_measurements(meas_path)
    cfg = RestoreConfig(method="mmps", steps=args.restore_steps, cg_iters=cg, sigma_y=sigma_y,
                        num_per_image=args.draws, seed=0, batch=64)
    t0 = time.perf_counter()
    out = restore(load_model(model_dir), meas, cfg)
    x = out.images.reshape(len(meas), args.draws, *out.images.shape[1:])
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, images=x.numpy(), seconds=time.perf_counter() - t0)
    return x


def score_set(x: torch.Tensor, meas, ref01: torch.Tensor) -> dict:
    """PSNR / SSIM of one draw (the mean over draws of each draw's score) and of the mean of the draws, each raw
    and with data consistency."""
    n, d = x.shape[:2]
    index = torch.arange(n).repeat_interleave(d)
    flat = x.reshape(n * d, *x.shape[2:])
    out = {}
    for dc in (False, True):
        xs = data_consistent(flat, meas, index) if dc else flat
        per = xs.reshape(n, d, *x.shape[2:])
        one = [bench.scores(bench.to01(per[:, k]), ref01) for k in range(d)]
        mean = bench.scores(bench.to01(per.mean(1)), ref01)
        suffix = "_dc" if dc else ""
        out[f"one{suffix}"] = {"psnr": float(np.mean([s["psnr"] for s in one])),
                               "ssim": float(np.mean([s["ssim"] for s in one]))}
        out[f"mean{suffix}"] = {"psnr": mean["psnr"], "ssim": mean["ssim"]}
    return out


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    sets = bench.heldout(args)
    paths = {"train": args.out_dir / "data" / "train.npz"}
    rows = []
    for r in args.accelerations:
        files = bench.write_measurements(args, r, paths, sets)
        priors = {"em": args.out_dir / f"em-R{r}", "clean": args.out_dir / "clean"}
        for name in args.priors:
            model_dir = priors[name]
            if not model_dir.is_dir():
                raise SystemExit(f"error: {model_dir}: not found; run benchmarks/operators.py --mode {args.mode} first")
            val_meas = load_measurements(files["val"])
            grid = {}
            for sy, cg in itertools.product(SIGMA_Y_GRID, CG_GRID):
                x = restorations(args, model_dir, files["val"], f"R{r}-{name}-val", sy, cg)
                grid[(sy, cg)] = score_set(x, val_meas, sets["val"])
                g = grid[(sy, cg)]
                bench.log(f"R={r} {name} val σ_y={sy:g} cg={cg}: one {g['one']['psnr']:.2f} / one+DC "
                          f"{g['one_dc']['psnr']:.2f} / mean {g['mean']['psnr']:.2f} / mean+DC "
                          f"{g['mean_dc']['psnr']:.2f} dB")
            best = max(grid, key=lambda k: grid[k]["mean_dc"]["psnr"])
            test_meas = load_measurements(files["test"])
            x = restorations(args, model_dir, files["test"], f"R{r}-{name}-test", *best)
            test = score_set(x, test_meas, sets["test"])
            default = (0.0, args.cg_iters)
            xd = restorations(args, model_dir, files["test"], f"R{r}-{name}-test", *default)
            test_default = score_set(xd, test_meas, sets["test"])
            rows.append({"R": r, "prior": name, "best_sigma_y": best[0], "best_cg_iters": best[1],
                         "draws": args.draws, "test": test, "test_default_settings": test_default,
                         "val_grid": [{"sigma_y": k[0], "cg_iters": k[1], **v} for k, v in grid.items()]})
            bench.log(f"R={r} {name} test at σ_y={best[0]:g} cg={best[1]}: one {test['one']['psnr']:.2f}, "
                      f"mean of {args.draws} + DC {test['mean_dc']['psnr']:.2f} dB "
                      f"(operators.py's settings: one {test_default['one']['psnr']:.2f})")
    lines = ["| R | prior | σ_y, CG (val-picked) | one draw | one draw + DC | mean of draws | mean of draws + DC | "
             "one draw at operators.py's settings |", "|" + " --- |" * 8]
    for row in rows:
        t, d = row["test"], row["test_default_settings"]
        cell = lambda s: f"{s['psnr']:.2f} / {s['ssim']:.3f}"  # noqa: E731
        lines.append(f"| {row['R']} | {row['prior']} | {row['best_sigma_y']:g}, {row['best_cg_iters']} | "
                     f"{cell(t['one'])} | {cell(t['one_dc'])} | {cell(t['mean'])} | {cell(t['mean_dc'])} | "
                     f"{cell(d['one'])} |")
    table = "\n".join(lines)
    print(table)
    out = {"mode": args.mode, "time": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "minutes": (time.perf_counter() - started) / 60, "draws": args.draws, "restore_steps": args.restore_steps,
           "sigma_y_grid": list(SIGMA_Y_GRID), "cg_grid": list(CG_GRID), "rows": rows, "table": table}
    atomic_write_text(Path(args.docs_dir) / f"operators_tune_{args.mode}.json", json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
