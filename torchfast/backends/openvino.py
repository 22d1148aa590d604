"""OpenVINO: ``openvino.convert_model`` -> ``Core.compile_model``; int8 through NNCF; IR (``.xml``/``.bin``) artifacts.

The model is converted as a :class:`~torchfast.backends.native.FlatModule` (flat tensors in, flat tuple
out) and called through a :class:`~torchfast.backends.native.NativeRunner`, so the compiled model takes
the original arguments and returns the original output structure.

Routes, measured on a 2-core Sapphire Rapids Xeon (torch 2.14.1, OpenVINO 2026.4.1, f32, latency hint,
2 threads; median latency vs eager, interleaved in one run):

=====================  ==============  ==============  =========================================
model                  convert_model   export          torch.compile(backend="openvino")
=====================  ==============  ==============  =========================================
resnet50, 1x224        x1.64           x1.77           fails: dynamo guard AssertionError
mobilenet_v3_large     x2.2-2.4        x2.9-3.1        fails: dynamo guard AssertionError
MiniLM, 8x128 tokens   x1.25-1.30      x1.26-1.31      x1.21 (and bf16 unless told f32)
=====================  ==============  ==============  =========================================

``export`` (torch.export -> ``convert_model(ExportedProgram)``) is never slower and is the default
(``route="auto"``); conversion takes longer (4-6 s vs 2-3 s). A model torch.export cannot capture
(data-dependent control flow) falls back to ``convert_model``, which traces the module -- recording
only the branches the example took -- and the build notes say so. torch.compile is not offered.

Precision: the CPU plugin computes in bf16 by default on CPUs with AMX / AVX512-BF16, which is a
different model numerically. An fp32 request therefore asks for f32 explicitly; bf16/f16 are used when
the model was cast (``compile(dtype=...)``) or ``precision`` says so.

Shapes: every dimension is static (as in the example) except, with ``dynamic_batch``, dim 0 of the
batched inputs; static shapes let the plugin pick its kernels once.

int8 through NNCF: :mod:`torchfast.backends.openvino_int8`.

bf16 (``precision="bf16"``) runs MiniLM x4.2 and mobilenet x4 vs eager on AMX, at ~3e-2 max abs error.
"""
from __future__ import annotations

import copy
import functools
import itertools
import json
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.utils._pytree as pytree
from torch import nn

from ..config import Config, ConfigError, check_choice, check_range
from ..modules import batches_list, describe_batch, model_dtype, split_batch
from ..specs import InputSpec, SpecError, dtype_name, parse_dtype
from .compiled import Built
from .inputs import resize_batch
from .native import (FlatModule, FlatSignature, NativeRunner, numpy_to_torch_dtype,
                     signature_of)
from .registry import BackendError

__all__ = ["Options", "build", "build_int8", "save_artifact", "load_artifact", "convert"]

_PRECISIONS = ("f32", "bf16", "f16")
_DTYPE_PRECISION = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}
_RT_KEY = ["torchfast", "signature"]


@dataclass(frozen=True)
class Options(Config):
    device: str = "CPU"              # an OpenVINO device name (Core().available_devices), checked at build time
    hint: str = "latency"            # "latency" (one stream) or "throughput" (streams for concurrent calls)
    threads: int | None = None       # INFERENCE_NUM_THREADS; None: torch.get_num_threads()
    precision: str | None = None     # "f32" | "bf16" | "f16"; None: the model's dtype (f32 for an fp32 model)
    route: str = "auto"              # "export" (torch.export -> convert), "convert_model" (traces the module),
    #                                  "auto": export, else convert_model
    quant_preset: str = "auto"       # int8 static: "auto" (NNCF's for the model type), "performance", "mixed"
    model_type: str = "auto"         # int8 static: "auto" (transformer when attention blocks), "transformer", "default"

    def validate(self) -> None:
        if not isinstance(self.device, str) or not self.device.strip():
            raise ConfigError(f"OpenVINOOptions.device must be an OpenVINO device name such as 'CPU', got {self.device!r}")
        check_choice("OpenVINOOptions", "hint", self.hint, ("latency", "throughput"))
        if self.threads is not None:
            if isinstance(self.threads, bool) or not isinstance(self.threads, int):
                raise ConfigError(f"OpenVINOOptions.threads must be an int or None, got {self.threads!r}")
            check_range("OpenVINOOptions", "threads", self.threads, lo=1)
        if self.precision is not None:
            check_choice("OpenVINOOptions", "precision", self.precision, _PRECISIONS)
        check_choice("OpenVINOOptions", "route", self.route, ("auto", "export", "convert_model"))
        check_choice("OpenVINOOptions", "quant_preset", self.quant_preset, ("auto", "performance", "mixed"))
        check_choice("OpenVINOOptions", "model_type", self.model_type, ("auto", "transformer", "default"))


