"""Named presets of diffusers' ``UNet2DModel`` as denoiser backbones.

A backbone maps (network input with image + mask channels, c_noise) to image channels; the
EDM scalings live in :mod:`ambient.nets.denoiser`, not here. Any ``nn.Module`` with that call
signature works as a backbone; these presets are the defaults.

Presets (channel widths per resolution level, residual blocks per level, attention levels):

==========  ======================  ======  ===========================================
name        widths                  blocks  notes
==========  ======================  ======  ===========================================
tiny        16, 32                  1       tests; no attention (0.17M parameters)
small       32, 64, 64              1       28–32 px on a CPU (1.2M parameters at 1 ch)
ddpmpp32    128, 256, 256, 256      4       width/depth of EDM's CIFAR-10 DDPM++ (attention at 16 px; 63M)
ddpmpp64    128, 256, 256, 256      4       EDM's 64 px DDPM++ layout (attention at 16 px)
==========  ======================  ======  ===========================================

Images of any size from 8 px work: inputs are zero-padded up to a multiple of the UNet's total
downsampling factor (padding reads as hidden pixels, mask 0) and outputs cropped back.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class BackbonePreset:
    block_out_channels: tuple[int, ...]
    layers_per_block: int
    attention_levels: tuple[int, ...] = ()
    norm_num_groups: int = 32
    attention_head_dim: int = 64


PRESETS: dict[str, BackbonePreset] = {
    "tiny": BackbonePreset((16, 32), 1, (), norm_num_groups=8, attention_head_dim=8),
    "small": BackbonePreset((32, 64, 64), 1, (2,), norm_num_groups=8, attention_head_dim=32),
    "ddpmpp32": BackbonePreset((128, 256, 256, 256), 4, (1,)),
    "ddpmpp64": BackbonePreset((128, 256, 256, 256), 4, (2,)),
}


@dataclass(frozen=True)
class BackboneConfig:
    """Everything needed to rebuild a backbone; stored in checkpoints as JSON."""

    arch: str = "small"
    img_channels: int = 1
    resolution: int = 28
    mask_channels: bool = True
    dropout: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


class UNetBackbone(nn.Module):
    """``UNet2DModel`` wrapped to take (x_in, c_noise) and to pad to a valid size."""

    def __init__(self, config: BackboneConfig):
        super().__init__()
        from diffusers import UNet2DModel

        if config.arch not in PRESETS:
            raise ValueError(f"arch must be one of {', '.join(PRESETS)}, got {config.arch!r}")
        if config.img_channels not in (1, 3):
            raise ValueError(f"img_channels must be 1 or 3, got {config.img_channels}")
        if not 8 <= config.resolution <= 512:
            raise ValueError(f"resolution must be in [8, 512], got {config.resolution}")
        if not 0.0 <= config.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {config.dropout}")
        preset = PRESETS[config.arch]
        self.config = config
        levels = len(preset.block_out_channels)
        self.multiple = 2 ** (levels - 1)
        padded = -(-config.resolution // self.multiple) * self.multiple
        down = tuple("AttnDownBlock2D" if i in preset.attention_levels else "DownBlock2D" for i in range(levels))
        up = tuple("AttnUpBlock2D" if levels - 1 - i in preset.attention_levels else "UpBlock2D"
                   for i in range(levels))
        self.in_channels = config.img_channels * (2 if config.mask_channels else 1)
        self.unet = UNet2DModel(
            sample_size=padded,
            in_channels=self.in_channels,
            out_channels=config.img_channels,
            block_out_channels=preset.block_out_channels,
            layers_per_block=preset.layers_per_block,
            down_block_types=down,
            up_block_types=up,
            add_attention=bool(preset.attention_levels),
            attention_head_dim=preset.attention_head_dim,
            norm_num_groups=preset.norm_num_groups,
            dropout=config.dropout,
            resnet_time_scale_shift="scale_shift",
            flip_sin_to_cos=True,
            freq_shift=0,
        )

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        ph, pw = (-h) % self.multiple, (-w) % self.multiple
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph))
        c_noise = c_noise.reshape(-1).to(x.dtype).expand(x.shape[0])
        out = self.unet(x, c_noise).sample
        return out[..., :h, :w]


def build_backbone(arch: str, img_channels: int, resolution: int, mask_channels: bool = True,
                   dropout: float = 0.0) -> UNetBackbone:
    """Build a preset backbone; see :data:`PRESETS`."""
    return UNetBackbone(BackboneConfig(arch, img_channels, resolution, mask_channels, dropout))


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
