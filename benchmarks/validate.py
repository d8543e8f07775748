"""Validation benchmark: does ambient training on corrupted Fashion-MNIST beat naive training?

Trains, with the same backbone, budget and seed, on ``builtin:fashion-mnist`` (dust masks):

* ``clean``: plain EDM on clean images (upper bound): objective naive, p = 0;
* ``naive``: plain EDM on the corrupted images A⊙x0 as if they were clean, at each p;
* ``ambient``: the ambient objective at each p (δ from ``--delta``);
* ``ambient-d0`` (``--with-delta0``): mask-aware training with δ = 0 at p = 0.8.

Each model draws N samples (seeds 0..N−1, Heun, 18 steps, one fixed mask) that are scored against the
first ``--num-ref`` clean test images: FID and KID on Inception features, pixel sliced Wasserstein
distance, and the memorised share (nearest clean training image by pixel correlation > 0.95). Held-out
test images (``real-test``) give the floor of each metric at this N. The sampler ablation redraws the
ambient p = 0.8 samples with 4 masks and with 50 steps.

    python benchmarks/validate.py --quick --threads 1         # end-to-end: 5 models × 1.5 kimg, N = 64: 9 min
    python benchmarks/validate.py --mode medium --threads 1   # 5 models × 18 kimg, N = 250: 60 min (measured)
    python benchmarks/validate.py --threads 2                 # full: 7 models × 60 kimg, N = 1000: 135 min (measured)

On a CPU shared with other jobs, ``--threads 1`` trains 3–4× faster than torch's default two threads
(measured here: ~35 vs ~10 img/s with two other jobs running).

Every stage is resumable: each model lives in ``<out-dir>/<method>-p<p>``; training resumes from its
latest snapshot, finished trainings, samples and Inception features (cached by content) are reused.
Writes this mode's section of docs/results.md (between its markers), its rows of docs/results.json (rows of
other modes are kept) and docs/fashion_mnist.png (full mode; other modes write fashion_mnist_<mode>.png).
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ambient.data.corruption import Corruption
from ambient.data.datasets import load_dataset, load_images
from ambient.data.images import float_to_uint8
from ambient.io import atomic_save_npz
from ambient.learners.train import train
from ambient.learners.train_config import TrainConfig
from ambient.metrics.features import cached_features
from ambient.metrics.fid import compute_kid, fid_from_features
from ambient.metrics.inception import load_inception
from ambient.metrics.neighbors import nearest_neighbors, pixel_features
from ambient.metrics.swd import sliced_wasserstein
from ambient.sampling.generate import sample_model
from ambient.store.models import load_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from validate_report import figure_name, read_rows, write_docs, write_figure  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA, TEST = "builtin:fashion-mnist", "builtin:fashion-mnist:test"
THRESHOLD = 0.95
STRICT_THRESHOLD = 0.99  # near-exact copies: at 0.95 many fresh test images already pass
MODES = {
    "quick": dict(kimg=1.5, num_samples=64, num_ref=128, ablation_samples=32, naive_probs=[0.8]),
    "medium": dict(kimg=18.0, num_samples=250, num_ref=500, ablation_samples=125, naive_probs=[0.8]),
    "full": dict(kimg=60.0, num_samples=1000, num_ref=2000, ablation_samples=500, naive_probs=[0.6, 0.8, 0.9]),
}


@dataclass(frozen=True)
class Method:
    name: str  # clean | naive | ambient | ambient-d0
    p: float
    delta: float
    normalize: str = "mean"  # the ambient loss's normalisation (ambient.objectives.losses.NORMALIZATIONS)
    weighting: str = "edm"  # the ambient loss's weighting (ambient.objectives.losses.WEIGHTINGS)
    lr_schedule: str = "constant"  # every model's (ambient train --lr-schedule)

    @property
    def objective(self) -> str:
        return "ambient" if self.name.startswith("ambient") else "naive"

    @property
    def key(self) -> str:
        key = f"{self.name}-p{self.p:g}" + (f"-d{self.delta:g}" if self.objective == "ambient" else "")
        key += f"-{self.normalize}" if self.objective == "ambient" and self.normalize != "mean" else ""
        key += f"-{self.weighting}" if self.objective == "ambient" and self.weighting != "edm" else ""
        return key + (f"-{self.lr_schedule}" if self.lr_schedule != "constant" else "")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def model(args, name: str, p: float = 0.0) -> Method:
    """Model ``name`` (clean | naive | ambient | ambient-d0) at ``p`` with the run's settings: every one its
    learning-rate schedule, the ambient ones also δ (ambient-d0: 0) and the loss's normalisation and weighting."""
    if not name.startswith("ambient"):
        return Method(name, p, 0.0, lr_schedule=args.lr_schedule)
    delta = 0.0 if name == "ambient-d0" else args.delta
    return Method(name, p, delta, args.loss_normalize, args.loss_weighting, args.lr_schedule)


