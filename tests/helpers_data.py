"""Tiny datasets written to disk for CLI and training tests."""

from pathlib import Path

import numpy as np
from PIL import Image


def blobs(n: int = 24, size: int = 8, channels: int = 1, seed: int = 0) -> np.ndarray:
    """uint8 (N, H, W[, C]) images: bright squares at random places on a dark background."""
    rng = np.random.default_rng(seed)
    out = np.full((n, size, size, channels), 20, dtype=np.uint8)
    for i in range(n):
        r, c = rng.integers(0, size - 3, 2)
        out[i, r:r + 3, c:c + 3] = rng.integers(150, 255, channels)
    return out[..., 0] if channels == 1 else out


def write_npz(path: Path, n=24, size=8, channels=1, masks=None, seed=0) -> Path:
    arrays = {"images": blobs(n, size, channels, seed)}
    if masks is not None:
        arrays["masks"] = masks
    np.savez(path, **arrays)
    return path


def write_folder(root: Path, n=12, size=8, with_masks=False, seed=0) -> Path:
    images = blobs(n, size, 1, seed)
    img_dir = root / "images" if with_masks else root
    img_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed + 1)
    for i, im in enumerate(images):
        Image.fromarray(im).save(img_dir / f"{i:03d}.png")
        if with_masks:
            (root / "masks").mkdir(exist_ok=True)
            m = (rng.random((size, size)) < 0.6).astype(np.uint8) * 255
            Image.fromarray(m).save(root / "masks" / f"{i:03d}.png")
    return root
