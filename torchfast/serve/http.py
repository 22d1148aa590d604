"""The HTTP server: FastAPI + uvicorn in front of one DynamicBatcher per model.

POST /v1/models/{name}/infer   JSON ``{"inputs": [[...]]}`` or ``{"inputs": {"name": [[...]]}}``,
                               a ``.npy`` body (application/x-npy) or safetensors (application/x-safetensors)
GET  /v1/models[/{name}]       metadata: declared inputs (shape with -1 = any, dtype), batching knobs
GET  /healthz  /readyz  /metrics (Prometheus text)
The Open Inference Protocol (KServe v2; codec in :mod:`torchfast.serve.v2`), through the same batchers:
GET  /v2  /v2/health/live  /v2/health/ready  /v2/models/{name}[/versions/1][/ready]  [/config]
POST /v2/models/{name}[/versions/1]/infer      JSON tensors and the binary tensor extension
Headers: ``x-timeout-ms`` (or ``?timeout_ms=``) per-request deadline, ``x-priority`` (higher runs first).
Errors: 400 malformed body, 404 unknown model, 413 too large, 415 unknown media type, 422 shape/dtype,
500 the model's own error for this request, 503 + Retry-After when the queue is full, 504 on timeout.
A client that disconnects before its answer has its queued request withdrawn, never computed
(``torchfast_batcher_requests_total{outcome="disconnected"}``).
"""
from __future__ import annotations

import logging
import math
import re
import socket
import threading
import uuid
from contextlib import asynccontextmanager
from typing import Any, Sequence

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import v2
from .batcher import BatcherClosed, CallerGone, DynamicBatcher, QueueFull, RequestTimeout
from .body import CLIENT_CLOSED, LargeBodyGate, client_gone, inflate, read_body
from .codecs import (NPY, SAFETENSORS, HTTPError, decode, encode_npy, encode_safetensors, named_outputs,
                     tensor_to_json)
from .metrics import merged_prometheus_text
from .model import ServedModel

log = logging.getLogger("torchfast.serve")


def make_batcher(served: ServedModel, **knobs: Any) -> DynamicBatcher:
    """A batcher for a served model; a fixed-batch artifact caps the batch and pads every call to it."""
    knobs = {**knobs, **served.knobs}
    if served.fixed_batch and served.max_batch_size:
        knobs["max_batch_size"] = served.max_batch_size
        knobs["preferred_batch_sizes"] = [served.max_batch_size]
    knobs.setdefault("sequence", served.sequence)
    return DynamicBatcher(served.model, name=served.name, **knobs)


