"""Training objectives: ``losses`` (the ambient loss, plain EDM's and the loss on noisy data at a known noise level,
as loss objects; the σ weightings), ``ddpm_loss``
(the ambient loss for finetuning DDPM-parameterised UNets) and ``kspace_loss`` (the ambient loss on undersampled
k-space)."""

from ambient.objectives.losses import AmbientLoss, EDMLoss

__all__ = ["AmbientLoss", "EDMLoss"]
