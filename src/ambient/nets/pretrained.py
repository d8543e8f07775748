"""Pretrained pixel-space diffusers UNets: loading, mask-channel surgery, and a uniform call.

What ``--pretrained`` accepts (:func:`load_pretrained`):

* a **pipeline folder**: ``unet/`` (``config.json`` + ``diffusion_pytorch_model.safetensors``)
  and ``scheduler/`` (``scheduler_config.json``), as written by ``pipeline.save_pretrained``;
* a **bare UNet folder**: ``config.json`` + ``diffusion_pytorch_model.safetensors`` with the
  scheduler config beside them (``scheduler_config.json``) or in a ``scheduler/`` subfolder;
* a **hub id** ``owner/name`` of a pipeline (``unet/`` and ``scheduler/`` subfolders), when
  online and the name is not an existing local path.

Weights are read from safetensors only (``use_safetensors=True``; ``.bin`` pickles are refused).
The UNet is a ``UNet2DModel`` or a ``UNet2DConditionModel``; the scheduler config is read as a
``DDPMScheduler`` (discrete timesteps 0..T−1, ``alphas_cumprod``, ``prediction_type`` epsilon,
v_prediction or sample). A UNet whose ``out_channels`` is twice its image channels (a learned
variance, as DeepFloyd IF) is used through its first half.

Fixed text embedding (``UNet2DConditionModel`` only): the tensor ``embedding`` of
``text_embedding.safetensors`` in the model folder (or its ``unet/``), shape (L, D) or (1, L, D),
e.g. the encoded empty prompt for IF stage I; without that file, zeros of shape
(1, 1, D) with D = ``encoder_hid_dim`` or else ``cross_attention_dim``. (With all-zero keys the
attention output does not depend on L, so one token suffices.)
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ambient.errors import AmbientInputError
from ambient.folders import describe, folder_kind

WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
SCHEDULER_FILE = "scheduler_config.json"
EMBEDDING_FILE = "text_embedding.safetensors"
UNET_CLASSES = ("UNet2DModel", "UNet2DConditionModel")
MASK_MODES = ("channels", "input")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


@dataclass
class Pretrained:
    """A loaded pretrained model: the UNet, its scheduler, and the fixed text embedding."""

    unet: nn.Module
    scheduler: object  # diffusers.DDPMScheduler
    embedding: torch.Tensor | None
    source: str

    @property
    def class_name(self) -> str:
        return type(self.unet).__name__

    @property
    def prediction_type(self) -> str:
        return str(self.scheduler.config.prediction_type)


def unet_class(name: str):
    import diffusers

    if name not in UNET_CLASSES:
        raise AmbientInputError(f"unsupported UNet class {name!r}; expected one of {', '.join(UNET_CLASSES)}")
    return getattr(diffusers, name)


def _read_json(path: Path, flag: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise AmbientInputError(f"{flag} {path}: cannot read JSON ({exc})") from None
    if not isinstance(data, dict):
        raise AmbientInputError(f"{flag} {path}: not a JSON object")
    return data


def _local_layout(root: Path, flag: str) -> tuple[Path, Path]:
    """(unet folder, scheduler folder) of a pipeline or bare-UNet folder."""
    if (root / "unet" / "config.json").is_file():
        unet_dir = root / "unet"
    elif (root / "config.json").is_file() and (root / WEIGHTS_FILE).is_file():
        unet_dir = root
    else:
        kind = folder_kind(root) if root.is_dir() else None
        what = f"; it is {describe(kind)}" if kind else ""
        raise AmbientInputError(f"{flag} {root}: not a diffusers folder (no unet/config.json, "
                                f"and no config.json + {WEIGHTS_FILE}){what}")
    if not (unet_dir / WEIGHTS_FILE).is_file():
        raise AmbientInputError(f"{flag} {unet_dir}: no {WEIGHTS_FILE} (only safetensors weights are loaded)")
    for cand in (root / "scheduler", unet_dir / "scheduler", unet_dir, root):
        if (cand / SCHEDULER_FILE).is_file():
            return unet_dir, cand
    raise AmbientInputError(f"{flag} {root}: no scheduler config (scheduler/{SCHEDULER_FILE} "
                            f"or {SCHEDULER_FILE} beside the UNet)")


def load_embedding(folders: list[Path], flag: str) -> torch.Tensor | None:
    from safetensors.torch import load_file

    for folder in folders:
        path = folder / EMBEDDING_FILE
        if path.is_file():
            try:
                tensors = load_file(str(path))
            except Exception as exc:  # safetensors raises its own error type
                raise AmbientInputError(f"{flag} {path}: not a valid safetensors file ({exc})") from None
            if "embedding" not in tensors:
                raise AmbientInputError(f"{flag} {path}: no tensor named 'embedding'")
            emb = tensors["embedding"].to(torch.float32)
            emb = emb[None] if emb.ndim == 2 else emb
            if emb.ndim != 3 or emb.shape[0] != 1:
                raise AmbientInputError(f"{flag} {path}: embedding must be (L, D) or (1, L, D), "
                                        f"got {tuple(emb.shape)}")
            return emb
    return None


def _default_embedding(unet) -> torch.Tensor:
    cfg = unet.config
    dim = getattr(cfg, "encoder_hid_dim", None) or cfg.cross_attention_dim
    if isinstance(dim, (list, tuple)):
        dim = dim[0]
    return torch.zeros(1, 1, int(dim))


def _finish(unet, scheduler, embedding, source: str, flag: str) -> Pretrained:
    from diffusers import UNet2DConditionModel

    pred = str(scheduler.config.prediction_type)
    if pred not in PREDICTION_TYPES:
        raise AmbientInputError(f"{flag} {source}: prediction_type {pred!r} is not one of "
                                f"{', '.join(PREDICTION_TYPES)}")
    if getattr(unet.config, "num_class_embeds", None) or getattr(unet.config, "class_embed_type", None):
        raise AmbientInputError(f"{flag} {source}: class-conditional UNets are not supported")
    if isinstance(unet, UNet2DConditionModel):
        if getattr(unet.config, "addition_embed_type", None) not in (None, "text"):
            raise AmbientInputError(f"{flag} {source}: addition_embed_type "
                                    f"{unet.config.addition_embed_type!r} is not supported")
        embedding = embedding if embedding is not None else _default_embedding(unet)
    else:
        embedding = None
    if any(p.dtype != torch.float32 for p in unet.parameters()):
        unet.to(torch.float32)
    return Pretrained(unet, scheduler, embedding, source)


def load_pretrained(path_or_id: str | os.PathLike, *, flag: str = "--pretrained") -> Pretrained:
    """Load a UNet, its DDPM scheduler and fixed embedding (see the module doc for layouts)."""
    from diffusers import DDPMScheduler

    text = str(path_or_id)
    root = Path(text).expanduser()
    looks_like_id = not root.exists() and text.count("/") == 1 and not text.startswith((".", "/", "~"))
    if looks_like_id:
        return _load_hub(text, flag)
    if not root.is_dir():
        raise AmbientInputError(f"{flag} {text}: no such folder")
    unet_dir, sched_dir = _local_layout(root, flag)
    cfg = _read_json(unet_dir / "config.json", flag)
    cls = unet_class(str(cfg.get("_class_name", "UNet2DModel")))
    try:
        unet = cls.from_pretrained(str(unet_dir), use_safetensors=True, low_cpu_mem_usage=False)
        scheduler = DDPMScheduler.from_config(DDPMScheduler.load_config(str(sched_dir)))
    except (OSError, ValueError, RuntimeError, TypeError) as exc:
        raise AmbientInputError(f"{flag} {root}: cannot load ({' '.join(str(exc).split())[:200]})") from None
    embedding = load_embedding([root, unet_dir], flag)
    return _finish(unet, scheduler, embedding, str(root), flag)


def _load_hub(repo_id: str, flag: str) -> Pretrained:
    from diffusers import DDPMScheduler

    try:
        import diffusers

        cfg = diffusers.UNet2DModel.load_config(repo_id, subfolder="unet")
        cls = unet_class(str(cfg.get("_class_name", "UNet2DModel")))
        unet = cls.from_pretrained(repo_id, subfolder="unet", use_safetensors=True,
                                   low_cpu_mem_usage=False)
        scheduler = DDPMScheduler.from_pretrained(repo_id, subfolder="scheduler")
    except AmbientInputError:
        raise
    except Exception as exc:  # network, missing repo, missing files: all one line for the user
        raise AmbientInputError(f"{flag} {repo_id}: no such local folder, and loading it from the "
                                f"Hugging Face hub failed ({type(exc).__name__})") from None
    return _finish(unet, scheduler, None, repo_id, flag)


def image_channels(unet) -> int:
    """Image channels C the pretrained UNet was trained on (its input before any surgery)."""
    return int(unet.config.in_channels)


def add_mask_channels(unet, img_channels: int) -> None:
    """Widen ``conv_in`` in place to take [image, mask]: the new weights are zero, so the
    network's output is unchanged until training moves them; ``in_channels`` in its config follows."""
    conv = unet.conv_in
    if conv.in_channels != img_channels:
        raise ValueError(f"unet already has {conv.in_channels} input channels, expected {img_channels}")
    new = nn.Conv2d(2 * img_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode)
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, :img_channels].copy_(conv.weight)
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    unet.conv_in = new.to(conv.weight.device, conv.weight.dtype)
    unet.register_to_config(in_channels=2 * img_channels)


