"""Ambient training on undersampled k-space (issue 25, item 4a): the law of Ã, the network input, the loss's
exact minimiser on a Gaussian, the preconditioning, the fixed-operator sampler and restore, the training API."""

import json

import pytest
import torch

from ambient.data.kspace_law import always_sampled, further_lines, mirror_index, seen_spectrum
from ambient.errors import AmbientInputError
from ambient.learners.kspace_ambient import KSpaceAmbientConfig, load_kspace_ambient, train_kspace_ambient
from ambient.nets.denoiser import Denoiser
from ambient.nets.projection_denoiser import ProjectionDenoiser
from ambient.objectives.kspace_loss import KSpaceAmbientLoss
from ambient.operators.kspace import KSpaceOperator, cartesian_mask
from ambient.operators.measurements import save_measurements
from ambient.sampling.fixed_operator import kspace_ambient_restore, kspace_ambient_sample, seen_projection

S = 8  # 8×8 real images
SHAPE = (1, S, S)
R, CENTRE, DELTA = 2, 0.125, 0.5  # 4 lines of 8, the zero-frequency column always


def gaussian(seed=0):
    """A smooth 64-d Gaussian (μ, Σ) in float64."""
    g = torch.Generator().manual_seed(seed)
    ij = torch.stack(torch.meshgrid(torch.arange(S), torch.arange(S), indexing="ij"), -1).reshape(-1, 2).double()
    d2 = ((ij[:, None] - ij[None]) ** 2).sum(-1)
    sigma = 0.25 * torch.exp(-d2 / (2 * 2.0**2)) + 0.02 * torch.eye(S * S, dtype=torch.float64)
    mu = 0.3 * torch.randn(S * S, generator=g, dtype=torch.float64)
    return mu, sigma


def matrix(fn, n_in):
    """The real matrix of a linear map on flattened real vectors."""
    basis = torch.eye(n_in, dtype=torch.float64).reshape(n_in, *SHAPE)
    return fn(basis).reshape(n_in, -1).T


class ExactDenoiser:
    """E[x0 | P x_σ, Ã] = μ + Σ P (PΣP + σ² P)⁺ (x_in − P μ) for a Gaussian, per image (net interface)."""

    def __init__(self, mu, sigma):
        self.mu, self.cov = mu, sigma
        self.cache = {}

    def gain(self, seen_row, s):
        key = (tuple(seen_row.flatten().tolist()), round(float(s), 12))
        if key not in self.cache:
            p = matrix(seen_projection(seen_row[None]), S * S)
            self.cache[key] = (self.cov @ p @ torch.linalg.pinv(p @ self.cov @ p + s**2 * p, hermitian=True), p)
        return self.cache[key]

    def __call__(self, x_in, sigma, seen, project):
        out = []
        for i in range(x_in.shape[0]):
            k, p = self.gain(seen[i], sigma[i])
            out.append(self.mu + k @ (x_in[i].flatten().double() - p @ self.mu))
        return torch.stack(out).reshape(x_in.shape)


