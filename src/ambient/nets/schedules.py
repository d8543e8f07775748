"""σ ↔ timestep for DDPM-style models, in one object (used by the finetuning loss and the finetuned denoiser).

A DDPM model has discrete timesteps t = 0..T−1 with ᾱ_t decreasing. In EDM's convention
x = x0 + σn with σ_t = √((1−ᾱ_t)/ᾱ_t) (so the UNet's input is x_t = x/√(1+σ²) and
ᾱ = 1/(1+σ²)). :meth:`DDPMSchedule.sigma_to_t` maps any σ to a timestep for the UNet's
embedding: ``"interpolate"`` gives the fractional t at which log σ_t, linear between
neighbouring integer timesteps, equals log σ; ``"nearest"`` the integer t with the closest
log σ_t. Both clamp to [0, T−1] and agree on the model's own σ_t.
"""

from __future__ import annotations

import math

import torch
from torch import nn

SPACINGS = ("linear", "karras")


def alphas_cumprod(scheduler) -> torch.Tensor:
    """ᾱ_t of a DDPM scheduler as float64 (T,), clamped to [1e-12, 1]."""
    return torch.as_tensor(scheduler.alphas_cumprod, dtype=torch.float64).clamp(1e-12, 1.0)


def sigma_from_alpha_bar(alpha_bar: torch.Tensor) -> torch.Tensor:
    """EDM noise level of a DDPM noise level: σ = √((1−ᾱ)/ᾱ) (so x_t = (x0 + σn)/√(1+σ²))."""
    return ((1.0 - alpha_bar) / alpha_bar).sqrt()


def alpha_bar_from_sigma(sigma: torch.Tensor) -> torch.Tensor:
    """ᾱ = 1/(1+σ²), the inverse of :func:`sigma_from_alpha_bar`."""
    return 1.0 / (1.0 + sigma**2)


class DDPMSchedule(nn.Module):
    """ᾱ_t, σ_t and log σ_t of a DDPM model (float64 buffers that follow the module's device).

    ``strict=True`` requires σ_t to increase strictly with t (what σ → t needs).
    """

    def __init__(self, alphas_cumprod: torch.Tensor, *, strict: bool = True):
        super().__init__()
        ab = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        if ab.ndim != 1 or ab.numel() < 1:
            raise ValueError("alphas_cumprod must be a non-empty 1-D tensor")
        sigmas = sigma_from_alpha_bar(ab.clamp(1e-12, 1.0))
        log_sigmas = sigmas.clamp_min(1e-12).log()
        if strict and ab.numel() > 1 and not bool((log_sigmas[1:] > log_sigmas[:-1]).all()):
            raise ValueError("alphas_cumprod must decrease strictly with t")
        self.register_buffer("alphas_cumprod", ab, persistent=False)
        self.register_buffer("sigmas", sigmas, persistent=False)
        self.register_buffer("log_sigmas", log_sigmas, persistent=False)

    @property
    def num_timesteps(self) -> int:
        return self.alphas_cumprod.numel()

    def alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        """ᾱ_t for integer timesteps ``t``."""
        return self.alphas_cumprod[t]

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """σ_t for integer timesteps ``t``."""
        return self.sigmas[t]

    def sigma_to_t(self, sigma, mode: str = "interpolate") -> torch.Tensor:
        """The (fractional or nearest integer) timestep of each σ, float64 (see the module doc)."""
        ls = self.log_sigmas
        s = torch.as_tensor(sigma, dtype=torch.float64, device=ls.device).reshape(-1).clamp_min(1e-12).log()
        if ls.numel() == 1:
            return torch.zeros_like(s)
        if mode == "nearest":
            return (s[:, None] - ls[None]).abs().argmin(dim=1).to(torch.float64)
        hi = torch.searchsorted(ls, s).clamp(1, ls.numel() - 1)
        lo = hi - 1
        frac = (s - ls[lo]) / (ls[hi] - ls[lo])
        return (lo.to(torch.float64) + frac).clamp(0.0, ls.numel() - 1.0)

    def sampling_sigmas(self, num_steps: int, spacing: str = "linear", rho: float = 7.0) -> torch.Tensor:
        """Decreasing σ's of the model's own timesteps, from σ_{T−1} to σ_0, then a final 0.

        ``linear``: ``num_steps`` timesteps evenly spaced in t (rounded; T−1 and 0 included).
        ``karras``: EDM's σ^(1/ρ)-uniform levels between σ_0 and σ_{T−1}, each snapped to the
        nearest timestep, duplicates dropped (so possibly fewer than ``num_steps``).
        Returns float64 (K + 1,) on the CPU, ready for :func:`ambient.sampling.solvers.sample_heun`.
        """
        total = self.num_timesteps
        if int(num_steps) != num_steps or not 1 <= num_steps <= total:
            raise ValueError(f"num_steps must be an integer in [1, {total}], got {num_steps!r}")
        if spacing not in SPACINGS:
            raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")
        if spacing == "linear":
            ts = torch.linspace(total - 1, 0, int(num_steps), dtype=torch.float64).round().long()
        else:
            sig = self.sigmas
            levels = edm_sigmas(int(num_steps), float(sig[0]), float(sig[-1]), rho)[:-1].to(sig.device)
            ts = (levels.log()[:, None] - self.log_sigmas[None]).abs().argmin(dim=1)
        ts = torch.unique_consecutive(ts)
        sigmas = self.sigmas[ts].cpu()
        return torch.cat([sigmas, sigmas.new_zeros(1)])


def edm_sigmas(num_steps: int = 18, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
               device: torch.device | str | None = None) -> torch.Tensor:
    """EDM's (Karras) noise levels, σ_max → σ_min spaced uniformly in σ^(1/ρ), then a final 0.

    Returns a float64 tensor of shape (num_steps + 1,).
    """
    if int(num_steps) != num_steps or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")
    if not (0 < sigma_min <= sigma_max < math.inf):
        raise ValueError(f"need 0 < sigma_min <= sigma_max < inf, got sigma_min={sigma_min}, "
                         f"sigma_max={sigma_max}")
    if not rho > 0:
        raise ValueError(f"rho must be > 0, got {rho!r}")
    ramp = torch.linspace(0, 1, int(num_steps), dtype=torch.float64, device=device)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (hi + ramp * (lo - hi)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)])
