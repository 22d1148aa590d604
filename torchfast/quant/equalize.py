"""Cross-layer equalization (Nagel et al., "Data-Free Quantization", ICCV 2019): a float rewrite before int8.

In a chain ``conv1 -> ReLU -> conv2`` scaling conv1's output channel ``i`` by ``1/s_i`` and conv2's input
channel ``i`` by ``s_i`` computes the same function (ReLU, max/avg pooling and zero padding commute with a
positive per-channel scale), yet it can even out per-channel weight ranges that differ by 100x — typical of
depthwise convs after BatchNorm folding — so one int8 grid fits every channel. ``s_i = sqrt(r1_i / r2_i)``
makes both ranges ``sqrt(r1_i * r2_i)``; chains of three (conv -> depthwise -> conv) are swept a few times.

Chains are found on the ``torch.fx`` graph when the model traces (so an intermediate tensor that also feeds a
residual add is seen and left alone), otherwise by adjacency inside ``nn.Sequential`` containers. BatchNorm
is folded into the conv before it first (``fold_batchnorm``). ReLU6 (and any Hardtanh) is not
scale-equivariant: by default a chain through it is skipped; ``relu6="clamp"`` replaces the module by a
per-channel clamp with bounds ``6 / s_i`` — exact, but an op the int8 kernels do not fuse.
"""
from __future__ import annotations

import operator
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import TorchfastError
from ..modules import check_module, get_submodule, maybe_copy, set_submodule
from ..report import Report
from ..transform import Exclusion
from .common import check_not_quantized, exclusion

