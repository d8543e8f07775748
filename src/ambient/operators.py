"""Linear measurement operators y = A x + σ_y n for posterior sampling.

An operator acts on a batch: ``forward`` maps images (N, C, H, W) to observations (N, ...),
``adjoint`` maps observations back to images (Aᵀ), and ``pinv`` applies a pseudo-inverse A⁺
(only the gradient-free projection method needs it). Posterior denoisers
(:mod:`ambient.posterior`) use nothing else, so a blur or a subsampled Fourier operator is added
by writing one more subclass; the samplers do not change.

:class:`MaskOperator` is inpainting: A keeps the observed pixels. Its observations live in image
space with zeros at hidden pixels (A = Aᵀ = A⁺ = diag(mask)), which keeps the conjugate-gradient
solve of MMPS on the observed block even when σ_y = 0.
"""

from __future__ import annotations

import torch

from ambient.corruption import check_mask


class LinearOperator:
    """y = A x, batched. Subclasses implement :meth:`forward` and :meth:`adjoint` (and :meth:`pinv`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def adjoint(self, v: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def pinv(self, v: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no pseudo-inverse (the projection method needs one)")

    def num_observations(self) -> torch.Tensor:
        """Number of observed values per sample, (N,) (DPS normalises its step by the residual's RMS)."""
        raise NotImplementedError

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x)


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
