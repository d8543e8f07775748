"""`ambient sample`: images from a trained model (EMA weights by default)."""

from __future__ import annotations

from pathlib import Path

import click

from ambient.sampling import CLIPS, SOLVERS


@click.command("sample")
@click.option("--model", "model", required=True, help="Training outdir (its latest snapshot) or a snapshot folder.")
@click.option("--num-images", "--num", "num", type=click.IntRange(min=1), required=True,
              help="Number of images (--num-images also works under torchrun, whose parser would read --num "
                   "as its own --numa-binding).")
@click.option("--out", required=True, help="A folder (PNGs) or a .npz (key 'images', N×H×W×C uint8).")
@click.option("--seed", type=int, default=0, show_default=True, help="First seed; image i uses seed+i.")
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
def sample_command(model, num, out, seed, steps, num_masks, guidance_scale, batch, solver, clip, ema, device):
    """Generate images from a trained model with the ambient sampler."""
    import torch

    from ambient.generate import sample_distributed, write_samples
    from ambient.model import load_model

    if guidance_scale > 0 and num_masks < 2:
        raise click.BadParameter("needs --num-masks >= 2", param_hint="--guidance-scale")
    dev = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    loaded = load_model(model, use_ema=ema, device=dev)
    seeds = list(range(seed, seed + num))
    images = sample_distributed(loaded, seeds, batch=batch, num_steps=steps, num_masks=num_masks,
                                guidance_scale=guidance_scale, solver=solver, clip=clip, device=dev,
                                progress=True)
    if images is not None:
        path = write_samples(Path(out), images)
        click.echo(f"wrote {num} images to {path}")


def register(group: click.Group) -> None:
    group.add_command(sample_command)
