"""Which activation x weight precision the static int8 kernels (x86 / fbgemm convs and linears) compute exactly.

Pre-VNNI AVX2 kernels multiply unsigned 8-bit activations by signed 8-bit weights with ``vpmaddubsw``, which
sums each pair of products in int16 with saturation: 2 x 255 x 127 overflows, so torch.ao's x86 default keeps
activations to 7 bits. Per-tensor activations are the coarser of the two (weights get a scale per output
channel), so where 8-bit activations x 7-bit weights fit (2 x 255 x 64 = 32640 < 32767) that pair is the more
precise one. A probe with every activation at 255 and every weight at the top of its range checks this on
the CPU at hand rather than assuming it; VNNI (int32 accumulation) passes 8 x 8.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch
from torch import nn

from .warnings import quiet

__all__ = ["Precision", "static_precision"]


class Precision(NamedTuple):
    activation_bits: int
    weight_bits: int

    @property
    def reduce_range(self) -> bool:
        """fbgemm's name for 7-bit activations."""
        return self.activation_bits < 8

    def describe(self) -> str:
        return f"{self.activation_bits}-bit activations, {self.weight_bits}-bit weights"


def _probe_layers() -> list[tuple[nn.Module, tuple[int, ...]]]:
    return [(nn.Conv2d(64, 4, 3, bias=False), (2, 64, 6, 6)),             # im2col / direct conv
            (nn.Conv2d(32, 32, 3, groups=32, bias=False), (2, 32, 6, 6)),  # depthwise kernels
            (nn.Conv2d(128, 8, 1, bias=False), (2, 128, 4, 4)),            # 1x1 fast path
            (nn.Linear(256, 4, bias=False), (3, 256))]


def _exact(weight_bits: int) -> bool:
    """Every probe layer, int8 static with 8-bit activations at 255 and weights at their top, equals float."""
    from torch.ao.quantization import QConfig, QConfigMapping
    from torch.ao.quantization.observer import MinMaxObserver, PerChannelMinMaxObserver
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    if torch.backends.quantized.engine not in ("x86", "fbgemm"):
        return False
    top = 2 ** (weight_bits - 1)
    qconfig = QConfig(activation=MinMaxObserver.with_args(dtype=torch.quint8, reduce_range=False),
                      weight=PerChannelMinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_channel_symmetric,
                                                                quant_min=-top, quant_max=top - 1))
    try:
        with quiet("torch.ao"), torch.no_grad():
            for layer, shape in _probe_layers():
                layer.weight.fill_(1.0)
                model = nn.Sequential(layer).eval()
                x = torch.ones(shape)  # range [0, 1] -> every activation quantizes to 255
                prepared = prepare_fx(model, QConfigMapping().set_global(qconfig), (x,))
                prepared(x)
                prepared(torch.zeros_like(x))
                out = convert_fx(prepared)(x)
                if not torch.allclose(out, model(x), rtol=1e-2):
                    return False
        return True
    except Exception:  # noqa: BLE001 - a probe: any failure means "not proven exact"
        return False


@functools.lru_cache(maxsize=None)
def _exact_cached(weight_bits: int) -> bool:
    return _exact(weight_bits)


def static_precision(full_range: bool | None = None) -> Precision:
    """The precision Int8Static uses for ``full_range``: None picks the most precise pair the probe proves
    exact here (8 x 8 with VNNI, 8-bit activations x 7-bit weights on older AVX2, else 7 x 8); True asks for
    8-bit activations (weights drop to 7 bits where 8 x 8 would saturate); False keeps 7 x 8."""
    if full_range is False:
        return Precision(7, 8)
    if _exact_cached(8):
        return Precision(8, 8)
    if full_range is True or _exact_cached(7):
        return Precision(8, 7)
    return Precision(7, 8)
