"""Physically smaller layers: new Conv/BN/Linear/LayerNorm/Embedding/attention modules with sliced weights.

Given which components to remove, every (layer, role) gets the indices it keeps; a layer whose indices
all survive is left as it is (so 0% pruning is bit-exact), any other is rebuilt on the same device and
dtype with weights copied by ``index_select``.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from .attention import PrunedMultiheadAttention
from .graph import DependencyGraph
from .trace import _BN, _CONV, attention_kind


def keep_indices(g: DependencyGraph, removed: set[int]) -> dict[str, dict[str, torch.Tensor]]:
    """{layer: {role: kept indices}} for every layer that loses something."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for (mod, role), slots in g.slots.items():
        keep = [i for i, e in enumerate(slots.tolist()) if g.uf.find(e) not in removed]
        if len(keep) < len(slots):
            out.setdefault(mod, {})[role] = torch.tensor(keep, dtype=torch.long)
    return out


def _sel(t: torch.Tensor | None, dim: int, idx: torch.Tensor | None) -> torch.Tensor | None:
    if t is None or idx is None:
        return t
    return t.detach().index_select(dim, idx.to(t.device))


def _copy_into(new: nn.Module, name: str, value: torch.Tensor | None) -> None:
    if value is None:
        return
    getattr(new, name).data.copy_(value)


def _conv(m: nn.Conv2d, keep: dict) -> nn.Module:
    w = m.weight
    kw = {"device": w.device, "dtype": w.dtype}
    if "dw" in keep or (m.groups > 1 and m.groups == m.in_channels):
        k = m.out_channels // m.in_channels
        ko = keep.get("dw", torch.arange(m.out_channels))
        groups = len(ko) // k
        new = type(m)(groups, len(ko), m.kernel_size, m.stride, m.padding, m.dilation, groups,
                      m.bias is not None, m.padding_mode, **kw)
        _copy_into(new, "weight", _sel(w, 0, ko))
        _copy_into(new, "bias", _sel(m.bias, 0, ko))
        return new
    ko, ki = keep.get("out"), keep.get("in")
    new = type(m)(m.in_channels if ki is None else len(ki), m.out_channels if ko is None else len(ko),
                  m.kernel_size, m.stride, m.padding, m.dilation, 1, m.bias is not None, m.padding_mode, **kw)
    _copy_into(new, "weight", _sel(_sel(w, 0, ko), 1, ki))
    _copy_into(new, "bias", _sel(m.bias, 0, ko))
    return new


def _linear(m: nn.Linear, keep: dict) -> nn.Linear:
    ko, ki = keep.get("out"), keep.get("in")
    w = m.weight
    new = nn.Linear(m.in_features if ki is None else len(ki), m.out_features if ko is None else len(ko),
                    bias=m.bias is not None, device=w.device, dtype=w.dtype)
    _copy_into(new, "weight", _sel(_sel(w, 0, ko), 1, ki))
    _copy_into(new, "bias", _sel(m.bias, 0, ko))
    return new


def _bn(m: nn.Module, keep: dict) -> nn.Module:
    k = keep["bn"]
    ref = m.weight if m.weight is not None else m.running_mean
    new = type(m)(len(k), eps=m.eps, momentum=m.momentum, affine=m.affine,
                  track_running_stats=m.track_running_stats, device=ref.device, dtype=ref.dtype)
    for n in ("weight", "bias", "running_mean", "running_var"):
        if getattr(m, n, None) is not None:
            getattr(new, n).data.copy_(_sel(getattr(m, n), 0, k))
    if m.track_running_stats and m.num_batches_tracked is not None:
        new.num_batches_tracked.data.copy_(m.num_batches_tracked)
    return new


def _ln(m: nn.LayerNorm, keep: dict) -> nn.LayerNorm:
    k = keep["ln"]
    ref = m.weight
    new = nn.LayerNorm(len(k), eps=m.eps, elementwise_affine=m.elementwise_affine, bias=m.bias is not None,
                       device=None if ref is None else ref.device, dtype=None if ref is None else ref.dtype)
    _copy_into(new, "weight", _sel(m.weight, 0, k))
    _copy_into(new, "bias", _sel(m.bias, 0, k))
    return new


def _embedding(m: nn.Embedding, keep: dict) -> nn.Embedding:
    new = copy.deepcopy(m)
    new.weight = nn.Parameter(_sel(m.weight, 1, keep["emb"]).clone(), requires_grad=m.weight.requires_grad)
    new.embedding_dim = new.weight.shape[1]
    return new


def _mha(m: nn.MultiheadAttention, keep: dict) -> PrunedMultiheadAttention:
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
        proj.weight.data.copy_(_sel(_sel(w[j * E:(j + 1) * E], 0, rows), 1, ki))
        if b is not None:
            proj.bias.data.copy_(_sel(b[j * E:(j + 1) * E], 0, rows))
    new.out_proj.weight.data.copy_(_sel(_sel(m.out_proj.weight, 1, rows), 0, ko))
    if m.out_proj.bias is not None:
        new.out_proj.bias.data.copy_(_sel(m.out_proj.bias, 0, ko))
    new.train(m.training)
    return new


