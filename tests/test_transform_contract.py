"""One contract for every transform: ``fn(model, config=None, *, example_inputs=None, calibration=None,
inplace=False) -> (model, report)``, one ``exclude`` field checked against the model, configs that
round-trip through dicts, and reports whose reductions read one way ("x fewer" = before / after)."""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json

import pytest
import torch
from torch import nn

import torchfast as tf
from torchfast.config import Config, ConfigError, _subclasses, config_from_dict
from torchfast.transform import Exclusion
from test_transforms_untouched import X, assert_untouched, fingerprint, mixed

HAS_TORCHAO = importlib.util.find_spec("torchao") is not None


@dataclasses.dataclass
class Case:
    """A transform, a config for it, and where the layer ``fc2`` (excluded in some tests) ends up in its result."""
    fn: object
    config: Config
    fc2: str | None = "fc2"          # path of the excluded fc2 in the result; None: the result is a new module
    reuses: bool = True               # inplace=True hands back the user's module tree
    needs: str | None = None

    def run(self, model, cfg=None, **kw):
        return self.fn(model, cfg or self.config, example_inputs=X, calibration=[X, X], **kw)


CASES = {
    "decompose": Case(tf.decompose, tf.LowRank(ratio=0.5, min_flops_reduction=0, progress=False)),
    "prune": Case(tf.prune, tf.ChannelPruning(amount=0.5)),
    "sparsify-unstructured": Case(tf.sparsify, tf.UnstructuredSparse(amount=0.9, runs=3)),
    "sparsify-2:4": Case(tf.sparsify, tf.SemiStructured24()),
    "int8-dynamic": Case(tf.quantize, tf.Int8Dynamic(keep_slower=True)),
    "int8-static": Case(tf.quantize, tf.Int8Static(progress=False), reuses=False),
    "weight-only": Case(tf.quantize, tf.WeightOnly(bits=8), needs="torchao"),
    "half": Case(tf.quantize, tf.HalfPrecision(keep_slower=True), fc2="model.fc2.module"),
}


def _case(name: str) -> Case:
    c = CASES[name]
    if c.needs == "torchao" and not HAS_TORCHAO:
        pytest.skip("WeightOnly needs torchao")
    return c


@pytest.mark.parametrize("name", CASES)
def test_copy_leaves_the_model_untouched(name):
    c = _case(name)
    m = mixed()
    before = fingerprint(m)
    out, rep = c.run(m)
    assert_untouched(m, before)   # weights, module types, every submodule's own train/eval flag
    assert out is not m and isinstance(rep, tf.Report)


@pytest.mark.parametrize("name", CASES)
def test_inplace_reuses_the_model(name):
    c = _case(name)
    m = mixed()
    before = fingerprint(m)
    w = m.fc2.weight
    out, _ = c.run(m, c.config.replace(exclude=("fc2",)), inplace=True)
    if not c.reuses:   # Int8Static builds a new graph module and leaves the argument as it was
        assert_untouched(m, before)
        return
    owner = out.model if isinstance(out, tf.quant.half.HalfPrecisionModule) else out
    assert owner is m
    assert out.get_submodule(c.fc2).weight is w   # the excluded layer keeps the user's parameter object


@pytest.mark.parametrize("name", [*CASES, "float8"])
def test_unknown_exclude_name_is_an_error_naming_it(name):
    if name == "float8":   # names are checked before the device: this fails the same way on any machine
        fn, cfg = tf.quantize, tf.Float8()
    else:
        c = _case(name)
        fn, cfg = c.fn, c.config
    m = mixed()
    before = fingerprint(m)
    with pytest.raises(ConfigError, match=r"exclude names 'fc9'.*did you mean 'fc1', 'fc2'"):
        fn(m, cfg.replace(exclude=("fc2", "fc9")), example_inputs=X, calibration=[X])
    with pytest.raises(ConfigError, match=r"'enc\*\.fc'.*no submodule matching it"):
        fn(m, cfg.replace(exclude=("enc*.fc",)), example_inputs=X, calibration=[X])
    assert_untouched(m, before)


