"""``wrap()``: a drop-in ``nn.Module`` around an optimized or compiled model.

Compiled artifacts (TorchScript, ExportedProgram, torch.compile) often lose the original forward's
signature and fail deep inside a kernel on a wrong input. The wrapper keeps the original's signature,
checks every input against the example it was built from (shape except the dynamic dims, dtype,
device) with an error that names the argument, and moves inputs to the model's device.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn

from .modules import model_device, split_batch
from .errors import TorchfastError

__all__ = ["wrap", "Wrapped", "TensorSpec", "InputError", "eval_mode"]


def eval_mode(model: Any) -> Any:
    """``model.eval()`` where the module supports it (an ExportedProgram's module() refuses: it has no train mode)."""
    if isinstance(model, nn.Module):
        try:
            model.eval()
        except NotImplementedError:
            pass
    return model


class InputError(TorchfastError, ValueError):
    """An input does not match what the wrapped model was built for; the message names the argument."""


@dataclass(frozen=True)
class TensorSpec:
    name: str                         # argument path: "x", "input_ids", "args[1]", "batch['mask']"
    shape: tuple[int | None, ...]     # None: a dynamic dim (any size)
    dtype: torch.dtype
    device: torch.device

    def shape_str(self) -> str:
        return "[" + ", ".join("*" if d is None else str(d) for d in self.shape) + "]"


def _signature(*candidates: Any) -> inspect.Signature | None:
    for c in candidates:
        if c is None:
            continue
        fwd = getattr(c, "forward", c)
        try:
            sig = inspect.signature(fwd)
        except (TypeError, ValueError):
            continue
        if any(p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in sig.parameters.values()) or c is candidates[-1]:
            return sig
    return None


def _dyn_for(name: str, dynamic_dims: Any) -> set[int]:
    if isinstance(dynamic_dims, Mapping):
        root = name.split("[", 1)[0]
        dims = dynamic_dims.get(name, dynamic_dims.get(root, (0,)))
    else:
        dims = dynamic_dims
    return {int(d) for d in (dims or ())}


def _walk(name: str, value: Any) -> Iterable[tuple[str, Any]]:
    """(path, leaf) for the tensors inside an argument (tensors, tuples/lists, dicts)."""
    if isinstance(value, torch.Tensor):
        yield name, value
    elif isinstance(value, Mapping):
        for k, v in value.items():
            yield from _walk(f"{name}[{k!r}]", v)
    elif isinstance(value, (tuple, list)):
        for i, v in enumerate(value):
            yield from _walk(f"{name}[{i}]", v)


def _map(value: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, Mapping):
        items = {k: _map(v, fn) for k, v in value.items()}
        try:
            return type(value)(**items) if type(value) is not dict else items
        except Exception:
            return items
    if isinstance(value, (tuple, list)):
        mapped = [_map(v, fn) for v in value]
        if hasattr(value, "_fields"):  # namedtuple
            return type(value)(*mapped)
        return type(value)(mapped)
    return value


class Wrapped(nn.Module):
    """The drop-in module ``wrap()`` returns. ``module`` is the wrapped model; ``input_spec`` the checks."""

    def __init__(self, model: Callable, signature: inspect.Signature | None, specs: dict[str, TensorSpec],
                 device: torch.device | None, move_inputs: bool, cast_inputs: bool, outputs_to_input_device: bool,
                 inference_mode: bool) -> None:
        super().__init__()
        if isinstance(model, nn.Module):
            self.module = model
        else:
            object.__setattr__(self, "_fn", model)
        self._sig = signature
        if signature is not None:
            self.__signature__ = signature  # inspect.signature(wrapped) shows the original's arguments
        self.input_spec = specs
        self.device = device
        self.move_inputs = move_inputs
        self.cast_inputs = cast_inputs
        self.outputs_to_input_device = outputs_to_input_device
        self.use_inference_mode = inference_mode

    @property
    def inner(self) -> Callable:
        return self._modules["module"] if "module" in self._modules else self.__dict__["_fn"]

    def _bind(self, args: tuple, kwargs: dict) -> inspect.BoundArguments | None:
        if self._sig is None:
            return None
        try:
            return self._sig.bind(*args, **kwargs)
        except TypeError as e:
            raise TypeError(f"wrapped model{self._sig}: {e}") from None

    def _check(self, path: str, x: torch.Tensor) -> torch.Tensor:
        spec = self.input_spec.get(path)
        if spec is None:
            return x
        if x.dim() != len(spec.shape) or any(e is not None and e != g for e, g in zip(spec.shape, x.shape)):
            raise InputError(f"argument {path!r}: expected shape {spec.shape_str()} ('*' = any size), "
                             f"got {list(x.shape)}")
        if x.dtype != spec.dtype:
            if self.cast_inputs and x.is_floating_point() and spec.dtype.is_floating_point:
                x = x.to(spec.dtype)
            else:
                raise InputError(f"argument {path!r}: expected dtype {spec.dtype}, got {x.dtype}"
                                 + (" (wrap(..., cast_inputs=True) casts floating inputs)"
                                    if x.is_floating_point() and spec.dtype.is_floating_point else ""))
        if self.device is not None and x.device != self.device:
            if not self.move_inputs:
                raise InputError(f"argument {path!r}: expected device {self.device}, got {x.device}")
            x = x.to(self.device, non_blocking=True)
        return x

    def _prepare(self, name: str, value: Any, seen: list) -> Any:
        def leaf_fn(prefix: str):
            counter = iter(p for p, _ in _walk(prefix, value))
            def fn(t: torch.Tensor) -> torch.Tensor:
                path = next(counter)
                if t.device != (self.device or t.device):
                    seen.append(t.device)
                return self._check(path, t)
            return fn
        if not isinstance(value, (torch.Tensor, Mapping, tuple, list)):
            return value
        return _map(value, leaf_fn(name))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        bound = self._bind(args, kwargs)
        seen: list[torch.device] = []
        if bound is None:
            args = tuple(self._prepare(f"input {i}", a, seen) for i, a in enumerate(args))
            kwargs = {k: self._prepare(k, v, seen) for k, v in kwargs.items()}
        else:
            for name, value in list(bound.arguments.items()):
                kind = self._sig.parameters[name].kind
                if kind is inspect.Parameter.VAR_POSITIONAL:
                    bound.arguments[name] = tuple(self._prepare(f"{name}[{i}]", v, seen) for i, v in enumerate(value))
                elif kind is inspect.Parameter.VAR_KEYWORD:
                    bound.arguments[name] = {k: self._prepare(k, v, seen) for k, v in value.items()}
                else:
                    bound.arguments[name] = self._prepare(name, value, seen)
            args, kwargs = bound.args, bound.kwargs
        if self.use_inference_mode:
            with torch.inference_mode():
                out = self.inner(*args, **kwargs)
        else:
            out = self.inner(*args, **kwargs)
        if seen and self.outputs_to_input_device:
            back = seen[0]
            out = _map(out, lambda t: t.to(back))
        return out

    def extra_repr(self) -> str:
        spec = ", ".join(f"{s.name}: {s.shape_str()} {str(s.dtype).removeprefix('torch.')}"
                         for s in self.input_spec.values())
        return f"inputs=({spec}), device={self.device}"


def wrap(model: Callable, example_inputs: Any = None, *, like: nn.Module | None = None,
         dynamic_dims: Iterable[int] | Mapping[str, Iterable[int]] = (0,), device: torch.device | str | None = None,
         move_inputs: bool = True, cast_inputs: bool = False, outputs_to_input_device: bool = True,
         inference_mode: bool = True) -> Wrapped:
    """A drop-in ``nn.Module`` around ``model`` (an nn.Module, a compiled module or a callable).

    - The forward signature is ``like``'s (the original model's) when given, else ``model``'s, so calls
      with keywords keep working after compiling and ``inspect.signature`` shows the real arguments.
    - ``example_inputs`` (a tensor, a tuple of positional inputs or a dict of keyword inputs) defines
      the checks: every tensor's shape except its ``dynamic_dims`` (default the batch dim 0; per argument
      with a dict such as ``{"input_ids": (0, 1)}``) and its dtype. Without example inputs only the
      signature and the device are handled.
    - Inputs are moved to the model's device (``device``, else the device of its parameters), outputs
      moved back to where the inputs came from; ``move_inputs=False`` makes a wrong device an error.
    - Runs under ``torch.inference_mode`` unless ``inference_mode=False``.
    """
    if not callable(model):
        raise TypeError(f"wrap() needs a model (an nn.Module or a callable), got {type(model).__name__}")
    eval_mode(model)
    sig = _signature(like, model) if like is not None else _signature(model)
    if device is not None:
        dev = torch.device(device)
    elif isinstance(model, nn.Module) and (next(model.parameters(), None) is not None
                                           or next(model.buffers(), None) is not None):
        dev = model_device(model)
    else:
        dev = None
    specs: dict[str, TensorSpec] = {}
    if example_inputs is not None:
        args, kwargs = split_batch(example_inputs)
        named: list[tuple[str, Any]]
        if sig is not None:
            try:
                bound = sig.bind(*args, **kwargs)
            except TypeError as e:
                raise TypeError(f"example_inputs do not fit the model's forward{sig}: {e}") from None
            named = []
            for name, value in bound.arguments.items():
                kind = sig.parameters[name].kind
                if kind is inspect.Parameter.VAR_POSITIONAL:
                    named += [(f"{name}[{i}]", v) for i, v in enumerate(value)]
                elif kind is inspect.Parameter.VAR_KEYWORD:
                    named += list(value.items())
                else:
                    named.append((name, value))
        else:
            named = [(f"input {i}", a) for i, a in enumerate(args)] + list(kwargs.items())
        for name, value in named:
            for path, t in _walk(name, value):
                dyn = {d % t.dim() for d in _dyn_for(path, dynamic_dims) if -t.dim() <= d < t.dim()} if t.dim() else set()
                shape = tuple(None if i in dyn else s for i, s in enumerate(t.shape))
                specs[path] = TensorSpec(path, shape, t.dtype, t.device)
        if dev is None:
            devs = {s.device for s in specs.values()}
            dev = devs.pop() if len(devs) == 1 else None
    return Wrapped(model, sig, specs, dev, move_inputs, cast_inputs, outputs_to_input_device, inference_mode)
