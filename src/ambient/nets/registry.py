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
    """What the sampler needs to reproduce the training masks, and where it must stop.

    A model trained on noisy data (``ambient train --objective noisy``) knows E[x0 | x_σ] only for σ above the
    data's noise level ``noise_sigma`` (σ_n, model units): its sampler runs EDM's schedule from σ_max down to
    ``sigma_stop`` (just above σ_n) instead of 0.002, and its last step (to σ = 0, Euler) returns the clean estimate
    D(x_σ_stop, σ_stop). :meth:`fit_sigma_range` gives the loaded denoiser that σ range, so every sampler that
    takes its σ's from the denoiser (``ambient sample``, the training grids, posterior wrappers) stops there.
    """

    corruption: Corruption
    data_survival: float | None = None  # A came with the data: its measured observed share
    # False for runs saved before the mask law was recorded (``mask_law`` in config.json): their law is
    # the one they were trained with, filled in by ambient.store.upgrades.sampling_section.
    mask_law_recorded: bool = True
    noise_sigma: float | None = None  # σ_n of the training images' noise, model units (None: taken as clean)
    sigma_stop: float | None = None  # the smallest σ the sampler visits (None: the denoiser's own, EDM's 0.002)

    def __post_init__(self):
        for name in ("noise_sigma", "sigma_stop"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < 1e6):
                raise ValueError(f"{name} must be a positive number or None, got {v!r}")
        if self.sigma_stop is not None and self.noise_sigma is not None and not self.sigma_stop > self.noise_sigma:
            raise ValueError(f"sigma_stop ({self.sigma_stop}) must exceed noise_sigma ({self.noise_sigma})")

    def fit_sigma_range(self, denoiser):
        """Give ``denoiser`` (a :class:`~ambient.nets.denoiser.FullImageDenoiser` built from this spec's model)
        the smallest σ it may be sampled at, ``sigma_stop``, as its ``sigma_min``; returns it."""
        if self.sigma_stop is not None:
            denoiser.sigma_min = float(self.sigma_stop)
        return denoiser

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
                "mask_law": self.mask_law, "noise_sigma": self.noise_sigma, "sigma_stop": self.sigma_stop}

    @classmethod
    def from_dict(cls, d: dict) -> SamplingSpec:
        """The spec of a ``sampling`` section as :meth:`to_dict` writes it (a saved folder's section passes
        through :func:`ambient.store.upgrades.sampling_section` first)."""
        corruption = Corruption.from_dict(d["corruption"])
        law = d["mask_law"]
        if law not in ("pixel", "channel"):
            raise ValueError(f"mask_law must be 'pixel' or 'channel', got {law!r}")
        corruption = replace(corruption, mask_full_rgb=law == "pixel")
        return cls(corruption, d.get("data_survival"), bool(d.get("mask_law_recorded", True)),
                   d.get("noise_sigma"), d.get("sigma_stop"))


def build_denoiser(cfg: ModelConfig) -> Denoiser:
    from ambient.nets.ddpmpp import SONG_ARCHS, build_song_denoiser

    if cfg.arch in SONG_ARCHS or cfg.preconditioning != "ambient":
        return build_song_denoiser(cfg)
    backbone = UNetBackbone(BackboneConfig(cfg.arch, cfg.img_channels, cfg.resolution,
                                           cfg.mask_channels, cfg.dropout))
    return Denoiser(backbone, cfg.img_channels, cfg.sigma_data, cfg.mask_aware, cfg.mask_channels)


ARCHS = (*PRESETS, *SONG_PRESETS)  # diffusers UNet2DModel presets, then the paper's DDPM++ (ambient.nets.ddpmpp)
