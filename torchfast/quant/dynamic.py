"""int8 dynamic quantization: int8 weights, activations quantized per batch on the fly.

On CPU the torch.ao x86/fbgemm kernels are the fast path (measured; torchao's int8 paths were slower
per layer on this CPU in eager mode). With example inputs every candidate layer is timed on its real
input shape and each layer keeps the fastest implementation, fp32 included: a layer that int8 does
not speed up is not quantized, and the report says so.

fbgemm's dynamic Linear quantizes activations to 7 bits by default (``reduce_range``) to avoid int16
saturation in pre-VNNI AVX2 kernels. Where a probe proves the 8-bit kernel exact on this CPU, torchfast
uses all 8 bits: on all-MiniLM-L6-v2 that moves embedding cosine from 0.976 to 0.993. Where it is not
(AVX2 without VNNI sums pairs of uint8 x int8 products in int16), the bit goes from the weights instead:
8-bit activations times weights within +-64 cannot saturate (2 * 255 * 64 = 32640 < 32767), and the
activations are where a transformer's outliers are. On all-MiniLM-L6-v2 (AVX2 EPYC, SmoothQuant on) the
worst of 48 held-out sentences moves from embedding cosine 0.982 (7-bit activations) to 0.993.
"""
from __future__ import annotations

import copy
import functools
from typing import Any

import torch
from torch import nn

from ..modules import Batch, model_device, swap_modules, weight_readers
from ..report import Report
from ..transform import Exclusion
from .common import capture_inputs, check_not_quantized, time_layer
from .config import Int8Dynamic
from .warnings import import_torchao, quiet

__all__ = ["quantize_dynamic", "DynamicLinear", "full_range_exact", "seven_bit_weights_exact", "precision_plan"]

_TYPES = {"linear": nn.Linear, "lstm": nn.LSTM, "gru": nn.GRU}


def _nnqd():
    with quiet("torch.ao"):
        import torch.ao.nn.quantized.dynamic as nnqd
    return nnqd


class _DynamicLinearBase:  # filled in lazily so importing torchfast.quant stays cheap
    pass


@functools.lru_cache(maxsize=None)
def _dynamic_linear_cls():
    nnqd = _nnqd()

    class DynamicLinear(nnqd.Linear):
        """torch.ao dynamic int8 Linear with a choice of 7- or 8-bit activation range.

        Same packed weights, state_dict and TorchScript support as ``torch.ao.nn.quantized.dynamic.Linear``.
        """
        def __init__(self, in_features, out_features, bias_=True, dtype=torch.qint8, full_range: bool = False):
            super().__init__(in_features, out_features, bias_=bias_, dtype=dtype)
            self.full_range = full_range

        def _get_name(self):
            return "DynamicQuantizedLinear8bit" if self.full_range else "DynamicQuantizedLinear"

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = torch.ops.quantized.linear_dynamic(x, self._packed_params._packed_params,
                                                   reduce_range=not self.full_range)
            return y.to(x.dtype)

        @classmethod
        def from_float_full(cls, mod: nn.Linear, per_channel: bool, full_range: bool,
                            weight_bits: int = 8) -> "DynamicLinear":
            from torch.ao.quantization import default_dynamic_qconfig, per_channel_dynamic_qconfig
            with quiet("torch.ao"):
                observer = (per_channel_dynamic_qconfig if per_channel else default_dynamic_qconfig).weight
                if weight_bits == 7:  # symmetric within +-64: the pair sums of 8-bit activations fit int16
                    observer = observer.with_args(quant_min=-64, quant_max=63)
                observer = observer()
                observer(mod.weight)
                scale, zp = observer.calculate_qparams()
                w = mod.weight.detach().float()
                if per_channel:
                    qw = torch.quantize_per_channel(w, scale.double(), zp.long(), 0, torch.qint8)
                else:
                    qw = torch.quantize_per_tensor(w, float(scale), int(zp), torch.qint8)
                q = cls(mod.in_features, mod.out_features, bias_=mod.bias is not None, full_range=full_range)
                q.set_weight_bias(qw, None if mod.bias is None else mod.bias.detach().float())
            return q

    DynamicLinear.__module__ = __name__
    DynamicLinear.__qualname__ = "DynamicLinear"
    return DynamicLinear


def __getattr__(name: str) -> Any:
    if name == "DynamicLinear":
        return _dynamic_linear_cls()
    raise AttributeError(name)


