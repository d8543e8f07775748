"""Run folders written by an earlier version of this code still load, sample and resume.

The folders under tests/fixtures/folders/runs were made once by ``tests/fixtures/folders/make.py`` (the
commit is in expected.json) and are never rewritten to make a test pass: they stand for the folders users
already have. Each test copies its folder to a temporary place first (a test never writes into them).

* loading: the EMA weights hash to the same SHA-256 (reading safetensors is exact on any machine);
* sampling: 4 seeds, 4 Heun steps, compared with the images sampled when the folder was made, within
  1e-4 (not bit for bit: BLAS blocking and SIMD paths differ between CPUs);
* resuming: train, em and finetune continue a few steps; the weights reached are compared with those the
  maker reached. Adam turns reduction-order noise on near-zero gradients into steps of up to lr, so the
  check is that almost every weight agrees to 1e-5 and none differs by more than a few learning rates.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from ambient.cli import main
from ambient.sampling.generate import sample_model
from ambient.store.models import load_model
from tests.fixtures.folders.make import (
    DATA,
    EM,
    EM_RESUME_LAPS,
    FINETUNE,
    FINETUNE_RESUME_STEPS,
    REPO,
    TRAIN,
    TRAIN_RESUME_KIMG,
    weights_sha256,
)

HERE = Path(__file__).parent / "fixtures" / "folders"
RUNS = HERE / "runs"
EXPECTED = json.loads((HERE / "expected.json").read_text())
ARRAYS = np.load(HERE / "expected.npz")
KINDS = ("train", "em", "finetune", "imported")


def copy_of(name: str, tmp_path: Path) -> Path:
    dst = tmp_path / name
    shutil.copytree(RUNS / name, dst)
    return dst


def run_cli(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code in (0, None), f"ambient {' '.join(argv)} exited with {exc.value.code}"


@pytest.mark.parametrize("name", KINDS)
def test_fixture_folder_loads_with_the_same_weights_and_samples(tmp_path, name):
    loaded = load_model(copy_of(name, tmp_path))
    want = EXPECTED["folders"][name]
    assert weights_sha256(loaded.denoiser.state_dict()) == want["ema_sha256"]
    assert list(loaded.image_shape) == want["image_shape"]
    images = sample_model(loaded, EXPECTED["seeds"], num_steps=EXPECTED["steps"]).numpy()
    np.testing.assert_allclose(images, ARRAYS[f"{name}_samples"], rtol=0, atol=1e-4)


def _flat(path: Path) -> np.ndarray:
    state = load_model(path).denoiser.state_dict()
    return np.concatenate([state[k].detach().reshape(-1).numpy() for k in sorted(state)])


def _assert_close_after_adam(got: np.ndarray, want: np.ndarray, lr: float, steps: int) -> None:
    diff = np.abs(got - want)
    assert got.shape == want.shape
    assert np.mean(diff <= 1e-5) >= 0.99, f"{np.mean(diff > 1e-5):.3%} of the weights moved away"
    assert diff.max() <= 2 * lr * steps, diff.max()


def _with(args: list[str], flag: str, value: str) -> list[str]:
    out = list(args)
    out[out.index(flag) + 1] = value
    return out


def test_train_fixture_resumes(tmp_path, monkeypatch):
    out = copy_of("train", tmp_path)
    monkeypatch.chdir(REPO)  # the run recorded --data relative to the repository
    run_cli(["train", "--data", str(DATA["train"]), "--outdir", str(out), *_with(TRAIN, "--kimg", TRAIN_RESUME_KIMG),
             "--resume"])
    assert (out / "snapshot-000006").is_dir()
    _assert_close_after_adam(_flat(out), ARRAYS["train_resumed"], lr=1e-3, steps=2)


def test_em_fixture_resumes_to_a_second_lap(tmp_path, monkeypatch):
    out = copy_of("em", tmp_path)
    monkeypatch.chdir(REPO)
    run_cli(["em", "--data", str(DATA["em"]), "--outdir", str(out), *_with(EM, "--laps", EM_RESUME_LAPS)])
    assert (out / "lap-01").is_dir()
    _assert_close_after_adam(_flat(out), ARRAYS["em_resumed"], lr=1e-3, steps=4)


def test_finetune_fixture_resumes(tmp_path, monkeypatch):
    out = copy_of("finetune", tmp_path)
    monkeypatch.chdir(REPO)
    pre = (RUNS / "finetune-pretrained").relative_to(REPO)
    run_cli(["finetune", "--pretrained", str(pre), "--data", str(DATA["finetune"]), "--outdir", str(out),
             *_with(FINETUNE, "--steps", FINETUNE_RESUME_STEPS)])
    assert json.loads((out / "config.json").read_text())["kind"] == "finetune"
    _assert_close_after_adam(_flat(out), ARRAYS["finetune_resumed"], lr=1e-3, steps=2)


def test_fixture_folders_are_the_committed_ones():
    """The maker's commit is recorded, and no test run left anything inside the fixture folders."""
    assert len(EXPECTED["commit"]) == 40
    assert not (HERE / "_scratch").exists()
    names = {p.name for p in RUNS.iterdir()}
    assert names == {*KINDS, "finetune-pretrained", "train-data.npz", "em-data.npz", "finetune-data.npz"}
