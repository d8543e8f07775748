"""Measurement operators against definitions: exact adjoints, dense references, the saved form, line masks, and
MMPS with each operator against the closed-form Gaussian posterior E[x0 | x_t, y]."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
import torch

from ambient.nets.oracle import GaussianDenoiser, smooth_covariance
from ambient.operators import (
    KINDS,
    BlurOperator,
    KSpaceOperator,
    LinearOperator,
    MaskOperator,
    cartesian_mask,
    gaussian_kernel,
    operator_from_spec,
)
from ambient.sampling.posterior import MMPS

F64 = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def smooth_maps(k: int, coils: int, h: int, w: int, seed: int) -> torch.Tensor:
    """Complex coil sensitivities (k, coils, h, w): a smooth magnitude bump per coil with a linear phase."""
    g = gen(seed)
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, h, dtype=F64), torch.linspace(-1, 1, w, dtype=F64), indexing="ij")
    out = torch.empty(k, coils, h, w, dtype=torch.complex128)
    for i in range(k):
        for c in range(coils):
            cy, cx, a, b = (torch.rand(4, generator=g, dtype=F64) * 2 - 1).tolist()
            mag = torch.exp(-((ys - cy) ** 2 + (xs - cx) ** 2))
            out[i, c] = mag * torch.exp(1j * math.pi * (a * ys + b * xs))
    return out


def make(name: str, n: int = 3) -> LinearOperator:
    """Operators of every kind; ``n`` observations where the kind holds one per observation."""
    g = gen(sum(map(ord, name)))
    if name == "mask":
        return MaskOperator((torch.rand(n, 2, 5, 6, generator=g) < 0.5).double(), sigma_y=0.1)
    if name == "mask_shared":
        return MaskOperator((torch.rand(1, 1, 4, 4, generator=g) < 0.5).double())
    if name == "blur_shared":
        return BlurOperator(gaussian_kernel(0.8, 5), (1, 5, 5), sigma_y=0.05)
    if name == "blur_rgb_even":
        return BlurOperator(torch.rand(n, 3, 5, generator=g, dtype=F64), (3, 6, 8))
    if name == "blur_wide":  # a kernel wider than the image
        return BlurOperator(torch.rand(n, 9, 7, generator=g, dtype=F64), (2, 5, 4))
    if name == "kspace_shared":
        return KSpaceOperator(cartesian_mask(1, 6, 8, 2, 0.25), (1, 6, 8), sigma_y=0.02)
    if name == "kspace_rgb_odd":
        return KSpaceOperator(cartesian_mask(n, 5, 7, 2, 0.2, seed=3), (3, 5, 7))
    if name == "multicoil":
        return KSpaceOperator(cartesian_mask(n, 6, 6, 2, 0.2, seed=1), (1, 6, 6), maps=smooth_maps(1, 3, 6, 6, 0))
    if name == "multicoil_per_obs":
        return KSpaceOperator(cartesian_mask(1, 5, 6, 2, 0.2), (1, 5, 6), maps=smooth_maps(n, 2, 5, 6, 1),
                              sigma_y=0.1)
    raise KeyError(name)


NAMES = ["mask", "mask_shared", "blur_shared", "blur_rgb_even", "blur_wide", "kspace_shared", "kspace_rgb_odd",
         "multicoil", "multicoil_per_obs"]


def dense(op: LinearOperator) -> torch.Tensor:
    """The (m, d) matrix of a one-observation operator, by applying it to the basis vectors."""
    d = math.prod(op.image_shape)
    basis = torch.eye(d, dtype=F64).reshape(d, *op.image_shape)
    return op(basis).reshape(d, -1).T


@pytest.mark.parametrize("name", NAMES)
def test_adjoint_is_exact(name):
    op = make(name)
    g = gen(1)
    n = 3
    x = torch.randn(n, *op.image_shape, generator=g, dtype=F64)
    y = torch.randn(n, *op.measurement_shape, generator=g, dtype=F64)
    ax = op(x)
    assert ax.shape == (n, *op.measurement_shape) and ax.dtype == F64
    aty = op.adjoint(y)
    assert aty.shape == x.shape and aty.dtype == F64
    lhs, rhs = (ax * y).sum(), (x * aty).sum()
    assert abs(float(lhs - rhs)) <= 1e-10 * float(ax.norm() * y.norm())


@pytest.mark.parametrize("name", NAMES)
def test_float32_and_shapes(name):
    op = make(name)
    x = torch.randn(3, *op.image_shape, generator=gen(2))
    y = op(x)
    assert y.dtype == torch.float32 and y.shape == (3, *op.measurement_shape)
    assert op.adjoint(y).dtype == torch.float32
    torch.testing.assert_close(y.double(), op(x.double()), rtol=1e-5, atol=1e-5)
    assert op.num_observations().shape == (op.num_operators,)
    with pytest.raises(ValueError, match="must be"):
        op(torch.zeros(3, 1, 2, 2))


def test_blur_matches_a_direct_loop():
    g = gen(3)
    kernel = torch.rand(2, 3, 5, generator=g, dtype=F64)
    op = BlurOperator(kernel, (2, 4, 7))
    x = torch.randn(2, 2, 4, 7, generator=g, dtype=F64)
    ref = torch.zeros_like(x)
    for n in range(2):
        for i in range(4):
            for j in range(7):
                for a in range(3):
                    for b in range(5):
                        si, sj = i - a + 1, j - b + 2
                        if 0 <= si < 4 and 0 <= sj < 7:
                            ref[n, :, i, j] += kernel[n, a, b] * x[n, :, si, sj]
    torch.testing.assert_close(op(x), ref, rtol=0, atol=1e-13)
    assert op.num_observations().tolist() == [56.0, 56.0]


def test_blur_matches_direct_convolution_at_benchmark_size():
    """The FFT product equals zero-padded direct convolution (conv2d) for a 13×13 PSF on 28×28 images, the
    shared and per-observation kernels alike, forward and adjoint, in float64 and float32."""
    g = gen(5)
    shared = gaussian_kernel(2.0)  # 13×13, wider than half the image
    per_obs = torch.rand(3, 13, 9, generator=g, dtype=F64)
    for kernel in (shared[None].expand(3, -1, -1), per_obs):
        op = BlurOperator(kernel.clone(), (2, 28, 28))
        x = torch.randn(3, 2, 28, 28, generator=g, dtype=F64)
        pad = (kernel.shape[1] // 2, kernel.shape[2] // 2)
        conv = torch.nn.functional.conv2d  # a correlation: the forward operator's weight is the PSF flipped
        fwd = torch.stack([conv(x[n][:, None], kernel[n].flip(-1, -2)[None, None], padding=pad)[:, 0]
                           for n in range(3)])
        adj = torch.stack([conv(x[n][:, None], kernel[n][None, None], padding=pad)[:, 0] for n in range(3)])
        torch.testing.assert_close(op(x), fwd, rtol=0, atol=1e-13)
        torch.testing.assert_close(op.adjoint(x), adj, rtol=0, atol=1e-13)
        torch.testing.assert_close(op(x.float()), fwd.float(), rtol=0, atol=1e-5)
        assert op(x.float()).dtype == torch.float32


def test_gaussian_kernel():
    k = gaussian_kernel(1.0)
    assert k.shape == (7, 7) and k.dtype == F64
    torch.testing.assert_close(k.sum(), torch.tensor(1.0, dtype=F64))
    torch.testing.assert_close(k, k.T)
    torch.testing.assert_close(k, k.flip(0, 1))
    assert k[3, 3] == k.max() and torch.isclose(k[3, 4] / k[3, 3], torch.tensor(math.exp(-0.5), dtype=F64))
    assert gaussian_kernel(0.5, 3, dtype=torch.float32).shape == (3, 3)
    for bad in (dict(sigma_px=0.0), dict(sigma_px=1.0, size=4), dict(sigma_px=float("nan"))):
        with pytest.raises(ValueError):
            gaussian_kernel(**bad)


def centred_dft(n: int) -> torch.Tensor:
    """The centred orthonormal DFT matrix: X[j] = Σ_m x[m] exp(−2πi (j − n//2)(m − n//2) / n) / √n."""
    j = torch.arange(n, dtype=F64) - n // 2
    return torch.exp(-2j * math.pi * j[:, None] * j[None, :] / n) / math.sqrt(n)


@pytest.mark.parametrize("h, w", [(6, 8), (5, 7), (4, 5)])
def test_kspace_matches_the_definition(h, w):
    g = gen(4)
    mask = cartesian_mask(2, h, w, 2, 0.2, seed=5)
    x = torch.randn(2, 2, h, w, generator=g, dtype=F64)
    fh, fw = centred_dft(h), centred_dft(w)
    ref = mask[:, None] * (fh @ x.to(torch.complex128) @ fw.T)
    y = KSpaceOperator(mask, (2, h, w))(x)
    torch.testing.assert_close(torch.view_as_complex(y), ref, rtol=0, atol=1e-12)
    maps = smooth_maps(1, 3, h, w, 2)
    y = KSpaceOperator(mask, (1, h, w), maps=maps)(x[:, :1])
    ref = mask[:, None] * (fh @ (maps * x[:, :1]) @ fw.T)
    torch.testing.assert_close(torch.view_as_complex(y), ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("h, w", [(6, 8), (5, 7), (6, 5)])
def test_kspace_pinv_is_the_pseudo_inverse(h, w):
    g = gen(5)
    mask = cartesian_mask(2, h, w, 3, 0.15, seed=2)
    op = KSpaceOperator(mask, (2, h, w))
    y = torch.randn(2, *op.measurement_shape, generator=g, dtype=F64) * op.support()
    got = op.pinv(y)
    for i in range(2):
        a = dense(op.select(torch.tensor([i])))
        ref = torch.linalg.pinv(a) @ y[i].flatten()
        torch.testing.assert_close(got[i].flatten(), ref, rtol=0, atol=1e-10)
    x = torch.randn(2, 2, h, w, generator=g, dtype=F64)
    torch.testing.assert_close(op(op.pinv(op(x))), op(x), rtol=0, atol=1e-12)
    for other in (make("multicoil"), make("blur_shared")):
        with pytest.raises(NotImplementedError, match="pseudo-inverse"):
            other.pinv(other(torch.zeros(1, *other.image_shape, dtype=F64)))


def test_mask_operator_behaviour_is_unchanged():
    g = gen(6)
    mask = (torch.rand(3, 2, 4, 4, generator=g) < 0.5).float()
    op = MaskOperator(mask)
    x = torch.randn(3, 2, 4, 4, generator=g)
    torch.testing.assert_close(op(x), mask * x)
    torch.testing.assert_close(op.adjoint(x), mask * x)
    torch.testing.assert_close(op.pinv(x), mask * x)
    torch.testing.assert_close(op(x[:1]), mask * x[:1])  # one image against every mask
    assert op.num_observations().tolist() == mask.flatten(1).sum(1).tolist()
    assert op.image_shape == op.measurement_shape == (2, 4, 4) and op.sigma_y == 0.0 and op.num_operators == 3
    shared = MaskOperator(mask[:1])
    torch.testing.assert_close(shared(x), mask[:1] * x)  # a shared mask broadcasts over the batch


@pytest.mark.parametrize("name", NAMES)
def test_select_equals_slicing(name):
    op = make(name)
    x = torch.randn(3, *op.image_shape, generator=gen(7), dtype=F64)
    y = op(x)
    idx = torch.tensor([2, 0])
    torch.testing.assert_close(op.select(idx)(x[idx]), y[idx], rtol=0, atol=0)
    torch.testing.assert_close(op.select(slice(1, 3)).adjoint(y[1:3]), op.adjoint(y)[1:3], rtol=0, atol=0)
    if op.num_operators == 1:
        assert op.select(idx) is op
    else:
        assert op.select(idx).num_operators == 2
        with pytest.raises(ValueError, match="index"):
            op.select(torch.tensor([3]))
    assert op.to("cpu")(x).equal(y)


def npz_round_trip(arrays: dict) -> dict:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    buf.seek(0)
    with np.load(buf, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


@pytest.mark.parametrize("name", NAMES)
def test_spec_and_arrays_round_trip(name):
    op = make(name)
    spec = op.spec()
    assert spec["kind"] in KINDS and spec["image_shape"] == list(op.image_shape) and spec["sigma_y"] == op.sigma_y
    text = json.dumps(spec)
    back = operator_from_spec(json.loads(text), npz_round_trip(op.arrays()))
    assert type(back) is type(op) and back.spec() == spec and back.num_operators == op.num_operators
    x = torch.randn(3, *op.image_shape, generator=gen(8), dtype=F64)
    y = torch.randn(3, *op.measurement_shape, generator=gen(9), dtype=F64)
    assert back(x).equal(op(x)) and back.adjoint(y).equal(op.adjoint(y))
    assert back.num_observations().tolist() == op.num_observations().tolist()
    for k, v in back.arrays().items():
        assert np.array_equal(v, op.arrays()[k])


def test_bad_specs_name_the_field():
    op = make("multicoil")
    spec, arrays = op.spec(), op.arrays()
    cases = [
        ({**spec, "kind": "radon"}, arrays, "kind 'radon' is unknown"),
        ({k: v for k, v in spec.items() if k != "kind"}, arrays, "kind is missing"),
        ({k: v for k, v in spec.items() if k != "sigma_y"}, arrays, "'sigma_y' is missing"),
        ({**spec, "extra": 1}, arrays, "unknown field 'extra'"),
        ({**spec, "sigma_y": -1.0}, arrays, "sigma_y"),
        ({**spec, "sigma_y": "0.1"}, arrays, "sigma_y"),
        ({**spec, "image_shape": [1, 6]}, arrays, "image_shape"),
        ({**spec, "image_shape": [2, 6, 6]}, arrays, "one channel"),
        ({**spec, "image_shape": [1, 7, 6]}, arrays, "mask must be"),
        ({**spec, "coils": -2}, arrays, "coils"),
        ({**spec, "coils": 4}, arrays, "maps must be"),
        (spec, {"mask": arrays["mask"]}, "'maps' is missing"),
        (spec, {**arrays, "kernel": arrays["mask"]}, "unknown array 'kernel'"),
        (spec, {**arrays, "mask": arrays["mask"] * 2}, "only 0 and 1"),
        (spec, {**arrays, "maps": arrays["maps"].astype(np.int64)}, "maps must be"),
        (spec, {**arrays, "mask": [[1]]}, "numpy array"),
        (["kind"], arrays, "must be a dict"),
    ]
    blur = make("blur_shared")
    cases += [
        (blur.spec(), {"kernel": np.ones((1, 2, 3))}, "odd"),
        (blur.spec(), {"kernel": np.ones((1, 3, 3), dtype=np.int32)}, "kernel must be"),
        (blur.spec(), {"kernel": np.full((1, 3, 3), np.nan)}, "finite"),
        (make("mask").spec(), {"mask": np.ones((2, 1, 5, 6), dtype=np.uint8)}, "mask must be"),
    ]
    for s, a, message in cases:
        with pytest.raises(ValueError, match=message) as err:
            operator_from_spec(s, a)
        assert "\n" not in str(err.value)


def test_constructor_checks():
    with pytest.raises(ValueError, match="odd"):
        BlurOperator(torch.ones(1, 4, 3), (1, 5, 5))
    with pytest.raises(ValueError, match="sigma_y"):
        BlurOperator(torch.ones(1, 3, 3), (1, 5, 5), sigma_y=-0.1)
    with pytest.raises(ValueError, match="mask must be"):
        KSpaceOperator(torch.ones(1, 5, 5), (1, 5, 6))
    with pytest.raises(ValueError, match="observations"):
        KSpaceOperator(torch.ones(2, 4, 4), (1, 4, 4), maps=torch.ones(3, 2, 4, 4, dtype=torch.complex64))
    op = KSpaceOperator(torch.ones(1, 4, 4), (1, 4, 4), maps=torch.ones(1, 2, 4, 4, 2))  # maps in the real layout
    assert op.measurement_shape == (2, 4, 4, 2) and op.coils == 2


def test_cartesian_mask_statistics():
    num, h, w, r, cf = 40, 5, 32, 4, 0.125
    m = cartesian_mask(num, h, w, r, cf, seed=11)
    assert m.shape == (num, h, w) and set(m.unique().tolist()) == {0.0, 1.0}
    assert (m == m[:, :1]).all()  # constant along H (the readout)
    lines = m[:, 0]
    assert (lines.sum(1) == round(w / r)).all()
    centre = round(w * cf)
    assert (lines[:, w // 2 - centre // 2: w // 2 - centre // 2 + centre] == 1).all()
    assert lines[:, w // 2].all()  # the zero frequency of the centred layout
    assert len({tuple(row.tolist()) for row in lines}) > num // 2  # different per observation
    assert m.equal(cartesian_mask(num, h, w, r, cf, seed=11))  # seeded
    assert m[:7].equal(cartesian_mask(7, h, w, r, cf, seed=11))  # mask i depends on (seed, i) only
    assert not m.equal(cartesian_mask(num, h, w, r, cf, seed=12))
    freq = lines.mean(0)  # the non-centre lines are uniform: each is drawn with probability (L − C) / (W − C)
    others = torch.ones(w, dtype=torch.bool)
    others[w // 2 - centre // 2: w // 2 - centre // 2 + centre] = False
    assert abs(float(freq[others].mean()) - (round(w / r) - centre) / (w - centre)) < 1e-6
    assert cartesian_mask(2, 4, 8, 1, 0.0).eq(1).all()
    for bad in (dict(acceleration=0.5), dict(acceleration=2, center_fraction=0.9), dict(acceleration=100),
                dict(acceleration=2, center_fraction=-0.1), dict(acceleration=float("inf"))):
        with pytest.raises(ValueError):
            cartesian_mask(2, 4, 8, **bad)


@pytest.mark.parametrize("name", ["mask", "blur_rgb_even", "kspace_rgb_odd", "multicoil_per_obs"])
def test_add_noise(name):
    op = make(name, n=2)
    op.sigma_y = 0.5
    x = torch.randn(2, *op.image_shape, generator=gen(10), dtype=F64)
    y = op(x)
    noisy = op.add_noise(y, gen(0))
    e = noisy - y
    support = op.support().expand_as(e).bool()
    assert (e[~support] == 0).all()
    assert abs(float(e[support].std()) / 0.5 - 1) < 0.35
    assert noisy.equal(op.add_noise(y, gen(0)))
    one = op.select(torch.tensor([1])).add_noise(y[1:], [gen(21)])  # per-observation generators
    assert one.equal(op.add_noise(y, [gen(20), gen(21)])[1:])
    op.sigma_y = 0.0
    assert op.add_noise(y, gen(0)).equal(y)


def test_num_observations_counts_real_values():
    mask = cartesian_mask(2, 6, 8, 2, 0.25)
    assert KSpaceOperator(mask, (3, 6, 8)).num_observations().tolist() == [2 * 3 * 6 * 4] * 2
    maps = smooth_maps(1, 4, 6, 8, 0)
    assert KSpaceOperator(mask[:1], (1, 6, 8), maps=maps).num_observations().tolist() == [2 * 4 * 6 * 4]


# -- MMPS with every operator: exact for Gaussian data -------------------------------------------------------

SIDE = 6
POSTERIOR_OPS = {
    "mask": lambda sy: MaskOperator((torch.rand(3, 1, SIDE, SIDE, generator=gen(30)) < 0.4).double(), sy),
    "blur": lambda sy: BlurOperator(torch.rand(3, 3, 3, generator=gen(31), dtype=F64), (1, SIDE, SIDE), sy),
    "blur_shared": lambda sy: BlurOperator(gaussian_kernel(1.0, 5), (1, SIDE, SIDE), sy),
    "kspace": lambda sy: KSpaceOperator(cartesian_mask(3, SIDE, SIDE, 2, 0.2), (1, SIDE, SIDE), sigma_y=sy),
    "multicoil": lambda sy: KSpaceOperator(cartesian_mask(1, SIDE, SIDE, 3, 0.2), (1, SIDE, SIDE),
                                           maps=smooth_maps(3, 2, SIDE, SIDE, 3), sigma_y=sy),
}


def closed_form(mean, cov, a, x_t, y, sigma, sigma_y):
    """E[x0 | x_t, y] for x0 ~ N(mean, cov), x_t = x0 + σ n, y = A x0 + σ_y e (zero rows of A dropped)."""
    keep = a.abs().sum(1) > 0
    a, y = a[keep], y[keep]
    d = mean.numel()
    b = torch.cat([torch.eye(d, dtype=F64), a])
    r = torch.diag(torch.cat([torch.full((d,), sigma**2, dtype=F64), torch.full((a.shape[0],), sigma_y**2,
                                                                              dtype=F64)]))
    obs = torch.cat([x_t, y])
    return mean + cov @ b.T @ torch.linalg.solve(b @ cov @ b.T + r, obs - b @ mean)


@pytest.mark.parametrize("name, sigma_y", [(n, 0.05) for n in POSTERIOR_OPS] + [("mask", 0.0)])
def test_mmps_is_exact_for_gaussian_data(name, sigma_y):
    d = SIDE * SIDE
    g = gen(40)
    cov = smooth_covariance(SIDE, SIDE, length_scale=1.5)
    mean = 0.2 * torch.randn(d, generator=g, dtype=F64)
    den = GaussianDenoiser(mean, cov, (1, SIDE, SIDE))
    op = POSTERIOR_OPS[name](sigma_y)
    sigmas = torch.tensor([0.05, 0.4, 3.0], dtype=F64)
    x0 = (mean + torch.randn(3, d, generator=g, dtype=F64) @ torch.linalg.cholesky(cov).T).reshape(3, 1, SIDE, SIDE)
    x_t = x0 + sigmas[:, None, None, None] * torch.randn(x0.shape, generator=g, dtype=F64)
    y = op.add_noise(op(x0), g)
    # 2d CG iterations: d are enough in exact arithmetic, but the per-observation random blurs are ill-conditioned
    est = MMPS(lambda x, s: den(x, s), y, op, sigma_y, cg_iters=2 * d)(x_t, sigmas)
    for i in range(3):
        a = dense(op.select(torch.tensor([i])))
        ref = closed_form(mean, cov, a, x_t[i].flatten(), y[i].flatten(), float(sigmas[i]), sigma_y)
        torch.testing.assert_close(est[i].flatten(), ref, rtol=0, atol=1e-8)
