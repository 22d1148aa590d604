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

import asyncio
import logging
import math
import re
import socket
import threading
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any, Sequence

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from .batcher import BatcherClosed, DynamicBatcher, QueueFull, RequestTimeout
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
    large_bodies = _LargeBodyGate(max_large_bodies, large_body_bytes)

    @asynccontextmanager
    async def lifespan(app):
        for m in models:
            b = make_batcher(m, **knobs)
            state["batchers"][m.name] = b
            if warmup:
                await b.submit(m.request(m.example()))
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

    @app.post("/v1/models/{name}/infer")
    async def infer(name: str, request: Request):
        rid = request.state.request_id = _request_id(request.headers.get("x-request-id"))
        m, b = lookup(name)
        t = _timeout(request.headers.get("x-timeout-ms") or request.query_params.get("timeout_ms"))
        priority = _priority(request.headers.get("x-priority"), max_priority)
        ctype = request.headers.get("content-type", "application/json")
        async with large_bodies.admit_one() as gate:
            body = await _read_body(request, max_body_bytes, body_timeout_s, gate)
            decoded = decode if len(body) < 64 << 10 else None
            tensors, fmt = decoded(m, body, ctype) if decoded else await run_in_threadpool(decode, m, body, ctype)
            del body
        try:
            x = m.request(tensors)
            b.check(x)
        except (ValueError, TypeError) as e:
            raise HTTPError(422, str(e)) from None
        try:
            out = await b.submit(x, timeout_ms=t, priority=priority)
        except QueueFull as e:
            raise HTTPError(503, str(e), {"Retry-After": "1"}) from None
        except BatcherClosed as e:
            raise HTTPError(503, str(e), {"Retry-After": "5"}) from None
        except RequestTimeout as e:
            raise HTTPError(504, str(e)) from None
        except Exception as e:  # noqa: BLE001 - this request's own model error
            log.error("request %s: model %r failed", rid, name, exc_info=e)
            raise HTTPError(500, f"model {name!r} failed on this request ({type(e).__name__}); the server log "
                                 f"has the details under request id {rid}") from None
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

    return app


class _LargeBodyGate:
    """Bounds how many large bodies are in memory at once: a body past ``threshold`` bytes waits for one
    of ``limit`` slots before more of it is read, and holds the slot until it is decoded."""

    def __init__(self, limit: int, threshold: int):
        self.limit, self.threshold = limit, threshold
        self._sem: asyncio.Semaphore | None = None   # made on the server's loop, at first use

    def admit_one(self) -> "_GateSlot":
        if self._sem is None:
            self._sem = asyncio.Semaphore(self.limit)
        return _GateSlot(self._sem, self.threshold)


class _GateSlot:
    def __init__(self, sem: asyncio.Semaphore, threshold: int):
        self.sem, self.threshold, self.held = sem, threshold, False

    async def admit(self, size: int) -> None:
        if not self.held and size > self.threshold:
            await self.sem.acquire()
            self.held = True

    async def __aenter__(self) -> "_GateSlot":
        return self

    async def __aexit__(self, *exc) -> None:
        if self.held:
            self.sem.release()
            self.held = False


async def _read_body(request: Any, limit: int, timeout_s: float, gate: _GateSlot) -> bytes:
    n = request.headers.get("content-length")
    if n is not None and n.isdigit():
        if int(n) > limit:
            raise HTTPError(413, f"request body of {int(n)} bytes exceeds the limit of {limit} bytes")
        await gate.admit(int(n))
    chunks, size = [], 0
    deadline = time.monotonic() + timeout_s
    stream = request.stream().__aiter__()
    while True:
        left = deadline - time.monotonic()
        try:
            c = await asyncio.wait_for(stream.__anext__(), timeout=max(left, 0.001))
        except StopAsyncIteration:
            break
        except asyncio.TimeoutError:
            raise HTTPError(408, f"request body not received within {timeout_s:g} s "
                                 f"({size} bytes arrived)", {"Connection": "close"}) from None
        size += len(c)
        if size > limit:
            raise HTTPError(413, f"request body exceeds the limit of {limit} bytes", {"Connection": "close"})
        await gate.admit(size)
        chunks.append(c)
    return b"".join(chunks)


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
