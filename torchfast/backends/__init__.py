"""Compile a model for a target: ``torchfast.compile(model, example_inputs, backend="inductor")``.

Backends: eager | torchscript | inductor | export | onnxruntime | openvino | tensorrt | xla, and
``auto`` (build every available one, keep the fastest faithful one; see ``auto.py``). See
``registry.BACKENDS`` for what each supports. The request is validated against the backend's
declaration before any work; the result is a drop-in :class:`Compiled` module whose report holds
compile time and output fidelity. ``int8=Int8Static(...)|Int8Dynamic()`` lowers int8 to the backend's
own toolchain (torch.ao/PT2E, ONNX Runtime QDQ, OpenVINO NNCF).
"""
from __future__ import annotations

import copy
import time
from collections import Counter
from typing import Any

import torch
from torch import nn

from ..modules import (Batch, ExampleInputError, call_model, describe_batch, first_tensor, model_device, move_batch,
                       restore_training_flags, training_flags)
from ..report import Report
from ..specs import dtype_name
from .compiled import Built, Compiled
from .inputs import batch_size_of, resize_batch
from .registry import (BACKENDS, Backend, BackendError, check, get_backend, list_backends, normalize_dtype,
                       quantization_kind)

INT8_NATIVE = ("onnxruntime", "openvino")  # int8 through the engine's own toolchain (build_int8)

__all__ = ["compile", "Compiled", "Backend", "BackendError", "BACKENDS", "get_backend", "list_backends",
           "quantization_kind"]


def _resolve_device(backend: Backend, model: nn.Module, device: Any) -> torch.device:
    if device is not None:
        return torch.device(device)
    if backend.devices == ("cuda",):
        return torch.device("cuda")
    if backend.devices == ("xla",):
        return torch.device("xla")
    return model_device(model)


def _check_device_present(dev: torch.device, impl: Any) -> torch.device:
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BackendError("device 'cuda' requested but torch sees no CUDA GPU here "
                           f"(torch {torch.__version__}, torch.cuda.is_available() is False)")
    if dev.type == "cuda" and dev.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    if dev.type == "xla" and dev.index is None and hasattr(impl, "default_device"):
        return impl.default_device()
    return dev


def _compare(ref: Any, out: Any) -> dict[str, float]:
    r, c = first_tensor(ref).detach().float().cpu(), first_tensor(out).detach().float().cpu()
    if r.shape != c.shape:
        raise BackendError(f"compiled output shape {tuple(c.shape)} differs from eager {tuple(r.shape)}")
    cos = torch.nn.functional.cosine_similarity(r.reshape(1, -1).double(), c.reshape(1, -1).double(), eps=1e-12)
    return {"max_abs_err": (r - c).abs().max().item() if r.numel() else 0.0, "cosine": cos.item()}


def _options(impl: Any, backend: str, options: dict[str, Any]) -> Any:
    import dataclasses
    names = [f.name for f in dataclasses.fields(impl.Options)]
    unknown = sorted(set(options) - set(names))
    if unknown:
        raise BackendError(f"backend {backend!r} has no option {', '.join(map(repr, unknown))}; "
                           f"its options are: {', '.join(names) or '(none)'}")
    return impl.Options(**options)


