"""Factorized layers read like the layers they replace: ``weight`` is the dense kernel the factors compute
(so a full-rank factorization reproduces the original weight), ``bias`` and the geometry attributes are
the original's, and model code that reads them keeps working after ``decompose``."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchfast as tf
from torchfast.lowrank.layers import LowRankConv2d, LowRankLinear


@pytest.mark.parametrize("method", ["channel", "spatial", "tucker"])
def test_conv_weight_is_the_kernel_the_chain_computes(method):
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 10, (3, 5), stride=(2, 1), padding=(1, 2))
    ranks = (4, 5) if method == "tucker" else (4,)
    lr = LowRankConv2d(conv, method, ranks)
    x = torch.randn(2, 6, 11, 13)
    with torch.no_grad():
        want = lr(x)
        got = F.conv2d(x, lr.weight, lr.bias, lr.stride, lr.padding, lr.dilation, lr.groups)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert lr.weight.shape == conv.weight.shape and lr.kernel_size == (3, 5) and lr.stride == (2, 1)


def test_linear_weight_and_bias_read_like_a_linear():
    lr = LowRankLinear(8, 6, 3)
    x = torch.randn(4, 8)
    with torch.no_grad():
        torch.testing.assert_close(F.linear(x, lr.weight, lr.bias), lr(x), atol=1e-6, rtol=1e-5)
    assert lr.weight.shape == (6, 8) and lr.bias is lr[1].bias


class ReadsItsLayers(nn.Module):
    """Model code that inspects a layer's weight at run time, as some model libraries do."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.fc = nn.Linear(16, 8)

    def forward(self, x):
        x = x.to(self.conv.weight.dtype)
        h = self.conv(x).mean((2, 3))
        assert h.shape[-1] == self.fc.weight.shape[1]
        return self.fc(h.to(self.fc.weight.device))


def test_model_code_reading_weight_attributes_runs_after_decompose():
    model = ReadsItsLayers().eval()
    x = torch.randn(2, 3, 8, 8)
    m, rep = tf.decompose(model, tf.LowRank(rank={"conv": 16, "fc": 8}, method="channel", min_flops_reduction=0.0), example_inputs=x)
    assert isinstance(m.conv, LowRankConv2d) and isinstance(m.fc, LowRankLinear)
    with torch.no_grad():
        torch.testing.assert_close(m(x), model(x), atol=1e-4, rtol=1e-4)   # full rank: exact
        torch.testing.assert_close(m.conv.weight, model.conv.weight, atol=1e-5, rtol=1e-4)