def methods_for(args) -> list[Method]:
    out = [model(args, "clean")]
    out += [model(args, "naive", p) for p in args.naive_probs]
    out += [model(args, "ambient", p) for p in args.probs]
    out.sort(key=lambda m: (m.name != "clean", m.p != 0.8))  # the central comparison (p = 0.8) first
    if args.with_delta0:
        out.append(model(args, "ambient-d0", 0.8))
    if args.methods:
        unknown = set(args.methods) - {m.key for m in out}
        if unknown:
            raise SystemExit(f"error: --methods {' '.join(sorted(unknown))}: not among "
                             f"{' '.join(m.key for m in out)}")
        out = [m for m in out if m.key in args.methods]
    return out


def train_stage(m: Method, args, root: Path) -> dict:
    """Train (or resume, or skip when done) one model; returns its timing record."""
    outdir = root / m.key
    marker = outdir / "validate-train.json"
    if marker.is_file():
        rec = json.loads(marker.read_text())
        if rec["kimg"] == args.kimg and rec.get("max_size") == args.max_size:
            log(f"{m.key}: training done before ({rec['train_s'] / 60:.1f} min), reused")
            return rec
    cfg = TrainConfig(data=DATA, outdir=str(outdir), max_size=args.max_size, corruption_probability=m.p,
                      delta_probability=m.delta,
                      objective=m.objective, loss_normalize=m.normalize, loss_weighting=m.weighting,
                      arch=args.arch, batch=args.batch,
                      lr=args.lr, lr_warmup_kimg=1.0, lr_schedule=m.lr_schedule,
                      kimg=args.kimg, ema=max(args.kimg / 16, 0.1), snapshot_kimg=max(args.kimg / 4, 0.5),
                      tick_kimg=max(args.kimg / 50, 0.1), grid_samples=16, seed=args.seed)
    log(f"{m.key}: training {args.kimg:g} kimg (objective {m.objective}, p={m.p:g}, δ={m.delta:g})")
    resumed = outdir.is_dir() and any(outdir.glob("snapshot-*"))
    t0 = time.perf_counter()
    train(cfg, progress=False, log=log)
    rec = {"kimg": args.kimg, "max_size": args.max_size, "train_s": time.perf_counter() - t0, "resumed": resumed}
    marker.write_text(json.dumps(rec))
    log(f"{m.key}: trained in {rec['train_s'] / 60:.1f} min")
    return rec


def sample_stage(m: Method, root: Path, kimg: float, n: int, num_masks: int, steps: int) -> tuple[torch.Tensor, float]:
    """uint8 samples (n, 1, 28, 28) for seeds 0..n−1, cached in the model's folder."""
    path = root / m.key / f"validate-samples-n{n}-m{num_masks}-s{steps}.npz"
    if path.is_file():
        with np.load(path) as f:
            if float(f["kimg"]) == kimg:
                return torch.from_numpy(f["images"]), float(f["seconds"])
    loaded = load_model(root / m.key)
    t0 = time.perf_counter()
    x = sample_model(loaded, list(range(n)), batch=100, num_steps=steps, num_masks=num_masks)
    seconds = time.perf_counter() - t0
    u8 = float_to_uint8(x)
    atomic_save_npz(path, images=u8.numpy(), kimg=np.array(kimg), seconds=np.array(seconds))
    log(f"{m.key}: {n} samples (masks {num_masks}, steps {steps}) in {seconds / 60:.1f} min")
    return u8, seconds


