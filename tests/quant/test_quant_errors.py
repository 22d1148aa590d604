"""Bad input: clear errors naming the batch/input/value, and the user's model untouched."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import torchfast as tf
from torchfast.config import ConfigError
from torchfast.modules import state_snapshot
from torchfast.quant import AlreadyQuantizedError, CalibrationError, UnsupportedDeviceError


def _small():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 14 * 14, 10)).eval()


def _unchanged(model, before):
    after = model.state_dict()
    return set(after) == set(before) and all(torch.equal(after[k], v) for k, v in before.items())


def test_empty_calibration():
    m = _small(); before = state_snapshot(m)
    with pytest.raises(CalibrationError, match="empty"):
        tf.quantize(m, tf.Int8Static(calibration=[]), example_inputs=torch.randn(2, 1, 16, 16))
    with pytest.raises(CalibrationError, match="needs calibration data"):
        tf.quantize(m, tf.Int8Static(), example_inputs=torch.randn(2, 1, 16, 16))
    assert _unchanged(m, before) and isinstance(m[0], nn.Conv2d)


def test_wrong_shape_and_dtype():
    m = _small(); before = state_snapshot(m)
    x = torch.randn(2, 1, 16, 16)
    with pytest.raises(CalibrationError, match=r"batch 1.*shape \(4, 1, 20, 20\).*\(2, 1, 16, 16\)"):
        tf.quantize(m, tf.Int8Static(calibration=[torch.randn(4, 1, 16, 16), torch.randn(4, 1, 20, 20)]), example_inputs=x)
    with pytest.raises(CalibrationError, match="batch 0.*dtype float64.*float32"):
        tf.quantize(m, tf.Int8Static(calibration=[torch.randn(4, 1, 16, 16, dtype=torch.float64)]), example_inputs=x)
    # without example inputs the first batch is the reference; a batch the model rejects is named too
    with pytest.raises(CalibrationError, match="batch 0"):
        tf.quantize(m, tf.Int8Static(calibration=[torch.randn(4, 3, 16, 16)], progress=False))
    assert _unchanged(m, before)


def test_already_quantized():
    m = _small()
    cal = [torch.randn(4, 1, 16, 16) for _ in range(2)]
    # islands=False: int8 everywhere, whatever a timing of this tiny net on a busy machine would say
    q, _ = tf.quantize(m, tf.Int8Static(calibration=cal, islands=False, progress=False))
    for cfg in (tf.Int8Static(calibration=cal), tf.Int8Dynamic(), tf.HalfPrecision(), tf.WeightOnly(bits=8)):
        with pytest.raises(AlreadyQuantizedError, match="already quantized"):
            tf.quantize(q, cfg)
    d, _ = tf.quantize(nn.Sequential(nn.Linear(16, 16)).eval(), tf.Int8Dynamic(backend="torch.ao"))
    with pytest.raises(AlreadyQuantizedError, match="module '0'"):
        tf.quantize(d, tf.Int8Dynamic())
    w, _ = tf.quantize(nn.Sequential(nn.Linear(32, 32)).eval(), tf.WeightOnly(bits=8))
    with pytest.raises(AlreadyQuantizedError, match="parameter '0.weight'"):
        tf.quantize(w, tf.Int8Dynamic())


def test_unsupported_dtype_for_device():
    m = nn.Sequential(nn.Linear(64, 64)).eval(); before = state_snapshot(m)
    with pytest.raises(UnsupportedDeviceError, match=r"float16\) on CPU"):
        tf.quantize(m, tf.HalfPrecision(torch.float16))
    with pytest.raises(UnsupportedDeviceError, match="bits=4.*CUDA"):
        tf.quantize(m, tf.WeightOnly(bits=4))
    with pytest.raises(UnsupportedDeviceError, match="Float8.*sm89"):
        tf.quantize(m, tf.Float8())
    assert _unchanged(m, before) and m[0].weight.dtype == torch.float32


def test_config_validation():
    with pytest.raises(ConfigError, match="observer"):
        tf.Int8Static(observer="kl")
    with pytest.raises(ConfigError, match="bits"):
        tf.WeightOnly(bits=3)
    with pytest.raises(ConfigError, match="dtype"):
        tf.HalfPrecision(dtype=torch.int8)
    with pytest.raises(ConfigError, match="backend"):
        tf.Int8Dynamic(backend="onnx")
    with pytest.raises(ConfigError, match="percentile"):
        tf.Int8Static(percentile=30)
    with pytest.raises(TypeError, match="quantize\\(\\) takes"):
        tf.quantize(nn.Linear(2, 2), tf.LowRank() if hasattr(tf, "LowRank") else object())
