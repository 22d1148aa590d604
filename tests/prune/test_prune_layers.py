"""Layers as real model libraries write them: Conv/Linear/BatchNorm/LayerNorm subclasses with their own
``__init__``/``forward`` keep their class and behaviour when pruned, and ``register_layer`` teaches the
pruner a custom layer."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchfast as tf
from torchfast.modules import state_snapshot
from torchfast.prune import LayerRule, register_layer
from torchfast.prune.api import plan
from torchfast.prune.layers import _RULES
from torchfast.prune.structured import mask_removed

from helpers.layers import SamePadConv


class ScaledStdConv(nn.Conv2d):
    """Weight-standardized conv with a per-output-channel gain (NF-Net style): its __init__ takes gamma/eps
    where Conv2d takes padding_mode, so re-constructing it by Conv2d's signature fails."""

    def __init__(self, cin, cout, k, padding=None, gamma=1.0, eps=1e-6):
        super().__init__(cin, cout, k, padding=k // 2 if padding is None else padding)
        self.gain = nn.Parameter(torch.ones(cout, 1, 1, 1))
        self.scale = gamma * self.weight[0].numel() ** -0.5
        self.eps = eps

    def forward(self, x):
        w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None,
                         weight=(self.gain * self.scale).reshape(-1), training=True, momentum=0.0,
                         eps=self.eps).reshape_as(self.weight)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class BatchNormAct(nn.BatchNorm2d):
    """A BatchNorm with a fused activation submodule (as timm writes it)."""

    def __init__(self, n, act=nn.ReLU):
        super().__init__(n)
        self.act = act()

    def forward(self, x):
        return self.act(super().forward(x))


class LinearWithScale(nn.Linear):
    def __init__(self, d_in, d_out, scale):
        super().__init__(d_in, d_out)
        self.scale = scale

    def forward(self, x):
        return super().forward(x) * self.scale


class SubclassNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = SamePadConv(3, 16, 3, stride=2)
        self.bn1 = BatchNormAct(16)
        self.conv2 = ScaledStdConv(16, 24, 3)
        self.bn2 = BatchNormAct(24)
        self.fc1 = LinearWithScale(24, 32, 0.5)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        x = self.bn2(self.conv2(self.bn1(self.stem(x)))).mean((2, 3))
        return self.fc2(torch.relu(self.fc1(x)))


def _settled(model, x):
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(x)
    return model.eval()


def test_subclasses_are_pruned_as_sliced_copies_keeping_class_and_behaviour():
    x = torch.randn(4, 3, 17, 17)
    model = _settled(SubclassNet(), x)
    before = state_snapshot(model)
    cfg = tf.ChannelPruning(amount=0.5)
    pruned, rep = tf.prune(model, cfg, example_inputs=x)
    after = state_snapshot(model)                               # the user's model is untouched
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    for name, cls in [("stem", SamePadConv), ("bn1", BatchNormAct), ("conv2", ScaledStdConv), ("fc1", LinearWithScale)]:
        assert type(pruned.get_submodule(name)) is cls, name
    assert pruned.stem.out_channels == 8 and pruned.stem.weight.shape[0] == 8 and pruned.stem.tag == "same"
    assert pruned.conv2.gain.shape == (12, 1, 1, 1) and pruned.conv2.in_channels == 8
    assert pruned.bn1.num_features == 8 and isinstance(pruned.bn1.act, nn.ReLU)
    assert pruned.fc1.in_features == 12 and pruned.fc1.out_features == 16 and pruned.fc1.scale == 0.5
    assert pruned(x).shape == (4, 10)
    assert model.stem.weight.shape[0] == 16 and model.conv2.gain.shape[0] == 24   # not shared with the copy


