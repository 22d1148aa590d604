"""Save and load deployable artifacts: TorchScript (``.pt``), ExportedProgram (``.pt2``), TensorRT.

``save`` accepts a plain ``nn.Module`` (traced/exported with ``example_inputs``), a model from
``torchfast.compile`` (its native artifact is reused when the format matches), a ScriptModule or an
ExportedProgram. TorchScript and ExportedProgram files load with plain torch, no torchfast needed.

``load`` is safe by default: loading runs nothing from the file (:mod:`torchfast.safe_load` checks it first).

- TorchScript: read by ``torch.jit.load``, whose C++ unpickler never looks up a Python global; archives whose
  TorchScript defines ``__setstate__`` (code run during loading) are refused.
- ExportedProgram: every part ``torch.export.load`` would unpickle (sample inputs, pickled weights and
  constants, opaque objects, legacy and 2.7-format members) must pass torch's weights-only unpickler;
  AOTInductor shared libraries are refused; the program JSON may hold only names, shape expressions, shape
  guards and torch operators (torch turns its strings into Python source). torchbind objects are rebuilt by
  their own registered C++ classes.
- ``torch.save`` files (tensors, state_dicts) and pre-zip legacy files: ``torch.load(weights_only=True)``.
- ONNX (``.onnx``) and OpenVINO IR (``.xml`` + ``.bin``): protobuf / XML and raw weights, read by the engine
  itself; no pickle and no Python from the file. They load as a drop-in module running on that engine.

Artifacts carry their signature (:mod:`torchfast.signature`): ``save(..., example_inputs=x)`` records input
names, shapes (-1 for the batch dim and any other dim the artifact takes at any size), dtypes and output
names in a JSON member of the archive, and ``load`` returns it as the model's ``torchfast_signature``
(ONNX / OpenVINO artifacts: from the inputs their graph declares); reading it unpickles nothing.

Anything else raises :class:`UnsafeArtifactError` naming the archive member and why. ``allow_pickle=True``
skips these checks and unpickles arbitrary objects (a pickled ``nn.Module``): it runs code from the file —
only for files you trust. Loading safely is not running safely: calling a loaded model runs its own graph
(TorchScript code or ExportedProgram operators, which may be any torch op, ``torch.from_file`` included),
so a model from an untrusted source is still untrusted code when it runs.
"""
from __future__ import annotations

import contextlib
import io
import os
import zipfile
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from .errors import TorchfastError
from .modules import restore_training_flags, training_flags
from .safe_load import UnsafeArtifactError, check_archive, load_tensors, open_zip
from .signature import SIGNATURE_FILE, Signature, read_signature, signature_from_example, signature_from_program

__all__ = ["save", "load", "artifact_format", "format_for_path", "read_signature", "Signature", "FORMATS",
           "UnsafeArtifactError", "SaveError"]


class SaveError(TorchfastError, ValueError):
    """This model cannot be written in the format asked for; the message names the formats it can."""

FORMATS = ("torchscript", "exported_program", "tensorrt", "state_dict", "onnx", "openvino")
_NATIVE = {"onnx": "onnxruntime", "openvino": "openvino"}   # format -> the backend that writes and runs it


def _quiet():
    from .backends._warnings import quiet_deprecations
    from .backends.torchscript import DEPRECATION_NOTE
    return quiet_deprecations("torchscript", DEPRECATION_NOTE)


def _compiled_type():
    from .backends.compiled import Compiled
    return Compiled