class Scorer:
    """FID/KID against the reference test images, pixel SWD, pixel nearest-neighbour memorisation."""

    def __init__(self, num_ref: int, seed: int):
        self.net = load_inception()
        self.fid_id = f"inception-{self.net.sha256}"
        self.seed = seed
        self.ref = load_images(TEST, max_size=num_ref)
        log(f"reference: {num_ref} test images; Inception features (cached by content)")
        self.ref_feats = cached_features(self.ref, self.net, self.fid_id, 64, progress=False)
        train_u8 = load_images(DATA)
        self.train_px = pixel_features(train_u8)
        log(f"memorisation reference: {train_u8.shape[0]} clean training images (pixel features)")

    def score(self, u8: torch.Tensor) -> dict:
        feats = cached_features(u8, self.net, self.fid_id, 64, progress=False)
        kid, kid_std = compute_kid(feats, self.ref_feats, num_subsets=100,
                                   max_subset_size=min(len(feats), len(self.ref_feats)), seed=self.seed)
        swd = sliced_wasserstein(u8, self.ref, num_projections=256,
                                 generator=torch.Generator().manual_seed(self.seed))
        best = nearest_neighbors(pixel_features(u8), self.train_px, k=1)[0][:, 0]
        return {"fid": fid_from_features(feats, self.ref_feats), "kid": kid, "kid_std": kid_std, "swd": swd,
                "memorized_share": float((best > THRESHOLD).mean()),
                "memorized_share_strict": float((best > STRICT_THRESHOLD).mean()),
                "max_similarity_mean": float(best.mean()), "num_samples": int(u8.shape[0])}


