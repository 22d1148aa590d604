"""backend="auto": every candidate is a report row (built, skipped, failed or rejected, with the reason),
the returned model is one of the faithful ones, and a crash or an unfaithful engine never escapes."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import torchfast as tf
from torchfast.backends import BackendError, eager as eager_backend
from torchfast.backends.compiled import Built


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 4)).eval()


def _rows(compiled):
    return {r["candidate"]: r for r in compiled.report.rows}


def test_auto_lists_every_candidate_and_returns_a_faithful_one():
    m, x = _net(), torch.randn(4, 1, 8, 8)
    c = tf.compile(m, x, backend="auto", candidates=["eager", "torchscript", "tensorrt", "xla"], runs=3,
                   progress=False)
    rows = _rows(c)
    assert set(rows) == {"eager", "torchscript", "tensorrt", "xla"}
    assert rows["tensorrt"]["status"] == "skipped" and "cuda" in rows["tensorrt"]["note"]
    assert rows["xla"]["status"] == "skipped"
    chosen = [k for k, r in rows.items() if r["status"] == "chosen"]
    assert len(chosen) == 1 and chosen[0] in ("eager", "torchscript") and c.backend == chosen[0]
    assert all(rows[k]["speedup"] is not None for k in ("eager", "torchscript"))
    torch.testing.assert_close(c(x), m(x), atol=1e-5, rtol=1e-5)
    assert c.report.summary["chosen"] == chosen[0]


def test_a_crashing_or_unfaithful_candidate_is_a_row_not_an_exception(monkeypatch):
    m, x = _net(), torch.randn(4, 1, 8, 8)
    from torchfast.backends import torchscript, export

    def boom(*a, **k):
        raise RuntimeError("engine exploded\nwith a long traceback")

    def noisy(model, inputs, options, *, dynamic_batch=False):
        return Built(runnable=lambda *a, **k: model(*a, **k) + 10.0)
    monkeypatch.setattr(torchscript, "build", boom)
    monkeypatch.setattr(export, "build", noisy)
    c = tf.compile(m, x, backend="auto", candidates=["eager", "torchscript", "export"], runs=3, progress=False)
    rows = _rows(c)
    assert rows["torchscript"]["status"] == "failed" and "engine exploded" in rows["torchscript"]["note"]
    assert "\n" not in rows["torchscript"]["note"]
    assert rows["export"]["status"] == "rejected" and "cosine" in rows["export"]["note"]
    assert rows["eager"]["status"] == "chosen" and c.backend == "eager"


def test_no_faithful_candidate_is_one_clear_error(monkeypatch):
    m, x = _net(), torch.randn(4, 1, 8, 8)
    monkeypatch.setattr(eager_backend, "build", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("nope")))
    with pytest.raises(BackendError, match="no candidate.*eager: failed"):
        tf.compile(m, x, backend="auto", candidates=["eager"], runs=2, progress=False)


def test_auto_with_int8_adds_each_lowering_and_optimize_uses_it(digits_cnn):
    model, data = digits_cnn
    x = data.x_test[:16]
    calib = data.calibration()[:4]
    c = tf.compile(model, x, backend="auto", candidates=["eager", "torchscript"], int8=tf.Int8Static(calibration=calib),
                   runs=3, progress=False)
    rows = _rows(c)
    assert {"eager", "torchscript", "eager + int8 static", "torchscript + int8 static"} <= set(rows)
    assert all(r["status"] in ("ok", "chosen") for r in rows.values()), rows
    res = tf.optimize(model, x, recipe=[tf.Int8Static()], backend="auto", calibration=calib,
                      backend_options={"candidates": ["eager", "torchscript"], "runs": 3}, runs=3, progress=False)
    last = res.stages[-1]
    assert last.name.startswith("compile: auto + Int8Static") and last.applied, last.reason
    assert len(res.stages) == 2  # the int8 stage ran inside the compile step, not as its own stage
    assert res.report.children[-1].title == "compile: auto"


class _Branchy(nn.Module):
    """Most of its Linears sit behind data-dependent control flow, which torch.ao's FX tracer cannot follow."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(16, 16) for _ in range(4))

    def forward(self, x):
        for b in self.blocks:
            x = b(x) if x.sum() > -1e9 else x
        return x


class _MostlyUntraceable(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = _Branchy()
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.body(x))


def test_an_int8_candidate_that_stays_mostly_float_is_a_failed_row_saying_why():
    model = _MostlyUntraceable().eval()
    x = torch.randn(8, 16)
    calib = [torch.randn(8, 16) for _ in range(4)]
    c = tf.compile(model, x, backend="auto", candidates=["eager", "torchscript"], runs=2, progress=False,
                   int8=tf.Int8Static(calibration=calib))
    rows = {r["candidate"]: r for r in c.report.rows}
    for name in ("eager + int8 static", "torchscript + int8 static"):
        assert rows[name]["status"] == "failed"
        assert "quantized only 1 of 5 Linear/Conv layers" in rows[name]["note"], rows[name]["note"]
    assert rows["eager"]["status"] in ("ok", "chosen")


def test_inductor_compiles_the_same_model_twice_in_one_process():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    x = torch.randn(4, 8)
    first = tf.compile(model, x, backend="inductor")
    second = tf.compile(model, x, backend="inductor")     # dynamo's cache: no new graph, still compiled
    torch.testing.assert_close(second(x), model(x))
    assert "reused the graph" in second.report.to_markdown()
    torch.testing.assert_close(first(x), model(x))


def test_auto_times_with_half_the_default_timing_unless_given_one(monkeypatch):
    from torchfast import measure
    m, x = _net(), torch.randn(4, 1, 8, 8)
    assert tf.compile(m, x, backend="auto", candidates=["eager"], progress=False).report.summary["runs"] == 10
    monkeypatch.setattr(measure, "DEFAULT_TIMING", measure.Timing(runs=4, warmup=1, threads=1))
    s = tf.compile(m, x, backend="auto", candidates=["eager"], progress=False).report.summary
    assert (s["runs"], s["threads"]) == (2, 1)
    s = tf.compile(m, x, backend="auto", candidates=["eager"], timing=measure.Timing(runs=3), progress=False).report.summary
    assert s["runs"] == 3
