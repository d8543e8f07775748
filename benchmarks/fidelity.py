"""Fidelity benchmark: the distribution a model learns from corrupted data, against exact answers.

The data are Gaussian images x0 ~ N(μ, Σ) with μ and Σ known, written as uint8 (clipping is rare:
the pixel standard deviation is 0.3 on [-1, 1]) and observed through masks: per-pixel masks given
with the data at p ∈ {0.6, 0.8, 0.9}, with garbage written at the hidden pixels, or box masks drawn by
``ambient train`` (p = δ = 0.5). Every model is trained by :func:`ambient.learners.train.train`, the code
path of ``ambient train``; its EMA weights draw N samples (Heun, 18 steps, the model's own mask law)
whose covariance and mean are scored against Σ and μ:

* ``cov err``: ‖Ŝ − Σ‖_F / ‖Σ‖_F, Ŝ the unbiased sample covariance of the N samples;
* ``mean err``: RMS over pixels of (sample mean − μ), in units of the pixels' RMS standard deviation.

Beside them, two floors computed exactly (:mod:`ambient.nets.oracle`):

* ``sampler floor``: the paper's fixed-mask sampler run with the exact conditional-expectation denoiser
  E[x0 | M ⊙ x_σ, M] (the best any ambient model can reach with that sampler), its output covariance
  computed in closed form per mask (:func:`ambient.nets.oracle.fixed_mask_sampler_moments`) and mixed
  over the sampler's masks;
* ``noise floor``: the error N exact samples make from their own estimation noise
  (:func:`ambient.nets.oracle.sampling_noise_floor`); ``sampler @N`` = √(sampler² + noise²) is what the
  exact ambient model would score with N samples.

Rows: clean (plain EDM on the clean images), naive (plain EDM on the masked images as if clean),
ambient with each loss weighting (``edm``: the paper's; ``pixel``; ``tilted``), and EM
(``ambient em``), each scored at two budgets (a mid-run snapshot and the final one) so the trend shows.

    python benchmarks/fidelity.py --mode quick --threads 1   # 8×8 case, p = 0.8: minutes
    python benchmarks/fidelity.py --mode full --threads 1    # all cases and mask laws: about an hour
    python benchmarks/fidelity.py --mode long --threads 1    # 8×8, p = 0.8, 800 kimg per model: about an hour

Resumable: runs live in ``--out-dir`` (default runs/fidelity); training resumes from its latest
snapshot, finished scores are cached in ``scores.json`` there. Writes docs/fidelity.md (this mode's
section) and docs/fidelity.json (this mode's rows). The models train with ``--lr-schedule`` (default cosine,
``ambient train``'s; with it, mid-run snapshots are taken before the rate has decayed, so the final budget is the
one to compare); a schedule other than constant names its run folders and docs section ("full-cosine").
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ambient.data.corruption import Corruption, sampling_masks
from ambient.io import atomic_save_npz, read_npz
from ambient.learners.core import LR_SCHEDULES
from ambient.learners.em import MASK_SIGMA_Y, OPERATOR_SIGMA_Y, EMConfig, run_em
from ambient.learners.gaussian_prior import GaussianPrior
from ambient.learners.train import train
from ambient.learners.train_config import TrainConfig
from ambient.nets.oracle import (
    GaussianDenoiser,
    fixed_mask_sampler_moments,
    relative_covariance_error,
    sample_covariance,
    sampling_noise_floor,
    smooth_covariance,
)
from ambient.nets.schedules import edm_sigmas
from ambient.operators.kspace import KSpaceOperator, cartesian_mask
from ambient.operators.measurements import save_measurements
from ambient.sampling.generate import sample_model
from ambient.store.models import load_model
from ambient.store.snapshots import list_snapshots

ROOT = Path(__file__).resolve().parents[1]
STD = 0.3  # pixel standard deviation on [-1, 1]: values beyond ±1 (clipped) have probability < 1e-3
NUM_TRAIN = 20000


# ---------------------------------------------------------------------------------------------- the cases
def _stationary(res: int, length: float) -> torch.Tensor:
    return smooth_covariance(res, res, length, jitter=1e-3 * STD**2, scale=STD**2)


def _nonstationary(res: int) -> torch.Tensor:
    """Correlation length growing from 1 px (left) to 4 px (right), standard deviation 0.2 → 0.4 top to bottom
    (a Gibbs kernel, positive definite for any length field)."""
    ys, xs = torch.meshgrid(torch.arange(res), torch.arange(res), indexing="ij")
    y, x = ys.flatten().double(), xs.flatten().double()
    ell = 1.0 + 3.0 * x / (res - 1)
    s = 0.2 + 0.2 * y / (res - 1)
    l2 = ell[:, None] ** 2 + ell[None] ** 2
    d2 = (x[:, None] - x[None]) ** 2 + (y[:, None] - y[None]) ** 2
    corr = torch.sqrt(2 * ell[:, None] * ell[None] / l2) * torch.exp(-d2 / l2)
    return s[:, None] * corr * s[None] + 1e-3 * STD**2 * torch.eye(res * res, dtype=torch.float64)


def _colour(res: int) -> torch.Tensor:
    """3 channels, channel correlation 0.8 (0.6 between R and B), each a stationary field of length 2."""
    chan = torch.tensor([[1.0, 0.8, 0.6], [0.8, 1.0, 0.8], [0.6, 0.8, 1.0]], dtype=torch.float64)
    return torch.kron(chan, _stationary(res, 2.0))


@dataclass(frozen=True)
class Case:
    name: str
    channels: int
    res: int
    what: str

    def moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        d = self.channels * self.res * self.res
        if self.name == "smooth8":
            cov = _stationary(self.res, 2.0)
        elif self.name == "short16":
            cov = _stationary(self.res, 1.5)
        elif self.name == "long16":
            cov = _stationary(self.res, 4.0)
        elif self.name == "nonstat16":
            cov = _nonstationary(self.res)
        elif self.name == "rgb8":
            cov = _colour(self.res)
        else:
            raise ValueError(self.name)
        ys = torch.linspace(-0.2, 0.2, d, dtype=torch.float64) if self.name == "nonstat16" else torch.zeros(d)
        return ys.double(), cov


CASES = {c.name: c for c in (
    Case("smooth8", 1, 8, "8×8 grey, stationary, correlation length 2 px"),
    Case("short16", 1, 16, "16×16 grey, stationary, length 1.5 px"),
    Case("long16", 1, 16, "16×16 grey, stationary, length 4 px"),
    Case("nonstat16", 1, 16, "16×16 grey, length 1 → 4 px, std 0.2 → 0.4, a mean ramp"),
    Case("rgb8", 3, 8, "8×8 RGB, stationary, channels correlated 0.6–0.8"),
)}


@dataclass(frozen=True)
class Law:
    """How the data are observed: per-pixel dust masks given with the data (p), box masks drawn per image, or
    single-coil Cartesian k-space at acceleration R = p (a measurements file, issue 25)."""

    pattern: str  # "given" (dust masks in the npz, one per pixel: all channels of a pixel alike) | "box" | "kspace"
    p: float

    @property
    def key(self) -> str:
        return f"{self.pattern}{self.p:g}"

    @property
    def operator(self) -> bool:
        """Measured through an operator (a measurements file; EM and naive on its zero-filled images only)."""
        return self.pattern == "kspace"


KSPACE_SIGMA_Y = 0.01  # k-space noise σ_y in model units (the pixels' standard deviation is STD = 0.3)
KSPACE_CENTER = 0.25  # fully sampled centre: 2 of 8 columns


def kspace_operator(case: Case, law: Law, n: int, seed: int) -> KSpaceOperator:
    masks = cartesian_mask(n, case.res, case.res, law.p, center_fraction=KSPACE_CENTER, seed=seed)
    return KSpaceOperator(masks, (case.channels, case.res, case.res), sigma_y=KSPACE_SIGMA_Y)


def write_kspace_data(case: Case, law: Law, path: Path, naive_path: Path, n: int, seed: int) -> None:
    """Measurements y = A x0 + σ_y n of x0 ~ N(μ, Σ) in model units (value range [-1, 1], no quantisation), a new
    line mask per observation; and the naive baseline's images: the zero-filled Aᵀ y, clipped to [-1, 1]."""
    if path.is_file() and naive_path.is_file():
        return
    mean, cov = case.moments()
    rng = np.random.default_rng(seed)
    chol = np.linalg.cholesky(cov.numpy())
    x = mean.numpy() + rng.standard_normal((n, cov.shape[0])) @ chol.T
    x = torch.from_numpy(x).float().reshape(n, case.channels, case.res, case.res)
    op = kspace_operator(case, law, n, seed)
    y = op.add_noise(op(x), torch.Generator().manual_seed(seed))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_measurements(path, y, op, (-1.0, 1.0))
    zf = op.adjoint(y).clamp(-1, 1).numpy().astype(np.float32)
    zf = zf[:, 0] if case.channels == 1 else zf.transpose(0, 2, 3, 1)
    atomic_save_npz(naive_path, images=zf, value_range=np.asarray([-1.0, 1.0]))


