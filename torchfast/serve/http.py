"""The HTTP server: FastAPI + uvicorn in front of one DynamicBatcher per model.

POST /v1/models/{name}/infer   JSON ``{"inputs": [[...]]}`` or ``{"inputs": {"name": [[...]]}}``,
                               a ``.npy`` body (application/x-npy) or safetensors (application/x-safetensors)
GET  /v1/models[/{name}]       metadata: declared inputs (shape with -1 = any, dtype), batching knobs
GET  /healthz  /readyz  /metrics (Prometheus text)
Headers: ``x-timeout-ms`` (or ``?timeout_ms=``) per-request deadline, ``x-priority`` (higher runs first).
Errors: 400 malformed body, 404 unknown model, 413 too large, 415 unknown media type, 422 shape/dtype,
500 the model's own error for this request, 503 + Retry-After when the queue is full, 504 on timeout.
"""
from __future__ import annotations

import io
import json
import math
import socket
import threading
from contextlib import asynccontextmanager
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from .batcher import BatcherClosed, DynamicBatcher, QueueFull, RequestTimeout
from .metrics import merged_prometheus_text
from .model import ServedModel, dtype_name, parse_dtype

NPY = "application/x-npy"
SAFETENSORS = "application/x-safetensors"


class HTTPError(Exception):
    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def make_batcher(served: ServedModel, **knobs: Any) -> DynamicBatcher:
    """A batcher for a served model; a fixed-batch artifact caps the batch and pads every call to it."""
    knobs = {**knobs, **served.knobs}
    if served.fixed_batch and served.max_batch_size:
        knobs["max_batch_size"] = served.max_batch_size
        knobs["preferred_batch_sizes"] = [served.max_batch_size]
    knobs.setdefault("sequence", served.sequence)
    return DynamicBatcher(served.model, name=served.name, **knobs)


# ---------------------------------------------------------------- decoding / encoding
def _from_json(served: ServedModel, body: bytes) -> dict[str, torch.Tensor]:
    try:
        doc = json.loads(body)
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
        want = parse_dtype(spec.dtype) if spec else torch.float32
        try:
            arr = np.asarray(v)
        except ValueError as e:
            raise HTTPError(422, f"input {k!r} is not a rectangular array (ragged nested lists): {e}") from None
        if arr.dtype == object or arr.dtype.kind in "USV":
            raise HTTPError(422, f"input {k!r} must be a rectangular array of numbers")
        if arr.dtype.kind == "f" and not want.is_floating_point:
            raise HTTPError(422, f"input {k!r} must hold integers ({dtype_name(want)}), got fractional numbers")
        out[k] = torch.from_numpy(np.ascontiguousarray(arr)).to(want)
    return out


