"""Int8 islands in a converted FX graph, and the qconfig keys that keep one float when the model is rebuilt.

An island is a connected group of nodes that compute on quantized tensors, entered through
``quantize_per_tensor`` and left through ``dequantize``. Keeping one float is not only a matter of its
layers' module names: the functional ops inside it (``x + y``, ``torch.sigmoid``) and tensor methods
(``x.mean()``) would otherwise quantize their now-float inputs again and form a smaller island of their
own. ``convert_fx`` renames the functional ops it lowers and drops the scope prepare saw, so what prepare
decided (each call's scope and its index among the same target's calls there: the keys a QConfigMapping
addresses) is recorded before convert and matched back to the converted nodes here.
"""
from __future__ import annotations

import operator
import re
from dataclasses import dataclass, field
from typing import Any, Collection

import torch
from torch import fx, nn

__all__ = ["Prepared", "record_prepared", "FloatPlan", "GraphIslands", "find_graphs", "run_graph",
           "segments_of", "is_entry", "is_exit", "is_free", "float_name", "Planner"]

_CALLS = ("call_function", "call_method", "call_module")
# torchfast's own int8 pad helpers (int8_pad.fold_int8_pads): they vanish when the conv they serve is float
_HELPERS = ("pad_int8", "crop_conv_output")


def is_entry(n: fx.Node) -> bool:
    return n.op == "call_function" and n.target in (torch.quantize_per_tensor, torch.quantize_per_channel)


def is_exit(n: fx.Node) -> bool:
    return (n.op == "call_method" and n.target == "dequantize") or \
        (n.op == "call_function" and n.target is torch.dequantize)


def is_helper(n: fx.Node) -> bool:
    return n.op == "call_function" and getattr(n.target, "__name__", "") in _HELPERS and \
        getattr(n.target, "__module__", "").startswith("torchfast.")


@dataclass(frozen=True)
class Prepared:
    """What prepare_fx decided about one graph, kept before convert_fx rewrites it.

    ``calls``: node name -> (op, target, module scope, index among that target's calls in that scope; -1
    for methods and modules). ``neighbours``: node name -> the calls it reads from or feeds, past observers.
    """
    calls: dict[str, tuple[str, Any, str, int]]
    neighbours: dict[str, tuple[str, ...]]


def record_prepared(prepared: fx.GraphModule) -> Prepared:
    """The ``Prepared`` record of a graph module straight out of ``prepare_fx``."""
    from torch.ao.quantization.fake_quantize import FakeQuantizeBase
    from torch.ao.quantization.observer import ObserverBase

    attrs = prepared.meta.get("_observed_graph_module_attrs")
    scopes = getattr(attrs, "node_name_to_scope", None) or {}

    def observer(n: fx.Node) -> bool:  # by attribute: a shared observer is one module under two names
        return n.op == "call_module" and isinstance(prepared.get_submodule(n.target), (ObserverBase, FakeQuantizeBase))

    def past(nodes, up: bool) -> list[str]:
        out, todo = [], list(nodes)
        while todo:
            n = todo.pop()
            if observer(n):
                todo.extend(n.all_input_nodes if up else n.users)
            elif n.op in _CALLS:
                out.append(n.name)
        return out
    calls: dict[str, tuple[str, Any, str, int]] = {}
    neighbours: dict[str, tuple[str, ...]] = {}
    count: dict[tuple[str, Any], int] = {}
    for n in prepared.graph.nodes:
        if n.op not in _CALLS or observer(n):
            continue
        scope = scopes.get(n.name, ("", None))[0]
        idx = -1
        if n.op == "call_function" and n.name in scopes:  # prepare counts the traced calls only
            idx = count.get((scope, n.target), 0)
            count[(scope, n.target)] = idx + 1
        calls[n.name] = (n.op, n.target, scope, idx)
        neighbours[n.name] = tuple(past(n.all_input_nodes, True) + past(n.users, False))
    return Prepared(calls, neighbours)


@dataclass(frozen=True)
class FloatPlan:
    """What a rebuild keeps float: module names (full, in the float model), functional calls as
    (module scope, target, index) and tensor methods by name (everywhere: a method has no finer key)."""
    modules: tuple[str, ...] = ()
    calls: tuple[tuple[str, Any, int], ...] = ()
    methods: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.modules or self.calls or self.methods)

    def __add__(self, other: "FloatPlan") -> "FloatPlan":
        def union(a, b):
            return tuple(dict.fromkeys(a + b))
        return FloatPlan(union(self.modules, other.modules), union(self.calls, other.calls),
                         union(self.methods, other.methods))


