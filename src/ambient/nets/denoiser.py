"""EDM preconditioning around any backbone, with the mask as extra input channels.

D(x; σ, M) = c_skip ⊙ x + c_out ⊙ F([c_in · x, M], c_noise)   (EDM, Karras et al. 2022, Table 1)

with c_skip = σ_d²/(σ² + σ_d²), c_out = σ·σ_d/√(σ² + σ_d²), c_in = 1/√(σ² + σ_d²),
c_noise = ln(σ)/4, on the image channels; the mask channels reach the backbone unscaled.

Mask-aware scalings (default). A pixel hidden from the denoiser (M = 0) carries no information
about itself, as if it were infinitely noisy, so there we use the σ → ∞ limits:
c_skip = 0 and c_out = σ_d. With the plain EDM scalings, c_out ≈ σ → 0 at small σ, and the
backbone would need outputs of order 1/σ to put a value of order 1 on a hidden pixel.
``mask_aware=False`` keeps the plain scalings everywhere (the reference implementation's choice).

The interface every sampler, metric and posterior method takes is :class:`FullImageDenoiser`:
``D(x, sigma) -> x0`` on full images, with the model's σ range (``sigma_min``, ``sigma_max``)
and its own σ schedule (``schedule(num_steps)``, None for EDM's) as attributes. A mask-input
model (:class:`MaskDenoiser`) is also called ``D(x, sigma, mask)``; with ``mask=None`` it is a
full-image denoiser (every pixel visible). The fixed-mask ensemble of the ambient sampler is a
wrapper that turns a mask-input model into a full-image denoiser
(:class:`ambient.sampling.fixed_mask.FixedMaskEnsemble`).
"""

from __future__ import annotations

import torch
from torch import nn


def check_denoiser_inputs(x: torch.Tensor, sigma, mask: torch.Tensor | None, img_channels: int,
                          dtype: torch.dtype) -> torch.Tensor:
    """Validate a denoiser call ``D(x, sigma, mask)``; return sigma as an (N,) tensor of ``dtype``."""
    if x.ndim != 4 or x.shape[1] != img_channels:
        raise ValueError(f"x must be (N, {img_channels}, H, W), got {tuple(x.shape)}")
    if mask is not None and mask.shape != x.shape:
        raise ValueError(f"mask has shape {tuple(mask.shape)}, expected {tuple(x.shape)}")
    n = x.shape[0]
    sigma = torch.as_tensor(sigma, dtype=dtype, device=x.device).reshape(-1)
    sigma = sigma.expand(n) if sigma.numel() == 1 else sigma
    if sigma.numel() != n:
        raise ValueError(f"sigma must be a scalar or have one value per image ({n}), got {sigma.numel()}")
    return sigma


def edm_scalings(sigma: torch.Tensor, sigma_data: float):
    """EDM's plain (c_skip, c_out, c_in, c_noise) for noise levels ``sigma`` (Karras et al. 2022, Table 1)."""
    sd = sigma_data
    c_skip = sd**2 / (sigma**2 + sd**2)
    c_out = sigma * sd / (sigma**2 + sd**2).sqrt()
    c_in = 1.0 / (sigma**2 + sd**2).sqrt()
    return c_skip, c_out, c_in, sigma.log() / 4


class FullImageDenoiser(nn.Module):
    """Base of full-image denoisers ``D(x, sigma) -> x0``.

    ``x``: (N, C, H, W) noisy images x0 + σn; ``sigma``: a scalar or one value per image (a
    tensor or a number); returns the estimate of x0 with x's shape (any float dtype; solvers
    cast it). Attributes: ``sigma_min`` / ``sigma_max``, the noise levels the model was trained
    for (EDM's 0.002 / 80 by default), ``sigma_data``, and :meth:`schedule`.
    Wrappers (the fixed-mask ensemble, posterior denoisers, bound class labels) derive from
    :class:`DenoiserWrapper`, which takes ``sigma_*`` and ``schedule`` from the denoiser they wrap.
    """

    sigma_min: float = 0.002
    sigma_max: float = 80.0
    sigma_data: float = 0.5

    def schedule(self, num_steps: int) -> torch.Tensor | None:
        """The model's own decreasing σ's for ``num_steps`` steps, ending in 0 (float64), or None
        when the model has none and samplers should use EDM's schedule over [sigma_min, sigma_max]."""
        return None

    def forward(self, x: torch.Tensor, sigma) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class DenoiserWrapper(FullImageDenoiser):
    """Base of denoisers that wrap another one, ``self.denoiser``, and keep its σ range and schedule.

    ``denoiser`` may be any callable: one without ``sigma_min`` / ``sigma_max`` gets EDM's
    (:class:`FullImageDenoiser`'s), one without ``schedule`` none of its own. An ``nn.Module``
    ``denoiser`` becomes a submodule of the wrapper.
    """

    def __init__(self, denoiser):
        super().__init__()
        self.denoiser = denoiser

    @property
    def sigma_min(self) -> float:
        return float(getattr(self.denoiser, "sigma_min", FullImageDenoiser.sigma_min))

    @property
    def sigma_max(self) -> float:
        return float(getattr(self.denoiser, "sigma_max", FullImageDenoiser.sigma_max))

    def schedule(self, num_steps: int) -> torch.Tensor | None:
        own = getattr(self.denoiser, "schedule", None)
        return own(num_steps) if callable(own) else None


