"""torchfast: make a trained PyTorch model faster and smaller for inference, without leaving PyTorch.

The public API is re-exported here lazily, so ``import torchfast`` stays cheap and optional
dependencies (transformers, torchao, FastAPI, ...) load only when their feature is used.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    # foundation
    "Report": "torchfast.report",
    "ConfigError": "torchfast.config",
    "config_from_dict": "torchfast.config",
    "measure": "torchfast.measure",
    # low-rank
    "decompose": "torchfast.lowrank",
    "LowRank": "torchfast.lowrank",
    # quantization
    "quantize": "torchfast.quant",
    "Int8Dynamic": "torchfast.quant",
    "Int8Static": "torchfast.quant",
    "WeightOnly": "torchfast.quant",
    "Float8": "torchfast.quant",
    "HalfPrecision": "torchfast.quant",
    # pruning and sparsity
    "prune": "torchfast.prune",
    "ChannelPruning": "torchfast.prune",
    "sparsify": "torchfast.prune",
    "SemiStructured24": "torchfast.prune",
    "UnstructuredSparse": "torchfast.prune",
    "finetune": "torchfast.prune",
    # recovery without labels
    "distill": "torchfast.distill",
    "DistillError": "torchfast.distill",
    # compile, pipeline, deployment
    "compile": "torchfast.backends",
    "optimize": "torchfast.pipeline",
    "Optimized": "torchfast.pipeline",
    "SearchSpace": "torchfast.search",  # optimize(recipe=SearchSpace(...)): the space recipe="auto" searches
    "Tolerance": "torchfast.tolerance",
    "wrap": "torchfast.dropin",  # not torchfast.wrap: a submodule of that name would shadow the function
    "save": "torchfast.export",
    "load": "torchfast.export",
    "UnsafeArtifactError": "torchfast.export",
    "TorchfastError": "torchfast.errors",
    # serving (subpackage)
    "serve": "torchfast.serve",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    mod_name = _EXPORTS.get(name)
    if mod_name is None:
        raise AttributeError(f"module 'torchfast' has no attribute {name!r}")
    module = importlib.import_module(mod_name)
    value = module if mod_name == f"torchfast.{name}" else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
