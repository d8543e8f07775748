"""Finetuning pretrained diffusers UNets with the ambient objective, on tiny random models."""

import copy
import json

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel, UNet2DModel

from ambient.cli import main
from ambient.data.corruption import Corruption
from ambient.errors import AmbientInputError
from ambient.learners.finetune import build_model, finetune
from ambient.learners.finetune_config import FinetuneConfig
from ambient.nets.ddpm_denoiser import x0_from_output
from ambient.nets.pretrained import MaskedUNet, add_mask_channels, load_pretrained
from ambient.nets.schedules import alphas_cumprod, sigma_from_alpha_bar
from ambient.objectives.ddpm_loss import FinetuneLoss
from ambient.store.finetune_export import load_finetuned


def gen(seed):
    return torch.Generator().manual_seed(seed)


def tiny_unet(channels=1, seed=0):
    torch.manual_seed(seed)  # parameter init only
    return UNet2DModel(sample_size=8, in_channels=channels, out_channels=channels,
                       block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
                       down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"))


def tiny_cond_unet(seed=0):
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
        norm_num_groups=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=8, attention_head_dim=4)


def save_pipeline(root, unet, prediction_type="epsilon", steps=100):
    unet.save_pretrained(str(root / "unet"), safe_serialization=True)
    DDPMScheduler(num_train_timesteps=steps, prediction_type=prediction_type).save_pretrained(
        str(root / "scheduler"))
    return root


def save_npz(path, n=8, channels=1, res=8, seed=0):
    rng = np.random.default_rng(seed)
    base = np.linspace(40, 215, res)[None, :, None] * np.ones((n, res, res))[..., None]
    imgs = np.clip(base + rng.normal(0, 20, (n, res, res, 1)), 0, 255).astype(np.uint8)
    imgs = imgs if channels == 1 else np.repeat(imgs, channels, axis=3)
    np.savez(path, images=imgs[..., 0] if channels == 1 else imgs)
    return str(path)


@pytest.mark.parametrize("kind", ["unet2d", "conditional"])
def test_mask_channel_surgery_keeps_the_pretrained_outputs(kind):
    unet = tiny_unet() if kind == "unet2d" else tiny_cond_unet()
    emb = None if kind == "unet2d" else torch.randn(1, 3, 8, generator=gen(9))
    widened = copy.deepcopy(unet)
    add_mask_channels(widened, 1)
    assert widened.config.in_channels == 2 and widened.conv_in.weight.shape[1] == 2
    net = MaskedUNet(widened, 1, "channels", emb)
    x = torch.randn(3, 1, 8, 8, generator=gen(1))
    mask = (torch.rand(x.shape, generator=gen(2)) < 0.5).float()
    t = torch.tensor([0, 40, 99])
    with torch.no_grad():
        kwargs = {} if emb is None else {"encoder_hidden_states": emb.expand(3, -1, -1)}
        ref = unet(mask * x, t, **kwargs)
        out = net(mask * x, t, mask)
    torch.testing.assert_close(out, ref.sample, rtol=0, atol=1e-6)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_x0_from_output_recovers_the_clean_image(prediction_type):
    x0 = torch.rand(4, 1, 8, 8, generator=gen(0)) * 2 - 1
    eps = torch.randn(x0.shape, generator=gen(1))
    a = torch.tensor([0.999, 0.7, 0.2, 0.01]).reshape(4, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    v = a.sqrt() * eps - (1 - a).sqrt() * x0
    output = {"epsilon": eps, "v_prediction": v, "sample": x0}[prediction_type]
    torch.testing.assert_close(x0_from_output(output, x_t, a, prediction_type, hidden_x0="formula"), x0,
                               rtol=0, atol=2e-4 if prediction_type == "epsilon" else 1e-5)
    mask = (torch.rand(x0.shape, generator=gen(2)) < 0.5).float()
    direct = x0_from_output(output, x_t, a, prediction_type, mask, "direct")
    assert torch.equal(direct[mask == 0], output[mask == 0])
    assert torch.equal(direct[mask == 1], x0_from_output(output, x_t, a, prediction_type)[mask == 1])


@pytest.mark.parametrize("hidden_x0", ["direct", "formula"])
def test_loss_is_blind_to_unobserved_pixels(hidden_x0):
    unet = tiny_unet()
    add_mask_channels(unet, 1)
    net = MaskedUNet(unet, 1, "channels")
    loss_fn = FinetuneLoss(alphas_cumprod(DDPMScheduler(num_train_timesteps=100)), "epsilon", hidden_x0)
    c = Corruption("dust", 0.6, 0.3)
    x0 = torch.rand(4, 1, 8, 8, generator=gen(1)) * 2 - 1
    a = c.mask(x0.shape, gen(2))
    a_hat = c.further(a, gen(3))
    other = torch.where(a.bool(), x0, torch.randn(x0.shape, generator=gen(4)) * 10)
    assert not torch.equal(other, x0)

    def loss_and_grads(y):
        net.zero_grad()
        loss = loss_fn(net, y, a, a_hat, gen(5)).mean()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in net.parameters()]

    l1, g1 = loss_and_grads(x0)
    l2, g2 = loss_and_grads(other)
    assert torch.equal(l1, l2)
    assert all(torch.equal(u, v) for u, v in zip(g1, g2))
    assert any(g.abs().sum() > 0 for g in g1)


