"""`ambient import`: the paper's released network pickles → an ambient model folder, nothing executed."""

from __future__ import annotations

import click

from ambient.data.corruption import PATTERNS


@click.command("import")
@click.option("--pkl", required=True, help="Network pickle: the reference's (state dict under 'ema') or EDM's.")
@click.option("--training-options", "--training_options", "training_options", default=None,
              help="The run's training_options.json (network_kwargs); else inferred from the weights.")
@click.option("--out", required=True, help="New model folder (config.json + model.safetensors).")
@click.option("--corruption-probability", "--corruption_probability", "corruption_probability", type=float,
              default=None, help="p of the training data, for the sampler's masks (default: the checkpoint's).")
@click.option("--delta-probability", "--delta_probability", "delta_probability", type=float, default=None,
              help="δ of the training run (default: the checkpoint's).")
@click.option("--corruption-pattern", "--corruption_pattern", "corruption_pattern", type=click.Choice(PATTERNS),
              default=None, help="Mask family (default: the checkpoint's, else dust).")
@click.option("--mask-full-rgb/--no-mask-full-rgb", "--mask_full_rgb/--no_mask_full_rgb", "mask_full_rgb",
              default=None, help="One mask draw per pixel for all channels (default: the checkpoint's).")
def import_command(pkl, training_options, out, **corruption):
    """Import a reference / EDM checkpoint with a restricted unpickler (an allow-list of globals; embedded
    source code is never run). The folder works with sample, eval and neighbors like any trained model."""
    from ambient.store.importer import import_checkpoint
    from ambient.store.models import load_model

    path = import_checkpoint(pkl, out, training_options, corruption)
    spec = load_model(path).sampling
    c = spec.corruption
    click.echo(f"imported {pkl} -> {path} (sampler masks: {c.pattern}, p={c.p}, delta={c.delta}, "
               f"mask_full_rgb={c.mask_full_rgb})")
    if not spec.uses_masks:
        click.echo("note: the checkpoint records no corruption_probability / delta_probability, so the sampler "
                   "will show the network every pixel; for a model trained on corrupted data, import again with "
                   "--corruption-probability and --delta-probability as it was trained", err=True)


def register(group: click.Group) -> None:
    group.add_command(import_command)