@pytest.mark.parametrize("name", CASES)
def test_exclude_glob_keeps_those_layers(name):
    c = _case(name)
    m = mixed()
    out, rep = c.run(m, c.config.replace(exclude=("*c2",)))   # a glob: matches fc2 only
    excluded = [r for r in rep.rows if "excluded" in str(r.get("reason", ""))]
    assert excluded and all(not r["applied"] for r in excluded)
    assert any("fc2" in str(r["layer"]) or "fc2" in str(r["reason"]) for r in excluded)
    fc2 = out.get_submodule(c.fc2)
    assert type(fc2) is nn.Linear and fc2.weight.dtype == torch.float32
    assert torch.equal(fc2.weight, m.fc2.weight) and torch.equal(fc2.bias, m.fc2.bias)
    assert out(X).shape == m(X).shape


def test_exclusion_names_cover_their_submodules():
    m = mixed()
    ex = Exclusion.resolve(m, tf.LowRank(exclude=("block", "f?1")))
    assert ex.match("block.0") == "block" and ex.match("block") == "block" and ex.match("fc1") == "f?1"
    assert ex.match("blockade") is None and ex.match("conv") is None and ex.match("fc2") is None
    assert ex.roots(m) == ("block", "fc1")
    _, rep = tf.decompose(m, tf.LowRank(ratio=0.5, min_flops_reduction=0, exclude=("block",)), example_inputs=X)
    assert "excluded by LowRank.exclude ('block')" in rep.where(layer="block.0")[0]["reason"]


# ---------------------------------------------------------------- the exclude field
@pytest.mark.parametrize("cls", [tf.LowRank, tf.ChannelPruning, tf.SemiStructured24, tf.UnstructuredSparse,
                                 tf.Int8Dynamic, tf.Int8Static, tf.WeightOnly, tf.Float8, tf.HalfPrecision])
def test_exclude_field_is_checked_on_construction(cls):
    with pytest.raises(ConfigError, match=rf"{cls.__name__}\.exclude must be a tuple.*string 'fc2'"):
        cls(exclude="fc2")
    for bad in ("", "  ", 3, None):
        with pytest.raises(ConfigError, match=rf"{cls.__name__}\.exclude entries must be non-empty"):
            cls(exclude=("fc1", bad))
    assert cls(exclude=["fc1", "block.*"]).exclude == ("fc1", "block.*")


def test_former_field_names_warn_and_map_to_exclude():
    with pytest.warns(FutureWarning, match=r"Int8Dynamic\(skip=...\) is now Int8Dynamic\(exclude=...\)"):
        assert tf.Int8Dynamic(skip=("fc2",)) == tf.Int8Dynamic(exclude=("fc2",))
    with pytest.warns(FutureWarning, match="ChannelPruning\\(ignored=...\\)"):
        assert tf.ChannelPruning(ignored=["fc2"]).exclude == ("fc2",)
    with pytest.raises(ConfigError, match="give exclude only"):
        tf.UnstructuredSparse(ignored=("a",), exclude=("b",))


def test_inplace_is_an_argument_not_a_config_field():
    for make in (lambda: tf.Int8Dynamic(inplace=True), lambda: tf.HalfPrecision(inplace=True),
                 lambda: tf.WeightOnly.from_dict({"type": "WeightOnly", "inplace": True}),
                 lambda: tf.Float8.from_dict({"type": "Float8", "inplace": False})):
        with pytest.raises(ConfigError, match=r"no field 'inplace'.*quantize\(model, \w+\(\), inplace=True\)"):
            make()
    from torchfast.recipe_syntax import parse_recipe
    with pytest.raises(ConfigError, match="inplace"):
        parse_recipe("int8-dynamic:inplace=true")
    assert parse_recipe("prune:amount=0.5,exclude=fc2/block.*")[0].exclude == ("fc2", "block.*")