def write_data(case: Case, law: Law | None, path: Path, n: int, seed: int) -> None:
    """uint8 images of N(μ, Σ) (and dust masks at ``law.p``, garbage at hidden pixels); a pure function of
    (case, law, n, seed)."""
    if path.is_file():
        return
    mean, cov = case.moments()
    rng = np.random.default_rng(seed)
    chol = np.linalg.cholesky(cov.numpy())
    x = mean.numpy() + rng.standard_normal((n, cov.shape[0])) @ chol.T
    img = np.clip(np.rint((x + 1) * 127.5), 0, 255).astype(np.uint8).reshape(n, case.channels, case.res, case.res)
    img = img.transpose(0, 2, 3, 1)  # (N, H, W, C)
    arrays = {"images": img}
    if law is not None and law.pattern == "given":
        masks = (rng.random((n, case.res, case.res)) >= law.p).astype(np.uint8)  # one draw per pixel
        garbage = rng.integers(0, 256, img.shape, dtype=np.uint8)
        arrays = {"images": np.where(masks[..., None] == 1, img, garbage), "masks": masks}
    if case.channels == 1:
        arrays["images"] = arrays["images"][..., 0]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)


# ---------------------------------------------------------------------------------------------- the runs
@dataclass(frozen=True)
class Method:
    name: str  # clean | naive | ambient-<weighting> | em

    @property
    def weighting(self) -> str | None:
        return self.name.split("-", 1)[1] if self.name.startswith("ambient-") else None


