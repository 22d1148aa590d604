"""Recipes as one short string, for the command line and for quick experiments.

Syntax: stages separated by ``,`` (or ``+``); a stage is ``name`` or ``name:key=value,key=value``. A token
with ``=`` and no ``:`` continues the parameters of the stage before it, so

    lowrank:ratio=0.5,method=svd,prune:amount=0.3,int8-static:observer=histogram

is ``[LowRank(ratio=0.5, method="svd"), ChannelPruning(amount=0.3), Int8Static(observer="histogram")]``.
Values are parsed as int, float, true/false, none, or text; ``a/b/c`` is a tuple. The names are those of
the stage table (``torchfast.stages``), each standing for a config class (imported lazily), so parameter
names are that config's fields. ``"none"`` is the empty recipe. ``"auto"`` is not a list of stages but
the search ``optimize(model, x, recipe="auto")`` runs (``torchfast.search``); this parser refuses it.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch

from .config import Config, ConfigError, _modern_kwargs
from .specs import SpecError, parse_dtype
from .stages import STAGES, recipe_help, stage_named

__all__ = ["parse_recipe", "recipe_help", "RecipeSyntaxError"]


class RecipeSyntaxError(ConfigError):
    """A recipe string cannot be parsed; the message names the token."""


def parse_value(text: str) -> Any:
    t = text.strip()
    low = t.lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    if low in ("none", "null"):
        return None
    if "/" in t:
        return tuple(parse_value(x) for x in t.split("/") if x)
    for conv in (int, float):
        try:
            return conv(t)
        except ValueError:
            pass
    return t


def _coerce(cls: type, key: str, value: Any) -> Any:
    """Match a parsed value to the field's default type (dtype names -> torch.dtype, tuples for tuples)."""
    for f in dataclasses.fields(cls):
        if f.name != key:
            continue
        default = f.default
        if isinstance(default, torch.dtype) or "dtype" in key:
            if isinstance(value, str):
                try:
                    return parse_dtype(value, f"{cls.__name__}.{key}")
                except SpecError as e:
                    raise RecipeSyntaxError(str(e)) from None
        if isinstance(default, tuple) and not isinstance(value, tuple):
            return (value,)
        if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
    return value


def _build(name: str, params: dict[str, str], text: str) -> Config:
    found = stage_named(name)
    if found is None:
        known = ", ".join(n for s in STAGES.values() for n in s.names)
        raise RecipeSyntaxError(f"unknown stage {name!r} in recipe {text!r}; known: {known}")
    stage, preset = found
    cls_name = stage.config_name
    try:
        cls = stage.config_class()
    except (ImportError, AttributeError) as e:
        raise RecipeSyntaxError(f"stage {name!r} needs {stage.config_path}, which is not available: {e}") from e
    params = _modern_kwargs(cls, params)  # former names (skip, ignored) -> exclude; inplace is refused
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(params) - fields)
    if unknown:
        raise RecipeSyntaxError(f"stage {name!r} ({cls_name}) has no parameter {', '.join(map(repr, unknown))}; "
                                f"its parameters: {', '.join(sorted(fields))}")
    kwargs = {k: _coerce(cls, k, v) for k, v in preset.items()}
    kwargs.update({k: _coerce(cls, k, parse_value(v)) for k, v in params.items()})
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise RecipeSyntaxError(f"stage {name!r}: {e}") from e


def parse_recipe(text: str, model: Any = None) -> list[Config]:
    """Parse a recipe string (see the module docstring) into a list of configs; ``"none"`` is the empty
    recipe. ``model`` is accepted for compatibility and unused."""
    if not isinstance(text, str):
        raise RecipeSyntaxError(f"a recipe string is expected, got {type(text).__name__}")
    if text.strip().lower() == "none":
        return []
    if text.strip().lower() == "auto":
        raise RecipeSyntaxError("recipe 'auto' is a search, not a list of stages: optimize(model, x, recipe='auto') "
                                "(torchfast optimize --recipe auto) runs it and reports the stages it chose")
    stages: list[tuple[str, dict[str, str]]] = []
    for chunk in text.split("+"):
        for tok in chunk.split(","):
            tok = tok.strip()
            if not tok:
                continue
            if ":" in tok:
                name, _, first = tok.partition(":")
                stages.append((name.strip(), {}))
                tok = first.strip()
                if not tok:
                    continue
            elif "=" not in tok:
                stages.append((tok, {}))
                continue
            if "=" not in tok:
                raise RecipeSyntaxError(f"expected key=value after ':' in recipe {text!r}, got {tok!r}")
            if not stages:
                raise RecipeSyntaxError(f"parameter {tok!r} comes before any stage name in recipe {text!r}")
            k, _, v = tok.partition("=")
            if not k.strip() or not v.strip():
                raise RecipeSyntaxError(f"empty key or value in {tok!r} (recipe {text!r})")
            stages[-1][1][k.strip()] = v
    if not stages:
        raise RecipeSyntaxError(f"empty recipe {text!r}")
    return [_build(n, p, text) for n, p in stages]
