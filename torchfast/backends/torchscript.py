"""TorchScript: trace (or script) -> freeze -> optimize_for_inference.

TorchScript is deprecated upstream in favour of torch.export, but it is what C++ libtorch and
Triton's PyTorch backend load, and it is the one compiler that runs torch.ao quantized modules
(packed int8 kernels) as a graph. The saved artifact is the frozen module (portable);
``optimize_for_inference`` (oneDNN layouts, conv/bn folding) is applied only to the in-memory runnable.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from ..config import Config, check_choice
from ..modules import call_model, split_batch
from ._warnings import quiet_deprecations
from .compiled import Built, plain_dict_output

DEPRECATION_NOTE = ("torchfast: TorchScript is deprecated upstream (torch.export is its successor); torchfast keeps the "
        "'torchscript' backend for libtorch/Triton deployments.")


@dataclass(frozen=True)
class Options(Config):
    method: str = "trace"        # "trace" (works for most models, HF included) or "script" (keeps control flow)
    freeze: bool = True          # inline weights and attributes as constants
    optimize: bool = True        # torch.jit.optimize_for_inference on the frozen module

    def validate(self) -> None:
        check_choice("TorchScriptOptions", "method", self.method, ("trace", "script"))
        if self.optimize and not self.freeze:
            from ..config import ConfigError
            raise ConfigError("TorchScriptOptions.optimize=True needs freeze=True")


def to_torchscript(model: nn.Module, example_inputs: Any, method: str = "trace") -> torch.jit.ScriptModule:
    """Trace or script ``model`` (eval mode). Dict inputs are traced as keyword inputs."""
    if isinstance(model, torch.jit.ScriptModule):
        return model
    with quiet_deprecations("torchscript", DEPRECATION_NOTE), torch.no_grad():
        if method == "script":
            return torch.jit.script(model)
        args, kwargs = split_batch(example_inputs)
        if kwargs and not args:
            return torch.jit.trace(model, example_kwarg_inputs=kwargs, strict=False, check_trace=False,
                                   _store_inputs=False)
        if kwargs:
            raise ValueError("TorchScript tracing takes positional or keyword inputs, not both")
        return torch.jit.trace(model, args, strict=False, check_trace=False, _store_inputs=False)


def freeze(scripted: torch.jit.ScriptModule) -> torch.jit.ScriptModule:
    with quiet_deprecations("torchscript", DEPRECATION_NOTE):
        return torch.jit.freeze(scripted.eval())


def build(model: nn.Module, example_inputs: Any, options: Options, *, dynamic_batch: bool = False) -> Built:
    notes = []
    output_type = None
    if not isinstance(model, torch.jit.ScriptModule):
        with torch.inference_mode():
            out = call_model(model, example_inputs)
        # HF ModelOutput and similar Mapping types: trace a plain dict (all tracing accepts), rebuild the type
        if isinstance(out, Mapping) and type(out) is not dict:
            output_type = type(out)
            if options.method == "trace":
                model = plain_dict_output(model)
    scripted = to_torchscript(model, example_inputs, options.method)
    artifact = runnable = freeze(scripted) if options.freeze else scripted
    if options.optimize:
        try:
            with quiet_deprecations("torchscript", DEPRECATION_NOTE):
                # optimize_for_inference rewrites in place: give it its own frozen copy, keep the artifact
                # portable (a second freeze holds one more copy of the weights; a save/load round trip, five)
                runnable = torch.jit.optimize_for_inference(freeze(scripted))
        except Exception as e:  # some graphs (custom ops) refuse the oneDNN passes: keep the frozen module
            notes.append(f"optimize_for_inference skipped ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                         "running the frozen module")
    return Built(runnable=runnable, artifact=artifact, output_type=output_type, notes=notes,
                 info={"method": options.method, "frozen": options.freeze, "optimized": runnable is not artifact})
