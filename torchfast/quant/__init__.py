"""Quantization: int8 dynamic, int8 static (calibrated), weight-only int8/int4, float8, bf16/fp16.

``model, report = torchfast.quantize(model, Int8Static(), example_inputs=x, calibration=batches)``.
The config says what; the implementation (torch.ao x86/fbgemm kernels, FX graph mode, torchao
``quantize_``, PT2E + inductor) is chosen by the transform — by measurement where several can run.
"""
from __future__ import annotations

from typing import Iterable

from torch import nn

from ..dropin import eval_mode
from ..modules import Batch, check_module, restore_training_flags, training_flags
from ..report import Report
from ..stages import STAGES, load, stage_of
from ..transform import Exclusion, legacy_positional
from .calibrate import CalibrationError
from .common import AlreadyQuantizedError
from .config import Float8, HalfPrecision, Int8Dynamic, Int8Static, QuantConfig, WeightOnly
from .weight_only import UnsupportedDeviceError

__all__ = ["quantize", "Int8Dynamic", "Int8Static", "WeightOnly", "Float8", "HalfPrecision",
           "CalibrationError", "AlreadyQuantizedError", "UnsupportedDeviceError"]


@legacy_positional(("config", "example_inputs", "calibration"))
def quantize(model: nn.Module, config: QuantConfig | None = None, *, example_inputs: Batch | None = None,
             calibration: Iterable[Batch] | None = None, inplace: bool = False) -> tuple[nn.Module, Report]:
    """Quantize ``model`` with ``config`` (default ``Int8Dynamic()``); returns (quantized model, per-layer report).

    ``example_inputs``: a representative batch (tensor, tuple, dict). Int8Dynamic and HalfPrecision use it
    to time each candidate against fp32 and keep only what is faster; Int8Static checks calibration batches
    against it. ``calibration`` is a fallback for ``Int8Static(calibration=None)`` (recipes pass theirs).

    The returned model is in eval mode: it is an inference model. ``inplace=False`` (default) leaves
    ``model`` exactly as it was (weights, module types, every submodule's train/eval flag). ``inplace=True``
    reuses it: Int8Dynamic, WeightOnly and Float8 swap the quantized layers into ``model`` (the layers kept
    in float keep their parameter objects), HalfPrecision casts ``model`` itself and wraps it; on success
    ``model`` is left in eval mode as part of the result. Int8Static builds a new graph module either way
    and never changes ``model``. On any error ``model`` is unchanged.
    """
    check_module(model)
    config = Int8Dynamic() if config is None else config
    stage = stage_of(config) if isinstance(config, QuantConfig) else None
    if stage is None or stage.implementation is None:
        known = ", ".join(s.config_name for s in STAGES.values() if s.implementation is not None)
        raise TypeError(f"quantize() takes {known}; got {type(config).__name__}")
    implementation = load(stage.implementation)
    exclusion = Exclusion.resolve(model, config)
    flags = training_flags(model)
    try:
        model.eval()
        out, rep = implementation(model, config, example_inputs=example_inputs, calibration=calibration,
                                  exclusion=exclusion, inplace=inplace)
        eval_mode(out)
    except BaseException:
        restore_training_flags(flags)
        raise
    if not inplace or isinstance(config, Int8Static):
        restore_training_flags(flags)
    rep.summary.setdefault("config", config.to_dict())
    return out, rep