__all__ = ["equalize", "fold_batchnorm", "ChannelClamp", "EqualizeError"]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_LAYER = _CONV + (nn.Linear,)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
# f(s * x) == s * f(x) for every positive per-channel scale s
_EQUIVARIANT_MODULES = (nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
                        nn.Dropout3d, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d,
                        nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
                        nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
_EQUIVARIANT_FUNCTIONS = {F.relu, torch.relu, torch.relu_, F.relu_, F.leaky_relu, F.max_pool1d, F.max_pool2d,
                          F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d,
                          F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d,
                          F.adaptive_max_pool2d, F.adaptive_max_pool3d}
_EQUIVARIANT_METHODS = {"relu", "relu_"}
_SCALE_LIMIT = 1e4


class EqualizeError(TorchfastError, ValueError):
    """Cross-layer equalization or BatchNorm folding was given something it cannot work on."""


class ChannelClamp(nn.Module):
    """``clamp(x, lower[c], upper[c])`` per channel: a Hardtanh/ReLU6 whose input channels were rescaled."""

    def __init__(self, lower: torch.Tensor, upper: torch.Tensor, channel_dim: int) -> None:
        super().__init__()
        self.register_buffer("lower", lower.detach().clone())
        self.register_buffer("upper", upper.detach().clone())
        self.channel_dim = channel_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dim = self.channel_dim if self.channel_dim < 0 or x.dim() > 1 else 0
        shape = [1] * x.dim()
        shape[dim] = -1
        return torch.clamp(x, self.lower.view(shape).to(x.dtype), self.upper.view(shape).to(x.dtype))

    def extra_repr(self) -> str:
        return f"channels={self.lower.numel()}, channel_dim={self.channel_dim}"


def _plain_forward(m: nn.Module, base: type) -> bool:
    """A layer whose forward is its torch base class's (a subclass with its own forward may transform the
    weight, e.g. weight standardization, and rescaling it would not be exact)."""
    return type(m).forward is base.forward and \
        getattr(type(m), "_conv_forward", None) is getattr(base, "_conv_forward", None)


def _layer_base(m: nn.Module) -> type | None:
    for base in _LAYER:
        if isinstance(m, base):
            return base if _plain_forward(m, base) else None
    return None


# ------------------------------------------------------------------------------------------ the chain walk
@dataclass
class _Step:
    kind: str                  # "layer", "bn", "pass", "clamp", "stop"
    name: str = ""             # module qualified name ("" for functions)
    label: str = ""            # what to print in the report
    reason: str = ""           # for "stop"


@dataclass
class _Chains:
    method: str
    bn_pairs: list[tuple[str, str]] = field(default_factory=list)
    pairs: list[tuple[str, str, list[_Step]]] = field(default_factory=list)
    skipped: list[tuple[str, str, str]] = field(default_factory=list)   # (layer, next layer or "", reason)


class _View:
    """The consumers of each layer's output: from an fx graph, or from nn.Sequential adjacency."""

    def __init__(self, model: nn.Module, relu6: str, ex: Exclusion | None = None) -> None:
        self.model = model
        self.relu6 = relu6
        self.ex = ex if ex is not None else Exclusion()
        self.modules = dict(model.named_modules(remove_duplicate=False))
        self.calls: Counter = Counter()
        self.weight_read: set[str] = set()

    def classify_module(self, name: str) -> _Step:
        m = self.modules[name]
        label = type(m).__name__
        shared = f"{name} ({label}) is called {self.calls[name]} times per forward"
        if _layer_base(m) is not None:
            if self.ex(name):
                return _Step("stop", name, label, self.ex.reason(name))
            if self.calls[name] > 1:
                return _Step("stop", name, label, shared)
            if name in self.weight_read:
                return _Step("stop", name, label, f"the model's code reads {name}.weight directly")
            return _Step("layer", name, label)
        if isinstance(m, _LAYER):
            return _Step("stop", name, label, f"{name} ({label}) has its own forward; rescaling it may not be exact")
        if isinstance(m, _BN):
            return _Step("bn", name, label)
        if isinstance(m, _EQUIVARIANT_MODULES):
            return _Step("pass", name, label)
        if isinstance(m, nn.Hardtanh) and m.min_val <= 0 <= m.max_val:
            if self.relu6 == "clamp":
                if self.calls[name] > 1:
                    return _Step("stop", name, label, shared + "; one per-channel clamp cannot serve them all")
                return _Step("clamp", name, f"{label}->ChannelClamp")
            return _Step("stop", name, label, f"{label} is not scale-equivariant (relu6='clamp' replaces it by a "
                                              f"per-channel clamp)")
        return _Step("stop", name, label, f"{label} is not scale-equivariant")

    def starts(self) -> Iterator[Any]:
        raise NotImplementedError

    def next(self, item: Any) -> tuple[Any, _Step]:
        raise NotImplementedError


class _FxView(_View):
    def __init__(self, model: nn.Module, relu6: str, graph: torch.fx.Graph, ex: Exclusion | None = None) -> None:
        super().__init__(model, relu6, ex)
        self.graph = graph
        for n in graph.nodes:
            if n.op == "call_module":
                self.calls[n.target] += 1
            elif n.op == "get_attr" and isinstance(n.target, str) and "." in n.target:
                owner, attr = n.target.rsplit(".", 1)
                if attr in ("weight", "bias"):
                    self.weight_read.add(owner)

    def starts(self) -> Iterator[Any]:
        for n in self.graph.nodes:
            if n.op == "call_module" and self.classify_module(n.target).kind == "layer":
                yield n

    def name(self, node: Any) -> str:
        return node.target if node.op == "call_module" else ""

    def next(self, node: Any) -> tuple[Any, _Step]:
        users = list(node.users)
        if len(users) != 1:
            return None, _Step("stop", reason=f"its output feeds {len(users)} consumers "
                                              f"({', '.join(_node_label(u) for u in users[:3])})")
        u = users[0]
        if u.op == "output":
            return None, _Step("stop", reason="its output is a model output")
        others = [a for a in list(u.args[1:]) + list(u.kwargs.values()) if isinstance(a, torch.fx.Node)]
        if not u.args or u.args[0] is not node or others:
            return None, _Step("stop", reason=f"its output goes into {_node_label(u)} with other tensors")
        if u.op == "call_module":
            return u, self.classify_module(u.target)
        if u.op == "call_function" and u.target in _EQUIVARIANT_FUNCTIONS:
            return u, _Step("pass", label=_node_label(u))
        if u.op == "call_method" and u.target in _EQUIVARIANT_METHODS:
            return u, _Step("pass", label=_node_label(u))
        if u.op == "call_function" and u.target in (F.relu6, F.hardtanh, F.hardtanh_):
            return None, _Step("stop", reason=f"{_node_label(u)} is not scale-equivariant (and, being a function "
                                              f"call, cannot be replaced by a per-channel clamp)")
        return None, _Step("stop", reason=f"{_node_label(u)} is not scale-equivariant")


def _node_label(n: Any) -> str:
    if n.op == "call_module":
        return str(n.target)
    if n.op == "call_function":
        if n.target in (operator.add, operator.iadd, torch.add):
            return "an add"
        return getattr(n.target, "__name__", str(n.target))
    if n.op == "call_method":
        return f".{n.target}()"
    return n.op


def _pure_sequential(m: nn.Module) -> bool:
    return isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward


class _SequentialView(_View):
    """Adjacency inside nn.Sequential containers (nested plain Sequentials flattened): each child's output
    goes to the next child and nowhere else."""

    def __init__(self, model: nn.Module, relu6: str, ex: Exclusion | None = None) -> None:
        super().__init__(model, relu6, ex)
        counts = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
        for n, m in self.modules.items():
            self.calls[n] = counts[id(m)]
        self.seqs: list[list[str]] = []
        seen: set[str] = set()
        for n, m in model.named_modules():
            if _pure_sequential(m) and n not in seen:
                flat = list(self._flatten(n, m, seen))
                self.seqs.append(flat)

    def _flatten(self, prefix: str, seq: nn.Module, seen: set[str]) -> Iterator[str]:
        seen.add(prefix)
        for child, m in seq.named_children():
            full = f"{prefix}.{child}" if prefix else child
            if _pure_sequential(m):
                yield from self._flatten(full, m, seen)
            else:
                yield full

    def starts(self) -> Iterator[Any]:
        for i, flat in enumerate(self.seqs):
            for j, n in enumerate(flat):
                if self.classify_module(n).kind == "layer":
                    yield (i, j)

    def name(self, item: tuple[int, int]) -> str:
        return self.seqs[item[0]][item[1]]

    def next(self, item: tuple[int, int]) -> tuple[Any, _Step]:
        i, j = item
        if j + 1 >= len(self.seqs[i]):
            return None, _Step("stop", reason="it ends its nn.Sequential")
        nxt = (i, j + 1)
        return nxt, self.classify_module(self.seqs[i][j + 1])


def _trace(model: nn.Module) -> tuple[torch.fx.Graph | None, str]:
    try:
        return torch.fx.Tracer().trace(model), ""
    except Exception as e:  # noqa: BLE001 - data-dependent control flow etc.: fall back to Sequential adjacency
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"


def _view(model: nn.Module, relu6: str, ex: Exclusion | None = None) -> tuple[_View, str]:
    graph, why = _trace(model)
    if graph is not None:
        return _FxView(model, relu6, graph, ex), "torch.fx graph"
    return _SequentialView(model, relu6, ex), f"nn.Sequential adjacency (the model does not trace: {why})"


def _compatible(a: nn.Module, b: nn.Module) -> str:
    ba, bb = _layer_base(a), _layer_base(b)
    if ba is not bb:
        return f"{type(a).__name__} -> {type(b).__name__} do not share a channel layout"
    out_a = a.out_features if isinstance(a, nn.Linear) else a.out_channels
    in_b = b.in_features if isinstance(b, nn.Linear) else b.in_channels
    if out_a != in_b:
        return f"{out_a} output channels feed {in_b} input channels"
    return ""


def _find_chains(view: _View, method: str) -> _Chains:
    """BatchNorm pairs (a conv whose only consumer is a foldable BatchNorm) and equalizable layer pairs,
    walking from each layer through what commutes with a per-channel scale (a BatchNorm right after the
    first layer counts: it is folded first)."""
    ch = _Chains(method)
    for start in view.starts():
        name = view.name(start)
        if view.classify_module(name).kind == "bn":
            continue
        via: list[_Step] = []
        item, step = view.next(start)
        if step.kind == "bn":
            if _conv_bn_ok(view.modules[name], view.modules[step.name]):
                ch.bn_pairs.append((name, step.name))
                via.append(_Step("pass", step.name, f"{step.label} (folded)"))
                item, step = view.next(item)
            else:
                step = _Step("stop", step.name, step.label, f"{step.name} (BatchNorm) cannot be folded")
        while step.kind in ("pass", "clamp"):
            via.append(step)
            item, step = view.next(item)
        if step.kind == "bn":
            step = _Step("stop", step.name, step.label, f"{step.name} (BatchNorm) does not follow a conv directly")
        if step.kind == "layer":
            why = _compatible(view.modules[name], view.modules[step.name])
            if why:
                ch.skipped.append((name, step.name, why))
            else:
                ch.pairs.append((name, step.name, via))
        elif step.name and isinstance(view.modules.get(step.name), _LAYER):  # a layer it may not rescale
            ch.skipped.append((name, step.name, step.reason))
        elif item is not None:  # stopped on a module: is it right before another layer (a near miss)?
            _, nxt = view.next(item)
            if nxt.kind == "layer":
                ch.skipped.append((name, nxt.name, step.reason))
    return ch


def _conv_bn_ok(conv: nn.Module, bn: nn.Module) -> bool:
    return (isinstance(conv, _CONV) and _layer_base(conv) is not None and isinstance(bn, _BN)
            and bn.running_mean is not None and bn.running_var is not None and bn.num_features == conv.out_channels)


# ------------------------------------------------------------------------------------------ batchnorm folding
_REPLACE = ("identity", "neutral")


def _fold(model: nn.Module, pairs: list[tuple[str, str]], replace_with: str) -> None:
    from torch.nn.utils.fusion import fuse_conv_bn_weights

    with torch.no_grad():
        for conv_name, bn_name in pairs:
            conv, bn = get_submodule(model, conv_name), get_submodule(model, bn_name)
            w, b = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps,
                                        bn.weight, bn.bias)
            conv.weight = nn.Parameter(w.detach().to(conv.weight.dtype), requires_grad=conv.weight.requires_grad)
            conv.bias = nn.Parameter(b.detach().to(conv.weight.dtype), requires_grad=conv.weight.requires_grad)
            if replace_with == "neutral":  # y = (x - 0) / sqrt(1 + 0) * 1 + 0, exactly x
                bn.running_mean.zero_()
                bn.running_var.fill_(1.0)
                bn.eps = 0.0
                if bn.weight is not None:
                    bn.weight.fill_(1.0)
                    bn.bias.zero_()
                continue
            ident = nn.Identity()
            ident.training = bn.training
            set_submodule(model, bn_name, ident)