# ---------------------------------------------------------------- the app
def create_app(models: Sequence[ServedModel], *, max_batch_size: int = 32, max_delay_ms: float = 5.0,
               preferred_batch_sizes: Sequence[int] | None = None, max_queue_size: int = 256,
               timeout_ms: float | None = 10_000, max_body_bytes: int = 16 << 20, warmup: bool = True,
               isolate_errors: bool = True, nan_guard: bool = False, max_priority: int = 0,
               body_timeout_s: float = 30.0, large_body_bytes: int = 1 << 20, max_large_bodies: int = 2) -> Any:
    """A FastAPI app serving ``models``; batchers start with the app and drain when it stops.

    ``max_priority`` is the highest ``x-priority`` a client may ask for (higher asks are capped to it),
    so no client can starve the others unless the operator allows it. A body must arrive within
    ``body_timeout_s`` (408 after). At most ``max_large_bodies`` bodies above ``large_body_bytes`` are read
    and decoded at once, off the event loop, so big uploads cannot stall health checks or pile up memory.
    """
    served = {m.name: m for m in models}
    if len(served) != len(models):
        raise ValueError(f"model names must be unique, got {[m.name for m in models]}")
    if body_timeout_s <= 0 or max_large_bodies < 1 or large_body_bytes < 1:
        raise ValueError(f"body_timeout_s, max_large_bodies and large_body_bytes must be positive, got "
                         f"{body_timeout_s}, {max_large_bodies}, {large_body_bytes}")
    knobs = dict(max_batch_size=max_batch_size, max_delay_ms=max_delay_ms, max_queue_size=max_queue_size,
                 timeout_ms=timeout_ms, preferred_batch_sizes=preferred_batch_sizes,
                 isolate_errors=isolate_errors, nan_guard=nan_guard)
    state: dict[str, Any] = {"ready": False, "batchers": {}}
    state["outputs"] = {}  # model name -> output metadata, from the warm-up answers
    large_bodies = LargeBodyGate(max_large_bodies, large_body_bytes)

    @asynccontextmanager
    async def lifespan(app):
        for m in models:
            b = make_batcher(m, **knobs)
            state["batchers"][m.name] = b
            if warmup:
                state["outputs"][m.name] = await _probe_outputs(m, b)
        state["ready"] = True
        yield
        state["ready"] = False
        for b in state["batchers"].values():
            await b.aclose(drain=True)

    app = FastAPI(title="torchfast serve", lifespan=lifespan)
    app.state.torchfast = state

    def err(status: int, message: str, headers: dict | None = None, request_id: str | None = None) -> JSONResponse:
        body: dict[str, Any] = {"error": message, "status": status}
        if request_id:
            body["request_id"] = request_id
            headers = {**(headers or {}), "x-request-id": request_id}
        return JSONResponse(body, status_code=status, headers=headers)

    def lookup(name: str) -> tuple[ServedModel, DynamicBatcher]:
        if name not in served or name not in state["batchers"]:
            raise HTTPError(404, f"unknown model {name[:100]!r}; serving {sorted(served)}")
        return served[name], state["batchers"][name]

    @app.exception_handler(HTTPError)
    async def _handle(request: Request, e: HTTPError):
        return err(e.status, e.message, e.headers, getattr(request.state, "request_id", None))

    @app.exception_handler(StarletteHTTPException)
    async def _routing(request: Request, e: StarletteHTTPException):  # unknown path, wrong method: same shape
        return err(e.status_code, f"{e.detail}: {request.method} {request.url.path[:200]}", e.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception):
        rid = getattr(request.state, "request_id", None) or _new_request_id()
        log.error("request %s (%s %s) failed inside the server", rid, request.method, request.url.path,
                  exc_info=e)
        return err(500, f"internal server error ({type(e).__name__}); the server log has the details under "
                        f"request id {rid}", request_id=rid)

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

    async def read(m: ServedModel, request: Request, decode_fn: Any, *args: Any) -> Any:
        """The body, size- and time-bounded, decoded by ``decode_fn(m, body, *args)`` (off the loop when big)."""
        async with large_bodies.admit_one() as gate:
            body = await read_body(request, max_body_bytes, body_timeout_s, gate)
            if request.headers.get("content-encoding"):
                body = inflate(body, request.headers.get("content-encoding"), max_body_bytes)
            if len(body) < 64 << 10:
                return decode_fn(m, body, *args)
            return await run_in_threadpool(decode_fn, m, body, *args)

    async def run(m: ServedModel, b: DynamicBatcher, tensors: dict, request: Request, rid: str,
                  timeout_ms: float | None, priority: int) -> Any:
        """One request through the model's batcher: every route's status codes, and a client that leaves
        before its answer withdraws its queued request."""
        try:
            x = m.request(tensors)
            b.check(x)
        except (ValueError, TypeError) as e:
            raise HTTPError(422, str(e)) from None
        try:
            return await b.submit(x, timeout_ms=timeout_ms, priority=priority, gone=client_gone(request))
        except QueueFull as e:
            raise HTTPError(503, str(e), {"Retry-After": "1"}) from None
        except BatcherClosed as e:
            raise HTTPError(503, str(e), {"Retry-After": "5"}) from None
        except RequestTimeout as e:
            raise HTTPError(504, str(e)) from None
        except CallerGone as e:
            log.debug("request %s: %s", rid, e)
            raise HTTPError(CLIENT_CLOSED, str(e)) from None
        except Exception as e:  # noqa: BLE001 - this request's own model error
            log.error("request %s: model %r failed", rid, m.name, exc_info=e)
            raise HTTPError(500, f"model {m.name!r} failed on this request ({type(e).__name__}); the server log "
                                 f"has the details under request id {rid}") from None

    def header_timeout(request: Request) -> float | None:
        return _timeout(request.headers.get("x-timeout-ms") or request.query_params.get("timeout_ms"))

    @app.post("/v1/models/{name}/infer")
    async def infer(name: str, request: Request):
        rid = request.state.request_id = _request_id(request.headers.get("x-request-id"))
        m, b = lookup(name)
        t = header_timeout(request)
        priority = _priority(request.headers.get("x-priority"), max_priority)
        tensors, fmt = await read(m, request, decode, request.headers.get("content-type", "application/json"))
        out = await run(m, b, tensors, request, rid, t, priority)
        outs = named_outputs(out)
        accept = request.headers.get("accept", "")
        headers = {"x-request-id": rid}
        if NPY in accept or (fmt == "npy" and "json" not in accept):
            if len(outs) != 1:
                raise HTTPError(406, f"model {name!r} has {len(outs)} outputs; a .npy answer holds one")
            return Response(encode_npy(next(iter(outs.values()))), media_type=NPY, headers=headers)
        if SAFETENSORS in accept or (fmt == "safetensors" and "json" not in accept):
            return Response(encode_safetensors(outs), media_type=SAFETENSORS, headers=headers)
        return JSONResponse({"model_name": name, "outputs": {k: tensor_to_json(v) for k, v in outs.items()}},
                            headers=headers)

    # ------------------------------------------------------------ Open Inference Protocol (KServe v2)
    def ready() -> bool:
        return state["ready"] and all(b.running for b in state["batchers"].values())

    def v2_lookup(name: str, version: str | None) -> tuple[ServedModel, DynamicBatcher]:
        m, b = lookup(name)
        if version is not None and version != v2.VERSION:
            raise HTTPError(404, f"model {name[:100]!r} has no version {version[:20]!r}; versions ['{v2.VERSION}']")
        return m, b

    @app.get("/v2")
    async def v2_server():
        from importlib.metadata import PackageNotFoundError, version
        try:
            ver = version("torchfast")
        except PackageNotFoundError:
            ver = "unknown"
        return {"name": "torchfast", "version": ver, "extensions": ["binary_tensor_data"]}

    @app.get("/v2/health/live")
    async def v2_live():
        return {"live": True}

    @app.get("/v2/health/ready")
    async def v2_ready():
        if not ready():
            return JSONResponse({"ready": False, "error": "not ready: models are loading or the server is "
                                                          "shutting down"}, status_code=400)
        return {"ready": True}

    @app.get("/v2/models/{name}")
    @app.get("/v2/models/{name}/versions/{version}")
    async def v2_model(name: str, version: str | None = None):
        m, _ = v2_lookup(name, version)
        return v2.model_metadata(m, state["outputs"].get(name))

    @app.get("/v2/models/{name}/ready")
    @app.get("/v2/models/{name}/versions/{version}/ready")
    async def v2_model_ready(name: str, version: str | None = None):
        _, b = v2_lookup(name, version)
        if not (state["ready"] and b.running):
            return JSONResponse({"name": name, "ready": False, "error": f"model {name!r} is not ready"},
                                status_code=400)
        return {"name": name, "ready": True}

    @app.get("/v2/models/{name}/config")
    @app.get("/v2/models/{name}/versions/{version}/config")
    async def v2_model_config(name: str, version: str | None = None):
        m, b = v2_lookup(name, version)
        return v2.model_config(m, state["outputs"].get(name), _knobs(b)["batching"])

    @app.post("/v2/models/{name}/infer")
    @app.post("/v2/models/{name}/versions/{version}/infer")
    async def v2_infer(name: str, request: Request, version: str | None = None):
        rid = request.state.request_id = _request_id(request.headers.get("x-request-id"))
        m, b = v2_lookup(name, version)
        req = await read(m, request, v2.decode_request, request.headers.get("inference-header-content-length"))
        known = state["outputs"].get(name)
        if req.outputs and known:  # refuse an unknown output before computing anything
            v2.check_outputs(name, req.outputs, [o["name"] for o in known])
        t = req.timeout_ms if req.timeout_ms is not None else header_timeout(request)
        if req.priority is not None:
            priority = _v2_priority(req.priority, max_priority)
        else:
            priority = _priority(request.headers.get("x-priority"), max_priority)
        outs = named_outputs(await run(m, b, req.tensors, request, rid, t, priority))
        if not known:
            state["outputs"][name] = v2.describe_outputs(outs)
        body, header_length = v2.encode_response(name, req, outs)
        headers = {"x-request-id": rid}
        if header_length is None:
            return Response(body, media_type="application/json", headers=headers)
        headers["Inference-Header-Content-Length"] = str(header_length)
        return Response(body, media_type="application/octet-stream", headers=headers)

    return app


