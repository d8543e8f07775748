"""The finetuning loop: ambient loss, gradient accumulation, EMA, snapshots, resume, export.

Layout of ``outdir``: ``snapshot-<step>/`` (:mod:`ambient.store.snapshots`: UNet weights, EMA,
optimizer, the UNet/scheduler configs and the fixed embedding, so a resume needs no access to
the pretrained model), ``stats.jsonl`` (one line per ``log_every`` steps),
``finetune_options.json`` (the resolved options), and at the end the exported diffusers folder
(:func:`ambient.store.finetune_export.export_finetuned`: ``unet/``, ``scheduler/``, ``config.json``).

Randomness is a pure function of (seed, step): image order is a permutation per epoch seeded
by (seed, epoch), and the further masks, timesteps, noise and flips of micro-batch m of step s
come from a generator seeded by (seed, s, m). A resumed run therefore continues exactly.
Data order, the guarded optimizer step (clipping, skipped non-finite steps), EMA updates, where
to resume and the resume check come from :mod:`ambient.learners.core`, shared with ``ambient train``.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from ambient.data.datasets import ImageDataset, augment_batch, check_masks, load_dataset, resolve_mask_full_rgb
from ambient.distributed import resolve_device
from ambient.errors import AmbientInputError
from ambient.folders import FINETUNE_RUN, FINETUNE_SNAPSHOT, claim_outdir, stamped
from ambient.io import append_jsonl, atomic_write_json
from ambient.learners.core import (
    EpochOrder,
    NonFiniteGuard,
    check_resume_compatible,
    guarded_step,
    resume_source,
    skipped_snapshots_notice,
    update_ema,
)
from ambient.learners.finetune_config import RESUMABLE_CHANGES, FinetuneConfig
from ambient.learners.runlog import OutdirLock
from ambient.nets.pretrained import MaskedUNet, add_mask_channels, image_channels, load_pretrained, unet_class
from ambient.nets.schedules import alphas_cumprod
from ambient.objectives.ddpm_loss import FinetuneLoss
from ambient.rng import STEP_STREAM, mix_seed
from ambient.store.finetune_export import export_finetuned
from ambient.store.snapshots import load_snapshot, save_snapshot, snapshot_name
from ambient.store.statedict import load_state_dict_strict

# No --max-nonfinite flag for finetuning (yet): this many non-finite steps in a row stop the run.
MAX_NONFINITE = 20


def load_data(config: FinetuneConfig, saved_full_rgb: bool | None = None) -> tuple[FinetuneConfig, ImageDataset]:
    """The finetuning images with their masks A (drawn per index, or from the data), and the config with
    its mask law resolved (:func:`ambient.data.datasets.resolve_mask_full_rgb`; ``saved_full_rgb``: a resumed run's)."""
    hint = config.mask_full_rgb if config.mask_full_rgb is not None else saved_full_rgb
    corr = replace(config, mask_full_rgb=bool(hint)).corruption()
    ds = load_dataset(config.data, data_dir=config.data_dir, max_size=config.max_size,
                      resolution=config.resolution, corruption=corr if corr.p > 0 else None, seed=config.seed)
    if ds.has_data_masks:
        if corr.p > 0:
            raise AmbientInputError(f"--corruption-probability {corr.p}: the data {config.data} comes with "
                                    "masks; leave it at 0")
        ds.corruption = corr  # kept for δ only; never draws A
        check_masks(ds, config.data)  # all-zero masks: refused (the notice for all-one ones is the caller's)
    full_rgb, _ = resolve_mask_full_rgb(config.mask_full_rgb, ds, saved_full_rgb)
    return replace(config, mask_full_rgb=full_rgb), ds


def build_model(config: FinetuneConfig, flag: str = "--pretrained"):
    """(MaskedUNet, scheduler) from the pretrained model, mask channels added if asked."""
    pre = load_pretrained(config.pretrained, flag=flag)
    channels = image_channels(pre.unet)
    if config.mask_mode == "channels":
        add_mask_channels(pre.unet, channels)
    return MaskedUNet(pre.unet, channels, config.mask_mode, pre.embedding), pre.scheduler


def _rebuild(snap) -> tuple[MaskedUNet, object]:
    from diffusers import DDPMScheduler

    cfg = snap.config
    unet = unet_class(cfg["unet_class"]).from_config(cfg["unet_config"])
    load_state_dict_strict(unet, snap.model, snap.path / "model.safetensors")
    emb = snap.extra_state.get("embedding")
    net = MaskedUNet(unet, int(cfg["img_channels"]), cfg["finetune"]["mask_mode"], emb)
    return net, DDPMScheduler.from_config(cfg["scheduler_config"])


def _check_fit(net: MaskedUNet, ds: ImageDataset, config: FinetuneConfig) -> None:
    if ds.channels != net.img_channels:
        raise AmbientInputError(f"--data {config.data}: images have {ds.channels} channels but the model "
                                f"{config.pretrained} takes {net.img_channels}")
    m = net.multiple
    if ds.height % m or ds.width % m:
        raise AmbientInputError(f"--data {config.data}: images are {ds.height}x{ds.width}, but the UNet "
                                f"needs sides divisible by {m} (use --resolution)")


def _model_section(net: MaskedUNet, scheduler, config: FinetuneConfig, ds: ImageDataset, step: int) -> dict:
    return {"unet_class": type(net.unet).__name__, "img_channels": net.img_channels,
            "mask_mode": net.mask_mode, "hidden_x0": config.hidden_x0,
            "prediction_type": str(scheduler.config.prediction_type), "timestep_mode": config.timestep_mode,
            "image_shape": list(ds.shape), "weights": "ema" if config.ema > 0 else "raw", "step": step}


def _sampling_section(config: FinetuneConfig, ds: ImageDataset) -> dict:
    return {"corruption": config.corruption().to_dict(),
            "data_survival": ds.observed_share if ds.has_data_masks else None}


def _build_or_resume(config: FinetuneConfig, outdir: Path, device, log: Callable[[str], None]):
    """(config with its mask law resolved, data, net, scheduler, EMA copy or None, optimizer, snapshot or None):
    built from the pretrained model, or restored from the latest snapshot in ``outdir`` (unless --no-resume)."""
    snap_dir = resume_source(outdir, None if config.resume else "none")
    skipped = skipped_snapshots_notice(outdir, snap_dir) if config.resume else None
    if skipped:
        log(skipped)
    snap = load_snapshot(snap_dir) if snap_dir is not None else None
    old = snap.config.get("finetune", {}) if snap is not None else {}
    saved_full_rgb = old.get("mask_full_rgb") if isinstance(old.get("mask_full_rgb"), bool) else None
    config, ds = load_data(config, saved_full_rgb)
    if snap is not None:
        check_resume_compatible(old, config.to_dict(), RESUMABLE_CHANGES, snap_dir,
                                fresh_start="another --outdir (or --no-resume)")
        net, scheduler = _rebuild(snap)
        if int(snap.extra_state["step"]) < config.steps:  # else finetune() says there is nothing to do
            log(f"resuming from {snap_dir} (step {int(snap.extra_state['step'])})")
    else:
        net, scheduler = build_model(config)
    _check_fit(net, ds, config)
    net.to(device).train()
    ema = copy.deepcopy(net).eval().requires_grad_(False) if config.ema > 0 else None
    opt = torch.optim.AdamW(net.unet.parameters(), lr=config.lr, weight_decay=0.0)
    if snap is not None:
        if ema is not None and snap.ema is not None:
            load_state_dict_strict(ema.unet, snap.ema, snap.path / "ema.safetensors")
        if snap.optimizer is not None:
            opt.load_state_dict(snap.optimizer)
            for group in opt.param_groups:
                group["lr"] = config.lr
    return config, ds, net, scheduler, ema, opt, snap


def _exported_step(outdir: Path) -> int | None:
    """The step of the model exported into ``outdir`` (its config.json is written last), or None."""
    try:
        step = json.loads((outdir / "config.json").read_text(encoding="utf-8"))["model"]["step"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return step if isinstance(step, int) else None


def finetune(config: FinetuneConfig, log: Callable[[str], None] | None = None) -> Path:
    """Run (or resume) a finetuning run; returns ``outdir`` holding the exported model.

    A run already at or past ``--steps`` (and exported) is left as it is (one line says so). The
    outdir is locked while finetuning writes into it: a second process on it is refused.
    """
    with OutdirLock() as lock:
        return _finetune(config, log, lock)


def _finetune(config: FinetuneConfig, log: Callable[[str], None] | None, lock: OutdirLock) -> Path:
    config.validate()
    log = log or (lambda _msg: None)
    outdir = Path(config.outdir)
    claim_outdir(outdir, FINETUNE_RUN, command="ambient finetune")
    device = resolve_device(config.device)
    config, ds, net, scheduler, ema, opt, snap = _build_or_resume(config, outdir, device, log)
    start = int(snap.extra_state["step"]) if snap is not None else 0
    loss_fn = FinetuneLoss(alphas_cumprod(scheduler), str(scheduler.config.prediction_type), config.hidden_x0,
                           config.loss_weight, config.snr_gamma, further=config.corruption())
    order = EpochOrder(len(ds), config.seed)
    saved = snap.extra_state if snap is not None else {}
    guard = NonFiniteGuard(MAX_NONFINITE, int(saved.get("skipped", 0)), int(saved.get("consecutive_skipped", 0)))
    params = list(net.unet.parameters())
    if snap is not None and start >= config.steps and (start > config.steps or _exported_step(outdir) == start):
        log(f"nothing to do: {snap.path} is already at step {start}, at or past --steps {config.steps} "
            "(a larger --steps trains further)")
        return outdir
    lock.acquire(outdir)  # creates the folder; a second process on it is refused here
    atomic_write_json(outdir / "finetune_options.json", stamped(config.to_dict(), FINETUNE_RUN))
    snap_config = stamped({"finetune": config.to_dict(),
                           "unet_class": type(net.unet).__name__, "unet_config": dict(net.unet.config),
                           "scheduler_config": dict(scheduler.config), "img_channels": net.img_channels,
                           "sampling": _sampling_section(config, ds)}, FINETUNE_SNAPSHOT)

    def snapshot(step: int) -> None:
        extra = {"step": step, "skipped": guard.skipped, "consecutive_skipped": guard.consecutive}
        if net.embedding is not None:
            extra["embedding"] = net.embedding.detach().cpu()
        save_snapshot(outdir / snapshot_name(step), config=snap_config, model=net.unet.state_dict(),
                      ema=None if ema is None else ema.unet.state_dict(), optimizer=opt.state_dict(),
                      extra_state=extra)

    per_step = config.batch * config.grad_accum
    losses, t_log = [], time.perf_counter()
    for step in range(start + 1, config.steps + 1):
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for micro in range(config.grad_accum):
            g = torch.Generator().manual_seed(mix_seed(STEP_STREAM, config.seed, step, micro))
            idx = order.indices((step - 1) * per_step + micro * config.batch, config.batch)
            y, mask = ds.batch(idx)
            inputs = loss_fn.draw(y, mask, idx, g, config.xflip, augment_batch)  # Ã, flips, t, noise
            loss = loss_fn.per_image(net, inputs.to(device)).mean()
            (loss / config.grad_accum).backward()
            total += float(loss.detach()) / config.grad_accum
        stepped = guarded_step(opt, params, guard, loss=total, max_grad_norm=config.grad_clip,
                               where=f"step {step}", outdir=outdir)
        if stepped and ema is not None:
            update_ema(ema.unet, net.unet, config.ema)
        losses.append(total)
        if step % config.log_every == 0 or step == config.steps:
            now = time.perf_counter()
            row = {"step": step, "loss": sum(losses) / len(losses), "lr": config.lr,
                   "images_seen": step * per_step, "sec_per_step": (now - t_log) / len(losses),
                   "time": time.time()}
            append_jsonl(outdir / "stats.jsonl", row)
            log(f"step {step}/{config.steps} loss {row['loss']:.5f} ({row['sec_per_step']:.3f} s/step)")
            losses, t_log = [], now
        if step % config.snapshot_every == 0 or step == config.steps:
            snapshot(step)
    final = config.steps if config.steps > start else start
    if ema is not None:  # buffers (none in these UNets) follow the raw model
        for be, b in zip(ema.unet.buffers(), net.unet.buffers()):
            be.copy_(b)
    export_finetuned(outdir, (ema if ema is not None else net).cpu(), scheduler, {
        "model": _model_section(net, scheduler, config, ds, final), "sampling": _sampling_section(config, ds),
        "finetune": config.to_dict(),
        # the data's units, so that `ambient sample` writes floats in them (as for train runs)
        "data": {"value_range": list(ds.value_range), "dtype": ds.kind}})
    log(f"exported {outdir} (step {final})")
    return outdir
