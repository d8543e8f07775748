"""The paper's DDPM++ presets and the reference preconditioning for imported models.

Presets (``--arch``), EDM's / Ambient Diffusion's DDPM++ layouts (:mod:`ambient.nets.songunet`):

=======================  =========================  ===================================================
name                     channel_mult (× 128)       notes
=======================  =========================  ===================================================
ddpmpp-cifar             2, 2, 2                    32 px; 4 blocks per level; attention at 16 px; gated
ddpmpp-cifar-ungated     2, 2, 2                    the same with plain convolutions
ddpmpp-celeba            1, 2, 2, 2                 64 px (CelebA-HQ / AFHQ); gated
ddpmpp-celeba-ungated    1, 2, 2, 2                 the same with plain convolutions
songunet                 (``ModelConfig.songunet``)  any :class:`~ambient.nets.songunet.SongUNetConfig`
=======================  =========================  ===================================================

For new training the presets have no augmentation-label input (``augment_dim`` 0; our
augmentation is an x-flip with no label); with ``augment_dim`` 9, 6 channels in and out, they have
the reference's parameter counts (106,752,006 and 118,088,966 gated; 55,744,262 and 61,812,486
ungated). New training wraps them in our mask-aware :class:`~ambient.nets.denoiser.Denoiser`.

:class:`ReferenceDenoiser` is the reference implementation's EDM preconditioning, for imported
checkpoints: the network takes and returns 2C channels, its input is c_in · [mask ⊙ x, mask]
(every channel scaled by c_in, the mask included), D = c_skip · input + c_out · F with EDM's
plain c_skip, c_out and c_noise = ln(σ)/4, and the image prediction is D's first C channels.
"""

from __future__ import annotations

import torch

from ambient.nets.denoiser import Denoiser, MaskDenoiser, edm_scalings
from ambient.nets.songunet import SongUNet, SongUNetConfig

_DDPMPP = dict(model_channels=128, num_blocks=4, attn_resolutions=(16,), channel_mult_emb=4, channel_mult_noise=1,
               resample_filter=(1, 1))
SONG_PRESETS: dict[str, dict] = {
    "ddpmpp-cifar": {**_DDPMPP, "channel_mult": (2, 2, 2), "gated": True},
    "ddpmpp-cifar-ungated": {**_DDPMPP, "channel_mult": (2, 2, 2), "gated": False},
    "ddpmpp-celeba": {**_DDPMPP, "channel_mult": (1, 2, 2, 2), "gated": True},
    "ddpmpp-celeba-ungated": {**_DDPMPP, "channel_mult": (1, 2, 2, 2), "gated": False},
}
SONG_ARCHS = (*SONG_PRESETS, "songunet")
PRECONDITIONINGS = ("ambient", "reference")


def song_config(arch: str, *, resolution: int, in_channels: int, out_channels: int, dropout: float = 0.0,
                label_dim: int = 0, overrides: dict | None = None) -> SongUNetConfig:
    """The :class:`SongUNetConfig` of a preset (or of ``songunet``: ``overrides`` alone), with
    ``overrides`` (any SongUNetConfig field) applied last."""
    if arch not in SONG_ARCHS:
        raise ValueError(f"arch must be one of {', '.join(SONG_ARCHS)}, got {arch!r}")
    base = dict(SONG_PRESETS.get(arch, {}), img_resolution=resolution, in_channels=in_channels,
                out_channels=out_channels, dropout=dropout, label_dim=label_dim)
    return SongUNetConfig.from_dict({**base, **(overrides or {})})


class ReferenceDenoiser(MaskDenoiser):
    """``D(x, sigma, mask=None, class_labels=None)`` computed as the reference's ``EDMPrecond``.

    ``mask_channels=False`` is a plain EDM network (C channels in and out; the mask is ignored).
    For a class-conditional network, ``class_labels`` is (N, label_dim) (one-hot); None means all
    zeros, as in the reference.
    """

    def __init__(self, model: SongUNet, img_channels: int, sigma_data: float = 0.5, mask_channels: bool = True):
        super().__init__()
        if sigma_data <= 0:
            raise ValueError(f"sigma_data must be positive, got {sigma_data}")
        self.model = model
        self.img_channels = int(img_channels)
        self.sigma_data = float(sigma_data)
        self.mask_channels = bool(mask_channels)
        self.label_dim = model.config.label_dim

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, mask: torch.Tensor | None,
                class_labels: torch.Tensor | None = None) -> torch.Tensor:
        n = x.shape[0]
        x = x.to(torch.float32)
        if self.mask_channels:
            mask = torch.ones_like(x) if mask is None else mask.to(torch.float32)
            x = torch.cat([x * mask, mask], dim=1)
        if self.label_dim:
            class_labels = (x.new_zeros(n, self.label_dim) if class_labels is None
                            else class_labels.to(torch.float32).reshape(n, self.label_dim))
        c_skip, c_out, c_in, c_noise = edm_scalings(sigma.to(torch.float32).reshape(n, 1, 1, 1), self.sigma_data)
        out = self.model(c_in * x, c_noise.reshape(n), class_labels=class_labels)
        return (c_skip * x + c_out * out.to(torch.float32))[:, : self.img_channels]


def build_song_denoiser(cfg) -> MaskDenoiser:
    """The denoiser of a :class:`ambient.nets.registry.ModelConfig` whose arch is a DDPM++ preset or ``songunet``."""
    if cfg.arch not in SONG_ARCHS:
        raise ValueError(f"preconditioning {cfg.preconditioning!r} needs a DDPM++ arch ({', '.join(SONG_ARCHS)}), "
                         f"got {cfg.arch!r}")
    if cfg.preconditioning not in PRECONDITIONINGS:
        raise ValueError(f"preconditioning must be one of {', '.join(PRECONDITIONINGS)}, got {cfg.preconditioning!r}")
    c = cfg.img_channels
    reference = cfg.preconditioning == "reference"
    in_channels = 2 * c if cfg.mask_channels else c
    net = SongUNet(song_config(cfg.arch, resolution=cfg.resolution, in_channels=in_channels,
                               out_channels=in_channels if reference else c, dropout=cfg.dropout,
                               label_dim=cfg.label_dim, overrides=cfg.songunet))
    if reference:
        return ReferenceDenoiser(net, c, cfg.sigma_data, cfg.mask_channels)
    return Denoiser(net, c, cfg.sigma_data, cfg.mask_aware, cfg.mask_channels)
