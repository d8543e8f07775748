"""A finetuned diffusers UNet as a denoiser in EDM's σ convention (``FinetunedDenoiser``),
and the DDPM output → x0 conversion it shares with the finetuning loss."""

from __future__ import annotations

import torch

from ambient.data.corruption import Corruption
from ambient.nets.denoiser import MaskDenoiser
from ambient.nets.pretrained import MaskedUNet
from ambient.nets.schedules import DDPMSchedule, alpha_bar_from_sigma

TIMESTEP_MODES = ("interpolate", "nearest")


class FinetunedDenoiser(MaskDenoiser):
    """``D(x, sigma, mask=None) -> x0`` around a DDPM-parameterised UNet (see the module doc).

    Args:
        net: the UNet wrapper (mask channels or not, fixed embedding).
        alphas_cumprod: ᾱ_t of the model's scheduler, t = 0..T−1 (decreasing).
        prediction_type: ``epsilon``, ``v_prediction`` or ``sample``.
        hidden_x0: rule at pixels with mask 0 (``direct``: raw output; ``formula``).
        timestep_mode: ``interpolate`` or ``nearest``.
        corruption, data_survival: the mask law of the finetuning data, for the sampler.

    Its σ range is that of its timesteps, and :meth:`schedule` is :meth:`sampling_sigmas`.
    """

    sigma_dtype = torch.float64

    def __init__(self, net: MaskedUNet, alphas_cumprod: torch.Tensor, prediction_type: str,
                 hidden_x0: str = "direct", timestep_mode: str = "interpolate",
                 corruption: Corruption | None = None, data_survival: float | None = None):
        super().__init__()
        if hidden_x0 not in HIDDEN_X0:
            raise ValueError(f"hidden_x0 must be one of {HIDDEN_X0}, got {hidden_x0!r}")
        if timestep_mode not in TIMESTEP_MODES:
            raise ValueError(f"timestep_mode must be one of {TIMESTEP_MODES}, got {timestep_mode!r}")
        self.net = net
        self.prediction_type = prediction_type
        self.hidden_x0 = hidden_x0
        self.timestep_mode = timestep_mode
        self.corruption = corruption
        self.data_survival = data_survival
        self.ddpm = DDPMSchedule(alphas_cumprod)  # σ ↔ timestep; its buffers follow the module's device

    @property
    def img_channels(self) -> int:
        return self.net.img_channels

    @property
    def sigma_min(self) -> float:
        return float(self.ddpm.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.ddpm.sigmas[-1])

    def schedule(self, num_steps: int) -> torch.Tensor:
        """The model's own σ's (:meth:`sampling_sigmas` with linear spacing)."""
        return self.sampling_sigmas(num_steps)

    @property
    def timestep_sigmas(self) -> torch.Tensor:
        """σ_t of every training timestep t = 0..T−1 (float64, increasing)."""
        return self.ddpm.sigmas

    def timestep_for_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        """The (fractional or nearest integer) timestep for each σ (:meth:`DDPMSchedule.sigma_to_t`)."""
        return self.ddpm.sigma_to_t(sigma, self.timestep_mode)

    def sampling_sigmas(self, num_steps: int, spacing: str = "linear", rho: float = 7.0) -> torch.Tensor:
        """The model's own decreasing σ's, ending in 0 (:meth:`DDPMSchedule.sampling_sigmas`)."""
        return self.ddpm.sampling_sigmas(num_steps, spacing, rho)

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        sigma = sigma.to(torch.float64)
        n = x.shape[0]
        a = alpha_bar_from_sigma(sigma).reshape(n, 1, 1, 1).to(torch.float32)
        x_in = x.to(torch.float32) * a.sqrt()
        if mask is not None:
            mask = mask.to(torch.float32)
            x_in = x_in * mask
        t = self.timestep_for_sigma(sigma)
        t = t.to(x.device, torch.long if self.timestep_mode == "nearest" else torch.float32)
        out = self.net(x_in, t, mask).to(torch.float32)
        return x0_from_output(out, x_in, a, self.prediction_type, mask, self.hidden_x0).to(x.dtype)


HIDDEN_X0 = ("direct", "formula")


def x0_from_output(output: torch.Tensor, x_t: torch.Tensor, alpha_bar: torch.Tensor, prediction_type: str,
                   mask: torch.Tensor | None = None, hidden_x0: str = "direct") -> torch.Tensor:
    """Clean-image estimate from a raw network output (see the module doc).

    ``alpha_bar`` is broadcastable to the image ((N, 1, 1, 1) or a scalar); ``x_t`` is the
    network's (masked) input; with ``mask`` given and ``hidden_x0="direct"``, pixels where
    mask = 0 take the raw output.
    """
    if hidden_x0 not in HIDDEN_X0:
        raise ValueError(f"hidden_x0 must be one of {HIDDEN_X0}, got {hidden_x0!r}")
    a = torch.as_tensor(alpha_bar, dtype=output.dtype, device=output.device)
    if prediction_type == "epsilon":
        x0 = (x_t - (1.0 - a).sqrt() * output) / a.sqrt()
    elif prediction_type == "v_prediction":
        x0 = a.sqrt() * x_t - (1.0 - a).sqrt() * output
    elif prediction_type == "sample":
        x0 = output
    else:
        raise ValueError(f"prediction_type must be epsilon, v_prediction or sample, got {prediction_type!r}")
    if mask is not None and hidden_x0 == "direct":
        x0 = torch.where(mask > 0, x0, output)
    return x0
