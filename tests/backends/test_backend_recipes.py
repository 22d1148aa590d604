"""Every recipe stage composes with the engine backends: a pruned and factorized model exports to OpenVINO /
ONNX Runtime, and a trailing Int8Static is lowered to that engine's own int8 (NNCF / QDQ) on the same
calibration data, with the task accuracy kept."""
from __future__ import annotations

import pytest
import torch

import torchfast as tf

ENGINES = [pytest.param("openvino", "openvino", id="openvino"), pytest.param("onnxruntime", "onnxruntime", id="onnxruntime")]


@pytest.mark.parametrize("backend, package", ENGINES)
def test_prune_lowrank_then_engine_int8(backend, package, digits_cnn):
    pytest.importorskip(package, reason=f"{package} is not installed (pip install 'torchfast[{package}]')")
    model, data = digits_cnn
    x = data.x_test[:32]
    calib = data.calibration(4)
    base = data.eval_fn(model)
    keep_all = tf.Tolerance(min_cosine=None, max_metric_drop=None)   # every stage stays: this tests composition
    res = tf.optimize(model, x, recipe=[tf.ChannelPruning(amount=0.25), tf.LowRank(ratio=0.75), tf.Int8Static()],
                      backend=backend, calibration=calib, eval_fn=data.eval_fn, tolerance=keep_all, runs=3,
                      progress=False)
    names = [s.name for s in res.stages]
    assert names[1].startswith("ChannelPruning") and names[2].startswith("LowRank"), names
    last = res.stages[-1]
    assert last.name.startswith(f"compile: {backend} + Int8Static") and last.applied, (last.name, last.reason)
    assert res.model(data.x_test[:5]).shape == (5, 10)
    float_acc = data.eval_fn(res.transformed)         # pruned + factorized, before the engine's int8
    assert float_acc >= base - 0.15                   # no fine-tuning after pruning 25%
    assert data.eval_fn(res.model) >= float_acc - 0.02   # the engine's int8 keeps the accuracy it was given