# ---------------------------------------------------------------- config round trip
def _all_config_classes() -> list[type]:
    """Every Config subclass torchfast defines (the backends' modules import their engines lazily)."""
    for mod in ("torchfast.lowrank", "torchfast.prune", "torchfast.quant", "torchfast.pipeline",
                "torchfast.backends.eager", "torchfast.backends.torchscript", "torchfast.backends.inductor",
                "torchfast.backends.export", "torchfast.backends.onnxruntime", "torchfast.backends.openvino",
                "torchfast.backends.tensorrt", "torchfast.backends.xla"):
        importlib.import_module(mod)
    return sorted((c for c in _subclasses(Config) if c.__module__.startswith("torchfast")),
                  key=lambda c: f"{c.__module__}.{c.__qualname__}")


def test_every_torchfast_config_is_covered():
    names = {c.__name__ for c in _all_config_classes()}
    assert {"LowRank", "ChannelPruning", "SemiStructured24", "UnstructuredSparse", "Int8Dynamic", "Int8Static",
            "WeightOnly", "Float8", "HalfPrecision", "Tolerance", "Options"} <= names


def _round_trip(cfg: Config) -> None:
    d = cfg.to_dict()
    back = type(cfg).from_dict(json.loads(json.dumps(d)))   # through JSON: tuples come back as lists
    assert back == cfg and type(back) is type(cfg), (d, back)
    dotted = {**d, "type": f"{type(cfg).__module__}.{type(cfg).__qualname__}"}
    assert config_from_dict(d if _unique(type(cfg)) else dotted) == cfg and config_from_dict(dotted) == cfg


def _unique(cls: type) -> bool:
    return sum(c.__name__ == cls.__name__ for c in _all_config_classes()) == 1


@pytest.mark.parametrize("cls", _all_config_classes(), ids=lambda c: f"{c.__module__.split('.')[-1]}.{c.__name__}")
def test_default_config_round_trips(cls):
    _round_trip(cls())


@pytest.mark.parametrize("cfg", [
    tf.LowRank(method="svd", rank={"fc1": 4, "block.0": 2}, exclude=("fc2",), search_ratios=(0.25, 0.5)),
    tf.LowRank(energy=0.9, allocation="uniform", data_aware=True, threads=2),
    tf.ChannelPruning(amount=0.5, importance="bn_scale", layer_amounts={"fc1": 0.25}, exclude=("fc2", "block.*"),
                      round_to=8, scope="global"),
    tf.UnstructuredSparse(amount=0.8, layouts=("csr", "bsr"), exclude=("fc2",)),
    tf.SemiStructured24(require_kernel=True, exclude=("*.attn",)),
    tf.Int8Dynamic(modules=("linear",), exclude=("fc2",), full_range=True),
    tf.Int8Static(observer="minmax", method="auto", max_batches=4, exclude=("classifier.*",)),
    tf.WeightOnly(bits=4, group_size=64, exclude=("lm_head",)),
    tf.Float8(granularity="per_tensor", dynamic_activations=False),
    tf.HalfPrecision(dtype=torch.float16, exclude=("head",)),
    tf.HalfPrecision(dtype="bf16"),
    tf.Tolerance(min_cosine=0.95, max_metric_drop=None, min_speedup=1.05),
], ids=lambda c: type(c).__name__)
def test_config_round_trips(cfg):
    _round_trip(cfg)


def test_data_and_callables_do_not_round_trip_and_say_so():
    cfg = tf.Int8Static(calibration=[X, X], observer="minmax")
    d = cfg.to_dict()
    assert d["calibration"] == "list" and d["type"] == "Int8Static"
    assert tf.Int8Static.from_dict(d).calibration is None   # left at its default
    pr = tf.ChannelPruning(importance="taylor", loss_fn=lambda out: out.sum())
    assert pr.to_dict()["loss_fn"] == "function" and tf.ChannelPruning.from_dict(pr.to_dict()).loss_fn is None
    assert tf.HalfPrecision(dtype=torch.float16).to_dict()["dtype"] == "float16"


