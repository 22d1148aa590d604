"""decompose() keeps at most one layer's factorizations in memory, and dropping them changes no decision."""
from __future__ import annotations

import importlib

import pytest
import torch
from torch import nn

import torchfast as tf

rewrite = importlib.import_module("torchfast.lowrank.rewrite")
select = importlib.import_module("torchfast.lowrank.select")


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(8, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(32 * 8 * 8, 64), nn.ReLU(), nn.Linear(64, 10)).eval()


X = torch.randn(2, 8, 8, 8)


def _ranks(rep):
    return {r["layer"]: (r["method"], r["rank"], r["applied"]) for r in rep.rows}


@pytest.mark.parametrize("cfg", [tf.LowRank(ratio=0.3, speed_guard=False),
                                 tf.LowRank(flops_reduction=2.0, allocation="global", speed_guard=False),
                                 tf.LowRank(ratio=0.9, speed_guard=False),  # 0.9: layers kept for FLOPs
                                 tf.LowRank(budget=0.1, eval_fn=lambda m: float(-m(X).abs().mean()),
                                            search_ratios=(0.25, 0.5), speed_guard=False)],
                         ids=["uniform", "global", "kept", "budget search"])
def test_layers_release_their_factorizations(cfg, monkeypatch):
    layers = []
    real_choose = select.choose

    def spy(model, given, config):
        layers.extend(given)
        return real_choose(model, given, config)
    monkeypatch.setattr(select, "choose", spy)
    out, rep = tf.decompose(_model(), cfg, example_inputs=X)
    assert layers
    for layer in layers:  # nothing but (at most) a spectrum of a few singular values is left
        assert set(layer._cache) <= {"spectrum", "modes"}, (layer.name, set(layer._cache))
    for row in rep.rows:  # a kept layer's report still says what its factorization would have cost
        if row.get("method") and not row["applied"]:
            assert row["params_candidate"] > 0 and row["weight_err"] is not None


def test_trimming_large_layers_changes_no_global_decision(monkeypatch):
    cfg = tf.LowRank(flops_reduction=2.0, allocation="global", method="auto", speed_guard=False)
    keep_all = _ranks(tf.decompose(_model(), cfg, example_inputs=X)[1])
    monkeypatch.setattr(rewrite, "LARGE_LAYER", 0)  # every layer recomputes its SVD after the allocation
    trimmed_out, trimmed = tf.decompose(_model(), cfg, example_inputs=X)
    assert _ranks(trimmed) == keep_all
    ref_out, _ = tf.decompose(_model(), cfg, example_inputs=X)
    with torch.no_grad():
        torch.testing.assert_close(trimmed_out(X), ref_out(X), rtol=1e-5, atol=1e-6)


def test_released_layer_gives_the_same_spectrum_and_candidate():
    m = _model()
    conv = m[2]
    geom = rewrite.Geometry.of(conv, (2, 32, 8, 8), (2, 32, 8, 8))
    layer = rewrite.Layer("2", conv, geom, None, False, tf.LowRank(ratio=0.5))
    s = layer.spectra("channel")[0].clone()
    before = layer.build("channel", (8,))
    layer.release(keep_spectra=True)
    assert "svd" not in layer._cache and torch.equal(layer.spectra("channel")[0], s)
    after = layer.build("channel", (8,))
    assert after.weight_err == pytest.approx(before.weight_err, rel=1e-9)
    layer.release(keep_spectra=True)
    layer.release(keep_spectra=True)  # a second release keeps the spectrum the first one kept
    assert set(layer._cache) == {"spectrum"} and torch.equal(layer.spectra("channel")[0], s)
    layer.release()
    assert not layer._cache
