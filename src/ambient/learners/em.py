"""The EM learner (``ambient em``): a full-image diffusion model learnt from masked observations.

Lap 0 fits a Gaussian prior to the observations by closed-form missing-data EM
(:mod:`ambient.learners.gaussian_prior`) and completes them with exact draws of its posterior (``lap0="sample"``,
the default since issue 24, as DiEM does) or with its posterior mean (``lap0="mean"``); lap ℓ ≥ 1
completes them with posterior samples (MMPS, :mod:`ambient.sampling.posterior`) of the model of lap ℓ − 1
(E-step). Every lap then trains an ordinary full-image EDM model on its completions (M-step:
``objective="naive"``, no masks), warm-started from the previous lap's EMA weights with a fresh
optimizer. The run folder::

    RUN/em_config.json         the EMConfig and the data's fingerprint (a resume with other data is refused)
    RUN/gaussian.npz           the lap-0 prior (mean, loading, noise) and its log-likelihood per iteration
    RUN/completions/lap-XX.npz the lap's completed images (uint8, ``images``) and the observations' ``index``
    RUN/lap-XX/                the lap's model: an ordinary training outdir
    RUN/stats.jsonl            one line per finished lap (E-step time and network calls, M-step loss, wall time)
    RUN/model_pointer.json     {"model": "lap-XX"}, the last finished lap: ``ambient sample --model RUN`` uses it

Resuming: the same call continues where it stopped: a finished lap is skipped, an E-step keeps
its finished batches (``completions/lap-XX.parts/``), an M-step resumes from its latest snapshot.
Draws are per observation (seeded by (seed, lap, index)), so batches do not change them.
"""

from __future__ import annotations

import hashlib
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ambient.configbase import ConfigBase, is_int
from ambient.data.corruption import PATTERNS, Corruption
from ambient.data.datasets import ImageDataset, check_masks, load_dataset
from ambient.data.images import float_to_uint8, to_hwc
from ambient.distributed import resolve_device
from ambient.errors import AmbientInputError
from ambient.folders import EM_RUN, claim_outdir, stamped
from ambient.io import append_jsonl, atomic_save_npz, atomic_write_json, read_json, read_jsonl, read_npz
from ambient.learners.core import LR_SCHEDULES, check_resume_compatible
from ambient.learners.gaussian_prior import (
    NOISES,
    GaussianPrior,
    fit_gaussian,
    fit_gaussian_operator,
    operator_posterior,
)
from ambient.learners.train_config import TrainConfig
from ambient.nets.registry import ARCHS
from ambient.operators.measurements import Measurements, is_measurements_file, load_measurements
from ambient.rng import EM_DRAW_STREAM, EM_GFIT_STREAM, EM_MSTEP_STREAM, EM_SUBSET_STREAM, mix_seed
from ambient.sampling.posterior import ambient_mean, mmps_operator_samples, mmps_samples
from ambient.sampling.solvers import SOLVERS
from ambient.store.models import MODEL_POINTER, load_model, reimport_hint
from ambient.store.upgrades import em_section

LAP0 = ("mean", "sample")
# float and operator runs: completions clipped to [-CLIP, CLIP] in model units (the value range ± half its width);
# uint8 runs store [-1, 1]. In every run a completed value beyond ±CLIP counts as diverged (stats, a notice)
CLIP = 2.0
REDRAWS = ("rotate", "random")
MSTEP_LR_SCHEDULE = "constant"  # a new run's M-step schedule (EMConfig.lr_schedule None)
# A new run's MMPS σ_y (EMConfig.sigma_y None). Masked data: 0.1, since 2026-12-05 (1e-3 before: with a learned
# network's Jacobian the E-step's one CG step then blew up to 1-2 % of the hidden values; docs/fidelity.md, issue 24).
# Measurements files: their own σ_y, at least OPERATOR_SIGMA_Y (as before)
MASK_SIGMA_Y = 0.1
OPERATOR_SIGMA_Y = 1e-3
# Fields that may change when a run is resumed; every other field must match the saved run.
# gaussian_iters/gaussian_tol act once, when lap 0 fits the Gaussian (then saved as gaussian.npz)
# and lap0 once, when lap 0 completes the observations (runs made with the default of before keep theirs)
RESUMABLE_CHANGES = frozenset({"laps", "device", "outdir", "gaussian_iters", "gaussian_tol", "lap0"})


