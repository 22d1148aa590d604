"""A trained depthwise-separable CNN (MobileNetV2/EfficientNet-style) on the bundled digits, no download.

The shapes that make int8 hard on real mobile nets: a strided stem, inverted residual blocks (1x1 expand,
3x3/5x5 depthwise, 1x1 project, residual adds), BatchNorm after every conv, global pooling, a linear head.
``same_padding=True`` builds the very same network with every conv a TensorFlow-style "same"-padding
``nn.Conv2d`` subclass (padding computed from the input size at run time, as EfficientNet ports write it),
loaded with the same weights. At odd input sizes (the default 33x33: 33, 17, 9, 5 at each stride) TF "same"
padding is symmetric, so both variants compute the same outputs; at even sizes (32x32, as ImageNet nets at 224)
the "same" pads of the stride-2 convs are asymmetric, as in EfficientNet ports.
"""
from __future__ import annotations

import copy
import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from .digits import Digits, load_digits, train

__all__ = ["SameConv2d", "DigitsMobileNet", "trained_mobilenet", "paddings_agree", "ACTIVATIONS"]

ACTIVATIONS = {"relu": nn.ReLU, "relu6": nn.ReLU6, "hardswish": nn.Hardswish, "silu": nn.SiLU}

# (expansion, out channels as a multiple of width/16, stride, kernel)
_BLOCKS = [(1, 16, 1, 3), (4, 24, 2, 3), (4, 24, 1, 3), (4, 40, 2, 5), (4, 40, 1, 5), (4, 64, 2, 3), (4, 64, 1, 3)]


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding, computed from the input size in every call."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 dilation: int = 1, groups: int = 1, bias: bool = True):
        super().__init__(in_channels, out_channels, kernel_size, stride, 0, dilation, groups, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.shape[-2:]
        kh, kw = self.kernel_size
        sh, sw = self.stride
        dh, dw = self.dilation
        ph = max((math.ceil(ih / sh) - 1) * sh + (kh - 1) * dh + 1 - ih, 0)
        pw = max((math.ceil(iw / sw) - 1) * sw + (kw - 1) * dw + 1 - iw, 0)
        if ph > 0 or pw > 0:
            x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, act: str | None = "relu",
             same: bool = False) -> nn.Sequential:
    conv = (SameConv2d(cin, cout, k, stride, groups=groups, bias=False) if same else
            nn.Conv2d(cin, cout, k, stride, padding=(k - 1) // 2, groups=groups, bias=False))
    layers = [conv, nn.BatchNorm2d(cout)]
    if act is not None:
        layers.append(ACTIVATIONS[act]())
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    """1x1 expand -> kxk depthwise -> 1x1 project (no activation), with a residual add when shapes allow."""

    def __init__(self, cin: int, cout: int, expansion: int, stride: int, kernel: int, act: str, same: bool):
        super().__init__()
        hidden = cin * expansion
        self.expand = _conv_bn(cin, hidden, 1, act=act, same=same) if expansion != 1 else nn.Identity()
        self.depthwise = _conv_bn(hidden, hidden, kernel, stride, groups=hidden, act=act, same=same)
        self.project = _conv_bn(hidden, cout, 1, act=None, same=same)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.depthwise(self.expand(x)))
        return x + out if self.residual else out


class DigitsMobileNet(nn.Module):
    """Stem (3x3, stride 2), seven inverted residual blocks (3x3 and 5x5 depthwise, three more stride-2
    stages), a 1x1 head conv, global average pooling and a linear classifier."""

    def __init__(self, width: int = 16, act: str = "relu", same_padding: bool = False, classes: int = 10):
        super().__init__()
        if act not in ACTIVATIONS:
            raise ValueError(f"act must be one of {sorted(ACTIVATIONS)}, got {act!r}")
        ch = lambda c: max(8, c * width // 16)  # noqa: E731
        self.stem = _conv_bn(1, ch(16), 3, 2, act=act, same=same_padding)
        blocks, cin = [], ch(16)
        for t, c, s, k in _BLOCKS:
            blocks.append(InvertedResidual(cin, ch(c), t, s, k, act, same_padding))
            cin = ch(c)
        self.blocks = nn.Sequential(*blocks)
        self.head = _conv_bn(cin, ch(128), 1, act=act, same=same_padding)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Dropout(0.1), nn.Linear(ch(128), classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.head(self.blocks(self.stem(x)))))


def paddings_agree(size: int) -> bool:
    """Whether TF "same" and PyTorch padding give the same network at this input size: every stride-2 conv
    then sees an odd size, where "same" pads symmetrically."""
    for stride in [2] + [s for _, _, s, _ in _BLOCKS]:
        if stride == 2:
            if size % 2 == 0:
                return False
            size = (size + 1) // 2
    return True


@functools.lru_cache(maxsize=8)
def _trained_state(size: int, width: int, epochs: int, seed: int, act: str, same: bool) -> tuple[dict, Digits]:
    data = load_digits(size=size, seed=seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same weights on every machine; small convs gain little from a second thread
    try:
        torch.manual_seed(seed)
        model = train(DigitsMobileNet(width=width, act=act, same_padding=same), data, epochs=epochs, lr=5e-3,
                      seed=seed)
    finally:
        torch.set_num_threads(threads)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, data


def trained_mobilenet(size: int = 33, width: int = 16, epochs: int = 8, seed: int = 0, act: str = "relu",
                      same_padding: bool = False) -> tuple[DigitsMobileNet, Digits]:
    """(the trained DigitsMobileNet in eval mode, its digits data). Trained once per process for each
    setting, deterministic for a seed (~20 s on one core). Where the two paddings agree (odd sizes, see
    ``paddings_agree``) ``same_padding`` only changes the conv class: same weights, same outputs. Elsewhere
    the "same"-padding network is a different function and is trained on its own."""
    same = same_padding and not paddings_agree(size)
    state, data = _trained_state(size, width, epochs, seed, act, same)
    model = DigitsMobileNet(width=width, act=act, same_padding=same_padding)
    model.load_state_dict(copy.deepcopy(state))
    return model.eval(), data
