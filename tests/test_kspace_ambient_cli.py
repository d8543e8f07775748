"""`ambient train / sample / restore` with k-space measurements (issue 25 item 4a from the command line): the round
trip on 8×8 data, flags that do not apply refused in one line with nothing written, folders of other kinds."""

import json

import numpy as np
import pytest

from ambient.folders import KSPACE_AMBIENT_RUN, folder_kind
from tests.helpers_cli import run
from tests.helpers_data import write_npz

KSPACE = ["--operator", "kspace", "--acceleration", "2", "--center-fraction", "0.25"]
TINY = ["--batch", "8", "--kimg", "0.016", "--device", "cpu"]


def files_under(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Images, their k-space and blur measurements, a noise-only file, a k-space ambient run and a train run."""
    root = tmp_path_factory.mktemp("kspace_cli")
    from ambient.cli import main

    def cli(argv):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 0, argv

    images = str(write_npz(root / "images.npz", n=12, size=8))
    cli(["measure", "--data", images, *KSPACE, "--out", str(root / "k.npz")])
    cli(["measure", "--data", images, "--operator", "blur", "--blur-sigma", "1", "--out", str(root / "blur.npz")])
    cli(["measure", "--data", images, "--operator", "mask", "--probability", "0", "--sigma-y", "10",
         "--out", str(root / "noisy.npz")])
    cli(["train", "--data", str(root / "k.npz"), "--outdir", str(root / "run"), "--delta-probability", "0.5",
         "--arch", "tiny", *TINY])
    cli(["train", "--data", images, "--outdir", str(root / "train-run"), "--arch", "tiny", "--kimg", "0.008",
         "--batch", "8", "--snapshot-kimg", "0.008", "--grid-samples", "0", "--no-progress", "--device", "cpu"])
    return root


def test_train_sample_restore_round_trip(setup, tmp_path, capsys):
    root = setup
    code, out, _ = run(["train", "--data", str(root / "k.npz"), "--outdir", str(tmp_path / "dry"),
                        "--delta-probability", "0.7", "--dry-run"], capsys)
    resolved = json.loads(out)
    assert code == 0 and not (tmp_path / "dry").exists()
    assert resolved["corruption_probability"] == 0.7 and resolved["arch"] == "tiny" and resolved["batch"] == 32
    assert resolved["data_facts"]["observations"] == 12

    run_dir = root / "run"
    assert folder_kind(run_dir) == KSPACE_AMBIENT_RUN
    meta = json.loads((run_dir / "config.json").read_text())
    assert meta["config"]["corruption_probability"] == 0.5 and meta["config"]["batch"] == 8

    code, out, err = run(["sample", "--model", str(run_dir), "--seeds", "0-2", "--steps", "2", "--batch", "2",
                          "--out", str(tmp_path / "s.npz")], capsys)
    assert code == 0, err
    with np.load(tmp_path / "s.npz") as z:
        assert z["images"].shape == (3, 8, 8, 1) and z["images"].dtype == np.float32
        assert z["images_uint8"].shape == (3, 8, 8, 1) and list(z["value_range"]) == [0.0, 255.0]
        first = z["images"][:2].copy()
    code, _, err = run(["sample", "--model", str(run_dir), "--seeds", "0-1", "--steps", "2", "--batch", "1",
                        "--out", str(tmp_path / "s1.npz")], capsys)
    with np.load(tmp_path / "s1.npz") as z:  # a seed gives the same sample at any batch size (float32 round-off:
        np.testing.assert_allclose(z["images"], first, atol=1e-4 * np.abs(first).max())  # untrained, so large)

    code, out, err = run(["restore", "--model", str(run_dir), "--data", str(root / "k.npz"), "--max-size", "5",
                          "--out", str(tmp_path / "r.npz")], capsys)
    assert code == 0, err
    assert "σ_min = 0.002" in out and "data consistency" in out
    with np.load(tmp_path / "r.npz") as z:
        assert z["images"].shape == (5, 8, 8, 1) and z["images_float"].shape == (5, 8, 8, 1)
        assert list(z["index"]) == [0, 1, 2, 3, 4] and list(z["value_range"]) == [0.0, 255.0]
        assert (z["data_consistency"] < 1e-4).all()  # acquired lines replaced by y
    assert (tmp_path / "r_grid.png").is_file()
    code, out, err = run(["restore", "--model", str(run_dir), "--data", str(root / "k.npz"), "--sigma", "0.5",
                          "--out", str(tmp_path / "r2.npz")], capsys)
    assert code == 0 and "σ = 0.5" in out, err


@pytest.mark.parametrize("flags, names", [
    (["--corruption-probability", "0.3"], "--corruption-probability"),
    (["--objective", "naive"], "--objective"),
    (["--snapshot-kimg", "1"], "--snapshot-kimg"),
    (["--resume"], "--resume"),
    (["--init", "elsewhere"], "--init"),
    (["--device", "cuda"], "--device"),
    (["--delta-probability", "0"], "--delta-probability"),
    (["--kimg", "inf"], "--kimg"),
    (["--arch", "ddpmpp-cifar"], "--arch"),
])
def test_train_refuses_flags_that_do_not_apply(setup, tmp_path, capsys, flags, names):
    code, out, err = run(["train", "--data", str(setup / "k.npz"), "--outdir", str(tmp_path / "out"), *flags],
                         capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"error: {names}"), err
    assert not (tmp_path / "out").exists() and out == ""


def test_train_refuses_other_measurements_and_keeps_noisy(setup, tmp_path, capsys):
    code, _, err = run(["train", "--data", str(setup / "blur.npz"), "--outdir", str(tmp_path / "b")], capsys)
    assert code == 2 and "blur measurements" in err and "ambient em" in err and not (tmp_path / "b").exists()
    code, _, err = run(["train", "--data", str(setup / "noisy.npz"), "--outdir", str(tmp_path / "n")], capsys)
    assert code == 2 and "--objective noisy" in err and not (tmp_path / "n").exists()
    code, out, err = run(["train", "--data", str(setup / "noisy.npz"), "--outdir", str(tmp_path / "n"),
                          "--objective", "noisy", "--noise-sigma", "10", "--dry-run"], capsys)
    assert code == 0 and json.loads(out)["objective"] == "noisy", err  # the noise-only path is unchanged


def test_folders_of_other_kinds_are_refused(setup, tmp_path, capsys):
    root = setup
    before = {name: files_under(root / name) for name in ("run", "train-run")}
    k, images = str(root / "k.npz"), str(root / "images.npz")
    cases = [
        (["train", "--data", k, "--outdir", str(root / "run"), *TINY], "--outdir", "does not resume"),
        (["train", "--data", k, "--outdir", str(root / "train-run"), *TINY], "--outdir", "is a train run"),
        (["train", "--data", images, "--outdir", str(root / "run"), "--arch", "tiny", "--kimg", "0.008"], "--outdir",
         "k-space ambient run"),
        (["train", "--data", images, "--outdir", str(tmp_path / "t"), "--init", str(root / "run")], "--init",
         "k-space ambient run"),
        (["em", "--data", k, "--outdir", str(root / "run")], "--outdir", "k-space ambient run"),
        (["sample", "--model", str(root / "run"), "--num-images", "2", "--out", str(tmp_path / "s.npz"),
          "--num-masks", "2"], "--num-masks", "does not apply"),
        (["sample", "--model", str(root / "run"), "--num-images", "2", "--out", str(tmp_path / "s.npz"),
          "--device", "cuda"], "--device", "CPU"),
        (["restore", "--model", str(root / "run"), "--data", k, "--out", str(tmp_path / "r.npz"), "--method", "dps"],
         "--method", "does not apply"),
        (["restore", "--model", str(root / "run"), "--data", str(root / "blur.npz"), "--out", str(tmp_path / "r.npz")],
         "--data", "single-coil k-space only"),
        (["restore", "--model", str(root / "run"), "--data", images, "--out", str(tmp_path / "r.npz")], "--data",
         "k-space measurements"),
        (["restore", "--model", str(root / "train-run"), "--data", k, "--out", str(tmp_path / "r.npz"),
          "--sigma", "0.5"], "--sigma", "only for a k-space ambient"),
    ]
    for argv, flag, words in cases:
        code, _, err = run(argv, capsys)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and flag in lines[0] and words in lines[0], (argv, err)
    assert {name: files_under(root / name) for name in ("run", "train-run")} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_restore_refuses_measurements_of_another_size(setup, tmp_path, capsys):
    root = setup
    from ambient.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["measure", "--data", str(write_npz(tmp_path / "big.npz", n=3, size=12)), *KSPACE,
              "--out", str(tmp_path / "k12.npz")])
    assert exc.value.code == 0
    out = tmp_path / "r.npz"
    code, _, err = run(["restore", "--model", str(root / "run"), "--data", str(tmp_path / "k12.npz"),
                        "--out", str(out)], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "--data" in lines[0] and "12x12" in lines[0], err
    assert "was trained on 8x8" in lines[0] and not out.exists()
