"""What each backend can do, declared up front, so an impossible request fails before any work.

A :class:`Backend` names the devices, compute dtypes, kinds of quantized model and dynamic-shape
support of one compile path, plus the optional package it needs. :func:`check` compares a request
against that declaration and raises one :class:`BackendError` listing every mismatch.
"""
from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import TorchfastError
from ..quantized import COMPILE_KINDS, KINDS, quantization_kind
from ..specs import DTYPES, SpecError, dtype_name, parse_dtype

__all__ = ["Backend", "BackendError", "BACKENDS", "get_backend", "list_backends", "check",
           "quantization_kind", "normalize_dtype", "DTYPE_NAMES"]


class BackendError(TorchfastError, ValueError):
    """A backend cannot do what was asked (or is not installed); the message says what to change."""


# the compute dtypes a backend can be asked for by name (any spelling parse_dtype reads)
DTYPE_NAMES: dict[str, torch.dtype] = {k: v for k, v in DTYPES.items() if v in (torch.float32, torch.float16,
                                                                              torch.bfloat16)}


def normalize_dtype(dtype: Any) -> torch.dtype:
    """The compute dtype asked for: None -> fp32; a name must spell fp32, fp16 or bf16."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        dt = parse_dtype(dtype)
    except SpecError:
        dt = None
    if dt not in (torch.float32, torch.float16, torch.bfloat16):
        raise BackendError(f"dtype must be one of fp32, fp16, bf16 (or a torch.dtype), got {dtype!r}")
    return dt


def _short(dtype: torch.dtype) -> str:
    return dtype_name(dtype, short=True)


@dataclass(frozen=True)
class Backend:
    """The declared capabilities of one compile path."""
    name: str
    module: str                      # torchfast.backends.<file> holding build() and Options
    devices: tuple[str, ...]         # torch device types it runs on
    dtypes: tuple[torch.dtype, ...]  # compute dtypes it accepts
    quantized: tuple[str, ...]       # kinds of quantized model it compiles (see quantization_kind)
    dynamic_batch: bool              # can serve a batch size other than the example's
    requires: str | None = None      # optional package imported lazily
    artifact: str | None = None      # save() format it produces natively
    install_hint: str = ""
    summary: str = ""

    def available(self) -> tuple[bool, str]:
        """(usable here, why not) — checks the optional package without importing heavy code twice."""
        if self.requires is None:
            return True, ""
        if importlib.util.find_spec(self.requires) is None:
            return False, f"backend {self.name!r} needs the {self.requires} package, which is not installed. {self.install_hint}".strip()
        return True, ""

    def load(self):
        return importlib.import_module(self.module)


BACKENDS: dict[str, Backend] = {b.name: b for b in [
    Backend("eager", "torchfast.backends.eager", ("cpu", "cuda", "xla"),
            (torch.float32, torch.float16, torch.bfloat16), ("ao", "torchao", "pt2e", "modelopt"), True,
            summary="the module as it is, under inference_mode"),
    Backend("torchscript", "torchfast.backends.torchscript", ("cpu", "cuda"),
            (torch.float32, torch.float16, torch.bfloat16), ("ao", "pt2e"), True, artifact="torchscript",
            summary="torch.jit.trace/script -> freeze -> optimize_for_inference"),
    Backend("inductor", "torchfast.backends.inductor", ("cpu", "cuda"),
            (torch.float32, torch.float16, torch.bfloat16), ("torchao", "pt2e"), True,
            summary="torch.compile(backend='inductor') with weight freezing; CUDA: fp16/bf16, CUDA graphs"),
    Backend("export", "torchfast.backends.export", ("cpu", "cuda"),
            (torch.float32, torch.float16, torch.bfloat16), ("torchao", "pt2e"), True, artifact="exported_program",
            summary="torch.export -> ExportedProgram (.pt2), loadable with plain torch"),
    Backend("tensorrt", "torchfast.backends.tensorrt", ("cuda",),
            (torch.float32, torch.float16, torch.bfloat16), ("modelopt",), True, requires="torch_tensorrt",
            artifact="tensorrt", install_hint="Install it on a CUDA host: pip install 'torchfast[tensorrt]'.",
            summary="torch_tensorrt.compile(ir='dynamo'); engines saved as an ExportedProgram"),
    Backend("onnxruntime", "torchfast.backends.onnxruntime", ("cpu", "cuda"),
            (torch.float32, torch.float16), ("onnx_int8",), True, requires="onnxruntime", artifact="onnx",
            install_hint="pip install 'torchfast[onnxruntime]'",
            summary="torch.onnx.export -> ONNX Runtime InferenceSession (all graph optimizations); int8 as QDQ"),
    Backend("openvino", "torchfast.backends.openvino", ("cpu",),
            (torch.float32, torch.float16, torch.bfloat16), ("openvino_int8",), True, requires="openvino",
            artifact="openvino", install_hint="pip install 'torchfast[openvino]'",
            summary="openvino.convert_model -> compile_model (fp32 unless asked); int8 through NNCF"),
    Backend("xla", "torchfast.backends.xla", ("xla",),
            (torch.float32, torch.bfloat16), (), False, requires="torch_xla",
            install_hint="Install it on a TPU host (torch_xla pins its own torch version); `make test-xla` builds one on CPU.",
            summary="torch_xla device + torch.compile(backend='openxla'), PJRT device from the environment"),
]}


def list_backends() -> list[str]:
    return list(BACKENDS)


def get_backend(name: str) -> Backend:
    try:
        return BACKENDS[name]
    except KeyError:
        raise BackendError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}") from None


_KIND_TEXT = {k: KINDS[k] for k in COMPILE_KINDS}


def check(name: str, *, device: str, dtype: torch.dtype, quant_kind: str | None, dynamic_batch: bool,
          scripted: bool = False) -> Backend:
    """Validate a compile request against the backend's declaration; one error listing every problem."""
    b = get_backend(name)
    problems = []
    if device not in b.devices:
        problems.append(f"device {device!r} is not supported (supported: {', '.join(b.devices)})")
    if dtype not in b.dtypes:
        problems.append(f"dtype {_short(dtype)} is not supported (supported: {', '.join(map(_short, b.dtypes))})")
    if quant_kind is not None and quant_kind not in b.quantized:
        fits = [n for n, o in BACKENDS.items() if quant_kind in o.quantized and n != "eager"]
        problems.append(f"the model holds {_KIND_TEXT[quant_kind]}, which this backend cannot compile"
                        + (f" (use backend {' or '.join(map(repr, fits))})" if fits else ""))
    if quant_kind is not None and dtype != torch.float32 and name != "tensorrt":
        problems.append(f"a quantized model runs with fp32 activations; dtype {_short(dtype)} is not supported with it")
    if dynamic_batch and not b.dynamic_batch:
        problems.append("a dynamic batch dimension is not supported (compile one model per batch size)")
    if scripted and name not in ("eager", "torchscript"):
        problems.append("the model is a TorchScript module; only backends 'eager' and 'torchscript' accept it")
    if problems:
        raise BackendError(f"backend {name!r} cannot compile this request: " + "; ".join(problems))
    ok, why = b.available()
    if not ok:
        raise BackendError(why)
    return b
