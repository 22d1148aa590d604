"""Low-rank factorization of Conv2d/Linear layers: ``model, report = decompose(model, LowRank(...))``.

Methods: truncated SVD (Linear), channel decomposition, spatial SVD and Tucker-2 (Conv2d); data-aware
(activation-whitened) whenever calibration batches are given; measured speed guard; accuracy-budgeted
per-layer rank search.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from ..recipe import register_stage
from ..report import Report
from .config import LowRank
from .layers import LowRankConv2d, LowRankLinear
from .rewrite import decompose

__all__ = ["decompose", "LowRank", "LowRankLinear", "LowRankConv2d"]


def _stage(model: nn.Module, config: LowRank, example_inputs: Any, calibration: list | None) -> tuple[nn.Module, Report]:
    # stages run on their caller's own copy
    return decompose(model, config, calibration=calibration, example_inputs=example_inputs, inplace=True)


register_stage(LowRank, _stage)
