"""The rungs of the ``recipe="auto"`` search, cheapest evidence first (see ``torchfast.search``).

Each rung takes the trials the previous one left alive, gathers one dearer piece of evidence, and marks
the rest with the reason they stop there. Every step goes through torchfast's own transforms, measures
and compilers; a step that raises becomes the trial's row, never an exception. The time budget is checked
between steps.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

from .measure import Fidelity, compare_many, compare_outputs, outputs
from .modules import call_model
from .search_report import Trial, beats
from .tolerance import Tolerance

if TYPE_CHECKING:
    from .search import SearchSpace

RUNOFF_MARGIN = 0.10        # candidates this close to the fastest are timed again, head to head, twice as long
_now = time.perf_counter    # the search's clock (tests replace it to exhaust a budget deterministically)


class Clock:
    """The time budget, checked between steps, never inside one. A step is not started when steps of its kind
    so far say it would end past the budget, less what the final timing of the kept candidates will need
    (``reserve``): a short budget ends near its mark instead of one long step past it."""

    def __init__(self, budget_s: float | None) -> None:
        self.start, self.budget = _now(), budget_s
        self.ran_out_at: str | None = None
        self.reserve = 0.0
        self._took: dict[str, list[float]] = {}

    def used(self) -> float:
        return _now() - self.start

    def took(self, kind: str, seconds: float) -> None:
        self._took.setdefault(kind, []).append(seconds)

    def expect(self, kind: str, like: str | None = None) -> float:
        """The median duration of the steps of ``kind`` so far; before the first, of the kinds starting with
        ``like``; 0 without any."""
        done = sorted(self._took.get(kind, ()))
        if not done and like is not None:
            done = sorted(x for k, xs in self._took.items() if k.startswith(like) for x in xs)
        return done[len(done) // 2] if done else 0.0

    def left(self) -> float | None:
        """Seconds left for the steps before the final timing (None: no budget)."""
        return None if self.budget is None else max(0.0, self.budget - self.used() - self.reserve)

    def out(self, where: str, expected_s: float = 0.0) -> bool:
        if self.budget is not None and self.used() + expected_s + self.reserve >= self.budget:
            self.ran_out_at = self.ran_out_at or where
            return True
        return False


def _error(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300]}" if text else type(e).__name__


def int8_config(mode: str) -> Any:
    from .quant.config import Int8Dynamic, Int8Static
    # static: the compiled engine is what gets timed, so quantize must not fall back to float on eager timing
    return Int8Static(progress=False, keep_slower=True) if mode == "static" else Int8Dynamic()


@dataclass
class Context:
    """What every step of one search shares."""
    original: nn.Module
    example: Any
    space: "SearchSpace"
    tol: Tolerance
    calib: list | None
    val: list
    ref: list[torch.Tensor]            # the original's outputs on ``val``, computed once
    output_fn: Callable | None
    eval_fn: Callable | None
    base_metric: float | None
    clock: Clock
    bar: Any
    threads: int | None = None

    def fidelity(self, model: Any, n: int | None = None) -> Fidelity:
        batches = self.val if n is None else self.val[:n]
        return compare_outputs(self.ref[:len(batches)], outputs(model, batches, self.output_fn))

    def judge(self, t: Trial, model: Any, probe: bool) -> list[str]:
        """Measure ``model`` into ``t``; the bounds it breaks (probe: on the first two validation batches)."""
        t.fidelity = self.fidelity(model, 2 if probe else None)
        t.metric = float(self.eval_fn(model)) if self.eval_fn is not None else None
        drop = None if t.metric is None else self.base_metric - t.metric
        return self.tol.violations(t.fidelity, drop)

    def step(self, text: str) -> None:
        self.bar.set_postfix_str(text[:60])
        self.bar.update(1)

    def time(self, trials: list[Trial], runs: int, warmup: int, settle: int = 0) -> None:
        """Time ``trials`` round-robin with the original on the example inputs; their speedups vs it."""
        lat = compare_many({"(original)": self.original, **{t.name: t.model for t in trials}}, self.example,
                           warmup=warmup, runs=runs, threads=self.threads, settle=settle)
        base = lat["(original)"].median_ms
        for t in trials:
            t.latency_ms = lat[t.name].median_ms
            t.speedup = base / t.latency_ms if t.latency_ms > 0 else None


# ---------------------------------------------------------------- rungs 1-2: structures, probed then raced
def origin_trial(cx: Context) -> Trial:
    from .pipeline import _flops, _size
    t = Trial(0.0, None, status="ok", note="the original model", model=copy.deepcopy(cx.original))
    t.flops, t.size_mb, t.fidelity = _flops(cx.original, cx.example), _size(cx.original)[0], cx.fidelity(cx.original, 2)
    return t


def _build_structure(cx: Context, t: Trial, origin: Trial, pruned: dict) -> None:
    """Apply the trial's pruning (shared per amount) and low-rank step, then probe its fidelity."""
    from .dropin import eval_mode
    from .pipeline import _flops, _size
    from .recipe import apply_stage
    clock = cx.clock
    expected = ((clock.expect("prune") if t.prune and t.prune not in pruned else 0.0)
                + (clock.expect(f"lowrank {t.lowrank}") if t.lowrank is not None else 0.0))
    if clock.out("probe", expected):
        t.status, t.note = "not evaluated", "time budget ran out"
        return
    cx.step(f"probe {t.name}")
    t0 = _now()
    try:
        model, reports = cx.original, []
        if t.prune:
            if t.prune not in pruned:
                t1 = _now()
                try:
                    pruned[t.prune] = apply_stage(copy.deepcopy(cx.original), t.configs[0], cx.example, cx.calib)
                except Exception as e:  # noqa: BLE001 - every structure with this amount fails alike
                    pruned[t.prune] = e
                clock.took("prune", _now() - t1)
            if isinstance(pruned[t.prune], BaseException):
                raise pruned[t.prune]
            model, rep = pruned[t.prune]
            reports.append(rep)
        if t.lowrank is not None:
            t1 = _now()
            try:
                model, rep = apply_stage(copy.deepcopy(model), t.configs[-1], cx.example, cx.calib)
            finally:
                clock.took(f"lowrank {t.lowrank}", _now() - t1)
            reports.append(rep)
        elif t.prune:
            model = copy.deepcopy(model)  # the shared pruned model stays as it was for the low-rank ones
        eval_mode(model)
        t.model, t.reports = model, reports
        t.flops, t.size_mb = _flops(model, cx.example), _size(model)[0]
        bad = cx.judge(t, model, probe=True)
    except Exception as e:  # noqa: BLE001 - a candidate that crashes is a row
        t.status, t.note, t.model = "failed", _error(e), None
        return
    finally:
        t.seconds += _now() - t0
    if t.flops is not None and t.flops == origin.flops and t.size_mb == origin.size_mb:
        t.status, t.note, t.model = "dropped", "changed nothing (no layer pruned or factorized)", None
    elif bad:
        t.status, t.note = "needs recovery", "; ".join(bad)
    else:
        t.status = "ok"


