"""Data: how images are read and how they are corrupted.

Modules: ``corruption`` (mask laws A and Ã, per-image seeded), ``readers`` (npz, image folders,
Fashion-MNIST, digits), ``images`` (uint8 ↔ float, PNG grids), ``datasets`` (``ImageDataset``: images,
masks, labels, augmentation).
"""

from ambient.data.corruption import Corruption
from ambient.data.datasets import ImageDataset

__all__ = ["Corruption", "ImageDataset"]