# ---------------------------------------------------------------- openvino, lazily
def _ov() -> Any:
    try:
        import openvino
    except ImportError:
        raise BackendError("backend 'openvino' needs the openvino package, which is not installed. "
                           "pip install 'torchfast[openvino]'") from None
    return openvino


@functools.lru_cache(maxsize=1)
def _core() -> Any:
    return _ov().Core()


def cause(e: BaseException) -> str:
    """One line from an OpenVINO/NNCF exception: the message, not the C++ source location."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    keep = [ln for ln in lines if not ln.startswith(("Exception from src", "Check '", "Traceback", "File "))]
    text = (keep or lines or [type(e).__name__])[0]
    return f"{type(e).__name__}: {text[:300]}"


def _ov_type(ov: Any, dtype: torch.dtype) -> Any:
    table = {torch.float32: ov.Type.f32, torch.float16: ov.Type.f16, torch.bfloat16: ov.Type.bf16,
             torch.float64: ov.Type.f64, torch.int64: ov.Type.i64, torch.int32: ov.Type.i32,
             torch.int16: ov.Type.i16, torch.int8: ov.Type.i8, torch.uint8: ov.Type.u8, torch.bool: ov.Type.boolean}
    if dtype not in table:
        raise BackendError(f"OpenVINO has no element type for input dtype {dtype}")
    return table[dtype]


# ---------------------------------------------------------------- conversion
def flat_inputs(sig: FlatSignature, batch: Any, what: str) -> list[torch.Tensor]:
    args, kwargs = split_batch(batch)
    try:
        flat = sig.flatten_inputs(args, kwargs)
    except TypeError as e:
        raise BackendError(f"{what}: {e}") from None
    for name, t in zip(sig.input_names, flat):
        if not isinstance(t, torch.Tensor):
            raise BackendError(f"{what}: input {name!r} is a {type(t).__name__}, not a tensor")
    return [t.detach().float() if t.is_floating_point() else t.detach() for t in flat]


def _batched(flat: Sequence[torch.Tensor]) -> list[bool]:
    n = next((t.shape[0] for t in flat if t.dim() >= 1), None)
    return [t.dim() >= 1 and t.shape[0] == n for t in flat]


def final_shapes(flat: Sequence[torch.Tensor], dynamic_batch: bool) -> list[list[int]]:
    batched = _batched(flat) if dynamic_batch else [False] * len(flat)
    return [[-1 if (b and d == 0) else s for d, s in enumerate(t.shape)] for t, b in zip(flat, batched)]


def _float_copy(model: nn.Module) -> nn.Module:
    """OpenVINO converts and stores fp32; bf16/f16 is a compile-time precision, not a weight dtype."""
    if model_dtype(model) == torch.float32:
        return model
    return copy.deepcopy(model).float()


def _trace_example(flat: list[torch.Tensor], shapes: list[list[int]]) -> list[torch.Tensor]:
    """Tracers specialize a size of 1: widen a batch-1 example to 2 when dim 0 is to stay dynamic."""
    if any(s and s[0] == -1 for s in shapes) and flat[_batched(flat).index(True)].shape[0] == 1:
        return list(resize_batch(tuple(flat), 2))
    return flat


def convert(model: nn.Module, sig: FlatSignature, flat: list[torch.Tensor], shapes: list[list[int]],
            route: str = "auto", owners: dict[str, str] | None = None) -> tuple[Any, str, list[str]]:
    """(the ``ov.Model`` of ``FlatModule(model, sig)``, the route that made it, notes), inputs/outputs named
    after ``sig``, input shapes as given (-1: dynamic). ``auto``: the export route, else convert_model.
    ``owners`` (a dict to fill): OpenVINO op name -> the submodule of ``model`` it was converted from."""
    model = _float_copy(model)
    if route == "auto":
        try:
            return _convert(model, sig, flat, shapes, "export", owners), "export", []
        except BackendError as e:
            note = (f"torch.export could not capture the model, so it was traced instead: the trace keeps only "
                    f"the branches the example took ({e})")
            return _convert(model, sig, flat, shapes, "convert_model", owners), "convert_model", [note]
    return _convert(model, sig, flat, shapes, route, owners), route, []


def _decompose_like_openvino(ep: Any) -> Any:
    """The decompositions OpenVINO's converter applies itself, applied first, so that the graph's node names
    (which become the op names) and their ``nn_module_stack`` are known before conversion."""
    try:
        from openvino.frontend.pytorch.torchdynamo.export_decompositions import ops_to_not_decompose
        from torch.export.decomp_utils import CustomDecompTable
    except ImportError:
        return ep.run_decompositions()
    table = CustomDecompTable()
    for op in ops_to_not_decompose():
        try:
            table.pop(op)
        except KeyError:
            pass
    return ep.run_decompositions(table)


def _fx_owners(ep: Any) -> dict[str, str]:
    """FX node name -> the innermost submodule (of the model inside FlatModule) that ran it."""
    out = {}
    for node in ep.graph.nodes:
        stack = node.meta.get("nn_module_stack") if node.op == "call_function" else None
        if stack:
            path = list(stack.values())[-1][0]
            out[node.name] = path[len("model."):] if path.startswith("model.") else ""
    return out


def _op_owners(om: Any, fx: dict[str, str] | None) -> dict[str, str]:
    """OpenVINO op name -> submodule name: from the FX node an op was converted from (export route), or from
    the ``__module.model.<name>/`` prefix the tracing converter writes (convert_model route)."""
    out = {}
    for op in om.get_ops():
        name = op.get_friendly_name()
        head = name.split("/", 1)[0]
        if fx is not None:
            if fx.get(head):
                out[name] = fx[head]
        elif head.startswith("__module.model."):
            out[name] = head[len("__module.model."):]
    return out


def _convert(model: nn.Module, sig: FlatSignature, flat: list[torch.Tensor], shapes: list[list[int]], route: str,
             owners: dict[str, str] | None = None) -> Any:
    ov = _ov()
    if owners is not None:  # OpenVINO's own Conv+BatchNorm fusion renames the conv: fold it here, names kept
        from ..quant.equalize import fold_batchnorm
        model = fold_batchnorm(model)
    flat_module = FlatModule(model, sig).eval()
    example = _trace_example(flat, shapes)
    name = type(model).__name__
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            if route == "export":
                dims = tuple({d: torch.export.Dim.AUTO for d, s in enumerate(sh) if s == -1} or None for sh in shapes)
                ep = torch.export.export(flat_module, tuple(example), dynamic_shapes=(dims,), strict=False)
                fx = None
                if owners is not None:
                    ep = _decompose_like_openvino(ep)
                    fx = _fx_owners(ep)
                om = ov.convert_model(ep)
            else:
                inputs = [(ov.PartialShape(sh), _ov_type(ov, t.dtype)) for sh, t in zip(shapes, flat)]
                om = ov.convert_model(flat_module, example_input=tuple(example), input=inputs)
                fx = None
    except BackendError:
        raise
    except Exception as e:
        raise BackendError(f"OpenVINO could not convert {name} (route {route!r}, inputs "
                           f"{describe_batch(tuple(flat))}): {cause(e)}") from None
    if len(om.inputs) != len(sig.input_names) or len(om.outputs) != len(sig.output_names):
        raise BackendError(f"OpenVINO converted {name} with {len(om.inputs)} input(s) and {len(om.outputs)} "
                           f"output(s), expected inputs {sig.input_names} and outputs {sig.output_names} "
                           "(an input the model never reads is dropped by the converter)")
    if owners is not None:
        owners.update(_op_owners(om, fx))
    for port, n in zip(om.inputs, sig.input_names):
        port.get_tensor().set_names({n})
    for port, n in zip(om.outputs, sig.output_names):
        port.get_tensor().set_names({n})
    reshape(om, shapes, name)
    return om


def reshape(om: Any, shapes: list[list[int]], name: str) -> None:
    ov = _ov()
    want = {i: ov.PartialShape(sh) for i, sh in enumerate(shapes)}
    if all(om.inputs[i].get_partial_shape() == ps for i, ps in want.items()):
        return
    try:
        om.reshape(want)
    except Exception as e:
        raise BackendError(f"OpenVINO could not set the input shapes of {name} to {shapes}: {cause(e)}") from None


# ---------------------------------------------------------------- compiling and running
def check_device(options: Options) -> str:
    available = list(_core().available_devices)
    dev = options.device.strip()
    if ":" not in dev:  # torch spells devices in lower case ("cpu"); OpenVINO in upper case ("CPU", "GPU.0")
        dev = dev.upper()
    base = dev.split(".")[0]
    if dev in available or base in {d.split(".")[0] for d in available} or dev == "AUTO" \
            or dev.startswith(("AUTO:", "HETERO:", "MULTI:")):
        return dev
    raise BackendError(f"OpenVINO device {options.device!r} is not available here; available: {', '.join(available)}")


def _compile(om: Any, options: Options, precision: str, name: str) -> tuple[Any, dict[str, Any]]:
    core, dev = _core(), check_device(options)
    threads = options.threads or torch.get_num_threads()
    cfg = {"PERFORMANCE_HINT": options.hint.upper(), "INFERENCE_PRECISION_HINT": precision,
           "INFERENCE_NUM_THREADS": str(threads)}
    if options.hint == "latency":
        cfg["NUM_STREAMS"] = "1"
    try:
        supported = set(core.get_property(dev, "SUPPORTED_PROPERTIES"))
    except Exception:
        supported = set(cfg)
    cfg = {k: v for k, v in cfg.items() if k in supported}
    try:
        compiled = core.compile_model(om, dev, cfg)
    except Exception as e:
        raise BackendError(f"OpenVINO could not compile {name} for {dev} ({cfg}): {cause(e)}") from None
    info = {"device": dev, "hint": options.hint, "threads": threads}
    try:
        got = compiled.get_property("INFERENCE_PRECISION_HINT")
        info["precision"] = got.get_type_name() if hasattr(got, "get_type_name") else str(got)
        info["streams"] = int(compiled.get_property("NUM_STREAMS"))
    except Exception:
        info["precision"] = precision
    return compiled, info


class _Engine:
    """Calls a compiled model with one InferRequest per calling thread (a request is not thread-safe;
    the compiled model is), checking each input against what the model was compiled for."""

    def __init__(self, compiled: Any, sig: FlatSignature, name: str):
        self.compiled = compiled
        self.name = name
        self.names = list(sig.input_names)
        self.shapes = [p.get_partial_shape() for p in compiled.inputs]
        self.dtypes = [p.get_element_type().to_dtype() for p in compiled.inputs]
        self._local = threading.local()

    def _check(self, i: int, a: np.ndarray) -> np.ndarray:
        want = self.dtypes[i]
        if a.dtype != want:
            if a.dtype.kind == want.kind or (a.dtype.kind in "iub" and want.kind in "iu"):
                a = a.astype(want)
            else:
                raise BackendError(f"{self.name}: input {self.names[i]!r} has dtype {a.dtype}, the OpenVINO "
                                   f"model takes {want}")
        ps = self.shapes[i]
        if not ps.compatible(_ov().PartialShape(list(a.shape))):
            raise BackendError(f"{self.name}: input {self.names[i]!r} has shape {tuple(a.shape)}, the OpenVINO "
                               f"model was compiled for {ps} (? is dynamic; compile with dynamic_batch=True "
                               "to serve other batch sizes)")
        return a

    def __call__(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        feed = {i: self._check(i, a) for i, a in enumerate(arrays)}
        req = getattr(self._local, "request", None)
        if req is None:
            req = self._local.request = self.compiled.create_infer_request()
        try:
            res = req.infer(feed, share_inputs=True, share_outputs=False)
        except Exception as e:
            shapes = ", ".join(f"{n}{tuple(a.shape)}" for n, a in zip(self.names, arrays))
            raise BackendError(f"OpenVINO failed to run {self.name} on ({shapes}): {cause(e)}") from None
        return list(res.to_tuple())

    def __deepcopy__(self, memo: dict) -> "_Engine":
        return self  # immutable compiled model; requests stay per thread

    def __reduce__(self):
        raise TypeError("an OpenVINO compiled model cannot be pickled; save it with "
                        "torchfast.backends.openvino.save_artifact (.xml/.bin)")


class _Runner(NativeRunner):
    """NativeRunner that also takes positional inputs by name and returns floating outputs in the dtype the
    model was asked to run in."""

    def __init__(self, run: Any, sig: FlatSignature, out_dtype: torch.dtype | None = None):
        super().__init__(run, sig, "openvino")
        self.out_dtype = out_dtype

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        n = self.sig.n_positional
        missing = self.sig.input_names[len(args):n]
        if missing and all(k in kwargs for k in missing):  # positional inputs passed by name, as eager allows
            kwargs = dict(kwargs)
            args = (*args, *(kwargs.pop(k) for k in missing))
        out = super().forward(*args, **kwargs)
        if self.out_dtype is None or self.out_dtype == torch.float32:
            return out
        return pytree.tree_map(lambda t: t.to(self.out_dtype) if isinstance(t, torch.Tensor) and t.is_floating_point()
                               else t, out)


def precision_for(options: Options, dtype: torch.dtype) -> str:
    return options.precision or _DTYPE_PRECISION.get(dtype, "f32")


def finish(om: Any, sig: FlatSignature, options: Options, precision: str, dtype: torch.dtype, name: str,
            info: dict[str, Any], notes: list[str] | None = None) -> Built:
    om.set_rt_info(json.dumps(_signature_meta(sig, precision, dtype)), _RT_KEY)
    compiled, cinfo = _compile(om, options, precision, name)
    runner = _Runner(_Engine(compiled, sig, name), sig, dtype if dtype != torch.float32 else None)
    return Built(runnable=runner, artifact=om, info={**cinfo, **info}, notes=notes or [])


def build(model: nn.Module, example_inputs: Any, options: Options, *, dynamic_batch: bool = False) -> Built:
    check_device(options)  # before the conversion's seconds
    sig = signature_of(model, example_inputs)
    flat = flat_inputs(sig, example_inputs, f"{type(model).__name__} example inputs")
    om, route, notes = convert(model, sig, flat, final_shapes(flat, dynamic_batch), options.route)
    dtype = model_dtype(model)
    return finish(om, sig, options, precision_for(options, dtype), dtype, type(model).__name__, {"route": route}, notes)


def _portable_spec(spec: Any) -> Any:
    """The output TreeSpec with types a plain loader knows: Mappings (a ModelOutput) as dicts,
    namedtuples as tuples, so loading needs neither transformers nor the model's classes."""
    counter = itertools.count()

    def walk(s: Any) -> Any:
        if s.is_leaf():
            return next(counter)
        kids = [walk(c) for c in s.children_specs]
        ctx = s.context
        if s.type is list:
            return kids
        if s.type is tuple or (isinstance(s.type, type) and issubclass(s.type, tuple)):
            return tuple(kids)
        if isinstance(ctx, (list, tuple)) and len(ctx) == len(kids) and all(isinstance(k, (str, int)) for k in ctx):
            return dict(zip(ctx, kids))
        if s.type is dict or (isinstance(s.type, type) and issubclass(s.type, Mapping)):
            keys = ctx[-1] if isinstance(ctx, (list, tuple)) and ctx and isinstance(ctx[-1], list) else None
            if keys is not None and len(keys) == len(kids):
                return dict(zip(keys, kids))
        return tuple(kids)
    leaves, portable = pytree.tree_flatten(walk(spec))
    if leaves != list(range(len(leaves))):  # pragma: no cover - dict/tuple flatten in order
        raise BackendError("the model's output structure cannot be stored portably")
    return portable


