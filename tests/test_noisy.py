"""Ambient training on noisy data at a known noise level (``--objective noisy``, issue 25 item 4b).

The loss (:class:`ambient.objectives.losses.NoisyLoss`) against exact answers on Gaussian data, the sampler's stop
just above σ_n, and the CLI end to end on tiny data with its refusals.
"""

import json
import math

import numpy as np
import pytest
import torch

from ambient.nets.oracle import GaussianDenoiser, smooth_covariance
from ambient.objectives.losses import NOISY_FLOOR, EDMLoss, NoisyLoss, noisy_sigma_stop, training_loss
from tests.helpers_cli import run
from tests.helpers_data import write_npz

SHAPE = (1, 2, 4)  # d = 8 pixels
SIGMA_N = 0.3


def gaussian():
    d = math.prod(SHAPE)
    mean = torch.linspace(-0.4, 0.3, d, dtype=torch.float64)
    cov = smooth_covariance(SHAPE[1], SHAPE[2], length_scale=1.5, jitter=1e-2)
    return mean, cov


def noisy_draws(n: int, seed: int):
    """y = x0 + σ_n n with x0 ~ N(mean, cov), and the loss's noise η, both (n, *SHAPE) float64."""
    mean, cov = gaussian()
    g = torch.Generator().manual_seed(seed)
    d = mean.numel()
    x0 = mean + torch.randn(n, d, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(cov).T
    y = x0 + SIGMA_N * torch.randn(n, d, generator=g, dtype=torch.float64)
    eta = torch.randn(n, d, generator=g, dtype=torch.float64)
    return y.reshape(n, *SHAPE), eta.reshape(n, *SHAPE)


class Affine(torch.nn.Module):
    """D(x) = W x + b at one σ (the family the Gaussian's exact denoisers belong to)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.weight = torch.nn.Parameter(weight.clone())
        self.bias = torch.nn.Parameter(bias.clone())

    def forward(self, x, sigma, mask=None):
        n = x.shape[0]
        return (x.reshape(n, -1) @ self.weight.T + self.bias).reshape(x.shape)


def affine_of(mean, cov, sigma):
    """(W, b) of E[x0 | x0 + σ n] for x0 ~ N(mean, cov): W = Σ (Σ + σ² I)⁻¹, b = (I − W) mean."""
    eye = torch.eye(mean.numel(), dtype=torch.float64)
    weight = cov @ torch.linalg.inv(cov + sigma**2 * eye)
    return weight, (eye - weight) @ mean


# σ = 0.31 lies under the weight's floor (a ≈ 0.06), 0.45 and 1.2 above it
SIGMAS = [0.31, 0.45, 1.2]


@pytest.mark.parametrize("sigma", SIGMAS)
def test_the_clean_denoiser_minimises_the_expected_loss_and_the_noisy_one_does_not(sigma):
    mean, cov = gaussian()
    loss = NoisyLoss(noise_sigma=SIGMA_N)
    y, eta = noisy_draws(80_000, seed=1)
    clean = GaussianDenoiser(mean, cov, SHAPE)
    noisy = GaussianDenoiser(mean, cov + SIGMA_N**2 * torch.eye(mean.numel(), dtype=torch.float64), SHAPE)
    base = loss(clean, y, sigma=sigma, noise=eta)
    direction = torch.linspace(1.0, -1.0, mean.numel(), dtype=torch.float64).reshape(SHAPE)

    def worse(other):  # per-image loss differences (common random numbers): mean and its MC standard error
        diff = loss(other, y, sigma=sigma, noise=eta) - base
        return float(diff.mean()), float(diff.std() / math.sqrt(diff.numel()))

    a = 1 - SIGMA_N**2 / sigma**2
    for eps in (0.05, -0.05):
        mean_diff, se = worse(lambda x, s, m, eps=eps: clean(x, s, m) + eps * direction)
        # the expected excess is exactly w(σ) a² ‖δ‖² / d (the cross term has mean 0 at the optimum)
        expected = float(loss.weight(torch.tensor(sigma)) / max(a, NOISY_FLOOR) ** 2 * a**2
                         * (eps * direction).pow(2).mean())
        assert mean_diff > 5 * se and abs(mean_diff - expected) < 5 * se
    for scale in (0.9, 1.1):
        mean_diff, se = worse(lambda x, s, m, scale=scale: mean.reshape(SHAPE) + scale * (clean(x, s, m)
                                                                                           - mean.reshape(SHAPE)))
        assert mean_diff > 5 * se
    mean_diff, se = worse(noisy)  # what naive EDM on y learns: E[y | x_σ] as if y were clean
    assert mean_diff > 10 * se


@pytest.mark.parametrize("sigma", SIGMAS)
def test_the_expected_gradient_vanishes_at_the_clean_denoiser_only(sigma):
    mean, cov = gaussian()
    loss = NoisyLoss(noise_sigma=SIGMA_N)
    y, eta = noisy_draws(100_000, seed=2)

    def gradient_z(weight, bias, chunks: int = 50):
        """The mean gradient of the expected loss w.r.t. (W, b) over chunks, in units of its MC standard error."""
        grads = []
        for yc, ec in zip(y.chunk(chunks), eta.chunk(chunks)):
            den = Affine(weight, bias)
            loss(den, yc, sigma=sigma, noise=ec).mean().backward()
            grads.append(torch.cat([den.weight.grad.flatten(), den.bias.grad]))
        grads = torch.stack(grads)
        return grads.mean(0) / (grads.std(0) / math.sqrt(chunks))

    z = gradient_z(*affine_of(mean, cov, sigma))
    assert float(z.abs().max()) < 4.5  # ~0 within Monte Carlo error (72 entries)
    eye = torch.eye(mean.numel(), dtype=torch.float64)
    z_noisy = gradient_z(*affine_of(mean, cov + SIGMA_N**2 * eye, sigma))
    assert float(z_noisy.abs().max()) > 10


def test_sigma_law_weights_and_stop():
    loss = NoisyLoss(noise_sigma=SIGMA_N)
    g = torch.Generator().manual_seed(0)
    sigma = loss.sample_sigma(50_000, g)
    assert bool((sigma > SIGMA_N).all())
    extra = (sigma**2 - SIGMA_N**2).sqrt()  # s: EDM's law
    assert abs(float(extra.log().mean()) - loss.P_mean) < 0.03 and abs(float(extra.log().std()) - loss.P_std) < 0.03
    stop = noisy_sigma_stop(SIGMA_N)
    assert stop == pytest.approx(SIGMA_N / math.sqrt(1 - NOISY_FLOOR)) and loss.sigma_stop == stop
    assert float(loss.signal_share(torch.tensor(stop))) == pytest.approx(NOISY_FLOOR)
    # far above σ_n the loss is EDM's: a → 1, same per-image value as EDMLoss on the same x_σ
    y, eta = noisy_draws(4, seed=3)
    den = GaussianDenoiser(*gaussian(), SHAPE)
    big = torch.full((4,), 60.0, dtype=torch.float64)
    edm = EDMLoss()(den, y, None, None, sigma=big, noise=eta * (big**2 - SIGMA_N**2).sqrt()[:, None, None, None] / 60)
    assert torch.allclose(loss(den, y, sigma=big, noise=eta), edm, rtol=1e-2)
    with pytest.raises(ValueError, match="sigma must exceed"):
        loss(den, y, sigma=SIGMA_N, noise=eta)
    with pytest.raises(ValueError, match="noise_sigma"):
        training_loss("noisy")
    with pytest.raises(ValueError, match="noise_sigma"):
        training_loss("naive", noise_sigma=0.1)
    assert isinstance(training_loss("noisy", noise_sigma=0.1), NoisyLoss)
    assert not training_loss("noisy", noise_sigma=0.1).mask_input


def test_the_stopped_sampler_with_the_exact_denoiser_gives_the_clean_estimates_law():
    """Sampled down to σ_stop (the spec's stop on the denoiser) and then D(x_σ_stop, σ_stop), the exact clean
    denoiser gives N(μ, Σ (Σ + σ_stop² I)⁻¹ Σ), exact moments of the Heun sampler; sampled to 0.002, N(μ, Σ)."""
    from ambient.data.corruption import Corruption
    from ambient.nets.oracle import fixed_mask_sampler_moments, relative_covariance_error
    from ambient.nets.registry import SamplingSpec
    from ambient.sampling.fixed_mask import model_sigmas

    mean, cov = gaussian()
    stop = noisy_sigma_stop(SIGMA_N)
    spec = SamplingSpec(Corruption(), noise_sigma=SIGMA_N, sigma_stop=stop)
    assert SamplingSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    stopped = spec.fit_sigma_range(GaussianDenoiser(mean, cov, SHAPE))
    full = SamplingSpec(Corruption()).fit_sigma_range(GaussianDenoiser(mean, cov, SHAPE))
    assert stopped.sigma_min == stop and full.sigma_min == 0.002
    eye = torch.eye(mean.numel(), dtype=torch.float64)
    shrunk = cov @ torch.linalg.inv(cov + stop**2 * eye) @ cov
    ones = torch.ones(1, mean.numel())
    m, c = fixed_mask_sampler_moments(mean, cov, ones, model_sigmas(stopped, 40))
    assert relative_covariance_error(c, shrunk) < 0.03 < 0.08 < relative_covariance_error(c, cov)
    assert float((m - mean).abs().max()) < 0.01
    _, c_full = fixed_mask_sampler_moments(mean, cov, ones, model_sigmas(full, 40))
    assert relative_covariance_error(c_full, cov) < 0.03


# ------------------------------------------------------------------------------------------------ CLI, end to end

TINY = ["--arch", "tiny", "--batch", "8", "--snapshot-kimg", "0.016", "--tick-kimg", "0.008", "--grid-samples", "4",
        "--no-progress", "--device", "cpu"]


def test_train_and_sample_stop_at_the_noise_level(tmp_path, capsys):
    from ambient.sampling.fixed_mask import ambient_sample, model_sigmas
    from ambient.store.models import load_model

    data = write_npz(tmp_path / "d.npz")
    out = tmp_path / "run"
    code, _, err = run(["train", "--data", str(data), "--outdir", str(out), "--objective", "noisy",
                        "--noise-sigma", "20", "--kimg", "0.016", *TINY], capsys)
    assert code == 0, err
    cfg = json.loads((out / "config.json").read_text())
    sigma_n = 20 * 2 / 255  # uint8 data: 0..255 ↔ [-1, 1]
    assert cfg["train"]["noise_sigma"] == 20 and cfg["model"]["mask_channels"] is False
    assert cfg["sampling"]["noise_sigma"] == pytest.approx(sigma_n)
    assert cfg["sampling"]["sigma_stop"] == pytest.approx(noisy_sigma_stop(sigma_n))
    assert (out / "samples-000002.png").is_file()

    loaded = load_model(out)
    stop = cfg["sampling"]["sigma_stop"]
    assert loaded.denoiser.sigma_min == pytest.approx(stop)
    sigmas = model_sigmas(loaded.denoiser, 5)
    assert float(sigmas[0]) == pytest.approx(80.0) and float(sigmas[-2]) == pytest.approx(stop)
    assert float(sigmas[-1]) == 0.0 and bool((sigmas[:-1] > sigma_n).all())
    seen = []
    x = ambient_sample(loaded.denoiser, (2, *loaded.image_shape), [0, 1], sigmas=sigmas,
                       callback=lambda info: seen.append(info))
    assert float(seen[-1]["sigma"]) == pytest.approx(stop)
    # the last step to σ = 0 returns the clean estimate D(x_σ_stop, σ_stop)
    assert torch.allclose(x.double(), seen[-1]["denoised"], atol=1e-5)

    samples = tmp_path / "s.npz"
    code, _, err = run(["sample", "--model", str(out), "--num-images", "2", "--out", str(samples), "--steps", "5",
                        "--device", "cpu"], capsys)
    assert code == 0, err
    got = np.load(samples)["images"].astype(int)  # (N, H, W, C) uint8
    want = ((x.permute(0, 2, 3, 1).double().clamp(-1, 1) + 1) * 127.5).numpy()
    assert np.abs(got - want).max() <= 1.0  # ambient sample stops there by itself (up to rounding)

    code, _, err = run(["train", "--data", str(data), "--outdir", str(out), "--objective", "noisy",
                        "--noise-sigma", "25", "--kimg", "0.032", *TINY], capsys)
    assert code == 2 and "--noise-sigma" in err and "20" in err
    assert not (out / "snapshot-000004").exists()


@pytest.mark.parametrize("extra, needle", [
    (["--objective", "noisy"], "--noise-sigma: --objective noisy needs it"),
    (["--objective", "noisy", "--noise-sigma", "0"], "--noise-sigma: must be a finite number > 0"),
    (["--objective", "noisy", "--noise-sigma", "-3"], "--noise-sigma: must be a finite number > 0"),
    (["--objective", "noisy", "--noise-sigma", "inf"], "--noise-sigma: must be a finite number > 0"),
    (["--noise-sigma", "5"], "--noise-sigma: only for --objective noisy"),
    (["--objective", "naive", "--noise-sigma", "5"], "--noise-sigma: only for --objective noisy"),
    (["--objective", "noisy", "--noise-sigma", "5", "--corruption-probability", "0.5"], "--corruption-probability"),
    (["--objective", "noisy", "--noise-sigma", "1e6"], "--noise-sigma 1e+06: is"),
])
def test_bad_noise_flags_are_one_line_exit_2_nothing_written(tmp_path, capsys, extra, needle):
    data = write_npz(tmp_path / "d.npz")
    out = tmp_path / "run"
    code, _, err = run(["train", "--data", str(data), "--outdir", str(out), "--kimg", "0.016", *extra, *TINY], capsys)
    assert code == 2 and err.strip().count("\n") == 0 and needle in err, err
    assert not out.exists()


def test_noisy_objective_refuses_data_with_masks(tmp_path, capsys):
    masks = (np.random.default_rng(0).random((24, 8, 8)) < 0.7).astype(np.uint8)
    data = write_npz(tmp_path / "d.npz", masks=masks)
    out = tmp_path / "run"
    code, _, err = run(["train", "--data", str(data), "--outdir", str(out), "--objective", "noisy",
                        "--noise-sigma", "10", "--kimg", "0.016", *TINY], capsys)
    assert code == 2 and "--data" in err and "masks" in err, err
    assert not out.exists()


def test_dry_run_shows_the_noise_level_in_model_units(tmp_path, capsys):
    data = write_npz(tmp_path / "d.npz")
    code, out, err = run(["train", "--data", str(data), "--outdir", str(tmp_path / "run"), "--objective", "noisy",
                          "--noise-sigma", "51", "--dry-run", *TINY], capsys)
    assert code == 0, err
    units = json.loads(out)["data_units"]
    assert units["noise_sigma_model"] == pytest.approx(0.4)
    assert units["sigma_stop_model"] == pytest.approx(noisy_sigma_stop(0.4))
    assert not (tmp_path / "run").exists()


def test_noise_only_measurements_feed_both_noisy_training_and_em(tmp_path, capsys):
    """`ambient measure --operator mask --probability 0 --sigma-y S` gives noisy images as a measurements file:
    `ambient em` reads it, and `ambient train --objective noisy --noise-sigma S` reads the same file."""
    from ambient.operators.measurements import load_measurements

    data = write_npz(tmp_path / "d.npz")
    meas = tmp_path / "noisy.npz"
    code, _, err = run(["measure", "--data", str(data), "--operator", "mask", "--probability", "0", "--sigma-y", "25",
                        "--out", str(meas)], capsys)
    assert code == 0, err
    loaded = load_measurements(meas)
    assert loaded.spec["kind"] == "mask" and loaded.spec["sigma_y"] == 25
    assert bool((loaded.operator.arrays()["mask"] == 1).all())
    clean = torch.from_numpy(np.load(data)["images"]).double()[:, None] / 127.5 - 1
    assert abs(float((loaded.y - clean).std()) * 127.5 - 25) < 2  # y = x + σ_y n, σ_y in the data's units

    out = tmp_path / "run"
    code, _, err = run(["train", "--data", str(meas), "--outdir", str(out), "--objective", "noisy",
                        "--noise-sigma", "25", "--kimg", "0.008", *TINY], capsys)
    assert code == 0, err
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["sampling"]["noise_sigma"] == pytest.approx(25 / 127.5)
    assert cfg["data"]["value_range"] == [0.0, 255.0] and cfg["data"]["num_images"] == 24

    code, _, err = run(["train", "--data", str(meas), "--outdir", str(tmp_path / "other"), "--objective", "noisy",
                        "--noise-sigma", "20", "--kimg", "0.008", *TINY], capsys)
    assert code == 2 and "--noise-sigma 20" in err and "σ_y 25" in err and not (tmp_path / "other").exists()
    masked = tmp_path / "masked.npz"
    code, _, err = run(["measure", "--data", str(data), "--operator", "mask", "--probability", "0.3", "--sigma-y", "25",
                        "--out", str(masked)], capsys)
    assert code == 0, err
    code, _, err = run(["train", "--data", str(masked), "--outdir", str(tmp_path / "other"), "--objective", "noisy",
                        "--noise-sigma", "25", "--kimg", "0.008", *TINY], capsys)
    assert code == 2 and "--data" in err and "noise-only" in err and not (tmp_path / "other").exists()

    code, _, err = run(["em", "--data", str(meas), "--outdir", str(tmp_path / "em"), "--laps", "1", "--lap-kimg",
                        "0.008", "--rank", "2", "--gaussian-iters", "2", "--steps", "2", "--arch", "tiny", "--batch",
                        "8", "--snapshot-kimg", "0.008", "--grid-samples", "0", "--device", "cpu", "--no-progress"],
                       capsys)
    assert code == 0, err
