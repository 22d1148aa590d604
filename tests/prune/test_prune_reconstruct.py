"""Least-squares refit of the layers that lost input channels: exact where the removed channels are linear
in the kept ones, never kept where it does not help, the user's model untouched."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import torchfast as tf
from torchfast.config import ConfigError
from torchfast.modules import state_snapshot, training_flags
from torchfast.prune.reconstruct import reconstructable


def _redundant_mlp(bias: bool = True) -> nn.Module:
    """Hidden units 8..15 are half of units 0..7 and weigh half as much downstream (smaller norms: pruning at
    0.5 removes exactly them), and ReLU(z / 2) = ReLU(z) / 2, so the kept units carry everything the removed
    ones did."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 5, bias=bias))
    _halve(m[0], m[2], 8)
    return m.eval()


def _halve(producer: nn.Module, consumer: nn.Module, n: int) -> None:
    with torch.no_grad():
        producer.weight[n:] = producer.weight[:n] / 2
        producer.bias[n:] = producer.bias[:n] / 2
        consumer.weight[:, n:] = consumer.weight[:, :n] / 2


def _redundant_convnet(bias: bool = True) -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 3, padding=2, dilation=2, bias=bias),
                      nn.ReLU(), nn.Conv2d(8, 4, 1))
    _halve(m[0], m[2], 8)
    return m.eval()


def _batches(shape: tuple, n: int = 5, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(n)]


