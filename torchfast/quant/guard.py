"""Never ship a slower model: the quantized model is timed against the float one before it is returned.

int8 is not free: every float island inside an int8 graph costs a dequantize and a quantize, and on
small or depthwise-heavy models those copies can outweigh the int8 arithmetic (a 6x slowdown has been
measured). The same rule the low-rank speed guard follows: measure on the user's example inputs
(interleaved, medians) and, when the quantized model is not faster, return the float model with a
report that says so.
"""
from __future__ import annotations

from torch import nn

from ..measure import compare_latency, resolve_timing
from ..modules import Batch
from ..report import Report

__all__ = ["restore_from_twin", "speed_verdict", "SLOWER"]

SLOWER = "slower than float"


def restore_from_twin(model: nn.Module, twin: nn.Module) -> None:
    """Put the twin's layers back wherever ``model``'s were replaced or re-parametrized."""
    def changed(a: nn.Module, b: nn.Module) -> bool:
        if type(a) is not type(b):
            return True
        pa, pb = dict(a.named_parameters(recurse=False)), dict(b.named_parameters(recurse=False))
        return pa.keys() != pb.keys() or any(pa[k] is not pb[k] for k in pa)

    def walk(m: nn.Module, t: nn.Module) -> None:
        for name, tchild in t.named_children():
            mchild = getattr(m, name, None)
            if not isinstance(mchild, nn.Module) or changed(mchild, tchild):
                setattr(m, name, tchild)
            else:
                walk(mchild, tchild)
    walk(model, twin)


def speed_verdict(reference: nn.Module, quantized: nn.Module, example_inputs: Batch, report: Report,
                  what: str) -> bool:
    """Time ``quantized`` against ``reference`` (interleaved medians, half the default timing's runs);
    record it; True when it is faster."""
    cmp = compare_latency(reference, quantized, example_inputs, timing=resolve_timing(share=0.5, warmup=3))
    report.summary.update({"fp32 ms": cmp.baseline.median_ms, f"{what} ms": cmp.candidate.median_ms,
                           "speedup vs fp32": cmp.speedup})
    return cmp.speedup > 1.0
