"""EM benchmark: the EM learner (``ambient em``) beside clean, naive and ambient training on Fashion-MNIST, p = 0.8.

The baselines are benchmarks/validate.py's models of the same mode (``runs/validate/<mode>/<key>``: trained
there, or here with validate's own settings when missing, so both scripts share them). The EM run sees the
same observations as ambient p = 0.8 (dust masks drawn from the same seed) and the same number of training
images in total (laps × lap kimg = the baselines' kimg), with the same backbone, batch and learning rate.

Per lap ℓ: its model's samples (seeds 0..N−1, Heun 18 steps, plain full-image sampling) scored like
validate's (FID, KID, SWD against the first --num-ref clean test images); the KID of the lap's completions
(the images its M-step trained on; lap 0: the Gaussian prior's exact posterior draws, or with --lap0 mean its
posterior mean) and their PSNR on the
hidden pixels against the clean training images; E-step and M-step wall times.

    python benchmarks/em.py --quick --threads 1   # pipeline check, 1.5 kimg, 2 laps, N = 64: 6.5 min
    python benchmarks/em.py --mode medium --threads 2   # validate's medium models (18 kimg), 3 laps × 6 kimg
    python benchmarks/em.py --threads 2           # full: 60 kimg, 3 laps × 20 kimg, 1000 fresh completions per lap
    python benchmarks/em.py --mode curve --threads 1   # 3000 observations, 8 laps × 4 kimg, all redrawn in turn

Writes docs/em.md (curve mode: many laps on a subset, so every observation is redrawn) or docs/em_<mode>.md
(labelled as such), the per-lap curve and the sample grid beside it, and rows ``"method": "em"`` with ``"lap"``
in docs/results.json (table "em", this mode's rows replaced). Every stage resumes (ambient em resumes itself;
samples are cached in each lap's folder).
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
from ambient.io import atomic_save_npz, atomic_write_text, read_jsonl
from ambient.learners.em import MASK_SIGMA_Y, EMConfig, load_observations, run_em
from ambient.sampling.generate import sample_model
from ambient.store.models import load_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
import validate  # noqa: E402
from em_report import write_curve, write_markdown  # noqa: E402
from validate_report import read_rows, write_figure  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
P = 0.8
# Full mode, sized from the medium run (1 thread, shared CPU): an MMPS E-step of 1000 observations (14 Heun
# steps, 1 CG iteration) took ~7 min, 20 kimg of M-step ~6 min, 1000 samples ~3 min; so 3 laps ≈ 45 min. The
# Gaussian (rank 64, 5000 observations, 50 iterations) ≈ 4 min. Missing-data EM converges slowly at 80 % missing
# (the log-likelihood still rose after 40 iterations on 2000 images), hence 50 iterations.
MODES = {
    "quick": dict(laps=2, estep_size=256, steps=10, rank=16, gaussian_iters=20, gaussian_size=2000),
    "medium": dict(laps=3, estep_size=1000, steps=14, rank=64, gaussian_iters=30, gaussian_size=3000),
    "full": dict(laps=3, estep_size=1000, steps=14, rank=64, gaussian_iters=50, gaussian_size=5000),
    # issue 24's convergence curve: the first 3000 observations only (the same 3000 for every method), 1000
    # redrawn per lap in rotation (every completion at most 3 laps old), 8 laps × 4 kimg; the baselines are
    # trained here on the same 3000 images for the same 32 kimg (validate's settings otherwise)
    "curve": dict(laps=8, estep_size=1000, steps=14, rank=64, gaussian_iters=100, gaussian_size=3000),
}
SUBSETS = {"curve": dict(max_size=3000, kimg="32", num_samples="500", num_ref="2000")}
log = validate.log
NOTES = "<!-- notes: written by hand, kept when benchmarks/em.py rewrites the page above -->"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mode", choices=tuple(MODES), default="full")
    ap.add_argument("--quick", action="store_true", help="same as --mode quick")
    ap.add_argument("--out-dir", default=None, help="EM runs folder (default runs/em/<mode>)")
    ap.add_argument("--docs-dir", default=str(ROOT / "docs"))
    ap.add_argument("--validate-dir", default=None, help="validate.py's run folder (default runs/validate/<mode>)")
    ap.add_argument("--with-init", action="store_true",
                    help="also run EM with --init = the ambient p = 0.8 model (lap 0 from its posterior mean)")
    ap.add_argument("--threads", type=int, default=None)
    for key in MODES["full"]:
        ap.add_argument(f"--{key.replace('_', '-')}", type=int, default=None)
    for flag in ("--kimg", "--num-samples", "--num-ref"):  # passed on to validate's settings (default: its mode's)
        ap.add_argument(flag, default=None)
    ap.add_argument("--lr-schedule", choices=("constant", "cosine"), default=None,
                    help="the baselines' learning-rate schedule (default: validate.py's)")
    ap.add_argument("--em-lr-schedule", choices=("constant", "cosine"), default="constant",
                    help="EM's M-steps' (ambient em --lr-schedule: cosine decays to 0 at each lap's end); runs of "
                         "another schedule than constant are named with it (em-p0.8-draws-cosine)")
    ap.add_argument("--lap0", choices=("sample", "mean"), default="sample",
                    help="lap 0's completions: exact Gaussian posterior draws (ambient em's default since "
                         "2026-12-04; runs named em-p*-draws) or the posterior mean (em-p*-mean; before, em-p*)")
    ap.add_argument("--cg-iters", type=int, default=1)
    ap.add_argument("--sigma-y", type=float, default=None,
                    help="the E-step's σ_y (default: ambient em's); runs of another than 0.001 (the value of the "
                         "runs before 2026-12-05) are named with it (em-p0.8-draws-sy0.1)")
    args = ap.parse_args(argv)
    if args.quick:
        args.mode = "quick"
    for key, value in MODES[args.mode].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    sub = SUBSETS.get(args.mode)
    args.max_size = sub["max_size"] if sub else None
    for key in ("kimg", "num_samples", "num_ref"):
        if sub and getattr(args, key) is None:
            setattr(args, key, sub[key])
    val_dir = args.validate_dir or (str(ROOT / "runs" / "em" / args.mode / "baselines") if sub else None)
    val_argv = ["--mode", "medium" if sub else args.mode] + (["--out-dir", val_dir] if val_dir else [])
    val_argv += ["--max-size", str(args.max_size)] if sub else []
    for key in ("kimg", "num_samples", "num_ref", "lr_schedule"):
        if getattr(args, key) is not None:
            val_argv += [f"--{key.replace('_', '-')}", getattr(args, key)]
    args.val = validate.parse_args(val_argv)  # the baselines' settings, exactly validate's
    args.out_dir = Path(args.out_dir or ROOT / "runs" / "em" / args.mode)
    return args


def baselines(v) -> list:
    """clean, naive and ambient p = 0.8 with validate's settings ``v`` (its loss weighting and learning-rate
    schedule: ambient train's defaults unless told otherwise)."""
    return [validate.model(v, "clean"), validate.model(v, "naive", P), validate.model(v, "ambient", P)]


