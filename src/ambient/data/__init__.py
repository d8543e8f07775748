"""Data: how images are read and how they are corrupted.

Modules: ``corruption`` (mask laws A and Ã, per-image seeded), ``readers`` (npz, image folders,
Fashion-MNIST, digits; uint8, uint16 and float data with their value range), ``images`` (uint8 ↔ float, data
units ↔ [-1, 1], PNG grids), ``datasets`` (``ImageDataset``: images, masks, labels, augmentation), ``phantoms``
(procedural MRI-like head phantoms), ``kspace_law`` (k-space line masks' further law: mirror pairs of acquired lines
dropped at δ, the seen spectrum).
"""

from ambient.data.corruption import Corruption
from ambient.data.datasets import ImageDataset

__all__ = ["Corruption", "ImageDataset"]
