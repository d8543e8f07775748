"""Masks: which pixels of an image are observed (1) or missing (0).

Two masks matter in Ambient Diffusion:

* ``mask`` (A): what the data shows of each training image, y = A ⊙ x0. Either it comes
  with the data, or it is drawn once per image as a pure function of (seed, image index),
  so it is the same on every epoch, worker and machine.
* ``mask_hat`` (Ã ⊆ A): a further corruption drawn at every training step. The network
  sees only Ã ⊙ (y + σn) and is graded on A, so it must predict pixels it cannot see.

Families (``pattern``), with the exact meaning of p and δ in each:

``dust``
    A keeps each pixel independently with probability 1 − p, per channel, or one draw for
    all channels of a pixel with ``mask_full_rgb``. Ã drops each pixel of A independently
    with probability δ (again per channel unless ``mask_full_rgb``). Observed share:
    1 − p under A, (1 − p)(1 − δ) under Ã.
``box``
    A removes one square of side ⌈p·H⌉ × ⌈p·W⌉, placed uniformly at random fully inside
    the image, in all channels. Ã removes a second square of side ⌈δ·H⌉ × ⌈δ·W⌉, placed
    uniformly at random fully inside the image (it may overlap the first).
``fixed_box``
    As ``box``, but the first square sits at the centre of every image. Ã as for ``box``.
``keep_patch``
    A keeps only one square of side k = ⌈(1 − p)·H⌉ (× ⌈(1 − p)·W⌉), placed uniformly at
    random; everything else is missing. Ã removes from it a square of side ⌈δ·k⌉ placed
    uniformly inside the kept patch.

So in every family p sizes what A hides and δ sizes what Ã hides on top of it: a share of
pixels for ``dust``, a side fraction of a square for the box-like families.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from ambient.rng import FURTHER_STREAM, MASK_STREAM, SAMPLER_STREAM, mix_seed

PATTERNS = ("dust", "box", "fixed_box", "keep_patch")


def _ceil(x: float) -> int:
    """⌈x⌉, robust to float noise such as 0.3 * 10 = 3.0000000000000004."""
    return int(math.ceil(x - 1e-9))


def check_probability(value: float, name: str) -> float:
    """Return ``value`` as float if it lies in [0, 1), else raise ValueError naming ``name``."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}") from None
    if not (0.0 <= v < 1.0):  # also rejects NaN
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    return v


def check_mask(mask: torch.Tensor, like: torch.Tensor | None = None, name: str = "mask") -> torch.Tensor:
    """Validate a mask: a tensor with values in {0, 1} (and the shape of ``like``, if given)."""
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if like is not None and tuple(mask.shape) != tuple(like.shape):
        raise ValueError(f"{name} has shape {tuple(mask.shape)}, expected {tuple(like.shape)}")
    if mask.is_complex():
        raise ValueError(f"{name} must be real with values 0 or 1")
    if mask.numel() and not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError(f"{name} must contain only 0 and 1")
    return mask


def _check_shape(shape: Sequence[int], name: str = "shape") -> tuple[int, int, int, int]:
    shape = tuple(int(s) for s in shape)
    if len(shape) != 4 or min(shape) < 1:
        raise ValueError(f"{name} must be (N, C, H, W) with positive sizes, got {shape}")
    return shape  # type: ignore[return-value]


def _box_masks(
    n: int, h: int, w: int, sh: int, sw: int, generator: torch.Generator | None, device, *,
    region: tuple[torch.Tensor, torch.Tensor, int, int] | None = None, centred: bool = False,
) -> torch.Tensor:
    """(n, 1, h, w) masks with 1 inside one sh × sw box per image.

    The box is placed uniformly inside the image, or inside ``region`` = (top, left, rh, rw)
    (per-image tensors top/left), or at the centre with ``centred``.
    """
    if region is None:
        top0 = torch.zeros(n, dtype=torch.long, device=device)
        left0 = torch.zeros(n, dtype=torch.long, device=device)
        rh, rw = h, w
    else:
        top0, left0, rh, rw = region
    sh, sw = min(sh, rh), min(sw, rw)
    if centred:
        top = top0 + (rh - sh) // 2
        left = left0 + (rw - sw) // 2
    else:
        top = top0 + torch.randint(0, rh - sh + 1, (n,), generator=generator, device=device)
        left = left0 + torch.randint(0, rw - sw + 1, (n,), generator=generator, device=device)
    rows = torch.arange(h, device=device)
    cols = torch.arange(w, device=device)
    in_r = (rows[None, :] >= top[:, None]) & (rows[None, :] < (top + sh)[:, None])
    in_c = (cols[None, :] >= left[:, None]) & (cols[None, :] < (left + sw)[:, None])
    return (in_r[:, :, None] & in_c[:, None, :])[:, None].float()