def find_graphs(q: nn.Module) -> list[tuple[str, fx.GraphModule]]:
    """The outermost FX graph modules of an int8 model (the model itself, or its separately quantized parts)."""
    if isinstance(q, fx.GraphModule):
        return [("", q)]
    out: list[tuple[str, fx.GraphModule]] = []
    for name, m in q.named_modules():
        if isinstance(m, fx.GraphModule) and not any(name.startswith(p + ".") for p, _ in out):
            out.append((name, m))
    return out


def _has_quantized(v: Any) -> bool:
    if isinstance(v, torch.Tensor):
        return v.is_quantized
    if isinstance(v, (tuple, list)):
        return any(_has_quantized(x) for x in v)
    return False


class _Run(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, keep: set[fx.Node]) -> None:
        super().__init__(gm)
        self.keep, self.quantized, self.inputs = keep, set(), {}

    def run_node(self, n: fx.Node) -> Any:
        if n in self.keep:
            self.inputs[n] = self.fetch_args_kwargs_from_env(n)
        out = super().run_node(n)
        if n.op in _CALLS and _has_quantized(out):
            self.quantized.add(n)
        return out


def run_graph(gm: fx.GraphModule, args: tuple, keep: set[fx.Node] = frozenset()
              ) -> tuple[set[fx.Node], dict[fx.Node, tuple[tuple, dict]]]:
    """Run ``gm`` on ``args``: the nodes whose outputs are quantized, and the inputs of the ``keep`` nodes."""
    r = _Run(gm, set(keep))
    with torch.inference_mode():
        r.run(*args)
    return r.quantized, r.inputs


def segments_of(gm: fx.GraphModule, quantized: set[fx.Node]) -> list[tuple[list[fx.Node], set[fx.Node]]]:
    """Connected groups of quantized nodes, each with its boundary: the quantize nodes feeding it and the
    dequantize nodes leaving it. A dequantize that feeds a quantize directly (no float op between) puts
    that quantize on both sides, so the two groups merge into one island."""
    inner = [n for n in gm.graph.nodes if n in quantized and not is_entry(n)]
    parent = {n: n for n in inner}

    def find(n):
        while parent[n] is not n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n
    for n in inner:
        for a in n.all_input_nodes:
            if a in parent:
                parent[find(a)] = find(n)
    groups: dict[fx.Node, tuple[list[fx.Node], set[fx.Node]]] = {}
    for n in inner:
        groups.setdefault(find(n), ([], set()))[0].append(n)
    for n in gm.graph.nodes:
        if is_entry(n):
            for u in n.users:
                if u in parent:
                    groups[find(u)][1].add(n)
        elif is_exit(n) and n.args and n.args[0] in parent:
            side = groups[find(n.args[0])][1]
            side.add(n)
            side.update(u for u in n.users if is_entry(u))
    return list(groups.values())


def _family(target: Any) -> str:
    name = getattr(target, "_qualified_op_name", None) or getattr(target, "__name__", None) or str(target)
    name = re.split(r"::|\.", name)[-1].lower()
    if name in ("iadd", "imul"):
        name = name[1:]
    while True:
        base = re.sub(r"_(relu|scalar|out)$", "", name)
        if base == name:
            return name
        name = base


@dataclass
class GraphIslands:
    """One converted graph: its prefix in the float model, what prepare decided, its quantized nodes."""
    prefix: str
    gm: fx.GraphModule
    prepared: Prepared
    quantized: set[fx.Node]
    matched: dict[str, str] = field(default_factory=dict)  # lowered converted node -> prepared node

    def __post_init__(self) -> None:
        present = {n.name for n in self.gm.graph.nodes}
        missing, lowered = {}, {}
        for name, (op, target, _, _) in self.prepared.calls.items():
            if op == "call_function" and name not in present:
                missing.setdefault(_family(target), []).append(name)
        for n in self.gm.graph.nodes:
            if n.op == "call_function" and n.name not in self.prepared.calls and not (
                    is_entry(n) or is_exit(n) or is_helper(n)):
                lowered.setdefault(_family(n.target), []).append(n.name)
        for fam, names in lowered.items():  # convert keeps the order of the calls it lowers
            if len(missing.get(fam, ())) == len(names):
                self.matched.update(zip(names, missing[fam]))
        self.present = present

    def full(self, path: str) -> str:
        return f"{self.prefix}.{path}" if self.prefix and path else (path or self.prefix)

    def source(self, n: fx.Node) -> str | None:
        """The prepared node a converted node came from."""
        return n.name if n.name in self.prepared.calls else self.matched.get(n.name)

    def fused_away(self) -> set[str]:
        """Prepared calls that no converted node carries (fused into an int8 op, or folded pads)."""
        return {p for p in self.prepared.calls if p not in self.present} - set(self.matched.values())

    def scope(self, p: str) -> str:
        op, target, scope, _ = self.prepared.calls[p]
        return target if op == "call_module" else scope


