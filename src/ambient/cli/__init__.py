"""Command-line interface: `ambient <command>`. Thin: parse flags, call the library.

Every subcommand lives in its own module of this package; this file only builds the
group and turns user errors into one line on stderr with exit code 2.
"""

from __future__ import annotations

import copy
import math
import os
import sys

import click

from ambient import __version__
from ambient.errors import SamplingDiverged, TrainingDiverged

EXIT_USAGE = 2


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="ambient")
def cli() -> None:
    """Train diffusion models on corrupted data only (Ambient Diffusion)."""


def _register() -> None:
    import importlib

    for name in ("train", "sample", "demo", "eval", "neighbors", "finetune", "importer", "restore", "em", "measure"):
        try:
            module = importlib.import_module(f"ambient.cli.{name}")
        except ModuleNotFoundError as exc:  # a command whose module is not written yet
            if exc.name == f"ambient.cli.{name}":
                continue
            raise
        module.register(cli)


_register()

INT64_MAX = 2**63 - 1
FLOAT32_MAX = 3.4028234663852886e38


def _bounded(param_type: click.ParamType) -> click.ParamType:
    """A copy of an int or float option type that also refuses numbers no tensor can hold (an int beyond 64
    bits, a finite float beyond float32), naming the flag, before they reach torch as an OverflowError.
    Infinities and NaN pass through to the configs' own checks, which say what the option allows."""
    bounded = copy.copy(param_type)  # click.INT and click.FLOAT are shared: change a copy
    convert = bounded.convert

    def checked(value, param, ctx):
        value = convert(value, param, ctx)
        if isinstance(value, int) and not isinstance(value, bool) and not -INT64_MAX - 1 <= value <= INT64_MAX:
            bounded.fail(f"{value} does not fit in a 64-bit integer", param, ctx)
        if isinstance(value, float) and math.isfinite(value) and abs(value) > FLOAT32_MAX:
            bounded.fail(f"{value:g} is out of range (at most {FLOAT32_MAX:.4g} in magnitude)", param, ctx)
        return value

    bounded.convert = checked
    return bounded


def _bound_numbers(group: click.Group) -> None:
    """Every int/float option of every command gets the bounds of _bounded."""
    for command in group.commands.values():
        if isinstance(command, click.Group):
            _bound_numbers(command)
            continue
        for param in command.params:
            if isinstance(param.type, (click.types.IntParamType, click.types.FloatParamType)):
                param.type = _bounded(param.type)


_bound_numbers(cli)


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
    except (TrainingDiverged, SamplingDiverged) as exc:
        click.echo(f"error: {_one_line(str(exc))}", err=True)
        sys.exit(1)
    except (ValueError, OSError) as exc:
        if debug:
            raise
        click.echo(f"error: {_one_line(str(exc))}", err=True)
        sys.exit(EXIT_USAGE)
    sys.exit(rv if isinstance(rv, int) else 0)
