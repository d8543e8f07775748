"""What kind of folder each command writes: recorded in the folder, checked before any write.

Every folder a command writes records its kind in the ``kind`` field of its own JSON config, put
there by :func:`stamped` (the one writer of the field):

* ``train-run``: an ``ambient train`` outdir (``config.json``); ``train-snapshot``: one of its
  snapshots (the snapshot's ``config.json``); an EM lap's ``lap-XX/`` is a train run too;
* ``em-run``: an ``ambient em`` outdir (``em_config.json``);
* ``finetune``: an ``ambient finetune`` outdir (``finetune_options.json`` and, once exported,
  ``config.json``); ``finetune-snapshot``: one of its snapshots;
* ``imported-model``: an ``ambient import`` folder (``config.json``);
* ``demo-run``: an ``ambient demo`` outdir (``demo.json``), holding two train runs, ``naive/`` and ``ambient/``;
* ``kspace-ambient run``: an ``ambient train`` outdir trained on k-space measurements
  (:mod:`ambient.learners.kspace_ambient`; ``config.json``, written before its first step).

Folders written before kinds were recorded are recognised by what they hold (:func:`folder_kind`):
``em_config.json``, ``finetune_options.json``, a ``config.json`` with an ``imported`` or ``train``
section, snapshots; a folder of ``NNNNNN.png`` files is ``ambient sample`` output.

:func:`claim_outdir` is called by every command before it writes into a folder: it refuses, in one
line naming the folder, its kind and what to do, a folder of another kind, a folder whose kind
cannot be read, and a non-empty folder that no ambient command wrote. Names starting with a dot
(locks, editor files) are not looked at.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from ambient.errors import AmbientInputError

KIND_KEY = "kind"
TRAIN_RUN, TRAIN_SNAPSHOT = "train-run", "train-snapshot"
EM_RUN = "em-run"
FINETUNE_RUN, FINETUNE_SNAPSHOT = "finetune", "finetune-snapshot"
IMPORTED_MODEL = "imported-model"
DEMO_RUN = "demo-run"
KSPACE_AMBIENT_RUN = "kspace-ambient run"  # the library recorded this spelling before the command existed
SAMPLE_OUTPUT = "sample-output"  # recognised by its files (a folder of PNGs holds no config)
OTHER = "other"  # not empty, and no ambient command wrote it
UNREADABLE = "unreadable"  # its config cannot be read, or names a kind this version does not know

RECORDED = (TRAIN_RUN, TRAIN_SNAPSHOT, EM_RUN, FINETUNE_RUN, FINETUNE_SNAPSHOT, IMPORTED_MODEL, DEMO_RUN,
            KSPACE_AMBIENT_RUN)
DESCRIPTIONS = {
    TRAIN_RUN: "a train run (ambient train)",
    TRAIN_SNAPSHOT: "a snapshot of a train run",
    EM_RUN: "an em run (ambient em)",
    FINETUNE_RUN: "a finetune run (ambient finetune)",
    FINETUNE_SNAPSHOT: "a snapshot of a finetune run",
    IMPORTED_MODEL: "an imported model (ambient import)",
    DEMO_RUN: "a demo run (ambient demo)",
    KSPACE_AMBIENT_RUN: "a k-space ambient run (ambient train on k-space measurements)",
    SAMPLE_OUTPUT: "a folder of sampled images (ambient sample)",
    OTHER: "a folder that no ambient command wrote",
    UNREADABLE: "a folder whose kind cannot be read",
}
_CONFIGS = ("em_config.json", "finetune_options.json", "config.json", "demo.json")  # where each kind is recorded
_SAMPLE_PNG = re.compile(r"^\d{6}\.png$")
_SNAPSHOT = re.compile(r"^snapshot-\d+$")
_TRAIN_LOGS = re.compile(r"^(tensorboard|stats\.jsonl|samples-\d+\.png)$")


def stamped(config: dict, kind: str) -> dict:
    """``config`` with its folder's ``kind`` recorded (first key); the one place the field is written."""
    if kind not in RECORDED:
        raise ValueError(f"unknown folder kind {kind!r}")
    return {KIND_KEY: kind, **{k: v for k, v in config.items() if k != KIND_KEY}}


def describe(kind: str | None) -> str:
    return DESCRIPTIONS.get(kind, "an empty folder") if kind else "a new folder"


def _visible(folder: Path) -> list[Path]:
    return [e for e in folder.iterdir() if not e.name.startswith(".")]


