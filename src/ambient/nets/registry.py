"""The architecture registry and a model as data: ``ModelConfig`` (backbone and scalings),
``SamplingSpec`` (the mask law the sampler reproduces), ``build_denoiser``."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from ambient.configbase import dataclass_from_dict
from ambient.data.corruption import Corruption
from ambient.nets.backbones import PRESETS, BackboneConfig, UNetBackbone
from ambient.nets.ddpmpp import SONG_PRESETS
from ambient.nets.denoiser import Denoiser


@dataclass(frozen=True)
class ModelConfig:
    """Backbone preset and preconditioning; round-trips through JSON."""

    arch: str = "small"
    img_channels: int = 1
    resolution: int = 28
    mask_channels: bool = True
    dropout: float = 0.0
    sigma_data: float = 0.5
    mask_aware: bool = True
    # DDPM++ backbones (arch ddpmpp-* or songunet, see ambient.nets.ddpmpp): SongUNetConfig fields over the preset
    songunet: dict | None = None
    preconditioning: str = "ambient"  # or "reference": the paper's EDMPrecond (imported checkpoints)
    label_dim: int = 0  # class-conditional: one-hot labels of this many classes

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        return dataclass_from_dict(cls, d, "model")


@dataclass(frozen=True)
class SamplingSpec:
    """What the sampler needs to reproduce the training masks."""

    corruption: Corruption
    data_survival: float | None = None  # A came with the data: its measured observed share
    # False for runs saved before the mask law was recorded (``mask_law`` in config.json): their law is
    # the one they were trained with, filled in by ambient.store.upgrades.sampling_section.
    mask_law_recorded: bool = True

    def sampler_kwargs(self) -> dict:
        """Keyword arguments of :func:`ambient.sampling.fixed_mask.ambient_sample` that reproduce the mask law."""
        if not self.uses_masks:
            return {}
        return {"corruption": self.corruption, "data_survival": self.data_survival}

    @property
    def uses_masks(self) -> bool:
        c = self.corruption
        return self.data_survival is not None or c.p > 0 or c.delta > 0

    @property
    def mask_law(self) -> str:
        """"pixel" (one mask draw for all channels of a pixel) or "channel"."""
        return "pixel" if self.corruption.mask_full_rgb else "channel"

    def to_dict(self) -> dict:
        return {"corruption": self.corruption.to_dict(), "data_survival": self.data_survival,
                "mask_law": self.mask_law}

    @classmethod
    def from_dict(cls, d: dict) -> SamplingSpec:
        """The spec of a ``sampling`` section as :meth:`to_dict` writes it (a saved folder's section passes
        through :func:`ambient.store.upgrades.sampling_section` first)."""
        corruption = Corruption.from_dict(d["corruption"])
        law = d["mask_law"]
        if law not in ("pixel", "channel"):
            raise ValueError(f"mask_law must be 'pixel' or 'channel', got {law!r}")
        corruption = replace(corruption, mask_full_rgb=law == "pixel")
        return cls(corruption, d.get("data_survival"), bool(d.get("mask_law_recorded", True)))


def build_denoiser(cfg: ModelConfig) -> Denoiser:
    from ambient.nets.ddpmpp import SONG_ARCHS, build_song_denoiser

    if cfg.arch in SONG_ARCHS or cfg.preconditioning != "ambient":
        return build_song_denoiser(cfg)
    backbone = UNetBackbone(BackboneConfig(cfg.arch, cfg.img_channels, cfg.resolution,
                                           cfg.mask_channels, cfg.dropout))
    return Denoiser(backbone, cfg.img_channels, cfg.sigma_data, cfg.mask_aware, cfg.mask_channels)


ARCHS = (*PRESETS, *SONG_PRESETS)  # diffusers UNet2DModel presets, then the paper's DDPM++ (ambient.nets.ddpmpp)
