"""Snapshots on disk: safetensors weights + JSON, written atomically, nothing pickled.

A snapshot is a folder (``snapshot-000123``) holding

* ``config.json``: the caller's config dict plus ``format_version`` and ``ambient_version``;
* ``model.safetensors`` and, optionally, ``ema.safetensors``: state dicts;
* ``training_state.safetensors`` (when an optimizer or extra state is given): every tensor of
  the optimizer state dict and of ``extra_state`` (RNG states are uint8 tensors), plus a JSON
  description of the rest (ints, floats, lists, tuples, dict keys) in the safetensors metadata;
* ``COMPLETE``: written last, the size of every file above. A folder is complete when the
  marker exists and every file listed has the listed size.

Saving writes everything into ``.tmp-<name>-<pid>`` beside the target and fsyncs it, then
renames an existing target to ``.old-<name>-<pid>``, renames the new folder into place and
deletes the old one. Crash windows: before the first rename the name holds the old snapshot;
between the two renames the name is missing while the old (``.old-``) and the new
(``.tmp-``, with its marker) complete copies both exist, and ``resolve_snapshot`` /
``load_snapshot`` / ``list_snapshots`` fall back to the newest complete one; after the second
rename the name holds the new snapshot. Leftovers of dead writers are removed by the next save
of the same name. One writer per snapshot name at a time.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ambient import __version__
from ambient.errors import AmbientInputError
from ambient.io import fsync_dir, read_json, write_error, write_synced
from ambient.store.statedict import decode_state, encode_state, read_tensors, tensor_bytes

FORMAT_VERSION = 1
CONFIG_FILE, MODEL_FILE, EMA_FILE = "config.json", "model.safetensors", "ema.safetensors"
STATE_FILE, MARKER_FILE = "training_state.safetensors", "COMPLETE"
_STATE_KEY = "ambient.training_state"
_RESERVED = ("format_version", "ambient_version")
_NAME_RE = re.compile(r"^snapshot-(\d+)$")
_HIDDEN_RE = re.compile(r"^\.(?:tmp|old)-(.+)-(\d+)$")


def snapshot_name(step: int) -> str:
    """Folder name of the snapshot at ``step`` (kimg or step count): ``snapshot-000123``."""
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    return f"snapshot-{step:06d}"


def snapshot_step(path: str | os.PathLike) -> int | None:
    """The step encoded in a snapshot folder name, or None if the name is not one."""
    match = _NAME_RE.match(Path(path).name)
    return int(match.group(1)) if match else None


# ----------------------------------------------------------------------------- saving
def _remove_tree(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


def _pid_alive(pid: int) -> bool:
    if os.name != "posix":
        return True  # cannot tell safely; keep the folder
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except OSError:
        return True
    return True


def _remove_leftovers(parent: Path, name: str) -> None:
    """Delete ``.tmp-``/``.old-`` copies of ``name`` left by this process or dead writers."""
    for entry in parent.iterdir():
        match = _HIDDEN_RE.match(entry.name)
        if match and match.group(1) == name:
            pid = int(match.group(2))
            if pid == os.getpid() or not _pid_alive(pid):
                _remove_tree(entry)


def _snapshot_files(config, model, ema, optimizer, extra_state) -> list[tuple[str, Callable[[], bytes]]]:
    """(file name, bytes maker) of each file of a snapshot, config first; checks the config."""
    if not isinstance(config, dict):
        raise ValueError(f"config must be a dict, got {type(config).__name__}")
    try:
        config_text = json.dumps(
            {**config, "format_version": FORMAT_VERSION, "ambient_version": __version__},
            indent=2, sort_keys=True,
        )
    except (TypeError, ValueError) as exc:
        raise ValueError(f"config is not JSON-serialisable: {exc}") from exc
    files = [(CONFIG_FILE, lambda: (config_text + "\n").encode("utf-8")),
             (MODEL_FILE, lambda: tensor_bytes(model, "model"))]
    if ema is not None:
        files.append((EMA_FILE, lambda: tensor_bytes(ema, "ema")))
    if optimizer is not None or extra_state:
        state_tensors: dict[str, torch.Tensor] = {}
        tree = {"format_version": FORMAT_VERSION,
                "optimizer": None if optimizer is None else encode_state(optimizer, state_tensors, "optimizer"),
                "extra_state": encode_state(dict(extra_state or {}), state_tensors, "extra_state")}
        meta = {_STATE_KEY: json.dumps(tree)}
        files.append((STATE_FILE, lambda: tensor_bytes(state_tensors, "training state", meta)))
    return files


def save_snapshot(
    directory: str | os.PathLike,
    *,
    config: dict[str, Any],
    model: dict[str, torch.Tensor],
    ema: dict[str, torch.Tensor] | None = None,
    optimizer: dict[str, Any] | None = None,
    extra_state: dict[str, Any] | None = None,
) -> Path:
    """Write a snapshot folder atomically (see the module docstring) and return its path.

    ``config`` must be JSON-serialisable; its keys ``format_version`` and ``ambient_version``
    are set by this function. ``optimizer`` is an ``optimizer.state_dict()``; ``extra_state``
    maps names to tensors (e.g. ``generator.get_state()``), numbers, strings, lists or dicts.
    A failed write raises AmbientInputError and leaves any previous snapshot under the name intact.
    """
    target = Path(directory)
    if target.name in ("", ".", ".."):
        raise ValueError(f"directory must name a snapshot folder, got {str(directory)!r}")
    files = _snapshot_files(config, model, ema, optimizer, extra_state)
    if target.exists() and not (target.is_dir() and ((target / MARKER_FILE).is_file()
                                                     or (target / CONFIG_FILE).is_file())):
        raise AmbientInputError(f"refusing to replace {target}: it exists and is not an ambient snapshot")

    parent, pid = target.parent, os.getpid()
    tmp, aside = parent / f".tmp-{target.name}-{pid}", parent / f".old-{target.name}-{pid}"
    moved_aside = False
    try:
        parent.mkdir(parents=True, exist_ok=True)
        _remove_tree(tmp)
        tmp.mkdir()
        sizes = {}
        for file_name, make in files:
            data = make()
            write_synced(tmp / file_name, data)
            sizes[file_name] = len(data)
        marker = json.dumps({"files": sizes, "written_ns": time.time_ns()}, indent=2)
        write_synced(tmp / MARKER_FILE, marker.encode("utf-8"))
        fsync_dir(tmp)
        if target.exists() or target.is_symlink():
            _remove_tree(aside)
            os.rename(target, aside)
            moved_aside = True
        os.rename(tmp, target)
        fsync_dir(parent)
    except BaseException as exc:
        if moved_aside and not target.exists():
            try:
                os.rename(aside, target)
            except OSError:
                pass  # the complete .old- copy is still found by resolve_snapshot
        _remove_tree(tmp)
        if isinstance(exc, OSError):
            raise write_error(target, exc) from exc
        raise
    if moved_aside:
        _remove_tree(aside)
    _remove_leftovers(parent, target.name)
    return target


# ----------------------------------------------------------------------------- finding
def _marker(path: Path) -> dict[str, Any] | None:
    """The parsed COMPLETE marker if ``path`` is a complete snapshot folder, else None."""
    try:
        marker = json.loads((path / MARKER_FILE).read_text(encoding="utf-8"))
        sizes = marker["files"]
        if CONFIG_FILE not in sizes or MODEL_FILE not in sizes:
            return None
        if all((path / f).stat().st_size == int(n) for f, n in sizes.items()):
            return marker
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    return None


def is_complete(path: str | os.PathLike) -> bool:
    """True if ``path`` holds a COMPLETE marker and every file it lists, at the listed size."""
    return _marker(Path(path)) is not None


def _recovery_copy(target: Path) -> Path | None:
    """Newest complete ``.tmp-``/``.old-`` copy of ``target`` (a save was cut between renames)."""
    best, best_ns = None, -1
    if not target.parent.is_dir():
        return None
    for entry in target.parent.iterdir():
        match = _HIDDEN_RE.match(entry.name)
        if match and match.group(1) == target.name and entry.is_dir():
            marker = _marker(entry)
            written = marker.get("written_ns", 0) if marker else -1
            if marker and isinstance(written, int) and written > best_ns:
                best, best_ns = entry, written
    return best


def resolve_snapshot(directory: str | os.PathLike) -> Path:
    """The folder to read for snapshot ``directory``: itself, or its recovery copy if it is missing."""
    target = Path(directory)
    if target.exists():
        return target
    return _recovery_copy(target) or target


def list_snapshots(outdir: str | os.PathLike) -> list[Path]:
    """Complete snapshots ``outdir/snapshot-<step>``, sorted by step.

    Temporary and incomplete folders are skipped. A name whose save was cut between its two
    renames is listed under its own name (which `load_snapshot` resolves).
    """
    outdir = Path(outdir)
    if not outdir.is_dir():
        return []
    found: dict[str, Path] = {}
    for entry in outdir.iterdir():
        if _NAME_RE.match(entry.name) and entry.is_dir() and is_complete(entry):
            found[entry.name] = entry
        hidden = _HIDDEN_RE.match(entry.name)
        if hidden and _NAME_RE.match(hidden.group(1)) and not (outdir / hidden.group(1)).exists():
            if is_complete(entry):
                found[hidden.group(1)] = outdir / hidden.group(1)
    return sorted(found.values(), key=lambda p: (snapshot_step(p), p.name))


def damaged_snapshots(outdir: str | os.PathLike) -> list[Path]:
    """Folders ``outdir/snapshot-<step>`` that are not complete (no COMPLETE marker, or files of
    other sizes than it lists), sorted by step: `list_snapshots` skips them. A save never leaves
    one (it renames complete folders into place), so these were damaged afterwards, or written
    by a version without the marker."""
    outdir = Path(outdir)
    if not outdir.is_dir():
        return []
    found = [e for e in outdir.iterdir() if _NAME_RE.match(e.name) and e.is_dir() and not is_complete(e)]
    return sorted(found, key=lambda p: (snapshot_step(p), p.name))


def latest_snapshot(outdir: str | os.PathLike) -> Path | None:
    """The complete snapshot with the highest step in ``outdir``, or None."""
    snapshots = list_snapshots(outdir)
    return snapshots[-1] if snapshots else None


# ----------------------------------------------------------------------------- loading
@dataclass
class Snapshot:
    """What `load_snapshot` returns. ``config`` excludes ``format_version``/``ambient_version``."""

    path: Path
    config: dict[str, Any]
    model: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor] | None = None
    optimizer: dict[str, Any] | None = None
    extra_state: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    ambient_version: str = ""


def load_snapshot(directory: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> Snapshot:
    """Read a snapshot folder; tensors go to ``map_location``. User errors: AmbientInputError."""
    requested = Path(directory)
    folder = resolve_snapshot(requested)
    device = str(torch.device(map_location))
    if not folder.is_dir():
        raise AmbientInputError(f"snapshot {requested} does not exist or is not a folder")
    for required in (CONFIG_FILE, MODEL_FILE):
        if not (folder / required).is_file():
            raise AmbientInputError(f"{folder} is not an ambient snapshot: it has no {required}")
    if (folder / MARKER_FILE).exists() and not is_complete(folder):
        raise AmbientInputError(f"snapshot {folder} is incomplete or damaged (files differ from its marker)")
    raw = read_json(folder / CONFIG_FILE)
    version = raw.get("format_version") if isinstance(raw, dict) else None
    if isinstance(version, bool) or not isinstance(version, int):
        raise AmbientInputError(f"{folder / CONFIG_FILE} is not an ambient config (no format_version)")
    if version > FORMAT_VERSION:
        raise AmbientInputError(
            f"{folder / CONFIG_FILE} was written by a newer ambient (format {version} > {FORMAT_VERSION}); "
            "upgrade ambient")
    config = {k: v for k, v in raw.items() if k not in _RESERVED}
    model, _ = read_tensors(folder / MODEL_FILE, device)
    ema = read_tensors(folder / EMA_FILE, device)[0] if (folder / EMA_FILE).exists() else None
    optimizer, extra = None, {}
    if (folder / STATE_FILE).exists():
        tensors, meta = read_tensors(folder / STATE_FILE, device)
        try:
            tree = json.loads(meta[_STATE_KEY])
            optimizer = decode_state(tree["optimizer"], tensors, folder / STATE_FILE)
            extra = decode_state(tree["extra_state"], tensors, folder / STATE_FILE)
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, AmbientInputError):
                raise
            raise AmbientInputError(f"{folder / STATE_FILE}: corrupt training state ({exc!r})") from exc
    return Snapshot(path=folder, config=config, model=model, ema=ema, optimizer=optimizer, extra_state=extra,
                    format_version=version, ambient_version=str(raw.get("ambient_version", "")))