def test_loss_weighting_x0_and_min_snr_match_their_definitions():
    """p = δ = 0: `x0` is the plain x0 MSE (= σ² · ε-MSE for an ε-model); `min-snr` equals the
    model's own ε-MSE where SNR < γ and γ · x0-MSE where SNR > γ."""
    unet = tiny_unet()
    net = MaskedUNet(unet, 1, "input")
    ab = alphas_cumprod(DDPMScheduler(num_train_timesteps=100))
    y = torch.rand(4, 1, 8, 8, generator=gen(0)) * 2 - 1
    ones = torch.ones_like(y)
    t = torch.tensor([1, 20, 60, 99])
    eps = torch.randn(y.shape, generator=gen(1))
    a = ab[t].float().reshape(-1, 1, 1, 1)
    with torch.no_grad():
        eps_mse = ((net(a.sqrt() * y + (1 - a).sqrt() * eps, t, None) - eps) ** 2).flatten(1).mean(1)
        plain = FinetuneLoss(ab, "epsilon", weighting="x0")(net, y, ones, ones, timesteps=t, noise=eps)
        minsnr = FinetuneLoss(ab, "epsilon", weighting="min-snr", snr_gamma=5.0)(
            net, y, ones, ones, timesteps=t, noise=eps)
    snr = (ab[t] / (1 - ab[t])).float()
    torch.testing.assert_close(plain, eps_mse / snr, rtol=1e-4, atol=0)
    torch.testing.assert_close(minsnr, torch.minimum(snr, torch.tensor(5.0)) * plain, rtol=1e-5, atol=0)
    high_noise = snr < 5
    assert high_noise.any() and (~high_noise).any()
    torch.testing.assert_close(minsnr[high_noise], eps_mse[high_noise], rtol=1e-4, atol=0)


