"""Quantization configs: what to do, independent of which PyTorch API does it.

Each scheme is a frozen dataclass validated on construction. The implementation behind a scheme
(torch.ao eager/FX kernels, torchao ``quantize_``, the PT2E flow) is chosen by the transform, by
measurement where more than one can run, so user code does not change when PyTorch moves an API.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..config import Config, ConfigError, check_choice, check_flag, check_range, opaque

__all__ = ["Int8Dynamic", "Int8Static", "WeightOnly", "Float8", "HalfPrecision", "QuantConfig", "OBSERVERS"]

OBSERVERS = ("minmax", "histogram", "percentile")
_DYNAMIC_MODULES = ("linear", "lstm", "gru")


def _check_names(cls: str, fld: str, value: Any) -> None:
    if not isinstance(value, (tuple, list)) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{cls}.{fld} must be a tuple of qualified module names, got {value!r}")


@dataclass(frozen=True)
class QuantConfig(Config):
    """Base of the quantization configs. Each has ``exclude``: qualified module names or fnmatch globs
    (a name covers its submodules) of layers left in floating point. ``inplace`` is an argument of
    :func:`torchfast.quantize`, not a config field."""
    _transform = "quantize"


@dataclass(frozen=True)
class Int8Dynamic(QuantConfig):
    """int8 weights, activations quantized on the fly per batch: Linear, LSTM, GRU (no calibration).

    backend: "auto" times the int8 kernels available here per layer on the real input shapes and keeps
      the fastest (fp32 when no int8 kernel is faster); "torch.ao" (x86/fbgemm kernels) or "torchao"
      (``Int8DynamicActivationInt8WeightConfig``) force one.
    per_channel: per-output-channel weight scales (higher fidelity at the same speed).
    full_range: 8-bit activations instead of fbgemm's default 7 bits. None = the most precise pair a probe
      proves exact on this CPU: 8-bit activations and weights with VNNI; on older AVX2 (int16 pair sums)
      8-bit activations with 7-bit weights; True = 8-bit activations (7-bit weights where 8 x 8 would
      saturate); False = 7-bit activations, 8-bit weights.
    smooth: SmoothQuant (Xiao et al., 2023) activation->weight scale migration before int8, strength chosen
      per layer group on the example inputs / calibration batches. None (default): applied when the int8
      output is measurably closer to float with it; True forces, False skips. Not with ``inplace=True``.
    """
    backend: str = "auto"
    per_channel: bool = True
    full_range: bool | None = None
    modules: tuple[str, ...] = _DYNAMIC_MODULES
    exclude: tuple[str, ...] = ()
    keep_slower: bool = False   # apply int8 even to layers (and a model) measured slower than fp32
    smooth: bool | None = None  # SmoothQuant scale migration first; None: only where int8 gets measurably closer

    def validate(self) -> None:
        check_choice("Int8Dynamic", "backend", self.backend, ("auto", "torch.ao", "torchao"))
        _check_names("Int8Dynamic", "modules", self.modules)
        for m in self.modules:
            check_choice("Int8Dynamic", "modules", m, _DYNAMIC_MODULES)
        check_flag("Int8Dynamic", "smooth", self.smooth, none="where it helps")
        check_flag("Int8Dynamic", "full_range", self.full_range, none="the most precise exact pair")


@dataclass(frozen=True)
class Int8Static(QuantConfig):
    """int8 weights and activations, activation ranges calibrated on real batches (CNNs first of all).

    calibration: any iterable of batches (DataLoader, list of tensors, tuples for multi-input models,
      dicts of keyword inputs); in a recipe it may come from the recipe's calibration instead.
    observer: activation range estimator: "minmax", "histogram" (error-minimising search) or
      "percentile" (clip at ``percentile``).
    method: "fx" (FX graph mode, eager int8 kernels, scriptable), "pt2e" (torch.export + torchao
      X86InductorQuantizer, needs torch.compile/inductor to be fast; returns the compiled module), or
      "auto" (fx, plus pt2e when ``compile_ok``; the faster one that keeps fidelity wins).
    equalize / bias_correction: accuracy-preserving float rewrites before int8 (cross-layer equalization
      of Conv->Conv chains incl. depthwise, Nagel et al. 2019; bias correction of the int8 weights' mean
      output shift). None (default): each variant is quantized and kept only when its int8 output is
      measurably closer to the float model's on calibration batches; True forces, False skips.
    full_range: activation x weight precision. None = the most precise pair a probe proves exact on this
      CPU: 8-bit activations and weights with VNNI; on older AVX2 (int16 pair sums) 8-bit activations with
      7-bit weights (per-tensor activations lose more to a bit than per-channel weights do); True = 8-bit
      activations (7-bit weights where 8 x 8 would saturate); False = 7-bit activations, 8-bit weights
      (torch.ao's x86 default).
    islands: keep int8 only where it repays its quantize/dequantize: a group of int8 layers between ops
      that run float (SiLU, GELU, custom functions) whose measured saving is less than the quantize and
      dequantize around it stays float with them (fx method; measured on calibration-shaped inputs).
      ``keep_slower=True`` keeps every island int8.
    ``calibration`` is data: ``to_dict`` shows its type and ``from_dict`` leaves it unset (pass it to
    ``quantize(..., calibration=)`` instead).
    """
    calibration: Any = opaque(compare=False, repr=False)
    observer: str = "histogram"
    percentile: float = 99.99
    per_channel: bool = True
    method: str = "fx"
    max_batches: int | None = None
    exclude: tuple[str, ...] = ()
    compile_ok: bool = False    # allow "auto" to try the PT2E+inductor path (minutes of compile on 2 cores)
    progress: bool = True
    keep_slower: bool = False   # return int8 even when it measures slower than float on the example inputs
    equalize: bool | None = None         # cross-layer equalization first; None: only where it measurably helps
    bias_correction: bool | None = None  # correct the int8 weights' mean output shift; None: where it helps
    islands: bool = True        # keep int8 only where it repays its quantize/dequantize
    full_range: bool | None = None       # 8-bit activations; None: where a probe proves the kernels exact

    def validate(self) -> None:
        check_choice("Int8Static", "observer", self.observer, OBSERVERS)
        check_choice("Int8Static", "method", self.method, ("auto", "fx", "pt2e"))
        check_range("Int8Static", "percentile", self.percentile, 50.0, 100.0, lo_inclusive=False)
        if self.max_batches is not None:
            check_range("Int8Static", "max_batches", self.max_batches, 1)
        for name in ("equalize", "bias_correction"):
            check_flag("Int8Static", name, getattr(self, name), none="where it helps")
        check_flag("Int8Static", "full_range", self.full_range, none="the most precise exact pair")
        if not isinstance(self.islands, bool):
            raise ConfigError(f"Int8Static.islands must be True or False, got {self.islands!r}")
        if self.calibration is not None and isinstance(self.calibration, (str, bytes, int, float)):
            raise ConfigError(f"Int8Static.calibration must be an iterable of batches, got {self.calibration!r}")


@dataclass(frozen=True)
class WeightOnly(QuantConfig):
    """Weight-only int8/int4 through torchao ``quantize_`` — the right choice for memory-bound GPU decoding.

    int8 runs on CPU as well (torchao's int8 weight-only kernel); int4 needs CUDA (tinygemm) here.
    """
    bits: int = 8
    group_size: int = 128
    exclude: tuple[str, ...] = ()
    keep_slower: bool = False   # return the quantized model even when it measures slower than float

    def validate(self) -> None:
        check_choice("WeightOnly", "bits", self.bits, (8, 4))
        check_choice("WeightOnly", "group_size", self.group_size, (32, 64, 128, 256))


@dataclass(frozen=True)
class Float8(QuantConfig):
    """float8 (e4m3) weights, and activations when ``dynamic_activations``, through torchao; CUDA sm89+."""
    dynamic_activations: bool = True
    granularity: str = "per_row"
    exclude: tuple[str, ...] = ()
    keep_slower: bool = False   # return the quantized model even when it measures slower than float

    def validate(self) -> None:
        check_choice("Float8", "granularity", self.granularity, ("per_row", "per_tensor"))


_HALF = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
         "half": torch.float16, torch.bfloat16: torch.bfloat16, torch.float16: torch.float16}


@dataclass(frozen=True)
class HalfPrecision(QuantConfig):
    """Cast weights and activations to bf16/fp16. With example inputs the cast is timed against fp32 and
    kept only if faster (``keep_slower`` overrides): bf16 wins on CPUs with AVX512-BF16/AMX, fp16 on CUDA.
    ``dtype`` may be given by name ('bf16', 'float16', ...); it is stored as the torch dtype. Excluded
    layers run in float32 inside the half-precision model (inputs cast up, outputs cast back)."""
    dtype: Any = torch.bfloat16
    keep_slower: bool = False
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        try:
            known = self.dtype in _HALF
        except TypeError:
            known = False
        if not known:
            raise ConfigError(f"HalfPrecision.dtype must be torch.bfloat16 or torch.float16 "
                              f"('bf16'/'fp16'), got {self.dtype!r}")
        object.__setattr__(self, "dtype", _HALF[self.dtype])
        super().__post_init__()

    @property
    def torch_dtype(self) -> torch.dtype:
        return _HALF[self.dtype]