def save(obj: Any, path: str | os.PathLike, format: str | None = None, *, example_inputs: Any = None,
         dynamic_batch: bool | None = None) -> Path:
    """Write ``obj`` as a deployable artifact; returns the path.

    ``format``: "torchscript" (frozen TorchScript; libtorch, Triton's PyTorch backend), "exported_program"
    (``torch.export`` PT2 archive), "tensorrt" (a TensorRT-compiled model as an ExportedProgram; needs
    torch_tensorrt and CUDA), "onnx" (``.onnx``, for ONNX Runtime), "openvino" (``.xml`` + ``.bin`` IR; int8
    models compiled for these engines save as they run) or "state_dict" (weights only). ``example_inputs`` are needed to trace or
    export a plain module (a compiled one remembers its own); with them, TorchScript and ExportedProgram
    artifacts record their signature, so ``load`` and ``torchfast serve`` need no input shapes.
    ``dynamic_batch`` defaults to what the compiled model was built with; a plain module is exported for
    any batch size where it exports that way, else for the example's batch size (its signature says which).
    """
    from .backends import BackendError
    if format is None:
        format = format_for_path(path)
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    from .dropin import Wrapped
    checked: dict = {}
    if isinstance(obj, Wrapped):  # a drop-in wrapper (wrap(), optimize()) saves what it holds
        checked = dict(obj.input_spec)   # its checked inputs (and the dims it declared dynamic)
        obj = obj.inner
    obj = _orig_module(obj)
    Compiled = _compiled_type()
    compiled = obj if isinstance(obj, Compiled) else None
    source = obj
    if compiled is not None:
        source = _orig_module(compiled.source)
        example_inputs = compiled.example_inputs if example_inputs is None else example_inputs
        dynamic_batch = compiled.dynamic_batch if dynamic_batch is None else dynamic_batch
    try_dynamic = dynamic_batch is None   # a plain module: any batch size if it exports that way
    dynamic_batch = bool(dynamic_batch)

    if format == "state_dict":
        if not isinstance(source, nn.Module):
            raise TypeError(f"state_dict format needs an nn.Module, got {type(source).__name__}")
        torch.save(source.state_dict(), path)
        return path

    if format in _NATIVE:
        return _save_native(obj, compiled, source, path, format, example_inputs, dynamic_batch or try_dynamic,
                            fall_back=try_dynamic)

    if format == "tensorrt":
        from .backends.tensorrt import save_tensorrt
        if compiled is None or compiled.backend != "tensorrt":
            raise BackendError("format='tensorrt' saves a model compiled with backend='tensorrt' "
                               "(torchfast.compile(model, inputs, backend='tensorrt')); got "
                               + (f"backend {compiled.backend!r}" if compiled is not None else type(obj).__name__))
        save_tensorrt(compiled, path)
        return path

    if format == "torchscript":
        if compiled is not None and isinstance(compiled.artifact, torch.jit.ScriptModule):
            artifact = compiled.artifact
        elif isinstance(obj, torch.jit.ScriptModule):
            artifact = obj
        else:
            if not isinstance(source, nn.Module):
                raise TypeError(f"cannot save {type(obj).__name__} as TorchScript")
            if example_inputs is None:
                raise ValueError("saving an nn.Module as TorchScript needs example_inputs to trace it")
            from .backends.torchscript import freeze, to_torchscript
            with _evaluating(source):
                artifact = freeze(to_torchscript(source, example_inputs))
        sig = None
        if example_inputs is not None:   # a trace takes any batch size: the batch dim is recorded as -1
            like = source if isinstance(source, nn.Module) and not isinstance(source, torch.jit.ScriptModule) \
                else artifact
            cast = compiled.dtype if compiled is not None and compiled.dtype != torch.float32 else None
            with _evaluating(source if isinstance(source, nn.Module) else None):
                sig = signature_from_example(like, example_inputs, dtype=cast, specs=checked)
        with _quiet():
            torch.jit.save(artifact, str(path), _extra_files=_extra(sig))
        return path

    # exported_program
    if compiled is not None and isinstance(compiled.artifact, torch.export.ExportedProgram) \
            and compiled.backend == "export":
        ep = compiled.artifact
    elif isinstance(obj, torch.export.ExportedProgram):
        ep = obj
    else:
        if isinstance(source, torch.jit.ScriptModule) or not isinstance(source, nn.Module):
            raise TypeError(f"cannot export {type(source).__name__} to an ExportedProgram; pass the nn.Module")
        _check_exportable(source)
        if example_inputs is None:
            raise ValueError("saving an nn.Module as an ExportedProgram needs example_inputs to export it")
        from .backends.export import export_program, exportable
        with _evaluating(source):
            target = exportable(source, example_inputs)[0]
            ep = None
            if try_dynamic:
                try:
                    ep = export_program(target, example_inputs, dynamic_batch=True)
                except Exception:  # noqa: BLE001 - the model fixes its batch size: export it at the example's
                    ep = None
            if ep is None:
                ep = export_program(target, example_inputs, dynamic_batch=dynamic_batch)
    torch.export.save(ep, str(path), extra_files=_extra(signature_from_program(ep)))
    return path