def test_pruned_subclasses_compute_what_the_masked_original_computes():
    """SamePadConv/BatchNormAct/LinearWithScale are exact under masking (ScaledStdConv standardizes over its
    inputs, so it is left out here)."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(1)
            self.stem = SamePadConv(3, 16, 3, stride=2)
            self.bn = BatchNormAct(16)
            self.conv = SamePadConv(16, 16, 3)
            self.fc = LinearWithScale(16, 8, 2.0)

        def forward(self, x):
            return self.fc(self.conv(self.bn(self.stem(x))).mean((2, 3)))

    x = torch.randn(2, 3, 15, 15)
    model = _settled(Net(), x)
    cfg = tf.ChannelPruning(amount=0.25)
    g, _, _, removed = plan(copy.deepcopy(model), x, cfg)
    assert removed
    masked = mask_removed(copy.deepcopy(model), g, removed)
    pruned, _ = tf.prune(model, cfg, example_inputs=x)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), masked(x), atol=1e-5, rtol=1e-4)


class MyRMSNorm(nn.Module):
    """Not an nn.LayerNorm / nn.RMSNorm: unknown to the pruner until registered."""

    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.up = nn.Linear(16, 64)
        self.norm = MyRMSNorm(64)
        self.down = nn.Linear(64, 16)

    def forward(self, x):
        return self.down(self.norm(torch.relu(self.up(x))))


@pytest.fixture()
def clean_rules():
    saved = dict(_RULES)
    yield
    _RULES.clear()
    _RULES.update(saved)


def test_an_unknown_norm_blocks_its_channels_until_registered(clean_rules):
    x = torch.randn(8, 16)
    model = Mlp().eval()
    _, rep = tf.prune(model, tf.ChannelPruning(amount=0.5), example_inputs=x)
    assert model.up.out_features == 64 and rep.summary["channels/heads removed"] == 0
    assert any("kept:" in str(r["reason"]) for r in rep.rows)       # the reason is named, nothing crashes

    register_layer(MyRMSNorm, kind="norm")
    pruned, rep = tf.prune(model, tf.ChannelPruning(amount=0.5), example_inputs=x)
    assert pruned.up.out_features == 32 and pruned.down.in_features == 32
    assert type(pruned.norm) is MyRMSNorm and pruned.norm.weight.shape == (32,)
    assert pruned(x).shape == (8, 16)


def test_register_layer_with_a_full_rule(clean_rules):
    from torchfast.prune.layers import LINEAR

    class Dense(nn.Module):        # a Linear that does not subclass nn.Linear
        def __init__(self, d_in, d_out):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(d_out, d_in) * 0.1)
            self.bias = nn.Parameter(torch.zeros(d_out))

        def forward(self, x):
            return x @ self.weight.t() + self.bias

    model = nn.Sequential(Dense(8, 32), nn.ReLU(), Dense(32, 4)).eval()
    register_layer(Dense, LayerRule(trace=LINEAR.trace, rebuild=LINEAR.rebuild, rows=LINEAR.rows,
                                    describe=LINEAR.describe, mask=LINEAR.mask))
    x = torch.randn(3, 8)
    pruned, rep = tf.prune(model, tf.ChannelPruning(amount=0.25), example_inputs=x)
    assert pruned[0].weight.shape == (24, 8) and pruned[2].weight.shape == (4, 24)
    assert pruned(x).shape == (3, 4)


def test_register_layer_rejects_bad_arguments():
    with pytest.raises(TypeError, match="nn.Module subclass"):
        register_layer(int, kind="norm")
    with pytest.raises(ValueError, match="exactly one of"):
        register_layer(MyRMSNorm)
    with pytest.raises(ValueError, match="kind must be one of"):
        register_layer(MyRMSNorm, kind="conv3x3")


def test_torch_rmsnorm_is_known():
    if not hasattr(nn, "RMSNorm"):
        pytest.skip("this torch has no nn.RMSNorm")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.RMSNorm(64), nn.Linear(64, 16)).eval()
    pruned, _ = tf.prune(model, tf.ChannelPruning(amount=0.5), example_inputs=torch.randn(4, 16))
    assert pruned[2].weight.shape == (32,) and tuple(pruned[2].normalized_shape) == (32,)
    assert pruned(torch.randn(4, 16)).shape == (4, 16)
