"""CLI fuzz suite: every command and option of `ambient`, read from the click definitions, with boundary and
garbage values (empty, negative, zero, huge, NaN, inf, wrong type, paths that are files, folders, missing,
under a file, or another command's folder) on tiny data. See tests/helpers_fuzz.py for the table and checks.

Invariants per case: exit 0 or 2; no exception escapes `ambient.cli.main`, no traceback on stderr; on exit 2
the last stderr line starts with `error:` and names the option or its value; a refusal leaves the case folder
(the working directory, holding any new --out/--outdir and copies of the folders the command was given)
byte-for-byte unchanged.

A fixed subset (a few cases per command, chosen by a hash of the case id) runs by default; the whole table is
marked slow (CI runs it: `./dev.sh test` runs every marker).

Before issue 22's fixes (commit 4836831), 101 of the 1737 cases failed: 2^64 or 1e308 gave an OverflowError
traceback, a hang or an error naming no flag (26); other errors named neither the flag nor the file (21);
sample --device gave tracebacks (19); em --device was refused after em wrote files (19); train, demo and finetune
--outdir and neighbors --out wrote into runs and imported models of other kinds, or crashed on them (13);
--seeds/--classes 0-999999999 gave MemoryError (2); em --init with a conditional model was refused after writing (1).
"""

from __future__ import annotations

import hashlib

import pytest

from tests.helpers_fuzz import BASE, Templates, all_cases, leaf_commands, run_case

CASES = all_cases()
PER_COMMAND_DEFAULT = 8

# Cases that fail because of a bug another item of issue 22 owns and whose fix has not landed yet.
KNOWN = {}
# Valid values whose real work is long whatever the data: not run.
SKIP = {"train:--compile=on": "torch.compile of the network takes minutes on a CPU"}


def _rank(case) -> str:
    return hashlib.sha1(case.id.encode()).hexdigest()


def _default_ids() -> set[str]:
    chosen = set()
    for command in BASE:
        mine = sorted((c for c in CASES if c.command == command), key=_rank)
        chosen.update(c.id for c in mine[:PER_COMMAND_DEFAULT])
    return chosen


DEFAULT = _default_ids()


def _param(case):
    marks = [] if case.id in DEFAULT else [pytest.mark.slow]
    if case.id in SKIP:
        marks.append(pytest.mark.skip(reason=SKIP[case.id]))
    if case.id in KNOWN:
        marks.append(pytest.mark.xfail(reason=KNOWN[case.id], strict=False))
    return pytest.param(case, id=case.id, marks=marks)


@pytest.fixture(scope="session")
def templates(tmp_path_factory):
    return Templates(tmp_path_factory.mktemp("fuzz-templates"))


@pytest.fixture(scope="session")
def feature_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz-cache")


@pytest.fixture
def scratch(tmp_path, feature_cache, monkeypatch):
    monkeypatch.setenv("AMBIENT_CACHE", str(feature_cache))  # never the user's cache
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # finetune --pretrained a/b is a hub id: never ask the network
    monkeypatch.delenv("AMBIENT_DATA", raising=False)
    return tmp_path


def test_every_command_has_a_base_command():
    """A new command must get a known-fast valid command line in helpers_fuzz.BASE to be fuzzed."""
    assert sorted(leaf_commands()) == sorted(BASE)


def test_the_table_is_fixed_and_covers_every_option():
    again = [c.id for c in all_cases()]
    assert again == [c.id for c in CASES] and len(set(again)) == len(again)
    for name, command in leaf_commands().items():
        fuzzed = {c.param for c in CASES if c.command == name}
        assert fuzzed == {p.name for p in command.params if not getattr(p, "hidden", False)}, name


@pytest.mark.parametrize("case", [_param(c) for c in CASES])
def test_cli_case(case, templates, scratch):
    outcome = run_case(templates, case, scratch, timeout=120)
    if outcome.problems:
        pytest.fail(outcome.report(), pytrace=False)


# A few cases through a real `python -m ambient` process: exit code, stderr and folder as a user sees them.
SUBPROCESS_IDS = ["train:--kimg=nan", "sample:--model=a-file", "em:--outdir=train-run", "eval-swd:--seed=huge"]


@pytest.mark.parametrize("case_id", SUBPROCESS_IDS)
def test_cli_case_in_a_subprocess(case_id, templates, scratch):
    case = next(c for c in CASES if c.id == case_id)
    outcome = run_case(templates, case, scratch, subprocess_run=True)
    if outcome.problems:
        pytest.fail(outcome.report(), pytrace=False)


def test_the_checks_catch_what_they_should():
    """The invariants are not vacuous: an escaped exception, a traceback, a bad last line, a silent flag and a
    refusal that leaves a file are each reported."""
    from tests.helpers_fuzz import Result, problems

    case = next(c for c in CASES if c.id == "train:--kimg=nan")
    argv = case.argv()
    same = {"out/x": ("file", 1, 2, "h")}
    assert problems(case, argv, Result(2, "", "notice: x\nerror: --kimg: must be finite\n"), {}, {}) == []
    assert problems(case, argv, Result(0, "done\n", ""), {}, {}) == []
    bad = [Result("exception", "", "", "Traceback (most recent call last):\nOverflowError: x"),
           Result(1, "", "error: --kimg nan\n"),
           Result(2, "", "Traceback (most recent call last):\n  File x\nValueError: --kimg\nerror: --kimg nan\n"),
           Result(2, "", "error: --kimg nan\n  more\n"),
           Result(2, "", "error: something is wrong\n")]
    for result in bad:
        assert problems(case, argv, result, same, same), result
    assert problems(case, argv, Result(2, "", "error: --kimg nan\n"), {}, same)  # a new file after a refusal
    changed = {"out/x": ("file", 1, 3, "h")}
    assert problems(case, argv, Result(2, "", "error: --kimg nan\n"), same, changed)  # an mtime changed
    # after a success: a run of another kind gained a file → reported; the command's own run (a resume) → not
    sample = next(c for c in CASES if c.id == "sample:--out=train-run")
    run = {"train-run": ("dir",), "train-run/config.json": ("file", 1, 2, "h")}
    grown = {**run, "train-run/000000.png": ("file", 1, 2, "p")}
    assert problems(sample, sample.argv()[:-1] + ["train-run"], Result(0, "", ""), run, grown)
    resume = next(c for c in CASES if c.id == "train:--outdir=train-run")
    assert problems(resume, resume.argv()[:-1] + ["train-run"], Result(0, "", ""), run, grown) == []
