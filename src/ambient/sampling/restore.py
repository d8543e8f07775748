"""Restore corrupted observations with a trained model (``ambient restore`` calls this).

Observations come as ``ambient train`` reads them with masks (an npz with ``images`` and
``masks``, or a folder with ``images/`` and ``masks/``): y = A ⊙ x, A = the mask. Output row
j = i·M + k is draw k of observation i, with seed ``seed + j``: its starting noise comes from
the same per-seed generator as ``ambient sample``, so a row does not depend on the batch size or
the number of torchrun processes. Methods (see :mod:`ambient.sampling.posterior`):

* ``mmps``, ``dps``, ``project``: posterior samples, for models with a full-image denoiser
  (clean- or naive-trained runs, finetuned diffusers models trained without masks);
* ``ambient-mean``: for ambient (mask-input) models, D(A ⊙ y, σ_obs, A): the posterior *mean*
  (one network call; all M draws of an observation are the same image);
* ``gaussian-mean``, ``gaussian-sample``: no network: the lap-0 Gaussian of an ``ambient em`` run
  (:mod:`ambient.learners.gaussian_restore`, which the CLI calls instead of :func:`restore`).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ambient import distributed as dist_utils
from ambient.configbase import ConfigBase, is_int
from ambient.data.datasets import ImageDataset
from ambient.data.images import float_to_uint8, save_grid
from ambient.errors import AmbientInputError, SamplingDiverged
from ambient.folders import check_not_a_run_file
from ambient.io import atomic_save_npz
from ambient.operators.mask import MaskOperator
from ambient.operators.measurements import Measurements
from ambient.rng import NOISE_STREAM, SeedNoise
from ambient.sampling.fixed_mask import model_sigmas
from ambient.sampling.generate import MAX_SEED
from ambient.sampling.posterior import DPS, MMPS, AmbientMean, Projection
from ambient.sampling.solvers import SOLVERS, solver_by_name
from ambient.store.models import LoadedModel, reimport_hint

GAUSSIAN_METHODS = ("gaussian-mean", "gaussian-sample")  # an em run's lap-0 Gaussian (learners.gaussian_restore)
METHODS = ("mmps", "dps", "project", "ambient-mean", *GAUSSIAN_METHODS)
# Restorations live in [-1, 1] (model units). Beyond ±FAR_ABS a restoration is implausible (an unstable posterior
# step, e.g. MMPS with σ_y = 0 and a poorly trained prior, or through an ill-conditioned operator): counted and
# reported; non-finite ones stop the restore.
FAR_ABS = 10.0
FULL_IMAGE_METHODS = ("mmps", "dps", "project")


@dataclass(frozen=True)
class RestoreConfig(ConfigBase, what="restore"):
    """How to restore; field names match the ``ambient restore`` flags. Round-trips through JSON."""

    method: str = "mmps"
    steps: int = 18
    cg_iters: int = 1
    num_per_image: int = 1
    sigma_y: float = 0.0
    seed: int = 0
    batch: int = 64
    dps_step: float = 5.0
    solver: str = "heun"

    def __post_init__(self):
        self.validate()

    def validate(self) -> RestoreConfig:
        """Raise AmbientInputError naming the flag of the first bad value (a config is checked when made)."""
        checks = [("method", self.method in METHODS, f"must be one of {', '.join(METHODS)}"),
                  ("steps", is_int(self.steps, 1), "must be an integer >= 1"),
                  ("cg_iters", is_int(self.cg_iters, 1), "must be an integer >= 1"),
                  ("num_per_image", is_int(self.num_per_image, 1), "must be an integer >= 1"),
                  ("sigma_y", math.isfinite(self.sigma_y) and self.sigma_y >= 0, "must be >= 0"),
                  ("seed", is_int(self.seed, 0) and self.seed <= MAX_SEED, f"must be in 0..{MAX_SEED}"),
                  ("batch", is_int(self.batch, 1), "must be an integer >= 1"),
                  ("dps_step", math.isfinite(self.dps_step) and self.dps_step > 0, "must be > 0"),
                  ("solver", self.solver in SOLVERS, f"must be one of {', '.join(SOLVERS)}")]
        for name, ok, what in checks:
            if not ok:
                self.fail(name, f"{what}, got {getattr(self, name)!r}")
        return self


@dataclass
class Restored:
    """Restorations in [-1, 1] (N·M, C, H, W), the observation each restores, and the work it took."""

    images: torch.Tensor
    index: torch.Tensor
    seconds: float = 0.0
    calls: dict = field(default_factory=lambda: {"forward": 0, "vjp": 0})  # per batch call, summed
    consistency: torch.Tensor | None = None  # operator measurements: ‖A x − y‖ / ‖y‖ per restoration

    @property
    def far(self) -> int:
        """How many restorations have a value beyond ±FAR_ABS in model units (an unstable posterior step)."""
        return int(far_rows(self.images).sum()) if len(self.images) else 0


def is_mask_input(loaded: LoadedModel) -> bool:
    """True for models that must see a mask (ambient-trained): their sampler reproduces a mask law."""
    return loaded.sampling.uses_masks


def check_shape(data: ImageDataset, shape, data_name: str, model_says: str) -> None:
    """One line unless the data's images have ``shape`` (C, H, W); ``model_says``: e.g. "runs/x was trained on"."""
    if tuple(data.shape) != tuple(shape):
        c, h, w = data.shape
        mc, mh, mw = shape
        raise AmbientInputError(f"--data {data_name}: images are {h}x{w} with {c} channel(s), but --model "
                                f"{model_says} {mh}x{mw} with {mc}")


