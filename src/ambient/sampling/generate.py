"""Generate images from a trained model and write them (``ambient sample`` calls this).

Under torchrun each rank draws its share of the seeds; rank 0 gathers and writes. Because each
sample depends only on its seed, the images do not depend on the number of ranks or the batch.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from ambient import distributed as dist_utils
from ambient.data.images import (
    float_to_uint8,
    save_float_images_npz,
    save_grid,
    save_images_folder,
    save_images_npz,
)
from ambient.errors import AmbientInputError
from ambient.folders import check_not_a_run_file, describe, folder_kind
from ambient.io import atomic_folder
from ambient.nets.conditional import LabelledDenoiser, one_hot
from ambient.sampling.fixed_mask import iter_sample_batches, model_sigmas
from ambient.store.models import LoadedModel


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


MAX_SEED = 2**63 - 1  # seeds are mixed as 64-bit integers (ambient.rng.mix_seed): larger ones would wrap
MAX_IMAGES = 10_000_000  # images per call: a longer seed list is refused before it is built


def parse_int_list(text: str, *, flag: str, noun: str = "seed", max_value: int = MAX_SEED,
                   max_count: int = MAX_IMAGES) -> list[int]:
    """The reference's seed lists: ``0-49999``, ``0,5,10-19`` (ranges inclusive), in the order given.

    Every value must lie in 0..``max_value`` and the list may hold at most ``max_count`` values; both are
    checked before the list is built. Errors quote ``flag`` and the part of ``text`` as given (one line).
    """
    spans, total = [], 0
    for raw in str(text).split(","):
        part = raw.strip()
        shown = part if len(part) <= 60 else part[:57] + "..."
        lo, dash, hi = part.partition("-")
        if not all(v.isascii() and v.isdigit() and len(v) <= 30 for v in ((lo, hi) if dash else (lo,))):
            raise AmbientInputError(f"{flag} {shown!r}: not a {noun} or a range a-b (e.g. 0-49999 or 0,5,10-19)")
        a, b = int(lo), int(hi if dash else lo)
        if b < a:
            raise AmbientInputError(f"{flag} {shown!r}: the range ends before it starts")
        if b > max_value:
            raise AmbientInputError(f"{flag} {shown!r}: {noun} values must be in 0..{max_value}")
        total += b - a + 1
        if total > max_count:
            raise AmbientInputError(f"{flag}: more than {max_count} values (at {shown!r}); split the call")
        spans.append((a, b))
    return [v for a, b in spans for v in range(a, b + 1)]


def seed_range(first: int, num: int, *, flag: str = "--seed") -> list[int]:
    """Seeds ``first .. first + num - 1``, checked like :func:`parse_int_list` before the list is built."""
    if num > MAX_IMAGES:
        raise AmbientInputError(f"--num-images {num}: more than {MAX_IMAGES} images; split the call")
    if first < 0 or first + num - 1 > MAX_SEED:
        raise AmbientInputError(f"{flag} {first}: seeds must be in 0..{MAX_SEED} (with --num-images {num})")
    return list(range(first, first + num))


def check_sample_out(out: str | os.PathLike) -> Path:
    """Refuse, before sampling, an ``--out`` that :func:`write_samples` could not write (one line)."""
    out = Path(out)
    if out.suffix == ".npz":
        if out.is_dir():
            raise AmbientInputError(f"--out {out}: is a folder, not a .npz file")
        check_not_a_run_file(out)
        return out
    if out.exists() and not out.is_dir():
        raise AmbientInputError(f"--out {out}: is an existing file; give a new folder (PNGs) or a .npz path")
    if out.is_dir() and any(out.iterdir()):
        kind = folder_kind(out)
        what = f" (it is {describe(kind)})" if kind else ""
        raise AmbientInputError(f"--out {out}: folder exists and is not empty{what}; give a new or empty folder")
    return out


def sample_distributed(loaded: LoadedModel, seeds: list[int], **kwargs) -> torch.Tensor | None:
    """Like :func:`sample_model` under torchrun: every rank samples its share; rank 0 gets all, in seed order."""
    env = dist_utils.init_from_env(str(kwargs.get("device", "auto")))
    if env.world_size == 1:
        return sample_model(loaded, seeds, **kwargs)
    kwargs["device"] = env.device
    kwargs["progress"] = kwargs.get("progress", False) and env.rank == 0
    loaded.denoiser.to(env.device)
    gathered = dist_utils.shard_and_gather(
        len(seeds), lambda mine: (sample_model(loaded, [seeds[i] for i in mine], **kwargs), None), env)
    return None if gathered is None else gathered[0]


def grid_path_for(out: Path) -> Path:
    return out.with_name(out.stem + "_grid.png") if out.suffix == ".npz" else out.with_name(out.name + "_grid.png")


FLOAT_NPZ = "images_float.npz"  # in a folder of samples of a model trained on float data


def write_samples(out: str | os.PathLike, images: torch.Tensor,
                  value_range: tuple[float, float] | None = None) -> Path:
    """Write images (model units) to ``out`` (.npz → key ``images`` (N,H,W,C) uint8; else a folder of PNGs) and
    a grid PNG beside it. Nothing is left half-written: the npz is renamed into place, the folder is built
    under a temporary name and renamed.

    With ``value_range`` (a model trained on non-uint8 data) the samples are also given in the data's own units
    (:func:`ambient.data.images.save_float_images_npz`): the .npz then holds ``images`` float32 (N,H,W,C) in those
    units, ``value_range`` and ``images_uint8`` (what it holds otherwise); a folder gets ``images_float.npz``
    beside its PNGs."""
    out = Path(out)
    u8 = float_to_uint8(images)
    if out.suffix == ".npz":
        if value_range is not None:
            save_float_images_npz(out, images, value_range)
        else:
            save_images_npz(out, u8)
    else:
        with atomic_folder(out, flag="--out") as tmp:
            save_images_folder(tmp, u8)
            if value_range is not None:
                save_float_images_npz(Path(tmp) / FLOAT_NPZ, images, value_range)
    if len(u8):
        save_grid(grid_path_for(out), u8[:64], nrow=max(1, math.ceil(math.sqrt(min(len(u8), 64)))), padding=1)
    return out


def model_label_dim(loaded) -> int:
    return int(getattr(loaded.model, "label_dim", 0) or 0) if loaded.model is not None else 0


def check_classes(loaded, classes: list[int] | None, flag: str = "--class") -> None:
    """Refuse unconditional sampling of a conditional model, and classes for an unconditional one."""
    label_dim = model_label_dim(loaded)
    if label_dim and not classes:
        raise AmbientInputError(f"--class: {loaded.path} is class-conditional ({label_dim} classes); give "
                                f"--class K (0..{label_dim - 1}) or --classes")
    if classes and not label_dim:
        raise AmbientInputError(f"{flag}: {loaded.path} is not class-conditional")
    bad = [c for c in classes or () if not 0 <= c < label_dim]
    if bad:
        raise AmbientInputError(f"{flag}: classes must be in 0..{label_dim - 1}, got {bad[0]}")


def resolve_classes(loaded, class_idx: int | None, classes_text: str | None) -> list[int] | None:
    """The classes asked by ``ambient sample --class K`` or ``--classes LIST|all`` for model ``loaded``,
    checked against it (None: unconditional sampling). Errors name the flag given."""
    if class_idx is not None and classes_text is not None:
        raise AmbientInputError("--class: give either --class or --classes, not both")
    label_dim = model_label_dim(loaded)
    if classes_text is None:
        classes = None if class_idx is None else [class_idx]
        check_classes(loaded, classes, "--class")
        return classes
    if not label_dim:
        raise AmbientInputError(f"--classes: {loaded.path} is not class-conditional")
    if str(classes_text).strip() == "all":
        return list(range(label_dim))
    return parse_int_list(classes_text, flag="--classes", noun="class", max_value=label_dim - 1)


def sample_classes(loaded, seeds: list[int], classes: list[int], sample_fn, **kwargs) -> torch.Tensor | None:
    """Images for ``seeds`` where seed i gets class ``classes[i % len(classes)]``, in seed order.

    ``sample_fn(loaded, seeds, **kwargs)`` is :func:`ambient.sampling.generate.sample_model` (or its
    distributed form); it is called once per class with the model's labels bound.
    """
    from dataclasses import replace

    label_dim = model_label_dim(loaded)
    per_seed = [classes[i % len(classes)] for i in range(len(seeds))]
    out = None
    for k in sorted(set(per_seed)):
        where = [i for i, c in enumerate(per_seed) if c == k]
        den = LabelledDenoiser(loaded.denoiser, one_hot([k], label_dim)).eval()
        images = sample_fn(replace(loaded, denoiser=den), [seeds[i] for i in where], **kwargs)
        if images is None:  # a torchrun rank other than 0
            continue
        if out is None:
            out = images.new_empty((len(seeds), *images.shape[1:]))
        out[where] = images
    return out