def run_key(case: Case, law: Law | None, method: Method) -> str:
    return f"{case.name}-{'clean' if law is None else law.key}-{method.name}"


def train_config(case: Case, law: Law | None, method: Method, data: Path, outdir: Path, args) -> TrainConfig:
    box = law is not None and law.pattern == "box"
    p = law.p if box else 0.0
    return TrainConfig(
        data=str(data), outdir=str(outdir), arch=args.arch, batch=args.batch, kimg=args.kimg,
        snapshot_kimg=args.kimg_mid, corruption_pattern="box" if box else "dust", corruption_probability=p,
        delta_probability=p if box else args.delta,
        objective="naive" if method.name in ("clean", "naive") else "ambient",
        loss_weighting=method.weighting, grid_samples=0, seed=args.seed, lr=args.lr, lr_schedule=args.lr_schedule,
        ema=args.kimg / 16,
        device="cpu")


def run_train(cfg: TrainConfig) -> float:
    """Train (or resume; a finished run only says so) and return the seconds spent now."""
    started = time.perf_counter()
    train(cfg, progress=False, log=lambda _m: None)
    return time.perf_counter() - started


def em_config(case: Case, law: Law, data: Path, outdir: Path, args) -> EMConfig:
    return EMConfig(data=str(data), outdir=str(outdir), laps=args.em_laps, lap_kimg=args.kimg / args.em_laps,
                    estep_size=args.em_estep, arch=args.arch, batch=args.batch, lr=args.lr, seed=args.seed,
                    ema=args.kimg / args.em_laps / 16,
                    snapshot_kimg=args.kimg, grid_samples=0, device="cpu",
                    rank=min(64, case.channels * case.res * case.res), lap0=args.em_lap0,
                    gaussian_size=args.em_gaussian_size or None, lr_schedule=args.em_lr_schedule,
                    sigma_y=em_sigma_y(law, args))