def _alive(trials: list[Trial]) -> list[Trial]:
    return [t for t in trials if t.status in ("ok", "needs recovery")]


def _race(cx: Context, trials: list[Trial]) -> bool:
    """Time the alive structures briefly in eager; False when the budget leaves no time for it."""
    alive = _alive(trials)
    if not alive:
        return True
    if cx.clock.out("race", cx.clock.expect("race") * (len(alive) + 1)):
        return False
    cx.step(f"race {len(alive)} structures")
    t0 = _now()
    cx.time(alive, cx.space.race_runs, warmup=2)
    cx.clock.took("race", (_now() - t0) / (len(alive) + 1))   # per model timed
    for t in alive:
        t.rung = "race"
    return True


def _edge(a: float, b: float, better: str, equal: str) -> str:
    return better if a > b else equal


def _beaten_by(t: Trial, singles: list[Trial]) -> Trial | None:
    """A single factor of the same kind (another pruning amount, another low-rank setting) that raced at least
    as fast as ``t`` and probed at least as faithful (cosine, and the metric where there is one), better in
    one of them: that factor is the better partner for every combination, so those with ``t`` are not built.
    A factor of the other kind never rules ``t`` out: pruning and low-rank compose, their gains multiply."""
    if t.speedup is None or t.fidelity is None:
        return None
    for o in singles:
        if o is t or o.speedup is None or o.fidelity is None or o.status not in ("ok", "needs recovery"):
            continue
        if (o.lowrank is None) != (t.lowrank is None):
            continue
        if t.metric is not None and (o.metric is None or o.metric < t.metric):
            continue
        if beats(o, t, lambda x: x.fidelity.cosine):
            return o
    return None