def compile(model: nn.Module, example_inputs: Batch, backend: str = "inductor", *, device: Any = None,
            dtype: Any = None, dynamic_batch: bool = False, verify: bool = True, warmup: int = 2,
            int8: Any = None, calibration: Any = None, **options: Any) -> Compiled:
    """Compile ``model`` for ``backend`` and return a drop-in module.

    ``example_inputs``: one batch (tensor, tuple of positional inputs, or dict of keyword inputs).
    ``device``/``dtype``: target device ("cpu", "cuda", "xla") and compute dtype (fp32, fp16, bf16);
    the user's model is copied, never changed, when either differs. ``dynamic_batch``: one compiled
    model serves any batch size (checked on a second batch size). ``verify``: compare with eager on the
    example (max abs error, cosine) into the report. Other ``options`` go to the backend's options
    dataclass (e.g. ``max_autotune=True`` for inductor); unknown names are an error.

    ``int8``: an ``Int8Static``/``Int8Dynamic`` config lowered to this backend's own int8 toolchain
    (``calibration`` batches, or the config's own, for static). ``backend="auto"``: see
    :func:`torchfast.backends.auto.compile_auto` (its keyword options: ``candidates``, ``validation``,
    ``min_cosine``, ``min_cosine_int8``, ``runs``, ``threads``, ``timing``).

    The compiled module runs ``model`` itself where the backend can (eager, inductor share its modules
    and weights), so on success ``model`` is left in eval mode, as ``torchfast.wrap`` leaves it. On any
    error it is unchanged, every submodule's train/eval flag included.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if backend == "auto":
        from .auto import compile_auto
        return compile_auto(model, example_inputs, device=device, dtype=dtype, dynamic_batch=dynamic_batch,
                            int8=int8, calibration=calibration, **options)
    if int8 is not None and backend not in INT8_NATIVE:
        return _compile_torch_int8(model, example_inputs, backend, int8, calibration, device=device, dtype=dtype,
                                   dynamic_batch=dynamic_batch, verify=verify, warmup=warmup, **options)
    spec = get_backend(backend)
    dev = _resolve_device(spec, model, device)
    dt = normalize_dtype(dtype)
    scripted = isinstance(model, torch.jit.ScriptModule)
    kind = quantization_kind(model)
    check(backend, device=dev.type, dtype=dt, quant_kind=kind, dynamic_batch=dynamic_batch, scripted=scripted)
    impl = spec.load()
    dev = _check_device_present(dev, impl)
    opts = _options(impl, backend, options)  # validates names and values
    if dynamic_batch:
        batch_size_of(example_inputs)  # clear error now if there is no batch dimension

    lowering = _int8_lowering(int8, calibration) if int8 is not None else None
    flags = training_flags(model)
    try:
        model.eval()
        return _build(model, example_inputs, backend, impl, opts, dev, dt, kind, scripted, dynamic_batch, verify,
                      warmup, lowering)
    except BaseException:
        restore_training_flags(flags)
        raise


def _int8_lowering(int8: Any, calibration: Any) -> dict[str, Any]:
    """The backend-neutral int8 request: mode and calibration batches (checked before any work)."""
    from ..modules import batches_list
    from ..quant.config import Int8Dynamic, Int8Static
    if not isinstance(int8, (Int8Static, Int8Dynamic)):
        raise BackendError(f"int8 must be an Int8Static or Int8Dynamic config, got {type(int8).__name__}")
    if isinstance(int8, Int8Dynamic):
        return {"mode": "dynamic", "calibration": None, "exclude": tuple(int8.exclude)}
    source = calibration if calibration is not None else int8.calibration
    calib = batches_list(source) if source is not None else []
    if int8.max_batches:
        calib = calib[:int8.max_batches]
    if not calib:
        raise BackendError("Int8Static needs calibration batches: Int8Static(calibration=batches) or "
                           "compile(..., calibration=batches)")
    return {"mode": "static", "calibration": calib, "exclude": tuple(int8.exclude)}


def _compile_torch_int8(model: nn.Module, example_inputs: Batch, backend: str, int8: Any, calibration: Any,
                        **kwargs: Any) -> Compiled:
    """int8 on a PyTorch backend: torchfast's own quantize() (torch.ao / PT2E), then compile that."""
    import dataclasses

    from ..quant import quantize
    from ..quant.config import Int8Static
    cfg = int8
    if isinstance(cfg, Int8Static) and backend in ("inductor", "export") and cfg.method != "pt2e":
        cfg = dataclasses.replace(cfg, method="pt2e")  # torch.ao modules do not compile there; PT2E does
    if hasattr(cfg, "keep_slower"):  # the compiled candidate is what gets timed, not eager int8 vs eager fp32
        cfg = dataclasses.replace(cfg, keep_slower=True)
    q, rep = quantize(model, cfg, example_inputs=example_inputs, calibration=calibration)
    if quantization_kind(q) is None:
        raise BackendError(f"{type(cfg).__name__} left {type(model).__name__} float (no layer was quantizable "
                           f"or faster in int8 here); see quantize()'s report")
    _check_mostly_int8(rep, type(cfg).__name__, type(model).__name__)
    return compile(q, example_inputs, backend, **kwargs)