def em_sigma_y(law: Law, args) -> float:
    """EM's E-step σ_y: --em-sigma-y, else ambient em's default for this data (masks, or a measurements file)."""
    if args.em_sigma_y is not None:
        return args.em_sigma_y
    return OPERATOR_SIGMA_Y if law.operator else MASK_SIGMA_Y


# ---------------------------------------------------------------------------------------------- scoring
def moments_score(samples: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor) -> dict:
    x = samples.reshape(samples.shape[0], -1).double()
    rms_std = float(torch.diagonal(cov).mean().sqrt())
    return {"cov_err": relative_covariance_error(sample_covariance(x), cov),
            "mean_err": float((x.mean(0) - mean).pow(2).mean().sqrt()) / rms_std}


def floors(case: Case, law: Law, args) -> dict:
    """The exact fixed-mask sampler floor and the N-sample noise floor for this case and mask law."""
    mean, cov = case.moments()
    shape = (args.floor_masks, case.channels, case.res, case.res)
    seeds = list(range(args.floor_masks))
    if law.operator:  # EM's and naive's samplers see every pixel: the floor is 18 Heun steps' own error
        masks = torch.ones((1, case.channels, case.res, case.res))
    elif law.pattern == "given":  # the sampler of a run with data masks: dust at survival (1 − p)(1 − δ), per pixel
        masks = sampling_masks(Corruption("dust", 0.0, args.delta, True), shape, seeds, data_survival=1 - law.p)
    else:
        masks = sampling_masks(Corruption("box", law.p, law.p, True), shape, seeds)
    mix_mean, mix_cov = fixed_mask_sampler_moments(mean, cov, masks, edm_sigmas(args.steps))
    sampler = relative_covariance_error(mix_cov, cov)
    noise = sampling_noise_floor(cov, args.num_samples)
    rms_std = float(torch.diagonal(cov).mean().sqrt())
    return {"sampler": sampler, "noise": noise, "sampler_at_n": math.hypot(sampler, noise),
            "sampler_mean_err": float((mix_mean - mean).pow(2).mean().sqrt()) / rms_std,
            "survival": float(masks.mean())}


def model_snapshots(run: Path, em: bool) -> list[tuple[float, Path]]:
    """(kimg, folder) of the snapshots to score: the mid-run budget and the final one (EM: each lap's model)."""
    if em:
        out = []
        for lap_dir in sorted(run.glob("lap-*")):
            snaps = list_snapshots(lap_dir) if lap_dir.is_dir() else []
            if snaps:  # images seen by the end of lap k: (k + 1) M-steps
                lap = int(lap_dir.name.split("-")[1])
                out.append(((lap + 1) * json.loads((run / "em_config.json").read_text())["em"]["lap_kimg"], snaps[-1]))
        return out
    batch = json.loads((run / "config.json").read_text())["train"]["batch"]
    return [(int(s.name.split("-")[1]) * batch / 1000, s) for s in list_snapshots(run)]


DIAG_SIGMAS = (0.002, 0.05, 0.3, 2.0)


