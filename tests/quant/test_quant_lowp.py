"""Weight-only int8 (CPU via torchao), int4/float8 (CUDA only), bf16/fp16 casting."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import torchfast as tf

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torchao int4/float8 kernels)")


def test_weight_only_int8_cpu(digits_mlp):
    model, data = digits_mlp
    q, rep = tf.quantize(model, tf.WeightOnly(bits=8))
    assert rep.summary["layers quantized"] == 1          # 784->128; 128->10 is not a multiple of 16
    assert rep.where(layer="net.3")[0]["applied"] is False
    assert "Int8" in type(q.net[1].weight).__name__
    assert data.eval_fn(q) >= data.eval_fn(model) - 0.005
    assert type(model.net[1].weight) is nn.Parameter    # original untouched


@cuda
def test_weight_only_int4_cuda():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 256)).cuda().to(torch.bfloat16).eval()
    x = torch.randn(8, 256, device="cuda", dtype=torch.bfloat16)
    q, rep = tf.quantize(m, tf.WeightOnly(bits=4, group_size=128))
    assert rep.summary["layers quantized"] == 2
    assert torch.nn.functional.cosine_similarity(m(x).float(), q(x).float()).mean() > 0.98


@cuda
def test_float8_cuda():
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("float8 needs sm89+")
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 256)).cuda().to(torch.bfloat16).eval()
    x = torch.randn(16, 256, device="cuda", dtype=torch.bfloat16)
    q, rep = tf.quantize(m, tf.Float8())
    assert torch.nn.functional.cosine_similarity(m(x).float(), q(x).float()).mean() > 0.98


def test_bf16_cast_is_drop_in(digits_cnn):
    model, data = digits_cnn
    q, rep = tf.quantize(model, tf.HalfPrecision("bf16", keep_slower=True))
    out = q(data.x_test[:8])
    assert out.dtype == torch.float32                   # inputs cast in, outputs back
    assert data.eval_fn(q) >= data.eval_fn(model) - 0.01
    assert next(model.parameters()).dtype == torch.float32


def test_bf16_measured_keeps_fp32_when_slower():
    m = nn.Sequential(nn.Linear(8, 8)).eval()
    q, rep = tf.quantize(m, tf.HalfPrecision("bf16"), example_inputs=torch.randn(2, 8))
    assert "speedup" in rep.summary
    applied = rep.rows[0]["applied"]
    assert (next(q.parameters()).dtype == torch.bfloat16) == applied