@dataclass
class EMConfig(ConfigBase, what="em"):
    """An EM run; field names match the ``ambient em`` flags (``lap_kimg`` ↔ ``--lap-kimg``)."""

    data: str = "builtin:fashion-mnist"
    outdir: str = "runs/em"
    data_dir: str | None = None
    max_size: int | None = None
    corruption_pattern: str = "dust"  # masks drawn per image when the data has none (as ambient train)
    corruption_probability: float = 0.0
    mask_full_rgb: bool = False
    laps: int = 4
    lap_kimg: float = 10.0
    estep_size: int | None = None  # observations completed per lap (None: all)
    pool: bool = True  # M-steps train on completions of every observation, estep_size of them redrawn per lap
    # which observations lap ℓ ≥ 1 redraws: "rotate" (blocks of one seeded permutation: each completion at most
    # ceil(N / estep_size) laps old) or "random" (a fresh seeded subset per lap, as before issue 24);
    # None: "rotate" for a new run, the run's own for a resumed one
    redraw: str | None = None
    rank: int = 64
    gaussian_noise: str = "diagonal"
    gaussian_iters: int = 100  # at most; the fit stops earlier at gaussian_tol
    # stop when one EM map gains less (nats per observed value; None: all iters); SQUAREM-accelerated fit
    gaussian_tol: float | None = 1e-4
    gaussian_tol_per: str = "value"  # gaussian_tol's unit, recorded: runs from before 2026-12-04 had nats per image
    gaussian_size: int | None = 10000  # observations the Gaussian is fitted on (None: all)
    steps: int = 18
    cg_iters: int = 1
    # MMPS's σ_y (model units, images in [-1, 1]); None: a new run's default (MASK_SIGMA_Y for masked data; for
    # measurements files their own σ_y, floored at OPERATOR_SIGMA_Y), a resumed run's own
    sigma_y: float | None = None
    solver: str = "heun"
    estep_batch: int = 64
    arch: str = "small"
    batch: int = 64
    lr: float = 1e-3
    lr_warmup_kimg: float = 1.0
    # each M-step's learning rate after its warm-up: "constant", or "cosine" (decay to 0 at the lap's end, restarting
    # each lap); None: the default for a new run, the run's own for a resumed one (runs from before: constant)
    lr_schedule: str | None = None
    ema: float = 0.5
    snapshot_kimg: float = 5.0
    grid_samples: int = 16
    seed: int = 0
    device: str = "auto"
    init: str | None = None  # an ambient (mask-input) model: lap 0 starts from its posterior mean (see lap0)
    lap0: str = "sample"  # lap 0's completions: exact posterior draws ("sample"), or the posterior "mean"

    def validate(self) -> EMConfig:
        """Raise AmbientInputError naming the flag of the first bad value."""
        for name in ("laps", "rank", "steps", "cg_iters", "estep_batch", "batch"):
            v = getattr(self, name)
            if not is_int(v, 1):
                self.fail(name, f"must be an integer >= 1, got {v!r}")
        for name in ("estep_size", "gaussian_size", "max_size"):
            v = getattr(self, name)
            if v is not None and not is_int(v, 1):
                self.fail(name, f"must be an integer >= 1, got {v!r}")
        if not is_int(self.gaussian_iters, 0):
            self.fail("gaussian_iters", f"must be an integer >= 0, got {self.gaussian_iters!r}")
        tol = self.gaussian_tol
        if tol is not None and not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol > 0):
            self.fail("gaussian_tol", f"must be positive, got {tol!r}")
        for name in ("lap_kimg", "lr", "snapshot_kimg"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                self.fail(name, f"must be positive, got {v!r}")
        for name in ("sigma_y", "lr_warmup_kimg", "ema"):
            v = getattr(self, name)
            if v is None and name == "sigma_y":
                continue
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                self.fail(name, f"must be >= 0, got {v!r}")
        if not 0 <= self.corruption_probability < 1:
            self.fail("corruption_probability", f"must be in [0, 1), got {self.corruption_probability!r}")
        for name, allowed in (("corruption_pattern", PATTERNS), ("gaussian_noise", NOISES), ("arch", ARCHS),
                              ("solver", SOLVERS), ("lap0", LAP0)):
            if getattr(self, name) not in allowed:
                self.fail(name, f"must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.redraw is not None and self.redraw not in REDRAWS:
            self.fail("redraw", f"must be one of {', '.join(REDRAWS)}, got {self.redraw!r}")
        if self.lr_schedule is not None and self.lr_schedule not in LR_SCHEDULES:
            self.fail("lr_schedule", f"must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        if not is_int(self.grid_samples, 0):
            self.fail("grid_samples", f"must be an integer >= 0, got {self.grid_samples!r}")
        if not self.outdir:
            self.fail("outdir", f"must not be empty, got {self.outdir!r}")
        return self


def load_observations(cfg: EMConfig) -> ImageDataset:
    """The observations (y, A): the data's masks, else masks drawn per image as ``ambient train`` draws them."""
    corruption = (Corruption(cfg.corruption_pattern, cfg.corruption_probability, 0.0, cfg.mask_full_rgb)
                  if cfg.corruption_probability > 0 else None)
    return load_dataset(cfg.data, data_dir=cfg.data_dir, max_size=cfg.max_size, corruption=corruption,
                        seed=cfg.seed)


class EMRun:
    """One EM run folder (see the module doc); :meth:`run` does or resumes every lap."""

    def __init__(self, cfg: EMConfig, *, log: Callable[[str], None] = print, progress: bool = False):
        self.cfg = cfg.validate()
        self.root = Path(cfg.outdir)
        claim_outdir(self.root, EM_RUN, command="ambient em")
        resolve_device(cfg.device)  # checked now, not at the first M-step (after lap 0 wrote its files)
        self.log = log
        self.progress = progress
        self.meas: Measurements | None = None
        if is_measurements_file(cfg.data):
            self._init_measurements()
            return
        data = load_observations(cfg)
        if not data.has_data_masks and cfg.corruption_probability == 0:
            raise AmbientInputError(f"--data {cfg.data}: no masks and --corruption-probability 0, so nothing is "
                                    "hidden (give observations with masks, or a probability to draw them)")
        notice = check_masks(data, cfg.data)
        if notice:
            log(notice)
        _ = data.resolution  # non-square images: a one-line error now, not after lap 0
        self._check_sizes(len(data), data.shape)
        self.data = data
        self.y, self.mask = data.batch(torch.arange(len(data)))
        self.meta = {"fingerprint": fingerprint(self.y, self.mask, exact=not data.is_uint8), "num_images": len(data),
                     "shape": list(data.shape), "observed_share": float(self.mask.mean())}
        self.init_model = self._load_init() if cfg.init is not None else None
        self._check_resume()

    def _init_measurements(self) -> None:
        """Observations y = A x + σ_y n through any operator (a measurements .npz): no masks, no --init."""
        cfg = self.cfg
        if cfg.corruption_probability:
            raise AmbientInputError(f"--corruption-probability {cfg.corruption_probability:g}: --data {cfg.data} "
                                    "holds measurements with their operator, which say what was observed; leave it 0")
        if cfg.init is not None:
            raise AmbientInputError(f"--init {cfg.init}: starts from an ambient model's posterior mean, which exists "
                                    f"for masked observations only; --data {cfg.data} holds operator measurements")
        meas = load_measurements(cfg.data, max_size=cfg.max_size)
        self._check_sizes(len(meas), meas.shape)
        self.meas, self.data, self.init_model = meas, meas, None
        self.y, self.mask = meas.y, None
        self.meta = {"fingerprint": meas.fingerprint(), "num_images": len(meas), "shape": list(meas.shape),
                     "operator": meas.spec.get("kind"), "value_range": list(meas.value_range),
                     "sigma_y": meas.sigma_y}
        self.log(f"measurements: {len(meas)} observations through a {meas.spec.get('kind')} operator, images "
                 f"{'x'.join(str(v) for v in meas.shape)}, σ_y = {meas.sigma_y:.3g} in model units, values "
                 f"{meas.value_range[0]:g}..{meas.value_range[1]:g} ↔ [-1, 1]")
        self._check_resume()

    def _check_sizes(self, num: int, shape) -> None:
        """--estep-size within the observations; the Gaussian's rank capped at the pixel count (recorded)."""
        cfg = self.cfg
        if cfg.estep_size is not None and cfg.estep_size > num:
            raise AmbientInputError(f"--estep-size {cfg.estep_size}: larger than the {num} observations "
                                    f"in --data {cfg.data}")
        pixels = int(np.prod(shape))
        if cfg.rank > pixels:
            self.log(f"notice: --rank {cfg.rank}: the observations have {pixels} pixels; using rank {pixels}")
            self.cfg = replace(cfg, rank=pixels)

    def save_completions(self, out: Path, images: torch.Tensor, index: torch.Tensor) -> None:
        """A lap's completed images (model units): uint8 for masked observations (as before), float32 in the
        measurements' own units with their ``value_range`` for operator data (what the M-step reads)."""
        atomic_save_npz(out, images=self.stored(images), index=index.numpy(), **self.units())

    def float_units(self) -> tuple[float, float] | None:
        """The data's own value range when completions are stored as floats (operator or float data), else None."""
        if self.meas is not None:
            return tuple(self.meas.value_range)
        return None if self.data.is_uint8 else tuple(self.data.value_range)

    def units(self) -> dict:
        vr = self.float_units()
        return {} if vr is None else {"value_range": np.asarray(vr, dtype=np.float64)}

    def stored(self, images: torch.Tensor) -> np.ndarray:
        """Model-unit images as a lap's completions are stored: uint8 (as before) for uint8 data, else float32 in
        the data's units, clipped to the range ± half its width (see :data:`CLIP`)."""
        vr = self.float_units()
        if vr is None:
            return to_hwc(images)
        lo, hi = vr
        x = (images.to(torch.float64).clamp(-CLIP, CLIP) + 1) * ((hi - lo) / 2) + lo
        return x.to(torch.float32).permute(0, 2, 3, 1).contiguous().numpy()

    def _load_init(self):
        try:
            loaded = load_model(self.cfg.init)
        except AmbientInputError as exc:
            raise AmbientInputError(str(exc).replace("--model", "--init", 1)) from None
        if not loaded.sampling.uses_masks or loaded.model is None or not loaded.model.mask_channels:
            raise AmbientInputError(f"--init {self.cfg.init}: not an ambient (mask-input) model; lap 0 starts from "
                                    f"an ambient model's posterior mean{reimport_hint(loaded)}")
        if loaded.model.label_dim:
            raise AmbientInputError(f"--init {self.cfg.init}: a class-conditional model ({loaded.model.label_dim} "
                                    "classes); lap 0 completes unlabelled observations, so --init takes an "
                                    "unconditional ambient model")
        if tuple(loaded.image_shape) != tuple(self.data.shape):
            raise AmbientInputError(f"--init {self.cfg.init}: trained on images of shape {loaded.image_shape}, the "
                                    f"observations are {tuple(self.data.shape)}")
        return loaded

    # ------------------------------------------------------------------ folder
    def lap_dir(self, lap: int) -> Path:
        return self.root / f"lap-{lap:02d}"

    def completions_path(self, lap: int) -> Path:
        return self.root / "completions" / f"lap-{lap:02d}.npz"

    def training_data(self, lap: int) -> Path:
        """What lap ``lap``'s M-step trains on: its own completions, or (pool) every observation's latest."""
        if not self.cfg.pool or lap == 0 or self.cfg.estep_size is None:
            return self.completions_path(lap)
        path = self.root / "completions" / f"pool-{lap:02d}.npz"
        if not path.is_file():
            pool = read_npz(self.training_data(lap - 1))
            fresh = read_npz(self.completions_path(lap))
            images = pool["images"].copy()
            images[fresh["index"]] = fresh["images"]
            extra = {"value_range": pool["value_range"]} if "value_range" in pool else {}
            atomic_save_npz(path, images=images, index=pool["index"], **extra)
        return path

    def redrawn(self, lap: int) -> torch.Tensor:
        """Sorted indices of the observations lap ``lap`` ≥ 1 completes anew (see ``EMConfig.redraw``)."""
        n, size = len(self.data), self.cfg.estep_size
        if self.cfg.redraw == "random":
            return subset(n, size, EM_SUBSET_STREAM, self.cfg.seed, lap)
        return rotating_subset(n, size, lap, EM_SUBSET_STREAM, self.cfg.seed)

    def pool_ages(self, lap: int) -> dict:
        """How many laps old the completions lap ``lap``'s M-step trains on are (pool runs): max, mean and the
        count per age."""
        n = len(self.data)
        drawn = torch.zeros(n, dtype=torch.long)  # lap 0 completes every observation
        for ell in range(1, lap + 1):
            drawn[self.redrawn(ell)] = ell
        ages = lap - drawn
        counts = torch.bincount(ages)
        return {"pool_age_max": int(ages.max()), "pool_age_mean": float(ages.double().mean()),
                "pool_age_counts": {str(a): int(c) for a, c in enumerate(counts.tolist()) if c}}

    def finished_laps(self) -> list[dict]:
        path = self.root / "stats.jsonl"
        return read_jsonl(path) if path.is_file() else []

    def _check_resume(self) -> None:
        path = self.root / "em_config.json"
        saved = read_json(path) if path.is_file() else None  # None: a new or empty folder (claim_outdir checked)
        meta = saved.get("data", {}) if saved is not None else {}
        saved_em = em_section(saved.get("em", {}), meta) if saved is not None else None
        # the fields whose flag defaults to None: a new run takes today's default, a resumed run its own
        if saved_em is None:
            unset = {"redraw": REDRAWS[0], "lr_schedule": MSTEP_LR_SCHEDULE,
                     "sigma_y": OPERATOR_SIGMA_Y if self.meas is not None else MASK_SIGMA_Y}
        else:
            unset = {"redraw": saved_em.get("redraw", REDRAWS[0]),
                     "lr_schedule": saved_em.get("lr_schedule", "constant"),
                     "sigma_y": saved_em.get("sigma_y", OPERATOR_SIGMA_Y)}
        self.cfg = replace(self.cfg, **{k: v for k, v in unset.items() if getattr(self.cfg, k) is None})
        if saved_em is None:
            return
        if meta.get("fingerprint") != self.meta["fingerprint"]:
            raise AmbientInputError(f"--data {self.cfg.data}: not the observations the run in {self.root} was "
                                    f"started with ({meta.get('num_images')} images of shape {meta.get('shape')}, "
                                    "other pixels or masks); use another --outdir")
        check_resume_compatible(saved_em, self.cfg.to_dict(), RESUMABLE_CHANGES, self.root)

    # ------------------------------------------------------------------ laps
    def run(self) -> Path:
        """Do or resume every lap; a run whose ``--laps`` laps are all finished is left as it is (one line
        says so). The run folder is locked while laps run: a second process on it is refused."""
        from ambient.learners.runlog import OutdirLock, check_writable

        done = sorted(row["lap"] for row in self.finished_laps())
        if all(lap in done for lap in range(self.cfg.laps)):  # finished, or --laps lowered: change nothing
            self.log(f"nothing to do: {self.root} already has {len(done)} finished lap(s), at or past --laps "
                     f"{self.cfg.laps} (a larger --laps runs more)")
            return self.root
        with OutdirLock() as lock:
            check_writable(self.root)
            lock.acquire(self.root)  # a second process on this run folder is refused here
            return self._run_laps()

    def _run_laps(self) -> Path:
        atomic_write_json(self.root / "em_config.json",
                          stamped({"em": self.cfg.to_dict(), "data": self.meta}, EM_RUN))
        done = {row["lap"] for row in self.finished_laps()}
        for lap in range(self.cfg.laps):
            if lap in done:
                continue
            started = time.perf_counter()
            extra = self.gaussian_lap() if lap == 0 else self.estep(lap)
            mstep_started = time.perf_counter()
            loss = self.mstep(lap)
            if self.cfg.pool and self.cfg.estep_size is not None:
                extra = {**extra, **self.pool_ages(lap)}
            row = {"lap": lap, **extra, "mstep_seconds": time.perf_counter() - mstep_started, "mstep_loss": loss,
                   "mstep_kimg": self.cfg.lap_kimg, "lap_seconds": time.perf_counter() - started,
                   "time": time.time()}
            append_jsonl(self.root / "stats.jsonl", row)
            (self.root / "completions" / f"pool-{lap - 1:02d}.npz").unlink(missing_ok=True)  # lap's pool supersedes it
            atomic_write_json(self.root / MODEL_POINTER, {"model": self.lap_dir(lap).name})
            self.log(f"lap {lap}: E-step {extra['estep_seconds']:.1f} s, M-step loss {loss}")
        return self.root

    def gaussian_lap(self) -> dict:
        """Lap 0's E-step: fit (or reload) the Gaussian prior, then complete the observations with its posterior
        mean or draws (or with the --init model's posterior mean; then the Gaussian is fitted only for draws)."""
        cfg, started = self.cfg, time.perf_counter()
        if self.meas is not None:
            return self.gaussian_lap_operator()
        prior, history = (None, [None]) if self.init_model is not None and cfg.lap0 == "mean" else self.gaussian()
        out = self.completions_path(0)
        size = None if cfg.pool else cfg.estep_size  # Gaussian: cheap
        idx = subset(len(self.data), size, EM_SUBSET_STREAM, cfg.seed, 0)
        if not out.is_file():
            y, mask = self.y[idx], self.mask[idx]
            seeds = [mix_seed(EM_DRAW_STREAM, cfg.seed, 0, i) for i in idx.tolist()]
            if self.init_model is None:
                done = prior.sample_posterior(y, mask, seeds) if cfg.lap0 == "sample" else prior.posterior_mean(y, mask)
            else:
                done = ambient_mean(self.init_model.denoiser, y, mask).double()
                if cfg.lap0 == "sample":  # + the Gaussian posterior's residual (draw minus its mean)
                    done = done + prior.sample_posterior(y, mask, seeds) - prior.posterior_mean(y, mask)
            done = (mask * y + (1 - mask) * done).float()
            self.save_completions(out, done, idx)
        return {"estep_seconds": time.perf_counter() - started, "estep_images": len(idx), "estep_forward": 0,
                "estep_vjp": 0, "gaussian_loglik": history[-1], "gaussian_rank": prior.rank if prior else None}

    def gaussian(self) -> tuple[GaussianPrior, list[float]]:
        """The lap-0 Gaussian prior and its log-likelihood per iteration: fitted once, then reloaded."""
        cfg, path = self.cfg, self.root / "gaussian.npz"
        if path.is_file():
            z = read_npz(path)
            return GaussianPrior.from_arrays(z), [float(v) for v in z["loglik"]]
        fit = subset(len(self.data), cfg.gaussian_size, EM_GFIT_STREAM, cfg.seed)
        report: dict = {}
        prior, history = fit_gaussian(self.y[fit], self.mask[fit], cfg.rank, cfg.gaussian_iters,
                                      noise=cfg.gaussian_noise, tol=cfg.gaussian_tol, report=report,
                                      callback=lambda i, ll: self.log(f"gaussian EM {i}: loglik/image {ll:.4f}"))
        gain = f"{report['gain']:.2e} nats per observed value ({report['observed']:.0f} per image)"
        why = (f"--gaussian-tol {cfg.gaussian_tol:g} (an EM map gained {gain})" if report["stopped"] == "tol" else
               f"the cap --gaussian-iters {cfg.gaussian_iters} (the last EM map checked gained {gain})")
        self.log(f"gaussian fit: {report['maps']} EM maps (SQUAREM), stopped by {why}; loglik/image {history[-1]:.4f}")
        atomic_save_npz(path, **prior.to_arrays(), loglik=np.asarray(history))
        return prior, history

    def gaussian_lap_operator(self) -> dict:
        """Lap 0 for operator measurements: the Gaussian fitted by Monte-Carlo EM, then its posterior draws (or
        mean) by conjugate gradients through the operator."""
        cfg, started = self.cfg, time.perf_counter()
        prior, history = self.gaussian_operator()
        out = self.completions_path(0)
        idx = subset(len(self.meas), None if cfg.pool else cfg.estep_size, EM_SUBSET_STREAM, cfg.seed, 0)
        if not out.is_file():
            done = []
            for s in range(0, len(idx), 256):
                chunk = idx[s:s + 256]
                y, op = self.meas.batch(chunk)
                seeds = [mix_seed(EM_DRAW_STREAM, cfg.seed, 0, i) for i in chunk.tolist()]
                x, _ = operator_posterior(prior, y, op, seeds=seeds if cfg.lap0 == "sample" else None)
                done.append(x)
            self.save_completions(out, torch.cat(done), idx)
        return {"estep_seconds": time.perf_counter() - started, "estep_images": len(idx), "estep_forward": 0,
                "estep_vjp": 0, "gaussian_change": history[-1] if history else None, "gaussian_rank": prior.rank}

    def gaussian_operator(self) -> tuple[GaussianPrior, list[float]]:
        """The lap-0 Gaussian for operator measurements (Monte-Carlo EM: no likelihood to stop on, so it runs
        --gaussian-iters iterations; the log gives the covariance's relative change per iteration)."""
        cfg, path = self.cfg, self.root / "gaussian.npz"
        if path.is_file():
            z = read_npz(path)
            return GaussianPrior.from_arrays(z), [float(v) for v in z["change"]]
        fit = subset(len(self.meas), cfg.gaussian_size, EM_GFIT_STREAM, cfg.seed)
        y, op = self.meas.batch(fit)
        prior, history = fit_gaussian_operator(
            y, op, cfg.rank, cfg.gaussian_iters, noise=cfg.gaussian_noise, seed=mix_seed(EM_GFIT_STREAM, cfg.seed, 1),
            callback=lambda i, c: self.log(f"gaussian EM {i} (Monte Carlo): covariance moved {c:.4f}"))
        self.log(f"gaussian fit: {len(history)} Monte-Carlo EM iterations on {len(fit)} observations "
                 f"(--gaussian-iters); last relative change {history[-1] if history else float('nan'):.4f}")
        atomic_save_npz(path, **prior.to_arrays(), change=np.asarray(history, dtype=np.float64))
        return prior, history

    def estep(self, lap: int) -> dict:
        """Lap ``lap``'s E-step with the model of lap − 1, a batch at a time (finished batches kept)."""
        cfg = self.cfg
        out = self.completions_path(lap)
        parts = out.with_suffix(".parts")
        idx = self.redrawn(lap)
        if not out.is_file():
            device = resolve_device(cfg.device)
            loaded = load_model(self.lap_dir(lap - 1), device=device)
            parts.mkdir(parents=True, exist_ok=True)
            chunks = [idx[s:s + cfg.estep_batch] for s in range(0, len(idx), cfg.estep_batch)]
            for k, chunk in enumerate(chunks):
                part = parts / f"part-{k:05d}.npz"
                if part.is_file():
                    continue
                t0 = time.perf_counter()
                seeds = [mix_seed(EM_DRAW_STREAM, cfg.seed, lap, i) for i in chunk.tolist()]
                if self.meas is None:
                    images, calls = mmps_samples(loaded.denoiser, self.y[chunk].to(device),
                                                 self.mask[chunk].to(device), seeds, steps=cfg.steps,
                                                 cg_iters=cfg.cg_iters, sigma_y=cfg.sigma_y, solver=cfg.solver)
                else:  # σ_y: the data's own, or --sigma-y where that is larger (a floor that keeps CG stable)
                    y, op = self.meas.batch(chunk)
                    images, calls = mmps_operator_samples(loaded.denoiser, y.to(device, torch.float32),
                                                          op.to(device), seeds, steps=cfg.steps,
                                                          cg_iters=cfg.cg_iters, sigma_y=max(op.sigma_y, cfg.sigma_y),
                                                          solver=cfg.solver)
                stored = self.stored(images.cpu())  # completions clipped (see stored): count what diverged
                clipped = int((images.abs() > CLIP).sum())
                atomic_save_npz(part, images=stored, seconds=np.float64(time.perf_counter() - t0),
                                forward=np.int64(calls["forward"]), vjp=np.int64(calls["vjp"]),
                                clipped=np.int64(clipped))
                if self.progress:
                    self.log(f"lap {lap} E-step: {min((k + 1) * cfg.estep_batch, len(idx))}/{len(idx)} images")
            loaded_parts = [read_npz(parts / f"part-{k:05d}.npz") for k in range(len(chunks))]
            stats = {"estep_seconds": float(sum(p["seconds"] for p in loaded_parts)),
                     "estep_forward": int(sum(p["forward"] for p in loaded_parts)),
                     "estep_vjp": int(sum(p["vjp"] for p in loaded_parts)), "estep_images": len(idx),
                     "estep_clipped": int(sum(p.get("clipped", 0) for p in loaded_parts))}
            if stats["estep_clipped"]:
                share = stats["estep_clipped"] / max(1, len(idx) * int(np.prod(self.data.shape)))
                self.log(f"notice: lap {lap} E-step: {share:.2%} of the completed values diverged (beyond the data's "
                         f"range by more than half its width) and were clipped; a larger --sigma-y may help")
            extra = self.units()
            atomic_save_npz(out, images=np.concatenate([p["images"] for p in loaded_parts]), index=idx.numpy(),
                            **{k: np.asarray(v) for k, v in stats.items()}, **extra)
            shutil.rmtree(parts, ignore_errors=True)
        z = read_npz(out)
        return {k: (int(z[k]) if k != "estep_seconds" else float(z[k]))
                for k in ("estep_seconds", "estep_forward", "estep_vjp", "estep_images", "estep_clipped") if k in z}

    def train_config(self, lap: int) -> TrainConfig:
        """Lap ``lap``'s M-step: clean training on the pool for ``lap_kimg``, warm-started from the previous lap, with
        the run's learning-rate schedule (cosine: warm-up, then decay to 0 at the lap's end, every lap)."""
        cfg = self.cfg
        return TrainConfig(data=str(self.training_data(lap)), outdir=str(self.lap_dir(lap)), objective="naive",
                           corruption_probability=0.0, arch=cfg.arch, batch=cfg.batch, lr=cfg.lr,
                           lr_warmup_kimg=cfg.lr_warmup_kimg, lr_schedule=cfg.lr_schedule,
                           kimg=cfg.lap_kimg, ema=cfg.ema,
                           snapshot_kimg=min(cfg.snapshot_kimg, cfg.lap_kimg), tick_kimg=min(0.5, cfg.lap_kimg),
                           grid_samples=cfg.grid_samples, seed=mix_seed(EM_MSTEP_STREAM, cfg.seed, lap) % 2**31,
                           device=cfg.device, init=str(self.lap_dir(lap - 1)) if lap > 0 else None)

    def mstep_log(self, text: str) -> None:
        """The M-step's lines, less repeats: the completions of operator data may lie beyond the measurements'
        value_range, and the pool's reader says so every lap; that notice is passed on once per process."""
        lines = []
        for line in str(text).split("\n"):
            if "lie outside value_range" in line:
                if getattr(self, "_range_noticed", False):
                    continue
                self._range_noticed = True
                line += " (said once; later laps are not reported again)"
            lines.append(line)
        if lines:
            self.log("\n".join(lines))

    def mstep(self, lap: int) -> float | None:
        from ambient.learners.train import train

        train(self.train_config(lap), progress=self.progress, log=self.mstep_log)
        rows = read_jsonl(self.lap_dir(lap) / "stats.jsonl") if (self.lap_dir(lap) / "stats.jsonl").is_file() else []
        losses = [r.get("loss") for r in rows if r.get("loss") is not None]
        return float(losses[-1]) if losses else None


def run_em(cfg: EMConfig, *, log: Callable[[str], None] = print, progress: bool = False) -> Path:
    """Run (or resume) the EM learner as configured; returns the run folder. ``ambient em`` calls this."""
    return EMRun(replace(cfg), log=log, progress=progress).run()


def fingerprint(y: torch.Tensor, mask: torch.Tensor, exact: bool = False) -> str:
    """The observations' identity: uint8 pixels (uint8 data, as always) or float32 ones (``exact``: float data,
    whose 8-bit rounding would not tell two data sets apart)."""
    h = hashlib.sha256()
    h.update(str(tuple(y.shape)).encode())
    h.update((y.to(torch.float32) if exact else float_to_uint8(y)).numpy().tobytes())
    h.update(mask.to(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]


def rotating_subset(n: int, size: int | None, lap: int, *parts: int) -> torch.Tensor:
    """Sorted indices of block ``lap`` − 1 (size ``size``, wrapping) of one permutation of n seeded by ``parts``:
    consecutive laps cover every observation once before any repeats (all when size covers n)."""
    if size is None or size >= n:
        return torch.arange(n)
    g = torch.Generator().manual_seed(mix_seed(*parts))
    perm = torch.randperm(n, generator=g)
    start = ((lap - 1) * size) % n
    return perm[(start + torch.arange(size)) % n].sort().values


def subset(n: int, size: int | None, *parts: int) -> torch.Tensor:
    """Sorted indices of ``size`` of n observations, a pure function of ``parts`` (all when size covers n)."""
    if size is None or size >= n:
        return torch.arange(n)
    g = torch.Generator().manual_seed(mix_seed(*parts))
    return torch.randperm(n, generator=g)[:size].sort().values
