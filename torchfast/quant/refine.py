"""Accuracy-preserving rewrites before int8, each kept only where it measurably helps.

Cross-layer equalization and bias correction are exact (or nearly) in float and usually bring the int8
model closer to the float one, but not always (per-channel weights already absorb most range imbalance).
So each variant is quantized for real and judged against the float model on calibration batches; the
closest wins and the report says what each variant measured.
"""
from __future__ import annotations

import copy
import dataclasses
import gc
from typing import Callable

from torch import nn

from ..measure import compare_outputs, outputs
from ..modules import Batch
from ..report import Report
from ..transform import Exclusion
from .calibrate import CalibrationError, describe
from .config import Int8Static

__all__ = ["refined_fx_static"]

_CONVS = (nn.Conv1d, nn.Conv2d)


def _variants(model: nn.Module, cfg: Int8Static, exclusion: Exclusion) -> list[tuple[str, Callable]]:
    from .bias_correction import correct_bias
    from .equalize import equalize

    patterns = tuple(exclusion.patterns) if hasattr(exclusion, "patterns") else tuple(cfg.exclude)
    has_convs = sum(isinstance(m, _CONVS) for m in model.modules()) >= 2

    def bc(m, batches):  # one pass on float inputs over a few batches: seconds, where sequential takes minutes
        return correct_bias(m, batches[:4], per_channel=cfg.per_channel, sequential=False, exclude=patterns,
                            reduce_range=None if cfg.full_range is None else not cfg.full_range, inplace=True)[0]

    def cle(m, batches):
        return equalize(m, exclude=patterns, inplace=True)[0]
    out: list[tuple[str, Callable]] = []
    want_cle = cfg.equalize is not False and has_convs
    want_bc = cfg.bias_correction is not False
    if cfg.equalize is not True and cfg.bias_correction is not True:
        out.append(("plain", lambda m, b: m))
    if want_bc and cfg.equalize is not True:
        out.append(("bias correction", bc))
    if want_cle and cfg.bias_correction is False:
        out.append(("cross-layer equalization", cle))
    if want_cle and want_bc:
        out.append(("cross-layer equalization + bias correction", lambda m, b: bc(cle(m, b), b)))
    return out


