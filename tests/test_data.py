"""Data loading: specs, data masks vs drawn masks, items and batches, augmentation, bad input."""

from __future__ import annotations

import gzip
import json
import shutil
import struct
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from ambient.data.corruption import Corruption
from ambient.data.datasets import ImageDataset, augment_batch, load_dataset, load_images
from ambient.data.images import encode_png, images_uint8_to_float, save_png
from ambient.data.readers import FASHION_FILES, SYSTEM_FASHION_DIR
from ambient.errors import AmbientInputError

RNG = np.random.default_rng(1234)


def _images(n=5, h=8, w=8, c=1, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, c), dtype=np.uint8)


def _write_folder(folder: Path, images: np.ndarray, names=None) -> list[Path]:
    paths = []
    for i, img in enumerate(images):
        path = folder / (names[i] if names else f"{i:03d}.png")
        save_png(path, img)
        paths.append(path)
    return paths


def _one_line_error(fn, *needles):
    with pytest.raises(AmbientInputError) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg
    for needle in needles:
        assert needle in msg, msg
    return msg


# ---------------------------------------------------------------------------- sources
def test_folder_recursive_sorted_grayscale(tmp_path):
    imgs = _images(4)
    names = ["b/x.png", "a.png", "b/a.png", "c.png"]
    _write_folder(tmp_path, imgs, names)
    (tmp_path / "notes.txt").write_text("not an image")
    ds = load_dataset(str(tmp_path))
    order = sorted(range(4), key=lambda i: names[i])  # a.png, b/a.png, b/x.png, c.png
    assert ds.images.shape == (4, 1, 8, 8) and ds.images.dtype == torch.uint8
    assert torch.equal(ds.images, torch.from_numpy(imgs[order]).permute(0, 3, 1, 2))
    assert ds.channels == 1 and ds.resolution == 8 and ds.source == str(tmp_path)
    assert not ds.has_data_masks and ds.observed_share == 1.0 and ds.labels is None


def test_folder_rgb_jpeg_and_labels(tmp_path):
    smooth = np.tile(np.linspace(0, 255, 8, dtype=np.uint8)[None, :, None], (8, 1, 3))
    Image.fromarray(smooth).save(tmp_path / "a.jpg", quality=95)
    Image.fromarray(smooth[::-1].copy()).save(tmp_path / "b.jpeg", quality=95)
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": [["b.jpeg", 7], ["a.jpg", 3]]}))
    ds = load_dataset(str(tmp_path))
    assert ds.images.shape == (2, 3, 8, 8)
    assert (ds.images[0].permute(1, 2, 0).int() - torch.from_numpy(smooth).int()).abs().max() < 12
    assert ds.labels.tolist() == [3, 7]
    assert ds[1]["label"] == 7


def test_edm_zip_with_labels(tmp_path):
    imgs = _images(3, c=3)
    with zipfile.ZipFile(tmp_path / "d.zip", "w") as zf:
        for i in (2, 0, 1):  # written out of order: loading sorts the names
            zf.writestr(f"00000/img{i:08d}.png", encode_png(imgs[i]))
        labels = [[f"00000/img{i:08d}.png", i + 1] for i in range(3)]
        zf.writestr("dataset.json", json.dumps({"labels": labels}))
    ds = load_dataset(str(tmp_path / "d.zip"), max_size=2)
    assert torch.equal(ds.images, torch.from_numpy(imgs[:2]).permute(0, 3, 1, 2))
    assert ds.labels.tolist() == [1, 2]
    with zipfile.ZipFile(tmp_path / "plain.zip", "w") as zf:
        zf.writestr("a.png", encode_png(imgs[0]))
    assert load_dataset(str(tmp_path / "plain.zip")).labels is None


