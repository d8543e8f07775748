"""`ambient sample --seeds` (the reference's seed lists) and the seed's flag spellings."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ambient.cli import main
from ambient.cli.sample import parse_seeds
from ambient.data.corruption import Corruption
from ambient.errors import AmbientInputError
from ambient.nets.registry import ModelConfig, SamplingSpec, build_denoiser
from ambient.store.snapshots import save_snapshot


def test_parse_seeds():
    assert parse_seeds("0-4") == [0, 1, 2, 3, 4]
    assert parse_seeds("0,5,10-12") == [0, 5, 10, 11, 12]
    assert parse_seeds("7") == [7]
    assert len(parse_seeds("0-49999")) == 50000
    for bad in ("", "a", "5-3", "-1", "1-", "1,,2"):
        with pytest.raises(AmbientInputError, match="^--seeds"):
            parse_seeds(bad)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = ModelConfig(arch="tiny", img_channels=1, resolution=8)
    den = build_denoiser(cfg)
    out = tmp_path_factory.mktemp("m") / "snapshot-000000"
    spec = SamplingSpec(Corruption("dust", 0.3, 0.1))
    return save_snapshot(out, config={"model": cfg.to_dict(), "sampling": spec.to_dict()}, model=den.state_dict())


def _sample(model_dir, tmp_path, name, *args):
    out = tmp_path / f"{name}.npz"
    with pytest.raises(SystemExit) as e:  # the seed's spellings: --network, --outdir, --num_masks
        main(["sample", "--network", str(model_dir), "--steps", "2", "--outdir", str(out), *args])
    assert e.value.code == 0
    return np.load(out)["images"]


def _close(a, b):
    """Equal up to one uint8 level: the same seeds, in batches of another size, go through the network's
    convolutions and matrix products, whose kernels may block (and so round) differently per batch shape."""
    return a.shape == b.shape and np.abs(a.astype(int) - b.astype(int)).max() <= 1


def test_seed_list_gives_the_same_images_as_seed_and_num(model_dir, tmp_path):
    listed = _sample(model_dir, tmp_path, "listed", "--seeds", "3,5-6")
    assert listed.shape[0] == 3
    assert _close(listed[:1], _sample(model_dir, tmp_path, "one", "--seed", "3", "--num", "1"))
    assert _close(listed[1:], _sample(model_dir, tmp_path, "two", "--seed", "5", "--num_masks", "1",
                                      "--num-images", "2"))
    assert np.abs(listed[1].astype(int) - listed[2].astype(int)).max() > 1


def test_seeds_and_num_are_exclusive(model_dir, capsys):
    for args in (["--seeds", "0-3", "--num", "4"], []):
        with pytest.raises(SystemExit) as e:
            main(["sample", "--model", str(model_dir), "--out", "x.npz", *args])
        assert e.value.code == 2
    assert "--seeds" in capsys.readouterr().err