def _check_mostly_int8(rep: Any, scheme: str, model_name: str) -> None:
    """An "int8" candidate that left most of its matmuls and convolutions float is not one (a transformer
    whose blocks torch.ao cannot trace keeps only its pooler in int8): say so instead of timing it."""
    heavy = [r for r in getattr(rep, "rows", []) if str(r.get("type", "")).startswith(("Linear", "Conv"))]
    done = [r for r in heavy if r.get("applied") in (True, "yes")]
    if heavy and len(done) * 2 < len(heavy):
        reasons = Counter(str(r.get("reason") or "kept float") for r in heavy if r not in done)
        why = "; ".join(f"{n} x {k}" for k, n in reasons.most_common(3))
        raise BackendError(f"{scheme} quantized only {len(done)} of {len(heavy)} Linear/Conv layers of {model_name} "
                           f"({why}); see quantize()'s report")


def _build(model: nn.Module, example_inputs: Batch, backend: str, impl: Any, opts: Any, dev: torch.device,
           dt: torch.dtype, kind: str | None, scripted: bool, dynamic_batch: bool, verify: bool,
           warmup: int, lowering: dict[str, Any] | None = None) -> Compiled:
    """The part of ``compile`` that runs with ``model`` in eval mode; every failure is a BackendError
    (or an ExampleInputError when the eager model itself does not run on the example)."""
    work = model
    if dev != model_device(model) or (dt != torch.float32 and kind is None):
        if scripted:
            raise BackendError("a TorchScript module cannot be copied to another device/dtype here; load it there")
        work = copy.deepcopy(model).to(device=dev, dtype=dt if kind is None else None)
    inputs = move_batch(example_inputs, dev, dt if dt != torch.float32 else None)
    report = Report(f"compile: {backend}", summary={"backend": backend, "device": str(dev), "dtype": dtype_name(dt),
                                                     "dynamic_batch": dynamic_batch, "quantized": kind or "no"})
    reference = None
    if verify:
        try:
            with torch.inference_mode():
                reference = call_model(model, example_inputs)
        except Exception as e:
            raise ExampleInputError(f"{type(model).__name__} does not run on example_inputs in eager mode "
                                    f"({describe_batch(example_inputs)}): {type(e).__name__}: {e}") from e
    try:
        t0 = time.perf_counter()
        if lowering is not None:
            built: Built = impl.build_int8(work, inputs, opts, dynamic_batch=dynamic_batch, **lowering)
        else:
            built = impl.build(work, inputs, opts, dynamic_batch=dynamic_batch)
        compiled = Compiled(built.runnable, backend=backend, device=dev, dtype=dt, dynamic_batch=dynamic_batch,
                            artifact=built.artifact, compile_time_s=0.0, report=report, source=model,
                            example_inputs=example_inputs, output_type=built.output_type,
                            grad_mode=built.grad_mode)
        out = None
        for _ in range(max(1, warmup)):
            out = call_model(compiled, inputs)
        compiled.compile_time_s = time.perf_counter() - t0
    except BackendError:
        raise
    except Exception as e:
        raise BackendError(f"backend {backend!r} failed to compile {type(model).__name__} on "
                           f"({describe_batch(example_inputs)}): {type(e).__name__}: {e}") from e

    report.summary["compile_time_s"] = round(compiled.compile_time_s, 3)
    report.summary.update(built.info)
    for n in built.notes:
        report.note(n)
    if verify:
        report.summary.update(_compare(reference, out))
    if dynamic_batch:
        n = batch_size_of(example_inputs)
        other = resize_batch(example_inputs, n + 1 if n > 1 else 3)
        try:
            got = call_model(compiled, other)
        except Exception as e:
            raise BackendError(f"backend {backend!r} compiled {type(model).__name__} for batch {n} only: "
                               f"calling it with batch {batch_size_of(other)} failed ({type(e).__name__}: {e})") from e
        if verify:
            with torch.inference_mode():
                fid = _compare(call_model(model, other), got)
            report.summary["other_batch_max_abs_err"] = fid["max_abs_err"]
    return compiled