@pytest.mark.parametrize("channels", [None, 1, 3])
def test_npz_images_and_masks(tmp_path, channels):
    imgs = _images(4, c=channels or 1)
    imgs = imgs[..., 0] if channels is None else imgs
    masks = RNG.integers(0, 2, imgs.shape[:3]).astype(bool)  # (N, H, W): broadcast to every channel
    np.savez(tmp_path / "d.npz", images=imgs, masks=masks, labels=np.arange(4))
    ds = load_dataset(str(tmp_path / "d.npz"), max_size=3)
    c = channels or 1
    assert ds.images.shape == (3, c, 8, 8) and ds.masks.shape == (3, c, 8, 8)
    expected_mask = torch.from_numpy(masks[:3]).to(torch.uint8)[:, None].expand(3, c, 8, 8)
    assert torch.equal(ds.masks, expected_mask)
    assert ds.has_data_masks and ds.labels.tolist() == [0, 1, 2]
    assert ds.observed_share == pytest.approx(float(masks[:3].mean()))


def test_resolution_resizes_images_lanczos_masks_nearest(tmp_path):
    imgs = _images(2, h=8, w=12, c=3)
    masks = RNG.integers(0, 2, (2, 8, 12)).astype(np.uint8)
    np.savez(tmp_path / "d.npz", images=imgs, masks=masks)
    ds = load_dataset(str(tmp_path / "d.npz"))
    assert (ds.height, ds.width) == (8, 12)
    _one_line_error(lambda: ds.resolution, "not square", "--resolution")
    ds = load_dataset(str(tmp_path / "d.npz"), resolution=16)
    assert ds.images.shape == (2, 3, 16, 16) and ds.resolution == 16
    ref = np.asarray(Image.fromarray(imgs[0]).resize((16, 16), Image.Resampling.LANCZOS))
    resized = load_images(str(tmp_path / "d.npz"), resolution=16)
    assert np.array_equal(resized[0].permute(1, 2, 0).numpy(), ref)
    assert set(ds.masks.unique().tolist()) <= {0, 1}
    near = np.asarray(Image.fromarray(masks[1]).resize((16, 16), Image.Resampling.NEAREST))
    assert np.array_equal(ds.masks[1, 0].numpy(), near)


