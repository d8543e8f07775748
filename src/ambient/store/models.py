"""Loading any model folder for sampling (:func:`load_model`): train snapshots and outdirs, em runs,
finetuned exports, imported models.

A snapshot's ``config.json`` (see :mod:`ambient.store.snapshots`) holds a ``model`` section (the
backbone and the denoiser's scalings) and a ``sampling`` section (image shape and the mask law
the sampler must reproduce), read into :class:`ambient.nets.registry.ModelConfig` and
:class:`ambient.nets.registry.SamplingSpec`; :func:`load_model` rebuilds the denoiser from them with the
EMA weights by default. A training outdir resolves to its latest snapshot.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from ambient.errors import AmbientInputError
from ambient.folders import EM_RUN, FINETUNE_RUN, KSPACE_AMBIENT_RUN, describe, folder_kind_why
from ambient.io import read_json
from ambient.nets.registry import ModelConfig, SamplingSpec, build_denoiser
from ambient.store.snapshots import latest_snapshot, load_snapshot
from ambient.store.statedict import load_state_dict_strict
from ambient.store.upgrades import data_section, mask_law_notice, sampling_section

# A run folder that holds models in subfolders names the one to use in this file: {"model": "<subfolder>"}.
MODEL_POINTER = "model_pointer.json"


def resolve_model_dir(path: str | os.PathLike) -> Path:
    """A snapshot folder, a training outdir (its latest snapshot), or a folder whose
    ``model_pointer.json`` names a subfolder that is one of those."""
    p = Path(path)
    if not p.exists():
        raise AmbientInputError(f"--model {p}: no such file or directory")
    if (p / "model.safetensors").is_file() or (p / "COMPLETE").exists():
        return p
    pointer = p / MODEL_POINTER
    if pointer.is_file():  # e.g. an EM run: the model of its last finished lap
        named = read_json(pointer)
        target = named.get("model") if isinstance(named, dict) else None
        if not isinstance(target, str) or not (p / target).is_dir():
            raise AmbientInputError(f"--model {p}: {pointer.name} names no model folder ({target!r})")
        return resolve_model_dir(p / target)
    kind, why = folder_kind_why(p) if p.is_dir() else (None, "")
    if kind == EM_RUN:
        raise AmbientInputError(f"--model {p}: is an em run with no finished lap yet (no {MODEL_POINTER}); "
                                "run ambient em until a lap finishes, or give a lap-XX folder")
    if kind == KSPACE_AMBIENT_RUN:
        raise AmbientInputError(f"--model {p}: is a k-space ambient run (ambient train on k-space measurements), "
                                "whose network sees k-space projections, not full images or pixel masks; only "
                                "ambient sample and ambient restore --model take it")
    if kind == FINETUNE_RUN and _is_finetune_export(p):
        raise AmbientInputError(f"--model {p}: is a finetune run (a diffusers model), not an ambient training "
                                "run or snapshot")
    if kind == FINETUNE_RUN:
        raise AmbientInputError(f"--model {p}: is a finetune run that has not finished (no exported model); "
                                "run the same ambient finetune again to finish it")
    latest = latest_snapshot(p) if p.is_dir() else None
    if latest is None:
        what = f"is {describe(kind)} ({why}), not a model" if kind else "not a model"
        raise AmbientInputError(f"--model {p}: {what} (no snapshot-* folder and no model.safetensors)")
    return latest


@dataclass
class LoadedModel:
    denoiser: torch.nn.Module
    model: ModelConfig | None  # None for finetuned diffusers models
    sampling: SamplingSpec
    config: dict
    path: Path
    image_shape: tuple[int, int, int] = (1, 28, 28)
    value_range: tuple[float, float] = (0.0, 255.0)  # the training data's values that map to [-1, 1]
    data_dtype: str = "uint8"  # the training data's dtype ("uint8", "uint16", "float32", ...)

    @property
    def float_data(self) -> bool:
        """True when the model was trained on non-uint8 data: its outputs belong in ``value_range``'s units."""
        return self.data_dtype != "uint8"


