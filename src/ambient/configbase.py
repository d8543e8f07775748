"""Config dataclasses <-> JSON, and the one format of their flag errors.

:class:`ConfigBase` is the base of the command configs (``TrainConfig``, ``EMConfig``,
``FinetuneConfig``, ``RestoreConfig``): ``to_dict`` / ``from_dict`` (unknown keys refused in one
line) and :meth:`ConfigBase.fail`, which raises every bad value as ``--flag-name: what is wrong``.
Field names match the flags (``lap_kimg`` ↔ ``--lap-kimg``).
"""

from __future__ import annotations

from dataclasses import asdict, fields
from typing import NoReturn

from ambient.errors import AmbientInputError


def dataclass_from_dict(cls, d: dict, what: str):
    """``cls(**d)`` for a config dataclass, refusing keys it does not know (one line naming them)."""
    unknown = sorted(set(d) - {f.name for f in fields(cls)})
    if unknown:
        raise AmbientInputError(f"{what} config has unknown keys: {', '.join(unknown)}")
    return cls(**d)


def flag_error(name: str, what: str) -> AmbientInputError:
    """The error for a bad option: ``--flag-name: what is wrong`` (``name`` a field name or a flag)."""
    return AmbientInputError(f"--{name.lstrip('-').replace('_', '-')}: {what}")


def is_int(value, lo: int) -> bool:
    """An int (not a bool) of at least ``lo``."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= lo


class ConfigBase:
    """Base of a config dataclass: JSON round trip and flag checks (see the module doc).

    A subclass names itself for the unknown-keys error: ``class TrainConfig(ConfigBase, what="training")``.
    """

    _what = "config"

    def __init_subclass__(cls, *, what: str, **kwargs):
        super().__init_subclass__(**kwargs)
        cls._what = what

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        return dataclass_from_dict(cls, d, cls._what)

    @staticmethod
    def fail(name: str, what: str) -> NoReturn:
        """Raise :func:`flag_error` for option ``name``."""
        raise flag_error(name, what)
