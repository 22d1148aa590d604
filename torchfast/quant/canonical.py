"""Conv/Linear subclasses as the plain layer they compute, so that quantization and torch.fx see base ops.

Model libraries subclass ``nn.Conv2d`` for TensorFlow "same" padding (timm's ``Conv2dSame``, EfficientNet
ports) or to standardize the weight (``StdConv2d``, ``ScaledStdConv2d``). torch.ao quantizes only the base
classes, and fx cannot trace a forward that branches on the input's shape, so such layers used to stay
float. ``canonicalize`` watches each subclass's forward on the inputs it really receives; where that forward
is the base op plus a zero pad and/or a function of the layer's own parameters, the layer is replaced by the
plain layer carrying the effective weight, preceded by the padding. Every replacement is checked against the
original on those inputs and the whole model against itself; what does not fit stays, with the reason.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ..errors import TorchfastError
from ..modules import (Batch, ExampleInputError, batches_list, call_model, check_module, describe_batch,
                       evaluating, maybe_copy, swap_modules, weight_readers)
from .padding import (Change, PaddedConv, SamePad2d, graph_pad_folds, pads_text, plan_padding, sequential_pad_folds,
                      sizes_text)

__all__ = ["canonicalize", "Change", "CanonicalizeError", "SamePad2d", "PaddedConv"]

_BASES = (nn.Conv1d, nn.Conv2d, nn.Linear)
_BASE_OPS = {nn.Conv1d: torch.conv1d, nn.Conv2d: torch.conv2d, nn.Linear: F.linear}
_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_SHAPE_QUERIES = {"size", "dim", "shape", "ndim", "dtype", "device", "is_cuda", "layout", "numel", "nelement",
                  "stride", "requires_grad", "is_contiguous", "is_quantized", "is_floating_point", "__len__",
                  "element_size", "get_device"}
_RTOL, _ATOL = 1e-5, 1e-6   # per layer, atol scaled by the output's magnitude
_MODEL_RTOL, _MODEL_ATOL = 1e-4, 1e-5


class CanonicalizeError(TorchfastError, ValueError):
    """canonicalize was given nothing to observe the model on."""


class _Recorder(TorchFunctionMode):
    """Every torch call made at the top level of a forward (the mode is off inside each call)."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[Any, tuple, dict, Any]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.calls.append((func, args, kwargs, out))
        return out


def _fname(func: Any) -> str:
    name = getattr(func, "__name__", None) or repr(func)
    if name == "__get__":  # a Tensor property, e.g. x.shape
        name = getattr(getattr(func, "__self__", None), "__name__", name)
    return name


def _tensors(obj: Any) -> Iterable[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, Mapping):
        for o in obj.values():
            yield from _tensors(o)


@dataclass
class _Seen:
    """One observed call of a layer, reduced to what the replacement needs."""
    x: torch.Tensor
    out: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    conv_args: tuple             # (stride, padding, dilation, groups), as passed; () for linear
    pads: tuple                  # (before, after) per spatial dim, H then W
    size: tuple                  # the input's spatial size
    weight_ops: tuple            # the torch calls that computed weight/bias from the parameters


def _tuple(v: Any, n: int) -> Any:
    if isinstance(v, str):
        return v
    return tuple(int(a) for a in v) if isinstance(v, (list, tuple)) else (int(v),) * n