def _hf_attention(m: nn.Module, keep: dict) -> nn.Module:
    """Slice query/key/value by whole heads and update the head attributes the forward uses."""
    new = copy.copy(m)  # shallow: share config etc.; the projections are replaced below
    new._modules, new._parameters, new._buffers = dict(m._modules), dict(m._parameters), dict(m._buffers)
    H, d = m.num_attention_heads, m.attention_head_size
    heads = keep.get("head", torch.arange(H))
    rows = (heads[:, None] * d + torch.arange(d)[None]).flatten()
    ki = keep.get("in")
    for n in ("query", "key", "value"):
        setattr(new, n, _linear(getattr(m, n), {"out": rows, **({"in": ki} if ki is not None else {})}))
    new.num_attention_heads = len(heads)
    if hasattr(m, "all_head_size"):
        new.all_head_size = len(heads) * d
    return new


def rebuild_module(m: nn.Module, keep: dict) -> nn.Module:
    """The smaller copy of ``m`` keeping ``keep``'s channels/heads, with ``m``'s own train/eval flag."""
    new = _rebuild(m, keep)
    new.training = m.training
    return new


def _rebuild(m: nn.Module, keep: dict) -> nn.Module:
    if isinstance(m, _CONV):
        return _conv(m, keep)
    if isinstance(m, nn.Linear):
        return _linear(m, keep)
    if isinstance(m, _BN):
        return _bn(m, keep)
    if isinstance(m, nn.LayerNorm):
        return _ln(m, keep)
    if isinstance(m, nn.Embedding):
        return _embedding(m, keep)
    kind = attention_kind(m)
    if kind == "mha":
        return _mha(m, keep)
    if kind == "hf":
        return _hf_attention(m, keep)
    raise TypeError(f"internal: no rebuild rule for {type(m).__name__}")


def describe(m: nn.Module) -> str:
    if isinstance(m, _CONV):
        return f"{m.in_channels}->{m.out_channels}" + (f" g{m.groups}" if m.groups > 1 else "")
    if isinstance(m, nn.Linear):
        return f"{m.in_features}->{m.out_features}"
    if isinstance(m, _BN):
        return str(m.num_features)
    if isinstance(m, nn.LayerNorm):
        return str(m.normalized_shape[0])
    if isinstance(m, nn.Embedding):
        return f"{m.num_embeddings}x{m.embedding_dim}"
    if isinstance(m, PrunedMultiheadAttention):
        return f"{m.num_heads} heads x {m.head_dim}"
    if attention_kind(m) == "mha":
        return f"{m.num_heads} heads x {m.embed_dim // m.num_heads}"
    if attention_kind(m) == "hf":
        return f"{m.num_attention_heads} heads x {m.attention_head_size}"
    return type(m).__name__


@torch.no_grad()
def mask_removed(model: nn.Module, g: DependencyGraph, removed: set[int]) -> nn.Module:
    """Zero (in place) what pruning would remove: producer rows/biases, BN scales+shifts, attention heads' values.

    For activations with f(0) = 0 (ReLU, GELU, SiLU, Hardswish) the masked model computes exactly what the
    pruned one does; tests use it as an independent check of the rebuilt layers.
    """
    for (mod, role), slots in g.slots.items():
        idx = [i for i, e in enumerate(slots.tolist()) if g.uf.find(e) in removed]
        if not idx:
            continue
        m = model.get_submodule(mod)
        ix = torch.tensor(idx)
        if role in ("out", "dw") and isinstance(m, (nn.Linear,) + _CONV):
            m.weight[ix] = 0
            if m.bias is not None:
                m.bias[ix] = 0
        elif role == "out" and attention_kind(m) == "mha":
            m.out_proj.weight[ix] = 0
            if m.out_proj.bias is not None:
                m.out_proj.bias[ix] = 0
        elif role == "bn":
            if m.weight is not None:
                m.weight[ix] = 0
                m.bias[ix] = 0
        elif role == "emb":
            m.weight[:, ix] = 0
        elif role == "head":
            if attention_kind(m) == "hf":
                d = m.attention_head_size
                rows = (ix[:, None] * d + torch.arange(d)[None]).flatten()
                m.value.weight[rows] = 0
                if m.value.bias is not None:
                    m.value.bias[rows] = 0
            else:
                E, d = m.embed_dim, m.embed_dim // m.num_heads
                rows = 2 * E + (ix[:, None] * d + torch.arange(d)[None]).flatten()
                m.in_proj_weight[rows] = 0
                if m.in_proj_bias is not None:
                    m.in_proj_bias[rows] = 0
    return model
