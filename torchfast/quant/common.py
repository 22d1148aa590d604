"""Shared pieces of the quantization transforms: refusing already-quantized models, capturing each
layer's real inputs, and per-layer timing."""
from __future__ import annotations

import fnmatch
from typing import Any, Callable, Iterable

from torch import nn

from ..measure import compare_latency, resolve_timing
from ..modules import capture_inputs  # re-exported for quant's modules
from ..config import ConfigError
from ..errors import TorchfastError
from ..quantized import quantization_of
from ..transform import Exclusion

__all__ = ["AlreadyQuantizedError", "check_not_quantized", "capture_inputs", "time_layer", "exclusion",
           "rewritable_layers"]


class AlreadyQuantizedError(TorchfastError, ValueError):
    """The model already holds quantized layers; quantizing again would compound errors or fail obscurely."""


def check_not_quantized(model: nn.Module, scheme: str) -> None:
    """Refuse a model that is already quantized (or cast by HalfPrecision), naming where it shows."""
    q = quantization_of(model)
    if q is not None:
        raise AlreadyQuantizedError(f"cannot apply {scheme}: the model is already quantized ({q.where}); "
                                    f"quantize the original floating-point model instead")


def time_layer(fp32: Callable, candidate: Callable, args: tuple) -> tuple[float, float]:
    """(fp32 ms, candidate ms): medians, interleaved, on the layer's real input; one layer takes half of
    ``torchfast.measure.DEFAULT_TIMING`` (10 runs, 2 warm-up calls by default)."""
    cmp = compare_latency(fp32, candidate, args, timing=resolve_timing(share=0.5))
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


def rewritable_layers(model: nn.Module, batch: Any, ex: Exclusion, types: tuple[type, ...],
                      plain: Callable[[nn.Module], bool], own_forward: str) -> tuple[list[str], dict[str, str]]:
    """Layers of ``types`` whose float weights a pre-quantization rewrite may change, and why the others may
    not: excluded, a subclass with its own forward (``plain`` says no; ``own_forward`` is the reason's tail),
    a non-float or tied weight, or a weight the model's code reads outside the layer's forward."""
    from collections import Counter

    from ..modules import ExampleInputError, weight_readers
    from .calibrate import CalibrationError

    counts = Counter(id(p) for _, m in model.named_modules() for p in m.parameters(recurse=False))
    names, skipped = [], {}
    for n, m in model.named_modules():
        if not isinstance(m, types) or n == "":
            continue
        if ex(n):
            skipped[n] = ex.reason(n)
        elif not plain(m):
            skipped[n] = f"{type(m).__name__} has its own forward; {own_forward}"
        elif not m.weight.is_floating_point():
            skipped[n] = f"weight is {m.weight.dtype}"
        elif counts[id(m.weight)] > 1:
            skipped[n] = "its weight is shared with another module (tied)"
        else:
            names.append(n)
    try:
        readers = weight_readers(model, names, batch) if names else set()
    except ExampleInputError as e:
        raise CalibrationError(f"{type(model).__name__} fails on calibration batch 0: "
                               f"{str(e).split(': ', 1)[-1]}") from e.__cause__
    for n in sorted(readers):
        skipped[n] = "the model's code reads its .weight outside its forward"
        names.remove(n)
    return names, skipped
