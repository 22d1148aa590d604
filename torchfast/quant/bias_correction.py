"""Bias correction (Nagel et al., "Data-Free Quantization", ICCV 2019; NNCF's fast bias correction): undo
the mean output shift that int8 weight rounding puts on every Conv/Linear, before quantizing.

Rounding a layer's weights to int8 is not zero-mean on the layer's outputs: with non-negative inputs
(after a ReLU) the rounding errors of a row add up, and each output channel comes out shifted by
``E[(W_q - W) x]``. That shift passes through every later layer. Measuring it is simpler and more exact
than deriving it (padding, groups, strides): run the layer with its int8-rounded weights
(``dequantize(quantize(W))``, the per-channel symmetric int8 of the x86/fbgemm kernels) on the calibration
data and compare the per-channel output mean with the float layer's; ``bias -= shift``.

``sequential=True`` (default) measures each layer inside a model whose earlier layers already run with
rounded, corrected weights, so a layer also absorbs the shift its inputs carry; ``activations=True``
rounds each layer's input to per-tensor 8-bit too (ranges from a histogram observer, as Int8Static's
default), correcting for the full int8 layer rather than its weights alone.
"""
from __future__ import annotations

import copy
from collections import Counter
from typing import Any, Iterable

import torch
from torch import nn

from ..errors import TorchfastError
from ..modules import (Batch, call_model, check_module, describe_batch, evaluating,
                       get_submodule, maybe_copy, shared_twin)
from ..report import Report
from .calibrate import CalibrationError, collect
from .common import check_not_quantized, exclusion, rewritable_layers
from .simulate import fake_quant_activation, fake_quant_weight
from .static_precision import Precision, static_precision

__all__ = ["correct_bias", "BiasCorrectionError"]

_LAYER = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


class BiasCorrectionError(TorchfastError, ValueError):
    """Bias correction was given something it cannot work on; the message names the module or the value."""


class _Stop(Exception):
    """Raised by a hook once the layer being measured has run: the rest of the forward is not needed."""


def _channel_dim(m: nn.Module, out: torch.Tensor) -> int:
    if isinstance(m, nn.Linear):
        return out.dim() - 1
    spatial = len(m.kernel_size)
    return 1 if out.dim() == spatial + 2 else 0


def _channel_mean(m: nn.Module, out: torch.Tensor) -> tuple[torch.Tensor, int]:
    d = _channel_dim(m, out)
    y = out.detach().float().movedim(d, 0).reshape(out.shape[d], -1)
    return y.sum(1), y.shape[1]


def _plain(m: nn.Module) -> bool:
    for base in _LAYER:
        if isinstance(m, base):
            return type(m).forward is base.forward and \
                getattr(type(m), "_conv_forward", None) is getattr(base, "_conv_forward", None)
    return False


def _layers(model: nn.Module, batch: Batch, ex: Any) -> tuple[list[str], dict[str, str]]:
    """The correctable layers in the order the forward first runs them, and why the others are left alone."""
    names, skipped = rewritable_layers(model, batch, ex, _LAYER, _plain, "its int8 weights are not its .weight")
    order: list[str] = []
    calls: Counter = Counter()
    handles = []
    for n in names:
        def hook(m, a, _n=n):
            calls[_n] += 1
            if _n not in order:
                order.append(_n)
        handles.append(get_submodule(model, n).register_forward_pre_hook(hook))
    try:
        with torch.inference_mode():
            call_model(model, batch)
    except Exception as e:
        raise CalibrationError(f"{type(model).__name__} fails on calibration batch 0 ({describe_batch(batch)}): "
                               f"{type(e).__name__}: {e}") from e
    finally:
        for h in handles:
            h.remove()
    for n in names:
        if n not in calls:
            skipped[n] = "not called on calibration batch 0"
        elif calls[n] > 1:
            skipped[n] = f"runs {calls[n]} times per forward: one bias cannot correct each call"
    return [n for n in order if calls[n] == 1], skipped


