"""int8 static through the PT2E flow: torch.export -> torchao prepare_pt2e/convert_pt2e with
X86InductorQuantizer -> torch.compile(inductor), which fuses the quantize/dequantize pairs into int8
kernels. Without inductor the converted graph runs reference (slow) ops, so this path returns the
compiled module; compiling takes minutes on 2 cores, hence opt-in (``method="pt2e"`` or
``compile_ok=True`` with ``method="auto"``).
"""
from __future__ import annotations

import torch
from torch import nn

from ..modules import Batch, split_batch
from ..report import Report
from ..transform import Exclusion
from .calibrate import run_calibration
from .config import Int8Static
from .warnings import import_torchao, quiet

__all__ = ["quantize_pt2e_static"]


def _quantizer(cfg: Int8Static, skip: tuple[str, ...] = ()):
    import_torchao()
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
    from torchao.quantization.pt2e.observer import HistogramObserver, MinMaxObserver
    from torchao.quantization.pt2e.quantizer import QuantizationSpec

    config = xiq.get_default_x86_inductor_quantization_config()  # per-channel int8 weights
    if cfg.observer != "histogram":
        # percentile has no PT2E observer here; min-max is the conservative choice for it
        act = QuantizationSpec(dtype=torch.uint8, quant_min=0, quant_max=255, qscheme=torch.per_tensor_affine,
                               is_dynamic=False, observer_or_fake_quant_ctr=MinMaxObserver.with_args(eps=2**-12))
        config = type(config)(act, act, config.weight, config.bias, config.is_qat)
    q = xiq.X86InductorQuantizer()
    q.set_global(config)
    for name in skip:  # excluded modules stay float
        q.set_module_name_qconfig(name, None)
    return q


def _drop_unused_tensors(gm: torch.fx.GraphModule) -> None:
    """convert_pt2e folds weights into int8 constants but leaves the float originals attached: drop them."""
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name, _ in list(gm.named_parameters()) + list(gm.named_buffers()):
        if name not in used:
            owner, _, attr = name.rpartition(".")
            mod = gm.get_submodule(owner) if owner else gm
            if attr in mod._parameters:
                del mod._parameters[attr]
            elif attr in mod._buffers:
                del mod._buffers[attr]


def _export(model: nn.Module, args: tuple, kwargs: dict) -> nn.Module:
    """torch.export with a dynamic batch dimension (calibration and serving batch sizes differ), static if that fails."""
    from torch.export import Dim

    def dyn(x):
        return {0: Dim.AUTO} if isinstance(x, torch.Tensor) and x.dim() > 0 else None
    try:
        shapes = {"args": tuple(dyn(a) for a in args), "kwargs": {k: dyn(v) for k, v in kwargs.items()}} \
            if kwargs else tuple(dyn(a) for a in args)
        return torch.export.export(model, args, kwargs, dynamic_shapes=shapes if not kwargs else None).module()
    except Exception:
        return torch.export.export(model, args, kwargs).module()


def quantize_pt2e_static(model: nn.Module, cfg: Int8Static, batches: list[Batch],
                         example_inputs: Batch | None = None,
                         exclusion: Exclusion | None = None) -> tuple[nn.Module, Report]:
    import_torchao()
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    for m in model.modules():  # in-place activations confuse the quantizer's pattern partitions
        if hasattr(m, "inplace") and isinstance(getattr(m, "inplace"), bool):
            m.inplace = False
    exclusion = exclusion if exclusion is not None else Exclusion(cfg.exclude, "Int8Static")
    skip = exclusion.roots(model)
    args, kwargs = split_batch(batches[0] if example_inputs is None else example_inputs)
    with quiet("torchao"), torch.no_grad():
        exported = _export(model, args, kwargs)
        prepared = prepare_pt2e(exported, _quantizer(cfg, skip))
        run_calibration(prepared, batches, progress=cfg.progress, desc=f"calibrating (pt2e, {cfg.observer})")
        converted = convert_pt2e(prepared)
        _drop_unused_tensors(converted)
    compiled = torch.compile(converted, backend="inductor")
    report = Report("int8 static quantization (PT2E, X86InductorQuantizer + inductor)",
                    columns=["layer", "applied", "scheme", "reason"])
    for name in skip:
        report.add_row(layer=name, applied=False, scheme="fp32", reason=exclusion.reason(name))
    nq = 0
    for node in converted.graph.nodes:
        if node.op == "call_function" and "dequantize" in str(node.target):
            nq += 1
    report.summary.update({"scheme": "int8 static", "method": "pt2e", "observer": cfg.observer,
                           "quantize/dequantize pairs": nq, "calibration batches": len(batches)})
    report.note("the returned module is torch.compile'd (inductor); the first call compiles")
    if cfg.observer == "percentile":
        report.note("percentile observer is FX-only; PT2E used min-max")
    return compiled, report
