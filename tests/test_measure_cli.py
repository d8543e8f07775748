"""`ambient measure`: clean images → measurements files (mask, blur, k-space) that load_measurements reads, y = A x
(+ σ_y noise) in the data's units, seeds, what it refuses, and measure → restore end to end."""

import json

import numpy as np
import pytest
import torch

from ambient.data.corruption import Corruption
from ambient.operators.blur import gaussian_kernel
from ambient.operators.measurements import load_measurements
from ambient.operators.specs import operator_from_spec
from tests.helpers_cli import run
from tests.helpers_data import blobs

LO, HI = 10.0, 50.0  # the float data's own units
OPERATOR_ARGS = {
    "mask": ["--operator", "mask", "--probability", "0.5"],
    "blur": ["--operator", "blur", "--blur-sigma", "1"],
    "kspace": ["--operator", "kspace", "--acceleration", "2", "--center-fraction", "0.25"],
}


def float_data(path, n=6, size=8):
    x = LO + (HI - LO) * blobs(n, size, 1, seed=3).astype(np.float32) / 255
    np.savez(path, images=x, value_range=[LO, HI])
    return path, x.astype(np.float64)


def uint8_data(path, n=6, size=8, channels=1):
    x = blobs(n, size, channels, seed=4)
    np.savez(path, images=x)
    return path, x.astype(np.float64)


def read(path):
    """(y real layout float64, the operator in the file's units, value_range) of a measurements file."""
    with np.load(path) as z:
        y = z["y"]
        spec = json.loads(str(z["operator"][()]))
        arrays = {k[3:]: z[k] for k in z.files if k.startswith("op_")}
        vr = z["value_range"].tolist()
    if np.iscomplexobj(y):
        y = np.stack([y.real, y.imag], axis=-1)
    return torch.from_numpy(y).double(), operator_from_spec(spec, arrays), vr


def nchw(x):
    t = torch.from_numpy(x)
    return t[:, None] if t.ndim == 3 else t.permute(0, 3, 1, 2)


@pytest.mark.parametrize("kind", ["mask", "blur", "kspace"])
@pytest.mark.parametrize("units", ["float", "uint8"])
def test_each_operator_writes_y_equal_to_A_x_in_the_data_units(tmp_path, capsys, kind, units):
    data, x = (float_data if units == "float" else uint8_data)(tmp_path / "x.npz")
    out = tmp_path / "meas.npz"
    code, stdout, err = run(["measure", "--data", str(data), "--out", str(out), *OPERATOR_ARGS[kind]], capsys)
    assert code == 0, err
    assert stdout.count("\n") == 1 and f"wrote 6 observations to {out}: {kind}" in stdout and "σ_y 0" in stdout
    y, op, vr = read(out)
    assert vr == ([LO, HI] if units == "float" else [0, 255])
    assert op.kind == kind and op.sigma_y == 0 and op.num_operators == (1 if kind == "blur" else 6)
    expected = op(nchw(x))
    scale = float(expected.abs().max())
    assert torch.allclose(y, expected, atol=1e-6 * scale, rtol=0)
    meas = load_measurements(out)  # the reader of em and restore takes it, in model units
    assert len(meas) == 6 and meas.value_range == tuple(vr) and meas.shape == (1, 8, 8)
    model_x = 2 * (nchw(x) - vr[0]) / (vr[1] - vr[0]) - 1
    assert float(meas.consistency(model_x, range(6)).max()) < 1e-5


def test_mask_draws_the_masks_ambient_train_draws_and_blur_uses_the_gaussian_psf(tmp_path, capsys):
    data, _ = uint8_data(tmp_path / "x.npz", channels=3)
    for kind, extra in (("mask", ["--seed", "5"]), ("blur", [])):
        out = tmp_path / f"{kind}.npz"
        code, _, err = run(["measure", "--data", str(data), "--out", str(out), *OPERATOR_ARGS[kind], *extra], capsys)
        assert code == 0, err
        _, op, _ = read(out)
        if kind == "mask":
            expected = Corruption("dust", 0.5).masks_for_indices(5, range(6), (3, 8, 8))
            assert torch.equal(op.mask, expected) and not torch.equal(op.mask[:, 0], op.mask[:, 1])  # per channel
        else:
            assert torch.equal(op.kernel[0], gaussian_kernel(1.0))
    code, _, err = run(["measure", "--data", str(data), "--out", str(tmp_path / "rgb.npz"), *OPERATOR_ARGS["mask"],
                        "--mask-full-rgb"], capsys)
    assert code == 0, err
    mask = read(tmp_path / "rgb.npz")[1].mask
    assert torch.equal(mask[:, 0], mask[:, 2])


