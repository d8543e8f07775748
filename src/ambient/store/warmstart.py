"""Warm start: a new training run whose network and EMA start from another model's EMA weights.

``ambient train --init MODEL`` (``TrainConfig.init``) and the EM learner's M-steps use it. Only
the weights travel (the optimizer, step count and data order start afresh), and only between
networks of the same architecture: the two model configs must agree on everything but dropout.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ambient.errors import AmbientInputError
from ambient.nets.registry import ModelConfig
from ambient.store.models import resolve_model_dir
from ambient.store.snapshots import load_snapshot
from ambient.store.statedict import load_state_dict_strict

_IGNORED = ("dropout",)  # no parameters of its own


def _describe(cfg: dict) -> str:
    keys = ("arch", "img_channels", "resolution", "mask_channels", "label_dim", "songunet", "preconditioning")
    return ", ".join(f"{k}={cfg.get(k)!r}" for k in keys if cfg.get(k) not in (None, 0) or k == "mask_channels")


def load_init_weights(path: str | os.PathLike, net: torch.nn.Module, ema: torch.nn.Module,
                      model_cfg: ModelConfig) -> Path:
    """Copy the EMA weights of model ``path`` (a snapshot or an outdir) into ``net`` and ``ema``.

    Returns the snapshot folder read. One-line :class:`AmbientInputError` naming ``--init`` when
    the path is not a model or its network differs from ``model_cfg``.
    """
    try:
        snap_dir = resolve_model_dir(path)
    except AmbientInputError as exc:
        raise AmbientInputError(str(exc).replace("--model", "--init", 1)) from None
    snap = load_snapshot(snap_dir, map_location="cpu")
    saved = snap.config.get("model")
    if not isinstance(saved, dict):
        raise AmbientInputError(f"--init {path}: {snap_dir} has no model config (not an ambient training snapshot)")
    mine = model_cfg.to_dict()
    try:
        theirs = ModelConfig.from_dict(saved).to_dict()
    except (TypeError, ValueError) as exc:
        raise AmbientInputError(f"--init {path}: bad model config in {snap_dir} ({exc})") from None
    if {k: v for k, v in theirs.items() if k not in _IGNORED} != {k: v for k, v in mine.items() if k not in _IGNORED}:
        raise AmbientInputError(f"--init {path}: its network ({_describe(theirs)}) differs from this run's "
                                f"({_describe(mine)}); warm starts need the same architecture")
    weights = snap.ema if snap.ema is not None else snap.model
    where = snap_dir / ("ema.safetensors" if snap.ema is not None else "model.safetensors")
    load_state_dict_strict(net, weights, where)
    load_state_dict_strict(ema, weights, where)
    return snap_dir