def _rel(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float((a(x) - b(x)).norm() / a(x).norm())


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("build,shape", [(_redundant_mlp, (64, 6)), (_redundant_convnet, (8, 3, 10, 10))])
def test_refit_is_exact_when_the_removed_channels_are_linear_in_the_kept_ones(build, shape, bias):
    m, cal = build(bias), _batches(shape)
    held = _batches(shape, 1, seed=7)[0]
    cfg = dict(amount=0.5, layer_amounts={"2": 0.0} if isinstance(m[2], nn.Conv2d) else {})
    plain, _ = tf.prune(m, tf.ChannelPruning(**cfg, reconstruct=False), example_inputs=cal[0], calibration=cal)
    refit, rep = tf.prune(m, tf.ChannelPruning(**cfg), example_inputs=cal[0], calibration=cal)
    assert refit[0].weight.shape[0] == 8
    assert _rel(m, plain, held) > 0.05          # slicing alone loses what units 8..15 carried
    assert _rel(m, refit, held) < 1e-3          # the kept units stand in for them exactly
    assert rep.summary["layers refit"].startswith("yes, 1 layers by least squares")
    row = rep.where(layer="2", applied=True)[0]
    assert "refit: layer error" in row["reason"]


def test_refit_uses_the_kernel_layout_of_the_unfolded_input():
    """A 3x3 consumer whose input loses every other channel: the refit must map kept channel c to
    columns c*9..c*9+8 of the unfolded input, or the exact solution above would not be found."""
    torch.manual_seed(3)
    m = nn.Sequential(nn.Conv2d(2, 6, 1), nn.ReLU(), nn.Conv2d(6, 3, 3, padding=1))
    _halve(m[0], m[2], 3)
    cal = _batches((4, 2, 7, 7))
    refit, _ = tf.prune(m, tf.ChannelPruning(amount=0.5), example_inputs=cal[0], calibration=cal)
    assert refit[2].in_channels == 3
    assert _rel(m, refit, _batches((4, 2, 7, 7), 1, seed=5)[0]) < 1e-3


def test_a_refit_that_does_not_help_is_not_kept():
    """Independent random units: nothing in the kept ones predicts the removed ones on held-out data beyond
    noise, so either the refit brings the held-out output closer or the sliced weights stay."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 3)).eval()
    cal = _batches((6, 4), n=3)  # few rows: a refit would overfit
    plain, _ = tf.prune(m, tf.ChannelPruning(amount=0.5, reconstruct=False), example_inputs=cal[0])
    refit, rep = tf.prune(m, tf.ChannelPruning(amount=0.5), example_inputs=cal[0], calibration=cal)
    summary = rep.summary["layers refit"]
    if summary.startswith("no"):
        assert torch.equal(refit[2].weight, plain[2].weight) and torch.equal(refit[2].bias, plain[2].bias)
    else:
        before, after = (float(v) for v in summary.rsplit("batch ", 1)[1].split(" -> "))
        assert after < before


def test_the_users_model_is_untouched_and_keeps_its_flags():
    m, cal = _redundant_convnet(), _batches((8, 3, 10, 10))
    m.train()
    m[2].eval()
    flags, before = training_flags(m), state_snapshot(m)
    refit, rep = tf.prune(m, tf.ChannelPruning(amount=0.5, layer_amounts={"2": 0.0}), example_inputs=cal[0],
                          calibration=cal)
    assert rep.summary["layers refit"].startswith("yes")
    assert training_flags(m) == flags
    assert [mod.training for mod in refit.modules()] == list(flags.values())
    assert all(torch.equal(before[k], v) for k, v in state_snapshot(m).items())
    assert not m[2]._forward_hooks  # the statistics' hooks are gone


def test_inplace_refit_changes_only_the_rebuilt_layers():
    m, cal = _redundant_mlp(), _batches((64, 6))
    first = m[0].weight
    out, rep = tf.prune(m, tf.ChannelPruning(amount=0.5), example_inputs=cal[0], calibration=cal, inplace=True)
    assert out is m and m[2].in_features == 8 and rep.summary["layers refit"].startswith("yes")
    assert _rel(_redundant_mlp(), m, _batches((64, 6), 1, seed=7)[0]) < 1e-3
    assert m[0].weight is not first  # rebuilt (fewer rows); the layer it replaced was not written to
    assert torch.equal(first[:8], m[0].weight)


def test_config_refuses_bad_values_and_needs_two_batches():
    with pytest.raises(ConfigError, match="reconstruct"):
        tf.ChannelPruning(reconstruct=1)
    m = _redundant_mlp()
    x = torch.randn(8, 6)
    with pytest.raises(ConfigError, match="two or more"):
        tf.prune(m, tf.ChannelPruning(reconstruct=True), example_inputs=x, calibration=[x])
    assert tf.ChannelPruning.from_dict(tf.ChannelPruning(reconstruct=False).to_dict()).reconstruct is False


def test_layers_with_their_own_forward_are_left_as_sliced():
    class Scaled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    class Standardized(nn.Conv2d):
        def forward(self, x):
            w = (self.weight - self.weight.mean()) / (self.weight.std() + 1e-5)
            return self._conv_forward(x, w, self.bias)

    assert reconstructable(nn.Linear(3, 3)) and reconstructable(nn.Conv2d(3, 3, 3))
    assert not reconstructable(Scaled(3, 3)) and not reconstructable(Standardized(3, 3, 3))
    assert not reconstructable(nn.Conv2d(4, 4, 3, groups=2)) and not reconstructable(nn.Conv2d(4, 4, 3, padding="same"))
    assert not reconstructable(nn.Conv1d(3, 3, 3)) and not reconstructable(nn.Conv2d(3, 3, 3, padding_mode="reflect"))

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), Scaled(16, 5)).eval()
    cal = _batches((64, 6))
    plain, _ = tf.prune(m, tf.ChannelPruning(amount=0.5, reconstruct=False), example_inputs=cal[0])
    refit, rep = tf.prune(m, tf.ChannelPruning(amount=0.5), example_inputs=cal[0], calibration=cal)
    assert type(refit[2]) is Scaled and torch.equal(refit[2].weight, plain[2].weight)
    assert "layers refit" not in rep.summary


def test_a_failing_refit_leaves_the_sliced_weights(monkeypatch):
    import torchfast.prune.reconstruct as rc

    def boom(*a, **k):
        raise RuntimeError("no solver today")
    m, cal = _redundant_mlp(), _batches((64, 6))
    plain, _ = tf.prune(m, tf.ChannelPruning(amount=0.5, reconstruct=False), example_inputs=cal[0], calibration=cal)
    monkeypatch.setattr(rc, "_solve", boom)
    out, rep = tf.prune(m, tf.ChannelPruning(amount=0.5, reconstruct=True), example_inputs=cal[0], calibration=cal)
    assert "the refit failed" in rep.summary["layers refit"] and "no solver today" in rep.summary["layers refit"]
    assert torch.equal(out[2].weight, plain[2].weight) and torch.equal(out[2].bias, plain[2].bias)
    assert not any(mod._forward_hooks for mod in m.modules())


def test_a_refit_failing_part_way_keeps_no_layer_even_when_forced(monkeypatch):
    import torchfast.prune.reconstruct as rc
    real, calls = rc._solve, []

    def second_fails(*a, **k):
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("no solver today")
        return real(*a, **k)
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 5)).eval()
    cal = _batches((64, 6))
    plain, _ = tf.prune(m, tf.ChannelPruning(amount=0.5, reconstruct=False), example_inputs=cal[0], calibration=cal)
    monkeypatch.setattr(rc, "_solve", second_fails)
    out, rep = tf.prune(m, tf.ChannelPruning(amount=0.5, reconstruct=True), example_inputs=cal[0], calibration=cal)
    assert len(calls) == 2 and "the refit failed" in rep.summary["layers refit"]
    for i in (2, 4):
        assert torch.equal(out[i].weight, plain[i].weight) and torch.equal(out[i].bias, plain[i].bias)
