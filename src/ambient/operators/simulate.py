"""Simulated measurements y = A x + σ_y n of clean images, for `ambient measure` (benchmarks, tests, tutorials).

The images x are taken in the data's own units (x = from_unit_range(model units, value_range): 0..255 for uint8
data, the declared or per-dataset range for float data), so the measurements, σ_y and the file's ``value_range``
are all in those units, as :func:`ambient.operators.measurements.save_measurements` expects.

Randomness is a pure function of (seed, image index), so the first observations are the same whatever
``max_size``:

* ``mask``: dust masks A drawn as ``ambient train --corruption-probability p --seed N`` draws them
  (:meth:`ambient.data.corruption.Corruption.mask_for_index`), one per image;
* ``kspace``: :func:`ambient.operators.kspace.cartesian_mask` with seed ``mix_seed(MEASURE_STREAM, seed, 0)``,
  one line mask per image;
* the noise of observation i: its own generator seeded ``mix_seed(MEASURE_STREAM, seed, 1, i)``, on the measured
  entries only (σ_y in the data's units; for k-space the std of the real and of the imaginary part each).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ambient.data.corruption import Corruption
from ambient.data.datasets import ImageDataset
from ambient.data.images import from_unit_range
from ambient.operators.base import LinearOperator, check_sigma_y
from ambient.operators.blur import BlurOperator
from ambient.operators.kspace import KSpaceOperator, cartesian_mask
from ambient.operators.mask import MaskOperator
from ambient.rng import MEASURE_STREAM, mix_seed

OPERATORS = ("mask", "blur", "kspace")
CHUNK = 256  # images measured at a time (float64)


@dataclass(frozen=True)
class MeasureSpec:
    """What to simulate. ``kind`` mask: ``probability`` (dust p, per pixel and channel unless ``mask_full_rgb``);
    blur: ``kernel`` (kh, kw) float, odd sizes, used as given; kspace: ``acceleration`` and ``center_fraction``
    (single-channel images). ``sigma_y`` in the data's units; ``seed`` fixes masks and noise."""

    kind: str
    sigma_y: float = 0.0
    seed: int = 0
    probability: float | None = None
    mask_full_rgb: bool = False
    kernel: torch.Tensor | None = None
    acceleration: float | None = None
    center_fraction: float = 0.08


def images_in_data_units(data: ImageDataset, indices: Sequence[int]) -> torch.Tensor:
    """The images ``indices`` of ``data`` as float64 (B, C, H, W) in the data's own units (uint8: exactly 0..255)."""
    rows = torch.as_tensor(list(indices), dtype=torch.int64)
    images = data.images[rows]
    if data.is_uint8:
        return images.to(torch.float64)
    return from_unit_range(images.to(torch.float64), data.value_range)


def build_operator(spec: MeasureSpec, num: int, image_shape: tuple[int, int, int]) -> LinearOperator:
    """The operator of ``num`` observations of images (C, H, W) (ValueError for impossible settings)."""
    sigma_y = check_sigma_y(spec.sigma_y)
    c, h, w = image_shape
    if spec.kind == "mask":
        law = Corruption("dust", spec.probability, 0.0, spec.mask_full_rgb)
        masks = law.masks_for_indices(spec.seed, range(num), image_shape)
        return MaskOperator(masks.to(torch.float32), sigma_y=sigma_y)
    if spec.kind == "blur":
        return BlurOperator(spec.kernel.to(torch.float64)[None], image_shape, sigma_y=sigma_y)
    if spec.kind == "kspace":
        if c != 1:
            raise ValueError(f"k-space needs single-channel images, got {c} channels")
        masks = cartesian_mask(num, h, w, spec.acceleration, spec.center_fraction,
                               seed=mix_seed(MEASURE_STREAM, spec.seed, 0))
        return KSpaceOperator(masks, image_shape, sigma_y=sigma_y)
    raise ValueError(f"operator must be one of {', '.join(OPERATORS)}, got {spec.kind!r}")


def simulate(data: ImageDataset, spec: MeasureSpec) -> tuple[torch.Tensor, LinearOperator]:
    """(y float32 (N, *measurement shape) in the data's units, the operator of the N observations): A x + σ_y n
    for every image x of ``data`` (which must hold clean images: no masks)."""
    n = len(data)
    operator = build_operator(spec, n, data.shape)
    y = torch.empty((n, *operator.measurement_shape), dtype=torch.float32)
    for start in range(0, n, CHUNK):
        idx = list(range(start, min(start + CHUNK, n)))
        op = operator.select(torch.tensor(idx))
        clean = op(images_in_data_units(data, idx))
        gens = [torch.Generator().manual_seed(mix_seed(MEASURE_STREAM, spec.seed, 1, i)) for i in idx]
        y[start:start + len(idx)] = op.add_noise(clean, gens).to(torch.float32)
    return y, operator
