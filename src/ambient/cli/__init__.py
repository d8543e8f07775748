"""Command-line interface: `ambient <command>`. Thin: parse flags, call the library.

Every subcommand lives in its own module of this package; this file only builds the
group and turns user errors into one line on stderr with exit code 2.
"""

from __future__ import annotations

import os
import sys

import click

from ambient import __version__
from ambient.errors import TrainingDiverged

EXIT_USAGE = 2


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="ambient")
def cli() -> None:
    """Train diffusion models on corrupted data only (Ambient Diffusion)."""


def _register() -> None:
    import importlib

    for name in ("train", "sample", "demo", "eval", "neighbors", "finetune", "importer", "restore", "em"):
        try:
            module = importlib.import_module(f"ambient.cli.{name}")
        except ModuleNotFoundError as exc:  # a command whose module is not written yet
            if exc.name == f"ambient.cli.{name}":
                continue
            raise
        module.register(cli)


_register()


def _one_line(message: str) -> str:
    return " ".join(str(message).split())


def main(argv: list[str] | None = None) -> None:
    """Entry point of the console script; returns only through sys.exit."""
    debug = os.environ.get("AMBIENT_DEBUG", "") not in ("", "0")
    try:
        rv = cli.main(args=argv, prog_name="ambient", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("error: aborted", err=True)
        sys.exit(130)
    except click.exceptions.UsageError as exc:  # unknown flag, missing option, bad choice
        click.echo(f"error: {_one_line(exc.format_message())}", err=True)
        sys.exit(EXIT_USAGE)
    except click.exceptions.ClickException as exc:
        click.echo(f"error: {_one_line(exc.format_message())}", err=True)
        sys.exit(exc.exit_code or EXIT_USAGE)
    except TrainingDiverged as exc:
        click.echo(f"error: {_one_line(str(exc))}", err=True)
        sys.exit(1)
    except (ValueError, OSError) as exc:
        if debug:
            raise
        click.echo(f"error: {_one_line(str(exc))}", err=True)
        sys.exit(EXIT_USAGE)
    sys.exit(rv if isinstance(rv, int) else 0)
