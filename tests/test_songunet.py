"""The paper's DDPM++ network (ambient.nets.songunet) and its presets / reference preconditioning
(ambient.nets.ddpmpp)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from ambient.learners.train_config import TrainConfig
from ambient.nets.ddpmpp import ReferenceDenoiser, song_config
from ambient.nets.registry import ModelConfig, build_denoiser
from ambient.nets.songunet import Conv2d, SongUNet, SongUNetConfig, UNetBlock

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
def test_box_resampling_is_average_pool_and_nearest_upsampling(up):
    torch.manual_seed(1)
    conv = Conv2d(4, 4, 0, up=up, down=not up)  # depthwise (transposed) convolution with the [1,1] filter
    x = torch.randn(2, 4, 8, 8)
    out = conv(x)
    box = F.interpolate(x, scale_factor=2.0, mode="nearest") if up else F.avg_pool2d(x, 2)
    torch.testing.assert_close(out, box)
    assert out.shape[-1] == (16 if up else 4)
    if not up:
        torch.testing.assert_close(out[0, 0, 0, 0], x[0, 0, :2, :2].mean())


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


@pytest.mark.parametrize("channels_last", [False, True])
def test_memory_format_is_kept_through_attention(channels_last):
    # A channels_last tensor leaking out of the attention (a reshape of the transposed output) used to
    # turn every later convolution into a weight copy per call.
    torch.manual_seed(4)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    net = SongUNet(SongUNetConfig(img_resolution=16, in_channels=2, out_channels=2, **TINY)).to(memory_format=fmt)
    outputs = []
    for m in net.modules():
        if isinstance(m, Conv2d) and m.weight is not None and m.weight.shape[-1] > 1:
            m.register_forward_hook(lambda mod, inp, out: outputs.append(out))
    net(torch.randn(2, 2, 16, 16).to(memory_format=fmt), torch.randn(2))
    assert len(outputs) > 4 and all(o.is_contiguous(memory_format=fmt) for o in outputs)


def _conv_written_out(conv, x):
    if conv.resample_filter is not None:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest") if conv.up else F.avg_pool2d(x, 2)
    if conv.weight is None:
        return x
    pad = conv.weight.shape[-1] // 2
    y = F.conv2d(x, conv.weight, padding=pad)
    if conv.gate_weight is not None:
        y = y * torch.sigmoid(torch.sigmoid(F.conv2d(x, conv.gate_weight, padding=pad)))
    return y + conv.bias.reshape(1, -1, 1, 1)


def _block_written_out(block, x, emb):
    h = _conv_written_out(block.conv0, F.silu(block.norm0(x)))
    h = F.silu(block.norm1(h + block.affine(emb)[:, :, None, None]))
    h = _conv_written_out(block.conv1, h)
    h = (h + (_conv_written_out(block.skip, x) if block.skip is not None else x)) * math.sqrt(0.5)
    if block.attention:
        n, c, hh, ww = h.shape
        q, k, v = _conv_written_out(block.qkv, block.norm2(h)).reshape(n, c, 3, hh * ww).unbind(2)
        w = torch.einsum("ncq,nck->nqk", q, k / math.sqrt(c)).softmax(dim=2)
        a = torch.einsum("nqk,nck->ncq", w, v).reshape(n, c, hh, ww)
        h = (_conv_written_out(block.proj, a) + h) * math.sqrt(0.5)
    return h


@pytest.mark.parametrize("kind", ["attention", "down", "up", "same"])
@pytest.mark.parametrize("gated", [False, True])
def test_block_gradients_equal_the_written_out_out_of_place_block(kind, gated):
    # the block adds and scales in place; autograd must give the out-of-place arithmetic's gradients
    torch.manual_seed(5)
    cin = 8 if kind == "same" else 12
    block = UNetBlock(cin, 8, 16, attention=kind == "attention", down=kind == "down", up=kind == "up",
                      gated=gated)
    for p in block.parameters():  # make every layer matter (conv1 and proj start near zero)
        torch.nn.init.normal_(p, std=0.3)
    x, emb = torch.randn(2, cin, 8, 8, requires_grad=True), torch.randn(2, 16, requires_grad=True)
    grads = []
    for fn in (block, lambda x, emb: _block_written_out(block, x, emb)):
        out = fn(x, emb)
        weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(6))
        grads.append([out.detach(), *torch.autograd.grad((out * weights).sum(), [x, emb, *block.parameters()])])
    for got, expected in zip(*grads):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


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
