"""optimize(recipe="auto"): the search over pruning x low-rank x int8 x backend (torchfast.search).

Tiny models, small spaces, a few distillation steps: every test runs a real search in seconds. Where a
test needs a speed verdict, the timing is replaced (no timing assertions)."""
from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch
from torch import nn

import torchfast as tf
from torchfast import search_rungs
from torchfast.config import ConfigError
from torchfast.measure import Fidelity, Latency, fidelity
from torchfast.modules import state_snapshot
from torchfast.search import SearchSpace
from torchfast.search_report import Searched, pareto_front
from torchfast.stages import STAGES

QUICK = dict(runs=3, warmup=1, progress=False, recover={"steps": 60, "eval_every": 10})
LOOSE = tf.Tolerance(min_cosine=0.95, max_metric_drop=None)


def _mlp() -> nn.Module:
    """An MLP whose second half of hidden units barely matters (as in a trained net): pruning up to half of
    them costs little fidelity, factorizing costs more."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)).eval()
    with torch.no_grad():
        for i in (0, 2):
            m[i].weight[32:] *= 0.05
            m[i].bias[32:] *= 0.05
            m[i + 2].weight[:, 32:] *= 0.05
    return m


def _data(n: int = 8, rows: int = 16) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(rows, 16, generator=g) for _ in range(n)]


X = torch.randn(16, 16, generator=torch.Generator().manual_seed(2))
SMALL = SearchSpace(prune=(0.0, 0.5), lowrank=(None, 2.0), int8=("dynamic", "none"), backends=("eager", "torchscript"),
                    finalists=2)


def _fake_timing(monkeypatch, speed):
    """Replace the search's timing: ``speed(name) -> speedup vs the original`` (the original takes 10 ms)."""
    def compare_many(models, batch, **kwargs):
        def lat(ms):
            return Latency(ms, ms, ms, ms, 1, 1)
        return {k: lat(10.0 if k == "(original)" else 10.0 / speed(k)) for k in models}
    monkeypatch.setattr(search_rungs, "compare_many", compare_many)


def _fast_when_pruned(name: str) -> float:
    return (2.0 if "prune" in name else 1.2) * (1.5 if "torchscript" in name else 1.0)


# ---------------------------------------------------------------- tolerance, report, result
def test_the_search_returns_a_faster_model_within_the_tolerance_and_reports_every_candidate(monkeypatch, tmp_path):
    _fake_timing(monkeypatch, _fast_when_pruned)
    m, calib = _mlp(), _data()
    before = state_snapshot(m)
    tol = tf.Tolerance(min_cosine=0.99, max_metric_drop=None)
    res = tf.optimize(m, X, SMALL, calibration=calib, tolerance=tol, **QUICK)
    assert isinstance(res, Searched) and res.chosen is not None and res.chosen.status == "chosen"
    # every structure of the space is a row (the original included), every engine built is a row
    names = [r["candidate"] for r in res.report.rows]
    for a, r in itertools.product(SMALL.prune, SMALL.lowrank):
        t = search_rungs.Trial(a, r)
        assert t.name in names, t.name
    assert any(n.endswith("@ torchscript") for n in names) and any("+ int8 dynamic" in n for n in names)
    assert len(names) == len(res.trials)
    # the chosen model meets the tolerance, measured again here, and is the fastest faithful one
    val = calib[-2:]   # optimize holds out the last quarter of the calibration batches
    assert fidelity(m, res.model, val).cosine >= 0.99
    faithful = [t for t in res.trials if t.status in ("measured", "chosen")]
    assert res.chosen.speedup == max(t.speedup for t in faithful) and res.speedup == res.chosen.speedup
    assert all(not tol.violations(t.fidelity) for t in faithful)
    for t in res.trials:  # every candidate left behind says why
        assert t.status in ("chosen", "measured", "finalist", "ok", "rejected", "failed", "dropped", "not evaluated")
        if t.status in ("rejected", "failed", "dropped", "not evaluated"):
            assert t.note, t.name
    # the Pareto front: no other measured candidate is both faster and more faithful
    front = pareto_front(res.trials, "cosine")
    assert res.chosen in front and all(t.pareto == (t in front) for t in res.trials)
    assert {r["candidate"]: r["pareto"] for r in res.report.rows} == {t.name: t.pareto for t in res.trials}
    # a drop-in model, the user's model untouched, the report serializes, the chart draws
    assert res.model(X).shape == (16, 10) and all(torch.equal(v, state_snapshot(m)[k]) for k, v in before.items())
    assert tf.Report.from_dict(res.report.to_dict()).rows[0]["candidate"] == res.chosen.name
    assert res.chosen.name in res.table() and "recovery" in res.table()
    res.save(str(tmp_path / "m.pt"))   # as any optimize() result: here TorchScript, loadable by plain torch
    torch.testing.assert_close(torch.jit.load(str(tmp_path / "m.pt"))(X), res.model(X))
    pytest.importorskip("matplotlib")
    assert res.chart(str(tmp_path / "search.png")).endswith("search.png") and (tmp_path / "search.png").stat().st_size