def _watch(layer: nn.Module, base: type, x: torch.Tensor) -> _Seen | str:
    """Run ``layer(x)`` recording its torch calls; the base op plus padding and/or a weight function, or why not."""
    rec = _Recorder()
    with torch.no_grad(), rec:
        out = layer(x)
    n = 0 if base is nn.Linear else (1 if base is nn.Conv1d else 2)
    op = _BASE_OPS[base]
    derived = {id(x)}
    padded = pad = call = None
    side: list[str] = []
    for func, args, kwargs, res in rec.calls:
        name = _fname(func)
        if not any(id(t) in derived for t in _tensors((args, kwargs))):
            side.append(name)
            continue
        if name in _SHAPE_QUERIES and not any(True for _ in _tensors(res)):
            continue
        if func is F.pad or name == "constant_pad_nd":
            if call is not None:
                return "its forward pads the conv's output"
            if pad is not None:
                return "its forward pads the input twice"
            a = dict(zip(("input", "pad", "mode", "value"), args)) | kwargs
            if a.get("input") is not x:
                return "its forward pads something computed from the input"
            if a.get("mode", "constant") != "constant" or a.get("value") not in (None, 0, 0.0):
                return f"its forward pads with mode={a.get('mode')!r}, value={a.get('value')!r} (not zeros)"
            pad = [int(p) for p in a["pad"]]
            if n == 0 or len(pad) > 2 * n or len(pad) % 2 or min(pad) < 0:
                return f"its forward pads {pad}, which no {base.__name__} padding can express"
            padded = res
            derived.add(id(res))
            continue
        if func is op:
            if call is not None:
                return f"its forward calls {name} twice"
            a = dict(zip(_CONV_ARGS, args)) | kwargs
            if a.get("input") is not (x if padded is None else padded):
                return f"{name} runs on something computed from the input, not on the (padded) input"
            if any(id(t) in derived for t in _tensors((a.get("weight"), a.get("bias")))):
                return f"the weight passed to {name} depends on the input"
            call = (a, res)
            derived.add(id(res))
            continue
        what = "output of " + _fname(op) if call is not None and any(t is call[1] for t in _tensors((args, kwargs))) \
            else "input"
        return f"its forward applies {name} to the {what}"
    if call is None:
        return f"its forward does not call {_fname(op)} on its input"
    if out is not call[1]:
        return f"its forward does not return the result of {_fname(op)}"
    a = call[0]
    per_dim = [(0, 0)] * n
    for i in range(len(pad or []) // 2):
        per_dim[n - 1 - i] = (pad[2 * i], pad[2 * i + 1])
    conv_args = () if n == 0 else (_tuple(a.get("stride", 1), n), _tuple(a.get("padding", 0), n),
                                   _tuple(a.get("dilation", 1), n), int(a.get("groups", 1)))
    return _Seen(x, out, a["weight"], a.get("bias"), conv_args, tuple(per_dim), tuple(x.shape[x.dim() - n:]),
                 tuple(dict.fromkeys(side)))


def _same_call(a: _Seen, b: _Seen) -> bool:
    same = lambda s, t: (s is None and t is None) or (s is not None and t is not None and s.shape == t.shape
                                                       and torch.equal(s, t))
    return a.conv_args == b.conv_args and same(a.weight, b.weight) and same(a.bias, b.bias)


def _plain(layer: nn.Module, base: type, s: _Seen, padding: tuple | None) -> nn.Module:
    w, b = s.weight, s.bias
    if base is nn.Linear:
        new = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device="meta", dtype=w.dtype)
    else:
        stride, pad, dilation, groups = s.conv_args
        new = base(w.shape[1] * groups, w.shape[0], tuple(w.shape[2:]), stride=stride,
                   padding=pad if padding is None else padding, dilation=dilation, groups=groups,
                   bias=b is not None, device="meta", dtype=w.dtype)

    def param(t: torch.Tensor, own: Any) -> nn.Parameter:
        if isinstance(t, nn.Parameter) and t is own:
            return t                                       # the layer's own parameter, shared
        rg = own.requires_grad if isinstance(own, torch.Tensor) else False
        return nn.Parameter(t.detach().clone(), requires_grad=rg)
    new.weight = param(w, layer.weight)
    new.bias = None if b is None else param(b, layer.bias)
    return new


def _plain_attributes(old: nn.Module, new: nn.Module) -> None:
    """Plain settings the subclass added (``tag``, ``eps``): model code may read them."""
    for k, v in vars(old).items():
        if not k.startswith("_") and not hasattr(new, k) and (v is None or isinstance(v, (int, float, str, bool,
                                                                                          tuple))):
            setattr(new, k, v)


def _close(new: torch.Tensor, ref: torch.Tensor, rtol: float, atol: float) -> bool:
    if new.shape != ref.shape or new.dtype != ref.dtype:
        return False
    scale = float(ref.detach().abs().max()) if ref.numel() and ref.is_floating_point() else 1.0
    return torch.allclose(new, ref, rtol=rtol, atol=atol * max(scale, 1.0))


