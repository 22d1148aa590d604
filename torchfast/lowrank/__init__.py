"""Low-rank factorization of Conv2d/Linear layers: ``model, report = decompose(model, LowRank(...), example_inputs=x)``.

Methods: truncated SVD (Linear), channel decomposition, spatial SVD and Tucker-2 (Conv2d); data-aware
(activation-whitened) whenever calibration batches are given; measured speed guard; accuracy-budgeted
per-layer rank search.
"""
from __future__ import annotations

from .config import LowRank
from .layers import LowRankConv2d, LowRankLinear
from .rewrite import decompose

__all__ = ["decompose", "LowRank", "LowRankLinear", "LowRankConv2d"]
