"""Activation observers for static int8: min-max, histogram (error-minimising search), percentile clipping."""
from __future__ import annotations

import functools

import torch

__all__ = ["activation_observer", "weight_observer"]


@functools.lru_cache(maxsize=None)
def _percentile_cls():
    from torch.ao.quantization.observer import HistogramObserver

    class PercentileObserver(HistogramObserver):
        """Histogram of activations, range clipped at the ``percentile``-th value (and 100 - percentile below).

        Ignores the rare outliers that stretch a min-max range and waste int8 levels on values that
        almost never occur.
        """
        def __init__(self, percentile: float = 99.99, **kwargs):
            super().__init__(**kwargs)
            self.percentile = percentile

        @torch.jit.export
        def calculate_qparams(self):
            if self.min_val == float("inf") and self.max_val == float("-inf"):
                return super().calculate_qparams()
            hist = self.histogram.double()
            total = hist.sum()
            if total <= 0:
                return super().calculate_qparams()
            cdf = hist.cumsum(0) / total
            p = self.percentile / 100.0
            edges = torch.linspace(float(self.min_val), float(self.max_val), self.bins + 1, dtype=torch.float64)
            lo_i = int(torch.searchsorted(cdf, torch.tensor([1.0 - p], dtype=torch.float64)).item())
            hi_i = int(torch.searchsorted(cdf, torch.tensor([p], dtype=torch.float64)).item())
            lo = edges[min(lo_i, self.bins)].float().clamp(max=0.0) if self.min_val < 0 else self.min_val
            hi = edges[min(hi_i + 1, self.bins)].float().clamp(min=0.0)
            return self._calculate_qparams(torch.as_tensor(lo).reshape(()), torch.as_tensor(hi).reshape(()))

    PercentileObserver.__module__ = __name__
    return PercentileObserver


def activation_observer(kind: str, reduce_range: bool, percentile: float = 99.99):
    """An observer constructor (``with_args``) for torch.ao FX static quantization."""
    from torch.ao.quantization.observer import HistogramObserver, MinMaxObserver

    common = dict(dtype=torch.quint8, qscheme=torch.per_tensor_affine, reduce_range=reduce_range)
    if kind == "minmax":
        return MinMaxObserver.with_args(**common)
    if kind == "histogram":
        return HistogramObserver.with_args(**common)
    if kind == "percentile":
        return _percentile_cls().with_args(percentile=percentile, **common)
    raise ValueError(f"unknown observer {kind!r}")


def weight_observer(per_channel: bool, bits: int = 8):
    """torch.ao's default symmetric int8 weight observer; ``bits=7`` keeps weights within +-64 (see
    ``static_precision``)."""
    from torch.ao.quantization.observer import default_per_channel_weight_observer, default_weight_observer
    observer = default_per_channel_weight_observer if per_channel else default_weight_observer
    if bits == 8:
        return observer
    if bits != 7:
        raise ValueError(f"int8 weights are 8 or 7 bits, got {bits!r}")
    return observer.with_args(quant_min=-64, quant_max=63)
