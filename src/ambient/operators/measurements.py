"""Measurements beyond pixel masks: observations y = A x + σ_y n with their operator, as an ``.npz``.

The file (what :func:`save_measurements` writes and :func:`load_measurements` reads)::

    y            (N, *measurement shape) float32/float64, or complex64/complex128 (k-space): the measurements,
                 in the units of the images
    operator     a JSON string: the operator's spec (``kind``, ``image_shape``, ``sigma_y`` in the images' units,
                 its scalar parameters; see :mod:`ambient.operators.specs`)
    op_<name>    the operator's per-observation arrays (e.g. ``op_mask`` for k-space, ``op_kernel`` for blur),
                 with 1 row (shared by every observation) or N
    value_range  [lo, hi]: the image values that map to [-1, 1], the range models work in

Complex y is held as a real tensor with a trailing dimension of 2 (``torch.view_as_real``), the layout the
operators use. Models work on images in [-1, 1]: with x = a·x̃ + b (a = (hi − lo)/2, b = (hi + lo)/2) the
measurements become ỹ = (y − b·A 1)/a and σ̃_y = σ_y / a, exactly, since A is linear; :class:`Measurements`
holds ỹ and the operator with σ̃_y, and :meth:`Measurements.to_original` maps images back.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ambient.errors import AmbientInputError
from ambient.io import atomic_save_npz
from ambient.operators.base import LinearOperator
from ambient.operators.specs import operator_from_spec

REAL_DTYPES = (np.float16, np.float32, np.float64)
COMPLEX_DTYPES = (np.complex64, np.complex128)


def is_measurements_file(path: str | os.PathLike) -> bool:
    """True when ``path`` is an ``.npz`` holding ``y`` and ``operator`` (measurements, not images)."""
    p = Path(str(path))
    if p.suffix != ".npz" or not p.is_file():
        return False
    try:
        with np.load(p, allow_pickle=False) as z:
            return "y" in z.files and "operator" in z.files
    except (OSError, ValueError):
        return False


def operator_kind(path: str | os.PathLike) -> str | None:
    """The operator kind (``mask``, ``blur``, ``kspace``, …) a measurements file records, read without its arrays;
    None when it cannot be read (:func:`load_measurements` then says why)."""
    try:
        with np.load(Path(str(path)), allow_pickle=False) as z:
            spec = json.loads(str(z["operator"][()]))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    kind = spec.get("kind") if isinstance(spec, dict) else None
    return kind if isinstance(kind, str) else None


@dataclass
class Measurements:
    """Observations in model units: ỹ (N, *measurement shape) float64 and the operator (σ̃_y) of all N."""

    y: torch.Tensor
    operator: LinearOperator
    value_range: tuple[float, float]
    source: str
    spec: dict  # the file's operator spec, in the images' own units
    y_norm: torch.Tensor  # ‖y‖ per observation in the file's units (for relative residuals)

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.operator.image_shape)

    @property
    def sigma_y(self) -> float:
        return float(self.operator.sigma_y)

    def batch(self, indices) -> tuple[torch.Tensor, LinearOperator]:
        idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        return self.y[idx], self.operator.select(idx)

    def to_original(self, x: torch.Tensor) -> torch.Tensor:
        lo, hi = self.value_range
        return (x + 1) * ((hi - lo) / 2) + lo

    def consistency(self, x: torch.Tensor, indices) -> torch.Tensor:
        """‖A x − y‖ / ‖y‖ per image, in the file's units, for model-unit images ``x`` of observations ``indices``
        (σ_y √m / ‖y‖ is what exact data consistency leaves for noisy data)."""
        idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        y, op = self.batch(idx)
        lo, hi = self.value_range
        res = ((hi - lo) / 2) * (op(x.to(y.dtype)) - y).flatten(1).norm(dim=1)
        return res / self.y_norm[idx].clamp_min(1e-30)

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        h.update(json.dumps(self.spec, sort_keys=True).encode())
        h.update(np.ascontiguousarray(self.y.numpy().astype(np.float32)).tobytes())
        for name, arr in sorted(self.operator.arrays().items()):
            h.update(name.encode())
            h.update(np.ascontiguousarray(arr).tobytes())
        return h.hexdigest()[:32]

    def zero_filled(self, indices=None) -> torch.Tensor:
        """Aᵀ ỹ for the observations ``indices`` (all if None): the 'zero-filled' images, for pictures."""
        idx = torch.arange(len(self)) if indices is None else torch.as_tensor(indices, dtype=torch.long)
        y, op = self.batch(idx)
        return op.adjoint(y)


def _fail(path, what: str) -> AmbientInputError:
    return AmbientInputError(f"--data {path}: {what}")


def load_measurements(path: str | os.PathLike, *, max_size: int | None = None) -> Measurements:
    """Read a measurements ``.npz`` (see the module doc); every problem is one line naming the file and array."""
    path = Path(str(path))
    try:
        z = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise _fail(path, f"cannot read as .npz ({exc})") from None
    with z:
        files = set(z.files)
        for key in ("y", "operator", "value_range"):
            if key not in files:
                hint = {"value_range": "declare the range [lo, hi] of the images' values, e.g. value_range=[0, 1]",
                        "operator": "save the operator's spec (ambient.operators.measurements.save_measurements)",
                        "y": "the measurements"}[key]
                raise _fail(path, f"no '{key}' array ({hint})")
        try:
            spec = json.loads(str(z["operator"][()]))
        except (ValueError, TypeError) as exc:
            raise _fail(path, f"'operator' is not a JSON spec ({exc})") from None
        if not isinstance(spec, dict):
            raise _fail(path, "'operator' must be a JSON object with a 'kind'")
        arrays = {k[3:]: z[k] for k in files if k.startswith("op_")}
        y = z["y"]
        vr = np.asarray(z["value_range"], dtype=np.float64).reshape(-1)
    if vr.shape != (2,) or not np.isfinite(vr).all() or not vr[0] < vr[1]:
        raise _fail(path, f"'value_range' must be two finite numbers lo < hi, got {vr.tolist()}")
    if y.dtype.type in COMPLEX_DTYPES:
        y = np.stack([y.real, y.imag], axis=-1)
    elif y.dtype.type not in REAL_DTYPES:
        raise _fail(path, f"'y' must be float or complex, got {y.dtype} (convert with y.astype(np.float32))")
    if y.ndim < 2 or y.shape[0] < 1:
        raise _fail(path, f"'y' must be (N, ...) with N >= 1, got shape {y.shape}")
    bad = ~np.isfinite(y.reshape(y.shape[0], -1)).all(1)
    if bad.any():
        raise _fail(path, f"'y' has NaN or infinite values in {int(bad.sum())} observation(s), the first at "
                          f"index {int(np.argmax(bad))}; drop or repair them")
    try:
        operator = operator_from_spec(spec, arrays)
    except ValueError as exc:
        raise _fail(path, f"'operator': {exc}") from None
    n = y.shape[0]
    if operator.num_operators not in (1, n):
        raise _fail(path, f"the operator's arrays hold {operator.num_operators} observations, 'y' holds {n}")
    if tuple(y.shape[1:]) != tuple(operator.measurement_shape):
        raise _fail(path, f"'y' has measurements of shape {tuple(y.shape[1:])}, the operator "
                          f"({spec.get('kind')}) makes {tuple(operator.measurement_shape)}")
    if max_size is not None and max_size < n:
        y = y[:max_size]
        operator = operator.select(torch.arange(max_size))
        n = max_size
    y_t = torch.from_numpy(np.ascontiguousarray(y)).to(torch.float64)
    lo, hi = float(vr[0]), float(vr[1])
    a, b = (hi - lo) / 2, (hi + lo) / 2
    model_spec = {**operator.spec(), "sigma_y": float(operator.sigma_y) / a}
    model_op = operator_from_spec(model_spec, operator.arrays())
    y_norm = y_t.flatten(1).norm(dim=1)
    if b != 0:  # b·A 1, a batch of observations at a time
        ones = torch.ones(1, *model_op.image_shape, dtype=torch.float64)
        for s in range(0, n, 256):
            idx = torch.arange(s, min(s + 256, n))
            y_t[idx] -= b * model_op.select(idx)(ones.expand(len(idx), -1, -1, -1))
    y_t = y_t / a
    return Measurements(y_t, model_op, (lo, hi), str(path), spec, y_norm)


def save_measurements(path: str | os.PathLike, y: torch.Tensor, operator: LinearOperator,
                      value_range: tuple[float, float], *, complex_y: bool | None = None) -> Path:
    """Write measurements ``y`` (N, *measurement shape, in the images' units) and ``operator`` (σ_y in those units)
    as the ``.npz`` :func:`load_measurements` reads, atomically. ``complex_y`` (default: when the measurements end
    in a dimension of 2 and the operator says they are complex) stores y as complex64."""
    y = y.detach().cpu()
    if complex_y is None:
        complex_y = bool(getattr(operator, "complex_measurements", False))
    arr = torch.view_as_complex(y.to(torch.float32).contiguous()).numpy() if complex_y else y.to(torch.float32).numpy()
    arrays = {f"op_{k}": v for k, v in operator.arrays().items()}
    return atomic_save_npz(Path(path), y=arr, operator=np.array(json.dumps(operator.spec())),
                           value_range=np.asarray(value_range, dtype=np.float64), **arrays)