def draws(n, seed=0, delta=DELTA):
    """x0 ~ N(μ, Σ), A (one line mask each), Ã, σ, η: one Monte-Carlo batch."""
    mu, cov = gaussian()
    g = torch.Generator().manual_seed(seed + 1)
    x0 = (mu + torch.randn(n, S * S, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(cov).T)
    x0 = x0.reshape(n, *SHAPE)
    masks = cartesian_mask(n, S, S, R, CENTRE, seed=seed + 2)
    op = KSpaceOperator(masks, SHAPE)
    m_hat = further_lines(masks, delta, g, always_sampled(masks))
    op_hat = KSpaceOperator(m_hat, SHAPE)
    sigma = KSpaceAmbientLoss().sample_sigma(n, g).double()
    eta = torch.randn(n, *SHAPE, generator=g, dtype=torch.float64)
    return x0, op, op_hat, seen_spectrum(m_hat)[:, None].double(), sigma, eta


# -- the law of Ã ----------------------------------------------------------------------------------------------

def test_further_lines_drops_mirror_pairs_keeps_centre_and_is_a_subset():
    masks = cartesian_mask(400, S, S, R, CENTRE, seed=5)
    keep = always_sampled(masks)
    assert keep.tolist() == [j == S // 2 for j in range(S)]
    m_hat = further_lines(masks, 0.3, torch.Generator().manual_seed(0), keep)
    assert bool((m_hat <= masks).all()) and bool((m_hat[:, :, keep] == 1).all())
    cols, hat = masks[:, 0] > 0, m_hat[:, 0] > 0
    mir = mirror_index(S)
    dropped = cols & ~hat
    # a dropped column's mirror is never kept
    assert not bool((dropped & hat[:, mir]).any())
    rate = dropped[:, ~keep].sum() / cols[:, ~keep].sum()
    assert abs(float(rate) - 0.3) < 0.05
    # every column outside Ã has positive probability of being in A given Ã (here: acquired somewhere)
    assert bool(cols.any(0).all())


def test_seen_spectrum_is_mirror_symmetric_and_projection_is_pinv():
    masks = cartesian_mask(6, S, S, R, CENTRE, seed=1)
    s = seen_spectrum(masks)
    assert torch.equal(s, s[:, mirror_index(S)][:, :, mirror_index(S)])
    op = KSpaceOperator(masks, SHAPE)
    x = torch.randn(6, *SHAPE, dtype=torch.float64)
    p = seen_projection(s[:, None])
    torch.testing.assert_close(p(x), op.pinv(op(x)))
    torch.testing.assert_close(p(p(x)), p(x))


# -- the network input -----------------------------------------------------------------------------------------

def test_input_construction_adjoint_identity():
    x0, op, op_hat, seen, sigma, eta = draws(16)
    y = op(x0)
    s5 = sigma.reshape(-1, 1, 1, 1, 1)
    lhs = op_hat.adjoint(op_hat.support().double() * (y + s5 * op(eta)))
    x_sigma = x0 + sigma.reshape(-1, 1, 1, 1) * eta
    torch.testing.assert_close(lhs, op_hat.adjoint(op_hat(x_sigma)))
    x_in = KSpaceAmbientLoss.network_input(y, op, op_hat, sigma, eta)
    torch.testing.assert_close(x_in, op_hat.pinv(op_hat(x_sigma)))
    torch.testing.assert_close(x_in, seen_projection(seen)(x_sigma))


def test_exact_denoiser_matches_the_real_layout_formula():
    """μ + ΣÃᵀ(ÃΣÃᵀ + σ²ÃÃᵀ)⁺(Ãx_σ − Ãμ) in the real layout == the projection form the tests use."""
    mu, cov = gaussian()
    x0, op, op_hat, seen, sigma, eta = draws(3)
    exact = ExactDenoiser(mu, cov)
    x_sigma = x0 + sigma.reshape(-1, 1, 1, 1) * eta
    x_in = seen_projection(seen)(x_sigma)
    got = exact(x_in, sigma, seen, None)
    for i in range(3):
        a = matrix(op_hat.select([i]), S * S)  # (128, 64)
        s = float(sigma[i])
        gain = cov @ a.T @ torch.linalg.pinv(a @ cov @ a.T + s**2 * a @ a.T, hermitian=True)
        want = mu + gain @ (a @ x_sigma[i].flatten() - a @ mu)
        torch.testing.assert_close(got[i].flatten(), want, atol=1e-8, rtol=1e-8)


# -- the loss --------------------------------------------------------------------------------------------------

def per_image_loss(net, n, seed):
    x0, op, op_hat, seen, sigma, eta = draws(n, seed)
    return KSpaceAmbientLoss()(net, op(x0), op, op_hat, seen, sigma=sigma, noise=eta)


def test_exact_denoiser_minimises_expected_loss():
    mu, cov = gaussian()
    exact = ExactDenoiser(mu, cov)
    c = 0.5 * torch.randn(1, *SHAPE, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    def hidden_bias(x, s, seen, project):
        return exact(x, s, seen, project) + 0.5 * (c - project(c))

    def seen_bias(x, s, seen, project):
        return exact(x, s, seen, project) + 0.5 * project(c)

    def shrink(x, s, seen, project):  # the hidden frequencies' prediction pulled halfway towards 0
        d = exact(x, s, seen, project)
        return project(d) + 0.5 * (d - project(d))

    n = 3000
    base = per_image_loss(exact, n, 7)
    assert torch.isfinite(base).all()
    for other in (hidden_bias, seen_bias, shrink):
        diff = per_image_loss(other, n, 7) - base  # paired: the same draws
        se = diff.std() / n**0.5
        assert float(diff.mean()) > 4 * float(se), (other.__name__, float(diff.mean()), float(se))


def test_expected_gradient_vanishes_at_the_exact_denoiser():
    """For D_θ = D* + Σ_j θ_j d_j(x_in, Ã), the Monte-Carlo mean of ∂loss/∂θ_j at θ = 0 is 0 within 4 SE, and at
    θ = 0.5 e_0 clearly not. The loss is quadratic in θ, so central differences are its exact per-image gradient."""
    mu, cov = gaussian()
    exact = ExactDenoiser(mu, cov)
    c = 0.5 * torch.randn(1, *SHAPE, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    def family(theta):
        def net(x, s, seen, project):
            d = exact(x, s, seen, project)
            dirs = [c - project(c), project(c), d - project(d), x]
            return d + sum(t * v for t, v in zip(theta, dirs))
        return net

    n, eps = 3000, 1e-3

    def grad(j, at):
        e = torch.zeros(4, dtype=torch.float64)
        e[j] = eps
        return (per_image_loss(family(at + e), n, 11) - per_image_loss(family(at - e), n, 11)) / (2 * eps)

    zero = torch.zeros(4, dtype=torch.float64)
    for j in range(4):
        g = grad(j, zero)
        assert abs(float(g.mean())) < 4 * float(g.std()) / n**0.5, (j, float(g.mean()), float(g.std()) / n**0.5)
    g = grad(0, torch.tensor([0.5, 0, 0, 0], dtype=torch.float64))
    assert float(g.mean()) > 4 * float(g.std()) / n**0.5


def test_unacquired_entries_do_not_affect_loss_or_gradient():
    x0, op, op_hat, seen, sigma, eta = draws(8, 3)
    y = op(x0)
    junk = y + (1 - op.support().double()) * torch.randn(y.shape, dtype=torch.float64)
    assert not torch.equal(junk, y)
    w = torch.zeros(1, *SHAPE, dtype=torch.float64, requires_grad=True)

    def net(x, s, seen, project):
        return x * (1 + w) + w

    out = []
    for yy in (y, junk):
        loss = KSpaceAmbientLoss()(net, yy, op, op_hat, seen, sigma=sigma, noise=eta)
        (g,) = torch.autograd.grad(loss.sum(), w)
        out.append((loss.detach(), g))
    torch.testing.assert_close(out[0][0], out[1][0], rtol=0, atol=0)
    torch.testing.assert_close(out[0][1], out[1][1], rtol=0, atol=0)


def test_oracle_denoiser_has_zero_loss():
    x0, op, op_hat, seen, sigma, eta = draws(8, 4)
    loss = KSpaceAmbientLoss()(lambda *a: x0, op(x0), op, op_hat, seen, sigma=sigma, noise=eta)
    assert float(loss.abs().max()) < 1e-20


# -- preconditioning -------------------------------------------------------------------------------------------

class Affine(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 1, 3, padding=1)

    def forward(self, x, c_noise):
        return self.conv(x) + c_noise.reshape(-1, 1, 1, 1)


def test_projection_denoiser_with_a_pixel_mask_is_the_mask_aware_denoiser():
    torch.manual_seed(0)
    backbone = Affine()
    x = torch.randn(4, *SHAPE)
    mask = (torch.rand(4, *SHAPE) < 0.5).float()
    sigma = torch.tensor([0.01, 0.3, 2.0, 40.0])
    ours = ProjectionDenoiser(backbone, 1)(mask * x, sigma, mask, lambda v: mask * v)
    theirs = Denoiser(backbone, 1)(x, sigma, mask)
    torch.testing.assert_close(ours, theirs)


# -- sampler and restore ---------------------------------------------------------------------------------------

def test_sampler_is_per_seed_and_ends_at_the_denoiser_output():
    mu, cov = gaussian()
    exact = ExactDenoiser(mu, cov)
    exact.sigma_min, exact.sigma_max = 0.002, 80.0
    masks = cartesian_mask(20, S, S, R, CENTRE, seed=9)
    keep = always_sampled(masks)
    a = kspace_ambient_sample(exact, masks, DELTA, keep, [3, 4, 5], SHAPE, num_steps=6, batch=3)
    b = kspace_ambient_sample(exact, masks, DELTA, keep, [4, 5], SHAPE, num_steps=6, batch=1)
    torch.testing.assert_close(a[1:], b)
    assert torch.isfinite(a).all() and a.shape == (3, *SHAPE)


def test_restore_is_data_consistent():
    mu, cov = gaussian()
    exact = ExactDenoiser(mu, cov)
    exact.sigma_min = 0.002
    x0, op, *_ = draws(5, 2)
    y = op(x0)
    for delta, k in ((0.0, 1), (0.5, 3)):
        x = kspace_ambient_restore(exact, y, op, delta=delta, keep=always_sampled(op.mask), draws=k).double()
        assert float((op(x) - y).abs().max()) < 1e-5


# -- the training API ------------------------------------------------------------------------------------------

def test_train_load_sample_tiny(tmp_path):
    x0, op, *_ = draws(40, 0)
    data = save_measurements(tmp_path / "k.npz", op(x0.clamp(-1, 1)), op, (-1.0, 1.0))
    cfg = KSpaceAmbientConfig(data=str(data), outdir=str(tmp_path / "run"), corruption_probability=0.3,
                              batch=8, kimg=0.016, lr=1e-3)
    out = train_kspace_ambient(cfg, log=lambda m: None)
    meta = json.loads((out / "config.json").read_text())
    assert meta["operator"]["kind"] == "kspace" and KSpaceAmbientConfig.from_dict(meta["config"]) == cfg
    model = load_kspace_ambient(out)
    x = kspace_ambient_sample(model.denoiser, model.masks, model.delta, model.keep, [0, 1], model.image_shape,
                              num_steps=3)
    assert x.shape == (2, *SHAPE) and torch.isfinite(x).all()
    with pytest.raises(AmbientInputError, match="--outdir"):
        train_kspace_ambient(cfg)


def test_train_refuses_a_shared_mask_and_bad_delta(tmp_path):
    x0, op, *_ = draws(10, 0)
    shared = KSpaceOperator(op.mask[:1], SHAPE)
    data = save_measurements(tmp_path / "k.npz", shared(x0), shared, (-1.0, 1.0))
    with pytest.raises(AmbientInputError, match="one line mask per observation"):
        train_kspace_ambient(KSpaceAmbientConfig(data=str(data), outdir=str(tmp_path / "r")))
    with pytest.raises(AmbientInputError, match="--corruption-probability"):
        train_kspace_ambient(KSpaceAmbientConfig(data=str(data), outdir=str(tmp_path / "r"),
                                                 corruption_probability=0.0))
    noisy = KSpaceOperator(op.mask, SHAPE, sigma_y=0.1)
    data = save_measurements(tmp_path / "noisy.npz", noisy.add_noise(noisy(x0)), noisy, (-1.0, 1.0))
    with pytest.raises(AmbientInputError, match="noisy"):
        train_kspace_ambient(KSpaceAmbientConfig(data=str(data), outdir=str(tmp_path / "r")))
    assert not (tmp_path / "r").exists()
