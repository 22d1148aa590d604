"""Rank selection: layer geometry, the FLOPs/params cost of each factorization, and the rank rules
(fixed rank, rank ratio, singular-value energy, target FLOPs reduction, FLOPs budget).

FLOPs count a multiply-add as 2 (like ``FlopCounterMode``) over the layer's real input shape when it
was captured; otherwise over a nominal 8x8 output (ratios are still right; absolute numbers are not
reported then).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .decompose import energy_rank


@dataclass
class Geometry:
    kind: str                    # "linear" | "conv"
    out: int
    cin: int
    kh: int = 1
    kw: int = 1
    sh: int = 1
    sw: int = 1
    bias: bool = False
    in_shape: tuple | None = None
    out_shape: tuple | None = None

    @classmethod
    def of(cls, m: nn.Module, in_shape=None, out_shape=None) -> "Geometry":
        if isinstance(m, nn.Linear):
            return cls("linear", m.out_features, m.in_features, bias=m.bias is not None,
                       in_shape=in_shape, out_shape=out_shape)
        kh, kw = m.kernel_size
        sh, sw = m.stride
        return cls("conv", m.out_channels, m.in_channels, kh, kw, sh, sw, m.bias is not None, in_shape, out_shape)

    @property
    def known(self) -> bool:
        return self.in_shape is not None and self.out_shape is not None

    @property
    def D(self) -> int:
        return self.cin * self.kh * self.kw

    def describe(self) -> str:
        if self.kind == "linear":
            return f"Linear {self.cin}->{self.out}"
        s = f" s{self.sh}" if self.sh == self.sw else f" s{self.sh}x{self.sw}"
        return f"Conv2d {self.cin}->{self.out} {self.kh}x{self.kw}" + ("" if (self.sh, self.sw) == (1, 1) else s)

    # positions the factors run over
    def _tokens(self) -> int:
        return math.prod(self.in_shape[:-1]) if self.known else 1

    def _conv_sizes(self) -> tuple[int, int, int, int, int]:
        if self.known and len(self.in_shape) >= 3 and len(self.out_shape) >= 3:
            n = math.prod(self.in_shape[:-3]) if len(self.in_shape) > 3 else 1
            return n, self.in_shape[-2], self.in_shape[-1], self.out_shape[-2], self.out_shape[-1]
        return 1, 8 * self.sh, 8 * self.sw, 8, 8

    def methods(self) -> tuple[str, ...]:
        """Applicable factorizations (the first is the reference method for budgets)."""
        if self.kind == "linear":
            return ("svd",)
        if self.kh == 1 and self.kw == 1:
            return ("channel",)
        if self.kh > 1 and self.kw > 1:
            return ("channel", "spatial", "tucker")
        return ("channel", "tucker")

    def max_ranks(self, method: str) -> tuple[int, ...]:
        if method in ("svd", "channel"):
            return (min(self.out, self.D),)
        if method == "spatial":
            return (min(self.cin * self.kh, self.out * self.kw),)
        return (self.cin, self.out)

    def flops(self, method: str | None = None, ranks: tuple[int, ...] = ()) -> int:
        """2 x multiply-adds of the original layer (method None) or of a factorization."""
        if self.kind == "linear":
            t = self._tokens()
            return 2 * t * self.out * self.cin if method is None else 2 * t * ranks[0] * (self.cin + self.out)
        n, hi, wi, ho, wo = self._conv_sizes()
        po, kk = n * ho * wo, self.kh * self.kw
        if method is None:
            return 2 * po * self.out * self.D
        if method in ("channel", "svd"):
            return 2 * po * ranks[0] * (self.D + self.out)
        if method == "spatial":
            return 2 * (n * ho * wi * ranks[0] * self.cin * self.kh + po * self.out * ranks[0] * self.kw)
        r_in, r_out = ranks
        return 2 * (n * hi * wi * self.cin * r_in + po * (r_out * r_in * kk + self.out * r_out))

    def params(self, method: str | None = None, ranks: tuple[int, ...] = ()) -> int:
        b = self.out if self.bias else 0
        if method is None:
            return self.out * self.D + b
        if method in ("svd", "channel"):
            return ranks[0] * (self.D + self.out) + b
        if method == "spatial":
            return ranks[0] * (self.cin * self.kh + self.out * self.kw) + b
        r_in, r_out = ranks
        return self.cin * r_in + r_out * r_in * self.kh * self.kw + self.out * r_out + b


def clamp_tucker(g: Geometry, r_in: int, r_out: int) -> tuple[int, int]:
    """Tucker ranks the kernel can have: r_in <= min(C_in, C_out*kh*kw), r_out <= min(C_out, r_in*kh*kw)."""
    kk = g.kh * g.kw
    r_in = max(1, min(r_in, g.cin, g.out * kk))
    return r_in, max(1, min(r_out, g.out, r_in * kk))


def ranks_at_budget(g: Geometry, method: str, budget: float) -> tuple[int, ...]:
    """The largest ranks whose FLOPs fit in ``budget`` (at least 1). Tucker keeps r_in/r_out ~ C_in/C_out."""
    if method == "tucker":
        best = (1, 1)
        for r_out in range(1, g.out + 1):
            ranks = clamp_tucker(g, round(r_out * g.cin / g.out), r_out)
            if g.flops("tucker", ranks) <= budget:
                best = ranks
            else:
                break
        return best
    per_rank = g.flops(method, (1,))
    r = int(budget // per_rank) if per_rank else 1
    return (max(1, min(r, g.max_ranks(method)[0])),)


def resolve_ranks(g: Geometry, name: str, method: str, kind: str, value,
                  spectra: Callable[[str], tuple[torch.Tensor, ...]]) -> tuple[int, ...]:
    """Ranks of ``method`` for layer ``name`` under the rule (kind, value); raises on an impossible rank."""
    ranks = _resolve(g, name, method, kind, value, spectra)
    return clamp_tucker(g, *ranks) if method == "tucker" else ranks


def _resolve(g: Geometry, name: str, method: str, kind: str, value,
             spectra: Callable[[str], tuple[torch.Tensor, ...]]) -> tuple[int, ...]:
    mx = g.max_ranks(method)
    if kind == "rank":
        r = value[name] if isinstance(value, dict) else value
        limit = max(mx)
        if r > limit:
            raise ValueError(f"LowRank.rank={r} is larger than layer {name!r} ({g.describe()}) allows "
                             f"for method {method!r}: at most {limit}")
        return tuple(min(r, m) for m in mx)
    if kind == "ratio":
        return tuple(max(1, min(m, round(value * m))) for m in mx)
    if kind == "energy":
        return tuple(min(m, energy_rank(s, value)) for s, m in zip(spectra(method), mx))
    if kind == "flops_reduction":
        return ranks_at_budget(g, method, g.flops() / value)
    if kind == "flops":  # an absolute per-layer FLOPs budget (global allocation)
        return ranks_at_budget(g, method, value)
    raise ValueError(f"unknown rank rule {kind!r}")


def allocate(layers: list, kind: str, value: float, min_reduction: float) -> dict[str, float | None]:
    """Global rank allocation: per-layer FLOPs budgets (None = keep the layer) whose sum meets the
    model-wide budget the rule implies, choosing per layer the rank r minimizing
    ``tail_energy(r) + lam * flops(r) / total`` (or keeping it: error 0, full FLOPs), one ``lam`` for all.
    Energies are the reference method's (whitened, when data-aware) squared singular values."""
    opts = []
    total = sum(l.geom.flops() for l in layers)
    if kind == "ratio":
        budget = sum(min(l.geom.flops(), l.geom.flops(l.geom.methods()[0], tuple(
            max(1, round(value * m)) for m in l.geom.max_ranks(l.geom.methods()[0])))) for l in layers)
    else:
        budget = total / value
    for l in layers:
        ref = l.geom.methods()[0]
        e = l.spectra(ref)[0].double().pow(2)
        l.trim()
        tail = (1 - e.cumsum(0) / e.sum().clamp_min(1e-300)).clamp_min(0)  # tail[r-1] = error at rank r
        cost = torch.arange(1, e.numel() + 1, dtype=torch.float64) * l.geom.flops(ref, (1,))
        ok = cost * max(min_reduction, 1e-9) <= l.geom.flops()
        opts.append((l.name, tail[ok], cost[ok], float(l.geom.flops())))

    def pick(lam: float):
        out, spent = {}, 0.0
        for name, tail, cost, orig in opts:
            if tail.numel():
                obj = tail + lam * cost / total
                i = int(obj.argmin())
                if obj[i] < lam * orig / total:
                    out[name] = float(cost[i]); spent += float(cost[i])
                    continue
            out[name] = None; spent += orig
        return out, spent

    lo, hi = 1e-6, 1e6
    best = pick(hi)[0]
    for _ in range(60):
        mid = math.sqrt(lo * hi)
        choice, spent = pick(mid)
        if spent <= budget:
            best, hi = choice, mid
        else:
            lo = mid
    return best
