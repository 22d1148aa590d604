"""quantize(tolerance=...): the fewest, most sensitive layers stay float until the bound holds."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import torchfast as tf
from torchfast.measure import fidelity
from torchfast.quantized import quantization_of


class OutlierMLP(nn.Module):
    """Its inputs carry one feature 400x larger than the rest (``a`` is trained for it): int8 on ``a``'s input
    wipes out the other features, every other layer is harmless."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(16, 64)
        self.b = nn.Linear(64, 64)
        self.c = nn.Linear(64, 10)
        with torch.no_grad():
            self.a.weight[:, 3] /= 400.0

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def _data(n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(32, 16, generator=g)
        x[:, 3] *= 400.0
        out.append(x)
    return out


@pytest.mark.parametrize("scheme", ["static", "dynamic"])
def test_budget_keeps_the_sensitive_layer_float(scheme):
    model = OutlierMLP().eval()
    val = _data(2, 1)
    cfg = (tf.Int8Static(calibration=_data(4, 0), progress=False, keep_slower=True) if scheme == "static"
           else tf.Int8Dynamic(keep_slower=True, per_channel=True, smooth=False))
    # 0.999, not tighter: with 7-bit activations (pre-VNNI CPUs) the layers left int8 are less exact
    tol = tf.Tolerance(min_cosine=0.999, max_metric_drop=None)
    full, _ = tf.quantize(model, cfg, example_inputs=val[0])
    assert fidelity(model, full, val).cosine < 0.999  # the fixture really breaks the bound
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out, rep = tf.quantize(model, cfg, example_inputs=val[0], validation=val, tolerance=tol)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert fidelity(model, out, val).cosine >= 0.999
    assert quantization_of(out) is not None  # still int8 where it can be
    budget = next(c for c in rep.children if c.title == "int8 accuracy budget")
    assert budget.rows[0]["layers kept float"] == 0 and not budget.rows[0]["meets budget"]
    assert any(r["meets budget"] for r in budget.rows)
    assert rep.summary["layers kept float for the budget"] >= 1
    row = next(r for r in rep.rows if r["layer"] == "a")
    assert row["applied"] is False and "accuracy budget" in row["reason"]


def test_budget_that_no_mix_meets_returns_the_float_model():
    model = OutlierMLP().eval()
    val = _data(2, 1)
    out, rep = tf.quantize(model, tf.Int8Dynamic(keep_slower=True), example_inputs=val[0], validation=val,
                           tolerance=tf.Tolerance(min_cosine=None, max_rel_err=0.0, max_metric_drop=None))
    assert quantization_of(out) is None and torch.equal(out(val[0]), model(val[0]))
    assert "no int8 mix" in rep.summary["result"]


def test_a_time_limit_stops_the_budget_search_and_loses_nothing():
    from torchfast.quant.budget import time_limit
    model = OutlierMLP().eval()
    val = _data(2, 1)
    cfg = tf.Int8Dynamic(keep_slower=True, per_channel=True, smooth=False)
    tol = tf.Tolerance(min_cosine=0.999, max_metric_drop=None)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with time_limit(0.0):   # spent before the search starts: no layer is kept float, the float model returns
        out, rep = tf.quantize(model, cfg, example_inputs=val[0], validation=val, tolerance=tol)
    assert quantization_of(out) is None and torch.equal(out(val[0]), model(val[0]))
    budget = next(c for c in rep.children if c.title == "int8 accuracy budget")
    assert "time limit" in budget.summary["result"] and len(budget.rows) == 1   # only the all-int8 check
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with time_limit(None):  # no limit: the search runs as without
        out, _ = tf.quantize(model, cfg, example_inputs=val[0], validation=val, tolerance=tol)
    assert quantization_of(out) is not None and fidelity(model, out, val).cosine >= 0.999


def test_budget_met_at_once_changes_nothing():
    model = OutlierMLP().eval()
    val = _data(2, 1)
    out, rep = tf.quantize(model, tf.Int8Dynamic(keep_slower=True), example_inputs=val[0], validation=val,
                           tolerance=tf.Tolerance(min_cosine=0.5, max_metric_drop=None))
    budget = next(c for c in rep.children if c.title == "int8 accuracy budget")
    assert len(budget.rows) == 1 and budget.summary["result"] == "every quantized layer stays int8"


def test_static_budget_holds_out_calibration_by_default():
    model = OutlierMLP().eval()
    cfg = tf.Int8Static(calibration=_data(8, 0), progress=False, keep_slower=True)
    out, rep = tf.quantize(model, cfg, example_inputs=_data(1, 3)[0],
                           tolerance=tf.Tolerance(min_cosine=0.9999, max_metric_drop=None))
    assert any("held out" in n for n in rep.notes)
    assert rep.summary["calibration batches"] == 6


def test_metric_budget_uses_eval_fn():
    model = OutlierMLP().eval()
    val = _data(2, 1)
    labels = [model(v).argmax(-1) for v in val]

    def acc(m):
        with torch.no_grad():
            return sum((m(v).argmax(-1) == y).float().mean().item() for v, y in zip(val, labels)) / len(val)
    out, rep = tf.quantize(model, tf.Int8Dynamic(keep_slower=True), example_inputs=val[0], validation=val,
                           tolerance=tf.Tolerance(min_cosine=None, max_metric_drop=0.0), eval_fn=acc)
    assert acc(out) == 1.0
    with pytest.raises(TypeError, match="eval_fn"):
        tf.quantize(model, tf.Int8Dynamic(), validation=val, tolerance=tf.Tolerance(), eval_fn=3)


def test_int8_dynamic_smooths_where_it_helps_by_default():
    model = OutlierMLP().eval()
    val = _data(2, 1)
    plain, _ = tf.quantize(model, tf.Int8Dynamic(keep_slower=True, smooth=False), example_inputs=val[0])
    smoothed, rep = tf.quantize(model, tf.Int8Dynamic(keep_slower=True), example_inputs=val[0], calibration=val)
    assert rep.summary["float rewrite before int8"] == "SmoothQuant"
    assert any(n.startswith("SmoothQuant") and "(applied)" in n for n in rep.notes)
    assert fidelity(model, smoothed, val).rel_err < fidelity(model, plain, val).rel_err / 2


def test_agreement_budget_says_how_finely_its_validation_resolves_the_bound():
    from torchfast.quant.budget import agreement_resolution
    assert agreement_resolution(0.95, 48).startswith("+/-0.062") and "73+" in agreement_resolution(0.95, 48)
    assert "more validation" not in agreement_resolution(0.95, 400)
    model = OutlierMLP().eval()
    val = _data(2, 1)
    _, rep = tf.quantize(model, tf.Int8Dynamic(keep_slower=True), example_inputs=val[0], validation=val,
                         tolerance=tf.Tolerance(min_cosine=None, min_top1_agreement=0.9, max_metric_drop=None))
    budget = next(c for c in rep.children if c.title == "int8 accuracy budget")
    assert budget.summary["agreement resolution"] == agreement_resolution(0.9, 64)