def test_hidden_x0_rules_differ_as_documented():
    """At hidden pixels `formula` gives −σ·ε̂ (vanishing at small noise), `direct` the raw output."""
    ab = alphas_cumprod(DDPMScheduler(num_train_timesteps=100))
    out = torch.ones(1, 1, 2, 2)
    mask = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    a = ab[0].float()
    formula = x0_from_output(out, mask * 0.3, a, "epsilon", mask, "formula")
    direct = x0_from_output(out, mask * 0.3, a, "epsilon", mask, "direct")
    sigma0 = float(sigma_from_alpha_bar(ab[0]))
    assert sigma0 < 0.02
    torch.testing.assert_close(formula[mask == 0], torch.full((2,), -sigma0), rtol=1e-5, atol=0)
    assert torch.equal(direct[mask == 0], torch.ones(2))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_denoiser_sigma_timestep_mapping_matches_the_scheduler(tmp_path, prediction_type):
    pre = save_pipeline(tmp_path / "pre", tiny_unet(), prediction_type)
    cfg = FinetuneConfig(pretrained=str(pre), data=save_npz(tmp_path / "d.npz"), outdir=str(tmp_path / "out"),
                         mask_mode="input", steps=1, batch=2, ema=0.0, lr=1e-12)
    finetune(cfg)
    den = load_finetuned(tmp_path / "out")
    sched = DDPMScheduler.from_pretrained(str(tmp_path / "out" / "scheduler"), clip_sample=False)
    ab = sched.alphas_cumprod.double()
    sig = ((1 - ab) / ab).sqrt()
    torch.testing.assert_close(den.timestep_sigmas, sig)
    for mode in ("interpolate", "nearest"):
        den.timestep_mode = mode
        torch.testing.assert_close(den.timestep_for_sigma(sig), torch.arange(100, dtype=torch.float64),
                                   rtol=0, atol=1e-6)
    den.timestep_mode = "interpolate"
    mid = (sig[10].log() * 0.25 + sig[11].log() * 0.75).exp()
    torch.testing.assert_close(den.timestep_for_sigma(mid), torch.tensor([10.75], dtype=torch.float64))
    s = den.sampling_sigmas(10)
    assert len(s) == 11 and s[-1] == 0
    torch.testing.assert_close(s[[0, -2]], sig[[-1, 0]], rtol=1e-12, atol=0)
    assert bool((s[1:] < s[:-1]).all()) and all(bool(torch.isclose(sig, v, rtol=1e-12).any()) for v in s[:-1])
    # The full-image interface: its own schedule and σ range are attributes, not sniffed.
    assert torch.equal(den.schedule(10), s)
    assert (den.sigma_min, den.sigma_max) == (float(sig[0]), float(sig[-1]))
    # D(x, σ_t) is the scheduler's own x0 estimate of the UNet's output at timestep t.
    x0 = torch.rand(2, 1, 8, 8, generator=gen(0)) * 2 - 1
    unet = UNet2DModel.from_pretrained(str(tmp_path / "out" / "unet"))
    for t in (3, 50, 97):
        x = x0 + sig[t].float() * torch.randn(x0.shape, generator=gen(t))
        x_t = x / (1 + sig[t] ** 2).sqrt().float()
        with torch.no_grad():
            ref = sched.step(unet(x_t, t).sample, t, x_t).pred_original_sample
            got = den(x, sig[t])
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_conditional_unet_with_fixed_embedding_round_trips(tmp_path):
    from safetensors.torch import save_file

    pre = save_pipeline(tmp_path / "pre", tiny_cond_unet(), "v_prediction")
    emb = torch.randn(1, 4, 8, generator=gen(3))
    save_file({"embedding": emb}, str(pre / "text_embedding.safetensors"))
    loaded = load_pretrained(pre)
    assert torch.equal(loaded.embedding, emb)
    cfg = FinetuneConfig(pretrained=str(pre), data=save_npz(tmp_path / "d.npz"), outdir=str(tmp_path / "out"),
                         corruption_probability=0.5, steps=2, batch=2, ema=0.9)
    finetune(cfg)
    den = load_finetuned(tmp_path / "out")
    assert torch.equal(den.net.embedding, emb) and den.net.mask_mode == "channels"
    exported = UNet2DConditionModel.from_pretrained(str(tmp_path / "out"), subfolder="unet")
    assert exported.config.in_channels == 2
    # Without an embedding file the default is zeros of the cross-attention width.
    (pre / "text_embedding.safetensors").unlink()
    assert torch.equal(load_pretrained(pre).embedding, torch.zeros(1, 1, 8))


def _fixed_loss(net, loss_fn, ds, corruption):
    y, a = ds.batch(range(len(ds)))
    a_hat = corruption.further(a, gen(11))
    t = torch.linspace(0, loss_fn.num_timesteps - 1, len(ds)).long()
    with torch.no_grad():
        noise = torch.randn(y.shape, generator=gen(12))
        return float(loss_fn(net, y, a, a_hat, timesteps=t, noise=noise).mean())


