"""Fréchet Inception Distance and Kernel Inception Distance on feature arrays.

FID between Gaussians N(mu1, S1) and N(mu2, S2) fitted to two feature sets:
``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^{1/2})``, with ``scipy.linalg.sqrtm`` as EDM does.
When both feature arrays are at hand and have no more rows than columns (few images), the
trace term is computed exactly and much faster as the nuclear norm of A1 A2^T, where
Si = Ai^T Ai are the centred, 1/sqrt(n-1)-scaled features (the non-zero eigenvalues of S1 S2
are the squared singular values of A1 A2^T).

KID: the unbiased estimate of the squared MMD with the polynomial kernel
k(x, y) = (x.y / d + 1)^3, averaged over random subsets; its spread over subsets is reported.

Statistics files are npz with ``mu`` and ``sigma`` (EDM's reference format, read and written);
ours may also hold ``features`` (so KID works from them), ``num_images`` and ``feature_id``.
"""

from __future__ import annotations

import os
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.linalg

from ambient.errors import AmbientInputError
from ambient.io import atomic_save_npz


@dataclass
class FeatureSet:
    """Gaussian statistics of a feature set, with the features themselves when known."""

    mu: np.ndarray
    sigma: np.ndarray
    features: np.ndarray | None = None
    num: int | None = None
    feature_id: str | None = None

    @classmethod
    def from_features(cls, features: np.ndarray, feature_id: str | None = None) -> FeatureSet:
        mu, sigma = feature_stats(features)
        return cls(mu, sigma, np.asarray(features), int(features.shape[0]), feature_id)


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (d,) and covariance (d, d) (ddof = 1) of an (n, d) feature array, in float64."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features: need an (n >= 2, d) array, got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def compute_fid(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) via ``scipy.linalg.sqrtm``."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(
            f"mu/sigma: shapes disagree: mu1 {mu1.shape}, sigma1 {sigma1.shape}, mu2 {mu2.shape}, "
            f"sigma2 {sigma2.shape}"
        )
    mean_term = np.square(mu1 - mu2).sum()
    with warnings.catch_warnings():  # singular covariances (fewer images than dimensions) are expected
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        root = scipy.linalg.sqrtm(sigma1 @ sigma2)
    return float(np.real(mean_term + np.trace(sigma1 + sigma2) - 2.0 * np.trace(root)))


