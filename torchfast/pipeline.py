"""``optimize()``: a recipe of transforms, verified stage by stage, compiled for a backend.

optimize() is only composition plus measurement: each stage runs through the transform that owns its
config (``torchfast.recipe.apply_stage``) on a copy of the model, is measured against the ORIGINAL
(latency interleaved, size, FLOPs, fidelity, task metric), and is rolled back when it breaks the
tolerance. The result is a drop-in module (``torchfast.wrap``) and a Report with one row per stage.
"""
from __future__ import annotations

import copy
import dataclasses
import statistics
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from .config import Config, ConfigError, check_range
from .tolerance import Tolerance, as_tolerance as _as_tolerance
from .measure import Fidelity, Timing, compare_latency, count_flops, fidelity, resolve_timing, size_of
from .quant.config import Int8Dynamic, Int8Static
from .quantized import quantization_of
from .modules import (ExampleInputError, batches_list, call_model, check_module, describe_batch,
                      restore_training_flags, training_flags)
from .dropin import eval_mode
from .recipe import apply_stage, stage_for
from .report import Report
from .stages import check_backend as check_stages_backend, stage_of

__all__ = ["Tolerance", "StageResult", "Optimized", "optimize", "describe", "ExampleInputError"]


def describe(config: Config) -> str:
    """``LowRank(ratio=0.5)``: the config's type and the fields that differ from their defaults."""
    parts = []
    for f in dataclasses.fields(config):
        v = getattr(config, f.name)
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
        try:
            same = v is default or v == default
        except Exception:  # tensors, data loaders
            same = False
        if same:
            continue
        shown = repr(v) if isinstance(v, (int, float, str, bool, type(None))) else type(v).__name__
        parts.append(f"{f.name}={shown}")
    return f"{type(config).__name__}({', '.join(parts)})"


@dataclass
class StageResult:
    name: str                       # "LowRank(ratio=0.5)", "compile: inductor"
    applied: bool
    reason: str = ""
    speedup: float | None = None    # vs the original, interleaved
    latency_ms: float | None = None
    size_mb: float | None = None
    params: int | None = None
    flops: int | None = None
    fidelity: Fidelity | None = None
    metric: float | None = None
    seconds: float = 0.0            # time to apply the stage (compile: build + warm-up, reported apart from run time)
    report: Report | None = None
    before_recovery: Fidelity | None = None       # a distilled stage's fidelity before recovery
    metric_before_recovery: float | None = None

    def row(self, baseline_metric: float | None) -> dict[str, Any]:
        f = self.fidelity
        row = {"stage": self.name, "applied": self.applied, "speedup": self.speedup,
               "latency (ms)": self.latency_ms, "size (MB)": self.size_mb, "params": self.params,
               "MFLOPs": None if self.flops is None else self.flops / 1e6,
               "cosine": None if f is None else f.cosine, "rel err": None if f is None else f.rel_err,
               "top-1 agree": None if f is None else f.top1_agreement}
        if baseline_metric is not None:
            row["metric"] = self.metric
            row["metric drop"] = None if self.metric is None else baseline_metric - self.metric
        if self.before_recovery is not None:
            row["cosine before recovery"] = self.before_recovery.cosine
            if baseline_metric is not None and self.metric_before_recovery is not None:
                row["metric drop before recovery"] = baseline_metric - self.metric_before_recovery
        row["time (s)"] = self.seconds
        row["note"] = self.reason
        return row


