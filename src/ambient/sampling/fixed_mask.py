"""Sampling: the fixed-mask ensemble as a denoiser wrapper, and the ambient sampler around it.

:class:`FixedMaskEnsemble` turns a mask-input denoiser ``D(x, sigma, mask)`` into a full-image
denoiser ``D(x, sigma) -> x0`` (:class:`ambient.nets.denoiser.FullImageDenoiser`): each sample gets K
masks fixed for the whole trajectory, the network sees ``mask ⊙ x_t`` and the mask, and the K
clean-image predictions are clipped and averaged; optionally a mask-agreement term pulls them
together. :func:`ambient_sample` draws the masks and the noise from the seeds, wraps, and calls
a solver of :mod:`ambient.sampling.solvers` (EDM's Euler / Heun). Inputs are validated once, here; the
2·K denoiser calls of a Heun step use the model's trusted path (:meth:`MaskDenoiser.denoise`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import torch

from ambient.data.corruption import Corruption, check_mask, sampling_masks
from ambient.nets.denoiser import DenoiserWrapper, FullImageDenoiser, MaskDenoiser
from ambient.nets.schedules import edm_sigmas
from ambient.rng import NOISE_STREAM, SeedNoise, mix_seed
from ambient.sampling.solvers import SOLVERS, Denoise, sample_euler, sample_heun, solver_by_name

__all__ = ["CLIPS", "SOLVERS", "Denoise", "FixedMaskEnsemble", "ambient_sample", "dynamic_threshold",
           "edm_sigmas", "iter_sample_batches", "model_sigmas", "sample_euler", "sample_heun", "sample_in_batches"]

CLIPS = ("none", "static", "dynamic")


def dynamic_threshold(x0: torch.Tensor, percentile: float = 0.99) -> torch.Tensor:
    """Imagen's dynamic thresholding, per sample.

    s = the ``percentile`` quantile of |x0| over each sample's pixels (linear interpolation
    between order statistics, as ``numpy.percentile(..., 100 * percentile)``), s = max(s, 1),
    and x0 ← clamp(x0, −s, s) / s. A sample whose quantile is at most 1 is left unchanged.
    """
    if not 0.0 <= percentile <= 1.0:
        raise ValueError(f"percentile must be in [0, 1], got {percentile!r}")
    flat = x0.detach().abs().reshape(x0.shape[0], -1).sort(dim=1).values
    pos = percentile * (flat.shape[1] - 1)
    lo, frac = int(math.floor(pos)), pos - math.floor(pos)
    hi = min(lo + 1, flat.shape[1] - 1)
    s = flat[:, lo] + frac * (flat[:, hi] - flat[:, lo])
    s = s.clamp(min=1.0).reshape(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
    return torch.maximum(torch.minimum(x0, s), -s) / s


def _clip(x0: torch.Tensor, clip: str) -> torch.Tensor:
    if clip == "static":
        return x0.clamp(-1.0, 1.0)
    if clip == "dynamic":
        return dynamic_threshold(x0)
    return x0


def _device_of(denoiser) -> torch.device:
    if isinstance(denoiser, torch.nn.Module):
        for t in (*denoiser.parameters(), *denoiser.buffers()):
            return t.device
    return torch.device("cpu")


class FixedMaskEnsemble(DenoiserWrapper):
    """A mask-input denoiser seen through K fixed masks, as a full-image denoiser ``D(x, sigma)``.

    ``D(x, σ) = mean_k clip(D_inner(m_k ⊙ x, σ, m_k))`` with ``masks`` (K, N, C, H, W) held fixed
    (``masks=None``: one plain call ``D_inner(x, σ)`` on the full image, still clipped). Inputs
    are cast to ``dtype`` (the inner model's input type) and the result is float64.

    Guidance (``guidance_scale`` = g > 0, needs K >= 2): with E = mean over pairs k < l of
    ||D_k − D_l||² (per sample, summed over pixels), the returned estimate is
    mean_k D_k − σ g ∇_x E, so that the solver's derivative (x − D)/σ gains + g ∇_x E. Autograd
    is used only then. Its σ range and schedule are those of the inner denoiser.

    The caller vouches for the inputs (shapes, one σ for the batch or one per sample): the inner
    model is called on its trusted path. :func:`ambient_sample` validates before wrapping.
    """

    def __init__(self, denoiser, masks: torch.Tensor | None, *, clip: str = "none", guidance_scale: float = 0.0,
                 dtype: torch.dtype = torch.float32):
        super().__init__(denoiser)
        self.masks = masks
        self.clip = clip
        self.guidance_scale = float(guidance_scale)
        self.dtype = dtype
        if isinstance(denoiser, MaskDenoiser):
            self._call = denoiser.denoise  # validated once by the caller, not on every call
        elif isinstance(denoiser, FullImageDenoiser):  # no mask input: only masks=None makes sense
            self._call = lambda x, sigma, mask: denoiser(x, sigma)
        else:  # any callable D(x, sigma, mask)
            self._call = denoiser

    def predictions(self, x: torch.Tensor, sigma: torch.Tensor) -> list[torch.Tensor]:
        """The K clipped predictions (one without masks); ``x`` in ``dtype``, ``sigma`` (N,)."""
        if self.masks is None:
            return [_clip(self._call(x, sigma, None), self.clip)]
        return [_clip(self._call(m * x, sigma, m), self.clip) for m in self.masks]

    def forward(self, x: torch.Tensor, sigma) -> torch.Tensor:
        n = x.shape[0]
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x.device)
        sig = sigma.to(self.dtype).reshape(-1).expand(n) if sigma.numel() == 1 else sigma.to(self.dtype)
        if self.guidance_scale == 0:
            return torch.stack(self.predictions(x.to(self.dtype), sig)).double().mean(0)
        with torch.enable_grad():
            xg = x.to(self.dtype).detach().requires_grad_(True)
            preds = torch.stack(self.predictions(xg, sig))
            k = preds.shape[0]
            diff = (preds[:, None] - preds[None]).reshape(k, k, n, -1)
            energy = diff.pow(2).sum() / (k * (k - 1))  # Σ_i mean_{k<l} ||D_k − D_l||²
            (grad,) = torch.autograd.grad(energy, xg)
        scale = sigma if sigma.numel() == 1 else sigma.reshape(n, *([1] * (x.ndim - 1)))
        # Folded into the "denoised" estimate so that (x − D_eff)/σ = (x − D̄)/σ + g ∇E.
        return preds.detach().double().mean(0) - scale * self.guidance_scale * grad.double()


def _attr(denoiser, name: str) -> float:
    """A full-image denoiser's σ bound; EDM's for plain callables."""
    return getattr(denoiser, name) if isinstance(denoiser, FullImageDenoiser) else getattr(FullImageDenoiser, name)


def model_sigmas(denoiser, num_steps: int, rho: float = 7.0) -> torch.Tensor:
    """The σ's to sample ``denoiser`` with: its own schedule if it has one, else EDM's over its σ range."""
    own = denoiser.schedule(num_steps) if isinstance(denoiser, FullImageDenoiser) else None
    if own is not None:
        return own
    return edm_sigmas(num_steps, _attr(denoiser, "sigma_min"), _attr(denoiser, "sigma_max"), rho)


def _fixed_masks(shape, seeds, corruption, data_survival, masks, num_masks) -> torch.Tensor | None:
    """(K, N, C, H, W) masks held fixed along the trajectory, or None for plain sampling."""
    if masks is not None:
        if corruption is not None or data_survival is not None:
            raise ValueError("masks: give either masks or corruption/data_survival, not both")
        if masks.ndim == 4:
            masks = masks[None]
        if masks.ndim != 5 or tuple(masks.shape[1:]) != tuple(shape):
            raise ValueError(f"masks must have shape {tuple(shape)} or (K, *{tuple(shape)}), "
                             f"got {tuple(masks.shape)}")
        if num_masks not in (1, masks.shape[0]):
            raise ValueError(f"num_masks={num_masks} disagrees with the {masks.shape[0]} masks given")
        return check_mask(masks, name="masks").double()
    if corruption is None:
        if data_survival is not None:
            raise ValueError("data_survival needs corruption (for its delta and mask_full_rgb)")
        if num_masks != 1:
            raise ValueError("num_masks > 1 needs corruption or masks")
        return None
    # mask 0 of a sample is sampling_masks(seed); mask k >= 1 uses the seed mix_seed(seed, k).
    return torch.stack([
        sampling_masks(corruption, shape, [s if k == 0 else mix_seed(s, k) for s in seeds],
                       data_survival=data_survival).double()
        for k in range(num_masks)])


def _check_sample_args(denoiser, shape, seeds, solver, clip, num_masks, guidance_scale) -> tuple[int, ...]:
    """The boundary check of :func:`ambient_sample` (nothing inside the solver loop checks again)."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != 4 or min(shape) < 1:
        raise ValueError(f"shape must be (N, C, H, W) with positive sizes, got {shape}")
    if len(seeds) != shape[0]:
        raise ValueError(f"seeds: need one seed per sample, got {len(seeds)} seeds for N={shape[0]}")
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {', '.join(SOLVERS)}, got {solver!r}")
    if clip not in CLIPS:
        raise ValueError(f"clip must be one of {', '.join(CLIPS)}, got {clip!r}")
    if int(num_masks) != num_masks or num_masks < 1:
        raise ValueError(f"num_masks must be an integer >= 1, got {num_masks!r}")
    if not guidance_scale >= 0:
        raise ValueError(f"guidance_scale must be >= 0, got {guidance_scale!r}")
    if isinstance(denoiser, MaskDenoiser) and shape[1] != denoiser.img_channels:
        raise ValueError(f"shape has {shape[1]} channels but the denoiser takes {denoiser.img_channels}")
    return shape


def ambient_sample(
    denoiser, shape: Sequence[int], seeds: Sequence[int], *, corruption: Corruption | None = None,
    data_survival: float | None = None, masks: torch.Tensor | None = None, num_steps: int = 18,
    sigma_min: float | None = None, sigma_max: float | None = None, rho: float = 7.0, solver: str = "heun",
    churn: float = 0.0, num_masks: int = 1, guidance_scale: float = 0.0, clip: str = "none",
    device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
    callback: Callable[[dict], None] | None = None, sigmas: torch.Tensor | None = None,
) -> torch.Tensor:
    """Draw N = len(seeds) samples of ``shape`` (N, C, H, W) with fixed masks: draws the masks
    and the initial noise from the seeds, wraps ``denoiser`` in a :class:`FixedMaskEnsemble` and
    calls the solver.

    Each step calls ``denoiser(mask_k ⊙ x_t, sigma, mask_k)`` (x and mask in ``dtype``,
    sigma a (N,) tensor in ``dtype``) for k = 1..K and uses x0 = mean_k clip(D_k) in the
    Euler/Heun ODE step. Masks (survival (1 − p)(1 − δ), or ``data_survival``·(1 − δ)) come
    from :func:`ambient.data.corruption.sampling_masks`: mask 0 from the sample's seed, mask k from
    ``mix_seed(seed, k)``; or the caller's ``masks`` of shape (N, C, H, W) or (K, N, C, H, W).
    Without corruption and masks the denoiser gets ``mask=None`` (plain EDM sampling).
    ``sigmas`` replaces the EDM schedule (num_steps, sigma_min, sigma_max, rho are then unused),
    e.g. with a model's own ``schedule(n)`` (see :func:`model_sigmas`). ``sigma_min`` /
    ``sigma_max`` default to the denoiser's (EDM's 0.002 / 80 for plain callables).
    Note: averaging K > 1 predictions shrinks the variance of pixels hidden from some masks (on
    a 4×4 Gaussian with the exact denoiser, survival 0.45: covariance error 0.05 at K=1, 0.47 at K=4).

    Guidance (``guidance_scale`` = g > 0, needs K >= 2): with E = mean over pairs k < l of
    ||D_k − D_l||² (per sample, summed over pixels), the ODE derivative becomes
    d = (x − mean_k D_k)/σ + g ∇_x E. As σ decreases a step moves by −|Δσ| g ∇_x E, i.e. down
    the disagreement energy. (The reference compared the first prediction with the others and
    added its gradient unscaled by Δσ; here it is part of the ODE derivative.) Autograd is used
    only then; with g = 0 everything runs under ``torch.no_grad()``. The term is an explicit
    gradient step of size |Δσ|·g, so a large g (≳ 1 on unit-scale images) can make it unstable.

    Noise: sample i's initial noise and churn noise come from its own CPU generator seeded by
    ``mix_seed(NOISE_STREAM, seeds[i])`` (:mod:`ambient.rng`), so a seed gives the same image at any
    batch size or device.
    The ODE state is float64; the result is returned in ``dtype`` on ``device`` (default: the
    denoiser's). ``clip``: "static" clamps each prediction to [−1, 1]; "dynamic" applies
    :func:`dynamic_threshold` (per-sample 0.99 quantile of |x0|).
    """
    shape = _check_sample_args(denoiser, shape, seeds, solver, clip, num_masks, guidance_scale)
    if sigmas is None:
        sigma_min = _attr(denoiser, "sigma_min") if sigma_min is None else sigma_min
        sigma_max = _attr(denoiser, "sigma_max") if sigma_max is None else sigma_max
        sigmas = edm_sigmas(num_steps, sigma_min, sigma_max, rho)
    else:  # a model's own schedule (e.g. a finetuned DDPM's discrete σ's), decreasing, ending in 0
        sigmas = torch.as_tensor(sigmas, dtype=torch.float64).cpu()
        if sigmas.ndim != 1 or sigmas.numel() < 2 or sigmas[-1] != 0 or bool((sigmas[1:] >= sigmas[:-1]).any()):
            raise ValueError("sigmas must be a decreasing 1-D schedule ending in 0")
    device = torch.device(device) if device is not None else _device_of(denoiser)
    fixed = _fixed_masks(shape, seeds, corruption, data_survival, masks, int(num_masks))
    fixed = None if fixed is None else fixed.to(device, dtype)
    k_masks = 1 if fixed is None else fixed.shape[0]
    if guidance_scale > 0 and k_masks < 2:
        raise ValueError("guidance_scale > 0 needs num_masks >= 2 (it makes K predictions agree)")

    noise = SeedNoise(seeds, stream=NOISE_STREAM, device=device)
    ensemble = FixedMaskEnsemble(denoiser, fixed, clip=clip, guidance_scale=guidance_scale, dtype=dtype)
    step = solver_by_name(solver)
    with torch.no_grad():
        x = noise.randn(shape) * sigmas[0]
        out = step(ensemble, x, sigmas.to(device), churn=churn, noise_fn=noise.randn, callback=callback)
    return out.to(dtype)


def iter_sample_batches(denoiser, num: int, seeds: Sequence[int], batch: int, *,
                        image_shape: Sequence[int], **kwargs) -> Iterator[tuple[list[int], torch.Tensor]]:
    """Yield (seeds, images) for consecutive chunks of ``batch`` seeds; kwargs go to :func:`ambient_sample`."""
    if len(seeds) != num:
        raise ValueError(f"seeds: need {num} seeds, got {len(seeds)}")
    if int(batch) != batch or batch < 1:
        raise ValueError(f"batch must be an integer >= 1, got {batch!r}")
    for start in range(0, num, int(batch)):
        chunk = [int(s) for s in seeds[start:start + int(batch)]]
        yield chunk, ambient_sample(denoiser, (len(chunk), *image_shape), chunk, **kwargs)


def sample_in_batches(denoiser, num: int, seeds: Sequence[int], batch: int, *,
                      image_shape: Sequence[int], **kwargs) -> torch.Tensor:
    """``num`` samples (one per seed) drawn ``batch`` at a time, concatenated on the CPU.

    Because each sample depends only on its seed, the result does not depend on ``batch``.
    """
    if num == 0:
        return torch.empty((0, *image_shape), dtype=kwargs.get("dtype", torch.float32))
    return torch.cat([x.cpu() for _, x in iter_sample_batches(denoiser, num, seeds, batch,
                                                               image_shape=image_shape, **kwargs)])