def test_a_candidate_outside_the_tolerance_is_never_returned(monkeypatch):
    # the timing makes pruning look fastest; a bound pruning cannot meet (and no recovery) keeps it out
    _fake_timing(monkeypatch, _fast_when_pruned)
    m, calib = _mlp(), _data()
    tol = tf.Tolerance(min_cosine=None, max_rel_err=1e-4, max_metric_drop=None)
    res = tf.optimize(m, X, SMALL, calibration=calib, tolerance=tol, **{**QUICK, "recover": None})
    structures = [t for t in res.trials if t.configs and t.backend is None and t.int8 == "none"]
    assert structures and all(t.fidelity.rel_err > 1e-4 for t in structures if t.fidelity is not None)
    assert all(t.status in ("rejected", "dropped") for t in structures)
    assert any(t.status == "rejected" and "max_rel_err" in t.note and "recover=None" in t.note for t in structures)
    assert res.chosen is not None and res.chosen.name == "original @ torchscript"
    assert fidelity(m, res.model, calib[-2:]).rel_err <= 1e-4


def test_a_crashing_candidate_is_a_row_and_the_search_goes_on(monkeypatch):
    _fake_timing(monkeypatch, _fast_when_pruned)
    stage = STAGES["prune"]

    def prune(model, config, **kwargs):
        if config.amount == 0.5:
            raise RuntimeError("pruner exploded on fc2")
        return stage.transform_fn()(model, config, **kwargs)
    monkeypatch.setitem(STAGES, "prune", dataclasses.replace(stage, transform=prune))
    space = dataclasses.replace(SMALL, prune=(0.0, 0.2, 0.5))
    res = tf.optimize(_mlp(), X, space, calibration=_data(), tolerance=LOOSE, **QUICK)
    crashed = [r for r in res.report.rows if r["candidate"].startswith("prune 0.5")]
    assert crashed and all(r["status"] in ("failed", "dropped") for r in crashed)
    assert any(r["status"] == "failed" and "RuntimeError: pruner exploded on fc2" in r["note"] for r in crashed)
    assert any(t.prune == 0.2 and t.status in ("chosen", "measured") for t in res.trials)


def test_a_backend_that_fails_is_a_row(monkeypatch):
    _fake_timing(monkeypatch, _fast_when_pruned)
    from torchfast import backends
    real = backends.compile

    def compile(model, x, backend="eager", **kw):
        if backend == "torchscript":
            raise backends.BackendError("no TorchScript today")
        return real(model, x, backend=backend, **kw)
    monkeypatch.setattr(backends, "compile", compile)
    res = tf.optimize(_mlp(), X, SMALL, calibration=_data(), tolerance=LOOSE, **QUICK)
    ts = [t for t in res.trials if t.backend == "torchscript"]
    assert ts and all(t.status == "failed" and "no TorchScript today" in t.note for t in ts)
    assert res.chosen is not None and res.chosen.backend == "eager"


def _combination(res) -> search_rungs.Trial:
    (t,) = [t for t in res.trials if t.prune == 0.5 and t.lowrank == 2.0 and t.backend is None and t.int8 == "none"]
    return t


