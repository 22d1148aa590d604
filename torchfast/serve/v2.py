"""The Open Inference Protocol (KServe v2, as Triton, KServe, MLServer and Seldon speak it): its JSON
request to named tensors, model outputs back to its JSON answer, with the binary tensor extension.

A request is a JSON header ``{"id", "parameters", "inputs": [{"name", "shape", "datatype", "data" |
"parameters": {"binary_data_size"}}], "outputs": [{"name", "parameters": {"binary_data"}}]}``, optionally
followed by raw little-endian tensors (the header's length in ``Inference-Header-Content-Length``; BYTES
elements each with a 4-byte little-endian length prefix). ``parameters.timeout`` is Triton's per-request
deadline in microseconds; ``parameters.priority`` is Triton's level (1 highest, 0 the default). A datatype
the model does not declare is refused (400) with both named: nothing is cast behind the client's back.
A BYTES input of UTF-8 texts is meaningful for a model served with its tokenizer (MiniLM): it is
tokenized on the server into the tensors the model declares.
"""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..specs import dtype_name
from .codecs import HTTPError, list_to_tensor
from .model import ServedModel

VERSION = "1"
TEXT_INPUT = "text"
DATATYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool, "UINT8": torch.uint8, "UINT16": torch.uint16, "UINT32": torch.uint32,
    "UINT64": torch.uint64, "INT8": torch.int8, "INT16": torch.int16, "INT32": torch.int32, "INT64": torch.int64,
    "FP16": torch.float16, "FP32": torch.float32, "FP64": torch.float64, "BF16": torch.bfloat16}
_V2_NAME = {dt: name for name, dt in DATATYPES.items()}
_ALL = ", ".join([*DATATYPES, "BYTES"])
_MAX_DIMS = 16


def datatype_of(dtype: torch.dtype) -> str:
    """The v2 datatype of a torch dtype (``torch.float32`` -> ``"FP32"``)."""
    if dtype not in _V2_NAME:
        raise HTTPError(500, f"dtype {dtype_name(dtype)} has no Open Inference Protocol datatype; "
                             f"the protocol carries {_ALL}")
    return _V2_NAME[dtype]


@dataclass
class Requested:
    """What a v2 request asks for besides its tensors."""

    id: str | None = None
    timeout_ms: float | None = None
    priority: int | None = None            # Triton's level: 1 highest; None or 0: the default
    outputs: list[tuple[str, bool | None]] | None = None  # (name, binary or None = the default)
    binary_output: bool = False
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)


