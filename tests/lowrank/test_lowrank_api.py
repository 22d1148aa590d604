"""decompose(): errors, untouched models, copies, dtype, skips, report, and downstream tools."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import torchfast as tf
from torchfast.config import ConfigError
from torchfast.lowrank import LowRankConv2d, LowRankLinear
from torchfast.modules import state_snapshot


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(16, 32, 3, padding=1)
        self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.pw = nn.Conv2d(32, 32, 1)
        self.fc = nn.Linear(32 * 8 * 8, 64)
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        x = torch.relu(self.pw(self.dw(torch.relu(self.conv(x)))))
        return self.head(torch.relu(self.fc(x.flatten(1))))


def small():
    torch.manual_seed(0)
    return Small().eval()


X = torch.randn(4, 16, 8, 8)


def _same(a, b):
    sa, sb = state_snapshot(a), state_snapshot(b)
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("make, match", [
    (lambda: tf.LowRank(rank=0), "rank must be >= 1, got 0"),
    (lambda: tf.LowRank(method="cp"), "method"),
    (lambda: tf.LowRank(ratio=1.5), "ratio"),
    (lambda: tf.LowRank(ratio=0.5, energy=0.9), "at most one"),
    (lambda: tf.LowRank(rank={"fc": -1}), r"rank\['fc'\]"),
    (lambda: tf.LowRank(allocation="global", energy=0.9), "global"),
    (lambda: tf.LowRank(budget=0.01), "eval_fn"),
])
def test_config_errors(make, match):
    with pytest.raises(ConfigError, match=match):
        make()


def test_errors_leave_model_untouched():
    m = small()
    before = {n: type(x) for n, x in m.named_modules()}
    ref = state_snapshot(m)
    with pytest.raises(ValueError, match=r"rank=100 is larger than layer 'conv'.*at most 32"):
        tf.decompose(m, tf.LowRank(rank=100))
    with pytest.raises(TypeError, match="must be a torch.nn.Module"):
        tf.decompose("resnet", tf.LowRank())
    with pytest.raises(ConfigError, match="covers all 5 Conv2d/Linear"):
        tf.decompose(m, tf.LowRank(exclude=("*",)))
    with pytest.raises(ConfigError, match="'nope'.*no submodule"):
        tf.decompose(m, tf.LowRank(exclude=("nope",)))
    with pytest.raises(ValueError, match="'nope', which is not a Conv2d/Linear"):
        tf.decompose(m, tf.LowRank(rank={"nope": 2}))
    with pytest.raises(ValueError, match="no Conv2d or Linear"):
        tf.decompose(nn.Sequential(nn.ReLU()), tf.LowRank())
    with pytest.raises(ConfigError, match="needs calibration"):
        tf.decompose(m, tf.LowRank(data_aware=True))
    with pytest.raises(TypeError, match="LowRank"):
        tf.decompose(m, object())
    assert {n: type(x) for n, x in m.named_modules()} == before
    assert _same(m, small()) and all(torch.equal(v, state_snapshot(m)[k]) for k, v in ref.items())


def test_inplace_false_copies_and_report_lists_every_layer():
    m = small()
    out, rep = tf.decompose(m, tf.LowRank(ratio=0.5), example_inputs=X, inplace=False)
    assert out is not m and type(m.fc) is nn.Linear and _same(m, small())
    assert isinstance(out.fc, LowRankLinear) and isinstance(out.conv, LowRankConv2d)
    rows = {r["layer"]: r for r in rep.rows}
    assert set(rows) == {"conv", "dw", "pw", "fc", "head"}
    assert not rows["dw"]["applied"] and "groups=32" in rows["dw"]["reason"]
    assert not rows["pw"]["applied"] and "FLOPs" in rows["pw"]["reason"]  # 32->32 1x1 at rank 16: no gain
    for r in rep.where(applied=True):
        assert r["params_after"] < r["params_before"] and r["mflops_after"] < r["mflops_before"]
        assert 0 <= r["weight_err"] < 1
    d = json.loads(rep.to_json())
    assert d["summary"]["layers_factorized"] == len(rep.where(applied=True)) >= 3
    assert "| layer" in str(rep)
    torch.testing.assert_close(out(X), m(X), atol=10, rtol=10)  # runs, same shape
    f0, f1 = tf.measure.count_flops(m, X), tf.measure.count_flops(out, X)
    assert f1 < f0


def test_inplace_and_dtype_preserved():
    m = small().double()
    out, _ = tf.decompose(m, tf.LowRank(ratio=0.5), inplace=True)
    assert out is m and isinstance(m.fc, LowRankLinear)
    assert all(p.dtype == torch.float64 for p in m.parameters())
    assert m(X.double()).dtype == torch.float64
    h = small().to(torch.bfloat16)
    h, _ = tf.decompose(h, tf.LowRank(method="tucker", ratio=0.5))
    assert all(p.dtype == torch.bfloat16 for p in h.parameters())


def test_mha_and_tied_and_rank_map_skipped():
    class T(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
            self.a = nn.Linear(32, 32)
            self.b = nn.Linear(32, 32)
            self.b.weight = self.a.weight
            self.c = nn.Linear(32, 128)

        def forward(self, x):
            return self.c(self.b(self.a(self.attn(x, x, x)[0])))

    torch.manual_seed(0)
    m = T().eval()
    x = torch.randn(2, 5, 32)
    out, rep = tf.decompose(m, tf.LowRank(rank={"c": 8, "a": 4}), example_inputs=x, inplace=False)
    rows = {r["layer"]: r for r in rep.rows}
    assert "MultiheadAttention" in rows["attn.out_proj"]["reason"]
    assert "tied" in rows["a"]["reason"] and "tied" in rows["b"]["reason"]
    assert rows["c"]["applied"] and rows["c"]["rank"] == "8"
    assert out(x).shape == (2, 5, 128)


def test_speed_guard_decides_every_layer():
    m = small()
    out, rep = tf.decompose(m, tf.LowRank(ratio=0.25, speed_guard=True, guard_runs=3, progress=False),
                            example_inputs=X, inplace=False)
    for r in rep.rows:
        if r["layer"] in ("conv", "fc", "head"):
            assert r["speedup"] is not None and r["speedup"] > 0
            assert r["applied"] == (r["speedup"] >= 1.0) or "speed guard" in r["reason"]
    with pytest.raises(ValueError, match="speed_guard"):
        tf.decompose(m, tf.LowRank(speed_guard=True))


def test_speed_guard_timing_follows_the_default_timing(monkeypatch):
    import torchfast.lowrank.select as sel
    from torchfast import measure
    seen, real = [], sel.compare_latency
    monkeypatch.setattr(sel, "compare_latency", lambda *a, timing, **k: seen.append(timing) or real(*a, timing=timing, **k))
    monkeypatch.setattr(measure, "DEFAULT_TIMING", measure.Timing(runs=4, warmup=1, threads=1))
    tf.decompose(small(), tf.LowRank(ratio=0.25, speed_guard=True, progress=False), example_inputs=X)
    assert seen and set(seen) == {measure.Timing(runs=2, warmup=1, threads=1)}  # half the default per layer


def test_downstream_tools_handle_factorized_model():
    m = small()
    out, _ = tf.decompose(m, tf.LowRank(method="tucker", ratio=0.5), example_inputs=X, inplace=False)
    ref = out(X)
    scripted = torch.jit.script(out)
    torch.testing.assert_close(scripted(X), ref)
    gm = torch.fx.symbolic_trace(out)
    torch.testing.assert_close(gm(X), ref)
    assert any(n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.Conv2d) for n in gm.graph.nodes)
    ep = torch.export.export(out, (X,))
    torch.testing.assert_close(ep.module()(X), ref)


def test_recipe_stage_registered():
    from torchfast.recipe import apply_recipe
    m, reps = apply_recipe(small(), [tf.LowRank(ratio=0.5)], example_inputs=X, calibration=[X])
    assert reps[0].summary["data_aware"] is True and isinstance(m.fc, LowRankLinear)


def test_tucker_ranks_clamped_to_what_the_kernel_has():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1))  # r_in = 1 -> r_out can be at most 1*3*3
    out, rep = tf.decompose(m, tf.LowRank(method="tucker", ratio=0.25, min_flops_reduction=0), inplace=False)
    assert rep.rows[0]["rank"] == "1,9" and out(torch.randn(1, 3, 8, 8)).shape == (1, 64, 8, 8)
