"""The mask law of data-given masks (per pixel or per channel) decides Ã and the sampler's masks."""

import json

import numpy as np
import pytest
import torch

from ambient.cli import main
from ambient.data.corruption import Corruption, sampling_masks
from ambient.data.datasets import ImageDataset, load_dataset, resolve_mask_full_rgb
from ambient.errors import AmbientInputError
from ambient.learners.train import dry_run, train
from ambient.learners.train_config import TrainConfig
from ambient.nets.denoiser import Denoiser
from ambient.nets.registry import SamplingSpec
from ambient.store.models import load_model
from tests.helpers_data import write_npz

TINY = dict(arch="tiny", delta_probability=0.3, batch=8, kimg=0.016, snapshot_kimg=1.0, tick_kimg=0.008,
            grid_samples=0)


def pixel_masks(n=16, size=8, keep=0.5, seed=0) -> np.ndarray:
    """(N, H, W) masks: one value per pixel, shared by its channels."""
    return (np.random.default_rng(seed).random((n, size, size)) < keep).astype(np.uint8)


def channel_masks(n=16, size=8, keep=0.5, seed=0) -> np.ndarray:
    """(N, H, W, 3) masks drawn independently per channel."""
    return (np.random.default_rng(seed).random((n, size, size, 3)) < keep).astype(np.uint8)


def channels_agree(masks: torch.Tensor) -> bool:
    return bool((masks == masks[:, :1]).all())


def test_dataset_mask_law_from_the_data(tmp_path):
    per_pixel = load_dataset(str(write_npz(tmp_path / "a.npz", n=16, channels=3, masks=pixel_masks())))
    assert per_pixel.mask_law == "pixel"
    same = np.repeat(pixel_masks()[..., None], 3, axis=-1)  # (N, H, W, C) equal across channels
    assert load_dataset(str(write_npz(tmp_path / "b.npz", n=16, channels=3, masks=same))).mask_law == "pixel"
    assert load_dataset(str(write_npz(tmp_path / "c.npz", n=16, channels=3,
                                      masks=channel_masks()))).mask_law == "channel"
    assert load_dataset(str(write_npz(tmp_path / "d.npz", n=16, masks=pixel_masks()))).mask_law == "pixel"
    assert load_dataset(str(write_npz(tmp_path / "e.npz", n=16, channels=3)),
                        corruption=Corruption("dust", 0.5)).mask_law is None


def test_resolution_order_and_contradiction():
    images = torch.zeros(4, 3, 4, 4, dtype=torch.uint8)
    px = ImageDataset(images, masks=torch.ones_like(images))
    ch = ImageDataset(images, masks=torch.ones_like(images).index_fill_(1, torch.tensor([2]), 0))
    drawn = ImageDataset(images, corruption=Corruption("dust", 0.5))
    assert resolve_mask_full_rgb(None, px)[0] is True
    assert resolve_mask_full_rgb(None, ch)[0] is False
    assert resolve_mask_full_rgb(None, drawn)[0] is False
    assert resolve_mask_full_rgb(False, px)[0] is False  # an explicit flag wins
    assert resolve_mask_full_rgb(True, drawn)[0] is True
    assert resolve_mask_full_rgb(None, px, saved=False)[0] is False  # a resumed run keeps its law
    with pytest.raises(AmbientInputError, match="--mask-full-rgb: .*differ between the channels"):
        resolve_mask_full_rgb(True, ch)


def _record_masks(monkeypatch) -> list[torch.Tensor]:
    seen = []
    forward = Denoiser.forward

    def spy(self, x, sigma, mask=None):
        if mask is not None:
            seen.append(mask.detach().clone())
        return forward(self, x, sigma, mask)

    monkeypatch.setattr(Denoiser, "forward", spy)
    return seen