# ---------------------------------------------------------------- requests
def decode_request(served: ServedModel, body: bytes, header_length: str | None) -> Requested:
    """The tensors and options of a v2 infer request (HTTPError 400/422 naming the input on a bad one)."""
    head, blobs = _split(body, header_length)
    try:
        doc = json.loads(head)
    except RecursionError:
        raise HTTPError(400, "JSON header is nested too deeply to be an inference request") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise HTTPError(400, f"request header is not valid JSON: {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list) or not doc["inputs"]:
        raise HTTPError(400, 'an inference request is a JSON object with "inputs": a non-empty list of '
                             '{"name", "shape", "datatype", "data"}')
    req = Requested()
    if doc.get("id") is not None:
        if not isinstance(doc["id"], str):
            raise HTTPError(400, f'"id" must be a string, got {type(doc["id"]).__name__}')
        req.id = doc["id"][:256]
    _parameters(_dict(doc.get("parameters"), "request parameters"), req)
    req.outputs = _requested_outputs(doc.get("outputs"))
    declared = {s.name: s for s in served.inputs}
    offset, texts = 0, {}
    for i, inp in enumerate(doc["inputs"]):
        if not isinstance(inp, dict):
            raise HTTPError(400, f"inputs[{i}] must be an object with name, shape, datatype and data")
        name, shape, dt = inp.get("name"), inp.get("shape"), inp.get("datatype")
        if not isinstance(name, str) or not name:
            raise HTTPError(400, f"inputs[{i}] needs a \"name\" (a string)")
        where = f"input {name[:100]!r}"
        if name in req.tensors or name in texts:
            raise HTTPError(400, f"{where} is given twice")
        if (not isinstance(shape, list) or len(shape) > _MAX_DIMS
                or any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in shape)):
            raise HTTPError(400, f"{where}: \"shape\" must be a list of at most {_MAX_DIMS} sizes >= 0, "
                                 f"got {str(shape)[:100]}")
        spec = declared.get(name)
        want = "BYTES" if spec is None and name == TEXT_INPUT and served.tokenizer is not None else (
            datatype_of(spec.torch_dtype) if spec is not None else None)
        if not isinstance(dt, str) or (dt not in DATATYPES and dt != "BYTES"):
            raise HTTPError(400, f"{where}: unknown datatype {str(dt)[:30]!r}"
                                 + (f"; the model declares {want}" if want else "") + f" (datatypes: {_ALL})")
        if want is not None and dt != want:
            raise HTTPError(400, f"{where}: the model declares datatype {want}, the request sends {dt}")
        if want is None and dt == "BYTES":
            raise HTTPError(422, f"unknown input(s) [{name[:100]!r}]; model {served.name!r} takes "
                                 f"{sorted(declared)}")
        params = _dict(inp.get("parameters"), f"{where} parameters")
        if "shared_memory_region" in params:
            raise HTTPError(400, f"{where}: shared memory is not supported by this server; send the data in "
                                 f"the body (JSON \"data\" or binary_data_size)")
        n = math.prod(shape)
        size = params.get("binary_data_size")
        if size is not None:
            if isinstance(size, bool) or not isinstance(size, int) or size < 0 or offset + size > len(blobs):
                raise HTTPError(400, f"{where}: binary_data_size {size!r} does not fit the {len(blobs) - offset} "
                                     f"bytes left after the JSON header")
            raw, offset = blobs[offset:offset + size], offset + size
            value: Any = _from_bytes(where, raw, dt, n)
        elif "data" in inp:
            value = _from_json(name, where, inp["data"], dt, n)
        else:
            raise HTTPError(400, f"{where} has neither \"data\" nor parameters.binary_data_size")
        if dt == "BYTES":
            texts[name] = (value, shape)
        else:
            req.tensors[name] = value.reshape(shape)
    if offset != len(blobs):
        raise HTTPError(400, f"{len(blobs) - offset} bytes after the JSON header belong to no input "
                             f"(binary_data_size of the inputs sum to {offset})")
    for name, (value, shape) in texts.items():
        req.tensors.update(_tokenize(served, name, value, shape, req.tensors))
    return req


def _split(body: bytes, header_length: str | None) -> tuple[bytes, memoryview]:
    if header_length is None:
        return body, memoryview(b"")
    text = header_length.strip()
    if not text.isdigit() or not 0 < int(text) <= len(body):
        raise HTTPError(400, f"Inference-Header-Content-Length {header_length[:30]!r} must be a size in "
                             f"1..{len(body)} (the body's length)")
    n = int(text)
    return body[:n], memoryview(body)[n:]


