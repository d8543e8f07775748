"""Issue 8: crashes lose nothing, files never run code, bad input is refused clearly."""

import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ambient.cli import main
from ambient.data.corruption import PATTERNS, Corruption
from ambient.store.snapshots import latest_snapshot, load_snapshot
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
    from ambient.errors import AmbientInputError
    from ambient.learners.runlog import OutdirLock

    with pytest.raises(AmbientInputError, match=f"another ambient process \\(pid {proc.pid}\\)"):
        OutdirLock().acquire(killed)  # the running process holds the outdir
    time.sleep(0.3)  # land somewhere in the middle of training (or of writing a snapshot)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with OutdirLock() as lock:
        lock.acquire(killed)  # a killed holder leaves no stuck lock
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


# ----------------------------------------------------------------------------- issue 22: resume edge cases, faults
def _run(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    captured = capsys.readouterr()
    return exc.value.code, captured.out, captured.err


def _tree(root):
    """Every file under ``root`` (hidden ones too) and its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _train_args(data, out, kimg, *extra):
    return ["train", "--data", str(data), "--outdir", str(out), "--kimg", str(kimg), *TRAIN, *extra]


def _same_weights(a_dir, b_dir):
    a, b = load_snapshot(latest_snapshot(a_dir)), load_snapshot(latest_snapshot(b_dir))
    assert a.extra_state["nimg"] == b.extra_state["nimg"]
    for key in a.model:
        assert torch.equal(a.model[key], b.model[key]), key
        assert torch.equal(a.ema[key], b.ema[key]), key


@pytest.mark.parametrize("progress", ["--no-progress", "--progress"])
def test_resume_at_or_past_kimg_says_so_and_changes_nothing(tmp_path, capsys, progress):
    data = write_npz(tmp_path / "d.npz", n=16)
    out = tmp_path / "run"
    assert _run(_train_args(data, out, 0.048), capsys)[0] == 0
    before = _tree(out)
    for kimg, resume in ((0.024, ["--resume"]), (0.048, [])):  # past --kimg (lowered), and exactly at it
        code, _, err = _run(_train_args(data, out, kimg, *resume, progress), capsys)
        lines = err.strip().splitlines()
        assert code == 0 and len(lines) == 1 and lines[0].startswith("nothing to do"), err
        assert "0.048 kimg" in lines[0] and f"--kimg {kimg:g}" in lines[0]
        assert _tree(out) == before  # config.json keeps the run's kimg; no new log or event file


def test_damaged_snapshots_are_named_and_resume_uses_the_newest_complete_one(tmp_path, capsys):
    data = write_npz(tmp_path / "d.npz", n=16)
    assert _run(_train_args(data, tmp_path / "full", 0.072), capsys)[0] == 0  # snapshots at steps 3, 6, 9
    cut = tmp_path / "cut"
    assert _run(_train_args(data, cut, 0.072), capsys)[0] == 0
    model = cut / "snapshot-000009" / "model.safetensors"
    model.write_bytes(model.read_bytes()[:-8])  # truncated: the COMPLETE marker lists another size
    (cut / "snapshot-000006" / "COMPLETE").unlink()  # incomplete
    code, _, err = _run(_train_args(data, cut, 0.072), capsys)
    assert code == 0, err
    notice = [line for line in err.splitlines() if line.startswith("notice:")]
    assert len(notice) == 1 and "snapshot-000006, snapshot-000009" in notice[0], err
    assert "resuming from snapshot-000003" in notice[0] and "COMPLETE" in notice[0]
    _same_weights(tmp_path / "full", cut)  # retrained from step 3; the damaged snapshots were rewritten
    for snap in cut.glob("snapshot-*"):
        load_snapshot(snap)
    # nothing complete left: said so, and the run starts afresh (to the same weights)
    for snap in cut.glob("snapshot-*"):
        (snap / "COMPLETE").unlink()
    code, _, err = _run(_train_args(data, cut, 0.072), capsys)
    assert code == 0 and "starting afresh" in err and "snapshot-000003, snapshot-000006, snapshot-000009" in err
    _same_weights(tmp_path / "full", cut)


def _em_args(obs, out):
    from tests.test_em import TINY as EM_TINY

    args = list(EM_TINY)
    args[args.index("--laps") + 1] = "1"
    return ["em", "--data", str(obs), "--outdir", str(out), *args]


def _finetune_args(tmp_path, out, steps=2):
    from tests.test_finetune import save_npz, save_pipeline, tiny_unet

    pre = tmp_path / "pre"
    if not pre.exists():
        save_pipeline(pre, tiny_unet())
    data = tmp_path / "ft.npz"
    if not data.exists():
        save_npz(data)
    return ["finetune", "--pretrained", str(pre), "--data", str(data), "--outdir", str(out), "--steps", str(steps),
            "--corruption-probability", "0.5", "--delta-probability", "0.1", "--batch", "2", "--ema", "0.9",
            "--lr", "1e-3", "--log-every", "1", "--snapshot-every", "2", "--device", "cpu"]


def _command_args(command, tmp_path, out):
    if command == "train":
        return _train_args(write_npz(tmp_path / "d.npz", n=16), out, 0.016)
    if command == "em":
        from tests.test_em import observations

        return _em_args(observations(tmp_path / "obs.npz"), out)
    return _finetune_args(tmp_path, out)


@pytest.mark.parametrize("command", ["train", "em", "finetune"])
def test_a_second_process_on_the_same_outdir_is_refused(tmp_path, capsys, command):
    from ambient.learners.runlog import OutdirLock

    out = tmp_path / "run"
    argv = _command_args(command, tmp_path, out)
    holder = OutdirLock()  # stands for another process writing into the folder (flock: per open file)
    holder.acquire(out)
    try:
        before = _tree(out)
        code, _, err = _run(argv, capsys)
        assert code == 2 and err.count("\n") == 1 and err.startswith("error: --outdir"), err
        assert f"another ambient process (pid {os.getpid()})" in err
        assert _tree(out) == before
    finally:
        holder.release()
    code, _, err = _run(argv, capsys)  # the lock's holder is gone: the same command runs
    assert code == 0, err


@pytest.mark.parametrize("command", ["em", "finetune"])
def test_em_and_finetune_at_or_past_their_length_say_so_and_change_nothing(tmp_path, capsys, command):
    out = tmp_path / "run"
    if command == "em":
        full = _command_args("em", tmp_path, out)
        full[full.index("--laps") + 1] = "2"
        lowered = list(full)
        lowered[lowered.index("--laps") + 1] = "1"
    else:
        full, lowered = _finetune_args(tmp_path, out, steps=4), _finetune_args(tmp_path, out, steps=2)
    assert _run(full, capsys)[0] == 0
    before = _tree(out)
    for argv in (lowered, full):  # past its length (lowered), then exactly at it
        code, stdout, err = _run(argv, capsys)
        lines = [line for line in (stdout + err).splitlines() if not line.startswith("done: ")]  # finetune: stdout
        assert code == 0 and len(lines) == 1 and lines[0].startswith("nothing to do"), (stdout, err)
        assert _tree(out) == before


def _failing_writes(monkeypatch, err: int, hit) -> list:
    """Make the writers of ambient.io (and the snapshot writer built on them) fail with ``err`` for the
    files ``hit(path)`` selects, after writing half of the bytes; returns the paths that failed."""
    from ambient import io
    from ambient.store import snapshots as checkpoint

    failed = []
    real_synced, real_atomic = checkpoint.write_synced, io.atomic_write

    def synced(path, data):
        if hit(str(path)):
            failed.append(str(path))
            with open(path, "wb") as f:
                f.write(data[: len(data) // 2])
            raise OSError(err, os.strerror(err))
        real_synced(path, data)

    def atomic(path, write):
        def cut(f):
            if hit(str(path)):
                failed.append(str(path))
                f.write(b"half")
                raise OSError(err, os.strerror(err))
            write(f)
        return real_atomic(path, cut)

    monkeypatch.setattr(checkpoint, "write_synced", synced)
    monkeypatch.setattr(io, "atomic_write", atomic)
    return failed


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EIO])
def test_a_write_failing_mid_snapshot_keeps_the_previous_snapshot(tmp_path, capsys, monkeypatch, err):
    data = write_npz(tmp_path / "d.npz", n=16)
    out = tmp_path / "run"
    failed = _failing_writes(monkeypatch, err, lambda p: ".tmp-snapshot-000006" in p and p.endswith("ema.safetensors"))
    code, _, text = _run(_train_args(data, out, 0.072), capsys)
    last = text.strip().splitlines()[-1]  # after the run's own log lines (snapshot 3 was written)
    assert failed and code == 2 and last.startswith("error: cannot write") and "Traceback" not in text, text
    assert ("no space left on device" if err == errno.ENOSPC else os.strerror(err)) in last
    assert latest_snapshot(out) == out / "snapshot-000003" and load_snapshot(out / "snapshot-000003")
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp-")]
    monkeypatch.undo()
    assert _run(_train_args(data, out, 0.072), capsys)[0] == 0  # the same command then ends as an uninterrupted run
    assert _run(_train_args(data, tmp_path / "full", 0.072), capsys)[0] == 0
    _same_weights(tmp_path / "full", out)


_FULL_DISK = """
import errno, os, sys
import ambient.store.snapshots as checkpoint
real = checkpoint.write_synced
def full(path, data):
    if ".tmp-snapshot-000006" in str(path) and str(path).endswith("ema.safetensors"):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    real(path, data)
checkpoint.write_synced = full
from ambient.cli import main
main(sys.argv[1:])
"""


def test_a_failed_write_with_the_progress_bar_on_ends_stderr_with_the_error(tmp_path):
    data = write_npz(tmp_path / "d.npz", n=16)
    argv = _train_args(data, tmp_path / "run", 0.072, "--progress")
    proc = subprocess.run([sys.executable, "-c", _FULL_DISK, *argv], env=dict(os.environ, OMP_NUM_THREADS="1"),
                          capture_output=True, text=True)
    last = proc.stderr.replace("\r", "\n").strip().splitlines()[-1]  # the bar is closed before the message
    assert proc.returncode == 2 and last.startswith("error: cannot write") and "no space left" in last, proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_write_failing_in_em_is_one_line_and_the_run_resumes(tmp_path, capsys, monkeypatch):
    from tests.test_em import observations

    obs = observations(tmp_path / "obs.npz")
    out = tmp_path / "run"
    failed = _failing_writes(monkeypatch, errno.ENOSPC, lambda p: p.endswith("lap-00.npz"))
    code, _, text = _run(_em_args(obs, out), capsys)
    last = text.strip().splitlines()[-1]  # after the Gaussian fit's log lines
    assert failed and code == 2 and last.startswith("error: cannot write") and "no space left on device" in last
    assert "Traceback" not in text
    assert (out / "gaussian.npz").is_file() and not (out / "completions" / "lap-00.npz").exists()
    assert not [p for p in out.rglob(".*") if p.name != ".lock"]  # no temporary file left
    monkeypatch.undo()
    assert _run(_em_args(obs, out), capsys)[0] == 0


# ----------------------------------------------------------------------------- SIGKILL: em, finetune, restore
_ENV1 = dict(os.environ, OMP_NUM_THREADS="1")


def _cli(*args):
    return [sys.executable, "-m", "ambient", *(str(a) for a in args)]


def _killed_then_finished(cmd, started, rng, *, kills: int, span: float, stderr=None) -> int:
    """Run ``cmd`` ``kills`` times, each SIGKILLed at a random moment up to ``span`` s after ``started()``
    turns true, then once to the end; returns how many kills landed before the command ended. ``stderr``:
    a file that takes each killed run's stderr (for ``started`` to read)."""
    landed = 0
    for _ in range(kills):
        with open(stderr or os.devnull, "w") as err:
            proc = subprocess.Popen(cmd, env=_ENV1, stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.time() + 120
        while proc.poll() is None and not started() and time.time() < deadline:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, span))
        proc.send_signal(signal.SIGKILL)
        landed += proc.wait() == -signal.SIGKILL
    done = subprocess.run(cmd, env=_ENV1, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return landed


def _both(reference_cmd, killed_cmd, started, rng, *, kills, span, stderr=None) -> int:
    """The uninterrupted run (in the background) and the killed-and-rerun one, side by side."""
    reference = subprocess.Popen(reference_cmd, env=_ENV1, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                 text=True)
    try:
        landed = _killed_then_finished(killed_cmd, started, rng, kills=kills, span=span, stderr=stderr)
    finally:
        _, err = reference.communicate(timeout=300)
    assert reference.returncode == 0, err[-3000:]
    return landed


@pytest.mark.slow  # ~25 s on a shared 2-core machine: several process starts
def test_sigkill_during_em_then_the_same_command_equals_an_uninterrupted_run(tmp_path):
    import random

    import numpy as np

    from ambient.store.statedict import read_tensors
    from tests.test_em import TINY as EM_TINY
    from tests.test_em import observations

    obs = observations(tmp_path / "obs.npz")
    args = list(EM_TINY)
    for flag, value in (("--lap-kimg", "0.016"), ("--snapshot-kimg", "0.008")):
        args[args.index(flag) + 1] = value

    def em(out):
        return _cli("em", "--data", obs, "--outdir", out, *args)

    killed = tmp_path / "killed"
    landed = _both(em(tmp_path / "full"), em(killed), lambda: (killed / "em_config.json").exists(),
                   random.Random(1), kills=3, span=3.0)
    assert landed >= 1
    for lap in ("lap-00", "lap-01"):
        a, b = ((read_tensors(sorted((root / lap).glob("snapshot-*"))[-1] / "ema.safetensors", "cpu")[0])
                for root in (tmp_path / "full", killed))
        assert all(torch.equal(a[k], b[k]) for k in a), lap
    for name in ("lap-00.npz", "lap-01.npz"):
        with np.load(tmp_path / "full" / "completions" / name) as za, np.load(killed / "completions" / name) as zb:
            assert np.array_equal(za["images"], zb["images"]) and np.array_equal(za["index"], zb["index"])
    laps = [[json.loads(line)["lap"] for line in (root / "stats.jsonl").read_text().splitlines()]
            for root in (tmp_path / "full", killed)]
    assert laps == [[0, 1], [0, 1]]


@pytest.mark.slow  # ~25 s on a shared 2-core machine: several process starts
def test_sigkill_during_finetune_then_the_same_command_equals_an_uninterrupted_run(tmp_path):
    import random

    from safetensors.torch import load_file

    def finetune(out):
        argv = _finetune_args(tmp_path, out, steps=10)
        return _cli(*argv)

    killed = tmp_path / "killed"
    landed = _both(finetune(tmp_path / "full"), finetune(killed), lambda: (killed / "finetune_options.json").exists(),
                   random.Random(2), kills=2, span=3.0)
    assert landed >= 1
    a, b = (load_file(str(root / "unet" / "diffusion_pytorch_model.safetensors"))
            for root in (tmp_path / "full", killed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [[json.loads(line)["step"] for line in (root / "stats.jsonl").read_text().splitlines()]
             for root in (tmp_path / "full", killed)]
    assert steps[0] == list(range(1, 11)) and sorted(set(steps[1])) == steps[0]  # killed steps are logged again


def test_sigkill_during_restore_then_the_same_command_equals_an_uninterrupted_run(tmp_path, capsys):
    import random

    import numpy as np

    from tests.test_restore_cli import observations

    data = write_npz(tmp_path / "train.npz", n=16)
    model = tmp_path / "naive"
    assert _run(["train", "--data", str(data), "--outdir", str(model), "--objective", "naive", "--arch", "tiny",
                 "--batch", "8", "--kimg", "0.016", "--grid-samples", "0", "--no-progress"], capsys)[0] == 0
    obs = observations(tmp_path / "obs.npz", n=12)

    def restore(out):
        return _cli("restore", "--model", model, "--data", obs, "--out", out, "--steps", "12", "--num-per-image", "2",
                    "--batch", "4", "--cg-iters", "2")

    killed, log = tmp_path / "killed.npz", tmp_path / "killed.log"
    started = lambda: log.is_file() and "restore (mmps)" in log.read_text()  # noqa: E731 (its progress bar)
    landed = _both(restore(tmp_path / "full.npz"), restore(killed), started, random.Random(3), kills=1, span=1.5,
                   stderr=log)
    assert landed == 1
    log.unlink()
    with np.load(tmp_path / "full.npz") as za, np.load(killed) as zb:
        assert np.array_equal(za["images"], zb["images"]) and np.array_equal(za["index"], zb["index"])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left