def _read(path: Path) -> tuple[dict | None, str | None]:
    """(parsed JSON object, None), or (None, why it cannot be read)."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        return None, f"{path.name} cannot be read ({' '.join(str(exc).split())[:80]})"
    return (value, None) if isinstance(value, dict) else (None, f"{path.name} is not a JSON object")


def folder_kind_why(path: str | os.PathLike) -> tuple[str | None, str]:
    """(kind, what tells it) of folder ``path``: None for a missing or empty folder (names starting
    with a dot are not looked at), else one of the kinds of this module."""
    folder = Path(path)
    if not folder.is_dir():
        return None, ""
    entries = _visible(folder)
    if not entries:
        return None, ""
    names = {e.name for e in entries}
    for name in _CONFIGS:
        if name not in names:
            continue
        cfg, why = _read(folder / name)
        if cfg is None:
            return UNREADABLE, why
        kind = cfg.get(KIND_KEY)
        if kind is not None:
            if kind in RECORDED:
                return kind, f"{name} says so"
            return UNREADABLE, f"{name} records kind {kind!r}, unknown to this version of ambient"
        inferred = _infer(name, cfg, names)
        if inferred is not None:
            return inferred, f"it holds {name}"
    snaps = sorted((e for e in entries if _SNAPSHOT.match(e.name) and e.is_dir()), key=lambda e: e.name)
    if snaps:  # no config beside them (written before the run's own config.json was)
        kind, _ = folder_kind_why(snaps[-1])
        owner = {TRAIN_SNAPSHOT: TRAIN_RUN, FINETUNE_SNAPSHOT: FINETUNE_RUN}.get(kind)
        if owner is not None:
            return owner, f"its snapshots are {describe(kind)[2:]}s"
    if all(_SAMPLE_PNG.match(n) for n in names) and all(e.is_file() for e in entries):
        return SAMPLE_OUTPUT, "it holds only NNNNNN.png images"
    if all(_TRAIN_LOGS.match(n) for n in names):
        return TRAIN_RUN, "it holds a train run's logs"
    return OTHER, "no ambient config in it"


def folder_kind(path: str | os.PathLike) -> str | None:
    """The kind of folder ``path`` (see :func:`folder_kind_why`)."""
    return folder_kind_why(path)[0]


def _infer(name: str, cfg: dict, names: set[str]) -> str | None:
    """The kind of a folder written before kinds were recorded, from one of its configs."""
    if name == "em_config.json":
        return EM_RUN
    if name == "finetune_options.json":
        return FINETUNE_RUN
    is_snapshot = "model.safetensors" in names or "COMPLETE" in names
    if "imported" in cfg:
        return IMPORTED_MODEL
    if "train" in cfg:
        return TRAIN_SNAPSHOT if is_snapshot else TRAIN_RUN
    if "finetune" in cfg and is_snapshot:
        return FINETUNE_SNAPSHOT
    return None


def claim_outdir(path: str | os.PathLike, kind: str, *, flag: str = "--outdir", command: str) -> str | None:
    """Check, before ``command`` writes anything, that folder ``path`` is new, empty, or of ``kind``;
    returns the kind found (None: new or empty). One-line :class:`AmbientInputError` otherwise."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise AmbientInputError(f"{flag} {folder}: exists and is not a folder; choose another {flag}")
    try:
        found, why = folder_kind_why(folder)
    except OSError as exc:
        raise AmbientInputError(f"{flag} {folder}: cannot be read ({exc.strerror or exc}); "
                                f"choose another {flag}") from None
    if found is None or found == kind:
        return found
    raise AmbientInputError(f"{flag} {folder}: is {describe(found)} ({why}); {command} writes only into a new "
                            f"or empty folder or {describe(kind)}; choose another {flag}")


def check_readable_as(path: str | os.PathLike, kinds: tuple[str, ...], *, flag: str, what: str) -> str | None:
    """Refuse, in one line naming ``flag``, a folder whose kind is known and not one of ``kinds``
    (``what``: what the flag takes, e.g. "a train run or one of its snapshots"). Returns the kind."""
    folder = Path(path)
    if not folder.is_dir():
        return None
    found, why = folder_kind_why(folder)
    if found is not None and found not in kinds:
        raise AmbientInputError(f"{flag} {folder}: is {describe(found)} ({why}); {flag} takes {what}")
    return found


def check_not_a_run_file(path: str | os.PathLike, flag: str = "--out") -> None:
    """Refuse, in one line, an output file that already exists inside a folder another command made and
    records (a run, a snapshot, an import, ...): writing it would change that folder's own files (its pool,
    its Gaussian, its samples). A new file name there is left to the user, as a file anywhere else."""
    path = Path(path)
    if not path.exists():
        return
    kind = folder_kind(path.parent)
    if kind in RECORDED:
        raise AmbientInputError(f"{flag} {path}: is a file of {describe(kind)} ({path.parent}); writing it would "
                                f"change that folder; choose another {flag}")