def _from_npy(served: ServedModel, body: bytes) -> dict[str, torch.Tensor]:
    if len(served.inputs) != 1:
        raise HTTPError(415, f"a .npy body carries one tensor but model {served.name!r} takes "
                             f"{len(served.inputs)} inputs; send safetensors or JSON")
    try:
        arr = np.load(io.BytesIO(body), allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - any parse failure is the client's
        raise HTTPError(400, f"body is not a valid .npy array: {e}") from None
    return {served.inputs[0].name: torch.from_numpy(np.ascontiguousarray(arr))}


def _from_safetensors(body: bytes) -> dict[str, torch.Tensor]:
    try:
        from safetensors.torch import load
        return dict(load(body))
    except ImportError:
        raise HTTPError(415, "safetensors bodies need the 'safetensors' package on the server") from None
    except Exception as e:  # noqa: BLE001
        raise HTTPError(400, f"body is not valid safetensors: {e}") from None


def _named_outputs(out: Any) -> dict[str, torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return {"output": out}
    if isinstance(out, Mapping):
        return {str(k): v for k, v in out.items() if isinstance(v, torch.Tensor)}
    if isinstance(out, Sequence):
        return {f"output_{i}": v for i, v in enumerate(out) if isinstance(v, torch.Tensor)}
    raise HTTPError(500, f"model returned {type(out).__name__}, which holds no tensor to send back")


def _json_ready(t: torch.Tensor) -> dict:
    arr = t.detach().cpu()
    if arr.dtype in (torch.bfloat16, torch.float16):
        arr = arr.float()
    data = arr.numpy().tolist()
    if arr.is_floating_point() and not bool(torch.isfinite(arr).all()):
        data = json.loads(json.dumps(data).replace("NaN", "null").replace("Infinity", "null"))
    return {"shape": list(t.shape), "dtype": dtype_name(t.dtype), "data": data}


# ---------------------------------------------------------------- the app
def create_app(models: Sequence[ServedModel], *, max_batch_size: int = 32, max_delay_ms: float = 5.0,
               preferred_batch_sizes: Sequence[int] | None = None, max_queue_size: int = 256,
               timeout_ms: float | None = 10_000, max_body_bytes: int = 16 << 20, warmup: bool = True,
               isolate_errors: bool = True, nan_guard: bool = False) -> Any:
    """A FastAPI app serving ``models``; batchers start with the app and drain when it stops."""
    served = {m.name: m for m in models}
    if len(served) != len(models):
        raise ValueError(f"model names must be unique, got {[m.name for m in models]}")
    knobs = dict(max_batch_size=max_batch_size, max_delay_ms=max_delay_ms, max_queue_size=max_queue_size,
                 timeout_ms=timeout_ms, preferred_batch_sizes=preferred_batch_sizes,
                 isolate_errors=isolate_errors, nan_guard=nan_guard)
    state: dict[str, Any] = {"ready": False, "batchers": {}}

    @asynccontextmanager
    async def lifespan(app):
        for m in models:
            b = make_batcher(m, **knobs)
            state["batchers"][m.name] = b
            if warmup:
                await b.submit(m.request(_example(m)))
        state["ready"] = True
        yield
        state["ready"] = False
        for b in state["batchers"].values():
            await b.aclose(drain=True)

    app = FastAPI(title="torchfast serve", lifespan=lifespan)
    app.state.torchfast = state

    def err(status: int, message: str, headers: dict | None = None) -> JSONResponse:
        return JSONResponse({"error": message, "status": status}, status_code=status, headers=headers)

    def lookup(name: str) -> tuple[ServedModel, DynamicBatcher]:
        if name not in served or name not in state["batchers"]:
            raise HTTPError(404, f"unknown model {name!r}; serving {sorted(served)}")
        return served[name], state["batchers"][name]

    @app.exception_handler(HTTPError)
    async def _handle(_req, e: HTTPError):
        return err(e.status, e.message, e.headers)

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        bs = state["batchers"]
        if not state["ready"] or not all(b.running for b in bs.values()):
            return err(503, "not ready: models are loading or the server is shutting down")
        return {"status": "ready", "models": sorted(bs)}

    @app.get("/metrics")
    async def metrics():
        text = merged_prometheus_text([b.metrics for b in state["batchers"].values()])
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def list_models():
        return {"models": [served[n].metadata() | _knobs(b) for n, b in state["batchers"].items()]}

    @app.get("/v1/models/{name}")
    async def model_metadata(name: str):
        m, b = lookup(name)
        return m.metadata() | _knobs(b) | {"stats": b.snapshot()}

    @app.post("/v1/models/{name}/infer")
    async def infer(name: str, request: Request):
        m, b = lookup(name)
        body = await _read_body(request, max_body_bytes)
        ctype = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
        if ctype in ("application/json", ""):
            tensors, fmt = _from_json(m, body), "json"
        elif ctype in (NPY, "application/octet-stream") and body[:6] == b"\x93NUMPY":
            tensors, fmt = _from_npy(m, body), "npy"
        elif ctype in (SAFETENSORS, "application/octet-stream"):
            tensors, fmt = _from_safetensors(body), "safetensors"
        else:
            raise HTTPError(415, f"unsupported content-type {ctype!r}; send application/json, {NPY} or {SAFETENSORS}")
        try:
            x = m.request(tensors)
            b.check(x)
        except (ValueError, TypeError) as e:
            raise HTTPError(422, str(e)) from None
        timeout = request.headers.get("x-timeout-ms") or request.query_params.get("timeout_ms")
        try:
            t = float(timeout) if timeout is not None else None
            if t is not None and not (t > 0 and math.isfinite(t)):
                raise ValueError
        except ValueError:
            raise HTTPError(400, f"timeout must be a positive number of milliseconds, got {timeout!r}") from None
        try:
            priority = int(request.headers.get("x-priority", "0"))
        except ValueError:
            raise HTTPError(400, f"x-priority must be an integer, got {request.headers.get('x-priority')!r}") from None
        try:
            out = await b.submit(x, timeout_ms=t, priority=priority)
        except QueueFull as e:
            raise HTTPError(503, str(e), {"Retry-After": "1"}) from None
        except BatcherClosed as e:
            raise HTTPError(503, str(e), {"Retry-After": "5"}) from None
        except RequestTimeout as e:
            raise HTTPError(504, str(e)) from None
        except Exception as e:  # noqa: BLE001 - this request's own model error
            raise HTTPError(500, f"model {name!r} failed on this request: {type(e).__name__}: {e}") from None
        outs = _named_outputs(out)
        accept = request.headers.get("accept", "")
        if NPY in accept or (fmt == "npy" and "json" not in accept):
            if len(outs) != 1:
                raise HTTPError(406, f"model {name!r} has {len(outs)} outputs; a .npy answer holds one")
            buf = io.BytesIO()
            t0 = next(iter(outs.values()))
            np.save(buf, (t0.float() if t0.dtype in (torch.bfloat16,) else t0).numpy(), allow_pickle=False)
            return Response(buf.getvalue(), media_type=NPY)
        if SAFETENSORS in accept or (fmt == "safetensors" and "json" not in accept):
            from safetensors.torch import save
            return Response(save({k: v.contiguous() for k, v in outs.items()}), media_type=SAFETENSORS)
        return {"model_name": name, "outputs": {k: _json_ready(v) for k, v in outs.items()}}

    return app


async def _read_body(request: Any, limit: int) -> bytes:
    n = request.headers.get("content-length")
    if n is not None and n.isdigit() and int(n) > limit:
        raise HTTPError(413, f"request body of {int(n)} bytes exceeds the limit of {limit} bytes")
    chunks, size = [], 0
    async for c in request.stream():
        size += len(c)
        if size > limit:
            raise HTTPError(413, f"request body exceeds the limit of {limit} bytes")
        chunks.append(c)
    return b"".join(chunks)


def _knobs(b: DynamicBatcher) -> dict:
    return {"batching": {"max_batch_size": b.max_batch_size, "max_delay_ms": b.max_delay_ms,
                         "preferred_batch_sizes": list(b.preferred_batch_sizes),
                         "max_queue_size": b.max_queue_size, "timeout_ms": b.timeout_ms}}


def _example(m: ServedModel) -> dict[str, torch.Tensor]:
    out = {}
    for s in m.inputs:
        shape = [1] + [d if d != -1 else 8 for d in s.shape]
        dt = parse_dtype(s.dtype)
        out[s.name] = torch.ones(shape, dtype=dt) if not dt.is_floating_point else torch.zeros(shape, dtype=dt)
    return out


# ---------------------------------------------------------------- running it
def bind_socket(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    """A listening socket (port 0 = a free port, without the find-then-bind race)."""
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, port))
    s.listen(2048)
    return s


class ServerThread:
    """uvicorn in a background thread on a bound socket: for tests, benchmarks and notebooks."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import uvicorn
        self.sock = bind_socket(host, port)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=30))
        self.server.install_signal_handlers = lambda: None  # not the main thread
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def start(self, timeout: float = 120.0) -> "ServerThread":
        self.thread.start()
        import time
        t0 = time.monotonic()
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() - t0 > timeout:
                raise RuntimeError(f"server on {self.url} did not start")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        self.sock.close()

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def serve_http(models: Sequence[ServedModel], host: str = "127.0.0.1", port: int = 8000,
               log_level: str = "info", **knobs: Any) -> None:
    """Serve until interrupted (Ctrl-C / SIGTERM drain every accepted request before exiting)."""
    import uvicorn
    app = create_app(models, **knobs)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=30)
