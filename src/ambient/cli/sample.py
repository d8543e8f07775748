"""`ambient sample`: images from a trained model (EMA weights by default)."""

from __future__ import annotations

from pathlib import Path

import click

from ambient.sampling.fixed_mask import CLIPS, SOLVERS


def parse_seeds(text: str, flag: str = "--seeds") -> list[int]:
    """The reference's seed lists: ``0-49999``, ``0,5,10-19`` (see :func:`ambient.sampling.generate.parse_int_list`)."""
    from ambient.sampling.generate import parse_int_list

    return parse_int_list(text, flag=flag)


@click.command("sample")
@click.option("--model", "--network", "model", required=True,
              help="Training outdir (its latest snapshot), a snapshot folder, or an imported model (ambient import); "
                   "or a k-space ambient run (ambient train on k-space measurements): its fixed-operator sampler "
                   "(one further operator per seed from the training law of Ã; --steps, --batch and the seeds only).")
@click.option("--num-images", "--num", "num", type=click.IntRange(min=1), default=None,
              help="Number of images (--num-images also works under torchrun, whose parser would read --num "
                   "as its own --numa-binding).")
@click.option("--out", "--outdir", "out", required=True,
              help="A folder (PNGs) or a .npz (key 'images', N×H×W×C uint8). A model trained on float or 16-bit "
                   "data also gives its samples in the data's units: the .npz holds 'images' float32 in those "
                   "units, 'value_range' and 'images_uint8'; a folder gets images_float.npz beside its PNGs.")
@click.option("--seed", type=int, default=None, help="First seed; image i uses seed+i.  [default: 0]")
@click.option("--seeds", "seeds_text", default=None,
              help="Seed list instead of --seed/--num: 0-49999 or 0,5,10-19; image i uses the i-th seed.")
@click.option("--steps", type=click.IntRange(min=1), default=18, show_default=True, help="Sampler steps.")
@click.option("--num-masks", "--num_masks", "num_masks", type=click.IntRange(min=1), default=1,
              show_default=True, help="Masks per sample whose predictions are averaged.")
@click.option("--guidance-scale", "--guidance_scale", "guidance_scale", type=click.FloatRange(min=0), default=0.0,
              show_default=True, help="Mask-agreement guidance (needs --num-masks >= 2).")
@click.option("--batch", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--solver", type=click.Choice(SOLVERS), default="heun", show_default=True)
@click.option("--clip", type=click.Choice(CLIPS), default="none", show_default=True,
              help="Clip each prediction: static to [-1, 1], dynamic (0.99 percentile).")
@click.option("--ema/--no-ema", default=True, show_default=True, help="Use the EMA weights.")
@click.option("--device", default="auto", show_default=True)
@click.option("--class", "class_idx", type=click.IntRange(min=0), default=None,
              help="Class-conditional models: every image of class K.")
@click.option("--classes", "classes_text", default=None,
              help="Class-conditional models: image i gets the (i mod n)-th class of this list (0-9, 0,3,5) or of "
                   "'all' classes.")
def sample_command(model, num, out, seed, seeds_text, steps, num_masks, guidance_scale, batch, solver, clip, ema,
                   device, class_idx, classes_text):
    """Generate images from a trained model with the ambient sampler."""
    from ambient.distributed import resolve_device
    from ambient.sampling.generate import (
        check_sample_out,
        resolve_classes,
        sample_classes,
        sample_distributed,
        seed_range,
        write_samples,
    )
    from ambient.store.models import load_model

    if seeds_text is not None:
        if num is not None or seed is not None:
            raise click.BadParameter("give either --seeds or --seed/--num-images, not both", param_hint="--seeds")
        seeds = parse_seeds(seeds_text)
    elif num is None:
        raise click.UsageError("Missing option '--num-images' (or give --seeds)")
    else:
        seeds = seed_range(seed or 0, num)
    if guidance_scale > 0 and num_masks < 2:
        raise click.BadParameter("needs --num-masks >= 2", param_hint="--guidance-scale")
    if class_idx is not None and classes_text is not None:
        raise click.BadParameter("give either --class or --classes, not both", param_hint="--class")
    check_sample_out(out)
    from ambient.learners import kspace_ambient

    if kspace_ambient.is_kspace_run(model):
        refuse_given(click.get_current_context(), ("num_masks", "guidance_scale", "solver", "clip", "ema", "class_idx",
                                                   "classes_text"), model, "sample", device)
        _sample_kspace(model, seeds, out, steps, batch)
        return
    dev = resolve_device(device)
    loaded = load_model(model, use_ema=ema, device=dev)
    classes = resolve_classes(loaded, class_idx, classes_text)
    kwargs = dict(batch=batch, num_steps=steps, num_masks=num_masks, guidance_scale=guidance_scale, solver=solver,
                  clip=clip, device=dev, progress=True)
    images = (sample_classes(loaded, seeds, classes, sample_distributed, **kwargs) if classes
              else sample_distributed(loaded, seeds, **kwargs))
    if images is not None:
        value_range = loaded.value_range if loaded.float_data else None
        path = write_samples(Path(out), images, value_range=value_range)
        units = "" if value_range is None else (f" (float32 in the training data's units, "
                                                f"{value_range[0]:g}..{value_range[1]:g} ↔ [-1, 1])")
        click.echo(f"wrote {len(seeds)} images to {path}{units}")


def refuse_given(ctx: click.Context, names, model: str, command: str, device: str) -> None:
    """For a k-space ambient --model: a one-line error naming the first of ``names`` the user typed (those options
    do not apply to its sampler / restore), or a --device other than cpu / auto (it runs on the CPU)."""
    from ambient.configbase import flag_error
    from ambient.learners.kspace_ambient import DEVICES

    for name in names:
        if ctx.get_parameter_source(name) not in (None, click.core.ParameterSource.DEFAULT):
            how = {"sample": "its fixed-operator Heun sampler", "restore": "its one-step posterior mean + data "
                                                                                       "consistency"}[command]
            raise flag_error(next(p.opts[0] for p in ctx.command.params if p.name == name),
                             f"does not apply to a k-space ambient model (--model {model}: ambient {command} uses "
                             f"{how}); leave it out")
    if device not in DEVICES:
        raise flag_error("device", f"--model {model} is a k-space ambient run, which runs on the CPU; give --device "
                                   f"cpu or auto, got {device!r}")


def _sample_kspace(model: str, seeds: list[int], out: str, steps: int, batch: int) -> None:
    from ambient.learners.kspace_ambient import load_kspace_ambient
    from ambient.sampling.fixed_operator import kspace_ambient_sample
    from ambient.sampling.generate import write_samples

    m = load_kspace_ambient(model)
    images = kspace_ambient_sample(m.denoiser, m.masks, m.delta, m.keep, seeds, m.image_shape, num_steps=steps,
                                   batch=batch)
    path = write_samples(Path(out), images, value_range=m.value_range)  # measurements are float data
    lo, hi = m.value_range
    click.echo(f"wrote {len(seeds)} images to {path} (float32 in the training data's units, {lo:g}..{hi:g} ↔ "
               "[-1, 1])")


def register(group: click.Group) -> None:
    group.add_command(sample_command)
