"""int8 arithmetic simulated in float: what the x86/fbgemm kernels will compute, to choose settings before
quantizing (a SmoothQuant strength, a bias correction) without building the int8 model each time.

Weights: the same observer the int8 transforms use (symmetric qint8, per output channel by default, 8 or 7 bits).
Activations: per-tensor affine quint8 over [min(x, 0), max(x, 0)], 8 or 7 bits (fbgemm's ``reduce_range``).
"""
from __future__ import annotations

import torch

from .observers import weight_observer

__all__ = ["fake_quant_weight", "activation_qparams", "fake_quant_activation"]


def fake_quant_weight(w: torch.Tensor, per_channel: bool = True, bits: int = 8) -> torch.Tensor:
    """``dequantize(quantize(w))`` as int8 Conv/Linear layers store ``w`` (float32 result); ``bits=7``: the
    +-64 weights paired with 8-bit activations on pre-VNNI CPUs."""
    w = w.detach().float()
    obs = weight_observer(per_channel, bits)()
    obs(w)
    scale, zp = obs.calculate_qparams()
    if per_channel:
        return torch.fake_quantize_per_channel_affine(w, scale.float(), zp.int(), obs.ch_axis,
                                                      obs.quant_min, obs.quant_max)
    return torch.fake_quantize_per_tensor_affine(w, float(scale), int(zp), obs.quant_min, obs.quant_max)


def activation_qparams(lo: float, hi: float, reduce_range: bool) -> tuple[float, int, int]:
    """(scale, zero point, quant max) of a per-tensor quint8 range covering [lo, hi] and 0."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    qmax = 127 if reduce_range else 255
    scale = (hi - lo) / qmax if hi > lo else 1.0
    scale = max(scale, torch.finfo(torch.float32).eps)
    zp = int(min(max(round(-lo / scale), 0), qmax))
    return scale, zp, qmax


def fake_quant_activation(x: torch.Tensor, lo: float, hi: float, reduce_range: bool) -> torch.Tensor:
    scale, zp, qmax = activation_qparams(lo, hi, reduce_range)
    return torch.fake_quantize_per_tensor_affine(x.float(), scale, zp, 0, qmax)
