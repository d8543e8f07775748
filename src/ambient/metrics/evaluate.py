"""Whole evaluations from data specs, as run by ``ambient eval ...`` and ``ambient neighbors``.

A spec is anything :func:`ambient.data.datasets.load_images` reads (folder, EDM zip, npz, ``builtin:NAME``)
or, for FID, a statistics npz holding ``mu`` and ``sigma`` (EDM's reference format). KID needs
features, so it is None when either side is a statistics file without a ``features`` array
(EDM's files have none; ``ambient eval ref`` stores them unless told not to).

Under torchrun (``torchrun --nproc_per_node=N -m ambient eval fid …``) each rank featurises its
share of every image set (:func:`ambient.metrics.features.cached_features`); rank 0 computes the
metrics, writes the outputs and returns the result, the other ranks return ``None``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ambient import distributed as dist_utils
from ambient.data.datasets import load_images
from ambient.data.images import save_png
from ambient.errors import AmbientInputError
from ambient.folders import OTHER, describe, folder_kind_why
from ambient.io import atomic_write_json
from ambient.metrics.features import cached_features
from ambient.metrics.fid import (
    FeatureSet,
    compute_fid,
    compute_kid,
    fid_from_features,
    is_stats_file,
    load_stats,
    save_stats,
)
from ambient.metrics.inception import load_inception
from ambient.metrics.neighbors import feature_extractor, leave_one_out_max_similarity, nearest_neighbors
from ambient.metrics.plots import pairs_panel, similarity_histogram
from ambient.metrics.swd import sliced_wasserstein


def check_output_file(path: str | os.PathLike, flag: str) -> Path:
    """``path`` as a file this command may write (checked before any work): not empty, not a folder, in a folder."""
    if not str(path).strip():
        raise AmbientInputError(f"{flag} is empty; give a file path")
    path = Path(path)
    if path.is_dir():
        raise AmbientInputError(f"{flag} {path}: is a folder; give a file path")
    _check_creatable(path, path.parent, flag)
    return path


def _check_creatable(path: Path, parent: Path, flag: str) -> None:
    """The nearest existing folder from ``parent`` up is a folder this process may write into."""
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise AmbientInputError(f"{flag} {path}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise AmbientInputError(f"{flag} {path}: folder {parent} is not writable")


def check_output_folder(path: str | os.PathLike, flag: str) -> Path:
    """``path`` as a folder this command may create or write into (checked before any work)."""
    if not str(path).strip():
        raise AmbientInputError(f"{flag} is empty; give a folder")
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise AmbientInputError(f"{flag} {path}: exists and is not a folder")
    _check_creatable(path, path, flag)
    return path


def write_json(path: str | os.PathLike, obj: dict, flag: str = "--json") -> Path:
    """Write ``obj`` as indented JSON (keys in order, no NaN), atomically; errors name ``flag``."""
    path = check_output_file(path, flag)
    try:
        return atomic_write_json(path, obj, sort_keys=False, allow_nan=False)
    except OSError as exc:
        raise AmbientInputError(f"{flag} {path}: cannot write ({exc.strerror or exc})") from None


def load_image_set(spec: str, flag: str, max_size: int | None = None) -> torch.Tensor:
    """uint8 (N, C, H, W) images of ``spec`` (at least 2), errors naming ``flag``."""
    spec = str(spec)
    if not spec.strip():
        raise AmbientInputError(f"{flag} is empty; give a folder, .zip, .npz or builtin:NAME")
    if not spec.startswith("builtin:") and not Path(spec).expanduser().exists():
        raise AmbientInputError(f"{flag} {spec}: no such file or folder")
    images = load_images(spec, data_dir=None, max_size=max_size)
    if images.ndim != 4 or images.shape[0] < 2:
        raise AmbientInputError(f"{flag} {spec}: need at least 2 images, found {images.shape[0]}")
    return images


def join(device: str | torch.device = "cpu") -> tuple[dist_utils.DistEnv, torch.device]:
    """This process's rank (torchrun) and the device its feature network runs on."""
    env = dist_utils.init_from_env(device)
    return env, (env.device if env.world_size > 1 else dist_utils.resolve_device(str(device)))


