"""Inductor: ``torch.compile`` with the settings that make inference fast.

CPU: weight freezing (constant-folds weights into the graph and lets oneDNN pre-pack them: the
setting that matters most on CPU), optional max-autotune. CUDA: the same plus fp16/bf16 (set by
``compile(dtype=...)``) and CUDA graphs. A dynamic batch marks dim 0 of every batched input dynamic
(other dims stay static, so kernels keep their specialized shapes). The build compiles eagerly on the
example, so compile time is measured apart from run time, and it checks that dynamo produced a graph
rather than silently falling back to eager.

Two CPU settings are there to try, off by default because neither measured faster here (inductor was
never the fastest backend on a 2-core CPU, see benchmarks/RESULTS.md): ``cpp_wrapper`` (the compiled
graph calls its kernels from generated C++ instead of Python, which saves per-kernel overhead at small
batch) and ``channels_last`` (a copy of the model and its 4-D inputs in NHWC, the layout oneDNN's
convolutions prefer). ``backend="auto"`` times inductor as configured.
"""
from __future__ import annotations

import copy
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
    cpp_wrapper: bool = False    # call the kernels from generated C++ rather than Python
    channels_last: bool = False  # NHWC copy of the model; 4-D inputs converted on each call


class _ChannelsLast(nn.Module):
    """Feeds 4-D tensors to the compiled model in channels_last memory format (same values, NHWC strides)."""

    def __init__(self, compiled: Any):
        super().__init__()
        self.compiled = compiled

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        def cl(t: Any) -> Any:
            return t.contiguous(memory_format=torch.channels_last) if isinstance(t, torch.Tensor) and t.dim() == 4 else t
        return self.compiled(*(cl(a) for a in args), **{k: cl(v) for k, v in kwargs.items()})


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
                     "triton.cudagraphs": bool(options.cudagraphs and on_cuda), "cpp_wrapper": options.cpp_wrapper}
    if options.channels_last:
        model = copy.deepcopy(model).to(memory_format=torch.channels_last)  # the user's model keeps its layout
    compiled = torch.compile(model, backend="inductor", options=inductor_opts, fullgraph=options.fullgraph,
                             dynamic=False if not dynamic_batch else None)
    if options.channels_last:
        compiled = _ChannelsLast(compiled)
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
            "max_autotune": options.max_autotune, "cudagraphs": inductor_opts["triton.cudagraphs"],
            "cpp_wrapper": options.cpp_wrapper, "channels_last": options.channels_last}
    return Built(runnable=compiled, info=info, notes=notes)
