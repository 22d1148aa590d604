"""A short fine-tune to recover accuracy after pruning. The user supplies the data and the loss.

Deliberately small: Adam/SGD over ``(inputs, targets)`` batches for a few epochs or steps, then eval
mode. Reported separately from the pruning figures (the pruning report never includes recovery).
"""
from __future__ import annotations

import time
from typing import Any, Callable, Iterable

import torch
from torch import nn

from ..modules import call_model, check_module
from ..report import Report


def finetune(model: nn.Module, data: Iterable[tuple[Any, Any]], loss_fn: Callable[[Any, Any], torch.Tensor], *,
             epochs: int = 1, steps: int | None = None, lr: float = 1e-3, optimizer: str = "adam",
             weight_decay: float = 0.0, eval_fn: Callable[[nn.Module], float] | None = None,
             ) -> tuple[nn.Module, Report]:
    """Train ``model`` in place on ``data`` (re-iterable ``(inputs, targets)`` batches) with ``loss_fn(output, targets)``."""
    check_module(model)
    if epochs < 1 and steps is None:
        raise ValueError(f"finetune needs epochs >= 1 or steps, got epochs={epochs!r}")
    if optimizer not in ("adam", "sgd"):
        raise ValueError(f"finetune optimizer must be 'adam' or 'sgd', got {optimizer!r}")
    params = [p for p in model.parameters() if p.requires_grad and p.is_floating_point()]
    if not params:
        raise ValueError("finetune: the model has no trainable floating-point parameters (quantize after fine-tuning)")
    before = eval_fn(model) if eval_fn is not None else None
    opt = (torch.optim.Adam(params, lr=lr, weight_decay=weight_decay) if optimizer == "adam"
           else torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay))
    t0 = time.perf_counter()
    losses: list[float] = []
    model.train()
    done = False
    try:
        for _ in range(max(1, epochs) if steps is None else 10 ** 9):
            n_batches = 0
            for inputs, targets in data:
                n_batches += 1
                with torch.enable_grad():
                    loss = loss_fn(call_model(model, inputs), targets)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                losses.append(float(loss.detach()))
                if steps is not None and len(losses) >= steps:
                    done = True
                    break
            if n_batches == 0:
                raise ValueError("finetune: data yielded no batches")
            if done:
                break
    finally:
        model.eval()
    for p in params:
        p.grad = None
    after = eval_fn(model) if eval_fn is not None else None
    rep = Report("finetune")
    rep.summary.update({"steps": len(losses), "first loss": losses[0], "last loss": losses[-1],
                        "time (s)": time.perf_counter() - t0, "metric before": before, "metric after": after})
    return model, rep
