"""Request bodies to named tensors and model outputs back to bodies: JSON, ``.npy`` and safetensors.

Decoding is where a hostile body meets the server, so every failure here is the client's and becomes a
:class:`HTTPError` with a 4xx status that names the input, the dtype or the value: JSON nested past
any sane depth (400), ``.npy`` arrays of strings, records or objects (415), integers that would wrap in
the declared dtype and floats that would overflow it (422). Big-endian ``.npy`` arrays are converted,
not refused. Encoding never writes NaN/Infinity into JSON text: non-finite values become ``null`` in
the data, and the tensor's entry says so.
"""
from __future__ import annotations

import io
import json
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ..specs import dtype_name
from .model import ServedModel

NPY = "application/x-npy"
SAFETENSORS = "application/x-safetensors"


class HTTPError(Exception):
    """A request the server answers with ``status`` and a one-line ``message`` (never a traceback)."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


# ---------------------------------------------------------------- decoding
def decode_json(served: ServedModel, body: bytes) -> dict[str, torch.Tensor]:
    """``{"inputs": nested list}`` or ``{"inputs": {name: nested list}}`` -> tensors of the declared dtypes."""
    try:
        doc = json.loads(body)
    except RecursionError:
        raise HTTPError(400, "JSON body is nested too deeply to be a tensor") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise HTTPError(400, f"body is not valid JSON: {e}") from None
    if not isinstance(doc, dict) or "inputs" not in doc:
        raise HTTPError(400, 'JSON body must be an object with "inputs": a nested list, or {input name: nested list}')
    raw = doc["inputs"]
    if not isinstance(raw, dict):
        if len(served.inputs) != 1:
            raise HTTPError(422, f"model {served.name!r} takes {len(served.inputs)} inputs; send "
                                 f'"inputs" as an object keyed by {[s.name for s in served.inputs]}')
        raw = {served.inputs[0].name: raw}
    specs = {s.name: s for s in served.inputs}
    out = {}
    for k, v in raw.items():
        spec = specs.get(k)
        out[k] = list_to_tensor(k, v, spec.torch_dtype if spec else torch.float32)
    return out


def list_to_tensor(name: str, value: Any, want: torch.dtype) -> torch.Tensor:
    """A nested list of numbers as a ``want`` tensor, refusing what the cast would silently change."""
    try:
        arr = np.asarray(value)
    except (ValueError, RecursionError) as e:
        raise HTTPError(422, f"input {name!r} is not a rectangular array (ragged nested lists): "
                             f"{str(e).splitlines()[0][:200]}") from None
    if arr.dtype == object or arr.dtype.kind not in "biuf":
        raise HTTPError(422, f"input {name!r} must be a rectangular array of numbers")
    if want == torch.bool:
        if arr.dtype.kind != "b" and not np.isin(arr, (0, 1)).all():
            raise HTTPError(422, f"input {name!r} must hold booleans (true/false or 0/1)")
        return torch.from_numpy(np.ascontiguousarray(arr.astype(bool)))
    if not want.is_floating_point:
        if arr.dtype.kind == "f":
            raise HTTPError(422, f"input {name!r} must hold integers ({dtype_name(want)}), got fractional numbers")
        if arr.size:
            info = torch.iinfo(want)
            lo, hi = int(arr.min()), int(arr.max())
            if lo < info.min or hi > info.max:
                bad = lo if lo < info.min else hi
                raise HTTPError(422, f"input {name!r} holds {bad}, outside the range of {dtype_name(want)} "
                                     f"[{info.min}, {info.max}]")
        return torch.from_numpy(np.ascontiguousarray(arr.astype(np.dtype(dtype_name(want)))))
    t = torch.from_numpy(np.ascontiguousarray(arr.astype(np.float64)))
    if t.numel():
        limit = torch.finfo(want).max
        over = t.abs() > limit
        if bool(over.any()):
            bad = t[over][0].item()
            raise HTTPError(422, f"input {name!r} holds {bad:g}, beyond the largest {dtype_name(want)} "
                                 f"({limit:g})")
    return t.to(want)


def decode_npy(served: ServedModel, body: bytes) -> dict[str, torch.Tensor]:
    if len(served.inputs) != 1:
        raise HTTPError(415, f"a .npy body carries one tensor but model {served.name!r} takes "
                             f"{len(served.inputs)} inputs; send safetensors or JSON")
    try:
        arr = np.load(io.BytesIO(body), allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - any parse failure is the client's
        raise HTTPError(400, f"body is not a valid .npy array: {str(e).splitlines()[0][:200]}") from None
    return {served.inputs[0].name: ndarray_to_tensor(served.inputs[0].name, arr)}


def ndarray_to_tensor(name: str, arr: np.ndarray) -> torch.Tensor:
    """Numeric arrays of any byte order; strings, records, objects and dates are refused by name."""
    dt = arr.dtype
    if dt.names is not None or dt.subdtype is not None or dt.kind not in "biufc":
        raise HTTPError(415, f"input {name!r}: .npy dtype {dt.str!r} ({_kind_name(dt)}) cannot be a tensor; "
                             f"send numbers (bool, int, uint, float)")
    if not dt.isnative:
        arr = arr.astype(dt.newbyteorder("="))
    try:
        return torch.from_numpy(np.ascontiguousarray(arr))
    except TypeError as e:
        raise HTTPError(415, f"input {name!r}: .npy dtype {dt.str!r} has no torch equivalent ({e})") from None


def decode_safetensors(body: bytes) -> dict[str, torch.Tensor]:
    try:
        from safetensors.torch import load
    except ImportError:
        raise HTTPError(415, "safetensors bodies need the 'safetensors' package on the server") from None
    try:
        return dict(load(body))
    except Exception as e:  # noqa: BLE001
        raise HTTPError(400, f"body is not valid safetensors: {str(e).splitlines()[0][:200]}") from None


def decode(served: ServedModel, body: bytes, content_type: str) -> tuple[dict[str, torch.Tensor], str]:
    """Named tensors and the body's format ("json" | "npy" | "safetensors"), by media type."""
    ctype = content_type.split(";")[0].strip().lower()
    if ctype in ("application/json", ""):
        return decode_json(served, body), "json"
    if ctype in (NPY, "application/octet-stream") and body[:6] == b"\x93NUMPY":
        return decode_npy(served, body), "npy"
    if ctype in (SAFETENSORS, "application/octet-stream"):
        return decode_safetensors(body), "safetensors"
    raise HTTPError(415, f"unsupported content-type {ctype[:100]!r}; send application/json, {NPY} or {SAFETENSORS}")


