"""The result of ``torchfast.compile``: a drop-in ``nn.Module`` around what the backend built."""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import nn

from ..modules import move_batch
from ..report import Report

__all__ = ["Built", "Compiled", "plain_dict_output"]


@dataclass
class Built:
    """What a backend's ``build()`` returns."""
    runnable: Callable                 # what runs at inference time
    artifact: Any = None               # what save() writes natively (ScriptModule, ExportedProgram, TRT module)
    info: dict[str, Any] = field(default_factory=dict)   # figures for the report (graphs, graph breaks, ...)
    notes: list[str] = field(default_factory=list)
    output_type: type | None = None    # rebuild this Mapping type from a plain dict output (TorchScript)
    grad_mode: str = "inference"       # "inference": inference_mode; "no_grad" where a runtime lacks inference tensors (XLA)


class Compiled(nn.Module):
    """A compiled model that calls like the original: same arguments, same outputs.

    Inputs are moved to the compiled device/dtype when they differ, and the call runs under
    ``torch.inference_mode`` (the mode the backend compiled for, so no recompilation).
    ``compile_time_s`` covers building plus the warm-up calls; ``report`` holds the figures.
    """

    def __init__(self, runnable: Callable, *, backend: str, device: torch.device, dtype: torch.dtype,
                 dynamic_batch: bool, artifact: Any, compile_time_s: float, report: Report,
                 source: nn.Module | None, example_inputs: Any, output_type: type | None = None,
                 grad_mode: str = "inference"):
        super().__init__()
        if isinstance(runnable, nn.Module):
            self.module = runnable           # registered, so .to()/.state_dict() see it
        else:
            self._runnable = runnable
        self.backend = backend
        self.device = torch.device(device)
        self.dtype = dtype
        self.dynamic_batch = dynamic_batch
        self.artifact = artifact
        self.compile_time_s = compile_time_s
        self.report = report
        self.output_type = output_type
        self.grad_mode = grad_mode
        # kept out of the module tree: the source model for save() in other formats, not a submodule
        object.__setattr__(self, "source", source)
        object.__setattr__(self, "example_inputs", example_inputs)

    @property
    def runnable(self) -> Callable:
        return self._modules["module"] if "module" in self._modules else self._runnable

    def _prepare(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        cast = self.dtype if self.dtype != torch.float32 else None
        need = cast is not None
        if not need:
            for t in list(args) + list(kwargs.values()):
                if isinstance(t, torch.Tensor) and t.device != self.device:
                    need = True
                    break
        if not need:
            return args, kwargs
        return move_batch(args, self.device, cast), move_batch(kwargs, self.device, cast)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.grad_mode == "inference":
            args, kwargs = self._prepare(args, kwargs)
            with torch.inference_mode():
                out = self.runnable(*args, **kwargs)
        else:  # XLA cannot take inference tensors, even when the caller is in inference_mode
            with torch.inference_mode(False), torch.no_grad():
                args, kwargs = self._prepare(args, kwargs)
                out = self.runnable(*args, **kwargs)
        if self.output_type is not None and isinstance(out, Mapping) and not isinstance(out, self.output_type):
            out = self.output_type(**out)
        return out

    def extra_repr(self) -> str:
        return (f"backend={self.backend!r}, device={self.device}, dtype={self.dtype}, "
                f"dynamic_batch={self.dynamic_batch}, compile_time_s={self.compile_time_s:.2f}")


class _PlainDictOutput(nn.Module):
    """Returns a Mapping output as a plain dict, which torch.jit.trace accepts (a dict subclass it may not)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *args: Any, **kwargs: Any) -> dict:
        return {k: v for k, v in self.model(*args, **kwargs).items() if v is not None}


def plain_dict_output(model: nn.Module) -> nn.Module:
    """Wrap ``model`` in a _PlainDictOutput whose forward shows ``model.forward``'s signature
    (tracing with keyword inputs checks the names against it)."""
    sig = inspect.signature(model.forward)
    self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)

    def forward(self, *args: Any, **kwargs: Any) -> dict:
        return _PlainDictOutput.forward(self, *args, **kwargs)
    forward.__signature__ = sig.replace(parameters=[self_param, *sig.parameters.values()])
    cls = type(f"{type(model).__name__}DictOutput", (_PlainDictOutput,), {"forward": forward})
    return cls(model)
