"""Physically smaller layers: Conv/BN/Linear/LayerNorm/Embedding/attention modules with sliced weights.

Given which components to remove, every (layer, role) gets the indices it keeps; a layer whose indices
all survive is left as it is (so 0% pruning is bit-exact), any other is replaced by a sliced copy on the
same device and dtype (``index_select``). Conv/Linear/norm layers are copied, not re-constructed: a
subclass with its own ``__init__`` (a "same"-padding conv, a weight-standardized conv, a BatchNorm with a
fused activation) keeps its class and behaviour.
"""
from __future__ import annotations

import torch
from torch import nn

from .attention import PrunedMultiheadAttention
from .graph import DependencyGraph
from .layers import rule_for


def keep_indices(g: DependencyGraph, removed: set[int]) -> dict[str, dict[str, torch.Tensor]]:
    """{layer: {role: kept indices}} for every layer that loses something."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for (mod, role), slots in g.slots.items():
        keep = [i for i, e in enumerate(slots.tolist()) if g.uf.find(e) not in removed]
        if len(keep) < len(slots):
            out.setdefault(mod, {})[role] = torch.tensor(keep, dtype=torch.long)
    return out


def rebuild_module(m: nn.Module, keep: dict) -> nn.Module:
    """The smaller copy of ``m`` keeping ``keep``'s channels/heads, with ``m``'s own train/eval flag."""
    new = _rebuild(m, keep)
    new.training = m.training
    return new


def _rebuild(m: nn.Module, keep: dict) -> nn.Module:
    rule = rule_for(m)
    if rule is None:
        raise TypeError(f"internal: no pruning rule for {type(m).__name__}")
    return rule.rebuild(m, keep)


def describe(m: nn.Module) -> str:
    if isinstance(m, PrunedMultiheadAttention):
        return f"{m.num_heads} heads x {m.head_dim}"
    rule = rule_for(m)
    return rule.describe(m) if rule is not None else type(m).__name__


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
        rule = rule_for(m)
        if rule is not None and rule.mask is not None:
            rule.mask(m, role, torch.tensor(idx))
    return model
