"""Int8Static front door: validate calibration, then run FX and/or PT2E and keep the measured winner.

"auto" compares the candidates side by side on the example inputs (interleaved medians) and on
fidelity against the fp32 model over the calibration batches; a faster candidate that loses more
than ``_COSINE_SLACK`` of output cosine is not taken.
"""
from __future__ import annotations

import copy
from typing import Iterable

from torch import nn

from ..measure import compare_latency, fidelity, resolve_timing
from ..modules import Batch
from ..report import Report
from ..transform import Exclusion
from .calibrate import CalibrationError, check_all, collect, strip_labels
from .common import check_not_quantized
from .config import Int8Static

__all__ = ["quantize_static"]

_COSINE_SLACK = 0.002


def quantize_static(model: nn.Module, cfg: Int8Static, *, example_inputs: Batch | None = None,
                    calibration: Iterable[Batch] | None = None, exclusion: Exclusion | None = None,
                    inplace: bool = False) -> tuple[nn.Module, Report]:
    """``quantize()`` for Int8Static. It builds a new graph module whatever ``inplace`` says."""
    check_not_quantized(model, "Int8Static")
    source = cfg.calibration if cfg.calibration is not None else calibration
    batches = strip_labels(collect(source, cfg.max_batches), example_inputs)
    reference = check_all(batches, example_inputs)
    methods = {"fx": ["fx"], "pt2e": ["pt2e"], "auto": ["fx", "pt2e"] if cfg.compile_ok else ["fx"]}[cfg.method]
    results: dict[str, tuple[nn.Module, Report]] = {}
    failures: dict[str, str] = {}
    for m in methods:
        work = copy.deepcopy(model).eval()
        try:
            if m == "fx":
                from .refine import refined_fx_static
                results[m] = refined_fx_static(work, cfg, batches, exclusion)
            else:
                from .pt2e import quantize_pt2e_static
                results[m] = quantize_pt2e_static(work, cfg, batches, example_inputs, exclusion)
        except Exception as e:
            if len(methods) == 1 or not isinstance(e, Exception) or isinstance(e, CalibrationError):
                raise
            failures[m] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    if not results:
        raise RuntimeError("no int8 static method succeeded: " + "; ".join(f"{k}: {v}" for k, v in failures.items()))
    best = next(iter(results))
    if len(results) > 1:
        rows = {}
        for m, (q, _) in results.items():
            cmp = compare_latency(model, q, reference, timing=resolve_timing(share=0.5, warmup=3))
            fid = fidelity(model, q, batches[:4])
            rows[m] = (cmp.speedup, fid.cosine)
        top_cos = max(c for _, c in rows.values())
        ok = [m for m, (_, c) in rows.items() if c >= top_cos - _COSINE_SLACK]
        best = max(ok, key=lambda m: rows[m][0])
        q, rep = results[best]
        for m, (sp, cos) in rows.items():
            rep.note(f"method {m}: {sp:.2f}x vs fp32 on the example inputs, output cosine {cos:.4f}"
                     + (" (chosen)" if m == best else ""))
    q, rep = results[best]
    for m, why in failures.items():
        rep.note(f"method {m} failed and was not used: {why}")
    return q, rep
