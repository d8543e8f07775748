"""The ambient loss: learn E[x0 | Ã ⊙ x_σ, Ã] from observations y = A ⊙ x0 only.

For each image: σ ~ exp(N(P_mean, P_std²)), n ~ N(0, I),

    loss = w(σ) · ‖A ⊙ (D(Ã ⊙ (y + σ n); σ, Ã) − y)‖²,   w(σ) = (σ² + σ_d²) / (σ σ_d)².

Only pixels observed under A are graded, and y is only known there, so no clean pixel enters
the loss. Normalisation: ``mean`` divides by the number of pixels observed under A (the
gradient scale does not shrink as p grows); ``sum`` is the paper's plain sum. With A = Ã = 1
(p = δ = 0) and ``sum`` this is exactly the EDM loss (Karras et al. 2022, eq. 2 with λ(σ)
of Table 1); with ``mean`` it is that divided by the pixel count.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ambient.corruption import check_mask

NORMALIZATIONS = ("mean", "sum")


def check_loss_inputs(y: torch.Tensor, mask: torch.Tensor, mask_hat: torch.Tensor) -> None:
    """ValueError unless y is (N, C, H, W) and mask ⊇ mask_hat are {0, 1} masks of its shape."""
    if y.ndim != 4:
        raise ValueError(f"y must be (N, C, H, W), got {tuple(y.shape)}")
    check_mask(mask, y, "mask")
    check_mask(mask_hat, y, "mask_hat")
    if bool((mask_hat > mask).any()):
        raise ValueError("mask_hat must be a subset of mask (Ã ⊆ A)")


class AmbientLoss:
    """Callable ``loss(denoiser, y, mask, mask_hat, generator=None) -> (N,)`` per-image losses.

    ``denoiser`` is called as ``denoiser(x, sigma, mask_hat)`` with x = Ã ⊙ (y + σn).
    ``sigma`` and ``noise`` may be passed to fix the randomness (tests, Monte Carlo).
    """

    def __init__(self, P_mean: float = -1.2, P_std: float = 1.2, sigma_data: float = 0.5,
                 normalize: str = "mean"):
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
        if P_std <= 0 or sigma_data <= 0:
            raise ValueError("P_std and sigma_data must be positive")
        self.P_mean, self.P_std = float(P_mean), float(P_std)
        self.sigma_data = float(sigma_data)
        self.normalize = normalize

    def sample_sigma(self, n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """σ ~ exp(N(P_mean, P_std²)), shape (n,)."""
        z = torch.randn(n, generator=generator, device=device)
        return (z * self.P_std + self.P_mean).exp()

    def weight(self, sigma: torch.Tensor) -> torch.Tensor:
        sd = self.sigma_data
        return (sigma**2 + sd**2) / (sigma * sd) ** 2

    def __call__(self, denoiser: Callable, y: torch.Tensor, mask: torch.Tensor, mask_hat: torch.Tensor,
                 generator: torch.Generator | None = None, *, sigma: torch.Tensor | None = None,
                 noise: torch.Tensor | None = None) -> torch.Tensor:
        check_loss_inputs(y, mask, mask_hat)
        n = y.shape[0]
        if sigma is None:
            sigma = self.sample_sigma(n, generator, y.device)
        sigma = torch.as_tensor(sigma, dtype=y.dtype, device=y.device).reshape(-1).expand(n)
        if noise is None:
            noise = torch.randn(y.shape, generator=generator, device=y.device, dtype=y.dtype)
        y = y * mask  # values at unobserved pixels are never used
        x_noisy = mask_hat * (y + sigma.reshape(n, 1, 1, 1) * noise)
        denoised = denoiser(x_noisy, sigma, mask_hat)
        err = (mask * (denoised.to(y.dtype) - y)) ** 2
        per_image = err.flatten(1).sum(dim=1)
        if self.normalize == "mean":
            per_image = per_image / mask.flatten(1).sum(dim=1).clamp_min(1.0)
        return self.weight(sigma) * per_image
