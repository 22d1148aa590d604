"""optimize() with the real transforms, by recipe string, on a model trained on real data."""
import pytest
import torch

from torchfast.pipeline import Tolerance, optimize

from pipeline_stages import trained_digits_mlp


def test_real_recipe_rolls_back_exactly_the_stages_over_budget(tmp_path):
    pytest.importorskip("torchfast.lowrank")
    pytest.importorskip("torchfast.quant")
    model, data, eval_fn = trained_digits_mlp()
    x = data.x_test[:64]
    tol = Tolerance(min_cosine=None, max_metric_drop=0.02)
    res = optimize(model, x, "lowrank:rank=2,lowrank:ratio=0.9,int8-dynamic", eval_fn=eval_fn, tolerance=tol,
                   calibration=[data.x_train[:128]], validation=[data.x_test[64:192]], runs=2, warmup=1, progress=False,
                   recover=None)   # rollback as such; recovery by distillation is tested in tests/test_distill.py
    rows = res.report.rows
    assert [r["stage"].split("(")[0] for r in rows] == ["original", "LowRank", "LowRank", "Int8Dynamic", "compile: eager"]
    base = rows[0]["metric"]
    for r in rows[1:-1]:  # every decision follows the measured metric
        assert r["applied"] == (base - r["metric"] <= 0.02), r
    assert rows[1]["applied"] is False  # rank 2 of 32 cannot keep the accuracy
    # the final drop-in really has the accuracy the report claims, and the per-layer reports are attached
    final = [r for r in rows if r["applied"]][-1]
    assert eval_fn(res.model) == pytest.approx(final["metric"])
    assert len(res.report.children) >= 3
    assert base - eval_fn(res.model) <= 0.02
