"""quantize() never returns a model slower than the float one (the verdict is forced here: no timing in tests)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import torchfast as tf
from torchfast.measure import Comparison, Latency
from torchfast.quantized import quantization_of


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)).eval()


def _verdict(monkeypatch, speedup: float) -> list:
    calls = []

    def fake(baseline, candidate, batch, *a, **k):
        calls.append((baseline, candidate))
        lat = lambda ms: Latency(median_ms=ms, p90_ms=ms, mean_ms=ms, min_ms=ms, runs=1, threads=1)  # noqa: E731
        return Comparison(lat(1.0), lat(1.0 / speedup))
    monkeypatch.setattr("torchfast.quant.guard.compare_latency", fake)
    monkeypatch.setattr("torchfast.quant.dynamic.time_layer", lambda mod, q, args: (2.0, 1.0))  # each layer "wins"
    return calls


def _state(model: nn.Module):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [(n, type(m)) for n, m in model.named_modules()], [m.training for m in model.modules()])


@pytest.mark.parametrize("config", [tf.Int8Dynamic(), "static"])
def test_slower_int8_returns_the_float_model_with_the_reason(monkeypatch, config):
    model, x = _mlp(), torch.randn(8, 32)
    if config == "static":
        config = tf.Int8Static(calibration=[torch.randn(8, 32) for _ in range(2)], progress=False)
    calls = _verdict(monkeypatch, 0.5)
    before = _state(model)
    out, rep = tf.quantize(model, config, example_inputs=x)
    assert calls, "the quantized model was never timed against the float one"
    assert quantization_of(out) is None and out is not model
    assert torch.equal(out(x), model(x))
    assert rep.summary["speedup vs fp32"] == pytest.approx(0.5)
    assert "float model returned" in rep.summary["result"]
    assert any("0.50x" in n and "float model is returned" in n for n in rep.notes)
    after = _state(model)
    assert before[1:] == after[1:] and all(torch.equal(before[0][k], after[0][k]) for k in before[0])


def test_faster_int8_is_kept_and_the_ratio_reported(monkeypatch):
    _verdict(monkeypatch, 2.0)
    out, rep = tf.quantize(_mlp(), tf.Int8Dynamic(keep_slower=True), example_inputs=torch.randn(8, 32))
    assert quantization_of(out) is not None
    out, rep = tf.quantize(_mlp(), tf.Int8Dynamic(), example_inputs=torch.randn(8, 32))
    assert quantization_of(out) is not None and rep.summary["speedup vs fp32"] == pytest.approx(2.0)


def test_keep_slower_keeps_int8(monkeypatch):
    calls = _verdict(monkeypatch, 0.5)
    out, _ = tf.quantize(_mlp(), tf.Int8Static(calibration=[torch.randn(8, 32)], progress=False, keep_slower=True),
                         example_inputs=torch.randn(8, 32))
    assert quantization_of(out) is not None and not calls


def test_in_place_dynamic_that_is_slower_puts_the_float_layers_back(monkeypatch):
    model = _mlp()
    model[2].train()  # a mixed flag must survive too: the model is the result, in eval mode
    params = [id(p) for p in model.parameters()]
    types = [type(m) for m in model.modules()]
    _verdict(monkeypatch, 0.8)
    out, rep = tf.quantize(model, tf.Int8Dynamic(), example_inputs=torch.randn(8, 32), inplace=True)
    assert out is model
    assert [type(m) for m in model.modules()] == types
    assert [id(p) for p in model.parameters()] == params
    assert not any(m.training for m in model.modules())


def test_without_example_inputs_nothing_is_timed(monkeypatch):
    calls = _verdict(monkeypatch, 0.5)
    out, rep = tf.quantize(_mlp(), tf.Int8Static(calibration=[torch.randn(8, 32)], progress=False))
    assert quantization_of(out) is not None and not calls and "speedup vs fp32" not in rep.summary
