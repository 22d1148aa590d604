"""Keep int8 only where it repays its quantize/dequantize.

Ops with no int8 kernel in the x86 backend (SiLU, GELU, Softmax, custom functions) stay float, and FX puts a
``dequantize`` before and a ``quantize_per_tensor`` after each of them. A group of int8 layers between such
ops (an island) pays those copies on every call. For each island this measures, on real inputs of the
calibration shape, what int8 saves over float on its layers and what the quantize/dequantize ops on its
boundary tensors cost (interleaved medians, timing from :mod:`torchfast.measure`). Islands that do not repay
their boundary go float together in one rebuild, which is kept only if it measures no slower than the first
build. A model with at most one island (the usual all-int8 CNN) is not analysed: the whole-model speed guard
already decides that case.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import fx, nn

from ..measure import compare_latency, compare_many, resolve_timing
from ..modules import Batch, call_model, split_batch
from ..quantized import quantized_module_kind
from ..report import Report
from .islands_graph import (FloatPlan, GraphIslands, Planner, Prepared, find_graphs, float_name, is_entry,
                            is_free, run_graph, segments_of)

__all__ = ["Segment", "Verdict", "merge", "decide", "keep_paying_islands", "SKIPPED"]

SKIPPED = "skipped: a single int8 island (no float region between int8 layers)"


# ---------------------------------------------------------------- the decision, on numbers
@dataclass(frozen=True)
class Segment:
    """Connected int8 nodes (ids) and the ids of the quantize/dequantize ops on their boundary."""
    nodes: tuple[str, ...]
    boundary: frozenset[str]
    layers: tuple[str, ...] = ()   # the float model's layers among the nodes, for the report


def merge(segments: Sequence[Segment]) -> list[Segment]:
    """Islands: segments that share a boundary op (one quantize feeding both, or a dequantize straight into a
    quantize) stand or fall together, since dropping one alone would not remove that op."""
    parent = list(range(len(segments)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i
    owner: dict[str, int] = {}
    for i, s in enumerate(segments):
        for b in s.boundary:
            if b in owner:
                parent[find(i)] = find(owner[b])
            else:
                owner[b] = i
    groups: dict[int, list[Segment]] = {}
    for i, s in enumerate(segments):
        groups.setdefault(find(i), []).append(s)
    return [Segment(tuple(n for s in g for n in s.nodes), frozenset().union(*(s.boundary for s in g)),
                    tuple(dict.fromkeys(x for s in g for x in s.layers))) for g in groups.values()]


@dataclass(frozen=True)
class Verdict:
    island: Segment
    saved_ms: float   # sum over its nodes of fp32 ms - int8 ms (inf: a node could not be timed against float)
    cost_ms: float    # its boundary quantize/dequantize ops

    @property
    def keep(self) -> bool:
        return self.saved_ms >= self.cost_ms

    @property
    def reason(self) -> str:
        gain = (f"saves {self.saved_ms:.4f} ms" if self.saved_ms >= 0
                else f"runs {-self.saved_ms:.4f} ms slower than float")
        return f"int8 island {gain} but its quantize/dequantize costs {self.cost_ms:.4f} ms"


def decide(segments: Sequence[Segment], saved_ms: Mapping[str, float], cost_ms: Mapping[str, float]
           ) -> list[Verdict]:
    """One verdict per island (segments merged first): kept when what its nodes save (``saved_ms`` by node;
    absent: nothing) repays its boundary ops (``cost_ms`` by op, each counted once)."""
    return [Verdict(isl, sum(saved_ms.get(n, 0.0) for n in isl.nodes), sum(cost_ms.get(b, 0.0) for b in isl.boundary))
            for isl in merge(segments)]


# ---------------------------------------------------------------- measuring the islands of a model
def _deq(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.dequantize() if v.is_quantized else v
    if isinstance(v, (tuple, list)):
        return type(v)(_deq(x) for x in v)
    if isinstance(v, dict):
        return {k: _deq(x) for k, x in v.items()}
    return v


def _float_op(target: Any) -> Callable | None:
    name = getattr(target, "_qualified_op_name", "")
    if not name.startswith("quantized::"):
        return target
    op = name.split("::")[1]
    relu = op.endswith("_relu")
    base = {"add": torch.add, "add_scalar": torch.add, "mul": torch.mul, "mul_scalar": torch.mul,
            "matmul": torch.matmul}.get(op.removesuffix("_relu"))
    if op == "cat":
        return lambda xs, dim, *_: torch.cat(xs, dim)
    if base is None:
        return None
    return (lambda a, b, *_: torch.relu(base(a, b))) if relu else (lambda a, b, *_: base(a, b))


def _pair(g: GraphIslands, n: fx.Node, args: tuple, kwargs: dict, float_mods: dict[str, nn.Module]
          ) -> tuple[Callable, Callable] | None:
    """(fp32 call, int8 call) of one int8 node on its captured input; None when it has no float twin."""
    dargs, dkw = _deq(args), _deq(kwargs)
    if n.op == "call_module":
        mod = g.gm.get_submodule(n.target)
        fm: nn.Module | None = mod
        if quantized_module_kind(mod) == "ao":
            fm = float_mods.get(float_name(g, n.target, float_mods.keys()))
            if fm is None or quantized_module_kind(fm) is not None:
                return None
            if "ReLU" in type(mod).__name__:  # a fused conv/linear/bn + relu
                fm = nn.Sequential(fm, nn.ReLU())
        return (lambda: fm(*dargs, **dkw)), (lambda: mod(*args, **kwargs))
    if n.op == "call_method":
        return (lambda: getattr(dargs[0], n.target)(*dargs[1:], **dkw)), \
            (lambda: getattr(args[0], n.target)(*args[1:], **kwargs))
    f = _float_op(n.target)
    if f is None:
        return None
    return (lambda: f(*dargs, **dkw)), (lambda: n.target(*args, **kwargs))


def _boundary_call(n: fx.Node, args: tuple, kwargs: dict) -> Callable:
    if is_entry(n):
        return lambda: n.target(*args, **kwargs)
    return lambda: args[0].dequantize()


def _graph_inputs(q: nn.Module, graphs: list[tuple[str, fx.GraphModule]], batch: Batch) -> dict[str, tuple]:
    if graphs == [("", q)]:
        return {"": split_batch(batch)[0]}
    seen: dict[str, tuple] = {}
    hooks = []
    for prefix, gm in graphs:
        def hook(m, a, _p=prefix):
            seen.setdefault(_p, tuple(x.detach() if isinstance(x, torch.Tensor) else x for x in a))
        hooks.append(gm.register_forward_pre_hook(hook))
    try:
        with torch.inference_mode():
            call_model(q, batch)
    finally:
        for h in hooks:
            h.remove()
    return seen


@dataclass
class Analysis:
    graphs: list[GraphIslands]
    islands: list[Segment]
    members: list[list[tuple[int, fx.Node]]]    # each island's converted nodes, by graph index
    verdicts: list[Verdict]


def analyse(float_model: nn.Module, q: nn.Module, batch: Batch, records: Mapping[str, Prepared],
            progress: bool = False) -> Analysis | None:
    """Find the int8 islands of ``q`` and time them on ``batch``; None when there are fewer than two."""
    from tqdm.auto import tqdm

    float_mods = dict(float_model.named_modules())
    names = set(float_mods)
    found = [(p, gm) for p, gm in find_graphs(q) if p in records]
    inputs = _graph_inputs(q, found, batch)
    graphs: list[GraphIslands] = []
    segs: list[Segment] = []
    nodes_of: dict[str, tuple[int, fx.Node]] = {}
    for p, gm in found:
        if p not in inputs:
            continue
        quantized, _ = run_graph(gm, inputs[p])
        g = GraphIslands(p, gm, records[p], quantized)
        i = len(graphs)
        graphs.append(g)
        for inner, boundary in segments_of(gm, quantized):
            ids = tuple(f"{p}:{n.name}" for n in inner)
            nodes_of.update({f"{p}:{n.name}": (i, n) for n in [*inner, *boundary]})
            layers = tuple(float_name(g, n.target, names) for n in inner if n.op == "call_module")
            segs.append(Segment(ids, frozenset(f"{p}:{b.name}" for b in boundary), layers))
    islands = merge(segs)
    if len(islands) < 2:
        return None
    keep: dict[int, set[fx.Node]] = {}
    for isl in islands:
        for nid in (*isl.nodes, *isl.boundary):
            i, n = nodes_of[nid]
            keep.setdefault(i, set()).add(n)
    captured: dict[str, tuple[tuple, dict]] = {}
    for i, g in enumerate(graphs):
        if i in keep:
            _, got = run_graph(g.gm, inputs[g.prefix], keep[i])
            captured.update({f"{g.prefix}:{n.name}": v for n, v in got.items()})
    timing = resolve_timing(share=0.5)
    saved: dict[str, float] = {}
    cost: dict[str, float] = {}
    for isl in tqdm(islands, desc="timing int8 islands", unit="island", disable=not progress, leave=False):
        calls: dict[str, Callable] = {}
        for nid in isl.nodes:
            i, n = nodes_of[nid]
            if is_free(n) or nid not in captured:
                continue
            pair = _pair(graphs[i], n, *captured[nid], float_mods)
            if pair is None:
                saved[nid] = math.inf   # an int8 op with nothing float to time it against: not judged
                continue
            calls[f"fp32 {nid}"], calls[f"int8 {nid}"] = pair
        for bid in isl.boundary:
            if bid in captured:
                calls[f"q/dq {bid}"] = _boundary_call(nodes_of[bid][1], *captured[bid])
        med = {k: v.median_ms for k, v in compare_many(calls, (), timing=timing).items()} if calls else {}
        for k, v in med.items():
            kind, nid = k.split(" ", 1)
            if kind == "fp32":
                saved[nid] = v - med[f"int8 {nid}"]
            elif kind == "q/dq":
                cost[nid] = v
    verdicts = decide(islands, saved, cost)
    members = [[nodes_of[nid] for nid in v.island.nodes] for v in verdicts]
    return Analysis(graphs, [v.island for v in verdicts], members, verdicts)


# ---------------------------------------------------------------- the rule, wired into the FX flow
def _describe(island: Segment) -> str:
    """Its layers, or (an island of functional ops only) its ops' node names."""
    return ", ".join(island.layers) or "ops " + ", ".join(n.split(":", 1)[1] for n in island.nodes)


