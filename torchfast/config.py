"""Base for torchfast configs: frozen dataclasses that validate themselves on construction.

A config that cannot work should fail where the user wrote it, not deep inside a transform. Configs
round-trip through plain dicts (``type(cfg).from_dict(cfg.to_dict()) == cfg``, and
``config_from_dict(d)`` finds the class by ``d["type"]``) so a recipe can be stored as JSON.
"""
from __future__ import annotations

import dataclasses
import importlib
import sys
import warnings
from typing import Any, Mapping

import torch

from .errors import TorchfastError

__all__ = ["Config", "ConfigError", "config_from_dict", "opaque", "check_range", "check_choice", "check_exclude"]


class ConfigError(TorchfastError, ValueError):
    """A config value is invalid; the message names the field and the value."""


def user_stacklevel() -> int:
    """The ``stacklevel`` for a warning raised where this is called, pointing at the first caller outside
    torchfast (the user's line, however deep the call went)."""
    level, f = 1, sys._getframe(1)
    while f is not None and f.f_globals.get("__name__", "").split(".")[0] == "torchfast":
        f, level = f.f_back, level + 1
    return level


# former field names that now have one name in every transform config
_RENAMED = {"skip": "exclude", "ignored": "exclude"}


def _modern_kwargs(cls: type, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Map former field names to current ones (with a FutureWarning) and refuse ``inplace`` as a field."""
    names = {f.name for f in dataclasses.fields(cls)}
    out = dict(kwargs)
    if "inplace" in out and "inplace" not in names:
        raise ConfigError(f"{cls.__name__} has no field 'inplace': inplace is an argument of the transform, "
                          f"e.g. {getattr(cls, '_transform', 'quantize')}(model, {cls.__name__}(), inplace=True)")
    for old, new in _RENAMED.items():
        if old in out and old not in names and new in names:
            if new in out:
                raise ConfigError(f"{cls.__name__}: give {new} only ({old} is its former name)")
            warnings.warn(f"{cls.__name__}({old}=...) is now {cls.__name__}({new}=...): module names or globs",
                          FutureWarning, stacklevel=user_stacklevel())
            out[new] = out.pop(old)
    return out


class _ConfigMeta(type):
    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        if dataclasses.is_dataclass(cls):
            kwargs = _modern_kwargs(cls, kwargs)
        return super().__call__(*args, **kwargs)


def opaque(default: Any = None, **kwargs: Any) -> Any:
    """A field holding data or a callable (calibration batches, eval_fn): ``to_dict`` shows its type name
    and ``from_dict`` leaves it at its default, since neither can be written into a dict and read back."""
    return dataclasses.field(default=default, metadata={"opaque": True}, **kwargs)


def _plain(v: Any) -> Any:
    """A JSON-ready form of a field value; anything without one becomes its type name."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, torch.dtype):
        return str(v).removeprefix("torch.")
    if isinstance(v, Mapping) and all(isinstance(k, str) for k in v):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (tuple, list)):
        return [_plain(x) for x in v]
    return type(v).__name__


