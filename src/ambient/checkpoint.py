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

import errno
import json
import numbers
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as _safetensors_bytes

from ambient import __version__
from ambient.errors import AmbientInputError

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


# ----------------------------------------------------------------------------- atomic files
def _write_error(path: Path, exc: OSError) -> AmbientInputError:
    if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        reason = "no space left on device"
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        reason = "directory is not writable"
    else:
        reason = exc.strerror or str(exc)
    return AmbientInputError(f"cannot write {path}: {reason} (in {path.parent})")


def _fsync_dir(path: Path) -> None:
    try:  # best effort: makes renames durable on POSIX; not possible everywhere
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so readers see the old file or the new one, never a mix."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        _write_file(tmp, data)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise _write_error(path, exc) from exc
    _fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """UTF-8 text version of `atomic_write_bytes`."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented, key-sorted JSON with `atomic_write_bytes`."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def append_jsonl(path: str | os.PathLike, obj: Any) -> None:
    """Append ``obj`` as one JSON line and flush; repairs a line cut short by a crash first."""
    path = Path(path)
    line = json.dumps(obj, sort_keys=True) + "\n"
    try:
        with open(path, "a+b", buffering=0) as f:
            if f.seek(0, os.SEEK_END) > 0:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    line = "\n" + line
            f.write(line.encode("utf-8"))
    except OSError as exc:
        raise _write_error(path, exc) from exc


def read_jsonl(path: str | os.PathLike) -> list[Any]:
    """Read a JSON-lines file; a bad line is an error unless it is the last (a cut-off write)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise AmbientInputError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from exc
    rows = []
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            rows.append(json.loads(text))
        except json.JSONDecodeError as exc:
            if any(rest.strip() for rest in lines[number:]):
                raise AmbientInputError(f"{path}: line {number} is not valid JSON ({exc.msg})") from exc
    return rows


# ----------------------------------------------------------------------------- state codec
def _encode(value: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    """JSON tree for ``value``; tensors go to ``tensors`` and are referenced by name."""
    if isinstance(value, torch.Tensor):
        name = where if where not in tensors else f"{where}#{len(tensors)}"
        tensors[name] = value
        return {"tensor": name}
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, (list, tuple)):
        tag = "list" if isinstance(value, list) else "tuple"
        return {tag: [_encode(v, tensors, f"{where}/{i}") for i, v in enumerate(value)]}
    if isinstance(value, dict):
        items = []
        for key, v in value.items():
            if not (key is None or isinstance(key, (bool, int, float, str))):
                raise ValueError(f"{where}: dict key {key!r} is not a str, int, float, bool or None")
            items.append([key, _encode(v, tensors, f"{where}/{key}")])
        return {"dict": items}
    raise ValueError(f"{where}: cannot store a value of type {type(value).__name__}")


def _decode(node: Any, tensors: dict[str, torch.Tensor], source: Path) -> Any:
    if node is None or isinstance(node, (bool, int, float, str)):
        return node
    if isinstance(node, dict) and len(node) == 1:
        ((tag, body),) = node.items()
        if tag == "tensor" and isinstance(body, str) and body in tensors:
            return tensors[body]
        if tag in ("list", "tuple") and isinstance(body, list):
            items = [_decode(v, tensors, source) for v in body]
            return items if tag == "list" else tuple(items)
        pairs = isinstance(body, list) and all(isinstance(p, list) and len(p) == 2 for p in body)
        if tag == "dict" and pairs:
            return {k: _decode(v, tensors, source) for k, v in body}
    raise AmbientInputError(f"{source}: corrupt training state (unexpected entry {str(node)[:60]!r})")


def _tensor_file(tensors: dict[str, torch.Tensor], what: str, metadata: dict[str, str] | None = None
                 ) -> bytes:
    """safetensors bytes; copies only tensors that are non-contiguous or share storage."""
    ready, seen = {}, set()
    for name, t in tensors.items():
        if not isinstance(name, str) or not isinstance(t, torch.Tensor):
            raise ValueError(f"{what}: expected str -> Tensor, got {name!r} -> {type(t).__name__}")
        t = t.detach().to("cpu").contiguous()
        if t.numel() > 0:  # tied weights: safetensors refuses two names on one storage
            if t.untyped_storage().data_ptr() in seen:
                t = t.clone()
            seen.add(t.untyped_storage().data_ptr())
        ready[name] = t
    return _safetensors_bytes(ready, metadata=metadata)


