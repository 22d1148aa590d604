"""canonicalize: Conv/Linear subclasses that are "the base op plus padding and/or a weight function"
become plain layers computing exactly the same thing; anything else stays, with the reason."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchfast as tf
from torchfast.modules import state_snapshot
from torchfast.quant.canonical import CanonicalizeError, PaddedConv, SamePad2d, canonicalize

from helpers.layers import SamePadConv

timm_layers = pytest.importorskip("timm.layers")


def _rows(changes):
    return {c.layer: c for c in changes}


def _same_out(a, b, xs):
    with torch.no_grad():
        for x in xs:
            torch.testing.assert_close(a(x), b(x), rtol=1e-6, atol=1e-6)


class Stack(nn.Module):
    def __init__(self, *layers):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(layers)

    def forward(self, x):
        for layer in self.layers:
            x = torch.relu(layer(x))
        return x


def test_same_padding_stride1_folds_into_the_conv_and_the_result_traces():
    model = Stack(SamePadConv(3, 8, 3, tag="mine"), SamePadConv(8, 8, 5)).eval()
    xs = [torch.randn(2, 3, 12, 12), torch.randn(2, 3, 13, 11)]
    with pytest.raises(Exception):
        torch.fx.symbolic_trace(model)                       # the subclass branches on the input's shape
    out, changes = canonicalize(model, xs)
    rows = _rows(changes)
    assert type(out.layers[0]) is nn.Conv2d and out.layers[0].padding == (1, 1)
    assert type(out.layers[1]) is nn.Conv2d and out.layers[1].padding == (2, 2)
    assert rows["layers.0"].action == "replaced by Conv2d" and "folded" in rows["layers.0"].reason
    assert "observed" not in rows["layers.0"].reason          # stride 1: exact for every input size
    assert out.layers[0].tag == "mine"                        # the subclass's own settings stay readable
    _same_out(out, model, xs + [torch.randn(1, 3, 20, 17)])
    torch.fx.symbolic_trace(out)


def test_same_padding_stride2_on_even_inputs_becomes_a_size_dependent_pad():
    model = Stack(SamePadConv(3, 8, 3, stride=2), SamePadConv(8, 8, 5, stride=2, bias=True)).eval()
    xs = [torch.randn(2, 3, 16, 16), torch.randn(2, 3, 14, 13)]    # sizes of both parities reach both
    out, changes = canonicalize(model, xs)
    assert all(c.action == "replaced by PaddedConv(SamePad2d, Conv2d)" for c in changes)
    pc = out.layers[0]
    assert isinstance(pc, PaddedConv) and isinstance(pc.pad, SamePad2d) and type(pc.conv) is nn.Conv2d
    assert pc.conv.padding == (0, 0) and pc.weight is pc.conv.weight and pc.out_channels == 8
    _same_out(out, model, xs + [torch.randn(1, 3, 17, 14), torch.randn(1, 3, 9, 10)])   # any size
    gm = torch.fx.symbolic_trace(out)
    _same_out(gm, model, [torch.randn(1, 3, 18, 11)])


def test_same_padding_stride2_seen_on_one_size_becomes_constant_and_says_so():
    model = Stack(SamePadConv(3, 8, 3, stride=2)).eval()
    xs = [torch.randn(2, 3, 15, 15)]                           # odd: TF pads 1/1, as padding=1 does
    out, changes = canonicalize(model, xs)
    assert type(out.layers[0]) is nn.Conv2d and out.layers[0].padding == (1, 1)
    assert "exact for the observed input sizes (15x15)" in changes[0].reason
    _same_out(out, model, xs)
    even = [torch.randn(2, 3, 16, 16)]                         # even: TF pads 0/1, a constant pad module
    out, changes = canonicalize(model, even)
    assert changes[0].action == "replaced by PaddedConv(ZeroPad2d, Conv2d)"
    assert out.layers[0].pad.padding == (0, 1, 0, 1) and "(16x16)" in changes[0].reason
    _same_out(out, model, even)
    for xs in ([torch.randn(2, 3, 15, 15)], even):             # any_size: the size-dependent pad, exact on all
        general, changes = canonicalize(model, xs, any_size=True)
        assert isinstance(general.layers[0].pad, SamePad2d) and "observed" not in changes[0].reason
        _same_out(general, model, [torch.randn(1, 3, 16, 16), torch.randn(1, 3, 15, 14)])


class WSConv(nn.Conv2d):
    """Weight standardization with a learned gain and its own __init__ signature."""

    def __init__(self, cin, cout, k, eps=1e-5):
        super().__init__(cin, cout, k, padding=k // 2)
        self.gain = nn.Parameter(torch.rand(cout, 1, 1, 1) + 0.5)
        self.eps = eps

    def forward(self, x):
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.var((1, 2, 3), keepdim=True) + self.eps).sqrt()
        return F.conv2d(x, w * self.gain, self.bias, self.stride, self.padding, self.dilation, self.groups)


def test_weight_standardized_convs_get_their_effective_weight():
    model = Stack(WSConv(3, 8, 3), timm_layers.StdConv2d(8, 8, 3), timm_layers.ScaledStdConv2d(8, 8, 3)).eval()
    xs = [torch.randn(2, 3, 10, 10)]
    out, changes = canonicalize(model, xs)
    for i, c in enumerate(changes):
        assert c.action == "replaced by Conv2d" and "effective weight" in c.reason
        assert type(out.layers[i]) is nn.Conv2d
    assert not torch.equal(out.layers[0].weight, model.layers[0].weight)
    assert isinstance(out.layers[0].weight, nn.Parameter) and out.layers[0].weight.grad_fn is None
    _same_out(out, model, xs + [torch.randn(3, 3, 7, 9)])


def test_timm_conv2d_same_and_std_conv2d_same():
    layers = [timm_layers.Conv2dSame(3, 8, 3, stride=2), timm_layers.Conv2dSame(8, 8, 3, groups=8),
              timm_layers.StdConv2dSame(8, 8, 3, stride=2), timm_layers.StdConv2d(8, 8, 1)]
    model = Stack(*layers).eval()
    xs = [torch.randn(2, 3, 32, 32)]
    out, changes = canonicalize(model, xs)
    kinds = [c.action for c in changes]
    assert kinds == ["replaced by PaddedConv(ZeroPad2d, Conv2d)", "replaced by Conv2d",
                     "replaced by PaddedConv(ZeroPad2d, Conv2d)", "replaced by Conv2d"]
    assert out.layers[1].groups == 8 and out.layers[1].padding == (1, 1)
    _same_out(out, model, xs)
    general, changes = canonicalize(model, xs + [torch.randn(1, 3, 31, 30)])   # two sizes: pads differ
    assert [c.action for c in changes][::2] == ["replaced by PaddedConv(SamePad2d, Conv2d)"] * 2
    _same_out(general, model, xs + [torch.randn(1, 3, 29, 33)])


class AddsScalar(nn.Conv2d):
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.shift = nn.Parameter(torch.tensor(0.5))

    def forward(self, x):
        return super().forward(x + self.shift)


class BranchesOnValues(nn.Conv2d):
    def forward(self, x):
        return super().forward(x if x.mean() > 0 else -x)


class ScalesOutput(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 2.0


def test_a_forward_that_does_something_else_stays_with_the_reason():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.a = AddsScalar(3, 4, 3)
            self.b = BranchesOnValues(4, 4, 3)
            self.c = ScalesOutput(4, 2)

        def forward(self, x):
            return self.c(self.b(self.a(x)).mean((2, 3)))

    model = Net().eval()
    before = state_snapshot(model)
    out, changes = canonicalize(model, [torch.randn(2, 3, 9, 9)])
    rows = _rows(changes)
    assert all(c.action == "kept" for c in changes) and len(changes) == 3
    assert "add" in rows["a"].reason and "to the input" in rows["a"].reason
    assert "mean" in rows["b"].reason
    assert "mul" in rows["c"].reason and "output" in rows["c"].reason
    assert type(out.a) is AddsScalar and type(out.b) is BranchesOnValues and type(out.c) is ScalesOutput
    after = state_snapshot(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


class ReadsWeights(nn.Module):
    """Model code that reads its layers' weights outside their forward."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = SamePadConv(3, 8, 3, stride=2)
        self.ws = WSConv(8, 8, 3)

    def forward(self, x):
        x = self.stem(x.to(self.stem.weight.dtype))
        return self.ws(x) + self.ws.weight.sum()


