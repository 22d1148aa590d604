"""TensorRT via Torch-TensorRT's dynamo frontend (``torch_tensorrt.compile(model, ir="dynamo", ...)``).

Written against the torch-tensorrt 2.14 API. Since TensorRT 10.12 networks are strongly typed
(``use_explicit_typing=True`` is the default and ``enabled_precisions`` is deprecated), precision is
spelled as that release documents it:

- fp32: the model as it is;
- fp16/bf16: TensorRT autocast (``enable_autocast=True, autocast_low_precision_type=...``) on the fp32
  model, which keeps numerically sensitive layers in fp32; or, with ``compile(dtype="fp16")``, the model
  cast by PyTorch plus ``use_fp32_acc=True`` for fp32 accumulation in matmuls;
- int8: a model quantized with NVIDIA ModelOpt (Q/DQ nodes; TensorRT no longer calibrates by itself),
  exported under ModelOpt's ``export_torch_mode()``.

A dynamic batch becomes ``torch_tensorrt.Input(min_shape, opt_shape, max_shape)`` per batched input.
Saving goes through ``torch_tensorrt.save(..., output_format="exported_program")``; the file loads with
``torch.export.load`` where torch_tensorrt is imported. torch_tensorrt cannot be installed on the
project's CPU machines, so the pure parts (specs, precision mapping, settings) are separate
functions tested there; the calls into torch_tensorrt run only on a CUDA host.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from ..config import Config, ConfigError, check_choice, check_range
from ..modules import split_batch
from ..specs import InputSpec, dtype_name, parse_dtype
from .compiled import Built
from .inputs import batch_size_of
from .registry import BackendError, quantization_kind

PRECISIONS = ("fp32", "fp16", "bf16", "int8")
_LOW = ("fp16", "bf16")  # TensorRT autocast precisions


@dataclass(frozen=True)
class Options(Config):
    precision: str = "fp32"               # fp32 | fp16 | bf16 (TensorRT autocast) | int8 (ModelOpt-quantized model)
    min_batch: int = 1                    # dynamic batch range (used with compile(dynamic_batch=True))
    opt_batch: int | None = None          # the batch TensorRT tunes for (default: the example's)
    max_batch: int | None = None          # default: max(opt_batch, example batch) * 4
    min_block_size: int = 5               # fewest TRT-capable ops per engine block (smaller blocks stay in PyTorch)
    optimization_level: int | None = None # builder effort 0..5 (TensorRT default 3)
    workspace_size: int = 0               # builder workspace bytes (0: TensorRT's default)
    require_full_compilation: bool = False  # error if any op would run in PyTorch
    use_python_runtime: bool = False      # C++ runtime is needed to save as an ExportedProgram

    def validate(self) -> None:
        check_choice("TensorRTOptions", "precision", self.precision, PRECISIONS)
        check_range("TensorRTOptions", "min_batch", self.min_batch, lo=1)
        check_range("TensorRTOptions", "min_block_size", self.min_block_size, lo=1)
        check_range("TensorRTOptions", "workspace_size", self.workspace_size, lo=0)
        if self.optimization_level is not None:
            check_range("TensorRTOptions", "optimization_level", self.optimization_level, lo=0, hi=5)
        if self.opt_batch is not None:
            check_range("TensorRTOptions", "opt_batch", self.opt_batch, lo=self.min_batch)
        if self.max_batch is not None:
            check_range("TensorRTOptions", "max_batch", self.max_batch, lo=max(self.min_batch, self.opt_batch or 1))


# ---------------------------------------------------------------- pure parts (tested without torch_tensorrt)
def batch_range(example_batch: int, options: Options, dynamic_batch: bool) -> tuple[int, int, int]:
    """(min, opt, max) batch sizes: the example's size three times when static."""
    if not dynamic_batch:
        return example_batch, example_batch, example_batch
    opt = options.opt_batch or example_batch
    mx = options.max_batch or max(opt, example_batch) * 4
    if not options.min_batch <= opt <= mx:
        raise ConfigError(f"TensorRT batch range needs min_batch <= opt_batch <= max_batch, "
                          f"got {options.min_batch} <= {opt} <= {mx}")
    return options.min_batch, opt, mx


def input_specs(example_inputs: Any, dynamic_batch: bool = False,
                dtype: torch.dtype | None = None) -> tuple[list[InputSpec], dict[str, InputSpec]]:
    """Specs for every tensor input (positional ``input_0``.., keyword by name), shapes from the example.

    An input whose dim 0 is the example's batch size is batched: any batch size with ``dynamic_batch``,
    else exactly the example's; other inputs keep their whole shape. Floating inputs take ``dtype`` (the
    compute dtype when the model is cast); integer inputs (token ids, masks) keep theirs.
    """
    n = batch_size_of(example_inputs)
    args, kwargs = split_batch(example_inputs)

    def spec(name: str, t: Any) -> InputSpec:
        if not isinstance(t, torch.Tensor):
            raise BackendError(f"TensorRT inputs must be tensors; input {name!r} is {type(t).__name__}")
        dt = dtype if (dtype is not None and t.is_floating_point()) else t.dtype
        batched = t.dim() >= 1 and t.shape[0] == n
        dynamic = (0,) if dynamic_batch and batched else ()
        return InputSpec.from_tensor(name, t, dynamic_dims=dynamic, batched=batched, dtype=dt)
    return [spec(f"input_{i}", a) for i, a in enumerate(args)], {k: spec(k, v) for k, v in kwargs.items()}