class _Inception:
    """Loads the network on first use only (statistics files need none)."""

    def __init__(self, path: str | os.PathLike | None, device: str | torch.device = "cpu") -> None:
        self.path, self.device, self.net = path, device, None

    def get(self):
        if self.net is None:
            self.net = load_inception(self.path, device=self.device)
        return self.net


def load_side(spec: str, flag: str, max_size: int | None = None) -> FeatureSet | torch.Tensor:
    """A statistics npz as a FeatureSet, anything else as uint8 images (checked, not featurised)."""
    if is_stats_file(spec):
        fs = load_stats(spec)
        if fs.mu.shape[0] != 2048:
            raise AmbientInputError(
                f"{flag} {spec}: statistics have dimension {fs.mu.shape[0]}, expected 2048"
            )
        return fs
    return load_image_set(spec, flag, max_size)


def inception_feature_set(
    side: FeatureSet | torch.Tensor, net: _Inception, batch: int = 64, cache: bool = True,
    progress: bool = True, desc: str = "features", env: dist_utils.DistEnv | None = None,
) -> FeatureSet | None:
    """Statistics (and features) of what :func:`load_side` returned: images are featurised (cached).
    Under torchrun (``env``) only rank 0 gets them, the others ``None``."""
    if isinstance(side, FeatureSet):
        return side
    model = net.get()
    feats = cached_features(side, model, f"inception-{model.sha256}", batch, progress, cache, desc=desc, env=env)
    return None if feats is None else FeatureSet.from_features(feats, f"inception-{model.sha256}")


def evaluate_fid(
    samples: str, ref: str, inception: str | os.PathLike | None = None, batch: int = 64,
    kid_subsets: int = 100, kid_subset_size: int = 1000, cache: bool = True, progress: bool = True,
    max_size: int | None = None, device: str | torch.device = "cpu",
) -> dict | None:
    """FID and KID of ``samples`` against ``ref``: ``{"fid", "kid", "kid_std", "num_samples", "num_ref"}``
    (``None`` on ranks other than 0 under torchrun).

    Both inputs (and the network, when images need it) are checked before any featurisation.
    """
    env, dev = join(device)
    net = _Inception(inception, dev)
    side_a = load_side(samples, "--samples", max_size)
    side_b = load_side(ref, "--ref", max_size)
    if not (isinstance(side_a, FeatureSet) and isinstance(side_b, FeatureSet)):
        net.get()
    a = inception_feature_set(side_a, net, batch, cache, progress, "samples", env)
    b = inception_feature_set(side_b, net, batch, cache, progress, "ref", env)
    if a is None or b is None:
        return None
    if a.feature_id and b.feature_id and a.feature_id != b.feature_id:
        raise AmbientInputError(
            f"--ref {ref}: statistics were computed with a different network ({b.feature_id})"
        )
    if a.features is not None and b.features is not None:
        fid = fid_from_features(a.features, b.features)
        kid, kid_std = compute_kid(a.features, b.features, kid_subsets, kid_subset_size)
    else:
        fid = compute_fid(a.mu, a.sigma, b.mu, b.sigma)
        kid = kid_std = None
    return {"fid": fid, "kid": kid, "kid_std": kid_std, "num_samples": a.num, "num_ref": b.num}


def make_reference(
    data: str, out: str | os.PathLike, inception: str | os.PathLike | None = None, batch: int = 64,
    with_features: bool = True, cache: bool = True, progress: bool = True, max_size: int | None = None,
    device: str | torch.device = "cpu",
) -> FeatureSet | None:
    """Write the reference statistics npz of ``data`` to ``out`` (EDM keys plus our extras); under
    torchrun rank 0 writes and returns them, the other ranks return ``None``."""
    check_output_file(out, "--out")
    if is_stats_file(data):
        raise AmbientInputError(f"--data {data}: is already a statistics file; give images")
    images = load_image_set(data, "--data", max_size)
    env, dev = join(device)
    fs = inception_feature_set(images, _Inception(inception, dev), batch, cache, progress, "data", env)
    if fs is not None:
        save_stats(out, fs, with_features=with_features)
    return fs


