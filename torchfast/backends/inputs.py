"""Example inputs as the compilers need them: positional/keyword split, batch dimension, resized copies.

Compilers trace with one example; a dynamic batch needs to know which inputs carry the batch
dimension and, because tracers specialize a size of 1, an example whose batch is at least 2.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from ..modules import Batch, split_batch

__all__ = ["tensors_of", "batch_size_of", "resize_batch", "batch_dims"]


def tensors_of(batch: Batch) -> list[torch.Tensor]:
    """Every tensor in a batch (tensor, tuple/list, dict), in order."""
    if isinstance(batch, torch.Tensor):
        return [batch]
    if isinstance(batch, Mapping):
        batch = list(batch.values())
    if isinstance(batch, (tuple, list)):
        return [t for x in batch for t in tensors_of(x)]
    return []


def batch_size_of(batch: Batch) -> int:
    """The batch size: dim 0 of the first tensor with at least one dimension."""
    for t in tensors_of(batch):
        if t.dim() >= 1:
            return t.shape[0]
    raise ValueError("example inputs hold no tensor with a batch dimension")


def _is_batched(t: Any, n: int) -> bool:
    return isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[0] == n


def resize_batch(batch: Batch, size: int) -> Batch:
    """A copy of ``batch`` with batch size ``size``: rows repeated cyclically (values stay realistic)."""
    n = batch_size_of(batch)
    idx = torch.arange(size) % n

    def rs(x):
        if _is_batched(x, n):
            return x.index_select(0, idx.to(x.device)).contiguous()
        if isinstance(x, Mapping):
            return {k: rs(v) for k, v in x.items()}
        if isinstance(x, (tuple, list)):
            return type(x)(rs(v) for v in x)
        return x
    return rs(batch)


def batch_dims(batch: Batch, dim_obj: Any) -> tuple[tuple, dict]:
    """torch.export ``dynamic_shapes`` for (args, kwargs): ``{0: dim_obj}`` on every batched tensor."""
    n = batch_size_of(batch)
    args, kwargs = split_batch(batch)

    def spec(x):
        if _is_batched(x, n):
            return {0: dim_obj}
        if isinstance(x, torch.Tensor):
            return None
        if isinstance(x, Mapping):
            return {k: spec(v) for k, v in x.items()}
        if isinstance(x, (tuple, list)):
            return type(x)(spec(v) for v in x)
        return None
    return tuple(spec(a) for a in args), {k: spec(v) for k, v in kwargs.items()}
