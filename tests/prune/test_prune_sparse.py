"""Sparse kernels: masks are right, swapped layers compute the masked dense result, CUDA-only paths skip."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import torchfast as tf
from torchfast.prune.sparse import SparseLinear, magnitude_mask, mask_24


def test_masks():
    w = torch.randn(16, 32)
    m = mask_24(w)
    assert (m.reshape(16, 8, 4).sum(-1) == 2).all()
    kept = w.abs()[m].min()
    dropped = w.abs().reshape(16, 8, 4)[~m.reshape(16, 8, 4)].reshape(16, 8, 2).max(-1).values
    assert (w.abs().reshape(16, 8, 4).topk(2, -1).values[..., 1] >= dropped).all() and kept > 0
    mm = magnitude_mask(w, 0.75)
    assert abs(mm.float().mean().item() - 0.25) < 0.01


@pytest.mark.parametrize("layout", ["csr", "bsr"])
def test_sparse_linear_matches_dense(layout):
    w = torch.randn(64, 32) * magnitude_mask(torch.randn(64, 32), 0.8)
    b = torch.randn(64)
    sl = SparseLinear(w, b, layout, 16)
    x = torch.randn(3, 5, 32)
    torch.testing.assert_close(sl(x), torch.nn.functional.linear(x, w, b), atol=1e-5, rtol=1e-5)


def test_unstructured_on_trained_cnn(digits_cnn):
    model, data = digits_cnn
    x = data.x_test[:64]
    sm, rep = tf.sparsify(copy.deepcopy(model), tf.UnstructuredSparse(amount=0.8, runs=5, exclude=("classifier.4",)), example_inputs=x)
    assert {r["layer"] for r in rep.rows} == {"classifier.1", "classifier.4"}
    assert "excluded" in rep.where(layer="classifier.4")[0]["reason"]
    for r in rep.where(layer="classifier.1"):
        assert abs(r["sparsity"] - 0.8) < 0.01 and r["reason"]
        assert r["applied"] == (r["kernel"] != "dense")
    dense_masked = copy.deepcopy(model)
    lin = dense_masked.classifier[1]
    lin.weight.data *= magnitude_mask(lin.weight, 0.8)
    torch.testing.assert_close(sm(x), dense_masked(x), atol=1e-4, rtol=1e-4)
    assert data.eval_fn(sm) > 0.9


def test_semistructured_on_cpu_masks_and_reports(digits_cnn):
    model, data = digits_cnn
    sm, rep = tf.sparsify(copy.deepcopy(model), tf.SemiStructured24(), example_inputs=data.x_test[:8])
    assert all(not r["applied"] and "CUDA" in r["reason"] for r in rep.rows)
    assert (sm.classifier[1].weight.reshape(256, -1, 4) != 0).sum(-1).max() <= 2
    snap = copy.deepcopy(model.state_dict())
    with pytest.raises(RuntimeError, match="require_kernel.*CUDA"):
        tf.sparsify(model, tf.SemiStructured24(require_kernel=True), example_inputs=data.x_test[:8])
    assert all(torch.equal(snap[k], v) for k, v in model.state_dict().items())


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0),
                    reason="2:4 semi-structured kernels need a CUDA GPU with compute capability >= 8.0")
def test_semistructured_cuda():
    m = nn.Sequential(nn.Linear(1024, 4096), nn.ReLU(), nn.Linear(4096, 1024)).half().cuda().eval()
    x = torch.randn(256, 1024, device="cuda", dtype=torch.half)
    sm, rep = tf.sparsify(copy.deepcopy(m), tf.SemiStructured24(min_speedup=0.0), example_inputs=x)
    assert all(r["applied"] for r in rep.rows)
    ref = copy.deepcopy(m)
    for i in (0, 2):
        ref[i].weight.data *= tf.prune.sparse.mask_24(ref[i].weight)
    torch.testing.assert_close(sm(x), ref(x), atol=2e-2, rtol=2e-2)


def test_kernel_timing_is_a_share_of_the_default_timing(monkeypatch):
    import torchfast.prune.sparse as sp
    from torchfast import measure
    seen, real = [], sp.compare_latency
    monkeypatch.setattr(sp, "compare_latency", lambda *a, timing, **k: seen.append(timing) or real(*a, timing=timing, **k))
    monkeypatch.setattr(measure, "DEFAULT_TIMING", measure.Timing(runs=4, warmup=2, threads=1))
    m, x = nn.Sequential(nn.Linear(32, 64)), torch.randn(4, 32)
    tf.sparsify(m, tf.UnstructuredSparse(amount=0.9), example_inputs=x)
    assert seen and set(seen) == {measure.Timing(runs=3, warmup=2, threads=1)}
    seen.clear()
    tf.sparsify(m, tf.UnstructuredSparse(amount=0.9, runs=2), example_inputs=x)
    assert seen and {t.runs for t in seen} == {2}
    with pytest.raises(tf.ConfigError, match="runs"):
        tf.UnstructuredSparse(runs=0)
