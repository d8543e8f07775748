"""``ambient import``: the paper's released network pickles → an ambient model folder.

Two formats (see ``shared/fixtures/reference-checkpoints/README.md``):

* the reference training loop's: ``{'ema': state_dict (keys ``_orig_mod.model.…``, storages
  possibly tagged ``cuda:0``), 'dataset_kwargs': {...}, ...}``;
* EDM's: ``{'ema': EDMPrecond module pickled through torch_utils.persistence, ...}``.

Both are read by :mod:`ambient.store.safe_pickle` (nothing from the file runs). The network's
configuration comes from ``training_options.json`` when given (its ``network_kwargs``), else
from the EDM module's recorded constructor arguments, and is completed and checked against the
weights' names and shapes. The output is a snapshot folder (``config.json`` +
``model.safetensors``, written atomically) that :func:`ambient.store.models.load_model` reads: a
:class:`~ambient.nets.ddpmpp.ReferenceDenoiser` (the reference's preconditioning) around the
:class:`~ambient.nets.songunet.SongUNet`, and a sampling spec from the checkpoint's ``dataset_kwargs``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import torch

from ambient.data.corruption import PATTERNS, Corruption
from ambient.errors import AmbientInputError
from ambient.folders import IMPORTED_MODEL, describe, folder_kind, stamped
from ambient.nets.registry import ModelConfig, SamplingSpec, build_denoiser
from ambient.nets.songunet import SongUNetConfig
from ambient.store import safe_pickle
from ambient.store.snapshots import save_snapshot
from ambient.store.statedict import check_finite, load_state_dict_strict

_SONG_KEYS = ("model_channels", "channel_mult", "channel_mult_emb", "num_blocks", "attn_resolutions",
              "dropout", "label_dropout", "channel_mult_noise", "resample_filter", "augment_dim", "gated",
              "embedding_type", "encoder_type", "decoder_type")


def _flatten(node, prefix: str, out: dict[str, torch.Tensor]) -> None:
    """A module tree read as data (PersistentObject / ModuleData) → state_dict entries."""
    state = getattr(node, "state", None)
    if not isinstance(state, dict):
        raise AmbientInputError(f"ema: module {prefix.rstrip('.') or '(root)'} has no readable state")
    skip = state.get("_non_persistent_buffers_set") or set()
    for group in ("_parameters", "_buffers"):
        for name, value in (state.get(group) or {}).items():
            if value is not None and name not in skip:
                if not isinstance(value, torch.Tensor):
                    raise AmbientInputError(f"ema: {prefix}{name} is not a tensor")
                out[prefix + name] = value
    for name, child in (state.get("_modules") or {}).items():
        if child is not None:
            _flatten(child, f"{prefix}{name}.", out)


def read_checkpoint(path: str | os.PathLike) -> dict:
    """Read a reference or EDM pickle safely: {'format', 'state_dict' (keys 'model.…'), 'dataset_kwargs',
    'init_kwargs' (EDM's recorded EDMPrecond arguments, or {}), 'sigma_data'}."""
    data = safe_pickle.load(path)
    if not isinstance(data, dict) or "ema" not in data:
        raise AmbientInputError(f"--pkl {path}: no 'ema' network in the pickle")
    ema, init_kwargs, sigma_data = data["ema"], {}, 0.5
    if isinstance(ema, dict):
        fmt = "ambient"
        sd = {k.removeprefix("_orig_mod."): v for k, v in ema.items()}
        if not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise AmbientInputError(f"--pkl {path}: 'ema' holds entries that are not tensors")
    elif isinstance(ema, safe_pickle.PersistentObject):
        fmt = "edm"
        if ema.class_name != "EDMPrecond":
            raise AmbientInputError(f"--pkl {path}: the network is a {ema.class_name}; only EDMPrecond is supported")
        child = (ema.state.get("_modules") or {}).get("model")
        if getattr(child, "class_name", None) != "SongUNet":
            raise AmbientInputError(f"--pkl {path}: the network's model is a {getattr(child, 'class_name', child)!r}; "
                                    "only SongUNet (DDPM++) is supported")
        sd = {}
        _flatten(ema, "", sd)
        init_kwargs = dict(ema.state.get("_init_kwargs") or {})
        sigma_data = float(ema.state.get("sigma_data", 0.5))
    else:
        raise AmbientInputError(f"--pkl {path}: 'ema' is neither a state dict nor an EDM network")
    if not sd or not all(k.startswith("model.") for k in sd):
        raise AmbientInputError(f"--pkl {path}: the weights are not those of an EDMPrecond network (keys 'model.…')")
    kwargs = data.get("dataset_kwargs") or {}
    return {"format": fmt, "state_dict": sd, "dataset_kwargs": dict(kwargs) if isinstance(kwargs, dict) else {},
            "init_kwargs": init_kwargs, "sigma_data": sigma_data}


def _from_weights(sd: dict[str, torch.Tensor]) -> dict:
    """SongUNet arguments read off the weights' names and shapes (keys without the 'model.' prefix)."""
    if "map_noise.freqs" in sd or any("aux_residual" in k or "aux_skip" in k for k in sd):
        raise AmbientInputError("the network is NCSN++ (Fourier embedding / residual or skip encoder); "
                                "only DDPM++ is supported")
    conv = [k for k in sd if re.fullmatch(r"enc\.(\d+)x\1_conv\.weight", k)]
    if len(conv) != 1:
        raise AmbientInputError("the weights have no single input convolution enc.{R}x{R}_conv; not a SongUNet")
    res = int(conv[0].split(".")[1].split("x")[0])
    mc, cin = sd[conv[0]].shape[:2]
    levels = sorted({int(m.group(1)) for k in sd if (m := re.match(r"enc\.(\d+)x\d+_", k))}, reverse=True)
    blocks = {int(m.group(1)) for k in sd if (m := re.match(rf"enc\.{res}x{res}_block(\d+)\.", k))}
    layer0 = sd["map_layer0.weight"]
    filt = next((v for k, v in sd.items() if k.endswith("resample_filter")), None)
    out = {"img_resolution": res, "in_channels": int(cin), "model_channels": int(mc),
           "out_channels": int(sd[f"dec.{res}x{res}_aux_conv.weight"].shape[0]),
           "channel_mult": [int(sd[f"enc.{r}x{r}_block0.conv0.weight"].shape[0]) // int(mc) for r in levels],
           "num_blocks": len(blocks),
           "attn_resolutions": [r for r in levels if f"enc.{r}x{r}_block0.qkv.weight" in sd],
           "channel_mult_noise": int(layer0.shape[1]) // int(mc), "channel_mult_emb": int(layer0.shape[0]) // int(mc),
           "augment_dim": int(sd["map_augment.weight"].shape[1]) if "map_augment.weight" in sd else 0,
           "label_dim": int(sd["map_label.weight"].shape[1]) if "map_label.weight" in sd else 0,
           "gated": any(k.endswith(".gate_weight") for k in sd)}
    if filt is not None:
        row = filt.reshape(filt.shape[-2], filt.shape[-1])[0]
        out["resample_filter"] = [round(float(v)) for v in row / row[0]]
    return out


def infer_config(sd: dict[str, torch.Tensor], options: dict | None = None) -> SongUNetConfig:
    """The SongUNetConfig of weights ``sd`` ('model.'-prefixed keys): ``options`` (network kwargs as
    recorded by the reference) where given, the weights' shapes for the rest; disagreements are errors."""
    options = dict(options or {})
    model_type = options.get("model_type", "SongUNet")
    if model_type != "SongUNet":
        raise AmbientInputError(f"network model_type {model_type!r}: only SongUNet (DDPM++) is supported")
    weights = _from_weights({k.removeprefix("model."): v for k, v in sd.items()})
    merged = {**weights, "dropout": 0.0}
    for key in _SONG_KEYS:
        if key in options:
            merged[key] = options[key]
    for key in ("channel_mult", "attn_resolutions", "num_blocks", "model_channels", "augment_dim", "gated",
                "channel_mult_noise", "channel_mult_emb"):
        given, seen = merged[key], weights[key]
        if (list(given) if isinstance(given, (list, tuple)) else given) != seen:
            raise AmbientInputError(f"training options say {key}={given!r} but the weights have {seen!r}")
    try:
        return SongUNetConfig.from_dict(merged)
    except (TypeError, ValueError) as exc:
        raise AmbientInputError(f"unsupported network configuration: {exc}") from None


def sampling_corruption(dataset_kwargs: dict) -> Corruption:
    """The mask law of the checkpoint's training data (its dataset_kwargs; absent = no corruption)."""
    pattern = dataset_kwargs.get("corruption_pattern") or "dust"
    if pattern not in PATTERNS:
        raise AmbientInputError(f"dataset_kwargs.corruption_pattern {pattern!r} is not one of {', '.join(PATTERNS)}")
    return Corruption(pattern, float(dataset_kwargs.get("corruption_probability") or 0.0),
                      float(dataset_kwargs.get("delta_probability") or 0.0),
                      bool(dataset_kwargs.get("mask_full_rgb") or False))


def _jsonable(d: dict) -> dict:
    ok = (str, int, float, bool, type(None))
    return {str(k): (list(v) if isinstance(v, tuple) else v) for k, v in d.items()
            if isinstance(v, ok) or (isinstance(v, (list, tuple)) and all(isinstance(x, ok) for x in v))}


def _load_exact(module: torch.nn.Module, sd: dict[str, torch.Tensor], source) -> None:
    """:func:`ambient.store.statedict.load_state_dict_strict`, its one-line error with a hint for imports."""
    try:
        load_state_dict_strict(module, sd, f"--pkl {source}")
    except AmbientInputError as exc:
        raise AmbientInputError(f"{exc} (the network was inferred from the weights; give its --training-options)"
                                ) from None


def import_checkpoint(pkl: str | os.PathLike, out: str | os.PathLike,
                      training_options: str | os.PathLike | None = None, corruption: dict | None = None) -> Path:
    """Read ``pkl`` (and ``training_options.json``), check the weights load, write the model folder ``out``.

    ``corruption`` (keys of the reference's dataset_kwargs: corruption_probability, delta_probability,
    corruption_pattern, mask_full_rgb) overrides what the checkpoint records, for the sampler's masks.
    """

    for key, flag in (("corruption_probability", "--corruption-probability"),
                      ("delta_probability", "--delta-probability")):
        value = (corruption or {}).get(key)
        if value is not None and not 0 <= value < 1:
            raise AmbientInputError(f"{flag} {value}: must be in [0, 1)")
    out = Path(out)
    if out.exists():
        what = f" (it is {describe(folder_kind(out))})" if out.is_dir() and folder_kind(out) else ""
        raise AmbientInputError(f"--out {out}: already exists{what}; ambient import writes only a new folder; "
                                "choose another --out")
    options, top = {}, {}
    if training_options is not None:
        try:
            top = json.loads(Path(training_options).read_text())
            options = dict(top.get("network_kwargs") or {})
        except (OSError, ValueError, AttributeError) as exc:
            raise AmbientInputError(f"--training-options {training_options}: not a readable JSON file "
                                    f"({exc})") from None
        if options.get("class_name", "training.networks.EDMPrecond").rsplit(".", 1)[-1] != "EDMPrecond":
            raise AmbientInputError(f"--training-options {training_options}: network class "
                                    f"{options['class_name']!r}; only EDMPrecond is supported")
    ckpt = read_checkpoint(pkl)
    sd = ckpt["state_dict"]
    check_finite(sd, f"--pkl {pkl}")
    song = infer_config(sd, {**ckpt["init_kwargs"], **options})
    c = song.out_channels // 2 if song.in_channels == song.out_channels and song.out_channels in (2, 6) \
        else song.out_channels
    mask_channels = song.in_channels == 2 * c
    # the reference records img_channels with the mask channels (2c), EDM without them (c)
    for key, allowed in (("img_channels", {c, song.in_channels}), ("label_dim", {song.label_dim})):
        for where in (options, top):
            given = where.get(key)
            if given is not None and given not in allowed:
                raise AmbientInputError(f"--training-options {training_options}: {key}={given!r} but the weights "
                                        f"have {key}={' or '.join(map(str, sorted(allowed)))}; give the training "
                                        "options of this checkpoint")
    res = int(top.get("img_resolution") or ckpt["dataset_kwargs"].get("resolution") or song.img_resolution)
    if res != song.img_resolution:
        raise AmbientInputError(f"the checkpoint says resolution {res} but the weights are for {song.img_resolution}")
    model_cfg = ModelConfig(arch="songunet", img_channels=c, resolution=res, mask_channels=mask_channels,
                            sigma_data=ckpt["sigma_data"], mask_aware=False, songunet=song.to_dict(),
                            preconditioning="reference", label_dim=song.label_dim)
    den = build_denoiser(model_cfg)
    _load_exact(den, sd, pkl)
    law = {**ckpt["dataset_kwargs"], **{k: v for k, v in (corruption or {}).items() if v is not None}}
    spec = SamplingSpec(sampling_corruption(law) if mask_channels else Corruption())
    digest = hashlib.sha256(Path(pkl).read_bytes()).hexdigest()
    config = {"model": model_cfg.to_dict(), "sampling": spec.to_dict(),
              "imported": {"source": str(Path(pkl).resolve()), "sha256": digest, "format": ckpt["format"],
                           "dataset_kwargs": _jsonable(ckpt["dataset_kwargs"]),
                           "corruption_overrides": _jsonable(corruption or {}),
                           "network_kwargs": _jsonable({**ckpt["init_kwargs"], **options})}}
    weights = {k: v.contiguous() for k, v in den.state_dict().items()}
    return save_snapshot(out, config=stamped(config, IMPORTED_MODEL), model=weights)