def _exact_at_the_top(weight_bits: int) -> bool:
    """Adversarial probe of fbgemm's dynamic kernel with 8-bit activations: every activation at 255, every
    weight at the top of its range (127 for 8 bits, 64 for 7); exact where no int16 pair sum saturates."""
    if torch.backends.quantized.engine not in ("x86", "fbgemm"):
        return False
    try:
        lin = nn.Linear(256, 4, bias=False)
        with torch.no_grad():
            lin.weight.fill_(1.0)
        q = _dynamic_linear_cls().from_float_full(lin, per_channel=False, full_range=True, weight_bits=weight_bits)
        x = torch.ones(3, 256)  # quantizes to 255 (range [0, 1])
        ref = x @ q.weight().dequantize().t()
        in_range = bool(q.weight().int_repr().abs().max() <= 2 ** (weight_bits - 1))
        return in_range and torch.allclose(q(x), ref, rtol=1e-3)
    except Exception:
        return False


@functools.lru_cache(maxsize=None)
def full_range_exact() -> bool:
    """Does this CPU's fbgemm dynamic kernel compute 8-bit activations x int8 weights without saturation?
    Pre-VNNI AVX2 ``vpmaddubsw`` sums pairs in int16 (255 x 127 x 2 overflows); VNNI accumulates in int32."""
    return _exact_at_the_top(8)


@functools.lru_cache(maxsize=None)
def seven_bit_weights_exact() -> bool:
    """Does it compute 8-bit activations x weights within +-64 exactly? (Pre-VNNI AVX2: 2 x 255 x 64 fits
    int16; the probe checks rather than assumes.)"""
    return _exact_at_the_top(7)


def precision_plan(full_range: bool | None) -> tuple[bool, int]:
    """(8-bit activations?, weight bits) for ``Int8Dynamic.full_range``: None picks the most precise exact
    pair on this CPU (8 x 8 with VNNI, 8-bit activations x 7-bit weights on older AVX2, else 7 x 8);
    True asks for 8-bit activations (weights drop to 7 bits where 8 x 8 would saturate); False for 7 x 8."""
    if full_range is False:
        return False, 8
    if full_range_exact():
        return True, 8
    if full_range is True or seven_bit_weights_exact():
        return True, 7
    return False, 8


def _torchao_layer(mod: nn.Linear) -> nn.Module:
    import_torchao()
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    holder = nn.Sequential(copy.deepcopy(mod))
    with quiet("torchao"):
        quantize_(holder, Int8DynamicActivationInt8WeightConfig())
    return holder[0]


def _torch_ao_layer(mod: nn.Module, cfg: Int8Dynamic, full_range: bool, weight_bits: int = 8) -> nn.Module:
    if isinstance(mod, nn.Linear):
        return _dynamic_linear_cls().from_float_full(mod, cfg.per_channel, full_range, weight_bits)
    from torch.ao.quantization import default_dynamic_qconfig
    nnqd = _nnqd()
    src = copy.copy(mod)
    src.qconfig = default_dynamic_qconfig
    with quiet("torch.ao"):
        return (nnqd.LSTM if isinstance(mod, nn.LSTM) else nnqd.GRU).from_float(src)


def _describe(mod: nn.Module) -> str:
    if isinstance(mod, nn.Linear):
        return f"{mod.in_features}->{mod.out_features}"
    return f"{mod.input_size}->{mod.hidden_size}x{mod.num_layers}"


