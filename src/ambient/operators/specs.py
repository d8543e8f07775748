"""Operators from their saved form: ``spec()`` (JSON) and ``arrays()`` (npz) back to the operator, exactly.

A spec is ``{"kind": ..., "image_shape": [C, H, W], "sigma_y": float, ...}`` with the kind's scalar fields
(``spec_fields``); the arrays are the kind's per-observation parameters by name. :data:`KINDS` maps each
kind to its class; every field and array is checked, and anything wrong raises a one-line ``ValueError``
naming the field (callers turn it into a user error).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ambient.operators.base import LinearOperator, check_image_shape, check_sigma_y
from ambient.operators.blur import BlurOperator
from ambient.operators.kspace import KSpaceOperator
from ambient.operators.mask import MaskOperator

KINDS: dict[str, type[LinearOperator]] = {cls.kind: cls for cls in (MaskOperator, BlurOperator, KSpaceOperator)}
BASE_FIELDS = ("kind", "image_shape", "sigma_y")


def operator_from_spec(spec: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> LinearOperator:
    """The operator whose ``spec()`` and ``arrays()`` these are (ValueError, one line, for anything wrong)."""
    if not isinstance(spec, Mapping):
        raise ValueError(f"operator spec must be a dict, got {type(spec).__name__}")
    if not isinstance(arrays, Mapping):
        raise ValueError(f"operator arrays must be a mapping of names to arrays, got {type(arrays).__name__}")
    kind = spec.get("kind")
    if kind not in KINDS:
        what = "is missing" if "kind" not in spec else f"{kind!r} is unknown"
        raise ValueError(f"operator spec: kind {what} (known: {', '.join(sorted(KINDS))})")
    cls = KINDS[kind]
    fields = (*BASE_FIELDS, *cls.spec_fields)
    for name in fields:
        if name not in spec:
            raise ValueError(f"operator spec: field {name!r} is missing for kind {kind!r}")
    for name in spec:
        if name not in fields:
            raise ValueError(f"operator spec: unknown field {name!r} for kind {kind!r} (fields: {', '.join(fields)})")
    checked = dict(spec)
    try:
        checked["image_shape"] = check_image_shape(spec["image_shape"])
        checked["sigma_y"] = check_sigma_y(spec["sigma_y"])
        names = cls._array_names(checked)
    except ValueError as e:
        raise ValueError(f"operator spec: {e}") from None
    for name in sorted(names):
        if name not in arrays:
            raise ValueError(f"operator arrays: {name!r} is missing for kind {kind!r}")
        if not isinstance(arrays[name], np.ndarray):
            raise ValueError(f"operator arrays: {name!r} must be a numpy array, got {type(arrays[name]).__name__}")
    for name in arrays:
        if name not in names:
            raise ValueError(f"operator arrays: unknown array {name!r} for kind {kind!r}")
    try:
        return cls._from_parts(checked, {name: arrays[name] for name in names})
    except ValueError as e:
        raise ValueError(f"operator arrays: {e}") from None
