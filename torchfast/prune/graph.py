"""Dependency graph: which channels of which layers must be removed together.

How the graph is built, and why this way
----------------------------------------
We run ONE eager forward pass of the model on the user's example inputs under a
``torch.overrides.TorchFunctionMode`` that sees every torch function / Tensor method at the level the
model's Python code calls it (``F.relu``, ``Tensor.__iadd__``, ``torch.cat``, ``Tensor.flatten``,
``Tensor.__getitem__`` ...), plus forward hooks on the layers we know how to slice (Conv, Linear,
BatchNorm, LayerNorm, Embedding, ``nn.MultiheadAttention``, Hugging Face ``query/key/value`` self-attention),
whose insides are not recorded. The alternatives, measured on this project's models:

* ``torch.fx.symbolic_trace`` fails on Hugging Face BERT in transformers 5 ("'Proxy' object does not
  support item assignment", measured on all-MiniLM-L6-v2) and on any model that branches on tensor values;
* ``torch.export`` does cover BERT and is quick (~1 s for resnet50 or MiniLM here), but it lowers to ATen
  (``conv2d``/``addmm``/``_native_batch_norm_legit_no_training``, attention split into matmuls), so layer
  identity must be rebuilt from ``nn_module_stack`` metadata, ``nn.MultiheadAttention`` disappears as a
  unit, and it refuses models with data-dependent Python control flow that run fine eagerly;
* the autograd graph of one pass (Torch-Pruning's choice) only sees differentiable ops, needs grads on
  every parameter, and also knocks ``nn.MultiheadAttention`` off its fast path into ATen pieces.

A function-mode trace covers every model that runs eagerly (the same models the user runs), keeps
whole layers (Conv, Linear, BN, attention) as units, and sees ops at the level where channel rules are
simple, for the cost of one forward plus ~0.5 s of bookkeeping (resnet50). Every torchvision classifier
tried (resnet, densenet, mobilenet_v3, efficientnet, vgg, vit) and HF BERT trace this way.

What the graph tracks
---------------------
Every prunable index (an output channel of a conv, an input column of a linear, a BN channel, an
attention head...) is an *element*; each traced tensor carries, along one "channel" dimension, the
element ids of its entries. Ops union elements that must stay aligned (residual add, SE scale multiply,
BN after conv), concat stacks id lists (DenseNet), flatten repeats ids (conv -> Linear), depthwise convs
pass ids through. Connected elements form a *component*: one channel that is kept or removed as a whole
in every layer it touches. Any op the rules do not cover *poisons* the components of its tracked inputs
(with a reason naming the op), so they are never pruned: an unknown op costs compression, never
correctness. Components reaching the model's outputs are poisoned too (the interface is kept).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from ..modules import call_model
from ..transform import Exclusion
from ..errors import TorchfastError

# ------------------------------------------------------------------------------------------ errors


class TraceError(TorchfastError, RuntimeError):
    """The model could not be run/traced on the example inputs; the message names the failing op/module."""


# ------------------------------------------------------------------------------------------ op tables
_ELEMENTWISE = {
    # unary, channel-preserving
    "relu", "relu_", "relu6", "hardtanh", "hardtanh_", "hardswish", "hardswish_", "hardsigmoid",
    "hardsigmoid_", "sigmoid", "sigmoid_", "silu", "silu_", "gelu", "tanh", "tanh_", "elu", "elu_", "selu",
    "celu", "leaky_relu", "leaky_relu_", "mish", "softplus", "softsign", "prelu_scalar", "dropout", "dropout_",
    "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout", "clone", "contiguous",
    "detach", "detach_", "to", "float", "half", "bfloat16", "double", "type_as", "abs", "neg", "__neg__",
    "exp", "sqrt", "rsqrt", "square", "clamp", "clamp_", "clamp_min", "clamp_min_", "clamp_max", "clip",
    "erf", "log", "sin", "cos", "reciprocal", "sign", "requires_grad_", "cpu", "cuda", "__pos__", "sigmoid",
    "logsigmoid", "tanhshrink", "threshold", "threshold_", "glu_noop", "nan_to_num", "masked_fill_scalar",
    # binary / n-ary with broadcasting
    "add", "add_", "__add__", "__radd__", "__iadd__", "sub", "sub_", "__sub__", "__rsub__", "__isub__",
    "mul", "mul_", "__mul__", "__rmul__", "__imul__", "div", "div_", "__truediv__", "__rtruediv__",
    "__itruediv__", "true_divide", "maximum", "minimum", "pow", "__pow__", "__rpow__", "where", "lerp",
    "addcmul", "addcdiv", "fmod", "remainder",
}
_RESHAPE = {"view", "reshape", "flatten", "unflatten", "squeeze", "squeeze_", "unsqueeze", "unsqueeze_",
            "view_as", "reshape_as", "ravel"}
_REDUCE = {"mean", "sum", "amax", "amin", "max", "min", "std", "var", "logsumexp", "nansum", "nanmean", "prod"}
_SPATIAL = {"adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool1d",
            "adaptive_max_pool2d", "adaptive_max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d", "max_pool1d",
            "max_pool2d", "max_pool3d", "max_pool1d_with_indices", "max_pool2d_with_indices", "lp_pool2d",
            "lp_pool1d", "interpolate", "upsample", "upsample_nearest", "upsample_bilinear",
            "_max_pool1d", "_max_pool2d", "_max_pool3d", "boolean_dispatch", "fn"}
_CREATE = {"new_zeros", "new_ones", "new_empty", "new_full", "new_tensor", "zeros_like", "ones_like",
           "empty_like", "full_like", "rand_like", "randn_like", "size", "dim", "numel", "__len__", "tolist",
           "item", "__get__", "__bool__", "__format__", "__repr__", "__hash__", "__eq__", "__ne__", "eq", "ne",
           "is_floating_point", "is_contiguous", "element_size", "data_ptr", "__array__", "get_device",
           "stride", "storage_offset", "__index__", "__int__", "__float__", "numpy", "isfinite", "isnan",
           "__lt__", "__le__", "__gt__", "__ge__", "lt", "gt", "le", "ge", "any", "all"}

PRODUCER_ROLES = ("out", "head", "emb")


def _op_name(func: Any) -> str:
    name = getattr(func, "__name__", None) or type(func).__name__
    return name


def _op_label(func: Any) -> str:
    """A readable name for error messages and report lines: torch.cat, Tensor.view, F.max_pool2d..."""
    name = _op_name(func)
    qn = getattr(func, "__qualname__", None) or name
    mod = getattr(func, "__module__", None) or ""
    if qn.startswith(("TensorBase.", "Tensor.")) or mod == "torch._tensor":
        return f"Tensor.{name}"
    if mod.startswith("torch.nn.functional") or mod == "torch._C._nn":
        return f"torch.nn.functional.{name}"
    if qn.startswith("_VariableFunctionsClass.") or mod == "torch":
        return f"torch.{name}"
    return f"{mod}.{qn}" if mod else qn


# ------------------------------------------------------------------------------------------ union-find
class _UF:
    def __init__(self) -> None:
        self.parent: list[int] = []

    def add(self, n: int) -> int:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return start

    def find(self, a: int) -> int:
        p = self.parent
        root = a
        while p[root] != root:
            root = p[root]
        while p[a] != root:
            p[a], a = root, p[a]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            if ra < rb:
                self.parent[rb] = ra
            else:
                self.parent[ra] = rb


@dataclass
class Layout:
    """Element ids along dimension ``dim`` of one traced tensor."""
    dim: int
    ids: torch.Tensor  # int64, len == tensor.shape[dim]


@dataclass
class Component:
    root: int
    elements: list[int]
    roles: frozenset  # {(module name, role)}
    poison: str | None

    @property
    def producers(self) -> list[tuple[str, str]]:
        return sorted(r for r in self.roles if r[1] in PRODUCER_ROLES)


@dataclass
class Family:
    """Components with the same set of (layer, role): one coupled group; ``amount`` applies per family."""
    key: frozenset
    components: list[Component] = field(default_factory=list)

    @property
    def name(self) -> str:
        prods = sorted({m for m, r in self.key if r in PRODUCER_ROLES})
        kind = "heads" if any(r == "head" for _, r in self.key) else "channels"
        shown = ", ".join(prods[:3]) + (f" (+{len(prods) - 3})" if len(prods) > 3 else "")
        return f"{kind} of {shown}"

    @property
    def modules(self) -> list[str]:
        return sorted({m for m, _ in self.key})


# ------------------------------------------------------------------------------------------ the graph
class DependencyGraph:
    """Elements, their (module, role, index) owners, unions and poison reasons, from one traced forward."""

    def __init__(self, model: nn.Module, exclude: Iterable[str] = ()) -> None:
        self.model = model
        self.uf = _UF()
        self.owner: list[tuple[str, str, int]] = []
        self.poisoned: dict[int, str] = {}
        self.slots: dict[tuple[str, str], torch.Tensor] = {}  # (module, role) -> element ids by index
        self.layouts: dict[int, Layout] = {}
        self.keep_alive: list[Any] = []
        self.exclusion = Exclusion(exclude, "ChannelPruning")
        self.notes: list[str] = []
        self.module_of: dict[int, str] = {}
        self.param_names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
        self.param_names.update({id(b): n for n, b in model.named_buffers(remove_duplicate=False)})
        self.output: Any = None
        self.origin: dict[int, str] = {}  # id(untracked tensor) -> parameter it was computed from

    def origin_of(self, t: torch.Tensor) -> str | None:
        return self.param_names.get(id(t)) or self.origin.get(id(t))

    # ---- elements
    def new(self, n: int, module: str, role: str) -> torch.Tensor:
        start = self.uf.add(n)
        self.owner.extend((module, role, i) for i in range(n))
        return torch.arange(start, start + n)

    def role_slots(self, module: str, role: str, n: int) -> torch.Tensor:
        key = (module, role)
        if key not in self.slots:
            self.slots[key] = self.new(n, module, role)
            if self.exclusion(module):
                self.poison(self.slots[key], f"layer {module} is excluded ({self.exclusion.match(module)!r})")
        return self.slots[key]

    def poison(self, ids: torch.Tensor | Iterable[int], reason: str) -> None:
        for e in (ids.tolist() if isinstance(ids, torch.Tensor) else ids):
            self.poisoned.setdefault(e, reason)

    def union(self, a: torch.Tensor, b: torch.Tensor) -> None:
        if a.shape != b.shape:
            raise AssertionError(f"internal: union of {tuple(a.shape)} and {tuple(b.shape)}")
        if a.data_ptr() == b.data_ptr():
            return
        for x, y in zip(a.tolist(), b.tolist()):
            if x != y:
                self.uf.union(x, y)

    def fresh_poisoned(self, n: int, reason: str) -> torch.Tensor:
        ids = self.new(n, "<untracked>", "untracked")
        self.poison(ids, reason)
        return ids

    # ---- tensors
    def layout(self, t: Any) -> Layout | None:
        return self.layouts.get(id(t)) if isinstance(t, torch.Tensor) else None

    def set_layout(self, t: torch.Tensor, lay: Layout | None) -> None:
        self.keep_alive.append(t)
        if lay is None:
            self.layouts.pop(id(t), None)
        else:
            self.layouts[id(t)] = lay

    def describe(self, t: torch.Tensor) -> str:
        name = self.origin_of(t)
        return f"parameter {name!r} used directly" if name else "an untracked tensor (model input or constant)"

    # ---- results
    def components(self) -> dict[int, Component]:
        groups: dict[int, list[int]] = {}
        for e in range(len(self.owner)):
            groups.setdefault(self.uf.find(e), []).append(e)
        comps = {}
        for root, els in groups.items():
            reason = next((self.poisoned[e] for e in els if e in self.poisoned), None)
            roles = frozenset((self.owner[e][0], self.owner[e][1]) for e in els if self.owner[e][1] != "untracked")
            comps[root] = Component(root, els, roles, reason)
        return comps

    def families(self) -> tuple[list[Family], dict[str, list[Component]]]:
        """(prunable families, {reason: unprunable components that have a producer})."""
        fams: dict[frozenset, Family] = {}
        blocked: dict[str, list[Component]] = {}
        for c in self.components().values():
            if not c.producers:
                continue  # e.g. channels of the model input: nothing to remove
            if c.poison is not None:
                blocked.setdefault(c.poison, []).append(c)
                continue
            fams.setdefault(c.roles, Family(c.roles)).components.append(c)
        for f in fams.values():
            f.components.sort(key=lambda c: min(self.owner[e][2] for e in c.elements))
        return list(fams.values()), blocked


# ------------------------------------------------------------------------------------------ shape rules
def _norm_dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


def reshape_map(in_shape: tuple, d: int, out_shape: tuple) -> tuple[int, torch.Tensor] | None:
    """Where channel dim ``d`` goes under a row-major reshape: (out dim, index into the channel ids) or None."""
    n_in, n_out = len(in_shape), len(out_shape)
    pin = [1]
    for s in in_shape:
        pin.append(pin[-1] * s)
    pout = [1]
    for s in out_shape:
        pout.append(pout[-1] * s)
    best = None
    for i in range(d, -1, -1):
        for j in range(d + 1, n_in + 1):
            for k in range(n_out):
                if pout[k] == pin[i] and pout[k + 1] == pin[j]:
                    span = j - i
                    if best is None or span < best[0]:
                        best = (span, i, j, k)
    if best is None:
        return None
    _, i, j, k = best
    inner = math.prod(in_shape[d + 1:j])
    idx = (torch.arange(out_shape[k]) // inner) % in_shape[d]
    return k, idx


def _dims_arg(args: tuple, kwargs: dict, pos: int, name: str = "dim") -> Any:
    if name in kwargs:
        return kwargs[name]
    return args[pos] if len(args) > pos else None


def _tensors(x: Any) -> list[torch.Tensor]:
    return [t for t in tree_flatten(x)[0] if isinstance(t, torch.Tensor)]