def _means(model: nn.Module, names: list[str], batches: list[Batch], stop_after: str | None = None
           ) -> dict[str, torch.Tensor]:
    """Per output channel mean of each named layer's output over the batches (stop the forward after
    ``stop_after`` has run, when given)."""
    sums: dict[str, list] = {}
    handles = []
    for n in names:
        def hook(m, a, out, _n=n):
            s, c = _channel_mean(m, out)
            if _n in sums:
                sums[_n][0] += s
                sums[_n][1] += c
            else:
                sums[_n] = [s, c]
            if _n == stop_after:
                raise _Stop
        handles.append(get_submodule(model, n).register_forward_hook(hook))
    try:
        with torch.inference_mode():
            for i, b in enumerate(batches):
                try:
                    call_model(model, b)
                except _Stop:
                    pass
                except Exception as e:
                    raise CalibrationError(f"calibration batch {i} ({describe_batch(b)}) failed in "
                                           f"{type(model).__name__}: {type(e).__name__}: {e}") from e
    finally:
        for h in handles:
            h.remove()
    return {n: s / max(c, 1) for n, (s, c) in sums.items()}


def _input_ranges(model: nn.Module, names: list[str], batches: list[Batch], reduce_range: bool
                  ) -> dict[str, tuple[float, float]]:
    """Each layer's input range as a histogram observer (Int8Static's default) sets it."""
    from .observers import activation_observer

    obs = {n: activation_observer("histogram", reduce_range)() for n in names}
    handles = [get_submodule(model, n).register_forward_pre_hook(lambda m, a, _n=n: obs[_n](a[0].detach().float()))
               for n in names]
    try:
        with torch.no_grad():
            for b in batches:
                call_model(model, b)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for n, o in obs.items():
        scale, zp = o.calculate_qparams()
        qmax = 127 if reduce_range else 255
        out[n] = (float(scale) * (0 - int(zp)), float(scale) * (qmax - int(zp)))
    return out


def _simulated(model: nn.Module, names: list[str], per_channel: bool,
               ranges: dict[str, tuple[float, float]] | None, precision: Precision) -> tuple[nn.Module, list]:
    """A twin of ``model`` whose layers compute with int8-rounded weights (and inputs, with ``ranges``). It shares
    every other tensor with ``model``; the layers it rounds get their own weight and bias, which the
    correction then changes on the twin alone."""
    own_weights = all(isinstance(get_submodule(model, n)._parameters.get("weight"), nn.Parameter) for n in names)
    sim = shared_twin(model) if own_weights else copy.deepcopy(model)  # parametrized weights: round a full copy
    handles = []
    with torch.no_grad():
        for n in names:
            m = get_submodule(sim, n)
            w = m.weight
            if own_weights:
                m.weight = nn.Parameter(fake_quant_weight(w, per_channel, precision.weight_bits).to(w.dtype),
                                        requires_grad=w.requires_grad)
                if m.bias is not None:
                    m.bias = nn.Parameter(m.bias.detach().clone(), requires_grad=m.bias.requires_grad)
            else:
                w.copy_(fake_quant_weight(w, per_channel, precision.weight_bits).to(w.dtype))
            if ranges is not None:
                lo, hi = ranges[n]

                def pre(mod, args, _lo=lo, _hi=hi):
                    x = args[0]
                    return (fake_quant_activation(x, _lo, _hi, precision.reduce_range).to(x.dtype), *args[1:])
                handles.append(m.register_forward_pre_hook(pre))
    return sim, handles


def _float_input_shifts(model: nn.Module, names: list[str], batches: list[Batch], per_channel: bool,
                        ranges: dict[str, tuple[float, float]] | None, precision: Precision
                        ) -> dict[str, torch.Tensor]:
    """Each layer's mean output shift from int8 rounding, on the inputs the float model gives it (one pass)."""
    wq = {n: fake_quant_weight(get_submodule(model, n).weight, per_channel, precision.weight_bits) for n in names}
    sums: dict[str, list] = {}

    def make(n):
        def hook(m, args, out):
            x = args[0]
            if ranges is not None:
                x = fake_quant_activation(x, *ranges[n], precision.reduce_range)
            w = wq[n].to(out.dtype)
            yq = nn.functional.linear(x.to(out.dtype), w, m.bias) if isinstance(m, nn.Linear) else \
                m._conv_forward(x.to(out.dtype), w, m.bias)
            s, c = _channel_mean(m, yq - out)
            sums[n] = [s, c] if n not in sums else [sums[n][0] + s, sums[n][1] + c]
        return hook
    handles = [get_submodule(model, n).register_forward_hook(make(n)) for n in names]
    try:
        with torch.inference_mode():
            for b in batches:
                call_model(model, b)
    finally:
        for h in handles:
            h.remove()
    return {n: s / max(c, 1) for n, (s, c) in sums.items()}


