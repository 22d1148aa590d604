"""An accuracy budget, kept: the fewest layers left in float so that the int8 model meets a Tolerance.

When the fully quantized model breaks a bound on held-out data, the layers are ranked by sensitivity in
one scan (each layer's weights and inputs fake-quantized alone in the float model, its effect on the
outputs measured) and the most sensitive ones are kept float, fewest first: 1, 2, 4, ... layers until the
bound holds, then bisection back down to the smallest count that holds. Every tried mix is a row of the
report; if no mix with any int8 layer meets the budget, the caller returns the float model.

A caller with a clock of its own (``optimize(recipe="auto")`` under a time budget) bounds the search with
``time_limit``: past it, no new scan step or mix is started; the smallest mix found to hold is returned (not
minimized), or none.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

from ..measure import Fidelity, compare_outputs, outputs
from ..modules import Batch
from ..report import Report
from ..tolerance import Tolerance
from .simulate import fake_quant_activation, fake_quant_weight
from .static_precision import Precision

__all__ = ["sensitivity", "fit_budget", "BudgetResult", "agreement_resolution"]

_SIMULATED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def _input_ranges(model: nn.Module, names: list[str], batches: list[Batch]) -> dict[str, tuple[float, float]]:
    from ..modules import call_model
    ranges: dict[str, tuple[float, float]] = {}
    hooks = []
    for n in names:
        def hook(m, args, _n=n):
            x = args[0] if args and isinstance(args[0], torch.Tensor) else None
            if x is None or not x.is_floating_point() or x.numel() == 0:
                return
            lo, hi = ranges.get(_n, (float("inf"), float("-inf")))
            ranges[_n] = (min(lo, x.min().item()), max(hi, x.max().item()))
        hooks.append(model.get_submodule(n).register_forward_pre_hook(hook))
    try:
        with torch.inference_mode():
            for b in batches:
                call_model(model, b)
    finally:
        for h in hooks:
            h.remove()
    return ranges


def _score(fid: Fidelity, tolerance: Tolerance) -> float:
    """Higher = more damage. The worst sample when the budget bounds it, else the relative error."""
    if tolerance.min_worst_cosine is not None and fid.worst_cosine is not None:
        return 1.0 - fid.worst_cosine
    if tolerance.min_top1_agreement is not None and fid.top1_agreement is not None:
        return (1.0 - fid.top1_agreement) + fid.rel_err * 1e-3  # ties broken by the error
    return fid.rel_err


_DEADLINE: contextvars.ContextVar[float | None] = contextvars.ContextVar("torchfast_budget_deadline", default=None)


@contextlib.contextmanager
def time_limit(seconds: float | None) -> Iterator[None]:
    """Within the block, the budget search starts no scan step or mix after ``seconds`` (None: no limit)."""
    token = _DEADLINE.set(None if seconds is None else time.perf_counter() + max(0.0, seconds))
    try:
        yield
    finally:
        _DEADLINE.reset(token)


def _out_of_time() -> bool:
    deadline = _DEADLINE.get()
    return deadline is not None and time.perf_counter() >= deadline


def sensitivity(model: nn.Module, layers: list[str], calibration: list[Batch], validation: list[Batch],
                tolerance: Tolerance, *, dynamic: bool = False, precision: Precision = Precision(8, 8),
                progress: bool = True) -> dict[str, float]:
    """Damage each layer does alone when its weights and inputs are int8 (simulated in float)."""
    from tqdm.auto import tqdm

    reduce_range = precision.reduce_range
    names = [n for n in layers if isinstance(model.get_submodule(n), _SIMULATED)]
    ranges = {} if dynamic else _input_ranges(model, names, calibration)
    reference = outputs(model, validation)
    scores: dict[str, float] = {}
    for n in tqdm(names, desc="int8 sensitivity scan", unit="layer", disable=not progress, leave=False):
        if _out_of_time():   # the layers not scanned rank after the scanned ones
            break
        mod = model.get_submodule(n)

        def hook(m, args, _n=n):
            x = args[0] if args and isinstance(args[0], torch.Tensor) else None
            if x is None or not x.is_floating_point() or x.numel() == 0:
                return None
            lo, hi = (x.min().item(), x.max().item()) if dynamic else ranges.get(_n, (x.min().item(), x.max().item()))
            return (fake_quant_activation(x, lo, hi, reduce_range).to(x.dtype),) + tuple(args[1:])
        original = mod.weight.data
        handle = mod.register_forward_pre_hook(hook)
        try:
            mod.weight.data = fake_quant_weight(original, bits=precision.weight_bits).to(original.dtype)
            scores[n] = _score(compare_outputs(reference, outputs(model, validation)), tolerance)
        finally:
            mod.weight.data = original
            handle.remove()
    return scores


def agreement_resolution(bound: float, samples: int) -> str:
    """How finely ``samples`` validation samples resolve a top-1 agreement near ``bound`` (95% normal
    interval): a bound met by less than this may not hold on other data."""
    half = 1.96 * math.sqrt(max(bound * (1 - bound), 1e-12) / samples)
    note = f"+/-{half:.3f} at 95% on {samples} samples"
    if half > (1 - bound):
        note += f"; more validation samples resolve it better ({math.ceil(1.96 ** 2 * bound / (1 - bound))}+)"
    return note


@dataclass
class BudgetResult:
    model: nn.Module | None      # None: no mix with an int8 layer meets the budget
    float_layers: list[str]
    fidelity: Fidelity | None
    report: Report


def _check(reference_out: list[torch.Tensor], model: nn.Module, validation: list[Batch], tolerance: Tolerance,
           eval_fn: Callable | None, baseline_metric: float | None) -> tuple[Fidelity, list[str]]:
    fid = compare_outputs(reference_out, outputs(model, validation))
    drop = None
    if eval_fn is not None:
        metric = float(eval_fn(model))
        drop = baseline_metric - metric
        fid = Fidelity(**{**fid.to_dict(), "metric": metric, "baseline_metric": baseline_metric})
    return fid, tolerance.violations(fid, metric_drop=drop)


def fit_budget(model: nn.Module, quantized: nn.Module, layers: list[str], build: Callable[[list[str]], nn.Module],
               *, calibration: list[Batch], validation: list[Batch], tolerance: Tolerance,
               eval_fn: Callable | None = None, dynamic: bool = False, precision: Precision = Precision(8, 8),
               progress: bool = True) -> BudgetResult:
    """Keep the fewest, most sensitive ``layers`` float until ``build(float_layers)`` meets ``tolerance``.

    ``model`` is the float model (eval mode, untouched), ``quantized`` the all-int8 result, ``layers`` the
    layers it quantized, ``build`` re-quantizes with some of them kept float.
    """
    report = Report("int8 accuracy budget", columns=["layers kept float", "cosine", "worst cosine", "top-1 agree",
                                                     "metric", "meets budget", "broken bounds"])
    reference = outputs(model, validation)
    baseline = float(eval_fn(model)) if eval_fn is not None else None

    def row(k: int, fid: Fidelity, broken: list[str]) -> None:
        report.add_row(**{"layers kept float": k, "cosine": fid.cosine, "worst cosine": fid.worst_cosine,
                          "top-1 agree": fid.top1_agreement, "metric": fid.metric,
                          "meets budget": not broken, "broken bounds": "; ".join(broken) or "-"})

    fid, broken = _check(reference, quantized, validation, tolerance, eval_fn, baseline)
    row(0, fid, broken)
    report.summary.update({"validation samples": fid.samples, "tolerance": tolerance.to_dict()})
    if tolerance.min_top1_agreement is not None and fid.samples:
        report.summary["agreement resolution"] = agreement_resolution(tolerance.min_top1_agreement, fid.samples)
    if not broken:
        report.summary["result"] = "every quantized layer stays int8"
        return BudgetResult(quantized, [], fid, report)
    if _out_of_time():
        report.summary["result"] = "the time limit was reached before any layer was kept float"
        return BudgetResult(None, list(layers), None, report)
    scores = sensitivity(model, layers, calibration, validation, tolerance, dynamic=dynamic,
                         precision=precision, progress=progress)
    ranked = sorted(scores, key=scores.get, reverse=True) + [n for n in layers if n not in scores]
    report.summary["most sensitive"] = ", ".join(f"{n} ({scores[n]:.3g})" for n in ranked[:5] if n in scores)
    tried: dict[int, tuple[nn.Module, Fidelity, list[str]]] = {}

    def attempt(k: int):
        if k not in tried:
            q = build(ranked[:k])
            f, b = _check(reference, q, validation, tolerance, eval_fn, baseline)
            tried[k] = (q, f, b)
            row(k, f, b)
        return tried[k]

    low, high, k = 0, None, 1
    timed_out = False
    while k < len(ranked):  # grow: 1, 2, 4, ... float layers until the budget holds
        if _out_of_time():
            timed_out = True
            break
        if not attempt(k)[2]:
            high = k
            break
        low, k = k, k * 2
    if high is None and not timed_out and len(ranked) > 1 and low < len(ranked) - 1:
        timed_out = _out_of_time()
        if not timed_out and not attempt(len(ranked) - 1)[2]:
            high = len(ranked) - 1
    if high is None:
        why = "the time limit was reached" if timed_out else "no mix with an int8 layer meets the budget"
        report.summary["result"] = f"{why} (kept float up to {max(tried) if tried else 0} of {len(ranked)} layers)"
        return BudgetResult(None, list(ranked), None, report)
    while high - low > 1 and not _out_of_time():  # the smallest count that holds
        mid = (low + high) // 2
        if attempt(mid)[2]:
            low = mid
        else:
            high = mid
    q, f, _ = tried[high]
    report.summary["result"] = f"{high} of {len(ranked)} quantized layers kept float: " + ", ".join(ranked[:high])
    if high - low > 1:
        report.summary["result"] += f" (the time limit stopped the search between {low + 1} and {high})"
    return BudgetResult(q, ranked[:high], f, report)
