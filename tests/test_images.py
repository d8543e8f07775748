"""Image I/O: uint8 <-> float, decoding modes, PNG / grid / npz / folder writers."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from ambient.data.datasets import load_dataset, load_images
from ambient.data.images import (
    float_to_uint8,
    images_uint8_to_float,
    make_grid,
    read_image,
    save_grid,
    save_images_folder,
    save_images_npz,
    save_png,
)
from ambient.errors import AmbientInputError


def test_uint8_float_round_trip_is_exact_and_clamps():
    levels = torch.arange(256, dtype=torch.uint8)
    x = images_uint8_to_float(levels)
    assert x.dtype == torch.float32
    assert x.min() == -1.0 and x.max() == 1.0
    assert torch.equal(float_to_uint8(x), levels)
    # rounding to the nearest level, and clamping outside [-1, 1]
    assert float_to_uint8(torch.tensor([-5.0, 5.0, 0.0, 1.4 / 127.5 - 1])).tolist() == [0, 255, 128, 1]


@pytest.mark.parametrize("mode,channels", [("L", 1), ("RGB", 3), ("RGBA", 3), ("LA", 1), ("P", 3), ("1", 1)])
def test_read_image_modes(tmp_path, mode, channels):
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (8, 8, 4), dtype=np.uint8)
    im = Image.fromarray(rgba, "RGBA").convert(mode)
    im.save(tmp_path / "a.png")
    arr = read_image(tmp_path / "a.png")
    assert arr.shape == (8, 8, channels) and arr.dtype == np.uint8
    if mode == "RGBA":  # alpha dropped, colours kept as they are (no blending)
        assert np.array_equal(arr, rgba[..., :3])


def test_read_image_16bit_is_scaled(tmp_path):
    arr16 = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)
    Image.fromarray(arr16).save(tmp_path / "a.png")
    arr = read_image(tmp_path / "a.png")
    assert arr.shape == (8, 8, 1)
    assert np.array_equal(arr[..., 0], np.rint(arr16 / 257).astype(np.uint8))


def test_read_image_truncated_names_the_file(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(buf, format="PNG")
    (tmp_path / "cut.png").write_bytes(buf.getvalue()[:40])
    with pytest.raises(AmbientInputError, match="cut.png"):
        read_image(tmp_path / "cut.png")


def test_save_png_layouts_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    hwc = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    save_png(tmp_path / "a.png", hwc)
    assert np.array_equal(read_image(tmp_path / "a.png"), hwc)
    save_png(tmp_path / "b.png", torch.from_numpy(hwc).permute(2, 0, 1))  # tensor = CHW
    assert np.array_equal(read_image(tmp_path / "b.png"), hwc)
    gray = rng.integers(0, 256, (5, 7), dtype=np.uint8)
    save_png(tmp_path / "c.png", gray)
    assert np.array_equal(read_image(tmp_path / "c.png")[..., 0], gray)
    x = torch.rand(1, 5, 7) * 2 - 1  # float CHW in [-1, 1]
    save_png(tmp_path / "d.png", x)
    assert np.array_equal(read_image(tmp_path / "d.png")[..., 0], float_to_uint8(x)[0].numpy())
    with pytest.raises(ValueError):
        save_png(tmp_path / "e.png", torch.zeros(2, 5, 7, dtype=torch.uint8))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.png", "c.png", "d.png"]


def test_make_grid_places_tiles_row_major():
    imgs = torch.arange(5, dtype=torch.uint8).mul(40).reshape(5, 1, 1, 1).expand(5, 3, 4, 6).contiguous()
    grid = make_grid(imgs, nrow=2, padding=1)
    assert grid.shape == (3 * 4 + 2, 2 * 6 + 1, 3) and grid.dtype == np.uint8
    for i in range(5):
        r, c = divmod(i, 2)
        tile = grid[r * 5:r * 5 + 4, c * 7:c * 7 + 6]
        assert (tile == 40 * i).all()
    assert (grid[10:, 7:] == 0).all()  # the empty cell
    assert (grid[4] == 0).all() and (grid[:, 6] == 0).all()  # padding
    # float input in [-1, 1] and numpy NHWC input agree with the uint8 tensor path
    assert np.array_equal(make_grid(images_uint8_to_float(imgs), 2), make_grid(imgs, 2))
    assert np.array_equal(make_grid(imgs.permute(0, 2, 3, 1).numpy(), 3), make_grid(imgs, 3))
    assert make_grid(imgs, nrow=10).shape == (4, 30, 3)


def test_save_grid_is_atomic_and_readable(tmp_path):
    imgs = torch.rand(6, 1, 8, 8) * 2 - 1
    path = save_grid(tmp_path / "sub" / "grid.png", imgs, nrow=3)
    assert read_image(path).shape == (16, 24, 1)
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["grid.png"]


def test_npz_and_folder_writers_read_back(tmp_path):
    imgs = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    masks = torch.randint(0, 2, (4, 1, 8, 8), dtype=torch.uint8).expand(4, 3, 8, 8)
    save_images_npz(tmp_path / "x.npz", imgs, masks)
    ds = load_dataset(str(tmp_path / "x.npz"))
    assert torch.equal(ds.masks, masks) and torch.equal(ds.images, imgs * masks)
    assert torch.equal(load_images(str(tmp_path / "x.npz")), imgs)
    paths = save_images_folder(tmp_path / "out", imgs, start=10)
    assert [p.name for p in paths] == ["000010.png", "000011.png", "000012.png", "000013.png"]
    assert torch.equal(load_images(str(tmp_path / "out")), imgs)
    with pytest.raises(ValueError):
        save_images_npz(tmp_path / "y.npz", imgs, masks * 2)


def test_written_files_get_the_usual_permissions(tmp_path):
    import os
    import stat

    import numpy as np

    from ambient.data.images import save_png

    path = save_png(tmp_path / "a.png", np.zeros((4, 4, 1), np.uint8))
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask


def test_shape_errors_name_the_expected_layout(tmp_path):
    with pytest.raises(ValueError, match=r"image tensor must be \(C, H, W\), got shape \(1, 1, 5, 7\)"):
        save_png(tmp_path / "a.png", torch.zeros(1, 1, 5, 7))
    with pytest.raises(ValueError, match=r"images tensor must be \(N, C, H, W\)"):
        save_grid(tmp_path / "g.png", torch.zeros(1, 5, 7), nrow=1)
    with pytest.raises(ValueError, match=r"image array must be uint8 \(H, W, C\) or \(H, W\), got float64"):
        save_png(tmp_path / "b.png", np.zeros((5, 7)))
    with pytest.raises(ValueError, match="images must have 1 or 3 channels, got 2"):
        save_images_folder(tmp_path / "f", np.zeros((2, 5, 7, 2), dtype=np.uint8))
    assert not any(tmp_path.rglob("*.png"))