def evaluate_swd(
    samples: str, ref: str, num_projections: int = 256, seed: int = 0, max_size: int | None = None
) -> dict | None:
    """Pixel-space sliced Wasserstein-2 distance (images in [-1, 1]) of two image specs (cheap: under
    torchrun rank 0 computes it, the other ranks only check the inputs and return ``None``)."""
    x = load_image_set(samples, "--samples", max_size)
    y = load_image_set(ref, "--ref", max_size)
    if x.shape[1:] != y.shape[1:]:
        raise AmbientInputError(
            f"--samples {samples}: image shape {tuple(x.shape[1:])} differs from --ref {tuple(y.shape[1:])}"
        )
    if dist_utils.rank_from_env() != 0:
        return None
    gen = torch.Generator().manual_seed(seed)
    swd = sliced_wasserstein(x, y, num_projections=num_projections, generator=gen)
    return {"swd": swd, "num_samples": int(x.shape[0]), "num_ref": int(y.shape[0]),
            "num_projections": num_projections, "seed": seed}


def find_neighbors(
    samples: str, train: str, out_dir: str | os.PathLike, features: str = "inception", k: int = 3,
    threshold: float = 0.95, inception: str | os.PathLike | None = None, batch: int = 64,
    loo_max: int = 2000, num_pairs: int = 16, cache: bool = True, progress: bool = True,
    device: str | torch.device = "cpu",
) -> dict | None:
    """Nearest training images of each sample; writes ``neighbors.json``, ``similarity_hist.png``
    and ``pairs.png`` into ``out_dir`` and returns the JSON's summary (without per-sample rows).
    Under torchrun the ranks share the featurisation and rank 0 does the rest (others: ``None``)."""
    if not -1.0 <= threshold <= 1.0:
        raise AmbientInputError(f"--threshold must be in [-1, 1], got {threshold}")
    check_output_folder(out_dir, "--out")
    kind, why = folder_kind_why(out_dir)
    if kind not in (None, OTHER):  # never write beside a run's or a model's files
        raise AmbientInputError(f"--out {out_dir}: is {describe(kind)} ({why}); ambient neighbors writes into a new "
                                "folder or one that no other ambient command wrote; choose another --out")
    x = load_image_set(samples, "--samples")
    y = load_image_set(train, "--train")
    if k < 1 or k > y.shape[0]:
        raise AmbientInputError(f"--k must be in 1..{y.shape[0]} for {y.shape[0]} training images, got {k}")
    if features == "pixels" and x.shape[1:] != y.shape[1:]:
        raise AmbientInputError(f"--features pixels needs equal image shapes, got {tuple(x.shape[1:])} "
                                f"and {tuple(y.shape[1:])}")
    env, dev = join(device)
    fn, feature_id = feature_extractor(features, inception, dev)
    fx = cached_features(x, fn, feature_id, batch, progress, cache, desc="samples", env=env)
    fy = cached_features(y, fn, feature_id, batch, progress, cache, desc="train", env=env)
    if fx is None or fy is None:
        return None
    sims, idx = nearest_neighbors(fx, fy, k=k)
    loo, _ = leave_one_out_max_similarity(fy, max_n=loo_max)
    best = sims[:, 0]
    summary = {
        "features": features, "k": k, "threshold": threshold,
        "num_samples": int(x.shape[0]), "num_train": int(y.shape[0]),
        "num_above_threshold": int((best >= threshold).sum()),
        "share_above_threshold": float((best >= threshold).mean()),
        "max_similarity_mean": float(best.mean()), "max_similarity_max": float(best.max()),
        "train_loo": {"num": int(loo.size), "mean": float(loo.mean()),
                      "share_above_threshold": float((loo >= threshold).mean())},
    }
    per_sample = [
        {"index": i, "max_similarity": float(best[i]), "nearest": int(idx[i, 0]),
         "neighbors": idx[i].tolist(), "similarities": [float(v) for v in sims[i]]}
        for i in range(x.shape[0])
    ]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "neighbors.json", {**summary, "samples": per_sample})
    save_png(out / "similarity_hist.png", similarity_histogram(best, loo, threshold))
    top = np.argsort(-best, kind="stable")[: max(1, num_pairs)]
    save_png(out / "pairs.png", pairs_panel(x, y, top, idx, sims))
    return summary
