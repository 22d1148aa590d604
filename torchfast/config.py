"""Base for torchfast configs: frozen dataclasses that validate themselves on construction.

A config that cannot work should fail where the user wrote it, not deep inside a transform.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from .errors import TorchfastError


class ConfigError(TorchfastError, ValueError):
    """A config value is invalid; the message names the field and the value."""


@dataclasses.dataclass(frozen=True)
class Config:
    """Subclasses are ``@dataclass(frozen=True)`` and override :meth:`validate`."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:  # pragma: no cover - default accepts everything
        pass

    def replace(self, **changes: Any) -> "Config":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            # calibration data and callables are not serializable config: describe them instead
            if isinstance(v, (int, float, str, bool, type(None))):
                out[f.name] = v
            elif isinstance(v, (tuple, list)) and all(isinstance(x, (int, float, str, bool)) for x in v):
                out[f.name] = list(v)
            else:
                out[f.name] = type(v).__name__
        return {"type": type(self).__name__, **out}


def check_range(cls_name: str, field: str, value: Any, lo: float | None = None, hi: float | None = None,
                lo_inclusive: bool = True, hi_inclusive: bool = True) -> None:
    """Raise ConfigError unless lo <= value <= hi (inclusivity configurable)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{cls_name}.{field} must be a number, got {value!r}")
    bad_lo = lo is not None and (value < lo if lo_inclusive else value <= lo)
    bad_hi = hi is not None and (value > hi if hi_inclusive else value >= hi)
    if bad_lo or bad_hi:
        lb = "[" if lo_inclusive else "("
        hb = "]" if hi_inclusive else ")"
        raise ConfigError(f"{cls_name}.{field} must be in {lb}{lo}, {hi}{hb}, got {value!r}")


def check_choice(cls_name: str, field: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{cls_name}.{field} must be one of {', '.join(map(repr, choices))}; got {value!r}")
