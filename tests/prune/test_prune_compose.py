"""Pruning composes: a pruned model is just smaller dense layers, so it quantizes and factorizes."""
from __future__ import annotations

import pytest
import torch

import torchfast as tf



def test_prune_then_int8_static(digits_cnn):
    pytest.importorskip("torchfast.quant")
    model, data = digits_cnn
    pm, _ = tf.prune(model, tf.ChannelPruning(amount=0.3, importance="bn_scale"), example_inputs=data.x_test[:16])
    acc_pruned = data.eval_fn(pm)
    qm, rep = tf.quantize(pm, tf.Int8Static(calibration=data.calibration()), example_inputs=data.x_test[:16])
    assert qm(data.x_test[:4]).shape == (4, 10)
    assert data.eval_fn(qm) >= acc_pruned - 0.03


def test_prune_and_lowrank_both_orders(digits_cnn):
    pytest.importorskip("torchfast.lowrank")
    model, data = digits_cnn
    x = data.x_test[:16]
    # prune -> factorize
    pm, _ = tf.prune(model, tf.ChannelPruning(amount=0.3, importance="bn_scale"), example_inputs=x, inplace=False)
    lm, lrep = tf.decompose(pm, tf.LowRank(ratio=0.5), calibration=data.calibration())
    assert lm(x).shape == (16, 10)
    # factorize -> prune: factorized pairs are plain Linear/Conv2d, their rank becomes one more group
    lm2, _ = tf.decompose(model, tf.LowRank(ratio=0.5), calibration=data.calibration())
    base = sum(p.numel() for p in lm2.parameters())
    pm2, rep = tf.prune(lm2, tf.ChannelPruning(amount=0.3, importance="bn_scale"), example_inputs=x, inplace=False)
    assert pm2(x).shape == (16, 10) and rep.summary["params after"] < base


def test_recipe_stage(digits_cnn):
    from torchfast.recipe import apply_recipe
    model, data = digits_cnn
    m, reports = apply_recipe(model, [tf.ChannelPruning(amount=0.5)], example_inputs=data.x_test[:8])
    assert m.features[0].out_channels == 16 and reports[0].summary["params: x fewer"] > 1 / 0.3
