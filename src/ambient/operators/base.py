"""Linear measurement operators y = A x + σ_y n for posterior sampling.

An operator acts on a batch: ``forward`` maps images (N, C, H, W) to observations (N, ...),
``adjoint`` maps observations back to images (Aᵀ), and ``pinv`` applies a pseudo-inverse A⁺
(only the gradient-free projection method needs it). Posterior denoisers
(:mod:`ambient.sampling.posterior`) use nothing else, so a blur or a subsampled Fourier operator is added
by writing one more subclass; the samplers do not change.

:class:`MaskOperator` is inpainting: A keeps the observed pixels. Its observations live in image
space with zeros at hidden pixels (A = Aᵀ = A⁺ = diag(mask)), which keeps the conjugate-gradient
solve of MMPS on the observed block even when σ_y = 0.
"""

from __future__ import annotations

import torch


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


