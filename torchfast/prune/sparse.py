"""``sparsify(model, SemiStructured24() | UnstructuredSparse(amount=...), example_inputs=x)``: magnitude masks + sparse kernels.

Zeros only pay when a kernel skips them. Each Linear gets its magnitude mask; then, on the layer's real
input shape (captured from ``example_inputs``), the candidate kernels are timed against the dense layer
(interleaved, ``measure.compare_latency``) and swapped in only when faster by ``min_speedup``:

* CUDA, compute capability >= 8.0, fp16/bf16: 2:4 weights via ``torch.sparse.to_sparse_semi_structured``
  (cuSPARSELt / CUTLASS sparse tensor cores).
* CPU: CSR (and BSR) weights through ``torch.sparse.mm`` (MKL sparse BLAS).

A layer that loses keeps its masked weights dense, and the report says so with the measured figures.
"""
from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Config
from ..measure import compare_latency, resolve_timing
from ..modules import batches_list, capture_inputs, check_module, swap_modules
from ..report import Report
from ..transform import Exclusion, legacy_positional
from .config import SemiStructured24, UnstructuredSparse

DEFAULT_ROWS = 128  # rows (tokens x batch) assumed when no example inputs are given


class SparseLinear(nn.Module):
    """``y = x W^T + b`` with W stored as a CSR/BSR tensor; computed as ``(W @ x^T)^T`` by torch.sparse.mm."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, layout: str, blocksize: int = 16) -> None:
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.layout = layout
        w = weight.detach()
        with warnings.catch_warnings():  # "sparse CSR support is in beta": said once in the docs, not per layer
            warnings.simplefilter("ignore", UserWarning)
            sw = w.to_sparse_csr() if layout == "csr" else w.to_sparse_bsr((blocksize, blocksize))
        self.register_buffer("weight", sw)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        y = torch.sparse.mm(self.weight, x2.t()).t()
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        nnz = self.weight.values().numel()
        return f"{self.in_features}->{self.out_features}, {self.layout}, density={nnz / (self.in_features * self.out_features):.3f}"


def magnitude_mask(w: torch.Tensor, amount: float) -> torch.Tensor:
    """Boolean keep-mask zeroing the ``amount`` fraction of smallest-|w| entries."""
    k = int(amount * w.numel())
    if k <= 0:
        return torch.ones_like(w, dtype=torch.bool)
    thresh = w.detach().abs().flatten().float().kthvalue(k).values
    return w.detach().abs().float() > thresh


def mask_24(w: torch.Tensor) -> torch.Tensor:
    """Keep the 2 largest |w| of every 4 consecutive input weights (the 2:4 pattern sparse tensor cores run)."""
    o, i = w.shape
    if i % 4:
        raise ValueError(f"2:4 sparsity needs in_features divisible by 4, got {i}")
    g = w.detach().abs().float().reshape(o, i // 4, 4)
    idx = g.topk(2, dim=-1).indices
    m = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, idx, True)
    return m.reshape(o, i)


def _input_shapes(model: nn.Module, names: list[str], example_inputs: Any) -> dict[str, torch.Size]:
    return {n: args[0].shape for n, args in capture_inputs(model, names, example_inputs).items()}


def _semi_structured_ok(w: torch.Tensor) -> str | None:
    """None if the 2:4 CUDA kernel can run this weight, else why not."""
    if w.device.type != "cuda":
        return "2:4 sparse kernels need a CUDA GPU (compute capability >= 8.0); layer left dense with 2:4 zeros"
    if torch.cuda.get_device_capability(w.device) < (8, 0):
        return "GPU older than Ampere (sm80): no sparse tensor cores; layer left dense with 2:4 zeros"
    if w.dtype not in (torch.float16, torch.bfloat16):
        return f"2:4 kernels run fp16/bf16, weight is {w.dtype}; cast the model (HalfPrecision) first"
    o, i = w.shape
    if o % 64 or i % 64:
        return f"shape {o}x{i} is not a multiple of 64 (semi-structured kernel constraint)"
    return None


@legacy_positional(("config", "example_inputs"))
def sparsify(model: nn.Module, config: Config | None = None, *, example_inputs: Any = None,
             calibration: Any = None, inplace: bool = False) -> tuple[nn.Module, Report]:
    """Mask Linear weights (2:4 or unstructured magnitude) and use sparse kernels where measured faster.

    example_inputs: one batch at the real shape: each layer is timed on its real input (else the first
        calibration batch; with neither, on ``DEFAULT_ROWS`` rows). calibration is not used otherwise.
    inplace: ``False`` (default) works on a copy and leaves ``model`` exactly as it was (weights, module
        types, every submodule's train/eval flag). ``True`` writes the masks and kernels into ``model`` once
        every layer is decided and returns it; layers kept dense keep their parameter objects (masked in
        place). A raise changes nothing either way.
    """
    check_module(model)
    cfg = config if config is not None else SemiStructured24()
    if not isinstance(cfg, (SemiStructured24, UnstructuredSparse)):
        raise TypeError(f"sparsify() takes SemiStructured24 or UnstructuredSparse, got {type(cfg).__name__}")
    if example_inputs is None and calibration is not None:
        example_inputs = next(iter(batches_list(calibration)), None)
    exclusion = Exclusion.resolve(model, cfg)
    linears = [n for n, m in model.named_modules() if type(m) is nn.Linear]
    names = [n for n in linears if not exclusion(n)]
    if isinstance(cfg, SemiStructured24) and cfg.require_kernel:
        for n in names:
            why = _semi_structured_ok(model.get_submodule(n).weight)
            if why:
                raise RuntimeError(f"SemiStructured24(require_kernel=True): layer {n!r}: {why}")
    work = model if inplace else copy.deepcopy(model)
    shapes = _input_shapes(work, names, example_inputs) if example_inputs is not None else {}
    report = Report(f"sparsify: {type(cfg).__name__}")
    if example_inputs is None:
        report.note(f"no example_inputs: kernels timed on {DEFAULT_ROWS} input rows per layer")
    for n in linears:
        if exclusion(n):
            m = model.get_submodule(n)
            report.add_row(layer=n, shape=f"{m.in_features}->{m.out_features}", kernel="dense", applied=False,
                           reason=exclusion.reason(n))
    flops = {"before": 0, "after": 0}
    # decided layer by layer, committed at the end: a raise half-way leaves every weight as it was
    swaps: dict[str, nn.Module] = {}
    masks: dict[str, torch.Tensor] = {}
    for n in names:
        m = work.get_submodule(n)
        if n not in shapes and example_inputs is not None:
            report.add_row(layer=n, applied=False, reason="not called by the example inputs; left unchanged")
            continue
        try:
            keep = mask_24(m.weight) if isinstance(cfg, SemiStructured24) else magnitude_mask(m.weight, cfg.amount)
        except ValueError as e:
            report.add_row(layer=n, applied=False, reason=str(e))
            continue
        w = m.weight.detach() * keep.to(m.weight.dtype)
        bias = None if m.bias is None else m.bias.detach()
        rows = shapes[n][:-1].numel() if n in shapes else DEFAULT_ROWS
        x = torch.randn(max(1, rows), m.in_features, device=w.device, dtype=w.dtype)
        row = dict(layer=n, shape=f"{m.in_features}->{m.out_features}", rows=rows,
                   sparsity=1.0 - keep.float().mean().item())
        best, best_speed, best_name = None, 0.0, None
        candidates: list[tuple[str, nn.Module]] = []
        if isinstance(cfg, SemiStructured24):
            why = _semi_structured_ok(w)
            if why is None:
                from torch.sparse import to_sparse_semi_structured
                sm = copy.deepcopy(m)
                sm.weight = nn.Parameter(to_sparse_semi_structured(w), requires_grad=False)
                candidates.append(("2:4 semi-structured", sm))
            else:
                row.update(kernel="dense", applied=False, reason=why)
        else:
            if w.device.type != "cpu":
                row.update(kernel="dense", applied=False, reason="CPU sparse kernels only; on CUDA use SemiStructured24")
            for layout in cfg.layouts if w.device.type == "cpu" else ():
                if layout == "bsr" and (m.in_features % cfg.blocksize or m.out_features % cfg.blocksize):
                    continue
                candidates.append((layout, SparseLinear(w, bias, layout, cfg.blocksize).train(m.training)))
        # one kernel: three quarters of DEFAULT_TIMING (15 runs, 3 warm-up calls by default)
        timing = resolve_timing(share=0.75, runs=getattr(cfg, "runs", None))
        for cname, cm in candidates:
            try:
                cmp = compare_latency(lambda t: F.linear(t, w, bias), cm, x, timing=timing)
            except Exception as e:  # a kernel that does not run here is a kernel that does not win
                row.setdefault("notes", f"{cname} failed: {type(e).__name__}")
                continue
            row[f"{cname} speedup"] = cmp.speedup
            if cmp.speedup > best_speed:
                best, best_speed, best_name = cm, cmp.speedup, cname
        dense_flops = 2 * max(1, rows) * m.in_features * m.out_features
        flops["before"] += dense_flops
        flops["after"] += (2 * max(1, rows) * int(keep.sum()) if best is not None and best_speed >= cfg.min_speedup
                           else dense_flops)
        if best is not None and best_speed >= cfg.min_speedup:
            swaps[n] = best
            row.update(kernel=best_name, applied=True, reason=f"{best_speed:.2f}x faster than dense")
        else:
            masks[n] = keep
            if "reason" not in row:
                row.update(kernel="dense", applied=False,
                           reason=f"sparse kernels lose to dense here (best {best_speed:.2f}x < {cfg.min_speedup}); zeros kept dense")
        report.add_row(**row)
    nonzero_before = _nonzero(work)
    _commit(work, swaps, masks)
    applied = report.where(applied=True)
    nonzero_after = _nonzero(work)
    report.summary.update({
        "layers": len(names), "sparse kernels used": len(applied),
        "params: x fewer": nonzero_before / nonzero_after if nonzero_after else None,
        "FLOPs: x fewer": flops["before"] / flops["after"] if flops["after"] else None,
        "config": cfg.to_dict()})
    report.note("params counts nonzero weights (zeros kept dense still take memory); FLOPs are those of the "
                "Linear layers considered, a sparse kernel counted at its nonzeros")
    return work, report


def _nonzero(model: nn.Module) -> int:
    """Nonzero weights: parameters, and sparse weight buffers by their stored values."""
    n = 0
    for t in model.parameters():
        try:
            n += int(t.count_nonzero())
        except Exception:  # a tensor subclass (2:4 weights) without count_nonzero: its stored size
            n += t.numel()
    for t in model.buffers():
        if t.layout in (torch.sparse_csr, torch.sparse_bsr):
            n += int(t.values().count_nonzero())
    return n


def _commit(model: nn.Module, swaps: dict[str, nn.Module], masks: dict[str, torch.Tensor]) -> None:
    """Swap in the winning kernels (all or none), then zero the masked weights of the layers kept dense."""
    swap_modules(model, swaps)
    with torch.no_grad():
        for n, keep in masks.items():
            w = model.get_submodule(n).weight
            w.mul_(keep.to(w.dtype))
