"""The training loop: ambient (or naive, or noisy) EDM training with EMA, snapshots and exact resume.

Randomness is a pure function of (seed, step): the data order of each epoch, the flips, the
further masks Ã, σ and the noise of step k come from generators seeded by ``mix_seed(seed, …,
k)``, and every process draws them for the whole global batch, then keeps its own slice. So a
run stopped and resumed from a snapshot ends with the same weights as an uninterrupted one, and
a run on W processes with the same global batch sees the same images, masks and noise as on
one (see :mod:`ambient.distributed`).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ambient import distributed as dist_utils
from ambient.data.corruption import Corruption
from ambient.data.datasets import ImageDataset, augment_batch, check_masks, load_dataset, resolve_mask_full_rgb
from ambient.errors import AmbientInputError, TrainingDiverged
from ambient.folders import TRAIN_RUN, TRAIN_SNAPSHOT, check_readable_as, claim_outdir, stamped
from ambient.io import atomic_write_json
from ambient.learners.core import (
    EpochOrder,
    NonFiniteGuard,
    check_resume_compatible,
    ema_beta,
    guarded_step,
    learning_rate,
    resume_source,
    skipped_snapshots_notice,
    update_ema,
)
from ambient.learners.runlog import OutdirLock, RunLogger, check_writable, write_grid_pair
from ambient.learners.train_config import RESUMABLE_CHANGES, RESUME_LATEST, TrainConfig
from ambient.nets.conditional import LabelledDenoiser, batch_labels, label_dim_for, one_hot
from ambient.nets.denoiser import FullImageDenoiser
from ambient.nets.registry import ModelConfig, SamplingSpec, build_denoiser
from ambient.objectives.losses import noisy_sigma_stop, sees_masks, training_loss
from ambient.operators.measurements import is_measurements_file, load_measurements
from ambient.rng import INIT_STREAM, STEP_STREAM, mix_seed
from ambient.store.snapshots import load_snapshot, save_snapshot, snapshot_name
from ambient.store.statedict import load_state_dict_strict
from ambient.store.upgrades import data_section, train_section
from ambient.store.warmstart import load_init_weights


@dataclass
class TrainState:
    step: int = 0
    nimg: int = 0
    skipped: int = 0
    consecutive_skipped: int = 0


def model_config_for(cfg: TrainConfig, data: ImageDataset) -> ModelConfig:
    return ModelConfig(arch=cfg.arch, img_channels=data.channels, resolution=data.resolution,
                       mask_channels=sees_masks(cfg.objective), dropout=cfg.dropout,
                       mask_aware=cfg.mask_aware, label_dim=label_dim_for(cfg.cond, data, cfg.data),
                       songunet=json.loads(cfg.arch_kwargs) if cfg.arch_kwargs else None)


def noise_sigma_model_units(cfg: TrainConfig, data: ImageDataset) -> float | None:
    """``--noise-sigma`` (the data's units: 0..255 for uint8, the value_range of float data) in model units
    ([-1, 1]): σ_n · 2 / (hi − lo). None when the objective takes the images as clean."""
    if cfg.noise_sigma is None:
        return None
    lo, hi = data.value_range
    return float(cfg.noise_sigma) * 2.0 / (float(hi) - float(lo))


def check_noise_sigma(cfg: TrainConfig, data: ImageDataset) -> None:
    """Refuse (one line, naming the flag or the data) a noise level the sampler could not start above, and masks
    with the noisy objective (it trains on complete images)."""
    sigma_n = noise_sigma_model_units(cfg, data)
    if sigma_n is None:
        return
    if noisy_sigma_stop(sigma_n) >= FullImageDenoiser.sigma_max:
        raise AmbientInputError(f"--noise-sigma {cfg.noise_sigma:g}: is {sigma_n:g} in model units ([-1, 1]), "
                                f"too close to the largest noise level {FullImageDenoiser.sigma_max:g} the sampler "
                                "starts from; give it in the data's units (0..255 for uint8 data)")
    if data.has_data_masks and data.observed_share < 1.0:
        raise AmbientInputError(f"--data {cfg.data}: comes with masks (observed share {data.observed_share:.3f}); "
                                f"--objective {cfg.objective} trains on complete noisy images")


def sampling_spec_for(cfg: TrainConfig, data: ImageDataset) -> SamplingSpec:
    sigma_n = noise_sigma_model_units(cfg, data)
    if sigma_n is not None:  # a plain EDM network that knows σ > σ_n only: the sampler stops just above σ_n
        return SamplingSpec(Corruption(), noise_sigma=sigma_n, sigma_stop=noisy_sigma_stop(sigma_n))
    if not sees_masks(cfg.objective):  # a plain EDM network: no masks at sampling time
        return SamplingSpec(Corruption())
    data_survival = data.observed_share if data.has_data_masks else None
    return SamplingSpec(cfg.corruption, data_survival)


def _resume_source(cfg: TrainConfig, outdir: Path) -> Path | None:
    claim_outdir(outdir, TRAIN_RUN, command="ambient train")
    if cfg.resume not in (None, RESUME_LATEST, "none"):
        check_readable_as(cfg.resume, (TRAIN_RUN, TRAIN_SNAPSHOT), flag="--resume",
                          what="a train run or one of its snapshots")
    return resume_source(outdir, cfg.resume)  # --resume: None (latest if any), "latest" (required) or a path


def _saved_train(source: Path | None) -> dict:
    """The ``train`` section of the run to be resumed ({} when none), upgraded to today's
    (:func:`ambient.store.upgrades.train_section`)."""
    if source is None:
        return {}
    try:
        saved = json.loads((source / "config.json").read_text()).get("train", {})
    except (OSError, ValueError, AttributeError):
        return {}  # load_snapshot reports a broken snapshot with its own message
    return train_section(saved) if isinstance(saved, dict) else {}


def _saved_mask_full_rgb(source: Path | None) -> bool | None:
    """The mask law a run to be resumed was trained with (None: no such run)."""
    value = _saved_train(source).get("mask_full_rgb")
    return value if isinstance(value, bool) else None


def _load_data_with_law(cfg: TrainConfig, source: Path | None) -> tuple[TrainConfig, ImageDataset, str]:
    """Load the data and fix the run's mask law (see :func:`ambient.data.datasets.resolve_mask_full_rgb`);
    returns the config with ``mask_full_rgb`` resolved to a bool, the data and the law's reason."""
    saved = _saved_mask_full_rgb(source)
    hint = cfg.mask_full_rgb if cfg.mask_full_rgb is not None else saved  # draws A when the data has no masks
    drawn = replace(cfg, mask_full_rgb=bool(hint))
    corruption = drawn.corruption if sees_masks(cfg.objective) else _naive_corruption(drawn)
    if cfg.noise_sigma is not None and is_measurements_file(cfg.data):
        data = noisy_images_from_measurements(cfg, corruption)
    else:
        data = load_dataset(cfg.data, data_dir=cfg.data_dir, max_size=cfg.max_size, resolution=cfg.resolution,
                            corruption=corruption, seed=cfg.seed)
    full_rgb, why = resolve_mask_full_rgb(cfg.mask_full_rgb, data, saved)
    return replace(cfg, mask_full_rgb=full_rgb), data, why


def noisy_images_from_measurements(cfg: TrainConfig, corruption: Corruption) -> ImageDataset:
    """The noisy images of a noise-only measurements file (``ambient measure --operator mask --probability 0
    --sigma-y S``: y = x + σ_y n through a mask that hides nothing), for ``--objective noisy``: the same file
    ``ambient em`` reads. Its σ_y must be ``--noise-sigma`` (both in the data's units); one-line errors otherwise."""
    meas = load_measurements(cfg.data, max_size=cfg.max_size)
    kind = meas.spec.get("kind")
    mask = meas.operator.arrays().get("mask") if kind == "mask" else None
    if mask is None or not bool((mask == 1).all()):
        raise AmbientInputError(f"--data {cfg.data}: holds {kind} measurements that hide part of each image; "
                                f"--objective {cfg.objective} reads only noise-only measurements (ambient measure "
                                "--operator mask --probability 0 --sigma-y S)")
    sigma_y = float(meas.spec.get("sigma_y", 0.0))
    if not math.isclose(sigma_y, float(cfg.noise_sigma), rel_tol=1e-6):
        raise AmbientInputError(f"--noise-sigma {cfg.noise_sigma:g}: --data {cfg.data} records noise of std "
                                f"σ_y {sigma_y:g} (the data's units); give --noise-sigma {sigma_y:g}")
    if cfg.resolution is not None and cfg.resolution != meas.shape[1]:
        raise AmbientInputError(f"--resolution {cfg.resolution}: --data {cfg.data} holds measurements, which are "
                                "not resized (resizing would change their noise); leave it out")
    images = meas.y.to(torch.float32).reshape(len(meas), *meas.shape)
    return ImageDataset(images, None, corruption=corruption, seed=cfg.seed, source=cfg.data,
                        value_range=meas.value_range, kind="float32")


def _resolve_defaults(cfg: TrainConfig, source: Path | None) -> TrainConfig:
    """The flags if given; else a resumed run's own settings; else today's defaults for a new run.

    Loss weighting: a resumed run's own (runs from before the option: ``edm``); else ``tilted`` for the ambient
    objective with the mask-aware scalings and ``edm`` otherwise: the naive and noisy objectives hide nothing, so
    every weighting is EDM's there, and the run records it as such (see :mod:`ambient.objectives.losses`).
    Learning-rate schedule: a resumed run's own (runs from before the option: ``constant``); else ``cosine``
    (docs/fidelity.md and docs/results.md: it lowered the learnt covariance error and KID)."""
    saved = _saved_train(source)
    if cfg.loss_weighting is None:
        cfg = replace(cfg, loss_weighting=saved["loss_weighting"] if saved else
                      "tilted" if cfg.mask_aware and sees_masks(cfg.objective) else "edm")
    if cfg.lr_schedule is None:
        cfg = replace(cfg, lr_schedule=saved["lr_schedule"] if saved else "cosine")
    return cfg


def _check_resume_compatible(cfg: TrainConfig, saved: dict, run_config: dict, source: Path) -> None:
    old_data = data_section(saved.get("data", {}))
    old_shape, new_shape = old_data.get("shape"), run_config["data"]["shape"]
    if old_shape is not None and list(old_shape) != list(new_shape):
        raise AmbientInputError(f"--data {cfg.data}: images are {'x'.join(map(str, new_shape))} (CxHxW) but the run "
                                f"in {source} was trained on {'x'.join(map(str, old_shape))}; use another --outdir")
    (olo, ohi), (lo, hi) = old_data["value_range"], run_config["data"]["value_range"]
    if (float(olo), float(ohi)) != (float(lo), float(hi)):
        raise AmbientInputError(f"--data {cfg.data}: its values {lo:g}..{hi:g} map to [-1, 1], but the run in "
                                f"{source} was trained with {olo:g}..{ohi:g} ({old_data['dtype']} data); declare "
                                f"value_range=[{olo:g}, {ohi:g}] in the data, or use another --outdir")
    check_resume_compatible(train_section(saved.get("train", {})), cfg.to_dict(), RESUMABLE_CHANGES, source)


def _build_or_resume(cfg: TrainConfig, model_cfg: ModelConfig, run_config: dict, source: Path | None, device,
                     log) -> tuple[torch.nn.Module, torch.nn.Module, torch.optim.Optimizer, TrainState]:
    """The network (initialised from the seed), its EMA copy, the optimizer and the training state:
    fresh, warm-started from ``cfg.init``, or restored from the snapshot ``source``."""
    state = TrainState()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(mix_seed(INIT_STREAM, cfg.seed))
        net = build_denoiser(model_cfg)
    net.to(device)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8)
    if source is not None:
        snap = load_snapshot(source, map_location=device)
        _check_resume_compatible(cfg, snap.config, run_config, source)
        load_state_dict_strict(net, snap.model, source / "model.safetensors")
        load_state_dict_strict(ema, snap.ema if snap.ema is not None else snap.model, source / "ema.safetensors")
        if snap.optimizer is not None:
            opt.load_state_dict(snap.optimizer)
        state = TrainState(**{k: int(snap.extra_state[k]) for k in vars(state) if k in snap.extra_state})
        if state.nimg < _total_nimg(cfg):  # else train() says there is nothing to do
            log(f"resuming from {source} at {state.nimg / 1000:.3f} kimg")
    elif cfg.init is not None:
        init_dir = load_init_weights(cfg.init, net, ema, model_cfg)
        log(f"starting from the weights of {init_dir}")
    return net, ema, opt, state


