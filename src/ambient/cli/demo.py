"""`ambient demo`: the main job on an embedded default, sized for a few minutes on a 2-core CPU.

Trains the `small` backbone with the ambient objective on Fashion-MNIST with 80% of the pixels
missing (each training image is only ever seen through its own fixed mask), then writes
`demo.png`: corrupted training images | generated images.

Where Fashion-MNIST is not installed (and no --data is given), the demo says so in one line and
uses scikit-learn's bundled 8×8 digits (1797 images, a dev dependency) upscaled to 28×28, so
that it runs anywhere; the figure is then of digits.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import click

DEFAULT_DATA = "builtin:fashion-mnist"
FALLBACK_DATA, FALLBACK_RESOLUTION = "builtin:digits", 28


def demo_data(data: str, data_dir: str | None) -> tuple[str, int | None, str | None]:
    """(data, resolution, notice): the default Fashion-MNIST if it can be found, else the fallback."""
    if data != DEFAULT_DATA:
        return data, None, None
    from ambient.errors import AmbientInputError
    from ambient.readers import fashion_mnist_dir

    try:
        fashion_mnist_dir("train", data_dir)
        return data, None, None
    except AmbientInputError:
        return FALLBACK_DATA, FALLBACK_RESOLUTION, (
            "notice: Fashion-MNIST not found (apt-get install dataset-fashion-mnist, or --data-dir); this demo "
            "uses scikit-learn's 8x8 digits (builtin:digits, 1797 images) upscaled to 28x28 instead")


@click.command("demo")
@click.option("--outdir", default="runs/demo", show_default=True, help="Where the run and demo.png go.")
@click.option("--data", default=DEFAULT_DATA, show_default=True,
              help="Dataset (without Fashion-MNIST installed: builtin:digits, with a notice).")
@click.option("--data-dir", "--data_dir", "data_dir", default=None, help="Folder with Fashion-MNIST's idx files.")
@click.option("--corruption-probability", "--corruption_probability", "p", type=float, default=0.8,
              show_default=True)
@click.option("--delta-probability", "--delta_probability", "delta", type=float, default=0.1, show_default=True)
@click.option("--kimg", type=float, default=16.0, show_default=True,
              help="Training images in thousands (about 4 minutes on 2 CPU cores at the default).")
@click.option("--arch", default="small", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--progress/--no-progress", default=True)
def demo_command(outdir, data, data_dir, p, delta, kimg, arch, seed, progress):
    """Train a small ambient model on corrupted Fashion-MNIST and write demo.png."""
    from ambient.config import TrainConfig
    from ambient.train import train

    data, resolution, notice = demo_data(data, data_dir)
    if notice:
        click.echo(notice, err=True)
    cfg = TrainConfig(data=data, data_dir=data_dir, resolution=resolution, outdir=outdir, corruption_probability=p,
                      delta_probability=delta,
                      arch=arch, batch=32, lr=2e-3, lr_warmup_kimg=1.0, kimg=kimg, ema=max(kimg / 16, 0.1),
                      snapshot_kimg=kimg, tick_kimg=max(kimg / 50, 0.05), grid_samples=64, seed=seed)
    train(cfg, progress=progress, log=lambda m: click.echo(m, err=True))
    grids = sorted(Path(outdir).glob("samples-*.png"))
    figure = Path(outdir) / "demo.png"
    shutil.copyfile(grids[-1], figure)
    click.echo(f"wrote {figure} (left: corrupted training images, right: generated images)")


def register(group: click.Group) -> None:
    group.add_command(demo_command)