def float_name(g: GraphIslands, target: str, names: Collection[str]) -> str:
    """A converted module's name in the float model (a layer quantized on its own sits at ``<name>.0``)."""
    full = g.full(target)
    if full not in names and full.endswith(".0") and full[:-2] in names:
        return full[:-2]
    return full


class Planner:
    """The FloatPlan of each island to drop, or why it cannot be kept float on its own."""

    def __init__(self, graphs: list[GraphIslands], float_names: set[str]) -> None:
        self.graphs, self.names = graphs, float_names
        # every prepared call that runs int8: converted quantized nodes and the calls fused into them
        self.int8: dict[int, set[str]] = {}
        self.unmapped: dict[int, bool] = {}
        for i, g in enumerate(graphs):
            srcs = {g.source(n) for n in g.quantized if not (is_entry(n) or is_helper(n))}
            self.unmapped[i] = None in srcs
            self.int8[i] = (srcs - {None}) | g.fused_away()

    def _prepared_of(self, i: int, nodes: list[fx.Node]) -> set[str] | str:
        g = self.graphs[i]
        todo = []
        for n in nodes:
            if is_helper(n):
                continue
            p = g.source(n)
            if p is None:
                return f"its int8 op {_family(n.target)!r} has no traced call to match"
            todo.append(p)
        out: set[str] = set()
        away = g.fused_away()
        while todo:
            p = todo.pop()
            if p not in out:
                out.add(p)
                todo.extend(nb for nb in g.prepared.neighbours.get(p, ()) if nb in away)
        return out

    def plans(self, islands: list[list[tuple[int, fx.Node]]]) -> list[FloatPlan | str]:
        """Plans for dropping all of ``islands`` together; an island that cannot be floated gets a reason, and
        the others are planned again without it (a method or scope rule may depend on which go float)."""
        live = list(range(len(islands)))
        result: list[FloatPlan | str] = [FloatPlan()] * len(islands)
        prepared: dict[int, dict[int, set[str]] | str] = {}
        for k, isl in enumerate(islands):
            per: dict[int, set[str]] = {}
            for i, n in isl:
                per.setdefault(i, []).append(n)
            got = {i: self._prepared_of(i, ns) for i, ns in per.items()}
            bad = next((v for v in got.values() if isinstance(v, str)), None)
            prepared[k] = bad if bad is not None else got
            if bad is not None:
                result[k] = bad
                live.remove(k)
        while True:
            floated: dict[int, set[str]] = {}
            for k in live:
                for i, ps in prepared[k].items():
                    floated.setdefault(i, set()).update(ps)
            failed = []
            for k in live:
                plan = self._plan(prepared[k], floated)
                result[k] = plan
                if isinstance(plan, str):
                    failed.append(k)
            if not failed:
                return result
            live = [k for k in live if k not in failed]

    def _plan(self, prepared: dict[int, set[str]], floated: dict[int, set[str]]) -> FloatPlan | str:
        mods, calls, methods = [], [], []
        for i, ps in prepared.items():
            g = self.graphs[i]
            for p in sorted(ps):
                op, target, scope, idx = g.prepared.calls[p]
                if op == "call_module":
                    mods.append(float_name(g, target, self.names))
                elif op == "call_function":
                    if idx < 0:
                        return f"its call {p!r} has no scope a qconfig can address"
                    calls.append((g.full(scope), target, idx))
                elif self._method_everywhere(target, floated):
                    methods.append(target)
                elif self._scope_floats(i, scope, floated):
                    mods.append(float_name(g, scope, self.names))
                else:
                    return (f"its tensor method .{target}() runs int8 in {g.full(scope) or 'the model'} "
                            f"next to int8 layers that stay, and cannot be kept float on its own")
        return FloatPlan(tuple(dict.fromkeys(mods)), tuple(dict.fromkeys(calls)), tuple(dict.fromkeys(methods)))

    def _method_everywhere(self, method: str, floated: dict[int, set[str]]) -> bool:
        for i, g in enumerate(self.graphs):
            for p in self.int8[i]:
                op, target, _, _ = g.prepared.calls[p]
                if op == "call_method" and target == method and p not in floated.get(i, set()):
                    return False
        return True

    def _scope_floats(self, i: int, scope: str, floated: dict[int, set[str]]) -> bool:
        if not scope or self.unmapped[i]:
            return False
        g = self.graphs[i]
        return all(p in floated.get(i, set()) for p in self.int8[i]
                   if g.scope(p) == scope or g.scope(p).startswith(scope + "."))


def is_free(n: fx.Node) -> bool:
    """Nodes that move no data worth timing (indexing, sizes) or torchfast's pad helpers."""
    if is_helper(n):
        return True
    if n.op == "call_function":
        return n.target in (operator.getitem, getattr)
    return n.op == "call_method" and n.target in ("size", "dim")