def score_snapshot(snap: Path, case: Case, args) -> dict:
    """Moments of N samples, and for mask-input models where their errors come from: the samples' variance on the
    pixels their sampler mask shows and hides (relative to Σ's diagonal), and the network against the exact
    E[x0 | M ⊙ x_σ, M] on exact draws x0 at a few σ: relative MSE on hidden and seen pixels, and the slope of its
    hidden-pixel predictions on the exact ones (1 = unbiased, < 1 = shrunk towards the mean)."""
    mean, cov = case.moments()
    loaded = load_model(snap)
    started = time.perf_counter()
    n = args.num_samples
    x = sample_model(loaded, list(range(n)), batch=500, num_steps=args.steps)
    out = {**moments_score(x, mean, cov), "sample_s": time.perf_counter() - started}
    if not loaded.sampling.uses_masks:
        return out
    shape = (n, *loaded.image_shape)
    masks = sampling_masks(loaded.sampling.corruption, shape, list(range(n)),
                           data_survival=loaded.sampling.data_survival)
    m, flat = masks.reshape(n, -1).double(), x.reshape(n, -1).double() - mean
    var = torch.diagonal(cov)
    out["var_ratio_seen"] = float((flat**2 / var * m).sum() / m.sum())
    out["var_ratio_hidden"] = float((flat**2 / var * (1 - m)).sum() / (1 - m).sum())
    exact = GaussianDenoiser(mean, cov, loaded.image_shape)
    g = torch.Generator().manual_seed(12345)
    x0 = (mean + torch.randn(n, mean.numel(), generator=g, dtype=torch.float64) @ torch.linalg.cholesky(cov).T)
    x0, mask = x0.reshape(shape), masks.double()
    hid = (1 - mask).bool()
    for sigma in DIAG_SIGMAS:
        noisy = mask * (x0 + sigma * torch.randn(shape, generator=g, dtype=torch.float64))
        with torch.no_grad():
            net = loaded.denoiser(noisy.float(), sigma, mask.float()).double()
        best = exact(noisy, sigma, mask)
        err = (net - best) ** 2 / var.reshape(shape[1:])
        out[f"hidden_mse_s{sigma:g}"] = float(err[hid].mean())
        out[f"seen_mse_s{sigma:g}"] = float(err[~hid].mean())
        centred_net, centred_best = (net - mean.reshape(shape[1:]))[hid], (best - mean.reshape(shape[1:]))[hid]
        out[f"hidden_slope_s{sigma:g}"] = float((centred_net * centred_best).sum() / (centred_best**2).sum())
    return out


# ---------------------------------------------------------------------------------------------- main
MODES = {
    "quick": dict(cases=["smooth8"], laws=["given0.8"], kimg=40.0, kimg_mid=10.0, num_samples=2000,
                  methods=["clean", "naive", "ambient-edm", "ambient-pixel", "ambient-tilted", "em"], em_laps=2),
    "full": dict(cases=["smooth8", "rgb8"], laws=["given0.6", "given0.8", "given0.9", "box0.5"],
                 kimg=100.0, kimg_mid=25.0, num_samples=2000,
                 methods=["clean", "naive", "ambient-edm", "ambient-pixel", "ambient-tilted", "em"], em_laps=2),
    # the 8×8 case at p = 0.8 trained 8× longer (EMA half-life kimg/16 = 50 kimg): where the models go with budget
    "long": dict(cases=["smooth8"], laws=["given0.8"], kimg=800.0, kimg_mid=200.0, num_samples=2000,
                 methods=["clean", "ambient-edm", "ambient-pixel", "ambient-tilted", "em"], em_laps=4),
}


