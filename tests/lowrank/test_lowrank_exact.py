"""At full rank every factorization reproduces the original layer (float tolerance), over a grid of
stride / padding (and how it splits) / dilation / bias / kernel shape / padding_mode."""
from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

import torchfast as tf
from torchfast.lowrank import LowRankConv2d, LowRankLinear

KERNELS = [(3, 3), (3, 5), (2, 3), (1, 3), (1, 1)]
GEOMS = [  # (stride, padding, dilation)
    (1, 0, 1), (2, 1, 1), ((2, 1), (2, 1), 1), (1, (1, 2), (2, 1)), (1, "same", 1), (1, "same", (2, 3)),
    (3, "valid", 1),
]
MODES = ["zeros", "reflect", "circular", "replicate"]


def _grid():
    """Every kernel x geometry; padding_mode and bias rotate through the cases so each value is covered
    with every kernel shape without the full product."""
    cases = []
    for i, (k, (s, p, d)) in enumerate(itertools.product(KERNELS, GEOMS)):
        mode = MODES[i % len(MODES)]
        if mode != "zeros" and isinstance(p, str) and p == "same" and d != 1:
            mode = "zeros"
        cases.append((k, s, p, d, mode, i % 3 != 0))
    return cases


CASES = _grid()
pytestmark = pytest.mark.filterwarnings("ignore:Using padding=.same.")


def _conv(k, s, p, d, mode, bias, cin=4, cout=6):
    torch.manual_seed(0)
    return nn.Conv2d(cin, cout, k, stride=s, padding=p, dilation=d, bias=bias, padding_mode=mode)


@pytest.mark.parametrize("method", ["channel", "spatial", "tucker"])
def test_full_rank_conv_is_exact(method):
    x = torch.randn(2, 4, 11, 13)
    checked = 0
    for k, s, p, d, mode, bias in CASES:
        conv = _conv(k, s, p, d, mode, bias)
        ref = conv(x)
        m, rep = tf.decompose(nn.Sequential(conv), tf.LowRank(method=method, ratio=1.0, min_flops_reduction=0),
                              inplace=False)
        new = m[0]
        assert isinstance(new, LowRankConv2d), (k, s, p, d, mode, bias, rep.rows)
        out = new(x)
        assert out.shape == ref.shape
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4, msg=lambda e: f"{method} {k} s={s} p={p} d={d} {mode} bias={bias}: {e}")
        assert all(type(c) is nn.Conv2d for c in new.children())
        assert (new[-1].bias is not None) == bias and all(c.bias is None for c in list(new.children())[:-1])
        checked += 1
    assert checked >= 20


@pytest.mark.parametrize("method", ["channel", "spatial", "tucker"])
def test_full_rank_data_aware_is_exact(method):
    x = torch.randn(8, 4, 10, 10)
    for k, s, p, d, mode, bias in [((3, 3), 1, 1, 1, "zeros", True), ((3, 5), 2, (1, 2), 1, "reflect", False),
                                   ((3, 3), 1, "same", (2, 1), "zeros", True)]:
        conv = _conv(k, s, p, d, mode, bias)
        ref = conv(x)
        m, rep = tf.decompose(nn.Sequential(conv), tf.LowRank(method=method, ratio=1.0, min_flops_reduction=0),
                              calibration=[x[:4], x[4:]], inplace=False)
        assert rep.summary["data_aware"] is True
        torch.testing.assert_close(m(x), ref, atol=1e-4, rtol=1e-3)
        assert rep.rows[0]["output_err"] < 1e-5


@pytest.mark.parametrize("data", [False, True])
def test_full_rank_linear_is_exact(data):
    torch.manual_seed(0)
    lin = nn.Linear(12, 7)
    x = torch.randn(3, 5, 12)
    cal = [x] if data else None
    m, rep = tf.decompose(nn.Sequential(lin), tf.LowRank(ratio=1.0, min_flops_reduction=0), calibration=cal, inplace=False)
    assert isinstance(m[0], LowRankLinear) and m[0].rank == 7
    torch.testing.assert_close(m(x), lin(x), atol=1e-5, rtol=1e-4)


def test_truncation_error_matches_report():
    torch.manual_seed(0)
    lin = nn.Linear(32, 32, bias=False)
    m, rep = tf.decompose(nn.Sequential(lin), tf.LowRank(rank=8), inplace=False)
    W, W_hat = lin.weight, m[0][1].weight @ m[0][0].weight
    s = torch.linalg.svdvals(W.double())
    expected = (s[8:].pow(2).sum() / s.pow(2).sum()).sqrt().item()  # Eckart-Young
    assert abs(rep.rows[0]["weight_err"] - expected) < 1e-6
    assert abs(((W - W_hat).norm() / W.norm()).item() - expected) < 1e-5
