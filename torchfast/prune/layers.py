"""What the pruner knows about each layer type, in one table, and ``register_layer`` to teach it more.

A :class:`LayerRule` says, for one layer type, how its channels connect in the dependency graph
(``trace``), how to build its smaller copy (``rebuild``), which weight slices score each channel
(``rows``), how to describe its size, and how to zero what pruning would remove (``mask``, an independent
check used by tests). Lookup follows the class hierarchy, so a subclass of ``nn.Conv2d`` with its own
``__init__`` is pruned as a Conv2d; smaller copies are sliced copies, so it keeps its class and behaviour.

``register_layer(MyRMSNorm, kind="norm")`` covers the common custom layers: ``"norm"`` (per-channel
scale/shift over the last dim, e.g. RMSNorm, a LayerNorm variant) and ``"linear"`` (a ``weight`` of shape
[out, in] applied over the last dim). Anything else takes a full :class:`LayerRule`.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from .graph import DependencyGraph, Layout, _tensors

__all__ = ["LayerRule", "register_layer", "rule_for", "CONV", "BATCHNORM"]

CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)

TraceFn = Callable[[DependencyGraph, str, nn.Module, tuple, dict, torch.Tensor], None]
RowsFn = Callable[[nn.Module, str, Callable[[Any], Any], bool], list]


@dataclass(frozen=True)
class LayerRule:
    """The pruner's knowledge of one layer type.

    trace(g, name, module, args, kwargs, y): connect the channels the module reads (``consume``) to its
        role slots (``g.role_slots(name, role, n)``) and set the layout of its output ``y``.
    rebuild(module, keep): the smaller module, ``keep`` = {role: kept indices} for the roles that shrink.
    rows(module, role, get, taylor): matrices whose row i holds what index i of ``role`` owns (for scores);
        ``get(param)`` gives the weight or its gradient.
    describe(module): its size, for reports. mask(module, role, idx): zero what removing ``idx`` removes.
    """
    trace: TraceFn
    rebuild: Callable[[nn.Module, dict], nn.Module]
    rows: RowsFn
    describe: Callable[[nn.Module], str]
    mask: Callable[[nn.Module, str, torch.Tensor], None] | None = None


_RULES: dict[type, LayerRule] = {}
_DUCK: list[tuple[Callable[[nn.Module], bool], LayerRule]] = []   # layers recognized by shape, not class


def register_layer(cls: type, rule: LayerRule | None = None, *, kind: str | None = None) -> LayerRule:
    """Teach the pruner a layer type (and its subclasses): a ready-made ``kind`` ("norm" | "linear") or a
    :class:`LayerRule`. A registered type is atomic: its forward is not traced op by op."""
    if not isinstance(cls, type) or not issubclass(cls, nn.Module):
        raise TypeError(f"register_layer takes an nn.Module subclass, got {cls!r}")
    if (rule is None) == (kind is None):
        raise ValueError("register_layer takes exactly one of rule=LayerRule(...) or kind='norm' | 'linear'")
    if kind is not None:
        kinds = {"norm": NORM, "linear": LINEAR}
        if kind not in kinds:
            raise ValueError(f"register_layer kind must be one of {sorted(kinds)}, got {kind!r}")
        rule = kinds[kind]
    if not isinstance(rule, LayerRule):
        raise TypeError(f"register_layer rule must be a LayerRule, got {type(rule).__name__}")
    _RULES[cls] = rule
    return rule


def rule_for(m: nn.Module) -> LayerRule | None:
    for cls in type(m).__mro__:
        r = _RULES.get(cls)
        if r is not None:
            return r
    for test, r in _DUCK:
        if test(m):
            return r
    return None


# ------------------------------------------------------------------------------------------ shared helpers
def consume(g: DependencyGraph, name: str, x: Any, slots: torch.Tensor, want_dim: int, what: str) -> None:
    """The layer ``name`` reads tensor ``x``'s channels (tracked on ``want_dim``) into ``slots``."""
    lay = g.layout(x)
    if lay is None:
        return
    if lay.dim != want_dim or len(lay.ids) != len(slots):
        g.poison(lay.ids, f"{what} {name} reads channels tracked on dim {lay.dim}")
        g.poison(slots, f"{what} {name} reads channels tracked on dim {lay.dim}")
        return
    g.union(lay.ids, slots)


