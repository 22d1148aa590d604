import copy
import inspect

import pytest
import torch
from torch import nn

import torchfast as tf
from torchfast.config import ConfigError
from torchfast.modules import state_snapshot
from torchfast.pipeline import Tolerance, optimize

import pipeline_stages as st

FAST = dict(runs=2, warmup=1, progress=False)


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 10))


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a) and a.keys() == b.keys()


def test_rollback_keeps_good_stages_and_reports_every_stage():
    m, x = _mlp(), torch.randn(8, 16)
    m.train()
    before = state_snapshot(m)
    calib = [torch.randn(8, 16) for _ in range(3)]
    res = optimize(m, x, [st.Noise(1e-4), st.Noise(3.0, seed=1), st.Noise(1e-4, seed=2)], calibration=calib, **FAST)
    rows = res.report.rows
    assert [r["stage"] for r in rows] == ["original", "Noise(scale=0.0001)", "Noise(scale=3.0, seed=1)",
                                          "Noise(scale=0.0001, seed=2)", "compile: eager"]
    assert [r["applied"] for r in rows] == [True, True, False, True, True]
    assert "rolled back" in rows[2]["note"] and "min_cosine 0.99" in rows[2]["note"]
    assert rows[2]["cosine"] < 0.99 <= rows[3]["cosine"]
    assert res.report.summary["stages rolled back"] == "Noise(scale=3.0, seed=1)"
    # stage reports become children; the rolled-back one says so; calibration reached the stage
    assert len(res.report.children) == 4
    assert any("rolled back" in n for n in res.report.children[1].notes)
    assert res.report.children[0].rows[0]["calibration_batches"] == 2   # the last one is held out to validate
    # the original is untouched, training flags restored; the result is close to it
    assert _same(before, state_snapshot(m)) and m.training
    out, ref = res.model(x), m.eval()(x)
    assert torch.nn.functional.cosine_similarity(out, ref).min() > 0.99
    assert torch.equal(out, res.transformed(x))
    assert res.speedup is not None and res.backend == "eager"
    assert "## noise" not in res.table() and "## noise" in res.table(per_layer=True)
    # JSON round trip of the report
    back = tf.Report.from_dict(res.report.to_dict())
    assert back.rows[2]["applied"] is False


def test_metric_tolerance_on_real_accuracy():
    model, data, eval_fn = st.trained_digits_mlp()
    x = data.x_test[:64]
    res = optimize(model, x, [st.DropHidden(0.9), st.Noise(1e-4)], eval_fn=eval_fn,
                   tolerance=Tolerance(min_cosine=None, max_metric_drop=0.01), **FAST)
    drop_row, noise_row = res.report.rows[1], res.report.rows[2]
    assert drop_row["applied"] is False and "metric drop" in drop_row["note"]
    assert drop_row["metric drop"] > 0.01
    assert noise_row["applied"] is True and noise_row["metric drop"] <= 0.01
    base = res.report.rows[0]["metric"]
    assert base > 0.9  # really trained
    assert eval_fn(res.model) == pytest.approx(noise_row["metric"])
    assert "metric (original -> final)" in res.report.summary


def test_tolerance_off_keeps_everything_and_validation():
    m, x = _mlp(), torch.randn(4, 16)
    res = optimize(m, x, [st.Noise(3.0)], tolerance=Tolerance.off(), **FAST)
    assert res.report.rows[1]["applied"] is True
    with pytest.raises(ConfigError, match="min_cosine"):
        Tolerance(min_cosine=1.5)
    with pytest.raises(ConfigError, match="min_speedup"):
        Tolerance(min_speedup=0)
    with pytest.raises(ConfigError, match="unknown tolerance field"):
        optimize(m, x, [], tolerance={"min_cos": 0.9}, **FAST)
    assert optimize(m, x, [], tolerance={"min_cosine": 0.5}, **FAST).report.summary["tolerance"].startswith("min_cosine=0.5")


def test_min_speedup_rolls_back_a_stage_that_does_not_pay():
    m, x = _mlp(), torch.randn(4, 16)
    # 30 ms of sleep on a microsecond model: a margin no scheduling noise on a loaded machine can cross
    res = optimize(m, x, [st.Slow(ms=30.0)], tolerance=Tolerance(min_speedup=1.0), runs=5, warmup=1,
                   threads=1, progress=False)
    row = res.report.rows[1]
    assert row["applied"] is False and "min_speedup" in row["note"]
    assert not isinstance(res.transformed, st._Sleepy)


def test_failing_stage_raise_or_skip_leaves_original_untouched():
    m, x = _mlp(), torch.randn(4, 16)
    before = state_snapshot(m)
    with pytest.raises(RuntimeError, match="boom"):
        optimize(m, x, [st.Boom()], **FAST)
    assert _same(before, state_snapshot(m))
    res = optimize(m, x, [st.Boom(), st.Noise(1e-4)], on_error="skip", **FAST)
    assert res.report.rows[1]["applied"] is False and "boom" in res.report.rows[1]["note"]
    assert res.report.rows[2]["applied"] is True
    assert _same(before, state_snapshot(m))
    with pytest.raises(ConfigError, match="on_error"):
        optimize(m, x, [], on_error="ignore")