def _kind_name(dt: np.dtype) -> str:
    if dt.names is not None:
        return "structured record"
    return {"U": "unicode string", "S": "byte string", "O": "Python object", "V": "raw bytes",
            "M": "datetime", "m": "timedelta"}.get(dt.kind, dt.kind)


# ---------------------------------------------------------------- encoding
def named_outputs(out: Any) -> dict[str, torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return {"output": out}
    if isinstance(out, Mapping):
        return {str(k): v for k, v in out.items() if isinstance(v, torch.Tensor)}
    if isinstance(out, Sequence):
        return {f"output_{i}": v for i, v in enumerate(out) if isinstance(v, torch.Tensor)}
    raise HTTPError(500, f"model returned {type(out).__name__}, which holds no tensor to send back")


def tensor_to_json(t: torch.Tensor) -> dict:
    """``{"shape", "dtype", "data"}``; NaN/Inf become null in the data and ``"nonfinite": true`` is set."""
    arr = t.detach().cpu()
    if arr.is_complex():
        arr = torch.view_as_real(arr)
    if arr.dtype in (torch.bfloat16, torch.float16):
        arr = arr.float()
    doc: dict[str, Any] = {"shape": list(t.shape), "dtype": dtype_name(t.dtype)}
    a = arr.numpy()
    if arr.is_floating_point() and not bool(torch.isfinite(arr).all()):
        obj = a.astype(object)
        obj[~np.isfinite(a)] = None
        doc["data"] = obj.tolist()
        doc["nonfinite"] = True
    else:
        doc["data"] = a.tolist()
    return doc


def encode_npy(t: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    t = t.detach().cpu()
    np.save(buf, (t.float() if t.dtype == torch.bfloat16 else t).numpy(), allow_pickle=False)
    return buf.getvalue()


def encode_safetensors(outs: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save
    return save({k: v.detach().cpu().contiguous() for k, v in outs.items()})