def data_units(config: dict) -> tuple[tuple[float, float], str]:
    """(value_range, dtype) of the data a saved model config was trained on (old folders: uint8, (0, 255))."""
    data = data_section(config.get("data", {}) if isinstance(config, dict) else {})
    lo, hi = (float(v) for v in data["value_range"])
    return (lo, hi), str(data["dtype"])


def reimport_hint(loaded: LoadedModel) -> str:
    """For a model imported without a corruption probability (its sampler shows every pixel although the
    network takes masks): a hint to import it again with one; else ""."""
    if "imported" in loaded.config and loaded.model is not None and loaded.model.mask_channels \
            and not loaded.sampling.uses_masks:
        return (f" ({loaded.path} was imported without a corruption probability, so it is used as a full-image "
                "model; if it was trained on corrupted data, run ambient import again with "
                "--corruption-probability and --delta-probability as it was trained)")
    return ""


def _is_finetune_export(p: Path) -> bool:
    import json

    try:
        return p.is_dir() and json.loads((p / "config.json").read_text()).get("kind") == "finetune"
    except (OSError, ValueError, AttributeError):
        return False


def _load_finetuned(p: Path, device) -> LoadedModel:
    from ambient.store.finetune_export import load_finetuned

    den = load_finetuned(p, device=device)
    cfg = __import__("json").loads((p / "config.json").read_text())
    spec = SamplingSpec.from_dict(sampling_section(cfg["sampling"]))
    shape = tuple(int(v) for v in cfg["model"]["image_shape"])
    _notify_legacy(spec, shape[0], p)
    return LoadedModel(den, None, spec, cfg, p, shape, *data_units(cfg))


def _notify_legacy(spec: SamplingSpec, img_channels: int, where: Path) -> None:
    notice = mask_law_notice(spec, img_channels, str(where))
    if notice:
        print(notice, file=sys.stderr)


def load_model(path: str | os.PathLike, *, use_ema: bool = True, device: str | torch.device = "cpu") -> LoadedModel:
    """Load a trained denoiser (EMA weights unless ``use_ema=False``) in eval mode.

    ``path`` is a training outdir, a snapshot, or the output folder of ``ambient finetune``
    (a diffusers model; its exported weights are used as they are).
    """
    if _is_finetune_export(Path(path)):
        return _load_finetuned(Path(path), device)
    snap_dir = resolve_model_dir(path)
    snap = load_snapshot(snap_dir, map_location="cpu")
    cfg = snap.config
    if "model" not in cfg or "sampling" not in cfg:
        raise AmbientInputError(f"{snap_dir / 'config.json'}: not an ambient training snapshot "
                                "(no 'model' / 'sampling' sections)")
    try:
        model_cfg = ModelConfig.from_dict(cfg["model"])
        spec = SamplingSpec.from_dict(sampling_section(cfg["sampling"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise AmbientInputError(f"{snap_dir / 'config.json'}: bad model config ({exc})") from None
    den = spec.fit_sigma_range(build_denoiser(model_cfg))  # noisy-trained: sampled down to sigma_stop only
    weights = snap.ema if (use_ema and snap.ema is not None) else snap.model
    load_state_dict_strict(den, weights, snap_dir / ("ema.safetensors" if use_ema and snap.ema else
                                                     "model.safetensors"))
    den.to(device).eval().requires_grad_(False)
    shape = (model_cfg.img_channels, model_cfg.resolution, model_cfg.resolution)
    _notify_legacy(spec, model_cfg.img_channels, snap_dir)
    try:
        units = data_units(cfg)
    except (TypeError, ValueError) as exc:
        raise AmbientInputError(f"{snap_dir / 'config.json'}: bad data section ({exc})") from None
    return LoadedModel(den, model_cfg, spec, cfg, snap_dir, shape, *units)
