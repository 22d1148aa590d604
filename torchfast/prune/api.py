"""``prune(model, ChannelPruning(...), example_inputs=x) -> (model, report)``.

Trace -> coupled groups -> importance -> choose what to remove -> rebuild smaller layers on a copy ->
run the copy on the example inputs and check every output keeps its shape -> only then commit the new
layers into the user's module tree (``inplace=True``) or return the copy (``inplace=False``, default).
Any error leaves the user's model exactly as it was, train/eval flags included.
"""
from __future__ import annotations

import copy
import math
import time
from typing import Any, Callable

import torch
from torch import nn

from ..measure import count_flops
from ..modules import batches_list, call_model, check_module, evaluating, first_tensor, set_submodule, \
    shared_twin, swap_modules
from ..report import Report
from ..transform import Exclusion, legacy_positional, require_names
from .config import ChannelPruning
from .graph import DependencyGraph, Family, TraceError, _tensors
from .importance import family_scores
from .structured import describe, keep_indices, rebuild_module
from .recalibrate import recalibrate_batchnorm
from .reconstruct import reconstruct_layers
from .trace import trace
from ..config import ConfigError
from ..errors import TorchfastError


class PruneError(TorchfastError, RuntimeError):
    """Pruning produced a model that does not run or changes the output shapes; nothing was changed."""


def _amount_for(fam: Family, cfg: ChannelPruning) -> float:
    la = dict(cfg.layer_amounts)
    for mod in sorted({m for m, r in fam.key if r in ("out", "head", "emb")}):
        for name, amt in la.items():
            if mod == name or mod.startswith(name + "."):
                return amt
    return cfg.amount


def _n_keep(n: int, amount: float, round_to: int) -> int:
    keep = n - int(math.floor(n * amount + 1e-9))
    if round_to > 1:
        keep = min(n, int(math.ceil(keep / round_to)) * round_to)
    return max(1, keep)


def _taylor_grads(model: nn.Module, batches: list, loss_fn: Callable | None) -> None:
    """Accumulate dL/dw on ``model`` (a private copy) over the batches."""
    for p in model.parameters():
        p.grad = None
    with torch.enable_grad():
        for b in batches:
            out = call_model(model, b)
            loss = loss_fn(out) if loss_fn is not None else first_tensor(out).float().pow(2).mean()
            loss.backward()


def _choose(g: DependencyGraph, fams: list[Family], model: nn.Module, cfg: ChannelPruning,
            report: Report) -> set[int]:
    removed: set[int] = set()
    scored = []
    fallback = False
    for f in fams:
        s, fb = family_scores(g, f, model, cfg.importance)
        fallback |= fb
        scored.append((f, s))
    if fallback:
        report.note("bn_scale: groups without a BatchNorm were ranked by L1 weight norm")
    if cfg.scope == "local" or cfg.layer_amounts:
        for f, s in scored:
            n = len(f.components)
            amt = _amount_for(f, cfg)
            k = _n_keep(n, amt, cfg.round_to)
            if cfg.scope == "global" and amt == cfg.amount:
                continue
            for i in torch.argsort(s)[: n - k].tolist():
                removed.add(f.components[i].root)
    if cfg.scope == "global":
        pool = [(float(sc), fi, ci) for fi, (f, s) in enumerate(scored) if _amount_for(f, cfg) == cfg.amount
                for ci, sc in enumerate(s.tolist())]
        budget = int(math.floor(len(pool) * cfg.amount + 1e-9))
        caps = [len(f.components) - _n_keep(len(f.components), cfg.max_amount, cfg.round_to) for f, _ in scored]
        taken = [0] * len(scored)
        for sc, fi, ci in sorted(pool):
            if budget <= 0:
                break
            if taken[fi] < caps[fi]:
                taken[fi] += 1
                budget -= 1
                removed.add(scored[fi][0].components[ci].root)
    return removed


def _aliases(model: nn.Module) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for n, m in model.named_modules(remove_duplicate=False):
        out.setdefault(id(m), []).append(n)
    return out


def _shapes(out: Any) -> list[tuple]:
    return [tuple(t.shape) for t in _tensors(out)]


def plan(model: nn.Module, example_inputs: Any, cfg: ChannelPruning, *, calibration: list | None = None,
         report: Report | None = None) -> tuple[DependencyGraph, list[Family], dict, set[int]]:
    """Trace ``model`` and decide what to remove, without changing it (beyond transient grads for taylor).

    Returns (graph, prunable families, {reason: blocked components}, roots of components to remove).
    """
    report = report if report is not None else Report("plan")
    g = trace(model, example_inputs, cfg.exclude)
    fams, blocked = g.families()
    if cfg.importance == "taylor" and fams and (cfg.amount > 0 or cfg.layer_amounts):
        batches = batches_list(calibration)[:4] or [example_inputs]
        with evaluating(model):
            _taylor_grads(model, batches, cfg.loss_fn)
    try:
        removed = _choose(g, fams, model, cfg, report) if cfg.amount > 0 or cfg.layer_amounts else set()
    finally:
        if cfg.importance == "taylor":
            for p in model.parameters():
                p.grad = None
    return g, fams, blocked, removed


