"""The further-corruption law of ambient training on Cartesian k-space (issue 25, item 4a): line masks only.

A k-space line mask M (H, W) {0, 1} samples whole columns (phase-encode lines, constant along H) of the centred
spectrum (:mod:`ambient.operators.kspace`). A real image has a Hermitian spectrum, X[−k] = conj(X[k]), so column
l and its mirror column l' = (2·(W // 2) − l) mod W carry the same information: what an operator shows of a real
image is its *seen spectrum* s = M ∨ M', the union of the sampled columns and their mirrors
(:func:`seen_spectrum`), and ÃᵀÃ's range is the span of the frequencies in s.

The further operator Ã = B ∘ A drops whole mirror pairs: every pair {l, l'} with a sampled column is dropped from
Ã with probability δ (both columns, so a dropped pair is really hidden from the network), except the ``keep``
columns, which Ã always holds. ``keep`` is meant to be the columns sampled in *every* observation (the fully
sampled centre, :func:`always_sampled`): a column that A always holds is graded whenever it is hidden, so the
method's condition (every frequency outside Ã has positive probability of being in A given Ã) holds whether the
centre is dropped or not; keeping it means the network, and the fixed-operator sampler, always see the low
frequencies that carry most of an image's energy, and never have to invent them (the sampler's output on hidden
frequencies is a conditional mean, which lacks their variance: better that be high frequencies).
"""

from __future__ import annotations

import torch


def mirror_index(n: int) -> torch.Tensor:
    """j ↦ the index of the opposite frequency −k in the centred layout of length n: (2·(n // 2) − j) mod n."""
    return (2 * (n // 2) - torch.arange(n)) % n


def line_columns(mask: torch.Tensor, name: str = "mask") -> torch.Tensor:
    """The sampled columns (N, W) bool of Cartesian line masks (N, H, W); ValueError unless every mask is
    {0, 1} and constant along H (whole phase-encode lines)."""
    if not isinstance(mask, torch.Tensor) or mask.ndim != 3 or min(mask.shape) < 1:
        raise ValueError(f"{name} must be (N, H, W) line masks, got shape {tuple(getattr(mask, 'shape', ()))}")
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError(f"{name} must hold only 0 and 1")
    cols = mask[:, :1, :]
    if not bool((mask == cols).all()):
        raise ValueError(f"{name} must sample whole columns (Cartesian lines constant along H)")
    return cols[:, 0, :] > 0


def seen_spectrum(mask: torch.Tensor) -> torch.Tensor:
    """s = M ∨ M' (the sampled frequencies and their mirrors), (N, H, W) float {0, 1} for masks (N, H, W):
    the frequencies of a real image that the operator of M determines."""
    h, w = mask.shape[-2:]
    ih, iw = mirror_index(h).to(mask.device), mirror_index(w).to(mask.device)
    return torch.maximum(mask, mask[..., ih, :][..., iw]).to(torch.float32)


def always_sampled(mask: torch.Tensor) -> torch.Tensor:
    """The columns (W,) bool that every line mask of (N, H, W) samples (the fully sampled centre)."""
    return line_columns(mask).all(0)


def further_lines(mask: torch.Tensor, delta: float, generator: torch.Generator | None = None,
                  keep: torch.Tensor | None = None) -> torch.Tensor:
    """Ã's line masks (N, H, W) float32: each mirror pair of columns {l, l'} sampled by a mask of ``mask``
    (N, H, W) is dropped with probability ``delta`` (one uniform per pair, drawn as one (N, W) tensor from
    ``generator``; the pair's draw is that of its lower index), except the columns of ``keep`` (W,) bool."""
    if not 0.0 <= float(delta) < 1.0:
        raise ValueError(f"delta must be in [0, 1), got {delta!r}")
    cols = line_columns(mask)
    n, w = cols.shape
    keep = torch.zeros(w, dtype=torch.bool) if keep is None else keep.to(torch.bool).cpu()
    if keep.shape != (w,):
        raise ValueError(f"keep must be ({w},) columns, got {tuple(keep.shape)}")
    u = torch.rand(n, w, generator=generator)
    pair = torch.minimum(torch.arange(w), mirror_index(w))  # each column's pair, named by its lower index
    drop = (u[:, pair] < float(delta)) & ~keep.to(cols.device)
    out = cols & ~drop.to(cols.device)
    return out[:, None, :].expand(mask.shape).to(torch.float32).contiguous()
