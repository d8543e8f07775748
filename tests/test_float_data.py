"""Float data end to end: uint16 / float npz and 16-bit PNG / float TIFF folders read into model units with their
value range, bad data refused in one line, the range recorded by ``ambient train`` and used by ``ambient sample``
to give samples in the data's own units."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ambient.data.datasets import ImageDataset, check_masks, load_dataset, load_images
from ambient.data.images import from_unit_range, images_uint8_to_float, to_unit_range
from ambient.errors import AmbientInputError
from ambient.store.models import data_units
from ambient.store.upgrades import data_section
from tests.helpers_cli import run
from tests.helpers_data import blobs

TINY = ["--arch", "tiny", "--batch", "8", "--snapshot-kimg", "0.016", "--tick-kimg", "0.008",
        "--grid-samples", "0", "--no-progress"]


def _floats(n=6, size=8, channels=None, lo=100.0, hi=300.0, dtype=np.float32, seed=0) -> np.ndarray:
    shape = (n, size, size) if channels is None else (n, size, size, channels)
    return (np.random.default_rng(seed).random(shape) * (hi - lo) + lo).astype(dtype)


def _back(ds: ImageDataset) -> np.ndarray:
    """The dataset's images back in the source's units, (N, H, W, C)."""
    y, _ = ds.batch(torch.arange(len(ds)))
    return from_unit_range(y, ds.value_range).permute(0, 2, 3, 1).numpy()


def _error(fn, *needles) -> str:
    with pytest.raises(AmbientInputError) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, msg
    return msg


# ---------------------------------------------------------------------------- helpers
def test_unit_range_helpers_numpy_and_torch():
    x = np.array([100.0, 200.0, 300.0, 350.0])
    np.testing.assert_allclose(to_unit_range(x, (100, 300)), [-1, 0, 1, 1.5])  # nothing clipped
    assert to_unit_range(x, (100, 300)).dtype == np.float64
    assert to_unit_range(x.astype(np.float32), (100, 300)).dtype == np.float32
    assert to_unit_range(np.array([0, 65535], np.uint16), (0, 65535)).tolist() == [-1, 1]
    t = torch.tensor([-1.0, 0.0, 1.0])
    assert torch.equal(from_unit_range(t, (100, 300)), torch.tensor([100.0, 200.0, 300.0]))
    assert from_unit_range(t.double(), (0, 1)).dtype == torch.float64
    for bad in [(1, 1), (2, 1), (0, float("nan"))]:
        with pytest.raises(ValueError, match="value_range"):
            to_unit_range(x, bad)


# ---------------------------------------------------------------------------- npz round trips
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_float_npz_round_trip_per_dataset_scaling(tmp_path, dtype):
    x = _floats(dtype=dtype)
    np.savez(tmp_path / "f.npz", images=x)
    ds = load_dataset(str(tmp_path / "f.npz"))
    assert ds.images.dtype == torch.float32 and ds.kind == np.dtype(dtype).name
    xs = x.astype(np.float64)
    assert ds.value_range == (float(xs.min()), float(xs.max()))
    y, _ = ds.batch(torch.arange(len(ds)))
    assert y.dtype == torch.float32 and float(y.min()) == -1.0 and float(y.max()) == 1.0
    np.testing.assert_allclose(_back(ds)[..., 0], xs, rtol=1e-6, atol=1e-6 * 200)
    notice = check_masks(ds, "f.npz")
    assert notice.startswith("notice: --data ") and "f.npz: float" in notice
    assert "per-dataset scaling" in notice and "value_range" in notice
    assert "\n" not in notice


def test_declared_value_range_is_used_and_items_agree(tmp_path):
    x = _floats(channels=3)
    np.savez(tmp_path / "f.npz", images=x, value_range=np.array([0.0, 400.0]))
    ds = load_dataset(str(tmp_path / "f.npz"))
    assert ds.value_range == (0.0, 400.0) and ds.shape == (3, 8, 8) and ds.notices == []
    assert check_masks(ds, "f.npz") is None
    np.testing.assert_allclose(_back(ds), x, rtol=1e-6, atol=1e-4)
    expected = torch.from_numpy(x.astype(np.float64) / 200.0 - 1.0).permute(0, 3, 1, 2).float()
    assert torch.allclose(ds.batch([2])[0][0], expected[2]) and torch.equal(ds[2]["image"], ds.batch([2])[0][0])


def test_uint16_default_and_declared_range(tmp_path):
    u = np.random.default_rng(1).integers(0, 4096, (4, 8, 8), dtype=np.uint16)
    np.savez(tmp_path / "u.npz", images=u)
    ds = load_dataset(str(tmp_path / "u.npz"))
    assert ds.kind == "uint16" and ds.value_range == (0.0, 65535.0) and ds.notices == []
    np.testing.assert_allclose(_back(ds)[..., 0], u, atol=0.01)
    np.savez(tmp_path / "u12.npz", images=u, value_range=np.array([0, 4095]))
    ds = load_dataset(str(tmp_path / "u12.npz"))
    assert ds.value_range == (0.0, 4095.0)
    np.testing.assert_allclose(_back(ds)[..., 0], u, atol=1e-3)


def test_uint8_is_unchanged(tmp_path):
    imgs = blobs(5, 8, 3, 0)
    masks = (np.random.default_rng(0).random((5, 8, 8)) < 0.6).astype(np.uint8)
    np.savez(tmp_path / "u8.npz", images=imgs, masks=masks)
    ds = load_dataset(str(tmp_path / "u8.npz"))
    assert ds.images.dtype == torch.uint8 and ds.value_range == (0.0, 255.0) and ds.kind == "uint8"
    y, m = ds.batch(torch.arange(5))
    expected = images_uint8_to_float(torch.from_numpy(imgs).permute(0, 3, 1, 2)) * m
    assert torch.equal(y, expected)
    # a value_range beside uint8 images changes nothing (uint8 is always 0..255), and says so
    np.savez(tmp_path / "u8r.npz", images=imgs, masks=masks, value_range=np.array([100.0, 300.0]))
    ds = load_dataset(str(tmp_path / "u8r.npz"))
    assert torch.equal(ds.batch(torch.arange(5))[0], expected) and "ignored" in check_masks(ds, "u8r.npz")


def test_nan_where_unobserved_is_allowed_and_scaling_uses_observed_values(tmp_path):
    x = _floats()
    masks = np.ones(x.shape, np.uint8)
    masks[1, 2, 3] = masks[0, 0, 0] = 0
    x[1, 2, 3], x[0, 0, 0] = np.nan, -1e9
    np.savez(tmp_path / "m.npz", images=x, masks=masks)
    ds = load_dataset(str(tmp_path / "m.npz"))
    observed = x[masks.astype(bool)].astype(np.float64)
    assert ds.value_range == (observed.min(), observed.max())
    y, m = ds.batch(torch.arange(len(ds)))
    assert bool(torch.isfinite(y).all()) and float(y[1, 0, 2, 3]) == 0.0 and float(m[1, 0, 2, 3]) == 0.0


def test_values_a_little_outside_a_declared_range_are_kept_with_a_notice(tmp_path):
    x = _floats()  # 100..300
    np.savez(tmp_path / "f.npz", images=x, value_range=np.array([100.0, 250.0]))
    ds = load_dataset(str(tmp_path / "f.npz"))
    assert float(ds.batch(torch.arange(len(ds)))[0].max()) > 1.0  # not clipped
    notice = check_masks(ds, "f.npz")
    assert "outside value_range [100, 250]" in notice and "kept" in notice


def test_metrics_read_float_data_as_uint8(tmp_path):
    x = _floats()
    np.savez(tmp_path / "f.npz", images=x, value_range=np.array([100.0, 300.0]))
    u8 = load_images(str(tmp_path / "f.npz"))
    assert u8.dtype == torch.uint8 and u8.shape == (6, 1, 8, 8)
    np.testing.assert_allclose(u8[:, 0].numpy(), (x - 100) / 200 * 255, atol=1.0)


# ---------------------------------------------------------------------------- folders
def test_16bit_png_folder(tmp_path):
    u = np.random.default_rng(2).integers(0, 65536, (3, 8, 8), dtype=np.uint16)
    for i, a in enumerate(u):
        Image.fromarray(a).save(tmp_path / f"{i}.png")
    assert Image.open(tmp_path / "0.png").mode.startswith("I")
    ds = load_dataset(str(tmp_path))
    assert ds.kind == "uint16" and ds.value_range == (0.0, 65535.0)
    np.testing.assert_allclose(_back(ds)[..., 0], u, atol=0.01)


def test_float_tiff_folder_per_dataset_and_declared(tmp_path):
    f = _floats(n=3, lo=-5.0, hi=-3.0, seed=3)
    for i, a in enumerate(f):
        Image.fromarray(a).save(tmp_path / f"{i}.tif")
    assert Image.open(tmp_path / "0.tif").mode == "F"
    ds = load_dataset(str(tmp_path))
    assert ds.kind == "float32" and ds.value_range == (float(f.min()), float(f.max()))
    assert "dataset.json" in check_masks(ds, str(tmp_path))
    np.testing.assert_allclose(_back(ds)[..., 0], f, rtol=1e-6, atol=1e-6)
    (tmp_path / "dataset.json").write_text(json.dumps({"value_range": [-6, -2]}))
    ds = load_dataset(str(tmp_path), resolution=4)
    assert ds.value_range == (-6.0, -2.0) and ds.shape == (1, 4, 4) and ds.notices == []


def test_int32_tiff_folder_scales_like_float(tmp_path):
    a = (np.arange(2 * 64).reshape(2, 8, 8) * 1000 - 7).astype(np.int32)
    for i, img in enumerate(a):
        Image.fromarray(img).save(tmp_path / f"{i}.tif")
    ds = load_dataset(str(tmp_path))
    assert ds.kind == "int32" and ds.value_range == (-7.0, float(a.max()))
    np.testing.assert_allclose(_back(ds)[..., 0], a, rtol=1e-6, atol=0.01)


def test_mixed_bit_depths_in_a_folder_are_refused(tmp_path):
    Image.fromarray(np.zeros((8, 8), np.uint16)).save(tmp_path / "a.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "b.png")
    _error(lambda: load_dataset(str(tmp_path)), "b.png", "a.png", "16-bit", "8-bit", "bit depth")


def test_folder_with_masks_and_float_tiffs(tmp_path):
    f = _floats(n=2, seed=4)
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    for i, a in enumerate(f):
        Image.fromarray(a).save(tmp_path / "images" / f"{i}.tif")
        Image.fromarray((np.arange(64).reshape(8, 8) % 2).astype(np.uint8) * 255).save(tmp_path / "masks" / f"{i}.png")
    ds = load_dataset(str(tmp_path))
    assert ds.has_data_masks and ds.kind == "float32"
    y, m = ds.batch([0, 1])
    assert bool((y[m == 0] == 0).all())


# ---------------------------------------------------------------------------- bad data
def _bad_npz(tmp: Path):
    """(name, arrays, texts the one-line message must hold)."""
    x = _floats()
    nan = x.copy()
    nan[2, 3, 4], nan[4, 0, 0] = np.nan, np.inf
    return [
        ("nan.npz", {"images": nan}, ["nan.npz", "'images'", "2 NaN or ±inf", "image 2", "row 3, column 4"]),
        ("inf.npz", {"images": np.where(x > 290, -np.inf, x)}, ["inf.npz", "'images'", "-inf"]),
        ("vr_one.npz", {"images": x, "value_range": np.array([1.0])}, ["vr_one.npz", "'value_range'", "2 finite"]),
        ("vr_order.npz", {"images": x, "value_range": np.array([3.0, 1.0])}, ["vr_order.npz", "lo < hi"]),
        ("vr_nan.npz", {"images": x, "value_range": np.array([0.0, np.nan])}, ["vr_nan.npz", "'value_range'"]),
        ("vr_text.npz", {"images": x, "value_range": np.array(["0", "1"])}, ["vr_text.npz", "'value_range'"]),
        ("far.npz", {"images": x, "value_range": np.array([0.0, 1.0])},
         ["far.npz", "'images'", "outside value_range [0, 1]", "384 value(s)"]),
        ("complex.npz", {"images": x.astype(np.complex64)}, ["complex.npz", "'images'", "complex", "'y'", "operator"]),
        ("int16.npz", {"images": x.astype(np.int16)},
         ["int16.npz", "'images'", "int16", "uint8, uint16, float16, float32, float64", "images.astype(np.float32)"]),
        ("const.npz", {"images": np.full((2, 4, 4), 7.0, np.float32)}, ["const.npz", "7", "value_range"]),
    ]


def test_bad_float_data_is_one_line_naming_file_and_array(tmp_path):
    for name, arrays, needles in _bad_npz(tmp_path):
        np.savez(tmp_path / name, **arrays)
        _error(lambda name=name: load_dataset(str(tmp_path / name)), *needles)


def test_bad_tiff_names_the_file(tmp_path):
    f = _floats(n=3)
    f[1, 5, 6] = np.nan
    for i, a in enumerate(f):
        Image.fromarray(a).save(tmp_path / f"{i}.tif")
    _error(lambda: load_dataset(str(tmp_path)), "1.tif", "NaN", "row 5, column 6")
    (tmp_path / "1.tif").unlink()
    (tmp_path / "dataset.json").write_text(json.dumps({"value_range": [1, "x"]}))
    _error(lambda: load_dataset(str(tmp_path)), "dataset.json", "'value_range'")


def test_cli_refuses_bad_float_data_writing_nothing(tmp_path, capsys):
    np.savez(tmp_path / "nan.npz", images=np.full((4, 8, 8), np.nan, np.float32))
    out = tmp_path / "run"
    code, _, err = run(["train", "--data", str(tmp_path / "nan.npz"), "--outdir", str(out), "--kimg", "0.008",
                        *TINY], capsys)
    assert code == 2 and "nan.npz" in err and "'images'" in err and "NaN" in err
    assert not out.exists() or not any(out.iterdir())


# ---------------------------------------------------------------------------- train -> sample
def test_old_runs_are_uint8():
    assert data_section({}) == {"value_range": [0.0, 255.0], "dtype": "uint8"}
    assert data_units({"data": {"shape": [1, 8, 8]}}) == ((0.0, 255.0), "uint8")
    assert data_units({"data": {"value_range": [100, 300], "dtype": "float32"}}) == ((100.0, 300.0), "float32")


def test_train_records_range_and_sample_gives_original_units(tmp_path, capsys):
    x = _floats(n=16, lo=100.0, hi=300.0, seed=5)
    np.savez(tmp_path / "f.npz", images=x)
    out = tmp_path / "run"
    code, stdout, _ = run(["train", "--data", str(tmp_path / "f.npz"), "--outdir", str(out), "--dry-run",
                           "--corruption-probability", "0.5"], capsys)
    resolved = json.loads(stdout)
    assert code == 0 and resolved["data_units"]["dtype"] == "float32"
    assert resolved["data_units"]["value_range"] == [float(x.min()), float(x.max())]
    code, _, err = run(["train", "--data", str(tmp_path / "f.npz"), "--outdir", str(out), "--kimg", "0.016",
                        "--corruption-probability", "0.5", *TINY], capsys)
    assert code == 0, err
    assert "per-dataset scaling" in err
    config = json.loads((out / "config.json").read_text())
    lo, hi = float(x.min()), float(x.max())
    assert config["data"]["value_range"] == [lo, hi] and config["data"]["dtype"] == "float32"

    npz = tmp_path / "s.npz"
    code, stdout, err = run(["sample", "--model", str(out), "--num", "3", "--out", str(npz), "--steps", "4",
                             "--clip", "static"], capsys)
    assert code == 0, err
    assert "units" in stdout
    with np.load(npz) as z:
        images, vr, u8 = z["images"], z["value_range"], z["images_uint8"]
    assert images.dtype == np.float32 and images.shape == (3, 8, 8, 1) and u8.dtype == np.uint8
    assert vr.tolist() == [lo, hi]
    assert images.min() >= lo - 1e-3 * (hi - lo) and images.max() <= hi + 1e-3 * (hi - lo)  # static clip: in range
    np.testing.assert_allclose((images - lo) / (hi - lo) * 255, u8, atol=1.0)
    # the samples read back as data in the same units
    back = load_dataset(str(npz))
    assert back.value_range == (lo, hi) and back.kind == "float32"
    # a folder of samples: PNGs and images_float.npz
    folder = tmp_path / "pngs"
    code, _, err = run(["sample", "--model", str(out), "--num", "2", "--out", str(folder), "--steps", "3"], capsys)
    assert code == 0, err
    assert len(list(folder.glob("*.png"))) == 2
    with np.load(folder / "images_float.npz") as z:
        assert z["images"].dtype == np.float32 and z["value_range"].tolist() == [lo, hi]
    # resuming with data whose range differs is refused
    np.savez(tmp_path / "g.npz", images=x, value_range=np.array([0.0, 400.0]))
    code, _, err = run(["train", "--data", str(tmp_path / "g.npz"), "--outdir", str(out), "--kimg", "0.032",
                        "--corruption-probability", "0.5", *TINY], capsys)
    assert code == 2 and "value_range" in err and "0..400" in err


def test_uint8_model_samples_stay_uint8(tmp_path, capsys):
    np.savez(tmp_path / "d.npz", images=blobs(16, 8, 1, 0))
    out = tmp_path / "run"
    code, _, err = run(["train", "--data", str(tmp_path / "d.npz"), "--outdir", str(out), "--kimg", "0.008",
                        "--corruption-probability", "0.5", *TINY], capsys)
    assert code == 0, err
    assert json.loads((out / "config.json").read_text())["data"]["value_range"] == [0.0, 255.0]
    code, _, err = run(["sample", "--model", str(out), "--num", "2", "--out", str(tmp_path / "s.npz"),
                        "--steps", "3"], capsys)
    assert code == 0, err
    with np.load(tmp_path / "s.npz") as z:
        assert set(z.files) == {"images"} and z["images"].dtype == np.uint8
