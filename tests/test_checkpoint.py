"""Snapshot format: round trips, optimizer/RNG state, strict loading, bad and hostile files."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch

from ambient.errors import AmbientInputError
from ambient.store import snapshots as ckpt
from ambient.store.statedict import load_state_dict_strict


def _tiny_model(seed: int = 0) -> torch.nn.Module:
    torch_gen = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=torch_gen))
    return model


def _train_steps(model, optimizer, generator, steps: int) -> None:
    for _ in range(steps):
        x = torch.randn(16, 4, generator=generator)
        loss = (model(x) - x[:, :2]).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_snapshot_name_and_step():
    assert ckpt.snapshot_name(123) == "snapshot-000123"
    assert ckpt.snapshot_name(12345678) == "snapshot-12345678"
    assert ckpt.snapshot_step("out/snapshot-000123") == 123
    assert ckpt.snapshot_step(".tmp-snapshot-000123-77") is None
    with pytest.raises(ValueError, match="step"):
        ckpt.snapshot_name(-1)


def test_roundtrip_model_ema_config(tmp_path):
    model = {"w": torch.randn(3, 5), "b": torch.arange(4), "h": torch.ones(2, dtype=torch.bfloat16)}
    ema = {k: v.clone() + 1 for k, v in model.items()}
    config = {"lr": 1e-3, "name": "tiny", "channels": [32, 64], "nested": {"p": 0.8}}
    path = ckpt.save_snapshot(tmp_path / ckpt.snapshot_name(5), config=config, model=model, ema=ema)
    assert sorted(os.listdir(path)) == ["COMPLETE", "config.json", "ema.safetensors", "model.safetensors"]
    on_disk = json.loads((path / "config.json").read_text())
    assert on_disk["format_version"] == 1 and on_disk["ambient_version"]
    snap = ckpt.load_snapshot(path)
    assert snap.config == config and snap.format_version == 1
    assert snap.optimizer is None and snap.extra_state == {}
    for k in model:
        assert snap.model[k].dtype == model[k].dtype and torch.equal(snap.model[k], model[k])
        assert torch.equal(snap.ema[k], ema[k])
    no_ema = ckpt.load_snapshot(ckpt.save_snapshot(tmp_path / "other", config={}, model=model))
    assert no_ema.ema is None


def test_tied_and_noncontiguous_tensors_are_saved(tmp_path):
    base = torch.randn(4, 6)
    model = {"a": base, "tied": base, "t": base.t(), "half": base[:, ::2]}
    snap = ckpt.load_snapshot(ckpt.save_snapshot(tmp_path / "s", config={}, model=model))
    for k, v in model.items():
        assert torch.equal(snap.model[k], v)


def test_adam_state_and_generator_roundtrip_give_identical_training(tmp_path):
    model = _tiny_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.8, 0.95), weight_decay=1e-4)
    generator = torch.Generator().manual_seed(1234)
    _train_steps(model, optimizer, generator, 3)
    extra = {"step": 3, "loss": 0.25, "tag": "run", "history": [1, 2.5, "x"], "rng": generator.get_state()}
    path = ckpt.save_snapshot(tmp_path / ckpt.snapshot_name(3), config={"seed": 1234},
                              model=model.state_dict(), optimizer=optimizer.state_dict(), extra_state=extra)

    snap = ckpt.load_snapshot(path)
    restored = _tiny_model(seed=99)  # different weights before loading
    load_state_dict_strict(restored, snap.model, path)
    opt2 = torch.optim.Adam(restored.parameters(), lr=0.5)
    opt2.load_state_dict(snap.optimizer)
    assert opt2.param_groups[0]["betas"] == (0.8, 0.95) and opt2.param_groups[0]["lr"] == 1e-2
    gen2 = torch.Generator()
    gen2.set_state(snap.extra_state["rng"])
    plain = {k: v for k, v in extra.items() if k != "rng"}
    assert {k: v for k, v in snap.extra_state.items() if k != "rng"} == plain
    assert isinstance(snap.extra_state["step"], int) and isinstance(snap.extra_state["loss"], float)

    _train_steps(model, optimizer, generator, 4)
    _train_steps(restored, opt2, gen2, 4)
    for p, q in zip(model.parameters(), restored.parameters()):
        assert torch.equal(p, q)
    assert torch.equal(torch.rand(5, generator=generator), torch.rand(5, generator=gen2))


def test_restored_optimizer_differs_from_fresh_one(tmp_path):
    """Guard against a round trip that silently drops the Adam moments."""
    model = _tiny_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    _train_steps(model, optimizer, torch.Generator().manual_seed(0), 3)
    snap = ckpt.load_snapshot(ckpt.save_snapshot(tmp_path / "s", config={}, model=model.state_dict(),
                                                 optimizer=optimizer.state_dict()))
    state = snap.optimizer["state"]
    assert set(state) == {0, 1, 2, 3}  # int parameter ids survive
    assert float(state[0]["step"]) == 3.0
    assert torch.equal(state[0]["exp_avg_sq"], optimizer.state_dict()["state"][0]["exp_avg_sq"])
    assert state[0]["exp_avg"].abs().sum() > 0


def test_save_rejects_unstorable_values_without_writing(tmp_path):
    target = tmp_path / "s"
    with pytest.raises(ValueError, match="config"):
        ckpt.save_snapshot(target, config={"f": object()}, model={})
    with pytest.raises(ValueError, match="extra_state/bad"):
        ckpt.save_snapshot(target, config={}, model={}, extra_state={"bad": object()})
    with pytest.raises(ValueError, match="model"):
        ckpt.save_snapshot(target, config={}, model={"w": [1.0, 2.0]})
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_replace_a_folder_that_is_not_a_snapshot(tmp_path):
    precious = tmp_path / "data"
    precious.mkdir()
    (precious / "keep.txt").write_text("x")
    with pytest.raises(AmbientInputError, match="not an ambient snapshot"):
        ckpt.save_snapshot(precious, config={}, model={"w": torch.zeros(1)})
    assert (precious / "keep.txt").read_text() == "x"


def test_load_state_dict_strict_reports_mismatch_in_one_line():
    model = _tiny_model()
    good = {k: v.clone() + 1 for k, v in model.state_dict().items()}
    load_state_dict_strict(model, good, "ok.safetensors")
    assert torch.equal(model.state_dict()["0.weight"], good["0.weight"])
    bad = dict(good)
    del bad["2.bias"]
    bad["extra.weight"] = torch.zeros(1)
    bad["0.weight"] = torch.zeros(3, 3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AmbientInputError) as info:
        load_state_dict_strict(model, bad, "run/snapshot-000001/model.safetensors")
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith("checkpoint run/snapshot-000001/model.safetensors does not match the model")
    assert "missing keys 2.bias" in msg and "unexpected keys extra.weight" in msg
    assert "shape mismatch for 0.weight (checkpoint (3, 3) vs model (8, 4))" in msg
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # untouched


# ----------------------------------------------------------------------------- bad files
def _valid(tmp_path, **kw):
    return ckpt.save_snapshot(tmp_path / "snap", config={"a": 1}, model={"w": torch.ones(3)}, **kw)


def test_not_a_snapshot_and_missing(tmp_path):
    with pytest.raises(AmbientInputError, match="does not exist"):
        ckpt.load_snapshot(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AmbientInputError, match=r"empty is not an ambient snapshot: it has no config.json"):
        ckpt.load_snapshot(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text('{"format_version": 1}')
    with pytest.raises(AmbientInputError, match="no model.safetensors"):
        ckpt.load_snapshot(tmp_path / "empty")


def test_newer_format_and_missing_format(tmp_path):
    path = _valid(tmp_path)
    (path / "COMPLETE").unlink()  # hand-edited folders (no marker) are still readable
    (path / "config.json").write_text(json.dumps({"format_version": 7, "a": 1}))
    with pytest.raises(AmbientInputError, match=r"written by a newer ambient \(format 7 > 1\); upgrade"):
        ckpt.load_snapshot(path)
    (path / "config.json").write_text(json.dumps({"a": 1}))
    with pytest.raises(AmbientInputError, match="config.json is not an ambient config"):
        ckpt.load_snapshot(path)


def test_corrupt_json_and_safetensors_name_the_file(tmp_path):
    path = _valid(tmp_path, optimizer={"state": {}, "param_groups": []})
    (path / "COMPLETE").unlink()
    good_config = (path / "config.json").read_text()
    (path / "config.json").write_text("{not json")
    with pytest.raises(AmbientInputError, match=r"snap/config.json is not valid JSON"):
        ckpt.load_snapshot(path)
    (path / "config.json").write_text(good_config)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[:-3])
    with pytest.raises(AmbientInputError, match=r"snap/model.safetensors is not a valid safetensors file"):
        ckpt.load_snapshot(path)


def test_marker_detects_truncation(tmp_path):
    path = _valid(tmp_path)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[:-3])
    assert not ckpt.is_complete(path)
    assert ckpt.list_snapshots(tmp_path) == []
    with pytest.raises(AmbientInputError, match="incomplete or damaged"):
        ckpt.load_snapshot(path)


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("victim", ["model.safetensors", "ema.safetensors", "training_state.safetensors"])
@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_pickled_payload_is_never_executed(tmp_path, victim, writer):
    marker = tmp_path / "pwned"
    path = _valid(tmp_path, ema={"w": torch.ones(3)}, extra_state={"n": 1})
    (path / "COMPLETE").unlink()
    payload = {"w": _Exploit(marker)}
    if writer == "pickle":
        (path / victim).write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, path / victim)
    with pytest.raises(AmbientInputError, match=victim):
        ckpt.load_snapshot(path)
    assert not marker.exists()
    pickle.loads(pickle.dumps(_Exploit(tmp_path / "control")))  # the payload really is live
    assert (tmp_path / "control").exists()
