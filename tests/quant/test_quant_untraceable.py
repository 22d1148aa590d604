"""Int8Static on layers torch.fx cannot trace: a conv subclass whose forward branches on the input's shape
(TensorFlow-style "same" padding, as model libraries write it) is quantized as the plain conv it computes,
and the rest of the model is quantized too."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import torchfast as tf

from helpers.layers import SamePadConv


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = SamePadConv(3, 8, 3, stride=2)
        self.body = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1))
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.body(torch.relu(self.stem(x))).mean((2, 3)))


def test_a_same_padding_conv_subclass_is_quantized_as_its_base_op():
    model = Net().eval()
    x = torch.randn(2, 3, 15, 15)
    calib = [torch.randn(2, 3, 15, 15) for _ in range(4)]
    q, rep = tf.quantize(model, tf.Int8Static(calibration=calib, progress=False, keep_slower=True), example_inputs=x)
    rows = {r["layer"]: r for r in rep.rows}
    assert rows["stem"]["applied"] is True, rows["stem"]
    assert any(n.startswith("stem: replaced by Conv2d") for n in rep.notes), rep.notes
    assert isinstance(model.stem, SamePadConv)              # the user's model keeps its own layer
    assert rows["body.0"]["applied"] is True and rows["body.2"]["applied"] is True
    with torch.no_grad():
        cos = F.cosine_similarity(q(x).flatten(), model(x).flatten(), dim=0)
    assert cos > 0.98


class ReadsWeight(nn.Module):
    """Model code that reads a layer's weight at run time (as timm's positional encodings do)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Conv2d(3, 8, 1)
        self.body = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        mask = torch.zeros(x.shape[0], 1, 1, 1).to(device=self.proj.weight.device, dtype=x.dtype)
        return self.body(torch.relu(self.proj(x) + mask))


def test_a_layer_whose_weight_the_model_reads_stays_float():
    model = ReadsWeight().eval()
    x = torch.randn(2, 3, 8, 8)
    q, rep = tf.quantize(model, tf.Int8Static(calibration=[torch.randn(2, 3, 8, 8) for _ in range(3)],
                                              progress=False), example_inputs=x)
    rows = {r["layer"]: r for r in rep.rows}
    assert rows["proj"]["applied"] is False and ".weight" in rows["proj"]["reason"]
    assert rows["body"]["applied"] is True
    with torch.no_grad():
        assert q(x).shape == (2, 8, 8, 8)       # runs: the int8 model would fail reading a packed weight


class ReadsLinearWeight(nn.Module):
    """As torchvision's Swin attention: F.linear with the layer's own weight."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.qkv = nn.Linear(16, 16)
        self.out = nn.Linear(16, 4)

    def forward(self, x):
        return self.out(F.linear(x, self.qkv.weight, self.qkv.bias))


def test_int8_dynamic_keeps_float_a_linear_whose_weight_the_model_reads():
    model = ReadsLinearWeight().eval()
    x = torch.randn(8, 16)
    q, rep = tf.quantize(model, tf.Int8Dynamic(keep_slower=True), example_inputs=x)
    rows = {r["layer"]: r for r in rep.rows}
    assert rows["qkv"]["applied"] is False and ".weight" in rows["qkv"]["reason"]
    with torch.no_grad():
        assert q(x).shape == (8, 4)
