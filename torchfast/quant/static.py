"""int8 static post-training quantization through FX graph mode (torch.ao, x86 backend config).

prepare_fx fuses conv-bn(-relu) and linear-relu, inserts observers (per-channel int8 weights, the chosen
activation observer), calibration runs real batches through it, convert_fx lowers to the x86/fbgemm int8
kernels. The result is an eager ``GraphModule``: no compile step, TorchScript-traceable, state_dict
round-trips.

Untraceable code (data-dependent control flow) does not sink the whole model: the module that fails to
trace stays float and each of its children is quantized on its own, with its own captured calibration
inputs. Layers with no int8 kernel (LayerNorm, GELU, ...) stay fp32; the report lists both.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..modules import Batch, call_model, shared_twin, split_batch, weight_readers
from ..quantized import quantized_module_kind
from ..report import Report
from ..transform import Exclusion
from .calibrate import run_calibration
from .config import Int8Static
from .observers import activation_observer, weight_observer
from .static_precision import Precision, static_precision
from .warnings import quiet

__all__ = ["quantize_fx_static", "fx_qconfig_mapping", "FloatKeys"]

_PARAM_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.ConvTranspose2d, nn.BatchNorm2d, nn.BatchNorm1d,
                nn.LayerNorm, nn.Embedding, nn.LSTM, nn.GRU, nn.MultiheadAttention)


def fx_qconfig_mapping(cfg: Int8Static, precision: Precision, skip: tuple[str, ...] = (), calls: tuple = (),
                       methods: tuple[str, ...] = ()):
    """The x86 mapping with the chosen observers and precision; ``skip`` (module names), ``calls`` ((scope,
    function, index) keys of single functional calls) and ``methods`` (tensor method names) stay float.
    Ops torch.ao gives their own qconfig (fixed-range sigmoid outputs, per-tensor ConvTranspose) keep it."""
    from torch.ao.quantization import QConfig, get_default_qconfig, get_default_qconfig_mapping

    qconfig = QConfig(activation=activation_observer(cfg.observer, precision.reduce_range, cfg.percentile),
                      weight=weight_observer(cfg.per_channel, precision.weight_bits))
    default_global = get_default_qconfig("x86")
    mapping = get_default_qconfig_mapping("x86")
    mapping.set_global(qconfig)
    for obj, qc in list(mapping.object_type_qconfigs.items()):
        if qc is not None and qc.activation is default_global.activation and qc.weight is default_global.weight:
            mapping.set_object_type(obj, qconfig)
    for name in skip:
        mapping.set_module_name(name, None)
    for scope, target, index in calls:
        mapping.set_module_name_object_type_order(scope, target, index, None)
    for method in methods:
        mapping.set_object_type(method, None)
    return mapping


def _example_args(batch: Batch) -> tuple:
    args, kwargs = split_batch(batch)
    if kwargs:
        raise TypeError("FX static quantization traces positional inputs; this model was called with keyword "
                        "inputs (a dict batch) — pass a tuple batch or use Int8Dynamic")
    return args


def _is_trace_error(e: Exception) -> bool:
    from torch.fx.proxy import TraceError
    return isinstance(e, (TraceError, NotImplementedError)) or "symbolically traced" in str(e) or \
        "Proxy" in str(e) or "proxy" in str(e)


def _capture_child_inputs(model: nn.Module, children: list[str], batches: list[Batch]
                          ) -> tuple[dict[str, list[Batch]], set[str]]:
    """Each child's inputs on the batches, and the children whose weight/bias the parent's own code reads
    (outside the child's forward): those must keep their float tensors."""
    seen: dict[str, list[Batch]] = {c: [] for c in children}
    hooks = []
    for c in children:
        def hook(m, args, kwargs, _c=c):
            a = tuple(x.detach() if isinstance(x, torch.Tensor) else x for x in args)
            seen[_c].append(a if not kwargs else (a, dict(kwargs)))
        hooks.append(model.get_submodule(c).register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            for b in batches:
                call_model(model, b)
    finally:
        for h in hooks:
            h.remove()
    return seen, weight_readers(model, children, batches[0])


@dataclass(frozen=True)
class FloatKeys:
    """Functional calls ((module scope, function, index) in the float model) and tensor methods (by name) to
    keep float, and an optional dict that receives each traced graph's prepare record by its prefix."""
    calls: tuple = ()
    methods: tuple[str, ...] = ()
    records: dict | None = field(default=None, compare=False)

    def child(self, name: str) -> "FloatKeys":
        """The keys as seen from inside child ``name`` (its scopes without the ``name.`` prefix)."""
        calls = tuple((s[len(name) + 1:] if s != name else "", t, i) for s, t, i in self.calls
                      if s == name or s.startswith(name + "."))
        return FloatKeys(calls, self.methods, self.records)  # records are keyed by full prefix already


WEIGHT_READ = "the model's code reads its .weight/.bias, which an int8 layer packs"
PADS = "zero pads run in int8"


def _graph_weight_readers(prepared: nn.Module, model: nn.Module, skip: tuple[str, ...]) -> list[str]:
    """Conv/Linear layers whose weight or bias the traced forward reads directly (``self.proj.weight.device``)."""
    names = dict(model.named_modules())
    out = []
    for node in prepared.graph.nodes:
        if node.op != "get_attr" or not isinstance(node.target, str) or "." not in node.target:
            continue
        owner, attr = node.target.rsplit(".", 1)
        if attr in ("weight", "bias") and isinstance(names.get(owner), _PARAM_TYPES) and owner not in skip \
                and owner not in out and not isinstance(names.get(owner), (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm)):
            out.append(owner)
    return out


def _fx_one(model: nn.Module, cfg: Int8Static, batches: list[Batch], precision: Precision, skip: tuple[str, ...],
            prefix: str, untraced: list[tuple[str, str]], progress: bool, wrapped_leaf: bool = False,
            keep: FloatKeys = FloatKeys()) -> nn.Module:
    """FX-quantize ``model``; on a trace failure keep it float and recurse into its children. A leaf layer
    is tried once, wrapped in a Sequential; if even that fails to trace (a conv subclass whose forward
    branches on shapes), it stays float as it is. ``keep.records`` receives what prepare decided, by prefix."""
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    from .int8_pad import fold_int8_pads, pad_backend_config

    def get_x86_backend_config():  # x86 plus zero pads observed like their input, folded after convert
        return pad_backend_config()
    mapping = fx_qconfig_mapping(cfg, precision, skip, keep.calls, keep.methods)
    try:
        with quiet("torch.ao"):
            prepared = prepare_fx(model, mapping, _example_args(batches[0]), backend_config=get_x86_backend_config())
            readers = _graph_weight_readers(prepared, model, skip)
            if readers:  # int8 layers hold packed weights: code reading `layer.weight` would break, keep them float
                untraced.extend((f"{prefix}.{n}" if prefix else n, WEIGHT_READ) for n in readers)
                mapping = fx_qconfig_mapping(cfg, precision, tuple(skip) + tuple(readers), keep.calls, keep.methods)
                prepared = prepare_fx(model, mapping, _example_args(batches[0]),
                                      backend_config=get_x86_backend_config())
    except Exception as e:
        if not _is_trace_error(e) and not isinstance(e, TypeError):
            raise
        untraced.append((prefix or "<root>", f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"))
        return model[0] if wrapped_leaf else _fx_children(model, cfg, batches, precision, skip, prefix, untraced,
                                                          keep)
    if keep.records is not None:
        from .islands_graph import record_prepared
        keep.records[prefix] = record_prepared(prepared)
    with quiet("torch.ao"):
        run_calibration(prepared, batches, progress=progress, desc=f"calibrating {prefix or 'model'} ({cfg.observer})")
        converted = convert_fx(prepared, backend_config=get_x86_backend_config())
        pads = fold_int8_pads(converted)
        if any(pads.values()):
            untraced.append((prefix or "<root>", PADS + f" ({pads.get('folded', 0)} folded into int8 convs, "
                                                       f"{pads.get('on int8', 0)} on the int8 integers)"))
    try:  # torch.ao can emit an int8 graph that does not run (a quantize of an already quantized tensor)
        with torch.no_grad():
            call_model(converted, batches[0])
    except Exception as e:  # noqa: BLE001 - that graph is dropped; the parts are quantized one by one
        untraced.append((prefix or "<root>", f"its int8 graph fails to run ({type(e).__name__}: "
                                             f"{str(e).splitlines()[0][:120]})"))
        return model[0] if wrapped_leaf else _fx_children(model, cfg, batches, precision, skip, prefix, untraced,
                                                          keep)
    return converted


def _fx_children(model: nn.Module, cfg: Int8Static, batches: list[Batch], precision: Precision, skip: tuple[str, ...],
                 prefix: str, untraced: list[tuple[str, str]], keep: FloatKeys = FloatKeys()) -> nn.Module:
    """``model`` stays float; each child is quantized on the inputs it receives."""
    children = [n for n, _ in model.named_children()]
    inputs, readers = _capture_child_inputs(model, children, batches)
    for name in children:
        if name in readers and isinstance(model.get_submodule(name), _PARAM_TYPES):
            untraced.append((f"{prefix}.{name}" if prefix else name, WEIGHT_READ))
            continue
        child_batches = [b for b in inputs[name] if not (isinstance(b, tuple) and len(b) == 2 and isinstance(b[1], dict))]
        full = f"{prefix}.{name}" if prefix else name
        child = model.get_submodule(name)
        if not any(p.is_floating_point() for p in child.parameters()):
            continue
        if not child_batches:
            why = "called with keyword arguments" if inputs[name] else "not called on the calibration batches"
            untraced.append((full, why))
            continue
        if not all(isinstance(a, torch.Tensor) for b in child_batches for a in b):
            untraced.append((full, "called with non-tensor arguments"))
            continue
        child_skip = tuple(s[len(name) + 1:] for s in skip if s.startswith(name + "."))
        if name in skip:
            continue
        leaf = not any(True for _ in child.children())
        # a bare leaf traces to functional ops; wrapped, it converts to a quantized module at "<name>.0"
        target = nn.Sequential(child) if leaf else child
        q = _fx_one(target, cfg, child_batches, precision, child_skip, full, untraced, progress=False,
                    wrapped_leaf=leaf, keep=keep.child(name))
        setattr(model, name, q)
    return model


def _is_quantized_module(mod: nn.Module) -> bool:
    return quantized_module_kind(mod) == "ao"


def layer_report(original: nn.Module, quantized: nn.Module, untraced: list[tuple[str, str]],
                 exclusion: Exclusion, scheme: str) -> Report:
    report = Report("int8 static quantization (FX graph mode, x86)",
                    columns=["layer", "type", "applied", "scheme", "reason"])
    qmods = dict(quantized.named_modules())
    orig = [(n, m) for n, m in original.named_modules() if isinstance(m, _PARAM_TYPES) and n]
    prev_name = None
    for name, mod in orig:
        row = dict(layer=name, type=type(mod).__name__)
        q = qmods.get(name)
        if isinstance(q, torch.fx.GraphModule) and f"{name}.0" in qmods:  # a leaf quantized on its own
            q = qmods[f"{name}.0"]
        if exclusion(name):
            report.add_row(**row, applied=False, scheme="fp32", reason=exclusion.reason(name))
        elif q is not None and _is_quantized_module(q):
            report.add_row(**row, applied=True, scheme=f"{scheme} ({type(q).__name__})")
        elif q is None and isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
            report.add_row(**row, applied=True, scheme=f"folded into {prev_name}", reason="conv-bn fusion")
        elif q is None:
            report.add_row(**row, applied=False, scheme="-", reason="removed/fused by FX tracing")
        else:
            if (name, WEIGHT_READ) in untraced:
                report.add_row(**row, applied=False, scheme="fp32", reason=WEIGHT_READ)
                prev_name = name
                continue
            owner = next((u for u, w in untraced if u != "<root>" and w != WEIGHT_READ and not w.startswith(PADS)
                          and (name == u or name.startswith(u + "."))), None)
            why = (f"inside untraceable {owner!r}" if owner and not any(name.startswith(u + ".") and
                   _is_quantized_module(qmods.get(name, nn.Identity())) for u, _ in untraced)
                   else "no int8 kernel for this op in the x86 backend; kept fp32")
            report.add_row(**row, applied=False, scheme="fp32", reason=why)
        prev_name = name
    for u, why in untraced:
        if why == WEIGHT_READ:
            continue
        if why.startswith(PADS):
            report.note(f"{u}: {why}")
            continue
        if why.startswith(("called with", "not called")):  # incl. "called with non-tensor arguments"
            report.note(f"{u} was {why}; it stays float")
        else:
            report.note(f"{u} was not quantized as a whole ({why}); it stays float and its children "
                        f"were quantized separately")
    return report


def forget_fx_device_cache() -> None:
    """torch.ao's FX prepare/convert memoize each module's device in an unbounded cache keyed by the module,
    which keeps every observed and converted graph module, with its weights, alive for the life of the
    process: a model of hundreds of millions of weights built a few times no longer fits in memory.
    Emptied after each build (it is only a memo)."""
    from torch.ao.quantization.fx import utils as fx_utils
    cached = getattr(fx_utils, "assert_and_get_unique_device", None)
    if hasattr(cached, "cache_clear"):
        cached.cache_clear()


def quantize_fx_static(model: nn.Module, cfg: Int8Static, batches: list[Batch],
                       exclusion: Exclusion | None = None, keep: FloatKeys = FloatKeys()) -> tuple[nn.Module, Report]:
    """``model`` is already a private copy in eval mode; ``batches`` are validated calibration batches;
    ``keep``: single calls and methods to keep float (beyond ``exclusion``'s layers), and where to record
    what prepare decided."""
    exclusion = exclusion if exclusion is not None else Exclusion(cfg.exclude, "Int8Static")
    precision = static_precision(cfg.full_range)
    untraced: list[tuple[str, str]] = []
    original = shared_twin(model)  # the report reads the layers' names and types from it, no weights
    try:
        q = _fx_one(model, cfg, batches, precision, exclusion.roots(model), "", untraced, cfg.progress, keep=keep)
    finally:
        forget_fx_device_cache()
    scheme = ("int8 static, " + ("per-channel" if cfg.per_channel else "per-tensor") + f", {cfg.observer}, "
              + precision.describe())
    report = layer_report(original, q, untraced, exclusion, scheme)
    report.summary.update({"scheme": "int8 static", "method": "fx", "observer": cfg.observer,
                           "weights": "per-channel" if cfg.per_channel else "per-tensor",
                           "activation bits": precision.activation_bits,
                           "weight bits": precision.weight_bits,
                           "calibration batches": len(batches),
                           "layers quantized": len(report.where(applied=True)),
                           "layers kept in float": len(report.where(applied=False))})
    return q, report
