"""Colour data with per-pixel masks given in the data: does the mask law matter? (issue 13)

Builds a colour data set offline from Fashion-MNIST: each garment (padded to 32×32) is painted in a
random bright colour on a random dark background of another hue, so the three channels of a pixel
are strongly tied. Observations keep 20 % of the pixels (one mask per pixel, shape (N, H, W), shared
by its channels); hidden pixels hold random garbage, as real data might. Trains with the same
backbone, budget and seed:

* ``clean``: plain EDM on the clean colour images (upper bound);
* ``naive``: plain EDM on the observations as if they were clean;
* ``ambient-per-channel``: ambient training with ``--no-mask-full-rgb``: Ã and the sampler's masks
  drawn per channel (what the defaults did before the law came from the data);
* ``ambient-per-pixel``: ambient training with the defaults, which now take the law from the data's
  masks: per pixel.

Scores N samples of each against held-out clean colour test images (KID, FID on Inception features;
pixel SWD) and reports the share of the naive → clean KID gap that each ambient model closes.

    python benchmarks/mask_law_rgb.py --quick      # end to end, tiny budget (~6 min)
    python benchmarks/mask_law_rgb.py --threads 1  # 20 kimg per model, N = 400 (see docs/results.md)

Every stage is resumable (runs in runs/mask_law_rgb/<mode>/). Writes the section between the
``mask-law-rgb`` markers of docs/results.md, rows with ``"table": "mask_law_rgb"`` in docs/results.json,
and docs/mask_law_rgb.png.
"""

from __future__ import annotations

import argparse
import colorsys
import json
import re
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ambient.data.datasets import load_dataset
from ambient.data.images import float_to_uint8
from ambient.data.readers import read_fashion_mnist
from ambient.io import atomic_write_text
from ambient.learners.train import train
from ambient.learners.train_config import TrainConfig
from ambient.metrics.features import cached_features
from ambient.metrics.fid import compute_kid, fid_from_features
from ambient.metrics.inception import load_inception
from ambient.metrics.swd import sliced_wasserstein
from ambient.sampling.generate import sample_model
from ambient.store.models import load_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from validate_report import read_rows, write_figure  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODES = {"quick": dict(kimg=1.0, num_samples=64, num_ref=128, num_train=400),
         "full": dict(kimg=20.0, num_samples=400, num_ref=800, num_train=1200)}
START = "<!-- mask-law-rgb:start (written by benchmarks/mask_law_rgb.py; edit outside the markers) -->"
END = "<!-- mask-law-rgb:end -->"
# (key, data file, objective, --mask-full-rgb)
MODELS = [("clean", "clean", "naive", None), ("naive", "obs", "naive", None),
          ("ambient-per-channel", "obs", "ambient", False), ("ambient-per-pixel", "obs", "ambient", None)]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def colourise(gray: np.ndarray, seed: int) -> np.ndarray:
    """uint8 (N, 28, 28) → uint8 (N, 32, 32, 3): a bright garment on a dark background of another hue."""
    rng = np.random.default_rng(seed)
    x = np.pad(gray.astype(np.float64) / 255.0, ((0, 0), (2, 2), (2, 2)))[..., None]
    out = np.empty((*x.shape[:3], 3))
    for i in range(len(x)):
        hue = rng.random()
        fg = np.array(colorsys.hsv_to_rgb(hue, 0.6 + 0.4 * rng.random(), 0.8 + 0.2 * rng.random()))
        bg = np.array(colorsys.hsv_to_rgb((hue + 0.25 + 0.5 * rng.random()) % 1.0, 0.7, 0.15 + 0.3 * rng.random()))
        out[i] = bg * (1 - x[i]) + fg * x[i]
    return np.clip(np.round(out * 255), 0, 255).astype(np.uint8)


def build_data(root: Path, n_train: int, n_test: int, keep: float, seed: int) -> dict[str, Path]:
    paths = {k: root / f"{k}.npz" for k in ("clean", "obs", "test")}
    if all(p.is_file() for p in paths.values()):
        return paths
    root.mkdir(parents=True, exist_ok=True)
    clean = colourise(read_fashion_mnist("train", max_size=n_train).images[:, 0], seed)
    test = colourise(read_fashion_mnist("test", max_size=n_test).images[:, 0], seed + 1)
    rng = np.random.default_rng(seed + 2)
    masks = (rng.random(clean.shape[:3]) < keep).astype(np.uint8)  # (N, H, W): one mask per pixel
    garbage = rng.integers(0, 256, clean.shape, dtype=np.uint8)
    observed = np.where(masks[..., None] == 1, clean, garbage)
    np.savez(paths["clean"], images=clean)
    np.savez(paths["obs"], images=observed, masks=masks)
    np.savez(paths["test"], images=test)
    return paths