def test_a_factor_of_the_other_kind_never_rules_out_a_combination(monkeypatch):
    # pruning half of _mlp's units is both faster and more faithful than factorizing it, yet the two compose
    _fake_timing(monkeypatch, _fast_when_pruned)
    res = tf.optimize(_mlp(), X, SMALL, calibration=_data(), tolerance=LOOSE, **QUICK)
    single = {(t.prune, t.lowrank): t for t in res.trials if t.backend is None and t.int8 == "none"}
    assert single[0.5, None].fidelity.cosine > single[0.0, 2.0].fidelity.cosine   # the premise
    assert single[0.5, None].speedup > single[0.0, 2.0].speedup
    combo = _combination(res)
    assert combo.fidelity is not None and not combo.note.startswith("not built")


def _single(prune, lowrank, speedup, cosine) -> search_rungs.Trial:
    return search_rungs.Trial(prune, lowrank, status="ok", speedup=speedup,
                              fidelity=Fidelity(0.0, 0.0, cosine, None, 8))


def test_a_factor_another_of_its_kind_beats_on_speed_and_fidelity_is_not_combined(monkeypatch):
    uniform, glob = _single(0.0, 2.0, 1.5, 0.97), _single(0.0, "global", 1.6, 0.98)
    half, third = _single(0.5, None, 2.0, 0.96), _single(0.3, None, 1.3, 0.99)
    singles = [uniform, glob, half, third]
    assert search_rungs._beaten_by(uniform, singles) is glob
    assert search_rungs._beaten_by(glob, singles) is None and search_rungs._beaten_by(half, singles) is None
    assert search_rungs._beaten_by(third, singles) is None         # slower but more faithful: a trade
    assert search_rungs._beaten_by(_single(0.0, 1.5, 1.6, 0.98), singles) is None   # as fast, as faithful
    assert search_rungs._beaten_by(_single(0.0, 1.5, 1.6, 0.975), singles) is glob  # as fast, less faithful
    # in a search: the uniform 2x factorization races as fast as the data-aware one and probes less faithful
    space = SearchSpace(prune=(0.0, 0.5), lowrank=(None, 2.0, "global"), int8=("none",), backends=("eager",),
                        finalists=2)
    _fake_timing(monkeypatch, lambda name: 2.0 if "prune" in name else 1.5)
    res = tf.optimize(_mlp(), X, space, calibration=_data(), tolerance=LOOSE, **QUICK)
    single = {(t.prune, t.lowrank): t for t in res.trials if t.backend is None and t.int8 == "none" and
              t.prune * (t.lowrank is not None) == 0}
    u, g = single[0.0, 2.0], single[0.0, "global"]
    worse, better = (u, g) if u.fidelity.cosine < g.fidelity.cosine else (g, u)
    (dropped,) = [t for t in res.trials if t.prune == 0.5 and t.lowrank == worse.lowrank and t.backend is None]
    assert dropped.status == "dropped" and dropped.fidelity is None
    assert dropped.note.startswith(f"not built: {better.name} alone is as fast (1.50x vs 1.50x in eager) and "
                                   f"more faithful (cosine ")


# ---------------------------------------------------------------- never slower, nothing to gain
def test_nothing_to_gain_returns_the_original_with_the_reason(monkeypatch):
    _fake_timing(monkeypatch, lambda name: 0.8)   # every candidate measures slower than the original
    m, calib = _mlp(), _data()
    res = tf.optimize(m, X, SMALL, calibration=calib, **QUICK)
    assert res.chosen is None and "nothing to gain" in res.reason and "0.80x" in res.reason
    assert res.report.summary["result"].startswith("the original model is returned: nothing to gain")
    assert res.speedup == 1.0 and res.backend == "eager" and not any(t.status == "chosen" for t in res.trials)
    assert res.transformed is not m and torch.equal(res.model(X), m(X))
    assert [s.name for s in res.stages] == ["original"]


def test_the_returned_model_is_never_slower_even_when_a_candidate_is_barely_so(monkeypatch):
    # the race says pruning pays, the full timing says every engine is a hair slower: the original comes back
    _fake_timing(monkeypatch, lambda name: 1.5 if "@" not in name else 0.99)
    res = tf.optimize(_mlp(), X, SMALL, calibration=_data(), **QUICK)
    assert res.chosen is None and "nothing to gain" in res.reason