def _assemble(work: nn.Module, keep: dict) -> tuple[nn.Module, dict, dict]:
    """Swap into ``work`` the smaller copies of every layer that loses channels/heads (``keep``: what each
    keeps, from ``keep_indices``); returns (the model, {name: new layer}, {name: the layer it replaced})."""
    aliases = _aliases(work)
    new_modules = {mod: rebuild_module(work.get_submodule(mod), k) for mod, k in sorted(keep.items())}
    old_by_name = {mod: work.get_submodule(mod) for mod in new_modules}
    for mod, new in new_modules.items():
        for alias in aliases[id(old_by_name[mod])]:
            if alias:
                set_submodule(work, alias, new)
    return (new_modules[""] if "" in new_modules else work), new_modules, old_by_name


def _failure(work: nn.Module, example_inputs: Any, ref_shapes: list[tuple]) -> str | None:
    """Why the pruned model does not do what the original did on the example inputs, or None."""
    try:  # rebuilt layers carry the flag of the layer they replace, so evaluating() restores them too
        with torch.no_grad(), evaluating(work):
            out = call_model(work, example_inputs)
    except Exception as e:
        return f"fails on the example inputs ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
    if _shapes(out) != ref_shapes:
        return f"changes the output shapes {ref_shapes} -> {_shapes(out)}"
    return None


def _culprits(groups: list, breaks: Callable[[list], bool], known: bool = False) -> list:
    """The groups whose removal breaks the model, by halving (a few dozen trial builds for a hundred groups);
    groups that break it only together are all returned."""
    if not groups or not (known or breaks(groups)):
        return []
    if len(groups) == 1:
        return list(groups)
    half = len(groups) // 2
    found = _culprits(groups[:half], breaks) + _culprits(groups[half:], breaks)
    return found or list(groups)


