"""Cartesian k-space undersampling (MRI), single- and multi-coil, and the random line masks that go with it.

The Fourier transform is the centred orthonormal 2-D DFT over (H, W), the MRI convention:

    F x = fftshift(fft2(ifftshift(x), norm="ortho")),   F^H z = fftshift(ifft2(ifftshift(z), norm="ortho")),

so the zero frequency sits at index (H // 2, W // 2) and F is unitary. Complex measurements are stored in the
real layout (trailing dimension 2, :func:`torch.view_as_real`), and the adjoint is taken with respect to the real
inner product: Aᵀ y = Re(A^H y) for a real image.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from ambient.data.corruption import check_mask
from ambient.operators.base import LinearOperator, check_image_shape, check_sigma_y
from ambient.rng import mix_seed

_DIMS = (-2, -1)


def centred_fft2(x: torch.Tensor) -> torch.Tensor:
    """F x = fftshift(fft2(ifftshift(x), norm="ortho")) over the last two dimensions (complex result)."""
    return torch.fft.fftshift(torch.fft.fft2(torch.fft.ifftshift(x, dim=_DIMS), norm="ortho"), dim=_DIMS)


def centred_ifft2(z: torch.Tensor) -> torch.Tensor:
    """F^H z = F⁻¹ z = fftshift(ifft2(ifftshift(z), norm="ortho")) over the last two dimensions."""
    return torch.fft.fftshift(torch.fft.ifft2(torch.fft.ifftshift(z, dim=_DIMS), norm="ortho"), dim=_DIMS)


def _conjugate_index(n: int) -> torch.Tensor:
    """j ↦ the index of the opposite frequency −k in the centred layout: (2·(n // 2) − j) mod n.

    For a real image the centred spectrum is Hermitian, X[j, l] = conj(X[−j, −l]) with these indices."""
    return (2 * (n // 2) - torch.arange(n)) % n


def cartesian_mask(num: int, height: int, width: int, acceleration: float, center_fraction: float = 0.08,
                   seed: int = 0) -> torch.Tensor:
    """Random Cartesian line masks, (num, H, W) float32 {0, 1}: phase-encode lines are the columns (a mask is
    constant along H, the readout direction).

    Each mask samples L = round(W / acceleration) columns: the fully sampled centre, the
    C = round(W · center_fraction) columns starting at W // 2 − C // 2 (around the zero frequency of the
    centred layout), and L − C further columns drawn uniformly without replacement from the others. Mask i's
    draw uses its own ``torch.Generator`` seeded with ``mix_seed(seed, i)``, so it depends only on (seed, i):
    the first masks are the same whatever ``num``, and masks differ between observations. ``seed`` is used
    as given (pass an already mixed seed, e.g. from a data set's seed and a stream constant, to keep the draws
    apart from other uses of the same seed). ValueError when the settings are impossible (C > L, L > W,
    L < 1, sizes < 1).
    """
    for name, value in (("num", num), ("height", height), ("width", width), ("seed", seed)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"{name} must be an integer, got {value!r}")
    if num < 0 or height < 1 or width < 1:
        raise ValueError(f"num must be >= 0 and height, width >= 1, got {num}, {height}, {width}")
    if isinstance(acceleration, bool) or not isinstance(acceleration, (int, float)) or not (
            math.isfinite(acceleration) and acceleration >= 1):
        raise ValueError(f"acceleration must be a finite number >= 1, got {acceleration!r}")
    if isinstance(center_fraction, bool) or not isinstance(center_fraction, (int, float)) or not (
            0 <= center_fraction <= 1):
        raise ValueError(f"center_fraction must be in [0, 1], got {center_fraction!r}")
    lines = round(width / acceleration)
    centre = round(width * center_fraction)
    if lines < 1:
        raise ValueError(f"acceleration {acceleration} leaves no line of {width} (round(W / acceleration) = 0)")
    if centre > lines:
        raise ValueError(f"center_fraction {center_fraction} asks for {centre} centre lines, more than the "
                         f"{lines} = round({width} / {acceleration}) lines sampled")
    start = width // 2 - centre // 2
    is_centre = torch.zeros(width, dtype=torch.bool)
    is_centre[start:start + centre] = True
    others = torch.nonzero(~is_centre).flatten()
    masks = torch.zeros(num, height, width, dtype=torch.float32)
    for i in range(num):
        g = torch.Generator().manual_seed(mix_seed(int(seed), i))
        cols = others[torch.randperm(others.numel(), generator=g)[:lines - centre]]
        row = is_centre.clone()
        row[cols] = True
        masks[i] = row.to(torch.float32)
    return masks


class KSpaceOperator(LinearOperator):
    """Cartesian k-space undersampling, A x = M ⊙ F x (single coil) or A x = [M ⊙ F(S_c x)]_c (multi-coil).

    ``mask`` M (K, H, W) {0, 1}, K = 1 shared or one per observation; ``image_shape`` (C, H, W).

    * Single coil (``maps`` None): each image channel is transformed on its own; measurements (C, H, W, 2),
      y = view_as_real(M ⊙ F x); Aᵀ y = Re(F^H(M ⊙ y)).
    * Multi-coil: ``maps`` S, the complex coil sensitivities (K', coils, H, W) complex, or (K', coils, H, W, 2)
      in the real layout (K' = 1 or the masks' K or N), for a one-channel image (C = 1); measurements
      (coils, H, W, 2), y_c = M ⊙ F(S_c · x); Aᵀ y = Σ_c Re(conj(S_c) · F^H(M ⊙ y_c)).

    ``pinv``: exact for single coil, not implemented for multi-coil. A real image has a Hermitian spectrum, so
    for real x, AᵀA = F^H diag((M + M̃)/2) F with M̃[k] = M[−k]: diagonal in k-space. Hence
    A⁺ y = F^H Z with Z[k] = (M y)[k] + conj((M y)[−k])) / (M[k] + M[−k]) where a line or its mirror is
    sampled and 0 elsewhere: the least-squares spectrum (mirror pairs averaged, self-mirrored frequencies
    made real) of least norm; Z is Hermitian, so F^H Z is real (its real part is taken). The zero-filled
    adjoint Re(F^H(M y)) is not A⁺: it halves every frequency whose mirror is unsampled. With coils, AᵀA
    mixes frequencies through the maps and has no cheap exact inverse.

    ``num_observations`` counts measured real values: 2 · C · Σ M (single coil) or 2 · coils · Σ M; the
    unsampled locations hold structural zeros (``support``), where :meth:`add_noise` adds nothing. σ_y is
    the noise std of the real and of the imaginary part of each sample (in the units of the orthonormal
    transform). Saved as kind ``"kspace"`` with the scalar ``coils`` (0 for single coil) and the arrays
    ``mask`` (uint8) and, with coils, ``maps`` (real layout, its dtype kept).
    """

    kind = "kspace"
    spec_fields = ("coils",)
    complex_measurements = True  # the real layout's trailing 2 is (real, imaginary): files store y as complex

    def __init__(self, mask: torch.Tensor, image_shape: tuple[int, int, int], maps: torch.Tensor | None = None,
                 sigma_y: float = 0.0):
        self.image_shape = check_image_shape(image_shape)
        c, h, w = self.image_shape
        if not isinstance(mask, torch.Tensor) or mask.ndim != 3 or tuple(mask.shape[1:]) != (h, w) or \
                mask.shape[0] < 1:
            raise ValueError(f"mask must be (K, {h}, {w}) for images {self.image_shape}, got shape "
                             f"{tuple(getattr(mask, 'shape', ()))}")
        self.mask = check_mask(mask, name="mask")
        self.maps = None
        if maps is not None:
            if not isinstance(maps, torch.Tensor):
                raise ValueError(f"maps must be a torch.Tensor, got {type(maps).__name__}")
            if not maps.is_complex():
                if maps.ndim != 5 or maps.shape[-1] != 2 or not maps.is_floating_point():
                    raise ValueError(f"maps must be complex (K, coils, {h}, {w}) or real (K, coils, {h}, {w}, 2), "
                                     f"got {maps.dtype} {tuple(maps.shape)}")
                maps = torch.view_as_complex(maps.contiguous())
            if maps.ndim != 4 or tuple(maps.shape[2:]) != (h, w) or min(maps.shape[:2]) < 1:
                raise ValueError(f"maps must be (K, coils, {h}, {w}), got {tuple(maps.shape)}")
            if c != 1:
                raise ValueError(f"image_shape must have one channel with coil maps, got {self.image_shape}")
            if not bool(torch.isfinite(torch.view_as_real(maps)).all()):
                raise ValueError("maps must be finite")
            km, ks = mask.shape[0], maps.shape[0]
            if km != ks and min(km, ks) != 1:
                raise ValueError(f"mask holds {km} observations and maps {ks}: they must match or one be 1")
            self.maps = maps
        self.sigma_y = check_sigma_y(sigma_y)

    @property
    def coils(self) -> int:
        """Number of coils, 0 for the single-coil operator."""
        return 0 if self.maps is None else int(self.maps.shape[1])

    @property
    def measurement_shape(self) -> tuple[int, ...]:
        c, h, w = self.image_shape
        return (self.coils or c, h, w, 2)

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {"mask": self.mask} if self.maps is None else {"mask": self.mask, "maps": self.maps}

    def _maps(self, t: torch.Tensor) -> torch.Tensor:
        return self.maps.to(t.device, torch.complex128 if t.dtype == torch.float64 else torch.complex64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_batch(x, self.image_shape, "image")
        m = self.mask.to(x.device, x.dtype)[:, None]  # (K, 1, H, W)
        if self.maps is None:
            z = centred_fft2(x)  # (N, C, H, W): every channel on its own
        else:
            z = centred_fft2(self._maps(x) * x)  # (N, 1, H, W) × (K', coils, H, W) → (N or K', coils, H, W)
        return torch.view_as_real(m * z).contiguous()  # real factor: the product stays complex

    def _masked_inverse(self, v: torch.Tensor) -> torch.Tensor:
        """F^H(M ⊙ v) as complex, v in the real layout."""
        self._check_batch(v, self.measurement_shape, "measurement")
        m = self.mask.to(v.device, v.dtype)[:, None]
        return centred_ifft2(m * torch.view_as_complex(v.contiguous()))

    def adjoint(self, v: torch.Tensor) -> torch.Tensor:
        z = self._masked_inverse(v)
        if self.maps is None:
            return z.real.contiguous()
        return (self._maps(v).conj() * z).real.sum(1, keepdim=True)

    def pinv(self, v: torch.Tensor) -> torch.Tensor:
        if self.maps is not None:
            raise NotImplementedError("KSpaceOperator with coil maps has no pseudo-inverse (the projection method "
                                      "needs one): AᵀA is not diagonal in k-space")
        self._check_batch(v, self.measurement_shape, "measurement")
        h, w = self.image_shape[1:]
        ih, iw = _conjugate_index(h).to(v.device), _conjugate_index(w).to(v.device)
        m = self.mask.to(v.device, v.dtype)[:, None]
        my = m * torch.view_as_complex(v.contiguous())
        mirror = my[..., ih, :][..., iw].conj()
        count = m + m[..., ih, :][..., iw]
        z = (my + mirror) / torch.where(count > 0, count, torch.ones_like(count))
        return centred_ifft2(z).real.contiguous()

    def num_observations(self) -> torch.Tensor:
        per = 2 * (self.coils or self.image_shape[0])
        counts = per * self.mask.flatten(1).sum(1).to(torch.float64)
        return counts.expand(self.num_operators) if counts.shape[0] == 1 else counts

    def support(self) -> torch.Tensor:
        return self.mask[:, None, :, :, None]

    def _scalars(self) -> dict[str, Any]:
        return {"coils": self.coils}

    def arrays(self) -> dict[str, np.ndarray]:
        out = {"mask": self.mask.detach().cpu().to(torch.uint8).numpy()}
        if self.maps is not None:
            out["maps"] = torch.view_as_real(self.maps.detach().cpu()).numpy()
        return out

    @classmethod
    def _array_names(cls, spec: dict[str, Any]) -> set[str]:
        coils = spec["coils"]
        if isinstance(coils, bool) or not isinstance(coils, int) or coils < 0:
            raise ValueError(f"coils must be an integer >= 0 (0: single coil), got {coils!r}")
        return {"mask", "maps"} if coils else {"mask"}

    @classmethod
    def _from_parts(cls, spec: dict[str, Any], arrays: dict[str, np.ndarray]) -> KSpaceOperator:
        coils = spec["coils"]
        mask = arrays["mask"]
        if mask.dtype.kind not in "biuf":
            raise ValueError(f"mask must hold numbers 0 and 1, got dtype {mask.dtype}")
        maps = None
        if coils:
            maps = arrays["maps"]
            if maps.dtype.kind != "f" or maps.ndim != 5 or maps.shape[1] != coils:
                raise ValueError(f"maps must be a float array (K, {coils}, H, W, 2), got {maps.dtype} {maps.shape}")
            maps = torch.from_numpy(np.ascontiguousarray(maps))
        return cls(torch.from_numpy(np.ascontiguousarray(mask)).to(torch.float32), spec["image_shape"], maps=maps,
                   sigma_y=spec["sigma_y"])
