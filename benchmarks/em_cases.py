"""EM beside clean, naive and ambient training on two harder cases than dust at p = 0.8 (issue 16).

``--case box``: Fashion-MNIST, one 14×14 box hidden per image (``--corruption-pattern box``, p = 0.5).
Ambient is trained with today's default weighting (``tilted``) and the further box δ = 0.5 (the same size as
A's box); ``--weightings edm pixel tilted`` adds the paper's weighting (``edm``) and ``pixel``, each at
δ = 0.2 (smaller than A's box) and δ = 0.5; see docs/em_cases.md for why δ = p is the one the method's
theory asks for and why the weighting matters.

``--case rgb``: the colour Fashion-MNIST of benchmarks/mask_law_rgb.py (32×32 RGB, 20 % of the pixels
observed, one mask per pixel given with the data, garbage in the hidden pixels). Its clean and naive models
(and with ``--weightings edm`` the per-pixel ``edm`` ambient model) are reused from that benchmark's run folder
when present; the ``tilted`` (default) and ``pixel`` ambient models are trained here.

Every model: the ``small`` backbone, batch 32, lr 0.002, seed 0, the same images seen. EM: today's defaults
(lap 0 a Gaussian fitted by SQUAREM to ``--gaussian-tol``, completed with its posterior draws; the rotating
redraw), then MMPS E-steps; ``em-init`` starts lap 0 from the ambient model's posterior mean plus the Gaussian's
residual. Scores: N samples (Heun, 18 steps) against held-out clean test images (KID, FID; SWD); per EM lap
also the completions' KID and their PSNR on hidden pixels.

    python benchmarks/em_cases.py --case box --quick --threads 1   # pipeline check, minutes
    python benchmarks/em_cases.py --case box --threads 1           # 10 kimg per model, N = 500
    python benchmarks/em_cases.py --case rgb --threads 1           # 20 kimg per model, N = 400

Every stage is resumable (runs/em_cases/<case>-<mode>/). Writes the case's section of docs/em_cases.md
(between its markers), rows with ``"table": "em_<case>"`` in docs/results.json and docs/em_<case>[_quick].png.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ambient.data.datasets import load_dataset, load_images
from ambient.data.images import float_to_uint8
from ambient.io import atomic_save_npz, atomic_write_text, read_jsonl
from ambient.learners.em import MASK_SIGMA_Y, EMConfig, load_observations, run_em
from ambient.learners.train import train
from ambient.learners.train_config import TrainConfig
from ambient.metrics.features import cached_features
from ambient.metrics.fid import compute_kid, fid_from_features
from ambient.metrics.inception import load_inception
from ambient.metrics.swd import sliced_wasserstein
from ambient.sampling.generate import sample_model
from ambient.store.models import load_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
import mask_law_rgb  # noqa: E402
import validate  # noqa: E402
from em import hidden_psnr  # noqa: E402
from validate_report import read_rows, write_figure  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CASES = {
    "box": {"quick": dict(kimg=1.0, num_samples=64, num_ref=128, laps=2, estep_size=64, rank=16, gaussian_iters=10,
                          gaussian_size=1000, steps=10),
            "full": dict(kimg=10.0, num_samples=500, num_ref=1000, laps=2, estep_size=500, rank=64,
                         gaussian_iters=None, gaussian_size=3000, steps=14)},
    "rgb": {"quick": dict(kimg=1.0, num_samples=64, num_ref=128, laps=2, estep_size=64, rank=8, gaussian_iters=5,
                          gaussian_size=None, steps=10, num_train=400),
            "full": dict(kimg=20.0, num_samples=400, num_ref=800, laps=2, estep_size=400, rank=32,
                         gaussian_iters=None, gaussian_size=None, steps=14, num_train=1200)},
}
BOX_P = 0.5
BOX_DELTAS = (0.2, 0.5)
RGB_AMBIENT = {"edm": "ambient", "pixel": "ambient-pixel", "tilted": "ambient-tilted"}  # weighting -> method name
log = validate.log


def marker(case: str) -> tuple[str, str]:
    return (f"<!-- em-{case}:start (written by benchmarks/em_cases.py; edit outside the markers) -->",
            f"<!-- em-{case}:end -->")


class Scorer:
    """KID/FID (Inception) and pixel SWD against fixed clean reference images (uint8, (N, C, H, W))."""

    def __init__(self, ref: torch.Tensor, seed: int):
        self.net = load_inception()
        self.fid_id = f"inception-{self.net.sha256}"
        self.ref, self.seed = ref, seed
        self.ref_feats = cached_features(ref, self.net, self.fid_id, 64, progress=False)

    def score(self, u8: torch.Tensor) -> dict:
        feats = cached_features(u8, self.net, self.fid_id, 64, progress=False)
        kid, kid_std = compute_kid(feats, self.ref_feats, num_subsets=100,
                                   max_subset_size=min(len(feats), len(self.ref_feats)), seed=self.seed)
        swd = sliced_wasserstein(u8, self.ref, num_projections=256, generator=torch.Generator().manual_seed(self.seed))
        return {"fid": fid_from_features(feats, self.ref_feats), "kid": kid, "kid_std": kid_std, "swd": swd,
                "num_samples": int(u8.shape[0])}


def train_stage(key: str, cfg: TrainConfig) -> float:
    done = Path(cfg.outdir) / "bench-train.json"
    if done.is_file() and json.loads(done.read_text())["kimg"] == cfg.kimg:
        return json.loads(done.read_text())["train_s"]
    log(f"{key}: training {cfg.kimg:g} kimg ({cfg.objective}, {cfg.corruption_pattern} p={cfg.corruption_probability:g}"
        f", δ={cfg.delta_probability:g})")
    t0 = time.perf_counter()
    train(cfg, progress=False, log=lambda m: None)
    seconds = time.perf_counter() - t0
    done.write_text(json.dumps({"kimg": cfg.kimg, "train_s": seconds}))
    return seconds


def sample_stage(model_dir: Path, n: int, kimg: float, name: str = "bench-samples") -> tuple[torch.Tensor, float]:
    path = model_dir / f"{name}-n{n}.npz"
    if path.is_file():
        with np.load(path) as f:
            if "kimg" not in f.files or float(f["kimg"]) == kimg:
                return torch.from_numpy(f["images"]), float(f["seconds"]) if "seconds" in f.files else 0.0
    t0 = time.perf_counter()
    u8 = float_to_uint8(sample_model(load_model(model_dir), list(range(n)), batch=100, num_steps=18))
    seconds = time.perf_counter() - t0
    atomic_save_npz(path, images=u8.numpy(), kimg=np.array(kimg), seconds=np.array(seconds))
    return u8, seconds


# ---------------------------------------------------------------------------------------------- cases
def box_setup(args, root: Path):
    """(baselines as (key, TrainConfig), EM observations' EMConfig kwargs, clean train images, reference)."""
    common = dict(data=validate.DATA, arch="small", batch=32, lr=2e-3, lr_warmup_kimg=1.0, kimg=args.kimg,
                  ema=max(args.kimg / 16, 0.1), snapshot_kimg=max(args.kimg / 4, 0.5),
                  tick_kimg=max(args.kimg / 50, 0.1), grid_samples=16, seed=0, corruption_pattern="box")
    models = [("clean", TrainConfig(outdir=str(root / "clean"), objective="naive", corruption_probability=0.0,
                                    **common)),
              ("naive", TrainConfig(outdir=str(root / "naive"), objective="naive", corruption_probability=BOX_P,
                                    **common))]
    models += [(box_key(d, w), TrainConfig(outdir=str(root / box_key(d, w)), objective="ambient",
                                           corruption_probability=BOX_P, delta_probability=d, loss_weighting=w,
                                           **common))
               for w in args.weightings for d in (BOX_DELTAS if w != "tilted" or args.deltas_all else BOX_DELTAS[-1:])]
    em_kwargs = dict(data=validate.DATA, corruption_pattern="box", corruption_probability=BOX_P)
    ref = load_images(validate.TEST, max_size=args.num_ref)
    examples = [("clean data", load_images(validate.DATA, max_size=12)),
                (f"observed (box p={BOX_P:g})", float_to_uint8(load_dataset(
                    validate.DATA, max_size=12, corruption=box_corruption(), seed=0).batch(list(range(12)))[0]))]
    return models, em_kwargs, load_images(validate.DATA), ref, examples, box_key(BOX_DELTAS[-1], args.weightings[-1])


def box_key(delta: float, weighting: str) -> str:
    """Run name of a box ambient model: the paper's weighting unmarked (as in the 2026-12-01 runs)."""
    return f"ambient-d{delta:g}" + ("" if weighting == "edm" else f"-{weighting}")


def box_hole_errors(model_dir: str, clean_dir: str, delta: float, n: int, seed: int = 7) -> dict:
    """Where does a box-trained ambient model fill holes well? Its posterior mean E[x | Ã ⊙ x, Ã] on clean
    test images, with masks drawn from its own training law (A: a p-box; Ã: A minus a δ-box), scored on
    A's hole (never graded when the network can tell it apart) and on the δ-box's pixels inside A (graded)."""
    from ambient.data.corruption import Corruption
    from ambient.sampling.posterior import ambient_mean

    x = load_images(validate.TEST, max_size=n).float() / 127.5 - 1
    law = Corruption("box", BOX_P, delta)
    g = torch.Generator().manual_seed(seed)
    a = law.mask(x.shape, generator=g)
    a_tilde = law.further(a, generator=g)
    den = load_model(model_dir).denoiser
    est = ambient_mean(den, x, a_tilde)
    sq = (est - x) ** 2
    out = {}
    for name, where in (("a_hole", a == 0), ("delta_hole", (a == 1) & (a_tilde == 0))):
        out[f"mse_{name}"] = float(sq[where].mean())
        out[f"mse_{name}_mean_image"] = float(((x.mean(0, keepdim=True).expand_as(x) - x) ** 2)[where].mean())
    # denoising where the network sees the pixels (Ã = 1), beside the clean model seeing every pixel
    noise = torch.randn(x.shape, generator=g)
    clean_den = load_model(clean_dir).denoiser
    for sigma in (0.2, 1.0):
        sig = torch.full((x.shape[0],), sigma)
        with torch.no_grad():
            d_amb = den(a_tilde * (x + sigma * noise), sig, a_tilde)
            d_clean = clean_den(x + sigma * noise, sig)
        seen = a_tilde == 1
        out[f"mse_visible_s{sigma:g}"] = float(((d_amb - x) ** 2)[seen].mean())
        out[f"mse_visible_s{sigma:g}_clean"] = float(((d_clean - x) ** 2)[seen].mean())
    return out


def box_corruption():
    from ambient.data.corruption import Corruption

    return Corruption("box", BOX_P, 0.0)


def rgb_setup(args, root: Path):
    data_root = ROOT / "runs" / "mask_law_rgb" / args.mode
    paths = mask_law_rgb.build_data(data_root / "data", args.num_train, 2 * args.num_ref, 0.2, 0)
    ns = argparse.Namespace(kimg=args.kimg, delta=0.1, arch="small", batch=32, lr=2e-3, seed=0,
                            num_samples=args.num_samples)
    common = dict(delta_probability=ns.delta, arch=ns.arch, batch=ns.batch, lr=ns.lr, lr_warmup_kimg=1.0,
                  kimg=ns.kimg, ema=max(ns.kimg / 16, 0.1), snapshot_kimg=max(ns.kimg / 4, 0.5),
                  tick_kimg=max(ns.kimg / 50, 0.1), grid_samples=16, seed=ns.seed)
    # mask_law_rgb's run folder holds these three models when that benchmark ran with the same budget
    models = [("clean", TrainConfig(data=str(paths["clean"]), outdir=str(data_root / "clean"), objective="naive",
                                    **common)),
              ("naive", TrainConfig(data=str(paths["obs"]), outdir=str(data_root / "naive"), objective="naive",
                                    **common)),
              ("ambient", TrainConfig(data=str(paths["obs"]), outdir=str(data_root / "ambient-per-pixel"),
                                      objective="ambient", loss_weighting="edm", **common)),
              ("ambient-pixel", TrainConfig(data=str(paths["obs"]), outdir=str(root / "ambient-pixel"),
                                            objective="ambient", loss_weighting="pixel", **common)),
              ("ambient-tilted", TrainConfig(data=str(paths["obs"]), outdir=str(root / "ambient-tilted"),
                                             objective="ambient", loss_weighting="tilted", **common))]
    models = models[:2] + [m for m in models[2:] if m[0] in {RGB_AMBIENT[w] for w in args.weightings}]
    with np.load(paths["test"]) as f:
        ref = torch.from_numpy(f["images"][:args.num_ref]).permute(0, 3, 1, 2).contiguous()
    with np.load(paths["clean"]) as f:
        clean = torch.from_numpy(f["images"]).permute(0, 3, 1, 2).contiguous()
    with np.load(paths["obs"]) as f:
        stored = torch.from_numpy(f["images"][:12]).permute(0, 3, 1, 2)
    examples = [("clean data", clean[:12]), ("observations", stored)]
    return (models, dict(data=str(paths["obs"]), corruption_probability=0.0), clean, ref, examples,
            RGB_AMBIENT[args.weightings[-1]])


# ---------------------------------------------------------------------------------------------- EM
def em_names(init: str | None, sigma_y: float) -> tuple[str, str]:
    """(method, run folder) of an EM run: the method is plain ``em`` at ambient em's σ_y; the folders of runs at
    σ_y = 1e-3 (the default before MASK_SIGMA_Y) keep their unsuffixed names, so those runs are reused."""
    base = "em-init" if init else "em"
    return (base if sigma_y == MASK_SIGMA_Y else f"{base}-sy{sigma_y:g}",
            base if sigma_y == 1e-3 else f"{base}-sy{sigma_y:g}")


def em_config(args, root: Path, em_kwargs: dict, init: str | None, sigma_y: float) -> EMConfig:
    lap_kimg = args.kimg / args.laps
    return EMConfig(outdir=str(root / em_names(init, sigma_y)[1]), init=init, laps=args.laps, lap_kimg=lap_kimg,
                    estep_size=args.estep_size, rank=args.rank,
                    **({} if args.gaussian_iters is None else {"gaussian_iters": args.gaussian_iters}),
                    gaussian_size=args.gaussian_size, steps=args.steps, cg_iters=1, sigma_y=sigma_y, estep_batch=64,
                    arch="small", batch=32, lr=2e-3, ema=max(lap_kimg / 8, 0.1),
                    snapshot_kimg=max(lap_kimg / 2, 0.5), seed=0, **em_kwargs)


def em_rows(args, cfg: EMConfig, scorer: Scorer, clean: torch.Tensor, method: str, extra_s: float):
    run = Path(cfg.outdir)
    stats = {r["lap"]: r for r in read_jsonl(run / "stats.jsonl")}
    masks = load_observations(cfg).batch(torch.arange(clean.shape[0]))[1]
    rows, last, elapsed = [], None, extra_s
    for lap in sorted(stats):
        s = stats[lap]
        elapsed += s["lap_seconds"]
        u8, sample_s = sample_stage(run / f"lap-{lap:02d}", args.num_samples, (lap + 1) * cfg.lap_kimg, "em-samples")
        with np.load(run / "completions" / f"lap-{lap:02d}.npz") as z:
            done = torch.from_numpy(z["images"]).permute(0, 3, 1, 2)
            index = torch.from_numpy(z["index"])
        comp = scorer.score(done[: max(args.num_samples, 2)])
        rows.append({"method": method, "lap": lap, "kimg": round((lap + 1) * cfg.lap_kimg, 4), "train_s": elapsed,
                     "sample_s": sample_s, "estep_s": s["estep_seconds"], "mstep_s": s["mstep_seconds"],
                     "completions_kid": comp["kid"], "completions_kid_std": comp["kid_std"],
                     "hidden_psnr": hidden_psnr(done, index, clean, masks), **scorer.score(u8)})
        last = u8
        log(f"{method} lap {lap}: KID×10³ {1e3 * rows[-1]['kid']:.1f}  completions KID×10³ "
            f"{1e3 * comp['kid']:.1f}  hidden PSNR {rows[-1]['hidden_psnr']:.2f} dB")
    return rows, last


# ---------------------------------------------------------------------------------------------- docs
def write_docs(args, rows: list[dict], figure: list, meta: dict) -> None:
    docs = Path(args.docs_dir)
    suffix = "" if args.mode == "full" else f"_{args.mode}"
    fig = f"em_{args.case}{suffix}.png"
    write_figure(docs / fig, figure)
    start, end = marker(f"{args.case}{suffix}")
    title = {"box": f"Box masks: Fashion-MNIST, one {BOX_P:g}·H × {BOX_P:g}·W box hidden per image",
             "rgb": "Colour data: 32×32 RGB, 20 % of the pixels observed, masks given per pixel"}[args.case]
    lines = [start, f"## {title} ({args.mode} mode)", "",
             f"Command: `{meta['command']}` ({meta['date']}, {meta['threads']} torch threads, {meta['wall_s'] / 60:.1f}"
             " min this invocation; the machine was shared with other jobs, so minutes are not speed figures).", "",
             f"Every model: `small` backbone, batch 32, lr 0.002, seed 0, {args.kimg:g} kimg (EM: {args.laps} laps × "
             f"{args.kimg / args.laps:g} kimg, {args.estep_size} fresh MMPS completions per lap ({args.steps} Heun "
             f"steps, 1 CG iteration, σ_y = {MASK_SIGMA_Y:g}, ambient em's default; `em-syX` rows: σ_y = X), Gaussian "
             f"lap 0 of rank {args.rank}). Scores: {args.num_samples} samples (Heun, "
             f"18 steps) against {args.num_ref} clean test images. `compl. KID`: KID of the lap's completions; "
             "`hidden PSNR`: completions vs the clean images on hidden pixels ([−1, 1], dB).", "",
             "| method | lap | kimg | FID ↓ | KID ×10³ ↓ | SWD ×10² ↓ | compl. KID ×10³ | hidden PSNR | train min |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lap = "—" if r.get("lap") is None else str(r["lap"])
        comp = "—" if r.get("completions_kid") is None else f"{1e3 * r['completions_kid']:.1f}"
        psnr = "—" if r.get("hidden_psnr") is None else f"{r['hidden_psnr']:.2f}"
        lines.append(f"| {r['method']} | {lap} | {r['kimg']:g} | {r['fid']:.1f} | {1e3 * r['kid']:.1f} ± "
                     f"{1e3 * r['kid_std']:.1f} | {100 * r['swd']:.2f} | {comp} | {psnr} | {r['train_s'] / 60:.1f} |")
    holes = [r for r in rows if r.get("mse_a_hole") is not None]
    if holes:
        lines += ["", f"Where the box-trained ambient models fill holes: their posterior mean E[x | Ã ⊙ x, Ã] on "
                  f"{args.num_ref} clean test images, masks drawn from each model's own training law; mean squared "
                  "error ([−1, 1] scale) in A's box and in the δ-box's pixels that A shows (the per-pixel mean of "
                  "the test images in brackets).", "",
                  "| model | MSE in A's box | MSE in the δ-box | denoising MSE at seen pixels, σ = 0.2 / 1 (clean "
                  "model) |", "| --- | --- | --- | --- |"]
        lines += [f"| {r['method']} | {r['mse_a_hole']:.4f} ({r['mse_a_hole_mean_image']:.4f}) | "
                  f"{r['mse_delta_hole']:.4f} ({r['mse_delta_hole_mean_image']:.4f}) | {r['mse_visible_s0.2']:.4f} / "
                  f"{r['mse_visible_s1']:.4f} ({r['mse_visible_s0.2_clean']:.4f} / {r['mse_visible_s1_clean']:.4f}) |"
                  for r in holes]
    lines += ["", f"Figure: `docs/{fig}` (rows: clean data, observations, then samples of each model; seeds 0..11).",
              "", end]
    path = docs / "em_cases.md"
    text = path.read_text(encoding="utf-8") if path.is_file() else "# EM on harder cases: box masks and colour data\n"
    body = "\n".join(lines)
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _m: body, text) if pattern.search(text) else text.rstrip() + "\n\n" + body + "\n"
    atomic_write_text(path, text)
    path_json = docs / "results.json"
    table = f"em_{args.case}"
    kept = [r for r in read_rows(path_json) if not (r.get("table") == table and r.get("mode") == args.mode)]
    keep = ("method", "lap", "kimg", "fid", "kid", "kid_std", "swd", "train_s", "sample_s", "completions_kid",
            "hidden_psnr", "delta", "mse_a_hole", "mse_delta_hole", "mse_a_hole_mean_image",
            "mse_delta_hole_mean_image", "mse_visible_s0.2", "mse_visible_s0.2_clean", "mse_visible_s1",
            "mse_visible_s1_clean")
    new = [{"table": table, "mode": args.mode, "arch": "small", "num_samples": args.num_samples,
            "num_ref": args.num_ref, **{k: r.get(k) for k in keep}} for r in rows]
    atomic_write_text(path_json, json.dumps(kept + new, indent=1) + "\n")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--case", choices=tuple(CASES), required=True)
    ap.add_argument("--quick", action="store_true")
    for key in ("kimg", "num_samples", "num_ref", "laps", "estep_size", "rank", "gaussian_iters", "steps"):
        ap.add_argument(f"--{key.replace('_', '-')}", type=float if key == "kimg" else int, default=None)
    ap.add_argument("--no-init", action="store_true", help="skip EM started from the ambient model")
    ap.add_argument("--weightings", nargs="+", choices=("edm", "pixel", "tilted"), default=["tilted"],
                    help="ambient models' loss weightings (default: today's default, tilted; the last one is the "
                         "ambient model em-init starts from)")
    ap.add_argument("--deltas-all", action="store_true",
                    help=f"box: train tilted at every δ in {BOX_DELTAS} (edm and pixel always are)")
    ap.add_argument("--em-sigma-y", type=float, nargs="+", default=[MASK_SIGMA_Y],
                    help=f"EM's MMPS σ_y, one EM run each (default: ambient em's, {MASK_SIGMA_Y:g}; runs at 1e-3, "
                         "the earlier default, live in the unsuffixed em folders)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--docs-dir", default=str(ROOT / "docs"))
    args = ap.parse_args(argv)
    args.mode = "quick" if args.quick else "full"
    for k, v in CASES[args.case][args.mode].items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    read_rows(Path(args.docs_dir) / "results.json")  # fail now, not after training
    root = ROOT / "runs" / "em_cases" / f"{args.case}-{args.mode}"
    root.mkdir(parents=True, exist_ok=True)
    setup = box_setup if args.case == "box" else rgb_setup
    models, em_kwargs, clean, ref, figure, init_key = setup(args, root)
    scorer = Scorer(ref, 0)
    words = [sys.argv[0], *(sys.argv[1:] if argv is None else argv)]
    meta = {"command": "python " + " ".join(shlex.quote(a) for a in words), "threads": torch.get_num_threads(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    rows, dirs = [], {}
    for key, cfg in models:
        train_s = train_stage(key, cfg)
        u8, sample_s = sample_stage(Path(cfg.outdir), args.num_samples, args.kimg)
        dirs[key] = cfg.outdir
        rows.append({"method": key, "kimg": args.kimg, "train_s": train_s, "sample_s": sample_s,
                     "delta": cfg.delta_probability if cfg.objective == "ambient" else None, **scorer.score(u8)})
        figure.append((key, u8[:12]))
        log(f"{key}: KID×10³ {1e3 * rows[-1]['kid']:.1f}  FID {rows[-1]['fid']:.1f}")
        write_docs(args, rows, figure, {**meta, "wall_s": time.perf_counter() - started})
    if args.case == "box":
        for r in rows:
            if r["delta"] is not None:
                r.update(box_hole_errors(dirs[r["method"]], dirs["clean"], r["delta"], args.num_ref))
                log(f"{r['method']}: MSE in A's hole {r['mse_a_hole']:.4f}, in the δ-box {r['mse_delta_hole']:.4f} "
                    f"(mean image: {r['mse_a_hole_mean_image']:.4f}, {r['mse_delta_hole_mean_image']:.4f}); "
                    f"visible σ=0.2 {r['mse_visible_s0.2']:.4f} (clean model {r['mse_visible_s0.2_clean']:.4f})")
    init_train_s = next(r["train_s"] for r in rows if r["method"] == init_key)
    inits = [None] + ([] if args.no_init else [dirs[init_key]])
    for init, sigma_y in [(i, sy) for i in inits for sy in args.em_sigma_y]:
        method = em_names(init, sigma_y)[0]
        cfg = em_config(args, root, em_kwargs, init, sigma_y)
        log(f"{method}: {cfg.laps} laps × {cfg.lap_kimg:g} kimg in {cfg.outdir}")
        run_em(cfg, log=lambda m: None)
        lap_rows, last = em_rows(args, cfg, scorer, clean, method, init_train_s if init else 0.0)
        rows += lap_rows
        figure.append((f"{method} lap {lap_rows[-1]['lap']}", last[:12]))
        write_docs(args, rows, figure, {**meta, "wall_s": time.perf_counter() - started})
    log(f"done in {(time.perf_counter() - started) / 60:.1f} min")


if __name__ == "__main__":
    main()
