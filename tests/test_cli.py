"""CLI on tiny data: train → sample → resume, data with masks, and the bad-input catalogue."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ambient.cli import main
from tests.helpers_data import blobs, write_folder, write_npz

TINY = ["--arch", "tiny", "--batch", "8", "--snapshot-kimg", "0.016", "--tick-kimg", "0.008",
        "--grid-samples", "4", "--no-progress"]


def run(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    captured = capsys.readouterr()
    return exc.value.code, captured.out, captured.err


def test_module_entry_point_prints_version():
    out = subprocess.run([sys.executable, "-m", "ambient", "--version"], capture_output=True, text=True, check=True)
    assert "ambient" in out.stdout


def test_train_sample_resume(tmp_path, capsys):
    data = write_npz(tmp_path / "d.npz")
    out = tmp_path / "run"
    code, _, err = run(["train", "--data", str(data), "--outdir", str(out), "--kimg", "0.016",
                        "--corruption_probability", "0.5", "--delta-probability", "0.2", *TINY], capsys)
    assert code == 0, err
    assert (out / "snapshot-000002").is_dir() and (out / "samples-000002.png").is_file()
    code, _, err = run(["train", "--data", str(data), "--outdir", str(out), "--kimg", "0.032",
                        "--corruption-probability", "0.5", "--delta-probability", "0.2", *TINY], capsys)
    assert code == 0, err
    assert "resuming" in err and (out / "snapshot-000004").is_dir()

    npz = tmp_path / "samples.npz"
    code, stdout, err = run(["sample", "--model", str(out), "--num", "3", "--out", str(npz), "--batch", "2",
                             "--steps", "4"], capsys)
    assert code == 0, err
    images = np.load(npz)["images"]
    assert images.shape == (3, 8, 8, 1) and images.dtype == np.uint8
    assert (tmp_path / "samples_grid.png").is_file()
    # a seed gives the same image whatever the batch size; PNG folder output
    folder = tmp_path / "pngs"
    code, _, err = run(["sample", "--model", str(out / "snapshot-000004"), "--num", "3", "--out", str(folder),
                        "--batch", "3", "--steps", "4"], capsys)
    assert code == 0, err
    pngs = sorted(folder.glob("*.png"))
    assert len(pngs) == 3
    # up to one uint8 level: the network's kernels may round differently for another batch shape
    assert np.abs(np.asarray(Image.open(pngs[1])).astype(int) - images[1, ..., 0]).max() <= 1
    # num-masks and guidance run
    code, _, err = run(["sample", "--model", str(out), "--num", "2", "--out", str(tmp_path / "g.npz"),
                        "--steps", "3", "--num-masks", "2", "--guidance-scale", "0.1"], capsys)
    assert code == 0, err


def test_npz_with_masks(tmp_path, capsys):
    rng = np.random.default_rng(0)
    masks = (rng.random((24, 8, 8)) < 0.4).astype(np.uint8)
    data = write_npz(tmp_path / "m.npz", masks=masks)
    code, _, err = run(["train", "--data", str(data), "--outdir", str(tmp_path / "r"), "--kimg", "0.016",
                        *TINY], capsys)
    assert code == 0, err


def test_folder_with_masks(tmp_path, capsys):
    root = write_folder(tmp_path / "data", with_masks=True)
    code, _, err = run(["train", "--data", str(root), "--outdir", str(tmp_path / "r"), "--kimg", "0.016",
                        "--delta-probability", "0.3", *TINY], capsys)
    assert code == 0, err


def test_dry_run_writes_nothing(tmp_path, capsys):
    out = tmp_path / "dry"
    code, stdout, _ = run(["train", "--data", "x.npz", "--outdir", str(out), "--dry-run"], capsys)
    assert code == 0 and '"outdir"' in stdout and not out.exists()


def _mixed_sizes(tmp_path):
    root = write_folder(tmp_path / "mixed", n=3)
    Image.fromarray(np.zeros((9, 9), np.uint8)).save(root / "002.png")
    return root, "002.png"


def _mixed_channels(tmp_path):
    root = write_folder(tmp_path / "chan", n=3)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "001.png")
    return root, "001.png"


def _truncated(tmp_path):
    root = write_folder(tmp_path / "trunc", n=3)
    data = (root / "001.png").read_bytes()
    (root / "001.png").write_bytes(data[: len(data) // 2])
    return root, "001.png"


def _bad_mask_values(tmp_path):
    masks = np.full((24, 8, 8), 2, np.uint8)
    return write_npz(tmp_path / "bm.npz", masks=masks), "bm.npz"


def _bad_mask_shape(tmp_path):
    masks = np.ones((24, 7, 8), np.uint8)
    return write_npz(tmp_path / "bs.npz", masks=masks), "bs.npz"


def _no_images_key(tmp_path):
    np.savez(tmp_path / "noimg.npz", pictures=blobs(4))
    return tmp_path / "noimg.npz", "images"


def _empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    return tmp_path / "empty", "empty"


def _not_images(tmp_path):
    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "a.txt").write_text("hello")
    return tmp_path / "txt", "txt"


@pytest.mark.parametrize("make", [_mixed_sizes, _mixed_channels, _truncated, _bad_mask_values, _bad_mask_shape,
                                  _no_images_key, _empty_folder, _not_images])
def test_bad_data_is_one_line_exit_2_nothing_written(tmp_path, capsys, make):
    data, needle = make(tmp_path)
    out = tmp_path / "out"
    code, _, err = run(["train", "--data", str(data), "--outdir", str(out), "--kimg", "0.016", *TINY], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], err
    assert not out.exists()


@pytest.mark.parametrize("flag,value,needle", [
    ("--corruption-probability", "1.0", "--corruption-probability"),
    ("--corruption-probability", "-0.1", "--corruption-probability"),
    ("--delta-probability", "1.0", "--delta-probability"),
    ("--batch", "0", "--batch"),
    ("--arch", "huge", "--arch"),
])
def test_bad_flags(tmp_path, capsys, flag, value, needle):
    data = write_npz(tmp_path / "d.npz")
    out = tmp_path / "out"
    code, _, err = run(["train", "--data", str(data), "--outdir", str(out), flag, value, "--no-progress"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and needle in err, err
    assert not out.exists()


def test_missing_data_path(tmp_path, capsys):
    code, _, err = run(["train", "--data", str(tmp_path / "nope.npz"), "--outdir", str(tmp_path / "o")], capsys)
    assert code == 2 and "nope.npz" in err and len(err.strip().splitlines()) == 1


def test_unwritable_outdir(tmp_path, capsys):
    data = write_npz(tmp_path / "d.npz")
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code, _, err = run(["train", "--data", str(data), "--outdir", str(blocker), *TINY], capsys)
    assert code == 2 and "--outdir" in err and len(err.strip().splitlines()) == 1
    assert blocker.read_text() == "not a folder"


def test_resume_on_empty_folder_and_sampling_a_non_model(tmp_path, capsys):
    data = write_npz(tmp_path / "d.npz")
    (tmp_path / "empty").mkdir()
    code, _, err = run(["train", "--data", str(data), "--outdir", str(tmp_path / "o"), "--resume",
                        str(tmp_path / "empty"), *TINY], capsys)
    assert code == 2 and "--resume" in err
    code, _, err = run(["sample", "--model", str(tmp_path / "empty"), "--num", "2", "--out",
                        str(tmp_path / "s.npz")], capsys)
    assert code == 2 and "--model" in err and not (tmp_path / "s.npz").exists()


def test_bare_resume_means_the_latest_snapshot_in_outdir(tmp_path, capsys):
    data = write_npz(tmp_path / "d.npz")
    out = tmp_path / "run"
    args = ["train", "--data", str(data), "--outdir", str(out), "--corruption-probability", "0.5", *TINY]
    code, _, err = run([*args, "--kimg", "0.016", "--resume"], capsys)  # nothing to resume yet
    assert code == 2 and "--resume" in err and str(out) in err and len(err.strip().splitlines()) == 1
    assert run([*args, "--kimg", "0.016"], capsys)[0] == 0
    code, _, err = run([args[0], "--resume", *args[1:], "--kimg", "0.032"], capsys)  # bare, mid-command
    assert code == 0, err
    assert f"resuming from {out / 'snapshot-000002'}" in err and (out / "snapshot-000004").is_dir()
    code, _, err = run([*args, "--kimg", "0.048", "--resume", str(out / "snapshot-000002")], capsys)
    assert code == 0 and f"resuming from {out / 'snapshot-000002'}" in err


def test_guidance_needs_two_masks(tmp_path, capsys):
    code, _, err = run(["sample", "--model", str(tmp_path), "--num", "2", "--out", str(tmp_path / "s.npz"),
                        "--guidance-scale", "1"], capsys)
    assert code == 2 and "--guidance-scale" in err and len(err.strip().splitlines()) == 1


def panel_count(png) -> int:
    """Image panels side by side in a labelled figure: runs of columns with non-white pixels below the labels."""
    img = np.asarray(Image.open(png).convert("L"))
    body = img[40:]  # under the two lines of labels
    inked = (body < 250).any(axis=0)
    return int(inked[0]) + int(np.count_nonzero(inked[1:] & ~inked[:-1]))


def no_fashion(tmp_path, monkeypatch):
    import ambient.data.readers as readers

    monkeypatch.setattr(readers, "SYSTEM_FASHION_DIR", tmp_path / "no-such-dir")
    monkeypatch.delenv("AMBIENT_DATA", raising=False)


def test_demo_falls_back_to_digits_with_a_one_line_notice(tmp_path, capsys, monkeypatch):
    from ambient.learners.demo import demo_data

    no_fashion(tmp_path, monkeypatch)
    data, resolution, notice = demo_data("builtin:fashion-mnist", None)
    assert (data, resolution) == ("builtin:digits", 28) and notice.startswith("notice: Fashion-MNIST not found")
    assert demo_data("some.npz", None) == ("some.npz", None, None)  # an explicit --data is never replaced
    out = tmp_path / "demo"
    argv = ["demo", "--outdir", str(out), "--kimg", "0.032", "--arch", "tiny", "--num-samples", "4", "--num-ref", "0",
            "--no-progress"]
    code, stdout, err = run(argv, capsys)
    assert code in (0, None), err
    assert [line for line in err.splitlines() if line.startswith("notice:")] == [notice]
    assert (out / "demo.png").is_file() and "wrote" in stdout and "KID" not in stdout
    for model in ("naive", "ambient"):  # two train runs on the same data, differing only in the objective
        saved = json.loads((out / model / "config.json").read_text())
        assert saved["kind"] == "train-run" and saved["train"]["objective"] == model
        assert saved["data"]["shape"] == [1, 28, 28] and saved["data"]["num_images"] == 1497  # 300 held out
    naive, ambient = (json.loads((out / m / "config.json").read_text())["train"] for m in ("naive", "ambient"))
    assert {k for k in naive if naive[k] != ambient[k]} <= {"objective", "outdir", "loss_weighting"}
    assert json.loads((out / "demo.json").read_text())["kind"] == "demo-run"
    code, _, err = run(argv, capsys)  # again: both runs are done, so it only samples and draws again
    assert code in (0, None), err
    assert err.count("nothing to do") == 2


def test_demo_draws_three_panels_and_prints_the_kid_of_each_model(tmp_path, capsys, monkeypatch):
    from ambient.errors import AmbientInputError
    from ambient.metrics.inception import find_inception_weights

    no_fashion(tmp_path, monkeypatch)
    out = tmp_path / "demo"
    code, stdout, err = run(["demo", "--outdir", str(out), "--kimg", "0.032", "--arch", "tiny", "--num-samples", "6",
                             "--num-ref", "8", "--no-progress"], capsys)
    assert code in (0, None), err
    assert panel_count(out / "demo.png") == 3  # observations | naive samples | ambient samples
    try:
        find_inception_weights(download=False)
    except AmbientInputError:
        assert "notice: Inception weights not found, KID skipped" in err and "KID" not in stdout
        pytest.skip("no Inception weights: KID skipped with a notice, as asserted")
    lines = stdout.splitlines()
    assert lines[0].startswith("KID x10^3 against 8 held-out clean images (builtin:digits), 6 samples per model")
    for line, model in zip(lines[1:3], ("naive", "ambient")):
        name, kid, pm, spread = line.split()
        assert name == model and pm == "+-" and float(kid) == float(kid) and float(spread) >= 0
    result = json.loads((out / "demo.json").read_text())["result"]
    assert set(result["kid"]) == {"naive", "ambient"} and result["num_ref"] == 8


def test_demo_refusals_are_one_line_and_write_nothing(tmp_path, capsys):
    data = write_npz(tmp_path / "d.npz")
    base = ["demo", "--data", str(data), "--kimg", "0.008", "--arch", "tiny", "--no-progress"]
    run_dir = tmp_path / "run"
    code, _, err = run(["train", "--data", str(data), "--outdir", str(run_dir), "--kimg", "0.008", *TINY], capsys)
    assert code == 0, err
    before = sorted(p.name for p in run_dir.rglob("*"))
    cases = [(["--outdir", str(run_dir)], "is a train run"), (["--outdir", str(tmp_path / "new"), "--num-samples", "1"],
                                                             "--num-samples"),
             (["--outdir", str(tmp_path / "new"), "--num-ref", "-1"], "--num-ref"),
             (["--outdir", str(tmp_path / "new"), "--kimg", "nan"], "--kimg")]
    for extra, named in cases:
        code, _, err = run([*base, *extra], capsys)
        assert code == 2 and named in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in run_dir.rglob("*")) == before and not (tmp_path / "new").exists()
    out = tmp_path / "demo"
    code, stdout, err = run([*base, "--outdir", str(out)], capsys)  # data without held-out images: no KID
    assert code in (0, None) and "notice:" in err and "KID skipped" in err and "KID" not in stdout, err
    code, _, err = run(["train", "--data", str(data), "--outdir", str(out), "--kimg", "0.008", *TINY], capsys)
    assert code == 2 and "a demo run" in err and len(err.strip().splitlines()) == 1


def test_readme_commands_are_what_ci_runs():
    """README's two commands are ./dev.sh demo and ./dev.sh test, and .ci/run calls the same test command."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    readme, ci = (root / "README.md").read_text(), (root / ".ci" / "run").read_text()
    assert "```bash\n./dev.sh demo\n```" in readme and "```bash\n./dev.sh test\n```" in readme
    assert "bash ./dev.sh test" in ci.splitlines()[-1]
    bad = subprocess.run(["bash", str(root / "dev.sh"), "bogus"], capture_output=True, text=True)
    assert bad.returncode == 2 and "usage: ./dev.sh demo|test|setup" in bad.stderr


