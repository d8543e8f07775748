"""Image files in and out: decode one image, convert uint8 <-> [-1, 1] and a data set's own units <-> [-1, 1],
write PNGs, grids, npz.

Layout rule, so nothing is guessed from sizes: a ``torch.Tensor`` is channels-first
(CHW, or NCHW for a batch), a ``numpy.ndarray`` is channels-last (HWC / HW, or NHWC / NHW).
Float tensors are taken to be in [-1, 1] and converted with :func:`float_to_uint8`.
Every writer is atomic (:mod:`ambient.io`): a temporary file in the target folder, then a rename.

Decoding (:func:`read_image`): grayscale gives 1 channel, RGB 3; an alpha channel is dropped
(RGBA -> RGB, LA -> L) without blending; palette and other colour modes become RGB; 16-bit
grayscale is scaled to 8 bits. :func:`read_image_data` keeps the bit depth instead: uint16 for 16-bit
grayscale, float32 for floating-point images (PIL mode ``F``, e.g. 32-bit TIFF), int32 for 32-bit integer ones.

Float data (:func:`to_unit_range`, :func:`from_unit_range`): a ``value_range`` (lo, hi) maps lo to -1 and hi to
1, x_norm = 2 (x - lo) / (hi - lo) - 1, the units models work in; uint8 data has value_range (0, 255).
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ambient.errors import AmbientInputError
from ambient.io import atomic_save_npz, atomic_write

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")

_GRAY_MODES = ("L", "1", "LA", "La")


def images_uint8_to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels 0..255 -> float32 in [-1, 1] (v / 127.5 - 1)."""
    return images.to(torch.float32) / 127.5 - 1.0


