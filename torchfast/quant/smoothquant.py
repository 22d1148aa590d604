"""SmoothQuant-style scale migration (Xiao et al., 2023): a float rewrite before int8 for Linear layers.

Transformer activations have a few channels 10-100x larger than the rest; one per-tensor int8 grid for the
activations then wastes most of its levels on them. Dividing input channel ``j`` by
``s_j = max|X_j|^a / max|W_j|^(1-a)`` and multiplying the weight's column ``j`` by ``s_j`` computes the same
function and moves the difficulty into the weights, which int8 quantizes per output channel. The strength
``a`` is chosen per layer group on calibration data: the one whose simulated int8 output error is lowest
(or no smoothing, when nothing beats it).

Where ``X / s`` goes decides what it costs:
- into the LayerNorm/RMSNorm whose output is the Linear's input (weight and bias): free. Linears reading
  one norm output (Q/K/V) share one ``s``;
- into the rows of a previous Linear whose output goes straight to this one: free;
- otherwise (the norm output also feeds a residual add, as in post-LN BERT; a GELU in between) the Linear
  becomes a :class:`SmoothedLinear` that multiplies its input by ``1/s``: exact, one elementwise op more
  (``insert_scale=False`` leaves such layers alone instead).
The connections are found by one probed forward: hooks record which module produced the tensor each Linear
reads, and a TorchFunctionMode records every other op that reads it, wherever in the model's code it is.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from ..errors import TorchfastError
from ..modules import (Batch, call_model, check_module, describe_batch, evaluating,
                       first_tensor, get_submodule, maybe_copy, swap_modules)
from ..report import Report
from ..transform import Exclusion
from .calibrate import CalibrationError, collect
from .common import check_not_quantized, exclusion, rewritable_layers
from .simulate import activation_qparams, fake_quant_weight
from .static_precision import Precision, static_precision

__all__ = ["smooth", "SmoothedLinear", "SmoothQuantError", "DEFAULT_ALPHAS"]

DEFAULT_ALPHAS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
_ROWS_PER_BATCH = 128      # rows of each captured input used to simulate int8 error (ranges use all rows)
_MIN_GAIN = 0.02           # "auto" smooths only where the simulated error drops by at least 2%
_EXACT_TOL = 1e-3          # relative max difference allowed between smoothed and original float outputs
_TRANSPARENT = {"dropout", "contiguous", "clone", "detach", "to", "float", "half", "bfloat16", "type_as",
                "view", "reshape", "flatten", "squeeze", "unsqueeze"}
_META = {"shape", "size", "dim", "dtype", "device", "numel", "is_floating_point", "is_contiguous", "stride",
         "requires_grad", "layout", "ndim", "__len__", "__get__", "is_complex", "element_size", "data_ptr"}


class SmoothQuantError(TorchfastError, ValueError):
    """SmoothQuant was given something it cannot work on; the message names the module or the value."""


class SmoothedLinear(nn.Module):
    """``linear(x * inv_scale)``: a Linear whose weight columns were multiplied by ``s``, its input divided by
    ``s`` here because no preceding layer could absorb it. Int8 transforms quantize the inner ``linear``."""

    def __init__(self, linear: nn.Linear, inv_scale: torch.Tensor) -> None:
        super().__init__()
        self.linear = linear
        self.register_buffer("inv_scale", inv_scale.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x * self.inv_scale)


def _is_norm(m: nn.Module) -> bool:
    """LayerNorm/RMSNorm-like: multiplies its normalized output by a per-channel ``weight`` (and adds a bias)."""
    if isinstance(m, (nn.LayerNorm, getattr(nn, "RMSNorm", nn.LayerNorm))):
        return m.weight is not None
    name = type(m).__name__
    w = getattr(m, "weight", None)
    return name.endswith(("LayerNorm", "RMSNorm")) and isinstance(w, nn.Parameter) and w.dim() == 1


def _op_name(func: Any) -> str:
    return getattr(func, "__name__", None) or type(func).__name__


# ------------------------------------------------------------------------------------------ the probe
class _Flow(TorchFunctionMode):
    """Who reads each tensor: every torch op during one forward, attributed to the innermost running module.
    Channel-preserving ops (dropout in eval, views keeping the last dim, dtype casts) are seen through."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.alias: dict[int, int] = {}
        self.keep: list[torch.Tensor] = []      # tracked tensors stay alive, so their ids stay theirs
        self.tracked: set[int] = set()
        self.uses: dict[int, list[tuple[str, str]]] = defaultdict(list)

    def root(self, t: torch.Tensor) -> int:
        return self.alias.get(id(t), id(t))

    def track(self, t: torch.Tensor) -> int:
        r = self.root(t)
        if r not in self.tracked:
            self.tracked.add(r)
            self.keep.append(t)
        return r

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = _op_name(func)
        if name in _META or not isinstance(out, (torch.Tensor, tuple, list)):
            return out
        ins = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        roots = [self.root(t) for t in ins]
        if not any(r in self.tracked for r in roots):
            return out
        if isinstance(out, torch.Tensor) and out is ins[0]:
            return out  # an identity (dropout in eval): reading it is reading the same tensor
        if name in _TRANSPARENT and isinstance(out, torch.Tensor) and out.dim() >= 1 and ins[0].dim() >= 1 \
                and out.shape[-1] == ins[0].shape[-1] and len(ins) == 1:
            self.alias[id(out)] = roots[0]
            self.keep.append(out)
            return out
        where = self.stack[-1] if self.stack else ""
        for r in roots:
            if r in self.tracked:
                self.uses[r].append((name, where))
        return out


