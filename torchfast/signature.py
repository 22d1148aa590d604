"""What a saved artifact takes and returns, written inside it, so that it loads and serves with no flags.

``torchfast.save(model, path, example_inputs=x)`` records a :class:`Signature`: each input's name (the
forward's parameter names, or the keys of keyword inputs), its shape with the batch dim and every dim the
artifact accepts at any size as -1, its dtype, and the output names a server answers with. It is a small
JSON member of the archive (``extra/torchfast_signature.json``: TorchScript ``_extra_files``, the
ExportedProgram's ``extra_files``); ONNX and OpenVINO files declare their inputs in the graph itself.

Reading it never unpickles anything: :func:`read_signature` opens the zip, reads that one member as JSON
and validates every field (sizes, names, dtypes), so it is as safe as reading a text file.
"""
from __future__ import annotations

import inspect
import io
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from .errors import TorchfastError
from .specs import InputSpec, SpecError, dtype_name

__all__ = ["Signature", "SignatureError", "SIGNATURE_FILE", "read_signature", "signature_from_example",
           "signature_from_program", "output_names"]

SIGNATURE_FILE = "torchfast_signature.json"
_VERSION = 1
_MAX_BYTES = 1 << 20
_MAX_ENTRIES = 1024
_MAX_NAME = 256


class SignatureError(TorchfastError, ValueError):
    """An artifact's recorded signature is not one torchfast writes; the message names the file and field."""


@dataclass(frozen=True)
class Signature:
    """Inputs (in call order), output names, and whether the model takes its inputs by keyword."""

    inputs: tuple[InputSpec, ...]
    outputs: tuple[str, ...] = ()
    keyword_inputs: bool = False

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.inputs)

    @property
    def fixed_batch(self) -> int | None:
        """The batch size every input requires, when the artifact takes only one (None: any size)."""
        sizes = {s.batch for s in self.inputs if s.batched}
        return sizes.pop() if len(sizes) == 1 and -1 not in sizes else None

    def to_dict(self) -> dict[str, Any]:
        inputs = []
        for s in self.inputs:
            d = s.to_dict()
            if not s.batched:
                d["batched"] = False
            inputs.append(d)
        return {"version": _VERSION, "inputs": inputs, "outputs": list(self.outputs),
                "keyword_inputs": self.keyword_inputs}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_dict(cls, doc: Any, where: str = "signature") -> "Signature":
        """Validate a parsed signature (it comes from a file: every field is checked)."""
        def bad(field: str, why: str) -> SignatureError:
            return SignatureError(f"{where}: field {field}: {why}")
        if not isinstance(doc, dict):
            raise bad("<root>", "must be an object")
        if doc.get("version") != _VERSION:
            raise bad("version", f"must be {_VERSION} (written by this torchfast), got {str(doc.get('version'))[:20]}")
        raw_inputs, raw_outputs = doc.get("inputs"), doc.get("outputs", [])
        if not isinstance(raw_inputs, list) or not raw_inputs or len(raw_inputs) > _MAX_ENTRIES:
            raise bad("inputs", f"must be a list of 1 to {_MAX_ENTRIES} inputs")
        if not isinstance(raw_outputs, list) or len(raw_outputs) > _MAX_ENTRIES:
            raise bad("outputs", f"must be a list of at most {_MAX_ENTRIES} names")
        keyword = doc.get("keyword_inputs", False)
        if not isinstance(keyword, bool):
            raise bad("keyword_inputs", "must be true or false")
        specs = []
        for i, e in enumerate(raw_inputs):
            if not isinstance(e, dict):
                raise bad(f"inputs[{i}]", "must be an object")
            name, shape, dtype = e.get("name"), e.get("shape"), e.get("dtype", "float32")
            _check_name(name, f"inputs[{i}].name", bad)
            if not isinstance(dtype, str) or len(dtype) > 32:
                raise bad(f"inputs[{i}].dtype", "must be a dtype name")
            if not isinstance(shape, list) or len(shape) > 64 or any(type(d) is not int for d in shape):
                raise bad(f"inputs[{i}].shape", "must be a list of at most 64 integers")
            batched = e.get("batched", True)
            if not isinstance(batched, bool) or (batched and not shape):
                raise bad(f"inputs[{i}].batched", "must be true (with a batch dim in shape) or false")
            top = e.get("max_shape")
            if top is not None and (not isinstance(top, list) or len(top) != len(shape)
                                    or any(t is not None and type(t) is not int for t in top)):
                raise bad(f"inputs[{i}].max_shape", "must give an integer or null for each dim of shape")
            try:
                if batched:
                    spec = InputSpec(name, tuple(shape[1:]), dtype, tuple(top[1:]) if top else None,
                                     batch=shape[0])
                else:
                    spec = InputSpec(name, tuple(shape), dtype, tuple(top) if top else None, batch=None)
            except SpecError as err:
                raise bad(f"inputs[{i}]", str(err)) from None
            specs.append(spec)
        if len({s.name for s in specs}) != len(specs):
            raise bad("inputs", "input names must be unique")
        for i, o in enumerate(raw_outputs):
            _check_name(o, f"outputs[{i}]", bad)
        return cls(tuple(specs), tuple(raw_outputs), keyword)

    @classmethod
    def from_json(cls, text: str | bytes, where: str = "signature") -> "Signature":
        if len(text) > _MAX_BYTES:
            raise SignatureError(f"{where}: {len(text)} bytes, more than a signature's {_MAX_BYTES}")
        try:
            doc = json.loads(text, parse_constant=_no_constant)
        except (ValueError, RecursionError, UnicodeDecodeError) as e:
            raise SignatureError(f"{where}: not the JSON torchfast writes ({type(e).__name__})") from None
        return cls.from_dict(doc, where)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def _check_name(name: Any, field: str, bad) -> None:
    if not isinstance(name, str) or not name or len(name) > _MAX_NAME or not name.isprintable():
        raise bad(field, f"must be a printable name of 1 to {_MAX_NAME} characters")