def train_stage(key: str, data: Path, objective: str, full_rgb, args, root: Path) -> float:
    outdir = root / key
    marker = outdir / "bench-train.json"
    if marker.is_file() and json.loads(marker.read_text())["kimg"] == args.kimg:
        return json.loads(marker.read_text())["train_s"]
    cfg = TrainConfig(data=str(data), outdir=str(outdir), objective=objective, delta_probability=args.delta,
                      mask_full_rgb=full_rgb, arch=args.arch, batch=args.batch, lr=args.lr, lr_warmup_kimg=1.0,
                      kimg=args.kimg, ema=max(args.kimg / 16, 0.1), snapshot_kimg=max(args.kimg / 4, 0.5),
                      tick_kimg=max(args.kimg / 50, 0.1), grid_samples=16, seed=args.seed)
    log(f"{key}: training {args.kimg:g} kimg ({objective}, mask_full_rgb={full_rgb})")
    t0 = time.perf_counter()
    train(cfg, progress=False, log=log)
    seconds = time.perf_counter() - t0
    marker.write_text(json.dumps({"kimg": args.kimg, "train_s": seconds}))
    return seconds


def sample_stage(key: str, args, root: Path) -> torch.Tensor:
    path = root / key / f"bench-samples-n{args.num_samples}.npz"
    if path.is_file():
        with np.load(path) as f:
            if float(f["kimg"]) == args.kimg:
                return torch.from_numpy(f["images"])
    loaded = load_model(root / key)
    u8 = float_to_uint8(sample_model(loaded, list(range(args.num_samples)), batch=100))
    np.savez(path, images=u8.numpy(), kimg=np.array(args.kimg))
    return u8


def gap_closed(kid: float, naive: float, clean: float) -> float:
    """Share of the naive → clean KID gap that a model closes (1 = as good as clean)."""
    return (naive - kid) / (naive - clean)