def test_box_law_that_cannot_teach_as_box_is_named_in_dry_run_and_training_log(tmp_path, capsys):
    root = write_folder(tmp_path / "data", n=4)
    box = ["--corruption-pattern", "box", "--corruption-probability", "0.5"]
    code, stdout, _ = run(["train", "--data", str(root), "--outdir", str(tmp_path / "dry"), *box,
                           "--delta-probability", "0.25", "--dry-run"], capsys)
    assert code == 0 and "--delta-probability 0.5" in json.loads(stdout)["unlearnt_pixels"]
    code, stdout, _ = run(["train", "--data", str(root), "--outdir", str(tmp_path / "dry"), *box,
                           "--delta-probability", "0.5", "--dry-run"], capsys)
    assert code == 0 and json.loads(stdout)["unlearnt_pixels"] is None
    code, _, err = run(["train", "--data", str(root), "--outdir", str(tmp_path / "r"), "--kimg", "0.016", *box,
                        "--delta-probability", "0.25", *TINY], capsys)
    assert code == 0 and "warning: box masks" in err


def test_pixel_loss_weighting_needs_the_mask_aware_scalings(tmp_path, capsys):
    root = write_folder(tmp_path / "data", n=4)
    code, _, err = run(["train", "--data", str(root), "--outdir", str(tmp_path / "r"), "--corruption-probability",
                        "0.5", "--loss-weighting", "pixel", "--no-mask-aware", *TINY], capsys)
    assert code == 2 and "--loss-weighting" in err and not (tmp_path / "r").exists()
    code, stdout, _ = run(["train", "--data", str(root), "--outdir", str(tmp_path / "r"), "--corruption-probability",
                           "0.5", "--loss-weighting", "pixel", "--dry-run"], capsys)
    assert code == 0 and json.loads(stdout)["loss_weighting"] == "pixel"


