"""Engines outside PyTorch (ONNX Runtime, OpenVINO) called exactly like the original module.

Those engines take a flat list of named arrays and return a flat list of arrays. :class:`FlatSignature`
records, from one eager call, how the user's call maps onto that: the names of the inputs (positional
ones by the forward's parameter names, keyword ones by their keys) and the structure of the outputs
(a tensor, a tuple, a dict, a Hugging Face ``ModelOutput``). :class:`FlatModule` is what gets exported
(flat tensors in, a flat tuple of tensors out) and :class:`NativeRunner` is the drop-in ``nn.Module``
around the engine: torch tensors in with the original signature, the original output structure out.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.utils._pytree as pytree
from torch import nn

from ..modules import call_model, split_batch
from ..specs import InputSpec

__all__ = ["FlatSignature", "FlatModule", "NativeRunner", "signature_of", "to_numpy"]


def numpy_to_torch_dtype(dtype: Any) -> torch.dtype:
    return torch.from_numpy(np.empty(0, dtype=np.dtype(dtype))).dtype


@dataclass
class FlatSignature:
    """How one call of the original module flattens: input names in order, output leaves and structure."""
    input_names: list[str]
    n_positional: int
    output_spec: Any                  # pytree TreeSpec of the eager output
    tensor_leaves: list[int]          # which output leaves are tensors (the engine returns these, in order)
    constant_leaves: dict[int, Any]   # the other leaves (None, python scalars), returned as they were
    output_type: type | None = None   # a Mapping type pytree does not know, rebuilt from a dict
    output_names: list[str] | None = None

    def flatten_inputs(self, args: tuple, kwargs: dict) -> list[torch.Tensor]:
        if len(args) != self.n_positional or set(kwargs) != set(self.input_names[self.n_positional:]):
            raise TypeError(f"the compiled model takes {self.n_positional} positional input(s) and keyword "
                            f"input(s) {self.input_names[self.n_positional:]} (as it was compiled), got "
                            f"{len(args)} positional and {sorted(kwargs)}")
        return [*args, *(kwargs[n] for n in self.input_names[self.n_positional:])]

    def rebuild(self, tensors: Sequence[torch.Tensor]) -> Any:
        leaves: list[Any] = [None] * (len(self.tensor_leaves) + len(self.constant_leaves))
        for i, t in zip(self.tensor_leaves, tensors):
            leaves[i] = t
        for i, v in self.constant_leaves.items():
            leaves[i] = v
        out = pytree.tree_unflatten(leaves, self.output_spec)
        if self.output_type is not None and isinstance(out, Mapping):
            out = self.output_type(**out)
        return out


def signature_of(model: nn.Module, example_inputs: Any) -> FlatSignature:
    """Run ``model`` once on the example and record how its call and its output flatten."""
    args, kwargs = split_batch(example_inputs)
    with torch.inference_mode():
        out = call_model(model, example_inputs)
    output_type = None
    if isinstance(out, Mapping) and type(out) is not dict and type(out) not in pytree.SUPPORTED_NODES:
        output_type, out = type(out), {k: v for k, v in out.items()}
    leaves, spec = pytree.tree_flatten(out)
    tensor_leaves = [i for i, v in enumerate(leaves) if isinstance(v, torch.Tensor)]
    if not tensor_leaves:
        raise TypeError(f"{type(model).__name__} returns no tensor; nothing for an engine to compute")
    constants = {i: v for i, v in enumerate(leaves) if not isinstance(v, torch.Tensor)}
    params = [p.name for p in inspect.signature(model.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    names = [params[i] if i < len(params) else f"input_{i}" for i in range(len(args))] + list(kwargs)
    for i, a in enumerate([*args, *kwargs.values()]):
        if not isinstance(a, torch.Tensor):
            raise TypeError(f"input {names[i]!r} is a {type(a).__name__}; engines outside PyTorch take tensors only")
    out_names = _output_names(out, tensor_leaves, leaves)
    return FlatSignature(names, len(args), spec, tensor_leaves, constants, output_type, out_names)


def _output_names(out: Any, tensor_leaves: list[int], leaves: list[Any]) -> list[str]:
    if isinstance(out, torch.Tensor):
        return ["output"]
    if isinstance(out, Mapping) and all(isinstance(v, torch.Tensor) or v is None for v in out.values()):
        keys = [k for k, v in out.items() if v is not None]
        if len(keys) == len(tensor_leaves):
            return [str(k) for k in keys]
    return [f"output_{i}" for i in range(len(tensor_leaves))]


class FlatModule(nn.Module):
    """The module as engines export it: flat positional tensors in, a flat tuple of tensors out."""

    def __init__(self, model: nn.Module, sig: FlatSignature):
        super().__init__()
        self.model = model
        self.sig = sig

    def forward(self, *flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        n = self.sig.n_positional
        out = self.model(*flat[:n], **dict(zip(self.sig.input_names[n:], flat[n:])))
        if self.sig.output_type is not None and isinstance(out, Mapping):
            out = {k: v for k, v in out.items()}
        leaves, _ = pytree.tree_flatten(out)
        return tuple(leaves[i] for i in self.sig.tensor_leaves)


def to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if t.dtype == torch.bfloat16:
        t = t.float()
    return t.contiguous().numpy()


class NativeRunner(nn.Module):
    """A compiled engine as a drop-in module. ``run`` takes the flat input arrays (in ``sig.input_names``
    order) and returns the flat output arrays; this class does the torch <-> numpy and structure work."""

    def __init__(self, run: Callable[[list[np.ndarray]], Sequence[np.ndarray]], sig: FlatSignature, engine: str):
        super().__init__()
        self._run = run
        self.sig = sig
        self.engine = engine
        # the inputs as the engine declares them (InputSpec.from_dims: batch dim first, -1 = any size), so a
        # loaded artifact says what it takes and `torchfast serve` needs no --input-shape; filled where known
        self.engine_inputs: list[InputSpec] = []
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        flat = self.sig.flatten_inputs(args, kwargs)
        outs = self._run([to_numpy(t) for t in flat])
        return self.sig.rebuild([torch.from_numpy(np.ascontiguousarray(o)) for o in outs])

    def extra_repr(self) -> str:
        return f"engine={self.engine!r}, inputs={self.sig.input_names}"
