"""Evaluation metrics: FID/KID on Inception features, pixel-space sliced Wasserstein, memorisation.

Modules: ``inception`` (the feature network and its preprocessing), ``features`` (batched,
cached featurisation), ``fid`` (FID, KID, statistics files), ``swd``, ``neighbors`` (nearest
training images), ``plots`` (PIL figures), ``evaluate`` (whole evaluations from data specs), ``quality``
(PSNR and SSIM of restorations against references).
"""

from ambient.metrics.fid import FeatureSet, compute_fid, compute_kid, feature_stats, fid_from_features
from ambient.metrics.neighbors import leave_one_out_max_similarity, nearest_neighbors
from ambient.metrics.swd import sliced_wasserstein, wasserstein_1d

__all__ = [
    "FeatureSet",
    "compute_fid",
    "compute_kid",
    "feature_stats",
    "fid_from_features",
    "leave_one_out_max_similarity",
    "nearest_neighbors",
    "sliced_wasserstein",
    "wasserstein_1d",
]