def test_a_few_finetune_steps_reduce_the_loss(tmp_path):
    from ambient.learners.finetune import load_data

    pre = save_pipeline(tmp_path / "pre", tiny_unet())
    cfg = FinetuneConfig(pretrained=str(pre), data=save_npz(tmp_path / "d.npz"), outdir=str(tmp_path / "out"),
                         corruption_probability=0.4, delta_probability=0.2, steps=40, batch=8, lr=2e-3,
                         ema=0.0, log_every=5)
    cfg, ds = load_data(cfg)
    corr = cfg.corruption()
    net0, sched = build_model(cfg)
    loss_fn = FinetuneLoss(alphas_cumprod(sched), "epsilon", "direct")
    before = _fixed_loss(net0, loss_fn, ds, corr)
    finetune(cfg)
    after = _fixed_loss(load_finetuned(tmp_path / "out").net, loss_fn, ds, corr)
    assert after < 0.7 * before, (before, after)
    rows = [json.loads(line) for line in (tmp_path / "out" / "stats.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [5, 10, 15, 20, 25, 30, 35, 40]


def test_cli_finetune_exports_diffusers_folder_and_resume_continues_exactly(tmp_path):
    pre = save_pipeline(tmp_path / "pre", tiny_unet())
    data = save_npz(tmp_path / "d.npz")
    common = ["finetune", "--pretrained", str(pre), "--data", data, "--corruption-probability", "0.5",
              "--delta-probability", "0.1", "--batch", "2", "--grad-accum", "2", "--ema", "0.9",
              "--lr", "1e-3", "--log-every", "1", "--snapshot-every", "2", "--device", "cpu"]

    def run(args):
        with pytest.raises(SystemExit) as exc:
            main(args)
        assert exc.value.code == 0

    run([*common, "--outdir", str(tmp_path / "a"), "--steps", "2"])
    unet = UNet2DModel.from_pretrained(str(tmp_path / "a"), subfolder="unet")
    assert unet.config.in_channels == 2
    assert json.loads((tmp_path / "a" / "config.json").read_text())["kind"] == "finetune"
    run([*common, "--outdir", str(tmp_path / "a"), "--steps", "4"])
    steps = [json.loads(line)["step"] for line in (tmp_path / "a" / "stats.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    run([*common, "--outdir", str(tmp_path / "b"), "--steps", "4"])
    resumed = UNet2DModel.from_pretrained(str(tmp_path / "a"), subfolder="unet").state_dict()
    straight = UNet2DModel.from_pretrained(str(tmp_path / "b"), subfolder="unet").state_dict()
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)
    assert not torch.equal(straight["conv_in.weight"], unet.state_dict()["conv_in.weight"])
    # `ambient sample` samples the finetuned model on its own discrete noise schedule, with its masks
    out = tmp_path / "samples.npz"
    run(["sample", "--model", str(tmp_path / "a"), "--num", "3", "--out", str(out), "--steps", "5", "--batch", "2"])
    images = np.load(out)["images"]
    assert images.shape == (3, 8, 8, 1) and images.dtype == np.uint8


def test_bad_input_is_one_line(tmp_path, capsys):
    pre = save_pipeline(tmp_path / "pre", tiny_unet())
    gray, rgb = save_npz(tmp_path / "g.npz"), save_npz(tmp_path / "c.npz", channels=3)
    base = dict(pretrained=str(pre), data=gray, outdir=str(tmp_path / "o"), steps=1, batch=2)
    cases = [
        ({"pretrained": str(tmp_path / "missing")}, "no such folder"),
        ({"data": rgb}, "3 channels"),
        ({"corruption_probability": 1.5}, "--corruption-probability"),
        ({"delta_probability": -0.1}, "--delta-probability"),
    ]
    for change, text in cases:
        with pytest.raises(AmbientInputError) as exc:
            finetune(FinetuneConfig(**{**base, **change}))
        assert text in str(exc.value) and "\n" not in str(exc.value)
    with pytest.raises(SystemExit) as exc:
        main(["finetune", "--pretrained", str(tmp_path / "missing"), "--data", gray,
              "--outdir", str(tmp_path / "o")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --pretrained") and "\n" not in err


def test_a_model_finetuned_on_float_data_samples_in_the_datas_units(tmp_path):
    """The export records the data's value_range and dtype (as train runs do), so `ambient sample` writes
    float samples in those units beside the uint8 ones."""
    pre = save_pipeline(tmp_path / "pre", tiny_unet())
    rng = np.random.default_rng(0)
    images = rng.uniform(-3.0, 5.0, (6, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "f.npz", images=images, value_range=np.asarray([-3.0, 5.0]))
    for args in (["finetune", "--pretrained", str(pre), "--data", str(tmp_path / "f.npz"),
                  "--corruption-probability", "0.5", "--delta-probability", "0.1", "--batch", "2", "--steps", "1",
                  "--snapshot-every", "1", "--device", "cpu", "--outdir", str(tmp_path / "a")],
                 ["sample", "--model", str(tmp_path / "a"), "--num", "2", "--out", str(tmp_path / "s.npz"),
                  "--steps", "3"]):
        with pytest.raises(SystemExit) as exc:
            main(args)
        assert exc.value.code == 0
    data = json.loads((tmp_path / "a" / "config.json").read_text())["data"]
    assert data == {"value_range": [-3.0, 5.0], "dtype": "float32"}
    out = np.load(tmp_path / "s.npz")
    assert out["value_range"].tolist() == [-3.0, 5.0] and out["images"].dtype == np.float32