def _as_before_the_option(run: Path, option: str) -> None:
    """Rewrite a train run's configs as a version from before ``option`` wrote them (without it)."""
    for cfg_path in [run / "config.json", *run.glob("snapshot-*/config.json")]:
        saved = json.loads(cfg_path.read_text())
        del saved["train"][option]
        cfg_path.write_text(json.dumps(saved))
        done = cfg_path.parent / "COMPLETE"
        if done.is_file():  # the snapshot's manifest records each file's size
            manifest = json.loads(done.read_text())
            manifest["files"]["config.json"] = cfg_path.stat().st_size
            done.write_text(json.dumps(manifest))


def test_lr_schedule_cosine_decays_to_zero_and_is_kept_on_resume(tmp_path, capsys):
    root = write_folder(tmp_path / "data", n=4)
    out = tmp_path / "r"
    base = ["train", "--data", str(root), "--outdir", str(out), "--corruption-probability", "0.5",
            "--lr-warmup-kimg", "0", *TINY]
    code, _, err = run([*base, "--kimg", "0.032"], capsys)  # the default for a new run: cosine
    assert code == 0, err
    assert json.loads((out / "config.json").read_text())["train"]["lr_schedule"] == "cosine"
    lrs = [r["lr"] for r in map(json.loads, (out / "stats.jsonl").read_text().splitlines()) if "lr" in r]
    assert lrs and all(a >= b for a, b in zip(lrs, lrs[1:])) and lrs[-1] < 0.5 * 1e-3  # logged rates fall
    code, _, err = run([*base, "--kimg", "0.048", "--lr-schedule", "constant"], capsys)  # another schedule: refused
    assert code == 2 and "--lr-schedule is 'constant'" in err and "'cosine'" in err
    code, _, err = run([*base, "--kimg", "0.048"], capsys)  # the default keeps the run's own
    assert code == 0, err
    code, _, err = run([*base, "--outdir", str(tmp_path / "x"), "--lr-schedule", "step"], capsys)
    assert code == 2 and "--lr-schedule" in err and not (tmp_path / "x").exists()


