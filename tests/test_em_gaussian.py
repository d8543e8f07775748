"""Missing-data EM for a low-rank Gaussian prior, and its exact posterior: known answers."""

import math

import numpy as np
import pytest
import torch

from ambient.learners.gaussian_prior import GaussianPrior, em_step, fit_gaussian, initial_prior


def _low_rank_data(n=8000, shape=(1, 3, 4), rank=2, psi=0.05, keep=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    d = math.prod(shape)
    w = torch.randn(d, rank, generator=g, dtype=torch.float64) * 0.6
    mu = torch.randn(d, generator=g, dtype=torch.float64) * 0.3
    z = torch.randn(n, rank, generator=g, dtype=torch.float64)
    x = mu + z @ w.T + psi**0.5 * torch.randn(n, d, generator=g, dtype=torch.float64)
    mask = (torch.rand(n, d, generator=g) < keep).double()
    truth = GaussianPrior(mu, w, torch.full((d,), psi, dtype=torch.float64), shape)
    return truth, (x * mask).reshape(n, *shape), mask.reshape(n, *shape)


def _dense_conditional(prior: GaussianPrior, y: torch.Tensor, mask: torch.Tensor):
    """x_H | y_O by the textbook formula on the dense covariance."""
    c, mu = prior.covariance(), prior.mean
    o, h = mask.reshape(-1).bool(), ~mask.reshape(-1).bool()
    gain = c[h][:, o] @ torch.linalg.inv(c[o][:, o])
    mean = mu[h] + gain @ (y.reshape(-1)[o] - mu[o])
    cov = c[h][:, h] - gain @ c[o][:, h]
    return mean, cov, h


@pytest.mark.parametrize("noise", ["isotropic", "diagonal"])
def test_fit_recovers_mean_and_covariance(noise):
    n, keep = 8000, 0.5
    truth, y, mask = _low_rank_data(n=n, keep=keep)
    prior, history = fit_gaussian(y, mask, rank=2, iters=120, noise=noise)
    cov = truth.covariance()
    # sampling error of one covariance entry from the ~n·keep² images that observe both pixels
    scale = float(cov.diagonal().max())
    tol_cov = 5 * scale * math.sqrt(2 / (n * keep**2))
    tol_mean = 5 * math.sqrt(scale / (n * keep))
    assert (prior.mean - truth.mean).abs().max() < tol_mean
    assert (prior.covariance() - cov).abs().max() < tol_cov
    # a wrong answer is caught at this tolerance: loadings 30 % too large
    wrong = GaussianPrior(truth.mean, 1.3 * truth.loading, truth.noise, truth.shape)
    assert (wrong.covariance() - cov).abs().max() > tol_cov
    if noise == "isotropic":
        assert torch.allclose(prior.noise, prior.noise[:1].expand_as(prior.noise))
        assert abs(float(prior.noise[0]) - 0.05) < 0.01


@pytest.mark.parametrize("expand", [True, False])
def test_log_likelihood_never_decreases_and_matches_dense_formula(expand):
    _, y, mask = _low_rank_data(n=600, shape=(1, 4, 4), rank=3, keep=0.4, seed=1)
    prior, history = fit_gaussian(y, mask, rank=3, iters=25, noise="diagonal", memory_mb=0.05,  # many batches
                                  expand=expand)
    steps = np.diff(history)
    assert (steps > -1e-9).all(), steps.min()
    assert history[-1] > history[0] + 0.1
    # per-image log-likelihood against log N(y_O; μ_O, C_OO) computed densely
    ll = prior.log_likelihood(y[:5], mask[:5])
    c = prior.covariance()
    for i in range(5):
        o = mask[i].reshape(-1).bool()
        dist = torch.distributions.MultivariateNormal(prior.mean[o], c[o][:, o])
        assert abs(float(dist.log_prob(y[i].reshape(-1)[o])) - float(ll[i])) < 1e-9


def test_batching_does_not_change_an_em_step():
    _, y, mask = _low_rank_data(n=300, seed=2)
    start = initial_prior(y, mask, 2)
    a, lla = em_step(start, y, mask, memory_mb=256)
    b, llb = em_step(start, y, mask, memory_mb=0.02)
    assert abs(lla - llb) < 1e-10
    assert torch.allclose(a.covariance(), b.covariance(), atol=1e-12)


def test_posterior_samples_match_the_exact_conditional():
    truth, y, mask = _low_rank_data(n=1, shape=(1, 3, 3), rank=2, keep=0.45, seed=3)
    mean, cov, hidden = _dense_conditional(truth, y[0], mask[0])
    assert hidden.sum() >= 3
    post_mean = truth.posterior_mean(y, mask).reshape(-1)
    assert torch.allclose(post_mean[hidden], mean, atol=1e-10)
    k = 20000
    draws = truth.sample_posterior(y.expand(k, -1, -1, -1), mask.expand(k, -1, -1, -1), list(range(k)))
    flat = draws.reshape(k, -1)
    # observed pixels come back bit for bit
    assert torch.equal(flat[:, ~hidden], y.reshape(1, -1)[:, ~hidden].expand(k, -1))
    emp_mean, emp_cov = flat[:, hidden].mean(0), torch.cov(flat[:, hidden].T)
    sd = cov.diagonal().sqrt()
    assert ((emp_mean - mean).abs() / sd).max() < 5 / math.sqrt(k)
    assert ((emp_cov - cov).abs() / torch.outer(sd, sd)).max() < 6 * math.sqrt(2 / k)
    # the unconditional covariance is clearly different (the test can fail)
    prior_cov = truth.covariance()[hidden][:, hidden]
    assert ((prior_cov - cov).abs() / torch.outer(sd, sd)).max() > 0.2


@pytest.mark.parametrize("shape,rank", [((1, 3, 4), 2), ((1, 16, 16), 32)])
def test_posterior_draws_depend_only_on_the_seed(shape, rank):
    """Bit for bit, whatever the batch or slice: the larger case is where batched BLAS products
    (MKL, AMD EPYC) gave rows that differed in the last bits with the batch size."""
    truth, y, mask = _low_rank_data(n=40, seed=4, shape=shape, rank=rank)
    seeds = list(range(100, 140))
    a = truth.sample_posterior(y, mask, seeds)
    mean = truth.posterior_mean(y, mask)
    for memory_mb in (0.001, 0.05, 0.2):  # other batch sizes
        assert torch.equal(a, truth.sample_posterior(y, mask, seeds, memory_mb=memory_mb))
        assert torch.equal(mean, truth.posterior_mean(y, mask, memory_mb=memory_mb))
    for lo, hi in ((10, 20), (3, 4), (7, 29)):  # slices of the observations
        assert torch.equal(a[lo:hi], truth.sample_posterior(y[lo:hi], mask[lo:hi], seeds[lo:hi]))
        assert torch.equal(mean[lo:hi], truth.posterior_mean(y[lo:hi], mask[lo:hi]))
    assert not torch.equal(a, truth.sample_posterior(y, mask, [s + 1 for s in seeds]))


def test_arrays_round_trip_and_bad_arguments():
    truth, y, mask = _low_rank_data(n=50)
    again = GaussianPrior.from_arrays(truth.to_arrays())
    assert torch.equal(again.covariance(), truth.covariance()) and again.shape == truth.shape
    with pytest.raises(ValueError, match="rank"):
        fit_gaussian(y, mask, rank=0, iters=1)
    with pytest.raises(ValueError, match="noise"):
        fit_gaussian(y, mask, rank=1, iters=1, noise="full")


def test_parameter_expansion_converges_faster_when_most_pixels_are_missing():
    _, y, mask = _low_rank_data(n=2000, shape=(1, 4, 4), rank=3, keep=0.2, seed=6)
    start = initial_prior(y, mask, 3)
    _, px = fit_gaussian(y, mask, rank=3, iters=10, init=start, expand=True, accelerate=False)
    _, plain = fit_gaussian(y, mask, rank=3, iters=10, init=start, expand=False, accelerate=False)
    assert px[0] == plain[0] and px[-1] > plain[-1]


def test_initial_prior_is_the_pairwise_complete_covariance():
    """The start estimates every covariance entry from the images observing both pixels: at 80 % missing it is
    already close to the truth, where filling with the mean and dividing by share² inflated the diagonal 1/share."""
    n, keep = 20000, 0.2
    truth, y, mask = _low_rank_data(n=n, shape=(1, 3, 3), rank=2, keep=keep, seed=7)
    cov = truth.covariance()
    start = initial_prior(y, mask, 9)  # full rank: the start is the (PSD) pairwise covariance itself
    scale = float(cov.diagonal().max())
    tol = 5 * scale * math.sqrt(2 / (n * keep**2))
    assert (start.covariance() - cov).abs().max() < tol
    assert (start.mean - truth.mean).abs().max() < 5 * math.sqrt(scale / (n * keep))
    assert (cov.diagonal() / keep - cov.diagonal()).abs().max() > tol  # the old start's diagonal is caught
    low = initial_prior(y, mask, 2)  # rank 2 + isotropic ψ: probabilistic PCA of that covariance
    assert (low.covariance() - cov).abs().max() < 2 * tol + float(truth.noise[0])


def test_fit_stops_at_the_stated_tolerance():
    """tol is the gain of one EM map in nats per observed value; the fit stops at the first map below it."""
    _, y, mask = _low_rank_data(n=2000, shape=(1, 4, 4), rank=3, keep=0.3, seed=8)
    observed = float(mask.reshape(2000, -1).sum(1).mean())
    for accelerate in (False, True):
        report = {}
        prior, history = fit_gaussian(y, mask, rank=3, iters=500, tol=1e-5, accelerate=accelerate, report=report)
        assert report["stopped"] == "tol" and report["maps"] < 500 and report["observed"] == observed
        gains = [g for _, g in report["gains"]]
        assert gains[-1] < 1e-5 <= min(gains[:-1])  # the first map that gained < tol was the last checked
        again = {}
        same, _ = fit_gaussian(y, mask, rank=3, iters=report["maps"], accelerate=accelerate, report=again)
        assert again["stopped"] == "cap" and torch.equal(same.covariance(), prior.covariance())  # same maps, same fit
    # plain EM: each map's gain is the difference of successive log-likelihoods, per observed value
    report = {}
    _, history = fit_gaussian(y, mask, rank=3, iters=30, accelerate=False, report=report)
    assert np.allclose([g for _, g in report["gains"]], np.diff(history[:-1]) / observed, rtol=0, atol=1e-15)
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="tol"):
            fit_gaussian(y, mask, rank=3, iters=5, tol=bad)