def test_from_dict_refuses_another_type_and_unknown_fields():
    with pytest.raises(ConfigError, match=r"LowRank.from_dict got a dict of type 'ChannelPruning'"):
        tf.LowRank.from_dict(tf.ChannelPruning().to_dict())
    with pytest.raises(ConfigError, match="LowRank has no field 'ranks'"):
        tf.LowRank.from_dict({"type": "LowRank", "ranks": 3})
    with pytest.raises(ConfigError, match="no torchfast config is called 'Nope'"):
        config_from_dict({"type": "Nope"})
    with pytest.raises(ConfigError, match="several torchfast configs are called 'Options'"):
        config_from_dict({"type": "Options"})
    assert isinstance(config_from_dict({"type": "LowRank", "ratio": 0.25}), tf.LowRank)


# ---------------------------------------------------------------- former argument orders
def test_prune_former_order_warns_and_gives_the_same_result():
    cfg = tf.ChannelPruning(amount=0.5)
    new, rep_new = tf.prune(mixed(), cfg, example_inputs=X)
    with pytest.warns(FutureWarning, match=r"prune\(model, example_inputs, config\) is the former argument order; "
                                           r"call prune\(model, config, example_inputs=...\)"):
        old, rep_old = tf.prune(mixed(), X, cfg)
    assert fingerprint(old)[1] == fingerprint(new)[1]
    assert rep_old.summary["channels/heads removed"] == rep_new.summary["channels/heads removed"]
    with pytest.warns(FutureWarning, match=r"prune\(model, example_inputs\)"):
        tf.prune(mixed(), X, config=cfg)
    with pytest.raises(TypeError, match="takes model and config positionally"):
        tf.prune(mixed(), cfg, X)


def test_other_former_orders_warn():
    with pytest.warns(FutureWarning, match=r"call decompose\(model, config, filter_fn=...\)"):
        _, rep = tf.decompose(mixed(), tf.LowRank(ratio=0.5, min_flops_reduction=0),
                              lambda mod, name: name != "fc2")
    assert "excluded" in rep.where(layer="fc2")[0]["reason"]
    with pytest.warns(FutureWarning, match=r"decompose\(filter_fn=...\) is replaced by LowRank\(exclude="):
        _, rep = tf.decompose(mixed(), tf.LowRank(ratio=0.5, min_flops_reduction=0),
                              filter_fn=lambda mod, name: name != "fc1")
    assert "excluded" in rep.where(layer="fc1")[0]["reason"]
    with pytest.warns(FutureWarning, match=r"call sparsify\(model, config, example_inputs=...\)"):
        tf.sparsify(mixed(), tf.UnstructuredSparse(runs=3), X)
    with pytest.warns(FutureWarning, match=r"call quantize\(model, config, example_inputs=...\)"):
        tf.quantize(mixed(), tf.Int8Dynamic(keep_slower=True), X)


# ---------------------------------------------------------------- reports read one way
def test_reductions_read_before_over_after():
    m = mixed()
    _, lr = tf.decompose(m, tf.LowRank(ratio=0.25, min_flops_reduction=0), example_inputs=X)
    _, pr = tf.prune(m, tf.ChannelPruning(amount=0.5), example_inputs=X)
    _, sp = tf.sparsify(m, tf.UnstructuredSparse(amount=0.9, runs=3, min_speedup=0.0), example_inputs=X)
    for rep in (lr, pr, sp):
        assert rep.summary["params: x fewer"] > 1 and rep.summary["FLOPs: x fewer"] > 1, rep.summary
        assert not {"params_ratio", "params ratio", "FLOPs ratio", "layer_flops_ratio"} & set(rep.summary)
    assert lr.summary["params: x fewer"] == pytest.approx(lr.summary["params_before"] / lr.summary["params_after"])
    assert pr.summary["params: x fewer"] == pytest.approx(pr.summary["params before"] / pr.summary["params after"])
