"""`ambient finetune`: finetune a pretrained diffusers UNet with the ambient objective (thin)."""

from __future__ import annotations

import json

import click

from ambient.data.corruption import PATTERNS


@click.command("finetune")
@click.option("--pretrained", required=True,
              help="Diffusers pipeline folder (unet/ + scheduler/), bare UNet folder with a scheduler "
                   "config, or a hub id owner/name (online).")
@click.option("--data", required=True, help="Images: folder, EDM .zip, .npz or builtin:NAME.")
@click.option("--outdir", required=True, type=click.Path(file_okay=False),
              help="Snapshots, stats.jsonl and the exported diffusers folder go here.")
@click.option("--corruption-pattern", type=click.Choice(PATTERNS), default="dust", show_default=True)
@click.option("--corruption-probability", type=float, default=0.0, show_default=True,
              help="p in [0, 1): what the mask A hides (see ambient.data.corruption).")
@click.option("--delta-probability", type=float, default=0.0, show_default=True,
              help="δ in [0, 1): what the further mask Ã hides on top of A.")
@click.option("--mask-full-rgb/--no-mask-full-rgb", default=None,
              help="One mask draw per pixel for all its channels (Ã, the sampler's masks, drawn dust A). "
                   "Default: as the data's masks (per pixel when they agree across channels), else per channel.")
@click.option("--mask-mode", type=click.Choice(["channels", "input"]), default="channels", show_default=True,
              help="channels: mask as extra zero-initialised input channels; input: it only zeroes "
                   "the input.")
@click.option("--hidden-x0", type=click.Choice(["direct", "formula"]), default="direct", show_default=True,
              help="x0 at hidden pixels: the raw output (direct) or the ε/v formula.")
@click.option("--loss-weight", type=click.Choice(["min-snr", "x0"]), default="min-snr", show_default=True,
              help="Weight over timesteps: min(SNR, gamma) or none (plain x0 error, the seed's).")
@click.option("--snr-gamma", type=float, default=5.0, show_default=True, help="gamma of --loss-weight min-snr.")
@click.option("--timestep-mode", type=click.Choice(["interpolate", "nearest"]), default="interpolate",
              show_default=True, help="σ → timestep when sampling the result.")
@click.option("--lr", type=float, default=1e-4, show_default=True)
@click.option("--steps", type=int, default=1000, show_default=True,
              help="Optimizer steps (total, on resume too).")
@click.option("--batch", type=int, default=16, show_default=True, help="Images per micro-batch.")
@click.option("--grad-accum", type=int, default=1, show_default=True,
              help="Micro-batches per optimizer step.")
@click.option("--ema", type=float, default=0.999, show_default=True, help="EMA decay per step; 0 = off.")
@click.option("--grad-clip", type=float, default=1.0, show_default=True, help="Gradient-norm clip; 0 = off.")
@click.option("--xflip", type=float, default=0.0, show_default=True, help="Left-right flip probability.")
@click.option("--max-size", type=int, default=None, help="Use only the first N images.")
@click.option("--data-dir", default=None, help="Where builtin datasets and relative paths are looked up.")
@click.option("--resolution", type=int, default=None, help="Resize images to this square side.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--snapshot-every", type=int, default=500, show_default=True)
@click.option("--log-every", type=int, default=10, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1, ...")
@click.option("--resume/--no-resume", default=True, show_default=True,
              help="Continue from the latest snapshot in --outdir.")
@click.option("--dry-run", is_flag=True, help="Print the resolved options as JSON and exit.")
def finetune_command(dry_run: bool, **options) -> None:
    """Finetune a pretrained pixel-space diffusion model on corrupted data (see docs/finetune.md).

    The result in --outdir is a diffusers folder (unet/, scheduler/) plus config.json with
    "kind": "finetune", which `ambient sample --model OUTDIR` and
    ambient.store.finetune_export.load_finetuned read.
    """
    from ambient.learners.finetune import finetune
    from ambient.learners.finetune_config import FinetuneConfig

    config = FinetuneConfig(**options).validate()
    if dry_run:
        click.echo(json.dumps(config.to_dict(), indent=2))
        return
    out = finetune(config, log=click.echo)
    click.echo(f"done: {out}")


def register(group: click.Group) -> None:
    group.add_command(finetune_command)
