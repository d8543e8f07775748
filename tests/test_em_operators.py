"""`ambient em` on measurements through an operator (k-space, blur): lap 0 by Monte-Carlo EM, MMPS E-steps through
the operator, float completions in the data's units, resume, sampling, and what it refuses."""

import json

import numpy as np
import pytest
import torch

from ambient.cli import main
from ambient.operators.blur import BlurOperator, gaussian_kernel
from ambient.operators.kspace import KSpaceOperator, cartesian_mask
from ambient.operators.measurements import load_measurements, save_measurements
from ambient.store.models import load_model
from tests.helpers_cli import run
from tests.helpers_data import blobs
from tests.test_em import TINY

LO, HI = 10.0, 50.0  # the data's own units


def images(n=24):
    u8 = torch.from_numpy(blobs(n, 8, 1, seed=5)).double().reshape(n, 1, 8, 8)
    return LO + (HI - LO) * u8 / 255


def write(path, kind, n=24):
    x = images(n)
    if kind == "kspace":
        op = KSpaceOperator(cartesian_mask(n, 8, 8, 2, 0.25, seed=4), (1, 8, 8))
    else:
        op = BlurOperator(gaussian_kernel(1.0)[None], (1, 8, 8), sigma_y=0.2)
    y = op(x)
    if op.sigma_y:
        y = op.add_noise(y, torch.Generator().manual_seed(0))
    save_measurements(path, y, op, (LO, HI))
    return path


@pytest.fixture(scope="module", params=["kspace", "blur"])
def em_operator_run(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"em-{request.param}")
    data = write(root / "meas.npz", request.param)
    with pytest.raises(SystemExit) as exc:
        main(["em", "--data", str(data), "--outdir", str(root / "run"), *TINY, "--cg-iters", "2"])
    assert exc.value.code == 0
    return root, data


def test_laps_run_and_completions_are_floats_in_the_data_units(em_operator_run):
    root, data = em_operator_run
    run_dir = root / "run"
    for name in ("gaussian.npz", "completions/lap-00.npz", "completions/lap-01.npz", "lap-01/config.json"):
        assert (run_dir / name).is_file(), name
    with np.load(run_dir / "gaussian.npz") as g:
        assert len(g["change"]) == 4 and np.isfinite(g["change"]).all()
    # σ_y not given: through an operator the E-step takes the data's own σ_y over this floor (masks: 0.1)
    import ambient.learners.em as em_module

    assert json.loads((run_dir / "em_config.json").read_text())["em"]["sigma_y"] == em_module.OPERATOR_SIGMA_Y
    meas = load_measurements(data)
    for lap in (0, 1):
        with np.load(run_dir / "completions" / f"lap-{lap:02d}.npz") as z:
            x, index = z["images"], z["index"]
            assert x.dtype == np.float32 and z["value_range"].tolist() == [LO, HI]
        assert x.shape[1:] == (8, 8, 1) and np.isfinite(x).all()
        assert x.min() >= LO - (HI - LO) / 2 - 1e-3 and x.max() <= HI + (HI - LO) / 2 + 1e-3  # clipped at worst
        if lap == 1:  # lap 1's MMPS draws come from a network trained for 32 images: nothing to expect of them
            continue
        # the completions explain their measurements far better than the prior's mean image does
        model = torch.from_numpy(x).permute(0, 3, 1, 2).double()
        model = 2 * (model - LO) / (HI - LO) - 1
        fit = meas.consistency(model, torch.from_numpy(index))
        mean_image = model.mean(0, keepdim=True).expand_as(model)
        baseline = meas.consistency(mean_image, torch.from_numpy(index))
        assert float(fit.median()) < 0.5 * float(baseline.median()), (lap, fit.median(), baseline.median())


def test_the_model_samples_and_remembers_the_data_units(em_operator_run, capsys, tmp_path):
    root, _ = em_operator_run
    loaded = load_model(root / "run")
    assert tuple(loaded.image_shape) == (1, 8, 8)
    code, _, err = run(["sample", "--model", str(root / "run"), "--num-images", "4", "--steps", "3",
                        "--out", str(tmp_path / "s.npz")], capsys)
    assert code == 0, err


