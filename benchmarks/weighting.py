"""The ambient loss weightings side by side on real data: KID against held-out clean test images.

Three cases, each with clean and naive baselines and one ambient model per weighting (``edm``: the
paper's; ``pixel``; ``tilted``), all with the same backbone, budget, seed and data:

* ``dust``: Fashion-MNIST, 80 % of the pixels hidden by dust masks drawn per image (δ = 0.1), 28×28 grey;
* ``rgb``: Fashion-MNIST painted in random colours (``benchmarks/mask_law_rgb.py``'s data), 32×32 RGB,
  80 % hidden by per-pixel masks given with the data (garbage at hidden pixels), δ = 0.1;
* ``box``: Fashion-MNIST with a box of side ⌈0.5·28⌉ hidden per image, δ = p = 0.5 (the further box
  the same size as A's, see ``ambient.data.corruption.Corruption.unlearnt_hole``).

Each model draws N samples (Heun, 18 steps, its own mask law) scored against N_ref clean test images:
KID and FID on Inception features, and the share of the naive → clean KID gap each ambient model closes.
KID alone rewards smooth or sharp samples of the wrong distribution: read it beside
``benchmarks/fidelity.py``, which scores the learnt distribution against exact answers.

    python benchmarks/weighting.py --mode quick --threads 1     # end to end, tiny budgets
    python benchmarks/weighting.py --mode full --threads 1      # dust 10 kimg, rgb 10 kimg, box 6 kimg

Resumable (runs in runs/weighting/<mode>/<case>-<method>); writes docs/weighting.md (this mode's section)
and docs/weighting.json (this mode's rows).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ambient.data.datasets import load_images
from ambient.data.images import float_to_uint8
from ambient.io import atomic_save_npz, atomic_write_text
from ambient.learners.train import train
from ambient.learners.train_config import TrainConfig
from ambient.metrics.features import cached_features
from ambient.metrics.fid import compute_kid, fid_from_features
from ambient.metrics.inception import load_inception
from ambient.sampling.generate import sample_model
from ambient.store.models import load_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mask_law_rgb import build_data  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WEIGHTINGS = ("edm", "pixel", "tilted")
# (method, loss weighting, learning-rate schedule) of the ambient models: each weighting at the constant rate, and
# today's default with the cosine decay
AMBIENT_VARIANTS = [*((f"ambient-{w}", w, "constant") for w in WEIGHTINGS),
                    ("ambient-tilted-cosine", "tilted", "cosine")]
# (suffix, schedule) of the baselines: "clean" / "naive" at the constant rate, "clean-cosine" / "naive-cosine" with
# the cosine decay (ambient train's default since 2026-12-05)
BASELINE_SCHEDULES = [("", "constant"), ("-cosine", "cosine")]
MODES = {
    "quick": dict(kimg={"dust": 1.0, "rgb": 1.0, "box": 1.0}, num_samples=64, num_ref=128, num_train=2000),
    "full": dict(kimg={"dust": 10.0, "rgb": 10.0, "box": 6.0}, num_samples=300, num_ref=1000, num_train=None),
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def case_configs(case: str, args, root: Path) -> tuple[list[tuple[str, TrainConfig]], torch.Tensor]:
    """(method, TrainConfig) for each model of ``case`` and the clean reference test images (uint8)."""
    kimg = args.kimg[case]
    common = dict(arch="small", batch=32, lr=2e-3, lr_warmup_kimg=1.0, kimg=kimg, ema=max(kimg / 16, 0.1),
                  snapshot_kimg=max(kimg / 4, 0.5), tick_kimg=max(kimg / 50, 0.1), grid_samples=16, seed=args.seed,
                  max_size=args.num_train)
    out = lambda m: str(root / f"{case}-{m}")  # noqa: E731
    if case == "rgb":
        paths = build_data(root / "rgb-data", args.num_train or 1200, args.num_ref, keep=0.2, seed=args.seed)
        common.pop("max_size")
        models = [(f"{kind}{suffix}", TrainConfig(data=str(paths["clean" if kind == "clean" else "obs"]),
                                                  outdir=out(f"{kind}{suffix}"), objective="naive",
                                                  lr_schedule=schedule, **common))
                  for suffix, schedule in BASELINE_SCHEDULES for kind in ("clean", "naive")]
        models += [(name, TrainConfig(data=str(paths["obs"]), outdir=out(name), objective="ambient",
                                      delta_probability=0.1, loss_weighting=w, lr_schedule=schedule, **common))
                   for name, w, schedule in AMBIENT_VARIANTS]
        with np.load(paths["test"]) as f:
            ref = torch.from_numpy(f["images"]).permute(0, 3, 1, 2).contiguous()
        return models, ref
    pattern, p, delta = ("dust", 0.8, 0.1) if case == "dust" else ("box", 0.5, 0.5)
    data = "builtin:fashion-mnist"
    # one clean model for both Fashion-MNIST cases (p = 0: the mask pattern plays no part), trained under dust's name
    clean_common = {**common, "kimg": args.kimg["dust"], "ema": max(args.kimg["dust"] / 16, 0.1),
                    "snapshot_kimg": max(args.kimg["dust"] / 4, 0.5), "tick_kimg": max(args.kimg["dust"] / 50, 0.1)}
    models = []
    for suffix, schedule in BASELINE_SCHEDULES:
        models += [(f"clean{suffix}", TrainConfig(data=data, outdir=str(root / f"dust-clean{suffix}"),
                                                  objective="naive", lr_schedule=schedule, **clean_common)),
                   (f"naive{suffix}", TrainConfig(data=data, outdir=out(f"naive{suffix}"), objective="naive",
                                                  corruption_pattern=pattern, corruption_probability=p,
                                                  lr_schedule=schedule, **common))]
    models += [(name, TrainConfig(data=data, outdir=out(name), objective="ambient", corruption_pattern=pattern,
                                  corruption_probability=p, delta_probability=delta, loss_weighting=w,
                                  lr_schedule=schedule, **common))
               for name, w, schedule in AMBIENT_VARIANTS]
    return models, load_images("builtin:fashion-mnist:test", max_size=args.num_ref)


def train_stage(cfg: TrainConfig) -> float:
    marker = Path(cfg.outdir) / "bench-train.json"
    if marker.is_file() and json.loads(marker.read_text())["kimg"] == cfg.kimg:
        return json.loads(marker.read_text())["train_s"]
    t0 = time.perf_counter()
    train(cfg, progress=False, log=lambda _m: None)
    seconds = time.perf_counter() - t0
    marker.write_text(json.dumps({"kimg": cfg.kimg, "train_s": seconds}))
    return seconds


def sample_stage(cfg: TrainConfig, n: int) -> tuple[torch.Tensor, float]:
    path = Path(cfg.outdir) / f"bench-samples-n{n}.npz"
    if path.is_file():
        with np.load(path) as f:
            if float(f["kimg"]) == cfg.kimg:
                return torch.from_numpy(f["images"]), float(f["seconds"])
    t0 = time.perf_counter()
    u8 = float_to_uint8(sample_model(load_model(cfg.outdir), list(range(n)), batch=100, num_steps=18))
    seconds = time.perf_counter() - t0
    atomic_save_npz(path, images=u8.numpy(), kimg=np.array(cfg.kimg), seconds=np.array(seconds))
    return u8, seconds


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mode", choices=tuple(MODES), default="quick")
    ap.add_argument("--cases", nargs="+", choices=("dust", "rgb", "box"), default=["dust", "rgb", "box"])
    ap.add_argument("--methods", nargs="+", default=None,
                    help="default: clean naive ambient-<each weighting> at a constant rate, clean-cosine "
                         "naive-cosine ambient-tilted-cosine with the cosine decay (--lr-schedule cosine)")
    ap.add_argument("--num-samples", type=int)
    ap.add_argument("--num-ref", type=int)
    ap.add_argument("--num-train", type=int)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--docs-dir", default=str(ROOT / "docs"))
    args = ap.parse_args(argv)
    for key, value in MODES[args.mode].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    root = ROOT / "runs" / "weighting" / args.mode
    root.mkdir(parents=True, exist_ok=True)
    net = load_inception()
    fid_id = f"inception-{net.sha256}"
    started = time.perf_counter()
    words = [sys.argv[0], *(sys.argv[1:] if argv is None else argv)]
    command = "python " + " ".join(shlex.quote(a) for a in words)
    rows = []
    for case in args.cases:
        models, ref = case_configs(case, args, root)
        ref_feats = cached_features(ref, net, fid_id, 64, progress=False)
        if args.methods:  # in the order given
            models = sorted((m for m in models if m[0] in args.methods), key=lambda m: args.methods.index(m[0]))
        for method, cfg in models:
            log(f"{case} {method}: {cfg.kimg:g} kimg")
            train_s = train_stage(cfg)
            u8, sample_s = sample_stage(cfg, args.num_samples)
            feats = cached_features(u8, net, fid_id, 64, progress=False)
            kid, kid_std = compute_kid(feats, ref_feats, num_subsets=100, max_subset_size=min(len(feats), 1000),
                                       seed=args.seed)
            rows.append({"case": case, "method": method, "kimg": cfg.kimg, "kid": kid, "kid_std": kid_std,
                         "fid": fid_from_features(feats, ref_feats), "train_s": train_s, "sample_s": sample_s,
                         "num_samples": args.num_samples, "num_ref": len(ref), "mode": args.mode})
            log(f"{case} {method}: KID×10³ {1e3 * kid:.1f} ± {1e3 * kid_std:.1f}, FID {rows[-1]['fid']:.1f}")
            write_docs(args, rows, command, time.perf_counter() - started)


def gap(rows: list[dict], r: dict) -> str:
    """The share of the naive → clean KID gap an ambient model closes, against the baselines trained with the same
    learning-rate schedule (``clean-cosine`` / ``naive-cosine`` for a ``-cosine`` model, where measured)."""
    base = {x["method"]: x["kid"] for x in rows if x["case"] == r["case"]}
    suffix = "-cosine" if r["method"].endswith("-cosine") and {"clean-cosine", "naive-cosine"} <= set(base) else ""
    clean, naive = f"clean{suffix}", f"naive{suffix}"
    if not r["method"].startswith("ambient") or clean not in base or naive not in base:
        return "–"
    return f"{(base[naive] - r['kid']) / (base[naive] - base[clean]):.2f}"


def write_docs(args, rows: list[dict], command: str, wall_s: float) -> None:
    """This run's rows replace those of the same mode, case and method in docs/weighting.json; each (mode, case) has
    its own section in docs/weighting.md, with every row of that mode and case, so cases and methods may run in
    separate processes."""
    docs = Path(args.docs_dir)
    json_path = docs / "weighting.json"
    old = json.loads(json_path.read_text())["rows"] if json_path.is_file() else []
    mine = {(r["mode"], r["case"], r["method"]) for r in rows}
    rows = [r for r in old if (r.get("mode"), r.get("case"), r.get("method")) not in mine] + rows
    atomic_write_text(json_path, json.dumps({"rows": rows}, indent=1) + "\n")
    rows = [r for r in rows if r.get("mode") == args.mode and r["case"] in args.cases]
    md = docs / "weighting.md"
    text = md.read_text() if md.is_file() else "# Loss weightings on real data\n"
    for case in dict.fromkeys(r["case"] for r in rows):
        case_rows = [r for r in rows if r["case"] == case]
        lines = ["| method | kimg | KID ×10³ | FID | naive → clean gap closed |", "|" + " --- |" * 5]
        for r in case_rows:
            lines.append(f"| {r['method']} | {r['kimg']:g} | {1e3 * r['kid']:.1f} ± {1e3 * r['kid_std']:.1f} "
                         f"| {r['fid']:.1f} | {gap(rows, r)} |")
        start, end = f"<!-- {args.mode}-{case}:start -->", f"<!-- {args.mode}-{case}:end -->"
        section = "\n".join([start, f"## {case} ({args.mode} mode)", "",
                             f"`{command}` — {time.strftime('%Y-%m-%d')}, `small` backbone, batch 32, "
                             f"{args.num_samples} samples per model against {case_rows[0]['num_ref']} clean test "
                             "images; each model's training and sampling seconds are in weighting.json (a run that "
                             "reuses trained models and samples takes seconds). The clean model is shared by the "
                             "Fashion-MNIST cases (p = 0).", "", *lines, end])
        if start in text and end in text:
            text = text[:text.index(start)] + section + text[text.index(end) + len(end):]
        else:
            text = text.rstrip("\n") + "\n\n" + section + "\n"
    atomic_write_text(md, text)


if __name__ == "__main__":
    main()
