"""Figures of the memorisation report, drawn with PIL only (no matplotlib).

* :func:`similarity_histogram`: share of images per similarity bin, generated samples beside
  the training set's leave-one-out similarities, with the threshold marked.
* :func:`pairs_panel`: rows of (generated | nearest | 2nd nearest | ...) with similarities.
* :func:`labelled_panels`: image grids side by side, each under its lines of text (``ambient demo``).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ambient.data.images import make_grid
from ambient.metrics.inception import to_rgb, to_uint8

SAMPLE_COLOR = (31, 119, 180)
TRAIN_COLOR = (255, 127, 14)
THRESHOLD_COLOR = (214, 39, 40)


def similarity_histogram(
    sample_sims: np.ndarray, train_sims: np.ndarray, threshold: float, bins: int = 40, size=(720, 420)
) -> np.ndarray:
    """Histogram image (H, W, 3) uint8 of two similarity sets on shared bins over [lo, 1]."""
    s, t = np.asarray(sample_sims, np.float64), np.asarray(train_sims, np.float64)
    both = np.concatenate([s, t]) if t.size else s
    lo = min(float(np.floor(both.min() * 20) / 20), float(threshold) - 0.05)
    edges = np.linspace(lo, 1.0, bins + 1)
    hs = np.histogram(np.clip(s, lo, 1.0), edges)[0] / max(s.size, 1)
    ht = np.histogram(np.clip(t, lo, 1.0), edges)[0] / max(t.size, 1) if t.size else np.zeros(bins)
    w, h = size
    left, right, top, bottom = 60, 20, 40, 50
    img = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    pw, ph = w - left - right, h - top - bottom
    peak = max(hs.max(), ht.max(), 1e-9)
    draw.rectangle([left, top, left + pw, top + ph], outline="black")
    bw = pw / bins
    for i in range(bins):
        for j, (hist, color) in enumerate(((hs, SAMPLE_COLOR), (ht, TRAIN_COLOR))):
            bar = hist[i] / peak * ph
            x0 = left + i * bw + j * bw / 2
            if bar > 0:
                draw.rectangle([x0, top + ph - bar, x0 + bw / 2 - 1, top + ph], fill=color)
    tx = left + (float(threshold) - lo) / (1.0 - lo) * pw
    draw.line([tx, top, tx, top + ph], fill=THRESHOLD_COLOR, width=2)
    for frac in np.linspace(0, 1, 5):
        x = left + frac * pw
        draw.line([x, top + ph, x, top + ph + 4], fill="black")
        draw.text((x - 12, top + ph + 8), f"{lo + frac * (1 - lo):.2f}", fill="black", font=font)
    for frac in np.linspace(0, 1, 5):
        y = top + ph - frac * ph
        draw.text((4, y - 6), f"{frac * peak:.2f}", fill="black", font=font)
    draw.text((left, h - 18), "max cosine similarity to the training set (share of images per bin)",
              fill="black", font=font)
    draw.text((left, 8), f"generated (n={s.size})", fill=SAMPLE_COLOR, font=font)
    draw.text((left + 170, 8), f"train leave-one-out (n={t.size})", fill=TRAIN_COLOR, font=font)
    draw.text((left + 400, 8), f"threshold {threshold:g}", fill=THRESHOLD_COLOR, font=font)
    return np.asarray(img)


def _tiles(images: torch.Tensor, tile: int) -> torch.Tensor:
    """uint8 RGB (N, 3, tile, tile), nearest-neighbour scaled (keeps pixels visible)."""
    x = to_rgb(to_uint8(images)).float()
    x = torch.nn.functional.interpolate(x, size=(tile, tile), mode="nearest")
    return x.round().clamp(0, 255).to(torch.uint8)


def pairs_panel(
    samples: torch.Tensor,
    train: torch.Tensor,
    rows: np.ndarray,
    indices: np.ndarray,
    sims: np.ndarray,
    tile: int = 96,
    pad: int = 4,
) -> np.ndarray:
    """Panel (H, W, 3) uint8: for each sample index in ``rows``, the sample then its k neighbours.

    ``indices``/``sims`` are the (N, k) outputs of ``nearest_neighbors``; each neighbour tile is
    captioned with its training index and similarity.
    """
    k = indices.shape[1]
    cells = []
    for r in rows:
        cells.append(_tiles(samples[int(r) : int(r) + 1], tile))
        cells.append(_tiles(train[torch.as_tensor(indices[r], dtype=torch.long)], tile))
    grid = make_grid(torch.cat(cells), nrow=k + 1, padding=pad)
    caption = 14
    n_rows = len(rows)
    out = Image.new("RGB", (grid.shape[1], grid.shape[0] + n_rows * caption + caption), "white")
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default()
    labels = ["generated"] + [f"nearest #{j + 1}" for j in range(k)]
    for c, label in enumerate(labels):
        draw.text((c * (tile + pad) + 2, 1), label, fill="black", font=font)
    for i, r in enumerate(rows):
        y = caption + i * (tile + pad + caption)
        out.paste(Image.fromarray(grid[i * (tile + pad) : i * (tile + pad) + tile]), (0, y))
        draw.text((2, y + tile), f"#{int(r)}", fill="black", font=font)
        for j in range(k):
            text = f"{int(indices[r, j])}: {float(sims[r, j]):.3f}"
            draw.text(((j + 1) * (tile + pad) + 2, y + tile), text, fill="black", font=font)
    return np.asarray(out)


def labelled_panels(panels: list[tuple[list[str], torch.Tensor]], nrow: int, scale: int = 2, gap: int = 12,
                    line_height: int = 14) -> np.ndarray:
    """Figure (H, W, 3) uint8: one grid per (text lines, images (N, C, H, W) uint8 or float in [-1, 1]), side
    by side, ``nrow`` tiles per row, upscaled ``scale``× (nearest), each under its lines of (ASCII) text."""
    if not panels:
        raise ValueError("panels: need at least one")
    font = ImageFont.load_default()
    grids = []
    for _, images in panels:
        grid = Image.fromarray(make_grid(to_rgb(to_uint8(images)), nrow, padding=1))
        grids.append(grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST))
    head = line_height * max(len(lines) for lines, _ in panels) + 6
    widths = [max([grid.width] + [math.ceil(font.getlength(line)) for line in lines])
              for (lines, _), grid in zip(panels, grids)]  # a panel is as wide as its grid or its longest line
    out = Image.new("RGB", (sum(widths) + gap * (len(grids) + 1), head + max(g.height for g in grids) + gap),
                    "white")
    draw = ImageDraw.Draw(out)
    left = gap
    for (lines, _), grid, width in zip(panels, grids, widths):
        for i, line in enumerate(lines):
            draw.text((left, 4 + i * line_height), line, fill="black", font=font)
        out.paste(grid, (left, head))
        left += width + gap
    return np.asarray(out)
