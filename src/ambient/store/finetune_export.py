"""A finetuned model in EDM's σ convention, and the folder it is exported to.

Exported folder (written by :func:`export_finetuned`, read by :func:`load_finetuned`):

* ``unet/``: the UNet, ``save_pretrained(safe_serialization=True)`` (loadable with
  ``UNet2DModel.from_pretrained(dir, subfolder="unet")``; with ``mask_mode="channels"`` its
  ``in_channels`` is 2C: image then mask);
* ``scheduler/``: the pretrained model's DDPM scheduler, unchanged;
* ``text_embedding.safetensors``: the fixed embedding (``UNet2DConditionModel`` only);
* ``model_index.json`` for a ``DDPMPipeline`` when the UNet is a plain ``UNet2DModel`` without
  mask channels (then ``DDPMPipeline.from_pretrained(dir)`` works too);
* ``config.json``: ours, ``"kind": "finetune"``, with ``model`` (how to call the UNet) and
  ``sampling`` (the mask law, as :class:`ambient.nets.registry.SamplingSpec` stores it). Written last.

σ ↔ timestep. Images in [−1, 1]; x = x0 + σn with σ = √((1−ᾱ)/ᾱ), so the UNet's input is
x_t = x/√(1+σ²) and ᾱ = 1/(1+σ²) is used exactly in the x0 formula. Only the timestep fed to
the UNet's embedding is approximated: ``timestep_mode="interpolate"`` (default) gives the
fractional t at which log σ_t, linear between neighbouring integer timesteps, equals log σ;
``"nearest"`` the integer t with the closest log σ_t. Both clamp to [0, T−1] and agree on the
model's own σ_t, which :meth:`FinetunedDenoiser.sampling_sigmas` returns. The conversions live in
one object, :class:`ambient.nets.schedules.DDPMSchedule`, shared with the finetuning loss.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ambient import __version__
from ambient.data.corruption import Corruption
from ambient.errors import AmbientInputError
from ambient.folders import FINETUNE_RUN, stamped
from ambient.io import atomic_write_json
from ambient.nets.ddpm_denoiser import FinetunedDenoiser
from ambient.nets.pretrained import EMBEDDING_FILE, MaskedUNet, load_embedding, unet_class
from ambient.nets.schedules import alphas_cumprod
from ambient.store.statedict import check_finite

KIND = FINETUNE_RUN  # the kind recorded in the exported config.json (ambient.folders)




def export_finetuned(outdir: str | os.PathLike, net: MaskedUNet, scheduler, config: dict) -> Path:
    """Write the diffusers folder + our ``config.json`` (``kind`` finetune); see the module doc."""
    from safetensors.torch import save_file

    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    net.unet.save_pretrained(str(out / "unet"), safe_serialization=True)
    scheduler.save_pretrained(str(out / "scheduler"))
    if net.embedding is not None:
        save_file({"embedding": net.embedding.detach().cpu().contiguous()}, str(out / EMBEDDING_FILE))
    if type(net.unet).__name__ == "UNet2DModel" and net.mask_mode == "input":
        import diffusers

        atomic_write_json(out / "model_index.json", {
            "_class_name": "DDPMPipeline", "_diffusers_version": diffusers.__version__,
            "scheduler": ["diffusers", type(scheduler).__name__], "unet": ["diffusers", "UNet2DModel"]})
    atomic_write_json(out / "config.json", stamped({**config, "ambient_version": __version__}, KIND))
    return out


def load_finetuned(path: str | os.PathLike, *, device: str | torch.device = "cpu",
                   timestep_mode: str | None = None) -> FinetunedDenoiser:
    """Load an exported finetune folder as a :class:`FinetunedDenoiser` in eval mode.

    ``timestep_mode`` overrides the one stored in ``config.json``.
    """
    from diffusers import DDPMScheduler

    root = Path(path)
    cfg_path = root / "config.json"
    if not cfg_path.is_file():
        raise AmbientInputError(f"--model {root}: no config.json (not a finetuned model folder)")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise AmbientInputError(f"{cfg_path}: cannot read JSON ({exc})") from None
    if not isinstance(cfg, dict) or cfg.get("kind") != KIND or "model" not in cfg:
        raise AmbientInputError(f"{cfg_path}: not a finetuned model (kind is not {KIND!r})")
    model = cfg["model"]
    try:
        cls = unet_class(model["unet_class"])
        unet = cls.from_pretrained(str(root / "unet"), use_safetensors=True, low_cpu_mem_usage=False)
        scheduler = DDPMScheduler.from_pretrained(str(root / "scheduler"))
        embedding = load_embedding([root], "--model")
        if cls.__name__ == "UNet2DConditionModel" and embedding is None:
            raise AmbientInputError(f"--model {root}: no {EMBEDDING_FILE} for its conditional UNet")
        net = MaskedUNet(unet, int(model["img_channels"]), model["mask_mode"], embedding)
        check_finite(unet.state_dict(), f"--model {root}")
        sampling = cfg.get("sampling") or {}
        corruption = Corruption.from_dict(sampling["corruption"]) if sampling.get("corruption") else None
        den = FinetunedDenoiser(net, alphas_cumprod(scheduler), model["prediction_type"], model["hidden_x0"],
                                timestep_mode or model.get("timestep_mode", "interpolate"),
                                corruption, sampling.get("data_survival"))
    except AmbientInputError:
        raise
    except (OSError, KeyError, TypeError, ValueError) as exc:
        raise AmbientInputError(f"--model {root}: cannot load ({' '.join(str(exc).split())[:200]})") from None
    return den.to(device).eval().requires_grad_(False)