@dataclass
class Optimized:
    """What optimize() returns. ``model`` is the drop-in module (same forward signature as the original,
    inputs validated, compiled for the backend); ``transformed`` is the optimized module before compiling
    (what ``torchfast.save`` exports); ``report`` has one row per stage and the stage reports as children."""
    model: nn.Module
    report: Report
    transformed: nn.Module
    backend: str
    stages: list[StageResult] = field(default_factory=list)
    example_inputs: Any = field(default=None, repr=False)

    @property
    def speedup(self) -> float | None:
        """Speedup of the final model vs the original (interleaved medians)."""
        kept = [s for s in self.stages if s.applied and s.speedup is not None]
        return kept[-1].speedup if kept else None

    def table(self, per_layer: bool = False) -> str:
        """The per-stage table with its summary (``per_layer=True``: plus every stage's own per-layer report)."""
        if per_layer:
            return self.report.to_markdown()
        return Report(self.report.title, self.report.summary, self.report.rows, self.report.notes).to_markdown()

    def save(self, path: str, format: str | None = None, **kwargs: Any):
        """Save the result as a deployable artifact through ``torchfast.save``: the compiled model when the
        backend kept it (its native artifact is reused where the format matches), else the transformed
        one. ``format`` defaults from the extension: ``.pt2`` exported_program, ``.onnx`` onnx, ``.xml``
        openvino, else torchscript. A model whose int8 lives in an engine's own format (NNCF, QDQ) saves
        only in that format: anything else would silently drop the int8."""
        from .export import format_for_path, save
        fmt = format or format_for_path(path)
        from .backends.compiled import Compiled
        inner = getattr(self.model, "inner", self.model)
        # the drop-in wrapper of a compiled model (save() unwraps it and records the dims it checks as
        # dynamic), else the transformed eager model
        compiled = inner if isinstance(inner, Compiled) else None
        native = {"onnxruntime": "onnx", "openvino": "openvino"}.get(getattr(compiled, "backend", None))
        lowered = any(s.applied and s.name.startswith("compile:") and "Int8" in s.name for s in self.stages)
        if native and lowered and fmt != native:
            raise ValueError(f"the optimized model is {compiled.backend} int8; it saves as format={native!r} "
                             f"(a .{'onnx' if native == 'onnx' else 'xml'} path), not {fmt!r}")
        if "example_inputs" not in kwargs and getattr(self, "example_inputs", None) is not None:
            kwargs["example_inputs"] = self.example_inputs
        return save(self.model if compiled is not None else self.transformed, path, format=fmt, **kwargs)

    def chart(self, path: str, **kwargs: Any) -> str:
        """PNG of latency vs fidelity per stage (needs matplotlib: ``pip install 'torchfast[plot]'``)."""
        from .chart import plot
        return plot(self.report, path, **kwargs)

    def __repr__(self) -> str:
        return f"Optimized(backend={self.backend!r}, stages={len(self.stages)}, speedup={self.speedup})"


# ---------------------------------------------------------------- helpers
def _flops(model: nn.Module, example: Any) -> int | None:
    """FLOPs of one forward, or None where FlopCounterMode cannot see the kernels (quantized weights)."""
    q = quantization_of(model)
    if q is not None and q.stored:
        return None
    try:
        return int(count_flops(model, example))
    except Exception:
        return None


def _size(model: nn.Module) -> tuple[float | None, int | None]:
    try:
        s = size_of(model)
        # quantized kernels keep weights in packed params, invisible to parameters(): '-' rather than 0
        return s.mb, (s.params or None)
    except Exception:
        return None, None


def _compile(model: nn.Module, example_inputs: Any, backend: str, options: dict) -> nn.Module:
    from . import backends
    if backend != "auto":  # optimize measures the compiled model against the original itself: verify once
        options = {"verify": False, **options}
    return backends.compile(model, example_inputs, backend=backend, **options)


def _is_backend_error(e: Exception) -> bool:
    from .backends.registry import BackendError
    return isinstance(e, BackendError)


def _engine_lowers(recipe: Sequence[Config], backend: str) -> bool:
    """Whether the backend quantizes the model itself with the recipe's last stage (NNCF for OpenVINO, QDQ
    for ONNX Runtime; under "auto" every backend's lowering is a candidate) instead of running it."""
    from .backends import INT8_NATIVE
    if backend not in ("auto", *INT8_NATIVE) or not recipe:
        return False
    stage = stage_of(recipe[-1])
    return stage is not None and stage.engine_int8


