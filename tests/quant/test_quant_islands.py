"""Int8 islands: int8 layers between float ops stay int8 only where they repay their quantize/dequantize."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchfast as tf
from torchfast.config import ConfigError
from torchfast.measure import Comparison, Latency
from torchfast.quant import islands
from torchfast.quant.islands import SKIPPED, Segment, Verdict, decide, merge


# ---------------------------------------------------------------- the decision on given numbers
def test_island_saving_less_than_its_boundary_is_dropped_and_more_is_kept():
    cheap = Segment(("g:lin",), frozenset({"g:q1", "g:dq1"}), ("lin",))
    big = Segment(("g:conv",), frozenset({"g:q2", "g:dq2"}), ("conv",))
    saved = {"g:lin": -0.01, "g:conv": 5.0}
    cost = {"g:q1": 0.02, "g:dq1": 0.02, "g:q2": 0.4, "g:dq2": 0.3}
    verdicts = {v.island.layers: v for v in decide([cheap, big], saved, cost)}
    assert not verdicts[("lin",)].keep and verdicts[("conv",)].keep
    assert verdicts[("lin",)].cost_ms == pytest.approx(0.04)
    assert verdicts[("conv",)].saved_ms == pytest.approx(5.0)
    assert "quantize/dequantize costs 0.0400 ms" in verdicts[("lin",)].reason
    assert "slower than float" in verdicts[("lin",)].reason
    assert Verdict(big, 0.7, 0.7).keep   # a saving that exactly repays its boundary keeps int8


def test_segments_sharing_a_boundary_op_are_one_island():
    a = Segment(("g:a",), frozenset({"g:q_in", "g:q_shared", "g:dq_a"}), ("a",))
    b = Segment(("g:b",), frozenset({"g:q_shared", "g:dq_b"}), ("b",))
    c = Segment(("g:c",), frozenset({"g:q_c", "g:dq_c"}), ("c",))
    merged = merge([a, b, c])
    assert len(merged) == 2
    ab = next(s for s in merged if "a" in s.layers)
    assert set(ab.layers) == {"a", "b"} and set(ab.nodes) == {"g:a", "g:b"}
    assert ab.boundary == {"g:q_in", "g:q_shared", "g:dq_a", "g:dq_b"}
    # alone each saves 3 ms against 4 ms of boundary; together 6 ms against 5 (the shared quantize once)
    saved = {"g:a": 3.0, "g:b": 3.0, "g:c": 0.0}
    cost = {"g:q_in": 1.0, "g:q_shared": 2.0, "g:dq_a": 1.0, "g:dq_b": 1.0, "g:q_c": 1.0, "g:dq_c": 1.0}
    assert not decide([a], saved, cost)[0].keep
    v = next(v for v in decide([a, b, c], saved, cost) if "a" in v.island.layers)
    assert v.keep and v.saved_ms == pytest.approx(6.0) and v.cost_ms == pytest.approx(5.0)


def test_chain_of_shared_boundaries_merges_transitively():
    segs = [Segment((f"g:{i}",), frozenset({f"g:b{i}", f"g:b{i + 1}"})) for i in range(4)]
    assert len(merge(segs)) == 1
    assert len(merge([Segment(("g:x",), frozenset({"g:bx"})), *segs])) == 2


# ---------------------------------------------------------------- integration: extreme contrast
class Contrast(nn.Module):
    """A large conv and a tiny linear, each between float SiLUs; the mean between them runs int8 too."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(128, 128, 3, padding=1)
        self.act = nn.SiLU()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        y = self.act(self.conv(F.silu(x)))
        z = y.mean((2, 3))[:, :4]
        return F.silu(self.lin(self.act(z)))


@pytest.fixture(scope="module")
def contrast():
    torch.manual_seed(0)
    model = Contrast().eval()
    model.act.train()   # a submodule's flag the transform must leave as it was
    cal = [torch.randn(1, 128, 56, 56) for _ in range(3)]
    before = copy.deepcopy(model.state_dict())
    # the islands are judged on real timings (their contrast is extreme); the whole-model check after the
    # rebuild weighs a ~0.3 ms change against ~6 ms of 2-core noise, so here it is told "not slower"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(islands, "compare_latency", _same_speed)
        q, rep = tf.quantize(model, tf.Int8Static(calibration=cal, progress=False, equalize=False,
                                                  bias_correction=False))
    return model, cal, before, q, rep


def _latency(ms):
    return Latency(median_ms=ms, p90_ms=ms * 1.05, mean_ms=ms, min_ms=ms, runs=10, threads=1)


def _same_speed(first, rebuilt, batch, **kw):
    return Comparison(_latency(1.0), _latency(1.0))


def test_tiny_linear_between_float_ops_comes_back_float_with_the_reason(contrast):
    model, cal, _, q, rep = contrast
    lin = next(r for r in rep.rows if r["layer"] == "lin")
    assert lin["applied"] is False and lin["scheme"] == "fp32"
    assert "int8 island" in lin["reason"] and "quantize/dequantize costs" in lin["reason"]
    assert type(q.get_submodule("lin")) is nn.Linear
    conv = next(r for r in rep.rows if r["layer"] == "conv")
    assert conv["applied"] is True
    assert "quantized" in type(q.get_submodule("conv")).__module__
    assert rep.summary["int8 islands dropped"] >= 1 and rep.summary["int8 islands"] >= 2
    assert any("kept float" in n and "(lin)" in n for n in rep.notes)
    # the quantized mean between them had nothing to save: it went float too (a method, floated by name)
    assert ".mean(" in q.code and q.code.count("torch.quantize_per_tensor(") == 1   # the conv's input only
    with torch.no_grad():
        ref, out = model(cal[0]), q(cal[0])
    assert F.cosine_similarity(ref.flatten(), out.flatten(), dim=0) > 0.99


