"""``optimize(model, x, recipe="auto")``: search pruning x low-rank x int8 x backend for the fastest model
that stays within the tolerance, by successive halving (cheapest evidence first).

Every point of the space is a composition of torchfast's own steps (``ChannelPruning``, ``LowRank``,
``quantize`` with its per-layer float fallback, ``distill``, ``compile``), measured with ``torchfast.measure``;
the search only decides which points deserve the next, dearer piece of evidence:

0. engines  the original is built on every backend, float and through the engines' own int8 lowering,
            then as its torch int8 variants (``quantize`` with per-layer float fallback to the tolerance),
            checked on every validation batch (and ``eval_fn``) and timed round-robin with the original;
            the ``engines`` fastest kinds go on. A measured best candidate exists from here on.
1. probe    every structure (pruning amount x low-rank setting) is built and compared with the original
            on a few validation batches; no timing. One outside the tolerance is marked for recovery.
            Pruning alone and low-rank alone go first; a combination is built only from factors that
            each beat the original in the race and are not beaten by another factor of the same kind
            (pruning amount, low-rank setting) on both speed and fidelity (then that one is the better partner).
2. race     the structures are timed briefly in eager, round-robin with the original; the faster half
            goes on.
3. measure  the raced structures that need no recovery are built as the original was, on the kinds of
            engine kept in 0 (a torch int8 variant only where a kept kind runs it).
4. recover  fastest first, the structures that raced faster than those and need it are distilled toward
            the original on the (unlabeled) calibration batches, checked again, and measured as in 3,
            until ``finalists`` structures are in.
5. finish   every kept candidate is timed round-robin with the original on the example inputs, the
            closest again for twice as long.

The fastest candidate within the tolerance that beats the original is returned; otherwise the original,
with the reason. A time budget stops the search between two steps: a step is not started when the steps
of its kind so far say it would end past the budget, less what the final timing needs (sized from the
timing in 0); the best candidate found so far is returned and the report says where it stopped. A step
that raises is a row with its error.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from .config import Config, ConfigError, check_range
from .measure import compare_outputs, outputs
from .search_report import Searched, Trial, search_report
from .tolerance import Tolerance

__all__ = ["SearchSpace", "run_search", "is_auto"]

INT8_MODES = ("static", "dynamic", "none")
DEFAULT_BUDGET_S = 600.0    # optimize(recipe="auto") without time_budget_s (math.inf: no budget)


@dataclass(frozen=True)
class SearchSpace(Config):
    """The points ``optimize(recipe="auto")`` may try, and how much evidence each rung gathers.

    - ``prune``: ``ChannelPruning`` amounts (0 = no pruning); channel counts kept multiples of ``round_to``
      (vector-friendly widths; engines lose speed on odd ones).
    - ``lowrank``: ``None`` (no factorization), a FLOPs reduction ``x`` (``LowRank(flops_reduction=x)``, each
      layer alike) or ``"global"`` (a 2x FLOPs budget spent where it costs the least output error).
      Data-aware (activation-whitened) whenever calibration batches are given.
    - ``int8``: among ``"static"`` (calibrated), ``"dynamic"``, ``"none"``.
    - ``backends``: backend names (None: every one registered and installed here; ``optimize(backend=...)``
      other than ``"auto"`` narrows it to that one).
    - ``finalists``: structures besides the original that reach full measurement; ``engines``: backend x
      int8 combinations tried on the second and later finalists (the fastest ones on the first);
      ``race_runs``: timed runs per model in the quick eager race.
    """
    prune: tuple[float, ...] = (0.0, 0.2, 0.3, 0.5)
    lowrank: tuple[Any, ...] = (None, 1.5, 2.0, "global")
    int8: tuple[str, ...] = ("static", "dynamic", "none")
    backends: tuple[str, ...] | None = None
    round_to: int = 8
    finalists: int = 3
    engines: int = 3
    race_runs: int = 5

    def validate(self) -> None:
        n = "SearchSpace"
        for name in ("prune", "lowrank", "int8"):
            if not isinstance(getattr(self, name), tuple) or not getattr(self, name):
                raise ConfigError(f"{n}.{name} must be a non-empty tuple, got {getattr(self, name)!r}")
        for a in self.prune:
            check_range(n, "prune", a, 0.0, 1.0, hi_inclusive=False)
        for r in self.lowrank:
            if r is None or r == "global":
                continue
            if isinstance(r, bool) or not isinstance(r, (int, float)) or not r > 1.0:
                raise ConfigError(f"{n}.lowrank entries are None, 'global' or a FLOPs reduction > 1, got {r!r}")
        bad = [m for m in self.int8 if m not in INT8_MODES]
        if bad:
            raise ConfigError(f"{n}.int8 entries must be among {', '.join(INT8_MODES)}; got {bad}")
        if self.backends is not None:
            from .backends.registry import BACKENDS
            if isinstance(self.backends, str) or not self.backends:
                raise ConfigError(f"{n}.backends must be a non-empty tuple of backend names or None, "
                                  f"got {self.backends!r}")
            unknown = [b for b in self.backends if b not in BACKENDS or b == "auto"]
            if unknown:
                raise ConfigError(f"{n}.backends: unknown backend(s) {unknown}; choose from "
                                  f"{', '.join(b for b in BACKENDS if b != 'auto')}")
        for name, lo in (("round_to", 1), ("finalists", 0), ("engines", 1), ("race_runs", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ConfigError(f"{n}.{name} must be an integer >= {lo}, got {v!r}")

    def structure_configs(self, prune: float, lowrank: Any) -> list[Config]:
        """The transforms one structure applies, in order: pruning, then low-rank on the pruned model."""
        from .lowrank.config import LowRank
        from .prune.config import ChannelPruning
        out: list[Config] = []
        if prune:
            out.append(ChannelPruning(amount=prune, round_to=self.round_to))
        if lowrank == "global":
            out.append(LowRank(flops_reduction=2.0, allocation="global", progress=False))
        elif lowrank is not None:
            out.append(LowRank(flops_reduction=float(lowrank), progress=False))
        return out


def is_auto(recipe: Any) -> bool:
    """Whether ``recipe`` asks for the search: the string ``"auto"`` or a :class:`SearchSpace`."""
    return isinstance(recipe, SearchSpace) or (isinstance(recipe, str) and recipe.strip().lower() == "auto")


# ---------------------------------------------------------------- the choice and the result
def _choose(measured: list[Trial], tol: Tolerance) -> tuple[Trial | None, str]:
    """The fastest faithful candidate that beats the original (and ``tol.min_speedup``), or why none."""
    if not measured:
        return None, "no candidate reached full measurement within the tolerance"
    need = max(1.0, tol.min_speedup or 1.0)
    fast = [t for t in measured if t.speedup is not None and t.speedup > 1.0 and t.speedup >= need]
    if not fast:
        best = max(measured, key=lambda t: t.speedup or 0.0)
        return None, (f"nothing to gain: no candidate within the tolerance measured faster than the original"
                      f"{'' if need == 1.0 else f' by {need}x'} (the fastest, {best.name}, ran at "
                      f"{best.speedup:.2f}x)")
    chosen = max(fast, key=lambda t: t.speedup)
    chosen.status = "chosen"
    return chosen, ""


def _confirm(cx: Any, chosen: Trial, tol: Tolerance, runs: int, warmup: int) -> tuple[Trial | None, str]:
    """Time the winner head to head with the original, twice as long: engines sharing the CPU in a
    round-robin (their idle worker threads) can flatter or hurt each other, and a busy machine hurts
    PyTorch's spinning threads more than an engine's. The lower of the two figures stands; a winner that
    does not hold up gives the original back (never slower)."""
    cx.step(f"confirm {chosen.name}")
    first, first_ms = chosen.speedup, chosen.latency_ms
    cx.time([chosen], 2 * runs, warmup, settle=1)
    how = f"head to head with the original: {chosen.speedup:.2f}x (round-robin {first:.2f}x)"
    if first is not None and chosen.speedup is not None and first < chosen.speedup:
        chosen.speedup, chosen.latency_ms = first, first_ms   # the lower of the two figures stands
    chosen.note = f"{chosen.note}; {how}" if chosen.note else how
    need = max(1.0, tol.min_speedup or 1.0)
    if chosen.speedup is not None and chosen.speedup > 1.0 and chosen.speedup >= need:
        return chosen, ""
    chosen.status = "measured"
    return None, f"nothing to gain: the fastest candidate, {chosen.name}, measured {how}"


def _stages(chosen: Trial, trials: list[Trial], origin: Trial, base_metric: float | None) -> list:
    """The chosen candidate as optimize()'s per-stage results (what ``Optimized.save`` and ``speedup`` read)."""
    from .backends import INT8_NATIVE
    from .pipeline import StageResult, describe
    exact = compare_outputs([torch.zeros(1, 1)], [torch.zeros(1, 1)])
    out = [StageResult("original", True, "reference", speedup=1.0, size_mb=origin.size_mb, flops=origin.flops,
                       fidelity=origin.fidelity or exact, metric=base_metric)]
    structure = next((t for t in trials if t.backend is None and t.int8 == "none" and t.prune == chosen.prune
                      and t.lowrank == chosen.lowrank), origin)
    native = chosen.backend in INT8_NATIVE and chosen.int8 != "none"
    n_struct = len(structure.configs)
    for i, cfg in enumerate(structure.configs):
        last = i == n_struct - 1
        out.append(StageResult(describe(cfg), True, structure.recovered and last and
                               f"distilled without labels: {structure.recovered}" or "chosen by the search",
                               size_mb=structure.size_mb if last else None, flops=structure.flops if last else None,
                               fidelity=structure.fidelity if last else None, seconds=structure.seconds if last else 0.0,
                               report=structure.reports[i] if i < len(structure.reports) else None))
    if chosen.int8 != "none" and not native:
        probe = next((t for t in trials if t.backend is None and t.int8 == chosen.int8 and t.prune == chosen.prune
                      and t.lowrank == chosen.lowrank), None)
        if probe is not None:
            out.append(StageResult(describe(probe.configs[-1]), True, probe.note or "chosen by the search",
                                   size_mb=probe.size_mb, fidelity=probe.fidelity, seconds=probe.seconds,
                                   report=probe.reports[0] if probe.reports else None))
    name = f"compile: {chosen.backend}" + (f" + {describe(chosen.configs[-1])}" if native else "")
    out.append(StageResult(name, True, chosen.note, speedup=chosen.speedup, latency_ms=chosen.latency_ms,
                           size_mb=chosen.size_mb, flops=chosen.flops, fidelity=chosen.fidelity, metric=chosen.metric,
                           seconds=chosen.seconds, report=chosen.reports[0] if chosen.reports else None))
    return out


