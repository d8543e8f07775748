"""torchrun with 2 processes (gloo on CPU) trains, resumes and samples exactly like 1 process."""

import json
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
from ambient.cli import main
from ambient.errors import AmbientInputError
from ambient.io import read_jsonl
from ambient.learners.train import train
from ambient.learners.train_config import TrainConfig
from ambient.store.snapshots import list_snapshots, load_snapshot
from tests.helpers_data import write_npz

# 8 images per step, 24 images: steps cross an epoch boundary; augment and Ã are drawn per step.
FLAGS = dict(arch="tiny", corruption_probability=0.5, delta_probability=0.2, batch=8, snapshot_kimg=0.016,
             tick_kimg=0.008, grid_samples=0, lr=2e-3, lr_warmup_kimg=0.0, augment=0.5, seed=3,
             lr_schedule="constant")  # a 0.024-kimg run is compared with a 0.04-kimg one: cosine would end earlier


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", AMBIENT_QUIET="1")
    return env


def torchrun(args: list[str], cwd, nproc: int = 2, timeout: int = 240,
             extra_env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", "-m", "ambient", *args]
    return subprocess.run(cmd, cwd=cwd, env={**_env(), **(extra_env or {})}, capture_output=True, text=True,
                          timeout=timeout)


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


def assert_same_snapshot(a_dir, b_dir, atol=1e-5):
    # float sums in another order (all-reduce vs one process); Adam's first steps, ~lr·g/|g|, turn such
    # differences on near-zero gradients into up to ~1e-5 (seen with the pixel loss weighting: 7.6e-6)
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
    args = ["sample", "--model", model, "--num-images", "5", "--steps", "3", "--num-masks", "2", "--batch", "2"]
    # --num-images, not --num: torchrun's parser would take "--num" for an abbreviation of its "--numa-binding"
    proc = torchrun([*args, "--out", str(root / "two.npz")], cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("wrote 5 images") == 1  # rank 0 writes
    assert proc.stderr.count("sampling:   0%") == 1  # one progress bar: rank 0's
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


def test_shard_and_gather_in_one_process():
    """One process does every item; the rows come back in item order with the work's extra."""
    seen = []

    def work(idx):
        seen.append(idx)
        return torch.tensor(idx, dtype=torch.float64)[:, None] * 2, len(idx)

    out, extras = dist_utils.shard_and_gather(5, work, dist_utils.DistEnv())
    assert seen == [[0, 1, 2, 3, 4]] and extras == [5]
    assert out.dtype == torch.float64 and out[:, 0].tolist() == [0, 2, 4, 6, 8]


def _weights_or_none():
    from ambient.metrics import inception as inc

    try:
        return inc.find_inception_weights(download=False)
    except AmbientInputError:
        return None


@pytest.fixture(scope="module")
def eval_sets(tmp_path_factory):
    """7 'samples' (uneven split: 3 + 4 images per rank) and 6 'reference' images, 16 x 16 RGB."""
    root = tmp_path_factory.mktemp("ddp-eval")
    return root, str(write_npz(root / "a.npz", n=7, size=16, channels=3, seed=1)), \
        str(write_npz(root / "b.npz", n=6, size=16, channels=3, seed=2))


def _run_cli(args) -> None:
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 0


def test_two_process_neighbors_match_one_process(eval_sets):
    root, a, b = eval_sets
    base = ["neighbors", "--samples", a, "--train", b, "--features", "pixels", "--k", "2", "--no-cache",
            "--device", "cpu"]
    proc = torchrun([*base, "--out", str(root / "nn2")], cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("max similarity (mean)") == 1  # only rank 0 prints
    _run_cli([*base, "--out", str(root / "nn1")])
    one = json.loads((root / "nn1" / "neighbors.json").read_text())
    two = json.loads((root / "nn2" / "neighbors.json").read_text())
    assert [r["neighbors"] for r in two["samples"]] == [r["neighbors"] for r in one["samples"]]
    np.testing.assert_allclose([r["similarities"] for r in two["samples"]],
                               [r["similarities"] for r in one["samples"]], rtol=1e-6)


@pytest.mark.slow
@pytest.mark.skipif(_weights_or_none() is None, reason="Inception weights absent")
def test_two_process_eval_fid_and_ref_match_one_process(eval_sets, tmp_path):
    root, a, b = eval_sets
    cache = tmp_path / "cache"
    env = {"AMBIENT_CACHE": str(cache)}
    # FID/KID with a cold cache: the two ranks featurise 3 + 4 and 3 + 3 images; rank 0 writes the cache
    fid2 = torchrun(["eval", "fid", "--samples", a, "--ref", b, "--json", str(tmp_path / "two.json"),
                     "--kid-subset-size", "5", "--device", "cpu"], cwd=root, extra_env=env)
    assert fid2.returncode == 0, fid2.stderr[-3000:]
    assert fid2.stdout.count("FID") == 1
    assert "samples:" in fid2.stderr  # rank 0's featurisation progress bar
    assert len(list((cache / "features").glob("*.npz"))) == 2
    ref2 = torchrun(["eval", "ref", "--data", a, "--out", str(tmp_path / "ref2.npz"), "--no-cache",
                     "--device", "cpu"], cwd=root, extra_env=env)
    assert ref2.returncode == 0, ref2.stderr[-3000:]
    _run_cli(["eval", "fid", "--samples", a, "--ref", b, "--json", str(tmp_path / "one.json"),
              "--kid-subset-size", "5", "--no-cache", "--device", "cpu"])
    _run_cli(["eval", "ref", "--data", a, "--out", str(tmp_path / "ref1.npz"), "--no-cache", "--device", "cpu"])
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert (two["num_samples"], two["num_ref"]) == (one["num_samples"], one["num_ref"]) == (7, 6)
    np.testing.assert_allclose(two["fid"], one["fid"], rtol=1e-3)
    np.testing.assert_allclose(two["kid"], one["kid"], rtol=1e-3, atol=1e-6)
    with np.load(tmp_path / "ref1.npz") as r1, np.load(tmp_path / "ref2.npz") as r2:
        np.testing.assert_allclose(r2["features"], r1["features"], rtol=1e-4, atol=1e-5)  # in image order
        np.testing.assert_allclose(r2["mu"], r1["mu"], rtol=1e-4, atol=1e-6)
    # warm cache: every rank learns of rank 0's hit and nobody featurises again
    again = torchrun(["eval", "fid", "--samples", a, "--ref", b, "--kid-subset-size", "5", "--device", "cpu"],
                     cwd=root, extra_env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "samples:" not in again.stderr  # no featurisation progress bar


def _gather_with_one_failing_rank(rank: int, port: int, failing: int, results) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        env = dist_utils.DistEnv(rank=rank, world_size=2)

        def work(mine):
            if rank == failing:
                raise AmbientInputError(f"rank {rank} cannot do {mine}")
            return torch.tensor(mine, dtype=torch.float32)[:, None], rank

        try:
            dist_utils.shard_and_gather(5, work, env)
            results[rank] = "returned"
        except AmbientInputError as exc:
            results[rank] = str(exc)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("failing", [0, 1])
def test_a_rank_that_fails_in_shard_and_gather_stops_every_rank(failing):
    """One rank raising (e.g. SamplingDiverged in restore) must not leave the others waiting in the gather."""
    import torch.multiprocessing as mp

    with mp.Manager() as manager:
        results = manager.dict()
        ctx = mp.spawn(_gather_with_one_failing_rank, args=(_free_port(), failing, results), nprocs=2,
                       join=False)
        for proc in ctx.processes:
            proc.join(timeout=120)
        hung = [p.pid for p in ctx.processes if p.is_alive()]
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
        assert not hung, "a rank is still waiting"
        expected = f"rank {failing} cannot do {[0, 2, 4] if failing == 0 else [1, 3]}"
        assert dict(results) == {0: expected, 1: expected}