def corrupted_examples(p: float, delta: float, n: int, seed: int) -> torch.Tensor:
    """The first n training images exactly as the models at this p saw them (y = A⊙x0, hidden = 0)."""
    data = load_dataset(DATA, max_size=n, corruption=Corruption("dust", p, delta) if p > 0 else None, seed=seed)
    return float_to_uint8(data.batch(list(range(n)))[0])


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mode", choices=tuple(MODES), default="full")
    ap.add_argument("--quick", action="store_true", help="same as --mode quick")
    ap.add_argument("--out-dir", default=None, help="runs folder (default runs/validate/<mode>)")
    ap.add_argument("--docs-dir", default=str(ROOT / "docs"))
    ap.add_argument("--kimg", type=float, default=None, help="training images per model, in thousands")
    ap.add_argument("--num-samples", type=int, default=None)
    ap.add_argument("--num-ref", type=int, default=None, help="clean test images in the FID/KID reference")
    ap.add_argument("--ablation-samples", type=int, default=None, help="samples per sampler-ablation setting")
    ap.add_argument("--arch", default="small")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--delta", type=float, default=0.1)
    ap.add_argument("--probs", type=float, nargs="+", default=[0.6, 0.8, 0.9])
    ap.add_argument("--naive-probs", type=float, nargs="+", default=None,
                    help="p of the naive baselines (default: 0.8 in quick/medium, all --probs in full)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--with-delta0", action="store_true", help="also train mask-aware δ = 0 at p = 0.8")
    ap.add_argument("--no-ablation", action="store_true")
    ap.add_argument("--loss-normalize", choices=("mean", "sum"), default="mean",
                    help="normalisation of the ambient loss (ambient models only)")
    ap.add_argument("--loss-weighting", choices=("edm", "pixel", "tilted"), default="tilted",
                    help="weighting of the ambient loss (ambient models only; see ambient.objectives.losses); "
                         "tilted, ambient train's default (tables before 2026-12-04 were measured with edm)")
    ap.add_argument("--lr-schedule", choices=("constant", "cosine"), default="cosine",
                    help="every model's learning-rate schedule (ambient train --lr-schedule; cosine, its default, "
                         "since 2026-12-05: model keys end in -cosine; tables before were measured with constant)")
    ap.add_argument("--methods", nargs="+", default=None,
                    help="train and score only these model keys (e.g. ambient-p0.8-d0.1-tilted clean-p0); the "
                         "docs keep this mode's earlier rows of the other models, dated")
    ap.add_argument("--max-size", type=int, default=None,
                    help="train on the first N training images only (the same N for every model)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.quick:
        args.mode = "quick"
    for key, value in MODES[args.mode].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.num_ref + args.num_samples > 10000:
        ap.error("--num-ref + --num-samples must be <= 10000 (the test split holds the reference and the floor)")
    args.out_dir = Path(args.out_dir or ROOT / "runs" / "validate" / args.mode)
    return args


def sampler_ablation(m: Method, args, root: Path, scorer: Scorer, main_row: dict, main_u8: torch.Tensor,
                     base: dict) -> list[dict]:
    """Redraw model m's first ``--ablation-samples`` seeds with 4 masks and with 50 steps (one factor at a time;
    4 masks × 50 steps would cost 11× the baseline)."""
    n, out = args.ablation_samples, []
    for k, s in ((1, 18), (4, 18), (1, 50)):
        if (k, s) == (1, 18) and n <= args.num_samples:  # the main samples' first n seeds are these very images
            u8, sec = main_u8[:n], main_row["sample_s"] * n / args.num_samples
        else:
            u8, sec = sample_stage(m, root, args.kimg, n, k, s)
        out.append({**base, "table": "ablation", "method": m.name, "p": m.p, "delta": m.delta, "num_masks": k,
                    "loss_weighting": m.weighting,
                    "steps": s, "train_s": main_row["train_s"], "sample_s": sec, **scorer.score(u8)})
        log(f"ablation masks {k} steps {s}: FID {out[-1]['fid']:.1f}  KID {out[-1]['kid']:.4f}  "
            f"SWD {out[-1]['swd']:.4f}")
    return out


def figure_rows(args, samples: dict) -> list:
    """Rows of docs/fashion_mnist.png for the models done so far."""
    out = [("clean data", corrupted_examples(0.0, 0.0, 12, args.seed))]
    for p in args.probs:
        out.append((f"corrupted p={p:g}", corrupted_examples(p, args.delta, 12, args.seed)))
        for m in (model(args, "naive", p), model(args, "ambient", p)):
            if m.key in samples:
                out.append((f"{m.name} p={p:g}", samples[m.key][:12]))
    clean = model(args, "clean").key
    if clean in samples:
        out.append(("clean-trained", samples[clean][:12]))
    return out


def publish(args, rows: list, samples: dict, argv, started: float, complete: bool) -> None:
    """Write docs/results.md, results.json and the figure from what is done so far."""
    docs = Path(args.docs_dir)
    write_figure(docs / figure_name(args.mode), figure_rows(args, samples))
    meta = {"command": "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])]),
            "mode": args.mode, "kimg": args.kimg, "arch": args.arch, "batch": args.batch, "lr": args.lr,
            "delta": args.delta, "probs": args.probs, "naive_probs": args.naive_probs,
            "num_samples": args.num_samples, "num_ref": args.num_ref, "complete": complete,
            "ablation_samples": args.ablation_samples, "seed": args.seed, "threshold": THRESHOLD,
            "strict_threshold": STRICT_THRESHOLD, "keep_others": bool(args.methods),
            "wall_s": time.perf_counter() - started, "torch_threads": torch.get_num_threads(),
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    write_docs(docs, rows, meta)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    read_rows(Path(args.docs_dir) / "results.json")  # fail now, not after the first model's training
    root = args.out_dir
    root.mkdir(parents=True, exist_ok=True)
    methods = methods_for(args)
    log(f"mode {args.mode}: {len(methods)} models × {args.kimg:g} kimg, N={args.num_samples}, ref={args.num_ref}, "
        f"arch {args.arch}, runs in {root}")
    scorer = Scorer(args.num_ref, args.seed)
    base = dict(mode=args.mode, kimg=args.kimg, arch=args.arch, num_ref=args.num_ref)
    rows, samples, timing = [], {}, {}
    floor = load_images(TEST, max_size=args.num_ref + args.num_samples)[args.num_ref:]
    rows.append({**base, "table": "reference", "method": "real-test", "p": 0.0, "delta": 0.0, "kimg": None,
                 "num_masks": None, "steps": None, "train_s": 0.0, "sample_s": 0.0, **scorer.score(floor)})
    ablated = model(args, "ambient", 0.8)
    for m in methods:  # one model at a time, docs rewritten after each, so a stopped run leaves usable docs
        timing[m.key] = train_stage(m, args, root)
        u8, sec = sample_stage(m, root, args.kimg, args.num_samples, 1, 18)
        samples[m.key] = u8
        rows.append({**base, "table": "main", "method": m.name, "p": m.p, "delta": m.delta, "num_masks": 1,
                     "loss_normalize": m.normalize if m.objective == "ambient" else None,
                     "loss_weighting": m.weighting if m.objective == "ambient" else None,
                     "lr_schedule": m.lr_schedule,
                     "steps": 18, "train_s": timing[m.key]["train_s"], "sample_s": sec, **scorer.score(u8)})
        log(f"{m.key}: FID {rows[-1]['fid']:.1f}  KID {rows[-1]['kid']:.4f}  SWD {rows[-1]['swd']:.4f}  "
            f"memorised {rows[-1]['memorized_share']:.3f}")
        publish(args, rows, samples, argv, started, complete=False)
        if m == ablated and not args.no_ablation:
            rows += sampler_ablation(m, args, root, scorer, rows[-1], u8, base)
            publish(args, rows, samples, argv, started, complete=False)
    publish(args, rows, samples, argv, started, complete=True)
    log(f"wrote {args.docs_dir}/results.md, results.json, {figure_name(args.mode)} "
        f"({(time.perf_counter() - started) / 60:.1f} min this run)")


if __name__ == "__main__":
    main()