def _replacement(layer: nn.Module, base: type, inputs: list, weight_read: bool,
                 any_size: bool) -> tuple[nn.Module, str, str] | str:
    """(replacement, action, reason) for one subclass layer, or why it stays as it is."""
    if layer._forward_hooks or layer._forward_pre_hooks or layer._backward_hooks:
        return "it has hooks registered, which a replacement would lose"
    if not inputs:
        return "not called on the batches"
    if any(kw or len(args) != 1 or not isinstance(args[0], torch.Tensor) for args, kw in inputs):
        return "called with other than one positional tensor"
    seen = []
    for args, _ in inputs:
        s = _watch(layer, base, args[0])
        if isinstance(s, str):
            return s
        seen.append(s)
    if not all(_same_call(seen[0], s) for s in seen[1:]):
        return "the weight, bias or conv settings it passes change from call to call"
    first = seen[0]
    own = first.weight is layer.weight and first.bias is getattr(layer, "bias", None)
    if weight_read and not own:
        return "the model's code reads its .weight/.bias, and the weight it computes differs from it"
    n = 0 if base is nn.Linear else (1 if base is nn.Conv1d else 2)
    plan = plan_padding([(s.pads, s.size) for s in seen], first.weight.shape[2:], first.conv_args[:3], n,
                        any_size) if n else ("none", (), "")
    if isinstance(plan, str):
        return plan
    kind, pads, note = plan
    parts = []
    if kind == "fold":
        conv = _plain(layer, base, first, tuple(p + b for p, (b, _) in zip(first.conv_args[1], pads)))
        new, action = conv, f"replaced by {base.__name__}"
        parts.append(f"zero pad {pads_text(pads)} folded into padding={tuple(conv.padding)}{note}")
    elif kind == "none":
        new, action = _plain(layer, base, first, None), f"replaced by {base.__name__}"
    else:
        conv = _plain(layer, base, first, None)
        if kind == "same":
            pad_mod = SamePad2d(*pads)
            parts.append(f"TF 'same' padding computed from the input size, as on {sizes_text([s.size for s in seen])}")
        else:
            flat = [v for b, a in reversed(pads) for v in (b, a)]
            pad_mod = (nn.ZeroPad1d if n == 1 else nn.ZeroPad2d)(tuple(flat))
            parts.append(f"constant zero pad {flat}{note}")
        new = PaddedConv(pad_mod, conv)
        action = f"replaced by PaddedConv({type(pad_mod).__name__}, {base.__name__})"
    if not own:
        ops = ", ".join(first.weight_ops) or "a copy"
        parts.append(f"effective weight precomputed from its parameters ({ops})")
    _plain_attributes(layer, new)
    new.eval()
    with torch.no_grad():
        for s in seen:
            if not _close(new(s.x), s.out, _RTOL, _ATOL):
                return "the plain replacement does not reproduce its output"
    return new, action, "; ".join(parts) or f"its forward is {base.__name__}'s"


def _candidates(model: nn.Module) -> list[tuple[str, nn.Module, type]]:
    """Instances of user/library subclasses of Conv1d/Conv2d/Linear (torch's own subclasses are left alone)."""
    out = []
    for name, mod in model.named_modules():
        t = type(mod)
        if not name or t in _BASES or t.__module__.startswith("torch."):
            continue
        base = next((b for b in _BASES if isinstance(mod, b)), None)
        if base is not None:
            out.append((name, mod, base))
    return out


def _capture(model: nn.Module, names: list[str], batches: list[Batch]) -> tuple[dict[str, list], list]:
    """Each named layer's inputs on every batch (cloned), and the model's outputs."""
    seen: dict[str, list] = {n: [] for n in names}
    hooks = []
    for n in names:
        def hook(m, args, kwargs, _n=n):
            seen[_n].append((tuple(a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args),
                             dict(kwargs)))
        hooks.append(model.get_submodule(n).register_forward_pre_hook(hook, with_kwargs=True))
    outputs = []
    try:
        with torch.no_grad():
            for b in batches:
                outputs.append(call_model(model, b))
    except Exception as e:
        raise ExampleInputError(f"{type(model).__name__} fails on a batch ({describe_batch(b)}): "
                                f"{type(e).__name__}: {e}") from e
    finally:
        for h in hooks:
            h.remove()
    return seen, outputs


def _matches(model: nn.Module, batches: list[Batch], reference: list) -> bool:
    def same(a: Any, b: Any) -> bool:
        if isinstance(b, torch.Tensor):
            return isinstance(a, torch.Tensor) and _close(a, b, _MODEL_RTOL, _MODEL_ATOL)
        if isinstance(b, Mapping):
            return isinstance(a, Mapping) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in b)
        if isinstance(b, (list, tuple)):
            return isinstance(a, (list, tuple)) and len(a) == len(b) and all(map(same, a, b))
        return a == b
    with torch.no_grad():
        return all(same(call_model(model, b), r) for b, r in zip(batches, reference))


def _apply(model: nn.Module, units: list[tuple[dict[str, nn.Module], list[Change]]], batches: list[Batch],
           reference: list) -> list[Change]:
    """Swap every unit in; if the model's outputs change, take them back and keep, one by one, those that
    leave the outputs (on the first batch) as they were."""
    originals = [{n: model.get_submodule(n) for n in swaps} for swaps, _ in units]
    for swaps, _ in units:
        swap_modules(model, swaps)
    if not units or _matches(model, batches, reference):
        return [c for _, cs in units for c in cs]
    for orig in reversed(originals):
        swap_modules(model, orig)
    kept: list[Change] = []
    for (swaps, cs), orig in zip(units, originals):
        swap_modules(model, swaps)
        if _matches(model, batches[:1], reference[:1]):
            kept.extend(cs)
        else:
            swap_modules(model, orig)
            kept.extend(Change(c.layer, "kept", "replacing it changes the model's output (the model uses it "
                                                "beyond its forward)") for c in cs)
    return kept


