"""Factorized layers: ``nn.Sequential`` subclasses of plain ``nn.Linear`` / ``nn.Conv2d``.

Plain children keep every downstream tool working unchanged: TorchScript, ``torch.export``, FX
quantization (conv/linear patterns, fusion), pruning dependency graphs. No nonlinearity sits between
the factors; the original bias goes on the last factor. Padding is split so each factor pads only
the dimension it convolves over, which is exact for every ``padding_mode`` (padding commutes with a
convolution along the other axis and with a bias-free 1x1).
"""
from __future__ import annotations

import torch
from torch import nn


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


class LowRankLinear(nn.Sequential):
    """``Linear(in, rank, bias=False)`` then ``Linear(rank, out)``.

    ``weight`` / ``bias`` read like the Linear it replaces (the dense product of the factors, recomputed on
    each read), so model code that looks at ``layer.weight.dtype`` or ``.shape`` keeps working; writing to
    them does not change the factors.
    """
    __jit_unused_properties__ = ["weight", "bias"]

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 device=None, dtype=None) -> None:
        kw = {"device": device, "dtype": dtype}
        super().__init__(nn.Linear(in_features, rank, bias=False, **kw), nn.Linear(rank, out_features, bias=bias, **kw))
        self.in_features, self.out_features, self.rank = in_features, out_features, rank

    @property
    def weight(self) -> torch.Tensor:
        with torch.no_grad():
            return self[1].weight @ self[0].weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self[1].bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


class LowRankConv2d(nn.Sequential):
    """A Conv2d rewritten as a chain of plain convs; ``method`` is ``channel``, ``spatial`` or ``tucker``.

    It keeps the original's geometry attributes (``kernel_size``, ``stride``, ``padding``, ...), and
    ``weight`` / ``bias`` read as the dense kernel the chain computes (recomputed on each read; writing to
    them does not change the factors), so code that inspects the layer keeps working.
    """
    __jit_unused_properties__ = ["weight", "bias"]

    def __init__(self, conv: nn.Conv2d, method: str, ranks: tuple[int, ...]) -> None:
        C, O = conv.in_channels, conv.out_channels
        kh, kw = conv.kernel_size
        sh, sw = conv.stride
        dh, dw = conv.dilation
        pad, mode = conv.padding, conv.padding_mode
        bias = conv.bias is not None
        kwargs = {"device": conv.weight.device, "dtype": conv.weight.dtype}
        if method == "channel":
            (r,) = ranks
            layers = [nn.Conv2d(C, r, (kh, kw), (sh, sw), pad, (dh, dw), bias=False, padding_mode=mode, **kwargs),
                      nn.Conv2d(r, O, 1, bias=bias, **kwargs)]
        elif method == "spatial":
            (r,) = ranks
            if isinstance(pad, str):  # 'same' / 'valid' act per dimension, so each factor keeps it
                p1 = p2 = pad
            else:
                p1, p2 = (pad[0], 0), (0, pad[1])
            layers = [nn.Conv2d(C, r, (kh, 1), (sh, 1), p1, (dh, 1), bias=False, padding_mode=mode, **kwargs),
                      nn.Conv2d(r, O, (1, kw), (1, sw), p2, (1, dw), bias=bias, padding_mode=mode, **kwargs)]
        elif method == "tucker":
            r_in, r_out = ranks
            layers = [nn.Conv2d(C, r_in, 1, bias=False, **kwargs),
                      nn.Conv2d(r_in, r_out, (kh, kw), (sh, sw), pad, (dh, dw), bias=False, padding_mode=mode, **kwargs),
                      nn.Conv2d(r_out, O, 1, bias=bias, **kwargs)]
        else:
            raise ValueError(f"unknown conv factorization {method!r}")
        super().__init__(*layers)
        self.in_channels, self.out_channels = C, O
        self.kernel_size, self.stride, self.padding = conv.kernel_size, conv.stride, conv.padding
        self.dilation, self.groups, self.padding_mode = conv.dilation, conv.groups, conv.padding_mode
        self.method, self.ranks = method, tuple(int(r) for r in ranks)

    @property
    def weight(self) -> torch.Tensor:
        w = [c.weight for c in self.children()]
        with torch.no_grad():
            if self.method == "channel":      # [O, r, 1, 1] o [r, C, kh, kw]
                return torch.einsum("or,rcij->ocij", w[1][:, :, 0, 0], w[0])
            if self.method == "spatial":      # [O, r, 1, kw] o [r, C, kh, 1]
                return torch.einsum("orj,rci->ocij", w[1][:, :, 0, :], w[0][:, :, :, 0])
            return torch.einsum("os,srij,rc->ocij", w[2][:, :, 0, 0], w[1], w[0][:, :, 0, 0])   # tucker

    @property
    def bias(self) -> torch.Tensor | None:
        return list(self.children())[-1].bias

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, method={self.method}, ranks={self.ranks}"


@torch.no_grad()
def set_weights(module: nn.Module, weights: list[torch.Tensor], bias: torch.Tensor | None) -> nn.Module:
    """Copy factor weights (any float dtype) into the children, cast to each child's dtype; bias on the last."""
    children = list(module.children())
    if len(children) != len(weights):
        raise ValueError(f"{type(module).__name__} has {len(children)} factors, got {len(weights)} weights")
    for child, w in zip(children, weights):
        child.weight.copy_(w.reshape(child.weight.shape).to(child.weight.dtype))
    if bias is not None:
        children[-1].bias.copy_(bias)
    return module
