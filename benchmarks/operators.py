"""Priors learnt from measurements beyond pixel masks (issue 25): MRI-style k-space, side by side.

Procedural head phantoms (:mod:`ambient.data.phantoms`, float in [0, 1]) seen only through single-coil Cartesian
k-space at acceleration R (random phase-encode lines, a fully sampled centre of 8 % of the lines, a new mask per
observation; :func:`ambient.operators.kspace.cartesian_mask`). Rows, per R, on held-out phantoms measured the
same way:

* ``zero-filled``: Aᵀ y;
* ``TV-CS``: total-variation compressed sensing (:func:`ambient.sampling.classical.tv_reconstruct`), λ picked on
  a validation set by PSNR against its clean phantoms (an oracle choice: the baseline is tuned favourably);
* ``Gaussian (EM lap 0)``: the posterior mean of the Gaussian prior EM fits to the k-space data on its lap 0;
* ``EM prior``: ``ambient em`` on the undersampled k-space of the training phantoms only (never a clean image),
  then ``ambient restore`` (MMPS through the operator);
* ``clean prior``: the same network trained on the clean training phantoms, then the same restore (upper bound);
* ``ambient k-space``: the same network trained by the k-space ambient objective (issue 25 item 4a,
  :mod:`ambient.learners.kspace_ambient`) on the same undersampled training k-space, δ = ``KSPACE_DELTA`` of the
  acquired non-centre line pairs dropped further, the same kimg as EM's M-steps together; restored by its one-step
  posterior mean with the test operator's own lines plus data consistency, the σ it tells the network picked on the
  validation phantoms (as TV-CS's λ)
  (:func:`ambient.sampling.fixed_operator.kspace_ambient_restore`, not MMPS: the network never sees a full image),
  its samples by the fixed-operator sampler (18 Heun steps).

Scores: PSNR and SSIM (data range 1) of the restorations against the clean phantoms; the priors' own samples are
scored by the sliced Wasserstein distance of their pixels to held-out phantoms (lower is better; the last column,
``prior SWD``). Every stage is cached under ``--out-dir`` and resumes.

    python benchmarks/operators.py --mode quick --threads 1   # 32 px, tiny network: minutes
    python benchmarks/operators.py --threads 2                # full: 64 px, small network (hours on 2 CPU cores)

Writes docs/operators.json and docs/operators.md (quick: docs/operators_quick.*).

``--case blur`` / ``--case noise`` (issue 25 item 5; ``--case all``: the three): Fashion-MNIST (28 px) blurred
by a Gaussian PSF of σ = 2 px plus noise σ_y = 0.01, or with additive noise σ_n = 0.2 (σ's as fractions of the
[0, 1] range). Rows: naive (trained on the observations as if clean), noisy-ambient (noise case,
``--objective noisy``), EM (``ambient em`` on the measurements; the Gaussian lap 0's posterior mean too), clean
(upper bound); the same first N training images and the same kimg for each (EM: laps × lap kimg). Scores: KID of
each prior's samples against held-out clean test images, and the PSNR / SSIM of MMPS restorations of held-out
observations with it. Runs in runs/operators/fashion-<mode>/ (or <out-dir>/fashion); writes
docs/operators_<case>[_<mode>].json and the case's table between markers in docs/operators[_<mode>].md.

    python benchmarks/operators.py --mode quick --case blur --threads 1   # ~25 min on one shared core
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ambient.data.datasets import load_dataset, load_images
from ambient.data.images import float_to_uint8
from ambient.data.phantoms import phantoms
from ambient.io import atomic_write_text, read_jsonl
from ambient.learners.em import EMConfig, run_em
from ambient.learners.gaussian_prior import GaussianPrior, operator_posterior
from ambient.learners.kspace_ambient import KSpaceAmbientConfig, load_kspace_ambient, train_kspace_ambient
from ambient.learners.train import train
from ambient.learners.train_config import TrainConfig
from ambient.metrics.features import cached_features
from ambient.metrics.fid import compute_kid
from ambient.metrics.inception import load_inception
from ambient.metrics.quality import psnr, ssim
from ambient.metrics.swd import sliced_wasserstein
from ambient.operators.blur import gaussian_kernel
from ambient.operators.kspace import KSpaceOperator, cartesian_mask
from ambient.operators.measurements import load_measurements, save_measurements
from ambient.operators.simulate import MeasureSpec, simulate
from ambient.rng import mix_seed
from ambient.sampling.classical import choose_lambda, tv_reconstruct
from ambient.sampling.fixed_operator import kspace_ambient_restore, kspace_ambient_sample
from ambient.sampling.generate import sample_model
from ambient.sampling.restore import RestoreConfig, restore
from ambient.store.models import load_model

ROOT = Path(__file__).resolve().parents[1]
MODES = {
    "smoke": dict(size=16, n_train=64, n_test=4, n_val=4, arch="tiny", batch=16, kimg=0.1, laps=2, estep_size=32,
                  steps=4, cg_iters=3, rank=8, gaussian_iters=3, gaussian_size=64, restore_steps=4, num_samples=16,
                  accelerations=(4,), tv_iters=10),  # a pipeline check for tests, not a result
    "quick": dict(size=32, n_train=2000, n_test=32, n_val=16, arch="tiny", batch=32, kimg=6.0, laps=3,
                  estep_size=1000, steps=10, cg_iters=3, rank=32, gaussian_iters=10, gaussian_size=1000,
                  restore_steps=18, num_samples=200, accelerations=(4, 8), tv_iters=150),
    "full": dict(size=64, n_train=4000, n_test=100, n_val=32, arch="small", batch=32, kimg=20.0, laps=4,
                 estep_size=1000, steps=14, cg_iters=3, rank=64, gaussian_iters=20, gaussian_size=2000,
                 restore_steps=18, num_samples=500, accelerations=(4, 8), tv_iters=300),
}
CENTER = 0.08
TRAIN_SEED, TEST_SEED, MASK_TRAIN, MASK_TEST = 0, 1, 0xA11, 0xA12
TV_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mode", choices=tuple(MODES), default="full")
    ap.add_argument("--case", choices=("mri", "blur", "noise", "all"), default="mri",
                    help="mri: phantoms through k-space; blur / noise: Fashion-MNIST (issue 25 item 5); all: the three")
    ap.add_argument("--skip-noisy", action="store_true", help="--case noise: leave out the noisy-ambient row")
    ap.add_argument("--out-dir", default=None, help="runs folder (default runs/operators/<mode>)")
    ap.add_argument("--docs-dir", default=str(ROOT / "docs"))
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--accelerations", type=int, nargs="+", default=None)
    args = ap.parse_args(argv)
    for key, value in MODES[args.mode].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.out_dir_given = args.out_dir is not None  # blur / noise: their runs under <out-dir>/fashion
    args.out_dir = Path(args.out_dir or ROOT / "runs" / "operators" / args.mode)
    return args


def write_phantom_sets(args) -> dict[str, Path]:
    """Clean training phantoms (float npz, value_range [0, 1]) and the held-out test and validation sets."""
    out = args.out_dir / "data"
    out.mkdir(parents=True, exist_ok=True)
    paths = {"train": out / "train.npz", "heldout": out / "heldout.npz"}
    if not paths["train"].is_file():
        np.savez(paths["train"], images=phantoms(args.n_train, args.size, TRAIN_SEED), value_range=[0.0, 1.0])
    if not paths["heldout"].is_file():
        held = phantoms(args.n_test + args.n_val + args.num_samples, args.size, TEST_SEED)
        np.savez(paths["heldout"], images=held, value_range=[0.0, 1.0])
    return paths


def heldout(args) -> dict[str, torch.Tensor]:
    with np.load(args.out_dir / "data" / "heldout.npz") as z:
        x = torch.from_numpy(z["images"]).double()[:, None]
    t, v = args.n_test, args.n_val
    return {"test": x[:t], "val": x[t:t + v], "swd": x[t + v:]}


def kspace_operator(n: int, size: int, r: int, seed: int) -> KSpaceOperator:
    return KSpaceOperator(cartesian_mask(n, size, size, r, CENTER, seed=seed), (1, size, size))


def write_measurements(args, r: int, paths: dict, sets: dict[str, torch.Tensor]) -> dict[str, Path]:
    """Undersampled k-space of the training phantoms (what EM learns from) and of the test / validation ones."""
    out = args.out_dir / "data"
    files = {"train": out / f"kspace-R{r}-train.npz", "test": out / f"kspace-R{r}-test.npz",
             "val": out / f"kspace-R{r}-val.npz"}
    if not files["train"].is_file():
        with np.load(paths["train"]) as z:
            x = torch.from_numpy(z["images"]).double()[:, None]
        op = kspace_operator(len(x), args.size, r, mix_seed(MASK_TRAIN, r))
        save_measurements(files["train"], op(x), op, (0.0, 1.0))
    for name, seed in (("test", MASK_TEST), ("val", MASK_TEST + 1)):
        if not files[name].is_file():
            op = kspace_operator(len(sets[name]), args.size, r, mix_seed(seed, r))
            save_measurements(files[name], op(sets[name]), op, (0.0, 1.0))
    return files


def train_clean(args, paths) -> Path:
    outdir = args.out_dir / "clean"
    if not (outdir / "bench-done.json").is_file():
        ema = max(args.kimg / 16, 0.1)
        train(TrainConfig(data=str(paths["train"]), outdir=str(outdir), objective="naive", corruption_probability=0.0,
                          arch=args.arch, batch=args.batch, lr=1e-3, kimg=args.kimg, ema=ema,
                          snapshot_kimg=max(args.kimg / 2, 0.5), tick_kimg=max(args.kimg / 20, 0.1), grid_samples=16,
                          seed=0), progress=False, log=log)
        (outdir / "bench-done.json").write_text(json.dumps({"kimg": args.kimg}))
    return outdir


def run_em_prior(args, r: int, files) -> Path:
    lap_kimg = args.kimg / args.laps
    cfg = EMConfig(data=str(files["train"]), outdir=str(args.out_dir / f"em-R{r}"), laps=args.laps,
                   lap_kimg=lap_kimg, estep_size=args.estep_size, rank=args.rank,
                   gaussian_iters=args.gaussian_iters, gaussian_size=args.gaussian_size, steps=args.steps,
                   cg_iters=args.cg_iters, arch=args.arch, batch=args.batch, lr=1e-3,
                   ema=max(lap_kimg / 8, 0.1), snapshot_kimg=max(lap_kimg / 2, 0.5), grid_samples=16, seed=0)
    run_em(cfg, log=log)
    return Path(cfg.outdir)


def scores(x01: torch.Tensor, ref01: torch.Tensor) -> dict:
    x01 = x01.double().clamp(0, 1)
    p = psnr(x01, ref01, 1.0)
    return {"psnr": float(p.mean()), "psnr_sd": float(p.std()), "ssim": float(ssim(x01, ref01, 1.0).mean())}


def to01(x_model: torch.Tensor) -> torch.Tensor:
    return (x_model.double() + 1) / 2


def prior_swd(args, model_dir: Path, ref01: torch.Tensor) -> tuple[float, float]:
    cache = model_dir / f"bench-samples-{args.num_samples}.npz"
    if cache.is_file():
        with np.load(cache) as z:
            x, sec = torch.from_numpy(z["images"]), float(z["seconds"])
    else:
        t0 = time.perf_counter()
        x = sample_model(load_model(model_dir), list(range(args.num_samples)), batch=100, num_steps=18)
        sec = time.perf_counter() - t0
        np.savez(cache, images=x.numpy(), seconds=sec)
    return pixel_swd(to01(x), ref01), sec


def pixel_swd(x01: torch.Tensor, ref01: torch.Tensor) -> float:
    u = (x01.clamp(0, 1) * 255).round().to(torch.uint8)
    v = (ref01.clamp(0, 1) * 255).round().to(torch.uint8)
    return float(sliced_wasserstein(u, v, num_projections=256, generator=torch.Generator().manual_seed(0)))


def restore_with(args, model_dir: Path, meas_path: Path, tag: str) -> tuple[torch.Tensor, float, float]:
    cache = model_dir / f"bench-restore-{tag}.npz"
    if cache.is_file():
        with np.load(cache) as z:
            return torch.from_numpy(z["images"]), float(z["seconds"]), float(z["consistency"])
    meas = load_measurements(meas_path)
    cfg = RestoreConfig(method="mmps", steps=args.restore_steps, cg_iters=args.cg_iters, seed=0, batch=50)
    out = restore(load_model(model_dir), meas, cfg)
    cons = float(out.consistency.mean())
    np.savez(cache, images=out.images.numpy(), seconds=out.seconds, consistency=cons)
    return out.images, out.seconds, cons


KSPACE_DELTA = 0.7  # the k-space ambient row's δ (0.2, 0.4, 0.7 tried at R = 4 quick: 0.7 best on validation)
KSPACE_SIGMA_GRID = (0.002, 0.05, 0.2, 0.5, 1.0)  # the noise level its one-step restore tells the network


def kspace_one_step(model, meas_path: Path, sigma: float) -> tuple[torch.Tensor, float, float]:
    """The one-step restore with data consistency of a measurements file: (images, seconds, mean consistency)."""
    meas = load_measurements(meas_path)
    idx = torch.arange(len(meas))
    y, op = meas.batch(idx)
    t0 = time.perf_counter()
    x = kspace_ambient_restore(model.denoiser, y, op, sigma=sigma)
    sec = time.perf_counter() - t0
    return x, sec, float(meas.consistency(x.double(), idx).mean())


def kspace_ambient_row(args, r: int, files, sets, ref) -> dict:
    """Train (cached) a k-space ambient prior on the training k-space, restore the test phantoms (the σ told to the
    network picked on the validation phantoms by PSNR, as TV-CS's λ), score its prior's samples."""
    out = args.out_dir / f"kspace-ambient-R{r}"
    if out.is_dir() and not (out / "ema.safetensors").is_file():  # interrupted: k-space training does not resume
        log(f"{out}: an unfinished k-space ambient run (no ema.safetensors); training it again")
        shutil.rmtree(out)
    if not (out / "ema.safetensors").is_file():
        cfg = KSpaceAmbientConfig(data=str(files["train"]), outdir=str(out), corruption_probability=KSPACE_DELTA,
                                  arch=args.arch, batch=args.batch, lr=1e-3, kimg=args.kimg,
                                  ema=max(args.kimg / 16, 0.1), seed=0)
        train_kspace_ambient(cfg, log=log)
    model = load_kspace_ambient(out)
    val = {s: float(psnr(to01(kspace_one_step(model, files["val"], s)[0]).clamp(0, 1), sets["val"], 1.0).mean())
           for s in KSPACE_SIGMA_GRID}
    sigma = max(val, key=val.get)
    x, sec, cons = kspace_one_step(model, files["test"], sigma)
    cache = out / f"bench-samples-{args.num_samples}.npz"
    if not cache.is_file():
        samples = kspace_ambient_sample(model.denoiser, model.masks, model.delta, model.keep,
                                        list(range(args.num_samples)), model.image_shape, num_steps=18)
        np.savez(cache, images=samples.numpy())
    with np.load(cache) as z:
        samples = torch.from_numpy(z["images"])
    train_s = json.loads((out / "config.json").read_text())["train_seconds"]
    log(f"R={r}: ambient k-space one-step restore, validation PSNR by σ: {val}")
    return {"R": r, "method": f"ambient k-space prior (δ = {KSPACE_DELTA:g}), one-step mean at σ = {sigma:g} + DC",
            **scores(to01(x), ref), "seconds": sec, "consistency": cons,
            "prior_swd": pixel_swd(to01(samples), sets["swd"]), "train_s": train_s, "val_psnr_by_sigma": val}


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.case != "mri":
        if args.case == "all":
            main([*(sys.argv[1:] if argv is None else argv), "--case", "mri"])
        return main_fashion(args, argv)
    started = time.perf_counter()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    paths = write_phantom_sets(args)
    sets = heldout(args)
    ref = sets["test"]
    log(f"mode {args.mode}: {args.n_train} training phantoms {args.size}², {args.n_test} test, R = "
        f"{list(args.accelerations)}")
    clean_dir = train_clean(args, paths)
    clean_swd, clean_sample_s = prior_swd(args, clean_dir, sets["swd"])
    rows = [{"R": None, "method": "clean phantoms (held out)", "prior_swd": pixel_swd(sets["val"], sets["swd"])}]
    for r in args.accelerations:
        files = write_measurements(args, r, paths, sets)
        test = load_measurements(files["test"])
        y, op = test.batch(torch.arange(len(test)))
        zf = op.adjoint(y)
        rows.append({"R": r, "method": "zero-filled", **scores(to01(zf), ref)})
        val = load_measurements(files["val"])
        vy, vop = val.batch(torch.arange(len(val)))
        lam, grid = choose_lambda(vop, vy, 2 * sets["val"] - 1, TV_GRID, iters=args.tv_iters)
        t0 = time.perf_counter()
        tv = tv_reconstruct(op, y, lam=lam, iters=args.tv_iters)
        rows.append({"R": r, "method": f"TV-CS (λ = {lam:g}, oracle-tuned)", "seconds": time.perf_counter() - t0,
                     **scores(to01(tv), ref)})
        log(f"R={r}: zero-filled PSNR {rows[-2]['psnr']:.2f}, TV-CS {rows[-1]['psnr']:.2f} (λ {lam:g}; grid "
            f"{[round(g, 2) for g in grid]})")
        em_dir = run_em_prior(args, r, files)
        with np.load(em_dir / "gaussian.npz") as z:
            prior = GaussianPrior.from_arrays(z)
        gmean, _ = operator_posterior(prior, y, op)
        rows.append({"R": r, "method": "Gaussian (EM lap 0) posterior mean", **scores(to01(gmean), ref)})
        stats = read_jsonl(em_dir / "stats.jsonl")
        em_train_s = sum(s["lap_seconds"] for s in stats)
        for name, model_dir in (("EM prior (k-space only) + MMPS", em_dir), ("clean prior + MMPS", clean_dir)):
            x, sec, cons = restore_with(args, model_dir, files["test"], f"R{r}")
            swd, _ = (prior_swd(args, model_dir, sets["swd"]) if model_dir == em_dir else (clean_swd, None))
            rows.append({"R": r, "method": name, **scores(to01(x), ref), "seconds": sec, "consistency": cons,
                         "prior_swd": swd, "train_s": em_train_s if model_dir == em_dir else None})
            log(f"R={r}: {name}: PSNR {rows[-1]['psnr']:.2f} SSIM {rows[-1]['ssim']:.3f} prior SWD {swd:.2f}")
        rows.append(kspace_ambient_row(args, r, files, sets, ref))
        log(f"R={r}: {rows[-1]['method']}: PSNR {rows[-1]['psnr']:.2f} SSIM {rows[-1]['ssim']:.3f} prior SWD "
            f"{rows[-1]['prior_swd']:.2f}")
        publish(args, rows, argv, started)
    publish(args, rows, argv, started)


def publish(args, rows, argv, started) -> None:
    docs = Path(args.docs_dir)
    suffix = "" if args.mode == "full" else f"_{args.mode}"
    words = [sys.argv[0], *(sys.argv[1:] if argv is None else argv)]
    meta = {"mode": args.mode, "command": "python " + " ".join(shlex.quote(a) for a in words),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "threads": torch.get_num_threads(),
            "wall_s": time.perf_counter() - started, "machine": platform.processor() or platform.machine(),
            "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in MODES[args.mode].items()}}
    atomic_write_text(docs / f"operators{suffix}.json", json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")

    def f(v, fmt):
        return "–" if v is None else format(v, fmt)

    s = meta["settings"]
    lines = [f"# Priors from undersampled k-space ({args.mode} mode)", "",
             f"Command: `{meta['command']}` ({meta['date']}, {meta['threads']} torch threads, "
             f"{meta['wall_s'] / 60:.1f} min this invocation; cached stages not counted).", "",
             f"{s['n_train']} training phantoms of {s['size']}×{s['size']} (values in [0, 1]), single-coil Cartesian "
             f"k-space, {CENTER:.0%} centre lines, a new line mask per observation; {s['n_test']} held-out test "
             f"phantoms. EM: `{s['arch']}`, {s['laps']} laps × {s['kimg'] / s['laps']:g} kimg, {s['estep_size']} "
             f"MMPS draws per lap ({s['steps']} Heun steps, {s['cg_iters']} CG iterations), lap 0 a rank-{s['rank']} "
             f"Gaussian by {s['gaussian_iters']} Monte-Carlo EM iterations on {s['gaussian_size']} observations. "
             f"Clean prior: the same network, {s['kimg']:g} kimg on the clean phantoms. Restorations: MMPS, "
             f"{s['restore_steps']} Heun steps, {s['cg_iters']} CG iterations.", "",
             "| R | method | PSNR (dB) ↑ | SSIM ↑ | data consistency | prior SWD ↓ | restore s |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['R'] or '–'} | {r['method']} | {f(r.get('psnr'), '.2f')} | {f(r.get('ssim'), '.3f')} | "
                     f"{f(r.get('consistency'), '.2e')} | {f(r.get('prior_swd'), '.2f')} | "
                     f"{f(r.get('seconds'), '.1f')} |")
    page = docs / f"operators{suffix}.md"
    notes_marker = "<!-- notes: written by hand, kept when benchmarks/operators.py rewrites the page above -->"
    notes = ""
    if page.is_file() and notes_marker in page.read_text(encoding="utf-8"):
        notes = "\n" + notes_marker + page.read_text(encoding="utf-8").split(notes_marker, 1)[1]
    atomic_write_text(page, "\n".join(lines) + "\n" + notes)


# ------------------------------------------------------------------------------------------------------------------
# Fashion-MNIST seen through a Gaussian blur or additive noise (issue 25 item 5): --case blur | noise
#
# Units: the images are Fashion-MNIST's uint8 0..255, and so are the measurements and σ's handed to the library
# (``ambient measure`` convention). The issue's σ's are fractions of the [0, 1] range: blur σ_y = 0.01 → 2.55,
# noise σ_n = 0.2 → 51 (0.02 and 0.4 in the models' [-1, 1] units).
FASHION, FASHION_TEST = "builtin:fashion-mnist", "builtin:fashion-mnist:test"
BLUR_PSF_PX, BLUR_SIGMA_Y, NOISE_SIGMA = 2.0, 0.01, 0.2  # σ_y and σ_n as fractions of the [0, 1] range
FASHION_CASES = ("blur", "noise")
FASHION_MODES = {
    "smoke": dict(n_train=32, arch="tiny", batch=16, kimg=0.05, laps=2, estep_size=16, steps=2, cg_iters=1, rank=4,
                  gaussian_iters=2, gaussian_size=32, restore_steps=2, n_restore=2, num_samples=8, num_ref=8,
                  sample_steps=2, grid_samples=0, features="pixels"),  # a pipeline check for tests (KID on raw pixels)
    "quick": dict(n_train=3000, arch="tiny", batch=32, kimg=6.0, laps=3, estep_size=1000, steps=10, cg_iters=1,
                  rank=32, gaussian_iters=10, gaussian_size=1000, restore_steps=18, n_restore=32, num_samples=256,
                  num_ref=512, sample_steps=18, grid_samples=16, features="inception"),
    "full": dict(n_train=10000, arch="small", batch=32, kimg=20.0, laps=4, estep_size=2000, steps=14, cg_iters=1,
                 rank=64, gaussian_iters=20, gaussian_size=3000, restore_steps=18, n_restore=100, num_samples=1000,
                 num_ref=2000, sample_steps=18, grid_samples=16, features="inception"),
}
FASHION_MEASURE_SEEDS = {"train": 0, "test": 1}


def fashion_settings(args, case: str):
    """The case's settings (FASHION_MODES[mode]) and its runs folder (shared by both cases: one clean model)."""
    s = argparse.Namespace(**FASHION_MODES[args.mode], case=case, mode=args.mode)
    default = ROOT / "runs" / "operators" / f"fashion-{args.mode}"
    s.root = Path(args.out_dir) / "fashion" if args.out_dir_given else default
    s.root.mkdir(parents=True, exist_ok=True)
    return s


def fashion_spec(case: str, seed: int) -> MeasureSpec:
    if case == "blur":
        return MeasureSpec("blur", sigma_y=BLUR_SIGMA_Y * 255, seed=seed, kernel=gaussian_kernel(BLUR_PSF_PX))
    # additive noise only: every pixel observed (a dust mask of probability 0), σ_y = σ_n
    return MeasureSpec("mask", sigma_y=NOISE_SIGMA * 255, seed=seed, probability=0.0)


def fashion_data(s) -> dict[str, Path]:
    """The case's measurements of the first n_train training images (what EM learns from), the same measurements
    as an image npz (float, 0..255 units, what the naive and noisy models train on), and the held-out test
    observations to restore (test images num_ref .. num_ref + n_restore − 1; the first num_ref are KID's reference)."""
    out = s.root / "data"
    out.mkdir(parents=True, exist_ok=True)
    files = {"train": out / f"{s.case}-train.npz", "images": out / f"{s.case}-train-images.npz",
             "test": out / f"{s.case}-test.npz"}
    if not files["train"].is_file() or not files["images"].is_file():
        spec = fashion_spec(s.case, FASHION_MEASURE_SEEDS["train"])
        y, op = simulate(load_dataset(FASHION, max_size=s.n_train), spec)
        save_measurements(files["train"], y, op, (0.0, 255.0))
        np.savez(files["images"], images=y.permute(0, 2, 3, 1).numpy().astype(np.float32), value_range=[0.0, 255.0])
    if not files["test"].is_file():
        data = load_dataset(FASHION_TEST, max_size=s.num_ref + s.n_restore)
        y, op = simulate(data, fashion_spec(s.case, FASHION_MEASURE_SEEDS["test"]))
        keep = torch.arange(s.num_ref, s.num_ref + s.n_restore)
        save_measurements(files["test"], y[keep], op.select(keep), (0.0, 255.0))
    return files


def fashion_train(s, name: str, data: str, **kw) -> tuple[Path, float]:
    """A clean / naive / noisy model: the same network, images, batch, learning rate and kimg for every method."""
    outdir = s.root / name
    done = outdir / "bench-done.json"
    if not done.is_file():
        t0 = time.perf_counter()
        train(TrainConfig(data=data, outdir=str(outdir), corruption_probability=0.0, arch=s.arch, batch=s.batch,
                          lr=1e-3, kimg=s.kimg, ema=max(s.kimg / 16, 0.1), snapshot_kimg=max(s.kimg / 2, 0.5),
                          tick_kimg=max(s.kimg / 20, 0.1), grid_samples=s.grid_samples, seed=0, **kw), progress=False,
              log=log)
        done.write_text(json.dumps({"kimg": s.kimg, "train_s": time.perf_counter() - t0}))
    return outdir, json.loads(done.read_text())["train_s"]


def fashion_em(s, files) -> tuple[Path, float]:
    lap_kimg = s.kimg / s.laps  # EM's total budget = every other model's
    cfg = EMConfig(data=str(files["train"]), outdir=str(s.root / f"{s.case}-em"), laps=s.laps, lap_kimg=lap_kimg,
                   estep_size=s.estep_size, rank=s.rank, gaussian_iters=s.gaussian_iters,
                   gaussian_size=s.gaussian_size, steps=s.steps, cg_iters=s.cg_iters, arch=s.arch, batch=s.batch,
                   lr=1e-3, ema=max(lap_kimg / 8, 0.1), snapshot_kimg=max(lap_kimg / 2, 0.5),
                   grid_samples=s.grid_samples, seed=0)
    run_em(cfg, log=log)
    stats = read_jsonl(Path(cfg.outdir) / "stats.jsonl")
    return Path(cfg.outdir), sum(r["lap_seconds"] for r in stats)


class FashionKID:
    """KID of uint8 images against the first num_ref clean test images: Inception features (quick, full), or the
    raw pixels in the smoke mode (a pipeline check, not a result)."""

    def __init__(self, s):
        self.ref = load_images(FASHION_TEST, max_size=s.num_ref)
        self.inception = load_inception() if s.features == "inception" else None
        self.ref_feats = self.features(self.ref)

    def features(self, u8: torch.Tensor) -> np.ndarray:
        if self.inception is None:
            return u8.flatten(1).double().numpy() / 255.0
        return cached_features(u8, self.inception, f"inception-{self.inception.sha256}", 64, progress=False)

    def __call__(self, u8: torch.Tensor) -> tuple[float, float]:
        feats = self.features(u8)
        return compute_kid(feats, self.ref_feats, num_subsets=100,
                           max_subset_size=min(len(feats), len(self.ref_feats)), seed=0)


def fashion_samples(s, model_dir: Path) -> tuple[torch.Tensor, float]:
    cache = model_dir / f"bench-samples-{s.num_samples}.npz"
    if not cache.is_file():
        t0 = time.perf_counter()
        u8 = float_to_uint8(sample_model(load_model(model_dir), list(range(s.num_samples)), batch=100,
                                         num_steps=s.sample_steps))
        np.savez(cache, images=u8.numpy(), seconds=time.perf_counter() - t0)
    with np.load(cache) as z:
        return torch.from_numpy(z["images"]), float(z["seconds"])


def fashion_restore(s, model_dir: Path, test_path: Path) -> tuple[torch.Tensor, float]:
    """MMPS restorations (model units) of the held-out observations with the prior in ``model_dir``."""
    cache = model_dir / f"bench-restore-{s.case}-{s.n_restore}.npz"
    if not cache.is_file():
        cfg = RestoreConfig(method="mmps", steps=s.restore_steps, cg_iters=s.cg_iters, seed=0, batch=50)
        out = restore(load_model(model_dir), load_measurements(test_path), cfg)
        np.savez(cache, images=out.images.numpy(), seconds=out.seconds)
    with np.load(cache) as z:
        return torch.from_numpy(z["images"]), float(z["seconds"])


def noisy_objective_available() -> bool:
    from ambient.learners.train_config import OBJECTIVES
    return "noisy" in OBJECTIVES


def run_fashion_case(args, case: str, argv, started: float) -> list[dict]:
    s = fashion_settings(args, case)
    log(f"{case} ({args.mode}): {s.n_train} Fashion-MNIST training images, {s.kimg:g} kimg per model, EM "
        f"{s.laps} laps; KID on {s.num_samples} samples vs {s.num_ref} test images, restore on {s.n_restore}")
    files = fashion_data(s)
    kid = FashionKID(s)
    clean_test = load_images(FASHION_TEST, max_size=s.num_ref + s.n_restore)[s.num_ref:].double() / 255
    extra = load_images(FASHION_TEST, max_size=s.num_ref + s.n_restore + s.num_samples)[s.num_ref + s.n_restore:]
    k, k_sd = kid(extra)
    rows = [{"method": "clean test images (held out; KID floor)", "kid": k, "kid_sd": k_sd}]
    test = load_measurements(files["test"])
    y, op = test.batch(torch.arange(len(test)))
    with np.load(files["images"]) as z:
        seen = torch.from_numpy(z["images"][: s.num_samples]).permute(0, 3, 1, 2).double()
    k, k_sd = kid(seen.clamp(0, 255).round().to(torch.uint8))
    what = "blurred + noisy" if case == "blur" else "noisy"
    with np.load(files["test"]) as z:  # the observations as images, in [0, 1] (not ỹ: its offset is b·A1)
        y01 = torch.from_numpy(z["y"]).double() / 255
    rows.append({"method": f"the {what} observations themselves", "kid": k, "kid_sd": k_sd,
                 **scores(y01, clean_test)})
    models = [("naive", f"naive (train on the {what} images)"), ("em", f"EM ({what} measurements only) + MMPS"),
              ("clean", "clean (upper bound) + MMPS")]
    if case == "noise":
        models.append(("noisy", f"noisy-ambient (--objective noisy, σ_n = {NOISE_SIGMA:g}; samples only)"))
    for key, label in models:
        if key == "noisy" and (args.skip_noisy or not noisy_objective_available()):
            why = "--skip-noisy" if args.skip_noisy else "this checkout has no `ambient train --objective noisy`"
            log(f"{case}: {label}: SKIPPED ({why})")
            rows.append({"method": f"{label} — skipped ({why})"})
            continue
        if key == "em":
            model_dir, train_s = fashion_em(s, files)
            with np.load(model_dir / "gaussian.npz") as z:
                prior = GaussianPrior.from_arrays(z)
            gmean, _ = operator_posterior(prior, y, op)
            rows.append({"method": "Gaussian (EM lap 0) posterior mean", **scores(to01(gmean), clean_test)})
        elif key == "clean":
            model_dir, train_s = fashion_train(s, "clean", FASHION, max_size=s.n_train, objective="naive")
        elif key == "naive":
            model_dir, train_s = fashion_train(s, f"{case}-naive", str(files["images"]), objective="naive")
        else:
            # the measurements file EM reads (noise-only: a mask hiding nothing, σ_y = σ_n)
            model_dir, train_s = fashion_train(s, f"{case}-noisy", str(files["train"]), objective="noisy",
                                               noise_sigma=NOISE_SIGMA * 255)
        u8, sample_s = fashion_samples(s, model_dir)
        k, k_sd = kid(u8)
        row = {"method": label, "kid": k, "kid_sd": k_sd, "train_s": train_s, "sample_s": sample_s}
        if key != "noisy":  # its denoiser is trained for σ > σ_n only, so MMPS (down to σ ≈ 0) is not its sampler
            x, sec = fashion_restore(s, model_dir, files["test"])
            row.update(scores(to01(x), clean_test), restore_s=sec)
        rows.append(row)
        log(f"{case}: {label}: KID×10³ {1e3 * k:.1f} ± {1e3 * k_sd:.1f}"
            + (f", restore PSNR {row['psnr']:.2f} dB" if "psnr" in row else ""))
        publish_fashion(args, s, rows, argv, started)
    return rows


def fashion_marker(case: str) -> tuple[str, str]:
    return (f"<!-- operators-{case}:start (written by benchmarks/operators.py --case {case}) -->",
            f"<!-- operators-{case}:end -->")


def publish_fashion(args, s, rows, argv, started) -> None:
    """docs/operators_<case>[_<mode>].json, and the case's table between its markers in docs/operators[_<mode>].md
    (after the page's notes marker, which the MRI case's rewrite keeps)."""
    docs = Path(args.docs_dir)
    suffix = "" if args.mode == "full" else f"_{args.mode}"
    words = [sys.argv[0], *(sys.argv[1:] if argv is None else argv)]
    meta = {"case": s.case, "mode": args.mode, "command": "python " + " ".join(shlex.quote(a) for a in words),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "threads": torch.get_num_threads(),
            "wall_s": time.perf_counter() - started, "machine": platform.processor() or platform.machine(),
            "units": "uint8 0..255; sigma_y / sigma_n below as fractions of [0, 1]",
            "blur_psf_px": BLUR_PSF_PX, "blur_sigma_y": BLUR_SIGMA_Y, "noise_sigma": NOISE_SIGMA,
            "settings": FASHION_MODES[args.mode]}
    atomic_write_text(docs / f"operators_{s.case}{suffix}.json", json.dumps({"meta": meta, "rows": rows}, indent=1)
                      + "\n")

    def f(v, fmt, scale=1.0):
        return "–" if v is None else format(scale * v, fmt)

    if s.case == "blur":
        title = (f"Fashion-MNIST through a Gaussian blur (PSF σ = {BLUR_PSF_PX:g} px) + noise σ_y = {BLUR_SIGMA_Y:g}"
                 f" ({args.mode} mode)")
    else:
        title = f"Fashion-MNIST with additive Gaussian noise σ_n = {NOISE_SIGMA:g} ({args.mode} mode)"
    kid_name = "KID ×10³ ↓" if s.features == "inception" else "pixel-KID ×10³ ↓ (smoke: raw pixels)"
    lines = [f"## {title}", "",
             f"Command: `{meta['command']}` ({meta['date']}, {meta['threads']} torch threads, "
             f"{meta['wall_s'] / 60:.1f} min this invocation; cached stages not counted).", "",
             f"Noise σ's are fractions of the [0, 1] range (×255 on the uint8 images the library is given; ×2 in the "
             f"models' [-1, 1] units). The first {s.n_train} training images, measured once; every model is "
             f"`{s.arch}`, batch {s.batch}, lr 0.001, {s.kimg:g} kimg (EM: {s.laps} laps × {s.kimg / s.laps:g} kimg, "
             f"lap 0 a rank-{s.rank} Gaussian by {s.gaussian_iters} Monte-Carlo EM iterations on {s.gaussian_size} "
             f"observations, {s.estep_size} MMPS completions per later lap, {s.steps} Heun steps, {s.cg_iters} CG "
             f"iteration(s)). KID: {s.num_samples} samples (Heun, {s.sample_steps} steps) against the first "
             f"{s.num_ref} clean test images. Restore: MMPS ({s.restore_steps} steps) on {s.n_restore} held-out test "
             f"observations, one sample each; PSNR / SSIM against the clean images (data range 1).", "",
             f"| method | {kid_name} | restore PSNR (dB) ↑ | SSIM ↑ | train s | restore s |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        kid_cell = "–" if r.get("kid") is None else f"{1e3 * r['kid']:.1f} ± {1e3 * r['kid_sd']:.1f}"
        lines.append(f"| {r['method']} | {kid_cell} | {f(r.get('psnr'), '.2f')} | {f(r.get('ssim'), '.3f')} | "
                     f"{f(r.get('train_s'), '.0f')} | {f(r.get('restore_s'), '.1f')} |")
    start, end = fashion_marker(s.case)
    section = "\n".join([start, *lines, end])
    page = docs / f"operators{suffix}.md"
    text = page.read_text(encoding="utf-8") if page.is_file() else ""
    notes_marker = "<!-- notes: written by hand, kept when benchmarks/operators.py rewrites the page above -->"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + section + rest.split(end, 1)[1]
    else:
        if notes_marker not in text:
            text = text.rstrip("\n") + ("\n\n" if text else "") + notes_marker + "\n"
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    atomic_write_text(page, text)


def main_fashion(args, argv) -> None:
    started = time.perf_counter()
    for case in (FASHION_CASES if args.case == "all" else (args.case,)):
        run_fashion_case(args, case, argv, started)


if __name__ == "__main__":
    main()