@dataclass
class _Probe:
    calls: Counter = field(default_factory=Counter)
    source: dict[str, int] = field(default_factory=dict)          # linear -> root id of its input
    produced_by: dict[int, str] = field(default_factory=dict)     # root id -> norm/linear that returned it
    uses: dict[int, list[tuple[str, str]]] = field(default_factory=dict)


def _probe(model: nn.Module, linears: list[str], batch: Batch) -> _Probe:
    flow = _Flow()
    p = _Probe()
    names = {}
    for n, m in model.named_modules():
        names.setdefault(id(m), n)
    linear_set = set(linears)
    handles = []

    def pre(m, args, kwargs):
        n = names.get(id(m), "?")
        flow.stack.append(n)
        p.calls[n] += 1
        if n in linear_set:
            x = args[0] if args else next(iter(kwargs.values()), None)
            if isinstance(x, torch.Tensor):
                p.source[n] = flow.track(x)

    def post(m, args, kwargs, out):
        n = flow.stack.pop()
        if isinstance(out, torch.Tensor) and (n in linear_set or _is_norm(m)):
            p.produced_by.setdefault(flow.track(out), n)

    for m in model.modules():
        handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(m.register_forward_hook(post, with_kwargs=True))
    try:
        with torch.inference_mode(), flow:
            call_model(model, batch)
    except Exception as e:
        raise CalibrationError(f"{type(model).__name__} fails on calibration batch 0 ({describe_batch(batch)}): "
                               f"{type(e).__name__}: {e}") from e
    finally:
        for h in handles:
            h.remove()
    p.uses = dict(flow.uses)
    return p


# ------------------------------------------------------------------------------------------ groups
@dataclass
class _Group:
    linears: list[str]
    kind: str                  # "norm", "linear", "scale", "none"
    into: str = ""             # the norm / previous linear that absorbs 1/s
    reason: str = ""
    s: dict[Any, torch.Tensor] = field(default_factory=dict)      # candidate alpha (None: off) -> s
    err: dict[Any, float] = field(default_factory=dict)
    alpha: Any = None


def _plan(model: nn.Module, linears: list[str], probe: _Probe, insert_scale: bool) -> list[_Group]:
    by_root: dict[int, list[str]] = defaultdict(list)
    for n in linears:
        if n in probe.source:
            by_root[probe.source[n]].append(n)
    groups, placed = [], set()
    for root, members in by_root.items():
        producer = probe.produced_by.get(root)
        why = ""
        if producer is None:
            why = "its input is not a LayerNorm/RMSNorm or Linear output (an activation, attention, ...)"
        else:
            others = [(op, where) for op, where in probe.uses.get(root, [])
                      if not (op == "linear" and where in members)]
            shared = [n for n in [producer, *members] if probe.calls[n] != 1]
            if shared:
                why = f"{shared[0]} runs {probe.calls[shared[0]]} times per forward"
            elif others:
                op, where = others[0]
                why = f"{producer}'s output is also read by {op} in {where or 'the model'}"
                if len(others) > 1:
                    why += f" (+{len(others) - 1} more)"
        if not why:
            kind = "norm" if _is_norm(get_submodule(model, producer)) else "linear"
            groups.append(_Group(members, kind, producer))
            placed.update(members)
            continue
        for n in members:
            if probe.calls[n] != 1:
                groups.append(_Group([n], "none", reason=f"{n} runs {probe.calls[n]} times per forward"))
            elif insert_scale:
                groups.append(_Group([n], "scale", reason=why))
            else:
                groups.append(_Group([n], "none", reason=why + "; insert_scale=False"))
            placed.add(n)
    for n in linears:
        if n not in placed:
            groups.append(_Group([n], "none", reason="not called on calibration batch 0"))
    return groups


