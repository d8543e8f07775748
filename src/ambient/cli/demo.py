"""`ambient demo`: a naive and an ambient model on the same corrupted images, side by side (ambient.learners.demo)."""

from __future__ import annotations

import click

from ambient.learners.demo import DEFAULT_DATA, MAX_REF, MAX_SAMPLES, DemoConfig

_D = DemoConfig()


@click.command("demo")
@click.option("--outdir", default=_D.outdir, show_default=True,
              help="Where the two runs (naive/, ambient/), demo.png and demo.json go.")
@click.option("--data", default=DEFAULT_DATA, show_default=True,
              help="Dataset (without Fashion-MNIST installed: builtin:digits, with a notice).")
@click.option("--data-dir", "--data_dir", "data_dir", default=None, help="Folder with Fashion-MNIST's idx files.")
@click.option("--corruption-probability", "--corruption_probability", "p", type=float,
              default=_D.corruption_probability, show_default=True, help="Share of pixels hidden per image.")
@click.option("--delta-probability", "--delta_probability", "delta", type=float, default=_D.delta_probability,
              show_default=True, help="Further corruption of the ambient objective.")
@click.option("--kimg", type=float, default=_D.kimg, show_default=True,
              help="Training images in thousands, for each of the two models.")
@click.option("--arch", default=_D.arch, show_default=True)
@click.option("--seed", type=int, default=_D.seed, show_default=True)
@click.option("--num-samples", "num_samples", type=int, default=_D.num_samples, show_default=True,
              help=f"Samples per model for KID (the first 64 are shown); at most {MAX_SAMPLES}.")
@click.option("--num-ref", "num_ref", type=int, default=_D.num_ref, show_default=True,
              help=f"Held-out clean images KID compares against; 0: no KID; at most {MAX_REF}.")
@click.option("--progress/--no-progress", default=True)
def demo_command(outdir, data, data_dir, p, delta, kimg, arch, seed, num_samples, num_ref, progress):
    """Train a naive and an ambient model on the same corrupted images; write demo.png and print their KIDs."""
    from ambient.learners.demo import run_demo

    cfg = DemoConfig(outdir=outdir, data=data, data_dir=data_dir, corruption_probability=p, delta_probability=delta,
                     kimg=kimg, arch=arch, seed=seed, num_samples=num_samples, num_ref=num_ref)
    run_demo(cfg, progress=progress, log=lambda m: click.echo(m, err=True), echo=click.echo)


def register(group: click.Group) -> None:
    group.add_command(demo_command)
