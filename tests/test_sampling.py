"""Sampling: σ schedule, Euler/Heun against exact Gaussian answers, the fixed-mask ambient sampler."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ambient.data.corruption import Corruption, sampling_masks
from ambient.nets.oracle import GaussianDenoiser, smooth_covariance
from ambient.nets.schedules import edm_sigmas
from ambient.rng import mix_seed
from ambient.sampling.fixed_mask import ambient_sample, dynamic_threshold, sample_in_batches
from ambient.sampling.solvers import SOLVERS, sample_euler, sample_heun, solver_by_name

H = 4
SHAPE = (1, H, H)
F64 = torch.float64


@pytest.fixture(scope="module")
def gaussian():
    """A smooth, non-diagonal 16-d Gaussian with a non-zero mean, and its exact denoiser."""
    cov = smooth_covariance(H, H, 2.0)
    ys, xs = torch.meshgrid(torch.arange(H), torch.arange(H), indexing="ij")
    mean = (0.3 * torch.sin(ys + 0.5 * xs)).flatten().double()
    return mean, cov, GaussianDenoiser(mean, cov, SHAPE)


def cov_error(x: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor) -> tuple[float, float]:
    """Relative Frobenius error of the sample covariance and relative error of the sample mean."""
    f = x.reshape(x.shape[0], -1).double()
    c_err = (torch.cov(f.T) - cov).norm() / cov.norm()
    m_err = (f.mean(0) - mean).norm() / mean.norm()
    return float(c_err), float(m_err)


def exact_flow(z: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor, sigma_max: float) -> torch.Tensor:
    """Exact probability-flow ODE map from x_T = σ_max z to σ = 0 for N(mean, cov).

    In the eigenbasis of cov, y = x − mean obeys dy/dσ = σ y / (λ + σ²), so
    y(0) = y(σ_max) · sqrt(λ / (λ + σ_max²)).
    """
    lam, u = torch.linalg.eigh(cov)
    y = ((z * sigma_max).reshape(z.shape[0], -1) - mean) @ u
    return (mean + (y * (lam / (lam + sigma_max**2)).sqrt()) @ u.T).reshape(z.shape)


# ---------------------------------------------------------------- schedule
@pytest.mark.parametrize("n", [1, 2, 5, 18, 40])
def test_edm_sigmas_properties(n):
    s = edm_sigmas(n, 0.002, 80.0, 7.0)
    assert s.dtype == F64 and s.shape == (n + 1,)
    assert s[0].item() == pytest.approx(80.0) and s[-1].item() == 0.0
    if n > 1:
        assert s[-2].item() == pytest.approx(0.002)
    assert bool((s[1:] < s[:-1]).all())
    # uniform spacing in σ^(1/ρ)
    root = s[:-1] ** (1 / 7)
    if n > 2:
        steps = root[1:] - root[:-1]
        assert torch.allclose(steps, steps[0].expand_as(steps))


def test_edm_sigmas_bad_arguments():
    for kwargs, word in [({"num_steps": 0}, "num_steps"), ({"sigma_min": 0.0}, "sigma_min"),
                         ({"sigma_min": 5.0, "sigma_max": 1.0}, "sigma_max"), ({"rho": 0.0}, "rho")]:
        with pytest.raises(ValueError, match=word):
            edm_sigmas(**kwargs)


# ---------------------------------------------------------------- solvers on the exact Gaussian
def test_heun_reproduces_gaussian(gaussian):
    mean, cov, den = gaussian
    n = 3000
    x = ambient_sample(den, (n, *SHAPE), list(range(n)), num_steps=32, dtype=F64)
    c_err, m_err = cov_error(x, mean, cov)
    # measured here (3000 draws, 32 steps): cov 0.037, mean 0.017. With 4000 draws: 40 steps 0.024,
    # 18 steps 0.086 (18 Heun steps overstate the top eigenvalue's variance by 8%).
    assert c_err < 0.08 and m_err < 0.06


def test_heun_beats_euler_and_is_second_order(gaussian):
    mean, cov, den = gaussian
    z = torch.randn(500, *SHAPE, generator=torch.Generator().manual_seed(0), dtype=F64)
    exact = exact_flow(z, mean, cov, 80.0)
    errs = {}
    for steps in (18, 50):
        sig = edm_sigmas(steps)
        for name, solver in (("euler", sample_euler), ("heun", sample_heun)):
            out = solver(lambda x, s: den(x, s), z * 80.0, sig)
            assert out.dtype == F64
            errs[name, steps] = float((out - exact).norm() / exact.norm())
    # measured: euler 0.130 -> 0.048, heun 0.042 -> 0.0047
    assert errs["heun", 18] < 0.5 * errs["euler", 18]
    assert errs["heun", 50] < 0.2 * errs["euler", 50]
    assert errs["heun", 50] / errs["heun", 18] < 0.2  # ~ (18/50)² = 0.13: second order
    assert errs["euler", 50] / errs["euler", 18] > 0.25  # ~ 18/50 = 0.36: first order


def test_solver_by_name():
    assert SOLVERS == ("heun", "euler")
    assert solver_by_name("heun") is sample_heun and solver_by_name("euler") is sample_euler
    with pytest.raises(ValueError, match="heun, euler"):
        solver_by_name("rk4")


def test_solver_returns_input_dtype_and_churn_noise():
    calls = []

    def den(x, s):
        calls.append(x.dtype)
        return torch.zeros_like(x, dtype=torch.float32)

    x = torch.ones(2, 1, 2, 2)
    sig = edm_sigmas(4, sigma_max=1.0)
    out = sample_heun(den, x, sig)
    assert out.dtype == torch.float32 and all(d == F64 for d in calls)
    assert len(calls) == 2 * 4 - 1  # no correction on the last step to σ = 0
    drawn = []

    def noise(shape):
        drawn.append(tuple(shape))
        return torch.ones(shape, dtype=F64)

    churned = sample_euler(lambda x, s: torch.zeros_like(x), x, sig, churn=1.0, noise_fn=noise)
    assert drawn == [(2, 1, 2, 2)] * 4
    assert not torch.equal(churned, sample_euler(lambda x, s: torch.zeros_like(x), x, sig))
    with pytest.raises(ValueError, match="sigmas"):
        sample_euler(den, x, torch.tensor([1.0]))


# ---------------------------------------------------------------- fixed masks
def test_masked_sampler_error_grows_as_survival_drops(gaussian):
    mean, cov, den = gaussian
    n = 2000
    errs = {}
    for p in (0.2, 0.5, 0.8):
        x = ambient_sample(den, (n, *SHAPE), list(range(n)), corruption=Corruption("dust", p, 0.1),
                           num_steps=32, dtype=F64)
        errs[p] = cov_error(x, mean, cov)
    # Covariance error at survival (1-p)(1-δ) = 0.72 / 0.45 / 0.18, exact masked Gaussian denoiser:
    #   these 2000 samples, 32 Heun steps:     0.056 / 0.039 / 0.224  (no masks: 0.047)
    #   4000 samples, 40 Heun steps:           0.027 / 0.046 / 0.218  (no masks: 0.024)
    #   closed form per mask (no sampling noise), 40 steps:  0.013 / 0.026 / 0.229;
    #   100 steps: 0.004 / 0.035 / 0.240.
    # So with this many samples only the drop to 0.18 stands out of the noise: the fixed-mask
    # sampler misses the conditional variance of hidden pixels when few pixels are visible.
    assert errs[0.2][0] < 0.1 and errs[0.5][0] < 0.1
    assert errs[0.8][0] > max(errs[0.2][0], errs[0.5][0]) + 0.08
    assert errs[0.8][0] > 0.12  # the known floor is real (a sampler ignoring masks would be ~0.05)
    assert all(m < 0.1 for _, m in errs.values())


def test_denoiser_sees_masked_input_and_fixed_masks():
    seen = []

    def den(x, sigma, mask):
        seen.append((x.clone(), sigma.clone(), mask.clone()))
        return torch.zeros_like(x)

    corr = Corruption("dust", 0.5, 0.2)
    seeds = [3, 9]
    ambient_sample(den, (2, 1, 4, 4), seeds, corruption=corr, num_steps=3, num_masks=2)
    expected = [sampling_masks(corr, (2, 1, 4, 4), seeds),
                sampling_masks(corr, (2, 1, 4, 4), [mix_seed(s, 1) for s in seeds])]
    assert len(seen) == 2 * (2 * 3 - 1)
    for j, (x, sigma, mask) in enumerate(seen):
        assert torch.equal(mask, expected[j % 2])
        assert bool((x[mask == 0] == 0).all())
        assert sigma.shape == (2,) and x.dtype == torch.float32
    assert not torch.equal(expected[0], expected[1])


def test_given_masks_and_num_masks(gaussian):
    mean, cov, den = gaussian
    n = 1000
    x = ambient_sample(den, (n, *SHAPE), list(range(n)), corruption=Corruption("dust", 0.5, 0.1),
                       num_masks=4, num_steps=18, dtype=F64)
    # Averaging K exact predictions keeps the mean (measured 0.012) but shrinks the variance
    # of hidden pixels: covariance error 0.47 at K=4 vs 0.05 at K=1 (survival 0.45, 4000 samples).
    assert cov_error(x, mean, cov)[1] < 0.1
    masks = torch.ones(2, 3, *SHAPE)
    masks[0, :, :, :2] = 0
    plain = ambient_sample(den, (3, *SHAPE), [1, 2, 3], num_steps=6, dtype=F64)
    with_ones = ambient_sample(den, (3, *SHAPE), [1, 2, 3], masks=masks[1], num_steps=6, dtype=F64)
    assert torch.allclose(plain, with_ones, atol=1e-10)  # an all-ones mask is plain sampling
    two = ambient_sample(den, (3, *SHAPE), [1, 2, 3], masks=masks, num_steps=6, dtype=F64)
    assert not torch.allclose(two, plain, atol=1e-3)


# ---------------------------------------------------------------- seeds
def test_same_seed_same_sample_at_any_batch_size(gaussian):
    _, _, den = gaussian
    seeds = [11, 5, 7, 100, 3, 42, 8]
    kw = {"image_shape": SHAPE, "corruption": Corruption("dust", 0.3, 0.1), "num_masks": 2,
          "churn": 5.0, "num_steps": 8, "dtype": F64}
    one = sample_in_batches(den, 7, seeds, 1, **kw)
    seven = sample_in_batches(den, 7, seeds, 7, **kw)
    three = sample_in_batches(den, 7, seeds, 3, **kw)
    assert torch.allclose(one, seven, rtol=0, atol=1e-9) and torch.allclose(one, three, rtol=0, atol=1e-9)
    moved = ambient_sample(den, (2, *SHAPE), [42, 11], corruption=kw["corruption"], num_masks=2,
                           churn=5.0, num_steps=8, dtype=F64)
    assert torch.allclose(moved, one[[5, 0]], rtol=0, atol=1e-9)
    other = sample_in_batches(den, 7, [s + 1000 for s in seeds], 7, **kw)
    assert (other - seven).reshape(7, -1).abs().amax(1).min() > 1e-3
    assert sample_in_batches(den, 0, [], 4, image_shape=SHAPE).shape == (0, *SHAPE)


# ---------------------------------------------------------------- autograd and guidance
class _Recording(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.grad_enabled = []

    def forward(self, x, sigma, mask=None):
        self.grad_enabled.append(torch.is_grad_enabled())
        return self.scale * self.inner(x, sigma, mask)


def test_no_autograd_at_guidance_zero(gaussian):
    mean, cov, _ = gaussian
    den = _Recording(GaussianDenoiser(mean.float(), cov.float(), SHAPE))
    out = ambient_sample(den, (3, *SHAPE), [0, 1, 2], corruption=Corruption("dust", 0.5, 0.1),
                         num_masks=2, num_steps=4)
    assert not out.requires_grad and out.grad_fn is None
    assert den.grad_enabled and not any(den.grad_enabled)
    den.grad_enabled.clear()
    ambient_sample(den, (3, *SHAPE), [0, 1, 2], corruption=Corruption("dust", 0.5, 0.1),
                   num_masks=2, num_steps=4, guidance_scale=0.1)
    assert all(den.grad_enabled)


def test_guidance_makes_predictions_agree(gaussian):
    _, _, den = gaussian
    n, corr = 64, Corruption("dust", 0.5, 0.1)
    seeds = list(range(n))
    masks = torch.stack([sampling_masks(corr, (n, *SHAPE), [s if k == 0 else mix_seed(s, k) for s in seeds])
                         for k in range(2)]).double()

    def disagreement(x, sigma):
        p = [den(m * x, sigma, m) for m in masks]
        return float(((p[0] - p[1]) ** 2).sum() / n)

    outs = {g: ambient_sample(den, (n, *SHAPE), seeds, corruption=corr, num_masks=2, guidance_scale=g,
                              dtype=F64) for g in (0.0, 0.1, 0.3)}
    assert (outs[0.3] - outs[0.0]).abs().max() > 1e-3
    for sigma in (0.05, 0.2, 1.0):  # measured at σ=0.2: 0.0327, 0.0311, 0.0291 on 200 samples
        d = [disagreement(outs[g], sigma) for g in (0.0, 0.1, 0.3)]
        assert d[0] > d[1] > d[2]


# ---------------------------------------------------------------- clipping
def test_dynamic_threshold_is_a_percentile():
    a = torch.linspace(-2, 2, 101)  # |a|: 0.99 quantile between order statistics
    b = torch.full((101,), 0.5)  # quantile <= 1: untouched
    c = torch.cat([torch.linspace(0, 3, 100), torch.tensor([100.0])])  # one outlier: s = 3, not 100
    x = torch.stack([a, b, c]).reshape(3, 1, 1, 101)
    out = dynamic_threshold(x)
    s_np = np.percentile(x.abs().reshape(3, -1).numpy(), 99, axis=1)
    for i, s in enumerate(s_np):
        s = max(float(s), 1.0)
        assert torch.allclose(out[i], x[i].clamp(-s, s) / s, atol=1e-6)
    assert torch.equal(out[1], x[1])
    assert out[2, 0, 0, 100].item() == 1.0 and out[2, 0, 0, 99].item() == pytest.approx(1.0)
    assert out[2, 0, 0, 33].item() == pytest.approx(1.0 / 3)  # a plain clip would leave 1.0 here
    assert out[0].min().item() == pytest.approx(-1.0) and abs(out[0, 0, 0, 50].item()) < 1e-6


@pytest.mark.parametrize("clip", ["static", "dynamic"])
def test_clip_modes_bound_predictions(clip):
    def den(x, sigma, mask=None):
        return torch.full_like(x, 5.0)

    out = ambient_sample(den, (2, 1, 3, 3), [0, 1], num_steps=3, clip=clip)
    assert out.abs().max().item() <= 1.0 + 1e-6
    raw = ambient_sample(den, (2, 1, 3, 3), [0, 1], num_steps=3)
    assert torch.allclose(raw, torch.full_like(raw, 5.0))


# ---------------------------------------------------------------- argument checks
@pytest.mark.parametrize("kwargs, word", [
    ({"num_steps": 0}, "num_steps"), ({"num_masks": 0}, "num_masks"), ({"solver": "rk4"}, "solver"),
    ({"clip": "soft"}, "clip"), ({"seeds": [1]}, "seeds"), ({"guidance_scale": -1.0}, "guidance_scale"),
    ({"guidance_scale": 0.5}, "num_masks"), ({"num_masks": 2}, "num_masks"),
    ({"masks": torch.ones(2, 1, 5, 5)}, "masks"), ({"data_survival": 0.5}, "data_survival"),
])
def test_bad_arguments(kwargs, word):
    kw = {"seeds": [1, 2], **kwargs}
    seeds = kw.pop("seeds")
    with pytest.raises(ValueError, match=word):
        ambient_sample(lambda x, s, m=None: x, (2, 1, 4, 4), seeds, **kw)


def test_custom_sigma_schedule_is_used_and_validated():
    seen = []

    def den(x, sigma, mask=None):
        seen.append(float(sigma[0]))
        return torch.zeros_like(x)

    sig = torch.tensor([10.0, 1.0, 0.1, 0.0], dtype=torch.float64)
    ambient_sample(den, (1, 1, 2, 2), [0], sigmas=sig, solver="euler")
    assert seen == pytest.approx([10.0, 1.0, 0.1])
    with pytest.raises(ValueError, match="sigmas"):
        ambient_sample(den, (1, 1, 2, 2), [0], sigmas=torch.tensor([1.0, 2.0, 0.0]))


# ---------------------------------------------------------------- the denoiser interface
def test_fixed_mask_ensemble_is_the_mean_of_masked_calls(gaussian):
    """The wrapper presents D(x, σ) -> x0: the mean of D(m_k ⊙ x, σ, m_k) over its K masks, and
    without masks the plain full-image denoiser; σ range and schedule come from the inner model."""
    from ambient.nets.denoiser import FullImageDenoiser
    from ambient.sampling.fixed_mask import FixedMaskEnsemble

    _, _, den = gaussian
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, *SHAPE, generator=g, dtype=F64)
    masks = (torch.rand(3, 5, *SHAPE, generator=g) > 0.4).double()
    sigma = torch.tensor(0.7, dtype=F64)
    ens = FixedMaskEnsemble(den, masks, dtype=F64)
    assert isinstance(ens, FullImageDenoiser) and (ens.sigma_min, ens.sigma_max, ens.schedule(5)) == (0.002, 80.0, None)
    expected = torch.stack([den(m * x, 0.7, m) for m in masks]).mean(0)
    torch.testing.assert_close(ens(x, sigma), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(FixedMaskEnsemble(den, None, dtype=F64)(x, sigma), den(x, 0.7), rtol=0, atol=0)
    per_sample = torch.linspace(0.1, 2.0, 5, dtype=F64)
    torch.testing.assert_close(ens(x, per_sample), torch.stack([den(m * x, per_sample, m) for m in masks]).mean(0),
                               rtol=0, atol=1e-12)
    clipped = FixedMaskEnsemble(den, masks, clip="static", dtype=F64)(x * 50, sigma)
    assert float(clipped.abs().max()) <= 1.0


def test_sampler_validates_at_the_boundary_not_per_call(gaussian, monkeypatch):
    """ambient_sample checks its inputs once; the 2·K denoiser calls per Heun step skip the check."""
    import ambient.nets.denoiser as denoiser_module

    _, _, den = gaussian
    calls = []
    real = denoiser_module.check_denoiser_inputs
    monkeypatch.setattr(denoiser_module, "check_denoiser_inputs", lambda *a: calls.append(1) or real(*a))
    corr = Corruption("dust", 0.5, 0.1)
    fast = ambient_sample(den, (3, *SHAPE), [0, 1, 2], corruption=corr, num_masks=2, num_steps=4, dtype=F64)
    assert calls == []
    den(torch.zeros(1, *SHAPE), 1.0)  # a direct call is still checked
    assert calls == [1]
    with pytest.raises(ValueError, match="channels"):
        ambient_sample(den, (3, 3, H, H), [0, 1, 2], num_steps=2)
    # the trusted path gives the same samples as checked calls through a plain callable
    checked = ambient_sample(lambda x, s, m: den(x, s, m), (3, *SHAPE), [0, 1, 2], corruption=corr, num_masks=2,
                             num_steps=4, dtype=F64)
    assert torch.equal(fast, checked)


def test_model_sigmas_use_the_models_own_schedule():
    from ambient.nets.denoiser import FullImageDenoiser
    from ambient.sampling.fixed_mask import model_sigmas

    class OwnSchedule(FullImageDenoiser):
        sigma_min, sigma_max = 0.01, 20.0

        def schedule(self, num_steps):
            return torch.tensor([5.0, 1.0, 0.0], dtype=F64)

    class RangeOnly(FullImageDenoiser):
        sigma_min, sigma_max = 0.01, 20.0

    assert torch.equal(model_sigmas(OwnSchedule(), 2), torch.tensor([5.0, 1.0, 0.0], dtype=F64))
    assert torch.equal(model_sigmas(RangeOnly(), 6), edm_sigmas(6, 0.01, 20.0))
    assert torch.equal(model_sigmas(lambda x, s: x, 6), edm_sigmas(6))
