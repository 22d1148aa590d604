"""Bad input: clear errors and the user's model untouched; unknown ops block their group with a reason."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import torchfast as tf
from torchfast.config import ConfigError
from torchfast.modules import state_snapshot
from torchfast.prune import TraceError


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("amount", [1.0, -0.1, 1.5, "0.3"])
def test_amount_out_of_range(amount):
    with pytest.raises(ConfigError, match="amount"):
        tf.ChannelPruning(amount=amount)


def test_bad_choices():
    with pytest.raises(ConfigError, match="importance"):
        tf.ChannelPruning(importance="random")
    with pytest.raises(ConfigError, match="scope"):
        tf.ChannelPruning(scope="layer")


def test_wrong_shaped_inputs_name_the_layer(digits_cnn):
    model, data = digits_cnn
    snap = state_snapshot(model)
    with pytest.raises(TraceError, match=r"features\.0.*Conv2d|conv2d"):
        tf.prune(model, tf.ChannelPruning(amount=0.3), example_inputs=torch.randn(2, 3, 16, 16))
    assert _same(snap, state_snapshot(model)) and model.features[0].out_channels == 32


def test_untraceable_models():
    scripted = torch.jit.script(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)))
    with pytest.raises(TraceError, match="TorchScript"):
        tf.prune(scripted, example_inputs=torch.randn(1, 4))

    class Bad(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 8)

        def forward(self, x):
            return torch.linalg.solve(self.fc(x), x)  # shapes do not fit

    with pytest.raises(TraceError, match="first failing op: torch.*solve"):
        tf.prune(Bad(), example_inputs=torch.randn(2, 4))


def test_excluded_layers(digits_cnn):
    model, data = digits_cnn
    with pytest.raises(ConfigError, match="features.3.*excluded"):
        tf.ChannelPruning(amount=0.5, exclude=["features.3"], layer_amounts={"features.3": 0.5})
    with pytest.raises(ConfigError, match="'features.99'.*no submodule"):
        tf.prune(model, tf.ChannelPruning(amount=0.5, exclude=["features.99"]), example_inputs=data.x_test[:4])
    pm, rep = tf.prune(model, tf.ChannelPruning(amount=0.5, exclude=["features.3"]), example_inputs=data.x_test[:4], inplace=False)
    assert pm.features[3].out_channels == 64 and pm.features[3].in_channels == 32  # nothing touching it changes
    assert pm.features[7].out_channels == 64
    assert any("excluded" in r["reason"] for r in rep.where(applied=False))


def test_unknown_op_blocks_its_group_with_a_reason():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3), nn.Conv2d(8, 4, 1)

        def forward(self, x):
            y = self.a(x).relu()
            y = torch.cumsum(self.b(y), dim=1)  # mixes channels: the graph cannot reason about it
            return self.c(y).mean((2, 3))

    m = Odd().eval()
    x = torch.randn(1, 3, 12, 12)
    pm, rep = tf.prune(m, tf.ChannelPruning(amount=0.5), example_inputs=x, inplace=False)
    assert pm.a.out_channels == 4 and pm.b.out_channels == 8  # a's group prunable, b's blocked
    assert any("cumsum" in r["reason"] and "b" in r["layer"] for r in rep.where(applied=False))
    assert pm(x).shape == m(x).shape


def test_dtype_and_layer_amounts():
    m = nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.LayerNorm(16), nn.Linear(16, 12), nn.ReLU(),
                      nn.Linear(12, 3)).double().eval()
    x = torch.randn(5, 6, dtype=torch.float64)
    pm, _ = tf.prune(m, tf.ChannelPruning(amount=0.5, layer_amounts={"3": 0.25}), example_inputs=x, inplace=False)
    assert pm[0].out_features == 8 and pm[2].normalized_shape == (8,) and pm[3].out_features == 9
    assert pm[0].weight.dtype == torch.float64 and pm(x).dtype == torch.float64 and pm(x).shape == (5, 3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_half():
    import torchvision
    m = torchvision.models.resnet18(num_classes=10).cuda().half().eval()
    x = torch.randn(2, 3, 64, 64, device="cuda", dtype=torch.half)
    pm, _ = tf.prune(m, tf.ChannelPruning(amount=0.5), example_inputs=x, inplace=False)
    assert pm.conv1.weight.device.type == "cuda" and pm.conv1.weight.dtype == torch.half
    assert pm(x).shape == (2, 10)


def test_training_mode_model_is_not_touched(digits_cnn):
    model, data = digits_cnn
    model.train()
    snap = state_snapshot(model)
    pm, _ = tf.prune(model, tf.ChannelPruning(amount=0.3), example_inputs=data.x_test[:8], inplace=False)
    assert model.training and pm.training
    assert _same(snap, state_snapshot(model))  # BN running stats untouched by tracing / FLOP counting


class _WidthFromAnotherTensor(nn.Module):
    """Reshapes to a width read from another tensor's shape (as maxvit's attention does): the trace cannot
    see that the two widths must stay equal."""

    def __init__(self, side_branch: bool = True):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(8, 24), nn.Linear(24, 24), nn.Linear(24, 4)
        self.side = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4)) if side_branch else None

    def forward(self, inp):
        x = torch.relu(self.a(inp))
        B, D = x.shape
        z = torch.relu(self.b(x)).reshape(B, 2, -1).reshape(B, D)
        out = self.head(z)
        return out + self.side(inp) if self.side is not None else out


def test_groups_whose_removal_breaks_the_forward_are_kept_whole_and_the_rest_pruned():
    torch.manual_seed(0)
    m, x = _WidthFromAnotherTensor().eval(), torch.randn(4, 8)
    before = state_snapshot(m)
    p, rep = tf.prune(m, tf.ChannelPruning(amount=0.5), example_inputs=x)
    assert p(x).shape == (4, 4) and p.side[0].out_features == 16 and p.a.out_features == 24
    kept = [r for r in rep.rows if r["layer"] == "a" and r["type"] == "group"]
    assert kept and "fixes this width" in kept[0]["reason"]
    assert any("fails on the example inputs" in n and "1 of 2 groups" in n for n in rep.notes)
    assert all(torch.equal(before[k], v) for k, v in state_snapshot(m).items())


def test_when_every_group_breaks_the_forward_prune_refuses_and_changes_nothing():
    torch.manual_seed(0)
    m, x = _WidthFromAnotherTensor(side_branch=False).eval(), torch.randn(4, 8)
    before = state_snapshot(m)
    with pytest.raises(tf.prune.PruneError, match=r"fails on the example inputs .*shape '\[4, 12\]'"):
        tf.prune(m, tf.ChannelPruning(amount=0.5), example_inputs=x, inplace=True)
    assert type(m.a) is nn.Linear and m.a.out_features == 24
    assert all(torch.equal(before[k], v) for k, v in state_snapshot(m).items())
