"""int8 dynamic: fidelity on the trained digits MLP and on all-MiniLM-L6-v2, LSTM/GRU, low-rank pairs, report."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import torchfast as tf
from torchfast.modules import state_snapshot


def _n_dynamic_linear(model):
    import torch.ao.nn.quantized.dynamic as nnqd
    return sum(isinstance(m, nnqd.Linear) for m in model.modules())


def test_digits_mlp_int8_dynamic_keeps_accuracy(digits_mlp):
    model, data = digits_mlp
    before = state_snapshot(model)
    q, rep = tf.quantize(model, tf.Int8Dynamic(backend="torch.ao", keep_slower=True), example_inputs=data.x_test[:64])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # original untouched
    assert q is not model
    assert len(rep.where(applied=True)) == 2
    assert _n_dynamic_linear(q) == 2
    base, acc = data.eval_fn(model), data.eval_fn(q)
    assert acc >= base - 0.005, (base, acc)
    fid = tf.measure.fidelity(model, q, data.x_test[:256])
    assert fid.top1_agreement >= 0.99 and fid.cosine > 0.999


def test_auto_backend_reports_timing_per_layer(digits_mlp):
    model, data = digits_mlp
    q, rep = tf.quantize(model, tf.Int8Dynamic(), example_inputs=data.x_test[:64])
    for row in rep.rows:
        assert row["fp32 ms"] is not None and row["int8 ms"] is not None
        if row["applied"]:
            assert row["int8 ms"] < row["fp32 ms"]          # measured faster, or left in fp32
        else:
            assert "slower" in row["reason"]
    assert "torch.ao" in rep.summary["backends tried"] and "torchao" in rep.summary["backends tried"]


def test_full_range_is_probed_and_exact_when_used():
    from torchfast.quant.dynamic import full_range_exact, _dynamic_linear_cls
    lin = nn.Linear(64, 32)
    x = torch.randn(16, 64)
    # 8-bit activations are only used where the probe finds them exact (VNNI); pre-VNNI AVX2 saturates
    for full in (False, True) if full_range_exact() else (False,):
        q = _dynamic_linear_cls().from_float_full(lin, per_channel=True, full_range=full)
        err = (q(x) - lin(x)).abs().max().item()
        assert err < 0.05
    assert isinstance(full_range_exact(), bool)


def test_seven_bit_weights_give_8_bit_activations_where_8_by_8_saturates():
    from torchfast.quant.dynamic import _dynamic_linear_cls, full_range_exact, precision_plan, seven_bit_weights_exact
    assert precision_plan(False) == (False, 8)
    if full_range_exact():
        assert precision_plan(None) == precision_plan(True) == (True, 8)
    elif seven_bit_weights_exact():
        assert precision_plan(None) == precision_plan(True) == (True, 7)
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    x = torch.randn(16, 64)
    for per_channel in (True, False):
        q = _dynamic_linear_cls().from_float_full(lin, per_channel=per_channel, full_range=True, weight_bits=7)
        w = q.weight().int_repr()
        assert w.abs().max() <= 64 and w.abs().max() >= 60          # the whole 7-bit range is used
        if seven_bit_weights_exact():
            assert (q(x) - lin(x)).abs().max().item() < 0.05


def test_lstm_gru_and_skip():
    class Seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(16, 32, batch_first=True)
            self.gru = nn.GRU(32, 32, batch_first=True)
            self.head = nn.Linear(32, 4)
            self.aux = nn.Linear(32, 4)

        def forward(self, x):
            y, _ = self.lstm(x)
            y, _ = self.gru(y)
            return self.head(y[:, -1]) + self.aux(y[:, -1])

    torch.manual_seed(0)
    m = Seq().eval()
    x = torch.randn(4, 10, 16)
    q, rep = tf.quantize(m, tf.Int8Dynamic(backend="torch.ao", exclude=("aux",)))
    names = {n: type(mod).__name__ for n, mod in q.named_modules()}
    assert "Dynamic" in type(q.lstm).__module__ + type(q.lstm).__name__ or "quantized" in type(q.lstm).__module__
    assert "quantized" in type(q.gru).__module__
    assert isinstance(q.aux, nn.Linear) and "excluded" in rep.where(layer="aux")[0]["reason"]
    assert torch.nn.functional.cosine_similarity(m(x), q(x)).mean() > 0.99, names


def test_factorized_linear_pair_quantizes():
    """A low-rank pair is two plain Linears in a Sequential: both layers quantize, output stays close."""
    torch.manual_seed(0)
    dense = nn.Linear(256, 256)
    u, s, vh = torch.linalg.svd(dense.weight.detach())
    r = 64
    pair = nn.Sequential(nn.Linear(256, r, bias=False), nn.Linear(r, 256))
    with torch.no_grad():
        pair[0].weight.copy_(torch.diag(s[:r]) @ vh[:r])
        pair[1].weight.copy_(u[:, :r])
        pair[1].bias.copy_(dense.bias)
    model = nn.Sequential(pair, nn.ReLU(), nn.Linear(256, 10)).eval()
    x = torch.randn(32, 256)
    q, rep = tf.quantize(model, tf.Int8Dynamic(backend="torch.ao"), example_inputs=x)
    assert rep.summary["layers quantized"] + rep.summary["layers kept in float"] == 3
    assert torch.nn.functional.cosine_similarity(model(x), q(x)).mean() > 0.995


def test_decompose_then_int8_dynamic(digits_mlp):
    lowrank = pytest.importorskip("torchfast.lowrank")
    model, data = digits_mlp
    try:
        lr, _ = tf.decompose(model, tf.LowRank(ratio=0.5))
    except Exception as e:  # the low-rank package is being built concurrently
        pytest.skip(f"torchfast.lowrank not usable yet: {e}")
    q, rep = tf.quantize(lr, tf.Int8Dynamic(backend="torch.ao", keep_slower=True))
    assert rep.summary["layers quantized"] >= 2
    assert data.eval_fn(q) >= data.eval_fn(lr) - 0.01


def test_minilm_int8_dynamic_cosine(minilm):
    from torchfast.zoo.minilm import batches, embedding_cosine
    model, tok = minilm
    bl = batches(tok, n_batches=2, batch_size=8, seq_len=64)
    q, rep = tf.quantize(model, tf.Int8Dynamic(backend="torch.ao", keep_slower=True))
    assert rep.summary["layers quantized"] == 37  # 6 layers x 6 Linears + pooler
    cos = embedding_cosine(model, q, bl)
    from torchfast.quant.dynamic import precision_plan
    eight_bit, weight_bits = precision_plan(None)
    assert (rep.summary["activation bits"], rep.summary["weight bits"]) == ((8, weight_bits) if eight_bit else (7, 8))
    assert cos >= (0.99 if eight_bit else 0.97), cos   # 7-bit activations only where no exact 8-bit pair exists