def em_config(args, init: str | None = None) -> EMConfig:
    v = args.val
    lap_kimg = v.kimg / args.laps
    name = f"em-p{P:g}" + ("-init" if init else "") + ("-mean" if args.lap0 == "mean" else "-draws")
    name += "" if args.em_lr_schedule == "constant" else f"-{args.em_lr_schedule}"
    sigma_y = MASK_SIGMA_Y if args.sigma_y is None else args.sigma_y
    name += "" if sigma_y == 1e-3 else f"-sy{sigma_y:g}"
    return EMConfig(data=validate.DATA, outdir=str(args.out_dir / name), max_size=args.max_size,
                    corruption_probability=P, init=init,
                    laps=args.laps, lap_kimg=lap_kimg, estep_size=args.estep_size, rank=args.rank,
                    gaussian_iters=args.gaussian_iters, gaussian_size=args.gaussian_size, steps=args.steps,
                    cg_iters=args.cg_iters, sigma_y=sigma_y, estep_batch=64, lap0=args.lap0,
                    arch=v.arch, batch=v.batch, lr=v.lr, lr_schedule=args.em_lr_schedule,
                    ema=max(lap_kimg / 8, 0.1), snapshot_kimg=max(lap_kimg / 2, 0.5), seed=v.seed)


def lap_samples(lap_dir: Path, n: int) -> tuple[torch.Tensor, float]:
    path = lap_dir / f"em-samples-n{n}.npz"
    if path.is_file():
        with np.load(path) as f:
            return torch.from_numpy(f["images"]), float(f["seconds"])
    t0 = time.perf_counter()
    u8 = float_to_uint8(sample_model(load_model(lap_dir), list(range(n)), batch=100, num_steps=18))
    seconds = time.perf_counter() - t0
    atomic_save_npz(path, images=u8.numpy(), seconds=np.array(seconds))
    return u8, seconds


