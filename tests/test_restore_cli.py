"""`ambient restore` on tiny data: outputs, agreement with y, seeds, ambient-mean, torchrun, bad input."""

import numpy as np
import pytest

from ambient.cli import main
from tests.helpers_data import blobs, write_npz

TINY = ["--arch", "tiny", "--batch", "8", "--kimg", "0.016", "--snapshot-kimg", "0.016", "--tick-kimg", "0.008",
        "--grid-samples", "0", "--no-progress"]
N_OBS = 5


def run(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    captured = capsys.readouterr()
    return exc.value.code, captured.out, captured.err


def observations(path, n=N_OBS, size=8, channels=1, masks=True, mask_shape=None):
    rng = np.random.default_rng(7)
    arrays = {"images": blobs(n, size, channels, seed=11)}
    if masks:
        arrays["masks"] = (rng.random(mask_shape or (n, size, size)) < 0.5).astype(np.uint8)
    np.savez(path, **arrays)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A naive-trained (full-image) and an ambient-trained (mask-input) tiny model, and observations."""
    root = tmp_path_factory.mktemp("restore")
    data = str(write_npz(root / "train.npz"))
    for name, flags in (("naive", ["--objective", "naive", "--corruption-probability", "0.3"]),
                        ("ambient", ["--corruption-probability", "0.5", "--delta-probability", "0.2"])):
        with pytest.raises(SystemExit) as exc:
            main(["train", "--data", data, "--outdir", str(root / name), *flags, *TINY])
        assert exc.value.code == 0
    return root, observations(root / "obs.npz")


def restore_args(model, data, out, *extra):
    return ["restore", "--model", str(model), "--data", str(data), "--out", str(out), "--steps", "4", *extra]


def hidden_and_observed(out, obs):
    f, o = np.load(out), np.load(obs)
    images, index = f["images"], f["index"]
    mask = o["masks"][index].astype(bool)
    return images, index, np.abs(images[..., 0].astype(int) - o["images"][index].astype(int)), mask


@pytest.mark.parametrize("method", ["mmps", "project", "dps"])
def test_restore_writes_images_and_index_and_keeps_y(models, tmp_path, capsys, method):
    root, obs = models
    out = tmp_path / "r.npz"
    code, stdout, err = run(restore_args(root / "naive", obs, out, "--method", method, "--num-per-image", "2",
                                         "--cg-iters", "2", "--batch", "4"), capsys)
    assert code == 0, err
    assert f"wrote {2 * N_OBS} restorations of {N_OBS} observations" in stdout
    assert "restore (" in err  # progress bar
    images, index, diff, mask = hidden_and_observed(out, obs)
    assert images.shape == (2 * N_OBS, 8, 8, 1) and images.dtype == np.uint8
    assert index.tolist() == [i // 2 for i in range(2 * N_OBS)]
    assert (tmp_path / "r_grid.png").is_file()
    if method != "dps":  # σ_y = 0: observed pixels are y (uint8 rounding at most); DPS does not enforce y
        assert diff[mask].max() <= 1
    assert np.abs(images[0].astype(int) - images[1].astype(int)).max() > 0  # two draws of one observation differ


def test_rows_do_not_depend_on_the_batch_and_seed_shifts_rows(models, tmp_path, capsys):
    root, obs = models
    outs = []
    for i, extra in enumerate((["--batch", "1"], ["--batch", "7"], ["--batch", "3", "--seed", "1"])):
        out = tmp_path / f"b{i}.npz"
        code, _, err = run(restore_args(root / "naive", obs, out, "--num-per-image", "2", "--sigma-y", "0.05",
                                        *extra), capsys)
        assert code == 0, err
        outs.append(np.load(out)["images"].astype(int))
    assert np.abs(outs[0] - outs[1]).max() <= 1
    # seed 1: row j uses the noise of row j + 1 at seed 0; rows 1 and 2 restore different observations, so
    # compare row 0 of seed 1 with row 1 of seed 0 (both draws of observation 0)
    assert np.abs(outs[2][0] - outs[0][1]).max() <= 1
    assert np.abs(outs[2][0] - outs[0][0]).max() > 0


def test_ambient_mean_is_one_image_per_observation(models, tmp_path, capsys):
    root, obs = models
    out = tmp_path / "m.npz"
    code, _, err = run(restore_args(root / "ambient", obs, out, "--method", "ambient-mean", "--num-per-image", "3"),
                       capsys)
    assert code == 0, err
    images, index, diff, mask = hidden_and_observed(out, obs)
    assert images.shape == (3 * N_OBS, 8, 8, 1)
    # a mean, not samples: the same image up to one uint8 level (rows of one batch may round differently
    # in the network's matrix products, by their position in it); samples differ by far more
    assert np.abs(images[0::3].astype(int) - images[1::3]).max() <= 1
    assert diff[mask].max() <= 1


def test_help_says_ambient_mean_is_the_posterior_mean(capsys):
    code, out, _ = run(["restore", "--help"], capsys)
    assert code == 0 and "posterior MEAN" in out


def test_two_processes_restore_the_same_images(models, tmp_path, capsys):
    from tests.test_distributed import torchrun

    root, obs = models
    flags = ["--num-per-image", "2", "--batch", "3", "--cg-iters", "2"]
    proc = torchrun(restore_args(root / "naive", obs, tmp_path / "two.npz", *flags), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("wrote 10 restorations") == 1  # rank 0 writes
    assert proc.stderr.count("restore (mmps):   0%") == 1  # one progress bar: rank 0's
    code, _, err = run(restore_args(root / "naive", obs, tmp_path / "one.npz", *flags), capsys)
    assert code == 0, err
    one, two = (np.load(tmp_path / f"{k}.npz") for k in ("one", "two"))
    assert np.abs(one["images"].astype(int) - two["images"].astype(int)).max() <= 1
    np.testing.assert_array_equal(one["index"], two["index"])


def _masks_of_other_shape(root, tmp):
    return observations(tmp / "ms.npz", mask_shape=(N_OBS, 7, 8)), [], "ms.npz"


def _no_masks(root, tmp):
    return observations(tmp / "nomask.npz", masks=False), [], "--data"


def _other_size(root, tmp):
    return observations(tmp / "six.npz", size=6), [], "--data"


def _other_channels(root, tmp):
    return observations(tmp / "rgb.npz", channels=3), [], "3 channel"


def _negative_sigma_y(root, tmp):
    return root / "obs.npz", ["--sigma-y", "-0.1"], "--sigma-y"


def _zero_per_image(root, tmp):
    return root / "obs.npz", ["--num-per-image", "0"], "--num-per-image"


def _mask_input_model_with_mmps(root, tmp):
    return root / "obs.npz", ["--model", str(root / "ambient"), "--method", "mmps"], "--method mmps"


def _full_image_model_with_ambient_mean(root, tmp):
    return root / "obs.npz", ["--method", "ambient-mean"], "--method ambient-mean"


def _not_a_model(root, tmp):
    return root / "obs.npz", ["--model", str(tmp)], "--model"


@pytest.mark.parametrize("make", [_masks_of_other_shape, _no_masks, _other_size, _other_channels, _negative_sigma_y,
                                  _zero_per_image, _mask_input_model_with_mmps, _full_image_model_with_ambient_mean,
                                  _not_a_model])
def test_bad_input_is_one_line_exit_2_nothing_written(models, tmp_path, capsys, make):
    root, _ = models
    data, extra, needle = make(root, tmp_path)
    out = tmp_path / "out.npz"
    code, _, err = run([*restore_args(root / "naive", data, out), *extra], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], err
    assert not out.exists() and not (tmp_path / "out_grid.png").exists()


def test_out_must_be_an_npz(models, tmp_path, capsys):
    root, obs = models
    code, _, err = run(restore_args(root / "naive", obs, tmp_path / "folder"), capsys)
    assert code == 2 and "--out" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "folder").exists()


def test_out_never_overwrites_a_file_of_a_run_folder(models, capsys):
    root, obs = models
    own = root / "naive" / "law-of-this-run.npz"  # a file the run folder holds (EM runs keep pools, gaussian.npz)
    own.write_bytes(b"the run's own bytes")
    for argv in (restore_args(root / "naive", obs, own),
                 ["sample", "--model", str(root / "naive"), "--num-images", "2", "--steps", "2", "--out", str(own)]):
        code, _, err = run(argv, capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1 and "a train run" in err and "--out" in err, err
        assert own.read_bytes() == b"the run's own bytes"
    fresh = root / "naive" / "restored-here.npz"  # a new file there is the user's choice, as with ambient sample
    code, _, err = run(restore_args(root / "naive", obs, fresh, "--max-size", "1"), capsys)
    assert code == 0 and fresh.is_file(), err
    fresh.unlink()
    fresh.with_name("restored-here_grid.png").unlink()
    own.unlink()


def test_a_vanilla_finetuned_diffusers_model_restores_on_its_own_schedule(models, tmp_path, capsys):
    from tests.test_finetune import save_npz, save_pipeline, tiny_unet

    pre = save_pipeline(tmp_path / "pre", tiny_unet())
    code, _, err = run(["finetune", "--pretrained", str(pre), "--data", save_npz(tmp_path / "d.npz"),
                        "--corruption-probability", "0", "--delta-probability", "0", "--mask-mode", "input",
                        "--batch", "2", "--steps", "1", "--outdir", str(tmp_path / "ft"), "--device", "cpu"], capsys)
    assert code == 0, err
    _, obs = models
    out = tmp_path / "ft.npz"
    code, _, err = run(restore_args(tmp_path / "ft", obs, out, "--method", "mmps", "--max-size", "3",
                                    "--num-per-image", "2"), capsys)
    assert code == 0, err
    images, index, diff, mask = hidden_and_observed(out, obs)
    assert images.shape == (6, 8, 8, 1) and index.tolist() == [0, 0, 1, 1, 2, 2]
    assert diff[mask].max() <= 1
    code, _, err = run(restore_args(tmp_path / "ft", obs, tmp_path / "no.npz", "--method", "ambient-mean"), capsys)
    assert code == 2 and "--method ambient-mean" in err and not (tmp_path / "no.npz").exists()


def test_restore_config_round_trips_and_names_bad_fields():
    import json

    from ambient.errors import AmbientInputError
    from ambient.sampling.restore import RestoreConfig

    cfg = RestoreConfig(method="dps", steps=7, cg_iters=2, num_per_image=3, sigma_y=0.05, seed=4, dps_step=2.0)
    assert RestoreConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    for field, value, flag in [("sigma_y", -0.1, "--sigma-y"), ("num_per_image", 0, "--num-per-image"),
                               ("method", "magic", "--method"), ("cg_iters", 0, "--cg-iters")]:
        with pytest.raises(AmbientInputError, match=flag):
            RestoreConfig(**{field: value})
    with pytest.raises(AmbientInputError, match="unknown keys: colour"):
        RestoreConfig.from_dict({"colour": 1})


def kspace_measurements(path, n=N_OBS, size=8, sigma_y=0.0):
    """k-space measurements (R = 2, centre 25 %) of blobs in units 0..255, as a measurements file."""
    import torch

    from ambient.operators.kspace import KSpaceOperator, cartesian_mask
    from ambient.operators.measurements import save_measurements

    x = torch.from_numpy(blobs(n, size, 1, seed=11)).double().reshape(n, 1, size, size)
    op = KSpaceOperator(torch.as_tensor(cartesian_mask(n, size, size, 2, 0.25, seed=3)), (1, size, size),
                        sigma_y=sigma_y)
    save_measurements(path, op(x), op, (0.0, 255.0))
    return path, x


@pytest.mark.parametrize("method", ["mmps", "dps"])
def test_restore_kspace_measurements(models, tmp_path, capsys, method):
    """Operator measurements: float images in the data's units, and data consistency reported and saved."""
    root, _ = models
    meas, x = kspace_measurements(tmp_path / "k.npz")
    out = tmp_path / "r.npz"
    code, stdout, err = run(restore_args(root / "naive", meas, out, "--method", method, "--cg-iters", "3",
                                         "--num-per-image", "2"), capsys)
    assert code == 0, err
    assert "data consistency" in stdout
    f = np.load(out)
    assert f["images"].shape == (2 * N_OBS, 8, 8, 1) and f["images"].dtype == np.uint8
    assert f["images_float"].dtype == np.float32 and f["value_range"].tolist() == [0.0, 255.0]
    assert np.isfinite(f["data_consistency"]).all() and f["data_consistency"].shape == (2 * N_OBS,)
    assert (out.with_name("r_grid.png")).is_file()
    if method == "mmps":  # noiseless data: 3 CG iterations make the sample agree with y (measured: ~1e-4)
        assert float(f["data_consistency"].max()) < 1e-2


def test_restore_measurements_refuses_what_cannot_work(models, tmp_path, capsys):
    root, _ = models
    meas, _ = kspace_measurements(tmp_path / "k.npz")
    code, _, err = run(restore_args(root / "naive", meas, tmp_path / "r.npz", "--method", "project"), capsys)
    assert code == 2 and "--method project" in err and "mmps or dps" in err
    code, _, err = run(restore_args(root / "ambient", meas, tmp_path / "r.npz"), capsys)
    assert code == 2 and "mask-input" in err
    assert not (tmp_path / "r.npz").exists()


def test_unstable_restorations_get_a_notice_and_non_finite_ones_stop_with_exit_1(models, tmp_path, capsys):
    """DPS with an absurd step leaves every plausible range: a notice naming the count and what to try; with an
    infinite step the values are non-finite: one line, exit 1, no --out and no grid written."""
    root, obs = models
    out = tmp_path / "r.npz"
    code, _, err = run(restore_args(root / "naive", obs, out, "--method", "dps", "--dps-step", "1e6"), capsys)
    assert code == 0 and "notice:" in err and "beyond ±10" in err and "--dps-step" in err
    out.unlink()
    out.with_name("r_grid.png").unlink()
    code, _, err = run(restore_args(root / "naive", obs, out, "--method", "dps", "--dps-step", "3e38"), capsys)
    assert code == 1, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err
    assert "diverged" in errors[0] and "--dps-step" in errors[0] and "nothing written" in errors[0]
    assert not out.exists() and not out.with_name("r_grid.png").exists()


def test_check_diverged_passes_finite_restorations_and_flags_the_first_non_finite_one():
    import torch

    from ambient.errors import SamplingDiverged
    from ambient.sampling.restore import RestoreConfig, Restored, check_diverged

    cfg = RestoreConfig(method="mmps")
    ok = torch.rand(3, 1, 4, 4) * 2 - 1
    ok[2, 0, 0, 0] = 5e3  # far, but finite: counted, not fatal
    check_diverged(ok, [5, 6, 7], cfg)
    assert Restored(ok, torch.arange(3)).far == 1
    bad = ok.clone()
    bad[1, 0, 2, 2] = float("nan")
    bad[2, 0, 0, 0] = float("inf")
    with pytest.raises(SamplingDiverged, match=r"2 of 3 .* observation 6.*--sigma-y"):
        check_diverged(bad, [5, 6, 7], cfg, operator_sigma_y=0.01)
