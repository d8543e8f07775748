"""ambient.io: atomic files (bytes, text, JSON, npz, folders) and JSON-lines logs."""

from __future__ import annotations

import errno
import json
import os
import stat

import numpy as np
import pytest

from ambient import io as aio
from ambient.errors import AmbientInputError


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_atomic_write_helpers(tmp_path, monkeypatch):
    path = tmp_path / "opts.json"
    aio.atomic_write_json(path, {"b": 1, "a": [1.5]})
    assert json.loads(path.read_text()) == {"a": [1.5], "b": 1}
    aio.atomic_write_text(path, "second")
    assert path.read_text() == "second"
    monkeypatch.setattr(os, "replace", _enospc)
    with pytest.raises(AmbientInputError, match="no space left"):
        aio.atomic_write_bytes(path, b"third")
    monkeypatch.undo()
    assert path.read_text() == "second" and os.listdir(tmp_path) == ["opts.json"]


def test_append_and_read_jsonl(tmp_path):
    path = tmp_path / "stats.jsonl"
    aio.append_jsonl(path, {"kimg": 1, "loss": 0.5})
    with open(path, "a") as f:
        f.write('{"kimg": 2, "lo')  # a crash in the middle of a line
    assert aio.read_jsonl(path) == [{"kimg": 1, "loss": 0.5}]
    aio.append_jsonl(path, {"kimg": 3})
    assert path.read_text().count("\n") == 3
    with pytest.raises(AmbientInputError, match="stats.jsonl: line 2"):
        aio.read_jsonl(path)


def test_atomic_npz_and_usual_mode(tmp_path):
    path = aio.atomic_save_npz(tmp_path / "sub" / "a.npz", x=np.arange(3), y=np.eye(2))
    with np.load(path) as f:
        assert np.array_equal(f["x"], np.arange(3)) and np.array_equal(f["y"], np.eye(2))
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask
    assert os.listdir(tmp_path / "sub") == ["a.npz"]


def test_a_failing_writer_leaves_the_old_file_and_no_temporary(tmp_path):
    path = aio.atomic_write_text(tmp_path / "a.txt", "old")

    def half(f):
        f.write(b"new, half")
        raise RuntimeError("writer died")

    with pytest.raises(RuntimeError, match="writer died"):
        aio.atomic_write(path, half)
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["a.txt"]


def test_atomic_folder_appears_whole_or_not_at_all(tmp_path):
    out = tmp_path / "pngs"
    with pytest.raises(RuntimeError), aio.atomic_folder(out) as tmp:
        (tmp / "0.png").write_bytes(b"x")
        raise RuntimeError("cut")
    assert os.listdir(tmp_path) == []
    with aio.atomic_folder(out) as tmp:
        (tmp / "0.png").write_bytes(b"x")
        assert not out.exists()
    assert os.listdir(tmp_path) == ["pngs"] and os.listdir(out) == ["0.png"]
    with pytest.raises(AmbientInputError, match="^--out .*pngs: folder exists and is not empty"):
        with aio.atomic_folder(out, flag="--out"):
            pass


def test_read_json_errors_name_the_file(tmp_path):
    (tmp_path / "c.json").write_text("{bad")
    with pytest.raises(AmbientInputError, match="c.json is not valid JSON"):
        aio.read_json(tmp_path / "c.json")
    assert aio.read_json(aio.atomic_write_json(tmp_path / "d.json", {"a": 1})) == {"a": 1}
