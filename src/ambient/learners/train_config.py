"""The training configuration: one typed dataclass that round-trips through JSON.

Field names match the command-line flags (``corruption_probability`` ↔
``--corruption-probability``), so a ``config.json`` reads like the command that made it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ambient.configbase import ConfigBase, flag_error
from ambient.data.corruption import PATTERNS, Corruption
from ambient.learners.core import LR_SCHEDULES
from ambient.nets.ddpmpp import SONG_PRESETS
from ambient.nets.registry import ARCHS
from ambient.objectives.losses import NORMALIZATIONS, WEIGHTINGS, needs_noise_sigma
from ambient.objectives.losses import OBJECTIVES as _LOSSES

OBJECTIVES = tuple(_LOSSES)  # the loss objects' names (ambient.objectives.losses.training_loss)
PRECISIONS = ("fp32", "bf16")



# ``--resume`` without a value: the latest snapshot in --outdir (an error if there is none).
RESUME_LATEST = "latest"

def _check_arch_kwargs(text: str, arch: str) -> None:
    import json

    from ambient.nets.songunet import SongUNetConfig

    if arch not in SONG_PRESETS:
        raise flag_error("arch_kwargs", f"only for the DDPM++ archs ({', '.join(SONG_PRESETS)}), not {arch!r}")
    try:
        kwargs = json.loads(text)
    except ValueError as exc:
        raise flag_error("arch_kwargs", f"not JSON ({exc})") from None
    allowed = set(SongUNetConfig.__dataclass_fields__) - {"img_resolution", "in_channels", "out_channels", "label_dim"}
    if not isinstance(kwargs, dict) or set(kwargs) - allowed:
        raise flag_error("arch_kwargs", f"must be a JSON object with keys among {', '.join(sorted(allowed))}")


# Fields that may change when a run is resumed; every other field must match the saved run.
RESUMABLE_CHANGES = frozenset({"kimg", "snapshot_kimg", "tick_kimg", "grid_samples", "outdir", "resume",
                               "device", "max_nonfinite", "compile", "init"})


@dataclass
class TrainConfig(ConfigBase, what="training"):
    """Everything that defines a training run (see ``ambient train --help`` for each flag)."""

    data: str = "builtin:fashion-mnist"
    outdir: str = "runs/train"
    data_dir: str | None = None
    max_size: int | None = None
    resolution: int | None = None
    corruption_pattern: str = "dust"
    corruption_probability: float = 0.0
    delta_probability: float = 0.1
    mask_full_rgb: bool | None = None  # None: from the data's masks (see data.resolve_mask_full_rgb)
    fixed_further: bool = False
    objective: str = "ambient"
    noise_sigma: float | None = None  # --objective noisy: σ_n of the images' noise, in the data's units (0..255 uint8)
    arch: str = "small"
    arch_kwargs: str | None = None  # ddpmpp-* only: JSON object of SongUNetConfig fields over the preset
    dropout: float = 0.0
    mask_aware: bool = True
    cond: bool = False
    loss_normalize: str = "mean"
    loss_weighting: str | None = None  # None: "tilted" with mask-aware scalings (a resumed run keeps its own)
    batch: int = 64
    lr: float = 1e-3
    lr_warmup_kimg: float = 1.0
    lr_schedule: str | None = None  # after the warm-up: constant, or cosine decay to 0 at --kimg; None: cosine for a
    # new run (a resumed run keeps its own; runs from before the option: constant)
    kimg: float = 10.0
    ema: float = 0.5
    ema_rampup: float = 0.05
    max_grad_norm: float = 1.0
    augment: float = 0.0
    seed: int = 0
    snapshot_kimg: float = 5.0
    tick_kimg: float = 0.5
    grid_samples: int = 64
    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False
    max_nonfinite: int = 20
    device: str = "auto"
    resume: str | None = None
    init: str | None = None  # warm start: a model whose EMA weights start net and EMA (ambient.store.warmstart)

    @property
    def corruption(self) -> Corruption:
        return Corruption(self.corruption_pattern, self.corruption_probability, self.delta_probability,
                          bool(self.mask_full_rgb))

    def validate(self) -> TrainConfig:
        """Raise AmbientInputError naming the flag of the first bad value."""
        for name in ("corruption_probability", "delta_probability"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not (0.0 <= float(v) < 1.0):
                self.fail(name, f"must be in [0, 1), got {v!r}")
        choices = {"corruption_pattern": PATTERNS, "objective": OBJECTIVES, "arch": ARCHS,
                   "loss_normalize": NORMALIZATIONS, "precision": PRECISIONS, "lr_schedule": (None, *LR_SCHEDULES)}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                self.fail(name, f"must be one of {', '.join(a for a in allowed if a is not None)}, "
                                f"got {getattr(self, name)!r}")
        self._check_noise_sigma()
        if self.loss_weighting not in (None, *WEIGHTINGS):
            self.fail("loss_weighting", f"must be one of {', '.join(WEIGHTINGS)}, got {self.loss_weighting!r}")
        if self.loss_weighting in ("pixel", "tilted") and not self.mask_aware:
            self.fail("loss_weighting", f"{self.loss_weighting} weighting matches the mask-aware scalings; it "
                      "needs --mask-aware")
        positive = ("batch", "lr", "kimg", "snapshot_kimg", "tick_kimg", "max_nonfinite")
        for name in positive:
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                self.fail(name, f"must be positive, got {v!r}")
        nonneg = ("lr_warmup_kimg", "ema", "ema_rampup", "max_grad_norm", "grid_samples")
        for name in nonneg:
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                self.fail(name, f"must be >= 0, got {v!r}")
        if self.mask_full_rgb not in (None, True, False):
            self.fail("mask_full_rgb", f"must be true, false or null (from the data), got {self.mask_full_rgb!r}")
        if self.arch_kwargs is not None:
            _check_arch_kwargs(self.arch_kwargs, self.arch)
        if self.cond and self.arch not in SONG_PRESETS:
            self.fail("cond", f"needs a DDPM++ --arch ({', '.join(SONG_PRESETS)}); {self.arch!r} has no label input")
        if not 0.0 <= self.augment <= 1.0:
            self.fail("augment", f"must be a probability in [0, 1], got {self.augment!r}")
        if not 0.0 <= self.dropout < 1.0:
            self.fail("dropout", f"must be in [0, 1), got {self.dropout!r}")
        if self.max_size is not None and self.max_size < 1:
            self.fail("max_size", f"must be >= 1, got {self.max_size}")
        if self.resolution is not None and not 8 <= self.resolution <= 512:
            self.fail("resolution", f"must be in [8, 512], got {self.resolution}")
        if int(self.batch) != self.batch:
            self.fail("batch", f"must be an integer, got {self.batch!r}")
        if self.init is not None and (not isinstance(self.init, str) or not self.init):
            self.fail("init", f"must be a model folder, got {self.init!r}")
        if not self.outdir:
            self.fail("outdir", "must not be empty")
        return self

    def _check_noise_sigma(self) -> None:
        """--noise-sigma: required by (and only for) an objective on noisy data, finite and > 0; such data has no
        masks (--corruption-probability 0)."""
        v = self.noise_sigma
        if not needs_noise_sigma(self.objective):
            if v is not None:
                self.fail("noise_sigma", f"only for --objective noisy (got --objective {self.objective})")
            return
        if v is None:
            self.fail("noise_sigma", f"--objective {self.objective} needs it: the std of the Gaussian noise in the "
                                     "images, in the data's units (0..255 for uint8 data)")
        if isinstance(v, bool) or not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            self.fail("noise_sigma", f"must be a finite number > 0 (the data's units), got {v!r}")
        if self.corruption_probability != 0:
            self.fail("corruption_probability", f"--objective {self.objective} trains on complete noisy images "
                                                f"(no masks); must be 0, got {self.corruption_probability!r}")