def test_the_users_model_is_untouched(contrast):
    model, _, before, _, _ = contrast
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert type(model.conv) is nn.Conv2d and type(model.lin) is nn.Linear
    assert not model.training and model.act.training and not model.conv.training
    assert not hasattr(model.conv, "qconfig")


# ---------------------------------------------------------------- the rebuild, with decisions given
class SiluNet(nn.Module):
    """Residual SiLU blocks with a squeeze-excite gate: functional add/mul/sigmoid and a .mean() method
    inside the int8 islands."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.c1 = nn.Conv2d(8, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 1)
        self.se = nn.Conv2d(8, 8, 1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = F.silu(self.stem(x))
        y = self.c2(F.silu(self.c1(x)))
        y = x + y * torch.sigmoid(self.se(y.mean((2, 3), keepdim=True)))
        return self.head(F.silu(F.silu(y).mean((2, 3))))   # that mean: an int8 island with no layer


def _drop(which):
    """A decision that drops the islands ``which(island)`` picks, with made-up numbers."""
    def fake(segments, saved, cost):
        return [Verdict(isl, 0.0 if which(isl) else 1.0, 0.5) for isl in merge(segments)]
    return fake


def _silu_net_run(**cfg):
    torch.manual_seed(0)
    model = SiluNet().eval()
    cal = [torch.randn(2, 3, 16, 16) for _ in range(3)]
    q, rep = tf.quantize(model, tf.Int8Static(calibration=cal, progress=False, equalize=False,
                                              bias_correction=False, **cfg))
    return model, cal, q, rep


def test_dropped_islands_float_their_functional_ops_and_methods_too(monkeypatch):
    monkeypatch.setattr(islands, "decide", _drop(lambda isl: True))
    monkeypatch.setattr(islands, "compare_latency", _same_speed)   # decisions given: no timing at all
    model, cal, q, rep = _silu_net_run()
    assert rep.summary["int8 islands dropped"] == rep.summary["int8 islands"] >= 2
    assert "quantize_per_tensor" not in q.code and "quantized" not in q.code   # add, mul, sigmoid, mean too
    with torch.no_grad():
        assert torch.allclose(model(cal[0]), q(cal[0]), atol=1e-5)
    assert all(not r["applied"] and "int8 island" in r["reason"] for r in rep.rows)


def test_rebuild_measured_slower_keeps_the_first_build(monkeypatch):
    monkeypatch.setattr(islands, "decide", _drop(lambda isl: "head" in isl.layers))

    def slower(first, rebuilt, batch, **kw):
        return Comparison(_latency(1.0), _latency(2.0))
    monkeypatch.setattr(islands, "compare_latency", slower)
    _, _, q, rep = _silu_net_run()
    assert rep.summary["int8 islands dropped"] == 0
    assert next(r for r in rep.rows if r["layer"] == "head")["applied"] is True
    assert any("the first build is kept" in n for n in rep.notes)


def test_island_whose_method_cannot_float_alone_stays_int8_with_the_reason(monkeypatch):
    # the head's input mean (a root-level .mean() island of its own) is dropped, but the gate's .mean()
    # at the same root scope stays int8: a method has no per-call qconfig, so that island cannot float
    monkeypatch.setattr(islands, "decide", _drop(lambda isl: not isl.layers))
    _, _, q, rep = _silu_net_run()
    assert rep.summary["int8 islands dropped"] == 0
    assert any("stays int8" in n and ".mean()" in n for n in rep.notes)
    assert all(r["applied"] for r in rep.rows)


# ---------------------------------------------------------------- no float regions, switched off
def test_all_int8_model_skips_the_analysis(monkeypatch):
    def never(*a, **k):
        raise AssertionError("an all-int8 model must not be timed island by island")
    monkeypatch.setattr(islands, "compare_many", never)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(),
                          nn.MaxPool2d(2), nn.Conv2d(8, 4, 1)).eval()   # (nn.Flatten would run float)
    cal = [torch.randn(2, 3, 16, 16) for _ in range(2)]
    _, rep = tf.quantize(model, tf.Int8Static(calibration=cal, progress=False))
    assert rep.summary["int8 island analysis"] == SKIPPED
    assert "int8 islands dropped" not in rep.summary
    assert all(r["applied"] for r in rep.rows)


@pytest.mark.parametrize("off", [dict(islands=False), dict(keep_slower=True)])
def test_islands_off_leaves_every_int8_layer(monkeypatch, off):
    monkeypatch.setattr(islands, "keep_paying_islands", lambda *a, **k: pytest.fail(f"{off} analysed islands"))
    _, _, q, rep = _silu_net_run(**off)
    assert "int8 island analysis" not in rep.summary
    assert all(r["applied"] for r in rep.rows)


# ---------------------------------------------------------------- config
def test_islands_config_validates_and_round_trips():
    assert tf.Int8Static().islands is True
    with pytest.raises(ConfigError, match="Int8Static.islands"):
        tf.Int8Static(islands="yes")
    with pytest.raises(ConfigError, match="Int8Static.islands"):
        tf.Int8Static(islands=None)
    d = tf.Int8Static(islands=False, observer="minmax").to_dict()
    assert d["islands"] is False
    back = tf.Int8Static.from_dict(d)
    assert back.islands is False and back == tf.Int8Static(islands=False, observer="minmax")
    assert tf.Int8Static.from_dict(tf.Int8Static().to_dict()).islands is True
