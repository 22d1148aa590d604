"""The stage table (torchfast.stages) is the one list of stages: recipe names, help, config_from_dict,
quantize()'s dispatch and optimize()'s up-front recipe/backend check all read it."""
from __future__ import annotations

import dataclasses
import importlib
import subprocess
import sys

import pytest
import torch
from torch import nn

import pipeline_stages as st
import torchfast as tf
from torchfast import stages
from torchfast.config import Config, ConfigError, _subclasses, config_from_dict
from torchfast.modules import state_snapshot
from torchfast.quantized import quantization_of
from torchfast.recipe_syntax import RecipeSyntaxError, parse_recipe
from torchfast.report import Report
from torchfast.stages import STAGES, Stage, register_stage, stage_named, stage_of

BUILT_IN = [s for s in STAGES.values() if s.config_path.startswith("torchfast.")]
QUANT = [s for s in BUILT_IN if s.implementation is not None]
FAST = dict(runs=2, warmup=1, progress=False, tolerance=tf.Tolerance.off())


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10)).eval()


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 10)).eval()


X_CNN = torch.randn(4, 1, 8, 8)
X_MLP = torch.randn(4, 16)


# ---------------------------------------------------------------- one entry per config, every name parses
@pytest.mark.parametrize("name", [n for s in BUILT_IN for n in s.names])
def test_every_recipe_name_parses_to_its_config_class(name):
    stage, preset = stage_named(name)
    (cfg,) = parse_recipe(name)
    assert type(cfg) is stage.config_class() and stage_of(cfg) is stage
    assert cfg == stage.config_class()(**preset), (name, preset)
    assert stage_named(name.upper())[0] is stage   # names are case-insensitive


def test_every_config_class_has_exactly_one_entry():
    for pkg in ("torchfast.lowrank", "torchfast.prune", "torchfast.quant"):
        importlib.import_module(pkg)
    configs = [c for c in _subclasses(Config) if c.__module__.startswith(("torchfast.lowrank", "torchfast.prune",
                                                                         "torchfast.quant"))
               and c.__name__ != "QuantConfig"]
    assert configs
    for cls in configs:
        entries = [s for s in STAGES.values() if s.matches(cls)]
        assert len(entries) == 1, (cls, entries)
        assert stage_of(cls) is entries[0] and entries[0].config_class() is cls   # the path names where it is defined
    paths = [s.config_path for s in STAGES.values()]
    assert len(paths) == len(set(paths))
    names = [n.lower() for s in STAGES.values() for n in s.names]
    assert len(names) == len(set(names))


def test_recipe_help_lists_every_name():
    text = stages.recipe_help()
    for s in STAGES.values():
        for n in s.names:
            assert n in text, n
    assert importlib.import_module("torchfast.recipe_syntax").recipe_help is stages.recipe_help


@pytest.mark.parametrize("stage", BUILT_IN, ids=lambda s: s.name)
def test_config_from_dict_finds_every_stage_config(stage):
    cfg = stage.config_class()()
    assert config_from_dict(cfg.to_dict()) == cfg


def test_every_transform_and_implementation_resolves():
    for s in BUILT_IN:
        assert callable(s.transform_fn()), s.name
        if s.implementation is not None:
            assert callable(stages.load(s.implementation)), s.name
        assert all(k in stages.PRODUCES for k in s.kinds(s.config_class()())), s.name


