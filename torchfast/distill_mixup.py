"""Mixed copies of the distillation batches: the student learns the teacher's function between the inputs too.

A student that only ever sees the user's batches matches the teacher on them, and on inputs like them; but
when those are the teacher's own training data, its outputs there are its most confident, and new inputs
find the two models further apart. Blending pairs of inputs (mixup: Zhang et al., ICLR 2018) and asking the
teacher what it answers on the blend widens what the student is fit on at no labelling cost; for
distillation, matching the teacher on such inputs is what makes a student generalize ("function matching",
Beyer et al., "Knowledge distillation: A good teacher is patient and consistent", CVPR 2022).
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from .modules import Batch

__all__ = ["mixable", "mixed_copies"]

ALPHA = 0.4   # Beta(alpha, alpha): most blends stay near one of the two inputs


def _tensors(b: Batch) -> list[torch.Tensor]:
    if isinstance(b, torch.Tensor):
        return [b]
    items = b.values() if isinstance(b, Mapping) else b
    return [v for v in items if isinstance(v, torch.Tensor)]


def mixable(b: Batch) -> str | None:
    """None if ``b`` can be blended (every tensor floating point, one batch dimension of 2 or more), else why not."""
    ts = _tensors(b)
    if not ts:
        return "it holds no tensor"
    if any(not t.is_floating_point() for t in ts):
        return "it holds non-floating-point tensors (token ids, masks): blends of those mean nothing"
    if any(t.dim() == 0 for t in ts) or len({t.shape[0] for t in ts}) != 1 or ts[0].shape[0] < 2:
        return "its tensors do not share a batch dimension of 2 or more samples"
    return None


def _blend(b: Batch, lam: torch.Tensor, perm: torch.Tensor) -> Batch:
    def mix(t: Any) -> Any:
        if not isinstance(t, torch.Tensor):
            return t
        w = lam.to(t.device, t.dtype).reshape(-1, *([1] * (t.dim() - 1)))
        return w * t + (1 - w) * t[perm.to(t.device)]
    if isinstance(b, torch.Tensor):
        return mix(b)
    if isinstance(b, Mapping):
        return {k: mix(v) for k, v in b.items()}
    return type(b)(mix(v) for v in b) if isinstance(b, tuple) else [mix(v) for v in b]


def mixed_copies(batches: list[Batch]) -> list[Batch]:
    """One blended copy of each batch: every sample mixed with another of the same batch, with weights drawn
    from Beta(ALPHA, ALPHA) from torch's global random stream (``distill`` seeds and forks it)."""
    beta = torch.distributions.Beta(torch.tensor(ALPHA), torch.tensor(ALPHA))
    out = []
    for b in batches:
        n = _tensors(b)[0].shape[0]
        out.append(_blend(b, beta.sample((n,)), torch.randperm(n)))
    return out
