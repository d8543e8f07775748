"""Procedural head-like phantoms: a data set with known clean images for the MRI-style benchmark (issue 25).

Each phantom is drawn like a randomised Shepp–Logan phantom (Shepp & Logan 1974: a head as a sum of ellipses
with additive intensities) and given smooth texture, so that a prior has more to learn than flat regions:

* a head ellipse (centre jittered, semi-axes 0.72–0.95 of the half-width, tilted up to ±0.25 rad) whose rim
  (the outer 7–14 % of its axes) is darker (0.15–0.35) than the brain inside it (0.45–0.65);
* 3–10 inner ellipses (semi-axes 0.05–0.3, any angle) inside the brain, each adding a signed intensity
  (magnitude 0.08–0.3, negative with probability 0.4); about a third are centred next to the previous one, so
  that some overlap or nest (as the ventricles of Shepp–Logan); they are clipped to the brain;
* texture from two smooth random fields (sums of Fourier modes up to frequency 6 per axis, amplitudes decaying
  as 1 / (1 + |k|²), no constant mode, scaled to unit variance in expectation): one multiplies the brain's
  intensity by 1 + t f₁ (t 0.05–0.2), the other each inner ellipse's by 1 + t_j f₂ (t_j 0–0.5).

The sum is clipped to [0, 1]; the background is 0. Edges are anti-aliased: a pixel's coverage of an ellipse
is a linear ramp, one pixel wide, of the ellipse's first-order signed distance (q − 1) / |∇q|.

Phantom i is a pure function of (seed, i): its parameters come from a ``torch.Generator`` seeded with
``mix_seed(PHANTOM_STREAM, seed, i)`` and do not depend on ``size``, so ``phantoms(n)`` is a prefix of
``phantoms(m)`` for n < m, and the same phantom is drawn at every resolution (coordinates run over [-1, 1]²,
pixel centres). Rendering is vectorised over chunks of phantoms (a few thousand 64×64 in seconds).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch

from ambient.io import atomic_save_npz
from ambient.rng import PHANTOM_STREAM, mix_seed

MAX_INNER = 10  # inner ellipses: 3 … MAX_INNER per phantom
FREQ = 6  # texture fields hold Fourier modes -FREQ … FREQ along each axis
_PER_INNER = 9  # uniforms per inner ellipse slot: r, θ, a, b, angle, |I|, sign, nest, texture
_HEAD = 10  # uniforms for the head: cx, cy, a, b, angle, rim scale, rim I, brain I, count, brain texture
NUM_UNIFORMS = _HEAD + MAX_INNER * _PER_INNER


def _draw(seed: int, index: int) -> tuple[np.ndarray, np.ndarray]:
    """Phantom ``index``'s uniforms (NUM_UNIFORMS,) and texture coefficients (2, 2, 2F+1, 2F+1), float64."""
    g = torch.Generator().manual_seed(mix_seed(PHANTOM_STREAM, seed, index))
    u = torch.rand(NUM_UNIFORMS, generator=g, dtype=torch.float64)
    c = torch.randn((2, 2, 2 * FREQ + 1, 2 * FREQ + 1), generator=g, dtype=torch.float64)
    return u.numpy(), c.numpy()


def _ellipse_params(u: np.ndarray) -> tuple[np.ndarray, ...]:
    """From uniforms (B, NUM_UNIFORMS): ellipse parameters (B, 2 + MAX_INNER) each (cx, cy, a, b, angle), the
    inner ellipses' signed intensities and texture strengths (B, MAX_INNER), whether each slot is used,
    and the head's intensities and brain texture (B,)."""
    lerp = lambda t, lo, hi: lo + (hi - lo) * t  # noqa: E731
    cx, cy = lerp(u[:, 0], -0.05, 0.05), lerp(u[:, 1], -0.05, 0.05)
    ha, hb = lerp(u[:, 2], 0.72, 0.9), lerp(u[:, 3], 0.82, 0.95)
    hang = lerp(u[:, 4], -0.25, 0.25)
    scale = lerp(u[:, 5], 0.86, 0.93)
    rim_i, brain_i = lerp(u[:, 6], 0.15, 0.35), lerp(u[:, 7], 0.45, 0.65)
    count = 3 + np.minimum(np.floor(u[:, 8] * (MAX_INNER - 2)), MAX_INNER - 3).astype(np.int64)
    brain_tex = lerp(u[:, 9], 0.05, 0.2)
    ba, bb = ha * scale, hb * scale
    inner = u[:, _HEAD:].reshape(len(u), MAX_INNER, _PER_INNER)
    r, theta = 0.8 * np.sqrt(inner[..., 0]), 2 * math.pi * inner[..., 1]
    lx, ly = r * np.cos(theta) * ba[:, None], r * np.sin(theta) * bb[:, None]  # in the brain's frame
    ex = cx[:, None] + lx * np.cos(hang)[:, None] - ly * np.sin(hang)[:, None]
    ey = cy[:, None] + lx * np.sin(hang)[:, None] + ly * np.cos(hang)[:, None]
    ea, eb = lerp(inner[..., 2], 0.05, 0.3), lerp(inner[..., 3], 0.05, 0.3)
    eang = math.pi * inner[..., 4]
    for j in range(1, MAX_INNER):  # nest about a third next to the previous ellipse (shifted by a quarter of it)
        nest = inner[:, j, 7] < 0.35
        ex[:, j] = np.where(nest, ex[:, j - 1] + 0.25 * ea[:, j - 1] * np.cos(theta[:, j]), ex[:, j])
        ey[:, j] = np.where(nest, ey[:, j - 1] + 0.25 * eb[:, j - 1] * np.sin(theta[:, j]), ey[:, j])
    intensity = lerp(inner[..., 5], 0.08, 0.3) * np.where(inner[..., 6] < 0.4, -1.0, 1.0)
    tex = 0.5 * inner[..., 8]
    used = np.arange(MAX_INNER)[None, :] < count[:, None]
    ellipses = np.stack([
        np.concatenate([cx[:, None], cx[:, None], ex], 1),
        np.concatenate([cy[:, None], cy[:, None], ey], 1),
        np.concatenate([ha[:, None], ba[:, None], ea], 1),
        np.concatenate([hb[:, None], bb[:, None], eb], 1),
        np.concatenate([hang[:, None], hang[:, None], eang], 1),
    ])
    return ellipses, intensity * used, tex, rim_i, brain_i, brain_tex


