"""Read network pickles (the reference's and EDM's) as data, executing nothing from the file.

A pickle may name any importable function and call it while loading; the network pickles of
EDM and of the Ambient Diffusion reference also embed Python source (``torch_utils.persistence``)
that ``pickle.load`` executes. :func:`load` reads them with an unpickler whose every global
comes from a small allow-list of stand-ins defined here:

* ``torch_utils.persistence._reconstruct_persistent_obj`` → :class:`PersistentObject` (class
  name and attribute dict; the embedded source is dropped unread);
* ``torch._utils._rebuild_tensor_v2`` / ``_rebuild_parameter`` and ``torch.storage._load_from_bytes``
  → tensors built from the raw bytes of the legacy storage format (header pickles read by the
  same restricted unpickler; the storage's device tag, e.g. ``cuda:0``, is ignored);
* torch containers (``ModuleDict`` …) → :class:`ModuleData`; ``collections.OrderedDict``,
  ``dnnlib.util.EasyDict`` → dicts; numpy scalars of numeric dtypes → Python numbers.

Any other global is refused with :class:`RefusedPickle` naming it.
"""

from __future__ import annotations

import io
import os
import pickle
import struct
from collections import OrderedDict

import torch

from ambient.errors import AmbientInputError


class RefusedPickle(AmbientInputError):
    """The file asks for something outside the allow-list; nothing from it was executed."""


class PersistentObject:
    """A ``torch_utils.persistence`` object as data: its class name and attribute dict."""

    def __init__(self, class_name: str, state: dict):
        self.class_name, self.state = class_name, state

    def __repr__(self) -> str:
        return f"PersistentObject({self.class_name})"


class ModuleData:
    """A plain torch container module (ModuleDict, ModuleList, Sequential) as its attribute dict."""

    kind = "Module"

    def __init__(self, *args):
        self.state: dict = {}

    def __setstate__(self, state) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (dict state, slot state)
            state = state[0] or {}
        if not isinstance(state, dict):
            raise RefusedPickle(f"{self.kind}: unexpected state of type {type(state).__name__}")
        self.state = state


def _container(kind: str) -> type:
    return type(f"{kind}Data", (ModuleData,), {"kind": kind})


class _EasyDict(dict):
    def __setstate__(self, state) -> None:
        if isinstance(state, dict):
            self.update(state)


class _DType:
    """numpy.dtype(name, align, copy) + BUILD state, restricted to numeric kinds."""

    def __init__(self, name, align=False, copy=True):
        import numpy as np

        dt = np.dtype(str(name)) if isinstance(name, str) and name.isalnum() else None
        if dt is None or dt.kind not in "biufc":
            raise RefusedPickle(f"numpy dtype {name!r} is not a numeric type")
        self.name, self.order = str(name), "<"

    def __setstate__(self, state) -> None:
        if isinstance(state, tuple) and len(state) > 1 and state[1] in ("<", ">", "|", "="):
            self.order = state[1]


def _np_scalar(dtype, data=b""):
    import numpy as np

    if not isinstance(dtype, _DType) or not isinstance(data, bytes):
        raise RefusedPickle("numpy scalar: unexpected arguments")
    order = "<" if dtype.order in ("|", "=") else dtype.order
    return np.frombuffer(data, dtype=np.dtype(order + dtype.name), count=1)[0].item()


def _reconstruct_persistent_obj(meta):
    if not (isinstance(meta, dict) and meta.get("type") == "class" and isinstance(meta.get("class_name"), str)
            and isinstance(meta.get("state"), dict)):
        raise RefusedPickle("torch_utils.persistence object of an unknown kind (only 'class' objects are read)")
    return PersistentObject(meta["class_name"], dict(meta["state"]))  # meta['module_src'] is never run


class _Storage:
    def __init__(self, dtype: torch.dtype, numel: int):
        self.dtype, self.numel, self.data = dtype, int(numel), None


_STORAGE_TYPES = {f"{n}Storage": d for n, d in [
    ("Float", torch.float32), ("Double", torch.float64), ("Half", torch.float16), ("BFloat16", torch.bfloat16),
    ("Long", torch.int64), ("Int", torch.int32), ("Short", torch.int16), ("Char", torch.int8),
    ("Byte", torch.uint8), ("Bool", torch.bool)]}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    if not isinstance(storage, _Storage) or storage.data is None:
        raise RefusedPickle("tensor without a readable storage")
    if not (isinstance(offset, int) and all(isinstance(v, int) and v >= 0 for v in (*size, *stride))
            and len(size) == len(stride) and offset >= 0):
        raise RefusedPickle("tensor with a malformed size or stride")
    last = offset + sum((s - 1) * st for s, st in zip(size, stride)) if all(size) else offset - 1
    if last >= storage.numel:
        raise RefusedPickle(f"tensor of size {tuple(size)} reaches past its storage ({storage.numel} elements)")
    return storage.data.as_strided(tuple(size), tuple(stride), offset).clone()


