"""ambient.metrics.quality: PSNR of known errors; SSIM's defining properties, hand-computed cases, and the
same formula evaluated independently with scipy's Gaussian filter (scikit-image's recipe)."""

import math

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from ambient.metrics.quality import gaussian_window, psnr, ssim, ssim_map


def images(n=3, c=1, h=24, w=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.rand((n, c, h, w), generator=g, dtype=torch.float64)
    return torch.nn.functional.avg_pool2d(torch.nn.functional.pad(base, (1, 1, 1, 1), mode="replicate"), 3, 1)


def test_psnr_of_known_mse():
    ref = images()
    x = ref + 0.1  # MSE 0.01
    np.testing.assert_allclose(psnr(x, ref, 1.0).numpy(), 20.0, rtol=1e-12)
    np.testing.assert_allclose(psnr(x, ref, 2.0).numpy(), 10 * math.log10(4 / 0.01), rtol=1e-12)
    y = ref.clone()
    y[1] += 0.5 * torch.where(torch.arange(20) % 2 == 0, 1.0, -1.0).double()  # MSE 0.25, image 1 only
    out = psnr(y, ref, 1.0)
    assert out.dtype == torch.float64 and out.shape == (3,)
    assert out[0] == math.inf and out[2] == math.inf
    assert out[1].item() == pytest.approx(10 * math.log10(1 / 0.25))


def test_ssim_identity_symmetry_bounds():
    a, b = images(seed=1), images(seed=2)
    np.testing.assert_allclose(ssim(a, a, 1.0).numpy(), 1.0, atol=1e-12)
    s_ab, s_ba = ssim(a, b, 1.0), ssim(b, a, 1.0)
    np.testing.assert_allclose(s_ab.numpy(), s_ba.numpy(), atol=1e-12)
    assert (s_ab < 1).all() and (s_ab > -1).all()
    assert s_ab.dtype == torch.float64 and s_ab.shape == (3,)
    m = ssim_map(a, b, 1.0)
    assert m.shape == (3, 1, 24 - 10, 20 - 10)


def test_ssim_decreases_with_noise():
    ref = images(n=2, c=3, h=32, w=32, seed=3)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    scores = [ssim(ref + s * noise, ref, 1.0) for s in (0.0, 0.01, 0.03, 0.1, 0.3)]
    for lo, hi in zip(scores[1:], scores[:-1]):
        assert (lo < hi).all()


def test_ssim_constant_images_by_hand():
    """11×11 constant images: one valid position, σ terms 0, SSIM = (2ab + C1) / (a² + b² + C1)."""
    x = torch.full((1, 1, 11, 11), 0.2, dtype=torch.float64)
    y = torch.full((1, 1, 11, 11), 0.6, dtype=torch.float64)
    c1 = (0.01 * 1.0) ** 2
    assert ssim(x, y, 1.0).item() == pytest.approx((2 * 0.2 * 0.6 + c1) / (0.04 + 0.36 + c1), rel=1e-12)
    c1 = (0.01 * 2.0) ** 2  # data_range 2
    assert ssim(x, y, 2.0).item() == pytest.approx((2 * 0.2 * 0.6 + c1) / (0.04 + 0.36 + c1), rel=1e-12)


def test_ssim_checkerboards_by_hand():
    """x = m + d·c, y = m − d·c for the checkerboard c = (−1)^(i+j) on 11×11: with s = Σ_t w_t (−1)^t for the
    1-D Gaussian weights w (σ 1.5), the window's mean of c is s², so μ = m ± d s², σx² = σy² = d²(1 − s⁴),
    σxy = −d²(1 − s⁴)."""
    w = [math.exp(-((t - 5) ** 2) / (2 * 1.5 ** 2)) for t in range(11)]
    w = [v / sum(w) for v in w]
    s = sum(v * (-1) ** t for t, v in enumerate(w))
    m, d, L = 0.5, 0.2, 1.0
    c1, c2 = (0.01 * L) ** 2, (0.03 * L) ** 2
    mx, my, var = m + d * s * s, m - d * s * s, d * d * (1 - s ** 4)
    want = (2 * mx * my + c1) * (-2 * var + c2) / ((mx * mx + my * my + c1) * (2 * var + c2))
    c = torch.tensor([[(-1.0) ** (i + j) for j in range(11)] for i in range(11)], dtype=torch.float64)
    got = ssim((m + d * c)[None, None], (m - d * c)[None, None], L).item()
    assert got == pytest.approx(want, rel=1e-10)
    assert got < -0.9  # anti-correlated structure
    np.testing.assert_allclose(gaussian_window().numpy(), w, rtol=1e-14)


def reference_ssim(x: np.ndarray, y: np.ndarray, L: float) -> float:
    """Wang et al. 2004 as scikit-image computes it with gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False: scipy's Gaussian filter (truncate 3.5 → an 11-tap window), then the
    map cropped by 5 pixels on each side, averaged; channels averaged. Written out independently here."""
    out = []
    for a, b in zip(x, y):
        f = lambda t: gaussian_filter(t, sigma=1.5, truncate=3.5, mode="reflect")  # noqa: E731
        ma, mb = f(a), f(b)
        va, vb, cab = f(a * a) - ma * ma, f(b * b) - mb * mb, f(a * b) - ma * mb
        c1, c2 = (0.01 * L) ** 2, (0.03 * L) ** 2
        s = (2 * ma * mb + c1) * (2 * cab + c2) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2))
        out.append(s[5:-5, 5:-5].mean())
    return float(np.mean(out))


@pytest.mark.parametrize("L", [1.0, 2.0])
def test_ssim_matches_the_scipy_recipe(L):
    ref = images(n=2, c=3, h=30, w=26, seed=4) * L - (L / 2 if L == 2 else 0)
    g = torch.Generator().manual_seed(1)
    x = ref + 0.1 * L * torch.randn(ref.shape, generator=g, dtype=torch.float64)
    got = ssim(x, ref, L)
    for i in range(2):
        assert got[i].item() == pytest.approx(reference_ssim(x[i].numpy(), ref[i].numpy(), L), abs=1e-12)


def test_dtypes_and_per_image():
    ref = images(n=4, c=1, h=16, w=16, seed=5)
    x = ref + 0.05 * images(n=4, c=1, h=16, w=16, seed=6)
    full = ssim(x, ref, 1.0)
    np.testing.assert_allclose(ssim(x.float(), ref.float(), 1.0).numpy(), full.numpy(), atol=1e-6)
    for i in range(4):
        assert ssim(x[i:i + 1], ref[i:i + 1], 1.0).item() == pytest.approx(full[i].item(), abs=1e-14)
        assert psnr(x[i:i + 1], ref[i:i + 1], 1.0).item() == pytest.approx(psnr(x, ref, 1.0)[i].item())


@pytest.mark.parametrize("fn", [psnr, ssim])
def test_bad_inputs(fn):
    a = torch.zeros(1, 1, 12, 12)
    with pytest.raises(ValueError):
        fn(a, torch.zeros(1, 1, 12, 13), 1.0)
    with pytest.raises(ValueError):
        fn(a[0], a[0], 1.0)
    for bad in (0, -1.0, float("nan"), True, "1"):
        with pytest.raises(ValueError):
            fn(a, a, bad)


def test_ssim_needs_the_window():
    with pytest.raises(ValueError, match="11"):
        ssim(torch.zeros(1, 1, 10, 20), torch.zeros(1, 1, 10, 20), 1.0)
