"""What a model takes: one input description and one dtype vocabulary for the whole library.

A drop-in wrapper, a server, an engine artifact and the TensorRT compiler all need to say "this input is
named X, has these dims (some of any size) and this dtype", and to reject a tensor that does not fit with
an error naming the input, the expected and the received shape or dtype. :class:`InputSpec` is that
description; :func:`parse_dtype` reads every dtype spelling users write (``"fp16"``, ``"half"``,
``torch.float16``), so a dtype accepted in one place is accepted everywhere.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping

import torch

from .errors import TorchfastError

__all__ = ["InputSpec", "InputError", "SpecError", "parse_dtype", "dtype_name", "DTYPES",
           "specs_from_inputs", "named_tensors"]


class SpecError(TorchfastError, ValueError):
    """An input spec or a dtype name is invalid; the message names the input or the value."""


class InputError(TorchfastError, ValueError):
    """A tensor does not match the input it was given for; the message names the input."""


# canonical name -> (dtype, other spellings users write)
_SPELLINGS: dict[str, tuple[torch.dtype, tuple[str, ...]]] = {
    "float32": (torch.float32, ("fp32", "float")),
    "float16": (torch.float16, ("fp16", "half")),
    "bfloat16": (torch.bfloat16, ("bf16",)),
    "float64": (torch.float64, ("fp64", "double")),
    "int64": (torch.int64, ("long",)),
    "int32": (torch.int32, ("int",)),
    "int16": (torch.int16, ("short",)),
    "int8": (torch.int8, ()),
    "uint8": (torch.uint8, ()),
    "bool": (torch.bool, ()),
}
DTYPES: dict[str, torch.dtype] = {name: dt for canon, (dt, alts) in _SPELLINGS.items() for name in (canon, *alts)}
_CANONICAL: dict[torch.dtype, str] = {dt: canon for canon, (dt, _) in _SPELLINGS.items()}
_SHORT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _accepted() -> str:
    return ", ".join(f"{c} ({', '.join(alts)})" if alts else c for c, (_, alts) in _SPELLINGS.items())


def parse_dtype(value: str | torch.dtype, what: str = "dtype") -> torch.dtype:
    """A torch dtype from a torch dtype or a name users write (``"fp16"``, ``"torch.float16"``, ``"half"``;
    any other torch dtype by its name, such as ``"float8_e4m3fn"``).

    ``what`` names the setting in the error (e.g. ``"--input-dtype"``), which lists every accepted name.
    """
    if isinstance(value, torch.dtype):
        return value
    if isinstance(value, str):
        key = value.strip().lower().removeprefix("torch.")
        dt = DTYPES.get(key, vars(torch).get(key))  # vars: a name never imports a torch submodule
        if isinstance(dt, torch.dtype):  # the table's spellings, then any other torch dtype by name
            return dt
    raise SpecError(f"unknown {what} {value!r}; use a torch.dtype or one of: {_accepted()}")


def dtype_name(dtype: str | torch.dtype, short: bool = False) -> str:
    """The canonical name of a dtype (``"float16"``); ``short=True`` gives fp32/fp16/bf16 for those three."""
    dt = parse_dtype(dtype)
    if short and dt in _SHORT:
        return _SHORT[dt]
    return _CANONICAL.get(dt, str(dt).removeprefix("torch."))


@dataclass(frozen=True)
class InputSpec:
    """One model input: its name, per-row shape (the dims after the batch dim; -1 = any size) and dtype.

    ``batch`` is the batch dim: -1 (default) for any number of rows, a positive size when the model takes
    exactly that many, None when the input has no batch dim (``shape`` is then the whole shape).
    ``max_shape`` bounds the ``-1`` dims of ``shape`` (None = unbounded), from the model's own limit where it
    has one (a transformer's maximum positions, an ExportedProgram's dynamic-dim range): one oversized
    request must not pad a whole batch up to its length. ``dtype`` accepts any :func:`parse_dtype`
    spelling and is stored as its canonical name (``"fp16"`` -> ``"float16"``).
    """

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"
    max_shape: tuple[int | None, ...] | None = None
    batch: int | None = -1

    def __post_init__(self) -> None:
        name = str(self.name)
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "dtype", dtype_name(parse_dtype(self.dtype, f"dtype for input {name!r}:")))
        try:
            shape = tuple(self.shape)
        except TypeError:
            raise SpecError(f"input {name!r}: shape must be a sequence of sizes, got {self.shape!r}") from None
        if any(isinstance(d, bool) or not isinstance(d, int) or d < -1 or d == 0 for d in shape):
            raise SpecError(f"input {name!r}: shape {shape} must hold positive sizes or -1")
        object.__setattr__(self, "shape", shape)
        if self.batch is not None and (isinstance(self.batch, bool) or not isinstance(self.batch, int)
                                       or self.batch < -1 or self.batch == 0):
            raise SpecError(f"input {name!r}: batch must be -1 (any size), a positive size or None (no batch "
                            f"dim), got {self.batch!r}")
        if self.max_shape is not None:
            top = tuple(self.max_shape)
            if len(top) != len(shape) or any(m is not None and (isinstance(m, bool) or not isinstance(m, int)
                                                                or m < 1) for m in top):
                raise SpecError(f"input {name!r}: max_shape {top} must give a positive size or None for each "
                                f"of the {len(shape)} dims of {shape}")
            object.__setattr__(self, "max_shape", top)

    # ------------------------------------------------------------ reading
    @property
    def torch_dtype(self) -> torch.dtype:
        return parse_dtype(self.dtype)

    @property
    def batched(self) -> bool:
        return self.batch is not None

    def dims(self) -> tuple[int, ...]:
        """The whole expected shape, batch dim included (-1 = any size)."""
        return ((self.batch,) if self.batched else ()) + self.shape

    def shape_str(self) -> str:
        """``[batch, 3, *]``: how errors and reprs show the shape ('*' = any size)."""
        head = ([] if not self.batched else ["batch" if self.batch == -1 else str(self.batch)])
        return "[" + ", ".join(head + ["*" if d == -1 else str(d) for d in self.shape]) + "]"

    def to_dict(self) -> dict[str, Any]:
        """The spec as plain JSON: ``shape`` with the batch dim first (-1 = any size)."""
        d: dict[str, Any] = {"name": self.name, "shape": list(self.dims()), "dtype": self.dtype}
        if self.max_shape is not None and any(m is not None for m in self.max_shape):
            d["max_shape"] = ([None] if self.batched else []) + list(self.max_shape)
        return d

    # ------------------------------------------------------------ checking
    def check_shape(self, t: torch.Tensor) -> None:
        """Raise InputError naming the input, the expected and the received shape."""
        if not isinstance(t, torch.Tensor):
            raise InputError(f"input {self.name!r} must be a tensor, got {type(t).__name__}")
        want = self.dims()
        if t.dim() != len(want) or any(w != -1 and w != g for w, g in zip(want, t.shape)):
            raise InputError(f"input {self.name!r} must have shape {self.shape_str()}, got {list(t.shape)}")
        off = 1 if self.batched else 0
        for i, (d, m) in enumerate(zip(self.shape, self.max_shape or ())):
            if d == -1 and m is not None and t.shape[i + off] > m:
                raise InputError(f"input {self.name!r} has size {t.shape[i + off]} in dim {i + off}, above the "
                                 f"model's maximum of {m}")

    def check_dtype(self, t: torch.Tensor, hint: str = "") -> None:
        """Raise InputError naming the input, the expected and the received dtype (``hint`` says how to fix)."""
        if t.dtype != self.torch_dtype:
            raise InputError(f"input {self.name!r} must have dtype {self.dtype}, got {dtype_name(t.dtype)}{hint}")

    def check(self, t: torch.Tensor) -> None:
        """Raise InputError when ``t`` does not fit: shape (and the dynamic dims' maxima), then dtype."""
        self.check_shape(t)
        self.check_dtype(t)

    # ------------------------------------------------------------ building
    def example(self, rows: int = 1) -> torch.Tensor:
        """A valid tensor of ``rows`` rows (zeros; ones for integer inputs; 8, or the maximum, for any-size dims)."""
        tops = self.max_shape or (None,) * len(self.shape)
        head = [] if not self.batched else [rows if self.batch == -1 else self.batch]
        shape = head + [d if d != -1 else min(8, m or 8) for d, m in zip(self.shape, tops)]
        dt = self.torch_dtype
        return torch.zeros(shape, dtype=dt) if dt.is_floating_point else torch.ones(shape, dtype=dt)

    @classmethod
    def from_tensor(cls, name: str, t: torch.Tensor, *, dynamic_dims: Iterable[int] = (0,), batched: bool = True,
                    dtype: str | torch.dtype | None = None) -> "InputSpec":
        """The spec an example tensor satisfies: dim 0 is the batch dim (any size when 0 is in ``dynamic_dims``,
        else exactly the example's), the other ``dynamic_dims`` any size. ``batched=False`` (or a 0-d tensor):
        no batch dim. ``dtype`` overrides the tensor's (e.g. the compute dtype of a cast model)."""
        if not isinstance(t, torch.Tensor):
            raise SpecError(f"input {name!r} must be a tensor, got {type(t).__name__}")
        n = t.dim()
        dyn = {int(d) % n for d in dynamic_dims if -n <= int(d) < n} if n else set()
        full = tuple(-1 if i in dyn else s for i, s in enumerate(t.shape))
        dt = t.dtype if dtype is None else dtype
        if not batched or n == 0:
            return cls(name, full, dt, batch=None)
        return cls(name, full[1:], dt, batch=-1 if 0 in dyn else t.shape[0])

    @classmethod
    def from_dims(cls, name: str, dims: Iterable[int], dtype: str | torch.dtype) -> "InputSpec":
        """The spec of a whole declared shape, batch dim first (-1 = any size), as an engine declares it."""
        dims = tuple(dims)
        if not dims:
            return cls(name, (), dtype, batch=None)
        return cls(name, dims[1:], dtype, batch=dims[0])


def named_tensors(name: str, value: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """(path, tensor) for the tensors inside an argument: ``x``, ``pair[1]``, ``batch['mask']``."""
    if isinstance(value, torch.Tensor):
        yield name, value
    elif isinstance(value, Mapping):
        for k, v in value.items():
            yield from named_tensors(f"{name}[{k!r}]", v)
    elif isinstance(value, (tuple, list)):
        for i, v in enumerate(value):
            yield from named_tensors(f"{name}[{i}]", v)


def _dynamic_for(path: str, dynamic_dims: Iterable[int] | Mapping[str, Iterable[int]]) -> tuple[int, ...]:
    if isinstance(dynamic_dims, Mapping):
        root = path.split("[", 1)[0]
        dims = dynamic_dims.get(path, dynamic_dims.get(root, (0,)))
    else:
        dims = dynamic_dims
    return tuple(int(d) for d in (dims or ()))


def specs_from_inputs(named: Iterable[tuple[str, Any]],
                      dynamic_dims: Iterable[int] | Mapping[str, Iterable[int]] = (0,)) -> dict[str, InputSpec]:
    """Specs for every tensor inside named example arguments, keyed by path (see :func:`named_tensors`).

    ``dynamic_dims``: the dims of any size, for every tensor, or per argument name / path as a mapping
    (``{"input_ids": (0, 1)}``; unnamed ones keep the batch dim 0 dynamic).
    """
    dims = dynamic_dims if isinstance(dynamic_dims, Mapping) else tuple(dynamic_dims or ())
    specs: dict[str, InputSpec] = {}
    for name, value in named:
        for path, t in named_tensors(name, value):
            specs[path] = InputSpec.from_tensor(path, t, dynamic_dims=_dynamic_for(path, dims))
    return specs
