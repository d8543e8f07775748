"""Networks: denoisers D(x, σ[, mask]) and what builds them.

Modules: ``denoiser`` (the denoiser protocol and EDM preconditioning), ``backbones`` (diffusers UNet
presets), ``songunet`` and ``ddpmpp`` (the paper's network), ``conditional`` (class labels),
``oracle`` (the exact denoiser of Gaussian data with known moments; the fixed-mask sampler's exact
moments), ``schedules`` (EDM σ levels, DDPM timesteps), ``pretrained`` (diffusers pipelines, mask-channel
surgery), ``ddpm_denoiser`` (a finetuned DDPM UNet as a denoiser in EDM's σ convention), ``registry``
(the architectures, ``ModelConfig``, ``SamplingSpec``, ``build_denoiser``), ``projection_denoiser`` (the mask-aware
scalings through an orthogonal projection P, for the k-space ambient network).
"""

from ambient.nets.denoiser import Denoiser, MaskDenoiser

__all__ = ["Denoiser", "MaskDenoiser"]
