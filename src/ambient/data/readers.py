"""Read a data spec into plain arrays: images (N, C, H, W), data masks, labels, and the images' units.

uint8 images stay uint8 (0..255 is the value range, as always). Other images (uint16, float16/32/64 in an
npz; 16-bit PNG, 32-bit integer or float TIFF in a folder or zip) are mapped to model units [-1, 1] with their
value range [lo, hi] (x_norm = 2 (x - lo) / (hi - lo) - 1) and held as float32: the range an npz declares in
``value_range`` (a folder or zip: ``"value_range": [lo, hi]`` in ``dataset.json``), else 0..65535 for uint16,
else the data set's own min and max (per-dataset scaling, said in a notice). Values are checked where they are
observed (masks = 1): NaN / ±inf are refused, and so are values far outside a declared range.

Specs (see :func:`ambient.data.datasets.load_dataset` for the user-facing description):
``builtin:fashion-mnist[:train|test]``, ``builtin:digits``, an image folder (optionally with
``images/`` and ``masks/`` subfolders; labels from its ``dataset.json``, else from class
subfolders), an EDM-style ``.zip``, or an ``.npz``. Every problem
with the input raises :class:`AmbientInputError` with one line naming the file or flag.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import struct
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ambient.data.images import (
    IMAGE_EXTENSIONS,
    list_image_files,
    read_image,
    read_image_data,
    resize_images,
    stack_images,
)
from ambient.errors import AmbientInputError

SYSTEM_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
BUILTINS = ("fashion-mnist", "digits")


UINT8_RANGE = (0.0, 255.0)
UINT16_RANGE = (0.0, 65535.0)
SUPPORTED_DTYPES = ("uint8", "uint16", "float16", "float32", "float64")
# Values whose model units lie beyond ±FAR_OUTSIDE are refused: the declared range is not the data's
# (e.g. [0, 1] for data in 0..255). Nearer ones (noise, a model's samples, EM completions) are kept as they are.
FAR_OUTSIDE = 3.0


@dataclass
class RawData:
    """What a spec holds: images (N, C, H, W), optional uint8 {0,1} masks alike, int64 labels.

    ``images`` is uint8 (``kind`` "uint8", ``value_range`` (0, 255)) or float32 in model units [-1, 1] (any other
    ``kind``: the source's dtype, e.g. "float32", "uint16"; ``value_range``: the source values that map to ±1).
    ``notices``: one-line notes for the user (e.g. per-dataset scaling), each starting with the source.
    """

    images: np.ndarray
    masks: np.ndarray | None = None
    labels: np.ndarray | None = None
    value_range: tuple[float, float] = UINT8_RANGE
    kind: str = "uint8"
    notices: list[str] = field(default_factory=list)


def check_positive(value: int | None, flag: str) -> int | None:
    """None, or ``value`` as a positive int; otherwise AmbientInputError naming ``flag``."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise AmbientInputError(f"{flag} must be a positive integer, got {value!r}")
    return int(value)


def read_source(spec: str, data_dir: str | os.PathLike | None = None, max_size: int | None = None,
                resolution: int | None = None, *, check_range: bool = True) -> RawData:
    """Read ``spec``; keep the first ``max_size`` images; resize to ``resolution``² if given.

    ``check_range=False`` lets values far outside a declared ``value_range`` through (e.g. for metrics, which
    clip to the range anyway)."""
    max_size = check_positive(max_size, "--max-size")
    resolution = check_positive(resolution, "--resolution")
    spec = str(spec).strip()
    if not spec:
        raise AmbientInputError("--data is empty; give a folder, .zip, .npz or builtin:NAME")
    if spec.startswith("builtin:"):
        raw = _read_builtin(spec, data_dir, max_size)
    else:
        path = _resolve_path(spec, data_dir)
        if path.is_dir():
            raw = _read_folder(path, max_size, check_range)
        elif path.suffix.lower() == ".zip":
            raw = _read_zip(path, max_size, check_range)
        elif path.suffix.lower() == ".npz":
            raw = _read_npz(path, max_size, check_range)
        else:
            raise AmbientInputError(f"{path}: unsupported data file; "
                                    "expected a folder, .zip, .npz or builtin:NAME")
    if resolution is not None:
        raw.images = resize_images(raw.images, resolution)
        if raw.masks is not None:
            raw.masks = resize_images(raw.masks, resolution, nearest=True)
    return raw


def _resolve_path(spec: str, data_dir) -> Path:
    path = Path(spec).expanduser()
    if not path.exists() and data_dir is not None and not path.is_absolute():
        path = Path(data_dir).expanduser() / spec
    if not path.exists():
        raise AmbientInputError(f"{spec}: data path does not exist")
    return path


# ---------------------------------------------------------------------------- builtins
def _read_builtin(spec: str, data_dir, max_size: int | None) -> RawData:
    parts = spec.split(":")
    name = parts[1] if len(parts) > 1 else ""
    if name not in BUILTINS or len(parts) > 3:
        raise AmbientInputError(f"{spec}: unknown builtin data set; known: "
                                + ", ".join(f"builtin:{b}" for b in BUILTINS))
    if name == "digits":
        if len(parts) == 3:
            raise AmbientInputError(f"{spec}: builtin:digits has no splits")
        return _read_digits(max_size)
    split = parts[2] if len(parts) == 3 else "train"
    if split not in FASHION_FILES:
        raise AmbientInputError(f"{spec}: unknown split {split!r}; use train or test")
    return read_fashion_mnist(split, data_dir, max_size)


def fashion_mnist_dir(split: str = "train", data_dir: str | os.PathLike | None = None) -> Path:
    """The folder holding Fashion-MNIST's idx files for ``split``: ``data_dir`` (or its
    ``fashion-mnist`` subfolder) when given, else $AMBIENT_DATA likewise, else the Debian path."""
    if data_dir is not None:
        roots = [Path(data_dir).expanduser()]
    else:
        env = os.environ.get("AMBIENT_DATA", "")
        roots = ([Path(env).expanduser()] if env else []) + [SYSTEM_FASHION_DIR]
    candidates = []
    for root in roots:
        candidates += [root] if root == SYSTEM_FASHION_DIR else [root, root / "fashion-mnist"]
    for folder in candidates:
        if all((folder / f).is_file() for f in FASHION_FILES[split]):
            return folder
    raise AmbientInputError(
        f"builtin:fashion-mnist: {' and '.join(FASHION_FILES[split])} not found in "
        f"{', '.join(str(c) for c in candidates)}; run `apt-get install dataset-fashion-mnist` "
        "or pass --data-dir with the four idx .gz files")


def read_idx(path: Path, ndim: int, max_items: int | None = None) -> np.ndarray:
    """Parse a gzipped idx file of unsigned bytes with ``ndim`` dimensions (first ``max_items`` rows)."""
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as exc:
        raise AmbientInputError(f"{path}: cannot read gzip idx file ({exc})") from None
    head = 4 + 4 * ndim
    if len(data) < head or data[:4] != bytes((0, 0, 0x08, ndim)):
        raise AmbientInputError(f"{path}: not an idx file of unsigned bytes with {ndim} dimension(s)")
    dims = struct.unpack(f">{ndim}I", data[4:head])
    if len(data) - head != int(np.prod(dims)):
        raise AmbientInputError(f"{path}: idx header says {dims} but holds {len(data) - head} bytes")
    arr = np.frombuffer(data, dtype=np.uint8, offset=head).reshape(dims)
    return arr[:max_items].copy()


def read_fashion_mnist(split: str = "train", data_dir=None, max_size: int | None = None) -> RawData:
    """Fashion-MNIST ``split`` as (N, 1, 28, 28) uint8 images with int64 labels 0..9."""
    folder = fashion_mnist_dir(split, data_dir)
    image_file, label_file = (folder / f for f in FASHION_FILES[split])
    images = read_idx(image_file, 3, max_size)
    labels = read_idx(label_file, 1, max_size).astype(np.int64)
    if len(labels) != len(images):
        raise AmbientInputError(f"{label_file}: {len(labels)} labels for {len(images)} images")
    return RawData(images[:, None], None, labels)


def _read_digits(max_size: int | None) -> RawData:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise AmbientInputError("builtin:digits needs scikit-learn; run `pip install scikit-learn`") from None
    digits = load_digits()
    images = np.clip(np.rint(digits.images[:max_size] * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    return RawData(np.ascontiguousarray(images[:, None]), None, digits.target[:max_size].astype(np.int64))


# ---------------------------------------------------------------------------- files
def _dataset_json(text: bytes | str, names: list[str], source: str) -> tuple[np.ndarray | None,
                                                                             tuple[float, float] | None]:
    """A dataset.json read once: (its labels, its declared value_range), each None when absent."""
    try:
        obj = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AmbientInputError(f"{source}: invalid JSON ({exc})") from None
    return _labels_from_json(obj, names, source), _value_range_from_json(obj, source)


def _labels_from_json(obj, names: list[str], source: str) -> np.ndarray | None:
    """EDM's dataset.json (parsed): {"labels": [[name, label], ...] or null}; one int label per image."""
    entries = obj.get("labels") if isinstance(obj, dict) else None
    if entries is None:
        return None
    try:
        mapping = {str(k): v for k, v in entries}
    except (TypeError, ValueError):
        raise AmbientInputError(f"{source}: 'labels' must be a list of [file name, label] pairs") from None
    out = []
    for name in names:
        if name not in mapping:
            raise AmbientInputError(f"{source}: no label for {name}")
        value = mapping[name]
        if isinstance(value, bool) or not isinstance(value, int):
            raise AmbientInputError(f"{source}: label of {name} must be an integer, got {value!r}")
        out.append(value)
    return np.asarray(out, dtype=np.int64)


def _no_images(where: Path, others: int) -> AmbientInputError:
    found = f"only {others} other file(s)" if others else "it is empty"
    return AmbientInputError(f"{where}: no image files ({', '.join(IMAGE_EXTENSIONS)}) found; {found}")


def read_mask(path: Path, shape: tuple[int, int, int]) -> np.ndarray:
    """A mask image as uint8 {0,1} (H, W, C) for an image of ``shape`` (H, W, C).

    Accepts values 0/1 or 0/255, one channel (repeated) or the image's channels.
    """
    arr = read_image(path)
    values = np.unique(arr)
    if np.isin(values, (0, 1)).all():
        mask = arr
    elif np.isin(values, (0, 255)).all():
        mask = arr // 255
    else:
        bad = values[~np.isin(values, (0, 1, 255))][:1].tolist() or values[-1:].tolist()
        raise AmbientInputError(f"{path}: mask values must be 0/1 or 0/255, found {bad[0]}")
    if mask.shape[2] == 3 and shape[2] == 1 and (mask == mask[..., :1]).all():
        mask = mask[..., :1]
    if mask.shape[:2] != shape[:2] or mask.shape[2] not in (1, shape[2]):
        raise AmbientInputError(f"{path}: mask is {mask.shape[0]}x{mask.shape[1]} with {mask.shape[2]} "
                                f"channel(s), image is {shape[0]}x{shape[1]} with {shape[2]}")
    return np.broadcast_to(mask, shape)


def _read_folder(root: Path, max_size: int | None, check_range: bool = True) -> RawData:
    masked = (root / "images").is_dir() and (root / "masks").is_dir()
    image_root = root / "images" if masked else root
    files = list_image_files(image_root)
    if not files:
        others = sum(len(fs) for _, _, fs in os.walk(image_root))
        raise _no_images(image_root, others)
    classes = _class_folders(files, image_root)
    files = files[:max_size]
    arrays = [read_image_data(f) for f in files]
    images = stack_images(arrays, [str(f) for f in files])
    masks = None
    if masked:
        mask_root = root / "masks"
        planes = []
        for f, arr in zip(files, arrays):
            rel = f.relative_to(image_root)
            options = [mask_root / rel, (mask_root / rel).with_suffix(".png")]
            mask_file = next((m for m in options if m.is_file()), None)
            if mask_file is None:
                raise AmbientInputError(f"{f}: no mask file {options[0]} in {mask_root}")
            planes.append(read_mask(mask_file, arr.shape))
        masks = np.ascontiguousarray(np.stack(planes).transpose(0, 3, 1, 2))
    labels, declared = None, None
    if (root / "dataset.json").is_file():
        names = [f.relative_to(image_root).as_posix() for f in files]
        meta = (root / "dataset.json").read_bytes()
        labels, declared = _dataset_json(meta, names, str(root / "dataset.json"))
    elif classes:  # class subfolders: label = index of the subfolder's name in sorted order
        labels = np.asarray([classes[f.relative_to(image_root).parts[0]] for f in files], dtype=np.int64)
    raw = to_model_units(images, masks, str(root), declared, names=[str(f) for f in files],
                         check_range=check_range, declare_hint=f'"value_range": [lo, hi] in {root / "dataset.json"}')
    raw.labels = labels
    return raw


def _class_folders(files: list[Path], image_root: Path) -> dict[str, int] | None:
    """{subfolder name: class} when every image lies directly in one of >= 2 subfolders, else None."""
    parts = [f.relative_to(image_root).parts for f in files]
    if any(len(p) != 2 for p in parts):
        return None
    names = sorted({p[0] for p in parts})
    return {name: i for i, name in enumerate(names)} if len(names) >= 2 else None


def _read_zip(path: Path, max_size: int | None, check_range: bool = True) -> RawData:
    try:
        with zipfile.ZipFile(path) as zf:
            members = [n for n in zf.namelist() if not n.endswith("/")]
            names = sorted(n for n in members if n.lower().endswith(IMAGE_EXTENSIONS)
                           and not any(part.startswith((".", "__MACOSX")) for part in n.split("/")))
            if not names:
                raise _no_images(path, len(members))
            names = names[:max_size]
            arrays = []
            for n in names:
                try:
                    data = zf.read(n)
                except (zipfile.BadZipFile, zlib.error, OSError, EOFError) as exc:
                    raise AmbientInputError(f"{path}:{n}: cannot read from zip ({exc})") from None
                arrays.append(read_image_data(io.BytesIO(data), name=f"{path}:{n}"))
            meta = zf.read("dataset.json") if "dataset.json" in members else None
    except (zipfile.BadZipFile, OSError) as exc:
        raise AmbientInputError(f"{path}: cannot open zip file ({exc})") from None
    images = stack_images(arrays, [f"{path}:{n}" for n in names])
    labels, declared = _dataset_json(meta, names, f"{path}:dataset.json") if meta is not None else (None, None)
    raw = to_model_units(images, None, str(path), declared, names=[f"{path}:{n}" for n in names],
                         check_range=check_range, declare_hint=f'"value_range": [lo, hi] in {path}:dataset.json')
    raw.labels = labels
    return raw


def _read_npz(path: Path, max_size: int | None, check_range: bool = True) -> RawData:
    try:
        with np.load(path, allow_pickle=False) as npz:
            if not isinstance(npz, np.lib.npyio.NpzFile):
                raise AmbientInputError(f"{path}: not an npz archive")
            keys = list(npz.files)
            if "images" not in keys:
                raise AmbientInputError(f"{path}: no array 'images' (found: {', '.join(keys) or 'none'})")
            images = npz["images"]
            masks = npz["masks"] if "masks" in keys else None
            labels = npz["labels"] if "labels" in keys else None
            value_range = npz["value_range"] if "value_range" in keys else None
    except AmbientInputError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise AmbientInputError(f"{path}: cannot read npz ({' '.join(str(exc).split())})") from None
    declared = None if value_range is None else check_value_range(value_range, f"{path}: 'value_range'")
    return validate_arrays(images, masks, labels, str(path), max_size, value_range=declared,
                           check_range=check_range)


def validate_arrays(images: np.ndarray, masks: np.ndarray | None, labels: np.ndarray | None,
                    source: str, max_size: int | None = None, *, value_range: tuple[float, float] | None = None,
                    check_range: bool = True) -> RawData:
    """Check npz-style arrays: images (N,H,W) or (N,H,W,C) of a supported dtype (``SUPPORTED_DTYPES``), masks
    {0,1} alike or (N,H,W); non-uint8 images go to model units with ``value_range`` (see the module doc)."""
    check_image_dtype(images.dtype, source)
    if images.ndim not in (3, 4):
        raise AmbientInputError(f"{source}: 'images' must be (N, H, W) or (N, H, W, C), "
                                f"got shape {images.shape}")
    nhwc = images if images.ndim == 4 else images[..., None]
    n, h, w, c = nhwc.shape
    if c not in (1, 3):
        raise AmbientInputError(f"{source}: 'images' must have 1 or 3 channels (last axis), got {c}")
    if min(n, h, w) == 0:
        raise AmbientInputError(f"{source}: 'images' is empty, shape {images.shape}")
    out_masks = None
    if masks is not None:
        if masks.dtype.kind not in "biuf":
            raise AmbientInputError(f"{source}: 'masks' must be bool, integer or float, got {masks.dtype}")
        if masks.shape in (images.shape, (n, h, w), (n, h, w, 1)):
            m = masks.reshape(n, h, w, -1)[:max_size]
        else:
            raise AmbientInputError(f"{source}: 'masks' has shape {masks.shape}, expected {images.shape} "
                                    f"or {(n, h, w)}")
        ok = np.isin(m, (0, 1))
        if not ok.all():
            bad = m[~ok][0].item()
            raise AmbientInputError(f"{source}: 'masks' must contain only 0 and 1, found {bad!r}")
        m = np.broadcast_to(m.astype(np.uint8), m.shape[:3] + (c,))
        out_masks = np.array(m.transpose(0, 3, 1, 2), order="C")  # a writable copy
    out_labels = None
    if labels is not None:
        if labels.dtype.kind not in "iu" or labels.shape != (n,):
            raise AmbientInputError(f"{source}: 'labels' must be integers of shape ({n},), "
                                    f"got {labels.dtype} {labels.shape}")
        out_labels = labels[:max_size].astype(np.int64)
    raw = to_model_units(np.ascontiguousarray(nhwc[:max_size].transpose(0, 3, 1, 2)), out_masks, source,
                         value_range, check_range=check_range,
                         declare_hint="a value_range=[lo, hi] array in the npz")
    raw.labels = out_labels
    return raw


def check_image_dtype(dtype: np.dtype, source: str, array: str = "images") -> None:
    """Refuse images of a dtype models cannot take (one line naming ``source`` and the array)."""
    if dtype.kind == "c":
        raise AmbientInputError(f"{source}: '{array}' is complex ({dtype}); images must be real: complex "
                                "measurements (e.g. k-space) go in 'y' with their operator "
                                "(ambient.operators.measurements.save_measurements)")
    if dtype.name not in SUPPORTED_DTYPES:
        raise AmbientInputError(f"{source}: '{array}' has dtype {dtype}; supported: {', '.join(SUPPORTED_DTYPES)}; "
                                f"convert, e.g. {array}.astype(np.float32) (and declare value_range=[lo, hi], "
                                "else the data's own min and max map to [-1, 1])")


def check_value_range(value, where: str) -> tuple[float, float]:
    """(lo, hi) from a declared value range: exactly 2 finite real numbers with lo < hi; else one line naming
    ``where`` (e.g. "data.npz: 'value_range'")."""
    arr = np.asarray(value)
    shown = arr.tolist() if arr.size <= 8 else f"{arr.size} values"
    if arr.dtype.kind not in "iuf" or arr.size != 2:
        raise AmbientInputError(f"{where} must be 2 finite numbers [lo, hi] with lo < hi, got {shown!r}")
    lo, hi = (float(v) for v in arr.reshape(-1))
    if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
        raise AmbientInputError(f"{where} must be 2 finite numbers [lo, hi] with lo < hi, got {[lo, hi]}")
    return lo, hi


def _value_range_from_json(obj, source: str) -> tuple[float, float] | None:
    """``"value_range": [lo, hi]`` of a dataset.json (parsed; None when absent)."""
    value = obj.get("value_range") if isinstance(obj, dict) else None
    if value is None:
        return None
    if not isinstance(value, list) or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in value):
        raise AmbientInputError(f"{source}: 'value_range' must be 2 finite numbers [lo, hi] with lo < hi, "
                                f"got {value!r}")
    return check_value_range(value, f"{source}: 'value_range'")


def _where(index: tuple, names: list[str] | None, source: str) -> str:
    """Where element ``index`` = (image, channel, row, column) lies, for messages."""
    i, c, r, q = (int(v) for v in index)
    pixel = f"row {r}, column {q}" + (f", channel {c}" if c else "")
    return f"{names[i]} ({pixel})" if names else f"image {i} ({pixel})"


def to_model_units(images: np.ndarray, masks: np.ndarray | None, source: str,
                   value_range: tuple[float, float] | None, *, names: list[str] | None = None,
                   check_range: bool = True, declare_hint: str = "a value_range") -> RawData:
    """Images (N, C, H, W) as read to :class:`RawData`: uint8 as they are (a declared range other than 0..255
    is ignored, with a notice); anything else checked where observed (``masks`` = 1, or everywhere) and mapped
    to float32 model units with ``value_range``, else 0..65535 for uint16, else the observed min and max.

    Errors name ``source`` (or the file of the image, from ``names``) and the array. Unobserved values (NaN
    allowed there) become 0 in model units, as the dataset would make them.
    """
    kind = images.dtype.name
    if kind == "uint8":
        notices = []
        if value_range is not None and tuple(value_range) != UINT8_RANGE:
            notices.append(f"{source}: value_range {list(value_range)} ignored: uint8 'images' always map 0..255 to "
                           "[-1, 1] (store them as float32 to declare their range)")
        return RawData(images, masks, value_range=UINT8_RANGE, kind="uint8", notices=notices)
    x = images.astype(np.float64)
    observed = None if masks is None else masks.astype(bool)
    bad = ~np.isfinite(x) if observed is None else ~np.isfinite(x) & observed
    if bad.any():
        first = tuple(np.argwhere(bad)[0])
        what = "NaN" if np.isnan(x[first]) else f"{x[first]:+}"
        raise AmbientInputError(
            f"{source}: 'images' holds {int(bad.sum())} NaN or ±inf value(s) where observed, the first ({what}) in "
            f"{_where(first, names, source)}; replace them, or mark those pixels unobserved (masks = 0)")
    values = x if observed is None else x[observed]
    notices = []
    if value_range is not None:
        lo, hi = value_range
    elif kind == "uint16":
        lo, hi = UINT16_RANGE
    elif values.size == 0:  # nothing observed: check_masks refuses such data with its own message
        lo, hi = 0.0, 1.0
    else:
        lo, hi = float(values.min()), float(values.max())
        if not lo < hi:
            raise AmbientInputError(f"{source}: every observed value of 'images' is {lo:g}, so the data set's own "
                                    f"min and max give no range; declare {declare_hint}")
        notices.append(f"{source}: {kind} 'images' without a value_range: their own min {lo:g} and max {hi:g} "
                       f"map to [-1, 1] (per-dataset scaling); to fix the units, declare {declare_hint}")
    scale = 2.0 / (hi - lo)
    norm = (x - lo) * scale - 1.0
    if value_range is not None and values.size:
        vmin, vmax = float(values.min()), float(values.max())
        if vmin < lo or vmax > hi:
            inside = (norm >= -1) & (norm <= 1) | (False if observed is None else ~observed)
            outside = int((~inside).sum())
            far = (np.abs(norm) > FAR_OUTSIDE) if observed is None else (np.abs(norm) > FAR_OUTSIDE) & observed
            summary = (f"{outside} value(s) of 'images' ({outside / values.size:.2%}) lie outside value_range "
                       f"[{lo:g}, {hi:g}] (min {vmin:g}, max {vmax:g})")
            if check_range and far.any():
                first = tuple(np.argwhere(far)[0])
                raise AmbientInputError(
                    f"{source}: {summary}, {int(far.sum())} of them more than the range's width beyond it (first "
                    f"in {_where(first, names, source)}), so the range does not describe the data; declare the "
                    "data's own range (or drop value_range to use the min and max)")
            notices.append(f"{source}: {summary}; kept as they are (beyond [-1, 1] in model units)")
    if observed is not None:
        norm[~observed] = 0.0
    return RawData(np.ascontiguousarray(norm.astype(np.float32)), masks, value_range=(float(lo), float(hi)),
                   kind=kind, notices=notices)
