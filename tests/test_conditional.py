"""Class-conditional training and sampling (the reference's --cond; ambient.nets.conditional)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from ambient.cli import main
from ambient.data.corruption import Corruption
from ambient.data.datasets import load_dataset
from ambient.errors import AmbientInputError
from ambient.learners.train import train
from ambient.learners.train_config import TrainConfig
from ambient.nets.conditional import LabelledDenoiser, one_hot
from ambient.nets.registry import ModelConfig, SamplingSpec, build_denoiser
from ambient.store.models import load_model
from ambient.store.snapshots import save_snapshot

TINY = json.dumps({"model_channels": 16, "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": []})


def test_one_hot():
    torch.testing.assert_close(one_hot([2, 0], 3), torch.tensor([[0.0, 0, 1], [1, 0, 0]]))
    with pytest.raises(AmbientInputError, match="0..2"):
        one_hot([3], 3)


def test_folder_class_subfolders_give_labels(tmp_path):
    for name, n in (("cat", 2), ("dog", 1)):
        (tmp_path / name).mkdir()
        for i in range(n):
            Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(tmp_path / name / f"{i}.png")
    assert load_dataset(str(tmp_path)).labels.tolist() == [0, 0, 1]
    assert load_dataset(str(tmp_path / "cat")).labels is None  # no subfolders: no classes


def test_conditional_denoiser_uses_its_labels():
    torch.manual_seed(0)
    cfg = ModelConfig(arch="ddpmpp-cifar", img_channels=1, resolution=8, label_dim=3, songunet=json.loads(TINY))
    den = build_denoiser(cfg).eval()
    for p in den.parameters():  # make the zero-initialised output layers matter
        torch.nn.init.normal_(p, std=0.3)
    x, mask = torch.randn(2, 1, 8, 8), torch.ones(2, 1, 8, 8)
    a = den(x, 1.0, mask, class_labels=one_hot([0, 0], 3))
    b = den(x, 1.0, mask, class_labels=one_hot([1, 1], 3))
    assert (a - b).abs().max() > 1e-4  # exactly 0 if the labels were ignored
    torch.testing.assert_close(LabelledDenoiser(den, one_hot([1], 3))(x, 1.0, mask), b)
    with pytest.raises(ValueError, match="class_labels are required"):
        den(x, 1.0, mask)


@pytest.fixture(scope="module")
def cond_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("cond")
    g = np.random.default_rng(0)
    labels = np.arange(32) % 2
    images = np.where(labels[:, None, None] == 0, 40, 210).astype(np.uint8) + g.integers(0, 20, (32, 8, 8), np.uint8)
    np.savez(root / "data.npz", images=images, labels=labels)
    cfg = TrainConfig(data=str(root / "data.npz"), outdir=str(root / "run"), arch="ddpmpp-cifar", arch_kwargs=TINY,
                      cond=True, corruption_probability=0.3, batch=8, kimg=0.032, snapshot_kimg=0.032,
                      grid_samples=4, device="cpu")
    return train(cfg, progress=False, log=lambda m: None), root


def _sample(run, out, *args):
    with pytest.raises(SystemExit) as e:
        main(["sample", "--model", str(run), "--steps", "2", "--out", str(out), *args])
    return e.value.code


def test_conditional_training_then_sampling_by_class(cond_run, tmp_path):
    run, _ = cond_run
    loaded = load_model(run)
    assert loaded.model.label_dim == 2 and loaded.model.songunet["model_channels"] == 16
    assert (run / "samples-000004.png").is_file()  # the snapshot grid sampled with classes 0, 1, 0, 1
    assert _sample(run, tmp_path / "mixed.npz", "--seeds", "0-3", "--classes", "all") == 0
    assert _sample(run, tmp_path / "zero.npz", "--seeds", "0,2", "--class", "0") == 0
    assert _sample(run, tmp_path / "one.npz", "--seeds", "1,3", "--class", "1") == 0
    mixed = np.load(tmp_path / "mixed.npz")["images"].astype(int)
    # up to one uint8 level: another batch (size, labels) may round differently in the network's kernels
    assert np.abs(mixed[[0, 2]] - np.load(tmp_path / "zero.npz")["images"]).max() <= 1
    assert np.abs(mixed[[1, 3]] - np.load(tmp_path / "one.npz")["images"]).max() <= 1


def test_unconditional_sampling_of_a_conditional_model_is_refused(cond_run, tmp_path, capsys):
    run, _ = cond_run
    assert _sample(run, tmp_path / "x.npz", "--num", "2") == 2
    assert "class-conditional (2 classes)" in capsys.readouterr().err
    assert _sample(run, tmp_path / "x.npz", "--num", "2", "--class", "2") == 2
    assert not (tmp_path / "x.npz").exists()


def test_class_for_an_unconditional_model_is_refused(tmp_path, capsys):
    cfg = ModelConfig(arch="tiny", img_channels=1, resolution=8)
    snap = save_snapshot(tmp_path / "snapshot-000000", model=build_denoiser(cfg).state_dict(),
                         config={"model": cfg.to_dict(), "sampling": SamplingSpec(Corruption()).to_dict()})
    assert _sample(snap, tmp_path / "x.npz", "--num", "1", "--class", "0") == 2
    assert "not class-conditional" in capsys.readouterr().err


def test_cond_needs_labels_and_a_ddpmpp_arch(cond_run, tmp_path):
    _, root = cond_run
    with pytest.raises(AmbientInputError, match="--cond"):
        TrainConfig(cond=True, arch="small").validate()
    with pytest.raises(AmbientInputError, match="--arch-kwargs"):
        TrainConfig(arch="ddpmpp-cifar", arch_kwargs='{"in_channels": 4}').validate()
    np.savez(tmp_path / "nolabels.npz", images=np.zeros((4, 8, 8), np.uint8))
    cfg = TrainConfig(data=str(tmp_path / "nolabels.npz"), outdir=str(tmp_path / "r"), arch="ddpmpp-cifar",
                      arch_kwargs=TINY, cond=True, kimg=0.004, batch=4, device="cpu")
    with pytest.raises(AmbientInputError, match="has no labels"):
        train(cfg, progress=False, log=lambda m: None)
