import pytest
import torch
from torch import nn

import torchfast as tf
from torchfast import measure


def test_latency_fields_and_threads():
    m = nn.Linear(16, 16)
    lat = measure.latency(m, torch.randn(4, 16), warmup=1, runs=7, threads=1)
    assert lat.runs == 7 and lat.threads == 1
    assert 0 < lat.min_ms <= lat.median_ms <= lat.p90_ms
    assert torch.get_num_threads() == 2  # restored


def test_compare_latency_interleaved_and_ratio():
    a, b = nn.Linear(64, 64), nn.Linear(64, 64)
    cmp = measure.compare_latency(a, b, torch.randn(8, 64), warmup=1, runs=6)
    assert cmp.baseline.runs == cmp.candidate.runs == 6
    assert cmp.speedup == pytest.approx(cmp.baseline.median_ms / cmp.candidate.median_ms)


def test_size_counts_params_buffers_and_bytes():
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
    s = measure.size_of(m)
    assert s.params == 8 * 3 * 9 + 8 + 16
    assert s.buffers == 8 + 8 + 1
    assert s.bytes > 4 * s.params  # fp32 payload plus pickle overhead


def test_flops_of_linear_and_conv():
    assert measure.count_flops(nn.Linear(10, 20, bias=False), torch.randn(3, 10)) == 2 * 3 * 10 * 20
    conv = nn.Conv2d(4, 6, 3, padding=1, bias=False)
    assert measure.count_flops(conv, torch.randn(1, 4, 5, 5)) == 2 * 6 * 4 * 9 * 25
    total, per = measure.count_flops(nn.Sequential(conv), torch.randn(1, 4, 5, 5), per_module=True)
    assert total == per["Global"]


def test_fidelity_identical_and_different():
    torch.manual_seed(0)
    m = nn.Linear(8, 5)
    xs = [torch.randn(4, 8) for _ in range(3)]
    f = measure.fidelity(m, m, xs)
    assert f.max_abs_err == 0 and f.rel_err == 0 and f.cosine == pytest.approx(1.0) and f.top1_agreement == 1.0
    assert f.samples == 12
    other = nn.Linear(8, 5)
    g = measure.fidelity(m, other, xs)
    assert g.max_abs_err > 0 and g.cosine < 0.99


def test_cosine_does_not_depend_on_the_scale_of_the_outputs():
    # a deep net with vanishing activations (random-weight efficientnet_b0) outputs logits near 1e-14
    g = torch.Generator().manual_seed(0)
    ref = [torch.randn(4, 10, generator=g) for _ in range(2)]
    cand = [r + 0.3 * torch.randn(4, 10, generator=g) for r in ref]
    at_one = measure.compare_outputs(ref, cand)
    tiny = measure.compare_outputs([r * 1e-14 for r in ref], [c * 1e-14 for c in cand])
    assert tiny.cosine == pytest.approx(at_one.cosine, abs=1e-6) and at_one.cosine < 0.99
    assert tiny.worst_cosine == pytest.approx(at_one.worst_cosine, abs=1e-6)
    same = measure.compare_outputs([r * 1e-14 for r in ref], [r * 1e-14 for r in ref])
    assert same.cosine == pytest.approx(1.0)
    zero = measure.compare_outputs([torch.zeros(2, 3)], [torch.zeros(2, 3)])
    assert zero.max_abs_err == 0 and zero.cosine == 0.0   # no direction to agree on


def test_fidelity_eval_fn_and_shape_mismatch(digits_cnn):
    model, data = digits_cnn
    f = measure.fidelity(model, model, data.x_test[:32], eval_fn=data.eval_fn)
    assert f.metric == f.baseline_metric > 0.97
    with pytest.raises(ValueError, match="output shapes differ"):
        measure.fidelity(nn.Linear(4, 3), nn.Linear(4, 2), torch.randn(2, 4))
    with pytest.raises(ValueError, match="at least one"):
        measure.fidelity(model, model, [])


def test_accuracy_needs_samples():
    with pytest.raises(ValueError):
        measure.accuracy(nn.Linear(2, 2), [])


# ---------------------------------------------------------------- timing settings
class Counting(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.calls = nn.Linear(4, 4), 0

    def forward(self, x):
        self.calls += 1
        return self.lin(x)


@pytest.mark.parametrize("kwargs, field", [
    (dict(runs=0), "runs"), (dict(warmup=-1), "warmup"), (dict(threads=0), "threads"), (dict(settle=-2), "settle"),
    (dict(runs=2.5), "runs"), (dict(runs=True), "runs"), (dict(threads="4"), "threads"),
])
def test_timing_validates(kwargs, field):
    with pytest.raises(tf.ConfigError, match=f"Timing.{field} must be an integer"):
        measure.Timing(**kwargs)


def test_timing_defaults_and_quick_shares_match_the_old_numbers():
    d = measure.Timing()
    assert (d.runs, d.warmup, d.threads, d.settle) == (20, 3, None, 0)
    assert measure.DEFAULT_TIMING == d
    assert d.scaled(0.5) == measure.Timing(runs=10, warmup=2)      # one layer, backend='auto' first round
    assert d.scaled(0.75) == measure.Timing(runs=15, warmup=3)     # one sparse kernel
    assert measure.Timing(runs=1, warmup=0).scaled(0.1) == measure.Timing(runs=1, warmup=0)
    with pytest.raises(ValueError, match="share must be > 0"):
        d.scaled(0)
    with pytest.raises(TypeError, match="Timing"):
        measure.resolve_timing({"runs": 3})


def test_changed_default_timing_reaches_every_measurement(monkeypatch):
    monkeypatch.setattr(measure, "DEFAULT_TIMING", measure.Timing(runs=4, warmup=2, threads=1, settle=1))
    a, b, x = Counting(), Counting(), torch.randn(2, 4)
    cmp = measure.compare_latency(a, b, x)
    assert cmp.baseline.runs == cmp.candidate.runs == 4 and cmp.baseline.threads == 1
    assert a.calls == b.calls == 2 + 4 * 2  # warm-up, then one settling call before each timed one
    assert torch.get_num_threads() == 2  # restored
    a.calls = 0
    lat = measure.latency(a, x, runs=3)  # an explicit number wins over the default
    assert (lat.runs, lat.threads, a.calls) == (3, 1, 2 + 3 * 2)
    many = measure.compare_many({"a": a, "b": b}, x, settle=0)
    assert {k: v.runs for k, v in many.items()} == {"a": 4, "b": 4}
    # quick checks take their share of the default as it is now
    assert measure.resolve_timing(share=0.5) == measure.Timing(runs=2, warmup=1, threads=1, settle=1)
    explicit = measure.Timing(runs=2, warmup=0)
    a.calls = b.calls = 0
    measure.compare_latency(a, b, x, timing=explicit)
    assert a.calls == b.calls == 2
