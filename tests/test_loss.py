import math

import pytest
import torch

from ambient.data.corruption import Corruption
from ambient.data.datasets import augment_batch
from ambient.nets.backbones import build_backbone
from ambient.nets.denoiser import Denoiser
from ambient.nets.oracle import GaussianDenoiser, smooth_covariance
from ambient.objectives.losses import AmbientLoss, EDMLoss
from tests.conftest import MLPBackbone


def gen(seed):
    return torch.Generator().manual_seed(seed)


def tiny_denoiser(channels=1, res=8, seed=0):
    torch.manual_seed(seed)  # parameter init only
    return Denoiser(build_backbone("tiny", channels, res), channels)


def test_unobserved_pixels_do_not_affect_loss_or_gradients():
    den = tiny_denoiser(3, 8)
    c = Corruption("dust", 0.6, 0.3)
    x0 = torch.rand(4, 3, 8, 8, generator=gen(1)) * 2 - 1
    a = c.mask(x0.shape, gen(2))
    a_hat = c.further(a, gen(3))
    x_other = torch.where(a.bool(), x0, torch.randn(x0.shape, generator=gen(4)) * 10)
    assert not torch.equal(x_other, x0)
    loss_fn = AmbientLoss()

    def loss_and_grads(x):
        den.zero_grad()
        loss = loss_fn(den, x, a, a_hat, gen(5)).mean()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in den.parameters()]

    l1, g1 = loss_and_grads(x0)
    l2, g2 = loss_and_grads(x_other)
    assert torch.equal(l1, l2)
    assert all(torch.equal(a_, b_) for a_, b_ in zip(g1, g2))
    assert any(g.abs().sum() > 0 for g in g1)


def test_p0_is_exactly_the_edm_loss():
    den = tiny_denoiser(1, 8)
    y = torch.rand(6, 1, 8, 8, generator=gen(0)) * 2 - 1
    ones = torch.ones_like(y)
    sigma = torch.tensor([0.01, 0.1, 0.5, 1.0, 5.0, 60.0])
    noise = torch.randn(y.shape, generator=gen(1))
    loss = AmbientLoss(normalize="sum")(den, y, ones, ones, sigma=sigma, noise=noise)
    # EDM: lambda(sigma) * ||D(y + sigma n; sigma) - y||^2
    sd = 0.5
    weight = (sigma**2 + sd**2) / (sigma * sd) ** 2
    expected = weight * ((den(y + sigma.view(-1, 1, 1, 1) * noise, sigma) - y) ** 2).flatten(1).sum(1)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)
    mean_loss = AmbientLoss(normalize="mean")(den, y, ones, ones, sigma=sigma, noise=noise)
    torch.testing.assert_close(mean_loss, expected / 64, rtol=1e-6, atol=0)


def test_mean_normalisation_divides_by_observed_pixels():
    den = tiny_denoiser(1, 8)
    c = Corruption("dust", 0.7, 0.2)
    y = torch.rand(5, 1, 8, 8, generator=gen(0))
    a = c.mask(y.shape, gen(1))
    a_hat = c.further(a, gen(2))
    kw = dict(sigma=torch.full((5,), 0.7), noise=torch.randn(y.shape, generator=gen(3)))
    s = AmbientLoss(normalize="sum")(den, y, a, a_hat, **kw)
    m = AmbientLoss(normalize="mean")(den, y, a, a_hat, **kw)
    torch.testing.assert_close(m, s / a.flatten(1).sum(1), rtol=1e-6, atol=0)


def test_sigma_distribution_is_lognormal():
    sig = AmbientLoss().sample_sigma(200_000, gen(0))
    assert abs(sig.log().mean().item() + 1.2) < 0.02
    assert abs(sig.log().std().item() - 1.2) < 0.02


def _gaussian_setup(n=20_000, p=0.5, delta=0.3, seed=0):
    shape = (1, 4, 4)
    cov = smooth_covariance(4, 4, length_scale=1.5)
    mean = torch.linspace(-0.3, 0.3, 16, dtype=torch.float64)
    chol = torch.linalg.cholesky(cov)
    z = torch.randn(n, 16, generator=gen(seed), dtype=torch.float64)
    x0 = (mean + z @ chol.T).reshape(n, *shape).float()
    c = Corruption("dust", p, delta)
    a = c.mask(x0.shape, gen(seed + 1))
    a_hat = c.further(a, gen(seed + 2))
    return GaussianDenoiser(mean, cov, shape), x0, a, a_hat


