"""The options of one finetuning run, as a typed dataclass that round-trips through JSON."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ambient.configbase import ConfigBase
from ambient.data.corruption import PATTERNS, Corruption
from ambient.nets.ddpm_denoiser import HIDDEN_X0, TIMESTEP_MODES
from ambient.nets.pretrained import MASK_MODES
from ambient.objectives.ddpm_loss import WEIGHTINGS

# Fields that may change when a run is resumed; every other field must match the saved run.
RESUMABLE_CHANGES = frozenset({"outdir", "timestep_mode", "lr", "steps", "ema", "grad_clip", "xflip",
                               "snapshot_every", "log_every", "device", "resume"})


@dataclass(frozen=True)
class FinetuneConfig(ConfigBase, what="finetune"):
    """Everything ``ambient finetune`` takes; see ``ambient finetune --help`` for each flag.

    ``ema`` is the EMA decay per optimizer step (0 disables EMA; the export then holds the raw
    weights). ``steps`` counts optimizer steps of ``batch × grad_accum`` images each.
    """

    pretrained: str
    data: str
    outdir: str
    corruption_pattern: str = "dust"
    corruption_probability: float = 0.0
    delta_probability: float = 0.0
    mask_full_rgb: bool | None = None  # None: from the data's masks (see data.resolve_mask_full_rgb)
    mask_mode: str = "channels"
    hidden_x0: str = "direct"
    loss_weight: str = "min-snr"
    snr_gamma: float = 5.0
    timestep_mode: str = "interpolate"
    lr: float = 1e-4
    steps: int = 1000
    batch: int = 16
    grad_accum: int = 1
    ema: float = 0.999
    grad_clip: float = 1.0
    xflip: float = 0.0
    max_size: int | None = None
    data_dir: str | None = None
    resolution: int | None = None
    seed: int = 0
    snapshot_every: int = 500
    log_every: int = 10
    device: str = "auto"
    resume: bool = True

    def corruption(self) -> Corruption:
        return Corruption(self.corruption_pattern, self.corruption_probability, self.delta_probability,
                          bool(self.mask_full_rgb))

    def validate(self) -> FinetuneConfig:
        """Raise AmbientInputError (one line, naming the flag) for a bad value; return self."""
        for name in ("corruption_probability", "delta_probability"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and 0.0 <= v < 1.0):
                self.fail(name, f"must be in [0, 1), got {v!r}")
        choices = (("corruption_pattern", PATTERNS), ("mask_mode", MASK_MODES), ("hidden_x0", HIDDEN_X0),
                   ("loss_weight", WEIGHTINGS),
                   ("timestep_mode", TIMESTEP_MODES))
        for name, allowed in choices:
            value = getattr(self, name)
            if value not in allowed:
                self.fail(name, f"must be one of {', '.join(allowed)}, got {value!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            self.fail("lr", f"must be > 0, got {self.lr!r}")
        for name in ("steps", "batch", "grad_accum", "snapshot_every", "log_every"):
            if int(getattr(self, name)) != getattr(self, name) or getattr(self, name) < 1:
                self.fail(name, f"must be an integer >= 1, got {getattr(self, name)!r}")
        if not (math.isfinite(self.snr_gamma) and self.snr_gamma > 0):
            self.fail("snr_gamma", f"must be > 0, got {self.snr_gamma!r}")
        if not 0.0 <= self.ema < 1.0:
            self.fail("ema", f"must be in [0, 1) (0 = off), got {self.ema!r}")
        if not self.grad_clip >= 0:
            self.fail("grad_clip", f"must be >= 0 (0 = off), got {self.grad_clip!r}")
        if not 0.0 <= self.xflip <= 1.0:
            self.fail("xflip", f"must be in [0, 1], got {self.xflip!r}")
        if self.max_size is not None and self.max_size < 1:
            self.fail("max_size", f"must be >= 1, got {self.max_size!r}")
        if not str(self.outdir):
            self.fail("outdir", "must not be empty")
        return self
