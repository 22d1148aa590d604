"""Ray Serve: torchfast models across replicas and machines, batched as the local server batches them.

Each replica runs the model behind its own :class:`~torchfast.serve.batcher.DynamicBatcher`, so a Ray
deployment keeps what ``torchfast serve`` promises on one machine: the same knobs, per-request deadlines
(a request whose deadline passes while it waits is never run: ``RequestTimeout``, HTTP 504), priorities
(higher first, then oldest), error isolation (one bad request fails alone), padding buckets, sequence
padding, NaN guard and metrics. Ray adds the rest: ``replicas`` copies (``num_replicas``) with requests
routed to the less loaded one, a replica that dies is replaced by Ray Serve's controller, and
``max_queue_size`` is Ray's ``max_queued_requests`` (``BackPressureError`` / HTTP 503 beyond it).

Deadlines and priorities, as the local server maps them: over HTTP (Ray's proxy) the ``x-timeout-ms`` and
``x-priority`` headers (priority capped at ``max_priority``); through a handle, :class:`RayClient` sends an
absolute deadline, so the time a request spends in Ray's own queues counts against it too. A priority
orders the requests waiting inside a replica (up to ``max_ongoing_requests`` of them); requests Ray has not
routed yet wait in arrival order.

A request whose replica dies before answering is lost by Ray; :class:`RayClient` sends it again (model
inference is idempotent), within its deadline, so a client loses no accepted request to a replica crash.

Needs the ``ray`` extra (``pip install 'torchfast[ray]'``).
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from typing import Any, Callable, Sequence

__all__ = ["ray_deployment", "RayClient"]

log = logging.getLogger("torchfast.serve")


def ray_deployment(served_factory: Callable[[], Any], *, name: str = "torchfast", replicas: int = 1,
                   max_batch_size: int = 32, max_delay_ms: float = 5.0,
                   preferred_batch_sizes: Sequence[int] | None = None, max_queue_size: int = -1,
                   timeout_ms: float | None = 10_000.0, max_priority: int = 0,
                   max_ongoing_requests: int | None = None, num_cpus_per_replica: float = 1.0,
                   isolate_errors: bool = True, nan_guard: bool = False, warmup: bool = True,
                   health_check_period_s: float = 10.0) -> Any:
    """A bound Ray Serve application: ``serve.run(ray_deployment(lambda: load_served_model('digits')))``.

    ``served_factory`` runs inside each replica (so the model is loaded there, not pickled across); it
    returns a :class:`~torchfast.serve.model.ServedModel`. Knobs are the local server's (``torchfast serve
    --help``): ``timeout_ms`` the default deadline, ``max_priority`` the highest ``x-priority`` an HTTP
    client may ask for. ``max_ongoing_requests`` (default ``4 * max_batch_size``) is how many requests a
    replica holds at once: enough for full batches and for priorities to reorder them. Each replica runs
    torch on ``num_cpus_per_replica`` threads (at least one). Call it through :class:`RayClient` (deadlines
    across Ray's queues, retries when a replica dies), ``handle.infer.remote(x)``, or POST the local
    server's JSON / ``.npy`` / safetensors bodies over Ray's HTTP proxy.
    """
    try:
        from ray import serve
    except ImportError as e:
        raise ImportError("the Ray Serve deployment needs the 'ray' extra: pip install 'torchfast[ray]'") from e
    from starlette.requests import Request

    if replicas < 1:
        raise ValueError(f"replicas must be >= 1, got {replicas}")
    ongoing = max_ongoing_requests or max(4 * max_batch_size, 8)
    if ongoing < 1:
        raise ValueError(f"max_ongoing_requests must be >= 1, got {max_ongoing_requests}")
    knobs = dict(max_batch_size=max_batch_size, max_delay_ms=max_delay_ms,
                 preferred_batch_sizes=preferred_batch_sizes, max_queue_size=ongoing + 1, timeout_ms=timeout_ms,
                 isolate_errors=isolate_errors, nan_guard=nan_guard)

    @serve.deployment(name=name, num_replicas=replicas, max_queued_requests=max_queue_size,
                      max_ongoing_requests=ongoing, health_check_period_s=health_check_period_s,
                      ray_actor_options={"num_cpus": num_cpus_per_replica})
    class TorchfastModel:
        def __init__(self, factory: Callable[[], Any]):
            import torch

            from .http import make_batcher
            torch.set_num_threads(max(1, int(num_cpus_per_replica)))
            self.served = factory()
            self.batcher = make_batcher(self.served, **knobs)
            if warmup:
                self.batcher(self.served.request(self.served.example()))

        async def infer(self, x: Any, *, timeout_ms: float | None = None, priority: int = 0,
                        deadline: float | None = None) -> Any:
            """One request (a tensor, tuple or dict, as the model takes it). ``deadline``: an absolute
            ``time.time()`` the caller set, so time spent in Ray's queues counts; else ``timeout_ms`` from now."""
            from .batcher import RequestTimeout
            if deadline is not None:
                left = (deadline - time.time()) * 1000.0
                if left <= 0:
                    raise RequestTimeout(f"request to {self.served.name!r} reached its replica {-left:.0f} ms "
                                         f"after its deadline; it was not run")
                timeout_ms = left if timeout_ms is None else min(timeout_ms, left)
            return await self.batcher.submit(x, timeout_ms=timeout_ms, priority=int(priority))

        async def __call__(self, request: Request) -> Any:
            return await _http(self.served, self.batcher, request, max_priority)

        def stats(self) -> dict:
            """This replica's batcher counts (see DynamicBatcher.snapshot), with its process id and actor name."""
            import ray
            ctx = ray.get_runtime_context()
            return {"pid": os.getpid(), "actor_name": ctx.get_actor_name(), **self.batcher.snapshot()}

        def check_health(self) -> None:
            if not self.batcher.running:
                raise RuntimeError(f"the batcher of {self.served.name!r} is not running")

        def __del__(self) -> None:  # Ray's graceful shutdown: answer every accepted request first
            batcher = getattr(self, "batcher", None)
            if batcher is not None:
                batcher.close(drain=True, timeout=30)

    return TorchfastModel.bind(served_factory)


async def _http(served: Any, batcher: Any, request: Any, max_priority: int) -> Any:
    """The local server's infer route (bodies, headers, status codes) on one replica."""
    from starlette.concurrency import run_in_threadpool
    from starlette.responses import JSONResponse, Response

    from .batcher import BatcherClosed, QueueFull, RequestTimeout
    from .codecs import (NPY, SAFETENSORS, HTTPError, decode, encode_npy, encode_safetensors, named_outputs,
                         tensor_to_json)
    from .http import _priority, _timeout   # the local server's header rules, shared

    def err(status: int, message: str, headers: dict | None = None) -> Any:
        return JSONResponse({"error": message, "status": status}, status_code=status, headers=headers)

    try:
        timeout = _timeout(request.headers.get("x-timeout-ms") or request.query_params.get("timeout_ms"))
        priority = _priority(request.headers.get("x-priority"), max_priority)
        body = await request.body()
        tensors, fmt = await run_in_threadpool(decode, served, body, request.headers.get("content-type",
                                                                                          "application/json"))
        try:
            x = served.request(tensors)
            batcher.check(x)
        except (ValueError, TypeError) as e:
            raise HTTPError(422, str(e)) from None
    except HTTPError as e:
        return err(e.status, e.message, e.headers)
    try:
        out = await batcher.submit(x, timeout_ms=timeout, priority=priority)
    except (QueueFull, BatcherClosed) as e:
        return err(503, str(e), {"Retry-After": "1"})
    except RequestTimeout as e:
        return err(504, str(e))
    except Exception as e:  # noqa: BLE001 - this request's own model error
        rid = uuid.uuid4().hex[:16]
        log.error("request %s: model %r failed", rid, served.name, exc_info=e)
        body = {"error": f"model {served.name!r} failed on this request ({type(e).__name__}); the replica's log "
                         f"has the details under request id {rid}", "status": 500, "request_id": rid}
        return JSONResponse(body, status_code=500)
    try:
        outs = named_outputs(out)
    except HTTPError as e:
        return err(e.status, e.message)
    accept = request.headers.get("accept", "")
    if (NPY in accept or (fmt == "npy" and "json" not in accept)) and len(outs) == 1:
        return Response(encode_npy(next(iter(outs.values()))), media_type=NPY)
    if SAFETENSORS in accept or (fmt == "safetensors" and "json" not in accept):
        return Response(encode_safetensors(outs), media_type=SAFETENSORS)
    return {"model_name": served.name, "outputs": {k: tensor_to_json(v) for k, v in outs.items()}}


def _replica_lost(e: BaseException) -> bool:
    """The replica died or went away before answering (not the request's own error)."""
    from ray import exceptions as rex
    lost = (rex.RayActorError, rex.ActorUnavailableError)
    try:
        from ray.serve.exceptions import DeploymentUnavailableError, ReplicaUnavailableError
        lost += (ReplicaUnavailableError, DeploymentUnavailableError)
    except ImportError:
        pass
    return isinstance(e, lost) and not isinstance(e, rex.RayTaskError)


class RayClient:
    """Calls a torchfast deployment through its Ray Serve handle, as the local batcher is called.

    ``timeout_ms`` becomes an absolute deadline sent with the request (time queued in Ray counts; past it
    the replica answers ``RequestTimeout`` without running it); ``priority`` orders it inside its replica.
    A request whose replica dies before answering is sent again, up to ``retries`` times and within the
    deadline (``retried`` counts them), so a replica crash loses no request. Thread-safe; ``ainfer`` from
    asyncio code (inside another deployment, say).
    """

    def __init__(self, handle: Any, *, retries: int = 3, timeout_ms: float | None = 10_000.0):
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries}")
        self.handle = handle
        self.retries = retries
        self.timeout_ms = timeout_ms
        self.retried = 0

    def _deadline(self, timeout_ms: float | None) -> float | None:
        t = self.timeout_ms if timeout_ms is None else timeout_ms
        return None if t is None else time.time() + t / 1000.0

    def infer(self, x: Any, *, timeout_ms: float | None = None, priority: int = 0) -> Any:
        deadline = self._deadline(timeout_ms)
        for attempt in range(self.retries + 1):
            wait = None if deadline is None else max(deadline - time.time(), 0.0) + 30.0
            try:
                return self.handle.infer.remote(x, priority=priority, deadline=deadline).result(timeout_s=wait)
            except Exception as e:  # noqa: BLE001 - only a lost replica is retried
                if not _replica_lost(e) or attempt == self.retries:
                    raise
                self.retried += 1

    async def ainfer(self, x: Any, *, timeout_ms: float | None = None, priority: int = 0) -> Any:
        deadline = self._deadline(timeout_ms)
        for attempt in range(self.retries + 1):
            try:
                return await self.handle.infer.remote(x, priority=priority, deadline=deadline)
            except Exception as e:  # noqa: BLE001 - only a lost replica is retried
                if not _replica_lost(e) or attempt == self.retries:
                    raise
                self.retried += 1
                await asyncio.sleep(0)