def write_docs(args, rows: list[dict], figure: list, command: str, wall_s: float) -> None:
    docs = Path(args.docs_dir)
    write_figure(docs / "mask_law_rgb.png", figure)
    by = {r["method"]: r for r in rows}
    lines = [START, f"## Colour data with per-pixel masks: the mask law ({args.mode} configuration)", "",
             f"Command: `{command}` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
             f"{torch.get_num_threads()} torch threads, {wall_s / 60:.1f} min this invocation; other jobs shared "
             "the machine, so wall times are not speed figures).", "",
             f"Data: {args.num_train} Fashion-MNIST training images painted as bright garments on dark backgrounds of "
             f"random hues, 32×32 RGB; observations keep {100 * args.keep:.0f} % of the pixels with one mask per "
             "pixel (npz `masks` of shape (N, H, W)); hidden pixels hold random garbage. Every model: `"
             f"{args.arch}` backbone, batch {args.batch}, lr {args.lr:g}, {args.kimg:g} kimg, seed {args.seed}; "
             f"ambient δ = {args.delta:g}. Scores: {args.num_samples} samples (Heun, 18 steps, one fixed mask) against "
             f"{args.num_ref} held-out clean colour test images; KID ×10³ (100 subsets, ± std), FID, pixel SWD ×10². "
             "Gap closed = (KID naive − KID model) / (KID naive − KID clean).", "",
             "| model | mask law of Ã and sampler masks | FID ↓ | KID ×10³ ↓ | SWD ×10² ↓ | gap closed | train min |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    laws = {"clean": "–", "naive": "–", "ambient-per-channel": "per channel (`--no-mask-full-rgb`, the old default)",
            "ambient-per-pixel": "per pixel (default: from the data's masks)", "real-test": "–"}
    for r in rows:
        gap = "–"
        if r["method"].startswith("ambient") and {"naive", "clean"} <= set(by):
            gap = f"{100 * gap_closed(r['kid'], by['naive']['kid'], by['clean']['kid']):.0f} %"
        minutes = f"{r['train_s'] / 60:.1f}" if r["train_s"] else "–"
        lines.append(f"| {r['method']} | {laws[r['method']]} | {r['fid']:.1f} | {1e3 * r['kid']:.1f} ± "
                     f"{1e3 * r['kid_std']:.1f} | {100 * r['swd']:.2f} | {gap} | {minutes} |")
    lines += ["", "Figure: `docs/mask_law_rgb.png` (rows: clean data, observations as stored (garbage in hidden "
              "pixels), then samples of each model, seeds 0..11).", "", END]
    path = docs / "results.md"
    text = path.read_text(encoding="utf-8")
    body = "\n".join(lines)
    pattern = re.compile(re.escape(START) + ".*?" + re.escape(END), re.S)
    text = pattern.sub(lambda _m: body, text) if pattern.search(text) else text.rstrip() + "\n\n" + body + "\n"
    atomic_write_text(path, text)
    path_json = docs / "results.json"
    kept = [r for r in read_rows(path_json) if not (r.get("table") == "mask_law_rgb" and r.get("mode") == args.mode)]
    new = [{**r, "table": "mask_law_rgb", "mode": args.mode, "kimg": args.kimg, "arch": args.arch,
            "num_samples": args.num_samples, "num_ref": args.num_ref} for r in rows]
    atomic_write_text(path_json, json.dumps(kept + new, indent=1) + "\n")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--kimg", type=float, default=None)
    ap.add_argument("--num-samples", type=int, default=None)
    ap.add_argument("--num-ref", type=int, default=None)
    ap.add_argument("--num-train", type=int, default=None)
    ap.add_argument("--keep", type=float, default=0.2, help="observed share of the pixels")
    ap.add_argument("--delta", type=float, default=0.1)
    ap.add_argument("--arch", default="small")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out-dir", default=None)
    ap.add_argument("--docs-dir", default=str(ROOT / "docs"))
    args = ap.parse_args(argv)
    args.mode = "quick" if args.quick else "full"
    for k, v in MODES[args.mode].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    read_rows(Path(args.docs_dir) / "results.json")  # fail now, not after training
    root = Path(args.out_dir or ROOT / "runs" / "mask_law_rgb" / args.mode)
    paths = build_data(root / "data", args.num_train, args.num_ref + args.num_samples, args.keep, args.seed)
    net = load_inception()
    fid_id = f"inception-{net.sha256}"
    with np.load(paths["test"]) as f:
        test = torch.from_numpy(f["images"]).permute(0, 3, 1, 2).contiguous()
    ref, floor = test[:args.num_ref], test[args.num_ref:]
    ref_feats = cached_features(ref, net, fid_id, 64, progress=False)

    def score(method: str, u8: torch.Tensor, train_s: float) -> dict:
        feats = cached_features(u8, net, fid_id, 64, progress=False)
        kid, kid_std = compute_kid(feats, ref_feats, num_subsets=100,
                                   max_subset_size=min(len(feats), len(ref_feats)), seed=args.seed)
        swd = sliced_wasserstein(u8, ref, num_projections=256, generator=torch.Generator().manual_seed(args.seed))
        return {"method": method, "fid": fid_from_features(feats, ref_feats), "kid": kid, "kid_std": kid_std,
                "swd": swd, "train_s": train_s}

    rows = [score("real-test", floor, 0.0)]
    obs = load_dataset(str(paths["obs"]), max_size=12)
    with np.load(paths["obs"]) as f:
        stored = torch.from_numpy(f["images"][:12]).permute(0, 3, 1, 2)
    figure = [("clean data", load_dataset(str(paths["clean"]), max_size=12).images), ("observations", stored)]
    assert obs.mask_law == "pixel"
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])])
    for key, data, objective, full_rgb in MODELS:
        seconds = train_stage(key, paths[data], objective, full_rgb, args, root)
        u8 = sample_stage(key, args, root)
        rows.append(score(key, u8, seconds))
        figure.append((key, u8[:12]))
        log(f"{key}: FID {rows[-1]['fid']:.1f}  KID×10³ {1e3 * rows[-1]['kid']:.1f}  SWD {rows[-1]['swd']:.4f}")
        write_docs(args, rows, figure, command, time.perf_counter() - started)
    log(f"done in {(time.perf_counter() - started) / 60:.1f} min")


if __name__ == "__main__":
    main()