def test_a_winner_that_does_not_hold_up_head_to_head_gives_the_original_back(monkeypatch):
    # round-robin with every engine, pruning wins; timed alone with the original, it is slower
    _fake_timing(monkeypatch, _fast_when_pruned)
    fake = search_rungs.compare_many

    def compare_many(models, batch, **kwargs):
        out = fake(models, batch, **kwargs)
        if len(models) == 2:   # the confirmation: the winner alone with the original
            (name,) = [k for k in models if k != "(original)"]
            out[name] = Latency(11.0, 11.0, 11.0, 11.0, 1, 1)
        return out
    monkeypatch.setattr(search_rungs, "compare_many", compare_many)
    res = tf.optimize(_mlp(), X, SMALL, calibration=_data(), tolerance=LOOSE, **QUICK)
    assert res.chosen is None and "head to head with the original: 0.91x" in res.reason
    assert res.speedup == 1.0 and not any(t.status == "chosen" for t in res.trials)


def test_min_speedup_of_the_tolerance_is_the_bar_for_the_search(monkeypatch):
    _fake_timing(monkeypatch, _fast_when_pruned)   # at most 3x
    res = tf.optimize(_mlp(), X, SMALL, calibration=_data(), tolerance=tf.Tolerance(min_speedup=5.0), **QUICK)
    assert res.chosen is None and "by 5.0x" in res.reason


# ---------------------------------------------------------------- the time budget
def test_the_time_budget_stops_the_search_and_returns_the_best_so_far(monkeypatch):
    _fake_timing(monkeypatch, _fast_when_pruned)
    clock = itertools.count(0.0, 1.0)   # every look at the clock costs one "second"
    monkeypatch.setattr(search_rungs, "_now", lambda: next(clock))
    res = tf.optimize(_mlp(), X, SMALL, calibration=_data(), time_budget_s=12, **QUICK)
    assert res.budget_exhausted and "ran out" in res.report.summary["time budget"]
    assert any(t.status == "not evaluated" and "time budget" in t.note for t in res.trials)
    # whatever it returns was measured against the original and is within the tolerance
    if res.chosen is not None:
        assert res.chosen.rung == "measure" and not tf.Tolerance().violations(res.chosen.fidelity)
    else:
        assert res.reason


def _slow_structures(monkeypatch, seconds: float):
    """A clock that moves only when a pruning or low-rank step runs: each takes ``seconds``."""
    import torchfast.recipe as recipe
    now = [0.0]
    monkeypatch.setattr(search_rungs, "_now", lambda: now[0])
    real = recipe.apply_stage

    def apply_stage(*args, **kwargs):
        now[0] += seconds
        return real(*args, **kwargs)
    monkeypatch.setattr(recipe, "apply_stage", apply_stage)
    return now


def test_a_step_its_kind_says_would_end_past_the_budget_is_not_started(monkeypatch):
    _fake_timing(monkeypatch, _fast_when_pruned)
    now = _slow_structures(monkeypatch, 10.0)
    space = SearchSpace(prune=(0.0, 0.2, 0.3, 0.5), lowrank=(None,), int8=("none",), backends=("eager",))
    res = tf.optimize(_mlp(), X, space, calibration=_data(), time_budget_s=25, **QUICK)
    probes = {t.prune: t for t in res.trials if t.backend is None and t.prune}
    # 0.2 and 0.3 took 10 s each; 0.5 would have ended at 30 s of 25: it is not started
    assert probes[0.2].status != "not evaluated" and probes[0.3].status != "not evaluated"
    assert probes[0.5].status == "not evaluated" and "time budget" in probes[0.5].note
    assert now[0] <= 25 and res.budget_exhausted and "ran out during 'probe'" in res.report.summary["time budget"]


def test_the_original_is_measured_on_every_engine_before_the_structures(monkeypatch):
    # a budget spent by the first structure still returns the fastest engine of the original
    _fake_timing(monkeypatch, lambda name: 2.0 if name == "original @ torchscript" else 1.0)
    _slow_structures(monkeypatch, 100.0)
    space = SearchSpace(prune=(0.0, 0.5), lowrank=(None, 2.0), int8=("none",), backends=("eager", "torchscript"))
    res = tf.optimize(_mlp(), X, space, calibration=_data(), time_budget_s=50, **QUICK)
    assert res.budget_exhausted and res.chosen is not None and res.chosen.name == "original @ torchscript"
    assert any(t.status == "not evaluated" for t in res.trials if t.backend is None)