def _first_input(args: tuple, kwargs: dict) -> Any:
    return args[0] if args else next(iter(kwargs.values()), None)


def select(t: torch.Tensor | None, dim: int, idx: torch.Tensor | None) -> torch.Tensor | None:
    if t is None or idx is None:
        return t
    return t.detach().index_select(dim, idx.to(t.device))


def _shallow_copy(m: nn.Module) -> nn.Module:
    """``copy.copy`` with its own parameter/buffer/submodule/hook dicts, so changing the copy leaves ``m`` alone."""
    new = copy.copy(m)
    for k, v in list(vars(new).items()):
        if isinstance(v, dict):
            vars(new)[k] = copy.copy(v)
    return new


def _replace_tensors(new: nn.Module, fn: Callable[[str, torch.Tensor], torch.Tensor | None]) -> None:
    for store in ("_parameters", "_buffers"):
        table = getattr(new, store)
        for name, t in list(table.items()):
            if t is None:
                continue
            v = fn(name, t.detach())
            if v is None:
                continue
            v = v.clone()
            table[name] = nn.Parameter(v, requires_grad=t.requires_grad) if store == "_parameters" else v


def sliced_copy(m: nn.Module, out_idx: torch.Tensor | None, in_idx: torch.Tensor | None = None,
                **attrs: object) -> nn.Module:
    """A copy of ``m`` with ``weight`` sliced along dim 0 by ``out_idx`` and dim 1 by ``in_idx``, and every
    other tensor whose dim 0 is the output size (bias, a per-channel gain) along dim 0. ``m``'s own
    ``__init__`` never runs; its class and extra state (padding rules, scales, fused activations) stay."""
    size = m.weight.shape[0]
    new = _shallow_copy(m)

    def cut(name: str, v: torch.Tensor) -> torch.Tensor | None:
        if name == "weight":
            return select(select(v, 0, out_idx), 1, in_idx) if v.dim() > 1 else select(v, 0, out_idx)
        if out_idx is not None and v.dim() >= 1 and v.shape[0] == size:
            return select(v, 0, out_idx)
        return None
    _replace_tensors(new, cut)
    for k, v in attrs.items():
        setattr(new, k, v)
    return new


def sliced_norm(m: nn.Module, idx: torch.Tensor, size: int, **attrs: object) -> nn.Module:
    """A copy of a norm layer with every per-feature tensor (weight, bias, running stats) sliced."""
    new = _shallow_copy(m)
    _replace_tensors(new, lambda name, v: select(v, 0, idx) if v.dim() >= 1 and v.shape[0] == size else None)
    for k, v in attrs.items():
        setattr(new, k, v)
    return new


def _zero_out_rows(m: nn.Module, idx: torch.Tensor) -> None:
    m.weight[idx] = 0
    if getattr(m, "bias", None) is not None:
        m.bias[idx] = 0


