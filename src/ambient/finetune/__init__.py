"""Finetune pretrained pixel-space diffusers models (DDPM-style) with the ambient objective.

Modules: ``pretrained`` (load a diffusers UNet + scheduler, mask-channel surgery, the
``MaskedUNet`` call), ``objective`` (x0 from ε / v, the ambient loss on A), ``config``
(``FinetuneConfig``), ``loop`` (``finetune``: EMA, accumulation, snapshots, resume, export),
``inference`` (``FinetunedDenoiser`` in EDM's σ convention, ``load_finetuned``).
See docs/finetune.md.
"""

from ambient.finetune.config import FinetuneConfig
from ambient.finetune.inference import FinetunedDenoiser, export_finetuned, load_finetuned
from ambient.finetune.loop import build_model, finetune, load_data
from ambient.finetune.objective import (
    FinetuneLoss,
    alpha_bar_from_sigma,
    alphas_cumprod,
    sigma_from_alpha_bar,
    x0_from_output,
)
from ambient.finetune.pretrained import MaskedUNet, Pretrained, add_mask_channels, load_pretrained

__all__ = [
    "FinetuneConfig", "FinetuneLoss", "FinetunedDenoiser", "MaskedUNet", "Pretrained",
    "add_mask_channels", "alpha_bar_from_sigma", "alphas_cumprod", "build_model", "export_finetuned",
    "finetune", "load_data", "load_finetuned", "load_pretrained", "sigma_from_alpha_bar", "x0_from_output",
]