def float_to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float in [-1, 1] -> uint8 as EDM does: (x * 127.5 + 128).clamp(0, 255), truncated.

    This is rounding to the nearest level, and it inverts :func:`images_uint8_to_float` exactly.
    """
    return (images.to(torch.float32) * 127.5 + 128.0).clamp(0, 255).to(torch.uint8)


def _as_range(value_range) -> tuple[float, float]:
    lo, hi = (float(v) for v in value_range)
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"value_range must be two finite numbers lo < hi, got {[lo, hi]}")
    return lo, hi


def to_unit_range(x: np.ndarray | torch.Tensor, value_range) -> np.ndarray | torch.Tensor:
    """Values in a data set's units -> model units: 2 (x - lo) / (hi - lo) - 1, so lo -> -1 and hi -> 1.

    Computed in float64; returned as float64 for float64 input, else float32 (numpy arrays or torch tensors,
    as given). Values outside [lo, hi] map outside [-1, 1] (nothing is clipped).
    """
    lo, hi = _as_range(value_range)
    if isinstance(x, torch.Tensor):
        out = (x.to(torch.float64) - lo) * (2.0 / (hi - lo)) - 1.0
        return out if x.dtype == torch.float64 else out.to(torch.float32)
    x = np.asarray(x)
    out = (x.astype(np.float64) - lo) * (2.0 / (hi - lo)) - 1.0
    return out if x.dtype == np.float64 else out.astype(np.float32)


def from_unit_range(x: np.ndarray | torch.Tensor, value_range) -> np.ndarray | torch.Tensor:
    """Model units -> a data set's units: (x + 1) (hi - lo) / 2 + lo, the inverse of :func:`to_unit_range`
    (same dtypes: float64 stays float64, anything else gives float32)."""
    lo, hi = _as_range(value_range)
    if isinstance(x, torch.Tensor):
        out = (x.to(torch.float64) + 1.0) * ((hi - lo) / 2.0) + lo
        return out if x.dtype == torch.float64 else out.to(torch.float32)
    x = np.asarray(x)
    out = (x.astype(np.float64) + 1.0) * ((hi - lo) / 2.0) + lo
    return out if x.dtype == np.float64 else out.astype(np.float32)


def read_image_data(source: str | os.PathLike | BinaryIO, name: str | None = None) -> np.ndarray:
    """Decode one image keeping its bit depth, (H, W, C): what :func:`read_image` gives for 8-bit modes (uint8,
    C = 1 or 3); uint16 (C = 1) for 16-bit grayscale (PIL ``I;16``, ``I;16B``, ``I;16L``, and ``I`` from a PNG,
    which holds at most 16 bits); int32 (C = 1) for other 32-bit integer images (``I``, e.g. TIFF); float32
    (C = 1) for floating-point ones (``F``, e.g. 32-bit TIFF). Errors as :func:`read_image`."""
    return _decode(source, name, keep_depth=True)


def read_image(source: str | os.PathLike | BinaryIO, name: str | None = None) -> np.ndarray:
    """Decode one image file to uint8 (H, W, C) with C = 1 or 3 (see module doc for modes).

    ``name`` is used in the error message (default: the path). A truncated or unreadable file
    raises :class:`AmbientInputError` naming it.
    """
    return _decode(source, name, keep_depth=False)


def _decode(source: str | os.PathLike | BinaryIO, name: str | None, keep_depth: bool) -> np.ndarray:
    label = name if name is not None else str(source)
    try:
        with Image.open(source) as im:
            im.load()
            mode = im.mode
            if keep_depth and (mode.startswith("I;16") or (mode == "I" and im.format == "PNG")):
                arr = np.asarray(im).astype(np.uint16)[..., None]
            elif keep_depth and mode == "I":
                arr = np.asarray(im).astype(np.int32)[..., None]
            elif keep_depth and mode == "F":
                arr = np.asarray(im).astype(np.float32)[..., None]
            elif mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(im, dtype=np.float64)
                scale = 257.0 if mode.startswith("I;16") or arr.max(initial=0) > 255 else 1.0
                arr = np.clip(np.rint(arr / scale), 0, 255).astype(np.uint8)[..., None]
            elif mode in _GRAY_MODES:
                arr = np.asarray(im.convert("L"), dtype=np.uint8)[..., None]
            elif mode == "F":
                raise AmbientInputError(f"{label}: a floating-point image, where an 8-bit one is needed")
            elif mode in ("P", "PA", "RGBA", "RGBa"):
                arr = np.asarray(im.convert("RGBA"), dtype=np.uint8)[..., :3]
            else:
                arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except AmbientInputError:
        raise
    except (OSError, SyntaxError, ValueError, UnidentifiedImageError, Image.DecompressionBombError) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise AmbientInputError(f"{label}: cannot read image ({reason})") from None
    return np.ascontiguousarray(arr)


def _channels_last(x: torch.Tensor | np.ndarray, batched: bool) -> np.ndarray:
    """Image(s) to contiguous uint8 channels-last. Tensors are (N,) C, H, W, float in [-1, 1] or uint8;
    arrays are uint8 (N,) H, W(, C). ``batched`` says whether a leading N is expected."""
    what, lead = ("images", "N, ") if batched else ("image", "")
    ndim = 4 if batched else 3
    if isinstance(x, torch.Tensor):
        if x.ndim != ndim:
            raise ValueError(f"{what} tensor must be ({lead}C, H, W), got shape {tuple(x.shape)}")
        if x.dtype != torch.uint8:
            x = float_to_uint8(x)
        arr = x.detach().cpu().movedim(-3, -1).numpy()
    else:
        arr = np.asarray(x)
        if arr.ndim == ndim - 1:
            arr = arr[..., None]
        if arr.ndim != ndim or arr.dtype != np.uint8:
            raise ValueError(f"{what} array must be uint8 ({lead}H, W, C) or ({lead}H, W), got {arr.dtype} {arr.shape}")
    if arr.shape[-1] not in (1, 3):
        raise ValueError(f"{what} must have 1 or 3 channels, got {arr.shape[-1]}")
    return np.ascontiguousarray(arr)


def _to_hwc(image: torch.Tensor | np.ndarray) -> np.ndarray:
    """One image to uint8 (H, W, C): tensors CHW (float in [-1, 1] or uint8), arrays HWC or HW."""
    return _channels_last(image, batched=False)


def _batch_to_nhwc(images: torch.Tensor | np.ndarray) -> np.ndarray:
    """A batch to uint8 (N, H, W, C): tensors NCHW (float or uint8), arrays NHWC or NHW."""
    return _channels_last(images, batched=True)


def save_png(path: str | os.PathLike, image: torch.Tensor | np.ndarray) -> Path:
    """Write one image as PNG (tensor CHW, array HWC/HW; see module doc). Returns the path."""
    arr = _to_hwc(image)
    pil = Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr)
    return atomic_write(path, lambda f: pil.save(f, format="PNG"))


def make_grid(images: torch.Tensor | np.ndarray, nrow: int, padding: int = 0) -> np.ndarray:
    """Tile a batch into one uint8 (H, W, C) image, ``nrow`` images per row, row-major.

    Empty cells of the last row and the ``padding`` pixels between tiles are black.
    """
    if int(nrow) < 1:
        raise ValueError(f"nrow must be >= 1, got {nrow}")
    if int(padding) < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    arr = _batch_to_nhwc(images)
    n, h, w, c = arr.shape
    if n == 0:
        raise ValueError("images must hold at least one image")
    cols = min(int(nrow), n)
    rows = math.ceil(n / cols)
    pad = int(padding)
    grid = np.zeros((rows * h + (rows - 1) * pad, cols * w + (cols - 1) * pad, c), dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, cols)
        top, left = r * (h + pad), q * (w + pad)
        grid[top:top + h, left:left + w] = arr[i]
    return grid


def save_grid(path: str | os.PathLike, images: torch.Tensor | np.ndarray, nrow: int,
              padding: int = 0) -> Path:
    """:func:`make_grid` written as one PNG, atomically."""
    return save_png(path, make_grid(images, nrow, padding))


def save_images_npz(path: str | os.PathLike, images: torch.Tensor | np.ndarray,
                    masks: torch.Tensor | np.ndarray | None = None) -> Path:
    """Write ``images`` as uint8 NHWC under key ``images`` (+ ``masks`` alike) in an npz, atomically.

    The file reads back with ``load_dataset(path)``.
    """
    arrays = {"images": _batch_to_nhwc(images)}
    if masks is not None:
        if isinstance(masks, torch.Tensor):
            if masks.ndim != 4:
                raise ValueError(f"masks tensor must be (N, C, H, W), got shape {tuple(masks.shape)}")
            m = masks.detach().cpu().permute(0, 2, 3, 1).numpy()
        else:
            m = np.asarray(masks)
        m = m.reshape(m.shape + (1,) * (4 - m.ndim)) if m.ndim == 3 else m
        if m.shape[:3] != arrays["images"].shape[:3] or m.shape[3] not in (1, arrays["images"].shape[3]):
            raise ValueError(f"masks shape {m.shape} does not fit images {arrays['images'].shape}")
        if m.size and not np.isin(m, (0, 1)).all():
            raise ValueError("masks must contain only 0 and 1")
        arrays["masks"] = np.ascontiguousarray(m.astype(np.uint8))
    return atomic_save_npz(path, **arrays)


def save_float_images_npz(path: str | os.PathLike, images: torch.Tensor, value_range) -> Path:
    """Write model-unit images (NCHW tensor, [-1, 1]) in a data set's own units, atomically: ``images`` float32
    (N, H, W, C) = :func:`from_unit_range` (nothing clipped), ``value_range`` float64 [lo, hi] and ``images_uint8``
    (N, H, W, C), the uint8 rendering :func:`save_images_npz` writes. The file reads back with
    ``load_dataset(path)`` in the same units."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        raise ValueError("images must be a tensor (N, C, H, W)")
    lo, hi = _as_range(value_range)
    floats = from_unit_range(images.detach().cpu(), (lo, hi)).to(torch.float32).permute(0, 2, 3, 1).contiguous()
    return atomic_save_npz(path, images=floats.numpy(), value_range=np.asarray([lo, hi], dtype=np.float64),
                           images_uint8=_batch_to_nhwc(images.detach().cpu()))


