"""ambient.nets.oracle: the exact fixed-mask sampler moments and the sampling-noise floor, against Monte Carlo
runs of the real sampler."""

import pytest
import torch

from ambient.data.corruption import Corruption, sampling_masks
from ambient.nets.oracle import (
    GaussianDenoiser,
    fixed_mask_sampler_moments,
    relative_covariance_error,
    sample_covariance,
    sampling_noise_floor,
    smooth_covariance,
)
from ambient.nets.schedules import edm_sigmas
from ambient.sampling.fixed_mask import ambient_sample


def _case():
    cov = smooth_covariance(4, 4, 1.5, scale=0.09)
    mean = torch.linspace(-0.2, 0.2, 16, dtype=torch.float64)
    return mean, cov


@pytest.mark.parametrize("heun", [True, False])
def test_fixed_mask_moments_equal_the_sampler_run_with_the_exact_denoiser(heun):
    """One mask: the sampler's output law is N(mean + u, A Aᵀ); 6000 real sampler runs agree with it."""
    mean, cov = _case()
    mask = (torch.arange(16) % 3 != 0).double().reshape(1, 1, 4, 4)
    sigmas = edm_sigmas(12)
    mu, c = fixed_mask_sampler_moments(mean, cov, mask.reshape(1, -1), sigmas, heun=heun)
    n = 6000
    x = ambient_sample(GaussianDenoiser(mean, cov, (1, 4, 4)), (n, 1, 4, 4), list(range(n)),
                       masks=mask.expand(n, 1, 4, 4), sigmas=sigmas, solver="heun" if heun else "euler",
                       dtype=torch.float64).reshape(n, -1)
    sd = c.diagonal().sqrt()
    assert float(((x.mean(0) - mu).abs() / sd).max()) < 4.5 / n**0.5  # per-pixel means within 4.5 s.e.
    assert relative_covariance_error(sample_covariance(x), c) < 3 * sampling_noise_floor(c, n)
    # hidden pixels end at the conditional mean: the sampler misses their conditional variance
    assert relative_covariance_error(c, cov) > 0.05


def test_all_visible_mask_reproduces_the_data_and_the_mixture_is_the_average_of_masks():
    mean, cov = _case()
    # every pixel visible: the sampler reproduces the data, up to Heun's discretisation (which at EDM's 18 steps
    # inflates a Gaussian's variance by 10-30 %, and at 100 steps by < 1 %)
    mu, c = fixed_mask_sampler_moments(mean, cov, torch.ones(1, 16), edm_sigmas(100))
    assert relative_covariance_error(c, cov) < 0.01 and float((mu - mean).abs().max()) < 3e-3
    sig = edm_sigmas(18)
    assert relative_covariance_error(fixed_mask_sampler_moments(mean, cov, torch.ones(1, 16), sig)[1], cov) > 0.05
    masks = sampling_masks(Corruption("dust", 0.0, 0.2), (6, 1, 4, 4), list(range(6)), data_survival=0.6)
    mixed_mu, mixed_c = fixed_mask_sampler_moments(mean, cov, masks, sig, chunk=4)
    parts = [fixed_mask_sampler_moments(mean, cov, m[None], sig) for m in masks]
    mus = torch.stack([p[0] for p in parts])
    second = torch.stack([p[1] + torch.outer(p[0], p[0]) for p in parts]).mean(0)
    torch.testing.assert_close(mixed_mu, mus.mean(0))
    torch.testing.assert_close(mixed_c, second - torch.outer(mus.mean(0), mus.mean(0)))


def test_sampling_noise_floor_is_the_error_of_exact_samples():
    mean, cov = _case()
    g = torch.Generator().manual_seed(0)
    chol = torch.linalg.cholesky(cov)
    n = 200
    errs = [relative_covariance_error(sample_covariance(torch.randn(n, 16, generator=g, dtype=torch.float64)
                                                        @ chol.T + mean), cov) for _ in range(300)]
    rms = (torch.tensor(errs) ** 2).mean().sqrt()
    assert float(rms) == pytest.approx(sampling_noise_floor(cov, n), rel=0.05)
