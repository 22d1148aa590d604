"""Quantization: int8 dynamic, int8 static (calibrated), weight-only int8/int4, float8, bf16/fp16.

``model, report = torchfast.quantize(model, Int8Static(), example_inputs=x, calibration=batches)``.
The config says what; the implementation (torch.ao x86/fbgemm kernels, FX graph mode, torchao
``quantize_``, PT2E + inductor) is chosen by the transform — by measurement where several can run.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Callable, Iterable

from torch import nn

from ..dropin import eval_mode
from ..modules import Batch, check_module, restore_training_flags, shared_twin, training_flags
from ..report import Report
from ..stages import STAGES, load, stage_of
from ..tolerance import Tolerance, as_tolerance
from ..transform import Exclusion, legacy_positional
from .calibrate import CalibrationError
from .common import AlreadyQuantizedError
from .config import Float8, HalfPrecision, Int8Dynamic, Int8Static, QuantConfig, WeightOnly
from .dynamic import precision_plan
from .guard import restore_from_twin, speed_verdict
from .static_precision import Precision, static_precision
from .weight_only import UnsupportedDeviceError

__all__ = ["quantize", "Int8Dynamic", "Int8Static", "WeightOnly", "Float8", "HalfPrecision",
           "CalibrationError", "AlreadyQuantizedError", "UnsupportedDeviceError"]


_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.LSTM, nn.GRU)
_SUBCLASSED = (nn.Conv1d, nn.Conv2d, nn.Linear)   # subclasses of these may be the base op in disguise
_PADS = (nn.ZeroPad1d, nn.ZeroPad2d, nn.ConstantPad1d, nn.ConstantPad2d)
_TIMED = (Int8Static, Int8Dynamic, WeightOnly, Float8)  # HalfPrecision times itself before casting


@legacy_positional(("config", "example_inputs", "calibration"))
def quantize(model: nn.Module, config: QuantConfig | None = None, *, example_inputs: Batch | None = None,
             calibration: Iterable[Batch] | None = None, inplace: bool = False,
             validation: Iterable[Batch] | None = None, tolerance: Tolerance | dict | None = None,
             eval_fn: Callable[[nn.Module], float] | None = None) -> tuple[nn.Module, Report]:
    """Quantize ``model`` with ``config`` (default ``Int8Dynamic()``); returns (quantized model, per-layer report).

    ``example_inputs``: a representative batch (tensor, tuple, dict). Int8Dynamic and HalfPrecision use it
    to time each candidate against fp32 and keep only what is faster; Int8Static checks calibration batches
    against it. ``calibration`` is a fallback for ``Int8Static(calibration=None)`` (recipes pass theirs).

    Never slower: with example inputs, the quantized model is timed against the float one (interleaved
    medians) and, when it is not faster, the float model is returned and the report says so
    (``keep_slower=True`` on the config keeps it anyway).

    A budget, kept: with ``tolerance`` (a :class:`torchfast.Tolerance`), the quantized model is checked
    against the float one on ``validation`` (held-out batches; by default the last quarter of the
    calibration batches, which then calibrate nothing); when a bound breaks, the layers are ranked by
    sensitivity and the most sensitive ones stay float, fewest first, until the bound holds. The report's
    child "int8 accuracy budget" lists every mix tried. If no mix meets the budget, the float model is
    returned. ``eval_fn(model) -> metric`` enables ``Tolerance.max_metric_drop``.

    The returned model is in eval mode: it is an inference model. ``inplace=False`` (default) leaves
    ``model`` exactly as it was (weights, module types, every submodule's train/eval flag). ``inplace=True``
    reuses it: Int8Dynamic, WeightOnly and Float8 swap the quantized layers into ``model`` (the layers kept
    in float keep their parameter objects), HalfPrecision casts ``model`` itself and wraps it; on success
    ``model`` is left in eval mode as part of the result. Int8Static builds a new graph module either way
    and never changes ``model``; with a ``tolerance`` every scheme works on copies. On any error ``model``
    is unchanged.
    """
    check_module(model)
    config = Int8Dynamic() if config is None else config
    stage = stage_of(config) if isinstance(config, QuantConfig) else None
    if stage is None or stage.implementation is None:
        known = ", ".join(s.config_name for s in STAGES.values() if s.implementation is not None)
        raise TypeError(f"quantize() takes {known}; got {type(config).__name__}")
    implementation = load(stage.implementation)
    exclusion = Exclusion.resolve(model, config)
    tol = None if tolerance is None else as_tolerance(tolerance)
    if eval_fn is not None and not callable(eval_fn):
        raise TypeError(f"eval_fn must be a callable model -> metric, got {type(eval_fn).__name__}")
    timed = example_inputs is not None and isinstance(config, _TIMED) and not getattr(config, "keep_slower", False)
    in_place = inplace and tol is None
    flags = training_flags(model)
    twin = None
    try:
        model.eval()
        run_cfg, held_out, budget_note = config, None, None
        float_model, prepared = model, []  # float_model: the model int8 starts from (plain layers)
        if isinstance(config, Int8Static):
            run_cfg, float_model, prepared = prepare_static(model, config, calibration, example_inputs, exclusion)
        if tol is not None:
            run_cfg, held_out, budget_note = split_validation(run_cfg, calibration, validation, example_inputs)
        if timed and in_place and not isinstance(config, Int8Static):
            twin = shared_twin(model)
        out, rep = implementation(float_model, run_cfg, example_inputs=example_inputs, calibration=calibration,
                                  exclusion=exclusion, inplace=in_place)
        if tol is not None:
            out, rep = _keep_budget(float_model, run_cfg, implementation, out, rep, held_out, tol, eval_fn,
                                    example_inputs, calibration)
            if budget_note:
                rep.note(budget_note)
        for note in prepared:
            rep.note(note)
        reference = twin if twin is not None else model
        if timed and reference is not out and _quantized_layers(twin if twin is not None else float_model, rep):
            if not speed_verdict(reference, out, example_inputs, rep, "int8"):
                sp = rep.summary["speedup vs fp32"]
                rep.note(f"the quantized model measured {sp:.2f}x the float model on the example inputs "
                         f"(interleaved medians): the float model is returned (keep_slower=True keeps int8)")
                rep.summary["result"] = f"float model returned: quantized was {sp:.2f}x fp32"
                if twin is not None:
                    restore_from_twin(model, twin)
                    out = model
                else:
                    out = copy.deepcopy(model)
        eval_mode(out)
    except BaseException:
        if twin is not None:
            restore_from_twin(model, twin)
        restore_training_flags(flags)
        raise
    if not in_place or isinstance(config, Int8Static):
        restore_training_flags(flags)
    rep.summary.setdefault("config", config.to_dict())
    return out, rep


def _quantized_layers(model: nn.Module, rep: Report) -> list[str]:
    """Names (in the float model) of the Conv/Linear/RNN layers the report says were quantized."""
    names = dict(model.named_modules())
    out = []
    for r in rep.rows:
        name = r.get("layer")
        if not r.get("applied") or not isinstance(name, str):
            continue
        if name not in names and name.rpartition(".")[0] in names:  # a layer a float rewrite wrapped
            name = name.rpartition(".")[0]
        if isinstance(names.get(name), _LAYERS) and name not in out:
            out.append(name)
    return out


def prepare_static(model: nn.Module, config: Int8Static, calibration: Iterable[Batch] | None,
                   example_inputs: Batch | None, exclusion: Exclusion) -> tuple[Int8Static, nn.Module, list[str]]:
    """Materialize the calibration batches once, and turn Conv/Linear subclasses into the plain layers they
    compute (checked exact on those batches) so that they quantize as their base op."""
    from .calibrate import check_all, collect, strip_labels
    from .canonical import canonicalize

    batches = strip_labels(collect(config.calibration if config.calibration is not None else calibration,
                                   config.max_batches), example_inputs)
    check_all(batches, example_inputs)  # a wrong batch is named before anything runs on it
    config = dataclasses.replace(config, calibration=batches)
    if not any(_own_forward(m) or isinstance(m, _PADS) for m in model.modules()):
        return config, model, []
    try:
        plain, changes = canonicalize(model, batches[:2], rewrite_forward=False)
    except Exception as e:  # noqa: BLE001 - an optional rewrite: int8 still runs on the model as it is
        return config, model, [f"layer subclasses were not rewritten as plain layers ({type(e).__name__}: "
                               f"{str(e).splitlines()[0][:160]})"]
    notes = [f"{c.layer}: {c.action} ({c.reason})" for c in changes if not exclusion(c.layer)]
    return config, plain, notes


def _own_forward(m: nn.Module) -> bool:
    base = next((b for b in _SUBCLASSED if isinstance(m, b)), None)
    return base is not None and type(m).forward is not base.forward


def split_validation(config: QuantConfig, calibration: Iterable[Batch] | None, validation: Iterable[Batch] | None,
                     example_inputs: Batch | None) -> tuple[QuantConfig, list[Batch], str | None]:
    """Held-out batches for the budget, and the config whose calibration excludes them."""
    from .calibrate import collect, strip_labels

    if validation is not None:
        return config, strip_labels(collect(validation), example_inputs), None
    if isinstance(config, Int8Static):
        batches = strip_labels(collect(config.calibration if config.calibration is not None else calibration,
                                       config.max_batches), example_inputs)
        if len(batches) < 2:
            return config, batches, ("the accuracy budget was checked on the calibration batch itself "
                                     "(pass validation= for a held-out check)")
        n = max(1, len(batches) // 4)
        return (dataclasses.replace(config, calibration=batches[:-n]), batches[-n:],
                f"the last {n} of {len(batches)} calibration batches were held out to check the accuracy budget")
    if calibration is not None:
        return config, strip_labels(collect(calibration), example_inputs), None
    if example_inputs is not None:
        return config, [example_inputs], ("the accuracy budget was checked on the example inputs "
                                          "(pass validation= for a held-out check)")
    raise ValueError(f"quantize(tolerance=...) needs validation batches to check {type(config).__name__} "
                     f"against the float model: pass validation= (held-out inputs)")


def _keep_budget(model: nn.Module, cfg: QuantConfig, implementation, quantized: nn.Module, rep: Report,
                 validation: list[Batch], tol: Tolerance, eval_fn, example_inputs, calibration
                 ) -> tuple[nn.Module, Report]:
    from .budget import fit_budget
    from .calibrate import collect

    layers = _quantized_layers(model, rep)
    quiet_cfg = dataclasses.replace(cfg, progress=False) if isinstance(cfg, Int8Static) else cfg

    def build(float_layers: list[str]) -> nn.Module:
        c = dataclasses.replace(quiet_cfg, exclude=tuple(cfg.exclude) + tuple(float_layers))
        q, r = implementation(model, c, example_inputs=example_inputs, calibration=calibration,
                              exclusion=Exclusion.resolve(model, c), inplace=False)
        reports[id(q)] = r
        return q
    reports: dict[int, Report] = {id(quantized): rep}
    if isinstance(cfg, Int8Static):
        cal = collect(cfg.calibration if cfg.calibration is not None else calibration, cfg.max_batches)
        precision = static_precision(cfg.full_range)
    else:
        act8, weight_bits = precision_plan(getattr(cfg, "full_range", None))
        cal, precision = [], Precision(8 if act8 else 7, weight_bits)
    result = fit_budget(model, quantized, layers, build, calibration=cal, validation=validation, tolerance=tol,
                        eval_fn=eval_fn, dynamic=not isinstance(cfg, Int8Static), precision=precision,
                        progress=getattr(cfg, "progress", True))
    if result.model is None:
        out_rep = rep
        out_rep.children.append(result.report)
        out_rep.note(f"no int8 mix meets the tolerance on the validation batches: the float model is returned "
                     f"({result.report.summary['result']})")
        out_rep.summary["result"] = "float model returned: no int8 mix meets the tolerance"
        return copy.deepcopy(model), out_rep
    out_rep = reports[id(result.model)]
    rank = {n: i + 1 for i, n in enumerate(result.float_layers)}
    for r in out_rep.rows:
        layer = str(r.get("layer"))
        hit = rank.get(layer) or rank.get(layer.rpartition(".")[0])
        if hit:
            r.update(applied=False, scheme="fp32",
                     reason=f"kept float to meet the accuracy budget (sensitivity rank {hit})")
    out_rep.summary.update({"layers kept float for the budget": len(result.float_layers),
                            "budget cosine": result.fidelity.cosine,
                            "budget worst cosine": result.fidelity.worst_cosine,
                            "budget top-1 agreement": result.fidelity.top1_agreement})
    out_rep.children.append(result.report)
    return result.model, out_rep

