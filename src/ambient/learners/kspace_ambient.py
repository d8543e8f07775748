"""Ambient training on undersampled k-space (issue 25, item 4a): a library API, not yet an ``ambient`` command.

:func:`train_kspace_ambient` trains a :class:`~ambient.nets.projection_denoiser.ProjectionDenoiser` by
:class:`~ambient.objectives.kspace_loss.KSpaceAmbientLoss` on a measurements file of single-coil Cartesian k-space
(``ambient measure --operator kspace``; one line mask per observation), never on an image. Each step: a batch of
observations (drawn with replacement), Ã = B ∘ A by :func:`ambient.data.kspace_law.further_lines` at δ (the
columns every observation samples, the fully sampled centre, always kept), σ and η; Adam; an EMA of the weights.
All of a step's draws come from ``mix_seed(KSPACE_STEP_STREAM, seed, step)``.

The run folder: ``config.json`` (kind ``kspace-ambient run``, the :class:`KSpaceAmbientConfig`, the backbone's
config, the data's operator spec and value range), ``ema.safetensors`` (the EMA network), ``law.npz`` (the
training observations' sampled columns and the kept ones: what the fixed-operator sampler draws Ã from) and
``stats.jsonl``. :func:`load_kspace_ambient` reads it back; :mod:`ambient.sampling.fixed_operator` samples and
restores with it.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ambient.configbase import ConfigBase, is_int
from ambient.data.kspace_law import further_lines, line_columns, seen_spectrum
from ambient.errors import AmbientInputError
from ambient.io import append_jsonl, atomic_save_npz, atomic_write_bytes, atomic_write_json, read_json
from ambient.learners.core import ema_beta, update_ema
from ambient.nets.backbones import PRESETS, BackboneConfig, UNetBackbone
from ambient.nets.projection_denoiser import ProjectionDenoiser
from ambient.objectives.kspace_loss import KSpaceAmbientLoss
from ambient.operators.kspace import KSpaceOperator
from ambient.operators.measurements import Measurements, load_measurements
from ambient.rng import INIT_STREAM, KSPACE_STEP_STREAM, mix_seed
from ambient.store.statedict import load_state_dict_strict, read_tensors, tensor_bytes

KIND = "kspace-ambient run"


@dataclass
class KSpaceAmbientConfig(ConfigBase, what="k-space ambient"):
    """Options of a k-space ambient training run (JSON round trip; names as flags would be)."""

    data: str = ""
    outdir: str = ""
    corruption_probability: float = 0.2  # δ: the probability that Ã drops an acquired (non-centre) mirror pair
    arch: str = "tiny"
    batch: int = 32
    lr: float = 1e-3
    kimg: float = 6.0
    ema: float = 0.5  # EMA half-life in thousands of images
    seed: int = 0
    sigma_data: float = 0.5
    P_mean: float = -1.2  # the training σ law, exp(N(P_mean, P_std²)) (EDM's)
    P_std: float = 1.2

    def check(self) -> None:
        if not 0.0 < self.corruption_probability < 1.0:
            self.fail("corruption_probability", f"must be in (0, 1) for k-space ambient training, got "
                                                f"{self.corruption_probability!r}")
        if self.arch not in PRESETS:
            self.fail("arch", f"must be one of {', '.join(PRESETS)}, got {self.arch!r}")
        if not is_int(self.batch, 1):
            self.fail("batch", f"must be an integer >= 1, got {self.batch!r}")
        for name in ("lr", "kimg", "ema", "sigma_data", "P_std"):
            if not float(getattr(self, name)) > 0:
                self.fail(name, f"must be positive, got {getattr(self, name)!r}")
        if not is_int(self.seed, 0):
            self.fail("seed", f"must be an integer >= 0, got {self.seed!r}")


def check_kspace_data(meas: Measurements, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(masks (N, H, W), keep (W,)) of a measurements file fit for k-space ambient training; one-line
    AmbientInputError otherwise."""
    op = meas.operator
    if not isinstance(op, KSpaceOperator) or op.coils:
        raise AmbientInputError(f"--data {where}: k-space ambient training needs single-coil k-space measurements "
                                f"(ambient measure --operator kspace), got {meas.spec.get('kind')!r}"
                                f"{' with coils' if isinstance(op, KSpaceOperator) else ''}")
    if meas.sigma_y > 0:
        raise AmbientInputError(f"--data {where}: the measurements are noisy (σ_y = {meas.spec.get('sigma_y')}); "
                                "k-space ambient training assumes noiseless k-space (its input would carry σ_y too)")
    if op.num_operators != len(meas) or len(meas) < 2:
        raise AmbientInputError(f"--data {where}: needs one line mask per observation (a shared mask hides the "
                                f"same frequencies in every observation: nothing can learn them)")
    try:
        cols = line_columns(op.mask, "the operator's mask")
    except ValueError as exc:
        raise AmbientInputError(f"--data {where}: {exc}") from None
    keep = cols.all(0)
    if not bool((cols & ~keep).any()):
        raise AmbientInputError(f"--data {where}: every observation samples the same lines; none can be dropped")
    return op.mask, keep


