"""Full-reference image quality per image: PSNR and SSIM, for restorations scored against clean images.

Both take image batches (N, C, H, W) (any real dtype, computed in float64) and return one float64 value per
image, (N,). ``data_range`` is the width of the images' value range (2 for images in [-1, 1], 1 for [0, 1]).

PSNR = 10 log10(data_range² / MSE), the MSE over all C·H·W values of the image (+inf for identical images).

SSIM follows Wang, Bovik, Sheikh & Simoncelli, "Image quality assessment: from error visibility to structural
similarity", IEEE TIP 13(4), 2004: local means, variances and covariance under a Gaussian window (σ = 1.5,
11×11, weights normalised to sum 1; the population moments, no n/(n−1) correction), constants
C1 = (0.01 L)², C2 = (0.03 L)² with L = data_range, and

    SSIM(x, y) = (2 μx μy + C1)(2 σxy + C2) / ((μx² + μy² + C1)(σx² + σy² + C2))

at every position where the window lies wholly inside the image (the *valid* map, (H − 10) × (W − 10); no
padding), averaged over those positions and over channels. This is the number scikit-image's
``structural_similarity(x, y, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
data_range=L, channel_axis=…)`` reports: it filters with padding but averages only the map cropped by the
window's half-width, the same valid positions. Images must be at least 11×11.
"""

from __future__ import annotations

import math
import numbers

import torch

WINDOW = 11  # Gaussian window size (pixels per side)
SIGMA = 1.5  # its standard deviation (pixels)
K1, K2 = 0.01, 0.03


def _check(x: torch.Tensor, ref: torch.Tensor, data_range: float) -> float:
    for name, t in (("x", x), ("ref", ref)):
        if not isinstance(t, torch.Tensor) or t.ndim != 4 or t.is_complex():
            raise ValueError(f"{name} must be a real (N, C, H, W) tensor, got {getattr(t, 'shape', type(t))}")
    if x.shape != ref.shape:
        raise ValueError(f"x and ref must have the same shape, got {tuple(x.shape)} and {tuple(ref.shape)}")
    if isinstance(data_range, bool) or not isinstance(data_range, numbers.Real) or not (
            math.isfinite(data_range) and data_range > 0):
        raise ValueError(f"data_range must be a finite number > 0, got {data_range!r}")
    return float(data_range)


def psnr(x: torch.Tensor, ref: torch.Tensor, data_range: float) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image, (N,) float64 (+inf where x equals ref)."""
    data_range = _check(x, ref, data_range)
    mse = (x.double() - ref.double()).square().flatten(1).mean(1)
    return 10 * torch.log10(data_range ** 2 / mse)


def gaussian_window(size: int = WINDOW, sigma: float = SIGMA, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The 1-D window (size,): exp(−t² / 2σ²) at t = −(size−1)/2 … (size−1)/2, normalised to sum 1 (the 2-D
    window is its outer product with itself)."""
    t = torch.arange(size, dtype=dtype) - (size - 1) / 2
    w = torch.exp(-t.square() / (2 * sigma ** 2))
    return w / w.sum()


def _filter(t: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Separable valid-mode filtering of (M, 1, H, W) by the window w (k,): (M, 1, H − k + 1, W − k + 1)."""
    k = w.numel()
    t = torch.nn.functional.conv2d(t, w.view(1, 1, k, 1))
    return torch.nn.functional.conv2d(t, w.view(1, 1, 1, k))


def ssim_map(x: torch.Tensor, ref: torch.Tensor, data_range: float) -> torch.Tensor:
    """The SSIM map (N, C, H − 10, W − 10), float64, on the valid positions (see the module doc)."""
    data_range = _check(x, ref, data_range)
    n, c, h, w = x.shape
    if h < WINDOW or w < WINDOW:
        raise ValueError(f"SSIM needs images of at least {WINDOW}×{WINDOW} pixels, got {h}×{w}")
    a = x.detach().double().reshape(n * c, 1, h, w)
    b = ref.detach().double().reshape(n * c, 1, h, w).to(a.device)
    win = gaussian_window(dtype=torch.float64).to(a.device)
    stats = _filter(torch.cat([a, b, a * a, b * b, a * b], 1).reshape(5 * n * c, 1, h, w), win)
    mu_a, mu_b, aa, bb, ab = stats.reshape(n * c, 5, *stats.shape[2:]).unbind(1)
    var_a, var_b, cov = aa - mu_a.square(), bb - mu_b.square(), ab - mu_a * mu_b
    c1, c2 = (K1 * data_range) ** 2, (K2 * data_range) ** 2
    s = (2 * mu_a * mu_b + c1) * (2 * cov + c2) / ((mu_a.square() + mu_b.square() + c1) * (var_a + var_b + c2))
    return s.reshape(n, c, *s.shape[1:])


def ssim(x: torch.Tensor, ref: torch.Tensor, data_range: float) -> torch.Tensor:
    """Structural similarity per image, (N,) float64: the mean of :func:`ssim_map` over channels and valid
    positions (1 for identical images, symmetric in x and ref, at most 1)."""
    return ssim_map(x, ref, data_range).flatten(1).mean(1)
