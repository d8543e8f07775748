"""The steps of the EM learner (:mod:`ambient.em`): observations' fingerprint and subsets, the MMPS
E-step, the ambient-model start of lap 0, and the npz helpers of the run folder."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from ambient.corruption import mix_seed
from ambient.data import float_to_uint8
from ambient.operators import MaskOperator
from ambient.posterior import MMPS, AmbientMean
from ambient.sampling import model_sigmas
from ambient.solvers import sample_euler, sample_heun


def fingerprint(y: torch.Tensor, mask: torch.Tensor) -> str:
    h = hashlib.sha256()
    h.update(str(tuple(y.shape)).encode())
    h.update(float_to_uint8(y).numpy().tobytes())
    h.update(mask.to(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]


def subset(n: int, size: int | None, *parts: int) -> torch.Tensor:
    """Sorted indices of ``size`` of n observations, a pure function of ``parts`` (all when size covers n)."""
    if size is None or size >= n:
        return torch.arange(n)
    g = torch.Generator().manual_seed(mix_seed(*parts))
    return torch.randperm(n, generator=g)[:size].sort().values


def mmps_samples(denoiser, y: torch.Tensor, mask: torch.Tensor, seeds: list[int], *, steps: int, cg_iters: int,
                 sigma_y: float, solver: str = "heun") -> tuple[torch.Tensor, dict]:
    """One MMPS posterior sample per observation (observed pixels put back), and the network calls.

    Sample i starts from noise drawn by its own generator seeded with ``seeds[i]``.
    """
    wrapper = MMPS(denoiser, y, MaskOperator(mask), sigma_y, cg_iters=cg_iters)
    sigmas = model_sigmas(denoiser, steps).to(y.device)
    x = torch.stack([torch.randn(y.shape[1:], generator=torch.Generator().manual_seed(s), dtype=torch.float64)
                     for s in seeds]).to(y.device)
    solve = sample_heun if solver == "heun" else sample_euler
    out = solve(wrapper, x * sigmas[0], sigmas).to(y.dtype)
    return mask * y + (1 - mask) * out, dict(wrapper.calls)


def read_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def to_hwc(images: torch.Tensor) -> np.ndarray:
    return float_to_uint8(images).permute(0, 2, 3, 1).contiguous().numpy()


def ambient_mean(denoiser, y: torch.Tensor, mask: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """E[x | y] by a mask-input (ambient) model, D(A ⊙ y, σ_min, A), observed pixels put back; float32."""
    out = []
    for s in range(0, y.shape[0], batch):
        yb, mb = y[s:s + batch], mask[s:s + batch]
        mean = AmbientMean(denoiser, yb, mb, sigma_floor=float(getattr(denoiser, "sigma_min", 0.002)))
        with torch.no_grad():
            est = mean(yb, torch.ones(())).to(torch.float32)
        out.append(mb * yb + (1 - mb) * est)
    return torch.cat(out) if out else y.clone()