@pytest.mark.parametrize("law", ["pixel", "channel"])
def test_training_and_sampling_masks_follow_the_data(tmp_path, monkeypatch, law):
    masks = pixel_masks(keep=0.7) if law == "pixel" else channel_masks(keep=0.7)
    data = str(write_npz(tmp_path / "obs.npz", n=16, channels=3, masks=masks))
    seen = _record_masks(monkeypatch)
    out = tmp_path / "run"
    train(TrainConfig(data=data, outdir=str(out), **TINY), progress=False)
    mask_hats = torch.cat(seen)
    assert mask_hats.shape[0] >= 16 and mask_hats.mean() < 0.7  # Ã drops pixels of A
    assert channels_agree(mask_hats) == (law == "pixel")

    config = json.loads((out / "config.json").read_text())
    assert config["train"]["mask_full_rgb"] is (law == "pixel")
    assert config["sampling"]["mask_law"] == law
    loaded = load_model(out)
    drawn = sampling_masks(loaded.sampling.corruption, (64, 3, 8, 8), list(range(64)),
                           data_survival=loaded.sampling.data_survival)
    assert channels_agree(drawn) == (law == "pixel")
    assert 0.4 < float(drawn.mean()) < 0.6  # survival 0.7 · (1 − 0.3)


def test_sampling_spec_round_trip_and_old_runs(tmp_path, monkeypatch, capsys):
    spec = SamplingSpec(Corruption("dust", 0.0, 0.1, True), data_survival=0.2)
    assert SamplingSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert TrainConfig.from_dict(json.loads(json.dumps(TrainConfig().to_dict()))).mask_full_rgb is None

    data = str(write_npz(tmp_path / "obs.npz", n=16, channels=3, masks=pixel_masks()))
    out = tmp_path / "old"
    train(TrainConfig(data=data, outdir=str(out), **TINY), progress=False)
    capsys.readouterr()
    for cfg_path in out.glob("snapshot-*/config.json"):  # as written before the law was recorded
        cfg = json.loads(cfg_path.read_text())
        del cfg["sampling"]["mask_law"]
        cfg["sampling"]["corruption"]["mask_full_rgb"] = False
        cfg["train"]["mask_full_rgb"] = False
        cfg_path.write_text(json.dumps(cfg))
        marker = json.loads((cfg_path.parent / "COMPLETE").read_text())
        marker["files"]["config.json"] = cfg_path.stat().st_size
        (cfg_path.parent / "COMPLETE").write_text(json.dumps(marker))
    loaded = load_model(out)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "notice:" in err and "per channel" in err
    assert not loaded.sampling.mask_law_recorded and loaded.sampling.corruption.mask_full_rgb is False
    # resuming it keeps the law it was trained with
    train(TrainConfig(data=data, outdir=str(out), **dict(TINY, kimg=0.032)), progress=False)
    assert json.loads((out / "config.json").read_text())["train"]["mask_full_rgb"] is False


def test_cli_contradiction_and_dry_run(tmp_path, capsys):
    per_channel = str(write_npz(tmp_path / "ch.npz", n=16, channels=3, masks=channel_masks()))
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exc:
        main(["train", "--data", per_channel, "--outdir", str(out), "--mask-full-rgb", "--arch", "tiny"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and "--mask-full-rgb" in err and not out.exists()

    per_pixel = str(write_npz(tmp_path / "px.npz", n=16, channels=3, masks=pixel_masks()))
    resolved = json.loads(dry_run(TrainConfig(data=per_pixel, outdir=str(out))))
    assert resolved["mask_full_rgb"] is True and "data's masks" in resolved["mask_law"] and not out.exists()
    assert json.loads(dry_run(TrainConfig(data=per_pixel, outdir=str(out), mask_full_rgb=False)))[
        "mask_full_rgb"] is False


def test_finetune_resolves_the_law_from_the_data(tmp_path):
    from ambient.learners.finetune import load_data
    from ambient.learners.finetune_config import FinetuneConfig

    per_pixel = str(write_npz(tmp_path / "px.npz", n=16, channels=3, masks=pixel_masks()))
    per_channel = str(write_npz(tmp_path / "ch.npz", n=16, channels=3, masks=channel_masks()))
    cfg, _ = load_data(FinetuneConfig(pretrained="x", data=per_pixel, outdir=str(tmp_path / "o")))
    assert cfg.mask_full_rgb is True and cfg.corruption().mask_full_rgb
    cfg, _ = load_data(FinetuneConfig(pretrained="x", data=per_channel, outdir=str(tmp_path / "o")))
    assert cfg.mask_full_rgb is False
    with pytest.raises(AmbientInputError, match="--mask-full-rgb"):
        load_data(FinetuneConfig(pretrained="x", data=per_channel, outdir=str(tmp_path / "o"), mask_full_rgb=True))