def test_kernel_file_is_used_as_given_with_a_notice_when_it_does_not_sum_to_one(tmp_path, capsys):
    data, x = float_data(tmp_path / "x.npz")
    k = np.arange(15, dtype=np.float32).reshape(3, 5)
    np.save(tmp_path / "k.npy", k)
    out = tmp_path / "b.npz"
    code, stdout, err = run(["measure", "--data", str(data), "--out", str(out), "--operator", "blur", "--kernel",
                             str(tmp_path / "k.npy")], capsys)
    assert code == 0, err
    assert "sums to 105" in err and "not normalised" in err and "PSF 3×5" in stdout
    y, op, _ = read(out)
    assert np.array_equal(op.kernel[0].numpy(), k)
    assert torch.allclose(y, op(nchw(x)), rtol=1e-6, atol=1e-6 * float(y.abs().max()))


@pytest.mark.parametrize("kind", ["mask", "blur", "kspace"])
def test_noise_has_std_sigma_y_on_measured_entries_only(tmp_path, capsys, kind):
    data, x = float_data(tmp_path / "x.npz", n=64)
    out = tmp_path / "meas.npz"
    code, stdout, err = run(["measure", "--data", str(data), "--out", str(out), *OPERATOR_ARGS[kind],
                             "--sigma-y", "0.7"], capsys)
    assert code == 0, err
    assert "σ_y 0.7 in the data's units (value_range 10..50)" in stdout
    y, op, _ = read(out)
    assert op.sigma_y == pytest.approx(0.7)
    residual = y - op(nchw(x))
    support = op.support().expand_as(residual).bool()
    assert int(support.sum()) > 1500
    assert float(residual[support].std()) == pytest.approx(0.7, rel=0.08)
    assert abs(float(residual[support].mean())) < 0.1
    assert not bool(residual[~support].any())  # unmeasured entries stay 0 (blur measures every entry)


def test_same_seed_same_arrays_other_seed_other_draws_and_max_size_keeps_the_first(tmp_path, capsys):
    data, _ = float_data(tmp_path / "x.npz")

    def measure(name, *extra):
        out = tmp_path / name
        code, _, err = run(["measure", "--data", str(data), "--out", str(out), *OPERATOR_ARGS["kspace"],
                            "--sigma-y", "0.5", *extra], capsys)
        assert code == 0, err
        with np.load(out) as z:
            return {k: z[k] for k in z.files}

    a, b = measure("a.npz", "--seed", "3"), measure("b.npz", "--seed", "3")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    c = measure("c.npz", "--seed", "4")
    assert not np.array_equal(a["op_mask"], c["op_mask"]) and not np.array_equal(a["y"], c["y"])
    first = measure("d.npz", "--seed", "3", "--max-size", "2")
    assert np.array_equal(first["y"], a["y"][:2]) and np.array_equal(first["op_mask"], a["op_mask"][:2])


