"""torchrun with 2 processes (gloo on CPU) trains, resumes and samples exactly like 1 process."""

import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist

from ambient import distributed as dist_utils
from ambient.checkpoint import list_snapshots, load_snapshot, read_jsonl
from ambient.cli import main
from ambient.config import TrainConfig
from ambient.errors import AmbientInputError
from ambient.train import train
from tests.helpers_data import write_npz

# 8 images per step, 24 images: steps cross an epoch boundary; augment and Ã are drawn per step.
FLAGS = dict(arch="tiny", corruption_probability=0.5, delta_probability=0.2, batch=8, snapshot_kimg=0.016,
             tick_kimg=0.008, grid_samples=0, lr=2e-3, lr_warmup_kimg=0.0, augment=0.5, seed=3)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", AMBIENT_QUIET="1")
    return env


def torchrun(args: list[str], cwd, nproc: int = 2, timeout: int = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", "-m", "ambient", *args]
    return subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)


def train_flags(**cfg) -> list[str]:
    out = []
    for key, value in cfg.items():
        out += [f"--{key.replace('_', '-')}", str(value)]
    return out + ["--no-progress"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 1-process reference run (5 steps, snapshots at steps 2, 4, 5) and a fresh 2-process run (3 steps)."""
    root = tmp_path_factory.mktemp("ddp")
    npz = str(write_npz(root / "tiny.npz", n=24))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same reduction order as the 1-thread torchrun workers
    try:
        train(TrainConfig(data=npz, outdir=str(root / "single"), kimg=0.04, **FLAGS), progress=False)
    finally:
        torch.set_num_threads(threads)
    proc = torchrun(["train", *train_flags(data=npz, outdir=root / "ddp", kimg=0.024, **FLAGS)], cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, npz


def assert_same_snapshot(a_dir, b_dir, atol=2e-6):
    a, b = load_snapshot(a_dir), load_snapshot(b_dir)
    assert a.extra_state["nimg"] == b.extra_state["nimg"]
    for key in a.model:
        torch.testing.assert_close(b.model[key], a.model[key], atol=atol, rtol=1e-5, msg=key)
        torch.testing.assert_close(b.ema[key], a.ema[key], atol=atol, rtol=1e-5, msg=key)


def max_change(a_dir, b_dir) -> float:
    a, b = load_snapshot(a_dir), load_snapshot(b_dir)
    return max(float((a.model[k] - b.model[k]).abs().max()) for k in a.model)


def test_two_processes_match_one_process(runs):
    root, _ = runs
    single, ddp = root / "single", root / "ddp"
    # only rank 0 writes: one snapshot per interval, one stats row per tick
    assert [p.name for p in list_snapshots(ddp)] == ["snapshot-000002", "snapshot-000003"]
    assert_same_snapshot(single / "snapshot-000002", ddp / "snapshot-000002")
    # the comparison is meaningful: training moved the weights far more than the tolerance
    assert max_change(single / "snapshot-000002", single / "snapshot-000004") > 1e-3
    losses_1 = [r["loss"] for r in read_jsonl(single / "stats.jsonl")]
    losses_2 = [r["loss"] for r in read_jsonl(ddp / "stats.jsonl")]
    assert len(losses_2) == 3
    np.testing.assert_allclose(losses_2, losses_1[:3], rtol=1e-5)
    # optimizer state matches too, so resuming under either world size continues the same run
    a = load_snapshot(single / "snapshot-000002").optimizer
    b = load_snapshot(ddp / "snapshot-000002").optimizer
    for k, st in a["state"].items():
        torch.testing.assert_close(b["state"][k]["exp_avg_sq"], st["exp_avg_sq"], atol=1e-9, rtol=1e-4)


@pytest.mark.slow
def test_resume_under_torchrun_continues_the_same_run(runs):
    root, npz = runs
    out = root / "ddp-resumed"
    shutil.copytree(root / "ddp", out)
    proc = torchrun(["train", *train_flags(data=npz, outdir=out, kimg=0.04, **FLAGS)], cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming from" in proc.stderr and proc.stderr.count("resuming from") == 1  # rank 0 logs
    assert_same_snapshot(root / "single" / "snapshot-000004", out / "snapshot-000004")
    assert_same_snapshot(root / "single" / "snapshot-000005", out / "snapshot-000005")
    losses_1 = [r["loss"] for r in read_jsonl(root / "single" / "stats.jsonl")]
    losses_2 = [r["loss"] for r in read_jsonl(out / "stats.jsonl")]
    np.testing.assert_allclose(losses_2, losses_1, rtol=1e-5)


@pytest.mark.slow
def test_two_process_sampling_gives_the_same_images(runs, capsys):
    root, _ = runs
    model = str(root / "single")
    args = ["sample", "--model", model, "--num", "5", "--steps", "3", "--num-masks", "2", "--batch", "2"]
    # "--" ends torchrun's own flags: its parser would take "--num" for an abbreviation of "--numa-binding"
    proc = torchrun(["--", *args, "--out", str(root / "two.npz")], cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("wrote 5 images") == 1  # rank 0 writes
    with pytest.raises(SystemExit) as exc:
        main([*args, "--out", str(root / "one.npz")])
    assert exc.value.code == 0
    one = np.load(root / "one.npz")["images"].astype(int)
    two = np.load(root / "two.npz")["images"].astype(int)
    assert one.shape == two.shape == (5, 8, 8, 1)
    assert np.abs(one - two).max() <= 1  # uint8 rounding at most; a wrong seed order would differ a lot
    assert np.abs(one[1:] - one[:-1]).max() > 20


def test_batch_not_divisible_by_world_size_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    npz = str(write_npz(tmp_path / "tiny.npz", n=8))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(SystemExit) as exc:
        main(["train", "--data", npz, "--outdir", str(tmp_path / "x"), "--arch", "tiny", "--batch", "7",
              "--no-progress"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --batch 7") and "world size 2" in err[0]
    assert not dist.is_initialized()  # checked before joining a process group
    assert not (tmp_path / "x").exists()


def test_batch_not_divisible_under_torchrun(tmp_path):
    npz = str(write_npz(tmp_path / "tiny.npz", n=8))
    proc = torchrun(["train", "--data", npz, "--outdir", str(tmp_path / "x"), "--arch", "tiny", "--batch", "5",
                     "--no-progress"], cwd=tmp_path, timeout=120)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    # each worker prints one line and exits 2 (torchrun may stop the other first); torchrun then fails
    assert errors and set(errors) == {"error: --batch 5 is not divisible by the world size 2"}
    assert "exitcode  : 2" in proc.stderr


def test_env_helpers(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert dist_utils.world_size_from_env() == 1
    assert dist_utils.init_from_env("cpu") == dist_utils.DistEnv()
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(AmbientInputError, match="WORLD_SIZE"):
        dist_utils.world_size_from_env()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(AmbientInputError, match="RANK"):
        dist_utils.init_from_env("cpu")
    shares = [dist_utils.shard(list(range(7)), dist_utils.DistEnv(rank=r, world_size=3)) for r in range(3)]
    assert sorted(sum(shares, [])) == list(range(7)) and shares[0] == [0, 3, 6]
