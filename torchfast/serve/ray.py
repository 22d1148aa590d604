"""Ray Serve: a deployment around a torchfast model, batched by ``@serve.batch`` with our knobs.

Knob mapping: ``max_batch_size`` -> ``serve.batch(max_batch_size=..., batch_size_fn=rows)`` (a request
of n rows counts n), ``max_delay_ms`` -> ``batch_wait_timeout_s`` (Ray also measures it from the first
request of a batch), ``max_queue_size`` -> ``max_queued_requests`` (Ray answers BackPressureError /
HTTP 503 beyond it), ``replicas`` -> ``num_replicas``. Inside a batch, our own collation runs it: shape
groups, padding buckets (``preferred_batch_sizes``), sequence padding and error isolation, so one
bad request fails alone. Needs the ``ray`` extra (``pip install 'torchfast[ray]'``).
"""
from __future__ import annotations

import logging
import uuid
from typing import Any, Callable, Sequence


def ray_deployment(served_factory: Callable[[], Any], *, name: str = "torchfast", replicas: int = 1,
                   max_batch_size: int = 32, max_delay_ms: float = 5.0,
                   preferred_batch_sizes: Sequence[int] | None = None, max_queue_size: int = -1,
                   num_cpus_per_replica: float = 1.0, isolate_errors: bool = True) -> Any:
    """A bound Ray Serve application: ``serve.run(ray_deployment(lambda: load_served_model('digits')))``.

    ``served_factory`` runs inside each replica (so the model is loaded there, not pickled across);
    it returns a :class:`~torchfast.serve.model.ServedModel`. Call the handle with a tensor / tuple /
    dict request (``handle.remote(x).result()``), or POST ``{"inputs": ...}`` JSON over Ray's HTTP proxy.
    """
    try:
        from ray import serve
    except ImportError as e:
        raise ImportError("the Ray Serve deployment needs the 'ray' extra: pip install 'torchfast[ray]'") from e
    from starlette.requests import Request

    if replicas < 1:
        raise ValueError(f"replicas must be >= 1, got {replicas}")

    @serve.deployment(name=name, num_replicas=replicas, max_queued_requests=max_queue_size,
                      max_ongoing_requests=max(2 * max_batch_size, 8),
                      ray_actor_options={"num_cpus": num_cpus_per_replica})
    class TorchfastModel:
        def __init__(self, factory: Callable[[], Any]):
            from .batcher import DynamicBatcher
            self.served = factory()
            # the batcher is used only for its collation/isolation (start=False: Ray forms the batches)
            self.runner = DynamicBatcher(self.served.model, max_batch_size=max_batch_size, max_delay_ms=max_delay_ms,
                                         preferred_batch_sizes=preferred_batch_sizes,
                                         sequence=self.served.sequence, isolate_errors=isolate_errors,
                                         name=self.served.name, start=False)
            self.batch_sizes: list[int] = []

        @serve.batch(max_batch_size=max_batch_size, batch_wait_timeout_s=max_delay_ms / 1000.0,
                     batch_size_fn=lambda items: sum(_rows(x) for x in items))
        async def _batched(self, xs: list) -> list:
            self.batch_sizes.append(sum(_rows(x) for x in xs))
            return [("err", a) if isinstance(a, BaseException) else ("ok", a) for a in self.runner.run_batch(xs)]

        async def infer(self, x: Any) -> Any:
            kind, val = await self._batched(x)
            if kind == "err":
                raise val
            return val

        async def __call__(self, request: Request) -> Any:
            from .codecs import HTTPError, decode_json, named_outputs, tensor_to_json
            try:
                x = self.served.request(decode_json(self.served, await request.body()))
                self.runner.check(x)
            except HTTPError as e:
                return _response(e.status, {"error": e.message})
            except (TypeError, ValueError) as e:
                return _response(422, {"error": str(e)})
            kind, val = await self._batched(x)
            if kind == "err":
                rid = uuid.uuid4().hex[:16]
                logging.getLogger("torchfast.serve").error("request %s: model %r failed", rid, self.served.name,
                                                           exc_info=val)
                return _response(500, {"error": f"model {self.served.name!r} failed on this request "
                                                f"({type(val).__name__}); the replica's log has the details "
                                                f"under request id {rid}", "request_id": rid})
            return {"model_name": self.served.name,
                    "outputs": {k: tensor_to_json(v) for k, v in named_outputs(val).items()}}

        def stats(self) -> dict:
            return {"batch_sizes": list(self.batch_sizes), **self.runner.snapshot()}

    return TorchfastModel.bind(served_factory)


def _rows(x: Any) -> int:
    import torch
    if isinstance(x, torch.Tensor):
        return int(x.shape[0]) if x.dim() else 1
    vals = list(x.values()) if isinstance(x, dict) else list(x) if isinstance(x, (tuple, list)) else []
    for v in vals:
        if isinstance(v, torch.Tensor) and v.dim():
            return int(v.shape[0])
    return 1


def _response(status: int, body: dict) -> Any:
    from starlette.responses import JSONResponse
    return JSONResponse(body, status_code=status)