def _coverage(ellipses: np.ndarray, grid: np.ndarray, pixel: float) -> np.ndarray:
    """Anti-aliased coverage (B, E, H, W) of ellipses (5, B, E) on the pixel-centre grid (H or W,)."""
    cx, cy, a, b, ang = (p[..., None, None].astype(np.float32) for p in ellipses)
    dx = grid[None, None, None, :] - cx
    dy = grid[None, None, :, None] - cy
    cos, sin = np.cos(ang), np.sin(ang)
    u = dx * cos + dy * sin
    v = dy * cos - dx * sin
    ua, vb = u / (a * a), v / (b * b)
    q = u * ua + v * vb
    grad = 2 * np.sqrt(ua * ua + vb * vb)
    dist = (q - 1) / np.maximum(grad, 1e-6)
    return np.clip(0.5 - dist / pixel, 0.0, 1.0)


def _fields(coef: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Smooth random fields (B, 2, H, W) from coefficients (B, 2, 2, 2F+1, 2F+1) (field, re/im, ky, kx)."""
    k = np.arange(-FREQ, FREQ + 1, dtype=np.float64)
    amp = 1.0 / (1.0 + k[:, None] ** 2 + k[None, :] ** 2)
    amp[FREQ, FREQ] = 0.0  # no constant mode
    amp /= np.sqrt((amp ** 2).sum())  # unit variance in expectation
    c = (coef[:, :, 0] + 1j * coef[:, :, 1]) * amp
    basis = np.exp(1j * math.pi * k[:, None] * grid[None, :])  # (2F+1, H or W)
    out = np.einsum("yh,bfyx,xw->bfhw", basis, c, basis, optimize=True)
    return out.real.astype(np.float32)


def _render(u: np.ndarray, coef: np.ndarray, size: int) -> np.ndarray:
    ellipses, intensity, tex, rim_i, brain_i, brain_tex = _ellipse_params(u)
    grid = (-1 + (2 * np.arange(size) + 1) / size).astype(np.float32)
    cover = _coverage(ellipses, grid, 2.0 / size)  # (B, 2 + MAX_INNER, H, W)
    fields = _fields(coef, grid)
    col = lambda t: t.astype(np.float32)[:, None, None]  # noqa: E731
    head, brain, inner = cover[:, 0], cover[:, 1], cover[:, 2:]
    img = col(rim_i) * head + col(brain_i - rim_i) * brain + col(brain_i * brain_tex) * fields[:, 0] * brain
    weights = intensity.astype(np.float32)[..., None, None] * (1 + tex.astype(np.float32)[..., None, None]
                                                               * fields[:, 1:2])
    img += brain * (weights * inner).sum(1)
    return np.clip(img, 0.0, 1.0)


def phantoms(num: int, size: int = 64, seed: int = 0, *, dtype: np.dtype | type = np.float32) -> np.ndarray:
    """``num`` procedural head phantoms (num, size, size) in [0, 1] (see the module doc): phantom i is a pure
    function of (seed, i), the same at every ``num`` and, up to resolution, at every ``size``."""
    for name, value, low in (("num", num, 0), ("size", size, 1)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    num, size = int(num), int(size)
    out = np.empty((num, size, size), dtype=dtype)
    chunk = max(1, 2 ** 19 // (size * size))
    for start in range(0, num, chunk):
        stop = min(num, start + chunk)
        draws = [_draw(int(seed), i) for i in range(start, stop)]
        u = np.stack([d[0] for d in draws])
        coef = np.stack([d[1] for d in draws])
        out[start:stop] = _render(u, coef, size)
    return out


def write_phantoms_npz(path: str | os.PathLike, num: int, size: int = 64, seed: int = 0) -> Path:
    """Write ``phantoms(num, size, seed)`` as an npz of float data: ``images`` float32 (N, H, W) and
    ``value_range`` float64 [0, 1] (the range the images' values are in). Atomic; returns the path."""
    images = phantoms(num, size, seed, dtype=np.float32)
    return atomic_save_npz(path, images=images, value_range=np.asarray([0.0, 1.0], dtype=np.float64))
