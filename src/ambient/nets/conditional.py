"""Class-conditional models (the reference's ``--cond``): EDM's one-hot label input.

Training with ``--cond`` gives the network (a DDPM++ backbone, :mod:`ambient.nets.songunet`) the
one-hot class of each image as ``class_labels`` (N, label_dim), as EDM's preconditioning does;
the labels come from the data (an EDM zip's ``dataset.json``, a builtin dataset, an ``.npz``
``labels`` array, or a folder's class subfolders). Sampling a conditional model needs a class
per image (``ambient sample --class K`` or ``--classes``): :func:`sample_classes` samples each
class's seeds through :class:`LabelledDenoiser` and puts them back in seed order, so an image
depends only on its seed and its class. Sampling one without classes is refused.
"""

from __future__ import annotations

import torch

from ambient.errors import AmbientInputError
from ambient.nets.denoiser import DenoiserWrapper, MaskDenoiser


def one_hot(labels, label_dim: int, device=None) -> torch.Tensor:
    """(N,) integer classes → (N, label_dim) float32 one-hot; classes outside [0, label_dim) are errors."""
    labels = torch.as_tensor(labels, dtype=torch.int64, device=device).reshape(-1)
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= label_dim):
        raise AmbientInputError(f"class labels must be in 0..{label_dim - 1}, got {labels.min()}..{labels.max()}")
    return torch.nn.functional.one_hot(labels, label_dim).to(torch.float32)


def label_dim_for(cond: bool, data, spec: str) -> int:
    """Number of classes of a ``--cond`` run (0 when unconditional)."""
    if not cond:
        return 0
    if data.labels is None:
        raise AmbientInputError(f"--cond: {spec} has no labels (they come from an EDM zip's dataset.json, a builtin "
                                "dataset, an .npz 'labels' array or a folder of class subfolders)")
    low = int(data.labels.min())
    if low < 0:
        unlabelled = int((data.labels < 0).sum())
        what = "every image" if unlabelled == len(data.labels) else f"{unlabelled} of {len(data.labels)} images"
        raise AmbientInputError(f"--cond: {spec} has negative labels ({what}, e.g. {low}: unlabelled?); class "
                                "labels must be 0..K-1 (train without --cond, or give labels to every image)")
    return int(data.labels.max()) + 1


def batch_labels(data, indices: torch.Tensor, label_dim: int, device) -> torch.Tensor | None:
    """One-hot labels of the images ``indices`` of ``data`` (None for an unconditional model)."""
    if not label_dim:
        return None
    return one_hot(data.labels[torch.as_tensor(indices, dtype=torch.int64).reshape(-1)], label_dim, device)


class LabelledDenoiser(DenoiserWrapper, MaskDenoiser):
    """A conditional denoiser with its class labels bound: ``D(x, sigma, mask)``.

    ``class_labels`` is (N, label_dim) for batches of exactly N images, or (1, label_dim) for any batch.
    The σ range and schedule are the wrapped denoiser's.
    """

    def __init__(self, inner: MaskDenoiser, class_labels: torch.Tensor):
        super().__init__(inner)
        self.img_channels = inner.img_channels
        self.sigma_data = inner.sigma_data
        self.register_buffer("class_labels", class_labels.to(torch.float32), persistent=False)

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        labels = self.class_labels
        if labels.shape[0] == 1:
            labels = labels.expand(x.shape[0], -1)
        return self.denoiser.denoise(x, sigma, mask, class_labels=labels.to(x.device))








