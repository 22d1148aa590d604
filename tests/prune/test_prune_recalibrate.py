"""BatchNorm statistics re-estimated after pruning, on the calibration batches, kept only where measured better."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import torchfast as tf
from torchfast.config import ConfigError
from torchfast.modules import state_snapshot, training_flags


def _net() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                      nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.Dropout(0.5),
                      nn.Conv2d(32, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    m.train()
    for mod in m.modules():  # statistics that describe the unpruned model's activations
        if isinstance(mod, nn.BatchNorm2d):
            mod.momentum = None
    with torch.no_grad():
        for _ in range(4):
            m(torch.randn(16, 3, 12, 12))
    return m.eval()


def _batches(n: int = 6, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(16, 3, 12, 12, generator=g) for _ in range(n)]


def _err(a: nn.Module, b: nn.Module, xs) -> float:
    with torch.no_grad():
        return float(sum((a(x) - b(x)).norm() ** 2 for x in xs) ** 0.5 / sum(a(x).norm() ** 2 for x in xs) ** 0.5)


def test_recalibration_brings_the_pruned_model_closer_and_leaves_the_original_alone():
    m, cal, held = _net(), _batches(), _batches(2, seed=9)
    m.train()
    flags, before = training_flags(m), state_snapshot(m)
    plain, _ = tf.prune(m, tf.ChannelPruning(amount=0.5), example_inputs=cal[0])
    fixed, rep = tf.prune(m, tf.ChannelPruning(amount=0.5, reconstruct=False), example_inputs=cal[0], calibration=cal)
    assert rep.summary["BatchNorm re-estimated"].startswith("yes, 3 layers on 5 calibration batch(es)")
    assert fixed.training and training_flags(m) == flags  # the result keeps the user's flags
    assert all(torch.equal(before[k], v) for k, v in state_snapshot(m).items())
    # statistics are the pruned activations' own: the first BN sees its 16 kept conv channels of the batches
    with torch.no_grad():
        y = torch.cat([fixed[0](x) for x in cal[:-1]]).transpose(0, 1).reshape(fixed[1].num_features, -1)
    torch.testing.assert_close(fixed[1].running_mean, y.mean(1), rtol=1e-4, atol=1e-5)
    m.eval(), fixed.eval(), plain.eval()
    assert _err(m, fixed, held) < _err(m, plain, held)  # closer on batches it never saw


def test_dropout_stays_off_while_statistics_are_measured():
    m, cal = _net(), _batches()
    a, _ = tf.prune(m, tf.ChannelPruning(amount=0.5, recalibrate_bn=True), example_inputs=cal[0], calibration=cal)
    b, _ = tf.prune(m, tf.ChannelPruning(amount=0.5, recalibrate_bn=True), example_inputs=cal[0], calibration=cal)
    assert torch.equal(a[4].running_var, b[4].running_var)  # random dropout masks would make them differ


def test_in_place_swaps_the_new_statistics_into_the_users_model():
    m, cal = _net(), _batches()
    conv_weight = m[0].weight
    out, rep = tf.prune(m, tf.ChannelPruning(amount=0.5, exclude=("0",)), example_inputs=cal[0], calibration=cal,
                        inplace=True)
    assert out is m and m[0].weight is conv_weight  # an untouched layer keeps its parameter objects
    assert "BatchNorm re-estimated" in rep.summary
    ref, _ = tf.prune(_net(), tf.ChannelPruning(amount=0.5, exclude=("0",)), example_inputs=cal[0], calibration=cal)
    for i in (1, 4, 8):
        torch.testing.assert_close(m[i].running_var, ref[i].running_var)


def test_off_and_bad_settings():
    m, cal = _net(), _batches()
    off, rep = tf.prune(m, tf.ChannelPruning(amount=0.5, recalibrate_bn=False, reconstruct=False), example_inputs=cal[0], calibration=cal)
    plain, _ = tf.prune(m, tf.ChannelPruning(amount=0.5), example_inputs=cal[0])
    assert "BatchNorm re-estimated" not in rep.summary
    assert all(torch.equal(a, b) for a, b in zip(off.state_dict().values(), plain.state_dict().values()))
    before = state_snapshot(m)
    with pytest.raises(ConfigError, match="calibration"):
        tf.prune(m, tf.ChannelPruning(recalibrate_bn=True), example_inputs=cal[0])
    with pytest.raises(ConfigError, match="recalibrate_bn"):
        tf.ChannelPruning(recalibrate_bn="yes")
    assert all(torch.equal(before[k], v) for k, v in state_snapshot(m).items())
    cfg = tf.ChannelPruning(recalibrate_bn=False)
    assert type(cfg).from_dict(cfg.to_dict()) == cfg