def test_closed_form_optimum_minimises_the_ambient_loss():
    opt, x0, a, a_hat = _gaussian_setup()
    n = x0.shape[0]
    y = a * x0
    sigma = AmbientLoss().sample_sigma(n, gen(10)).clamp(0.05, 5.0)
    noise = torch.randn(x0.shape, generator=gen(11))
    direction = torch.randn(x0.shape[1:], generator=gen(12))
    loss_fn = AmbientLoss()

    def mc_loss(den):
        return loss_fn(den, y, a, a_hat, sigma=sigma, noise=noise).mean().item()

    best = mc_loss(opt)
    perturbations = {
        "scaled": lambda x, s, m: opt(x, s, m) * 1.1,
        "shifted": lambda x, s, m: opt(x, s, m) + 0.05 * direction,
        "mask-blind": lambda x, s, m: opt(x, s, None),
        "diagonal-cov": GaussianDenoiser(opt.mean, torch.diag(torch.diag(opt.cov)), (1, 4, 4)),
        "wider-cov": GaussianDenoiser(opt.mean, opt.cov * 1.3, (1, 4, 4)),
    }
    for name, den in perturbations.items():
        assert mc_loss(den) > best, name


def test_training_with_ambient_loss_approaches_the_optimum():
    """A small network trained only on A ⊙ x0 learns E[x0 | Ã ⊙ x_σ, Ã], hidden pixels included."""
    opt, _, _, _ = _gaussian_setup(n=10)
    chol = torch.linalg.cholesky(opt.cov)
    c = Corruption("dust", 0.5, 0.3)
    torch.manual_seed(0)
    net = Denoiser(MLPBackbone((1, 4, 4), 2, hidden=256), 1)
    adam = torch.optim.Adam(net.parameters(), lr=2e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(adam, 1500)
    loss_fn = AmbientLoss()
    g = gen(100)

    def draw(n, g):
        z = torch.randn(n, 16, generator=g, dtype=torch.float64)
        x0 = (opt.mean + z @ chol.T).reshape(n, 1, 4, 4).float()
        a = c.mask(x0.shape, g)
        return x0, a, c.further(a, g)

    for _ in range(1500):
        x0, a, a_hat = draw(256, g)
        loss = loss_fn(net, a * x0, a, a_hat, g).mean()
        adam.zero_grad()
        loss.backward()
        adam.step()
        schedule.step()

    # evaluate on fresh data at several noise levels, on the pixels the network cannot see
    x0, a, a_hat = draw(4000, gen(200))
    sigma = torch.tensor([0.05, 0.2, 0.5, 1.0, 2.0]).repeat_interleave(800)
    x = a_hat * (x0 + sigma.view(-1, 1, 1, 1) * torch.randn(x0.shape, generator=gen(201)))
    hidden = 1 - a_hat
    with torch.no_grad():
        target = opt(x, sigma, a_hat)
        err_net = ((net(x, sigma, a_hat) - target) ** 2 * hidden).sum() / hidden.sum()
    diag = GaussianDenoiser(opt.mean, torch.diag(torch.diag(opt.cov)), (1, 4, 4))
    err_diag = ((diag(x, sigma, a_hat) - target) ** 2 * hidden).sum() / hidden.sum()
    # the correlation-blind baseline predicts the mean at hidden pixels; measured ratio ≈ 0.26
    assert err_net < 0.4 * err_diag, (err_net.item(), err_diag.item())


def test_loss_input_validation():
    den = tiny_denoiser(1, 8)
    y = torch.zeros(2, 1, 8, 8)
    a = torch.ones_like(y)
    with pytest.raises(ValueError, match="mask_hat"):
        AmbientLoss()(den, y, a * 0, a)
    with pytest.raises(ValueError, match="mask"):
        AmbientLoss()(den, y, a * 0.5, a * 0)
    with pytest.raises(ValueError, match="shape"):
        AmbientLoss()(den, y, torch.ones(2, 1, 8, 7), a)
    with pytest.raises(ValueError, match="normalize"):
        AmbientLoss(normalize="median")


# ---------------------------------------------------------------- loss objects for training
def test_edm_loss_is_the_ambient_loss_with_everything_visible():
    """EDMLoss (naive / clean baseline) shares AmbientLoss's call signature and equals it at A = Ã = 1,
    whatever masks it is given; its network takes no mask."""
    from ambient.objectives.losses import EDMLoss, training_loss

    den = tiny_denoiser(1, 8)
    c = Corruption("dust", 0.6, 0.3)
    y = torch.rand(4, 1, 8, 8, generator=gen(1)) * 2 - 1
    a = c.mask(y.shape, gen(2))
    a_hat = c.further(a, gen(3))
    sigma, noise = torch.tensor([0.1, 0.5, 2.0, 9.0]), torch.randn(y.shape, generator=gen(4))
    ones = torch.ones_like(y)
    with torch.no_grad():
        plain = EDMLoss()(den, y, a, a_hat, sigma=sigma, noise=noise)
        torch.testing.assert_close(plain, AmbientLoss()(den, y, ones, ones, sigma=sigma, noise=noise), rtol=0, atol=0)
        assert not torch.equal(plain, AmbientLoss()(den, y, a, a_hat, sigma=sigma, noise=noise))
    assert isinstance(training_loss("naive"), EDMLoss) and not training_loss("naive").mask_input
    assert type(training_loss("ambient")) is AmbientLoss and training_loss("ambient").mask_input
    with pytest.raises(ValueError, match="objective"):
        training_loss("clean")


def test_draw_is_a_pure_function_of_the_generator_and_keeps_masks_with_images():
    """draw() gives the same inputs for the same generator seed; flips move A and Ã with the image;
    a fixed Ã depends only on (seed, image index); EDMLoss draws all-ones masks."""
    from ambient.objectives.losses import EDMLoss

    c = Corruption("dust", 0.5, 0.4)
    y = torch.rand(6, 1, 4, 5, generator=gen(0)) * 2 - 1
    a = c.mask(y.shape, gen(1))
    a[3] = a[1]  # image index 1 appears twice, with its mask
    idx = torch.tensor([3, 1, 4, 1, 5, 9])
    loss = AmbientLoss(further=c)
    d1, d2 = loss.draw(y, a, idx, gen(7), 0.5, augment_batch), loss.draw(y, a, idx, gen(7), 0.5, augment_batch)
    for f in ("y", "mask", "mask_hat", "noise_level", "noise"):
        assert torch.equal(getattr(d1, f), getattr(d2, f)), f
    flipped = ~torch.all(d1.y == y, dim=(1, 2, 3))
    assert flipped.any() and not flipped.all()
    assert torch.equal(d1.mask[flipped], a[flipped].flip(-1)) and torch.equal(d1.mask[~flipped], a[~flipped])
    assert bool((d1.mask_hat <= d1.mask).all()) and d1.noise_level.shape == (6,)
    fixed = AmbientLoss(further=c, fixed_further=True, seed=11)
    f1, f2 = fixed.draw(y, a, idx, gen(1)), fixed.draw(y, a, idx, gen(2))
    assert torch.equal(f1.mask_hat, f2.mask_hat) and torch.equal(f1.mask_hat[1], f1.mask_hat[3])  # index 1 twice
    e = EDMLoss().draw(y, a, idx, gen(7), 0.5, augment_batch)
    with pytest.raises(ValueError, match="needs flip"):
        loss.draw(y, a, idx, gen(7), 0.5)
    assert torch.equal(e.mask, torch.ones_like(y)) and torch.equal(e.mask_hat, e.mask)
    part = d1[1:3]
    assert torch.equal(part.noise, d1.noise[1:3]) and torch.equal(part.mask_hat, d1.mask_hat[1:3])


@pytest.mark.parametrize("weighting", ["edm", "pixel", "tilted"])
def test_weightings_keep_unobserved_pixels_out_and_the_closed_form_optimum_best(weighting):
    opt, x0, a, a_hat = _gaussian_setup()
    n = x0.shape[0]
    sigma = AmbientLoss().sample_sigma(n, gen(10)).clamp(0.05, 5.0)
    noise = torch.randn(x0.shape, generator=gen(11))
    loss_fn = AmbientLoss(weighting=weighting)
    garbage = torch.where(a.bool(), x0, torch.randn(x0.shape, generator=gen(13)) * 10)
    best = loss_fn(opt, a * x0, a, a_hat, sigma=sigma, noise=noise).mean()
    assert torch.equal(best, loss_fn(opt, garbage, a, a_hat, sigma=sigma, noise=noise).mean())
    worse = loss_fn(lambda x, s, m: opt(x, s, m) * 1.1, a * x0, a, a_hat, sigma=sigma, noise=noise).mean()
    assert worse > best


def test_pixel_weighting_gives_hidden_graded_pixels_one_over_sigma_data_squared():
    y = torch.zeros(2, 1, 2, 2)
    a = torch.tensor([[1.0, 1.0], [1.0, 0.0]]).expand(2, 1, 2, 2).contiguous()
    a_hat = torch.tensor([[1.0, 0.0], [1.0, 0.0]]).expand(2, 1, 2, 2).contiguous()
    sigma = torch.tensor([0.01, 2.0])
    const = lambda x, s, m: torch.ones_like(x)  # noqa: E731 - error 1 on every pixel
    sd = 0.5
    w = (sigma**2 + sd**2) / (sigma * sd) ** 2
    edm = AmbientLoss(weighting="edm", normalize="sum")(const, y, a, a_hat, sigma=sigma, noise=torch.zeros_like(y))
    pix = AmbientLoss(weighting="pixel", normalize="sum")(const, y, a, a_hat, sigma=sigma, noise=torch.zeros_like(y))
    torch.testing.assert_close(edm, 3 * w)  # three graded pixels, each w(σ)
    torch.testing.assert_close(pix, 2 * w + 1 / sd**2)  # two seen ones w(σ), the hidden graded one 1/σ_d²
    # with Ã = A nothing graded is hidden: both weightings agree
    torch.testing.assert_close(AmbientLoss(weighting="pixel")(const, y, a, a, sigma=sigma, noise=torch.zeros_like(y)),
                               AmbientLoss(weighting="edm")(const, y, a, a, sigma=sigma, noise=torch.zeros_like(y)))
    with pytest.raises(ValueError, match="weighting"):
        AmbientLoss(weighting="other")


def _quadrature(loss: AmbientLoss, f, law_mean: float):
    """∫ f(σ) over σ = exp(N(law_mean, P_std²)) by quadrature on a fine grid in ln σ (float64)."""
    t = torch.linspace(-12.0, 12.0, 200_001, dtype=torch.float64)
    z = (t - law_mean) / loss.P_std
    density = torch.exp(-0.5 * z**2) / (loss.P_std * (2 * torch.pi) ** 0.5)
    return float(torch.trapezoid(density * f(t.exp()), t))


def test_tilted_weighting_has_edm_expected_loss_with_bounded_weights():
    """Exact answer: under the mixture σ law that ``tilted`` draws from, its weights give seen pixels EDM's
    σ law and hidden graded ones (σ² + σ_d²)/σ² in F units, i.e. in expectation the paper's loss."""
    edm_h = 0.25 * math.exp(2 * 1.2**2 + 2 * 1.2)  # σ_d² E[σ⁻²] under EDM's σ law: 49.1
    loss = AmbientLoss(weighting="tilted", hidden_scale=edm_h)
    s = loss.tilt_share

    def q(sigma, f):  # E_q[f] with q the mixture law
        return (1 - s) * _quadrature(loss, f, loss.P_mean) + s * _quadrature(loss, f, loss.hidden_law[0])

    for g in (lambda x: torch.ones_like(x), lambda x: x.log() ** 2, lambda x: 1 / (1 + x)):
        seen = q(None, lambda x, g=g: loss.tilted_weights(x)[0] * g(x))
        hidden = q(None, lambda x, g=g: loss.tilted_weights(x)[1] * g(x))
        assert seen == pytest.approx(_quadrature(loss, g, loss.P_mean), rel=1e-6)
        edm_hidden = _quadrature(loss, lambda x, g=g: (x**2 + 0.25) / x**2 * g(x), loss.P_mean)
        assert hidden == pytest.approx(edm_hidden, rel=1e-6)
    sig = torch.logspace(-4, 2, 1000, dtype=torch.float64)
    ws, wh = loss.tilted_weights(sig)
    assert float(ws.max()) <= 1 / (1 - s) + 1e-9 and float(wh.max()) <= (1 + loss.hidden_scale) / s + 1e-9
    # the σ law: half the draws tilted to small σ (log-mean P_mean − 2 P_std²)
    logs = loss.sample_sigma(200_000, gen(3)).log()
    assert float(logs.mean()) == pytest.approx(loss.P_mean - s * 2 * loss.P_std**2, abs=0.02)


def test_tilted_weighting_per_pixel_values_and_naive_keeps_edm():
    y = torch.zeros(2, 1, 2, 2)
    a = torch.tensor([[1.0, 1.0], [1.0, 0.0]]).expand(2, 1, 2, 2).contiguous()
    a_hat = torch.tensor([[1.0, 0.0], [1.0, 0.0]]).expand(2, 1, 2, 2).contiguous()
    sigma = torch.tensor([0.01, 2.0])
    const = lambda x, s, m: torch.ones_like(x)  # noqa: E731 - error 1 on every pixel
    loss = AmbientLoss(weighting="tilted", normalize="sum", hidden_scale=3.0)
    ws, wh = loss.tilted_weights(sigma)
    w = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
    torch.testing.assert_close(loss(const, y, a, a_hat, sigma=sigma, noise=torch.zeros_like(y)), 2 * w * ws + 4 * wh)
    naive = EDMLoss(weighting="tilted")
    assert naive.weighting == "pixel"
    torch.testing.assert_close(naive.sample_sigma(1000, gen(1)), EDMLoss().sample_sigma(1000, gen(1)))
    with pytest.raises(ValueError, match="hidden_scale"):
        AmbientLoss(weighting="tilted", hidden_scale=-1.0)
