"""``wrap()``: a drop-in ``nn.Module`` around an optimized or compiled model.

Compiled artifacts (TorchScript, ExportedProgram, torch.compile) often lose the original forward's
signature and fail deep inside a kernel on a wrong input. The wrapper keeps the original's signature,
checks every input against the example it was built from (shape except the dynamic dims, dtype,
device) with an error that names the argument, and moves inputs to the model's device.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn

from .modules import model_device, split_batch
from .specs import InputError, InputSpec, named_tensors, specs_from_inputs

__all__ = ["wrap", "Wrapped", "TensorSpec", "InputError", "eval_mode"]


def eval_mode(model: Any) -> Any:
    """``model.eval()`` where the module supports it (an ExportedProgram's module() refuses: it has no train mode)."""
    if isinstance(model, nn.Module):
        try:
            model.eval()
        except NotImplementedError:
            pass
    return model


# one spec type for every input check in torchfast; the wrapper's earlier name stays importable
TensorSpec = InputSpec


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

    # (positional names, keyword names) of the example call; None: the caller's form is passed on as it is
    _example_form: tuple[tuple[str, ...], tuple[str, ...]] | None = None

    def __init__(self, model: Callable, signature: inspect.Signature | None, specs: dict[str, InputSpec],
                 device: torch.device | None, move_inputs: bool, cast_inputs: bool, outputs_to_input_device: bool,
                 inference_mode: bool, example_form: tuple[tuple[str, ...], tuple[str, ...]] | None = None) -> None:
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
        self._example_form = example_form

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
        spec.check_shape(x)
        want = spec.torch_dtype
        if x.dtype != want:
            floating = x.is_floating_point() and want.is_floating_point
            if self.cast_inputs and floating:
                x = x.to(want)
            else:
                spec.check_dtype(x, " (wrap(..., cast_inputs=True) casts floating inputs)" if floating else "")
        if self.device is not None and x.device != self.device:
            if not self.move_inputs:
                raise InputError(f"input {path!r}: expected device {self.device}, got {x.device}")
            x = x.to(self.device, non_blocking=True)
        return x

    def _prepare(self, name: str, value: Any, seen: list) -> Any:
        def leaf_fn(prefix: str):
            counter = iter(p for p, _ in named_tensors(prefix, value))
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
            args, kwargs = self._as_called(bound, len(args))
        if self.use_inference_mode:
            with torch.inference_mode():
                out = self.inner(*args, **kwargs)
        else:
            out = self.inner(*args, **kwargs)
        if seen and self.outputs_to_input_device:
            back = seen[0]
            out = _map(out, lambda t: t.to(back))
        return out

    def _as_called(self, bound: inspect.BoundArguments, n_positional: int) -> tuple[tuple, dict]:
        """The bound (checked) arguments in the form the example was given when they name the same inputs
        (engines compiled from a dict batch take keywords only, traced ones positionals only), else in the
        form the caller used."""
        params = self._sig.parameters
        by_name: dict[str, Any] = {}
        for name, value in bound.arguments.items():
            kind = params[name].kind
            if kind is inspect.Parameter.VAR_KEYWORD:
                by_name.update(value)
            elif kind is not inspect.Parameter.VAR_POSITIONAL:
                by_name[name] = value
            elif value:
                by_name = {}
                break
        form = self._example_form
        if form is not None and by_name and set(by_name) == set(form[0]) | set(form[1]):
            return tuple(by_name[n] for n in form[0]), {n: by_name[n] for n in form[1]}
        return _caller_form(self._sig, bound, n_positional)

    def extra_repr(self) -> str:
        spec = ", ".join(f"{s.name}: {s.shape_str()} {s.dtype}" for s in self.input_spec.values())
        return f"inputs=({spec}), device={self.device}"


def _caller_form(sig: inspect.Signature, bound: inspect.BoundArguments, n_positional: int) -> tuple[tuple, dict]:
    """What came by position goes on by position (``*args`` included), what came by keyword by keyword."""
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    i = 0
    for name, value in bound.arguments.items():
        kind = sig.parameters[name].kind
        if kind is inspect.Parameter.VAR_POSITIONAL:
            args.extend(value)
        elif kind is inspect.Parameter.VAR_KEYWORD:
            kwargs.update(value)
        elif kind in positional and (kind is inspect.Parameter.POSITIONAL_ONLY or i < n_positional):
            args.append(value)
        else:
            kwargs[name] = value
        i += kind in positional
    return tuple(args), kwargs


def _form_of(sig: inspect.Signature, bound: inspect.BoundArguments,
             n_positional: int) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
    """(positional names, keyword names) of a call; None where positionals went to ``*args`` (no names)."""
    if any(sig.parameters[n].kind is inspect.Parameter.VAR_POSITIONAL and v for n, v in bound.arguments.items()):
        return None
    args, kwargs = _caller_form(sig, bound, n_positional)
    return tuple(list(bound.arguments)[:len(args)]), tuple(kwargs)


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
    specs: dict[str, InputSpec] = {}
    form = None
    if example_inputs is not None:
        args, kwargs = split_batch(example_inputs)
        named: list[tuple[str, Any]]
        if sig is not None:
            try:
                bound = sig.bind(*args, **kwargs)
            except TypeError as e:
                raise TypeError(f"example_inputs do not fit the model's forward{sig}: {e}") from None
            form = _form_of(sig, bound, len(args))
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
        specs = specs_from_inputs(named, dynamic_dims)
        if dev is None:
            devs = {t.device for name, value in named for _, t in named_tensors(name, value)}
            dev = devs.pop() if len(devs) == 1 else None
    return Wrapped(model, sig, specs, dev, move_inputs, cast_inputs, outputs_to_input_device, inference_mode, form)
