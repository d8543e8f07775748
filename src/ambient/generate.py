"""Generate images from a trained model and write them (``ambient sample`` calls this).

Under torchrun each rank draws its share of the seeds; rank 0 gathers and writes. Because each
sample depends only on its seed, the images do not depend on the number of ranks or the batch.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
import torch.distributed as dist

from ambient import distributed as dist_utils
from ambient.images import float_to_uint8, save_grid, save_images_folder, save_images_npz
from ambient.io import atomic_folder
from ambient.model import LoadedModel
from ambient.sampling import iter_sample_batches, model_sigmas


def sample_model(loaded: LoadedModel, seeds: list[int], *, batch: int = 64, num_steps: int = 18,
                 num_masks: int = 1, guidance_scale: float = 0.0, solver: str = "heun", clip: str = "none",
                 churn: float = 0.0, device: str | torch.device = "cpu", progress: bool = False) -> torch.Tensor:
    """Images in [-1, 1], (len(seeds), C, H, W), one per seed, with the model's own mask law."""
    spec = loaded.sampling
    kwargs = spec.sampler_kwargs()
    kwargs["sigmas"] = model_sigmas(loaded.denoiser, num_steps)  # own σ's (finetuned DDPM), else EDM's
    shape = loaded.image_shape
    batches = iter_sample_batches(loaded.denoiser, len(seeds), seeds, batch, image_shape=shape,
                                  num_steps=num_steps, num_masks=num_masks, guidance_scale=guidance_scale,
                                  solver=solver, clip=clip, churn=churn, device=device, **kwargs)
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, total=-(-len(seeds) // batch), unit="batch", desc="sampling")
    out = [images.cpu() for _, images in batches]
    return torch.cat(out) if out else torch.empty((0, *shape))


def sample_distributed(loaded: LoadedModel, seeds: list[int], **kwargs) -> torch.Tensor | None:
    """Like :func:`sample_model` under torchrun: every rank samples its share; rank 0 gets all, in seed order."""
    env = dist_utils.init_from_env(str(kwargs.get("device", "auto")))
    if env.world_size == 1:
        return sample_model(loaded, seeds, **kwargs)
    kwargs["device"] = env.device
    kwargs["progress"] = kwargs.get("progress", False) and env.rank == 0
    loaded.denoiser.to(env.device)
    mine = dist_utils.shard(list(range(len(seeds))), env)
    images = sample_model(loaded, [seeds[i] for i in mine], **kwargs).cpu()
    gathered = [None] * env.world_size if env.rank == 0 else None
    dist.gather_object((mine, images), gathered, dst=0)
    if env.rank != 0:
        return None
    out = torch.empty((len(seeds), *images.shape[1:]))
    for idx, imgs in gathered:
        out[idx] = imgs
    return out


def grid_path_for(out: Path) -> Path:
    return out.with_name(out.stem + "_grid.png") if out.suffix == ".npz" else out.with_name(out.name + "_grid.png")


def write_samples(out: str | os.PathLike, images: torch.Tensor) -> Path:
    """Write uint8 images to ``out`` (.npz → key ``images`` (N,H,W,C); else a folder of PNGs) and a grid
    PNG beside it. Nothing is left half-written: the npz is renamed into place, the folder is built
    under a temporary name and renamed."""
    out = Path(out)
    u8 = float_to_uint8(images)
    if out.suffix == ".npz":
        save_images_npz(out, u8)
    else:
        with atomic_folder(out, flag="--out") as tmp:
            save_images_folder(tmp, u8)
    if len(u8):
        save_grid(grid_path_for(out), u8[:64], nrow=max(1, math.ceil(math.sqrt(min(len(u8), 64)))), padding=1)
    return out
