"""The pixel-mask operator (inpainting): A = Aᵀ = A⁺ = diag(mask)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ambient.data.corruption import check_mask
from ambient.operators.base import LinearOperator, check_sigma_y


class MaskOperator(LinearOperator):
    """Inpainting: A x = mask ⊙ x with a {0,1} mask (K, C, H, W) (1 = observed; K = 1 shared or one per image).

    Measurements live in image space, ``measurement_shape = image_shape``, with zeros at hidden pixels, which
    keeps the conjugate-gradient solve of MMPS on the observed block even when σ_y = 0. A is an orthogonal
    projection, so Aᵀ = A⁺ = A. ``num_observations`` counts the observed pixels of each mask.
    Saved as kind ``"mask"`` with the array ``mask`` (uint8).
    """

    kind = "mask"

    def __init__(self, mask: torch.Tensor, sigma_y: float = 0.0):
        if not isinstance(mask, torch.Tensor) or mask.ndim != 4:
            raise ValueError(f"mask must be (N, C, H, W), got shape {tuple(getattr(mask, 'shape', ()))}")
        self.mask = check_mask(mask, name="mask")
        self.sigma_y = check_sigma_y(sigma_y)
        self.image_shape = tuple(int(s) for s in mask.shape[1:])

    @property
    def measurement_shape(self) -> tuple[int, ...]:
        return self.image_shape

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {"mask": self.mask}

    def _m(self, t: torch.Tensor) -> torch.Tensor:
        self._check_batch(t, self.image_shape, "operand")
        return self.mask.to(t.device, t.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._m(x) * x

    def adjoint(self, v: torch.Tensor) -> torch.Tensor:
        return self._m(v) * v

    def pinv(self, v: torch.Tensor) -> torch.Tensor:
        return self._m(v) * v

    def num_observations(self) -> torch.Tensor:
        return self.mask.flatten(1).sum(1)

    def support(self) -> torch.Tensor:
        return self.mask

    def arrays(self) -> dict[str, np.ndarray]:
        return {"mask": self.mask.detach().cpu().to(torch.uint8).numpy()}

    @classmethod
    def _array_names(cls, spec: dict[str, Any]) -> set[str]:
        return {"mask"}

    @classmethod
    def _from_parts(cls, spec: dict[str, Any], arrays: dict[str, np.ndarray]) -> MaskOperator:
        mask = arrays["mask"]
        if mask.dtype.kind not in "biuf":
            raise ValueError(f"mask must hold numbers 0 and 1, got dtype {mask.dtype}")
        if mask.ndim != 4 or tuple(mask.shape[1:]) != spec["image_shape"]:
            raise ValueError(f"mask must be (K, {', '.join(map(str, spec['image_shape']))}), got {mask.shape}")
        return cls(torch.from_numpy(np.ascontiguousarray(mask)).to(torch.float32), sigma_y=spec["sigma_y"])