def test_listing_the_stages_imports_no_torch():
    code = ("import sys, torchfast.stages as s; s.recipe_help(); [x.config_name for x in s.STAGES.values()]; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_register_stage_refuses_a_second_entry():
    with pytest.raises(ValueError, match="Int8Static already has a stage"):
        register_stage(Stage("torchfast.quant.config:Int8Static", st._noise, {"my-int8": {}}))
    with pytest.raises(ValueError, match="'noise' already belong to Noise"):
        register_stage(Stage(st.DropHidden, st._drop, {"noise": {}}))
    again = Stage(st.Noise, st._noise, {"noise": {}})      # pipeline_stages run a second time
    assert register_stage(again) is STAGES["noise"]
    with pytest.raises(ValueError, match="at least one recipe name"):
        Stage(st.DropHidden, st._drop, {})
    with pytest.raises(ValueError, match="produces must be kinds"):
        Stage(st.DropHidden, st._drop, {"x": {}}, produces=("int3",))


# ---------------------------------------------------------------- quantize() dispatches through the table
@pytest.mark.parametrize("stage", QUANT, ids=lambda s: s.name)
def test_quantize_dispatches_every_quant_config_through_the_table(stage, monkeypatch):
    calls = []

    def fake(model, config, *, example_inputs, calibration, exclusion, inplace):
        calls.append((config, example_inputs is X_MLP, calibration, inplace))
        return model, Report("fake")

    monkeypatch.setitem(STAGES, stage.name, dataclasses.replace(stage, implementation=fake))
    cfg = stage.config_class()()
    batches = [X_MLP]
    out, rep = tf.quantize(_mlp(), cfg, example_inputs=X_MLP, calibration=batches, inplace=True)
    assert len(calls) == 1 and rep.title == "fake"
    config, example_is_x, calibration, inplace = calls[0]
    assert config == cfg and example_is_x and calibration is batches and inplace
    assert rep.summary["config"] == cfg.to_dict()


def test_quantize_refuses_a_config_without_an_implementation():
    with pytest.raises(TypeError, match=r"quantize\(\) takes Int8Dynamic, Int8Static, WeightOnly, Float8, "
                                        r"HalfPrecision; got LowRank"):
        tf.quantize(_mlp(), tf.LowRank())


@pytest.mark.parametrize("cfg, model, x", [
    (tf.Int8Dynamic(backend="torch.ao", keep_slower=True), _mlp, X_MLP),
    (tf.Int8Static(calibration=[X_CNN], keep_slower=True), _cnn, X_CNN),
    (tf.WeightOnly(bits=8, keep_slower=True), _mlp, X_MLP),
    (tf.HalfPrecision(dtype="bf16", keep_slower=True), _mlp, X_MLP),
], ids=lambda v: type(v).__name__ if isinstance(v, Config) else "")
def test_what_a_stage_produces_is_what_the_table_says(cfg, model, x):
    if isinstance(cfg, tf.WeightOnly):
        pytest.importorskip("torchao")
    q, _ = tf.quantize(model(), cfg, example_inputs=x)
    assert quantization_of(q).kind in stage_of(cfg).kinds(cfg)


def test_int8_kinds_follow_the_method_and_backend_fields():
    kinds = lambda c: stage_of(c).kinds(c)  # noqa: E731
    assert kinds(tf.Int8Static()) == ("ao",) and kinds(tf.Int8Static(method="pt2e")) == ("pt2e",)
    assert kinds(tf.Int8Static(method="auto")) == ("ao",)   # auto tries pt2e only with compile_ok
    assert kinds(tf.Int8Static(method="auto", compile_ok=True)) == ("ao", "pt2e")
    assert kinds(tf.Int8Dynamic(backend="torchao")) == ("torchao",) and kinds(tf.Int8Dynamic()) == ("ao", "torchao")


# ---------------------------------------------------------------- the "auto" recipe
def test_the_auto_recipe_is_the_search_not_a_list_of_stages():
    assert parse_recipe("none") == []
    for text in ("auto", " AUTO "):   # optimize() dispatches it to torchfast.search (tests/test_search.py)
        with pytest.raises(RecipeSyntaxError, match=r"recipe 'auto' is a search.*optimize\(model, x, recipe='auto'\)"):
            parse_recipe(text, _cnn())
    assert "search" in stages.AUTO_HELP


# ---------------------------------------------------------------- recipe / backend clash, before any work
@pytest.fixture()
def int8_static_spy(monkeypatch):
    """Int8Static's transform replaced by one that records it ran."""
    ran = []
    stage = STAGES["int8-static"]

    def spy(model, config, **kwargs):
        ran.append(config)
        return stage.transform_fn()(model, config, **kwargs)

    monkeypatch.setitem(STAGES, "int8-static", dataclasses.replace(stage, transform=spy))
    return ran


@pytest.mark.parametrize("recipe, backend, msg", [
    ([tf.Int8Static()], "inductor",
     r"recipe stage Int8Static\(\) makes torch.ao quantized modules, which backend 'inductor' cannot compile; "
     r"use Int8Static\(method='pt2e'\) for inductor, or backend='eager' / 'torchscript' / 'auto'"),
    ([tf.Int8Static(method="auto")], "export", r"Int8Static\(method='pt2e'\) for export"),
    ([tf.Int8Static(observer="minmax"), st.Noise(0.0)], "inductor",
     r"Int8Static\(observer='minmax', method='pt2e'\) for inductor"),
    ([tf.Int8Dynamic(backend="torch.ao")], "inductor", r"Int8Dynamic\(backend='torchao'\) for inductor"),
    ([tf.Int8Dynamic(backend="torchao")], "torchscript", r"Int8Dynamic\(backend='torch.ao'\) for torchscript"),
    ([tf.WeightOnly()], "torchscript", r"WeightOnly\(\) makes torchao-quantized weights, which backend "
                                       r"'torchscript' cannot compile; use backend='eager' / 'inductor' / 'export'"),
])
def test_a_stage_the_backend_cannot_compile_is_refused_before_any_stage(recipe, backend, msg, int8_static_spy):
    st.CALLS.clear()
    m = _cnn()
    before = state_snapshot(m)
    with pytest.raises(ConfigError, match=msg):
        tf.optimize(m, X_CNN, [st.Noise(0.0), *recipe], backend=backend, calibration=[X_CNN], **FAST)
    assert st.CALLS == [] and int8_static_spy == []          # no stage ran, not even the one before
    assert all(torch.equal(v, state_snapshot(m)[k]) for k, v in before.items())


def test_an_engine_int8_stage_not_last_is_refused_with_the_way_out(int8_static_spy):
    pytest.importorskip("onnxruntime")
    with pytest.raises(ConfigError, match=r"Int8Static\(\) makes torch.ao quantized modules, which backend "
                                          r"'onnxruntime' cannot compile; use it as the last stage of the recipe"):
        tf.optimize(_cnn(), X_CNN, [tf.Int8Static(), st.Noise(0.0)], backend="onnxruntime", **FAST)
    assert int8_static_spy == []


def test_the_cli_refuses_the_clash_with_exit_2(capsys):
    from torchfast.cli import main
    rc = main(["optimize", "pipeline_stages:build_mlp", "--input-shape", "4,16",
               "--recipe", "int8-dynamic:backend=torch.ao", "--backend", "inductor", "--no-progress", "--runs", "2"])
    assert rc == 2 and "backend 'inductor' cannot compile" in capsys.readouterr().err


@pytest.mark.parametrize("recipe, backend", [
    ([tf.Int8Static(method="pt2e")], "inductor"),
    ([tf.Int8Static(method="auto", compile_ok=True)], "inductor"),   # pt2e may win: not refused
    ([tf.Int8Dynamic()], "inductor"),                                # torchao may win per layer
    ([tf.Int8Static(), tf.LowRank()], "eager"),
    ([tf.Int8Static()], "torchscript"),
    ([tf.WeightOnly(), tf.HalfPrecision()], "export"),
    ([tf.Int8Static()], "auto"),
    ([tf.LowRank(), tf.ChannelPruning(), tf.HalfPrecision(), tf.SemiStructured24()], "inductor"),
])
def test_combinations_that_can_compile_are_accepted(recipe, backend):
    stages.check_backend(recipe, backend)


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_a_trailing_int8_stage_is_left_to_the_engine(backend):
    from torchfast.pipeline import _engine_lowers
    recipe = [tf.LowRank(), tf.Int8Static()]
    assert _engine_lowers(recipe, backend) and _engine_lowers(recipe, "auto")
    assert not _engine_lowers(recipe, "inductor") and not _engine_lowers([tf.WeightOnly()], backend)
    stages.check_backend(recipe[:-1], backend)   # what optimize checks: the engine lowers the last one
    with pytest.raises(ConfigError, match=f"backend '{backend}' cannot compile"):
        stages.check_backend(recipe, backend)


def test_an_accepted_combination_still_runs(int8_static_spy):
    m = _cnn()
    res = tf.optimize(m, X_CNN, [tf.Int8Static()], backend="torchscript", calibration=[X_CNN, X_CNN], **FAST)
    assert len(int8_static_spy) == 1
    assert res.stages[1].applied and res.stages[-1].name == "compile: torchscript" and res.stages[-1].applied, \
        [(s.name, s.reason) for s in res.stages]
    assert res.model(X_CNN).shape == (4, 10)