def check_inputs(loaded: LoadedModel, data: ImageDataset, cfg: RestoreConfig, *, data_name: str = "",
                 model_name: str = "") -> None:
    """One-line :class:`AmbientInputError` (naming the flag or file) for anything restore cannot use."""
    data_name = data_name or data.source or "data"
    model_name = model_name or str(loaded.path)
    if isinstance(data, Measurements):
        if cfg.method not in ("mmps", "dps"):
            raise AmbientInputError(f"--method {cfg.method}: --data {data_name} holds {data.spec.get('kind')} "
                                    "measurements; restoring them needs --method mmps or dps")
        if is_mask_input(loaded):
            raise AmbientInputError(f"--model {model_name}: a mask-input (ambient) model cannot restore operator "
                                    "measurements; use a full-image model (clean-, naive- or EM-trained)")
    elif not data.has_data_masks:
        raise AmbientInputError(f"--data {data_name}: no masks (need an npz with 'images' and 'masks', "
                                "or a folder with images/ and masks/)")
    check_shape(data, loaded.image_shape, data_name, f"{model_name} was trained on")
    mask_input = is_mask_input(loaded)
    if mask_input and cfg.method in FULL_IMAGE_METHODS:
        raise AmbientInputError(f"--method {cfg.method}: needs a full-image denoiser, but --model {model_name} "
                                "is a mask-input (ambient) model; use --method ambient-mean, or a clean- or "
                                "naive-trained model")
    if not mask_input and cfg.method == "ambient-mean":
        raise AmbientInputError(f"--method ambient-mean: needs a mask-input (ambient) model, but --model "
                                f"{model_name} is a full-image denoiser; use mmps, dps or project"
                                f"{reimport_hint(loaded)}")


def posterior_denoiser(denoiser, cfg: RestoreConfig, y: torch.Tensor, mask: torch.Tensor | None,
                       operator=None):
    """The wrapper of ``cfg.method`` around the model's ``denoiser`` for observations (y, mask), or for
    measurements y through ``operator`` (σ_y: the data's own, or --sigma-y where that is larger)."""
    sigma_y = cfg.sigma_y if operator is None else max(cfg.sigma_y, float(operator.sigma_y))
    if cfg.method == "ambient-mean":
        return AmbientMean(denoiser, y, mask, cfg.sigma_y, sigma_floor=float(getattr(denoiser, "sigma_min", 0.002)))
    op = MaskOperator(mask) if operator is None else operator
    if cfg.method == "mmps":
        return MMPS(denoiser, y, op, sigma_y, cg_iters=cfg.cg_iters)
    if cfg.method == "dps":
        return DPS(denoiser, y, op, sigma_y, step=cfg.dps_step)
    return Projection(denoiser, y, op, sigma_y)