def parse_law(text: str) -> Law:
    for pattern in ("given", "box", "kspace"):
        if text.startswith(pattern):
            return Law(pattern, float(text[len(pattern):]))
    raise SystemExit(f"error: --laws {text}: expected given<p>, box<p> or kspace<R>")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", choices=tuple(MODES), default="quick")
    ap.add_argument("--cases", nargs="+", choices=tuple(CASES), help="default: the mode's")
    ap.add_argument("--laws", nargs="+", help="given<p>, box<p> and/or kspace<R> (default: the mode's)")
    ap.add_argument("--methods", nargs="+", help="default: the mode's")
    ap.add_argument("--full-laws-for", default="smooth8",
                    help="the case that gets every mask law; the others get given0.8 only (full mode)")
    ap.add_argument("--kimg", type=float)
    ap.add_argument("--kimg-mid", type=float)
    ap.add_argument("--num-samples", type=int)
    ap.add_argument("--num-train", type=int, default=NUM_TRAIN,
                    help=f"training images (observations) per case (default {NUM_TRAIN}; another size names the data "
                         "files and run folders, -n<size>)")
    ap.add_argument("--em-laps", type=int)
    ap.add_argument("--em-lap0", default="sample", choices=("sample", "mean"))
    ap.add_argument("--em-estep", type=int, default=2000, help="observations EM redraws per lap (MMPS)")
    ap.add_argument("--em-gaussian-size", type=int, default=10000,
                    help="observations lap 0's Gaussian is fitted on (ambient em's default 10000; 0: all)")
    ap.add_argument("--arch", default="tiny")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--lr-schedule", default="cosine", choices=LR_SCHEDULES,
                    help="the trained models' (not EM's M-steps', which stay constant as in ambient em); cosine: "
                         "ambient train's default since 2026-12-05. Runs and docs sections of another schedule "
                         "than constant are named with it (runs/fidelity/<mode>/<model>-cosine, '<mode>-cosine')")
    ap.add_argument("--em-lr-schedule", default="constant", choices=LR_SCHEDULES,
                    help="EM's M-steps' (ambient em --lr-schedule; cosine decays to 0 at each lap's end); runs "
                         "of another schedule than constant are named with it (<model>-em-cosine)")
    ap.add_argument("--em-sigma-y", type=float, default=None,
                    help="EM's E-step σ_y (ambient em --sigma-y; default: its default for the data); runs of "
                         "another σ_y than 0.001 (every run before 2026-12-05) are named with it (<model>-em-sy0.1)")
    ap.add_argument("--delta", type=float, default=0.1)
    ap.add_argument("--steps", type=int, default=18)
    ap.add_argument("--floor-masks", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out-dir", default=str(ROOT / "runs" / "fidelity"))
    ap.add_argument("--no-docs", action="store_true", help="don't write docs/fidelity.md and docs/fidelity.json")
    args = ap.parse_args(argv)
    for key, value in MODES[args.mode].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.laws = [parse_law(t) for t in args.laws]
    if args.num_train < 2:
        raise SystemExit(f"error: --num-train {args.num_train}: expected at least 2 images")
    return args


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def plan(args) -> list[tuple[Case, Law]]:
    out = []
    for name in args.cases:
        case = CASES[name]
        laws = args.laws if (name == args.full_laws_for or args.mode == "quick") else \
            [law for law in args.laws if law.key == "given0.8"]
        out += [(case, law) for law in laws]
    return out


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    root = Path(args.out_dir) / args.mode
    root.mkdir(parents=True, exist_ok=True)
    cache_path = root / "scores.json"
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}

    def save_cache():
        tmp = cache_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(cache, indent=1))
        tmp.replace(cache_path)

    started = time.perf_counter()
    rows = []
    for case, law in plan(args):
        fkey = f"floor/{case.name}/{law.key}/{args.floor_masks}/{args.num_samples}/{args.delta:g}"
        if fkey not in cache:
            t0 = time.perf_counter()
            cache[fkey] = {**floors(case, law, args), "floor_s": time.perf_counter() - t0}
            save_cache()
        fl = cache[fkey]
        log(f"{case.name} {law.key}: sampler floor {fl['sampler']:.3f}, noise floor {fl['noise']:.3f} "
            f"(N = {args.num_samples}), survival {fl['survival']:.3f}")
        for name in args.methods:
            method = Method(name)
            clean = name == "clean"
            data_law = None if clean or law.pattern == "box" else law
            ntag = size_tag(args)
            data = root / "data" / f"{case.name}-{'clean' if data_law is None else law.key}{ntag}.npz"
            if data_law is not None and data_law.operator:
                if name not in ("naive", "em"):
                    continue  # an ambient model needs masks; the operator rows are clean, naive, EM
                meas = root / "data" / f"{case.name}-{law.key}-measurements{ntag}.npz"
                write_kspace_data(case, law, meas, data, args.num_train, seed=args.seed + 1)
                data = meas if name == "em" else data
            else:
                write_data(case, data_law, data, args.num_train, seed=args.seed + 1)
            if clean and any(r["case"] == case.name and r["method"] == "clean" for r in rows):
                continue  # one clean model per case
            # a trained model's folder names its learning-rate schedule unless constant (the folders of before
            # the option); EM's M-steps take --em-lr-schedule, not --lr-schedule
            schedule = args.em_lr_schedule if name == "em" else args.lr_schedule
            suffix = "" if schedule == "constant" else f"-{schedule}"
            if clean:
                run = root / f"{case.name}-clean{suffix}{ntag}"
            else:
                run = root / (run_key(case, law, method) + suffix + ntag)
            sigma_y = em_sigma_y(law, args) if name == "em" else None
            if sigma_y is not None and sigma_y != 1e-3:  # the em folders of before name none (all 1e-3)
                run = run.with_name(f"{run.name}-sy{sigma_y:g}")
            t0 = time.perf_counter()
            if name == "em":
                if law.pattern == "box":
                    continue  # ambient em takes masks from the data or draws dust/box; box is run through train only
                run_em(em_config(case, law, data, run, args), log=lambda _m: None)
                train_s = time.perf_counter() - t0
                gauss = run / "gaussian.npz"
                if gauss.is_file():  # lap 0's Gaussian, scored exactly (no sampling noise): the data's information
                    fitted = GaussianPrior.from_arrays(read_npz(gauss))
                    mean, cov = case.moments()
                    g_err = relative_covariance_error(fitted.covariance(), cov)
                    g_mean = float((fitted.mean - mean).pow(2).mean().sqrt() / torch.diagonal(cov).mean().sqrt())
                    rows.append({"case": case.name, "law": law.key, "method": "em-gaussian", "kimg": 0.0,
                                 "cov_err": g_err, "mean_err": g_mean, "floor_sampler": 0.0, "floor_noise": 0.0,
                                 "floor_sampler_at_n": fl["sampler_at_n"], "ratio_to_floor": g_err / fl["sampler_at_n"],
                                 "train_s_now": train_s, "mode": args.mode, "lr_schedule": schedule,
                                 "exact": True})
                    log(f"  em-gaussian      (lap 0, exact)  cov err {g_err:.3f}  mean err {g_mean:.3f}")
            else:
                cfg = train_config(case, None if clean else law, method, data, run, args)
                train_s = run_train(cfg)
            for kimg, snap in model_snapshots(run, name == "em"):
                key = f"score/{snap.relative_to(root)}/{args.num_samples}/{args.steps}"
                if key not in cache or (name.startswith("ambient") and "var_ratio_hidden" not in cache[key]):
                    cache[key] = score_snapshot(snap, case, args)
                    save_cache()
                sc = cache[key]
                row = {"case": case.name, "law": "clean" if clean else law.key, "method": name, "kimg": kimg,
                       "cov_err": sc["cov_err"], "mean_err": sc["mean_err"], "floor_sampler": fl["sampler"],
                       "floor_noise": fl["noise"], "floor_sampler_at_n": fl["sampler_at_n"],
                       "ratio_to_floor": sc["cov_err"] / fl["sampler_at_n"], "train_s_now": train_s,
                       "mode": args.mode, "lr_schedule": schedule,
                       **({"sigma_y": sigma_y} if sigma_y is not None else {}),
                       **{k: v for k, v in sc.items() if k not in ("cov_err", "mean_err")}}
                rows.append(row)
                log(f"  {name:15s} {kimg:7.1f} kimg  cov err {sc['cov_err']:.3f} "
                    f"({row['ratio_to_floor']:.2f}× the sampler floor at N)  mean err {sc['mean_err']:.3f}")
    elapsed = time.perf_counter() - started
    print(markdown_table(rows))
    if not args.no_docs:
        write_docs(args, rows, elapsed, argv)


