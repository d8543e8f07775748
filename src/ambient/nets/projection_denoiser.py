"""Preconditioning for a network that sees an image only through an orthogonal projection P (issue 25, item 4a).

The k-space ambient objective (:mod:`ambient.objectives.kspace_loss`) shows the network x = P x_σ, where
P = Ã⁺Ã projects onto the frequencies the further operator Ã determines (a real image's seen spectrum), plus a
conditioning map (Ã's seen spectrum as an image-shaped channel). This is the mask-aware scaling of
:mod:`ambient.nets.denoiser` with the pixel mask replaced by P:

    D(x; σ, cond, P) = c_skip(σ)·x + c_out(σ)·P F + σ_d·(I − P) F,   F = backbone([c_in(σ)·x, cond], c_noise(σ))

with EDM's c_skip, c_out, c_in, c_noise. On range(P) the network sees the noisy frequencies and EDM's scalings
are right; on its complement it sees nothing (σ → ∞ in effect), so c_skip = 0 and c_out = σ_d (x0-prediction).
The plain EDM skip would copy the aliased zero-filled input and, at small σ, force outputs of order 1/σ to put a
value on the hidden frequencies. For P = a pixel mask this is exactly :class:`ambient.nets.denoiser.Denoiser`'s
mask-aware form. ``x`` must lie in range(P) (the caller projects; the sampler does it each call).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ambient.nets.denoiser import edm_scalings

Project = Callable[[torch.Tensor], torch.Tensor]


class ProjectionDenoiser(nn.Module):
    """``D(x, sigma, cond, project)``: ``x`` (N, C, H, W) in range(P), ``sigma`` (N,), ``cond`` (N, 1, H, W) the
    conditioning map, ``project`` the orthogonal projection P (an image → image callable). ``backbone`` takes
    C + 1 channels (``mask_channels`` True in :class:`ambient.nets.backbones.BackboneConfig`)."""

    sigma_min: float = 0.002
    sigma_max: float = 80.0

    def __init__(self, backbone: nn.Module, img_channels: int, sigma_data: float = 0.5):
        super().__init__()
        if sigma_data <= 0:
            raise ValueError(f"sigma_data must be positive, got {sigma_data}")
        self.backbone = backbone
        self.img_channels = int(img_channels)
        self.sigma_data = float(sigma_data)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor, project: Project) -> torch.Tensor:
        n = x.shape[0]
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1).expand(n)
        c_skip, c_out, c_in, c_noise = edm_scalings(sigma.reshape(n, 1, 1, 1), self.sigma_data)
        x = x.to(torch.float32)
        out = self.backbone(torch.cat([c_in * x, cond.to(torch.float32)], dim=1), c_noise.reshape(n))
        out = out.to(torch.float32)
        seen = project(out).to(torch.float32)
        return c_skip * x + c_out * seen + self.sigma_data * (out - seen)
