"""Export: ``torch.export`` -> ExportedProgram, the portable PT2 artifact (``.pt2``).

The program runs through ``ExportedProgram.module()`` (ATen ops, no fusion: speed is close to
eager) and is what ``torchfast.save(..., format="exported_program")`` writes; it loads with plain
``torch.export.load`` anywhere, and feeds AOTInductor, TensorRT and ExecuTorch. A dynamic batch is a
``Dim`` on dim 0 of every batched input; a batch-1 example is widened to 2 for tracing, because
the tracer specializes sizes of 1.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

import torch.utils._pytree as pytree

from ..config import Config, check_range

from ..modules import call_model, split_batch
from .compiled import Built, plain_dict_output
from .inputs import batch_dims, batch_size_of, resize_batch


@dataclass(frozen=True)
class Options(Config):
    strict: bool = False          # non-strict tracing (Python runs as is): works for most HF/torchvision models
    decompose: bool = True        # run_decompositions(): the inference IR (core ATen) that runtimes expect
    max_batch: int | None = None  # upper bound of the dynamic batch dim (None: unbounded)

    def validate(self) -> None:
        if self.max_batch is not None:
            check_range("ExportOptions", "max_batch", self.max_batch, lo=2)


def export_program(model: nn.Module, example_inputs: Any, *, dynamic_batch: bool = False, strict: bool = False,
                   decompose: bool = True, max_batch: int | None = None) -> torch.export.ExportedProgram:
    """``torch.export.export`` with an optional dynamic batch dimension."""
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError("torch.export cannot export a TorchScript module; export the nn.Module it came from")
    dynamic_shapes = None
    if dynamic_batch:
        if batch_size_of(example_inputs) == 1:
            example_inputs = resize_batch(example_inputs, 2)
        dim = torch.export.Dim("batch", min=1, max=max_batch) if max_batch else torch.export.Dim("batch", min=1)
        dshape_args, dshape_kwargs = batch_dims(example_inputs, dim)
        dynamic_shapes = {**dict(zip(_arg_names(model, len(dshape_args)), dshape_args)), **dshape_kwargs}
    args, kwargs = split_batch(example_inputs)
    with torch.no_grad():
        ep = torch.export.export(model, args, kwargs, dynamic_shapes=dynamic_shapes, strict=strict)
    if decompose:
        ep = ep.run_decompositions()
    return ep


def _arg_names(model: nn.Module, n: int) -> list[str]:
    import inspect
    params = [p for p in inspect.signature(model.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(params) < n:
        var = [p for p in inspect.signature(model.forward).parameters.values() if p.kind == p.VAR_POSITIONAL]
        if var:
            raise ValueError(f"dynamic batch export of a *{var[0].name} forward is not supported; pass inputs by name")
    return [p.name for p in params[:n]]


def exportable(model: nn.Module, example_inputs: Any) -> tuple[nn.Module, type | None]:
    """(model to export, Mapping type to rebuild): an output type torch.export does not know (no pytree
    registration) is exported as a plain dict."""
    with torch.inference_mode():
        out = call_model(model, example_inputs)
    if isinstance(out, Mapping) and type(out) is not dict and type(out) not in pytree.SUPPORTED_NODES:
        return plain_dict_output(model), type(out)
    return model, None


def build(model: nn.Module, example_inputs: Any, options: Options, *, dynamic_batch: bool = False) -> Built:
    model, output_type = exportable(model, example_inputs)
    ep = export_program(model, example_inputs, dynamic_batch=dynamic_batch, strict=options.strict,
                        decompose=options.decompose, max_batch=options.max_batch)
    nodes = sum(1 for n in ep.graph.nodes if n.op == "call_function")
    return Built(runnable=ep.module(), artifact=ep, info={"strict": options.strict, "graph_ops": nodes},
                 output_type=output_type)