def keep_paying_islands(float_model: nn.Module, q: nn.Module, rep: Report, batches: list[Batch],
                        records: Mapping[str, Prepared], rebuild: Callable[[FloatPlan], tuple[nn.Module, Report]],
                        progress: bool = False) -> tuple[nn.Module, Report]:
    """``q`` with the islands that do not repay their quantize/dequantize kept float (one rebuild with all
    of them, by ``rebuild(plan)``), or ``q`` itself when none, or when the rebuild measures slower."""
    a = analyse(float_model, q, batches[0], records, progress)
    if a is None:
        rep.summary["int8 island analysis"] = SKIPPED
        return q, rep
    rep.summary["int8 islands"] = len(a.islands)
    rep.summary["int8 islands dropped"] = 0
    drop = [k for k, v in enumerate(a.verdicts) if not v.keep]
    if not drop:
        rep.summary["int8 island analysis"] = "every island repays its quantize/dequantize"
        return q, rep
    planner = Planner(a.graphs, {n for n, _ in float_model.named_modules()})
    plans = planner.plans([a.members[k] for k in drop])
    plan, dropped, notes = FloatPlan(), [], []
    for k, p in zip(drop, plans):
        v = a.verdicts[k]
        what = _describe(v.island)
        if isinstance(p, str):
            notes.append(f"int8 island ({what}): {v.reason}; it stays int8: {p}")
        else:
            plan, dropped = plan + p, dropped + [(v, p)]
    if not dropped:
        for n in notes:
            rep.note(n)
        rep.summary["int8 island analysis"] = "islands that do not repay their quantize/dequantize cannot be kept float"
        return q, rep
    try:
        q2, rep2 = rebuild(plan)
    except Exception as e:  # noqa: BLE001 - the first build stands; say why
        rep.note(f"keeping {len(dropped)} int8 islands float failed to build ({type(e).__name__}: "
                 f"{str(e).splitlines()[0][:160]}); the first build is kept")
        return q, rep
    cmp = compare_latency(q, q2, batches[0], timing=resolve_timing(share=0.5, warmup=3))
    # "no slower": within the first build's run-to-run spread (its p90), since the change may be microseconds
    if cmp.candidate.median_ms > cmp.baseline.p90_ms:
        rep.note(f"with {len(dropped)} int8 islands kept float the model measured {cmp.candidate.median_ms:.3f} ms "
                 f"vs {cmp.baseline.median_ms:.3f} ms (interleaved medians): the first build is kept")
        rep.summary["int8 island analysis"] = "rebuild without the costly islands measured slower; not used"
        return q, rep
    was_int8 = {r.get("layer") for r in rep.where(applied=True)}
    for r in rep2.rows:
        layer = str(r.get("layer"))
        hit = next((v for v, p in dropped if any(layer == m or layer.startswith(m + ".") for m in p.modules)), None)
        if hit is not None and not r.get("applied") and layer in was_int8:
            r.update(applied=False, scheme="fp32", reason=hit.reason)
    for v, p in dropped:
        rep2.note(f"int8 island ({_describe(v.island)}) kept float: {v.reason}")
    for n in [*rep.notes, *notes]:
        if n not in rep2.notes:
            rep2.note(n)
    rep2.children.extend(c for c in rep.children if c not in rep2.children)
    for k, val in rep.summary.items():
        rep2.summary.setdefault(k, val)
    rep2.summary.update({"int8 islands": len(a.islands), "int8 islands dropped": len(dropped),
                         "layers quantized": len(rep2.where(applied=True)),
                         "layers kept in float": len(rep2.where(applied=False)),
                         "int8 island analysis": f"{len(dropped)} of {len(a.islands)} islands kept float "
                                                 f"({cmp.baseline.median_ms:.3f} -> {cmp.candidate.median_ms:.3f} ms)"})
    return q2, rep2
