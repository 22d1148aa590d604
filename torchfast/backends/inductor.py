"""Inductor: ``torch.compile`` with the settings that make inference fast.

CPU: weight freezing (constant-folds weights into the graph and lets oneDNN pre-pack them: the
setting that matters most on CPU), optional max-autotune. CUDA: the same plus fp16/bf16 (set by
``compile(dtype=...)``) and CUDA graphs. A dynamic batch marks dim 0 of every batched input dynamic
(other dims stay static, so kernels keep their specialized shapes). The build compiles eagerly on the
example, so compile time is measured apart from run time, and it checks that dynamo produced a graph
rather than silently falling back to eager.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import Config
from ..modules import call_model
from .compiled import Built
from .inputs import tensors_of, batch_size_of


@dataclass(frozen=True)
class Options(Config):
    freezing: bool = True        # fold weights into the graph (inference only; needs inference_mode)
    max_autotune: bool = False   # benchmark kernel/GEMM choices at compile time (slow compile, sometimes faster)
    cudagraphs: bool = True      # CUDA only: replay the whole graph as a CUDA graph (ignored on CPU)
    fullgraph: bool = False      # error on any graph break instead of running the breaks in eager


def _counters() -> tuple[int, int]:
    from torch._dynamo.utils import counters
    graphs = counters["stats"].get("unique_graphs", 0)
    breaks = sum(counters["graph_break"].values())
    return graphs, breaks


# models this backend compiled: compiling one again with the same settings hits dynamo's cache, which
# captures no new graph yet runs compiled code
_COMPILED: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


def build(model: nn.Module, example_inputs: Any, options: Options, *, dynamic_batch: bool = False) -> Built:
    on_cuda = any(t.is_cuda for t in tensors_of(example_inputs))
    inductor_opts = {"freezing": options.freezing, "max_autotune": options.max_autotune,
                     "triton.cudagraphs": bool(options.cudagraphs and on_cuda)}
    compiled = torch.compile(model, backend="inductor", options=inductor_opts, fullgraph=options.fullgraph,
                             dynamic=False if not dynamic_batch else None)
    if dynamic_batch:
        n = batch_size_of(example_inputs)
        for t in tensors_of(example_inputs):
            if t.dim() >= 1 and t.shape[0] == n:
                torch._dynamo.mark_dynamic(t, 0) if n > 1 else torch._dynamo.maybe_mark_dynamic(t, 0)
    g0, b0 = _counters()
    with torch.inference_mode():
        call_model(compiled, example_inputs)   # compile now, on the example
    g1, b1 = _counters()
    notes = []
    if g1 == g0:
        # a model compiled before in this process with the same settings reuses dynamo's cached graph
        if model not in _COMPILED:
            raise RuntimeError("dynamo captured no graph for this model (it would run in eager); "
                               "TORCH_LOGS=graph_breaks shows why (or the recompile limit was hit)")
        notes.append("reused the graph dynamo compiled for this model earlier in this process")
    if b1 > b0:
        notes.append(f"{b1 - b0} graph break(s): those parts run in eager between compiled graphs "
                     "(TORCH_LOGS=graph_breaks shows where)")
    _COMPILED.add(model)
    info = {"graphs": g1 - g0, "graph_breaks": b1 - b0, "freezing": options.freezing,
            "max_autotune": options.max_autotune, "cudagraphs": inductor_opts["triton.cudagraphs"]}
    return Built(runnable=compiled, info=info, notes=notes)