def test_lr_schedule_constant_runs_and_runs_from_before_the_option_keep_a_constant_rate(tmp_path, capsys):
    root = write_folder(tmp_path / "data", n=4)
    out = tmp_path / "r"
    base = ["train", "--data", str(root), "--outdir", str(out), "--corruption-probability", "0.5",
            "--lr-warmup-kimg", "0", *TINY]
    code, _, err = run([*base, "--kimg", "0.016", "--lr-schedule", "constant"], capsys)
    assert code == 0, err
    _as_before_the_option(out, "lr_schedule")
    code, _, err = run([*base, "--kimg", "0.032", "--lr-schedule", "cosine"], capsys)
    assert code == 2 and "--lr-schedule is 'cosine'" in err and "'constant'" in err
    code, _, err = run([*base, "--kimg", "0.032"], capsys)
    assert code == 0, err
    assert json.loads((out / "config.json").read_text())["train"]["lr_schedule"] == "constant"
    lrs = [r["lr"] for r in map(json.loads, (out / "stats.jsonl").read_text().splitlines()) if "lr" in r]
    assert lrs and all(abs(lr - 1e-3) < 1e-12 for lr in lrs)
    code, stdout, _ = run([*base, "--outdir", str(tmp_path / "n"), "--dry-run"], capsys)
    assert code == 0 and json.loads(stdout)["lr_schedule"] == "cosine"


