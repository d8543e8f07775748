"""`ambient import`: the paper's released network pickles → an ambient model folder, nothing executed."""

from __future__ import annotations

import click


@click.command("import")
@click.option("--pkl", required=True, help="Network pickle: the reference's (state dict under 'ema') or EDM's.")
@click.option("--training-options", "--training_options", "training_options", default=None,
              help="The run's training_options.json (network_kwargs); else inferred from the weights.")
@click.option("--out", required=True, help="New model folder (config.json + model.safetensors).")
def import_command(pkl, training_options, out):
    """Import a reference / EDM checkpoint with a restricted unpickler (an allow-list of globals; embedded
    source code is never run). The folder works with sample, eval and neighbors like any trained model."""
    from ambient.importer import import_checkpoint

    path = import_checkpoint(pkl, out, training_options)
    click.echo(f"imported {pkl} -> {path}")


def register(group: click.Group) -> None:
    group.add_command(import_command)
