"""Config dataclasses <-> JSON: the helpers every config of the package uses."""

from __future__ import annotations

from dataclasses import fields

from ambient.errors import AmbientInputError


def dataclass_from_dict(cls, d: dict, what: str):
    """``cls(**d)`` for a config dataclass, refusing keys it does not know (one line naming them)."""
    unknown = sorted(set(d) - {f.name for f in fields(cls)})
    if unknown:
        raise AmbientInputError(f"{what} config has unknown keys: {', '.join(unknown)}")
    return cls(**d)
