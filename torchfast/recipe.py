"""Recipes: a list of configs, each applied by the transform its entry in ``torchfast.stages`` names.

``optimize()``, the demo and the CLI run any recipe without knowing the transforms, and no step is
implemented twice. Every transform has the same signature,
``fn(model, config, *, example_inputs, calibration, inplace) -> (model, report)``.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

from torch import nn

from .config import Config
from .report import Report
from .stages import stage_of

# A transform: fn(model, config, *, example_inputs, calibration, inplace) -> (model, report). Stages run it
# with inplace=True: their callers (optimize, the demo, the CLI) hand it their own copy of the model.
StageFn = Callable[..., tuple[nn.Module, Report]]


def stage_for(config: Config) -> StageFn:
    """The transform of ``config``, from its entry in the stage table (checked before any work)."""
    if not isinstance(config, Config):
        raise TypeError(f"recipe entries must be torchfast configs (LowRank(...), Int8Static(...), ...), "
                        f"got {type(config).__name__}")
    stage = stage_of(config)
    if stage is None:
        raise TypeError(f"no transform is registered for {type(config).__name__}; add one with "
                        f"torchfast.stages.register_stage(Stage({type(config).__name__}, transform, names))")
    return stage.transform_fn()


def apply_stage(model: nn.Module, config: Config, example_inputs: Any = None,
                calibration: list | None = None, **options: Any) -> tuple[nn.Module, Report]:
    """Run the transform of ``config`` on ``model`` in place (the caller passes its own copy). ``options``
    go to transforms that take more (``quantize``'s validation / tolerance / eval_fn)."""
    return stage_for(config)(model, config, example_inputs=example_inputs, calibration=calibration, inplace=True,
                             **options)


def apply_recipe(model: nn.Module, recipe: Iterable[Config], example_inputs: Any = None,
                 calibration: list | None = None) -> tuple[nn.Module, list[Report]]:
    reports = []
    for cfg in recipe:
        model, rep = apply_stage(model, cfg, example_inputs, calibration)
        reports.append(rep)
    return model, reports
