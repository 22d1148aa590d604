"""Shared pieces of the quantization transforms: refusing already-quantized models, capturing each
layer's real inputs, and per-layer timing."""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from ..measure import compare_latency
from ..modules import capture_inputs  # re-exported for quant's modules
from ..errors import TorchfastError

__all__ = ["AlreadyQuantizedError", "check_not_quantized", "capture_inputs", "time_layer"]


class AlreadyQuantizedError(TorchfastError, ValueError):
    """The model already holds quantized layers; quantizing again would compound errors or fail obscurely."""


_QUANT_MODULE_PREFIXES = ("torch.ao.nn.quantized", "torch.ao.nn.intrinsic.quantized", "torch.nn.quantized",
                          "torch.ao.quantization.observer", "torch.ao.quantization.fake_quantize")


def _quantized_reason(name: str, mod: nn.Module) -> str | None:
    cls = type(mod)
    if any(cls.__module__.startswith(p) for p in _QUANT_MODULE_PREFIXES) or cls.__module__.startswith("torchfast.quant"):
        return f"module {name or '<root>'!r} is {cls.__module__}.{cls.__name__}"
    for pname, p in mod.named_parameters(recurse=False):
        if type(p.data) is not torch.Tensor and type(p) not in (nn.Parameter, torch.Tensor):
            return f"parameter {(name + '.' if name else '') + pname!r} is a {type(p).__name__} (torchao quantized tensor)"
        if type(p) is nn.Parameter and type(p.data) is not torch.Tensor:
            return f"parameter {(name + '.' if name else '') + pname!r} holds a {type(p.data).__name__}"
        if p.dtype in (torch.qint8, torch.quint8, torch.qint32) or p.dtype in (torch.int8, torch.uint8):
            return f"parameter {(name + '.' if name else '') + pname!r} has dtype {p.dtype}"
    if isinstance(mod, torch.fx.GraphModule):
        for node in mod.graph.nodes:
            t = str(node.target)
            if "quantize_per_tensor" in t or "quantize_per_channel" in t or "quantized_decomposed" in t:
                return f"module {name or '<root>'!r} is a quantized graph (node {node.name}: {t})"
    return None


def check_not_quantized(model: nn.Module, scheme: str) -> None:
    for name, mod in model.named_modules():
        why = _quantized_reason(name, mod)
        if why:
            raise AlreadyQuantizedError(f"cannot apply {scheme}: the model is already quantized ({why}); "
                                        f"quantize the original floating-point model instead")


def skipped(name: str, skip: tuple[str, ...]) -> bool:
    return any(name == s or name.startswith(s + ".") for s in skip)


def time_layer(fp32: Callable, candidate: Callable, args: tuple, runs: int = 9) -> tuple[float, float]:
    """(fp32 ms, candidate ms): medians, interleaved, on the layer's real input."""
    cmp = compare_latency(fp32, candidate, args, runs=runs, warmup=2)
    return cmp.baseline.median_ms, cmp.candidate.median_ms
