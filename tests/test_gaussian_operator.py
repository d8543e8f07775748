"""The Gaussian prior under a general linear operator y = A x + σ_y n: exact posterior moments (CG + Matheron's
rule) and Monte-Carlo EM, checked against dense closed forms and against the exact missing-pixel EM."""

from __future__ import annotations

import math

import pytest
import torch

from ambient.learners.gaussian_prior import GaussianPrior, fit_gaussian, fit_gaussian_operator, operator_posterior
from ambient.nets.oracle import smooth_covariance

SHAPE = (1, 5, 5)
D = 25


class DenseOperator:
    """y = A_n x for a dense (m, d) matrix per observation (or one shared): the test's reference operator."""

    def __init__(self, mats: torch.Tensor, sigma_y: float = 0.0):
        self.mats, self.sigma_y, self.image_shape = mats, sigma_y, SHAPE
        self.num_operators = mats.shape[0]

    def _m(self, n):
        return self.mats if self.mats.shape[0] == n else self.mats.expand(n, -1, -1)

    def __call__(self, x):
        return torch.einsum("nmd,nd->nm", self._m(x.shape[0]), x.reshape(x.shape[0], -1))

    def adjoint(self, v):
        return torch.einsum("nmd,nm->nd", self._m(v.shape[0]), v).reshape(v.shape[0], *SHAPE)

    def select(self, idx):
        return self if self.num_operators == 1 else DenseOperator(self.mats[idx], self.sigma_y)

    def num_observations(self):
        return torch.full((self.num_operators,), float(self.mats.shape[1]))


def _prior(rank=6, psi=1e-2):
    cov = smooth_covariance(5, 5, 1.5)
    w, v = torch.linalg.eigh(cov)
    mean = torch.linspace(-0.3, 0.3, D, dtype=torch.float64)
    return GaussianPrior(mean, v[:, -rank:] * (w[-rank:] - psi).clamp_min(0).sqrt(),
                         torch.full((D,), psi, dtype=torch.float64), SHAPE)


def _dense_posterior(prior, a, y, s2):
    cov = prior.covariance()
    k = a @ cov @ a.T + s2 * torch.eye(a.shape[0], dtype=torch.float64)
    gain = cov @ a.T @ torch.linalg.inv(k)
    return prior.mean + gain @ (y - a @ prior.mean), cov - gain @ a @ cov


def test_posterior_mean_matches_dense_closed_form():
    g = torch.Generator().manual_seed(0)
    prior = _prior()
    mats = torch.randn(3, 12, D, generator=g, dtype=torch.float64) / 5
    y = torch.randn(3, 12, generator=g, dtype=torch.float64)
    op = DenseOperator(mats, sigma_y=0.05)
    got, its = operator_posterior(prior, y, op, cg_tol=1e-12, cg_iters=200)
    for i in range(3):
        ref, _ = _dense_posterior(prior, mats[i], y[i], 0.05**2)
        assert torch.allclose(got[i].flatten(), ref, atol=1e-8)
    assert 0 < its <= 24  # 12 steps in exact arithmetic on a 12-dim measurement space; rounding adds a few


def test_posterior_draws_have_the_posterior_moments():
    g = torch.Generator().manual_seed(1)
    prior = _prior()
    a = torch.randn(1, 10, D, generator=g, dtype=torch.float64) / 5
    y = torch.randn(1, 10, generator=g, dtype=torch.float64)
    k = 6000
    op = DenseOperator(a, sigma_y=0.1)
    draws, _ = operator_posterior(prior, y.expand(k, -1), op, seeds=list(range(k)), cg_tol=1e-10)
    ref_mean, ref_cov = _dense_posterior(prior, a[0], y[0], 0.1**2)
    flat = draws.reshape(k, D)
    se = (ref_cov.diagonal() / k).sqrt()
    assert ((flat.mean(0) - ref_mean).abs() < 5 * se + 1e-9).all()
    emp = torch.cov(flat.T)
    assert (emp - ref_cov).norm() / ref_cov.norm() < 0.08  # Monte-Carlo error of 6000 draws is ~0.03