def save_images_folder(directory: str | os.PathLike, images: torch.Tensor | np.ndarray, *,
                       start: int = 0, prefix: str = "") -> list[Path]:
    """Write each image as ``{prefix}{index:06d}.png`` in ``directory`` (index from ``start``)."""
    arr = _batch_to_nhwc(images)
    directory = Path(directory)
    return [save_png(directory / f"{prefix}{start + i:06d}.png", arr[i]) for i in range(arr.shape[0])]


def encode_png(image: torch.Tensor | np.ndarray) -> bytes:
    """PNG bytes of one image (same layouts as :func:`save_png`)."""
    arr = _to_hwc(image)
    buf = io.BytesIO()
    Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr).save(buf, format="PNG")
    return buf.getvalue()


def resize_images(images: np.ndarray, resolution: int, *, nearest: bool = False) -> np.ndarray:
    """Resize uint8 or float32 (N, C, H, W) to (N, C, R, R) with PIL: LANCZOS, or NEAREST for masks.

    Non-square images are stretched to the square. Each channel is resized on its own. uint8 stays uint8
    (clipped to 0..255 as PIL does); float32 is resized in 32-bit float (mode ``F``), not clipped.
    """
    n, c, h, w = images.shape
    if (h, w) == (resolution, resolution):
        return images
    resample = Image.Resampling.NEAREST if nearest else Image.Resampling.LANCZOS
    dtype = np.uint8 if images.dtype == np.uint8 else np.float32
    out = np.empty((n, c, resolution, resolution), dtype=dtype)
    for i in range(n):
        for k in range(c):
            plane = Image.fromarray(np.ascontiguousarray(images[i, k], dtype=dtype))
            out[i, k] = np.asarray(plane.resize((resolution, resolution), resample=resample))
    return out