# ------------------------------------------------------------------------------------------ statistics
def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.detach().reshape(-1, x.shape[-1]).float()


class _Mask:
    """The current batch's ``attention_mask`` (B, T), when it has one: padding tokens' errors do not count."""
    value: torch.Tensor | None = None

    @classmethod
    def rows(cls, x: torch.Tensor) -> torch.Tensor | None:
        m = cls.value
        if m is None or x.dim() != 3 or tuple(x.shape[:2]) != tuple(m.shape):
            return None
        return m.reshape(-1).nonzero().squeeze(1)


def _run(model: nn.Module, batches: list[Batch], hooks: dict[str, Any]) -> None:
    handles = [get_submodule(model, n).register_forward_pre_hook(h) for n, h in hooks.items()]
    try:
        with torch.inference_mode():
            for i, b in enumerate(batches):
                mask = b.get("attention_mask") if isinstance(b, dict) else None
                _Mask.value = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
                try:
                    call_model(model, b)
                except Exception as e:
                    raise CalibrationError(f"calibration batch {i} ({describe_batch(b)}) failed in "
                                           f"{type(model).__name__}: {type(e).__name__}: {e}") from e
    finally:
        _Mask.value = None
        for h in handles:
            h.remove()


def _channel_stats(model: nn.Module, names: list[str], batches: list[Batch]) -> dict[str, torch.Tensor]:
    """Per input channel: (min, max) over all calibration data, as a (2, C) tensor per Linear."""
    stats: dict[str, torch.Tensor] = {}

    def make(n):
        def hook(m, args):
            x = _rows(args[0])
            mm = torch.stack([x.amin(0), x.amax(0)])
            stats[n] = mm if n not in stats else torch.stack([torch.minimum(stats[n][0], mm[0]),
                                                              torch.maximum(stats[n][1], mm[1])])
        return hook
    _run(model, batches, {n: make(n) for n in names})
    return stats


def _scales(amax: torch.Tensor, wmax: torch.Tensor, alpha: float) -> torch.Tensor:
    s = amax.clamp_min(1e-5).pow(alpha) / wmax.clamp_min(1e-5).pow(1 - alpha)
    s = torch.where((amax > 0) & (wmax > 0), s, torch.ones_like(s))
    return s.clamp(1e-4, 1e4)


def _simulate(model: nn.Module, groups: list[_Group], stats: dict[str, torch.Tensor], batches: list[Batch],
              per_channel: bool, precision: Precision, static: bool) -> None:
    """Fill each group's ``err``: simulated int8 output error relative to the float output, per candidate."""
    gen = torch.Generator().manual_seed(0)
    acc: dict[tuple[int, Any], list[float]] = defaultdict(lambda: [0.0, 0.0])
    hooks = {}
    for gi, g in enumerate(groups):
        for n in g.linears:
            def hook(m, args, _n=n, _gi=gi, _g=g):
                x = _rows(args[0])
                mn, mx = torch.aminmax(x, dim=0)  # the range of x / s, for any s > 0, follows from these
                idx = _Mask.rows(args[0])
                idx = torch.arange(x.shape[0]) if idx is None or not len(idx) else idx
                if len(idx) > _ROWS_PER_BATCH:
                    idx = idx[torch.randperm(len(idx), generator=gen)[:_ROWS_PER_BATCH]]
                xs = x[idx]
                w = m.weight.detach().float()
                y = xs @ w.t()
                den = float(y.square().sum())
                for a, s in _g.s.items():
                    lo_c, hi_c = (stats[_n][0], stats[_n][1]) if static else (mn, mx)
                    scale, zp, qmax = activation_qparams(float((lo_c / s).min()), float((hi_c / s).max()),
                                                         precision.reduce_range)
                    xq = torch.fake_quantize_per_tensor_affine(xs / s, scale, zp, 0, qmax)
                    e = acc[(_gi, a)]
                    # rounded here, not kept: every layer x every strength would hold several copies of
                    # the model's weights; rounding costs a fraction of this product over the sampled rows
                    e[0] += float((xq @ fake_quant_weight(w * s, per_channel, precision.weight_bits).t() - y).square().sum())
                    e[1] += den
            hooks[n] = hook
    _run(model, batches, hooks)
    for gi, g in enumerate(groups):
        for a in g.s:
            num, den = acc[(gi, a)]
            g.err[a] = num / den if den > 0 else 0.0


# ------------------------------------------------------------------------------------------ applying
def _layer(model: nn.Module, name: str) -> nn.Module:
    m = get_submodule(model, name)
    return m.linear if isinstance(m, SmoothedLinear) else m