def shape_range(spec: InputSpec, batches: tuple[int, int, int]) -> tuple[tuple[int, ...], ...]:
    """(min, opt, max) shapes of one input: the ``batches`` range on a dynamic batch dim, else its shape."""
    if spec.batch != -1:
        full = spec.dims()
        return full, full, full
    return tuple((b, *spec.shape) for b in batches)


def precision_settings(precision: str, dtype: torch.dtype, quant_kind: str | None) -> dict[str, Any]:
    """The compile kwargs that spell ``precision`` in torch-tensorrt 2.14 (strongly typed networks)."""
    settings: dict[str, Any] = {"use_explicit_typing": True}
    if dtype != torch.float32:
        # Path A: PyTorch cast the model; TensorRT respects its types, fp32 accumulation keeps matmuls accurate
        if precision not in ("fp32", dtype_name(dtype, short=True)):
            raise ConfigError(f"TensorRT precision {precision!r} contradicts compile(dtype={dtype}); set one of them")
        if dtype == torch.float16:
            settings["use_fp32_acc"] = True
        return settings
    if precision in _LOW:
        settings["enable_autocast"] = True
        settings["autocast_low_precision_type"] = parse_dtype(precision)
    elif precision == "int8" and quant_kind != "modelopt":
        raise ConfigError("TensorRT int8 needs a model quantized with NVIDIA ModelOpt "
                          "(modelopt.torch.quantization.quantize with an INT8 config and calibration data; "
                          "scripts/deploy_tensorrt.py --precision int8 does it); TensorRT no longer calibrates by itself")
    return settings


def compile_settings(options: Options, dtype: torch.dtype, quant_kind: str | None) -> dict[str, Any]:
    """Every keyword argument passed to ``torch_tensorrt.compile`` besides the model and inputs."""
    s = {"ir": "dynamo", "min_block_size": options.min_block_size,
         "require_full_compilation": options.require_full_compilation,
         "use_python_runtime": options.use_python_runtime,
         **precision_settings(options.precision, dtype, quant_kind)}
    if options.optimization_level is not None:
        s["optimization_level"] = options.optimization_level
    if options.workspace_size:
        s["workspace_size"] = options.workspace_size
    return s


# ---------------------------------------------------------------- calls into torch_tensorrt (CUDA hosts)
def _torch_tensorrt():
    try:
        import torch_tensorrt
    except ImportError as e:
        raise BackendError("backend 'tensorrt' needs torch_tensorrt (pip install 'torchfast[tensorrt]' on a CUDA host)") from e
    return torch_tensorrt


def _trt_input(trt: Any, s: InputSpec, batches: tuple[int, int, int]) -> Any:
    lo, opt, hi = shape_range(s, batches)
    if lo == opt == hi:
        return trt.Input(shape=opt, dtype=s.torch_dtype)
    return trt.Input(min_shape=lo, opt_shape=opt, max_shape=hi, dtype=s.torch_dtype)


def build(model: nn.Module, example_inputs: Any, options: Options, *, dynamic_batch: bool = False) -> Built:
    trt = _torch_tensorrt()
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    kind = quantization_kind(model)
    settings = compile_settings(options, dtype, kind)
    batches = batch_range(batch_size_of(example_inputs), options, dynamic_batch)
    arg_specs, kw_specs = input_specs(example_inputs, dynamic_batch, dtype if dtype != torch.float32 else None)
    arg_inputs = [_trt_input(trt, s, batches) for s in arg_specs]
    kwarg_inputs = {k: _trt_input(trt, s, batches) for k, s in kw_specs.items()} or None
    if kind == "modelopt":
        from modelopt.torch.quantization.utils import export_torch_mode
        ctx = export_torch_mode()
    else:
        import contextlib
        ctx = contextlib.nullcontext()
    with ctx, torch.no_grad():
        trt_gm = trt.compile(model, arg_inputs=arg_inputs, kwarg_inputs=kwarg_inputs, **settings)
    engines = sum(1 for n, _ in trt_gm.named_children() if "_run_on_acc" in n)
    info = {"precision": options.precision, "trt_engines": engines,
            "batch_range": "x".join(map(str, batches)),
            "torch_tensorrt": getattr(trt, "__version__", "?")}
    return Built(runnable=trt_gm, artifact=trt_gm, info=info)


def save_tensorrt(compiled: Any, path: Path) -> None:
    """``torch_tensorrt.save`` as an ExportedProgram (reload: ``import torch_tensorrt; torch.export.load``)."""
    trt = _torch_tensorrt()
    args, kwargs = split_batch(compiled.example_inputs)
    move = lambda t: t.to(compiled.device) if isinstance(t, torch.Tensor) else t  # noqa: E731
    trt.save(compiled.artifact, str(path), output_format="exported_program",
             arg_inputs=[move(a) for a in args], kwarg_inputs={k: move(v) for k, v in kwargs.items()} or None,
             retrace=True)
