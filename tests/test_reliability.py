"""Issue 8: crashes lose nothing, files never run code, bad input is refused clearly."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ambient.checkpoint import latest_snapshot, load_snapshot
from ambient.cli import main
from ambient.corruption import PATTERNS, Corruption
from tests.helpers_data import write_npz

TRAIN = ["--arch", "tiny", "--batch", "8", "--corruption-probability", "0.5", "--delta-probability", "0.2",
         "--snapshot-kimg", "0.024", "--tick-kimg", "0.024", "--grid-samples", "0", "--no-progress", "--seed", "3"]


def _train_cmd(data, out, kimg):
    return [sys.executable, "-m", "ambient", "train", "--data", str(data), "--outdir", str(out), "--kimg", str(kimg),
            *TRAIN]


def test_sigkill_during_training_then_resume_equals_uninterrupted(tmp_path):
    data = write_npz(tmp_path / "d.npz", n=32)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run(_train_cmd(data, tmp_path / "full", 0.6), check=True, env=env, capture_output=True)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(data, killed, 0.6), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (killed / "snapshot-000006").exists():
        time.sleep(0.05)
    time.sleep(0.3)  # land somewhere in the middle of training (or of writing a snapshot)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = latest_snapshot(killed)
    assert partial is not None and load_snapshot(partial).extra_state["nimg"] < 600
    subprocess.run(_train_cmd(data, killed, 0.6), check=True, env=env, capture_output=True)

    a = load_snapshot(latest_snapshot(tmp_path / "full"))
    b = load_snapshot(latest_snapshot(killed))
    assert a.extra_state["nimg"] == b.extra_state["nimg"] == 600
    for key in a.model:
        assert torch.equal(a.model[key], b.model[key]), key
        assert torch.equal(a.ema[key], b.ema[key]), key


def test_resume_with_data_of_other_channels_is_refused(tmp_path, capsys):
    data = tmp_path / "d.npz"
    write_npz(data, n=16)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exc:
        main(["train", "--data", str(data), "--outdir", str(out), "--kimg", "0.016", *TRAIN])
    assert exc.value.code == 0
    capsys.readouterr()
    write_npz(data, n=16, channels=3)  # same path, now RGB
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(SystemExit) as exc:
        main(["train", "--data", str(data), "--outdir", str(out), "--kimg", "0.032", *TRAIN])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1 and "3x8x8" in err and "1x8x8" in err, err
    assert sorted(p.name for p in out.iterdir()) == before


def test_pickle_where_a_model_is_expected_does_not_run(tmp_path, capsys):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    import pickle

    snap = tmp_path / "model"
    snap.mkdir()
    (snap / "config.json").write_text('{"format_version": 1, "model": {}, "sampling": {}}')
    (snap / "model.safetensors").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(SystemExit) as exc:
        main(["sample", "--model", str(snap), "--num", "1", "--out", str(tmp_path / "s.npz")])
    assert exc.value.code == 2 and not marker.exists() and not (tmp_path / "s.npz").exists()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    pattern=st.sampled_from(PATTERNS + ("blur",)),
    p=st.one_of(st.floats(-0.5, 1.5), st.just(float("nan"))),
    delta=st.one_of(st.floats(-0.5, 1.5), st.just(float("nan"))),
    shape=st.tuples(st.integers(1, 3), st.sampled_from([1, 3]), st.integers(1, 12), st.integers(1, 12)),
    full_rgb=st.booleans(),
    seed=st.integers(0, 2**31),
)
def test_corruption_is_correct_or_a_value_error(pattern, p, delta, shape, full_rgb, seed):
    try:
        c = Corruption(pattern, p, delta, full_rgb)
    except ValueError:
        assert pattern == "blur" or not (0 <= p < 1) or not (0 <= delta < 1)
        return
    assert pattern != "blur" and 0 <= p < 1 and 0 <= delta < 1
    g = torch.Generator().manual_seed(seed)
    a = c.mask(shape, g)
    a_hat = c.further(a, g)
    assert a.shape == a_hat.shape == shape
    assert set(a.unique().tolist()) <= {0.0, 1.0} and bool((a_hat <= a).all())
    if pattern != "dust" or full_rgb:
        assert torch.equal(a, a[:, :1].expand_as(a)) and torch.equal(a_hat, a_hat[:, :1].expand_as(a_hat))


@settings(max_examples=40, deadline=None)
@given(values=st.lists(st.sampled_from([0.0, 1.0, 0.5, -1.0, 2.0, float("nan")]), min_size=16, max_size=16),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.uint8, torch.bool, torch.int64]))
def test_further_accepts_binary_masks_of_any_dtype_and_refuses_the_rest(values, dtype):
    raw = torch.tensor(values).reshape(1, 1, 4, 4)
    mask = raw.to(dtype) if dtype != torch.uint8 else raw.nan_to_num(3.0).clamp(0, 255).to(dtype)
    c = Corruption("dust", 0.3, 0.5)
    binary = bool(((mask == 0) | (mask == 1)).all())
    if binary:
        out = c.further(mask, torch.Generator().manual_seed(0))
        assert bool((out <= mask).all())
    else:
        with pytest.raises(ValueError, match="mask"):
            c.further(mask)