def refined_fx_static(model: nn.Module, cfg: Int8Static, batches: list[Batch],
                      exclusion: Exclusion | None = None) -> tuple[nn.Module, Report]:
    """FX int8 of ``model`` (a private copy, eval mode), after the rewrite that keeps int8 closest to float;
    with ``cfg.islands`` (and not ``keep_slower``), int8 islands that do not repay their quantize/dequantize
    are kept float."""
    from .static import quantize_fx_static

    exclusion = exclusion if exclusion is not None else Exclusion(cfg.exclude, "Int8Static")
    variants = _variants(model, cfg, exclusion)
    records: dict = {}
    if len(variants) == 1 and variants[0][0] == "plain":
        original = copy.deepcopy(model) if _weighs_islands(cfg) else model  # the island analysis runs it
        q, rep = quantize_fx_static(model, cfg, batches, exclusion, _recording(cfg, records))
        return _islands(original, cfg, batches, exclusion, "plain", q, rep, records)
    first = max(len(batches) - 2, 0)
    judge = batches[first:]
    reference = []
    for i, b in enumerate(judge, start=first):  # the float model must run on them: name the batch that does not
        try:
            reference += outputs(model, [b])
        except Exception as e:
            raise CalibrationError(f"calibration batch {i} ({describe(b)}) failed in the model: "
                                   f"{type(e).__name__}: {e}") from e
    scored: list[tuple[float, str]] = []
    best: tuple[float, str, nn.Module, Report, dict] | None = None  # only the closest build stays in memory
    failures: list[str] = []
    for label, rewrite in variants:
        got: dict = {}
        try:
            float_variant = rewrite(copy.deepcopy(model), batches)
            q, rep = quantize_fx_static(float_variant, cfg, batches, exclusion, _recording(cfg, got))
            del float_variant
            err = compare_outputs(reference, outputs(q, judge)).rel_err
        except Exception as e:  # noqa: BLE001 - a rewrite that does not fit this model is skipped, with the reason
            if label == "plain":
                raise
            failures.append(f"{label}: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
            continue
        scored.append((err, label))
        if best is None or err < best[0]:
            best = (err, label, q, rep, got)
        del q, rep
        gc.collect()  # FX graph modules hold reference cycles: a dropped build is freed only by the collector
    if best is None:
        return quantize_fx_static(model, cfg, batches, exclusion)
    err, label, q, rep, got = best
    del best
    for e, lab in scored:
        rep.note(f"before int8, {lab}: relative output error {e:.4g} on calibration batches"
                 + (" (chosen)" if lab == label else ""))
    for f in failures:
        rep.note(f"before int8, {f} (not used)")
    rep.summary["float rewrite before int8"] = label
    return _islands(model, cfg, batches, exclusion, label, q, rep, got)


def _weighs_islands(cfg: Int8Static) -> bool:
    """The island rule is a speed decision: ``keep_slower=True`` asks for int8 whatever it costs."""
    return cfg.islands and not cfg.keep_slower


def _recording(cfg: Int8Static, records: dict):
    """FloatKeys that record what prepare decided per call, where the island rule will read it."""
    from .static import FloatKeys
    return FloatKeys(records=records) if _weighs_islands(cfg) else FloatKeys()


def _islands(model: nn.Module, cfg: Int8Static, batches: list[Batch], exclusion: Exclusion, label: str,
             q: nn.Module, rep: Report, records: dict) -> tuple[nn.Module, Report]:
    """The int8-island rule on the chosen build; a rebuild redoes the chosen float rewrite (``label``) on a
    copy of ``model`` with the dropped islands' layers excluded from it and from int8."""
    if not _weighs_islands(cfg):
        return q, rep
    from .islands import keep_paying_islands
    from .static import FloatKeys, quantize_fx_static

    def rebuild(plan):
        ex = Exclusion(tuple(exclusion.patterns) + plan.modules, exclusion.owner)
        rewrite = dict(_variants(model, cfg, ex)).get(label, lambda m, b: m)
        work = rewrite(copy.deepcopy(model), batches)
        return quantize_fx_static(work, dataclasses.replace(cfg, progress=False), batches, ex,
                                  FloatKeys(plan.calls, plan.methods))
    return keep_paying_islands(model, q, rep, batches, records, rebuild, progress=cfg.progress)


def refined_dynamic(model: nn.Module, cfg, *, example_inputs: Batch | None = None, calibration=None,
                    exclusion: Exclusion | None = None, inplace: bool = False) -> tuple[nn.Module, Report]:
    """Int8Dynamic, after SmoothQuant scale migration where that measurably brings int8 closer to float.

    Smoothing rewrites the float model (scales folded into norms / previous layers, or an explicit input
    scale), so it runs on copies: with ``inplace=True`` the plain in-place path is taken.
    """
    from .calibrate import collect
    from .dynamic import quantize_dynamic
    from .smoothquant import smooth

    exclusion = exclusion if exclusion is not None else Exclusion(cfg.exclude, "Int8Dynamic")
    data = collect(calibration, 4) if calibration is not None else ([example_inputs] if example_inputs is not None
                                                                     else [])
    if cfg.smooth is False or inplace or not data or not any(isinstance(m, nn.Linear) for m in model.modules()):
        q, rep = quantize_dynamic(model, cfg, example_inputs=example_inputs, calibration=calibration,
                                  exclusion=exclusion, inplace=inplace)
        if cfg.smooth is True:
            rep.note("SmoothQuant was not applied: " + ("it rewrites the float model, which inplace=True forbids"
                                                        if inplace else "no batches to choose its scales on"))
        return q, rep
    plain, plain_rep = quantize_dynamic(model, cfg, example_inputs=example_inputs, calibration=calibration,
                                        exclusion=exclusion, inplace=False)
    try:
        smoothed_float, srep = smooth(model, data, exclude=tuple(exclusion.patterns),
                                      reduce_range=None if cfg.full_range is None else not cfg.full_range)
    except Exception as e:  # noqa: BLE001 - an optional rewrite: plain int8 stands
        plain_rep.note(f"SmoothQuant did not fit this model ({type(e).__name__}: {str(e).splitlines()[0][:160]})")
        return plain, plain_rep
    if not srep.where(applied=True):
        if cfg.smooth is True:
            plain_rep.note("SmoothQuant found no layer whose int8 error smoothing lowers")
        return plain, plain_rep
    # smoothed_float is smooth()'s own copy: quantized in place, so a transformer's weights are not copied again
    smoothed, smooth_rep = quantize_dynamic(smoothed_float, cfg, example_inputs=example_inputs,
                                            calibration=calibration, exclusion=exclusion, inplace=True)
    del smoothed_float
    reference = _real_outputs(model, data)
    plain_err = compare_outputs(reference, _real_outputs(plain, data)).rel_err
    smooth_err = compare_outputs(reference, _real_outputs(smoothed, data)).rel_err
    take = cfg.smooth is True or smooth_err < plain_err
    q, rep = (smoothed, smooth_rep) if take else (plain, plain_rep)
    rep.note(f"SmoothQuant ({len(srep.where(applied=True))} layers): relative output error {smooth_err:.4g} vs "
             f"{plain_err:.4g} without" + (" (applied)" if take else " (not applied)"))
    if take:
        rep.children.append(srep)
        rep.summary["float rewrite before int8"] = "SmoothQuant"
    return q, rep


def _real_outputs(model: nn.Module, batches: list[Batch]) -> list:
    """The outputs to judge by: for token models, only the positions the attention mask marks as real
    (padding positions carry values no user reads, and would dominate the error)."""
    import torch
    outs = outputs(model, batches)
    for i, b in enumerate(batches):
        mask = b.get("attention_mask") if isinstance(b, dict) else None
        o = outs[i]
        if isinstance(mask, torch.Tensor) and o.dim() == 3 and tuple(o.shape[:2]) == tuple(mask.shape):
            outs[i] = o * mask.to(o.dtype).unsqueeze(-1)
    return outs
