"""Per-layer decisions: which factorization (if any) replaces each layer, and why.

Order: rank rule (or the accuracy-budgeted search) -> the candidate must cut FLOPs by
``min_flops_reduction`` -> optional speed guard on the layer's real input shape. With ``method="auto"``
candidates are tried from the lowest reconstruction error up, so a guard rejection falls back to the
next method before giving up on the layer.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import torch
from torch import nn

from ..measure import compare_latency, resolve_timing
from ..modules import evaluating, get_submodule, set_submodule
from .config import LowRank
from .ranks import allocate


def _progress(iterable, cfg: LowRank, desc: str, total: int | None = None):
    from tqdm.auto import tqdm
    return tqdm(iterable, desc=desc, total=total, leave=False, disable=not cfg.progress or None)


@contextlib.contextmanager
def swapped(model: nn.Module, pairs: list[tuple[str, nn.Module]]):
    """Temporarily put modules in place (for evaluation); always restores the originals."""
    old = [(n, get_submodule(model, n)) for n, _ in pairs]
    try:
        for n, m in pairs:
            set_submodule(model, n, m)
        yield model
    finally:
        for n, m in old:
            set_submodule(model, n, m)


def _guard(layer, cand, cfg: LowRank) -> float:
    w = layer.module.weight
    x = torch.randn(layer.geom.in_shape, dtype=w.dtype, device=w.device)
    # one layer: half of DEFAULT_TIMING (10 runs, 2 warm-up calls by default)
    timing = resolve_timing(share=0.5, runs=cfg.guard_runs, threads=cfg.threads)
    cmp = compare_latency(layer.module, cand.module, x, timing=timing)
    return cmp.speedup


def _decide(layer, cands: list, cfg: LowRank) -> tuple[Any, dict]:
    """(applied candidate or None, info) for one layer from its candidates (best first); a candidate the
    info keeps for the report has no module (its weights would only hold memory)."""
    applied, info = _choose_candidate(layer, cands, cfg)
    if info.get("candidate") is not None and info["candidate"] is not applied:
        info["candidate"] = dataclasses.replace(info["candidate"], module=None)
    return applied, info


def _choose_candidate(layer, cands: list, cfg: LowRank) -> tuple[Any, dict]:
    g = layer.geom
    base = g.flops()
    ok = [c for c in sorted(cands, key=lambda c: c.score) if base / max(c.flops, 1) >= cfg.min_flops_reduction]
    if not ok:
        c = min(cands, key=lambda c: c.score)
        return None, {"candidate": c, "reason": f"would not cut FLOPs enough: {base / max(c.flops, 1):.2f}x "
                                                f"< min_flops_reduction {cfg.min_flops_reduction}"}
    if not cfg.speed_guard:
        return ok[0], {}
    if g.in_shape is None:
        return None, {"candidate": ok[0], "reason": "speed guard: layer was not called on the example inputs"}
    tried = []
    for c in ok:
        s = _guard(layer, c, cfg)
        tried.append((c, s))
        if s >= cfg.guard_min_speedup:
            return c, {"speedup": s}
    c, s = tried[0]
    shape = "x".join(map(str, g.in_shape))
    why = f"speed guard: factorized layer not faster on this machine ({s:.2f}x on input {shape}" + (
        f"; {len(tried)} methods tried)" if len(tried) > 1 else ")")
    return None, {"candidate": c, "speedup": s, "reason": why}


def _search(model: nn.Module, layers: list, cfg: LowRank) -> tuple[dict, dict]:
    """AIMET-style: per-layer sensitivity over ``search_ratios``, then the lowest per-layer metric
    threshold whose combined model stays within ``budget`` of the original metric."""
    base = float(cfg.eval_fn(model))
    ratios = sorted(set(float(r) for r in cfg.search_ratios))
    table: dict[str, list[tuple[float, Any]]] = {}   # layer -> [(metric, candidate)]
    work = [(l, r) for l in layers for r in ratios]
    for i, (layer, r) in enumerate(_progress(work, cfg, "low-rank sensitivity scan")):
        c = layer.best("ratio", r)
        if i + 1 == len(work) or work[i + 1][0] is not layer:
            layer.release()  # its candidates are built: the table keeps them, not the factorizations
        if layer.geom.flops() / max(c.flops, 1) < cfg.min_flops_reduction:
            continue
        with swapped(model, [(layer.name, c.module)]):
            table.setdefault(layer.name, []).append((float(cfg.eval_fn(model)), c))

    def pick(t: float) -> dict[str, Any]:
        out = {}
        for name, opts in table.items():
            good = [c for m, c in opts if m >= t]
            if good:
                out[name] = min(good, key=lambda c: c.flops)
        return out

    floor = base - cfg.budget
    thresholds = sorted({m for opts in table.values() for m, _ in opts if m >= floor})
    evals: dict[float, float] = {}

    def combined(t: float) -> float:
        if t not in evals:
            chosen = pick(t)
            with swapped(model, [(n, c.module) for n, c in chosen.items()]):
                evals[t] = float(cfg.eval_fn(model))
        return evals[t]

    best_t = None
    lo, hi = 0, len(thresholds) - 1
    while lo <= hi:  # smallest threshold (most compression) that keeps the metric within budget
        mid = (lo + hi) // 2
        if combined(thresholds[mid]) >= floor:
            best_t, hi = thresholds[mid], mid - 1
        else:
            lo = mid + 1
    chosen = pick(best_t) if best_t is not None else {}
    summary = {"search_metric_before": base, "search_metric_after": evals.get(best_t, base) if best_t is not None else base,
               "search_budget": cfg.budget, "search_evals": len(work) + len(evals) + 1}
    return chosen, summary


def choose(model: nn.Module, layers: list, cfg: LowRank) -> tuple[list, dict]:
    """[(layer, applied candidate or None, info)], plus summary figures of the search if one ran."""
    decisions, summary = [], {}
    if cfg.budget is not None:
        with evaluating(model):  # eval_fn scores an inference model: no BatchNorm updates, no dropout
            chosen, summary = _search(model, layers, cfg)
        for layer in layers:
            c = chosen.get(layer.name)
            if c is None:
                decisions.append((layer, None, {"reason": "budget search: every rank tried cost too much accuracy"}))
            else:
                applied, info = _decide(layer, [c], cfg)
                decisions.append((layer, applied, info))
        return decisions, summary
    kind, value = cfg.spec
    budgets = allocate(layers, kind, value, cfg.min_flops_reduction) if cfg.allocation == "global" else None
    items = _progress(layers, cfg, "low-rank factorization") if len(layers) > 8 else layers
    for layer in items:
        if budgets is not None:
            if budgets[layer.name] is None:
                decisions.append((layer, None, {"reason": "global allocation keeps it: its rank is worth more "
                                                          "than the FLOPs it would save"}))
                layer.release()
                continue
            cands = layer.candidates("flops", budgets[layer.name])
        else:
            cands = layer.candidates(kind, value)
        applied, info = _decide(layer, cands, cfg)
        decisions.append((layer, applied, info))
        layer.release()
    return decisions, summary