def _extra(sig: Signature | None) -> dict[str, str]:
    return {SIGNATURE_FILE: sig.to_json()} if sig is not None else {}


def _orig_module(obj: Any) -> Any:
    """The module a ``torch.compile`` wrapper holds: what tracing and exporting see."""
    inner = getattr(obj, "_orig_mod", None)
    return inner if isinstance(obj, nn.Module) and isinstance(inner, nn.Module) else obj


@contextlib.contextmanager
def _evaluating(model: Any) -> Iterator[None]:
    """Eval mode for the block, every submodule's own flag restored after; a module that has no train/eval
    switch (what ``ExportedProgram.module()`` and the PT2E flow return) is left as it is."""
    if not isinstance(model, nn.Module):
        yield
        return
    flags = training_flags(model)
    try:
        try:
            model.eval()
        except NotImplementedError:
            pass
        yield
    finally:
        restore_training_flags(flags)


def _check_exportable(model: nn.Module) -> None:
    """torch.ao int8 layers hold packed C++ kernels that torch.export cannot serialize: say which formats can."""
    from .quantized import quantization_of
    q = quantization_of(model)
    if q is not None and q.kind == "ao":
        raise SaveError(f"this model cannot be saved as an ExportedProgram: it holds {q.text} ({q.where}), whose "
                        f"packed int8 kernels torch.export cannot serialize. It saves as format='torchscript' "
                        f"(a .pt path; runs in libtorch and Triton's PyTorch backend) or 'state_dict'. For an "
                        f"int8 ExportedProgram, quantize with tf.Int8Static(method='pt2e') instead; for ONNX "
                        f"Runtime or OpenVINO, compile the float model with an int8 recipe for that backend.")


def format_for_path(path: str | os.PathLike) -> str:
    """The save format a path's extension names: .pt2, .onnx, .xml (OpenVINO IR), else TorchScript."""
    return {".pt2": "exported_program", ".onnx": "onnx", ".xml": "openvino"}.get(Path(path).suffix.lower(),
                                                                               "torchscript")


def _save_native(obj: Any, compiled: Any, source: Any, path: Path, format: str, example_inputs: Any,
                 dynamic_batch: bool, fall_back: bool = False) -> Path:
    """An ONNX file / OpenVINO IR: the compiled model's own when it was built by that engine (int8
    included), else the float module exported for it now."""
    from .backends import BackendError, compile as tf_compile, get_backend
    backend = _NATIVE[format]
    if compiled is None or compiled.backend != backend:
        if compiled is not None and compiled.backend in _NATIVE.values():
            raise BackendError(f"this model was compiled for {compiled.backend!r}; format={format!r} needs a model "
                               f"compiled with backend={backend!r} (or the nn.Module it came from)")
        if not isinstance(source, nn.Module) or isinstance(source, torch.jit.ScriptModule):
            raise TypeError(f"format={format!r} exports an nn.Module, got {type(source).__name__}")
        if example_inputs is None:
            raise ValueError(f"saving an nn.Module as {format} needs example_inputs to export it")
        try:
            compiled = tf_compile(source, example_inputs, backend=backend, dynamic_batch=dynamic_batch,
                                  verify=False, warmup=1)
        except BackendError:
            raise
        except Exception:  # noqa: BLE001 - fall_back: the model fixes its batch size; build it at the example's
            if not (fall_back and dynamic_batch):
                raise
            compiled = tf_compile(source, example_inputs, backend=backend, dynamic_batch=False, verify=False,
                                  warmup=1)
    impl = get_backend(backend).load()
    return Path(impl.save_artifact(compiled.artifact, path))


