"""Weight-only int8/int4 and float8 through torchao ``quantize_``: the GPU choices.

Decoding and small-batch GPU inference are memory-bound: int4/int8 weights cut the bytes moved per
token, and torchao's kernels (tinygemm int4, int8 weight-only, float8 rowwise on sm89+) turn that
into speed. int8 weight-only also runs on CPU (torchao ``Int8Tensor``); int4 and float8 need CUDA
here, and say so before touching the model.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from ..modules import model_device, model_dtype, swap_modules
from ..report import Report
from ..transform import Exclusion
from .common import check_not_quantized
from .config import Float8, WeightOnly
from .warnings import import_torchao, quiet
from ..errors import TorchfastError

__all__ = ["quantize_weight_only", "quantize_float8", "UnsupportedDeviceError"]


class UnsupportedDeviceError(TorchfastError, RuntimeError):
    """The scheme has no kernel on the model's device; the message says what it needs."""


def _targets(model: nn.Module, exclusion: Exclusion) -> tuple[list[str], dict[str, str]]:
    names, reasons = [], {}
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear) or not name:
            continue
        if exclusion(name):
            reasons[name] = exclusion.reason(name)
        elif mod.in_features % 16 or mod.out_features % 16:
            reasons[name] = f"shape {mod.in_features}->{mod.out_features} not a multiple of 16 (no packed kernel)"
        else:
            names.append(name)
    return names, reasons


def _apply(model: nn.Module, ao_config, names: list[str], reasons: dict[str, str], title: str,
           scheme: str, inplace: bool) -> tuple[nn.Module, Report]:
    from torchao.quantization import quantize_

    work = model if inplace else copy.deepcopy(model)
    quantized: dict[str, nn.Module] = {}  # each layer quantized on its own copy, swapped in once all are done
    with quiet("torchao"):
        for name in names:
            holder = nn.Sequential(copy.deepcopy(work.get_submodule(name)))
            quantize_(holder, ao_config, filter_fn=lambda m, fqn: isinstance(m, nn.Linear))
            quantized[name] = holder[0]
    swap_modules(work, quantized)
    report = Report(title, columns=["layer", "shape", "applied", "scheme", "reason"])
    for name in names:
        mod = work.get_submodule(name)
        report.add_row(layer=name, shape=f"{mod.in_features}->{mod.out_features}", applied=True,
                       scheme=f"{scheme} ({type(mod.weight).__name__})")
    for name, why in reasons.items():
        mod = model.get_submodule(name)
        report.add_row(layer=name, shape=f"{mod.in_features}->{mod.out_features}", applied=False, scheme="float", reason=why)
    report.summary.update({"scheme": scheme, "layers quantized": len(names), "layers kept in float": len(reasons)})
    return work, report


def _cuda_capability(device: torch.device) -> tuple[int, int] | None:
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_capability(device)


def quantize_weight_only(model: nn.Module, cfg: WeightOnly, *, example_inputs: Any = None, calibration: Any = None,
                         exclusion: Exclusion | None = None, inplace: bool = False) -> tuple[nn.Module, Report]:
    """``quantize()`` for WeightOnly (weights only: no inputs needed)."""
    check_not_quantized(model, f"WeightOnly(bits={cfg.bits})")
    device, dtype = model_device(model), model_dtype(model)
    import_torchao()
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig

    if cfg.bits == 4:
        if device.type != "cuda":
            raise UnsupportedDeviceError(
                f"WeightOnly(bits=4) needs a CUDA GPU (torchao's tinygemm int4 kernel); the model is on {device}. "
                f"On CPU use WeightOnly(bits=8) or Int8Dynamic()")
        if dtype != torch.bfloat16:
            raise UnsupportedDeviceError(f"WeightOnly(bits=4) needs a bfloat16 model (tinygemm), the model is {dtype}: "
                                         f"cast with HalfPrecision(torch.bfloat16) first, or model.to(torch.bfloat16)")
        ao = Int4WeightOnlyConfig(group_size=cfg.group_size, int4_packing_format="tile_packed_to_4d")
        scheme = f"int4 weight-only, group {cfg.group_size}"
    else:
        ao = Int8WeightOnlyConfig()
        scheme = "int8 weight-only, per-row"
    names, reasons = _targets(model, exclusion if exclusion is not None else Exclusion(cfg.exclude, "WeightOnly"))
    return _apply(model, ao, names, reasons, "weight-only quantization (torchao)", scheme, inplace)


def quantize_float8(model: nn.Module, cfg: Float8, *, example_inputs: Any = None, calibration: Any = None,
                    exclusion: Exclusion | None = None, inplace: bool = False) -> tuple[nn.Module, Report]:
    """``quantize()`` for Float8 (dynamic activation scales: no calibration)."""
    check_not_quantized(model, "Float8")
    device = model_device(model)
    cap = _cuda_capability(device)
    if cap is None or cap < (8, 9):
        where = f"{device}" if cap is None else f"{torch.cuda.get_device_name(device)} (sm{cap[0]}{cap[1]})"
        raise UnsupportedDeviceError(f"Float8 needs a CUDA GPU with float8 tensor cores (sm89+: L4, L40, H100, H200); "
                                     f"the model is on {where}")
    import_torchao()
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, Float8WeightOnlyConfig, PerRow, PerTensor

    gran = PerRow() if cfg.granularity == "per_row" else PerTensor()
    if cfg.dynamic_activations:
        ao = Float8DynamicActivationFloat8WeightConfig(granularity=gran)
        scheme = f"float8 e4m3 weights+activations, {cfg.granularity}"
    else:
        ao = Float8WeightOnlyConfig()
        scheme = "float8 e4m3 weight-only"
    names, reasons = _targets(model, exclusion if exclusion is not None else Exclusion(cfg.exclude, "Float8"))
    return _apply(model, ao, names, reasons, "float8 quantization (torchao)", scheme, inplace)
