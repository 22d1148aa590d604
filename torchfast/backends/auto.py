"""``backend="auto"``: build every backend this machine has for the model, keep the fastest that is faithful.

Each candidate is a backend, optionally with an int8 config lowered to that backend's own toolchain
(torch.ao / PT2E for the PyTorch backends, QDQ for ONNX Runtime, NNCF for OpenVINO). Every candidate is
built on a copy; one that is not installed, cannot take the request, crashes, or whose output breaks the
tolerance against eager is a report row saying why, never an exception. The rest are timed round-robin
on the user's example inputs (medians, order rotating) and the fastest is returned, with the table of
every candidate in its report.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from ..measure import Timing, compare_many, fidelity, resolve_timing
from ..modules import batches_list
from ..report import Report
from . import INT8_NATIVE
from .registry import BACKENDS, BackendError, check, normalize_dtype, quantization_kind

__all__ = ["Candidate", "compile_auto", "candidates_for"]

_INT8_TORCH = ("torchscript", "eager", "inductor")  # int8 through quantize(): torch.ao, or PT2E for inductor
RUNOFF_MARGIN = 0.10   # candidates this close to the fastest after the first timing get a longer run-off


@dataclass(frozen=True)
class Candidate:
    backend: str
    int8: Any = None      # an Int8Static / Int8Dynamic config, or None for the model as it is

    @property
    def name(self) -> str:
        if self.int8 is None:
            return self.backend
        from ..quant.config import Int8Static
        mode = "static" if isinstance(self.int8, Int8Static) else "dynamic"
        return f"{self.backend} + int8 {mode}"


def candidates_for(model: nn.Module, *, device: str = "cpu", int8: Any = None,
                   include: Sequence[str] | None = None) -> list[Candidate]:
    """Every (backend, int8 lowering) pair worth building; availability is checked when building."""
    names = [n for n in (include or BACKENDS) if n != "auto"]
    unknown = [n for n in names if n not in BACKENDS]
    if unknown:
        raise BackendError(f"unknown backend(s) {unknown} in candidates; choose from {', '.join(BACKENDS)}")
    out = [Candidate(n) for n in names]   # a backend for another device stays a row: skipped, with the reason
    if int8 is not None:
        for n in (n for n in names if device in BACKENDS[n].devices):
            if n == "inductor" and not getattr(int8, "compile_ok", True):
                continue  # PT2E + inductor compiles for minutes on small CPUs: only when the config allows it
            if n in INT8_NATIVE or n in _INT8_TORCH:
                out.append(Candidate(n, int8))
    return out


def _build(cand: Candidate, model: nn.Module, example: Any, calibration: list | None, common: dict,
           quantized: dict) -> nn.Module:
    from . import _compile_torch_int8, compile as compile_one
    if cand.int8 is None:
        return compile_one(model, example, backend=cand.backend, **common)
    if cand.backend in INT8_NATIVE:
        return compile_one(model, example, backend=cand.backend, int8=cand.int8, calibration=calibration, **common)
    pt2e = cand.backend in ("inductor", "export")
    if pt2e not in quantized:  # one calibration per flavour (torch.ao / PT2E), shared by its backends
        quantized[pt2e] = _compile_torch_int8(model, example, cand.backend, cand.int8, calibration, **common)
        return quantized[pt2e]
    return compile_one(quantized[pt2e].source, example, backend=cand.backend, **common)


def compile_auto(model: nn.Module, example_inputs: Any, *, device: Any = None, dtype: Any = None,
                 dynamic_batch: bool = False, int8: Any = None, calibration: Iterable | None = None,
                 candidates: Sequence[str] | None = None, validation: Iterable | None = None,
                 min_cosine: float = 0.999, min_cosine_int8: float = 0.99, runs: int | None = None,
                 warmup: int | None = None, threads: int | None = None, timing: Timing | None = None,
                 progress: bool | None = None) -> nn.Module:
    """Build every candidate, reject the unfaithful, return the fastest :class:`Compiled` module.

    ``int8``: an Int8Static/Int8Dynamic config; adds each backend's int8 lowering as candidates
    (calibrated on ``calibration`` or the config's own batches). ``candidates``: backend names to try
    (default: all registered). Fidelity is the mean output cosine vs eager on ``validation`` (default:
    the example inputs), at least ``min_cosine`` for float candidates and ``min_cosine_int8`` for int8.
    ``timing`` (a :class:`torchfast.measure.Timing`; default half of ``DEFAULT_TIMING``: 10 runs, 2 warm-up
    calls) times the candidates, ``runs``/``warmup``/``threads`` override its numbers; each timed call
    follows at least one untimed call of the same candidate, and close candidates are timed again twice as long.
    """
    from tqdm.auto import tqdm

    from ..modules import model_device
    dev = torch.device(device) if device is not None else model_device(model)
    dt = normalize_dtype(dtype)
    calib = batches_list(calibration) if calibration is not None else None
    if calib is None and int8 is not None and getattr(int8, "calibration", None) is not None:
        calib = batches_list(int8.calibration)
    val = batches_list(validation) if validation is not None else batches_list(example_inputs)
    cands = candidates_for(model, device=dev.type, int8=int8, include=candidates)
    kind = quantization_kind(model)
    scripted = isinstance(model, torch.jit.ScriptModule)
    common = dict(device=dev, dtype=dt, dynamic_batch=dynamic_batch)

    rows: dict[str, dict] = {}
    built: dict[str, nn.Module] = {}
    quantized: dict[bool, nn.Module] = {}
    bar = tqdm(cands, desc="auto: build", unit="backend", disable=(not progress) if progress is not None else None)
    for c in bar:
        bar.set_postfix_str(c.name)
        row = rows[c.name] = {"candidate": c.name, "status": "", "speedup": None, "cosine": None,
                              "max abs err": None, "compile (s)": None, "note": ""}
        try:
            check(c.backend, device=dev.type, dtype=dt, quant_kind=kind if c.int8 is None else None,
                  dynamic_batch=dynamic_batch, scripted=scripted)
        except BackendError as e:
            row["status"], row["note"] = "skipped", str(e)
            continue
        t0 = time.perf_counter()
        try:
            m = _build(c, model, example_inputs, calib, common, quantized)
            fid = fidelity(model, m, val)
        except Exception as e:  # noqa: BLE001 - a candidate that crashes is a row
            row["status"], row["note"] = "failed", f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
            continue
        row["compile (s)"] = round(time.perf_counter() - t0, 2)
        row["cosine"], row["max abs err"] = fid.cosine, fid.max_abs_err
        bound = min_cosine if c.int8 is None else min_cosine_int8
        if not fid.cosine >= bound:
            row["status"], row["note"] = "rejected", f"cosine {fid.cosine:.5f} < {bound}"
            continue
        row["status"] = "ok"
        built[c.name] = m
    bar.close()
    if not built:
        raise BackendError("backend='auto' found no candidate that builds and keeps fidelity: "
                           + "; ".join(f"{r['candidate']}: {r['status']} ({r['note']})" for r in rows.values()))

    eager = _eager_reference(model)
    t = resolve_timing(timing, share=0.5, runs=runs, warmup=warmup, threads=threads)
    t = replace(t, settle=max(1, t.settle))  # engines with thread pools: see measure.Timing.settle
    timed = compare_many({"(eager)": eager, **built}, example_inputs, timing=t)
    base = timed["(eager)"].median_ms
    for name, lat in timed.items():
        if name in rows:
            rows[name]["speedup"] = base / lat.median_ms if lat.median_ms > 0 else None
    best = max(built, key=lambda n: rows[n]["speedup"] or 0.0)
    close = [n for n in built if (rows[n]["speedup"] or 0.0) >= (rows[best]["speedup"] or 0.0) / (1 + RUNOFF_MARGIN)]
    runoff = False
    if len(close) > 1:  # a short timing cannot separate these: time them again, head to head, longer
        again = compare_many({"(eager)": eager, **{n: built[n] for n in close}}, example_inputs,
                             timing=replace(t, runs=2 * t.runs))
        base = again["(eager)"].median_ms
        for n in close:
            rows[n]["speedup"] = base / again[n].median_ms if again[n].median_ms > 0 else None
        best = max(close, key=lambda n: rows[n]["speedup"] or 0.0)
        runoff = True
    rows[best]["status"] = "chosen"
    chosen = built[best]
    report = Report("compile: auto", summary={
        "chosen": best, "speedup vs eager": rows[best]["speedup"], "cosine": rows[best]["cosine"],
        "candidates": len(rows), "built": len(built), "dynamic_batch": dynamic_batch, "device": str(dev),
        "runs": t.runs, "run-off": ", ".join(close) if runoff else "none",
        "threads": t.threads if t.threads is not None else torch.get_num_threads()})
    for r in sorted(rows.values(), key=lambda r: -(r["speedup"] or 0.0)):
        report.add_row(**r)
    report.note("speedup: eager median / candidate median, all timed round-robin on the example inputs, each "
                "timed call right after an untimed one of the same candidate (candidates "
                f"within {RUNOFF_MARGIN:.0%} of the fastest timed again head to head, twice as long); cosine: mean "
                "output cosine vs eager on the validation inputs.")
    inner = getattr(chosen, "report", None)
    if inner is not None:
        report.children.append(inner)
    chosen.report = report
    return chosen


def _eager_reference(model: nn.Module) -> Any:
    def run(*args: Any, **kwargs: Any) -> Any:
        with torch.inference_mode():
            return model(*args, **kwargs)
    return run