class MaskedUNet(nn.Module):
    """A diffusers UNet called as ``net(x_in, timesteps, mask) -> raw prediction`` (N, C, H, W).

    ``x_in`` is the masked network input Ã ⊙ x_t. With ``mask_mode="channels"`` the mask is
    concatenated as extra input channels (the UNet must have 2C inputs); with ``"input"`` the
    UNet sees only ``x_in``. Learned-variance outputs (2C channels) are cut to the first C.
    """

    def __init__(self, unet: nn.Module, img_channels: int, mask_mode: str,
                 embedding: torch.Tensor | None = None):
        super().__init__()
        if mask_mode not in MASK_MODES:
            raise ValueError(f"mask_mode must be one of {MASK_MODES}, got {mask_mode!r}")
        expected = img_channels * (2 if mask_mode == "channels" else 1)
        if int(unet.config.in_channels) != expected:
            raise ValueError(f"unet has {unet.config.in_channels} input channels; mask_mode={mask_mode!r} "
                             f"with {img_channels} image channels needs {expected}")
        self.unet = unet
        self.img_channels = int(img_channels)
        self.mask_mode = mask_mode
        self.register_buffer("embedding", None if embedding is None else embedding.clone(), persistent=False)
        levels = len(unet.config.block_out_channels)
        self.multiple = 2 ** (levels - 1)

    def forward(self, x_in: torch.Tensor, timesteps: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        n = x_in.shape[0]
        net_in = x_in
        if self.mask_mode == "channels":
            net_in = torch.cat([x_in, torch.ones_like(x_in) if mask is None else mask.to(x_in.dtype)], dim=1)
        t = torch.as_tensor(timesteps, device=x_in.device).reshape(-1).expand(n)
        if self.embedding is not None:
            emb = self.embedding.to(x_in.dtype).expand(n, -1, -1)
            out = self.unet(net_in, t, encoder_hidden_states=emb).sample
        else:
            out = self.unet(net_in, t).sample
        return out[:, : self.img_channels].to(x_in.dtype)