def run_search(original: nn.Module, example: Any, space: SearchSpace, *, backend: str, options: dict,
               eval_fn: Callable | None, tol: Tolerance, calib: list | None, val: list, output_fn: Callable | None,
               runs: int, warmup: int, threads: int | None, dynamic_dims: Any, progress: bool | None,
               recovery: dict | None, time_budget_s: float | None) -> Searched:
    """The search behind ``optimize(recipe="auto")`` (which has checked the arguments, split the batches and
    put ``original`` in eval mode); see the module docstring."""
    from tqdm.auto import tqdm

    from .dropin import wrap
    from .pipeline import _batch_is_dynamic

    from . import search_rungs as rungs

    clock = rungs.Clock(time_budget_s)
    bar = tqdm(desc="optimize: auto", unit="step", disable=(not progress) if progress is not None else None)
    try:
        base_metric = float(eval_fn(original)) if eval_fn is not None else None
        cx = rungs.Context(original, example, space, tol, calib, val, outputs(original, val, output_fn), output_fn,
                           eval_fn, base_metric, clock, bar, threads)
        origin = rungs.origin_trial(cx)
        origin.status = "finalist"
        trials = [origin]
        measure = rungs.Measure(cx, trials, backend, options, _batch_is_dynamic(dynamic_dims), runs, warmup)
        # the original on every engine first: a measured best candidate exists before the structures are
        # searched, and the timing of that round sizes what the final timing needs of the budget
        measure.add([origin])
        structure_trials, survivors = rungs.structures(cx, origin)
        trials[1:1] = structure_trials
        # then what needs no recovery
        sure = [t for t in survivors if t.status == "ok"][:space.finalists]
        for t in sure:
            t.status = "finalist"
        measure.add(sure)
        # then, fastest first, the structures that need distillation and raced faster than those
        pending = [t for t in survivors if t.status == "needs recovery"]
        bar_speed = max((t.speedup or 0.0 for t in sure), default=1.0)
        for t in (t for t in survivors if t.status == "ok"):
            t.status, t.model = "dropped", None
            t.note = f"not needed: {space.finalists} faster structures are ready"
        ready = rungs.recover(cx, pending, recovery, space.finalists - len(sure), bar_speed)
        measure.add(ready)
        measured = measure.finish()
        chosen, reason = _choose(measured, tol)
        if chosen is not None:
            chosen, reason = _confirm(cx, chosen, tol, runs, warmup)
    finally:
        bar.close()
    if chosen is not None:
        compiled, transformed, used = chosen.model, chosen.eager, chosen.backend
        stages = _stages(chosen, trials, origin, base_metric)
    else:
        transformed = copy.deepcopy(original)
        compiled, used, stages = transformed, "eager", _stages_original(origin, base_metric, reason)
    for t in trials:   # only the chosen one's models are returned
        if t is not chosen:
            t.model = t.eager = None

    counts: dict[str, int] = {}
    for t in trials:
        counts[t.status] = counts.get(t.status, 0) + 1
    ran_out = clock.ran_out_at is not None
    summary: dict[str, Any] = {
        "result": (f"{chosen.name}: {chosen.speedup:.2f}x faster than the original" if chosen is not None
                   else f"the original model is returned: {reason}"),
        "speedup vs original": chosen.speedup if chosen is not None else 1.0,
        "cosine vs original": chosen.fidelity.cosine if chosen is not None else 1.0,
    }
    if chosen is not None and chosen.fidelity.worst_cosine is not None:
        summary["worst cosine vs original"] = chosen.fidelity.worst_cosine
    if base_metric is not None:
        final = chosen.metric if chosen is not None else base_metric
        summary["metric (original -> final)"] = f"{base_metric:.4g} -> {final:.4g}"
    summary.update({
        "tolerance": ", ".join(f"{k}={v}" for k, v in tol.to_dict().items() if k != "type" and v is not None) or "off",
        "time": f"{clock.used():.0f}s" + (f" of a {time_budget_s:g}s budget" if time_budget_s is not None else ""),
        "time budget": _budget_note(clock, time_budget_s),
        "candidates": ", ".join(f"{n} {k}" for k, n in counts.items()),
        "backends": ", ".join(sorted({t.backend for t in trials if t.backend})) or "none",
        "threads": threads if threads is not None else torch.get_num_threads(),
    })
    notes = [f"rungs: probe = output fidelity vs the original on the first 2 of {len(val)} validation batch(es), "
             f"no timing; race = eager, {space.race_runs} runs round-robin with the original; recover = "
             f"torchfast.distill on the calibration batches (no labels), checked on every validation batch; "
             f"measure = every validation batch{' and eval_fn' if eval_fn is not None else ''}, timed round-robin "
             f"with the original on the example inputs ({runs} runs; within {rungs.RUNOFF_MARGIN:.0%} of the "
             f"fastest: again, {2 * runs} runs; the chosen one: again alone with the original, {2 * runs} runs). "
             f"speedup: the original's median / the candidate's, from its last timing (race rows: eager, short).",
             "size: the PyTorch model's serialized state_dict; '-' where an engine's own toolchain made the int8.",
             "pareto: no other fully measured candidate is both faster and more faithful "
             f"({'metric' if base_metric is not None else 'cosine'})."]
    if tol.max_metric_drop is not None and eval_fn is None:
        notes.append("no eval_fn given: the metric bound of the tolerance was not checked.")
    report = search_report(trials, summary, base_metric, tol.min_worst_cosine is not None, notes)
    if chosen is not None:
        for s in stages[1:]:
            if s.report is not None:
                report.children.append(s.report)
    drop_in = wrap(compiled, example, like=original, dynamic_dims=dynamic_dims)
    return Searched(model=drop_in, report=report, transformed=transformed, backend=used, stages=stages,
                    example_inputs=example, trials=trials, chosen=chosen, reason=reason, budget_exhausted=ran_out)


def _budget_note(clock: Any, budget_s: float | None) -> str:
    past = clock.used() - budget_s if budget_s is not None else 0.0
    over = f"; the steps under way ended {past:.0f}s past it" if past >= 1.0 else ""
    if clock.ran_out_at is not None:
        return f"ran out during '{clock.ran_out_at}': the best candidate found so far is returned{over}"
    return f"not exhausted when the last step began{over}" if over else "not exhausted"


def _stages_original(origin: Trial, base_metric: float | None, reason: str) -> list:
    from .pipeline import StageResult
    return [StageResult("original", True, f"returned unchanged: {reason}", speedup=1.0, size_mb=origin.size_mb,
                        flops=origin.flops, fidelity=origin.fidelity, metric=base_metric)]