def _rebuild_parameter(data, requires_grad=False, hooks=None, *extra):
    if not isinstance(data, torch.Tensor):
        raise RefusedPickle("parameter without a tensor")
    return data


def _load_from_bytes(data):
    """A tensor storage in torch's legacy serialisation: header pickles, then raw little-endian bytes."""
    if not isinstance(data, (bytes, bytearray)):
        raise RefusedPickle("storage payload is not bytes")
    f = io.BytesIO(data)
    if data[:2] == b"PK":
        raise RefusedPickle("storage in torch's zip format is not supported")
    if _Restricted(f).load() != _LEGACY_MAGIC or _Restricted(f).load() != 1001:
        raise RefusedPickle("storage payload is not torch's legacy format")
    info = _Restricted(f).load()
    if not (isinstance(info, dict) and info.get("little_endian", True)):
        raise RefusedPickle("big-endian storages are not supported")
    found: dict[str, _Storage] = {}
    result = _Restricted(f, storages=found).load()
    keys = _Restricted(f).load()
    if not isinstance(keys, list):
        raise RefusedPickle("storage payload: malformed key list")
    for key in keys:
        st = found.get(key)
        header = f.read(8)
        if st is None or len(header) != 8:
            raise RefusedPickle("storage payload: unknown or truncated storage")
        (numel,) = struct.unpack("<q", header)
        nbytes = numel * torch.empty((), dtype=st.dtype).element_size()
        raw = f.read(nbytes)
        if numel != st.numel or len(raw) != nbytes:
            raise RefusedPickle(f"storage payload: {len(raw)} bytes where {st.numel} elements were declared")
        st.data = torch.frombuffer(bytearray(raw), dtype=st.dtype) if nbytes else torch.empty(0, dtype=st.dtype)
    return result


_ALLOWED = {
    ("collections", "OrderedDict"): OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): _load_from_bytes,
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _reconstruct_persistent_obj,
    ("dnnlib.util", "EasyDict"): _EasyDict,
    ("numpy", "dtype"): _DType,
    ("numpy.core.multiarray", "scalar"): _np_scalar,
    ("numpy._core.multiarray", "scalar"): _np_scalar,
    **{("torch.nn.modules.container", k): _container(k) for k in ("ModuleDict", "ModuleList", "Sequential")},
}


class _Restricted(pickle.Unpickler):
    """Globals from the allow-list only; persistent ids only for legacy storages (when ``storages`` is given)."""

    def __init__(self, f, storages: dict | None = None):
        super().__init__(f)
        self._storages = storages

    def find_class(self, module: str, name: str):
        if self._storages is not None and module == "torch" and name in _STORAGE_TYPES:
            return _STORAGE_TYPES[name]
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise RefusedPickle(f"refusing global '{module}.{name}' (not on the allow-list); "
                                "nothing from the file was executed") from None

    def persistent_load(self, pid):
        if (self._storages is None or not isinstance(pid, tuple) or len(pid) < 5 or pid[0] != "storage"
                or not isinstance(pid[1], torch.dtype) or not isinstance(pid[2], str) or not isinstance(pid[4], int)):
            raise RefusedPickle(f"refusing persistent id {str(pid)[:60]!r}")
        if len(pid) > 5 and pid[5] is not None:
            raise RefusedPickle("storage views are not supported")
        return self._storages.setdefault(pid[2], _Storage(pid[1], pid[4]))


def load(path: str | os.PathLike):
    """Unpickle ``path`` with the allow-list; raises RefusedPickle / AmbientInputError (one line)."""
    try:
        with open(path, "rb") as f:
            return _Restricted(f).load()
    except AmbientInputError as exc:
        raise type(exc)(f"{path}: {exc}") from None
    except OSError as exc:
        raise AmbientInputError(f"--pkl {path}: cannot read ({exc.strerror or exc})") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
            KeyError, struct.error, RuntimeError) as exc:
        raise AmbientInputError(f"--pkl {path}: not a readable network pickle ({type(exc).__name__}: "
                                f"{str(exc)[:100]})") from None