def test_resume_of_a_finished_run_changes_nothing(em_operator_run, capsys):
    root, data = em_operator_run
    before = (root / "run" / "stats.jsonl").read_bytes()
    code, out, err = run(["em", "--data", str(data), "--outdir", str(root / "run"), *TINY, "--cg-iters", "2"],
                         capsys)
    assert code == 0 and "nothing to do" in out + err
    assert (root / "run" / "stats.jsonl").read_bytes() == before


@pytest.mark.parametrize("extra,want", [(["--corruption-probability", "0.5"], "--corruption-probability"),
                                        (["--init", "whatever"], "--init")])
def test_refuses_mask_only_options(tmp_path, capsys, extra, want):
    data = write(tmp_path / "meas.npz", "kspace", n=6)
    code, _, err = run(["em", "--data", str(data), "--outdir", str(tmp_path / "run"), *TINY, *extra], capsys)
    assert code == 2 and want in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_masked_float_data_keeps_its_units_in_completions_and_restorations(tmp_path, capsys):
    """Float images with masks (not an operator file): completions are stored as float32 in the data's units."""
    x = images(24).numpy()[:, 0].astype(np.float32)
    rng = np.random.default_rng(1)
    data = tmp_path / "obs.npz"
    np.savez(data, images=x, masks=(rng.random(x.shape) < 0.5).astype(np.uint8), value_range=[LO, HI])
    code, _, err = run(["em", "--data", str(data), "--outdir", str(tmp_path / "run"), *TINY], capsys)
    assert code == 0, err
    with np.load(tmp_path / "run" / "completions" / "lap-01.npz") as z:
        assert z["images"].dtype == np.float32 and z["value_range"].tolist() == [LO, HI]
        assert z["images"].min() >= LO - (HI - LO) / 2 - 1e-3 and z["images"].max() <= HI + (HI - LO) / 2 + 1e-3
    code, out, err = run(["restore", "--model", str(tmp_path / "run"), "--data", str(data), "--steps", "3",
                          "--out", str(tmp_path / "r.npz")], capsys)
    assert code == 0, err
    with np.load(tmp_path / "r.npz") as r:
        assert r["images_float"].dtype == np.float32 and r["value_range"].tolist() == [LO, HI]


def test_restore_with_the_em_runs_gaussian_mean_and_draws(em_operator_run, capsys, tmp_path):
    """`ambient restore --method gaussian-mean | gaussian-sample --model <em run>`: no network; the mean is the same
    image for every draw and fits the measurements better than the prior's mean image; draws differ and do not
    depend on the batch; float outputs in the data's units."""
    from ambient.io import read_npz
    from ambient.learners.gaussian_prior import GaussianPrior

    root, data = em_operator_run
    outs = {}
    for method, batch in (("gaussian-mean", "64"), ("gaussian-sample", "64"), ("gaussian-sample", "3")):
        out = tmp_path / f"{method}-{batch}.npz"
        code, stdout, err = run(["restore", "--model", str(root / "run" / "lap-01"), "--data", str(data), "--out",
                                 str(out), "--method", method, "--num-per-image", "2", "--batch", batch], capsys)
        assert code == 0, err
        assert "data consistency" in stdout
        outs[(method, batch)] = np.load(out)
    mean = outs[("gaussian-mean", "64")]
    x = mean["images_float"]
    assert mean["value_range"].tolist() == [LO, HI] and x.dtype == np.float32
    np.testing.assert_array_equal(x[0::2], x[1::2])  # the mean: one image per observation
    prior = GaussianPrior.from_arrays(read_npz(root / "run" / "gaussian.npz"))
    meas = load_measurements(data)
    index = torch.from_numpy(mean["index"])
    model_units = 2 * (torch.from_numpy(x).permute(0, 3, 1, 2).double() - LO) / (HI - LO) - 1
    prior_mean = prior.mean.reshape(1, *prior.shape).expand_as(model_units)
    assert float(meas.consistency(model_units, index).median()) < \
        0.5 * float(meas.consistency(prior_mean, index).median())
    a, b = outs[("gaussian-sample", "64")]["images_float"], outs[("gaussian-sample", "3")]["images_float"]
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-3 * (HI - LO))  # per-seed draws, whatever the batch
    assert np.abs(a[0::2] - a[1::2]).max() > 1e-3 * (HI - LO)  # two draws of one observation differ


