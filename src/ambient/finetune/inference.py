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
  ``sampling`` (the mask law, as :class:`ambient.model.SamplingSpec` stores it). Written last.

σ ↔ timestep. Images in [−1, 1]; x = x0 + σn with σ = √((1−ᾱ)/ᾱ), so the UNet's input is
x_t = x/√(1+σ²) and ᾱ = 1/(1+σ²) is used exactly in the x0 formula. Only the timestep fed to
the UNet's embedding is approximated: ``timestep_mode="interpolate"`` (default) gives the
fractional t at which log σ_t, linear between neighbouring integer timesteps, equals log σ;
``"nearest"`` the integer t with the closest log σ_t. Both clamp to [0, T−1] and agree on the
model's own σ_t, which :meth:`FinetunedDenoiser.sampling_sigmas` returns. The conversions live in
one object, :class:`ambient.finetune.schedule.DDPMSchedule`, shared with the finetuning loss.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ambient import __version__
from ambient.corruption import Corruption
from ambient.denoiser import MaskDenoiser
from ambient.errors import AmbientInputError
from ambient.finetune.config import TIMESTEP_MODES
from ambient.finetune.objective import HIDDEN_X0, x0_from_output
from ambient.finetune.pretrained import EMBEDDING_FILE, MaskedUNet, load_embedding, unet_class
from ambient.finetune.schedule import SPACINGS, DDPMSchedule, alpha_bar_from_sigma, alphas_cumprod
from ambient.folders import FINETUNE_RUN, stamped
from ambient.io import atomic_write_json
from ambient.statedict import check_finite

__all__ = ["KIND", "SPACINGS", "FinetunedDenoiser", "export_finetuned", "load_finetuned"]
KIND = FINETUNE_RUN  # the kind recorded in the exported config.json (ambient.folders)


class FinetunedDenoiser(MaskDenoiser):
    """``D(x, sigma, mask=None) -> x0`` around a DDPM-parameterised UNet (see the module doc).

    Args:
        net: the UNet wrapper (mask channels or not, fixed embedding).
        alphas_cumprod: ᾱ_t of the model's scheduler, t = 0..T−1 (decreasing).
        prediction_type: ``epsilon``, ``v_prediction`` or ``sample``.
        hidden_x0: rule at pixels with mask 0 (``direct``: raw output; ``formula``).
        timestep_mode: ``interpolate`` or ``nearest``.
        corruption, data_survival: the mask law of the finetuning data, for the sampler.

    Its σ range is that of its timesteps, and :meth:`schedule` is :meth:`sampling_sigmas`.
    """

    sigma_dtype = torch.float64

    def __init__(self, net: MaskedUNet, alphas_cumprod: torch.Tensor, prediction_type: str,
                 hidden_x0: str = "direct", timestep_mode: str = "interpolate",
                 corruption: Corruption | None = None, data_survival: float | None = None):
        super().__init__()
        if hidden_x0 not in HIDDEN_X0:
            raise ValueError(f"hidden_x0 must be one of {HIDDEN_X0}, got {hidden_x0!r}")
        if timestep_mode not in TIMESTEP_MODES:
            raise ValueError(f"timestep_mode must be one of {TIMESTEP_MODES}, got {timestep_mode!r}")
        self.net = net
        self.prediction_type = prediction_type
        self.hidden_x0 = hidden_x0
        self.timestep_mode = timestep_mode
        self.corruption = corruption
        self.data_survival = data_survival
        self.ddpm = DDPMSchedule(alphas_cumprod)  # σ ↔ timestep; its buffers follow the module's device

    @property
    def img_channels(self) -> int:
        return self.net.img_channels

    @property
    def sigma_min(self) -> float:
        return float(self.ddpm.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.ddpm.sigmas[-1])

    def schedule(self, num_steps: int) -> torch.Tensor:
        """The model's own σ's (:meth:`sampling_sigmas` with linear spacing)."""
        return self.sampling_sigmas(num_steps)

    @property
    def timestep_sigmas(self) -> torch.Tensor:
        """σ_t of every training timestep t = 0..T−1 (float64, increasing)."""
        return self.ddpm.sigmas

    def timestep_for_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        """The (fractional or nearest integer) timestep for each σ (:meth:`DDPMSchedule.sigma_to_t`)."""
        return self.ddpm.sigma_to_t(sigma, self.timestep_mode)

    def sampling_sigmas(self, num_steps: int, spacing: str = "linear", rho: float = 7.0) -> torch.Tensor:
        """The model's own decreasing σ's, ending in 0 (:meth:`DDPMSchedule.sampling_sigmas`)."""
        return self.ddpm.sampling_sigmas(num_steps, spacing, rho)

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        sigma = sigma.to(torch.float64)
        n = x.shape[0]
        a = alpha_bar_from_sigma(sigma).reshape(n, 1, 1, 1).to(torch.float32)
        x_in = x.to(torch.float32) * a.sqrt()
        if mask is not None:
            mask = mask.to(torch.float32)
            x_in = x_in * mask
        t = self.timestep_for_sigma(sigma)
        t = t.to(x.device, torch.long if self.timestep_mode == "nearest" else torch.float32)
        out = self.net(x_in, t, mask).to(torch.float32)
        return x0_from_output(out, x_in, a, self.prediction_type, mask, self.hidden_x0).to(x.dtype)


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
