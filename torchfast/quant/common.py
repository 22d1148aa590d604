"""Shared pieces of the quantization transforms: refusing already-quantized models, capturing each
layer's real inputs, and per-layer timing."""
from __future__ import annotations

import fnmatch
from typing import Any, Callable, Iterable

from torch import nn

from ..measure import compare_latency
from ..modules import capture_inputs  # re-exported for quant's modules
from ..config import ConfigError
from ..errors import TorchfastError
from ..quantized import quantization_of
from ..transform import Exclusion

__all__ = ["AlreadyQuantizedError", "check_not_quantized", "capture_inputs", "time_layer", "exclusion"]


class AlreadyQuantizedError(TorchfastError, ValueError):
    """The model already holds quantized layers; quantizing again would compound errors or fail obscurely."""


def check_not_quantized(model: nn.Module, scheme: str) -> None:
    """Refuse a model that is already quantized (or cast by HalfPrecision), naming where it shows."""
    q = quantization_of(model)
    if q is not None:
        raise AlreadyQuantizedError(f"cannot apply {scheme}: the model is already quantized ({q.where}); "
                                    f"quantize the original floating-point model instead")


def time_layer(fp32: Callable, candidate: Callable, args: tuple, runs: int = 9) -> tuple[float, float]:
    """(fp32 ms, candidate ms): medians, interleaved, on the layer's real input."""
    cmp = compare_latency(fp32, candidate, args, runs=runs, warmup=2)
    return cmp.baseline.median_ms, cmp.candidate.median_ms


def exclusion(model: nn.Module, patterns: Iterable[str], owner: str) -> Exclusion:
    """``patterns`` (submodule names or globs) of a plain function's ``exclude=`` as an Exclusion; a pattern
    that matches no submodule is a ConfigError naming it."""
    if isinstance(patterns, str):
        patterns = (patterns,)
    ex = Exclusion(tuple(patterns), owner)
    names = [n for n, _ in model.named_modules() if n]
    for p in ex.patterns:
        if not any(n == p or fnmatch.fnmatchcase(n, p) for n in names):
            raise ConfigError(f"{owner}(exclude=...) names {p!r}, but {type(model).__name__} has no submodule "
                              f"matching it")
    return ex