# ---------------------------------------------------------------- reading
def read_signature(path: str | Path, data: bytes | None = None) -> Signature | None:
    """The signature recorded inside a TorchScript / ExportedProgram archive; None when it has none.

    Reads one JSON member of the zip (never a pickle, never torch's loaders); ``data`` is the file's bytes
    when the caller already holds them (so what is checked is what is loaded).
    """
    path = Path(path)
    raw = data if data is not None else path.read_bytes()
    if not zipfile.is_zipfile(io.BytesIO(raw)):
        return None
    with zipfile.ZipFile(io.BytesIO(raw)) as zf:
        members = [i for i in zf.infolist() if i.filename.split("/", 1)[-1] == f"extra/{SIGNATURE_FILE}"]
        if not members:
            return None
        if len(members) > 1 or members[0].file_size > _MAX_BYTES:
            raise SignatureError(f"{path}: {members[0].filename}: more than one signature, or one of more "
                                 f"than {_MAX_BYTES} bytes")
        with zf.open(members[0]) as f:
            text = f.read(_MAX_BYTES + 1)
    return Signature.from_json(text, f"{path}: {members[0].filename}")


# ---------------------------------------------------------------- building
def output_names(out: Any) -> tuple[str, ...]:
    """The names a server answers with: ``output`` for one tensor, a dict's keys, ``output_i`` for a tuple."""
    if isinstance(out, torch.Tensor):
        return ("output",)
    if isinstance(out, Mapping):
        return tuple(str(k) for k, v in out.items() if isinstance(v, torch.Tensor))
    if isinstance(out, (tuple, list)):
        return tuple(f"output_{i}" for i, v in enumerate(out) if isinstance(v, torch.Tensor))
    return ()


def _call_names(model: Any, n_args: int) -> list[str] | None:
    """The names of the first ``n_args`` parameters of the model's forward (a ScriptModule's from its schema)."""
    fwd = getattr(model, "forward", model)
    schema = getattr(fwd, "schema", None)
    if isinstance(model, torch.jit.ScriptModule) and schema is not None:
        names = [a.name for a in schema.arguments[1:]]
        return names[:n_args] if len(names) >= n_args else None
    try:
        params = list(inspect.signature(fwd).parameters.values())
    except (TypeError, ValueError):
        return None
    names = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(names) >= n_args:
        return names[:n_args]
    return None