def _tuples(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return tuple(_tuples(x) for x in v)
    return v


def _is_tuple_field(f: dataclasses.Field) -> bool:
    return isinstance(f.default, tuple) or str(f.type).replace(" ", "").startswith(("tuple", "Tuple"))


@dataclasses.dataclass(frozen=True)
class Config(metaclass=_ConfigMeta):
    """Subclasses are ``@dataclass(frozen=True)`` and override :meth:`validate`.

    A config with an ``exclude`` field (every transform config) gets it checked here: a tuple of
    qualified module names or fnmatch globs, never a bare string.
    """

    def __post_init__(self) -> None:
        if any(f.name == "exclude" for f in dataclasses.fields(self)):
            object.__setattr__(self, "exclude", check_exclude(type(self).__name__, self.exclude))
        self.validate()

    def validate(self) -> None:  # pragma: no cover - default accepts everything
        pass

    def replace(self, **changes: Any) -> "Config":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain values by field, plus ``"type"``; data and callables (opaque fields) by their type name."""
        out: dict[str, Any] = {"type": type(self).__name__}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.metadata.get("opaque"):
                out[f.name] = None if v is None else type(v).__name__
            else:
                out[f.name] = _plain(v)
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Config":
        """The config ``to_dict`` wrote: lists become tuples where the field is a tuple; opaque fields
        (calibration data, callables) stay at their defaults. A ``"type"`` naming another class is refused."""
        if not isinstance(d, Mapping):
            raise ConfigError(f"{cls.__name__}.from_dict takes a dict, got {type(d).__name__}")
        d = dict(d)
        t = d.pop("type", None)
        if t is not None and t not in (cls.__name__, f"{cls.__module__}.{cls.__qualname__}"):
            raise ConfigError(f"{cls.__name__}.from_dict got a dict of type {t!r}; use config_from_dict(d) "
                              f"or {t}.from_dict(d)")
        d = _modern_kwargs(cls, d)
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(d) - set(fields))
        if unknown:
            raise ConfigError(f"{cls.__name__} has no field {', '.join(map(repr, unknown))}; "
                              f"its fields: {', '.join(fields)}")
        kwargs = {}
        for name, v in d.items():
            f = fields[name]
            if f.metadata.get("opaque"):
                continue
            kwargs[name] = _tuples(v) if _is_tuple_field(f) else v
        return cls(**kwargs)


# configs that are not recipe stages (the stages' own come from the stage table, torchfast.stages)
_NOT_STAGES = ("torchfast.pipeline", "torchfast.search")


def _load_configs() -> None:
    """Import every stage config of the table, and the other configs, so their classes can be found by name."""
    from .stages import STAGES
    for stage in list(STAGES.values()):
        stage.config_class()
    for mod in _NOT_STAGES:
        importlib.import_module(mod)


def _subclasses(c: type) -> list[type]:
    out = []
    for s in c.__subclasses__():
        out += [s, *_subclasses(s)]
    return out


def config_from_dict(d: Mapping[str, Any]) -> Config:
    """Any torchfast config from its ``to_dict()`` form, the class found by ``d["type"]``: a class name
    (``"LowRank"``) or, where names repeat (the backends' ``Options``), a dotted path."""
    if not isinstance(d, Mapping) or not isinstance(d.get("type"), str):
        raise ConfigError(f"config_from_dict takes a dict with a 'type' key naming the config class, got {d!r}")
    t = d["type"]
    if "." in t:
        mod, _, name = t.rpartition(".")
        try:
            cls = getattr(importlib.import_module(mod), name)
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"config type {t!r} cannot be imported: {e}") from e
        if not (isinstance(cls, type) and issubclass(cls, Config)):
            raise ConfigError(f"{t!r} is not a torchfast config class")
        return cls.from_dict(d)
    _load_configs()
    found = {c for c in _subclasses(Config) if c.__name__ == t and c.__module__.startswith("torchfast")}
    if not found:
        known = sorted({c.__name__ for c in _subclasses(Config) if c.__module__.startswith("torchfast")})
        raise ConfigError(f"no torchfast config is called {t!r}; known: {', '.join(known)}")
    if len(found) > 1:
        paths = sorted(f"{c.__module__}.{c.__qualname__}" for c in found)
        raise ConfigError(f"several torchfast configs are called {t!r}; give the dotted type: {', '.join(paths)}")
    return found.pop().from_dict(d)


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


def check_flag(cls_name: str, field: str, value: Any, none: str = "") -> None:
    """True, False or (with ``none``, what None means) None; by identity, so 1 and 0 are refused too."""
    allowed = (True, False) + ((None,) if none else ())
    if not any(value is v for v in allowed):
        words = (f"None ({none}), " if none else "") + "True or False"
        raise ConfigError(f"{cls_name}.{field} must be {words}, got {value!r}")


def check_exclude(cls_name: str, value: Any, field: str = "exclude") -> tuple[str, ...]:
    """``value`` as a tuple of non-empty module names / globs; a bare string is refused (it is not a list of names)."""
    if isinstance(value, str):
        raise ConfigError(f"{cls_name}.{field} must be a tuple of module names or globs, got the string {value!r}; "
                          f"write {field}=({value!r},)")
    if not isinstance(value, (tuple, list)):
        raise ConfigError(f"{cls_name}.{field} must be a tuple of module names or globs, got {value!r}")
    for x in value:
        if not isinstance(x, str) or not x.strip():
            raise ConfigError(f"{cls_name}.{field} entries must be non-empty module names or globs, got {x!r}")
    return tuple(value)