def _signature_meta(sig: FlatSignature, precision: str, dtype: torch.dtype) -> dict[str, Any]:
    """What load_artifact needs to call the IR like the original module, as JSON-able data."""
    meta: dict[str, Any] = {"format": 1, "input_names": sig.input_names, "n_positional": sig.n_positional,
                            "output_names": sig.output_names, "tensor_leaves": sig.tensor_leaves,
                            "precision": precision, "dtype": dtype_name(dtype)}
    odd = [f"output leaf {i} is a {type(v).__name__}" for i, v in sig.constant_leaves.items()
           if not isinstance(v, (type(None), bool, int, float, str))]
    if odd:  # runs fine in memory; only saving needs the structure as data
        meta["unsavable"] = f"{odd[0]}; only tensors, None and plain scalars can be stored in an OpenVINO artifact"
        return meta
    portable = _portable_spec(sig.output_spec)
    meta["output_kind"] = ("tensor" if portable.is_leaf() else "dict" if portable.type is dict
                           else "list" if portable.type is list else "tuple")
    meta["output_spec"] = pytree.treespec_dumps(portable)
    meta["constant_leaves"] = {str(k): v for k, v in sig.constant_leaves.items()}
    return meta


def _signature_from(om: Any, where: Path) -> tuple[FlatSignature, dict[str, Any]]:
    """The stored torchfast signature, or (an IR from elsewhere) inputs/outputs by their OpenVINO names."""
    if not om.has_rt_info(_RT_KEY):
        names = [p.get_any_name() if p.get_names() else f"input_{i}" for i, p in enumerate(om.inputs)]
        n_out = len(om.outputs)
        _, spec = pytree.tree_flatten(0 if n_out == 1 else tuple(range(n_out)))
        outs = [p.get_any_name() if p.get_names() else f"output_{i}" for i, p in enumerate(om.outputs)]
        return FlatSignature(names, len(names), spec, list(range(n_out)), {}, None, outs), {}
    try:
        meta = json.loads(om.get_rt_info(_RT_KEY).astype(str))
        names = [str(n) for n in meta["input_names"]]
        n_pos = int(meta["n_positional"])
        spec = pytree.treespec_loads(meta["output_spec"])
        tensor_leaves = [int(i) for i in meta["tensor_leaves"]]
        constants = {int(k): v for k, v in meta["constant_leaves"].items()}
        outs = [str(n) for n in meta["output_names"]]
        if not 0 <= n_pos <= len(names) or sorted([*tensor_leaves, *constants]) != list(range(spec.num_leaves)) \
                or len(names) != len(om.inputs) or len(tensor_leaves) != len(om.outputs):
            raise ValueError("inputs/outputs do not match the model")
    except Exception as e:
        raise BackendError(f"{where}: the torchfast signature stored in the model is malformed "
                           f"({type(e).__name__}: {e})") from None
    return FlatSignature(names, n_pos, spec, tensor_leaves, constants, None, outs), meta


