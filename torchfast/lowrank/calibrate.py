"""Input-activation statistics by forward hooks: real input shapes and input covariances per layer.

The covariance (second moment ``E[x x^T]``, not centered: the bias is kept, so the output error of a
factorization is ``tr(dW E[xx^T] dW^T)``) lives in the space the layer's weight matrix acts on: the
features of a Linear, the im2col columns (``C_in*kh*kw``) of a Conv2d. Positions are subsampled
(``max_positions`` per batch) to bound memory and time. For dict batches with an ``attention_mask``
[B, T], Linear inputs shaped [B, T, D] keep only the real (unpadded) tokens.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..modules import ExampleInputError, call_model, describe_batch, evaluating, model_device, move_batch


@dataclass
class LayerStats:
    in_shape: tuple[int, ...] | None = None
    out_shape: tuple[int, ...] | None = None
    cov: torch.Tensor | None = None   # sum of x x^T (float64)
    count: int = 0                    # number of positions summed
    cov_skipped: str | None = None    # why no covariance was collected

    @property
    def covariance(self) -> torch.Tensor | None:
        return None if self.cov is None or self.count == 0 else self.cov / self.count


def conv_padding(conv: nn.Conv2d) -> tuple[int, int, int, int]:
    """Explicit (left, right, top, bottom) padding of a conv, 'same'/'valid' resolved."""
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return (0, 0, 0, 0)
        out = []
        for d, k in zip(reversed(conv.dilation), reversed(conv.kernel_size)):  # W first, then H
            total = d * (k - 1)
            out += [total // 2, total - total // 2]
        return tuple(out)
    ph, pw = conv.padding
    return (pw, pw, ph, ph)


def conv_columns(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """im2col of the conv's input: [N*L, C*kh*kw], channel-major like ``weight.reshape(O, -1)``."""
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    pad = conv_padding(conv)
    if any(pad):
        x = F.pad(x, pad, mode=mode)
    cols = F.unfold(x, conv.kernel_size, dilation=conv.dilation, stride=conv.stride)  # [N, D, L]
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def feature_dim(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.in_features
    kh, kw = module.kernel_size
    return module.in_channels // module.groups * kh * kw


def collect(model: nn.Module, layers: dict[str, nn.Module], shape_batch: Any, calibration: list,
            max_positions: int = 4096, max_cov_dim: int = 8192, seed: int = 0) -> dict[str, LayerStats]:
    """Run ``shape_batch`` (for shapes) and the calibration batches (for covariances) through the model.

    The model runs in eval mode under ``no_grad`` (BatchNorm statistics are not touched) and its
    train/eval flags are restored afterwards.
    """
    stats = {name: LayerStats() for name in layers}
    want_cov = {name for name, m in layers.items() if feature_dim(m) <= max_cov_dim}
    for name in layers:
        if name not in want_cov:
            stats[name].cov_skipped = f"input dim {feature_dim(layers[name])} > max_cov_dim {max_cov_dim}"
    gen = torch.Generator().manual_seed(seed)
    phase: dict[str, Any] = {"shapes": False, "cov": False, "mask": None}

    def hook(name: str, module: nn.Module):
        def fn(mod, args, out):
            x = args[0]
            st = stats[name]
            if phase["shapes"] and st.in_shape is None:
                st.in_shape, st.out_shape = tuple(x.shape), tuple(out.shape)
            if phase["cov"] and name in want_cov:
                with torch.no_grad():
                    if isinstance(mod, nn.Conv2d):
                        per_img = out.shape[-2] * out.shape[-1]
                        keep = max(1, -(-max_positions // max(per_img, 1)))  # images needed for the sample
                        if x.dim() == 4 and x.shape[0] > keep:
                            x = x[torch.randperm(x.shape[0], generator=gen)[:keep].to(x.device)]
                        cols = conv_columns(mod, x)
                    else:
                        mask = phase.get("mask")
                        if mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
                            x = x[mask.to(x.device).bool()]  # padding tokens carry nothing the outputs use
                        cols = x.reshape(-1, x.shape[-1])
                    if cols.shape[0] > max_positions:
                        idx = torch.randperm(cols.shape[0], generator=gen)[:max_positions].to(cols.device)
                        cols = cols[idx]
                    cols = cols.float()
                    xtx = (cols.T @ cols).double()
                    st.cov = xtx if st.cov is None else st.cov + xtx
                    st.count += cols.shape[0]
        return fn

    handles = [m.register_forward_hook(hook(n, m)) for n, m in layers.items()]
    device = model_device(model)
    try:
        with torch.no_grad(), evaluating(model):
            if shape_batch is not None:
                phase["shapes"] = True
                _run(model, shape_batch, device, "example_inputs")
                phase["shapes"] = False
            for i, b in enumerate(calibration):
                phase["cov"] = True
                phase["mask"] = b.get("attention_mask") if isinstance(b, dict) else None
                phase["shapes"] = shape_batch is None and i == 0
                _run(model, b, device, f"calibration batch {i}")
                phase["shapes"] = False
    finally:
        phase["cov"] = phase["shapes"] = False
        for h in handles:
            h.remove()
    return stats


def _run(model: nn.Module, batch: Any, device: torch.device, what: str) -> None:
    try:
        call_model(model, move_batch(batch, device))
    except Exception as e:
        raise ExampleInputError(f"{type(model).__name__} fails on {what} ({describe_batch(batch)}): "
                                f"{type(e).__name__}: {e}") from e
