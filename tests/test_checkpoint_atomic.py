"""Atomic writes: crash windows, SIGKILL mid-save, full disk, listing, small file helpers."""

from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from ambient.errors import AmbientInputError
from ambient.store import snapshots as ckpt

DEAD_PID = 2_147_483_000  # above any pid_max, so never alive


def _save_version(path, v: int, n: int = 64):
    return ckpt.save_snapshot(
        path, config={"version": v}, model={"w": torch.full((n,), float(v))},
        ema={"w": torch.full((n,), v + 0.5)},
        optimizer={"state": {0: {"step": torch.tensor(float(v)), "exp_avg": torch.full((n,), -float(v))}},
                   "param_groups": [{"lr": 0.1, "betas": (0.9, 0.99), "params": [0]}]},
        extra_state={"version": v})


def _assert_is_version(snap, v: int | None = None) -> int:
    """The snapshot is internally consistent: every file comes from the same save."""
    version = snap.config["version"]
    assert v is None or version == v
    assert snap.extra_state == {"version": version}
    assert torch.all(snap.model["w"] == version) and torch.all(snap.ema["w"] == version + 0.5)
    assert float(snap.optimizer["state"][0]["step"]) == version
    assert torch.all(snap.optimizer["state"][0]["exp_avg"] == -version)
    return version


def _hidden(parent):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_replace_leaves_no_temp_and_new_content(tmp_path):
    target = tmp_path / ckpt.snapshot_name(1)
    _save_version(target, 1)
    _save_version(target, 2)
    _assert_is_version(ckpt.load_snapshot(target), 2)
    assert _hidden(tmp_path) == []


def test_list_and_latest_skip_temp_and_incomplete(tmp_path):
    for step in (3, 10, 1_000_000):
        _save_version(tmp_path / ckpt.snapshot_name(step), step)
    partial = tmp_path / ".tmp-snapshot-000020-123"
    partial.mkdir()
    (partial / "config.json").write_text("{}")
    no_marker = _save_version(tmp_path / ckpt.snapshot_name(15), 15)
    (no_marker / "COMPLETE").unlink()
    truncated = _save_version(tmp_path / ckpt.snapshot_name(12), 12)
    (truncated / "model.safetensors").write_bytes(b"\0" * 10)
    (tmp_path / "snapshot-000030").write_text("a file, not a folder")
    (tmp_path / "notes").mkdir()
    names = [p.name for p in ckpt.list_snapshots(tmp_path)]
    assert names == ["snapshot-000003", "snapshot-000010", "snapshot-1000000"]
    assert ckpt.latest_snapshot(tmp_path) == tmp_path / "snapshot-1000000"
    assert ckpt.latest_snapshot(tmp_path / "missing") is None and ckpt.list_snapshots(tmp_path / "x") == []


def test_crash_between_renames_is_recovered(tmp_path):
    """State right after `rename(target, .old-)` and before `rename(.tmp-, target)`."""
    target = tmp_path / ckpt.snapshot_name(5)
    _save_version(target, 1)
    os.rename(target, tmp_path / f".old-{target.name}-{DEAD_PID}")
    assert ckpt.resolve_snapshot(target) == tmp_path / f".old-{target.name}-{DEAD_PID}"
    assert ckpt.list_snapshots(tmp_path) == [target]
    _assert_is_version(ckpt.load_snapshot(target), 1)
    cut = _save_version(tmp_path / "cut", 9)  # a newer copy whose writer died mid-file: ignored
    (cut / "model.safetensors").write_bytes((cut / "model.safetensors").read_bytes()[:-8])
    os.rename(cut, tmp_path / f".tmp-{target.name}-{DEAD_PID - 2}")
    _assert_is_version(ckpt.load_snapshot(target), 1)
    newer = _save_version(tmp_path / "scratch", 2)
    os.rename(newer, tmp_path / f".tmp-{target.name}-{DEAD_PID - 1}")
    _assert_is_version(ckpt.load_snapshot(target), 2)  # the newest complete copy wins
    assert ckpt.latest_snapshot(tmp_path) == target
    _save_version(target, 3)  # the next save cleans the dead writer's leftovers
    _assert_is_version(ckpt.load_snapshot(target), 3)
    assert _hidden(tmp_path) == []


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def _eacces(*args, **kwargs):
    raise PermissionError(errno.EACCES, "Permission denied")