def test_later_finalists_probe_only_the_torch_int8_a_kept_engine_runs(monkeypatch):
    # the original's engines: float TorchScript is fastest and the only kind kept, so the pruned finalist
    # gets no torch int8 probe (quantize costs minutes on a large model) and is built on TorchScript only
    _fake_timing(monkeypatch, lambda n: 5.0 if n == "prune 0.5 @ torchscript" else 3.0 if n == "original @ torchscript"
                 else 2.0 if n == "prune 0.5" else 1.0)
    space = dataclasses.replace(SMALL, lowrank=(None,), engines=1)
    res = tf.optimize(_mlp(), X, space, calibration=_data(), tolerance=LOOSE, **QUICK)
    probes = [(t.prune, t.int8) for t in res.trials if t.backend is None and t.int8 != "none"]
    assert probes == [(0.0, "dynamic")]
    built = sorted(t.name for t in res.trials if t.backend is not None and t.prune)
    assert built == ["prune 0.5 @ torchscript"]
    assert res.chosen is not None and res.chosen.name == "prune 0.5 @ torchscript"


def test_the_clock_expects_the_median_of_its_kind():
    clock = search_rungs.Clock(100.0)
    assert clock.expect("build openvino static") == 0.0
    for s in (4.0, 30.0, 6.0):
        clock.took("build openvino static", s)
    assert clock.expect("build openvino static") == 6.0 and clock.expect("other") == 0.0
    clock.reserve = 95.0   # what the final timing needs
    assert not clock.out("probe", 1.0) and clock.ran_out_at is None
    assert clock.out("measure", clock.expect("build openvino static")) and clock.ran_out_at == "measure"
    assert not search_rungs.Clock(None).out("measure", 1e9)


def test_an_unbounded_search_says_its_budget_was_not_exhausted(monkeypatch):
    _fake_timing(monkeypatch, _fast_when_pruned)
    space = dataclasses.replace(SMALL, prune=(0.0,), lowrank=(None,))
    res = tf.optimize(_mlp(), X, space, calibration=_data(), time_budget_s=math.inf, **QUICK)
    assert not res.budget_exhausted and res.report.summary["time budget"] == "not exhausted"
    assert res.chosen is not None and res.chosen.name in ("original @ torchscript", "original + int8 dynamic @ eager",
                                                          "original + int8 dynamic @ torchscript")


def test_without_calibration_batches_the_search_still_runs_on_the_example(monkeypatch):
    _fake_timing(monkeypatch, _fast_when_pruned)
    res = tf.optimize(_mlp(), X, SMALL, tolerance=tf.Tolerance(min_cosine=0.999999, max_metric_drop=None), **QUICK)
    needing = [t for t in res.trials if t.backend is None and t.status == "rejected"]
    assert needing and all("no calibration batches to distill on" in t.note for t in needing)
    assert res.chosen is not None and not tf.Tolerance(min_cosine=0.999999).violations(res.chosen.fidelity)


# ---------------------------------------------------------------- arguments
def test_the_space_validates_and_the_budget_belongs_to_the_search():
    with pytest.raises(ConfigError, match="SearchSpace.prune"):
        SearchSpace(prune=(1.0,))
    with pytest.raises(ConfigError, match="lowrank entries"):
        SearchSpace(lowrank=(0.5,))
    with pytest.raises(ConfigError, match="int8 entries"):
        SearchSpace(int8=("int4",))
    with pytest.raises(ConfigError, match="unknown backend"):
        SearchSpace(backends=("tpu",))
    assert SearchSpace.from_dict(SearchSpace().to_dict()) == SearchSpace()
    assert tf.config_from_dict(SMALL.to_dict()) == SMALL
    with pytest.raises(ConfigError, match="time_budget_s bounds the search"):
        tf.optimize(_mlp(), X, [], time_budget_s=10, progress=False)
    with pytest.raises(ConfigError, match="time_budget_s"):
        tf.optimize(_mlp(), X, "auto", time_budget_s=0, progress=False)