class MaskDenoiser(FullImageDenoiser):
    """A model that also takes a mask: ``D(x, sigma, mask=None)``; ``mask=None`` = all visible.

    ``forward`` validates its inputs once; :meth:`denoise` is the same computation for callers
    that already did (the sampler's inner loop): ``x`` (N, C, H, W), ``sigma`` an (N,) tensor
    on x's device, ``mask`` None or x's shape.
    """

    img_channels: int
    sigma_dtype: torch.dtype = torch.float32

    def forward(self, x: torch.Tensor, sigma, mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        sigma = check_denoiser_inputs(x, sigma, mask, self.img_channels, self.sigma_dtype)
        return self.denoise(x, sigma, mask, **kwargs)  # kwargs: class_labels of conditional models

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError  # pragma: no cover - abstract


class Denoiser(MaskDenoiser):
    """EDM-preconditioned denoiser ``D(x, sigma, mask=None)``.

    Args:
        backbone: module called as ``backbone(net_input, c_noise)`` returning ``img_channels``
            channels; ``net_input`` is [c_in·x, mask] when ``mask_channels`` else c_in·x.
        img_channels: image channels C.
        sigma_data: σ_d, the data's standard deviation (0.5 for images in [-1, 1]).
        mask_aware: use c_skip = 0, c_out = σ_d at hidden pixels (see module docstring).
        mask_channels: feed the mask to the backbone (False: a plain EDM network; then only
            mask=None or all-ones masks make sense).
    """

    def __init__(self, backbone: nn.Module, img_channels: int, sigma_data: float = 0.5,
                 mask_aware: bool = True, mask_channels: bool = True):
        super().__init__()
        if sigma_data <= 0:
            raise ValueError(f"sigma_data must be positive, got {sigma_data}")
        self.backbone = backbone
        self.img_channels = int(img_channels)
        self.sigma_data = float(sigma_data)
        self.mask_aware = bool(mask_aware)
        self.mask_channels = bool(mask_channels)

    def scalings(self, sigma: torch.Tensor, mask: torch.Tensor | None = None):
        """(c_skip, c_out, c_in, c_noise) broadcastable against the image; per pixel if mask-aware."""
        sd = self.sigma_data
        c_skip, c_out, c_in, c_noise = edm_scalings(sigma, sd)
        if mask is not None and self.mask_aware:
            c_skip = c_skip * mask
            c_out = c_out * mask + sd * (1.0 - mask)
        return c_skip, c_out, c_in, c_noise

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, mask: torch.Tensor | None,
                class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """``class_labels`` (N, label_dim), one-hot, for a class-conditional backbone (ambient.nets.songunet)."""
        sigma = sigma.to(torch.float32)
        n = x.shape[0]
        s = sigma.reshape(n, 1, 1, 1)
        x = x.to(torch.float32)
        if mask is not None:
            mask = mask.to(torch.float32)
            x = x * mask
        c_skip, c_out, c_in, c_noise = self.scalings(s, mask)
        net_in = c_in * x
        if self.mask_channels:
            net_in = torch.cat([net_in, torch.ones_like(x) if mask is None else mask], dim=1)
        if class_labels is None:
            out = self.backbone(net_in, c_noise.reshape(n))
        else:
            out = self.backbone(net_in, c_noise.reshape(n), class_labels=class_labels)
        return c_skip * x + c_out * out.to(torch.float32)