def _add_to_bias(m: nn.Module, delta: torch.Tensor) -> None:
    with torch.no_grad():
        if m.bias is None:
            m.bias = nn.Parameter(torch.zeros(m.weight.shape[0], dtype=m.weight.dtype, device=m.weight.device),
                                  requires_grad=m.weight.requires_grad)
        m.bias.add_(delta.to(m.bias.dtype))


def correct_bias(model: nn.Module, calibration_batches: Iterable[Batch] | Batch, *, per_channel: bool = True,
                 sequential: bool = True, activations: bool = False, reduce_range: bool | None = None,
                 weight_bits: int | None = None, exclude: Iterable[str] = (), inplace: bool = False
                 ) -> tuple[nn.Module, Report]:
    """Subtract from every Conv/Linear bias the mean output shift its int8-rounded weights would cause.

    ``per_channel``: the int8 weight scheme to correct for (per output channel, as Int8Static's default).
    ``sequential``: measure each layer behind already rounded and corrected earlier layers (one partial
    forward per layer per batch) rather than on float inputs (one pass). ``activations``: round each layer's
    input to 8 bits as well (the full int8 layer). ``reduce_range``: 7-bit activations; ``weight_bits``: 8 or 7
    (default for both: what Int8Static uses on this CPU, see ``static_precision``). Returns (model, report:
    per layer the mean |shift| of its outputs before and after).
    A model with BatchNorm after its convs is fine for per-channel weights (BatchNorm folding scales whole
    rows, which per-channel rounding follows); for per-tensor weights fold BatchNorm first.
    """
    check_module(model)
    check_not_quantized(model, "bias correction")
    for flag, name in ((per_channel, "per_channel"), (sequential, "sequential"), (activations, "activations")):
        if not isinstance(flag, bool):
            raise BiasCorrectionError(f"correct_bias({name}=...) must be True or False, got {flag!r}")
    if calibration_batches is None:
        raise CalibrationError("correct_bias() needs calibration batches: real inputs to measure output means on")
    batches = collect(calibration_batches)
    ex = exclusion(model, exclude, "correct_bias")
    precision = static_precision(None if reduce_range is None else not reduce_range)
    if weight_bits is not None:
        if weight_bits not in (7, 8):
            raise BiasCorrectionError(f"correct_bias(weight_bits=...) must be 8 or 7, got {weight_bits!r}")
        precision = Precision(precision.activation_bits, weight_bits)

    work = maybe_copy(model, inplace)
    with evaluating(work):
        names, skipped = _layers(work, batches[0], ex)
        float_means = _means(work, names, batches)
        ranges = _input_ranges(work, names, batches, precision.reduce_range) if activations and names else None
        sim, handles = _simulated(work, names, per_channel, ranges, precision)
        try:
            with evaluating(sim):
                shift_before = {n: m - float_means[n] for n, m in _means(sim, names, batches).items()}
                if sequential:
                    corrections: dict[str, torch.Tensor] = {}
                    for n in names:
                        corrections[n] = float_means[n] - _means(sim, [n], batches, stop_after=n)[n]
                        _add_to_bias(get_submodule(sim, n), corrections[n])
                else:
                    corrections = {n: -s for n, s in
                                   _float_input_shifts(work, names, batches, per_channel, ranges, precision).items()}
                    for n in names:
                        _add_to_bias(get_submodule(sim, n), corrections[n])
                shift_after = {n: m - float_means[n] for n, m in _means(sim, names, batches).items()}
        finally:
            for h in handles:
                h.remove()
        for n in names:
            _add_to_bias(get_submodule(work, n), corrections[n])

    report = Report("bias correction", columns=["layer", "type", "channels", "mean |shift| before",
                                                "mean |shift| after", "max |correction|", "applied", "reason"])
    for n in names:
        m = get_submodule(work, n)
        report.add_row(layer=n, type=type(m).__name__, channels=int(m.weight.shape[0]),
                       **{"mean |shift| before": float(shift_before[n].abs().mean()),
                          "mean |shift| after": float(shift_after[n].abs().mean()),
                          "max |correction|": float(corrections[n].abs().max())}, applied=True)
    for n, why in skipped.items():
        report.add_row(layer=n, type=type(get_submodule(model, n)).__name__, applied=False, reason=why)
    report.summary.update({"layers corrected": len(names), "weights": "per-channel" if per_channel else "per-tensor",
                           "weight bits": precision.weight_bits,
                           "measured": "sequentially, behind corrected int8 layers" if sequential else
                           "on float inputs", "activations rounded": activations, "calibration batches": len(batches)})
    if not names:
        report.note("no Conv/Linear layer to correct: the model is returned unchanged")
    return work, report
