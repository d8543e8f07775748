"""Sampling and restoring with a k-space ambient network (issue 25, item 4a): the fixed-operator sampler.

The analogue of the paper's fixed-mask sampler (:mod:`ambient.sampling.fixed_mask`) for a network trained by
:mod:`ambient.objectives.kspace_loss`: each sample gets one further k-space operator Ã_s, fixed along the
trajectory and drawn from the training law of Ã (a training observation's line mask, chosen by the sample's seed,
then :func:`ambient.data.kspace_law.further_lines` at the training δ); every denoiser call sees
P_s x_t = Ã_s⁺Ã_s x_t (the frequencies Ã_s determines; the same information as Ã_sᵀÃ_s x_t) with Ã_s's seen
spectrum, and EDM's Heun steps run to σ_min, so the sample is the network's output D at the last step.
As with pixel masks the sampler is not exact: at σ → 0 the frequencies outside Ã_s are their conditional mean
given the seen ones, so samples lack their conditional variance.

Restoration (:func:`kspace_ambient_restore`): the network never sees a full image, so MMPS (which needs a
full-image denoiser and its Jacobian) is not available. Instead, the one-step posterior mean: D(A⁺y; σ_min, s_A)
with the test operator's own lines (or the mean over K further draws Ã_k = B_k ∘ A, the training law's view), then
data consistency, x̂ = D + A⁺(y − A D) (the acquired frequencies replaced by the measured ones; exact for σ_y = 0).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ambient.data.kspace_law import further_lines, seen_spectrum
from ambient.nets.denoiser import DenoiserWrapper
from ambient.nets.schedules import edm_sigmas
from ambient.operators.kspace import KSpaceOperator, centred_fft2, centred_ifft2
from ambient.rng import KSPACE_SAMPLER_STREAM, NOISE_STREAM, SeedNoise, mix_seed
from ambient.sampling.solvers import sample_heun


def seen_projection(seen: torch.Tensor):
    """P v = Re(F^H(s ⊙ F v)) for a seen spectrum ``seen`` (N, 1, H, W) (mirror-symmetric, so F^H(s ⊙ F v) is
    real for real v): the orthogonal projection onto the frequencies s of a real image."""
    def project(v: torch.Tensor) -> torch.Tensor:
        return centred_ifft2(seen.to(v.device, v.dtype) * centred_fft2(v)).real
    return project


class FixedOperatorDenoiser(DenoiserWrapper):
    """A :class:`~ambient.nets.projection_denoiser.ProjectionDenoiser` seen through fixed further operators, as a
    full-image denoiser ``D(x, sigma)``: D(x, σ) = net(P x, σ, s, P) with ``seen`` s (N, 1, H, W) held fixed."""

    def __init__(self, denoiser, seen: torch.Tensor):
        super().__init__(denoiser)
        self.seen = seen.to(torch.float32)
        self.project = seen_projection(self.seen)

    def forward(self, x: torch.Tensor, sigma) -> torch.Tensor:
        n = x.shape[0]
        sig = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1).expand(n)
        x_in = self.project(x.to(torch.float32))
        return self.denoiser(x_in, sig, self.seen, self.project).double()


def sampling_further_masks(masks: torch.Tensor, delta: float, keep: torch.Tensor | None,
                           seeds: Sequence[int]) -> torch.Tensor:
    """Ã_s's line masks (N, H, W) for the seeds: seed s picks training mask j ~ U{0..K−1} and drops pairs at δ,
    both from the generator ``mix_seed(KSPACE_SAMPLER_STREAM, s)`` (the same at any batch size)."""
    out = []
    for s in seeds:
        g = torch.Generator().manual_seed(mix_seed(KSPACE_SAMPLER_STREAM, int(s)))
        j = int(torch.randint(masks.shape[0], (1,), generator=g))
        out.append(further_lines(masks[j:j + 1].float(), delta, g, keep))
    return torch.cat(out)


@torch.no_grad()
def kspace_ambient_sample(denoiser, masks: torch.Tensor, delta: float, keep: torch.Tensor | None,
                          seeds: Sequence[int], image_shape: Sequence[int], *, num_steps: int = 18,
                          batch: int = 100, sigma_min: float | None = None) -> torch.Tensor:
    """``len(seeds)`` samples (N, C, H, W) float32 by Heun with one fixed further operator per sample (the law:
    acquisition masks ``masks`` (K, H, W), then δ with ``keep``); a seed gives the same sample at any batch.
    ``sigma_min``: the last noise level (default the denoiser's); the sample is D there."""
    sigmas = edm_sigmas(num_steps, denoiser.sigma_min if sigma_min is None else sigma_min, denoiser.sigma_max)
    outs = []
    for start in range(0, len(seeds), batch):
        chunk = [int(s) for s in seeds[start:start + batch]]
        seen = seen_spectrum(sampling_further_masks(masks, delta, keep, chunk))[:, None]
        wrapped = FixedOperatorDenoiser(denoiser, seen)
        noise = SeedNoise(chunk, stream=NOISE_STREAM)
        x = noise.randn((len(chunk), *image_shape)) * sigmas[0]
        outs.append(sample_heun(wrapped, x, sigmas).float())
    return torch.cat(outs) if outs else torch.empty((0, *image_shape))


@torch.no_grad()
def kspace_ambient_restore(denoiser, y: torch.Tensor, op: KSpaceOperator, *, delta: float = 0.0,
                           keep: torch.Tensor | None = None, draws: int = 1, seed: int = 0,
                           consistency: bool = True, sigma: float | None = None) -> torch.Tensor:
    """Restorations (N, C, H, W) of measurements ``y`` of the single-coil ``op``: the network's prediction at
    σ_min from A⁺y with A's seen spectrum (``delta`` 0), or the mean over ``draws`` further operators B_k ∘ A at
    ``delta`` (from ``seed``); then, if ``consistency``, D + A⁺(y − A D). ``sigma``: the noise level the network is
    told (default its σ_min); the input is noiseless either way."""
    n = y.shape[0]
    sigma = torch.full((n,), float(denoiser.sigma_min if sigma is None else sigma))
    masks = op.mask.expand(n, -1, -1) if op.mask.shape[0] == 1 else op.mask
    total = 0.0
    for k in range(draws):
        g = torch.Generator().manual_seed(mix_seed(KSPACE_SAMPLER_STREAM, seed, k))
        m_hat = masks if delta == 0 else further_lines(masks, delta, g, keep)
        op_hat = KSpaceOperator(m_hat, op.image_shape)
        seen = seen_spectrum(m_hat)[:, None]
        x_in = op_hat.pinv(y * op_hat.support().to(y.dtype)).float()
        total = total + denoiser(x_in, sigma, seen, seen_projection(seen)).double()
    d = total / draws
    if consistency:
        d = d + op.pinv(y - op(d))
    return d.float()
