"""Pruning-aware inference: structured pruning on a dependency graph, and sparse kernels.

``prune`` removes whole channels / neurons / attention heads so every layer becomes a smaller dense
layer (faster everywhere); ``sparsify`` masks weights and runs them through sparse kernels only where
those are measured faster (2:4 semi-structured on CUDA, CSR/BSR on CPU).
"""
from __future__ import annotations

from .api import PruneError, prune
from .config import ChannelPruning, SemiStructured24, UnstructuredSparse
from .graph import DependencyGraph, TraceError
from .layers import LayerRule, register_layer
from .trace import trace

__all__ = ["prune", "ChannelPruning", "sparsify", "SemiStructured24", "UnstructuredSparse", "finetune",
           "PruneError", "TraceError", "DependencyGraph", "trace", "register_layer", "LayerRule"]

from .finetune import finetune
from .sparse import sparsify


# ``torchfast.prune`` is both this package and the public function ``tf.prune(model, ...)``.
# Importing the package binds the *module* to ``torchfast.prune``, so the module itself must be callable:
# calling it is calling :func:`prune`, and ``torchfast.prune.ChannelPruning`` etc. keep working.
import sys as _sys
import types as _types


class _CallablePackage(_types.ModuleType):
    def __call__(self, *args, **kwargs):
        return prune(*args, **kwargs)


_sys.modules[__name__].__class__ = _CallablePackage
