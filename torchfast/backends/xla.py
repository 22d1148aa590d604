"""XLA (TPU, or the CPU PJRT device for testing): ``torch.compile(backend="openxla")`` on ``torch_xla.device()``.

The PJRT runtime picks its device from the environment (``PJRT_DEVICE=TPU`` on a TPU host,
``PJRT_DEVICE=CPU`` to run the same path on a CPU). The model and inputs live on the XLA device;
every call ends with ``torch_xla.sync()`` so the work is really executed (and timed) inside the call.
XLA compiles one program per input shape: a new batch size means a new compile (no dynamic batch).
torch_xla pins its own torch version (2.9.1 for torch_xla 2.9.0); ``make test-xla`` builds that env.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import Config, check_choice
from .compiled import Built


@dataclass(frozen=True)
class Options(Config):
    mode: str = "compile"   # "compile": dynamo + openxla (graph cached per shape); "lazy": lazy tensors + sync

    def validate(self) -> None:
        check_choice("XLAOptions", "mode", self.mode, ("compile", "lazy"))


def _torch_xla():
    try:
        import torch_xla
    except ImportError as e:  # registry.check() normally says this first
        raise ImportError("the xla backend needs torch_xla (a TPU host, or `make test-xla` for CPU PJRT)") from e
    return torch_xla


def default_device() -> torch.device:
    """``torch_xla.device()``: the first device of the PJRT runtime chosen by PJRT_DEVICE."""
    return _torch_xla().device()


class _XlaRunner(nn.Module):
    """Runs the compiled (or lazy) module and materializes the result with ``torch_xla.sync()``."""

    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.fn(*args, **kwargs)
        _torch_xla().sync()
        return out


def build(model: nn.Module, example_inputs: Any, options: Options, *, dynamic_batch: bool = False) -> Built:
    txla = _torch_xla()
    fn = torch.compile(model, backend="openxla") if options.mode == "compile" else model
    notes = []
    pjrt = os.environ.get("PJRT_DEVICE")
    if not pjrt:
        notes.append("PJRT_DEVICE is not set: torch_xla chose the device itself (set PJRT_DEVICE=TPU or CPU)")
    try:
        import torch_xla.runtime as xr
        device_type = xr.device_type()
    except Exception:  # pragma: no cover - older torch_xla
        device_type = pjrt
    return Built(runnable=_XlaRunner(fn), info={"xla_mode": options.mode, "pjrt_device": device_type,
                                                "torch_xla": getattr(txla, "__version__", "?")},
                 notes=notes, grad_mode="no_grad")