def _dict(value: Any, what: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise HTTPError(400, f"{what} must be an object, got {type(value).__name__}")
    return value


def _parameters(p: dict, req: Requested) -> None:
    t = p.get("timeout")
    if t is not None:
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not (t > 0 and math.isfinite(t)):
            raise HTTPError(400, f"parameters.timeout must be a positive number of microseconds, got {str(t)[:50]}")
        req.timeout_ms = t / 1000.0
    prio = p.get("priority")
    if prio is not None:
        if isinstance(prio, bool) or not isinstance(prio, int) or prio < 0:
            raise HTTPError(400, f"parameters.priority must be an integer >= 0 (1 = highest, 0 = default), "
                                 f"got {str(prio)[:50]}")
        req.priority = prio
    b = p.get("binary_data_output", False)
    if not isinstance(b, bool):
        raise HTTPError(400, f"parameters.binary_data_output must be true or false, got {str(b)[:50]}")
    req.binary_output = b


def _requested_outputs(value: Any) -> list[tuple[str, bool | None]] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise HTTPError(400, f'"outputs" must be a list of {{"name", "parameters"}}, got {type(value).__name__}')
    out = []
    for i, o in enumerate(value):
        if not isinstance(o, dict) or not isinstance(o.get("name"), str):
            raise HTTPError(400, f"outputs[{i}] needs a \"name\" (a string)")
        p = _dict(o.get("parameters"), f"output {o['name'][:100]!r} parameters")
        if p.get("classification"):
            raise HTTPError(400, f"output {o['name'][:100]!r}: the classification extension is not supported")
        if "shared_memory_region" in p:
            raise HTTPError(400, f"output {o['name'][:100]!r}: shared memory is not supported by this server")
        b = p.get("binary_data")
        if b is not None and not isinstance(b, bool):
            raise HTTPError(400, f"output {o['name'][:100]!r}: binary_data must be true or false")
        out.append((o["name"], b))
    return out


def _from_json(name: str, where: str, data: Any, dt: str, n: int) -> Any:
    if not isinstance(data, list):
        raise HTTPError(400, f"{where}: \"data\" must be a list (flat, or nested as the shape), "
                             f"got {type(data).__name__}")
    if dt == "BYTES":
        flat = _flatten(where, data)
        if len(flat) != n or not all(isinstance(v, str) for v in flat):
            raise HTTPError(400, f"{where}: BYTES data must be {n} strings (the shape's size), got "
                                 f"{len(flat)} values")
        return [v.encode("utf-8") for v in flat]
    t = list_to_tensor(name[:100], data, DATATYPES[dt]).reshape(-1)
    if t.numel() != n:
        raise HTTPError(400, f"{where}: the shape holds {n} values, \"data\" has {t.numel()}")
    return t


def _flatten(where: str, data: list, depth: int = 0) -> list:
    if depth > _MAX_DIMS:
        raise HTTPError(400, f"{where}: data is nested deeper than {_MAX_DIMS} dims")
    out: list = []
    for v in data:
        out.extend(_flatten(where, v, depth + 1) if isinstance(v, list) else [v])
    return out


def _from_bytes(where: str, raw: memoryview, dt: str, n: int) -> Any:
    if dt == "BYTES":
        items, i = [], 0
        while i < len(raw):
            if i + 4 > len(raw):
                raise HTTPError(400, f"{where}: BYTES data ends inside a 4-byte length prefix")
            (size,) = struct.unpack_from("<I", raw, i)
            if i + 4 + size > len(raw):
                raise HTTPError(400, f"{where}: a BYTES element of {size} bytes runs past the input's data")
            items.append(bytes(raw[i + 4:i + 4 + size]))
            i += 4 + size
        if len(items) != n:
            raise HTTPError(400, f"{where}: the shape holds {n} elements, the BYTES data has {len(items)}")
        return items
    want = DATATYPES[dt]
    item = torch.empty((), dtype=want).element_size()
    if len(raw) != n * item:
        raise HTTPError(400, f"{where}: shape of {n} {dt} values needs {n * item} bytes, binary_data_size "
                             f"is {len(raw)}")
    if want == torch.bool:
        return torch.from_numpy(np.frombuffer(raw, dtype=np.uint8) != 0)
    if want == torch.bfloat16:
        return torch.from_numpy(np.frombuffer(raw, dtype="<u2").astype(np.uint16)).view(torch.bfloat16)
    arr = np.frombuffer(raw, dtype=np.dtype(dtype_name(want)).newbyteorder("<"))
    return torch.from_numpy(arr.astype(arr.dtype.newbyteorder("="), copy=True))  # writable, native order


def _tokenize(served: ServedModel, name: str, texts: list[bytes], shape: list[int],
              tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Texts of a BYTES input as the token tensors the model declares (pad to the longest, cut at its maximum)."""
    if tensors:
        raise HTTPError(400, f"send either the texts (BYTES input {name!r}) or the tensors "
                             f"{[s.name for s in served.inputs]}, not both")
    if not shape or math.prod(shape[1:]) != 1:
        raise HTTPError(422, f"input {name!r}: one text per row: shape [rows] or [rows, 1], got {shape}")
    try:
        strings = [t.decode("utf-8") for t in texts]
    except UnicodeDecodeError:
        raise HTTPError(400, f"input {name!r}: texts must be UTF-8") from None
    if not strings:
        raise HTTPError(422, f"input {name!r} holds no text")
    tops = [m for s in served.inputs for m in (s.max_shape or ()) if m]
    try:
        enc = served.tokenizer(strings, padding=True, truncation=True, max_length=min(tops) if tops else None,
                               return_tensors="pt")
    except Exception as e:  # noqa: BLE001 - the tokenizer refusing a text is the client's problem
        raise HTTPError(422, f"input {name!r}: the tokenizer refused the texts ({type(e).__name__}: "
                             f"{str(e)[:200]})") from None
    missing = [s.name for s in served.inputs if s.name not in enc]
    if missing:
        raise HTTPError(500, f"model {served.name!r}: its tokenizer gives no {missing}")
    return {s.name: enc[s.name].to(s.torch_dtype) for s in served.inputs}


# ---------------------------------------------------------------- answers
def encode_response(model: str, req: Requested, outs: dict[str, torch.Tensor]) -> tuple[bytes, int | None]:
    """The answer body and, when it carries binary tensors, its JSON header's length."""
    if req.outputs is None:
        chosen = [(k, req.binary_output) for k in outs]
    else:
        check_outputs(model, req.outputs, list(outs))
        chosen = [(k, req.binary_output if b is None else b) for k, b in req.outputs]
    entries, blobs = [], []
    for k, binary in chosen:
        t = outs[k].detach().cpu().contiguous()
        entry: dict[str, Any] = {"name": k, "datatype": datatype_of(t.dtype), "shape": list(t.shape)}
        if binary:
            raw = _to_bytes(t)
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            entry["data"], finite = _to_list(t)
            if not finite:
                entry["parameters"] = {"nonfinite": True}  # NaN/Inf are null in the data
        entries.append(entry)
    doc: dict[str, Any] = {"model_name": model, "model_version": VERSION, "outputs": entries}
    if req.id is not None:
        doc["id"] = req.id
    head = json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()
    if not blobs:
        return head, None
    return b"".join([head, *blobs]), len(head)


def check_outputs(model: str, requested: list[tuple[str, bool | None]], names: list[str]) -> None:
    unknown = [k[:100] for k, _ in requested if k not in names]
    if unknown:
        raise HTTPError(400, f"unknown output(s) {unknown[:8]}; model {model!r} gives {sorted(names)}")


def _to_bytes(t: torch.Tensor) -> bytes:
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    arr = t.numpy()
    return arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()


def _to_list(t: torch.Tensor) -> tuple[list, bool]:
    flat = (t.float() if t.dtype in (torch.float16, torch.bfloat16) else t).reshape(-1)
    if flat.is_floating_point() and not bool(torch.isfinite(flat).all()):
        obj = flat.numpy().astype(object)
        obj[~np.isfinite(flat.numpy())] = None
        return obj.tolist(), False
    return flat.tolist(), True


# ---------------------------------------------------------------- metadata
def describe_outputs(outs: dict[str, torch.Tensor], other: dict[str, torch.Tensor] | None = None) -> list[dict]:
    """Output metadata from one answer (batch dim -1); dims that differ in ``other`` (an answer to inputs
    of other dynamic sizes) are -1 too."""
    described = []
    for k, t in outs.items():
        dims = [-1] + [int(d) for d in t.shape[1:]]
        if other is not None and k in other and other[k].dim() == t.dim():
            dims = [-1 if i == 0 or a != b else a for i, (a, b) in enumerate(zip(dims, other[k].shape))]
        described.append({"name": k, "datatype": _V2_NAME.get(t.dtype, dtype_name(t.dtype)), "shape": dims})
    return described


def other_sizes(served: ServedModel) -> dict[str, torch.Tensor] | None:
    """A valid request whose dynamic non-batch dims differ from :meth:`ServedModel.example`'s (None: no such dims)."""
    if not any(-1 in s.shape for s in served.inputs):
        return None
    first = served.example()
    out = {}
    for s in served.inputs:
        tops = s.max_shape or (None,) * len(s.shape)
        dims = [d if d != -1 else max(1, min(5, m or 5, first[s.name].shape[i + 1] - 1))
                for i, (d, m) in enumerate(zip(s.shape, tops))]
        shape = [first[s.name].shape[0], *dims] if s.batched else dims
        dt = s.torch_dtype
        out[s.name] = torch.zeros(shape, dtype=dt) if dt.is_floating_point else torch.ones(shape, dtype=dt)
    return out


def platform_of(served: ServedModel) -> str:
    """How the model runs, in Triton's platform words where one fits."""
    m = served.model
    if isinstance(m, torch.jit.ScriptModule):
        return "pytorch_libtorch"
    kind = type(m).__name__.lower() + type(m).__module__.lower()
    for key, name in (("onnx", "onnxruntime_onnx"), ("openvino", "openvino"), ("graphmodule", "pytorch_export")):
        if key in kind:
            return name
    return "pytorch"


def model_metadata(served: ServedModel, outputs: list[dict] | None) -> dict[str, Any]:
    doc = {"name": served.name, "versions": [VERSION], "platform": platform_of(served),
           "inputs": [{"name": s.name, "datatype": datatype_of(s.torch_dtype), "shape": list(s.dims())}
                      for s in served.inputs],
           "outputs": outputs or []}
    if served.tokenizer is not None:
        # an alternative to the token inputs: UTF-8 texts, one per row, tokenized on the server
        doc["parameters"] = {"text_input": {"name": TEXT_INPUT, "datatype": "BYTES", "shape": [-1]}}
    return doc


def model_config(served: ServedModel, outputs: list[dict] | None, batching: dict) -> dict[str, Any]:
    """Triton's model configuration (``GET .../config``), which tools such as perf_analyzer read: shapes
    without the batch dim, the batcher's knobs as ``dynamic_batching``."""
    def tensor(name: str, datatype: str, dims: list[int]) -> dict:
        return {"name": name, "data_type": f"TYPE_{'STRING' if datatype == 'BYTES' else datatype}", "dims": dims}
    cfg: dict[str, Any] = {
        "name": served.name, "platform": platform_of(served), "max_batch_size": batching["max_batch_size"],
        "input": [tensor(s.name, datatype_of(s.torch_dtype), list(s.shape)) for s in served.inputs],
        "output": [tensor(o["name"], o["datatype"], o["shape"][1:]) for o in outputs or []],
        "dynamic_batching": {"max_queue_delay_microseconds": int(round(batching["max_delay_ms"] * 1000)),
                             "preferred_batch_size": batching["preferred_batch_sizes"]}}
    if batching.get("timeout_ms"):
        cfg["dynamic_batching"]["default_queue_policy"] = {
            "timeout_action": "REJECT", "default_timeout_microseconds": int(batching["timeout_ms"] * 1000),
            "allow_timeout_override": True, "max_queue_size": batching["max_queue_size"]}
    return cfg