def _check_backend(backend: str, model: nn.Module, options: dict) -> None:
    """Fail before any work when the backend does not exist, is not installed, or cannot run on the
    requested device/dtype. (Whether it accepts what the recipe makes is checked from the stage table,
    see ``torchfast.stages.check_backend``; a compile failure past that keeps the eager model and the
    report says why.)"""
    if not isinstance(backend, str):
        raise ConfigError(f"backend must be a name such as 'eager' or 'inductor', got {type(backend).__name__}")
    if backend == "auto":
        return
    from . import backends
    from .modules import model_device
    spec = backends.get_backend(backend)
    device = options.get("device")
    if device is None:
        device = spec.devices[0] if len(spec.devices) == 1 else model_device(model).type
    device = device if isinstance(device, str) else torch.device(device).type
    from .backends.registry import normalize_dtype
    backends.registry.check(backend, device=device.split(":")[0], dtype=normalize_dtype(options.get("dtype")),
                            quant_kind=backends.quantization_kind(model),
                            dynamic_batch=bool(options.get("dynamic_batch", False)),
                            scripted=isinstance(model, torch.jit.ScriptModule))


# engines whose compiled model only takes the shapes it was built for (and auto, which may pick one)
_STATIC_SHAPE_ENGINES = ("onnxruntime", "openvino", "tensorrt", "auto")


def _batch_is_dynamic(dynamic_dims: Any) -> bool:
    if isinstance(dynamic_dims, dict):
        return any(0 in tuple(v) for v in dynamic_dims.values())
    return 0 in tuple(dynamic_dims or ())