def structures(cx: Context, origin: Trial) -> tuple[list[Trial], list[Trial]]:
    """All structure trials (for the report) and the survivors of the race, fastest first.

    Pruning alone and low-rank alone are probed and raced first; a combination is built only from a pruning
    amount and a low-rank setting that each beat the original on their own and that no other factor of the
    same kind beats on both speed and fidelity (halving over the factors)."""
    space = cx.space
    pruned: dict = {}
    singles = [Trial(a, None, configs=space.structure_configs(a, None)) for a in space.prune if a]
    singles += [Trial(0.0, r, configs=space.structure_configs(0.0, r)) for r in space.lowrank if r is not None]
    for t in singles:
        _build_structure(cx, t, origin, pruned)
    raced = _race(cx, singles)
    wins = {(t.prune, t.lowrank): t for t in singles if (t.speedup or 0.0) > 1.0 and _beaten_by(t, singles) is None}
    combos = []
    for a in (a for a in space.prune if a):
        for r in (r for r in space.lowrank if r is not None):
            t = Trial(a, r, configs=space.structure_configs(a, r))
            combos.append(t)
            losers = [s for s in singles if (s.prune, s.lowrank) in ((a, None), (0.0, r)) and s not in wins.values()]
            if not raced:
                t.status, t.note = "not evaluated", "time budget ran out"
            elif losers:
                s = losers[0]
                better = _beaten_by(s, singles) if (s.speedup or 0.0) > 1.0 else None
                if better is not None:
                    why = (f"{better.name} alone is {_edge(better.speedup, s.speedup, 'faster', 'as fast')} "
                           f"({better.speedup:.2f}x vs {s.speedup:.2f}x in eager) and "
                           f"{_edge(better.fidelity.cosine, s.fidelity.cosine, 'more faithful', 'as faithful')} "
                           f"(cosine {better.fidelity.cosine:.4f} vs {s.fidelity.cosine:.4f}) than {s.name}")
                else:
                    why = f"{s.name} alone did not beat the original (" + \
                        (f"{s.speedup:.2f}x in eager)" if s.speedup is not None else f"{s.status})")
                t.status, t.note = "dropped", f"not built: {why}"
            else:
                _build_structure(cx, t, origin, pruned)
    trials = [*singles, *combos]
    if any(t.status in ("ok", "needs recovery") for t in combos):
        raced = _race(cx, [*wins.values(), *combos])  # one round, so the ranking compares like with like
    if not raced:  # out of time: what needs no recovery goes on, fewest FLOPs first
        for t in _alive(trials):
            if t.status == "needs recovery":
                t.status, t.note, t.model = "not evaluated", "time budget ran out before the race", None
        return trials, sorted(_alive(trials), key=lambda t: t.flops or 0)
    ranked = sorted(_alive(trials), key=lambda t: -(t.speedup or 0.0))
    faster = [t for t in ranked if (t.speedup or 0.0) > 1.0]
    kept = faster[:math.ceil(len(faster) / 2)]
    for t in ranked:
        if t not in kept:
            t.status, t.model = "dropped", None
            t.note = (f"slower than the original in eager ({t.speedup:.2f}x)" if t not in faster else
                      f"slower half of the race ({t.speedup:.2f}x; kept >= {kept[-1].speedup:.2f}x)")
    return trials, kept