def artifact_format(path: str | os.PathLike) -> str:
    """"torchscript", "exported_program", "torch_save" (a torch.save zip), "onnx", "openvino" (an IR .xml)
    or "legacy" (pre-zip torch.save / other)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file: {path}")
    native = _native_format(path)
    if native:
        return native
    if not zipfile.is_zipfile(path):
        return "legacy"
    with zipfile.ZipFile(path) as z:
        return _zip_format(z)


def _native_format(path: Path) -> str | None:
    """ONNX and OpenVINO artifacts, by extension (ONNX files carry no magic number)."""
    if path.suffix.lower() == ".onnx":
        return "onnx"
    if path.suffix.lower() == ".xml":
        return "openvino"
    return None


def _zip_format(z: zipfile.ZipFile) -> str:
    leaf = {n.split("/", 1)[1] if "/" in n else n for n in z.namelist()}
    if "archive_format" in leaf or any(n.startswith("models/") for n in leaf) \
            or "serialized_exported_program.json" in leaf:
        return "exported_program"
    if "constants.pkl" in leaf and any(n.startswith("code/") for n in leaf):
        return "torchscript"
    if "data.pkl" in leaf:
        return "torch_save"
    return "legacy"


def load(path: str | os.PathLike, *, device: str | torch.device | None = None, allow_pickle: bool = False,
         program: bool = False) -> Any:
    """Load an artifact written by :func:`save` (or by plain torch).

    Returns a runnable module: a ScriptModule for TorchScript, ``ExportedProgram.module()`` for PT2
    archives (the ExportedProgram itself with ``program=True``), or the tensors/state_dict of a tensor
    file. A model's ``torchfast_signature`` is its :class:`~torchfast.signature.Signature` (inputs with
    -1 for dims of any size, dtypes, output names), or None when the artifact does not record one (a
    TorchScript file saved without example inputs or by plain torch). By default nothing in the file runs
    while loading (see the module docstring); a part that would raises :class:`UnsafeArtifactError`.
    ``allow_pickle=True`` lifts that (runs code from the file: trusted files only).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file: {path}")
    native = _native_format(path)
    if native:  # protobuf / IR XML + weights: no pickle, no Python from the file
        from .backends import get_backend
        backend = get_backend(_NATIVE[native])
        ok, why = backend.available()
        if not ok:
            raise RuntimeError(f"{path} is an {native} artifact: {why}")
        return _with_signature(backend.load().load_artifact(path, device=device), _engine_signature)
    data = path.read_bytes()       # read once: torch gets the bytes that were checked
    zf = open_zip(path, data, strict=not allow_pickle)
    kind = _zip_format(zf) if zf is not None else "legacy"
    if not allow_pickle and zf is not None:
        check_archive(path, zf, kind)
    if kind == "torchscript":
        sig = read_signature(path, data)
        with _quiet():
            mod = torch.jit.load(io.BytesIO(data), map_location=device)
        return _with_signature(mod, lambda m: sig)
    if kind == "exported_program":
        sig = read_signature(path, data)
        try:
            ep = torch.export.load(io.BytesIO(data))
        except Exception as e:
            if "tensorrt" in str(e).lower():
                raise RuntimeError(f"{path} holds TensorRT engines: load it on a CUDA host with torch_tensorrt "
                                   f"imported (import torch_tensorrt; torch.export.load(path))") from e
            raise
        if sig is None:   # saved by plain torch: the program itself says what it takes
            sig = signature_from_program(ep)
        if program:
            return _with_signature(ep, lambda m: sig)
        mod = ep.module()
        return _with_signature(mod.to(device) if device is not None else mod, lambda m: sig)
    if allow_pickle:
        return torch.load(io.BytesIO(data), map_location=device, weights_only=False)
    return load_tensors(path, data, zf, map_location=device)


def _with_signature(model: Any, find: Any) -> Any:
    try:
        model.torchfast_signature = find(model)
    except (AttributeError, TypeError):  # an object that takes no new attribute keeps working without it
        pass
    return model


def _engine_signature(runner: Any) -> Signature | None:
    """An ONNX / OpenVINO model's signature from the inputs its graph declares, in the call's order."""
    declared = {e.name: e for e in getattr(runner, "engine_inputs", None) or ()}
    sig = getattr(runner, "sig", None)
    if sig is None or not declared or any(n not in declared for n in sig.input_names):
        return None
    return Signature(tuple(declared[n] for n in sig.input_names), tuple(sig.output_names or ()),
                     sig.n_positional == 0)
