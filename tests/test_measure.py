import pytest
import torch
from torch import nn

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
