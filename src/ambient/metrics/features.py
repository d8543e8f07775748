"""Batched feature extraction with an on-disk cache keyed by content.

A reference set is featurised once: the features of a uint8 image tensor are stored under
``<cache>/features/<key>.npz`` where the key is the sha256 of the image bytes and shape
together with the identity of the feature network (its weights' sha256). The cache folder is
``$AMBIENT_CACHE`` or ``~/.cache/ambient``; files are written atomically (temp + rename).

Under torchrun (pass the :class:`~ambient.distributed.DistEnv`), every rank featurises one
contiguous block of the images and rank 0 gathers them in order; only rank 0 reads and writes
the cache, and the other ranks get ``None`` back.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from ambient.distributed import DistEnv
from ambient.io import atomic_save_npz
from ambient.metrics.inception import cache_dir, to_uint8

FeatureFn = Callable[[torch.Tensor], torch.Tensor]


def images_sha256(images: torch.Tensor) -> str:
    """sha256 of a uint8 image tensor's shape and bytes (the cache key of its content)."""
    arr = np.ascontiguousarray(to_uint8(images).cpu().numpy())
    digest = hashlib.sha256(f"{arr.dtype}{arr.shape}".encode())
    digest.update(arr.tobytes())
    return digest.hexdigest()


def compute_features(
    images: torch.Tensor,
    feature_fn: FeatureFn,
    batch: int = 64,
    progress: bool = True,
    desc: str = "features",
) -> np.ndarray:
    """Apply ``feature_fn`` to ``images`` (N, C, H, W) in batches; returns (N, D) float32."""
    if batch < 1:
        raise ValueError(f"batch: must be >= 1, got {batch}")
    n = images.shape[0]
    out: list[np.ndarray] = []
    with tqdm(total=n, desc=desc, unit="img", disable=not progress, leave=False) as bar:
        for start in range(0, n, batch):
            chunk = feature_fn(images[start : start + batch])
            out.append(chunk.detach().cpu().float().numpy())
            bar.update(chunk.shape[0])
    if not out:
        raise ValueError("images: empty")
    return np.concatenate(out, axis=0)


def sharded_features(
    images: torch.Tensor, feature_fn: FeatureFn, env: DistEnv, batch: int = 64, progress: bool = True,
    desc: str = "features",
) -> np.ndarray | None:
    """:func:`compute_features` split over the ranks of ``env``: rank r takes images
    [r·N/W, (r+1)·N/W); rank 0 returns all N rows in image order, the other ranks ``None``."""
    if env.world_size <= 1:
        return compute_features(images, feature_fn, batch, progress, desc)
    n = images.shape[0]
    lo, hi = env.rank * n // env.world_size, (env.rank + 1) * n // env.world_size
    mine = (compute_features(images[lo:hi], feature_fn, batch, progress and env.rank == 0, desc)
            if hi > lo else None)
    gathered = [None] * env.world_size if env.rank == 0 else None
    dist.gather_object(mine, gathered, dst=0)
    if env.rank != 0:
        return None
    return np.concatenate([f for f in gathered if f is not None], axis=0)


def _read_cache(path: Path, num: int) -> np.ndarray | None:
    if not path.is_file():
        return None
    try:
        with np.load(path) as data:
            feats = data["features"]
        return feats if feats.shape[0] == num else None
    except (OSError, KeyError, ValueError):
        return None  # a damaged cache entry is recomputed and overwritten


def cached_features(
    images: torch.Tensor,
    feature_fn: FeatureFn,
    feature_id: str,
    batch: int = 64,
    progress: bool = True,
    cache: bool | str | os.PathLike = True,
    desc: str = "features",
    env: DistEnv | None = None,
) -> np.ndarray | None:
    """Features of ``images``, read from / written to the cache.

    ``feature_id`` names the network (e.g. ``"inception-" + weights sha256``); ``cache`` is True
    (default folder), False (no cache) or a folder. With ``env`` of several ranks the work is
    shared (:func:`sharded_features`) and only rank 0 gets the features (the others ``None``).
    """
    images = to_uint8(images)
    env = env or DistEnv()
    path = None
    if cache is not False:
        root = cache_dir() if cache is True else Path(cache)
        key = hashlib.sha256(f"{images_sha256(images)}|{feature_id}".encode()).hexdigest()[:32]
        path = root / "features" / f"{key}.npz"
    feats = _read_cache(path, images.shape[0]) if path is not None and env.rank == 0 else None
    if env.world_size > 1:
        hit = [feats is not None]
        dist.broadcast_object_list(hit, src=0)
        if hit[0]:
            return feats
    if feats is not None:
        return feats
    feats = sharded_features(images, feature_fn, env, batch, progress, desc)
    if path is not None and feats is not None:
        try:
            atomic_save_npz(path, features=feats, feature_id=np.array(feature_id))
        except OSError as exc:  # a read-only or full cache must not lose the computed features
            warnings.warn(f"feature cache not written ({path}): {exc}", RuntimeWarning, stacklevel=2)
    return feats