_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


def _new_request_id() -> str:
    return uuid.uuid4().hex[:16]


def _request_id(given: str | None) -> str:
    """The client's own id when it is a short plain token (so logs join up), else a fresh one."""
    return given if given and _REQUEST_ID.match(given) else _new_request_id()


def _timeout(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        t = float(text)
    except ValueError:
        t = float("nan")
    if not (t > 0 and math.isfinite(t)):
        raise HTTPError(400, f"timeout must be a positive number of milliseconds, got {text[:50]!r}")
    return t


def _priority(text: str | None, cap: int) -> int:
    if text is None:
        return 0
    try:
        p = int(text.strip())
    except ValueError:
        raise HTTPError(400, f"x-priority must be an integer, got {text[:50]!r}") from None
    return max(min(p, cap), -(1 << 31))


def _v2_priority(level: int, cap: int) -> int:
    """Triton's priority level (1 highest, 2 next, ...; 0 the default) on our scale (higher runs first): level 1
    is the highest a client may ask for (``max_priority``), each level below it one step lower."""
    if level == 0:
        return 0
    return max(cap - (level - 1), -(1 << 31))


async def _probe_outputs(m: ServedModel, b: DynamicBatcher) -> list[dict]:
    """Warm the model up and learn its outputs' names, datatypes and shapes (-1 where they follow a dynamic
    input dim: a second call with other sizes tells)."""
    outs = named_outputs(await b.submit(m.request(m.example())))
    other = v2.other_sizes(m)
    if other is not None:
        try:
            other = named_outputs(await b.submit(m.request(other)))
        except Exception:  # noqa: BLE001 - the model refuses other sizes: its outputs' dims stay as seen
            other = None
    return v2.describe_outputs(outs, other)


def _knobs(b: DynamicBatcher) -> dict:
    return {"batching": {"max_batch_size": b.max_batch_size, "max_delay_ms": b.max_delay_ms,
                         "preferred_batch_sizes": list(b.preferred_batch_sizes),
                         "max_queue_size": b.max_queue_size, "timeout_ms": b.timeout_ms}}


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