def restore_rows(loaded: LoadedModel, data: ImageDataset, rows: list[int], cfg: RestoreConfig,
                 device: torch.device | str = "cpu") -> tuple[torch.Tensor, dict]:
    """Output rows ``rows`` (row j: observation j // M, seed cfg.seed + j) as float32 (len, C, H, W) on the CPU."""
    device = torch.device(device)
    obs = [j // cfg.num_per_image for j in rows]
    if isinstance(data, Measurements):
        y, op = data.batch(obs)
        y, op = y.to(device, torch.float32), op.to(device)
        wrapper = posterior_denoiser(loaded.denoiser, cfg, y, None, op)
        shape = (len(rows), *data.shape)
    else:
        y, mask = data.batch(obs)
        y, mask = y.to(device), mask.to(device)
        wrapper = posterior_denoiser(loaded.denoiser, cfg, y, mask)
        shape = y.shape
    # ambient-mean does not depend on x_t: one step (one call) returns it exactly
    steps = 1 if cfg.method == "ambient-mean" else cfg.steps
    sigmas = torch.as_tensor(model_sigmas(wrapper, steps), dtype=torch.float64).to(device)
    x = SeedNoise([cfg.seed + j for j in rows], stream=NOISE_STREAM, device=device).randn(shape)
    with torch.no_grad():
        out = solver_by_name(cfg.solver)(wrapper, x * sigmas[0], sigmas)
    check_diverged(out, obs, cfg, operator_sigma_y=float(op.sigma_y) if isinstance(data, Measurements) else None)
    return out.float().cpu(), dict(wrapper.calls)


def hint_for(cfg: RestoreConfig, operator_sigma_y: float | None = None) -> str:
    """What to try when ``cfg.method``'s restorations leave every plausible range."""
    return {"mmps": "a larger --sigma-y (MMPS uses max(--sigma-y, the data's σ_y"
                    + ("" if operator_sigma_y is None else f" = {operator_sigma_y:.3g} in model units") + ")) "
                    "or more --steps",
            "dps": "a smaller --dps-step, a larger --sigma-y, or --method mmps",
            "project": "more --steps", "ambient-mean": "a larger --sigma-y"}.get(cfg.method, "a larger --sigma-y")


def far_rows(out: torch.Tensor) -> torch.Tensor:
    """Per restoration: True when a value is beyond ±FAR_ABS in model units (non-finite counts too)."""
    flat = out.reshape(out.shape[0], -1)
    return ~(flat.abs() <= FAR_ABS).all(dim=1)


def check_diverged(out: torch.Tensor, obs: list[int], cfg: RestoreConfig, *,
                   operator_sigma_y: float | None = None) -> None:
    """:class:`SamplingDiverged` (one line: how many, which observation first, what to try) when a restoration has
    a non-finite value; raised at the first such batch, before anything is written."""
    bad = ~torch.isfinite(out.reshape(out.shape[0], -1)).all(dim=1)
    if not bool(bad.any()):
        return
    first = obs[int(bad.nonzero()[0])]
    raise SamplingDiverged(f"restore --method {cfg.method} diverged: {int(bad.sum())} of {len(obs)} restorations in "
                           f"this batch have non-finite values (first: observation {first}); nothing written; "
                           f"try {hint_for(cfg, operator_sigma_y)}")


def restore(loaded: LoadedModel, data: ImageDataset, cfg: RestoreConfig, *, device: torch.device | str = "cpu",
            rows: list[int] | None = None, progress: bool = False, consistency: bool = True) -> Restored:
    """Restore every observation of ``data`` ``cfg.num_per_image`` times (or only output ``rows``); with
    ``consistency`` (operator measurements) also each restoration's ‖A x − y‖ / ‖y‖."""
    check_inputs(loaded, data, cfg)
    total = len(data) * cfg.num_per_image
    rows = list(range(total)) if rows is None else [int(j) for j in rows]
    chunks = [rows[s:s + cfg.batch] for s in range(0, len(rows), cfg.batch)]
    if progress:
        from tqdm import tqdm

        chunks = tqdm(chunks, unit="batch", desc=f"restore ({cfg.method})")
    t0 = time.perf_counter()
    images, calls = [], {"forward": 0, "vjp": 0}
    for chunk in chunks:
        out, c = restore_rows(loaded, data, chunk, cfg, device)
        images.append(out)
        calls = {k: calls[k] + c[k] for k in calls}
    out = torch.cat(images) if images else torch.empty((0, *data.shape))
    index = torch.tensor([j // cfg.num_per_image for j in rows], dtype=torch.int64)
    seconds = time.perf_counter() - t0
    consistency = data.consistency(out, index) if consistency and isinstance(data, Measurements) else None
    return Restored(out, index, seconds, calls, consistency)


def restore_distributed(loaded: LoadedModel, data: ImageDataset, cfg: RestoreConfig, *,
                        device: str = "auto", progress: bool = False) -> Restored | None:
    """Like :func:`restore` under torchrun: each rank restores its share of rows; rank 0 gets all (None elsewhere)."""
    env = dist_utils.init_from_env(device)
    if env.world_size == 1:
        return restore(loaded, data, cfg, device=dist_utils.resolve_device(device), progress=progress)
    check_inputs(loaded, data, cfg)
    loaded.denoiser.to(env.device)
    total = len(data) * cfg.num_per_image

    def work(mine: list[int]):
        part = restore(loaded, data, cfg, device=env.device, rows=mine, progress=progress and env.rank == 0,
                       consistency=False)  # rank 0 computes it once, on every row
        return part.images, (part.seconds, part.calls)

    gathered = dist_utils.shard_and_gather(total, work, env)
    if gathered is None:
        return None
    images, extras = gathered
    calls = {"forward": 0, "vjp": 0}
    for _, c in extras:
        calls = {k: calls[k] + c[k] for k in calls}
    index = torch.arange(total, dtype=torch.int64) // cfg.num_per_image
    consistency = data.consistency(images, index) if isinstance(data, Measurements) else None
    return Restored(images, index, max(s for s, _ in extras), calls, consistency)


def check_restore_out(out: str | os.PathLike, data: str | os.PathLike | None = None) -> Path:
    """Refuse, before any work, an ``--out`` that is not a .npz file path, or that is the ``--data`` file itself
    or its grid PNG's name (one line naming --out)."""
    out = Path(out)
    if out.suffix != ".npz":
        raise AmbientInputError(f"--out {out}: must be a .npz file")
    if out.is_dir():
        raise AmbientInputError(f"--out {out}: is a folder")
    if data is not None and out.exists() and Path(data).exists() and out.resolve() == Path(data).resolve():
        raise AmbientInputError(f"--out {out}: is the --data file itself; restoring would overwrite the "
                                "observations; choose another --out")
    check_not_a_run_file(out)
    return out


def grid_path_for(out: Path) -> Path:
    return out.with_name(out.stem + "_grid.png")


def write_restored(out: str | os.PathLike, restored: Restored, observations: torch.Tensor | None = None,
                   num_per_image: int = 1, value_range: tuple[float, float] | None = None) -> Path:
    """Write ``images`` (N·M, H, W, C) uint8 and ``index`` (N·M,) int64 to the .npz ``out`` atomically, and a
    grid PNG beside it: per observation (up to 8) the observation, then up to 7 of its restorations.

    With ``value_range`` (float data, operator measurements) also ``images_float`` (float32, the data's own
    units) and ``value_range``; with measurements ``data_consistency`` (‖A x − y‖ / ‖y‖ per restoration)."""
    out = Path(out)
    if out.suffix != ".npz":
        raise AmbientInputError(f"--out {out}: must be a .npz file")
    u8 = float_to_uint8(restored.images).permute(0, 2, 3, 1).contiguous().numpy()
    extra = {}
    if value_range is not None:
        lo, hi = value_range
        floats = ((restored.images.to(torch.float64) + 1) * ((hi - lo) / 2) + lo).to(torch.float32)
        extra = {"images_float": floats.permute(0, 2, 3, 1).contiguous().numpy(),
                 "value_range": np.asarray(value_range, dtype=np.float64)}
    if restored.consistency is not None:
        extra["data_consistency"] = restored.consistency.numpy().astype(np.float64)
    try:
        atomic_save_npz(out, images=u8, index=restored.index.numpy().astype(np.int64), **extra)
    except OSError as exc:
        raise AmbientInputError(f"--out {out}: cannot write ({exc.strerror or exc})") from None
    if observations is not None and len(u8):
        shown = min(8, observations.shape[0])
        per = min(7, num_per_image)
        tiles = []
        for i in range(shown):
            tiles.append(observations[i])
            tiles.extend(restored.images[i * num_per_image:i * num_per_image + per])
        save_grid(grid_path_for(out), torch.stack(tiles), nrow=per + 1, padding=1)
    return out