def test_squarem_is_monotone_faster_and_reaches_the_same_fixed_point():
    _, y, mask = _low_rank_data(n=1500, shape=(1, 4, 4), rank=3, keep=0.25, seed=9)
    start = initial_prior(y, mask, 3)
    fits = {}
    for accelerate in (False, True):
        report = {}
        maps_ll = []
        prior, history = fit_gaussian(y, mask, rank=3, iters=40, init=start, accelerate=accelerate, report=report,
                                      memory_mb=0.05, callback=lambda i, ll, out=maps_ll: out.append((i + 1, ll)))
        steps = np.diff(history)
        assert (steps > -1e-9).all(), steps.min()  # monotone, rejected extrapolations included
        assert report["maps"] == 40 and history[0] == maps_ll[0][1]
        fits[accelerate] = (prior, history, maps_ll)
    plain_final = fits[False][1][-1]
    # SQUAREM reaches plain EM's 40-map log-likelihood in at most half the EM maps
    reach = next(i for i, ll in fits[True][2] if ll >= plain_final)
    assert reach <= 20, reach
    # same fixed point: run both to a tight tolerance; the covariances agree, and plain EM does not move SQUAREM's
    tight = {a: fit_gaussian(y, mask, rank=3, iters=3000, init=start, accelerate=a, tol=1e-10)[0]
             for a in (False, True)}
    ca, cp = tight[True].covariance(), tight[False].covariance()
    assert float((ca - cp).norm() / ca.norm()) < 1e-3
    again, _ = fit_gaussian(y, mask, rank=3, iters=5, init=tight[True], accelerate=False)
    assert float((again.covariance() - ca).norm() / ca.norm()) < 1e-5


def test_squarem_keeps_the_noise_positive_and_isotropic():
    _, y, mask = _low_rank_data(n=800, shape=(1, 3, 4), rank=2, keep=0.3, seed=10)
    prior, history = fit_gaussian(y, mask, rank=2, iters=30, noise="isotropic", accelerate=True)
    assert (prior.noise > 0).all() and torch.allclose(prior.noise, prior.noise[:1].expand_as(prior.noise))
    assert (np.diff(history) > -1e-9).all()
