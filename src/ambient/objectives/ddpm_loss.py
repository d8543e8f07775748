"""The ambient objective written through a pretrained model's own parameterisation.

DDPM notation: x_t = √ᾱ_t x0 + √(1−ᾱ_t) ε at discrete timesteps t = 0..T−1. The network
predicts ε, v = √ᾱ ε − √(1−ᾱ) x0, or x0 itself (``prediction_type``), and its clean-image
estimate is

    epsilon:       x̂0 = (x_t − √(1−ᾱ) ε̂) / √ᾱ
    v_prediction:  x̂0 = √ᾱ x_t − √(1−ᾱ) v̂
    sample:        x̂0 = output.

Ambient training step, for observations y = A ⊙ x0 and a further mask Ã ⊆ A (fresh per step):
t ~ U{0, …, T−1}, x_t = √ᾱ y + √(1−ᾱ) ε, network input Ã ⊙ x_t (plus Ã as channels when the
model has them), and

    loss = Σ A ⊙ (x̂0 − y)² / Σ A        (mean over the pixels observed under A),

so nothing unobserved enters the loss, as in :class:`ambient.objectives.losses.AmbientLoss`, times a weight
w(t) per image. With A = Ã = 1 it is vanilla finetuning in x0 space.

Weighting over t (``weighting``). An x0 error is the ε error times σ = √((1−ᾱ)/ᾱ), so a plain
x0 loss with uniform t (``"x0"``, w = 1, the seed's choice) is dominated by the noisiest
timesteps (σ ≈ 150 at t = T−1 of a linear 1000-step schedule) and gives the low-noise end next
to nothing; in vanilla finetuning of an ε-model its loss starts orders of magnitude above the
pretrained model's own. ``"min-snr"`` (default) uses w = min(SNR, γ) with SNR = ᾱ/(1−ᾱ) = 1/σ²
(Min-SNR-γ, Hang et al. 2023): the model's own ε loss at high noise, and a bounded weight at low
noise, where the error at hidden pixels does not vanish and an ε-like weight 1/σ² would explode.

Hidden pixels (Ã = 0). There x_t is zeroed, so the formulas give x̂0 = −σ ε̂ (ε) or
−√(1−ᾱ) v̂ (v), with σ = √((1−ᾱ)/ᾱ): at small noise the network would need outputs of order
1/σ to put a value of order 1 there. ``hidden_x0="direct"`` (default, the seed's rule) reads the
raw output as x̂0 at hidden pixels instead; ``"formula"`` keeps the parameterisation everywhere.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ambient.data.corruption import Corruption
from ambient.nets.ddpm_denoiser import HIDDEN_X0, x0_from_output
from ambient.nets.schedules import DDPMSchedule, alpha_bar_from_sigma, alphas_cumprod, sigma_from_alpha_bar
from ambient.objectives.losses import Flip, LossInputs, check_loss_inputs

# The σ ↔ ᾱ helpers are defined in ambient.nets.schedules; importable from here as before.
__all__ = ["HIDDEN_X0", "WEIGHTINGS", "FinetuneLoss", "alpha_bar_from_sigma", "alphas_cumprod",
           "sigma_from_alpha_bar", "x0_from_output"]

WEIGHTINGS = ("min-snr", "x0")




class FinetuneLoss:
    """``loss(net, y, mask, mask_hat, generator=None) -> (N,)`` per-image ambient losses.

    ``net`` is called as ``net(x_in, timesteps, mask_hat)`` with x_in = Ã ⊙ x_t and returns the
    raw prediction (see :class:`ambient.nets.pretrained.MaskedUNet`). ``timesteps`` and
    ``noise`` may be passed to fix the randomness (tests, evaluation).

    As a training objective it has the interface of :class:`ambient.objectives.losses.AmbientLoss`
    (:meth:`draw`, :meth:`per_image`); ``further`` is the law of Ã (its δ).
    """

    def __init__(self, alphas_cumprod: torch.Tensor, prediction_type: str, hidden_x0: str = "direct",
                 weighting: str = "min-snr", snr_gamma: float = 5.0, *, further: Corruption | None = None):
        if hidden_x0 not in HIDDEN_X0:
            raise ValueError(f"hidden_x0 must be one of {HIDDEN_X0}, got {hidden_x0!r}")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
        if not snr_gamma > 0:
            raise ValueError(f"snr_gamma must be > 0, got {snr_gamma!r}")
        self.weighting, self.snr_gamma = weighting, float(snr_gamma)
        self.ddpm = DDPMSchedule(alphas_cumprod, strict=False)  # t → ᾱ_t; ᾱ need not be strictly monotone here
        self.prediction_type = prediction_type
        self.hidden_x0 = hidden_x0
        self.further = further if further is not None else Corruption()

    @property
    def num_timesteps(self) -> int:
        return self.ddpm.num_timesteps

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self.ddpm.alphas_cumprod

    def weight(self, timesteps: torch.Tensor) -> torch.Tensor:
        """w(t) per image (float64): 1 for ``x0``, min(SNR_t, γ) for ``min-snr``."""
        a = self.ddpm.alpha_bar(timesteps)
        if self.weighting == "x0":
            return torch.ones_like(a)
        return (a / (1.0 - a).clamp_min(1e-12)).clamp(max=self.snr_gamma)

    def __call__(self, net: Callable, y: torch.Tensor, mask: torch.Tensor, mask_hat: torch.Tensor,
                 generator: torch.Generator | None = None, *, timesteps: torch.Tensor | None = None,
                 noise: torch.Tensor | None = None) -> torch.Tensor:
        check_loss_inputs(y, mask, mask_hat)
        n = y.shape[0]
        if timesteps is None:
            timesteps = torch.randint(0, self.num_timesteps, (n,), generator=generator,
                                      device=generator.device if generator is not None else "cpu")
        timesteps = torch.as_tensor(timesteps, dtype=torch.long).reshape(-1).expand(n).cpu()
        if noise is None:
            noise = torch.randn(y.shape, generator=generator,
                                device=generator.device if generator is not None else "cpu")
        noise = noise.to(y.device, y.dtype)
        a = self.ddpm.alpha_bar(timesteps).to(y.device, y.dtype).reshape(n, 1, 1, 1)
        y = torch.where(mask > 0, y, torch.zeros_like(y))  # values where A = 0 are never used
        x_in = mask_hat * (a.sqrt() * y + (1.0 - a).sqrt() * noise)
        out = net(x_in, timesteps.to(y.device), mask_hat)
        x0 = x0_from_output(out.to(y.dtype), x_in, a, self.prediction_type, mask_hat, self.hidden_x0)
        err = (mask * (x0 - y)) ** 2
        per_image = err.flatten(1).sum(dim=1) / mask.flatten(1).sum(dim=1).clamp_min(1.0)
        return self.weight(timesteps).to(y.device, y.dtype) * per_image

    def draw(self, y: torch.Tensor, mask: torch.Tensor, indices: torch.Tensor, generator: torch.Generator,
             augment: float = 0.0, flip: Flip | None = None) -> LossInputs:
        """One micro-batch's randomness, in this order: Ã, flips (by ``flip``, the data layer's
        :func:`ambient.data.datasets.augment_batch`; drawn even when ``augment`` is 0), timesteps t, noise;
        all from ``generator``, on its device."""
        if flip is None:
            raise ValueError("FinetuneLoss.draw needs flip (ambient.data.datasets.augment_batch)")
        mask_hat = self.further.further(mask, generator=generator)
        y, mask, mask_hat = flip(y, mask, augment, generator=generator, extra=mask_hat)
        timesteps = torch.randint(0, self.num_timesteps, (y.shape[0],), generator=generator, device=generator.device)
        noise = torch.randn(y.shape, generator=generator, device=generator.device)
        return LossInputs(y, mask, mask_hat, timesteps, noise)

    def per_image(self, net: Callable, inputs: LossInputs) -> torch.Tensor:
        """Per-image losses of ``net`` on drawn inputs (see :meth:`draw`)."""
        return self(net, inputs.y, inputs.mask, inputs.mask_hat, timesteps=inputs.noise_level, noise=inputs.noise)