# ---------------------------------------------------------------- rung 3: recover, then int8
def recover(cx: Context, pending: list[Trial], recovery: dict | None, slots: int, bar_speed: float) -> list[Trial]:
    """Fastest first, distill the structures that need it, while ``slots`` finalist places are left and the
    structure raced faster than ``bar_speed`` (the fastest structure that needed no recovery)."""
    from .distill import distill
    ready: list[Trial] = []
    for t in pending:
        if len(ready) >= slots:
            t.status, t.note, t.model = "dropped", f"not needed: {cx.space.finalists} faster structures are ready", None
            continue
        if t.speedup is not None and t.speedup <= bar_speed:
            t.status, t.model = "dropped", None
            t.note = f"{t.note}; not recovered: a structure needing no recovery raced faster ({bar_speed:.2f}x)"
            continue
        if recovery is None or not cx.calib:
            why = "recover=None" if recovery is None else "no calibration batches to distill on"
            t.status, t.note, t.model = "rejected", f"{t.note} ({why})", None
            continue
        if cx.clock.out("recover", cx.clock.expect("recover")):
            t.status, t.note, t.model = "not evaluated", "time budget ran out before its recovery", None
            continue
        cx.step(f"distill {t.name}")
        t.rung, before, t0 = "recover", t.fidelity, _now()
        try:
            t.model, rep = distill(t.model, cx.original, cx.calib, output_fn=cx.output_fn, progress=False,
                                   inplace=True, **recovery)
            t.reports.append(rep)
            bad = cx.judge(t, t.model, probe=False)
        except Exception as e:  # noqa: BLE001
            t.status, t.note, t.model = "failed", f"distillation failed: {_error(e)}", None
            continue
        finally:
            t.seconds += _now() - t0
            cx.clock.took("recover", _now() - t0)
        t.recovered = f"cosine {before.cosine:.4f} -> {t.fidelity.cosine:.4f} ({rep.summary.get('steps')} steps)"
        if bad:
            t.status, t.note, t.model = "rejected", "after recovery: " + "; ".join(bad), None
            continue
        t.status, t.note = "finalist", "distilled without labels"
        ready.append(t)
    return ready


def int8_probes(cx: Context, ready: list[Trial], trials: list[Trial],
                modes: tuple[str, ...] | None = None) -> dict[int, dict[str, Any]]:
    """Per ready structure: {int8 mode: its torch int8 model (quantize() with per-layer float fallback to
    the tolerance), or None}, for ``modes`` (default: every int8 mode of the space). A torch int8 that fails
    or leaves the model float still lets the engines try their own int8 lowering in the measure rung."""
    from .backends.registry import quantization_kind
    from .pipeline import _size
    from .quant import quantize
    from .quant.budget import time_limit
    out: dict[int, dict[str, Any]] = {}
    for s in ready:
        out[id(s)] = {}
        for mode in (m for m in cx.space.int8 if m != "none" and (modes is None or m in modes)):
            cfg = int8_config(mode)
            t = Trial(s.prune, s.lowrank, mode, configs=[*s.configs, cfg], flops=s.flops)
            trials.append(t)
            out[id(s)][mode] = None
            if cx.clock.out("int8 probe", cx.clock.expect(f"int8 {mode}")):
                t.status, t.note = "not evaluated", "time budget ran out"
                continue
            cx.step(f"probe {t.name}")
            t0 = _now()
            try:
                with time_limit(cx.clock.left()):
                    q, rep = quantize(s.model, cfg, example_inputs=cx.example, calibration=cx.calib or [cx.example],
                                      validation=cx.val[:2], tolerance=cx.tol)
                t.reports.append(rep)
                if quantization_kind(q) is None:
                    t.status = "dropped"
                    t.note = (f"torch int8 left the model float ({rep.summary.get('result', 'no layer quantized')}); "
                              f"the engines' own int8 is still tried")
                    continue
                t.size_mb = _size(q)[0]
                bad = cx.judge(t, q, probe=True)
            except Exception as e:  # noqa: BLE001
                t.status, t.note = "failed", f"{_error(e)}; the engines' own int8 is still tried"
                continue
            finally:
                t.seconds += _now() - t0
                cx.clock.took(f"int8 {mode}", _now() - t0)
            if bad:
                t.status, t.note = "rejected", "; ".join(bad)
                continue
            t.status, t.model = "ok", q
            kept_float = rep.summary.get("layers kept float for the budget")
            if kept_float:
                t.note = f"{kept_float} layer(s) kept float for the tolerance"
            out[id(s)][mode] = q
    return out


# ---------------------------------------------------------------- rung 4: every engine, then the timing
def backends_here(cx: Context, backend: str, device: str) -> list[str]:
    from .backends.registry import BACKENDS
    names = list(cx.space.backends or [b for b in BACKENDS if b != "auto"]) if backend == "auto" else [backend]
    return [b for b in names if BACKENDS[b].available()[0] and device in BACKENDS[b].devices]


