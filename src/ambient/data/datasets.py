"""Training data: images in memory with their masks A, and the x-flip augmentation.

A dataset item is what a user of Ambient Diffusion really has: the observed image
y = A ⊙ x0 in [-1, 1] and the mask A (1 = observed). A comes from one of two places:

* the data itself (npz ``masks``, or a folder with ``images/`` and ``masks/``): A is
  never drawn, and the image values at unobserved pixels are zeroed when loading, so
  whatever the file holds there cannot leak into training;
* otherwise it is drawn per image as ``corruption.mask_for_index(seed, index, (C, H, W))``,
  a pure function of (seed, index): the same on every epoch, worker and machine.
  ``corruption=None`` means clean data (A = 1 everywhere).

Data specs (``load_dataset(spec)``):

``builtin:fashion-mnist`` / ``builtin:fashion-mnist:test``
    The idx .gz files of Debian's ``dataset-fashion-mnist`` package, read from ``data_dir``,
    else $AMBIENT_DATA, else /usr/share/datasets/fashion-mnist. 28×28, 1 channel, labels.
``builtin:digits``
    scikit-learn's bundled 8×8 digits (values 0..16 scaled to 0..255), labels.
a folder
    PNG/JPEG (also BMP, WebP, TIFF) files, recursively, in sorted order; ``dataset.json`` with
    EDM's ``{"labels": [[name, label], ...]}`` gives labels (and ``"value_range": [lo, hi]`` the units
    of 16-bit or float images). 16-bit PNG and 32-bit (integer or float) TIFF keep their values; one bit
    depth per folder. With ``images/`` and ``masks/``
    subfolders, each image has a mask of the same relative name (or the same stem, .png),
    grayscale or with the image's channels, values 0/1 or 0/255.
an EDM-style ``.zip``
    the same, inside a zip archive.
an ``.npz``
    ``images`` (N, H, W) or (N, H, W, C) uint8, uint16 or float16/32/64, optional ``value_range``
    [lo, hi] (the values that map to [-1, 1]), optional ``masks`` {0,1} of the same shape or (N, H, W),
    optional integer ``labels`` (N,).

Units: uint8 images map 0..255 to [-1, 1] and stay uint8 in memory. Other images are held as float32 in
[-1, 1] with x_norm = 2 (x - lo) / (hi - lo) - 1 for their ``value_range`` (declared; else 0..65535 for
uint16; else the data set's own min and max, with a notice); :attr:`ImageDataset.value_range` gives
(lo, hi) and :func:`ambient.data.images.from_unit_range` maps model outputs back to them.

Grayscale images give 1 channel, RGB 3; an alpha channel is dropped (not blended).
A relative path that does not exist is also looked up inside ``data_dir``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import torch

from ambient.data.corruption import Corruption
from ambient.data.images import float_to_uint8, images_uint8_to_float
from ambient.data.readers import UINT8_RANGE, read_source
from ambient.errors import AmbientInputError

__all__ = [
    "ImageDataset", "load_dataset", "load_images", "augment_batch", "resolve_mask_full_rgb",
    "images_uint8_to_float", "float_to_uint8",
]


class ImageDataset(torch.utils.data.Dataset):
    """Images (N×C×H×W, in memory: uint8, or float32 in model units) with masks A from the data or drawn per index.

    Args:
        images: uint8 tensor (N, C, H, W) (0..255), or a float tensor already in model units [-1, 1]
            (held as float32; values a little outside are kept).
        masks: uint8 {0,1} tensor like ``images`` when A comes with the data, else None.
        labels: int64 tensor (N,) or None.
        corruption: draws A per index when ``masks`` is None; None means no corruption.
            With data masks it is kept (e.g. for its δ) but never draws A.
        seed: the dataset seed that, with the index, fixes each drawn A.
        source: the spec the data came from (for messages and configs).
        cache_masks: keep each drawn A (uint8) after its first use; drawing costs ~0.3 ms
            per image, the cache as much memory as ``images``.
        value_range: the source values that map to [-1, 1]: (0, 255) for uint8 images (the default, and the
            only range they take), for float images the range they were mapped from (default (-1, 1)).
        kind: the source's dtype ("uint8", "uint16", "float32", ...); default "uint8" for uint8 images,
            "float32" for float ones.
        notices: one-line notes about the data for the user (see :func:`check_masks`).
    """

    def __init__(self, images: torch.Tensor, masks: torch.Tensor | None = None,
                 labels: torch.Tensor | None = None, corruption: Corruption | None = None,
                 seed: int = 0, source: str = "", cache_masks: bool = True, *,
                 value_range: tuple[float, float] | None = None, kind: str | None = None,
                 notices: Sequence[str] = ()):
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or not (
                images.dtype == torch.uint8 or images.is_floating_point()):
            raise ValueError("images must be a uint8 tensor (N, C, H, W) or a float one in [-1, 1]")
        if images.shape[0] == 0:
            raise ValueError("images must hold at least one image")
        is_uint8 = images.dtype == torch.uint8
        if value_range is None:
            value_range = UINT8_RANGE if is_uint8 else (-1.0, 1.0)
        lo, hi = (float(v) for v in value_range)
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise ValueError(f"value_range must be two finite numbers lo < hi, got {[lo, hi]}")
        if is_uint8 and (lo, hi) != UINT8_RANGE:
            raise ValueError(f"uint8 images have value_range (0, 255), got {[lo, hi]}")
        if not is_uint8:
            images = images.to(torch.float32)
        if masks is not None:
            if not isinstance(masks, torch.Tensor) or masks.shape != images.shape:
                raise ValueError(f"masks must be a tensor of shape {tuple(images.shape)}")
            if not bool(((masks == 0) | (masks == 1)).all()):
                raise ValueError("masks must contain only 0 and 1")
            masks = masks.to(torch.uint8)
            # values at unobserved pixels are never used (and may be NaN in float data)
            images = images * masks if is_uint8 else torch.where(masks.bool(), images, 0.0)
        if not is_uint8 and not bool(torch.isfinite(images).all()):
            raise ValueError("float images must be finite where observed")
        if labels is not None:
            labels = torch.as_tensor(labels, dtype=torch.int64)
            if labels.shape != (images.shape[0],):
                raise ValueError(f"labels must have shape ({images.shape[0]},), got {tuple(labels.shape)}")
        if corruption is not None and not isinstance(corruption, Corruption):
            raise ValueError(f"corruption must be a Corruption or None, got {type(corruption).__name__}")
        self.images = images.contiguous()
        self.masks = None if masks is None else masks.contiguous()
        self.labels = labels
        self.corruption = corruption
        self.seed = int(seed)
        self.source = str(source)
        self.cache_masks = bool(cache_masks)
        self.value_range = (lo, hi)
        self.kind = str(kind) if kind is not None else ("uint8" if is_uint8 else "float32")
        self.notices = list(notices)
        self._cache: tuple | None = None  # (corruption, seed, masks uint8, drawn bool (N,))
        self._mask_law: str | None = None

    # ------------------------------------------------------------------ shape facts
    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    @property
    def height(self) -> int:
        return self.images.shape[2]

    @property
    def width(self) -> int:
        return self.images.shape[3]

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        return (self.channels, self.height, self.width)

    @property
    def resolution(self) -> int:
        """Side of the (square) images; AmbientInputError when height and width differ."""
        if self.height != self.width:
            raise AmbientInputError(f"{self.source or 'data'}: images are {self.height}x{self.width}, "
                                    "not square; pass --resolution to resize them")
        return self.height

    @property
    def is_uint8(self) -> bool:
        """True when the images are held as uint8 (0..255); else float32 in model units."""
        return self.images.dtype == torch.uint8

    def to_float(self, images: torch.Tensor) -> torch.Tensor:
        """Stored images (rows of :attr:`images`) as float32 in [-1, 1]."""
        return images_uint8_to_float(images) if self.is_uint8 else images

    @property
    def has_data_masks(self) -> bool:
        """True when A came with the data (never drawn)."""
        return self.masks is not None

    @property
    def mask_law(self) -> str | None:
        """How the data's masks treat the channels of a pixel: ``"pixel"`` when every channel of a
        pixel has the same value in every mask (always so for one channel), ``"channel"`` when they
        differ somewhere; None when A does not come with the data."""
        if self.masks is None:
            return None
        if self._mask_law is None:
            self._mask_law = "pixel" if bool((self.masks == self.masks[:, :1]).all()) else "channel"
        return self._mask_law

    @property
    def observed_share(self) -> float:
        """Share of observed pixels: measured on data masks, else the corruption's expectation."""
        if self.masks is not None:
            return float(self.masks.float().mean())
        if self.corruption is None:
            return 1.0
        return float(self.corruption.expected_survival(self.height, self.width))

    # ------------------------------------------------------------------ masks and items
    def _index(self, index: int) -> int:
        i = int(index)
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {index} out of range for {n} images")
        return i % n

    def mask(self, index: int) -> torch.Tensor:
        """A of image ``index`` as float32 (C, H, W)."""
        i = self._index(index)
        if self.masks is not None:
            return self.masks[i].float()
        if self.corruption is None:
            return torch.ones(self.shape)
        return self._drawn([i])[0]

    def _drawn(self, idx: list[int]) -> torch.Tensor:
        """Drawn masks A for in-range indices ``idx`` as float32 (B, C, H, W), cached if asked."""
        if not self.cache_masks:
            return self.corruption.masks_for_indices(self.seed, idx, self.shape).float()
        if self._cache is None or self._cache[:2] != (self.corruption, self.seed):
            self._cache = (self.corruption, self.seed, torch.zeros(self.images.shape, dtype=torch.uint8),
                           torch.zeros(len(self), dtype=torch.bool))
        store, drawn = self._cache[2], self._cache[3]
        rows = torch.tensor(idx, dtype=torch.int64)
        missing = torch.unique(rows[~drawn[rows]]).tolist()
        if missing:
            store[missing] = self.corruption.masks_for_indices(self.seed, missing, self.shape).to(torch.uint8)
            drawn[missing] = True
        return store[rows].float()

    def __getitem__(self, index: int) -> dict:
        """dict(image=y = A ⊙ x0 float32 (C,H,W) in [-1,1], mask=A float32, index=int[, label=int])."""
        i = self._index(index)
        mask = self.mask(i)
        item = {"image": self.to_float(self.images[i]) * mask, "mask": mask, "index": i}
        if self.labels is not None:
            item["label"] = int(self.labels[i])
        return item

    def batch(self, indices: Sequence[int] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(images y = A ⊙ x0 float32 (B,C,H,W), masks A float32) for ``indices``, on the CPU."""
        idx = [self._index(i) for i in torch.as_tensor(indices, dtype=torch.int64).reshape(-1).tolist()]
        rows = torch.tensor(idx, dtype=torch.int64)
        if self.masks is not None:
            masks = self.masks[rows].float()
        elif self.corruption is None:
            masks = torch.ones((len(idx), *self.shape))
        else:
            masks = self._drawn(idx)
        return self.to_float(self.images[rows]) * masks, masks

    def __repr__(self) -> str:
        kind = "data masks" if self.has_data_masks else f"corruption={self.corruption}"
        units = "" if self.is_uint8 else f", {self.kind} {self.value_range[0]:g}..{self.value_range[1]:g}"
        return (f"ImageDataset({self.source!r}, n={len(self)}, shape={self.shape}, {kind}, "
                f"observed_share={self.observed_share:.3f}{units})")


def load_dataset(spec: str, *, data_dir: str | os.PathLike | None = None, max_size: int | None = None,
                 resolution: int | None = None, corruption: Corruption | None = None,
                 seed: int = 0) -> ImageDataset:
    """Load ``spec`` (see the module doc) into an :class:`ImageDataset`.

    Keeps the first ``max_size`` images; with ``resolution`` resizes to a square of that side
    (LANCZOS for images, NEAREST for masks). Bad input raises :class:`AmbientInputError`.
    """
    raw = read_source(spec, data_dir=data_dir, max_size=max_size, resolution=resolution)
    return ImageDataset(
        torch.from_numpy(raw.images),
        None if raw.masks is None else torch.from_numpy(raw.masks),
        None if raw.labels is None else torch.from_numpy(raw.labels),
        corruption=corruption, seed=seed, source=str(spec), value_range=raw.value_range, kind=raw.kind,
        notices=raw.notices)


def check_masks(data: ImageDataset, spec: str, flag: str = "--data") -> str | None:
    """Refuse data whose masks hide every pixel (one line naming the data); return the notices about the data,
    one line each (joined by newlines): the reader's (:attr:`ImageDataset.notices`, e.g. per-dataset scaling of
    float data) and one when the masks hide no pixel. None when there is nothing to say."""
    notices = [f"notice: {flag} {n}" for n in getattr(data, "notices", ())]
    share = data.observed_share if data.has_data_masks else None
    if share == 0:
        raise AmbientInputError(f"{flag} {spec}: every mask is all zero (no pixel is observed), so there is nothing "
                                "to learn from; check the masks (1 = observed)")
    if share == 1:
        notices.append(f"notice: {flag} {spec}: every mask is all one, so nothing is hidden (the images are used as "
                       "clean ones)")
    return "\n".join(notices) or None


def load_images(spec: str, data_dir: str | os.PathLike | None = None, max_size: int | None = None,
                resolution: int | None = None) -> torch.Tensor:
    """The images of ``spec`` as uint8 (N, C, H, W), as stored (no masks applied), e.g. for metrics.

    Non-uint8 data comes in its model units rendered as uint8 (:func:`float_to_uint8` of [-1, 1], what a
    written PNG of it holds; values beyond its value_range are clipped, and not refused)."""
    raw = read_source(spec, data_dir=data_dir, max_size=max_size, resolution=resolution, check_range=False)
    images = torch.from_numpy(raw.images)
    return images if raw.kind == "uint8" else float_to_uint8(images)


def resolve_mask_full_rgb(explicit: bool | None, data: ImageDataset, saved: bool | None = None,
                          flag: str = "--mask-full-rgb") -> tuple[bool, str]:
    """The mask law of a run: (full_rgb, why). ``full_rgb`` True means Ã and the sampler's masks are
    drawn per pixel (one draw for all channels), False per channel.

    Order: an explicit flag, else the law a resumed run was trained with (``saved``), else the
    data's own masks (:attr:`ImageDataset.mask_law`), else per channel (the dust default). A
    per-pixel flag on masks that differ between the channels of a pixel is refused.
    """
    law = data.mask_law
    if explicit is not None:
        if explicit and law == "channel":
            raise AmbientInputError(f"{flag}: the masks of {data.source or 'the data'} differ between the "
                                    "channels of a pixel, so per-pixel masks contradict them; drop the flag")
        return bool(explicit), f"per {'pixel' if explicit else 'channel'} ({flag if explicit else '--no-' + flag[2:]})"
    if saved is not None:
        return bool(saved), f"per {'pixel' if saved else 'channel'} (as the resumed run was trained)"
    if law is not None:
        return law == "pixel", f"per {law} (from the data's masks)"
    return False, "per channel (drawn masks, the default)"


def augment_batch(images: torch.Tensor, masks: torch.Tensor | None, prob: float,
                  generator: torch.Generator | None = None,
                  extra: torch.Tensor | Sequence[torch.Tensor] | None = None):
    """Flip each image left-right with probability ``prob``, and its mask(s) with it.

    The same per-image decision applies to ``images``, ``masks`` (A) and every tensor of
    ``extra`` (e.g. Ã), so observed pixels and their masks never part. Returns
    ``(images, masks, extra)``, each flipped, ``extra`` as given (None, a tensor, or a list).
    """
    prob = float(prob)
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"prob must be in [0, 1], got {prob}")
    n = images.shape[0]
    others = [] if extra is None else ([extra] if isinstance(extra, torch.Tensor) else list(extra))
    for name, t in [("masks", masks), *[("extra", e) for e in others]]:
        if t is not None and (t.ndim < 2 or t.shape[0] != n or t.shape[-1] != images.shape[-1]):
            raise ValueError(f"{name} shape {tuple(t.shape)} does not match images {tuple(images.shape)}")
    draw_device = generator.device if generator is not None else images.device
    flip = torch.rand(n, generator=generator, device=draw_device) < prob

    def apply(t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None:
            return None
        f = flip.to(t.device).reshape((n,) + (1,) * (t.ndim - 1))
        return torch.where(f, t.flip(-1), t)

    flipped = [apply(e) for e in others]
    if extra is None:
        out_extra = None
    elif isinstance(extra, torch.Tensor):
        out_extra = flipped[0]
    else:
        out_extra = flipped
    return apply(images), apply(masks), out_extra
