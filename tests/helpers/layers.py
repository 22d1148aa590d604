"""Layers as model libraries write them, for the tests of every transform that must handle them."""
from __future__ import annotations

import math

import torch.nn.functional as F
from torch import nn


class SamePadConv(nn.Conv2d):
    """TensorFlow-style "same" padding computed at run time (as EfficientNet ports write it), with an
    ``__init__`` signature of its own. Its forward branches on the input's shape, so torch.fx cannot trace it."""

    def __init__(self, cin, cout, k, *, stride=1, bias=False, tag="same"):
        super().__init__(cin, cout, k, stride=stride, padding=0, bias=bias)
        self.tag = tag

    def forward(self, x):
        ih, iw = x.shape[-2:]
        kh, kw = self.kernel_size
        sh, sw = self.stride
        ph = max((math.ceil(ih / sh) - 1) * sh + kh - ih, 0)
        pw = max((math.ceil(iw / sw) - 1) * sw + kw - iw, 0)
        if ph > 0 or pw > 0:
            x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)
