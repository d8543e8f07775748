"""Memorisation check: nearest training images of each generated image by cosine similarity.

Feature spaces (``kind``):

``inception``
    2048-d pool features of the FID network (:mod:`ambient.metrics.inception`).
``dinov2``
    A DINOv2 TorchScript module named by ``$AMBIENT_DINOV2`` (or ``path``). It is called on
    RGB images resized to 224 x 224 (bicubic, antialiased) and normalised with the ImageNet
    mean/std, and must return (N, D) embeddings (a (N, T, D) token output uses token 0, CLS).
``pixels``
    The image in [-1, 1], flattened and centred per image, so the cosine similarity is the
    Pearson correlation of pixel values (a shared flat background does not make every pair
    look alike). Exact copies score 1; shifted copies do not.

The training set's own leave-one-out similarities (each training image against all others)
give the scale: generated images no closer to the data than the data is to itself are not
memorised copies.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ambient.data.images import images_uint8_to_float
from ambient.errors import AmbientInputError
from ambient.metrics.inception import file_sha256, load_inception, to_rgb, to_uint8

FEATURE_KINDS = ("inception", "dinov2", "pixels")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _unit_rows(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).to(torch.float32)
    if t.ndim != 2:
        raise ValueError(f"features: expected an (n, d) array, got shape {tuple(t.shape)}")
    return F.normalize(t, dim=1, eps=1e-12)


def nearest_neighbors(
    sample_feats: np.ndarray | torch.Tensor,
    train_feats: np.ndarray | torch.Tensor,
    k: int = 3,
    chunk: int = 1024,
    exclude: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` training rows of each sample row by cosine similarity, by chunked matmul.

    Returns (similarities (N, k) float32, indices (N, k) int64), best first. ``exclude`` (N,)
    optionally names one training index per sample to skip (for leave-one-out).
    """
    s, t = _unit_rows(sample_feats), _unit_rows(train_feats)
    if s.shape[1] != t.shape[1]:
        raise ValueError(f"features: dimensions differ ({s.shape[1]} vs {t.shape[1]})")
    limit = t.shape[0] - (1 if exclude is not None else 0)
    if not 1 <= k <= limit:
        raise ValueError(f"k: must be in 1..{limit} (training rows available), got {k}")
    if chunk < 1:
        raise ValueError(f"chunk: must be >= 1, got {chunk}")
    sims, idx = [], []
    for start in range(0, s.shape[0], chunk):
        block = s[start : start + chunk] @ t.T
        if exclude is not None:
            rows = torch.arange(block.shape[0])
            block[rows, torch.as_tensor(exclude[start : start + chunk], dtype=torch.long)] = -float("inf")
        top = torch.topk(block, k, dim=1)
        sims.append(top.values)
        idx.append(top.indices)
    return torch.cat(sims).numpy(), torch.cat(idx).numpy().astype(np.int64)


def leave_one_out_max_similarity(
    train_feats: np.ndarray | torch.Tensor, max_n: int = 2000, seed: int = 0, chunk: int = 1024
) -> tuple[np.ndarray, np.ndarray]:
    """Max cosine similarity of training images to all *other* training images.

    Uses a random subset of ``max_n`` rows as queries when the set is larger (all rows remain
    candidates). Returns (similarities (n,), query indices (n,)).
    """
    t = _unit_rows(train_feats)
    n = t.shape[0]
    if n < 2:
        raise ValueError("train_feats: leave-one-out needs at least 2 rows")
    rng = np.random.default_rng(seed)
    rows = np.arange(n) if n <= max_n else np.sort(rng.choice(n, max_n, replace=False))
    sims, _ = nearest_neighbors(t[torch.as_tensor(rows)], t, k=1, chunk=chunk, exclude=rows)
    return sims[:, 0], rows


def pixel_features(images: torch.Tensor) -> torch.Tensor:
    """Images (uint8 or float in [-1, 1]) as (N, C*H*W) float32 in [-1, 1], minus each row's mean."""
    flat = images_uint8_to_float(to_uint8(images)).reshape(images.shape[0], -1)
    return flat - flat.mean(dim=1, keepdim=True)


class DinoV2Features(torch.nn.Module):
    """Wrap a DINOv2 TorchScript module into ``images -> (N, D)`` (see module docstring)."""

    def __init__(self, net: torch.nn.Module, sha256: str) -> None:
        super().__init__()
        self.net = net
        self.sha256 = sha256
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = to_rgb(to_uint8(images.to(self.mean.device))).float() / 255.0
        x = F.interpolate(x, size=(224, 224), mode="bicubic", align_corners=False, antialias=True)
        out = self.net((x.clamp(0, 1) - self.mean) / self.std)
        if isinstance(out, (tuple, list)):
            out = out[0]
        if isinstance(out, dict):
            raise AmbientInputError("DINOv2 module returns a dict; export one that returns an (N, D) tensor")
        return (out[:, 0] if out.ndim == 3 else out.reshape(out.shape[0], -1)).float()


def load_dinov2(path: str | os.PathLike | None = None) -> DinoV2Features:
    """Load the DINOv2 TorchScript file at ``path`` or ``$AMBIENT_DINOV2``; clear error if absent."""
    given = path or os.environ.get("AMBIENT_DINOV2") or None
    if given is None:
        raise AmbientInputError(
            "--features dinov2: no DINOv2 weights; set AMBIENT_DINOV2 to a TorchScript file of DINOv2 "
            "(torch.jit.save of the model), or use --features inception|pixels"
        )
    p = Path(given).expanduser()
    if not p.is_file():
        raise AmbientInputError(f"AMBIENT_DINOV2 {given}: no such file")
    try:
        with warnings.catch_warnings():  # torch >= 2.10 deprecates TorchScript loading
            warnings.simplefilter("ignore", DeprecationWarning)
            net = torch.jit.load(str(p), map_location="cpu")
    except (RuntimeError, ValueError):
        raise AmbientInputError(
            f"AMBIENT_DINOV2 {given}: not a TorchScript file (safetensors weights alone lack the model; "
            "save the model with torch.jit.save)"
        ) from None
    net.eval()
    return DinoV2Features(net, file_sha256(p))


def feature_extractor(
    kind: str, inception: str | os.PathLike | None = None, device: str | torch.device = "cpu"
) -> tuple[Callable[[torch.Tensor], torch.Tensor], str]:
    """(features function, feature id for the cache) for ``kind`` in :data:`FEATURE_KINDS`; networks
    run on ``device`` (pixel features on the CPU)."""
    if kind == "pixels":
        return pixel_features, "pixels-centred-v1"
    if kind == "inception":
        net = load_inception(inception, device=device)
        return net, f"inception-{net.sha256}"
    if kind == "dinov2":
        net = load_dinov2().to(device)
        return net, f"dinov2-{net.sha256}"
    raise AmbientInputError(f"--features must be one of {', '.join(FEATURE_KINDS)}, got {kind!r}")
