import json

import numpy as np
import pytest
import torch

from ambient.errors import AmbientInputError, TrainingDiverged
from ambient.io import read_jsonl
from ambient.learners.core import EpochOrder
from ambient.learners.train import train
from ambient.learners.train_config import TrainConfig
from ambient.objectives.losses import AmbientLoss
from ambient.store.models import load_model
from ambient.store.snapshots import latest_snapshot, list_snapshots, load_snapshot
from tests.helpers_data import write_npz

BASE = dict(arch="tiny", corruption_probability=0.5, delta_probability=0.2, batch=8, snapshot_kimg=0.04,
            tick_kimg=0.016, grid_samples=0, lr=1e-3)


@pytest.fixture
def npz(tmp_path):
    return str(write_npz(tmp_path / "tiny.npz", n=24))


def test_epoch_order_is_a_permutation_per_epoch():
    order = EpochOrder(10, seed=3)
    idx = order.indices(0, 25)
    assert sorted(idx[:10].tolist()) == list(range(10))
    assert sorted(idx[10:20].tolist()) == list(range(10))
    assert not torch.equal(idx[:10], idx[10:20])
    assert torch.equal(EpochOrder(10, seed=3).indices(7, 9), idx[7:16])


def test_stopped_and_resumed_run_equals_uninterrupted(tmp_path, npz):
    # stopped by a lower --kimg, then extended: the same run only at a constant rate (the default cosine schedule
    # is defined by --kimg; a killed run resumed with the same --kimg: tests/test_reliability.py)
    cfg = dict(BASE, data=npz, augment=0.5, dropout=0.1, lr_schedule="constant")
    train(TrainConfig(outdir=str(tmp_path / "a"), kimg=0.08, **cfg), progress=False)
    train(TrainConfig(outdir=str(tmp_path / "b"), kimg=0.04, **cfg), progress=False)
    train(TrainConfig(outdir=str(tmp_path / "b"), kimg=0.08, **cfg), progress=False)
    a = load_snapshot(latest_snapshot(tmp_path / "a"))
    b = load_snapshot(latest_snapshot(tmp_path / "b"))
    assert a.extra_state["nimg"] == b.extra_state["nimg"] == 80
    for key in a.model:
        assert torch.equal(a.model[key], b.model[key]), key
        assert torch.equal(a.ema[key], b.ema[key]), key
    # something was learned: weights moved away from the initialisation
    assert len(list_snapshots(tmp_path / "a")) == 2


def test_outdir_contents_and_config_round_trip(tmp_path, npz):
    out = tmp_path / "run"
    train(TrainConfig(outdir=str(out), data=npz, kimg=0.048, **dict(BASE, grid_samples=4)), progress=False)
    config = json.loads((out / "config.json").read_text())
    assert TrainConfig.from_dict(config["train"]).kimg == 0.048
    assert config["sampling"]["corruption"]["p"] == 0.5
    rows = read_jsonl(out / "stats.jsonl")
    assert len(rows) == 3 and all(np.isfinite(r["loss"]) for r in rows)
    assert {"kimg", "loss", "img_per_sec", "skipped_steps"} <= set(rows[0])
    assert any((out / "tensorboard").iterdir())
    assert sorted(p.name for p in out.glob("samples-*.png")) == ["samples-000005.png", "samples-000006.png"]
    loaded = load_model(out)
    assert loaded.model.mask_channels and loaded.sampling.uses_masks


def test_data_masks_set_the_sampler_survival(tmp_path):
    rng = np.random.default_rng(0)
    masks = (rng.random((24, 8, 8)) < 0.3).astype(np.uint8)
    path = write_npz(tmp_path / "m.npz", masks=masks)
    out = tmp_path / "run"
    train(TrainConfig(outdir=str(out), data=str(path), kimg=0.016, **dict(BASE, corruption_probability=0.0)),
          progress=False)
    spec = load_model(out).sampling
    assert spec.data_survival == pytest.approx(masks.mean(), abs=1e-6)


def test_naive_objective_is_a_plain_edm_network(tmp_path, npz):
    out = tmp_path / "naive"
    train(TrainConfig(outdir=str(out), data=npz, kimg=0.016, objective="naive", **BASE), progress=False)
    loaded = load_model(out)
    assert not loaded.model.mask_channels and not loaded.sampling.uses_masks


def test_nonfinite_steps_are_skipped_counted_and_stop_training(tmp_path, npz, monkeypatch):
    real_call = AmbientLoss.__call__
    calls = {"n": 0}

    def flaky(self, *args, **kwargs):
        calls["n"] += 1
        out = real_call(self, *args, **kwargs)
        return out * float("nan") if calls["n"] in (2, 3) else out

    monkeypatch.setattr(AmbientLoss, "__call__", flaky)
    out = tmp_path / "flaky"
    train(TrainConfig(outdir=str(out), data=npz, kimg=0.048, **BASE), progress=False)
    state = load_snapshot(latest_snapshot(out)).extra_state
    assert state["skipped"] == 2 and state["consecutive_skipped"] == 0
    assert read_jsonl(out / "stats.jsonl")[-1]["skipped_steps"] == 2
    assert all(torch.isfinite(v).all() for v in load_snapshot(latest_snapshot(out)).model.values())

    monkeypatch.setattr(AmbientLoss, "__call__", lambda self, *a, **k: real_call(self, *a, **k) * float("inf"))
    with pytest.raises(TrainingDiverged, match="3 consecutive"):
        train(TrainConfig(outdir=str(tmp_path / "diverge"), data=npz, kimg=0.2,
                          **dict(BASE, max_nonfinite=3)), progress=False)


def test_resume_refuses_changed_flags(tmp_path, npz):
    out = str(tmp_path / "run")
    train(TrainConfig(outdir=out, data=npz, kimg=0.016, **BASE), progress=False)
    with pytest.raises(AmbientInputError, match="--corruption-probability"):
        train(TrainConfig(outdir=out, data=npz, kimg=0.032, **dict(BASE, corruption_probability=0.6)),
              progress=False)


def test_resume_from_empty_folder_is_refused(tmp_path, npz):
    (tmp_path / "empty").mkdir()
    with pytest.raises(AmbientInputError, match="--resume"):
        train(TrainConfig(outdir=str(tmp_path / "run"), data=npz, resume=str(tmp_path / "empty"), **BASE),
              progress=False)


def test_run_shorter_than_a_tick_still_logs_its_steps(tmp_path, npz):
    """stats.jsonl gets a final row at the end of every run, also one shorter than --tick-kimg,
    and a run ending on a tick gets no duplicate row."""
    out = tmp_path / "short"
    train(TrainConfig(outdir=str(out), data=npz, kimg=0.024, **dict(BASE, tick_kimg=1.0)), progress=False)
    rows = read_jsonl(out / "stats.jsonl")
    assert [r["kimg"] for r in rows] == [0.024] and np.isfinite(rows[0]["loss"])
    train(TrainConfig(outdir=str(out), data=npz, kimg=0.04, **dict(BASE, tick_kimg=1.0)), progress=False)
    assert [r["kimg"] for r in read_jsonl(out / "stats.jsonl")] == [0.024, 0.04]
    on_tick = tmp_path / "on_tick"
    train(TrainConfig(outdir=str(on_tick), data=npz, kimg=0.032, **BASE), progress=False)
    assert [r["kimg"] for r in read_jsonl(on_tick / "stats.jsonl")] == [0.016, 0.032]