def _ir_paths(path: str | Path) -> tuple[Path, Path]:
    p = Path(path)
    xml = p if p.suffix == ".xml" else p.with_suffix(".xml") if p.suffix == ".bin" else p.with_name(p.name + ".xml")
    return xml, xml.with_suffix(".bin")


def save_artifact(artifact: Any, path: str | Path) -> Path:
    """Write the OpenVINO IR: ``<path>.xml`` (graph + torchfast's signature in rt_info) and ``<path>.bin``
    (weights as they are: no fp16 compression). Returns the ``.xml`` path."""
    ov = _ov()
    om = getattr(artifact, "artifact", artifact)
    if not isinstance(om, ov.Model):
        raise BackendError(f"save_artifact takes the openvino.Model of a model compiled with backend 'openvino', "
                           f"got {type(artifact).__name__}")
    try:
        meta = json.loads(om.get_rt_info(_RT_KEY).astype(str)) if om.has_rt_info(_RT_KEY) else {}
    except ValueError:
        meta = {}  # load_artifact says it is malformed
    if isinstance(meta, dict) and "unsavable" in meta:
        raise BackendError(f"cannot save this model as OpenVINO IR: {meta['unsavable']}")
    xml, _ = _ir_paths(path)
    xml.parent.mkdir(parents=True, exist_ok=True)
    try:
        ov.save_model(om, str(xml), compress_to_fp16=False)
    except Exception as e:
        raise BackendError(f"could not write the OpenVINO model to {xml}: {cause(e)}") from None
    return xml