def signature_from_example(model: Any, example_inputs: Any, *, dynamic_dims: Sequence[int] = (0,),
                           dtype: torch.dtype | None = None, outputs: Sequence[str] | None = None,
                           specs: Mapping[str, InputSpec] | None = None) -> Signature | None:
    """The signature of ``model`` called on ``example_inputs`` (a tensor, a tuple of positional tensors or a
    dict of keyword tensors): dims in ``dynamic_dims`` (the batch dim by default) become -1; floating inputs
    get ``dtype`` when given (a model compiled for fp16). ``specs`` (a drop-in wrapper's checked inputs)
    replace the derived ones by name. ``outputs``: the output names, else found by running the model once.
    None when an input is not a plain tensor (nothing a server could send)."""
    from .modules import call_model, split_batch
    args, kwargs = split_batch(example_inputs)
    if not all(isinstance(a, torch.Tensor) for a in [*args, *kwargs.values()]) or not (args or kwargs):
        return None
    if args and kwargs:
        return None   # a server calls a model either positionally or by keyword
    names = list(kwargs) if kwargs else _call_names(model, len(args))
    if names is None:
        names = ["input"] if len(args) == 1 else [f"input_{i}" for i in range(len(args))]
    tensors = list(kwargs.values()) if kwargs else list(args)
    built = []
    for name, t in zip(names, tensors):
        if specs and name in specs:
            built.append(specs[name])
            continue
        dt = dtype if dtype is not None and t.is_floating_point() else None
        built.append(InputSpec.from_tensor(name, t, dynamic_dims=dynamic_dims, dtype=dt))
    if outputs is None:
        try:
            with torch.inference_mode():
                outputs = output_names(call_model(model, example_inputs))
        except Exception:  # noqa: BLE001 - the names are a convenience; the artifact is saved anyway
            outputs = ()
    return Signature(tuple(built), tuple(outputs), bool(kwargs))


def signature_from_program(ep: Any) -> Signature | None:
    """What an ExportedProgram accepts, from the program itself: its user inputs (dynamic dims -1, each with
    the upper bound of its range where it has one), dtypes, output names from its output structure.
    None for a program whose inputs are nested (tuples or dicts inside an argument)."""
    in_spec, out_spec = ep.call_spec.in_spec, ep.call_spec.out_spec
    try:
        arg_spec, kw_spec = in_spec.children_specs
        if not all(c.is_leaf() for c in [*arg_spec.children_specs, *kw_spec.children_specs]):
            return None
        n_kwargs = len(kw_spec.children_specs)
        kw_names = list(kw_spec.context or [])
    except (AttributeError, ValueError):
        return None
    user = [s for s in ep.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
    nodes = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    n_args = len(user) - n_kwargs
    specs = []
    for i, s in enumerate(user):
        val = nodes[s.arg.name].meta.get("val")
        if val is None or not hasattr(val, "shape"):
            return None
        name = kw_names[i - n_args] if i >= n_args else s.arg.name
        dims = [d if isinstance(d, int) else -1 for d in val.shape]
        tops = [None if isinstance(d, int) else _upper_bound(ep, d) for d in val.shape]
        top = tuple(tops[1:]) if any(t is not None for t in tops[1:]) else None
        if not dims:
            specs.append(InputSpec(name, (), dtype_name(val.dtype), batch=None))
        else:
            specs.append(InputSpec(name, tuple(dims[1:]), dtype_name(val.dtype), top, batch=dims[0]))
    if not specs:
        return None
    return Signature(tuple(specs), _names_from_spec(out_spec), n_args == 0)


def _names_from_spec(spec: Any) -> tuple[str, ...]:
    try:
        if spec.is_leaf():
            return ("output",)
        if spec.type is dict or (isinstance(spec.type, type) and issubclass(spec.type, Mapping)):
            return tuple(str(k) for k, c in zip(spec.context, spec.children_specs) if c.is_leaf())
        if spec.type in (tuple, list):
            return tuple(f"output_{i}" for i, c in enumerate(spec.children_specs) if c.is_leaf())
    except (AttributeError, TypeError):
        pass
    return ()


def _upper_bound(ep: Any, dim: Any) -> int | None:
    """The largest size the program accepts for a dynamic dim (None when unbounded)."""
    try:
        rng = ep.range_constraints.get(dim.node.expr)
        upper = int(rng.upper) if rng is not None and rng.upper.is_finite else None
    except (AttributeError, TypeError, ValueError):
        return None
    return upper if upper is not None and 0 < upper < (1 << 62) else None
