"""The paper's DDPM++ network (ambient.songunet) and its presets / reference preconditioning (ambient.ddpmpp)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from ambient.config import TrainConfig
from ambient.ddpmpp import ReferenceDenoiser, song_config
from ambient.model import ModelConfig, build_denoiser
from ambient.songunet import Conv2d, SongUNet, SongUNetConfig, UNetBlock

TINY = dict(model_channels=16, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(8,), dropout=0.0)


def _count(cfg: SongUNetConfig) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in SongUNet(cfg).parameters())


@pytest.mark.parametrize("arch,res,expected", [
    ("ddpmpp-cifar", 32, 106_752_006), ("ddpmpp-celeba", 64, 118_088_966),
    ("ddpmpp-cifar-ungated", 32, 55_744_262), ("ddpmpp-celeba-ungated", 64, 61_812_486)])
def test_parameter_counts_equal_the_reference(arch, res, expected):
    # the reference's counts: 6 channels in and out, augment_dim 9, unconditional
    cfg = song_config(arch, resolution=res, in_channels=6, out_channels=6, overrides={"augment_dim": 9})
    assert _count(cfg) == expected
    # the training presets drop only the augmentation-label input (128 × 9 weights)
    assert _count(song_config(arch, resolution=res, in_channels=6, out_channels=6)) == expected - 128 * 9


def test_reference_parameter_names():
    net = SongUNet(SongUNetConfig(img_resolution=16, in_channels=6, out_channels=6, augment_dim=9, **TINY))
    names = set(net.state_dict())
    for name in ("map_augment.weight", "map_layer0.bias", "map_layer1.weight", "enc.16x16_conv.gate_weight",
                 "enc.8x8_down.conv0.resample_filter", "enc.8x8_down.skip.gate_weight", "enc.8x8_block0.qkv.weight",
                 "dec.8x8_in0.proj.gate_weight", "dec.8x8_in1.conv1.weight", "dec.16x16_up.skip.resample_filter",
                 "dec.16x16_block1.norm0.weight", "dec.16x16_aux_norm.bias", "dec.16x16_aux_conv.gate_weight"):
        assert name in names, name
    assert "map_augment.bias" not in names and "map_label.weight" not in names


def test_gated_convolution_formula():
    torch.manual_seed(0)
    conv = Conv2d(3, 5, 3, gated=True)
    with torch.no_grad():
        conv.bias.normal_()
    x = torch.randn(2, 3, 8, 8)
    a = F.conv2d(x, conv.weight, padding=1)
    g = F.conv2d(x, conv.gate_weight, padding=1)
    expected = a * torch.sigmoid(torch.sigmoid(g)) + conv.bias.reshape(1, -1, 1, 1)
    torch.testing.assert_close(conv(x), expected)
    plain = Conv2d(3, 5, 3, gated=False)
    assert plain.gate_weight is None and "gate_weight" not in dict(plain.named_parameters())


@pytest.mark.parametrize("up", [False, True])
def test_box_resampling_fast_path_equals_the_filter(up):
    torch.manual_seed(1)
    conv = Conv2d(4, 4, 0, up=up, down=not up)
    x = torch.randn(2, 4, 8, 8)
    fast = conv(x)
    conv.box = False  # the general depthwise (transposed) convolution with the [1,1] filter
    torch.testing.assert_close(fast, conv(x))
    assert fast.shape[-1] == (16 if up else 4)
    if not up:
        torch.testing.assert_close(fast[0, 0, 0, 0], x[0, 0, :2, :2].mean())


def test_attention_matches_the_written_out_softmax():
    torch.manual_seed(2)
    block = UNetBlock(8, 8, 16, attention=True).eval()
    for p in block.parameters():  # make every layer matter
        torch.nn.init.normal_(p, std=0.3)
    x, emb = torch.randn(2, 8, 4, 4), torch.randn(2, 16)
    h = block.conv0(F.silu(block.norm0(x)))
    h = F.silu(block.norm1(h + block.affine(emb)[:, :, None, None]))
    h = (block.conv1(h) + block.skip(x) if block.skip is not None else block.conv1(h) + x) * math.sqrt(0.5)
    q, k, v = block.qkv(block.norm2(h)).reshape(2, 8, 3, 16).unbind(2)
    w = torch.einsum("ncq,nck->nqk", q, k / math.sqrt(8)).softmax(dim=2)
    a = torch.einsum("nqk,nck->ncq", w, v).reshape(2, 8, 4, 4)
    expected = (block.proj(a) + h) * math.sqrt(0.5)
    torch.testing.assert_close(block(x, emb), expected, rtol=1e-5, atol=1e-5)


def test_positional_embedding():
    net = SongUNet(SongUNetConfig(img_resolution=16, in_channels=2, out_channels=1, **TINY))
    e = net.embed_noise(torch.tensor([0.0, 1.0]))
    assert e.shape == (2, 16)
    torch.testing.assert_close(e[0], torch.cat([torch.zeros(8), torch.ones(8)]))  # [sin, cos] of 0
    torch.testing.assert_close(e[1, 0], torch.tensor(math.sin(1.0)))  # first frequency 1
    torch.testing.assert_close(e[1, 7], torch.tensor(math.sin(1e-4)))  # last frequency 1/10⁴ (endpoint)


def test_reference_preconditioning_scales_every_channel():
    torch.manual_seed(3)
    cfg = SongUNetConfig(img_resolution=16, in_channels=6, out_channels=6, **TINY)
    net = SongUNet(cfg).eval()
    den = ReferenceDenoiser(net, 3).eval()
    x, mask = torch.randn(2, 3, 16, 16), (torch.rand(2, 3, 16, 16) > 0.3).float()
    sigma = torch.tensor([0.3, 4.0])
    seen = {}
    net.register_forward_hook(lambda m, args, out: seen.update(inp=args[0], out=out))
    d = den(x, sigma, mask)
    s = sigma.reshape(2, 1, 1, 1)
    c_in, c_skip, c_out = 1 / (s**2 + 0.25).sqrt(), 0.25 / (s**2 + 0.25), s * 0.5 / (s**2 + 0.25).sqrt()
    torch.testing.assert_close(seen["inp"], c_in * torch.cat([mask * x, mask], 1))  # the mask too
    torch.testing.assert_close(d, c_skip * mask * x + c_out * seen["out"][:, :3])


def test_presets_train_and_round_trip_through_json():
    assert TrainConfig(arch="ddpmpp-cifar").validate().arch == "ddpmpp-cifar"
    cfg = ModelConfig(arch="ddpmpp-cifar", img_channels=3, resolution=16, songunet={"model_channels": 16,
                      "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": [8]})
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    torch.manual_seed(4)
    den = build_denoiser(cfg)
    assert den.backbone.config.gated and den.backbone.config.in_channels == 6
    x, mask = torch.randn(4, 3, 16, 16), (torch.rand(4, 3, 16, 16) > 0.5).float()
    opt = torch.optim.Adam(den.parameters(), lr=1e-3)
    losses = []
    for _ in range(8):
        loss = ((den(x + torch.randn_like(x), 1.0, mask) - x) ** 2 * mask).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert den.backbone.enc["16x16_conv"].gate_weight.grad.abs().sum() > 0


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="multiple of 4"):
        song_config("ddpmpp-cifar", resolution=30, in_channels=2, out_channels=1)
    with pytest.raises(ValueError, match="DDPM\\+\\+"):
        SongUNetConfig(encoder_type="residual")
    with pytest.raises(ValueError, match="needs a DDPM"):
        build_denoiser(ModelConfig(arch="tiny", preconditioning="reference"))
