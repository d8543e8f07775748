"""The ambient loss: learn E[x0 | Ã ⊙ x_σ, Ã] from observations y = A ⊙ x0 only.

For each image: σ ~ exp(N(P_mean, P_std²)), n ~ N(0, I),

    loss = w(σ) · ‖A ⊙ (D(Ã ⊙ (y + σ n); σ, Ã) − y)‖²,   w(σ) = (σ² + σ_d²) / (σ σ_d)².

Weighting ``edm`` (the paper's; :class:`AmbientLoss`'s default) uses w(σ) on every graded pixel. EDM chose w(σ) =
1/c_out(σ)² so that the network's own output F has a unit-variance target at every σ. Under the
mask-aware scalings (:mod:`ambient.nets.denoiser`) a pixel hidden by Ã has c_out = σ_d, so there the
same principle asks for 1/σ_d²; w(σ) instead weighs the hidden pixels' irreducible error
(σ_d² + σ²)/σ² times more, 10⁴–10⁵× at the smallest σ, and their noise drowns the learning
signal of the seen pixels. Weighting ``pixel`` uses w(σ) where Ã = 1 and 1/σ_d² where Ã = 0 (and
A = 1). But the fixed-mask sampler reads the hidden pixels only at its last, smallest σ, where
``pixel`` hardly trains them (EDM's σ law puts little mass there): its hidden predictions at small σ
shrink towards the mean and the learnt distribution loses variance (benchmarks/fidelity.py). ``edm``
trains them there, in effect: w(σ) is σ_d²/σ² + 1 times ``pixel``'s weight on hidden pixels, and
E_σ[σ_d²/σ² f(σ)] = h · E_σ'[f(σ')] with σ' drawn from EDM's law tilted by σ⁻² (log-mean
P_mean − 2 P_std², h = 49), but through huge weights on rare draws. Weighting ``tilted`` (the default
with the mask-aware scalings) gets the same emphasis by sampling instead: half the images draw σ from
the tilted law, and bounded importance weights (:meth:`AmbientLoss.tilted_weights`) make the seen
pixels' expected loss exactly EDM's and the hidden pixels' ``pixel``'s plus h = 5 (``hidden_scale``)
times the same loss at the tilted law. A positive weight that depends only on (σ, Ã), and a σ law with
full support, do not move the minimiser: each pixel's optimum is still E[x0 | Ã ⊙ x_σ, Ã]; they decide
where a finite network spends its capacity.

Only pixels observed under A are graded, and y is only known there, so no clean pixel enters
the loss. Normalisation: ``mean`` divides by the number of pixels observed under A (the
gradient scale does not shrink as p grows); ``sum`` is the paper's plain sum. With A = Ã = 1
(p = δ = 0) and ``sum`` this is exactly the EDM loss (Karras et al. 2022, eq. 2 with λ(σ)
of Table 1); with ``mean`` it is that divided by the pixel count.

Training objectives are loss objects chosen once (:func:`training_loss`), as in EDM: a training
loop calls ``inputs = loss.draw(y, mask, indices, generator, augment, flip)`` on the global batch (the
step's flips, further masks Ã, σ and noise, always in the same order; ``flip`` is the data layer's
:func:`ambient.data.datasets.augment_batch`, passed in) and
``loss.per_image(net, inputs[part])`` on its share, and never asks which objective it runs.
:class:`AmbientLoss` grades on A with a network that sees Ã; :class:`EDMLoss` is plain EDM on the
images as if they were clean (the naive baseline on A ⊙ x0; the clean baseline when p = 0);
:class:`NoisyLoss` learns E[x0 | x_σ] for σ > σ_n from images y = x0 + σ_n n with a known noise level σ_n.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ambient.data.corruption import Corruption, check_mask

NORMALIZATIONS = ("mean", "sum")
WEIGHTINGS = ("edm", "pixel", "tilted")
# The tilted weighting's defaults: half the images draw σ from the hidden pixels' law.
TILT_SHARE = 0.5
HIDDEN_SCALE = 5.0  # h: the weight of the hidden pixels' loss at the tilted σ law (see AmbientLoss.tilted_weights)


def check_loss_inputs(y: torch.Tensor, mask: torch.Tensor, mask_hat: torch.Tensor) -> None:
    """ValueError unless y is (N, C, H, W) and mask ⊇ mask_hat are {0, 1} masks of its shape."""
    if y.ndim != 4:
        raise ValueError(f"y must be (N, C, H, W), got {tuple(y.shape)}")
    check_mask(mask, y, "mask")
    check_mask(mask_hat, y, "mask_hat")
    if bool((mask_hat > mask).any()):
        raise ValueError("mask_hat must be a subset of mask (Ã ⊆ A)")


# The data layer's flip (ambient.data.datasets.augment_batch): (images, masks, prob, generator, extra=…)
# → (images, masks, extra), each image flipped left-right with probability prob, its masks with it.
Flip = Callable[..., tuple]


def _needs(flip: Flip | None) -> Flip:
    if flip is None:
        raise ValueError("augment > 0 needs flip (ambient.data.datasets.augment_batch)")
    return flip


@dataclass
class LossInputs:
    """One training step's batch and randomness: images y, masks A and Ã, noise level and noise.

    ``noise_level`` is σ (EDM losses) or the timestep t (DDPM losses, ambient.objectives.ddpm_loss).
    ``inputs[part]`` selects images (e.g. one process's share of the global batch).
    """

    y: torch.Tensor
    mask: torch.Tensor
    mask_hat: torch.Tensor
    noise_level: torch.Tensor
    noise: torch.Tensor

    def __getitem__(self, part) -> LossInputs:
        return LossInputs(self.y[part], self.mask[part], self.mask_hat[part], self.noise_level[part], self.noise[part])

    def to(self, device) -> LossInputs:
        """Images, masks and noise on ``device`` (the noise level stays where it is)."""
        return LossInputs(self.y.to(device), self.mask.to(device), self.mask_hat.to(device), self.noise_level,
                          self.noise.to(device))


class AmbientLoss:
    """Callable ``loss(denoiser, y, mask, mask_hat, generator=None) -> (N,)`` per-image losses.

    ``denoiser`` is called as ``denoiser(x, sigma, mask_hat)`` with x = Ã ⊙ (y + σn).
    ``sigma`` and ``noise`` may be passed to fix the randomness (tests, Monte Carlo).

    As a training objective (:meth:`draw`, :meth:`per_image`), ``further`` is the law of Ã
    (a :class:`~ambient.data.corruption.Corruption`; its δ); ``fixed_further`` holds Ã fixed per
    image (the paper's variant, a function of ``seed`` and the image index).
    """

    mask_input = True  # the network sees Ã (as extra channels); the sampler reproduces the mask law
    noisy_data = False  # True: the data carry Gaussian noise of a known level (NoisyLoss, its noise_sigma)

    def __init__(self, P_mean: float = -1.2, P_std: float = 1.2, sigma_data: float = 0.5,
                 normalize: str = "mean", *, further: Corruption | None = None, fixed_further: bool = False,
                 seed: int = 0, weighting: str = "edm", hidden_scale: float | None = None,
                 tilt_share: float = TILT_SHARE, hidden_law: tuple[float, float] | None = None):
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
        self.weighting = weighting
        if P_std <= 0 or sigma_data <= 0:
            raise ValueError("P_std and sigma_data must be positive")
        self.P_mean, self.P_std = float(P_mean), float(P_std)
        self.sigma_data = float(sigma_data)
        self.normalize = normalize
        self.further = further if further is not None else Corruption()
        self.fixed_further, self.seed = bool(fixed_further), int(seed)
        if not 0.0 < tilt_share < 1.0:
            raise ValueError(f"tilt_share must be in (0, 1), got {tilt_share!r}")
        self.tilt_share = float(tilt_share)
        # h: edm's expected loss puts σ_d² E[σ⁻²] = σ_d² exp(2 P_std² − 2 P_mean) (49) on the tilted law
        self.hidden_scale = HIDDEN_SCALE if hidden_scale is None else float(hidden_scale)
        # the tilted law (log-mean, log-std): exp(N(P_mean, P_std²)) reweighted by σ⁻², as edm's w(σ) does
        self.hidden_law = (self.P_mean - 2 * self.P_std**2, self.P_std) if hidden_law is None else \
            (float(hidden_law[0]), float(hidden_law[1]))
        if not self.hidden_law[1] > 0:
            raise ValueError(f"hidden_law's log-std must be positive, got {self.hidden_law[1]!r}")
        if not (math.isfinite(self.hidden_scale) and self.hidden_scale >= 0):
            raise ValueError(f"hidden_scale must be finite and >= 0, got {hidden_scale!r}")

    def sample_sigma(self, n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """σ ~ exp(N(P_mean, P_std²)), shape (n,); ``tilted``: from the mixture (1 − s)·that + s·(the hidden law),
        s = ``tilt_share`` (one draw of z, then one uniform per image, in that order)."""
        z = torch.randn(n, generator=generator, device=device)
        if self.weighting != "tilted":
            return (z * self.P_std + self.P_mean).exp()
        tilt = torch.rand(n, generator=generator, device=device) < self.tilt_share
        mean_h, std_h = self.hidden_law
        return torch.where(tilt, z * std_h + mean_h, z * self.P_std + self.P_mean).exp()

    def tilted_weights(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-image weights (seen, hidden) of the ``tilted`` weighting in F units (multiply by w(σ) and by
        1/σ_d²): seen pixels p_E/q, hidden graded ones (p_E + h·p_H)/q, with p_E the EDM σ law, p_H the tilted
        one, q their mixture that σ was drawn from. In expectation the seen pixels follow EDM's loss exactly and
        the hidden ones pixel's loss plus h × the same loss at the tilted σ law, with bounded weights
        (≤ 1/(1 − s), (1 + h)/s); h = σ_d² E_p_E[σ⁻²] (49, not the default 5) would give edm's expected loss."""
        mean_h, std_h = self.hidden_law
        z_e = (sigma.log() - self.P_mean) / self.P_std
        z_h = (sigma.log() - mean_h) / std_h
        ratio = torch.exp(0.5 * (z_e**2 - z_h**2)) * (self.P_std / std_h)  # p_H / p_E (densities in ln σ)
        q = (1.0 - self.tilt_share) + self.tilt_share * ratio  # q / p_E
        return 1.0 / q, (1.0 + self.hidden_scale * ratio) / q

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
        pixel = self.weighting in ("pixel", "tilted")
        if pixel:  # w(σ) where the network sees the pixel, 1/σ_d² where not (c_out = σ_d there)
            seen, hidden = self.weight(sigma), torch.full_like(sigma, self.sigma_data ** -2)
            if self.weighting == "tilted":
                ws, wh = self.tilted_weights(sigma)
                seen, hidden = seen * ws, hidden * wh
            err = torch.where(mask_hat > 0, seen.reshape(n, 1, 1, 1), hidden.reshape(n, 1, 1, 1)) * err
        per_image = err.flatten(1).sum(dim=1)
        if self.normalize == "mean":
            per_image = per_image / mask.flatten(1).sum(dim=1).clamp_min(1.0)
        return per_image if pixel else self.weight(sigma) * per_image

    def draw(self, y: torch.Tensor, mask: torch.Tensor, indices: torch.Tensor, generator: torch.Generator,
             augment: float = 0.0, flip: Flip | None = None) -> LossInputs:
        """The step's randomness for a (global) batch, in this order: flips (if ``augment`` > 0, by
        ``flip``; the fixed Ã flips with its image), Ã (unless fixed), σ, noise; all from ``generator``."""
        mask_hat = None
        if self.fixed_further:
            mask_hat = self.further.further_for_indices(self.seed, indices.tolist(), mask)
        if augment > 0:
            y, mask, mask_hat = _needs(flip)(y, mask, augment, generator, extra=mask_hat)
        if mask_hat is None:
            mask_hat = self.further.further(mask, generator)
        sigma = self.sample_sigma(y.shape[0], generator, y.device)
        noise = torch.randn(y.shape, generator=generator, device=y.device)
        return LossInputs(y, mask, mask_hat, sigma, noise)

    def per_image(self, net: Callable, inputs: LossInputs) -> torch.Tensor:
        """Per-image losses of ``net`` on drawn inputs (see :meth:`draw`)."""
        return self(net, inputs.y, inputs.mask, inputs.mask_hat, sigma=inputs.noise_level, noise=inputs.noise)


class EDMLoss(AmbientLoss):
    """Plain EDM: every pixel taken as observed and visible (A = Ã = 1), whatever masks are given.

    On data observed through masks this is the naive baseline (A ⊙ x0 taken as clean); on clean
    data (p = 0) it is the clean baseline. Same call signature as :class:`AmbientLoss`; its
    network has no mask input (``mask_input`` False) and its sampler uses none.
    """

    mask_input = False

    def __init__(self, *args, weighting: str = "edm", **kwargs):
        # Nothing is hidden (A = Ã = 1): every weighting is EDM's loss; ``tilted`` keeps EDM's σ law too.
        super().__init__(*args, weighting="pixel" if weighting == "tilted" else weighting, **kwargs)

    def __call__(self, denoiser: Callable, y: torch.Tensor, mask: torch.Tensor, mask_hat: torch.Tensor,
                 generator: torch.Generator | None = None, *, sigma: torch.Tensor | None = None,
                 noise: torch.Tensor | None = None) -> torch.Tensor:
        ones = torch.ones_like(y)
        return super().__call__(denoiser, y, ones, ones, generator, sigma=sigma, noise=noise)

    def draw(self, y: torch.Tensor, mask: torch.Tensor, indices: torch.Tensor, generator: torch.Generator,
             augment: float = 0.0, flip: Flip | None = None) -> LossInputs:
        """Flips (if ``augment`` > 0, by ``flip``), σ, noise; A and Ã are all ones."""
        if augment > 0:
            y, mask, _ = _needs(flip)(y, mask, augment, generator)
        ones = torch.ones_like(mask)
        sigma = self.sample_sigma(y.shape[0], generator, y.device)
        noise = torch.randn(y.shape, generator=generator, device=y.device)
        return LossInputs(y, ones, ones, sigma, noise)


# The noisy objective's floor on a(σ) = (σ² − σ_n²)/σ² in its weight (see NoisyLoss); its sampler stops at the
# σ where a(σ) reaches it (noisy_sigma_stop), σ_n/√(1 − 0.1) ≈ 1.054 σ_n.
NOISY_FLOOR = 0.1


def noisy_sigma_stop(noise_sigma: float, floor: float = NOISY_FLOOR) -> float:
    """σ_stop = σ_n / √(1 − floor): the σ where a(σ) = (σ² − σ_n²)/σ² equals ``floor``, the smallest σ at which
    :class:`NoisyLoss` gives the denoiser's error its full EDM weight; a noisy-trained model's sampler stops there."""
    return float(noise_sigma) / math.sqrt(1.0 - float(floor))


class NoisyLoss(EDMLoss):
    """Learn the clean denoiser E[x0 | x_σ] for σ > σ_n from noisy images y = x0 + σ_n n only (n ~ N(0, I),
    σ_n known, in model units; no masks: any given are ignored, as by :class:`EDMLoss`).

    Noise: x_σ = y + s η, η ~ N(0, I), so x_σ = x0 + σ n' with σ² = σ_n² + s². The extra std s follows EDM's
    law exp(N(P_mean, P_std²)) (``tilted`` draws it as EDM does, as :class:`EDMLoss`): it is the noise EDM adds to
    clean data, now added to y; every σ > σ_n has positive density, no cut-off constant is needed, and for
    s ≫ σ_n, σ ≈ s is EDM's own law. ``noise_level`` in :class:`LossInputs` is the total σ.

    Loss: with a = a(σ) = (σ² − σ_n²)/σ², E[y | x_σ] = x_σ + (σ² − σ_n²)∇log p_σ(x_σ) and
    E[x0 | x_σ] = x_σ + σ²∇log p_σ(x_σ) give E[y | x_σ] = a E[x0 | x_σ] + (1 − a) x_σ. So the implied noisy
    estimate ŷ = a D(x_σ, σ) + (1 − a) x_σ is graded against y:

        loss = λ(σ) / max(a, floor)² · ‖a D + (1 − a) x_σ − y‖²,   λ(σ) = (σ² + σ_d²)/(σ σ_d)²  (EDM's).

    Its expectation given x_σ is λ(σ) a²/max(a, floor)² ‖D − E[x0 | x_σ]‖² + const, whose minimiser is exactly
    D = E[x0 | x_σ] at every σ > σ_n (a positive weight does not move it). Weight: where a ≥ ``floor`` the
    D-error gets EDM's λ(σ), as in :class:`EDMLoss` (for σ ≫ σ_n, a → 1 and this is EDM's loss). As σ → σ_n,
    a → 0 and the full weight λ/a² would multiply the target's noise: the implied D-target (y − (1 − a) x_σ)/a
    has variance up to ~σ²/a, unbounded. So 1/a² is capped at 1/floor² (``floor`` = 0.1: the D-target's noise is
    at most ~10× EDM's), and below a = floor the D-error weight fades as λ a²/floor². The sampler stops where the
    full weight starts, σ_stop = :func:`noisy_sigma_stop` (≈ 1.054 σ_n), and returns D(x_σ_stop, σ_stop).
    Normalisation as :class:`EDMLoss` (``mean``: over pixels).
    """

    noisy_data = True

    def __init__(self, *args, noise_sigma: float, floor: float = NOISY_FLOOR, **kwargs):
        super().__init__(*args, **kwargs)
        if not (isinstance(noise_sigma, (int, float)) and math.isfinite(noise_sigma) and noise_sigma > 0):
            raise ValueError(f"noise_sigma must be a finite number > 0, got {noise_sigma!r}")
        if not 0.0 < floor < 1.0:
            raise ValueError(f"floor must be in (0, 1), got {floor!r}")
        self.noise_sigma, self.floor = float(noise_sigma), float(floor)

    @property
    def sigma_stop(self) -> float:
        """Where the sampler of a model trained with this loss stops (:func:`noisy_sigma_stop`)."""
        return noisy_sigma_stop(self.noise_sigma, self.floor)

    def sample_sigma(self, n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """σ = √(σ_n² + s²) with s drawn as :class:`EDMLoss` draws σ (one draw of z per image)."""
        extra = super().sample_sigma(n, generator, device)
        return (extra**2 + self.noise_sigma**2).sqrt()

    def signal_share(self, sigma: torch.Tensor) -> torch.Tensor:
        """a(σ) = (σ² − σ_n²)/σ², the weight of D in the implied noisy estimate."""
        return 1.0 - self.noise_sigma**2 / sigma**2

    def __call__(self, denoiser: Callable, y: torch.Tensor, mask: torch.Tensor | None = None,
                 mask_hat: torch.Tensor | None = None, generator: torch.Generator | None = None, *,
                 sigma: torch.Tensor | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
        if y.ndim != 4:
            raise ValueError(f"y must be (N, C, H, W), got {tuple(y.shape)}")
        n = y.shape[0]
        if sigma is None:
            sigma = self.sample_sigma(n, generator, y.device)
        sigma = torch.as_tensor(sigma, dtype=y.dtype, device=y.device).reshape(-1).expand(n)
        if bool((sigma <= self.noise_sigma).any()):
            raise ValueError(f"sigma must exceed noise_sigma {self.noise_sigma:g}, got {float(sigma.min()):g}")
        if noise is None:
            noise = torch.randn(y.shape, generator=generator, device=y.device, dtype=y.dtype)
        share = self.signal_share(sigma).reshape(n, 1, 1, 1)
        x_noisy = y + (sigma**2 - self.noise_sigma**2).sqrt().reshape(n, 1, 1, 1) * noise
        ones = torch.ones_like(y)
        denoised = denoiser(x_noisy, sigma, ones).to(y.dtype)
        implied = share * denoised + (1.0 - share) * x_noisy  # the estimate of E[y | x_σ]
        per_image = ((implied - y) ** 2).flatten(1).sum(dim=1)
        if self.normalize == "mean":
            per_image = per_image / y[0].numel()
        return self.weight(sigma) / self.signal_share(sigma).clamp_min(self.floor) ** 2 * per_image


OBJECTIVES = {"ambient": AmbientLoss, "naive": EDMLoss, "noisy": NoisyLoss}


def sees_masks(objective: str) -> bool:
    """Whether the objective's network takes masks (mask channels, a sampler with fixed masks, A drawn
    at the training run's p) — True for ``ambient``; ``naive`` and ``noisy`` train and sample a plain EDM network."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    return OBJECTIVES[objective].mask_input


def needs_noise_sigma(objective: str) -> bool:
    """Whether the objective trains on images with Gaussian noise of a known level σ_n (``noisy``)."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    return OBJECTIVES[objective].noisy_data


def training_loss(objective: str, *, sigma_data: float = 0.5, normalize: str = "mean",
                  further: Corruption | None = None, fixed_further: bool = False, seed: int = 0,
                  weighting: str = "edm", noise_sigma: float | None = None) -> AmbientLoss:
    """The loss object of a training objective (``ambient``, ``naive`` or ``noisy``, which needs
    ``noise_sigma``, σ_n in model units). This, :func:`sees_masks` and :func:`needs_noise_sigma` are the only
    places that look at the objective's name."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    kwargs = dict(sigma_data=sigma_data, normalize=normalize, further=further, fixed_further=fixed_further,
                  seed=seed, weighting=weighting)
    if OBJECTIVES[objective].noisy_data:
        if noise_sigma is None:
            raise ValueError(f"objective {objective!r} needs noise_sigma (the data's noise level)")
        kwargs["noise_sigma"] = noise_sigma
    elif noise_sigma is not None:
        raise ValueError(f"noise_sigma is only for an objective on noisy data, not {objective!r}")
    return OBJECTIVES[objective](**kwargs)
