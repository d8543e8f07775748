"""Running the CLI in-process in tests: exit code, stdout and stderr of ``ambient <argv>``."""

from pathlib import Path

import pytest

from ambient.cli import main

FIXTURES = Path(__file__).parents[2] / "shared" / "fixtures" / "reference-checkpoints"


def run(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    captured = capsys.readouterr()
    return exc.value.code, captured.out, captured.err
