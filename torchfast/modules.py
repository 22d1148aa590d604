"""Finding and swapping submodules by qualified name, and calling a model on a batch.

Every transform needs the same four things: find the layers it may touch, replace them by their
qualified names, run the model on a user batch whatever its form (tensor, tuple, dict), and leave
the user's model as it was when it fails (train/eval flags, all-or-none swaps).
"""
from __future__ import annotations

import contextlib
import copy
import itertools
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

from .errors import TorchfastError
from .specs import dtype_name


def check_module(model: Any, what: str = "model") -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{what} must be a torch.nn.Module, got {type(model).__name__}")
    return model


def get_submodule(model: nn.Module, name: str) -> nn.Module:
    if name == "":
        return model
    try:
        return model.get_submodule(name)
    except AttributeError as e:
        raise KeyError(f"no submodule named {name!r} in {type(model).__name__}") from e


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at ``name`` (dotted path, list indices allowed) with ``new``."""
    if name == "":
        raise ValueError("cannot replace the root module in place; use the returned model instead")
    parent_name, _, child = name.rpartition(".")
    parent = get_submodule(model, parent_name)
    if not hasattr(parent, child) and child not in parent._modules:
        raise KeyError(f"no submodule named {name!r} in {type(model).__name__}")
    setattr(parent, child, new)


def shared_twin(model: nn.Module) -> nn.Module:
    """A structural copy of ``model`` that shares every parameter and buffer tensor (no weight memory).

    It keeps the original layers alive while an in-place transform swaps them out of ``model`` (so the float
    model can still be timed and put back), and gives an in-place transform a tree to build and check its
    result on before it touches ``model``. Changing a shared tensor's values changes ``model``'s.
    """
    memo: dict[int, Any] = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


def maybe_copy(model: nn.Module, inplace: bool) -> nn.Module:
    return model if inplace else copy.deepcopy(model)


def model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def model_dtype(model: nn.Module) -> torch.dtype:
    for t in model.parameters():
        if t.is_floating_point():
            return t.dtype
    return torch.float32


# ---------------------------------------------------------------- batches
Batch = Any  # a Tensor, a tuple/list of positional inputs, or a dict of keyword inputs


def split_batch(batch: Batch) -> tuple[tuple, dict]:
    """Normalize a user batch into (args, kwargs)."""
    if isinstance(batch, Mapping):
        return (), dict(batch)
    if isinstance(batch, (tuple, list)):
        return tuple(batch), {}
    return (batch,), {}


def call_model(model: Callable, batch: Batch) -> Any:
    args, kwargs = split_batch(batch)
    return model(*args, **kwargs)


def move_batch(batch: Batch, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Batch:
    """Move every floating tensor in a batch (tensors, tuples, dicts) to device/dtype."""
    def mv(x):
        if isinstance(x, torch.Tensor):
            kw = {}
            if device is not None:
                kw["device"] = device
            if dtype is not None and x.is_floating_point():
                kw["dtype"] = dtype
            return x.to(**kw) if kw else x
        if isinstance(x, Mapping):
            return {k: mv(v) for k, v in x.items()}
        if isinstance(x, (tuple, list)):
            return type(x)(mv(v) for v in x)
        return x
    return mv(batch)


def first_tensor(out: Any) -> torch.Tensor:
    """The main tensor of a model output: itself, the first of a tuple, ``last_hidden_state``/``logits``."""
    if isinstance(out, torch.Tensor):
        return out
    for attr in ("logits", "last_hidden_state"):
        if hasattr(out, attr) and isinstance(getattr(out, attr), torch.Tensor):
            return getattr(out, attr)
    if isinstance(out, Mapping):
        for v in out.values():
            try:
                return first_tensor(v)
            except TypeError:
                continue
    if isinstance(out, Sequence) and not isinstance(out, str):
        for v in out:
            try:
                return first_tensor(v)
            except TypeError:
                continue
    raise TypeError(f"model output of type {type(out).__name__} holds no tensor")


def batches_list(batches: Iterable[Batch] | Batch | None) -> list[Batch]:
    """Accept a single tensor/tuple/dict batch or an iterable of them; return a list."""
    if batches is None:
        return []
    if isinstance(batches, (torch.Tensor, Mapping)):
        return [batches]
    if isinstance(batches, tuple):  # a tuple is one batch of positional inputs
        return [batches]
    return list(batches)


class ExampleInputError(TorchfastError, ValueError):
    """The model does not run on the example inputs it was given (wrong shape, dtype or form)."""


def describe_batch(batch: Batch) -> str:
    """``input 0: (2, 3, 8, 8) float32, input 'mask': (2, 8) int64``: what a batch holds, for error messages."""
    args, kwargs = split_batch(batch)
    items = [(f"input {i}", a) for i, a in enumerate(args)] + [(f"input {k!r}", v) for k, v in kwargs.items()]
    return ", ".join(f"{n}: {tuple(t.shape)} {dtype_name(t.dtype)}" if isinstance(t, torch.Tensor)
                     else f"{n}: {type(t).__name__}" for n, t in items)


def state_snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A cheap fingerprint of a model's tensors, for tests and for proving a failed transform changed nothing."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


def capture_inputs(model: nn.Module, names: list[str], batch: Batch) -> dict[str, tuple]:
    """Run ``model(batch)`` once in eval mode and record the positional inputs each named submodule received first.

    Eval mode: a capture must not update BatchNorm statistics or draw dropout masks.
    """
    seen: dict[str, tuple] = {}
    hooks = []
    for name in names:
        mod = model.get_submodule(name)

        def hook(m, args, _name=name):
            if _name not in seen:
                seen[_name] = tuple(a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args)
        hooks.append(mod.register_forward_pre_hook(hook))
    try:
        with torch.inference_mode(), evaluating(model):
            call_model(model, batch)
    except Exception as e:
        raise ExampleInputError(f"{type(model).__name__} fails on the example inputs ({describe_batch(batch)}): "
                                f"{type(e).__name__}: {e}") from e
    finally:
        for h in hooks:
            h.remove()
    return seen


# ---------------------------------------------------------------- leaving the user's model as it was
def training_flags(*models: nn.Module) -> dict[nn.Module, bool]:
    """Every submodule's own train/eval flag; ``restore_training_flags`` puts them back.

    ``model.train(was)`` would reset them all to the root's flag and lose a user's mixed modes,
    e.g. a frozen BatchNorm left in eval inside a model that is training.
    """
    return {m: m.training for model in models for m in model.modules()}


def restore_training_flags(flags: Mapping[nn.Module, bool]) -> None:
    for m, t in flags.items():
        m.training = t


@contextlib.contextmanager
def evaluating(*models: nn.Module) -> Iterator[None]:
    """Run the block with ``models`` in eval mode, then give every submodule back its own train/eval flag."""
    flags = training_flags(*models)
    try:
        for model in models:
            model.eval()
        yield
    finally:
        restore_training_flags(flags)


def swap_modules(model: nn.Module, replacements: Mapping[str, nn.Module]) -> None:
    """Replace several submodules by qualified name, all or none.

    Every name is resolved before the first swap, and a swap that raises puts back the ones already
    made, so a transform that commits its work this way never leaves a half-changed model.
    """
    slots = []
    for name, new in replacements.items():
        if name == "":
            raise ValueError("cannot replace the root module in place; use the returned model instead")
        parent_name, _, child = name.rpartition(".")
        parent = get_submodule(model, parent_name)
        if child not in parent._modules:
            raise KeyError(f"no submodule named {name!r} in {type(model).__name__}")
        slots.append((parent, child, parent._modules[child], new))
    done = []
    try:
        for parent, child, old, new in slots:
            setattr(parent, child, new)
            done.append((parent, child, old))
    except BaseException:
        for parent, child, old in reversed(done):
            parent._modules[child] = old
        raise


def weight_readers(model: nn.Module, names: list[str], batch: Batch) -> set[str]:
    """The named layers whose ``weight``/``bias`` the model's code reads outside the layer's own forward
    (``F.linear(x, self.qkv.weight)``): a quantized replacement packs those tensors, so such layers must
    stay float. Found by one eval-mode forward with attribute reads of those layers recorded."""
    layers = {id(model.get_submodule(n)): n for n in names}
    running: set[int] = set()
    readers: set[str] = set()
    hooks = []
    for n in names:
        mod = model.get_submodule(n)
        hooks.append(mod.register_forward_pre_hook(lambda m, a: running.add(id(m))))
        hooks.append(mod.register_forward_hook(lambda m, a, o: running.discard(id(m))))
    plain_getattr = nn.Module.__getattr__

    def probing_getattr(self: nn.Module, name: str) -> Any:
        if name in ("weight", "bias") and id(self) in layers and id(self) not in running:
            readers.add(layers[id(self)])
        return plain_getattr(self, name)
    nn.Module.__getattr__ = probing_getattr  # type: ignore[method-assign]
    try:
        with torch.inference_mode(), evaluating(model):
            call_model(model, batch)
    except Exception as e:
        raise ExampleInputError(f"{type(model).__name__} fails on the example inputs ({describe_batch(batch)}): "
                                f"{type(e).__name__}: {e}") from e
    finally:
        nn.Module.__getattr__ = plain_getattr  # type: ignore[method-assign]
        for h in hooks:
            h.remove()
    return readers
