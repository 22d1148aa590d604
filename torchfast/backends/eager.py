"""Eager: the module as it is, under ``inference_mode`` — the baseline every other backend is measured against."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from ..config import Config
from .compiled import Built


@dataclass(frozen=True)
class Options(Config):
    """Eager takes no options."""


def build(model: nn.Module, example_inputs: Any, options: Options, *, dynamic_batch: bool = False) -> Built:
    return Built(runnable=model)