# ---------------------------------------------------------------- optimize
def optimize(model: nn.Module, example_inputs: Any, recipe: Sequence[Config] | str = (), *,
             backend: str | None = None, backend_options: dict | None = None,
             eval_fn: Callable[[Callable], float] | None = None, tolerance: Tolerance | dict | None = None,
             calibration: Iterable | None = None, validation: Iterable | None = None,
             output_fn: Callable[[Any], torch.Tensor] | None = None,
             timing: Timing | None = None, runs: int | None = None, warmup: int | None = None,
             threads: int | None = None, on_error: str = "raise", dynamic_dims: Any = (0,), progress: bool | None = None,
             recover: str | dict | None = "distill", time_budget_s: float | None = None) -> Optimized:
    """Apply ``recipe`` stage by stage on a copy of ``model``, verify each stage, compile, wrap.

    ``example_inputs`` is one batch (tensor, tuple of positional inputs, or dict of keyword inputs): it
    is timed and defines the drop-in module's input checks. ``calibration`` (batches) goes to the
    stages that calibrate or are data-aware. Fidelity is measured on ``validation`` batches (default:
    the last quarter of the calibration batches, 1 to 8, held out from the stages; else the example
    inputs); ``eval_fn(model) -> float`` adds a task metric.
    A stage that breaks ``tolerance`` is rolled back (the model before it continues) and the report
    says why. A pruning or low-rank stage that breaks it first gets its BatchNorm statistics re-estimated on
    the calibration batches; if still outside, it is distilled toward the original on the
    calibration batches (``torchfast.distill``, no labels) and kept if that brings it within tolerance;
    the report shows its fidelity before and after. ``recover``: ``"distill"`` (default; only acts when
    calibration batches are given), a dict of ``distill`` options (``{"steps": 500}``), or None (off).
    ``on_error="skip"`` rolls back a stage that raises instead of re-raising.
    ``timing`` (a :class:`torchfast.measure.Timing`; default ``torchfast.measure.DEFAULT_TIMING``) sets the
    runs, warm-up calls and threads of every timed comparison; ``runs``/``warmup``/``threads`` override it.

    ``recipe`` is a list of configs or a recipe string (``"lowrank:ratio=0.5,int8-static"``). A stage whose
    model ``backend`` cannot compile (torch.ao int8 on inductor) is refused with a ConfigError before any
    stage runs.

    ``recipe="auto"`` (or a :class:`torchfast.search.SearchSpace`) searches pruning x low-rank x int8 x
    every backend (``backend`` defaults to ``"auto"`` there, ``"eager"`` otherwise; a named backend narrows
    the search to it) for the fastest model within
    ``tolerance``, recovering pruned / factorized candidates by distillation on the calibration batches
    (``recover``), within ``time_budget_s`` (default 600 s; ``math.inf``: none). It returns a
    :class:`torchfast.search_report.Searched`: ``report`` is the table of every candidate (Pareto front
    marked), ``chart()`` plots it; never a model slower than the original or outside the tolerance (then the
    original, and ``reason`` says why). See ``torchfast.search``.
    """
    check_module(model)
    tol = _as_tolerance(tolerance)
    t = resolve_timing(timing, runs=runs, warmup=warmup, threads=threads)
    runs, warmup, threads = t.runs, t.warmup, t.threads
    from .search import DEFAULT_BUDGET_S, SearchSpace, is_auto
    space = None
    backend = backend if backend is not None else ("auto" if is_auto(recipe) else "eager")
    if is_auto(recipe):
        space, recipe = (recipe if isinstance(recipe, SearchSpace) else SearchSpace()), []
        time_budget_s = DEFAULT_BUDGET_S if time_budget_s is None else time_budget_s
        check_range("optimize", "time_budget_s", time_budget_s, 0.0, None, lo_inclusive=False)
    elif time_budget_s is not None:
        raise ConfigError("time_budget_s bounds the search of recipe='auto'; an explicit recipe runs every stage")
    if isinstance(recipe, str):
        from .recipe_syntax import parse_recipe
        recipe = parse_recipe(recipe, model)
    recipe = list(recipe)
    for cfg in recipe:
        stage_for(cfg)  # every stage has a transform, before any work
    if on_error not in ("raise", "skip"):
        raise ConfigError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    options = dict(backend_options or {})
    if "dynamic_batch" not in options and backend in _STATIC_SHAPE_ENGINES and _batch_is_dynamic(dynamic_dims):
        # the drop-in model takes any batch size (dynamic_dims): engines that fix shapes at build time must
        # be built for a dynamic batch, or the returned model fails on the first other batch size
        options["dynamic_batch"] = True
    _check_backend(backend, model, options)
    check_stages_backend(recipe[:-1] if _engine_lowers(recipe, backend) else recipe, backend)
    from .distill import recover_options
    recovery = recover_options(recover)
    calib = batches_list(calibration) if calibration is not None else None
    if validation is not None:
        val = batches_list(validation)
    elif calib and len(calib) >= 2:
        # fidelity is judged on batches the stages did not fit to: hold out the last quarter (1-8 batches)
        k = max(1, min(8, len(calib) // 4))
        calib, val = calib[:-k], calib[-k:]
    else:
        val = calib[:1] if calib else batches_list(example_inputs)
    if not val:
        raise ValueError("optimize needs example inputs or validation batches to measure fidelity on")

    from tqdm.auto import tqdm

    flags = training_flags(model)
    eval_mode(model)
    try:
        with torch.inference_mode():
            try:
                call_model(model, example_inputs)
            except Exception as e:
                raise ExampleInputError(f"the model does not run on example_inputs ({describe_batch(example_inputs)}): "
                                        f"{type(e).__name__}: {e}") from e
        if space is not None:
            from .search import run_search
            return run_search(model, example_inputs, space, backend=backend, options=dict(backend_options or {}),
                              eval_fn=eval_fn,
                              tol=tol, calib=calib, val=val, output_fn=output_fn, runs=runs, warmup=warmup,
                              threads=threads, dynamic_dims=dynamic_dims, progress=progress, recovery=recovery,
                              time_budget_s=time_budget_s)
        return _run(model, example_inputs, recipe, backend, options, eval_fn, tol, calib, val, output_fn,
                    runs, warmup, threads, on_error, dynamic_dims, tqdm, progress, recovery)
    finally:
        restore_training_flags(flags)


def _run(original, example, recipe, backend, options, eval_fn, tol, calib, val, output_fn,
         runs, warmup, threads, on_error, dynamic_dims, tqdm, progress, recovery=None) -> Optimized:
    from .dropin import wrap

    steps = len(recipe) + 2
    bar = tqdm(total=steps, desc="optimize", unit="stage", disable=(not progress) if progress is not None else None)
    base_metric = float(eval_fn(original)) if eval_fn is not None else None
    mb, params = _size(original)
    base_fid = fidelity(original, original, val, output_fn=output_fn)
    base = StageResult("original", True, "reference", speedup=1.0, size_mb=mb, params=params,
                       flops=_flops(original, example), fidelity=base_fid, metric=base_metric)
    baseline_ms: list[float] = []  # the original's median from every interleaved comparison
    results = [base]
    bar.update(1)

    def measure(cand, name, seconds, rep, prev=None, flops=True) -> tuple[StageResult, float | None]:
        cmp = compare_latency(original, cand, example, warmup=warmup, runs=runs, threads=threads)
        baseline_ms.append(cmp.baseline.median_ms)
        stage_speedup = None
        if tol.min_speedup is not None and prev is not None:
            stage_speedup = compare_latency(prev, cand, example, warmup=warmup, runs=runs, threads=threads).speedup
        fid = fidelity(original, cand, val, output_fn=output_fn)
        metric = float(eval_fn(cand)) if eval_fn is not None else None
        mb, params = _size(cand)
        r = StageResult(name, True, speedup=cmp.speedup, latency_ms=cmp.candidate.median_ms, size_mb=mb,
                        params=params, flops=_flops(cand, example) if flops else None, fidelity=fid, metric=metric,
                        seconds=seconds, report=rep)
        drop = None if metric is None else base_metric - metric
        bad = tol.violations(fid, drop, stage_speedup)
        if stage_speedup is not None:
            r.reason = f"stage speedup {stage_speedup:.3f}x"
        if bad:
            r.applied = False
            r.reason = "rolled back: " + "; ".join(bad)
        return r, stage_speedup

    # an int8 stage at the end of the recipe is lowered to the engine's own int8 toolchain when compiling
    # (NNCF for OpenVINO, QDQ for ONNX Runtime; under "auto" every backend's lowering is a candidate)
    lowered = None
    if _engine_lowers(recipe, backend):
        lowered = recipe[-1]
        recipe = recipe[:-1]
        options = {**options, "int8": lowered, "calibration": calib}
        bar.update(1)
    if backend == "auto":
        options = {"validation": val, "threads": threads, "progress": False, **options}

    current = original  # every stage runs on its own copy of the model before it: one copy per stage
    for cfg in recipe:
        name = describe(cfg)
        bar.set_postfix_str(name)
        t0 = time.perf_counter()
        try:
            # an int8 stage keeps optimize's own budget layer by layer: the most sensitive layers stay float
            budget = dict(validation=val, tolerance=tol, eval_fn=eval_fn) \
                if isinstance(cfg, (Int8Static, Int8Dynamic)) else {}
            cand, rep = apply_stage(copy.deepcopy(current), cfg, example, calib, **budget)
            eval_mode(cand)
        except Exception as e:
            if on_error == "raise":
                bar.close()
                raise
            results.append(StageResult(name, False, f"failed, rolled back: {type(e).__name__}: {e}",
                                       seconds=time.perf_counter() - t0))
            bar.update(1)
            continue
        seconds = time.perf_counter() - t0
        r, stage_speedup = measure(cand, name, seconds, rep, prev=current)
        if not r.applied and recovery is not None and _recoverable(cfg, tol, stage_speedup):
            if calib:
                # a stage that re-estimated BatchNorm statistics on these batches itself (prune) reports it
                restated = rep is not None and "BatchNorm re-estimated" in rep.summary
                cand, r = _recover(cand, r, original, calib, recovery, output_fn, on_error,
                                   lambda c, extra: measure(c, name, seconds + extra, rep, prev=current)[0],
                                   batchnorm_done=restated)
            else:
                r.reason += " (with calibration batches, optimize would distill it toward the original first)"
        if r.applied:
            current = cand
        elif rep is not None:
            rep.note(f"optimize(): {r.reason}")
        results.append(r)
        bar.update(1)

    transformed = current if current is not original else copy.deepcopy(original)  # never the user's object
    compile_name = f"compile: {backend}" + (f" + {describe(lowered)}" if lowered is not None else "")
    bar.set_postfix_str(compile_name)
    t0 = time.perf_counter()
    compiled = transformed
    try:
        compiled = _compile(transformed, example, backend, options)
        with torch.inference_mode():
            call_model(compiled, example)  # first call: where lazy backends really compile
        seconds = getattr(compiled, "compile_time_s", None) or (time.perf_counter() - t0)
        r, _ = measure(compiled, compile_name, seconds, getattr(compiled, "report", None),
                       prev=transformed, flops=False)  # min_speedup applies to the backend too
        # same weights and graph as the eager model: TorchScript freezing turns weights into constants that
        # state_dict() no longer shows, so size/params/FLOPs are the transformed model's
        last = next(x for x in reversed(results) if x.applied)
        r.flops, r.size_mb, r.params = last.flops, last.size_mb, last.params
        if not r.applied:
            compiled = transformed
            r.reason = r.reason.replace("rolled back", "output rejected, kept the eager model")
    except Exception as e:  # a backend that cannot take this model must not throw away the recipe's work
        if on_error == "raise" and not _is_backend_error(e):
            bar.close()
            raise
        compiled = transformed
        msg = f"{type(e).__name__}: {e}"
        warnings.warn(f"torchfast.optimize: backend {backend!r} failed, returning the eager model: {msg}", stacklevel=3)
        r = StageResult(compile_name, False, f"failed, kept the eager model: {msg}",
                        seconds=time.perf_counter() - t0)
    results.append(r)
    bar.update(1)
    bar.close()
    base.latency_ms = statistics.median(baseline_ms) if baseline_ms else None

    report = _report(results, backend, tol, eval_fn is not None, base_metric, len(val), runs, threads)
    drop_in = wrap(compiled, example, like=original, dynamic_dims=dynamic_dims)
    return Optimized(model=drop_in, report=report, transformed=transformed, backend=backend, stages=results,
                     example_inputs=example)


def _recoverable(cfg: Config, tol: Tolerance, stage_speedup: float | None) -> bool:
    """A pruning/low-rank stage over the fidelity budget (distillation cannot buy back speed)."""
    from .distill import recoverable
    slow = tol.min_speedup is not None and stage_speedup is not None and not stage_speedup >= tol.min_speedup
    return recoverable(cfg) and not slow


def _recover(cand: nn.Module, r: StageResult, original: nn.Module, calib: list, recovery: dict,
             output_fn: Any, on_error: str, remeasure: Callable[[nn.Module, float], StageResult],
             batchnorm_done: bool = False):
    """Re-estimate ``cand``'s BatchNorm statistics on the calibration batches (unless the stage did) and, if it
    is still outside the tolerance, distill it toward the original there; measure it again. The row of the
    recovered model (kept if now within tolerance) records the fidelity it had before."""
    from .distill import distill
    from .errors import TorchfastError
    from .prune.recalibrate import recalibrate_batchnorm
    t0 = time.perf_counter()
    # the cheap step first: BatchNorm statistics of the changed model, re-estimated on the calibration batches
    bn = {"kept": False}
    if not batchnorm_done:
        try:
            bn = recalibrate_batchnorm(cand, original, calib)
        except Exception:  # noqa: BLE001 - a model this step cannot run on is left to distillation
            pass
    if bn["kept"]:
        r_bn = remeasure(cand, time.perf_counter() - t0)
        if r_bn.applied:
            r_bn.before_recovery, r_bn.metric_before_recovery = r.fidelity, r.metric
            r_bn.reason = (f"BatchNorm statistics re-estimated on the calibration batches (no labels): cosine "
                           f"{r.fidelity.cosine:.4f} -> {r_bn.fidelity.cosine:.4f}")
            return cand, r_bn
    try:
        cand, drep = distill(cand, original, calib, output_fn=output_fn, progress=False, inplace=True, **recovery)
    except Exception as e:
        if on_error == "raise" and not isinstance(e, TorchfastError):
            raise
        r.reason += f"; distillation failed: {type(e).__name__}: {e}"
        return cand, r
    r2 = remeasure(cand, time.perf_counter() - t0)
    r2.before_recovery, r2.metric_before_recovery = r.fidelity, r.metric
    if r2.report is not None:
        r2.report.children.append(drep)
    else:
        r2.report = drep
    before = f"cosine {r.fidelity.cosine:.4f} -> {r2.fidelity.cosine:.4f}"
    if r.metric is not None and r2.metric is not None:
        before += f", metric {r.metric:.4g} -> {r2.metric:.4g}"
    how = f"distilled {drep.summary['steps']} steps without labels: {before}"
    r2.reason = f"{how}" if r2.applied else f"{r2.reason} (after recovery; {how})"
    return cand, r2


def _report(results: list[StageResult], backend: str, tol: Tolerance, has_metric: bool,
            base_metric: float | None, n_val: int, runs: int, threads: int | None) -> Report:
    rep = Report("optimize", columns=None)
    for r in results:
        rep.add_row(**r.row(base_metric))
        if r.report is not None:
            rep.children.append(r.report)
    kept = [r for r in results[1:] if r.applied and r.speedup is not None]
    final = kept[-1] if kept else results[0]
    rep.summary.update({
        "backend": backend,
        "stages applied": ", ".join(r.name for r in results[1:-1] if r.applied) or "none",
        "stages rolled back": ", ".join(r.name for r in results[1:] if not r.applied) or "none",
        "speedup vs original": final.speedup,
        "cosine vs original": None if final.fidelity is None else final.fidelity.cosine,
        "tolerance": ", ".join(f"{k}={v}" for k, v in tol.to_dict().items() if k != "type" and v is not None) or "off",
        "threads": threads if threads is not None else torch.get_num_threads(),
    })
    recovered = [r for r in results if r.before_recovery is not None]
    if recovered:
        rep.summary["distilled (kept)"] = ", ".join(f"{r.name} ({'yes' if r.applied else 'no'})" for r in recovered)
        keys = list(dict.fromkeys(k for row in rep.rows for k in row if k not in ("time (s)", "note")))
        rep.rows = [{k: row.get(k) for k in [*keys, "time (s)", "note"]} for row in rep.rows]
    if base_metric is not None:
        rep.summary["metric (original -> final)"] = f"{base_metric:.4g} -> {final.metric if final.metric is not None else base_metric:.4g}"
    rep.note(f"speedup: median latency of the original / this stage's model, timed interleaved ({runs} runs each) "
             f"on the example inputs; fidelity vs the original on {n_val} validation batch(es).")
    if not has_metric and tol.max_metric_drop is not None:
        rep.note("no eval_fn given: the metric bound of the tolerance was not checked.")
    if any(r.flops is None for r in results if r.fidelity is not None):
        rep.note("MFLOPs '-': FlopCounterMode cannot count quantized or compiled kernels.")
    return rep
