"""bf16/fp16 casting, kept only where measured faster.

bf16 is fast on CPUs with AVX512-BF16 or AMX and slow elsewhere (emulated); fp16 is the CUDA choice and
has no fast CPU GEMM on most x86 parts. With example inputs the cast is timed against fp32 on them.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from ..measure import compare_latency, resolve_timing
from ..modules import Batch, model_device, move_batch, swap_modules
from ..report import Report
from ..transform import Exclusion
from ..specs import dtype_name
from .common import check_not_quantized
from .config import HalfPrecision
from .weight_only import UnsupportedDeviceError

__all__ = ["cast_half", "HalfPrecisionModule", "Float32Island"]


class HalfPrecisionModule(nn.Module):
    """Runs a half-precision copy of the model: casts floating inputs in and floating outputs back to float32,
    so it stays a drop-in replacement for the fp32 model."""

    def __init__(self, model: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.model = model
        self.dtype = dtype

    def forward(self, *args, **kwargs):
        args = move_batch(args, dtype=self.dtype)
        kwargs = move_batch(kwargs, dtype=self.dtype)
        out = self.model(*args, **kwargs)
        return _to_float(out)


class Float32Island(nn.Module):
    """A layer excluded from the cast: runs in float32 inside the half-precision model, hands back ``dtype``."""

    def __init__(self, module: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.module = module
        self.dtype = dtype

    def forward(self, *args, **kwargs):
        out = self.module(*move_batch(args, dtype=torch.float32), **move_batch(kwargs, dtype=torch.float32))
        return _to_float(out, self.dtype)


def _cpu_native_fp16() -> bool:
    return bool(getattr(torch.cpu, "_is_amx_fp16_supported", lambda: False)())


def _cpu_native_bf16() -> bool:
    return bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)())


def _to_float(out, dtype: torch.dtype = torch.float32):
    if isinstance(out, torch.Tensor):
        return out.to(dtype) if out.is_floating_point() else out
    if isinstance(out, dict) or hasattr(out, "items"):
        for k, v in list(out.items()):
            out[k] = _to_float(v, dtype)
        return out
    if isinstance(out, (tuple, list)):
        return type(out)(_to_float(v, dtype) for v in out)
    return out


def _cast(model: nn.Module, dtype: torch.dtype, exclusion: Exclusion) -> nn.Module:
    """``model.to(dtype)``, except the excluded layers, which become float32 islands. Parameters keep their
    objects (their data is replaced), as with ``Module.to``."""
    roots = exclusion.roots(model)
    if not roots:
        return model.to(dtype)
    for name, mod in model.named_modules():
        if exclusion(name):
            continue
        for p in mod._parameters.values():
            if p is not None and p.is_floating_point():
                p.data = p.data.to(dtype)
        for k, b in mod._buffers.items():
            if b is not None and b.is_floating_point():
                mod._buffers[k] = b.to(dtype)
    swap_modules(model, {r: Float32Island(model.get_submodule(r), dtype) for r in roots})
    return model


def cast_half(model: nn.Module, cfg: HalfPrecision, *, example_inputs: Batch | None = None, calibration: Any = None,
              exclusion: Exclusion | None = None, inplace: bool = False) -> tuple[nn.Module, Report]:
    check_not_quantized(model, "HalfPrecision")
    dtype = cfg.torch_dtype
    device = model_device(model)
    name = dtype_name(dtype)
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise UnsupportedDeviceError(f"HalfPrecision(bfloat16): {torch.cuda.get_device_name(device)} has no bf16 support; "
                                     f"use HalfPrecision(torch.float16)")
    if device.type == "cpu" and dtype == torch.float16 and not cfg.keep_slower and not _cpu_native_fp16():
        bf16 = "this CPU has AVX512-BF16: use HalfPrecision(torch.bfloat16)" if _cpu_native_bf16() else \
            "use Int8Dynamic/Int8Static on this CPU"
        raise UnsupportedDeviceError(f"HalfPrecision(float16) on CPU: this CPU has no native fp16 arithmetic (no AMX-FP16), "
                                     f"so fp16 only costs precision; {bf16} (keep_slower=True forces fp16)")
    exclusion = exclusion if exclusion is not None else Exclusion(cfg.exclude, "HalfPrecision")
    report = Report(f"{name} casting", columns=["layer", "applied", "scheme", "reason"])
    report.summary.update({"scheme": name})
    excluded = exclusion.roots(model)
    if example_inputs is not None:
        # timed on a cast copy against the untouched fp32 model: the caller's model changes only once it wins
        trial = HalfPrecisionModule(_cast(copy.deepcopy(model), dtype, exclusion), dtype)
        cmp = compare_latency(model, trial, example_inputs, timing=resolve_timing(share=0.35))
        report.summary.update({"fp32 ms": cmp.baseline.median_ms, f"{name} ms": cmp.candidate.median_ms,
                               "speedup": cmp.speedup})
        if cmp.speedup <= 1.0 and not cfg.keep_slower:
            report.add_row(layer="<model>", applied=False, scheme="fp32",
                           reason=f"{name} measured slower than fp32 on the example inputs ({cmp.speedup:.2f}x)")
            return (model if inplace else copy.deepcopy(model)), report
        half = trial if not inplace else HalfPrecisionModule(_cast(model, dtype, exclusion), dtype)
    else:
        half = HalfPrecisionModule(_cast(model if inplace else copy.deepcopy(model), dtype, exclusion), dtype)
    report.add_row(layer="<model>", applied=True, scheme=f"{name} weights and activations (inputs cast in, outputs back to float32)")
    for r in excluded:
        report.add_row(layer=r, applied=False, scheme="fp32", reason=exclusion.reason(r))
    return half, report