def _apply(model: nn.Module, g: _Group, s: torch.Tensor) -> list[Any]:
    """Rescale in place; returns what undoes it: (tensor, saved copy) pairs and module swaps."""
    undo: list[Any] = []

    def scale_(t: torch.Tensor, by: torch.Tensor, div: bool) -> None:
        undo.append((t, t.detach().clone()))
        by = by.to(t.dtype)
        t.div_(by) if div else t.mul_(by)

    with torch.no_grad():
        if g.kind == "norm":
            norm = _layer(model, g.into)
            scale_(norm.weight, s, div=True)
            if getattr(norm, "bias", None) is not None:
                scale_(norm.bias, s, div=True)
        elif g.kind == "linear":
            prev = _layer(model, g.into)
            scale_(prev.weight, s[:, None], div=True)
            if prev.bias is not None:
                scale_(prev.bias, s, div=True)
        for n in g.linears:
            lin = _layer(model, n)
            scale_(lin.weight, s[None, :], div=False)
            if g.kind == "scale":
                swap_modules(model, {n: SmoothedLinear(lin, (1.0 / s).to(lin.weight.dtype))})
                undo.append(("swap", n, lin))
    return undo


def _undo(model: nn.Module, undo: list[Any]) -> None:
    with torch.no_grad():
        for item in reversed(undo):
            if item[0] == "swap":
                swap_modules(model, {item[1]: item[2]})
            else:
                item[0].copy_(item[1])


def _output(model: nn.Module, batch: Batch) -> torch.Tensor:
    with torch.inference_mode():
        return first_tensor(call_model(model, batch)).detach().float().clone()


def _rel_diff(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a - ref).abs().max() / ref.abs().max().clamp_min(1e-12))


# ------------------------------------------------------------------------------------------ public
def _linears(model: nn.Module, batch: Batch, ex: Exclusion) -> tuple[list[str], dict[str, str]]:
    return rewritable_layers(model, batch, ex, (nn.Linear,), lambda m: type(m).forward is nn.Linear.forward,
                             "rescaling its weight may not be exact")


def _precision(activations: str, reduce_range: bool | None, weight_bits: int | None) -> Precision:
    """What the int8 transform will compute here: Int8Dynamic's or Int8Static's plan for the requested range."""
    full_range = None if reduce_range is None else not reduce_range
    if activations == "dynamic":
        from .dynamic import precision_plan
        act8, bits = precision_plan(full_range)
        plan = Precision(8 if act8 else 7, bits)
    else:
        plan = static_precision(full_range)
    if weight_bits is None:
        return plan
    if weight_bits not in (7, 8):
        raise SmoothQuantError(f"smooth(weight_bits=...) must be 8 or 7, got {weight_bits!r}")
    return Precision(plan.activation_bits, weight_bits)