def _read_tensors(path: Path, device: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt", device=device) as f:
            return {k: f.get_tensor(k) for k in f.keys()}, (f.metadata() or {})
    except Exception as exc:  # safetensors raises its own error type for corrupt files
        raise AmbientInputError(f"{path} is not a valid safetensors file ({exc})") from exc


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise AmbientInputError(f"{path} is not valid JSON ({exc})") from exc
    except OSError as exc:
        raise AmbientInputError(f"cannot read {path}: {exc.strerror or exc}") from exc


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
             (MODEL_FILE, lambda: _tensor_file(model, "model"))]
    if ema is not None:
        files.append((EMA_FILE, lambda: _tensor_file(ema, "ema")))
    if optimizer is not None or extra_state:
        state_tensors: dict[str, torch.Tensor] = {}
        tree = {"format_version": FORMAT_VERSION,
                "optimizer": None if optimizer is None else _encode(optimizer, state_tensors, "optimizer"),
                "extra_state": _encode(dict(extra_state or {}), state_tensors, "extra_state")}
        meta = {_STATE_KEY: json.dumps(tree)}
        files.append((STATE_FILE, lambda: _tensor_file(state_tensors, "training state", meta)))
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
            _write_file(tmp / file_name, data)
            sizes[file_name] = len(data)
        marker = json.dumps({"files": sizes, "written_ns": time.time_ns()}, indent=2)
        _write_file(tmp / MARKER_FILE, marker.encode("utf-8"))
        _fsync_dir(tmp)
        if target.exists() or target.is_symlink():
            _remove_tree(aside)
            os.rename(target, aside)
            moved_aside = True
        os.rename(tmp, target)
        _fsync_dir(parent)
    except BaseException as exc:
        if moved_aside and not target.exists():
            try:
                os.rename(aside, target)
            except OSError:
                pass  # the complete .old- copy is still found by resolve_snapshot
        _remove_tree(tmp)
        if isinstance(exc, OSError):
            raise _write_error(target, exc) from exc
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
    raw = _read_json(folder / CONFIG_FILE)
    version = raw.get("format_version") if isinstance(raw, dict) else None
    if isinstance(version, bool) or not isinstance(version, int):
        raise AmbientInputError(f"{folder / CONFIG_FILE} is not an ambient config (no format_version)")
    if version > FORMAT_VERSION:
        raise AmbientInputError(
            f"{folder / CONFIG_FILE} was written by a newer ambient (format {version} > {FORMAT_VERSION}); "
            "upgrade ambient")
    config = {k: v for k, v in raw.items() if k not in _RESERVED}
    model, _ = _read_tensors(folder / MODEL_FILE, device)
    ema = _read_tensors(folder / EMA_FILE, device)[0] if (folder / EMA_FILE).exists() else None
    optimizer, extra = None, {}
    if (folder / STATE_FILE).exists():
        tensors, meta = _read_tensors(folder / STATE_FILE, device)
        try:
            tree = json.loads(meta[_STATE_KEY])
            optimizer = _decode(tree["optimizer"], tensors, folder / STATE_FILE)
            extra = _decode(tree["extra_state"], tensors, folder / STATE_FILE)
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, AmbientInputError):
                raise
            raise AmbientInputError(f"{folder / STATE_FILE}: corrupt training state ({exc!r})") from exc
    return Snapshot(path=folder, config=config, model=model, ema=ema, optimizer=optimizer, extra_state=extra,
                    format_version=version, ambient_version=str(raw.get("ambient_version", "")))


def _some(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def load_state_dict_strict(module: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: Any) -> None:
    """``module.load_state_dict(state_dict)``, with a one-line AmbientInputError naming ``source``
    on missing keys, unexpected keys or shape mismatches."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [f"{k} (checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)})"
              for k, v in state_dict.items() if k in expected and tuple(v.shape) != tuple(expected[k].shape)]
    problems = [f"{label} {_some(names)}" for label, names in
                (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatch for", shapes))
                if names]
    if problems:
        raise AmbientInputError(f"checkpoint {source} does not match the model: {'; '.join(problems)}")
    module.load_state_dict(state_dict, strict=True)