def load_artifact(path: str | Path, *, device: str | torch.device | None = None,
                  options: Options | None = None) -> nn.Module:
    """An OpenVINO IR as a drop-in module: torch tensors in (positional, or by keyword name as compiled),
    torch tensors out in the stored structure (a ``ModelOutput`` comes back as a dict). Reading an IR
    runs no Python from the file (XML graph + raw weights; no pickle)."""
    options = options or Options()
    if device is not None:  # an OpenVINO device name, or a torch one ("cpu", torch.device("cpu"))
        options = options.replace(device=device.type if isinstance(device, torch.device) else str(device))
    xml, bin_ = _ir_paths(path)
    if not xml.is_file():
        raise BackendError(f"no OpenVINO model at {xml}")
    if not bin_.is_file():
        raise BackendError(f"{xml} has no weights file: {bin_.name} is missing next to it")
    try:
        om = _core().read_model(str(xml), str(bin_))
    except Exception as e:
        raise BackendError(f"{xml} is not a readable OpenVINO model (broken .xml or .bin): {cause(e)}") from None
    sig, meta = _signature_from(om, xml)
    precision = options.precision or meta.get("precision", "f32")
    if precision not in _PRECISIONS:
        precision = "f32"
    try:
        stored = parse_dtype(meta.get("dtype") or "float32")
    except SpecError:
        stored = None  # a name this version does not know: outputs stay as the engine returns them
    dtype = stored if stored in (torch.float16, torch.bfloat16) else None  # outputs cast back to a half model's
    compiled, _ = _compile(om, options, precision, xml.name)
    runner = _Runner(_Engine(compiled, sig, xml.name), sig, dtype)
    runner.engine_inputs = [InputSpec.from_dims(name, tuple(d.get_length() if d.is_static else -1 for d in p.get_partial_shape()),
                                        numpy_to_torch_dtype(p.get_element_type().to_dtype()))
                            for name, p in zip(sig.input_names, compiled.inputs)]
    return runner


from .openvino_int8 import build_int8, is_attention_model  # noqa: E402  (int8 builds on the conversion above)