def smooth(model: nn.Module, calibration_batches: Iterable[Batch] | Batch, *,
           alpha: str | float = "auto", alphas: Sequence[float] = DEFAULT_ALPHAS, insert_scale: bool = True,
           activations: str = "dynamic", per_channel: bool = True, reduce_range: bool | None = None,
           weight_bits: int | None = None, exclude: Iterable[str] = (), inplace: bool = False
           ) -> tuple[nn.Module, Report]:
    """Migrate activation outliers into the weights of every Linear, as exact float rewrites (see module doc).

    ``alpha``: ``"auto"`` picks per layer group the strength from ``alphas`` (or none) whose simulated int8
    output error on ``calibration_batches`` is lowest; a float in [0, 1] applies that strength everywhere.
    ``activations``: the int8 scheme simulated to choose: ``"dynamic"`` (per-batch ranges, Int8Dynamic) or
    ``"static"`` (one range over the calibration data, Int8Static). ``reduce_range``: 7-bit activations,
    ``weight_bits``: 8 or 7 (default for both: what that int8 scheme uses on this CPU). ``exclude``: names or globs of layers to leave alone
    (``"*.attention.*"``). Returns (model, report with a row per Linear).
    """
    check_module(model)
    check_not_quantized(model, "SmoothQuant")
    if not (alpha == "auto" or (isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and 0 <= alpha <= 1)):
        raise SmoothQuantError(f"smooth(alpha=...) must be 'auto' or a number in [0, 1], got {alpha!r}")
    if alpha == "auto" and (not alphas or any(not isinstance(a, (int, float)) or not 0 <= a <= 1 for a in alphas)):
        raise SmoothQuantError(f"smooth(alphas=...) must be numbers in [0, 1], got {alphas!r}")
    if activations not in ("dynamic", "static"):
        raise SmoothQuantError(f"smooth(activations=...) must be 'dynamic' or 'static', got {activations!r}")
    if calibration_batches is None:
        raise CalibrationError("smooth() needs calibration batches: real inputs to measure activation ranges on")
    batches = collect(calibration_batches)
    ex = exclusion(model, exclude, "smooth")
    precision = _precision(activations, reduce_range, weight_bits)

    work = maybe_copy(model, inplace)
    with evaluating(work):
        names, skipped = _linears(work, batches[0], ex)
        reference = _output(work, batches[0])
        probe = _probe(work, names, batches[0])
        groups = _plan(work, names, probe, insert_scale)
        active = [g for g in groups if g.kind != "none"]
        stats = _channel_stats(work, [n for g in active for n in g.linears], batches) if active else {}
        candidates = [None, *alphas] if alpha == "auto" else [None, float(alpha)]
        for g in active:
            absmax = torch.stack([stats[n].abs().amax(0) for n in g.linears]).amax(0)
            wmax = torch.stack([get_submodule(work, n).weight.detach().abs().amax(0).float()
                                for n in g.linears]).amax(0)
            g.s = {a: (torch.ones_like(absmax) if a is None else _scales(absmax, wmax, a)) for a in candidates}
        if active:
            _simulate(work, active, stats, batches, per_channel, precision, activations == "static")
        undo_all = []
        for g in active:
            if alpha == "auto":
                best = min(candidates, key=lambda a: g.err[a])
                g.alpha = best if best is not None and g.err[best] < g.err[None] * (1 - _MIN_GAIN) else None
            else:
                g.alpha = float(alpha)
            if g.alpha is not None:
                undo_all.append((g, _apply(work, g, g.s[g.alpha])))
        diff = _rel_diff(_output(work, batches[0]), reference) if undo_all else 0.0
        if diff > _EXACT_TOL:  # a norm whose forward is not weight * normalized(x) + bias: find and revert it
            for g, undo in reversed(undo_all):
                _undo(work, undo)
            for g, _ in undo_all:
                undo = _apply(work, g, g.s[g.alpha])
                d = _rel_diff(_output(work, batches[0]), reference)
                if d > _EXACT_TOL:
                    _undo(work, undo)
                    g.reason = f"rescaling changed the float output (max relative difference {d:.2g}); not applied"
                    g.alpha, g.kind = None, "none"
            diff = _rel_diff(_output(work, batches[0]), reference)

    for m in work.modules():  # a new wrapper takes the train/eval flag of the layer it wraps
        if isinstance(m, SmoothedLinear):
            m.training = m.linear.training
    report = Report("SmoothQuant scale migration",
                    columns=["layer", "absorbed by", "alpha", "act range ratio before", "act range ratio after",
                             "int8 error before", "int8 error after", "applied", "reason"])
    for g in groups:
        for n in g.linears:
            row = dict(layer=n)
            if g.kind == "none":
                report.add_row(**row, applied=False, reason=g.reason)
                continue
            absmax = stats[n].abs().amax(0)
            ratio = lambda a: float(a.max() / a.median().clamp_min(1e-12))  # noqa: E731
            into = {"norm": f"{g.into} (norm)", "linear": f"{g.into} (rows)", "scale": "input scale (SmoothedLinear)"}
            applied = g.alpha is not None
            report.add_row(**row, **{"absorbed by": into[g.kind] if applied else "-",
                                     "alpha": g.alpha, "act range ratio before": ratio(absmax),
                                     "act range ratio after": ratio(absmax / g.s[g.alpha]),
                                     "int8 error before": g.err[None], "int8 error after": g.err[g.alpha]},
                           applied=applied,
                           reason=(g.reason if g.kind == "scale" else "") if applied else
                           "no strength lowers the simulated int8 error")
    for n, why in skipped.items():
        report.add_row(layer=n, applied=False, reason=why)
    done = [g for g in groups if g.alpha is not None]
    report.summary.update({
        "alpha": alpha, "simulated": f"int8 {activations}, {precision.describe()}, "
                                     f"{'per-channel' if per_channel else 'per-tensor'}",
        "layers smoothed": sum(len(g.linears) for g in done),
        "folded into norms": sum(len(g.linears) for g in done if g.kind == "norm"),
        "folded into linears": sum(len(g.linears) for g in done if g.kind == "linear"),
        "input scales inserted": sum(len(g.linears) for g in done if g.kind == "scale"),
        "max relative difference vs original": diff, "calibration batches": len(batches)})
    if not names:
        report.note("no Linear layer to smooth: the model is returned unchanged")
    return work, report