def quantize_dynamic(model: nn.Module, cfg: Int8Dynamic, *, example_inputs: Batch | None = None,
                     calibration: Any = None, exclusion: Exclusion | None = None,
                     inplace: bool = False) -> tuple[nn.Module, Report]:
    """``quantize()`` for Int8Dynamic (no calibration: activation ranges are measured per batch)."""
    check_not_quantized(model, "Int8Dynamic")
    device = model_device(model)
    types = tuple(_TYPES[m] for m in cfg.modules)
    exclusion = exclusion if exclusion is not None else Exclusion(cfg.exclude, "Int8Dynamic")
    names, reasons = [], {}
    for name, mod in model.named_modules():
        if not isinstance(mod, types) or name == "":
            continue
        w = next(mod.parameters(), None)
        if exclusion(name):
            reasons[name] = exclusion.reason(name)
        elif w is None or w.dtype != torch.float32:
            reasons[name] = f"weights are {None if w is None else w.dtype}; int8 dynamic starts from float32"
        elif isinstance(mod, (nn.LSTM, nn.GRU)) and (getattr(mod, "proj_size", 0) or not mod.bias):
            reasons[name] = "no quantized kernel for LSTM with proj_size or without bias"
        else:
            names.append(name)
    if device.type != "cpu" and cfg.backend == "torch.ao":
        raise ValueError(f"Int8Dynamic(backend='torch.ao') runs on CPU only; the model is on {device}. "
                         f"Use backend='torchao' (or 'auto') on GPUs")
    backends = ["torch.ao", "torchao"] if cfg.backend == "auto" else [cfg.backend]
    if device.type != "cpu":
        backends = ["torchao"]
    full_range, weight_bits = precision_plan(cfg.full_range)
    work = model if inplace else copy.deepcopy(model)
    if example_inputs is not None and names:
        for name in sorted(weight_readers(work, names, example_inputs)):
            reasons[name] = "the model's code reads its .weight/.bias, which an int8 layer packs"
            names.remove(name)
    inputs = capture_inputs(work, names, example_inputs) if example_inputs is not None else {}

    report = Report("int8 dynamic quantization",
                    columns=["layer", "type", "shape", "applied", "scheme", "fp32 ms", "int8 ms", "speedup", "reason"])
    chosen: dict[str, nn.Module] = {}  # swapped in only once every layer is decided
    for name in names:
        mod = work.get_submodule(name)
        cands: dict[str, nn.Module] = {}
        errors = []
        for b in backends:
            if b == "torchao" and not isinstance(mod, nn.Linear):
                continue
            try:
                cands[b] = _torch_ao_layer(mod, cfg, full_range, weight_bits) if b == "torch.ao" else _torchao_layer(mod)
            except Exception as e:  # a kernel that cannot take this layer: note it, try the next
                errors.append(f"{b}: {type(e).__name__}: {e}")
        row = dict(layer=name, type=type(mod).__name__, shape=_describe(mod))
        if not cands:
            report.add_row(**row, applied=False, reason="; ".join(errors) or "no int8 kernel")
            continue
        args = inputs.get(name)
        timed: dict[str, float] = {}
        fp32_ms = None
        if args is not None and (len(cands) > 1 or not cfg.keep_slower):
            for b, q in cands.items():
                f_ms, q_ms = time_layer(mod, q, args)
                fp32_ms = f_ms if fp32_ms is None else min(fp32_ms, f_ms)
                timed[b] = q_ms
        if timed:
            best = min(timed, key=timed.get)
            faster = timed[best] < fp32_ms
        else:
            best, faster = next(iter(cands)), True
            if args is None and example_inputs is not None:
                row["reason"] = "not called on the example inputs; quantized untimed"
        scheme = ("int8 dynamic, torch.ao fbgemm, " + ("per-channel" if cfg.per_channel else "per-tensor")
                  + ((", 8-bit activations" + (", 7-bit weights" if weight_bits == 7 else ""))
                     if full_range and isinstance(mod, nn.Linear) else ", 7-bit activations")
                  if best == "torch.ao" else "int8 dynamic, torchao Int8DynamicActivationInt8Weight")
        row.update({"fp32 ms": fp32_ms, "int8 ms": timed.get(best), "scheme": scheme,
                    "speedup": (fp32_ms / timed[best]) if timed else None})
        if faster or cfg.keep_slower:
            chosen[name] = cands[best]
            report.add_row(**row, applied=True)
        else:
            report.add_row(**{**row, "scheme": "fp32"}, applied=False,
                           reason=f"int8 measured slower than fp32 on its real input ({timed[best]:.3g} vs {fp32_ms:.3g} ms)")
    for name, why in reasons.items():
        mod = model.get_submodule(name)
        report.add_row(layer=name, type=type(mod).__name__, shape=_describe(mod), applied=False, scheme="fp32", reason=why)
    report.summary.update({"scheme": "int8 dynamic", "layers quantized": len(chosen),
                           "layers kept in float": len(report.rows) - len(chosen),
                           "backends tried": ", ".join(backends),
                           "activation bits": 8 if full_range else 7,
                           "weight bits": weight_bits})
    if not names:
        report.note("no Linear/LSTM/GRU layer to quantize: the model is returned unchanged")
    if example_inputs is None:
        report.note("no example inputs: layers were quantized without timing them against fp32")
    swap_modules(work, chosen)
    return work, report
