"""Closed-form denoisers for Gaussian data: the cheapest way to check the maths.

For x0 ~ N(μ, Σ) on d = C·H·W pixels, a denoiser that sees z = M ⊙ (x0 + σn) and the mask M
(1 = visible) has the optimum

    E[x0 | z, M] = μ + Σ M (M Σ M + σ² I)⁺ M (z − μ),

the pseudo-inverse taken on the visible block. We compute it batched, by solving
K a = M ⊙ (z − μ) with K = M Σ M + diag(σ² M + (1 − M)), which is the identity on
hidden coordinates, so a = 0 there. With M = 1 it is the usual Gaussian posterior mean.
"""

from __future__ import annotations

import torch

from ambient.denoiser import MaskDenoiser


class GaussianDenoiser(MaskDenoiser):
    """Exact E[x0 | M ⊙ (x0 + σn), M] for x0 ~ N(mean, cov); images of ``shape`` (C, H, W).

    Called like :class:`ambient.denoiser.Denoiser`: ``D(x, sigma, mask=None)`` with x of
    shape (N, C, H, W), sigma a scalar or (N,), mask (N, C, H, W) or None (all visible);
    with ``mask=None`` it is the exact full-image denoiser ``D(x, sigma)``.
    """

    sigma_dtype = torch.float64

    def __init__(self, mean: torch.Tensor, cov: torch.Tensor, shape: tuple[int, int, int]):
        super().__init__()
        d = int(torch.tensor(shape).prod())
        if mean.shape != (d,) or cov.shape != (d, d):
            raise ValueError(f"mean must be ({d},) and cov ({d}, {d}) for shape {shape}")
        self.shape = tuple(shape)
        self.img_channels = int(shape[0])
        self.register_buffer("mean", mean.double())
        self.register_buffer("cov", cov.double())

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        n = x.shape[0]
        d = self.mean.numel()
        z = x.reshape(n, d).double()
        sigma = sigma.to(torch.float64)
        m = torch.ones_like(z) if mask is None else mask.reshape(n, d).double()
        k = m[:, :, None] * self.cov * m[:, None, :]
        k = k + torch.diag_embed(sigma[:, None] ** 2 * m + (1.0 - m))
        rhs = (m * (z - self.mean))[:, :, None]
        a = torch.linalg.solve(k, rhs)[:, :, 0]
        out = self.mean + (self.cov @ (m * a).T).T
        return out.reshape(x.shape).to(x.dtype)


def smooth_covariance(height: int, width: int, length_scale: float = 2.0, jitter: float = 1e-3,
                      scale: float = 0.25) -> torch.Tensor:
    """A squared-exponential covariance over pixel positions: a smooth, non-diagonal Σ."""
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    pos = torch.stack([ys.flatten(), xs.flatten()], dim=1).double()
    d2 = ((pos[:, None] - pos[None]) ** 2).sum(-1)
    cov = scale * torch.exp(-0.5 * d2 / length_scale**2)
    return cov + jitter * torch.eye(height * width, dtype=torch.float64)
