"""Fast paths (bf16 autocast, channels_last, torch.compile) against fp32 eager on tiny models."""

import pytest
import torch

from ambient.distributed import compile_regions
from ambient.io import read_jsonl
from ambient.learners.train import train
from ambient.learners.train_config import TrainConfig
from ambient.nets.registry import ModelConfig, build_denoiser
from ambient.objectives.losses import AmbientLoss
from ambient.rng import INIT_STREAM, mix_seed
from ambient.store.snapshots import latest_snapshot, load_snapshot
from tests.helpers_data import write_npz

SHAPE = (8, 1, 8, 8)
RUN = dict(arch="tiny", corruption_probability=0.5, delta_probability=0.2, batch=8, kimg=0.024,
           snapshot_kimg=1.0, tick_kimg=0.008, grid_samples=0, lr=2e-3, lr_warmup_kimg=0.0, seed=5)


def tiny_denoiser():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return build_denoiser(ModelConfig(arch="tiny", img_channels=1, resolution=8))


def fixed_batch():
    g = torch.Generator().manual_seed(1)
    y = torch.rand(SHAPE, generator=g) * 2 - 1
    mask = (torch.rand(SHAPE, generator=g) > 0.3).float()
    mask_hat = mask * (torch.rand(SHAPE, generator=g) > 0.2).float()
    sigma = torch.tensor([0.02, 0.1, 0.3, 0.7, 1.0, 2.0, 5.0, 20.0])
    return y, mask, mask_hat, sigma, torch.randn(SHAPE, generator=g)


def loss_and_grad(net, call=None, bf16=False):
    """Per-image losses of one step and the flattened gradient of their mean."""
    y, mask, mask_hat, sigma, noise = fixed_batch()
    net.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = AmbientLoss()(call or net, y, mask, mask_hat, sigma=sigma, noise=noise)
    loss.mean().backward()
    return loss.detach(), torch.cat([p.grad.flatten() for p in net.parameters()])


def test_bf16_autocast_step_is_close_to_fp32():
    net = tiny_denoiser()
    dtypes = []
    net.backbone.unet.conv_in.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    loss32, grad32 = loss_and_grad(net)
    loss16, grad16 = loss_and_grad(net, bf16=True)
    assert dtypes == [torch.float32, torch.bfloat16]  # autocast really ran the convolutions in bf16
    assert loss16.dtype == torch.float32 and not torch.equal(loss16, loss32)
    torch.testing.assert_close(loss16, loss32, rtol=2e-2, atol=0)
    assert torch.nn.functional.cosine_similarity(grad16, grad32, dim=0) > 0.995


def test_channels_last_step_equals_fp32():
    net = tiny_denoiser()
    loss_a, grad_a = loss_and_grad(net)
    net.to(memory_format=torch.channels_last)
    assert net.backbone.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    loss_b, grad_b = loss_and_grad(net)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_b, grad_a, rtol=1e-4, atol=1e-5 * float(grad_a.abs().max()))


def _weights(path) -> torch.Tensor:
    snap = load_snapshot(latest_snapshot(path))
    return torch.cat([snap.model[k].flatten() for k in sorted(snap.model)])


def _init_weights() -> torch.Tensor:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(mix_seed(INIT_STREAM, RUN["seed"]))
        net = build_denoiser(ModelConfig(arch="tiny", img_channels=1, resolution=8))
    state = net.state_dict()
    return torch.cat([state[k].flatten() for k in sorted(state)])


@pytest.fixture(scope="module")
def fp32_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("fast")
    npz = str(write_npz(root / "tiny.npz", n=24))
    train(TrainConfig(data=npz, outdir=str(root / "fp32"), **RUN), progress=False)
    return root, npz


def _compare_run(fp32_run, name, **changes) -> float:
    """Train 3 steps with ``changes``; return ‖w − w_fp32‖ / ‖w_fp32 − w_init‖ after checking losses."""
    root, npz = fp32_run
    train(TrainConfig(data=npz, outdir=str(root / name), **RUN, **changes), progress=False)
    w, w32, w0 = _weights(root / name), _weights(root / "fp32"), _init_weights()
    assert torch.isfinite(w).all()
    losses = [r["loss"] for r in read_jsonl(root / name / "stats.jsonl")]
    losses32 = [r["loss"] for r in read_jsonl(root / "fp32" / "stats.jsonl")]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(losses32), rtol=3e-2, atol=0)
    return float((w - w32).norm() / (w32 - w0).norm())


def test_bf16_training_runs_and_tracks_fp32(fp32_run):
    rel = _compare_run(fp32_run, "bf16", precision="bf16")
    assert 0 < rel < 0.25  # bf16 did change the arithmetic, but not the course of training


def test_channels_last_training_matches_fp32(fp32_run):
    assert _compare_run(fp32_run, "cl", channels_last=True) < 1e-3


@pytest.mark.slow  # inductor compiles each UNet block with the C++ compiler: minutes on 2 CPU cores
def test_compiled_blocks_match_eager_and_train(fp32_run):
    net = tiny_denoiser()
    loss_a, grad_a = loss_and_grad(net)
    compile_regions(net)
    loss_b, grad_b = loss_and_grad(net)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_b, grad_a, rtol=1e-4, atol=1e-5 * float(grad_a.abs().max()))
    assert _compare_run(fp32_run, "compiled", compile=True) < 1e-3
