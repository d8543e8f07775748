"""Linear measurement operators y = A x + σ_y n for posterior sampling: the contract every operator follows.

Shapes. Images are real tensors (N, C, H, W); an operator's ``image_shape`` is (C, H, W). Measurements are
real tensors (N, *measurement_shape). Complex measurements (k-space) are stored as real tensors with a
trailing dimension of 2 (real, imaginary: the :func:`torch.view_as_real` layout), so that the conjugate
gradients of MMPS and every inner product stay real. Measurements are laid out on a fixed grid: entries the
operator does not measure (hidden pixels, unsampled k-space locations) hold 0 and A's rows there are zero.

Adjoint. ``adjoint`` is Aᵀ with respect to the real inner product ⟨u, v⟩ = Σ u ⊙ v of the real layouts, so
⟨A x, y⟩ = ⟨x, Aᵀ y⟩ exactly (up to rounding). For a real image and a complex operator F this is
Aᵀ y = Re(F^H y), F^H the conjugate transpose.

Observations. An operator holds the parameters (mask, kernel, sampling pattern, coil maps) of
``num_operators`` observations, leading dimension K: K = 1 is one set shared by every image of a batch
(broadcast); K = N gives image i its own. An operand's batch must be K, or either of the two must be 1.
``select(index)`` keeps the observations ``index`` (a shared operator returns itself), so a data set's
operator is sliced along with its measurements.

Noise. ``sigma_y`` is the standard deviation of the additive Gaussian noise of every measured real value (in
the units of the measurements; for complex values, of the real and of the imaginary part each).
:meth:`LinearOperator.add_noise` simulates it; posterior samplers take σ_y from their caller.

Saving. ``spec()`` is a JSON-able dict (``kind``, ``image_shape``, ``sigma_y`` and the kind's scalar
parameters) and ``arrays()`` the per-observation parameter arrays (numpy, for an npz file);
:func:`ambient.operators.specs.operator_from_spec` rebuilds the operator from the two, exactly.

Posterior denoisers (:mod:`ambient.sampling.posterior`) use ``forward``, ``adjoint``, ``pinv`` (only the
gradient-free projection method) and ``num_observations`` (DPS's count of observed values); nothing else.
``pinv`` is exact where implemented: the pixel mask (A⁺ = A) and single-coil k-space (diagonal in k-space once
the Hermitian symmetry of a real image's spectrum is used); blur and multi-coil k-space raise
NotImplementedError (no cheap exact pseudo-inverse; MMPS and DPS do not need one).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch


def check_sigma_y(sigma_y: Any, name: str = "sigma_y") -> float:
    """σ_y as a float, finite and >= 0 (ValueError otherwise)."""
    if isinstance(sigma_y, bool) or not isinstance(sigma_y, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a number >= 0, got {sigma_y!r}")
    value = float(sigma_y)
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {sigma_y!r}")
    return value


def check_image_shape(shape: Any, name: str = "image_shape") -> tuple[int, int, int]:
    """(C, H, W) of positive integers (ValueError otherwise)."""
    if not isinstance(shape, (tuple, list, torch.Size)) or len(shape) != 3 or not all(
            isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s >= 1 for s in shape):
        raise ValueError(f"{name} must be (C, H, W) of positive integers, got {shape!r}")
    return tuple(int(s) for s in shape)  # type: ignore[return-value]


class LinearOperator:
    """y = A x, batched (see the module doc for the contract).

    Subclasses implement :meth:`forward`, :meth:`adjoint`, :meth:`num_observations`, ``image_shape``,
    ``measurement_shape``, :meth:`pinv` where a cheap exact one exists, and the hooks :meth:`_tensors`
    (per-observation parameter tensors, leading dimension 1 or K), ``spec_fields`` / :meth:`_scalars`,
    :meth:`arrays`, :meth:`_array_names` and :meth:`_from_parts`. ``num_operators``, ``select``, ``to``,
    ``spec`` and ``add_noise`` come from here.
    """

    kind: ClassVar[str] = ""
    spec_fields: ClassVar[tuple[str, ...]] = ()  # the kind's scalar spec fields beyond kind, image_shape, sigma_y
    sigma_y: float = 0.0
    image_shape: tuple[int, int, int]

    # -- the maths -------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """A x: images (N, C, H, W) → measurements (N, *measurement_shape)."""
        raise NotImplementedError

    def adjoint(self, v: torch.Tensor) -> torch.Tensor:
        """Aᵀ v (real inner product): measurements (N, *measurement_shape) → images (N, C, H, W)."""
        raise NotImplementedError

    def pinv(self, v: torch.Tensor) -> torch.Tensor:
        """A⁺ v, the Moore–Penrose pseudo-inverse (least squares, least norm) of the real-image operator."""
        raise NotImplementedError(f"{type(self).__name__} has no pseudo-inverse (the projection method needs one)")

    def num_observations(self) -> torch.Tensor:
        """Measured real values per observation, (num_operators,) (a complex value counts 2): DPS divides its
        residual's squared norm, summed over all real entries, by it."""
        raise NotImplementedError

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x)

    @property
    def measurement_shape(self) -> tuple[int, ...]:
        """The shape of one observation's measurements (real layout)."""
        raise NotImplementedError

    # -- observations ----------------------------------------------------------------------------------------
    def _tensors(self) -> dict[str, torch.Tensor]:
        """Per-observation parameter tensors by attribute name, each with leading dimension 1 or K."""
        return {}

    @property
    def num_operators(self) -> int:
        """How many observations' parameters the operator holds (1: one set shared by every image)."""
        return max((int(t.shape[0]) for t in self._tensors().values()), default=1)

    def _replace(self, **tensors: torch.Tensor) -> LinearOperator:
        """A shallow copy with these parameter tensors (unchecked: they come from this operator's own)."""
        out = copy.copy(self)
        for name, t in tensors.items():
            setattr(out, name, t)
        return out

    def select(self, index: torch.Tensor | slice | Sequence[int]) -> LinearOperator:
        """The operator of observations ``index`` (1-D integer tensor or sequence, or a slice); shared
        parameters (leading dimension 1) are kept as they are, and a shared operator returns itself."""
        k = self.num_operators
        if k == 1:
            return self
        if not isinstance(index, slice):
            index = torch.as_tensor(index)
            if index.ndim != 1 or index.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8,
                                                       torch.uint8):
                raise ValueError(f"index must be a 1-D integer tensor or a slice, got {tuple(index.shape)} "
                                 f"{index.dtype}")
            if index.numel() and (int(index.min()) < -k or int(index.max()) >= k):
                raise ValueError(f"index out of range for {k} observations")
            index = index.long()
        picked = {}
        for name, t in self._tensors().items():
            picked[name] = t if t.shape[0] == 1 else t[index if isinstance(index, slice) else index.to(t.device)]
        return self._replace(**picked)

    def to(self, device: torch.device | str) -> LinearOperator:
        """The same operator with its parameters on ``device`` (their dtypes kept)."""
        return self._replace(**{name: t.to(device) for name, t in self._tensors().items()})

    def _check_batch(self, t: torch.Tensor, shape: tuple[int, ...], what: str) -> int:
        """The output batch size for an operand ``t`` that must be (N, *shape) with N compatible with K."""
        k = self.num_operators
        if t.ndim != len(shape) + 1 or tuple(t.shape[1:]) != tuple(shape) or not (
                t.shape[0] == k or t.shape[0] == 1 or k == 1):
            raise ValueError(f"{type(self).__name__}: {what} must be (N, {', '.join(map(str, shape))}) with N = "
                             f"{k} or 1{' or any' if k == 1 else ''}, got {tuple(t.shape)}")
        if t.is_complex():
            raise ValueError(f"{type(self).__name__}: {what} must be real (complex values in the real layout)")
        return max(int(t.shape[0]), k)

    # -- noise -----------------------------------------------------------------------------------------------
    def support(self) -> torch.Tensor:
        """1 where the measurements hold a measured value, 0 where the layout holds a structural zero;
        shape (num_operators, *measurement_shape) or broadcastable to it (all ones by default)."""
        return torch.ones((1,) * (1 + len(self.measurement_shape)))

    def add_noise(self, y: torch.Tensor,
                  generator: torch.Generator | Sequence[torch.Generator] | None = None) -> torch.Tensor:
        """y + σ_y n ⊙ s: n standard normal of y's shape, s = :meth:`support` (noise only on measured entries,
        so unmeasured entries stay 0, as A x has them). ``generator``: one for the batch, or one per
        observation (then observation i's noise depends only on its own generator, whatever the batch).
        Drawn on the generator's device in y's dtype; with σ_y = 0 nothing is drawn and y is returned copied."""
        if self.sigma_y == 0:
            return y.clone()
        if generator is None or isinstance(generator, torch.Generator):
            dev = generator.device if generator is not None else y.device
            n = torch.randn(y.shape, generator=generator, dtype=y.dtype, device=dev)
        else:
            gens = list(generator)
            if len(gens) != y.shape[0]:
                raise ValueError(f"generator: need one per observation ({y.shape[0]}), got {len(gens)}")
            n = torch.stack([torch.randn(y.shape[1:], generator=g, dtype=y.dtype, device=g.device)
                             for g in gens]) if gens else torch.empty_like(y)
        s = self.support().to(y.device, y.dtype)
        return y + self.sigma_y * (n.to(y.device) * s)

    # -- saving ----------------------------------------------------------------------------------------------
    def _scalars(self) -> dict[str, Any]:
        """The kind's scalar parameters beyond kind, image_shape and sigma_y (JSON-able)."""
        return {}

    def spec(self) -> dict[str, Any]:
        """JSON-able description: ``kind``, ``image_shape`` (list), ``sigma_y`` and the kind's scalars."""
        return {"kind": self.kind, "image_shape": [int(s) for s in self.image_shape], "sigma_y": float(self.sigma_y),
                **self._scalars()}

    def arrays(self) -> dict[str, np.ndarray]:
        """The per-observation parameter arrays (numpy, leading dimension K), by name."""
        raise NotImplementedError

    @classmethod
    def _array_names(cls, spec: dict[str, Any]) -> set[str]:
        """The names :meth:`arrays` gives for this spec (ValueError for a bad scalar it depends on)."""
        raise NotImplementedError

    @classmethod
    def _from_parts(cls, spec: dict[str, Any], arrays: dict[str, np.ndarray]) -> LinearOperator:
        """Build from a checked spec (image_shape a tuple, sigma_y a float) and arrays with the right names."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec()}, num_operators={self.num_operators})"