def hidden_psnr(done: torch.Tensor, index: torch.Tensor, clean: torch.Tensor, masks: torch.Tensor) -> float:
    """PSNR (peak-to-peak 2 in [-1, 1]) of the completions on the pixels their observations hide."""
    x = done.float() / 127.5 - 1
    ref = clean[index].float() / 127.5 - 1
    hidden = masks[index] == 0
    mse = float(((x - ref)[hidden] ** 2).mean())
    return 10 * np.log10(4.0 / max(mse, 1e-12))


def em_rows(args, cfg: EMConfig, scorer, base: dict, method: str = "em") -> tuple[list[dict], dict]:
    run = Path(cfg.outdir)
    stats = {r["lap"]: r for r in read_jsonl(run / "stats.jsonl")}
    clean = load_images(validate.DATA, max_size=cfg.max_size)
    masks = load_observations(cfg).batch(torch.arange(clean.shape[0]))[1]
    rows, samples, elapsed = [], {}, 0.0
    for lap in sorted(stats):
        s = stats[lap]
        elapsed += s["lap_seconds"]
        u8, sample_s = lap_samples(run / f"lap-{lap:02d}", args.val.num_samples)
        samples[lap] = u8
        with np.load(run / "completions" / f"lap-{lap:02d}.npz") as z:
            done = torch.from_numpy(z["images"]).permute(0, 3, 1, 2)
            index = torch.from_numpy(z["index"])
        comp = scorer.score(done[: max(args.val.num_samples, 2)])
        rows.append({**base, "table": "em", "method": method, "lap": lap, "p": P, "delta": 0.0,
                     "kimg": round((lap + 1) * cfg.lap_kimg, 4), "train_s": elapsed, "sample_s": sample_s,
                     "estep_s": s["estep_seconds"], "mstep_s": s["mstep_seconds"], "estep_forward": s["estep_forward"],
                     "estep_vjp": s["estep_vjp"], "estep_images": s["estep_images"],
                     "completions_kid": comp["kid"], "completions_kid_std": comp["kid_std"],
                     "hidden_psnr": hidden_psnr(done, index, clean, masks), **scorer.score(u8)})
        r = rows[-1]
        log(f"{method} lap {lap}: KID {r['kid']:.4f}  FID {r['fid']:.1f}  completions KID {r['completions_kid']:.4f}  "
            f"hidden PSNR {r['hidden_psnr']:.2f} dB")
    return rows, samples


def page_suffix(mode: str) -> str:
    """docs/em{suffix}.md: the curve mode (issue 24's convergence run, today's defaults) is docs/em.md; the full
    mode (60 000 observations, 3 laps: most completions are never redrawn) is docs/em_full.md."""
    return "" if mode == "curve" else f"_{mode}"


def run_settings(cfg: EMConfig) -> dict:
    """The EM run's settings as it resolved and recorded them (em_config.json), else as configured."""
    path = Path(cfg.outdir) / "em_config.json"
    return json.loads(path.read_text())["em"] if path.is_file() else cfg.to_dict()


