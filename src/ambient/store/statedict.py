"""State dicts and training state as safetensors, nothing pickled.

* :func:`tensor_bytes` / :func:`read_tensors`: a ``{name: tensor}`` dict to safetensors bytes
  and back (tied or non-contiguous tensors are copied first).
* :func:`encode_state` / :func:`decode_state`: any tree of tensors, numbers, strings, lists,
  tuples and dicts (an optimizer state dict, RNG states) as a JSON tree whose tensors are
  referenced by name, so that it fits one safetensors file plus JSON metadata.
* :func:`load_state_dict_strict`: load weights into a module, with a one-line user error.
"""

from __future__ import annotations

import numbers
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as _safetensors_bytes

from ambient.errors import AmbientInputError


def encode_state(value: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
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
        return {tag: [encode_state(v, tensors, f"{where}/{i}") for i, v in enumerate(value)]}
    if isinstance(value, dict):
        items = []
        for key, v in value.items():
            if not (key is None or isinstance(key, (bool, int, float, str))):
                raise ValueError(f"{where}: dict key {key!r} is not a str, int, float, bool or None")
            items.append([key, encode_state(v, tensors, f"{where}/{key}")])
        return {"dict": items}
    raise ValueError(f"{where}: cannot store a value of type {type(value).__name__}")


def decode_state(node: Any, tensors: dict[str, torch.Tensor], source: Path) -> Any:
    if node is None or isinstance(node, (bool, int, float, str)):
        return node
    if isinstance(node, dict) and len(node) == 1:
        ((tag, body),) = node.items()
        if tag == "tensor" and isinstance(body, str) and body in tensors:
            return tensors[body]
        if tag in ("list", "tuple") and isinstance(body, list):
            items = [decode_state(v, tensors, source) for v in body]
            return items if tag == "list" else tuple(items)
        pairs = isinstance(body, list) and all(isinstance(p, list) and len(p) == 2 for p in body)
        if tag == "dict" and pairs:
            return {k: decode_state(v, tensors, source) for k, v in body}
    raise AmbientInputError(f"{source}: corrupt training state (unexpected entry {str(node)[:60]!r})")


def tensor_bytes(tensors: dict[str, torch.Tensor], what: str, metadata: dict[str, str] | None = None
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


def read_tensors(path: Path, device: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt", device=device) as f:
            return {k: f.get_tensor(k) for k in f.keys()}, (f.metadata() or {})
    except Exception as exc:  # safetensors raises its own error type for corrupt files
        raise AmbientInputError(f"{path} is not a valid safetensors file ({exc})") from exc


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
    check_finite(state_dict, f"checkpoint {source}")
    module.load_state_dict(state_dict, strict=True)


def check_finite(state_dict: dict[str, torch.Tensor], where: str) -> None:
    """One-line AmbientInputError naming ``where`` and the tensors that hold NaN or inf values."""
    bad = [k for k, v in state_dict.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise AmbientInputError(f"{where}: non-finite weights (NaN or inf) in {_some(bad)}; the model is damaged "
                                "(e.g. saved after training diverged)")
