"""bf16/fp16 casting, kept only where measured faster.

bf16 is fast on CPUs with AVX512-BF16 or AMX and slow elsewhere (emulated); fp16 is the CUDA choice and
has no fast CPU GEMM on most x86 parts. With example inputs the cast is timed against fp32 on them.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..measure import compare_latency
from ..modules import Batch, model_device, move_batch
from ..report import Report
from .common import check_not_quantized
from .config import HalfPrecision
from .weight_only import UnsupportedDeviceError

__all__ = ["cast_half", "HalfPrecisionModule"]


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


def _cpu_native_fp16() -> bool:
    return bool(getattr(torch.cpu, "_is_amx_fp16_supported", lambda: False)())


def _cpu_native_bf16() -> bool:
    return bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)())


def _to_float(out):
    if isinstance(out, torch.Tensor):
        return out.float() if out.is_floating_point() else out
    if isinstance(out, dict) or hasattr(out, "items"):
        for k, v in list(out.items()):
            out[k] = _to_float(v)
        return out
    if isinstance(out, (tuple, list)):
        return type(out)(_to_float(v) for v in out)
    return out


def cast_half(model: nn.Module, cfg: HalfPrecision, example_inputs: Batch | None = None) -> tuple[nn.Module, Report]:
    check_not_quantized(model, "HalfPrecision")
    dtype = cfg.torch_dtype
    device = model_device(model)
    name = str(dtype).replace("torch.", "")
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise UnsupportedDeviceError(f"HalfPrecision(bfloat16): {torch.cuda.get_device_name(device)} has no bf16 support; "
                                     f"use HalfPrecision(torch.float16)")
    if device.type == "cpu" and dtype == torch.float16 and not cfg.keep_slower and not _cpu_native_fp16():
        bf16 = "this CPU has AVX512-BF16: use HalfPrecision(torch.bfloat16)" if _cpu_native_bf16() else \
            "use Int8Dynamic/Int8Static on this CPU"
        raise UnsupportedDeviceError(f"HalfPrecision(float16) on CPU: this CPU has no native fp16 arithmetic (no AMX-FP16), "
                                     f"so fp16 only costs precision; {bf16} (keep_slower=True forces fp16)")
    report = Report(f"{name} casting", columns=["layer", "applied", "scheme", "reason"])
    report.summary.update({"scheme": name})
    if example_inputs is not None:
        # timed on a cast copy against the untouched fp32 model: the caller's model changes only once it wins
        trial = HalfPrecisionModule(copy.deepcopy(model).to(dtype), dtype)
        cmp = compare_latency(model, trial, example_inputs, runs=7, warmup=2)
        report.summary.update({"fp32 ms": cmp.baseline.median_ms, f"{name} ms": cmp.candidate.median_ms,
                               "speedup": cmp.speedup})
        if cmp.speedup <= 1.0 and not cfg.keep_slower:
            report.add_row(layer="<model>", applied=False, scheme="fp32",
                           reason=f"{name} measured slower than fp32 on the example inputs ({cmp.speedup:.2f}x)")
            return (model if cfg.inplace else copy.deepcopy(model)), report
        half = trial if not cfg.inplace else HalfPrecisionModule(model.to(dtype), dtype)
    else:
        half = HalfPrecisionModule((model if cfg.inplace else copy.deepcopy(model)).to(dtype), dtype)
    report.add_row(layer="<model>", applied=True, scheme=f"{name} weights and activations (inputs cast in, outputs back to float32)")
    return half, report