def _engines(cx: Context, s: Trial, int8s: dict[str, Any], names: list[str]) -> list[tuple[str, str]]:
    """(backend, int8 mode) pairs a structure can be built as: float on every backend; int8 through the
    engine's own toolchain (ONNX Runtime, OpenVINO) or as the torch int8 model where the backend runs it."""
    from .backends import INT8_NATIVE
    from .backends.registry import BACKENDS, quantization_kind
    out = []
    for b in names:
        if "none" in cx.space.int8 and not (b == "eager" and not s.configs):  # the original in eager: the baseline
            out.append((b, "none"))
        for mode in (m for m in cx.space.int8 if m != "none"):
            if b in INT8_NATIVE:
                out.append((b, mode))
            elif int8s.get(mode) is not None and quantization_kind(int8s[mode]) in BACKENDS[b].quantized:
                out.append((b, mode))
    return out


def _build(cx: Context, s: Trial, int8s: dict[str, Any], b: str, mode: str, options: dict,
           dynamic_batch: bool) -> Trial:
    from . import backends
    from .pipeline import _size
    native = b in backends.INT8_NATIVE and mode != "none"
    cfg = int8_config(mode) if mode != "none" else None
    t = Trial(s.prune, s.lowrank, mode, b, configs=[*s.configs, *([cfg] if cfg is not None else [])],
              rung="measure", flops=s.flops, recovered=s.recovered)
    source = s.model if mode == "none" or native else int8s[mode]
    t.size_mb = None if native else (s.size_mb if mode == "none" else _size(source)[0])
    kwargs = dict(options)
    if dynamic_batch and b not in ("eager", "inductor"):  # engines fixing shapes when built must take any batch
        kwargs.setdefault("dynamic_batch", True)
    if native:
        kwargs.update(int8=cfg, calibration=cx.calib or [cx.example])
    cx.step(f"build {t.name}")
    t0 = _now()
    try:
        compiled = backends.compile(source, cx.example, backend=b, **kwargs)
        with torch.inference_mode():
            call_model(compiled, cx.example)
        t.seconds = _now() - t0
        bad = cx.judge(t, compiled, probe=False)
    except Exception as e:  # noqa: BLE001 - a backend that cannot take the model is a row
        t.status, t.note, t.seconds = "failed", _error(e), _now() - t0
        return t
    t.model, t.eager = compiled, source
    t.reports = [r for r in (getattr(compiled, "report", None),) if r is not None]
    if bad:
        t.status, t.note, t.model = "rejected", "; ".join(bad), None
    else:
        t.status, t.note = "measured", f"int8 by {b}'s own toolchain" if native else ""
    return t


def _one_call_s(model: nn.Module, example: Any) -> float:
    """One warm eager call of ``model`` (the first call pays for allocations and lazy initialization)."""
    with torch.inference_mode():
        call_model(model, example)
        t0 = _now()
        call_model(model, example)
        return max(0.0, _now() - t0)


SLOW_TO_BUILD = ("inductor",)   # C++ code generation and compilation per graph: built after the others


