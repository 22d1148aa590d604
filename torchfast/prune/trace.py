"""One eager forward under a TorchFunctionMode + hooks on sliceable layers -> a DependencyGraph.

See graph.py for why this tracer (and not fx / export / autograd). Rules here map each op to what it
does to the channel dimension; anything not covered raises ``_Unsupported`` and poisons the channels it
touched, with the op's name as the reason.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..modules import call_model, evaluating
from .graph import (_CREATE, _ELEMENTWISE, _REDUCE, _RESHAPE, _SPATIAL, DependencyGraph, Layout, TraceError,
                    _dims_arg, _norm_dim, _op_label, _op_name, _tensors, reshape_map)
from .layers import is_hf_attention, rule_for, trace_layer


class _Unsupported(Exception):
    pass


def attention_kind(m: nn.Module) -> str | None:
    """'mha' for nn.MultiheadAttention, 'hf' for Hugging Face style query/key/value self-attention."""
    if isinstance(m, nn.MultiheadAttention):
        return "mha"
    return "hf" if is_hf_attention(m) else None


def is_atomic(m: nn.Module) -> bool:
    """A layer the pruner knows (layers.py): traced as a whole, not op by op."""
    return rule_for(m) is not None


# ------------------------------------------------------------------------------------------ op rules
def _elementwise(g: DependencyGraph, label: str, operands: list[torch.Tensor], out: torch.Tensor) -> Layout:
    nd = out.dim()
    target, first = None, None
    for t in operands:
        lay = g.layout(t)
        if lay is None:
            continue
        od = lay.dim + (nd - t.dim())
        if target is None:
            target, first = od, lay
        elif od != target:
            raise _Unsupported(f"{label} combines tensors whose channels lie on different dims")
    assert target is not None and first is not None
    if target >= nd or out.shape[target] != len(first.ids):
        raise _Unsupported(f"{label} broadcasts the channel dimension")
    for t in operands:
        aligned = target - (nd - t.dim())
        if aligned < 0:
            continue
        lay = g.layout(t)
        if lay is not None:
            if len(lay.ids) != len(first.ids):
                raise _Unsupported(f"{label} broadcasts the channel dimension")
            g.union(first.ids, lay.ids)
        elif t.shape[aligned] > 1:  # keep tracking, but these channels can no longer be removed
            g.poison(first.ids, f"{label} with {g.describe(t)} ({t.shape[aligned]} channels)")
    return Layout(target, first.ids)


def _getitem(t: torch.Tensor, lay: Layout, index: Any) -> int:
    items = index if isinstance(index, tuple) else (index,)
    n_real = sum(1 for i in items if i is not None and i is not Ellipsis)
    p = q = 0
    new_d = None
    for it in items:
        if it is None:
            q += 1
        elif it is Ellipsis:
            for _ in range(t.dim() - n_real):
                if p == lay.dim:
                    new_d = q
                p += 1
                q += 1
        elif isinstance(it, bool) or not isinstance(it, (int, slice)):
            raise _Unsupported("Tensor.__getitem__ with advanced (tensor/list) indexing")
        elif isinstance(it, int):
            if p == lay.dim:
                raise _Unsupported("Tensor.__getitem__ picks single channels")
            p += 1
        else:
            if p == lay.dim:
                if it.indices(t.shape[p]) != (0, t.shape[p], 1):
                    raise _Unsupported("Tensor.__getitem__ slices the channel dimension")
                new_d = q
            p += 1
            q += 1
    if new_d is None:
        new_d = q + (lay.dim - p)
    return new_d


def apply_op(g: DependencyGraph, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
    name = _op_name(func)
    ins = _tensors((args, kwargs))
    tracked = [t for t in ins if g.layout(t) is not None]
    outs = _tensors(out)
    if not tracked or not outs:
        src = next((g.origin_of(t) for t in ins if g.origin_of(t)), None)
        if src is not None:
            for o in outs:
                g.origin[id(o)] = src
                g.keep_alive.append(o)
        return
    label = _op_label(func)
    if name == "__get__":
        prop = getattr(getattr(func, "__self__", None), "__name__", "?")
        label = f"Tensor.{prop}"
        name = "data" if prop == "data" else "__get__:" + prop
    try:
        lays = _rule(g, name, label, args, kwargs, out)
    except _Unsupported as e:
        for t in tracked:
            g.poison(g.layout(t).ids, str(e))
        for o in outs:
            g.set_layout(o, None)
        return
    if isinstance(lays, Layout) or lays is None:
        lays = [lays] + [None] * (len(outs) - 1)
    for o, lay in zip(outs, lays):
        if lay is not None and (lay.dim >= o.dim() or o.shape[lay.dim] != len(lay.ids)):
            for t in tracked:
                g.poison(g.layout(t).ids, f"{label}: channel bookkeeping lost (internal)")
            lay = None
        g.set_layout(o, lay)


def _rule(g: DependencyGraph, name: str, label: str, args: tuple, kwargs: dict, out: Any):
    t0 = args[0] if args and isinstance(args[0], torch.Tensor) else None
    lay0 = g.layout(t0) if t0 is not None else None
    if name in _CREATE:
        return None
    if name in ("cat", "concat", "concatenate", "stack"):
        return _cat_rule(g, name, label, args, kwargs, out)
    if name in ("data", "to", "type_as", "type", "float", "half", "bfloat16", "double", "cpu", "cuda",
                "detach", "requires_grad_", "contiguous", "clone"):
        return None if lay0 is None else Layout(lay0.dim, lay0.ids)
    if name in _ELEMENTWISE or name == "masked_fill":
        if not isinstance(out, torch.Tensor):
            raise _Unsupported(f"{label} (unexpected output)")
        return _elementwise(g, label, _tensors((args, kwargs)), out)
    if lay0 is None:
        raise _Unsupported(f"{label} (channels enter through a non-leading argument)")
    d, ndim = lay0.dim, t0.dim()
    if name in _RESHAPE:
        r = reshape_map(tuple(t0.shape), d, tuple(out.shape))
        if r is None:
            raise _Unsupported(f"{label} splits the channel dimension ({tuple(t0.shape)} -> {tuple(out.shape)})")
        return Layout(r[0], lay0.ids[r[1]])
    if name in ("permute",):
        dims = args[1] if len(args) == 2 and isinstance(args[1], (list, tuple)) else args[1:]
        dims = kwargs.get("dims", dims)
        return Layout([_norm_dim(x, ndim) for x in dims].index(d), lay0.ids)
    if name in ("transpose", "transpose_", "swapaxes", "swapdims"):
        a, b = (_norm_dim(x, ndim) for x in (args[1], args[2]))
        return Layout(b if d == a else a if d == b else d, lay0.ids)
    if name in ("expand", "expand_as", "broadcast_to"):
        return Layout(d + out.dim() - ndim, lay0.ids)
    if name == "repeat":
        reps = args[1] if len(args) == 2 and isinstance(args[1], (list, tuple)) else args[1:]
        nd = d + len(reps) - ndim
        if reps[nd] != 1:
            raise _Unsupported(f"{label} repeats channels")
        return Layout(nd, lay0.ids)
    if name in _REDUCE:
        dims = _dims_arg(args, kwargs, 1)
        if dims is None or isinstance(dims, torch.Tensor):
            raise _Unsupported(f"{label} over all dims (reduces channels)")
        dims = [_norm_dim(x, ndim) for x in (dims if isinstance(dims, (list, tuple)) else [dims])]
        if d in dims:
            raise _Unsupported(f"{label} reduces over the channel dimension")
        keep = bool(_dims_arg(args, kwargs, 2, "keepdim"))
        nd = d if keep else d - sum(x < d for x in dims)
        return [Layout(nd, lay0.ids) for _ in _tensors(out)]
    if name in _SPATIAL or name.endswith("pool2d") or name.endswith("pool1d") or name.endswith("pool3d"):
        nsp = 3 if "3d" in name else 1 if "1d" in name else 2 if "2d" in name else ndim - 2
        if d >= ndim - nsp:
            raise _Unsupported(f"{label} pools over the channel dimension")
        return [Layout(d, lay0.ids) for _ in _tensors(out)]
    if name == "pad":
        pad = args[1] if len(args) > 1 else kwargs.get("pad")
        if d >= ndim - len(pad) // 2:
            raise _Unsupported(f"{label} pads the channel dimension")
        return Layout(d, lay0.ids)
    if name in ("softmax", "log_softmax", "normalize"):
        dim = _dims_arg(args, kwargs, 2 if name == "normalize" else 1)
        dim = 1 if dim is None and name == "normalize" else dim
        if dim is None or _norm_dim(dim, ndim) == d:
            raise _Unsupported(f"{label} normalizes over the channel dimension")
        return Layout(d, lay0.ids)
    if name == "__getitem__":
        return Layout(_getitem(t0, lay0, args[1]), lay0.ids)
    if name in ("split", "chunk", "tensor_split", "split_with_sizes", "unbind"):
        dim = _norm_dim(_dims_arg(args, kwargs, 1 if name == "unbind" else 2) or 0, ndim)
        parts = _tensors(out)
        if dim != d:
            nd = d - (1 if name == "unbind" and dim < d else 0)
            return [Layout(nd, lay0.ids) for _ in parts]
        if name == "unbind":
            raise _Unsupported(f"{label} unbinds the channel dimension")
        if len(parts) == 1:
            return [Layout(d, lay0.ids)]
        if name != "chunk" or len({p.shape[d] for p in parts}) != 1:
            # the model's code holds the split sizes (x.split(self.c, 1)): they would not shrink with the channels
            raise _Unsupported(f"{label} splits the channel dimension at fixed sizes")
        # chunk(n) re-derives its sizes from the pruned width, so it stays right if every part loses the same
        # positions: couple channel k of each part
        res, off = [], 0
        for p in parts:
            res.append(Layout(d, lay0.ids[off:off + p.shape[d]]))
            off += p.shape[d]
        for r in res[1:]:
            g.union(res[0].ids, r.ids)
        return res
    raise _Unsupported(f"{label} (an op the dependency graph does not model)")


def _cat_rule(g: DependencyGraph, name: str, label: str, args: tuple, kwargs: dict, out: torch.Tensor):
    seq = list(args[0]) if args else list(kwargs.get("tensors", []))
    dim = _norm_dim(_dims_arg(args, kwargs, 1) or 0, out.dim() - (1 if name == "stack" else 0))
    lays = [g.layout(t) for t in seq]
    if name != "stack" and any(l is not None and l.dim == dim for l in lays):
        if any(l is not None and l.dim != dim for l in lays):
            raise _Unsupported(f"{label} mixes tensors with channels on different dims")
        ids = [l.ids if l is not None else g.fresh_poisoned(t.shape[dim], f"{label} with {g.describe(t)}")
               for t, l in zip(seq, lays)]
        return Layout(dim, torch.cat(ids))
    ref = next(l for l in lays if l is not None)
    for t, l in zip(seq, lays):
        if l is None:
            if t.dim() > ref.dim and t.shape[ref.dim] > 1:
                g.poison(ref.ids, f"{label} with {g.describe(t)}")
        elif l.dim != ref.dim:
            raise _Unsupported(f"{label} mixes tensors with channels on different dims")
        else:
            g.union(ref.ids, l.ids)
    if name == "stack":
        return Layout(ref.dim + (1 if dim <= ref.dim else 0), ref.ids)
    return Layout(ref.dim, ref.ids)


# ------------------------------------------------------------------------------------------ layers
def apply_module(g: DependencyGraph, name: str, m: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
    rule = rule_for(m)
    if rule is not None:
        trace_layer(g, name, m, rule, args, kwargs, out)


# ------------------------------------------------------------------------------------------ tracer
class _Tracer(TorchFunctionMode):
    def __init__(self, g: DependencyGraph) -> None:
        super().__init__()
        self.g = g
        self.depth = 0
        self.busy = False
        self.failed_op: str | None = None
        self.stack: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        try:
            out = func(*args, **kwargs)
        except Exception:
            if self.failed_op is None:
                self.failed_op = _op_label(func)
            raise
        if self.depth == 0 and not self.busy:
            self.busy = True
            try:
                apply_op(self.g, func, args, kwargs, out)
            finally:
                self.busy = False
        return out


def trace(model: nn.Module, example_inputs: Any, exclude: tuple[str, ...] = ()) -> DependencyGraph:
    """Run ``model(example_inputs)`` once (eval mode, no grad) and build its DependencyGraph; the channels of
    layers matched by ``exclude`` (module names or globs) are marked unprunable."""
    if isinstance(model, torch.jit.ScriptModule):
        raise TraceError(f"cannot trace {type(model).__name__}: a TorchScript module is opaque to the dependency "
                         "graph; prune the eager nn.Module before scripting it")
    g = DependencyGraph(model, exclude)
    tr = _Tracer(g)
    names = {}
    for n, m in model.named_modules(remove_duplicate=True):
        names.setdefault(id(m), n)
    pending: list[tuple] = []
    handles = []

    def pre(m, args, kwargs):
        tr.stack.append(names.get(id(m), "?"))
        if is_atomic(m):
            if tr.depth == 0:
                pending.append((args, kwargs))
            tr.depth += 1

    def post(m, args, kwargs, out):
        tr.stack.pop()
        if is_atomic(m):
            tr.depth -= 1
            if tr.depth == 0:
                a, k = pending.pop()
                tr.busy = True
                try:
                    apply_module(g, names.get(id(m), "?"), m, a, k, out)
                finally:
                    tr.busy = False

    for m in model.modules():
        if isinstance(m, torch.jit.ScriptModule):
            continue
        handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(m.register_forward_hook(post, with_kwargs=True))
    try:
        with torch.no_grad(), evaluating(model), tr:
            out = call_model(model, example_inputs)
    except Exception as e:
        where = tr.stack[-1] if tr.stack else "<root>"
        op = tr.failed_op or "<python code>"
        raise TraceError(f"the model does not run on the example inputs: {type(e).__name__}: {e} "
                         f"[first failing op: {op}, in module {where!r} "
                         f"({type(model.get_submodule(where)).__name__ if where not in ('<root>', '?') else type(model).__name__})]") from e
    finally:
        for h in handles:
            h.remove()
    g.output = out
    for t in _tensors(out):
        lay = g.layout(t)
        if lay is not None:
            g.poison(lay.ids, "reaches the model output (interface kept)")
    return g