def markdown_table(rows: list[dict]) -> str:
    head = ("| case | masks | method | kimg | cov err | mean err | sampler floor (exact) | noise floor | "
            "sampler floor at N | cov err / floor at N |")
    lines = [head, "|" + " --- |" * 10]
    for r in rows:
        lines.append(f"| {r['case']} | {r['law']} | {r['method']} | {r['kimg']:g} | {r['cov_err']:.3f} | "
                     f"{r['mean_err']:.3f} | {r['floor_sampler']:.3f} | {r['floor_noise']:.3f} | "
                     f"{r['floor_sampler_at_n']:.3f} | {r['ratio_to_floor']:.2f} |")
    diag = [r for r in rows if "var_ratio_hidden" in r]
    if diag:
        lines += ["", "Where the ambient models' errors come from (samples' variance ÷ Σ's diagonal on the pixels "
                  "their sampler mask shows / hides; the network against the exact E[x0 | M ⊙ x_σ, M] on exact "
                  "draws: relative MSE on hidden and seen pixels at σ, slope of its hidden predictions on the exact "
                  "ones):", "",
                  "| case | masks | method | kimg | var seen | var hidden | hidden slope σ=0.002 | hidden MSE σ=0.002 "
                  "| hidden MSE σ=0.3 | seen MSE σ=0.3 | seen MSE σ=2 |", "|" + " --- |" * 11]
        for r in diag:
            lines.append(f"| {r['case']} | {r['law']} | {r['method']} | {r['kimg']:g} | {r['var_ratio_seen']:.2f} | "
                         f"{r['var_ratio_hidden']:.2f} | {r['hidden_slope_s0.002']:.2f} | "
                         f"{r['hidden_mse_s0.002']:.3f} | "
                         f"{r['hidden_mse_s0.3']:.3f} | {r['seen_mse_s0.3']:.4f} | {r['seen_mse_s2']:.4f} |")
    return "\n".join(lines)


