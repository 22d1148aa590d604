"""What every transform shares.

The contract: ``fn(model, config=None, *, example_inputs=None, calibration=None, inplace=False) ->
(model, report)``. ``inplace=False`` never changes the argument; ``inplace=True`` reuses it where the
module tree allows. Every transform config has ``exclude``: qualified module names or fnmatch globs
(a name covers its submodules), checked against the model here so a typo fails loudly instead of
excluding nothing.
"""
from __future__ import annotations

import difflib
import fnmatch
import functools
import warnings
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn

from .config import ConfigError, user_stacklevel

__all__ = ["Exclusion", "require_names", "legacy_positional", "user_stacklevel"]


def _suggest(name: str, names: Iterable[str]) -> str:
    """`` (did you mean 'a', 'b'?)``: the closest names, best first (ties by name), then names containing it."""
    names = sorted({n for n in names if n})
    plain = name.replace("*", "").replace("?", "")
    scored = sorted((-difflib.SequenceMatcher(None, name, n).ratio(), n) for n in names)
    close = [n for score, n in scored if -score >= 0.6][:3]
    close += [n for n in names if plain and plain in n and n not in close]
    close = close[:3]
    return f" (did you mean {', '.join(map(repr, close))}?)" if close else ""


def require_names(model: nn.Module, names: Iterable[str], where: str) -> None:
    """Raise ConfigError for the first of ``names`` (exact qualified names) that is no submodule of ``model``."""
    have = {n for n, _ in model.named_modules()}
    for name in names:
        if name not in have:
            raise ConfigError(f"{where} names {name!r}, but {type(model).__name__} has no such submodule"
                              + _suggest(name, have))


class Exclusion:
    """The layers a config's ``exclude`` keeps out of a transform.

    ``match(name)`` is the pattern covering ``name`` (the name itself or one of its parents matched by a
    name or a glob), or None. Build it with :meth:`resolve` to check every pattern against a model.
    """

    def __init__(self, patterns: Iterable[str] = (), owner: str = "config") -> None:
        self.patterns = tuple(patterns)
        self.owner = owner

    @classmethod
    def resolve(cls, model: nn.Module, config: Any) -> "Exclusion":
        """The exclusion of ``config.exclude`` on ``model``; a name or glob matching no submodule is a ConfigError."""
        owner = type(config).__name__
        ex = cls(getattr(config, "exclude", ()), owner)
        names = [n for n, _ in model.named_modules() if n]
        for p in ex.patterns:
            if not any(ex._hits(p, n) for n in names):
                raise ConfigError(f"{owner}.exclude names {p!r}, but {type(model).__name__} has no submodule "
                                  f"matching it" + _suggest(p, names))
        return ex

    @staticmethod
    def _hits(pattern: str, name: str) -> bool:
        return name == pattern or fnmatch.fnmatchcase(name, pattern)

    def match(self, name: str) -> str | None:
        if not self.patterns or not name:
            return None
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            prefix = ".".join(parts[:i])
            for p in self.patterns:
                if self._hits(p, prefix):
                    return p
        return None

    def __call__(self, name: str) -> bool:
        return self.match(name) is not None

    def __bool__(self) -> bool:
        return bool(self.patterns)

    def reason(self, name: str) -> str:
        p = self.match(name)
        return f"excluded by {self.owner}.exclude ({p!r})"

    def roots(self, model: nn.Module) -> tuple[str, ...]:
        """The outermost submodules the patterns cover, by name: for APIs that take plain names."""
        out = []
        for n, _ in model.named_modules():
            if n and self(n) and not any(n.startswith(r + ".") for r in out):
                out.append(n)
        return tuple(out)


def _is_batch(x: Any) -> bool:
    return isinstance(x, (torch.Tensor, tuple, list, Mapping))


def legacy_positional(old_order: tuple[str, ...],
                      adapt: Callable[[Any, dict], dict] | None = None) -> Callable:
    """Accept a transform's former positional arguments (``old_order``, after ``model``) for now, with a
    FutureWarning naming the keyword spelling. ``old_order`` starting with ``example_inputs`` (prune)
    is recognised by a batch (tensor, tuple, list, dict) where the config belongs. ``adapt(model, kwargs)``
    turns former keywords into current ones."""
    def deco(fn: Callable) -> Callable:
        name = fn.__name__

        @functools.wraps(fn)
        def wrapper(model: Any, *args: Any, **kwargs: Any) -> Any:
            swapped = old_order[0] != "config" and bool(args) and _is_batch(args[0])
            legacy = swapped or (old_order[0] == "config" and len(args) > 1)
            if legacy:
                if len(args) > len(old_order):
                    raise TypeError(f"{name}() takes model and config positionally, got {1 + len(args)} "
                                    f"positional arguments")
                given = old_order[:len(args)]
                for k, v in zip(given, args):
                    if k in kwargs:
                        raise TypeError(f"{name}() got multiple values for argument {k!r}")
                    kwargs[k] = v
                new = ", ".join(["model", "config"] + [f"{k}=..." for k in given if k != "config"])
                warnings.warn(f"{name}({', '.join(['model', *given])}) is the former argument order; "
                              f"call {name}({new})", FutureWarning, stacklevel=user_stacklevel())
                args = ()
            elif len(args) > 1:
                raise TypeError(f"{name}() takes model and config positionally; pass "
                                f"example_inputs=, calibration=, inplace= by keyword")
            elif args:
                if "config" in kwargs:
                    raise TypeError(f"{name}() got multiple values for argument 'config'")
                kwargs["config"] = args[0]
            if adapt is not None:
                kwargs = adapt(model, kwargs)
            return fn(model, **kwargs)
        return wrapper
    return deco
