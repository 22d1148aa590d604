"""Is this model quantized, and how: one answer for the backends, the quantizers and the reports.

The kind decides which backends can compile a model (packed torch.ao kernels run in eager and
TorchScript only, a PT2E graph needs a graph compiler, ...), quantizing a quantized model again would
compound errors, and FLOP counters cannot see integer kernels. :func:`quantization_of` looks once, in
this order of precedence: quantized module classes, quantized tensors (torch.ao, torchao), quantize/
dequantize graph ops, then weights held as integers or in another tensor subclass.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["Quantization", "quantization_of", "quantization_kind", "quantized_module_kind", "KINDS",
           "COMPILE_KINDS"]

# kind -> how a message describes it
KINDS: dict[str, str] = {
    "ao": "torch.ao quantized modules",
    "torchao": "torchao-quantized weights",
    "pt2e": "a PT2E quantize/dequantize graph",
    "modelopt": "ModelOpt fake-quant modules",
    "int8": "int8/uint8 weights",
    "subclass": "weights in a tensor subclass (a packed or sparse format)",
    "observed": "torch.ao observers or fake-quantize modules (prepared, not converted)",
    "half": "torchfast HalfPrecision casting",
}
# the kinds that change which backends can compile a model (the others compile as float models)
COMPILE_KINDS = ("ao", "torchao", "pt2e", "modelopt")
# kinds whose weights are stored in a quantized format
_STORED = ("ao", "torchao", "pt2e", "int8", "subclass")

_AO_PREFIXES = ("torch.ao.nn.quantized", "torch.nn.quantized", "torch.ao.nn.intrinsic.quantized",
                "torch.nn.intrinsic.quantized")
_OBSERVER_PREFIXES = ("torch.ao.quantization.observer", "torch.ao.quantization.fake_quantize",
                      "torch.quantization.observer", "torch.quantization.fake_quantize")
_QDQ_OPS = ("quantize_per_tensor", "quantize_per_channel", "quantized_decomposed")


@dataclass(frozen=True)
class Quantization:
    """How a model is quantized: ``kind`` (a key of :data:`KINDS`) and ``where`` it was seen."""
    kind: str
    where: str

    @property
    def text(self) -> str:
        return KINDS[self.kind]

    @property
    def stored(self) -> bool:
        """Weights are held in a quantized format (not float tensors a FLOP counter can see)."""
        return self.kind in _STORED


def quantized_module_kind(module: nn.Module) -> str | None:
    """The kind a module's own class says (a torch.ao quantized layer, a ModelOpt quantizer, an observer,
    torchfast's HalfPrecision wrapper), from its class and base classes; None for an ordinary layer."""
    for cls in type(module).__mro__:
        mod = cls.__module__ or ""
        if mod.startswith(_AO_PREFIXES):
            return "ao"
        if mod.startswith("modelopt."):
            return "modelopt"
        if mod.startswith(_OBSERVER_PREFIXES):
            return "observed"
    half = sys.modules.get("torchfast.quant.half")  # not imported: no HalfPrecisionModule can exist
    if half is not None and isinstance(module, half.HalfPrecisionModule):
        return "half"
    return None


def _tensor_kind(t: torch.Tensor) -> str | None:
    """torchao subclass or torch quantized dtype: the formats that decide backends."""
    data = t.data if isinstance(t, nn.Parameter) else t
    if type(data).__module__.startswith("torchao") or type(t).__module__.startswith("torchao"):
        return "torchao"
    if t.is_quantized:
        return "ao"
    return None


def _weight_format(t: torch.Tensor) -> str | None:
    """A parameter held as integers or in another tensor subclass (2:4 sparse, a custom packing)."""
    if not isinstance(t, nn.Parameter):
        return None
    if type(t.data) is not torch.Tensor:
        return "subclass"
    if t.dtype in (torch.int8, torch.uint8):
        return "int8"
    return None


def _graph_op(module: nn.Module) -> str | None:
    if isinstance(module, torch.fx.GraphModule):
        for node in module.graph.nodes:
            if node.op == "call_function" and any(op in str(node.target) for op in _QDQ_OPS):
                return f"{node.name}: {node.target}"
    return None


def _by_class(modules: list[tuple[str, nn.Module]]) -> Quantization | None:
    for name, m in modules:
        kind = quantized_module_kind(m)
        if kind is not None:
            return Quantization(kind, f"module {name or '<root>'!r} is {type(m).__module__}.{type(m).__name__}")
    return None


def _by_tensors(modules: list[tuple[str, nn.Module]], check) -> Quantization | None:
    for name, m in modules:
        prefix = name + "." if name else ""
        for tname, t in [*m.named_parameters(recurse=False), *m.named_buffers(recurse=False)]:
            kind = check(t)
            if kind is not None:
                data = t.data if isinstance(t, nn.Parameter) else t
                what = "parameter" if isinstance(t, nn.Parameter) else "buffer"
                held = f"a {type(data).__name__}" if type(data) is not torch.Tensor else f"dtype {t.dtype}"
                return Quantization(kind, f"{what} {prefix + tname!r} holds {held}")
    return None


def _by_graph(modules: list[tuple[str, nn.Module]]) -> Quantization | None:
    for name, m in modules:
        op = _graph_op(m)
        if op is not None:
            return Quantization("pt2e", f"module {name or '<root>'!r} is a quantized graph (node {op})")
    return None


def quantization_of(model: nn.Module) -> Quantization | None:
    """How ``model`` is quantized, or None for a float model (a TorchScript module counts as float here)."""
    if isinstance(model, torch.jit.ScriptModule) or not isinstance(model, nn.Module):
        return None
    modules = list(model.named_modules())
    return (_by_class(modules) or _by_tensors(modules, _tensor_kind) or _by_graph(modules)
            or _by_tensors(modules, _weight_format))


def quantization_kind(model: nn.Module) -> str | None:
    """The kind of quantization that decides the backends able to compile ``model`` (one of
    :data:`COMPILE_KINDS`), None for a float model, including a half-precision or only-observed one."""
    q = quantization_of(model)
    return q.kind if q is not None and q.kind in COMPILE_KINDS else None
