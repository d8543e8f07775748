"""The pixel-mask operator (inpainting): A = Aᵀ = A⁺ = diag(mask)."""

from __future__ import annotations

import torch

from ambient.data.corruption import check_mask
from ambient.operators.base import LinearOperator


class MaskOperator(LinearOperator):
    """Inpainting: A x = mask ⊙ x with a {0,1} mask of the images' shape (1 = observed)."""

    def __init__(self, mask: torch.Tensor):
        if mask.ndim != 4:
            raise ValueError(f"mask must be (N, C, H, W), got shape {tuple(mask.shape)}")
        self.mask = check_mask(mask, name="mask")

    def _m(self, t: torch.Tensor) -> torch.Tensor:
        if t.shape[1:] != self.mask.shape[1:] or t.shape[0] not in (1, self.mask.shape[0]):
            raise ValueError(f"operand has shape {tuple(t.shape)}, the mask {tuple(self.mask.shape)}")
        return self.mask.to(t.device, t.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._m(x) * x

    def adjoint(self, v: torch.Tensor) -> torch.Tensor:
        return self._m(v) * v

    def pinv(self, v: torch.Tensor) -> torch.Tensor:
        return self._m(v) * v

    def num_observations(self) -> torch.Tensor:
        return self.mask.flatten(1).sum(1)
