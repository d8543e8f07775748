"""Sampling: EDM σ schedule, Euler / Heun solvers, and the fixed-mask ambient sampler.

The solvers follow EDM (Karras et al. 2022, Algorithm 2) as plain functions in the
k-diffusion style: ``sample_heun(denoise, x, sigmas)`` with ``denoise(x, sigma) -> x0``.
The ODE state is kept in float64; denoiser outputs are cast to float64.

:func:`ambient_sample` wraps a mask-aware denoiser ``D(x, sigma, mask)``: each sample gets K
masks fixed for the whole trajectory (a pure function of its seed), the network sees
``mask ⊙ x_t`` and the mask, and the K clean-image predictions are averaged. Optionally a
mask-agreement term pulls the K predictions together (see :func:`ambient_sample`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import torch

from ambient.corruption import Corruption, check_mask, mix_seed, sampling_masks

_NOISE_STREAM = 0x5EED
SOLVERS = ("heun", "euler")
CLIPS = ("none", "static", "dynamic")

Denoise = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


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


def ambient_sample(
    denoiser, shape: Sequence[int], seeds: Sequence[int], *, corruption: Corruption | None = None,
    data_survival: float | None = None, masks: torch.Tensor | None = None, num_steps: int = 18,
    sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0, solver: str = "heun",
    churn: float = 0.0, num_masks: int = 1, guidance_scale: float = 0.0, clip: str = "none",
    device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
    callback: Callable[[dict], None] | None = None, sigmas: torch.Tensor | None = None,
) -> torch.Tensor:
    """Draw N = len(seeds) samples of ``shape`` (N, C, H, W) with fixed masks.

    Each step calls ``denoiser(mask_k ⊙ x_t, sigma, mask_k)`` (x and mask in ``dtype``,
    sigma a (N,) tensor in ``dtype``) for k = 1..K and uses x0 = mean_k clip(D_k) in the
    Euler/Heun ODE step. Masks (survival (1 − p)(1 − δ), or ``data_survival``·(1 − δ)) come
    from :func:`ambient.corruption.sampling_masks`: mask 0 from the sample's seed, mask k from
    ``mix_seed(seed, k)``; or the caller's ``masks`` of shape (N, C, H, W) or (K, N, C, H, W).
    Without corruption and masks the denoiser gets ``mask=None`` (plain EDM sampling).
    ``sigmas`` replaces the EDM schedule (num_steps, sigma_min, sigma_max, rho are then unused),
    e.g. with a finetuned model's ``sampling_sigmas(n)``.
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
    ``mix_seed(0x5EED, seeds[i])``, so a seed gives the same image at any batch size or device.
    The ODE state is float64; the result is returned in ``dtype`` on ``device`` (default: the
    denoiser's). ``clip``: "static" clamps each prediction to [−1, 1]; "dynamic" applies
    :func:`dynamic_threshold` (per-sample 0.99 quantile of |x0|).
    """
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
    if sigmas is None:
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

    n = shape[0]
    gens = [torch.Generator().manual_seed(mix_seed(_NOISE_STREAM, int(s))) for s in seeds]

    def noise_fn(size) -> torch.Tensor:
        return torch.stack([torch.randn(tuple(size[1:]), generator=g, dtype=torch.float64)
                            for g in gens]).to(device)

    def predictions(x: torch.Tensor, sigma: torch.Tensor) -> list[torch.Tensor]:
        sig = sigma.to(device, dtype).reshape(1).expand(n)
        if fixed is None:
            return [_clip(denoiser(x, sig, None), clip)]
        return [_clip(denoiser(m * x, sig, m), clip) for m in fixed]

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        if guidance_scale == 0:
            preds = predictions(x.to(dtype), sigma)
            return torch.stack(preds).double().mean(0)
        with torch.enable_grad():
            xg = x.to(dtype).detach().requires_grad_(True)
            preds = torch.stack(predictions(xg, sigma))
            k = preds.shape[0]
            diff = (preds[:, None] - preds[None]).reshape(k, k, n, -1)
            energy = diff.pow(2).sum() / (k * (k - 1))  # Σ_i mean_{k<l} ||D_k − D_l||²
            (grad,) = torch.autograd.grad(energy, xg)
        # Folded into the "denoised" estimate so that (x − D_eff)/σ = (x − D̄)/σ + g ∇E.
        return preds.detach().double().mean(0) - sigma * guidance_scale * grad.double()

    step = sample_heun if solver == "heun" else sample_euler
    with torch.no_grad():
        x = noise_fn((n, *shape[1:])) * sigmas[0]
        out = step(denoise, x, sigmas.to(device), churn=churn, noise_fn=noise_fn, callback=callback)
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