def _backward(den, loss_fn, inputs, opt, autocast, per_rank: int, device, dropout_seed: int) -> torch.Tensor:
    """This process's share of the step's loss (summed, over the per-process batch), backpropagated.
    Dropout, if any, draws from the global RNG seeded by ``dropout_seed`` (restored afterwards)."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(dropout_seed)
        with autocast:
            per_image = loss_fn.per_image(den, inputs)
        loss = per_image.sum() / per_rank  # DDP averages the ranks' gradients: the global-batch mean
        opt.zero_grad(set_to_none=True)
        loss.backward()
    return loss


def _total_nimg(cfg: TrainConfig) -> int:
    return int(round(cfg.kimg * 1000))


def train(cfg: TrainConfig, *, progress: bool = True, log=print) -> Path:
    """Run (or resume) training as configured; returns the outdir. ``ambient train`` calls this.

    A run whose snapshot is already at or past ``--kimg`` is left as it is (one line says so). The
    outdir is locked while training writes into it: a second process on it is refused.
    """
    with contextlib.ExitStack() as cleanup:  # on any exit: the progress bar closed, then the lock released
        return _train(cfg, progress=progress, log=log, cleanup=cleanup)


def _train(cfg: TrainConfig, *, progress: bool, log, cleanup: contextlib.ExitStack) -> Path:
    cfg.validate()
    outdir = Path(cfg.outdir)
    world = dist_utils.world_size_from_env()  # checked before joining, so every rank fails alike
    if cfg.batch % world:
        raise AmbientInputError(f"--batch {cfg.batch} is not divisible by the world size {world}")
    device = dist_utils.resolve_device(cfg.device)  # a device this torch cannot use: refused before anything
    env = dist_utils.init_from_env(cfg.device)
    device = env.device if env.world_size > 1 else device
    source = _resume_source(cfg, outdir)
    skipped = skipped_snapshots_notice(outdir, source) if cfg.resume in (None, RESUME_LATEST) else None
    if env.rank == 0 and skipped:
        log(skipped)
    cfg = _resolve_defaults(cfg, source)
    cfg, data, law = _load_data_with_law(cfg, source)
    notice = check_masks(data, cfg.data)
    if env.rank == 0 and notice:
        log(notice)
    check_noise_sigma(cfg, data)
    model_cfg = model_config_for(cfg, data)
    loss_fn = training_loss(cfg.objective, sigma_data=model_cfg.sigma_data, normalize=cfg.loss_normalize,
                            further=cfg.corruption, fixed_further=cfg.fixed_further, seed=cfg.seed,
                            weighting=cfg.loss_weighting, noise_sigma=noise_sigma_model_units(cfg, data))
    if env.rank == 0 and data.has_data_masks and data.channels > 1 and loss_fn.mask_input:
        log(f"mask law: {law}")
    unlearnt = unlearnt_hole(cfg, data)
    if env.rank == 0 and unlearnt:
        log(f"warning: {unlearnt}")
    spec = sampling_spec_for(cfg, data)
    run_config = {"train": cfg.to_dict(), "model": model_cfg.to_dict(), "sampling": spec.to_dict(),
                  "data": {"num_images": len(data), "shape": list(data.shape),
                           "has_data_masks": data.has_data_masks, "observed_share": data.observed_share,
                           "value_range": list(data.value_range), "dtype": data.kind}}
    net, ema, opt, state = _build_or_resume(cfg, model_cfg, run_config, source, device,
                                            log if env.rank == 0 else (lambda _m: None))
    spec.fit_sigma_range(ema)  # the snapshot grids sample as `ambient sample` will (noisy: down to sigma_stop)
    if source is not None and state.nimg >= _total_nimg(cfg):  # finished, or --kimg lowered: change nothing
        if env.rank == 0:
            log(f"nothing to do: {source} is already at {state.nimg / 1000:g} kimg, at or past --kimg {cfg.kimg:g} "
                "(a larger --kimg trains further)")
        return outdir
    if env.rank == 0:  # after every check of the inputs (e.g. --init's network), so a refusal writes nothing
        check_writable(outdir)
        cleanup.enter_context(OutdirLock()).acquire(outdir)  # a second process on this outdir is refused here
    if cfg.channels_last:
        net.to(memory_format=torch.channels_last)
    if cfg.compile:  # per block: compiling the whole UNet gives wrong gradients on CPU (torch 2.13)
        dist_utils.compile_regions(net)
    model = dist_utils.wrap_ddp(net, env)

    logger = RunLogger(outdir, enabled=env.rank == 0, progress=progress, total_nimg=int(cfg.kimg * 1000),
                       start_nimg=state.nimg)
    cleanup.callback(logger.abort)  # an error (e.g. a failed write) ends the bar before its one-line message
    if env.rank == 0:
        atomic_write_json(outdir / "config.json", stamped(run_config, TRAIN_RUN))
    order = EpochOrder(len(data), cfg.seed)
    total = _total_nimg(cfg)
    per_rank = cfg.batch // env.world_size
    mine = slice(env.rank * per_rank, (env.rank + 1) * per_rank)
    next_snapshot = (math.floor(state.nimg / (cfg.snapshot_kimg * 1000)) + 1) * cfg.snapshot_kimg * 1000
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if cfg.precision == "bf16"
                else contextlib.nullcontext())
    grid_real = None
    if env.rank == 0 and cfg.grid_samples:
        grid_idx = torch.arange(min(cfg.grid_samples, len(data)))
        grid_real, _ = data.batch(grid_idx)

    def save(final: bool) -> None:
        if env.rank != 0:
            return
        started = time.perf_counter()
        snap_dir = save_snapshot(outdir / snapshot_name(state.step), config=stamped(run_config, TRAIN_SNAPSHOT),
                                 model=net.state_dict(),
                                 ema=ema.state_dict(), optimizer=opt.state_dict(), extra_state=vars(state).copy())
        if cfg.grid_samples:
            grid_den = ema if not model_cfg.label_dim else LabelledDenoiser(  # classes 0, 1, … in turn
                ema, one_hot(torch.arange(grid_real.shape[0]) % model_cfg.label_dim, model_cfg.label_dim))
            write_grid_pair(outdir / f"samples-{state.step:06d}.png", grid_real, grid_den, spec, data.shape, device)
        logger.event(f"snapshot {snap_dir.name} at {state.nimg / 1000:.3f} kimg" + (" (final)" if final else ""))
        logger.exclude(time.perf_counter() - started)

    net.train()
    params = list(net.parameters())
    steps_this_run = 0
    while state.nimg < total:
        idx = order.indices(state.nimg, cfg.batch)
        y, mask = data.batch(idx)
        labels = batch_labels(data, idx, model_cfg.label_dim, device)
        g = torch.Generator(device).manual_seed(mix_seed(STEP_STREAM, cfg.seed, state.step))
        y, mask = y.to(device), mask.to(device)
        inputs = loss_fn.draw(y, mask, idx, g, cfg.augment, augment_batch)  # flips, Ã, σ, noise of the global batch
        den = model if labels is None else functools.partial(model, class_labels=labels[mine])
        loss = _backward(den, loss_fn, inputs[mine], opt, autocast, per_rank, device,
                         mix_seed(STEP_STREAM, cfg.seed, state.step, env.rank))
        global_loss = float(dist_utils.mean_across(loss.detach(), env))  # ranks must agree on skipping
        lr = learning_rate(cfg.lr, cfg.lr_warmup_kimg, cfg.lr_schedule, state.nimg, cfg.batch, total)
        guard = NonFiniteGuard(cfg.max_nonfinite, state.skipped, state.consecutive_skipped)
        try:
            stepped = guarded_step(opt, params, guard, loss=global_loss, max_grad_norm=cfg.max_grad_norm, lr=lr,
                                   where=f"{state.nimg / 1000:.3f} kimg", outdir=outdir)
        except TrainingDiverged:
            logger.close()
            raise
        state.skipped, state.consecutive_skipped = guard.skipped, guard.consecutive
        if stepped:
            update_ema(ema, net, ema_beta(cfg.ema, cfg.ema_rampup, state.nimg + cfg.batch, cfg.batch))
        state.step += 1
        state.nimg += cfg.batch
        steps_this_run += 1
        logger.step(loss=global_loss, nimg=state.nimg,
                    batch=cfg.batch, skipped=state.skipped, lr=opt.param_groups[0]["lr"],
                    tick_nimg=cfg.tick_kimg * 1000)
        if state.nimg >= next_snapshot and state.nimg < total:
            save(final=False)
            next_snapshot += cfg.snapshot_kimg * 1000
    if steps_this_run or source is None:
        save(final=True)
    logger.close()
    dist_utils.barrier(env)
    return outdir


def _naive_corruption(cfg: TrainConfig) -> Corruption:
    """Naive baseline: observe A ⊙ x0 (A drawn as for ambient) and train plain EDM on it."""
    return Corruption(cfg.corruption_pattern, cfg.corruption_probability, 0.0, cfg.mask_full_rgb)


def dry_run(cfg: TrainConfig) -> str:
    """The resolved configuration as JSON, writing nothing.

    The mask law (``mask_full_rgb``) is resolved as training would resolve it, which reads the data;
    data that cannot be read now leaves it null, with the reason under ``mask_law``.
    """
    cfg.validate()
    outdir = Path(cfg.outdir)
    claim_outdir(outdir, TRAIN_RUN, command="ambient train")  # a folder of another kind: refused here too
    unlearnt, units = None, None
    try:
        source = _resume_source(cfg, outdir)
        cfg, data, law = _load_data_with_law(_resolve_defaults(cfg, source), source)
        unlearnt = unlearnt_hole(cfg, data)
        units = {"dtype": data.kind, "value_range": list(data.value_range), "notices": data.notices}
        if cfg.noise_sigma is not None:
            check_noise_sigma(cfg, data)
            sigma_n = noise_sigma_model_units(cfg, data)
            units.update(noise_sigma_model=sigma_n, sigma_stop_model=noisy_sigma_stop(sigma_n))
    except AmbientInputError as exc:
        why = " ".join(str(exc).split())
        law = (f"from the data's masks, once the data can be read ({why})" if cfg.mask_full_rgb is None else
               f"per {'pixel' if cfg.mask_full_rgb else 'channel'} (flag; the data could not be read: {why})")
    return json.dumps({**cfg.to_dict(), "mask_law": law, "unlearnt_pixels": unlearnt, "data_units": units},
                      indent=2, ensure_ascii=False)


def unlearnt_hole(cfg: TrainConfig, data) -> str | None:
    """:meth:`Corruption.unlearnt_hole` for an ambient run whose masks are drawn (None otherwise)."""
    if not sees_masks(cfg.objective) or data.has_data_masks or cfg.corruption_probability == 0:
        return None
    return cfg.corruption.unlearnt_hole(*data.shape[1:])
