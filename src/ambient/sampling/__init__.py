"""Sampling: ``solvers`` (Euler and Heun over σ levels), ``fixed_mask`` (the paper's sampler: a fixed-mask
ensemble as a full-image denoiser, ``ambient_sample``), ``posterior`` (posterior denoisers: MMPS, DPS,
projection; MMPS draws for EM), ``generate`` (images from a model folder, class labels, seed lists),
``restore`` (posterior samples for corrupted observations or operator measurements), ``classical``
(zero-filled and total-variation compressed-sensing reconstructions: the classical baselines), ``fixed_operator``
(the k-space ambient network's fixed-operator sampler and one-step restore)."""

from ambient.sampling.fixed_mask import FixedMaskEnsemble, ambient_sample

__all__ = ["FixedMaskEnsemble", "ambient_sample"]