def list_image_files(folder: Path) -> list[Path]:
    """Image files under ``folder``, recursively, sorted by relative POSIX path; hidden ones skipped."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for f in files:
            if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS):
                found.append(Path(root) / f)
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


BIT_DEPTHS = {"uint8": "8-bit", "uint16": "16-bit", "int32": "32-bit integer", "float32": "floating-point"}


def stack_images(arrays: Sequence[np.ndarray], names: Sequence[str], what: str = "image") -> np.ndarray:
    """Stack HWC arrays of one dtype into (N, C, H, W); the first one of another size, channel count or bit
    depth (dtype) is named."""
    first = arrays[0].shape
    depth = arrays[0].dtype
    for arr, name in zip(arrays, names):
        if arr.dtype != depth:
            said = {d: BIT_DEPTHS.get(str(d), str(d)) for d in (arr.dtype, depth)}
            raise AmbientInputError(
                f"{name}: {what} is {said[arr.dtype]} ({arr.dtype}), but {names[0]} is {said[depth]} ({depth}); "
                f"all must share one bit depth (convert them to one, e.g. all 16-bit PNG)")
        if arr.shape != first:
            raise AmbientInputError(
                f"{name}: {what} is {arr.shape[0]}x{arr.shape[1]} with {arr.shape[2]} channel(s), but "
                f"{names[0]} is {first[0]}x{first[1]} with {first[2]}; "
                "all must share one size and channel count")
    return np.ascontiguousarray(np.stack(arrays).transpose(0, 3, 1, 2))


def to_hwc(images: torch.Tensor) -> np.ndarray:
    return float_to_uint8(images).permute(0, 2, 3, 1).contiguous().numpy()