@pytest.mark.parametrize("args, words", [
    (["--operator", "fft"], "--operator"),
    (["--operator", "mask"], "--probability"),
    (["--operator", "kspace"], "--acceleration"),
    (["--operator", "blur"], "--blur-sigma"),
    (["--operator", "blur", "--blur-sigma", "1", "--kernel", "k.npy"], "exactly one"),
    (["--operator", "blur", "--blur-sigma", "1", "--acceleration", "4"], "--acceleration: only for --operator kspace"),
    (["--operator", "mask", "--probability", "0.5", "--center-fraction", "0.1"], "--center-fraction: only for"),
    (["--operator", "kspace", "--acceleration", "2", "--probability", "0.5"], "--probability: only for"),
    (["--operator", "mask", "--probability", "1"], "--probability"),
    (["--operator", "blur", "--blur-sigma", "0"], "--blur-sigma"),
    (["--operator", "blur", "--blur-sigma", "nan"], "--blur-sigma"),
    (["--operator", "blur", "--blur-sigma", "1e6"], "over twice as wide"),
    (["--operator", "blur", "--kernel", "even.npy"], "odd"),
    (["--operator", "blur", "--kernel", "missing.npy"], "--kernel"),
    (["--operator", "kspace", "--acceleration", "0.5"], "--acceleration"),
    (["--operator", "kspace", "--acceleration", "2", "--center-fraction", "0.9"], "--center-fraction"),
    (["--operator", "mask", "--probability", "0.5", "--sigma-y", "-1"], "--sigma-y"),
    (["--operator", "mask", "--probability", "0.5", "--sigma-y", "inf"], "--sigma-y"),
    (["--operator", "mask", "--probability", "0.5", "--out", "meas.png"], "--out"),
    (["--operator", "mask", "--probability", "0.5", "--out", "folder.npz"], "is a folder"),
    (["--operator", "mask", "--probability", "0.5", "--out", "x.npz"], "--data file itself"),
    (["--operator", "kspace", "--acceleration", "2", "--data", "rgb.npz"], "single-channel"),
    (["--operator", "mask", "--probability", "0.5", "--data", "masked.npz"], "masks"),
    (["--operator", "blur", "--blur-sigma", "1", "--data", "meas.npz"], "measurements file"),
    (["--operator", "blur", "--blur-sigma", "1", "--data", "nothing.npz"], "nothing.npz"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, monkeypatch, args, words):
    monkeypatch.chdir(tmp_path)
    float_data(tmp_path / "x.npz")
    uint8_data(tmp_path / "rgb.npz", channels=3)
    np.savez(tmp_path / "masked.npz", images=blobs(4, 8, 1), masks=np.ones((4, 8, 8), np.uint8))
    np.save(tmp_path / "even.npy", np.ones((2, 3)))
    (tmp_path / "folder.npz").mkdir()
    code, _, err = run(["measure", "--data", "x.npz", "--operator", "blur", "--blur-sigma", "1", "--out", "meas.npz"],
                       capsys)
    assert code == 0, err
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    defaults = [a for flag, value in (("--data", "x.npz"), ("--out", "out.npz")) if flag not in args
                for a in (flag, value)]
    argv = ["measure", *defaults, *args]
    code, stdout, err = run(argv, capsys)
    assert code == 2, (stdout, err)
    assert err.count("\n") == 1 and err.startswith("error: ") and words in err, err
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == before  # nothing written


def test_measure_kspace_then_restore_with_a_tiny_model(tmp_path, capsys):
    data, _ = float_data(tmp_path / "x.npz", n=24)
    tiny = ["--arch", "tiny", "--batch", "8", "--kimg", "0.016", "--snapshot-kimg", "0.016", "--tick-kimg", "0.008",
            "--grid-samples", "0", "--no-progress"]
    code, _, err = run(["train", "--data", str(data), "--objective", "naive", "--outdir", str(tmp_path / "run"),
                        *tiny], capsys)
    assert code == 0, err
    meas = tmp_path / "k.npz"
    code, stdout, err = run(["measure", "--data", str(data), "--out", str(meas), *OPERATOR_ARGS["kspace"],
                             "--sigma-y", "0.2", "--max-size", "3"], capsys)
    assert code == 0, err
    code, stdout, err = run(["restore", "--model", str(tmp_path / "run"), "--data", str(meas), "--out",
                             str(tmp_path / "r.npz"), "--steps", "3", "--cg-iters", "2"], capsys)
    assert code == 0, err
    assert "wrote 3 restorations of 3 observations" in stdout and "data consistency" in stdout
    with np.load(tmp_path / "r.npz") as r:
        assert r["images_float"].shape == (3, 8, 8, 1) and r["value_range"].tolist() == [LO, HI]
        assert np.isfinite(r["data_consistency"]).all()
