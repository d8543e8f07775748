"""Files written whole or not at all: bytes, text, JSON, npz, folders; JSON-lines logs.

Every writer builds the new content beside the target (``.<name>.tmp-<pid>-<random>``), fsyncs
it and renames it over the target with ``os.replace``, so a reader sees the old file or the new
one, never a mix, and a crash leaves at most a hidden temporary file. Files get the usual mode
(0666 minus the umask); missing parent folders are created. Write failures become one-line
:class:`~ambient.errors.AmbientInputError` naming the file and the reason (no space left, not
writable). Snapshots (folders of several files with a completeness marker) build on these
pieces in :mod:`ambient.store.snapshots`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from ambient.errors import AmbientInputError

__all__ = [
    "append_jsonl", "atomic_folder", "atomic_save_npz", "atomic_write", "atomic_write_bytes",
    "atomic_write_json", "atomic_write_text", "fsync_dir", "read_json", "read_jsonl", "write_error",
    "write_synced",
]


def write_error(path: str | os.PathLike, exc: OSError) -> AmbientInputError:
    """A one-line user error for a failed write of ``path``."""
    path = Path(path)
    if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        reason = "no space left on device"
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        reason = "directory is not writable"
    else:
        reason = exc.strerror or str(exc)
    return AmbientInputError(f"cannot write {path}: {reason} (in {path.parent})")


def fsync_dir(path: str | os.PathLike) -> None:
    """Best effort: make renames in ``path`` durable (POSIX); silently skipped where impossible."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_synced(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` and fsync it (not atomic: for files inside a temporary folder)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _temp_name(path: Path) -> Path:
    return path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Call ``write(f)`` on a temporary binary file beside ``path``, then move it into place.

    An OSError while writing or renaming becomes an AmbientInputError (see :func:`write_error`);
    any other exception from ``write`` propagates. Either way no temporary file is left behind.
    """
    path = Path(path)
    tmp = _temp_name(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise write_error(path, exc) from exc
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, *, sort_keys: bool = True, allow_nan: bool = True,
                      indent: int = 2) -> Path:
    """Write ``obj`` as indented JSON (keys sorted unless ``sort_keys=False``) atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=sort_keys, allow_nan=allow_nan) + "\n")


def atomic_save_npz(path: str | os.PathLike, **arrays: np.ndarray) -> Path:
    """Write arrays as an (uncompressed) npz file atomically."""
    return atomic_write(path, lambda f: np.savez(f, **arrays))


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike, *, flag: str = "--out") -> Iterator[Path]:
    """Build a folder under a temporary name; on success it replaces ``path`` (which must be
    missing or an empty folder). Yields the temporary folder to write into.

    Errors name ``flag``: a non-empty target, or an OSError while building or renaming.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise AmbientInputError(f"{flag} {path}: is an existing file, not a folder")
    if path.exists() and any(path.iterdir()):
        raise AmbientInputError(f"{flag} {path}: folder exists and is not empty")
    tmp = path.with_name(f".tmp-{path.name}-{uuid.uuid4().hex[:8]}")
    try:
        tmp.mkdir(parents=True)
        yield tmp
        if path.exists():
            path.rmdir()
        os.replace(tmp, path)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            raise AmbientInputError(f"{flag} {path}: cannot write ({exc.strerror or exc})") from None
        raise
    fsync_dir(path.parent)


def read_json(path: str | os.PathLike) -> Any:
    """Parse a JSON file; unreadable or invalid files are one-line AmbientInputErrors."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise AmbientInputError(f"{path} is not valid JSON ({exc})") from exc
    except OSError as exc:
        raise AmbientInputError(f"cannot read {path}: {exc.strerror or exc}") from exc


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
        raise write_error(path, exc) from exc


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


def read_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}