def test_draws_do_not_depend_on_the_batch():
    g = torch.Generator().manual_seed(2)
    prior = _prior()
    mats = torch.randn(4, 8, D, generator=g, dtype=torch.float64) / 5
    y = torch.randn(4, 8, generator=g, dtype=torch.float64)
    op = DenseOperator(mats, sigma_y=0.05)
    all4, _ = operator_posterior(prior, y, op, seeds=[10, 11, 12, 13], cg_tol=1e-12)
    one, _ = operator_posterior(prior, y[2:3], op.select(torch.tensor([2])), seeds=[12], cg_tol=1e-12)
    assert torch.allclose(all4[2], one[0], atol=1e-9)
    other, _ = operator_posterior(prior, y[2:3], op.select(torch.tensor([2])), seeds=[99], cg_tol=1e-12)
    assert not torch.allclose(other[0], one[0], atol=1e-3)


class MaskAsOperator(DenseOperator):
    def __init__(self, mask):
        self.mask, self.sigma_y, self.image_shape, self.num_operators = mask, 0.0, SHAPE, mask.shape[0]

    def __call__(self, x):
        return self.mask * x

    def adjoint(self, v):
        return self.mask * v

    def select(self, idx):
        return MaskAsOperator(self.mask[idx])

    def num_observations(self):
        return self.mask.flatten(1).sum(1)


def test_monte_carlo_em_matches_exact_missing_pixel_em():
    """On masked data the general fit (draws + CG) must reach what the exact per-observation EM reaches."""
    g = torch.Generator().manual_seed(3)
    cov = smooth_covariance(5, 5, 1.5)
    mean = torch.linspace(-0.3, 0.3, D, dtype=torch.float64)
    n = 2500
    x = (mean + torch.randn(n, D, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(cov).T).reshape(n, *SHAPE)
    mask = (torch.rand(n, *SHAPE, generator=g) < 0.5).double()
    exact, _ = fit_gaussian(mask * x, mask, 6, 60, tol=1e-6)
    mc, changes = fit_gaussian_operator(mask * x, MaskAsOperator(mask), 6, 25, seed=0)

    def err(p):
        return float((p.covariance() - cov).norm() / cov.norm())

    assert err(mc) < max(1.25 * err(exact), err(exact) + 0.03)
    assert float((mc.mean - mean).abs().max()) < 0.06
    assert changes[0] > 0.3 and changes[-1] < 0.1  # it moved from the broad start, then settled


def test_monte_carlo_em_learns_through_a_noisy_mixing_operator():
    """No pixel is ever seen directly: every observation is 15 random projections of its image plus noise."""
    g = torch.Generator().manual_seed(4)
    cov = smooth_covariance(5, 5, 1.5)
    mean = torch.zeros(D, dtype=torch.float64)
    n = 2500
    x = (torch.randn(n, D, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(cov).T).reshape(n, *SHAPE)
    mats = torch.randn(n, 15, D, generator=g, dtype=torch.float64) / math.sqrt(D)
    op = DenseOperator(mats, sigma_y=0.02)
    y = op(x) + 0.02 * torch.randn(n, 15, generator=g, dtype=torch.float64)
    fit, _ = fit_gaussian_operator(y, op, 8, 25, seed=0)
    err = float((fit.covariance() - cov).norm() / cov.norm())
    assert err < 0.15, err
    assert float((fit.mean - mean).abs().max()) < 0.1


def test_bad_arguments():
    op = DenseOperator(torch.zeros(1, 3, D, dtype=torch.float64))
    with pytest.raises(ValueError, match="rank"):
        fit_gaussian_operator(torch.zeros(2, 3), op, 0, 1)
    with pytest.raises(ValueError, match="seeds"):
        operator_posterior(_prior(), torch.zeros(2, 3, dtype=torch.float64), op, seeds=[1])
