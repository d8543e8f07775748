"""Ambient training on undersampled k-space (issue 25, item 4a): ``ambient train --data <k-space measurements>``.

:func:`train_kspace_ambient` trains a :class:`~ambient.nets.projection_denoiser.ProjectionDenoiser` by
:class:`~ambient.objectives.kspace_loss.KSpaceAmbientLoss` on a measurements file of single-coil Cartesian k-space
(``ambient measure --operator kspace``; one line mask per observation), never on an image. Each step: a batch of
observations (drawn with replacement), Ã = B ∘ A by :func:`ambient.data.kspace_law.further_lines` at δ (the
columns every observation samples, the fully sampled centre, always kept), σ and η; Adam; an EMA of the weights.
All of a step's draws come from ``mix_seed(KSPACE_STEP_STREAM, seed, step)``.

The run folder: ``config.json`` (kind ``kspace-ambient run``, the :class:`KSpaceAmbientConfig`, the backbone's
config, the data's operator spec and value range; written before the first step, so an interrupted run is still
known by its kind), ``ema.safetensors`` (the EMA network), ``law.npz`` (the training observations' sampled columns
and the kept ones: what the fixed-operator sampler draws Ã from) and ``stats.jsonl``. A run is not resumed: the
outdir must be new or empty. :func:`load_kspace_ambient` reads it back; :mod:`ambient.sampling.fixed_operator`
samples and restores with it (``ambient sample`` / ``ambient restore --model <run>``).

:func:`config_from_train_flags` maps ``ambient train``'s flags onto :class:`KSpaceAmbientConfig` and refuses the
ones that do not apply; :func:`dry_run` is ``ambient train --dry-run`` for such data; :func:`restore_measurements`
is ``ambient restore`` with such a model.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ambient.configbase import ConfigBase, flag_error, is_int
from ambient.data.kspace_law import further_lines, line_columns, seen_spectrum
from ambient.errors import AmbientInputError
from ambient.folders import KSPACE_AMBIENT_RUN, claim_outdir, folder_kind, stamped
from ambient.io import append_jsonl, atomic_save_npz, atomic_write_bytes, atomic_write_json, read_json
from ambient.learners.core import ema_beta, update_ema
from ambient.learners.runlog import check_writable
from ambient.nets.backbones import PRESETS, BackboneConfig, UNetBackbone
from ambient.nets.projection_denoiser import ProjectionDenoiser
from ambient.objectives.kspace_loss import KSpaceAmbientLoss
from ambient.operators.kspace import KSpaceOperator
from ambient.operators.measurements import Measurements, is_measurements_file, load_measurements, operator_kind
from ambient.rng import INIT_STREAM, KSPACE_STEP_STREAM, mix_seed
from ambient.store.statedict import load_state_dict_strict, read_tensors, tensor_bytes

KIND = KSPACE_AMBIENT_RUN


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
            if not 0 < float(getattr(self, name)) < math.inf:
                self.fail(name, f"must be a finite number > 0, got {getattr(self, name)!r}")
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


def check_outdir(out: Path) -> None:
    """Refuse, before any write, an outdir that is not new or empty (one line naming --outdir): a folder of
    another kind, or a k-space ambient run already (training does not resume)."""
    if claim_outdir(out, KIND, command="ambient train") == KIND:
        raise AmbientInputError(f"--outdir {out}: holds a k-space ambient run already; k-space ambient training "
                                "does not resume or extend a run; choose a new --outdir")
    if out.is_dir() and any(out.iterdir()):
        raise AmbientInputError(f"--outdir {out}: exists and is not empty")


def check_inputs(cfg: KSpaceAmbientConfig) -> tuple[Measurements, torch.Tensor, torch.Tensor]:
    """Every check of a run before its first write: the config, the outdir, the data; returns (measurements,
    line masks (N, H, W), kept columns (W,))."""
    cfg.check()
    check_outdir(Path(cfg.outdir))
    meas = load_measurements(cfg.data)
    masks, keep = check_kspace_data(meas, cfg.data)
    shape = meas.shape
    if shape[1] != shape[2] or shape[1] % 4:
        raise AmbientInputError(f"--data {cfg.data}: images must be square with a side divisible by 4, got {shape}")
    return meas, masks, keep


def _run_meta(cfg: KSpaceAmbientConfig, meas: Measurements) -> dict:
    shape = meas.shape
    return {"config": cfg.to_dict(), "image_shape": list(shape), "value_range": list(meas.value_range),
            "operator": meas.spec, "backbone": BackboneConfig(cfg.arch, shape[0], shape[1], True, 0.0).to_dict()}


def train_kspace_ambient(cfg: KSpaceAmbientConfig, *, log=print) -> Path:
    """Train on ``cfg.data`` into ``cfg.outdir`` (a new or empty folder); return the folder."""
    out = Path(cfg.outdir)
    meas, masks, keep = check_inputs(cfg)
    shape = meas.shape
    state = torch.random.get_rng_state()
    torch.manual_seed(mix_seed(INIT_STREAM, cfg.seed))
    net = build_network(cfg.arch, shape, cfg.sigma_data)
    torch.random.set_rng_state(state)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    loss_fn = KSpaceAmbientLoss(P_mean=cfg.P_mean, P_std=cfg.P_std, sigma_data=cfg.sigma_data)
    check_writable(out)
    meta = _run_meta(cfg, meas)
    atomic_write_json(out / "config.json", stamped(meta, KIND))  # the kind first: an interrupted run is known
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
    atomic_write_json(out / "config.json", stamped({**meta, "train_seconds": time.perf_counter() - t0}, KIND))
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
    if not ((path / "ema.safetensors").is_file() and (path / "law.npz").is_file()):
        raise AmbientInputError(f"--model {path}: the k-space ambient run has not finished (no ema.safetensors / "
                                "law.npz); train it again into a new --outdir")
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


# ---------------------------------------------------------------------------------------- `ambient train` flags

# ``ambient train`` flags (TrainConfig field names) that set a KSpaceAmbientConfig field: δ is --delta-probability
# there, as for pixel masks (the share of what A acquired that Ã drops). A flag left out takes this config's default.
FROM_TRAIN_FLAGS = {"data": "data", "outdir": "outdir", "delta_probability": "corruption_probability",
                    "arch": "arch", "batch": "batch", "lr": "lr", "kimg": "kimg", "ema": "ema", "seed": "seed"}
DEVICES = ("auto", "cpu")  # the loop runs on the CPU (no device option yet); "auto" means the CPU here


def trains_kspace(data: str, objective: str) -> bool:
    """Whether ``ambient train --data data --objective objective`` is k-space ambient training: ``data`` is a
    measurements file and the objective is not ``noisy`` (which reads noise-only measurements itself). A
    measurements file of another operator is refused in one line saying what trains on it."""
    if objective == "noisy" or not is_measurements_file(data):
        return False
    kind = operator_kind(data)
    if kind not in ("kspace", None):  # None: unreadable; load_measurements says why
        raise AmbientInputError(f"--data {data}: holds {kind} measurements; ambient train learns from k-space "
                                "measurements only (ambient measure --operator kspace); learn a prior from these "
                                f"with ambient em --data {data}, or, for noise-only ones (--operator mask "
                                "--probability 0 --sigma-y S), ambient train --objective noisy --noise-sigma S")
    return True


def is_kspace_run(path: str | Path) -> bool:
    """Whether ``path`` is a folder this module wrote (finished or not)."""
    return Path(path).is_dir() and folder_kind(path) == KIND


def config_from_train_flags(values: dict, given: set[str]) -> KSpaceAmbientConfig:
    """The run ``ambient train`` asks for when ``--data`` holds k-space measurements: ``values`` the train flags
    by TrainConfig field name, ``given`` the ones the user typed. One-line :class:`AmbientInputError` naming the
    flag for one that does not apply (checked before anything is read or written)."""
    data = values.get("data")
    why = f"--data {data} holds k-space measurements, trained by k-space ambient training"
    for name in sorted(given):
        value = values.get(name)
        if name in FROM_TRAIN_FLAGS:
            continue
        if name == "objective" and value == "ambient":
            continue
        if name == "corruption_probability" and value == 0:
            continue
        if name == "device" and value in DEVICES:
            continue
        if name == "objective":
            what = (f"{why}, whose only objective is ambient; to train a plain EDM model on images, give --data "
                    "images")
        elif name == "corruption_probability":
            what = f"{why}: A is the measurements' own line masks; leave it out (δ is --delta-probability)"
        elif name == "device":
            what = f"{why}, which runs on the CPU; give --device cpu or auto, got {value!r}"
        elif name == "resume":
            what = f"{why}, which does not resume a run; train into a new --outdir"
        else:
            what = f"does not apply: {why}; leave it out"
        raise flag_error(name, what)
    delta = values.get("delta_probability")
    if "delta_probability" in given and not (isinstance(delta, (int, float)) and 0.0 < delta < 1.0):
        raise flag_error("delta_probability", f"must be in (0, 1) for k-space ambient training (the share of "
                                              f"acquired non-centre line pairs Ã drops), got {delta!r}")
    return KSpaceAmbientConfig(**{FROM_TRAIN_FLAGS[name]: values[name] for name in FROM_TRAIN_FLAGS
                                  if name in given or name in ("data", "outdir")})


def dry_run(cfg: KSpaceAmbientConfig) -> str:
    """``ambient train --dry-run`` for k-space data: every check training makes, then the resolved config and
    what the data holds, as JSON; writes nothing."""
    meas, masks, keep = check_inputs(cfg)
    lines = line_columns(masks)
    facts = {"observations": len(meas), "image_shape": list(meas.shape), "value_range": list(meas.value_range),
             "acquired_lines_mean": float(lines.float().sum(1).mean()), "always_kept_lines": int(keep.sum()),
             "steps": max(1, round(cfg.kimg * 1000 / cfg.batch))}
    return json.dumps({"method": "k-space ambient (ambient.learners.kspace_ambient)", **cfg.to_dict(),
                       "delta_probability": cfg.corruption_probability, "device": "cpu", "data_facts": facts},
                      indent=2, ensure_ascii=False)


def restore_measurements(model: KSpaceAmbientModel, meas: Measurements, *, sigma: float | None = None,
                         batch: int = 64, data_name: str = "", model_name: str = ""):
    """``ambient restore`` with a k-space ambient model: per observation the one-step posterior mean at ``sigma``
    (default the network's σ_min: the measurements are noiseless) plus data consistency
    (:func:`ambient.sampling.fixed_operator.kspace_ambient_restore`), as a
    :class:`ambient.sampling.restore.Restored` (one restoration per observation, model units)."""
    from ambient.sampling.fixed_operator import kspace_ambient_restore
    from ambient.sampling.restore import Restored, check_shape

    op = meas.operator
    if not isinstance(op, KSpaceOperator) or op.coils:
        raise AmbientInputError(f"--data {data_name}: holds {meas.spec.get('kind')} measurements"
                                f"{' with coils' if isinstance(op, KSpaceOperator) else ''}; a k-space ambient model "
                                "restores single-coil k-space only")
    check_shape(meas, model.image_shape, data_name, f"{model_name} was trained on")
    if tuple(float(v) for v in meas.value_range) != tuple(float(v) for v in model.value_range):
        raise AmbientInputError(f"--data {data_name}: value_range {meas.value_range[0]:g}..{meas.value_range[1]:g} "
                                f"is not the model's {model.value_range[0]:g}..{model.value_range[1]:g} (the "
                                "values that map to ±1); measure with the same value range")
    if sigma is not None and not (float(sigma) > 0 and float(sigma) < float("inf")):
        raise flag_error("sigma", f"must be a finite number > 0 (model units), got {sigma!r}")
    started, outs = time.perf_counter(), []
    for start in range(0, len(meas), batch):
        idx = torch.arange(start, min(start + batch, len(meas)))
        y, op_b = meas.batch(idx)
        outs.append(kspace_ambient_restore(model.denoiser, y, op_b, sigma=sigma))
    images = torch.cat(outs) if outs else torch.empty((0, *model.image_shape))
    index = torch.arange(len(meas), dtype=torch.int64)
    consistency = meas.consistency(images.double(), index) if len(images) else None
    return Restored(images, index, time.perf_counter() - started, {"forward": len(outs), "vjp": 0}, consistency)