def test_bad_input_fails_before_any_stage_runs():
    m, x = _mlp(), torch.randn(4, 16)
    st.CALLS.clear()
    with pytest.raises(TypeError, match="torchfast configs"):
        optimize(m, x, [st.Noise(0.0), "lowrank"], **FAST)
    with pytest.raises(Exception, match="unknown backend 'nope'"):
        optimize(m, x, [st.Noise(0.0)], backend="nope", **FAST)
    with pytest.raises(ValueError, match="does not run on example_inputs"):
        optimize(m, torch.randn(4, 15), [st.Noise(0.0)], **FAST)
    with pytest.raises(TypeError, match="nn.Module"):
        optimize(lambda t: t, x, [], **FAST)
    assert st.CALLS == []


def test_dict_inputs_keep_signature_and_kwargs():
    m = TwoInputs = st.TwoInputs()
    ids = torch.randint(0, 50, (4, 7))
    batch = {"input_ids": ids, "attention_mask": torch.ones(4, 7, dtype=torch.long)}
    res = optimize(m, batch, [st.Noise(1e-4)], dynamic_dims={"input_ids": (0, 1), "attention_mask": (0, 1)}, **FAST)
    assert list(inspect.signature(res.model).parameters) == ["input_ids", "attention_mask"]
    short = {"input_ids": ids[:, :5], "attention_mask": torch.ones(4, 5, dtype=torch.long)}
    torch.testing.assert_close(res.model(**short), res.transformed(**short))
    with pytest.raises(ValueError, match="input 'input_ids' must have dtype int64, got float32"):
        res.model(ids.float())


def test_torchscript_backend_drop_in(tmp_path):
    pytest.importorskip("torchfast.backends")
    m, x = _mlp(), torch.randn(4, 16)
    res = optimize(m, x, [st.Noise(1e-4)], backend="torchscript", **FAST)
    assert res.report.rows[-1]["stage"] == "compile: torchscript" and res.report.rows[-1]["applied"] is True
    assert list(inspect.signature(res.model).parameters) == ["input"]
    torch.testing.assert_close(res.model(x), res.transformed(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(res.model(input=x[:2]), res.transformed(x[:2]), rtol=1e-5, atol=1e-5)
    assert any(c.title.startswith("compile") for c in res.report.children)
    path = res.save(str(tmp_path / "m.pt"))
    torch.testing.assert_close(torch.jit.load(str(path))(x), res.model(x), rtol=1e-5, atol=1e-5)  # plain torch


def test_recipe_string_runs_its_stages():
    # parsing itself is tested in tests/test_recipe_syntax.py; "noise" is registered by pipeline_stages
    res = optimize(_mlp(), torch.randn(4, 16), "noise:scale=0.0001", **FAST)
    assert res.report.rows[1]["stage"] == "Noise(scale=0.0001)"


def test_a_timing_object_sets_every_comparison_and_explicit_numbers_override_it(monkeypatch):
    from torchfast import pipeline
    from torchfast.measure import Timing
    seen = []
    real = pipeline.compare_latency

    def spy(a, b, batch, **kw):
        seen.append((kw.get("runs"), kw.get("warmup"), kw.get("threads")))
        return real(a, b, batch, **kw)
    monkeypatch.setattr(pipeline, "compare_latency", spy)
    m, x = _mlp(), torch.randn(8, 16)
    res = optimize(m, x, [st.Noise(1e-4)], timing=Timing(runs=4, warmup=0, threads=1), progress=False)
    assert seen and set(seen) == {(4, 0, 1)}
    assert "(4 runs each)" in " ".join(res.report.notes)
    seen.clear()
    optimize(m, x, [st.Noise(1e-4)], timing=Timing(runs=4, warmup=0, threads=1), runs=2, progress=False)
    assert set(seen) == {(2, 0, 1)}
    with pytest.raises(TypeError, match="torchfast.measure.Timing"):
        optimize(m, x, [], timing={"runs": 3}, progress=False)


def test_one_copy_of_the_model_per_stage_and_never_the_users_object(monkeypatch):
    from torchfast import pipeline
    copies = []
    real = copy.deepcopy

    def counting(obj, *a, **kw):
        if isinstance(obj, nn.Module):
            copies.append(type(obj).__name__)
        return real(obj, *a, **kw)
    monkeypatch.setattr(pipeline.copy, "deepcopy", counting)
    m, x = _mlp(), torch.randn(8, 16)
    res = optimize(m, x, [st.Noise(1e-4), st.Noise(1e-4)], tolerance=None, **FAST)
    assert len(copies) == 2  # one per stage, none for the reference
    assert res.transformed is not m
    copies.clear()
    res = optimize(m, x, [], **FAST)
    assert len(copies) == 1 and res.transformed is not m  # nothing applied: the result is still a copy
    with torch.no_grad():
        next(res.transformed.parameters()).add_(1.0)
    assert not torch.equal(next(m.parameters()), next(res.transformed.parameters()))


def test_recovery_tries_batchnorm_statistics_before_distillation(monkeypatch):
    from torchfast import distill
    monkeypatch.setattr(distill, "recoverable", lambda cfg: isinstance(cfg, st.RescaleConvs))
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                      nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
    g = torch.Generator().manual_seed(3)
    calib = [torch.randn(16, 3, 8, 8, generator=g) for _ in range(8)]
    m.train()
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.momentum = None
    with torch.no_grad():
        for x in calib:
            m(x)
    m.eval()
    called = []
    monkeypatch.setattr(distill, "distill", lambda *a, **k: called.append(1))
    res = optimize(m, calib[0], [st.RescaleConvs(3.0)], calibration=calib, **FAST)
    row = res.stages[1]
    assert row.applied and "BatchNorm statistics re-estimated" in row.reason, row.reason
    assert row.before_recovery.cosine < 0.99 <= row.fidelity.cosine
    assert not called  # no training needed