def _write_idx(path: Path, arr: np.ndarray):
    head = bytes((0, 0, 8, arr.ndim)) + struct.pack(f">{arr.ndim}I", *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(head + arr.astype(np.uint8).tobytes())


def test_fashion_mnist_idx_from_data_dir_and_env(tmp_path, monkeypatch):
    imgs = _images(6, h=28, w=28)[..., 0]
    for split in ("train", "test"):
        _write_idx(tmp_path / FASHION_FILES[split][0], imgs if split == "train" else imgs[:2])
        _write_idx(tmp_path / FASHION_FILES[split][1], np.arange(6 if split == "train" else 2))
    ds = load_dataset("builtin:fashion-mnist", data_dir=str(tmp_path), max_size=5)
    assert torch.equal(ds.images[:, 0], torch.from_numpy(imgs[:5])) and ds.labels.tolist() == [0, 1, 2, 3, 4]
    monkeypatch.setenv("AMBIENT_DATA", str(tmp_path))
    assert len(load_dataset("builtin:fashion-mnist:test")) == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    _one_line_error(lambda: load_dataset("builtin:fashion-mnist", data_dir=str(empty)),
                    "apt-get install dataset-fashion-mnist", "--data-dir", str(empty))
    # a truncated idx file is named
    _write_idx(empty / FASHION_FILES["train"][1], np.arange(6))
    with gzip.open(empty / FASHION_FILES["train"][0], "wb") as f:
        f.write(bytes((0, 0, 8, 3)) + struct.pack(">3I", 6, 28, 28) + b"\0" * 100)
    _one_line_error(lambda: load_dataset("builtin:fashion-mnist", data_dir=str(empty)),
                    FASHION_FILES["train"][0])


@pytest.mark.skipif(not (SYSTEM_FASHION_DIR / FASHION_FILES["train"][0]).exists(),
                    reason="dataset-fashion-mnist is not installed")
def test_builtin_fashion_mnist_system_files(monkeypatch):
    monkeypatch.delenv("AMBIENT_DATA", raising=False)
    start = time.perf_counter()
    ds = load_dataset("builtin:fashion-mnist", corruption=Corruption("dust", 0.8))
    elapsed = time.perf_counter() - start
    assert ds.images.shape == (60000, 1, 28, 28) and ds.labels.shape == (60000,)
    assert set(ds.labels.unique().tolist()) == set(range(10))
    assert 60 < ds.images.float().mean() < 90  # Fashion-MNIST's mean pixel is about 73
    assert elapsed < 5.0, f"loading took {elapsed:.2f} s"
    test = load_dataset("builtin:fashion-mnist:test", max_size=100)
    assert len(test) == 100 and not torch.equal(test.images, ds.images[:100])


def test_builtin_digits():
    pytest.importorskip("sklearn")
    ds = load_dataset("builtin:digits")
    assert ds.images.shape == (1797, 1, 8, 8) and ds.images.max() == 255 and ds.images.min() == 0
    assert ds.labels.shape == (1797,) and set(ds.labels.tolist()) == set(range(10))
    assert len(load_dataset("builtin:digits", max_size=10)) == 10


# ---------------------------------------------------------------------------- masks
def test_data_masks_from_folder_zero_hidden_pixels_and_ignore_their_values(tmp_path):
    imgs = _images(3, c=3)
    masks = RNG.integers(0, 2, (3, 8, 8)).astype(np.uint8)
    for root, fill in (("a", 0), ("b", 1)):
        noisy = imgs.copy()
        if fill:  # different values at every unobserved pixel
            noisy[masks == 0] = RNG.integers(0, 256, (int((masks == 0).sum()), 3), dtype=np.uint8)
        _write_folder(tmp_path / root / "images", noisy, ["x/0.png", "1.png", "2.png"])
        save_png(tmp_path / root / "masks" / "x" / "0.png", masks[0] * 255)  # 0/255 grayscale
        save_png(tmp_path / root / "masks" / "1.png", masks[1])  # 0/1 grayscale
        save_png(tmp_path / root / "masks" / "2.png", np.repeat(masks[2][..., None], 3, axis=2))  # RGB
    a = load_dataset(str(tmp_path / "a"), corruption=Corruption("dust", 0.5), seed=3)
    b = load_dataset(str(tmp_path / "b"), corruption=Corruption("dust", 0.5), seed=3)
    order = [1, 2, 0]  # 1.png, 2.png, x/0.png
    assert torch.equal(a.masks[:, 0], torch.from_numpy(masks[order]))
    assert a.has_data_masks and a.observed_share == pytest.approx(masks.mean())
    for i in range(3):
        ia, ib = a[i], b[i]
        assert torch.equal(ia["image"], ib["image"]) and torch.equal(ia["mask"], ib["mask"])
        assert torch.equal(ia["mask"][0], torch.from_numpy(masks[order[i]]).float())  # A from data, not drawn
        assert (ia["image"][ia["mask"] == 0] == 0).all()
    assert torch.equal(a.images, b.images) and torch.equal(a.batch([0, 2])[0], b.batch([0, 2])[0])


def test_drawn_masks_are_reproducible_per_seed_and_index(tmp_path):
    np.savez(tmp_path / "d.npz", images=_images(6, c=3))
    corr = Corruption("dust", 0.6)
    a = load_dataset(str(tmp_path / "d.npz"), corruption=corr, seed=7)
    b = load_dataset(str(tmp_path / "d.npz"), corruption=corr, seed=7)
    c = load_dataset(str(tmp_path / "d.npz"), corruption=corr, seed=8)
    assert not a.has_data_masks and a.masks is None
    assert a.observed_share == pytest.approx(0.4)
    for i in range(6):
        assert torch.equal(a[i]["mask"], b[i]["mask"])
        assert torch.equal(a[i]["mask"], corr.mask_for_index(7, i, (3, 8, 8)))
    assert torch.equal(a[5]["mask"], b.batch([5])[1][0])  # cached (a) and fresh (b) agree
    assert not torch.equal(a[0]["mask"], a[1]["mask"])
    assert not torch.equal(a[0]["mask"], c[0]["mask"])
    a.seed = 8  # the cache follows the seed
    assert torch.equal(a[0]["mask"], c[0]["mask"])
    clean = load_dataset(str(tmp_path / "d.npz"))
    assert (clean[0]["mask"] == 1).all() and clean.observed_share == 1.0


def test_item_is_masked_image_in_range(tmp_path):
    np.savez(tmp_path / "d.npz", images=_images(4, c=3))
    ds = load_dataset(str(tmp_path / "d.npz"), corruption=Corruption("box", 0.5), seed=1)
    item = ds[2]
    assert set(item) == {"image", "mask", "index"} and item["index"] == 2
    assert item["image"].dtype == torch.float32 and item["mask"].dtype == torch.float32
    x0 = images_uint8_to_float(ds.images[2])
    assert torch.equal(item["image"], x0 * item["mask"])
    assert item["image"].abs().max() <= 1.0 and 0 < item["mask"].mean() < 1
    assert ds[-1]["index"] == 3
    with pytest.raises(IndexError):
        ds[4]
    loader = torch.utils.data.DataLoader(ds, batch_size=4)
    batch = next(iter(loader))
    imgs, masks = ds.batch(torch.arange(4))
    assert torch.equal(batch["image"], imgs) and torch.equal(batch["mask"], masks)


@pytest.mark.parametrize("pattern", ["dust", "box"])
def test_batch_matches_items_and_is_fast(pattern):
    images = torch.randint(0, 256, (2000, 1, 28, 28), dtype=torch.uint8)
    ds = ImageDataset(images, corruption=Corruption(pattern, 0.5), seed=2, cache_masks=False)
    idx = torch.randint(0, 2000, (64,), generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    imgs, masks = ds.batch(idx)
    elapsed = time.perf_counter() - start
    assert imgs.shape == masks.shape == (64, 1, 28, 28)
    for j in (0, 17, 63):
        item = ds[int(idx[j])]
        assert torch.equal(imgs[j], item["image"]) and torch.equal(masks[j], item["mask"])
    assert elapsed < 0.5, f"batch of 64 took {elapsed:.3f} s"
    ds.cache_masks = True
    assert torch.equal(ds.batch(idx)[1], masks) and torch.equal(ds.batch(idx)[1], masks)


def test_imagedataset_rejects_bad_arguments():
    images = torch.zeros(2, 1, 4, 4, dtype=torch.uint8)
    with pytest.raises(ValueError, match="images"):
        ImageDataset(images.to(torch.int16))  # float images (model units) are taken: see test_float_data.py
    with pytest.raises(ValueError, match="value_range"):
        ImageDataset(images, value_range=(0, 1))
    with pytest.raises(ValueError, match="masks"):
        ImageDataset(images, masks=torch.full_like(images, 2))
    with pytest.raises(ValueError, match="labels"):
        ImageDataset(images, labels=torch.zeros(3))


# ---------------------------------------------------------------------------- augmentation
def test_augment_flips_images_and_all_masks_together():
    g = torch.Generator().manual_seed(0)
    n = 64
    x = torch.rand(n, 3, 6, 6, generator=g)
    mask = (torch.rand(n, 3, 6, 6, generator=g) < 0.5).float()
    mask_hat = mask * (torch.rand(n, 3, 6, 6, generator=g) < 0.5).float()
    y = x * mask
    g1 = torch.Generator().manual_seed(1)
    out_y, out_mask, (out_hat,) = augment_batch(y, mask, 0.5, g1, extra=[mask_hat])
    flipped = [not torch.equal(out_y[i], y[i]) for i in range(n)]
    assert 10 < sum(flipped) < 54
    for i in range(n):
        ref = (lambda t: t.flip(-1)) if flipped[i] else (lambda t: t)
        assert torch.equal(out_y[i], ref(y[i]))
        assert torch.equal(out_mask[i], ref(mask[i])) and torch.equal(out_hat[i], ref(mask_hat[i]))
    assert torch.equal(out_y, out_y * out_mask)  # no clean pixel outside A
    assert torch.equal(out_hat * out_mask, out_hat)  # still Ã ⊆ A
    again = augment_batch(y, mask, 0.5, torch.Generator().manual_seed(1), extra=mask_hat)
    assert torch.equal(again[0], out_y) and torch.equal(again[2], out_hat)
    assert torch.equal(augment_batch(y, mask, 1.0, g)[1], mask.flip(-1))
    none = augment_batch(y, None, 0.0, g)
    assert torch.equal(none[0], y) and none[1] is None and none[2] is None
    with pytest.raises(ValueError, match="prob"):
        augment_batch(y, mask, 1.5, g)
    with pytest.raises(ValueError, match="masks"):
        augment_batch(y, mask[:3], 0.5, g)


# ---------------------------------------------------------------------------- bad input
def _bad_inputs(tmp: Path):
    """(description, spec, kwargs, text the message must contain)."""
    imgs = _images(3)
    cases = []
    cases.append(("missing", str(tmp / "nope"), {}, "nope"))
    cases.append(("empty spec", "", {}, "empty"))
    (tmp / "empty").mkdir()
    cases.append(("empty folder", str(tmp / "empty"), {}, "no image files"))
    (tmp / "text").mkdir()
    (tmp / "text" / "a.txt").write_text("hi")
    cases.append(("no images", str(tmp / "text"), {}, "other file"))
    _write_folder(tmp / "trunc", imgs)
    data = (tmp / "trunc" / "001.png").read_bytes()
    (tmp / "trunc" / "001.png").write_bytes(data[: len(data) // 2])
    cases.append(("truncated", str(tmp / "trunc"), {}, "001.png"))
    _write_folder(tmp / "sizes", [imgs[0], imgs[1], _images(1, h=9)[0]])
    cases.append(("mixed sizes", str(tmp / "sizes"), {}, "002.png"))
    _write_folder(tmp / "chans", [imgs[0], _images(1, c=3)[0]])
    cases.append(("mixed channels", str(tmp / "chans"), {}, "001.png"))
    np.savez(tmp / "noimg.npz", pictures=imgs)
    cases.append(("npz without images", str(tmp / "noimg.npz"), {}, "pictures"))
    np.savez(tmp / "int16.npz", images=imgs.astype(np.int16))
    cases.append(("int16 images", str(tmp / "int16.npz"), {}, "astype(np.float32)"))
    np.savez(tmp / "ndim.npz", images=imgs[0, :, :, 0])
    cases.append(("wrong ndim", str(tmp / "ndim.npz"), {}, "shape"))
    np.savez(tmp / "mval.npz", images=imgs, masks=np.full(imgs.shape, 2))
    cases.append(("mask values", str(tmp / "mval.npz"), {}, "mval.npz"))
    np.savez(tmp / "mshape.npz", images=imgs, masks=np.ones((3, 4, 4)))
    cases.append(("mask shape", str(tmp / "mshape.npz"), {}, "(3, 4, 4)"))
    _write_folder(tmp / "pair" / "images", imgs)
    _write_folder(tmp / "pair" / "masks", np.ones((2, 8, 8, 1), np.uint8))
    cases.append(("mask file missing", str(tmp / "pair"), {}, "002.png"))
    _write_folder(tmp / "mbad" / "images", imgs[:1])
    save_png(tmp / "mbad" / "masks" / "000.png", np.full((8, 8), 7, np.uint8))
    cases.append(("mask png values", str(tmp / "mbad"), {}, "000.png"))
    _write_folder(tmp / "msize" / "images", imgs[:1])
    save_png(tmp / "msize" / "masks" / "000.png", np.ones((4, 4), np.uint8))
    cases.append(("mask png size", str(tmp / "msize"), {}, "000.png"))
    (tmp / "bad.zip").write_bytes(b"not a zip")
    cases.append(("bad zip", str(tmp / "bad.zip"), {}, "bad.zip"))
    (tmp / "bad.npz").write_bytes(b"not an npz")
    cases.append(("bad npz", str(tmp / "bad.npz"), {}, "bad.npz"))
    (tmp / "x.csv").write_text("1,2")
    cases.append(("unsupported file", str(tmp / "x.csv"), {}, "x.csv"))
    cases.append(("unknown builtin", "builtin:cifar", {}, "builtin:cifar"))
    cases.append(("digits split", "builtin:digits:test", {}, "digits"))
    cases.append(("bad max size", str(tmp / "float.npz"), {"max_size": 0}, "--max-size"))
    cases.append(("bad resolution", str(tmp / "float.npz"), {"resolution": -3}, "--resolution"))
    _write_folder(tmp / "lab", imgs[:2])
    (tmp / "lab" / "dataset.json").write_text(json.dumps({"labels": [["000.png", 1]]}))
    cases.append(("label missing", str(tmp / "lab"), {}, "001.png"))
    return cases


def test_bad_input_gives_one_line_naming_the_problem(tmp_path):
    for what, spec, kwargs, needle in _bad_inputs(tmp_path):
        msg = _one_line_error(lambda spec=spec, kwargs=kwargs: load_dataset(spec, **kwargs), needle)
        assert msg, what


def test_relative_path_is_found_in_data_dir(tmp_path):
    _write_folder(tmp_path / "sub", _images(2))
    assert len(load_dataset("sub", data_dir=str(tmp_path))) == 2
    shutil.rmtree(tmp_path / "sub")
    _one_line_error(lambda: load_dataset("sub", data_dir=str(tmp_path)), "sub")


# ---------------------------------------------------------------------------- properties
DTYPES = [np.bool_, np.uint8, np.int8, np.int32, np.int64, np.float16, np.float32, np.float64, np.complex64]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(1, 3), h=st.integers(1, 5), w=st.integers(1, 5), c=st.sampled_from([None, 1, 3, 4]),
       mask_shape=st.sampled_from(["same", "nhw", "nhw1", "wrong", "flat"]),
       dtype=st.sampled_from(DTYPES), values=st.sampled_from(["01", "any", "nan"]),
       image_dtype=st.sampled_from([np.uint8, np.uint8, np.int16]), data=st.data())
def test_npz_masks_give_dataset_or_input_error(tmp_path, n, h, w, c, mask_shape, dtype, values, image_dtype,
                                               data):
    seed = data.draw(st.integers(0, 2**31))
    rng = np.random.default_rng(seed)
    ishape = (n, h, w) if c is None else (n, h, w, c)
    images = rng.integers(0, 256, ishape).astype(image_dtype)
    mshape = {"same": ishape, "nhw": (n, h, w), "nhw1": (n, h, w, 1), "wrong": (n, h + 1, w),
              "flat": (n, h * w)}[mask_shape]
    raw = rng.integers(0, 2, mshape).astype(np.float64)
    if values == "any":
        raw = raw * rng.choice([1, 2, -1, 0.5], size=mshape)
    elif values == "nan" and raw.size:
        raw.flat[0] = np.nan
    with np.errstate(invalid="ignore"):
        masks = raw.astype(dtype)
    path = tmp_path / "p.npz"
    np.savez(path, images=images, masks=masks)
    try:
        ds = load_dataset(str(path), corruption=Corruption("dust", 0.5))
    except AmbientInputError as exc:
        assert "\n" not in str(exc) and "p.npz" in str(exc)
        return
    # accepted: then everything about it is right
    ok_values = np.isin(masks, (0, 1)).all()
    assert image_dtype == np.uint8 and c in (None, 1, 3) and ok_values
    assert mask_shape in ("same", "nhw", "nhw1")
    channels = c or 1
    assert ds.images.shape == ds.masks.shape == (n, channels, h, w)
    expected = torch.from_numpy(masks.reshape(n, h, w, -1).astype(np.uint8)).permute(0, 3, 1, 2)
    assert torch.equal(ds.masks, expected.expand(n, channels, h, w))
    item = ds[n - 1]
    assert torch.equal(item["mask"], ds.masks[n - 1].float())
    assert (item["image"][item["mask"] == 0] == 0).all()