@legacy_positional(("example_inputs", "config"))
def prune(model: nn.Module, config: ChannelPruning | None = None, *, example_inputs: Any = None,
          calibration: Any = None, inplace: bool = False) -> tuple[nn.Module, Report]:
    """Structured pruning on the model's dependency graph. Returns (pruned model, report).

    example_inputs: one batch (tensor / tuple / dict) the graph is traced from (else the first
        calibration batch). calibration: unlabeled batches for ``importance="taylor"`` and for re-estimating
        BatchNorm statistics after pruning (``ChannelPruning.recalibrate_bn``; the report's summary says how it went).
    inplace: ``False`` (default) prunes a copy and leaves ``model`` exactly as it was (weights, module
        types, every submodule's train/eval flag). ``True`` swaps the rebuilt layers into ``model`` and
        returns it; the untouched layers keep their parameter objects. When the root module itself is
        rebuilt (a bare Linear) the result is a new module even so. A raise changes nothing either way.

    The former order ``prune(model, example_inputs, config)`` still works, with a FutureWarning.
    """
    t0 = time.perf_counter()
    check_module(model)
    cfg = config if config is not None else ChannelPruning()
    if not isinstance(cfg, ChannelPruning):
        raise TypeError(f"prune() takes a ChannelPruning config, got {type(cfg).__name__}")
    calib = batches_list(calibration)   # once: a generator of batches is read a single time
    if example_inputs is None and calib:
        example_inputs = calib[0]
    if example_inputs is None:
        raise ValueError("prune() needs example_inputs: the dependency graph is traced from one forward pass")
    exclusion = Exclusion.resolve(model, cfg)
    require_names(model, [n for n, _ in cfg.layer_amounts], "ChannelPruning.layer_amounts")
    if cfg.recalibrate_bn is True and calibration is None:
        raise ConfigError("ChannelPruning(recalibrate_bn=True) re-estimates BatchNorm statistics on calibration "
                          "batches: pass calibration=[batch, ...]")
    if cfg.reconstruct is True and len(calib) < 2:
        raise ConfigError("ChannelPruning(reconstruct=True) refits layers on calibration batches and checks the "
                          "refit on the last one: pass calibration=[batch, batch, ...] (two or more)")

    # in place, a structural twin sharing every tensor is enough to build and check the pruned model on: the
    # rebuilt layers are new modules and the swap into ``model`` comes last (taylor scores write grads: a copy)
    work_is_twin = inplace and cfg.importance != "taylor"
    work = shared_twin(model) if work_is_twin else copy.deepcopy(model)
    report = Report(f"prune: {type(model).__name__}", columns=["layer", "type", "before", "after", "applied", "reason"])
    g, fams, blocked, removed = plan(work, example_inputs, cfg, calibration=calib, report=report)

    ref_shapes = _shapes(g.output)
    keep = keep_indices(g, removed)
    work, new_modules, old_by_name = _assemble(work, keep)
    failure = _failure(work, example_inputs, ref_shapes) if new_modules else None
    if failure is not None:
        # the model's own code fixes a size the trace could not see (a reshape to a stored width): find the
        # groups whose removal breaks it, keep them whole, prune the rest
        groups = [(f, {c.root for c in f.components} & removed) for f in fams]
        groups = [(f, roots) for f, roots in groups if roots]

        def breaks(subset: list) -> bool:
            trial, mods, _ = _assemble(shared_twin(model), keep_indices(g, set().union(*(r for _, r in subset))))
            return bool(mods) and _failure(trial, example_inputs, ref_shapes) is not None
        culprits = _culprits(groups, breaks, known=True)
        if len(culprits) < len(groups):
            for f, roots in culprits:
                removed -= roots
                blocked.setdefault("the model's code fixes this width: removing channels breaks its forward",
                                   []).extend(f.components)
            report.note(f"with every group pruned, the model {failure}: {len(culprits)} of {len(groups)} groups "
                        f"are kept whole (rows 'kept: the model's code fixes this width')")
            keep = keep_indices(g, removed)
            work, new_modules, old_by_name = _assemble(shared_twin(model) if work_is_twin else copy.deepcopy(model),
                                                       keep)
            failure = _failure(work, example_inputs, ref_shapes) if new_modules else None
    if failure is not None:
        raise PruneError(f"the pruned model {failure}; the original model is unchanged. Please report this model.")
    root_replaced = "" in new_modules
    for mod, new in new_modules.items():
        old = old_by_name[mod]
        report.add_row(layer=mod, type=type(old).__name__, before=describe(old), after=describe(new), applied=True,
                       reason="channels removed" if "head" not in keep[mod] else "heads removed")

    if new_modules and cfg.reconstruct is not False and calibration is not None:
        rc = reconstruct_layers(work, model, keep, calib, skip=exclusion,
                                force=cfg.reconstruct is True)
        if "failed" in rc:
            report.summary["layers refit"] = f"no (the refit failed, the layers keep their sliced weights: {rc['failed']})"
        elif rc["error before"] is not None:
            how = (f"{len(rc['layers'])} layers by least squares; output error vs the original on the held-out "
                   f"batch {rc['error before']:.4g} -> {rc['error after']:.4g}")
            report.summary["layers refit"] = ("yes, " if rc["kept"] else "no (not closer), ") + how
            for row in report.rows:
                if row.get("layer") in rc["layers"]:
                    e0, e1 = rc["layers"][row["layer"]]
                    row["reason"] += f"; refit: layer error {e0:.3g} -> {e1:.3g}"

    restated: dict[str, nn.Module] = {}
    if new_modules and cfg.recalibrate_bn is not False and calibration is not None:
        bn = recalibrate_batchnorm(work, model, calib, skip=exclusion,
                                   force=cfg.recalibrate_bn is True)
        if bn["layers"]:
            how = (f"{len(bn['layers'])} layers on {bn['batches']} calibration batch(es); output error vs the original "
                   f"{bn['error before']:.4g} -> {bn['error after']:.4g}")
            report.summary["BatchNorm re-estimated"] = ("yes, " if bn["kept"] else "no (not closer), ") + how
            if bn["kept"]:
                restated = {n: work.get_submodule(n) for n in bn["layers"] if n not in new_modules}

    for reason, comps in sorted(blocked.items(), key=lambda kv: -len(kv[1])):
        prods = sorted({m for c in comps for m, r in c.producers})
        shown = ", ".join(prods[:3]) + (f" (+{len(prods) - 3} more)" if len(prods) > 3 else "")
        report.add_row(layer=shown, type="group", before=f"{len(comps)} channels", after=f"{len(comps)} channels",
                       applied=False, reason=f"kept: {reason}")

    try:  # in eval mode: counting must not update the user's BatchNorm statistics
        with evaluating(model, work):
            flops_before = count_flops(model, example_inputs)
            flops_after = count_flops(work, example_inputs) if new_modules else flops_before
    except Exception:  # pragma: no cover - exotic ops FlopCounterMode cannot see
        flops_before = flops_after = None
    p_before = sum(p.numel() for p in model.parameters())
    p_after = sum(p.numel() for p in work.parameters())

    result = work
    if inplace and new_modules and not root_replaced:
        user_aliases = _aliases(model)
        user_by_name = dict(model.named_modules(remove_duplicate=False))
        swap_modules(model, {alias: new for mod, new in {**new_modules, **restated}.items()
                             for alias in user_aliases[id(user_by_name[mod])] if alias})
        result = model
    elif inplace and not new_modules:
        result = model
    n_removed = len(removed)
    report.summary.update({
        "amount": cfg.amount, "importance": cfg.importance, "scope": cfg.scope,
        "groups": len(fams), "channels/heads removed": n_removed,
        "channels/heads prunable": sum(len(f.components) for f in fams),
        "unprunable groups (see rows)": len(blocked),
        "params before": p_before, "params after": p_after,
        "params: x fewer": p_before / p_after if p_after else None,
        "FLOPs before": flops_before, "FLOPs after": flops_after,
        "FLOPs: x fewer": flops_before / flops_after if flops_before and flops_after else None,
        "layers rebuilt": len(new_modules), "time (s)": time.perf_counter() - t0,
    })
    return result, report


__all__ = ["prune", "plan", "PruneError", "TraceError"]