class Measure:
    """Rung 4, fed finalists in two waves (those needing no recovery, then the recovered ones): the first
    finalist (the original) is built on every engine and timed, the later ones only on the ``engines``
    fastest kinds; ``finish`` times everything kept round-robin and runs off the closest."""

    def __init__(self, cx: Context, trials: list[Trial], backend: str, options: dict, dynamic_batch: bool,
                 runs: int, warmup: int) -> None:
        from .modules import model_device
        device = str(options.get("device") or model_device(cx.original).type).split(":")[0]
        self.cx, self.trials, self.options, self.dynamic_batch = cx, trials, options, dynamic_batch
        self.runs, self.warmup = runs, warmup
        self.names = backends_here(cx, backend, device)
        self.kinds: list[tuple[str, str]] | None = None
        self.kept: list[Trial] = []
        # a model's share of a timing round (its warm-up, settle and timed calls): the original's from one warm
        # call; a candidate's is taken as half that until the first round measures it
        self.original_s = (warmup + runs * 2) * _one_call_s(cx.original, cx.example)
        self.candidate_s = self.original_s / 2

    def add(self, finalists: list[Trial]) -> None:
        """Build each finalist on its engines: float and the engines' own int8 first, then (after its torch int8
        probes, only for the modes a kept kind of engine runs) the torch int8 models; the first finalist's
        builds are timed and the ``engines`` fastest kinds kept for the others."""
        from .backends import INT8_NATIVE
        cx = self.cx
        for s in finalists:
            first = self._wanted(s, {})
            built = self._build_each(s, {}, first)
            if self.kinds is None:
                modes = None
            else:
                modes = tuple(sorted({m for b, m in self.kinds if m != "none" and b not in INT8_NATIVE}))
            int8s = int8_probes(cx, [s], self.trials, modes)[id(s)] if modes != () else {}
            second = [e for e in self._wanted(s, int8s) if e not in first]
            built += self._build_each(s, int8s, second)
            if self.kinds is not None and not first and not second:   # none of the kept kinds takes it
                built += self._build_each(s, int8s, _engines(cx, s, int8s, self.names)[:cx.space.engines])
            if self.kinds is None and len(built) > cx.space.engines:
                # successive halving over the engines: the first finalist's, timed in full; the fastest go on
                cx.step(f"time {len(built)} engines of {s.structure}")
                t0 = _now()
                cx.time(built, self.runs, self.warmup, settle=1)
                self.candidate_s = max(0.0, _now() - t0 - self.original_s) / len(built)
                built.sort(key=lambda t: -(t.speedup or 0.0))
                for t in built[cx.space.engines:]:
                    t.status, t.model = "dropped", None
                    t.note = (f"slower engine on {s.structure} ({t.speedup:.2f}x; kept >= "
                              f"{built[cx.space.engines - 1].speedup:.2f}x)")
                built = built[:cx.space.engines]
            if self.kinds is None and built:
                self.kinds = [(t.backend, t.int8) for t in built]
            self.kept += built
            self._reserve()

    def _reserve(self, first_round: int = 0) -> None:
        """Keep the budget's time for the first engine round (``first_round`` candidates, while it is pending),
        the final timing of everything kept and the head-to-head confirmation (twice as long)."""
        engines = self.cx.space.engines
        pending = self.original_s + self.candidate_s * first_round if first_round > engines else 0.0
        kept = len(self.kept) if self.kinds is not None else min(engines, max(first_round, 1))
        self.cx.clock.reserve = pending + 3 * self.original_s + self.candidate_s * (kept + 2)

    def _wanted(self, s: Trial, int8s: dict[str, Any]) -> list[tuple[str, str]]:
        """The engines to build ``s`` on, quickest to build first: a budget that runs out has spent itself on
        the most builds (inductor's compile takes a minute where OpenVINO's takes seconds)."""
        from .backends import INT8_NATIVE
        engines = _engines(self.cx, s, int8s, self.names)
        if self.kinds is not None:
            engines = [e for e in engines if e in self.kinds]
        return sorted(engines, key=lambda e: (e[0] in SLOW_TO_BUILD, e[0] in INT8_NATIVE and e[1] != "none"))

    def _build_each(self, s: Trial, int8s: dict[str, Any], engines: list[tuple[str, str]]) -> list[Trial]:
        cx, built = self.cx, []
        for b, mode in engines:
            if self.kinds is None:
                self._reserve(first_round=len([t for t in self.trials if t.status == "measured"]) + 1)
            # eager costs nothing to build: always measured; an engine not built yet is expected to take
            # what the builds so far took
            if b != "eager" and cx.clock.out("measure", cx.clock.expect(f"build {b} {mode}", like="build ")):
                self.trials.append(Trial(s.prune, s.lowrank, mode, b, rung="measure", status="not evaluated",
                                         note="time budget ran out"))
                continue
            t = _build(cx, s, int8s, b, mode, self.options, self.dynamic_batch)
            cx.clock.took(f"build {b} {mode}", t.seconds)
            self.trials.append(t)
            if t.status == "measured":
                built.append(t)
        return built

    def finish(self) -> list[Trial]:
        cx, kept = self.cx, self.kept
        if not kept:
            return []
        cx.step(f"time {len(kept)} candidates")
        cx.time(kept, self.runs, self.warmup, settle=1)
        best = max(t.speedup or 0.0 for t in kept)
        close = [t for t in kept if (t.speedup or 0.0) >= best / (1 + RUNOFF_MARGIN)]
        if len(close) > 1:  # a short timing cannot separate these: again, head to head, twice as long
            cx.step(f"run-off of {len(close)}")
            cx.time(close, 2 * self.runs, self.warmup, settle=1)
        return kept
