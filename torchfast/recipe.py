"""Recipes: a list of configs, each applied by the transform that owns its config type.

Each transform package registers ``config type -> transform`` here, so ``optimize()``, the demo and the
CLI run any recipe without knowing the transforms, and no step is implemented twice. Every transform
has the same signature, ``fn(model, config, *, example_inputs, calibration, inplace) -> (model, report)``.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable, Iterable

from torch import nn

from .config import Config
from .report import Report

# A transform: fn(model, config, *, example_inputs, calibration, inplace) -> (model, report). Stages run it
# with inplace=True: their callers (optimize, the demo, the CLI) hand it their own copy of the model.
StageFn = Callable[..., tuple[nn.Module, Report]]

_STAGES: dict[type, StageFn] = {}
# packages that register stages when imported
_PROVIDERS = ("torchfast.lowrank", "torchfast.prune", "torchfast.quant")


def register_stage(config_type: type, fn: StageFn) -> None:
    _STAGES[config_type] = fn


def _load_providers() -> None:
    for name in _PROVIDERS:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:  # a real missing dependency inside the package: surface it
                raise


def stage_for(config: Config) -> StageFn:
    if not isinstance(config, Config):
        raise TypeError(f"recipe entries must be torchfast configs (LowRank(...), Int8Static(...), ...), "
                        f"got {type(config).__name__}")
    _load_providers()
    for t in type(config).__mro__:
        if t in _STAGES:
            return _STAGES[t]
    raise TypeError(f"no transform is registered for {type(config).__name__}")


def apply_stage(model: nn.Module, config: Config, example_inputs: Any = None,
                calibration: list | None = None) -> tuple[nn.Module, Report]:
    """Run the transform of ``config`` on ``model`` in place (the caller passes its own copy)."""
    return stage_for(config)(model, config, example_inputs=example_inputs, calibration=calibration, inplace=True)


def apply_recipe(model: nn.Module, recipe: Iterable[Config], example_inputs: Any = None,
                 calibration: list | None = None) -> tuple[nn.Module, list[Report]]:
    reports = []
    for cfg in recipe:
        model, rep = apply_stage(model, cfg, example_inputs, calibration)
        reports.append(rep)
    return model, reports