# ------------------------------------------------------------------------------------------ Conv1d/2d/3d
def _conv_trace(g, name, m, args, kwargs, y):
    x = _first_input(args, kwargs)
    kind = type(m).__name__
    cdim = x.dim() - (m.weight.dim() - 2) - 1
    if m.groups == 1:
        consume(g, name, x, g.role_slots(name, "in", m.in_channels), cdim, kind)
        o = g.role_slots(name, "out", m.out_channels)
    elif m.groups == m.in_channels and m.out_channels % m.in_channels == 0:
        k = m.out_channels // m.in_channels
        o = g.role_slots(name, "dw", m.out_channels)
        for j in range(m.out_channels):
            g.uf.union(int(o[j]), int(o[(j // k) * k]))
        if g.layout(x) is not None:
            consume(g, name, x, o[::k], cdim, kind)
    else:
        i, o = g.role_slots(name, "in", m.in_channels), g.role_slots(name, "out", m.out_channels)
        why = f"grouped {kind} {name} (groups={m.groups}) is kept whole"
        g.poison(i, why), g.poison(o, why)
        lay = g.layout(x)
        if lay is not None:
            g.poison(lay.ids, why)
    g.set_layout(y, Layout(cdim, o))


def _conv_rebuild(m, keep):
    if "dw" in keep or (m.groups > 1 and m.groups == m.in_channels):
        k = m.out_channels // m.in_channels
        ko = keep.get("dw", torch.arange(m.out_channels))
        groups = len(ko) // k
        return sliced_copy(m, ko, None, in_channels=groups, out_channels=len(ko), groups=groups)
    ko, ki = keep.get("out"), keep.get("in")
    return sliced_copy(m, ko, ki, in_channels=m.in_channels if ki is None else len(ki),
                       out_channels=m.out_channels if ko is None else len(ko))


def _matrix_rows(m, role, get, taylor):
    w = get(m.weight)
    if w is None:
        return []
    if role in ("out", "dw"):
        b = getattr(m, "bias", None)
        return [w.flatten(1)] + ([get(b)[:, None]] if b is not None and get(b) is not None else [])
    if role == "in":
        return [w.transpose(0, 1).flatten(1)]
    return []


def _matrix_mask(m, role, idx):
    if role in ("out", "dw"):
        _zero_out_rows(m, idx)


CONV_RULE = LayerRule(trace=_conv_trace, rebuild=_conv_rebuild, rows=_matrix_rows, mask=_matrix_mask,
                      describe=lambda m: f"{m.in_channels}->{m.out_channels}" + (f" g{m.groups}" if m.groups > 1 else ""))


# ------------------------------------------------------------------------------------------ Linear-like
def _linear_trace(g, name, m, args, kwargs, y):
    x = _first_input(args, kwargs)
    n_out, n_in = m.weight.shape[0], m.weight.shape[1]
    consume(g, name, x, g.role_slots(name, "in", n_in), x.dim() - 1, type(m).__name__)
    g.set_layout(y, Layout(y.dim() - 1, g.role_slots(name, "out", n_out)))


def _linear_rebuild(m, keep):
    ko, ki = keep.get("out"), keep.get("in")
    attrs = {}
    if hasattr(m, "in_features"):
        attrs["in_features"] = m.in_features if ki is None else len(ki)
    if hasattr(m, "out_features"):
        attrs["out_features"] = m.out_features if ko is None else len(ko)
    return sliced_copy(m, ko, ki, **attrs)


LINEAR = LayerRule(trace=_linear_trace, rebuild=_linear_rebuild, rows=_matrix_rows, mask=_matrix_mask,
                   describe=lambda m: f"{m.weight.shape[1]}->{m.weight.shape[0]}")


# ------------------------------------------------------------------------------------------ norms
def _norm_rows(m, role, get, taylor):
    w = getattr(m, "weight", None)
    out = [get(w)[:, None]] if w is not None and get(w) is not None else []
    b = getattr(m, "bias", None)
    if taylor and b is not None and get(b) is not None:
        out.append(get(b)[:, None])
    return out


def _norm_mask(m, role, idx):
    if getattr(m, "weight", None) is not None:
        m.weight[idx] = 0
        if getattr(m, "bias", None) is not None:
            m.bias[idx] = 0


def _bn_trace(g, name, m, args, kwargs, y):
    s = g.role_slots(name, "bn", m.num_features)
    consume(g, name, _first_input(args, kwargs), s, 1, type(m).__name__)
    g.set_layout(y, Layout(1, s))


BATCHNORM_RULE = LayerRule(trace=_bn_trace, rows=_norm_rows, mask=_norm_mask, describe=lambda m: str(m.num_features),
                           rebuild=lambda m, keep: sliced_norm(m, keep["bn"], m.num_features, num_features=len(keep["bn"])))


def _last_dim_size(m: nn.Module) -> int | None:
    shape = getattr(m, "normalized_shape", None)
    if shape is not None:
        shape = tuple(shape) if not isinstance(shape, int) else (shape,)
        return shape[0] if len(shape) == 1 else None
    w = getattr(m, "weight", None)
    return w.shape[0] if isinstance(w, torch.Tensor) and w.dim() == 1 else None


def _norm_trace(g, name, m, args, kwargs, y):
    x = _first_input(args, kwargs)
    n = _last_dim_size(m)
    if n is None:
        lay = g.layout(x)
        if lay is not None:
            g.poison(lay.ids, f"{type(m).__name__} {name} normalizes over several dims")
        return
    s = g.role_slots(name, "ln", n)
    consume(g, name, x, s, x.dim() - 1, type(m).__name__)
    g.set_layout(y, Layout(y.dim() - 1, s))


def _norm_rebuild(m, keep):
    k = keep["ln"]
    attrs: dict[str, Any] = {}
    if getattr(m, "normalized_shape", None) is not None:
        attrs["normalized_shape"] = (len(k),) if not isinstance(m.normalized_shape, int) else len(k)
    return sliced_norm(m, k, _last_dim_size(m), **attrs)


# no mask: a norm over the last dim sees the zeroed channels in its statistics, so zeroing is not removing
NORM = LayerRule(trace=_norm_trace, rebuild=_norm_rebuild, rows=_norm_rows, describe=lambda m: str(_last_dim_size(m)))


# ------------------------------------------------------------------------------------------ Embedding
def _embedding_rebuild(m, keep):
    new = _shallow_copy(m)
    new._parameters["weight"] = nn.Parameter(select(m.weight, 1, keep["emb"]).clone(), requires_grad=m.weight.requires_grad)
    new.embedding_dim = new.weight.shape[1]
    return new


def _embedding_mask(m, role, idx):
    m.weight[:, idx] = 0


EMBEDDING = LayerRule(
    trace=lambda g, name, m, args, kwargs, y: g.set_layout(y, Layout(y.dim() - 1, g.role_slots(name, "emb", m.embedding_dim))),
    rebuild=_embedding_rebuild, rows=lambda m, role, get, taylor: [get(m.weight).t()] if get(m.weight) is not None else [],
    describe=lambda m: f"{m.num_embeddings}x{m.embedding_dim}", mask=_embedding_mask)


# ------------------------------------------------------------------------------------------ attention
def _mha_trace(g, name, m, args, kwargs, y):
    E = m.embed_dim
    i, h, o = (g.role_slots(name, "in", E), g.role_slots(name, "head", m.num_heads),
               g.role_slots(name, "out", m.out_proj.out_features))
    qkv = list(args[:3]) + [kwargs[k] for k in ("query", "key", "value") if k in kwargs]
    if not m._qkv_same_embed_dim or m.bias_k is not None or m.add_zero_attn:
        why = f"MultiheadAttention {name} uses kdim/vdim, bias_k/bias_v or add_zero_attn"
        for s in (i, h, o):
            g.poison(s, why)
    for t in qkv:
        if isinstance(t, torch.Tensor):
            consume(g, name, t, i, t.dim() - 1, "MultiheadAttention")
    g.set_layout(y, Layout(y.dim() - 1, o))


def _mha_rebuild(m, keep):
    from .attention import PrunedMultiheadAttention
    E, H = m.embed_dim, m.num_heads
    d = E // H
    heads = keep.get("head", torch.arange(H))
    rows = (heads[:, None] * d + torch.arange(d)[None]).flatten()
    ki, ko = keep.get("in"), keep.get("out")
    w, b = m.in_proj_weight, m.in_proj_bias
    new = PrunedMultiheadAttention(E if ki is None else len(ki), len(heads), d,
                                   m.out_proj.out_features if ko is None else len(ko), batch_first=m.batch_first,
                                   dropout=m.dropout, bias=b is not None, device=w.device, dtype=w.dtype)
    for j, proj in enumerate((new.q_proj, new.k_proj, new.v_proj)):
        proj.weight.data.copy_(select(select(w[j * E:(j + 1) * E], 0, rows), 1, ki))
        if b is not None:
            proj.bias.data.copy_(select(b[j * E:(j + 1) * E], 0, rows))
    new.out_proj.weight.data.copy_(select(select(m.out_proj.weight, 1, rows), 0, ko))
    if m.out_proj.bias is not None:
        new.out_proj.bias.data.copy_(select(m.out_proj.bias, 0, ko))
    new.train(m.training)
    return new


def _mha_rows(m, role, get, taylor):
    E, H = m.embed_dim, m.num_heads
    w, ow = get(m.in_proj_weight), get(m.out_proj.weight)
    if w is None or ow is None:
        return []
    if role == "in":
        return [w.t()]
    if role == "out":
        return [ow]
    if role == "head":
        return [w.reshape(3, H, E // H, -1).transpose(0, 1).flatten(1),
                ow.reshape(-1, H, E // H).transpose(0, 1).flatten(1)]
    return []


def _mha_mask(m, role, idx):
    if role == "out":
        _zero_out_rows(m.out_proj, idx)
    elif role == "head":
        E, d = m.embed_dim, m.embed_dim // m.num_heads
        rows = 2 * E + (idx[:, None] * d + torch.arange(d)[None]).flatten()
        m.in_proj_weight[rows] = 0
        if m.in_proj_bias is not None:
            m.in_proj_bias[rows] = 0


MHA = LayerRule(trace=_mha_trace, rebuild=_mha_rebuild, rows=_mha_rows, mask=_mha_mask,
                describe=lambda m: f"{m.num_heads} heads x {m.embed_dim // m.num_heads}")


def is_hf_attention(m: nn.Module) -> bool:
    """Hugging Face style self-attention: query/key/value Linears and head-count attributes."""
    return all(isinstance(getattr(m, a, None), nn.Linear) for a in ("query", "key", "value")) \
        and isinstance(getattr(m, "attention_head_size", None), int) \
        and isinstance(getattr(m, "num_attention_heads", None), int)


def _hf_trace(g, name, m, args, kwargs, y):
    x = _first_input(args, kwargs)
    kind = type(m).__name__
    i = g.role_slots(name, "in", m.query.in_features)
    h = g.role_slots(name, "head", m.num_attention_heads)
    hs = m.attention_head_size
    consume(g, name, x, i, x.dim() - 1, kind)
    extra = [t for k, t in kwargs.items() if "encoder" in k and isinstance(t, torch.Tensor)]
    if extra or len({m.query.in_features, m.key.in_features, m.value.in_features}) != 1 \
            or y.shape[-1] != m.num_attention_heads * hs or m.value.out_features != y.shape[-1]:
        g.poison(h, f"{kind} {name}: cross-attention or unexpected head layout")
        g.poison(i, f"{kind} {name}: cross-attention or unexpected head layout")
    g.set_layout(y, Layout(y.dim() - 1, h.repeat_interleave(hs)))


def _hf_rebuild(m, keep):
    """Slice query/key/value by whole heads and update the head attributes the forward uses."""
    new = _shallow_copy(m)
    H, d = m.num_attention_heads, m.attention_head_size
    heads = keep.get("head", torch.arange(H))
    rows = (heads[:, None] * d + torch.arange(d)[None]).flatten()
    ki = keep.get("in")
    for n in ("query", "key", "value"):
        setattr(new, n, _linear_rebuild(getattr(m, n), {"out": rows, **({"in": ki} if ki is not None else {})}))
    new.num_attention_heads = len(heads)
    if hasattr(m, "all_head_size"):
        new.all_head_size = len(heads) * d
    return new


def _hf_rows(m, role, get, taylor):
    H = m.num_attention_heads
    ws = [get(getattr(m, n).weight) for n in ("query", "key", "value")]
    if any(w is None for w in ws):
        return []
    if role == "in":
        return [w.t() for w in ws]
    if role == "head":
        return [w.reshape(H, -1) for w in ws]
    return []


def _hf_mask(m, role, idx):
    if role == "head":
        d = m.attention_head_size
        rows = (idx[:, None] * d + torch.arange(d)[None]).flatten()
        _zero_out_rows(m.value, rows)


HF_ATTENTION = LayerRule(trace=_hf_trace, rebuild=_hf_rebuild, rows=_hf_rows, mask=_hf_mask,
                         describe=lambda m: f"{m.num_attention_heads} heads x {m.attention_head_size}")


for _cls in CONV:
    _RULES[_cls] = CONV_RULE
for _cls in BATCHNORM:
    _RULES[_cls] = BATCHNORM_RULE
_RULES[nn.Linear] = LINEAR
_RULES[nn.LayerNorm] = NORM
if hasattr(nn, "RMSNorm"):
    _RULES[nn.RMSNorm] = NORM
_RULES[nn.Embedding] = EMBEDDING
_RULES[nn.MultiheadAttention] = MHA
_DUCK.append((is_hf_attention, HF_ATTENTION))


def trace_layer(g: DependencyGraph, name: str, m: nn.Module, rule: LayerRule, args: tuple, kwargs: dict,
                out: Any) -> None:
    outs = _tensors(out)
    if not outs:
        return
    rule.trace(g, name, m, args, kwargs, outs[0])
    for t in outs[1:]:
        g.set_layout(t, None)