def section_key(args) -> str:
    """The docs section (and docs/fidelity.json rows) of a run: its mode, and its learning-rate schedule unless
    constant (sections from before the option were all constant), and its data size unless NUM_TRAIN."""
    key = args.mode if args.lr_schedule == "constant" else f"{args.mode}-{args.lr_schedule}"
    return key + size_tag(args)


def size_tag(args) -> str:
    """What names a data size other than NUM_TRAIN: its data files, run folders and docs section end in -n<size>."""
    return "" if args.num_train == NUM_TRAIN else f"-n{args.num_train}"


def write_docs(args, rows: list[dict], elapsed: float, argv) -> None:
    json_path = ROOT / "docs" / "fidelity.json"
    old = json.loads(json_path.read_text()) if json_path.is_file() else {"rows": []}
    section = section_key(args)
    kept = [r for r in old["rows"] if r.get("section", r.get("mode")) != section]
    rows = [{**r, "section": section} for r in rows]
    json_path.write_text(json.dumps({"rows": kept + rows}, indent=1) + "\n")
    md_path = ROOT / "docs" / "fidelity.md"
    text = md_path.read_text() if md_path.is_file() else "# Fidelity: the learnt distribution against exact answers\n"
    start, end = f"<!-- {section}:start -->", f"<!-- {section}:end -->"
    command = "python benchmarks/fidelity.py " + " ".join(argv if argv is not None else sys.argv[1:])
    section = "\n".join([
        start, f"## {args.mode} mode"
        + ("" if args.lr_schedule == "constant" else f", {args.lr_schedule} learning rate")
        + ("" if args.num_train == NUM_TRAIN else f", {args.num_train} training images"), "",
        f"`{command.strip()}` — {time.strftime('%Y-%m-%d')}, {elapsed / 60:.0f} min on {platform.machine()} "
        f"({args.threads} thread(s)), `{args.arch}` backbone, batch {args.batch}, lr {args.lr:g} "
        f"({args.lr_schedule}), δ = {args.delta:g} for given masks, "
        f"{args.num_samples} samples per model, {args.steps} Heun steps; {args.num_train} training images per "
        "case.", "",
        markdown_table(rows), end])
    if start in text and end in text:
        text = text[:text.index(start)] + section + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    md_path.write_text(text)


if __name__ == "__main__":
    main()