def test_gaussian_restore_refuses_a_model_that_is_not_an_em_run(tmp_path, capsys):
    data = write(tmp_path / "meas.npz", "kspace", n=4)
    (tmp_path / "notarun").mkdir()
    code, _, err = run(["restore", "--model", str(tmp_path / "notarun"), "--data", str(data), "--out",
                        str(tmp_path / "r.npz"), "--method", "gaussian-mean"], capsys)
    assert code == 2 and "--model" in err and "ambient em run" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r.npz").exists()


def test_gaussian_mean_is_the_closed_form_posterior_mean():
    """Against the dense formula μ + Σ Aᵀ (A Σ Aᵀ + s² I)⁻¹ (y − A μ) for a pixel mask and for k-space."""
    from ambient.learners.gaussian_prior import GaussianPrior
    from ambient.learners.gaussian_restore import restore_gaussian
    from ambient.operators.measurements import Measurements
    from ambient.sampling.restore import RestoreConfig

    g = torch.Generator().manual_seed(3)
    d, shape = 16, (1, 4, 4)
    w = torch.randn(d, 3, generator=g, dtype=torch.float64) * 0.4
    prior = GaussianPrior(torch.randn(d, generator=g, dtype=torch.float64) * 0.1, w,
                          torch.full((d,), 0.05, dtype=torch.float64), shape)
    cov = prior.covariance()
    op = KSpaceOperator(cartesian_mask(2, 4, 4, 2, 0.25, seed=1), shape, sigma_y=0.05)
    x = torch.randn(2, *shape, generator=g, dtype=torch.float64) * 0.3
    y = op.add_noise(op(x), torch.Generator().manual_seed(1))
    meas = Measurements(y=y, operator=op, value_range=(-1.0, 1.0), spec=op.spec(), source="test",
                        y_norm=y.flatten(1).norm(dim=1))
    got = restore_gaussian(prior, meas, RestoreConfig(method="gaussian-mean")).images.double()
    for i in range(2):  # the operator as a dense matrix, column by column
        one = op.select([i])
        a = torch.stack([one(e.reshape(1, *shape)).flatten() for e in torch.eye(d, dtype=torch.float64)], dim=1)
        k = a @ cov @ a.T + 0.05**2 * torch.eye(a.shape[0], dtype=torch.float64)
        want = prior.mean + cov @ a.T @ torch.linalg.lstsq(k, y[i].flatten() - a @ prior.mean).solution
        torch.testing.assert_close(got[i].flatten(), want, atol=2e-4, rtol=0)


def test_mstep_range_notice_is_said_once_per_run():
    """The pool's reader notes completions beyond value_range every lap; EM passes it on once."""
    from ambient.learners.em import EMRun

    said = []
    run = EMRun.__new__(EMRun)  # only its log plumbing is exercised
    run.log = said.append
    lap = ("notice: --data pool.npz: 12 value(s) of 'images' (0.40%) lie outside value_range [0, 1] (min -0.1, max 1.2)"
           "; kept as they are\nnotice: --data pool.npz: other")
    run.mstep_log(lap)
    run.mstep_log(lap)
    run.mstep_log("snapshot at 1 kimg")
    assert len(said) == 3
    assert "lie outside value_range" in said[0] and "said once" in said[0] and said[0].endswith("other")
    assert said[1] == "notice: --data pool.npz: other" and said[2] == "snapshot at 1 kimg"