def publish(args, cfg: EMConfig, rows: list[dict], samples: dict, argv, started: float) -> None:
    docs = Path(args.docs_dir)
    suffix = page_suffix(args.mode)
    figs = {"curve": f"em_laps{suffix}.png", "grid": f"em_samples{suffix}.png"}
    write_curve(docs / figs["curve"], rows)
    em = [r for r in rows if r["method"].startswith("em")]
    grid = [("clean data", validate.corrupted_examples(0.0, 0.0, 12, args.val.seed)),
            (f"observed p={P:g}", validate.corrupted_examples(P, 0.0, 12, args.val.seed))]
    grid += [(f"{key}", u8[:12]) for key, u8 in samples.items()]
    write_figure(docs / figs["grid"], grid)
    words = [sys.argv[0], *(sys.argv[1:] if argv is None else argv)]
    meta = {"mode": args.mode, "command": "python " + " ".join(shlex.quote(a) for a in words),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "wall_s": time.perf_counter() - started,
            "threads": torch.get_num_threads(), "em": run_settings(cfg), "figures": figs,
            "val": {k: getattr(args.val, k) for k in ("kimg", "arch", "batch", "lr", "lr_schedule", "num_samples",
                                                      "num_ref", "seed")}}
    page = docs / f"em{suffix}.md"
    notes = ""  # hand-written analysis below the NOTES marker survives a rerun
    if page.is_file() and NOTES in page.read_text(encoding="utf-8"):
        notes = NOTES + page.read_text(encoding="utf-8").split(NOTES, 1)[1]
    atomic_write_text(page, write_markdown(rows, meta) + ("\n" + notes if notes else ""))
    path = docs / "results.json"
    old = [r for r in read_rows(path) if not (r.get("table") == "em" and r.get("mode") == args.mode)]
    keep = ("method", "lap", "p", "delta", "fid", "kid", "kid_std", "swd", "kimg", "table", "mode", "arch",
            "num_samples", "num_ref", "train_s", "sample_s", "estep_s", "mstep_s", "completions_kid", "hidden_psnr")
    atomic_write_text(path, json.dumps(old + [{k: r.get(k) for k in keep} for r in em], indent=1) + "\n")


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    v = args.val
    read_rows(Path(args.docs_dir) / "results.json")
    base = dict(mode=args.mode, arch=v.arch, num_ref=v.num_ref)
    scorer = validate.Scorer(v.num_ref, v.seed)
    rows, samples, runs = [], {}, []
    cfg = em_config(args)  # EM first: it needs no baseline, so it can run while validate.py trains them
    log(f"em: {cfg.laps} laps × {cfg.lap_kimg:g} kimg, {cfg.estep_size} completions per lap, MMPS "
        f"{cfg.steps} steps, Gaussian rank {cfg.rank}, lap 0 = {cfg.lap0}; run in {cfg.outdir}")
    run_em(cfg, log=log)
    runs.append(("em", cfg))
    for m in baselines(v):
        rec = validate.train_stage(m, v, v.out_dir)
        u8, sec = validate.sample_stage(m, v.out_dir, v.kimg, v.num_samples, 1, 18)
        samples[m.name] = u8
        rows.append({**base, "table": "baseline", "method": m.name, "p": m.p, "delta": m.delta, "kimg": v.kimg,
                     "train_s": rec["train_s"], "sample_s": sec, **scorer.score(u8)})
        log(f"{m.key}: KID {rows[-1]['kid']:.4f}  FID {rows[-1]['fid']:.1f}")
    if args.with_init:
        cfg = em_config(args, str(v.out_dir / baselines(v)[2].key))
        log(f"em-init: as em, lap 0 from the ambient model's posterior mean; run in {cfg.outdir}")
        run_em(cfg, log=log)
        runs.append(("em-init", cfg))
    ordered = {"ambient": samples["ambient"]}
    for method, cfg in runs:
        lap_rows, lap_samples_ = em_rows(args, cfg, scorer, base, method)
        rows += lap_rows
        ordered[f"{method} lap {max(lap_samples_)}"] = lap_samples_[max(lap_samples_)]
        publish(args, em_config(args), rows, {**ordered, "clean-trained": samples["clean"]}, argv, started)
    log(f"wrote docs ({(time.perf_counter() - started) / 60:.1f} min this run)")


if __name__ == "__main__":
    main()