def _box_locations(inside: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Top-left corner and size of the (single, square) region where ``inside`` (n,1,h,w) is 1."""
    rows = inside.amax(dim=3)[:, 0]  # (n, h)
    cols = inside.amax(dim=2)[:, 0]  # (n, w)
    rh = int(rows.sum(dim=1).max().item())
    rw = int(cols.sum(dim=1).max().item())
    return rows.argmax(dim=1), cols.argmax(dim=1), rh, rw


@dataclass(frozen=True)
class Corruption:
    """A mask family with its parameters; see the module docstring for exact semantics.

    Args:
        pattern: one of ``dust``, ``box``, ``fixed_box``, ``keep_patch``.
        p: corruption probability (what A hides), in [0, 1).
        delta: further-corruption probability (what Ã hides on top of A), in [0, 1).
        mask_full_rgb: dust only: one draw per pixel for all channels.
    """

    pattern: str = "dust"
    p: float = 0.0
    delta: float = 0.0
    mask_full_rgb: bool = False

    def __post_init__(self) -> None:
        if self.pattern not in PATTERNS:
            raise ValueError(f"corruption pattern must be one of {', '.join(PATTERNS)}, got {self.pattern!r}")
        object.__setattr__(self, "p", check_probability(self.p, "corruption probability p"))
        object.__setattr__(self, "delta", check_probability(self.delta, "delta probability"))
        object.__setattr__(self, "mask_full_rgb", bool(self.mask_full_rgb))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Corruption:
        return cls(**d)

    # ------------------------------------------------------------------ A
    def mask(self, shape: Sequence[int], generator: torch.Generator | None = None,
             device: torch.device | str | None = None) -> torch.Tensor:
        """Draw a batch of masks A of ``shape`` (N, C, H, W) on ``device`` (default: the generator's)."""
        n, c, h, w = _check_shape(shape)
        device = torch.device(device) if device is not None else (
            generator.device if generator is not None else torch.device("cpu"))
        if self.pattern == "dust":
            return self._dust(n, c, h, w, 1.0 - self.p, generator, device)
        if self.pattern in ("box", "fixed_box"):
            hole = _box_masks(n, h, w, _ceil(self.p * h), _ceil(self.p * w), generator, device,
                              centred=self.pattern == "fixed_box")
            return (1.0 - hole).expand(n, c, h, w).contiguous()
        keep = _box_masks(n, h, w, _ceil((1 - self.p) * h), _ceil((1 - self.p) * w), generator, device)
        return keep.expand(n, c, h, w).contiguous()

    def _dust(self, n, c, h, w, keep: float, generator, device) -> torch.Tensor:
        cc = 1 if self.mask_full_rgb else c
        m = (torch.rand((n, cc, h, w), generator=generator, device=device) < keep).float()
        return m.expand(n, c, h, w).contiguous()

    def mask_for_index(self, seed: int, index: int, shape: Sequence[int]) -> torch.Tensor:
        """The mask A of image ``index``, shape (C, H, W): a pure function of (seed, index), on the CPU."""
        g = torch.Generator().manual_seed(mix_seed(MASK_STREAM, seed, index))
        return self.mask((1, *shape), generator=g)[0]

    def masks_for_indices(self, seed: int, indices: Sequence[int], shape: Sequence[int]) -> torch.Tensor:
        """Stack of :meth:`mask_for_index` for each index, shape (N, C, H, W)."""
        return torch.stack([self.mask_for_index(seed, int(i), shape) for i in indices])

    # ------------------------------------------------------------------ Ã
    def further(self, mask: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw Ã ⊆ A for a batch of masks A (N, C, H, W), on the mask's device."""
        check_mask(mask, name="mask")
        _check_shape(mask.shape, "mask shape")
        if self.delta == 0.0:
            return mask.clone()
        n, c, h, w = mask.shape
        if self.pattern == "dust":
            extra = self._dust(n, c, h, w, 1.0 - self.delta, generator, mask.device)
            return mask * extra.to(mask.dtype)
        if self.pattern in ("box", "fixed_box"):
            hole = _box_masks(n, h, w, _ceil(self.delta * h), _ceil(self.delta * w), generator, mask.device)
        else:
            top, left, rh, rw = _box_locations((mask[:, :1] > 0).float())
            hole = _box_masks(n, h, w, _ceil(self.delta * rh), _ceil(self.delta * rw), generator,
                              mask.device, region=(top, left, rh, rw))
        return mask * (1.0 - hole).to(mask.dtype)

    def further_for_indices(self, seed: int, indices: Sequence[int], mask: torch.Tensor) -> torch.Tensor:
        """Ã fixed per image (the paper's variant): a pure function of (seed, index, A)."""
        out = []
        for i, m in zip(indices, mask):
            g = torch.Generator().manual_seed(mix_seed(FURTHER_STREAM, seed, int(i)))
            out.append(self.further(m[None].cpu(), generator=g)[0])
        return torch.stack(out).to(mask.device)

    # ------------------------------------------------------------------ what ambient training can learn
    def unlearnt_hole(self, height: int, width: int) -> str | None:
        """Why some pixels hidden by A are never learnt by ambient training under this law (None: all are).

        The ambient loss grades pixel i only where A_i = 1, so the network learns to fill a pixel hidden
        by Ã only if, given Ã, the pixel may have been observed under A (the paper's condition that
        E[AᵀA | Ã] has full rank). Dust masks meet it. For ``box`` it holds only when the further box has
        A's size: a further box of another size is told apart by its size, so A's box is never graded,
        and the sampler's masks (drawn like Ã) leave an untrained square in every sample. ``fixed_box``
        always hides the centre, and ``keep_patch`` never shows what lies outside its patch.
        """
        if self.pattern == "box" and self.p > 0:
            a = (_ceil(self.p * height), _ceil(self.p * width))
            b = (_ceil(self.delta * height), _ceil(self.delta * width))
            if a != b:
                return (f"box masks: Ã's further box is {b[0]}×{b[1]} but A's is {a[0]}×{a[1]}, so the network can "
                        "tell A's box apart and is never graded inside it; sampled images keep an untrained "
                        f"square there (use --delta-probability {self.p:g}, the same size as A's box)")
        if self.pattern == "fixed_box" and self.p > 0:
            return ("fixed_box masks: A always hides the centre, so the network is never graded there; sampled "
                    "images keep an untrained square at the centre")
        if self.pattern == "keep_patch" and self.p > 0:
            return ("keep_patch masks: A never shows what lies outside its patch, so the network is never graded "
                    "there; sampled images are learnt only inside the sampler's patch")
        return None

    # ------------------------------------------------------------------ statistics
    def expected_survival(self, height: int, width: int) -> float:
        """Expected share of pixels observed under A."""
        if self.pattern == "dust":
            return 1.0 - self.p
        if self.pattern in ("box", "fixed_box"):
            return 1.0 - _ceil(self.p * height) * _ceil(self.p * width) / (height * width)
        return _ceil((1 - self.p) * height) * _ceil((1 - self.p) * width) / (height * width)

    def expected_further_survival(self, height: int, width: int) -> float:
        """Expected share of pixels observed under Ã (exact, overlaps of boxes included)."""
        if self.pattern == "dust":
            return (1.0 - self.p) * (1.0 - self.delta)
        if self.pattern == "keep_patch":
            kh, kw = _ceil((1 - self.p) * height), _ceil((1 - self.p) * width)
            return (kh * kw - _ceil(self.delta * kh) * _ceil(self.delta * kw)) / (height * width)
        first = _coverage(height, width, _ceil(self.p * height), _ceil(self.p * width),
                          centred=self.pattern == "fixed_box")
        second = _coverage(height, width, _ceil(self.delta * height), _ceil(self.delta * width))
        hidden = first.sum() + second.sum() - (first * second).sum()
        return float(1.0 - hidden / (height * width))


def _coverage(h: int, w: int, sh: int, sw: int, centred: bool = False) -> torch.Tensor:
    """Probability that each pixel lies in a box of size sh × sw placed uniformly (or centred)."""
    def axis(n: int, s: int) -> torch.Tensor:
        pos = torch.arange(n, dtype=torch.float64)
        if centred:
            start = (n - s) // 2
            return ((pos >= start) & (pos < start + s)).double()
        starts = torch.arange(n - s + 1, dtype=torch.float64)
        inside = (pos[:, None] >= starts[None]) & (pos[:, None] < starts[None] + s)
        return inside.double().mean(dim=1)

    return axis(h, sh)[:, None] * axis(w, sw)[None, :]


def sampling_masks(
    corruption: Corruption, shape: Sequence[int], seeds: Sequence[int], *,
    data_survival: float | None = None, device: torch.device | str | None = None,
) -> torch.Tensor:
    """Fixed sampler masks, one per seed, distributed like the training Ã.

    With ``data_survival`` (A came with the data), the mask is dust with keep probability
    data_survival · (1 − δ); otherwise it is Ã drawn from the family (A, then Ã ⊆ A).
    Each sample's mask depends only on its own seed (not on the batch).
    """
    n, c, h, w = _check_shape(shape)
    if len(seeds) != n:
        raise ValueError(f"need one seed per sample, got {len(seeds)} seeds for {n} samples")
    out = []
    for seed in seeds:
        g = torch.Generator().manual_seed(mix_seed(SAMPLER_STREAM, int(seed)))
        if data_survival is not None:
            keep = float(data_survival) * (1.0 - corruption.delta)
            dust = Corruption("dust", 1.0 - keep if keep > 0 else 0.999999, 0.0, corruption.mask_full_rgb)
            out.append(dust.mask((1, c, h, w), generator=g))
        else:
            out.append(corruption.further(corruption.mask((1, c, h, w), generator=g), generator=g))
    masks = torch.cat(out)
    return masks.to(device) if device is not None else masks
