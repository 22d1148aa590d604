"""Serving: a dynamic batcher that loses no request, an HTTP server, Ray Serve and Triton paths.

Names load lazily, so ``import torchfast.serve`` needs neither FastAPI nor Ray nor PyTriton::

    batcher = torchfast.serve.DynamicBatcher(model, max_batch_size=32, max_delay_ms=5)
    y = batcher(x)                 # blocking, thread-safe
    y = await batcher.submit(x)    # asyncio
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    "DynamicBatcher": "torchfast.serve.batcher",
    "ServeError": "torchfast.serve.batcher",
    "QueueFull": "torchfast.serve.batcher",
    "RequestTimeout": "torchfast.serve.batcher",
    "BatcherClosed": "torchfast.serve.batcher",
    "NonFiniteOutput": "torchfast.serve.batcher",
    "ModelError": "torchfast.serve.batcher",
    "WorkerError": "torchfast.serve.batcher",
    "CallerGone": "torchfast.serve.batcher",
    "SequencePadding": "torchfast.serve.collate",
    "BatcherMetrics": "torchfast.serve.metrics",
    "InputSpec": "torchfast.serve.model",
    "ServedModel": "torchfast.serve.model",
    "load_served_model": "torchfast.serve.model",
    "create_app": "torchfast.serve.http",
    "serve_http": "torchfast.serve.http",
    "write_model_repository": "torchfast.serve.triton",
    "serve_pytriton": "torchfast.serve.triton",
    "ray_deployment": "torchfast.serve.ray",
    "RayClient": "torchfast.serve.ray",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'torchfast.serve' has no attribute {name!r}")
    value = getattr(importlib.import_module(mod), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