def build_network(arch: str, image_shape, sigma_data: float) -> ProjectionDenoiser:
    c, h, _ = image_shape
    return ProjectionDenoiser(UNetBackbone(BackboneConfig(arch, c, h, True, 0.0)), c, sigma_data)


def train_kspace_ambient(cfg: KSpaceAmbientConfig, *, log=print) -> Path:
    """Train on ``cfg.data`` into ``cfg.outdir`` (a new or empty folder); return the folder."""
    cfg.check()
    out = Path(cfg.outdir)
    if out.exists() and any(out.iterdir()):
        raise AmbientInputError(f"--outdir {out}: exists and is not empty")
    meas = load_measurements(cfg.data)
    masks, keep = check_kspace_data(meas, cfg.data)
    shape = meas.shape
    if shape[1] != shape[2] or shape[1] % 4:
        raise AmbientInputError(f"--data {cfg.data}: images must be square with a side divisible by 4, got {shape}")
    state = torch.random.get_rng_state()
    torch.manual_seed(mix_seed(INIT_STREAM, cfg.seed))
    net = build_network(cfg.arch, shape, cfg.sigma_data)
    torch.random.set_rng_state(state)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    loss_fn = KSpaceAmbientLoss(P_mean=cfg.P_mean, P_std=cfg.P_std, sigma_data=cfg.sigma_data)
    out.mkdir(parents=True, exist_ok=True)
    steps = max(1, round(cfg.kimg * 1000 / cfg.batch))
    t0, running = time.perf_counter(), []
    for step in range(steps):
        g = torch.Generator().manual_seed(mix_seed(KSPACE_STEP_STREAM, cfg.seed, step))
        idx = torch.randint(len(meas), (cfg.batch,), generator=g)
        y, op = meas.batch(idx)
        y = y.float()
        m_hat = further_lines(op.mask, cfg.corruption_probability, g, keep)
        op_hat = KSpaceOperator(m_hat, shape)
        seen = seen_spectrum(m_hat)[:, None]
        loss = loss_fn(net, y, op, op_hat, seen, g).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in net.parameters()):
            opt.step()
        update_ema(ema, net, ema_beta(cfg.ema, 0.05, (step + 1) * cfg.batch, cfg.batch))
        running.append(float(loss.detach()))
        if (step + 1) % 50 == 0 or step + 1 == steps:
            append_jsonl(out / "stats.jsonl", {"step": step + 1, "kimg": (step + 1) * cfg.batch / 1000,
                                               "loss": float(np.mean(running)), "seconds": time.perf_counter() - t0})
            if (step + 1) % 500 == 0 or step + 1 == steps:
                log(f"k-space ambient: step {step + 1}/{steps}, loss {np.mean(running):.4f}, "
                    f"{time.perf_counter() - t0:.0f} s")
            running = []
    atomic_write_bytes(out / "ema.safetensors", tensor_bytes(ema.state_dict(), "ema"))
    atomic_save_npz(out / "law.npz", columns=line_columns(masks).numpy().astype(np.uint8),
                    keep=keep.numpy().astype(np.uint8), height=np.asarray(shape[1]))
    atomic_write_json(out / "config.json", {
        "kind": KIND, "config": cfg.to_dict(), "image_shape": list(shape), "value_range": list(meas.value_range),
        "operator": meas.spec, "backbone": BackboneConfig(cfg.arch, shape[0], shape[1], True, 0.0).to_dict(),
        "train_seconds": time.perf_counter() - t0})
    return out


@dataclass
class KSpaceAmbientModel:
    """A trained run: the EMA network and the law of Ã its sampler reproduces."""

    denoiser: ProjectionDenoiser
    masks: torch.Tensor  # (K, H, W): the training observations' line masks
    keep: torch.Tensor  # (W,) bool: the columns Ã always keeps
    delta: float
    image_shape: tuple[int, int, int]
    value_range: tuple[float, float]


def load_kspace_ambient(path: str | Path) -> KSpaceAmbientModel:
    path = Path(path)
    meta = read_json(path / "config.json")
    if not isinstance(meta, dict) or meta.get("kind") != KIND:
        raise AmbientInputError(f"{path}: not a k-space ambient run (config.json kind is not {KIND!r})")
    cfg = KSpaceAmbientConfig.from_dict(meta["config"])
    shape = tuple(int(s) for s in meta["image_shape"])
    net = build_network(cfg.arch, shape, cfg.sigma_data)
    tensors, _ = read_tensors(path / "ema.safetensors", "cpu")
    load_state_dict_strict(net, tensors, path / "ema.safetensors")
    with np.load(path / "law.npz") as z:
        cols = torch.from_numpy(z["columns"]).bool()
        keep = torch.from_numpy(z["keep"]).bool()
    masks = cols[:, None, :].expand(-1, shape[1], -1).float()
    return KSpaceAmbientModel(net.eval().requires_grad_(False), masks, keep, cfg.corruption_probability, shape,
                              tuple(meta["value_range"]))