def fid_from_features(feats1: np.ndarray, feats2: np.ndarray) -> float:
    """FID of two (n, d) feature arrays; exact nuclear-norm route when n <= d for both."""
    f1, f2 = np.asarray(feats1, np.float64), np.asarray(feats2, np.float64)
    mu1, sigma1 = feature_stats(f1)
    mu2, sigma2 = feature_stats(f2)
    if f1.shape[1] != f2.shape[1]:
        raise ValueError(f"features: dimensions differ ({f1.shape[1]} vs {f2.shape[1]})")
    d = f1.shape[1]
    if f1.shape[0] > d or f2.shape[0] > d:
        return compute_fid(mu1, sigma1, mu2, sigma2)
    a1 = (f1 - mu1) / np.sqrt(f1.shape[0] - 1)
    a2 = (f2 - mu2) / np.sqrt(f2.shape[0] - 1)
    nuclear = np.linalg.svd(a1 @ a2.T, compute_uv=False).sum()
    return float(np.square(mu1 - mu2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2.0 * nuclear)


def _jackknife_mmd_std(x: np.ndarray, y: np.ndarray) -> float:
    """Two-sample delete-one jackknife standard error of the unbiased MMD² (cubic polynomial kernel) of x and y.

    θ_(−i) for every deleted row of x (then of y) comes from the kernel matrices' row sums in O(1) each; the
    variance is Σ over both samples of (n − 1)/n Σ_i (θ_(−i) − mean θ_(−·))² (Efron & Stein's estimator, a
    consistent and conservative one for U-statistics)."""
    m, n, d = x.shape[0], y.shape[0], x.shape[1]
    kxx, kyy, kxy = (x @ x.T / d + 1.0) ** 3, (y @ y.T / d + 1.0) ** 3, (x @ y.T / d + 1.0) ** 3
    sxx, syy, sxy = kxx.sum() - np.trace(kxx), kyy.sum() - np.trace(kyy), kxy.sum()
    rxx, ryy = kxx.sum(1) - np.diag(kxx), kyy.sum(1) - np.diag(kyy)
    total = 0.0
    if m >= 3:
        theta = (sxx - 2 * rxx) / ((m - 1) * (m - 2)) + syy / (n * (n - 1)) - 2 * (sxy - kxy.sum(1)) / ((m - 1) * n)
        total += (m - 1) / m * float(((theta - theta.mean()) ** 2).sum())
    if n >= 3:
        theta = sxx / (m * (m - 1)) + (syy - 2 * ryy) / ((n - 1) * (n - 2)) - 2 * (sxy - kxy.sum(0)) / (m * (n - 1))
        total += (n - 1) / n * float(((theta - theta.mean()) ** 2).sum())
    return total ** 0.5


def compute_kid(
    feats1: np.ndarray, feats2: np.ndarray, num_subsets: int = 100, max_subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """Kernel Inception Distance: (mean over subsets of the unbiased MMD² estimate, its spread).

    Each subset draws m = min(n1, n2, max_subset_size) rows of each array without replacement
    (from ``np.random.default_rng(seed)``). The spread is the std over subsets (ddof = 1) when the
    subsets differ; when m reaches the size of either set, every subset holds that whole set and their
    std would say nothing of the estimate's noise (it is 0 when both are whole), so the spread is then the
    two-sample jackknife standard error of the estimate on the first subset (:func:`_jackknife_mmd_std`).
    """
    x_all, y_all = np.asarray(feats1, np.float64), np.asarray(feats2, np.float64)
    if x_all.ndim != 2 or y_all.ndim != 2 or x_all.shape[1] != y_all.shape[1]:
        raise ValueError(f"features: need (n, d) arrays of equal d, got {x_all.shape} and {y_all.shape}")
    if num_subsets < 1:
        raise ValueError(f"num_subsets: must be >= 1, got {num_subsets}")
    d = x_all.shape[1]
    m = min(x_all.shape[0], y_all.shape[0], max_subset_size)
    if m < 2:
        raise ValueError(f"features: KID needs at least 2 rows in each set, got subset size {m}")
    rng = np.random.default_rng(seed)
    values = np.empty(num_subsets)
    first = None
    for s in range(num_subsets):
        x = x_all[rng.choice(x_all.shape[0], m, replace=False)]
        y = y_all[rng.choice(y_all.shape[0], m, replace=False)]
        first = (x, y) if first is None else first
        kxx = (x @ x.T / d + 1.0) ** 3
        kyy = (y @ y.T / d + 1.0) ** 3
        kxy = (x @ y.T / d + 1.0) ** 3
        within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
        values[s] = within - 2.0 * kxy.mean()
    if m == x_all.shape[0] or m == y_all.shape[0]:
        return float(values.mean()), _jackknife_mmd_std(*first)
    std = float(values.std(ddof=1)) if num_subsets > 1 else 0.0
    return float(values.mean()), std


def save_stats(path: str | os.PathLike, fs: FeatureSet, with_features: bool = True) -> Path:
    """Write ``mu``, ``sigma`` (EDM format) plus our optional ``features``, ``num_images``, ``feature_id``."""
    arrays: dict[str, np.ndarray] = {"mu": fs.mu, "sigma": fs.sigma}
    if with_features and fs.features is not None:
        arrays["features"] = np.asarray(fs.features, np.float32)
    if fs.num is not None:
        arrays["num_images"] = np.array(fs.num)
    if fs.feature_id is not None:
        arrays["feature_id"] = np.array(fs.feature_id)
    return atomic_save_npz(path, **arrays)


def is_stats_file(path: str | os.PathLike) -> bool:
    """True if ``path`` is an npz meant as statistics: it holds ``mu`` or ``sigma``, or no ``images``."""
    p = Path(path)
    if p.suffix.lower() != ".npz" or not p.is_file():
        return False
    try:
        with np.load(p) as data:
            return "mu" in data.files or "sigma" in data.files or "images" not in data.files
    except (OSError, ValueError, zipfile.BadZipFile):
        return False


def load_stats(path: str | os.PathLike) -> FeatureSet:
    """Read a statistics npz (EDM's or ours); AmbientInputError if it lacks ``mu``/``sigma`` or is damaged."""
    try:
        with np.load(path) as data:
            if "mu" not in data.files or "sigma" not in data.files:
                raise AmbientInputError(
                    f"{path}: statistics npz needs arrays 'mu' and 'sigma', has {data.files}"
                )
            mu, sigma = np.asarray(data["mu"], np.float64), np.asarray(data["sigma"], np.float64)
            feats = data["features"] if "features" in data.files else None
            num = int(data["num_images"]) if "num_images" in data.files else None
            fid_ = str(data["feature_id"]) if "feature_id" in data.files else None
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        if isinstance(exc, AmbientInputError):
            raise
        raise AmbientInputError(f"{path}: cannot read statistics npz ({exc.__class__.__name__})") from None
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise AmbientInputError(f"{path}: 'mu' {mu.shape} and 'sigma' {sigma.shape} do not fit together")
    if feats is not None and (feats.ndim != 2 or feats.shape[1] != mu.shape[0]):
        raise AmbientInputError(f"{path}: 'features' has shape {feats.shape}, expected (n, {mu.shape[0]})")
    if num is None and feats is not None:
        num = int(feats.shape[0])
    return FeatureSet(mu, sigma, feats, num, fid_)
