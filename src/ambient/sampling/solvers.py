"""ODE solvers for diffusion sampling: EDM's σ schedule and Euler / Heun steps.

The solvers follow EDM (Karras et al. 2022, Algorithm 2) as plain functions in the
k-diffusion style: ``sample_heun(denoise, x, sigmas)`` with ``denoise(x, sigma) -> x0`` a
full-image denoiser (:class:`ambient.nets.denoiser.FullImageDenoiser` or any such callable). They
check their arguments once and nothing inside the loop. The ODE state is kept in float64;
denoiser outputs are cast to float64.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

Denoise = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
SOLVERS = ("heun", "euler")  # the names ``--solver`` takes; :func:`solver_by_name` maps them to functions


def _randn(shape: Sequence[int]) -> torch.Tensor:
    return torch.randn(tuple(shape), dtype=torch.float64)


def _solve(denoise: Denoise, x: torch.Tensor, sigmas: torch.Tensor, heun: bool, churn: float,
           s_tmin: float, s_tmax: float, s_noise: float, noise_fn, callback) -> torch.Tensor:
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
    if sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ValueError(f"sigmas must be a 1-D tensor with at least 2 entries, got shape {tuple(sigmas.shape)}")
    if churn < 0:
        raise ValueError(f"churn must be >= 0, got {churn!r}")
    sigmas = sigmas.to(x.device)
    out_dtype = x.dtype
    x = x.to(torch.float64)
    num_steps = sigmas.numel() - 1
    values = sigmas.tolist()
    for i in range(num_steps):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        gamma = min(churn / num_steps, math.sqrt(2) - 1) if s_tmin <= values[i] <= s_tmax else 0.0
        sigma_hat = sigma * (1 + gamma)
        if gamma > 0:
            eps = (noise_fn or _randn)(x.shape).to(x.device, torch.float64)
            x = x + (sigma_hat**2 - sigma**2).sqrt() * s_noise * eps
        denoised = denoise(x, sigma_hat).to(torch.float64)
        d = (x - denoised) / sigma_hat
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma_hat, "denoised": denoised})
        x_next = x + (sigma_next - sigma_hat) * d
        if heun and values[i + 1] > 0:  # 2nd-order correction, except for the last step to σ = 0
            d_next = (x_next - denoise(x_next, sigma_next).to(torch.float64)) / sigma_next
            x_next = x + (sigma_next - sigma_hat) * 0.5 * (d + d_next)
        x = x_next
    return x.to(out_dtype)


def sample_euler(denoise: Denoise, x: torch.Tensor, sigmas: torch.Tensor, *, churn: float = 0.0,
                 s_tmin: float = 0.0, s_tmax: float = math.inf, s_noise: float = 1.0,
                 noise_fn: Callable[[torch.Size], torch.Tensor] | None = None,
                 callback: Callable[[dict], None] | None = None) -> torch.Tensor:
    """Euler steps of the probability-flow ODE dx/dσ = (x − D(x, σ))/σ, with optional churn.

    Args:
        denoise: ``denoise(x, sigma) -> x0`` with sigma a 0-d float64 tensor.
        x: the starting point, already scaled to ``sigmas[0]`` (e.g. ``sigmas[0] * randn``).
        sigmas: decreasing noise levels, typically from :func:`edm_sigmas` (ending in 0).
        churn, s_tmin, s_tmax, s_noise: EDM's stochasticity; at each step with
            s_tmin <= σ <= s_tmax, σ is raised to σ(1 + γ), γ = min(churn/num_steps, √2 − 1),
            by adding fresh noise ``s_noise · noise_fn(x.shape)`` (default: torch.randn).
        callback: called each step with a dict (x, i, sigma, sigma_hat, denoised).

    Returns:
        the final state, computed in float64 and returned in ``x.dtype``.
    """
    return _solve(denoise, x, sigmas, False, churn, s_tmin, s_tmax, s_noise, noise_fn, callback)


def sample_heun(denoise: Denoise, x: torch.Tensor, sigmas: torch.Tensor, *, churn: float = 0.0,
                s_tmin: float = 0.0, s_tmax: float = math.inf, s_noise: float = 1.0,
                noise_fn: Callable[[torch.Size], torch.Tensor] | None = None,
                callback: Callable[[dict], None] | None = None) -> torch.Tensor:
    """EDM Algorithm 2: Heun steps with a 2nd-order correction except for the last step to σ = 0.

    Arguments and return value as in :func:`sample_euler`; 2 denoiser calls per step but the last.
    """
    return _solve(denoise, x, sigmas, True, churn, s_tmin, s_tmax, s_noise, noise_fn, callback)


def solver_by_name(name: str) -> Callable[..., torch.Tensor]:
    """:func:`sample_heun` for ``"heun"``, :func:`sample_euler` for ``"euler"``; ValueError for other names."""
    if name == "heun":
        return sample_heun
    if name == "euler":
        return sample_euler
    raise ValueError(f"solver must be one of {', '.join(SOLVERS)}, got {name!r}")