def fold_batchnorm(model: nn.Module, *, replace_with: str = "identity", inplace: bool = False) -> nn.Module:
    """``model`` with every BatchNorm that directly follows a conv (and nothing else reads that conv's output)
    folded into the conv's weight and bias.

    Uses the BatchNorm's running statistics: the result computes what ``model.eval()`` computes. The
    BatchNorm becomes ``nn.Identity`` (``replace_with="identity"``), or stays as a BatchNorm set to the
    identity map (``"neutral"``: zero mean, unit variance, no eps, unit weight, zero bias), which keeps
    int8 quantizers' Conv-BatchNorm-ReLU fusion patterns intact (an Identity between a conv and its ReLU
    stops torch.ao from fusing them). A BatchNorm without running statistics, or after a shared or
    weight-transforming conv, stays as it is.
    """
    check_module(model)
    if replace_with not in _REPLACE:
        raise EqualizeError(f"fold_batchnorm(replace_with=...) must be one of {_REPLACE}, got {replace_with!r}")
    work = maybe_copy(model, inplace)
    view, method = _view(work, "skip")
    _fold(work, _find_chains(view, method).bn_pairs, replace_with)
    return work


# ------------------------------------------------------------------------------------------ equalization
def _grouped(w: torch.Tensor, groups: int) -> torch.Tensor:
    """Weight (out, in/groups, *k) as (groups, out/groups, in/groups, k): input channel i of the layer is
    [i // (in/groups), :, i % (in/groups)]."""
    out = w.shape[0]
    return w.reshape(groups, out // groups, w.shape[1], -1)


def _out_ranges(m: nn.Module) -> torch.Tensor:
    return m.weight.detach().abs().reshape(m.weight.shape[0], -1).amax(1).float()


def _in_ranges(m: nn.Module) -> torch.Tensor:
    g = getattr(m, "groups", 1)
    return _grouped(m.weight.detach().abs(), g).amax(dim=(1, 3)).reshape(-1).float()


def _ratio(r: torch.Tensor) -> float:
    live = r[r > r.max() * 1e-12]
    return float(live.max() / live.min()) if live.numel() else 1.0


def _scale_pair(model: nn.Module, a: str, b: str, via: list[_Step]) -> float:
    """Equalize one pair in place; returns max |log s| (how far from converged)."""
    m1, m2 = get_submodule(model, a), get_submodule(model, b)
    r1, r2 = _out_ranges(m1), _in_ranges(m2)
    ok = (r1 > 0) & (r2 > 0)
    s = torch.where(ok, torch.sqrt(r1 / r2.clamp_min(1e-30)), torch.ones_like(r1)).clamp(1 / _SCALE_LIMIT, _SCALE_LIMIT)
    with torch.no_grad():
        shape = [-1] + [1] * (m1.weight.dim() - 1)
        m1.weight.div_(s.view(shape).to(m1.weight.dtype))
        if m1.bias is not None:
            m1.bias.div_(s.to(m1.bias.dtype))
        g = getattr(m2, "groups", 1)
        w2 = _grouped(m2.weight.data, g)
        w2.mul_(s.view(g, 1, -1, 1).to(w2.dtype))
        for st in via:
            clamp = get_submodule(model, st.name) if st.kind == "clamp" else None
            if isinstance(clamp, ChannelClamp):
                clamp.lower.div_(s.to(clamp.lower.dtype))
                clamp.upper.div_(s.to(clamp.upper.dtype))
    return float(s.log().abs().max())


def _to_channel_clamp(model: nn.Module, name: str, channels: int, linear: bool) -> None:
    m = get_submodule(model, name)
    if isinstance(m, ChannelClamp):
        return
    cc = ChannelClamp(torch.full((channels,), float(m.min_val)), torch.full((channels,), float(m.max_val)),
                      channel_dim=-1 if linear else 1)
    cc.training = m.training
    set_submodule(model, name, cc)


def equalize(model: nn.Module, *, iterations: int = 4, relu6: str = "skip", batchnorm: str = "neutral",
             exclude: Iterable[str] = (), inplace: bool = False) -> tuple[nn.Module, Report]:
    """Fold BatchNorm into convs, then equalize per-channel weight ranges across Conv->act->Conv chains.

    Data-free and exact in float (ReLU, LeakyReLU, PReLU, pooling, identity and dropout between the layers
    commute with the rescaling); the point is a model whose weights an int8 grid fits better. ``iterations``:
    sweeps over all pairs (chains of three layers need a few; a sweep that moves no scale by more than
    0.1% stops early). ``relu6``: ``"skip"`` leaves chains through ReLU6/Hardtanh alone, ``"clamp"`` equalizes
    across them by turning the module into a :class:`ChannelClamp`. ``batchnorm``: what a folded BatchNorm
    becomes, as in :func:`fold_batchnorm` (default ``"neutral"``: it stays, as the identity map, so int8
    conv-BatchNorm-ReLU fusion still applies). ``exclude``: names or globs of layers to leave alone
    (their BatchNorm stays unfolded too).

    Returns (model, report): a row per pair with the per-channel weight range ratio (max/min over channels)
    of the first layer's outputs and the second layer's inputs, before and after, plus rows for near misses.
    """
    check_module(model)
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise EqualizeError(f"equalize(iterations=...) must be a positive integer, got {iterations!r}")
    if relu6 not in ("skip", "clamp"):
        raise EqualizeError(f"equalize(relu6=...) must be 'skip' or 'clamp', got {relu6!r}")
    if batchnorm not in _REPLACE:
        raise EqualizeError(f"equalize(batchnorm=...) must be one of {_REPLACE}, got {batchnorm!r}")
    check_not_quantized(model, "cross-layer equalization")
    ex = exclusion(model, exclude, "equalize")
    for name, p in model.named_parameters():
        if not p.is_floating_point():
            raise EqualizeError(f"cross-layer equalization needs a float model; parameter {name!r} is {p.dtype}")
    work = maybe_copy(model, inplace)
    view, method = _view(work, relu6, ex)
    chains = _find_chains(view, method)
    _fold(work, chains.bn_pairs, batchnorm)

    before = {}
    for a, b, via in chains.pairs:
        m1 = get_submodule(work, a)
        for st in via:
            if st.kind == "clamp":
                _to_channel_clamp(work, st.name, m1.weight.shape[0], isinstance(m1, nn.Linear))
        before[(a, b)] = (_ratio(_out_ranges(m1)), _ratio(_in_ranges(get_submodule(work, b))))
    sweeps = 0
    for sweeps in range(1, iterations + 1):
        moved = max((_scale_pair(work, a, b, via) for a, b, via in chains.pairs), default=0.0)
        if moved < 1e-3:
            break

    report = Report("cross-layer equalization", columns=["layer", "next", "via", "channels", "out range ratio before",
                                                        "out range ratio after", "in range ratio before",
                                                        "in range ratio after", "applied", "reason"])
    for a, b, via in chains.pairs:
        m1, m2 = get_submodule(work, a), get_submodule(work, b)
        r_before = before[(a, b)]
        report.add_row(layer=a, next=b, via=" -> ".join(s.label for s in via) or "-",
                       channels=int(m1.weight.shape[0]), **{
                           "out range ratio before": r_before[0], "out range ratio after": _ratio(_out_ranges(m1)),
                           "in range ratio before": r_before[1], "in range ratio after": _ratio(_in_ranges(m2))},
                       applied=True)
    for a, b, why in chains.skipped:
        report.add_row(layer=a, next=b or "-", applied=False, reason=why)
    report.summary.update({"chains found by": method, "batchnorms folded": len(chains.bn_pairs),
                           "pairs equalized": len(chains.pairs), "sweeps": sweeps if chains.pairs else 0,
                           "relu6": relu6, "folded batchnorm becomes": batchnorm})
    if chains.bn_pairs:
        report.note("folded BatchNorm (running statistics) into: " +
                    ", ".join(f"{c} <- {b}" for c, b in chains.bn_pairs))
    if not chains.pairs:
        report.note("no Conv->Conv or Linear->Linear chain that rescaling leaves exact; weights unchanged "
                    "apart from BatchNorm folding")
    return work, report