@pytest.mark.parametrize("where", ["fsync", "rename", "mkdir"])
def test_failed_save_keeps_previous_snapshot(tmp_path, monkeypatch, where):
    outdir = tmp_path / "out"
    target = outdir / ckpt.snapshot_name(7)
    _save_version(target, 1)
    real_rename = os.rename
    if where == "fsync":
        monkeypatch.setattr(os, "fsync", _enospc)
    elif where == "mkdir":
        monkeypatch.setattr(os, "mkdir", _eacces)
    else:  # the old snapshot is already moved aside when the second rename fails
        monkeypatch.setattr(os, "rename", lambda a, b: _enospc() if ".tmp-" in str(a) else real_rename(a, b))
    with pytest.raises(AmbientInputError) as info:
        _save_version(target, 2)
    msg = str(info.value)
    assert "\n" not in msg and str(outdir) in msg
    assert ("not writable" if where == "mkdir" else "no space left") in msg
    monkeypatch.undo()
    _assert_is_version(ckpt.load_snapshot(target), 1)
    assert _hidden(outdir) == [] and ckpt.list_snapshots(outdir) == [target]


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root ignores permissions")
def test_read_only_outdir(tmp_path):
    _save_version(tmp_path / "snap", 1)
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(AmbientInputError, match="not writable"):
            _save_version(tmp_path / "snap", 2)
    finally:
        tmp_path.chmod(0o700)
    _assert_is_version(ckpt.load_snapshot(tmp_path / "snap"), 1)


# A fork server: imports torch once, then forks one writer per line it reads; each writer saves
# versions first, first+1, ... to the same snapshot name until the test SIGKILLs it.
_SERVER = """
import os, sys, torch
from ambient.store.snapshots import save_snapshot
path = sys.argv[1]
for line in sys.stdin:
    pid = os.fork()
    if pid == 0:
        torch.set_num_threads(1)
        os.write(1, f"pid {os.getpid()}\\n".encode())  # one write: a SIGKILL cannot cut a line in two
        v, n = int(line), 400_000
        while True:
            save_snapshot(path, config={"version": v}, model={"w": torch.full((n,), float(v))},
                          ema={"w": torch.full((n,), v + 0.5)},
                          optimizer={"state": {0: {"step": torch.tensor(float(v)),
                                                   "exp_avg": torch.full((n,), -float(v))}},
                                     "param_groups": [{"lr": 0.1, "betas": (0.9, 0.99), "params": [0]}]},
                          extra_state={"version": v})
            os.write(1, f"{v}\\n".encode())
            v += 1
    os.waitpid(pid, 0)
    print("reaped", flush=True)
"""


def test_sigkill_during_saves_leaves_a_complete_snapshot(tmp_path):
    script = tmp_path / "server.py"
    script.write_text(_SERVER)
    outdir = tmp_path / "out"
    target = outdir / ckpt.snapshot_name(1)
    rng = random.Random(0)
    server = subprocess.Popen([sys.executable, str(script), str(target)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    previous, cut_mid_save = None, 0
    try:
        for iteration in range(12):
            first = iteration * 1000
            server.stdin.write(f"{first}\n")
            server.stdin.flush()
            tag, pid = server.stdout.readline().split()
            assert tag == "pid"
            if previous is None:  # the very first writer must finish one save before it dies
                assert server.stdout.readline().strip() == str(first)
            time.sleep(rng.uniform(0.0, 0.25))
            os.kill(int(pid), signal.SIGKILL)
            printed = []
            while (line := server.stdout.readline().strip()) != "reaped":
                printed.append(int(line))
            cut_mid_save += any(p.name.startswith(".tmp-") for p in outdir.iterdir())
            version = _assert_is_version(ckpt.load_snapshot(target))
            finished = [first + k for k in range(len(printed) + 2)]  # + the save cut after its rename
            assert version in finished + [previous], (version, printed, previous)
            assert ckpt.latest_snapshot(outdir) == target
            previous = version
    finally:
        server.stdin.close()
        server.kill()
        server.wait()
        server.stdout.close()
    assert cut_mid_save >= 3  # the kills really hit saves in progress
