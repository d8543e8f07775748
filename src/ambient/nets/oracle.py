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

from ambient.nets.denoiser import MaskDenoiser


class GaussianDenoiser(MaskDenoiser):
    """Exact E[x0 | M ⊙ (x0 + σn), M] for x0 ~ N(mean, cov); images of ``shape`` (C, H, W).

    Called like :class:`ambient.nets.denoiser.Denoiser`: ``D(x, sigma, mask=None)`` with x of
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


def _minus_denoised(cov: torch.Tensor, m: torch.Tensor, sigma: float, state: torch.Tensor) -> torch.Tensor:
    """(I − W_σ) S for centred states S (B, d, k): W_σ S = Σ M (MΣM + σ²I)⁺ M S, per mask m (B, d)."""
    k = m[:, :, None] * cov * m[:, None, :] + torch.diag_embed(sigma**2 * m + (1.0 - m))
    a = torch.linalg.solve(k, m[:, :, None] * state)
    return state - cov @ (m[:, :, None] * a)


def fixed_mask_sampler_moments(mean: torch.Tensor, cov: torch.Tensor, masks: torch.Tensor, sigmas: torch.Tensor,
                               heun: bool = True, chunk: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact mean (d,) and covariance (d, d) of the paper's fixed-mask sampler run with the exact
    denoiser E[x0 | M ⊙ x_σ, M] of x0 ~ N(mean, cov), for a sample's mask M drawn uniformly from
    ``masks`` (K, d): the best any ambient model can reach with that sampler.

    With a fixed mask the denoiser is affine in x, so EDM's Euler/Heun ODE (``sigmas`` decreasing, ending in
    0; no churn) maps the starting noise x_T = σ_0 ξ affinely: x = mean + A ξ + u. We push the
    centred state [A | u] (d × (d + 1), starting at [σ_0 I | −mean]) through the exact steps of
    :func:`ambient.sampling.solvers.sample_heun`; a mask then gives N(mean + u, A Aᵀ), and the sampler's
    law is the mixture over the masks. Cost O(K · steps · d³), float64.
    """
    mean, cov = mean.double(), cov.double()
    masks = masks.reshape(masks.shape[0], -1).double()
    d = mean.numel()
    if cov.shape != (d, d) or masks.shape[1] != d:
        raise ValueError(f"need mean (d,), cov (d, d) and masks (K, d) with one d, got {tuple(mean.shape)}, "
                         f"{tuple(cov.shape)}, {tuple(masks.shape)}")
    values = [float(s) for s in torch.as_tensor(sigmas, dtype=torch.float64)]
    second = torch.zeros(d, d, dtype=torch.float64)
    first = torch.zeros(d, dtype=torch.float64)
    for start in range(0, masks.shape[0], chunk):
        m = masks[start:start + chunk]
        b = m.shape[0]
        state = torch.cat([values[0] * torch.eye(d, dtype=torch.float64).expand(b, d, d),
                           (-mean).expand(b, d)[:, :, None]], dim=2)
        for sigma, sigma_next in zip(values[:-1], values[1:]):
            slope = _minus_denoised(cov, m, sigma, state) / sigma
            nxt = state + (sigma_next - sigma) * slope
            if heun and sigma_next > 0:
                slope_next = _minus_denoised(cov, m, sigma_next, nxt) / sigma_next
                nxt = state + (sigma_next - sigma) * 0.5 * (slope + slope_next)
            state = nxt
        a, means = state[:, :, :d], mean + state[:, :, d]
        second += (a @ a.transpose(1, 2)).sum(0) + (means[:, :, None] * means[:, None, :]).sum(0)
        first += means.sum(0)
    k = masks.shape[0]
    mix_mean = first / k
    return mix_mean, second / k - torch.outer(mix_mean, mix_mean)


def relative_covariance_error(estimate: torch.Tensor, cov: torch.Tensor) -> float:
    """‖estimate − cov‖_F / ‖cov‖_F."""
    cov = cov.double()
    return float(torch.linalg.matrix_norm(estimate.double() - cov) / torch.linalg.matrix_norm(cov))


def sample_covariance(samples: torch.Tensor) -> torch.Tensor:
    """The unbiased sample covariance (d, d) of samples (N, ...) flattened to (N, d), float64."""
    x = samples.reshape(samples.shape[0], -1).double()
    x = x - x.mean(0)
    return x.T @ x / (x.shape[0] - 1)


def sampling_noise_floor(cov: torch.Tensor, n: int) -> float:
    """The relative covariance error that N exact samples of N(·, cov) make on average, from their
    own estimation noise alone: √E‖Ŝ − Σ‖²_F / ‖Σ‖_F with E‖Ŝ − Σ‖²_F = (tr Σ² + (tr Σ)²)/(N − 1)
    for the unbiased sample covariance Ŝ of Gaussian samples (Wishart moments)."""
    cov = cov.double()
    tr, tr2 = float(torch.trace(cov)), float((cov * cov).sum())
    return ((tr2 + tr * tr) / (n - 1)) ** 0.5 / tr2**0.5
