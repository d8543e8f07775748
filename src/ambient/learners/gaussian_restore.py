"""Restore observations with the Gaussian prior an ``ambient em`` run fitted at lap 0 (``ambient restore --method
gaussian-mean | gaussian-sample``).

EM's lap 0 fits N(μ, Σ) (diagonal + low rank) to the observations alone (:mod:`ambient.learners.gaussian_prior`) and
saves it as ``gaussian.npz`` in the run folder. Its posterior given y = A x + σ_y n is Gaussian too, so a restoration
needs no network: ``gaussian-mean`` is E[x | y] = μ + Σ Aᵀ (A Σ Aᵀ + s² I)⁻¹ (y − A μ) (the PSNR-optimal answer under
that prior; every draw of an observation is the same image), ``gaussian-sample`` an exact posterior draw by Matheron's
rule (:func:`~ambient.learners.gaussian_prior.operator_posterior`), with s = max(--sigma-y, the data's σ_y, 10⁻³).
Row j = i·M + k (draw k of observation i) draws with seed ``seed + j``, whatever the batch.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from ambient.data.datasets import ImageDataset
from ambient.errors import AmbientInputError
from ambient.io import read_npz
from ambient.learners.gaussian_prior import GaussianPrior, operator_posterior
from ambient.operators.mask import MaskOperator
from ambient.operators.measurements import Measurements
from ambient.sampling.restore import GAUSSIAN_METHODS, RestoreConfig, Restored, check_shape


def em_gaussian(model: str | Path) -> tuple[GaussianPrior, dict]:
    """The lap-0 Gaussian of the ``ambient em`` run ``model`` (the run folder, or a lap or snapshot inside it) and
    the run's ``data`` facts (shape, value_range, …); one-line :class:`AmbientInputError` naming --model otherwise."""
    p = Path(model)
    for root in (p, *list(p.parents)[:3]):
        if (root / "em_config.json").is_file():
            if not (root / "gaussian.npz").is_file():
                raise AmbientInputError(f"--model {model}: the ambient em run {root} has no gaussian.npz yet (lap 0 "
                                        "fits it); run ambient em until lap 0 is done")
            try:
                meta = json.loads((root / "em_config.json").read_text(encoding="utf-8")).get("data", {})
                return GaussianPrior.from_arrays(read_npz(root / "gaussian.npz")), meta
            except (OSError, ValueError, KeyError) as exc:
                raise AmbientInputError(f"--model {model}: cannot read {root / 'gaussian.npz'} "
                                        f"({' '.join(str(exc).split())})") from None
    raise AmbientInputError(f"--model {model}: --method gaussian-mean / gaussian-sample need an ambient em run folder "
                            "(its lap-0 Gaussian, gaussian.npz); this is not one")


def check_gaussian_inputs(prior: GaussianPrior, meta: dict, data: ImageDataset, cfg: RestoreConfig, *,
                          data_name: str, model_name: str) -> None:
    """The prior must be over the data's image shape and, for measurements, in the same units (value_range)."""
    if not isinstance(data, Measurements) and not data.has_data_masks:
        raise AmbientInputError(f"--data {data_name}: no masks (need an npz with 'images' and 'masks', or a folder "
                                "with images/ and masks/), or measurements ('y', 'operator', 'value_range')")
    check_shape(data, prior.shape, data_name, f"{model_name}'s Gaussian is over")
    if isinstance(data, Measurements) and meta.get("value_range") is not None:
        if [float(v) for v in meta["value_range"]] != [float(v) for v in data.value_range]:
            lo, hi = meta["value_range"]
            raise AmbientInputError(f"--data {data_name}: value_range {data.value_range[0]:g}..{data.value_range[1]:g}"
                                    f", but --model {model_name} was fitted on data in {lo:g}..{hi:g}; the "
                                    "Gaussian's units would not match")


def _posterior(prior: GaussianPrior, data: ImageDataset, obs: list[int], cfg: RestoreConfig,
               seeds: list[int] | None) -> torch.Tensor:
    """E[x | y] (``seeds`` None) or one draw per seed for observations ``obs``, in batches; float32 model units."""
    images = []
    for s in range(0, len(obs), cfg.batch):
        part = obs[s:s + cfg.batch]
        if isinstance(data, Measurements):
            y, op = data.batch(part)
        else:
            y_img, mask = data.batch(part)
            op = MaskOperator(mask)
            y = op(y_img)
        sigma_y = max(cfg.sigma_y, float(op.sigma_y))
        x, _ = operator_posterior(prior, y, op, sigma_y=sigma_y,
                                  seeds=None if seeds is None else seeds[s:s + cfg.batch])
        images.append(x.to(torch.float32))
    return torch.cat(images) if images else torch.empty((0, *data.shape))


def restore_gaussian(prior: GaussianPrior, data: ImageDataset, cfg: RestoreConfig,
                     rows: list[int] | None = None) -> Restored:
    """Every observation of ``data`` ``cfg.num_per_image`` times (or only output ``rows``), by ``cfg.method``
    (``gaussian-mean``: one solve per observation, repeated for its draws; ``gaussian-sample``: row j draws with
    seed ``cfg.seed + j``); images in model units, float32."""
    if cfg.method not in GAUSSIAN_METHODS:
        raise ValueError(f"method must be one of {GAUSSIAN_METHODS}, got {cfg.method!r}")
    total = len(data) * cfg.num_per_image
    rows = list(range(total)) if rows is None else [int(j) for j in rows]
    obs = [j // cfg.num_per_image for j in rows]
    started = time.perf_counter()
    if cfg.method == "gaussian-mean":
        unique = sorted(set(obs))
        where = {o: k for k, o in enumerate(unique)}
        means = _posterior(prior, data, unique, cfg, None)
        out = means[[where[o] for o in obs]] if obs else means
    else:
        out = _posterior(prior, data, obs, cfg, [cfg.seed + j for j in rows])
    index = torch.tensor(obs, dtype=torch.int64)
    consistency = data.consistency(out, index) if isinstance(data, Measurements) and len(out) else None
    return Restored(out, index, time.perf_counter() - started, {"forward": 0, "vjp": 0}, consistency)
