"""Serialization: state_dict round-trips and TorchScript save/load reproducing outputs."""
from __future__ import annotations

import io

import torch
from torch import nn

import torchfast as tf


def _script_roundtrip(q, x):
    traced = torch.jit.trace(q, x, check_trace=False)
    buf = io.BytesIO()
    torch.jit.save(traced, buf)
    buf.seek(0)
    return torch.jit.load(buf)


def test_static_state_dict_and_torchscript(digits_cnn):
    model, data = digits_cnn
    x = data.x_test[:16]
    q, _ = tf.quantize(model, tf.Int8Static(calibration=data.calibration(4), progress=False, keep_slower=True),
                       example_inputs=x)
    # state_dict round trip into a model quantized from other calibration data
    other, _ = tf.quantize(model, tf.Int8Static(calibration=[data.x_train[-64:]], observer="minmax", progress=False,
                                                islands=False))   # the same int8 structure as q
    buf = io.BytesIO()
    torch.save(q.state_dict(), buf)
    buf.seek(0)
    other.load_state_dict(torch.load(buf, weights_only=False))
    with torch.no_grad():
        assert torch.equal(q(x), other(x))
        loaded = _script_roundtrip(q, x)
        assert torch.equal(loaded(x), q(x))
        assert torch.equal(loaded(data.x_test[16:48]), q(data.x_test[16:48]))  # other batch size


def test_dynamic_state_dict_and_torchscript(digits_mlp):
    model, data = digits_mlp
    x = data.x_test[:16]
    q, _ = tf.quantize(model, tf.Int8Dynamic(backend="torch.ao", keep_slower=True))
    fresh, _ = tf.quantize(type(model)(), tf.Int8Dynamic(backend="torch.ao", keep_slower=True))
    fresh.load_state_dict(q.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh(x), q(x))
        loaded = _script_roundtrip(q, x)
        assert torch.equal(loaded(x), q(x))


def test_lstm_dynamic_torchscript():
    torch.manual_seed(0)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm, self.fc = nn.LSTM(8, 16, batch_first=True), nn.Linear(16, 3)

        def forward(self, x):
            return self.fc(self.lstm(x)[0][:, -1])

    m = M().eval()
    x = torch.randn(2, 5, 8)
    q, _ = tf.quantize(m, tf.Int8Dynamic(backend="torch.ao"))
    with torch.no_grad():
        assert torch.allclose(_script_roundtrip(q, x)(x), q(x))