def canonicalize(model: nn.Module, batches: Iterable[Batch] | Batch, *, inplace: bool = False,
                 any_size: bool = False, rewrite_forward: bool = True) -> tuple[nn.Module, list[Change]]:
    """Replace Conv1d/Conv2d/Linear subclasses that compute "the base op plus a zero pad and/or a weight
    function" by the plain layer, and fold zero pads that only feed a plain conv into its ``padding``.

    ``batches``: real inputs; each layer is judged on what it receives there. Returns (model, changes),
    one ``Change(layer, action, reason)`` per subclass layer and per folded pad ("kept" with the reason
    where a layer does not fit). A pad that depends on the input size (TF "same", stride 2) is folded when it
    was symmetric and the same on every observed size (the reason says so); ``any_size=True`` keeps it
    size-dependent (``SamePad2d``) instead. ``rewrite_forward``: fold ``F.pad`` calls in the model's own
    forward too, which returns a ``torch.fx.GraphModule`` (only when there is one to fold and the model
    traces). ``inplace=False`` leaves ``model`` as it was; train/eval flags are kept.

    Made for inference: a weight function is evaluated once, so training the result would train the
    effective weight, not the parameters it was computed from.
    """
    check_module(model)
    batches = batches_list(batches)
    if not batches:
        raise CanonicalizeError("canonicalize needs at least one batch to observe the model's layers on")
    work = maybe_copy(model, inplace)
    flags = {n: m.training for n, m in work.named_modules()}
    old = {id(m) for m in work.modules()}
    candidates = _candidates(work)
    names = [n for n, _, _ in candidates]
    with evaluating(work):
        inputs, reference = _capture(work, names, batches)
        readers = weight_readers(work, names, batches[0]) if names else set()
        units: list[tuple[dict[str, nn.Module], list[Change]]] = []
        kept: list[Change] = []
        for name, layer, base in candidates:
            r = _replacement(layer, base, inputs[name], name in readers, any_size)
            if isinstance(r, str):
                kept.append(Change(name, "kept", r))
            else:
                units.append(({name: r[0]}, [Change(name, r[1], r[2])]))
        done = _apply(work, units, batches, reference)
        swaps, changes = sequential_pad_folds(work)
        done += _apply(work, _pad_units(swaps, changes), batches, reference)
        swaps, _, changes = graph_pad_folds(work, rewrite_functional=False)
        done += _apply(work, _pad_units(swaps, changes), batches, reference)
        result = work
        if rewrite_forward:
            result, functional = _rewritten(work, batches, reference)
            done += functional
    for name, mod in result.named_modules():   # new modules take the flag of what they replace
        if id(mod) not in old:
            owner = name
            while owner not in flags:
                owner = owner.rpartition(".")[0]
            mod.training = flags[owner]
    order = {n: i for i, n in enumerate(names)}
    return result, sorted(done + kept, key=lambda c: order.get(c.layer, len(order)))


def _pad_units(swaps: dict[str, nn.Module], changes: list[Change]) -> list[tuple[dict[str, nn.Module], list[Change]]]:
    """One unit per folded pad module: the pad's swap (to Identity) and its conv's."""
    units = []
    for c in changes:
        conv = c.action.split("folded into ", 1)[1]
        units.append(({c.layer: swaps[c.layer], conv: swaps[conv]}, [c]))
    return units


def _rewritten(work: nn.Module, batches: list[Batch], reference: list) -> tuple[nn.Module, list[Change]]:
    """The model as a GraphModule without the foldable ``F.pad`` calls, if it still computes the same."""
    swaps, graph, extra = graph_pad_folds(work, rewrite_functional=True)
    functional = [c for c in extra if not c.action.startswith("removed")]
    if graph is None or not functional:
        return work, []
    gm = torch.fx.GraphModule(work, graph, class_name=type(work).__name__)
    for name, child in work.named_children():  # the whole module tree, not only what the graph calls
        setattr(gm, name, child)
    convs = {c.layer: swaps[c.layer] for c in functional}
    originals = {n: gm.get_submodule(n) for n in convs}
    swap_modules(gm, convs)
    with evaluating(gm):
        if not _matches(gm, batches, reference):
            swap_modules(gm, originals)  # the tree is shared with ``work``
            return work, [Change(c.layer, "kept", "folding the F.pad before it changes the model's output")
                          for c in functional]
    note = "; the model is returned as a torch.fx.GraphModule"
    return gm, [Change(c.layer, c.action, c.reason + note) for c in functional]