def test_loss_weighting_default_and_resume_of_runs_from_before_the_option(tmp_path, capsys):
    root = write_folder(tmp_path / "data", n=4)
    out = tmp_path / "r"
    base = ["train", "--data", str(root), "--outdir", str(out), "--corruption-probability", "0.5", *TINY]
    code, _, err = run([*base, "--kimg", "0.016"], capsys)
    assert code == 0, err
    assert json.loads((out / "config.json").read_text())["train"]["loss_weighting"] == "tilted"
    pixel = tmp_path / "p"  # a run of the former default resumes with its own weighting
    code, _, err = run([*base, "--outdir", str(pixel), "--kimg", "0.016", "--loss-weighting", "pixel"], capsys)
    assert code == 0, err
    code, _, err = run([*base, "--outdir", str(pixel), "--kimg", "0.032"], capsys)
    assert code == 0 and json.loads((pixel / "config.json").read_text())["train"]["loss_weighting"] == "pixel"
    code, stdout, _ = run([*base, "--no-mask-aware", "--outdir", str(tmp_path / "d"), "--dry-run"], capsys)
    assert code == 0 and json.loads(stdout)["loss_weighting"] == "edm"
    naive = ["train", "--data", str(root), "--outdir", str(tmp_path / "n"), "--objective", "naive", *TINY]
    code, stdout, _ = run([*naive, "--dry-run"], capsys)  # nothing hidden: EDM's weighting, recorded as such
    assert code == 0 and json.loads(stdout)["loss_weighting"] == "edm"
    _as_before_the_option(out, "loss_weighting")
    code, _, err = run([*base, "--kimg", "0.032", "--loss-weighting", "pixel"], capsys)
    assert code == 2 and "--loss-weighting is 'pixel'" in err and "'edm'" in err
    code, _, err = run([*base, "--kimg", "0.032"], capsys)  # the default keeps the old run's weighting
    assert code == 0, err
    assert json.loads((out / "config.json").read_text())["train"]["loss_weighting"] == "edm"