def test_model_code_reading_layer_weight_still_works():
    model = ReadsWeights().eval()
    xs = [torch.randn(2, 3, 16, 16)]
    out, changes = canonicalize(model, xs)
    rows = _rows(changes)
    assert rows["stem"].action.startswith("replaced") and out.stem.weight is not None
    assert rows["ws"].action == "kept" and ".weight" in rows["ws"].reason   # its effective weight differs
    _same_out(out, model, xs)


def test_the_callers_model_is_untouched_and_train_flags_are_kept():
    model = Stack(SamePadConv(3, 8, 3, stride=2), timm_layers.StdConv2d(8, 8, 3), nn.Conv2d(8, 8, 1))
    model.train()
    model.layers[1].eval()                                     # a mixed mode the user set
    before = state_snapshot(model)
    types = [type(m) for m in model.modules()]
    flags = [m.training for m in model.modules()]
    out, changes = canonicalize(model, [torch.randn(2, 3, 8, 8)])
    assert len(changes) == 2 and all(c.action.startswith("replaced") for c in changes)
    assert [type(m) for m in model.modules()] == types and [m.training for m in model.modules()] == flags
    after = state_snapshot(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert out.training and out.layers[0].training and out.layers[0].conv.training
    assert not out.layers[1].training


def test_inplace_reuses_the_model_and_shares_untouched_parameters():
    model = Stack(SamePadConv(3, 8, 3), nn.Conv2d(8, 8, 1)).eval()
    w = model.layers[0].weight
    out, _ = canonicalize(model, [torch.randn(1, 3, 8, 8)], inplace=True)
    assert out is model and type(model.layers[0]) is nn.Conv2d and model.layers[0].weight is w


def test_a_model_with_nothing_to_do_comes_back_unchanged():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    out, changes = canonicalize(model, torch.randn(2, 3, 8, 8))
    assert changes == []
    assert [type(m) for m in out.modules()] == [type(m) for m in model.modules()]
    _same_out(out, model, [torch.randn(2, 3, 8, 8)])
    with pytest.raises(CanonicalizeError):
        canonicalize(model, [])


class FunctionalPad(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.seq = nn.Sequential(nn.ZeroPad2d(2), nn.Conv2d(3, 8, 3), nn.ReLU())
        self.conv = nn.Conv2d(8, 8, 3)
        self.asym = nn.Conv2d(8, 8, 2)

    def forward(self, x):
        x = self.conv(F.pad(self.seq(x), (1, 1, 1, 1)))
        return self.asym(F.pad(x, (0, 1, 0, 1)))


def test_explicit_zero_pads_before_a_plain_conv_are_folded():
    model = FunctionalPad().eval()
    xs = [torch.randn(2, 3, 10, 10)]
    out, changes = canonicalize(model, xs)
    rows = _rows(changes)
    assert isinstance(out, torch.fx.GraphModule)               # F.pad in forward: the graph is rewritten
    assert type(out.seq[0]) is nn.Identity and out.seq[1].padding == (2, 2)
    assert out.conv.padding == (1, 1) and "GraphModule" in rows["conv"].reason
    assert out.asym.padding == (0, 0) and "asym" not in rows         # asymmetric: not expressible
    _same_out(out, model, xs)
    kept, changes = canonicalize(model, xs, rewrite_forward=False)
    assert type(kept) is FunctionalPad and [c.layer for c in changes] == ["seq.0"]


def test_int8_static_quantizes_the_canonical_convs():
    model = Stack(SamePadConv(3, 8, 3, stride=2), SamePadConv(8, 8, 3, stride=1)).eval()
    calib = [torch.randn(4, 3, 16, 16) for _ in range(4)]
    out, _ = canonicalize(model, calib)
    q, rep = tf.quantize(out, tf.Int8Static(calibration=calib, progress=False, islands=False),  # int8 pinned
                         example_inputs=calib[0])
    rows = {r["layer"]: r for r in rep.rows}
    assert rows["layers.0.conv"]["applied"] is True and rows["layers.1"]["applied"] is True
    with torch.no_grad():
        assert F.cosine_similarity(q(calib[0]).flatten(), model(calib[0]).flatten(), dim=0) > 0.99


def test_conv1d_and_linear_subclasses():
    class SamePad1d(nn.Conv1d):
        def forward(self, x):
            return F.conv1d(F.pad(x, (1, 2)), self.weight, self.bias, self.stride, 0)

    class NormLinear(nn.Linear):
        def forward(self, x):
            return F.linear(x, F.normalize(self.weight, dim=1), self.bias)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.conv = SamePad1d(3, 4, 4)
            self.fc = NormLinear(4, 2)

        def forward(self, x):
            return self.fc(self.conv(x).mean(-1))

    model = Net().eval()
    xs = [torch.randn(2, 3, 12)]
    out, changes = canonicalize(model, xs)
    rows = _rows(changes)
    assert rows["conv"].action == "replaced by PaddedConv(ZeroPad1d, Conv1d)"
    assert "assumed" not in rows["conv"].reason               # (1, 2) is "same" for k=4, stride 1: any size
    assert type(out.fc) is nn.Linear and "normalize" in rows["fc"].reason
    _same_out(out, model, xs + [torch.randn(1, 3, 7)])
