"""The one table of recipe stages: what a recipe may hold, what runs it, and what it makes.

Each :class:`Stage` names a config class, the transform that applies it, the names a recipe string uses
for it (with preset fields), and the kind of model it produces. The recipe parser and its help text,
``config_from_dict``, ``quantize()``, ``optimize()`` (which refuses a stage its backend cannot compile
before any work) and the command line all read this table, so adding a transform means adding one entry.
Classes and functions are written as ``"module:attr"`` and imported on first use: listing the stages
(``torchfast --help``) does not import torch.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Union

__all__ = ["Stage", "STAGES", "PRODUCES", "register_stage", "stage_of", "stage_named", "recipe_help",
           "AUTO_HELP", "check_backend", "load"]

# what the model holds after a stage. The quantized kinds are those of torchfast.quantized.KINDS, the names
# backends declare in backends/registry.py; the others compile like a float model.
PRODUCES: dict[str, str] = {
    "float": "a float model",
    "sparse": "float weights in sparse layouts",
    "half": "a bf16/fp16 model",
    "ao": "torch.ao quantized modules",
    "pt2e": "a PT2E quantize/dequantize graph",
    "torchao": "torchao-quantized weights",
}
_AS_FLOAT = ("float", "sparse", "half")

Ref = Union[str, type, Callable[..., Any]]


def load(ref: Ref) -> Any:
    """The object a ``"module:attr"`` reference names (imported now); an object is returned as it is."""
    if not isinstance(ref, str):
        return ref
    mod, sep, attr = ref.partition(":")
    if not sep or not mod or not attr:
        raise ValueError(f"a stage reference is written 'module:attr', got {ref!r}")
    obj: Any = importlib.import_module(mod)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def _path(ref: Ref) -> str:
    return ref if isinstance(ref, str) else f"{ref.__module__}:{ref.__qualname__}"


@dataclass(frozen=True)
class Stage:
    """One kind of recipe stage.

    config: the config class, ``"module:Class"`` where it is defined (that is how a config finds its entry).
    transform: ``fn(model, config, *, example_inputs, calibration, inplace) -> (model, report)``.
    names: recipe-string names, the recipe name first, then aliases; each with the fields it presets.
    produces: the kinds of model (keys of :data:`PRODUCES`) the stage can leave, or a function of the
      config returning them (``Int8Static(method="pt2e")`` makes a PT2E graph, ``method="fx"`` torch.ao).
    implementation: the function behind the config inside its transform (``quantize()`` dispatches on it),
      called as ``fn(model, config, *, example_inputs, calibration, exclusion, inplace)``.
    variants: field changes that make another kind, offered when a backend cannot compile this one.
    engine_int8: as the last stage, ONNX Runtime and OpenVINO (and ``backend="auto"``) quantize the model
      with their own int8 toolchain instead of running this transform.
    """
    config: Ref
    transform: Ref
    names: Mapping[str, Mapping[str, Any]] = field(hash=False)
    produces: tuple[str, ...] | Callable[[Any], tuple[str, ...]] = ("float",)
    implementation: Ref | None = None
    variants: tuple[Mapping[str, Any], ...] = field(default=(), hash=False)
    engine_int8: bool = False

    def __post_init__(self) -> None:
        if not self.names:
            raise ValueError(f"stage {_path(self.config)} needs at least one recipe name")
        if not callable(self.produces):
            bad = [k for k in self.produces if k not in PRODUCES]
            if bad or not self.produces:
                raise ValueError(f"stage {self.name!r}: produces must be kinds among {', '.join(PRODUCES)}, "
                                 f"got {self.produces!r}")

    @property
    def name(self) -> str:
        """The recipe name (the first of ``names``)."""
        return next(iter(self.names))

    @property
    def config_path(self) -> str:
        """``"module:Class"`` of the config, without importing it."""
        return _path(self.config)

    @property
    def config_name(self) -> str:
        return self.config_path.rpartition(":")[2].rpartition(".")[2]

    def config_class(self) -> type:
        return load(self.config)

    def transform_fn(self) -> Callable[..., Any]:
        return load(self.transform)

    def matches(self, cls: type) -> bool:
        return self.config is cls or self.config_path == _path(cls)

    def kinds(self, config: Any) -> tuple[str, ...]:
        """The kinds of model this stage can leave when run with ``config``."""
        return tuple(self.produces(config)) if callable(self.produces) else tuple(self.produces)


# ---------------------------------------------------------------- how a config maps to a kind
def _int8_static_kinds(cfg: Any) -> tuple[str, ...]:
    """fx: torch.ao modules; pt2e: a PT2E graph; auto: fx, plus pt2e when compile_ok lets it try."""
    if cfg.method == "pt2e":
        return ("pt2e",)
    if cfg.method == "auto" and cfg.compile_ok:
        return ("ao", "pt2e")
    return ("ao",)


def _int8_dynamic_kinds(cfg: Any) -> tuple[str, ...]:
    """backend="auto" keeps, per layer, the faster of torch.ao and torchao."""
    return {"torch.ao": ("ao",), "torchao": ("torchao",)}.get(cfg.backend, ("ao", "torchao"))


_QUANT = "torchfast.quant:quantize"

STAGES: dict[str, Stage] = {s.name: s for s in [
    Stage("torchfast.lowrank.config:LowRank", "torchfast.lowrank:decompose", {"lowrank": {}, "low-rank": {}}),
    Stage("torchfast.prune.config:ChannelPruning", "torchfast.prune:prune", {"prune": {}, "channel-pruning": {}}),
    Stage("torchfast.prune.config:SemiStructured24", "torchfast.prune:sparsify",
          {"sparse24": {}, "2to4": {}, "semi-structured": {}}, produces=("sparse",)),
    Stage("torchfast.prune.config:UnstructuredSparse", "torchfast.prune:sparsify", {"sparse": {}},
          produces=("sparse",)),
    Stage("torchfast.quant.config:Int8Dynamic", _QUANT, {"int8-dynamic": {}, "dynamic": {}},
          produces=_int8_dynamic_kinds, implementation="torchfast.quant.refine:refined_dynamic",
          variants=({"backend": "torchao"}, {"backend": "torch.ao"}), engine_int8=True),
    Stage("torchfast.quant.config:Int8Static", _QUANT, {"int8-static": {}, "static": {}, "int8": {}},
          produces=_int8_static_kinds, implementation="torchfast.quant.select:quantize_static",
          variants=({"method": "pt2e"}, {"method": "fx"}), engine_int8=True),
    Stage("torchfast.quant.config:WeightOnly", _QUANT,
          {"weight-only": {}, "int8-weight-only": {"bits": 8}, "int4-weight-only": {"bits": 4}, "int4": {"bits": 4}},
          produces=("torchao",), implementation="torchfast.quant.weight_only:quantize_weight_only"),
    Stage("torchfast.quant.config:Float8", _QUANT, {"float8": {}, "fp8": {}}, produces=("torchao",),
          implementation="torchfast.quant.weight_only:quantize_float8"),
    Stage("torchfast.quant.config:HalfPrecision", _QUANT,
          {"fp16": {"dtype": "fp16"}, "bf16": {"dtype": "bf16"}, "half": {"dtype": "fp16"}},
          produces=("half",), implementation="torchfast.quant.half:cast_half"),
]}


def register_stage(stage: Stage) -> Stage:
    """Add a transform of your own to the table, so recipes, recipe strings and ``optimize()`` run it.
    A config class or a recipe name already in the table is refused (one entry per config); the same entry
    again (its module run a second time, a notebook cell re-run) replaces it."""
    if not isinstance(stage, Stage):
        raise TypeError(f"register_stage takes a torchfast.stages.Stage, got {type(stage).__name__}")
    again = STAGES.get(stage.name)
    if again is not None and again.config_path == stage.config_path and list(again.names) == list(stage.names):
        STAGES[stage.name] = stage
        return stage
    for other in STAGES.values():
        if other.config_path == stage.config_path:
            raise ValueError(f"{stage.config_name} already has a stage (recipe name {other.name!r})")
        clash = sorted(set(map(str.lower, other.names)) & set(map(str.lower, stage.names)))
        if clash:
            raise ValueError(f"recipe name(s) {', '.join(map(repr, clash))} already belong to {other.config_name}")
    STAGES[stage.name] = stage
    return stage


def stage_of(config: Any) -> Stage | None:
    """The entry of a config (or config class), its base classes included; None when it has none."""
    cls = config if isinstance(config, type) else type(config)
    for t in cls.__mro__:
        for s in STAGES.values():
            if s.matches(t):
                return s
    return None


def stage_named(name: str) -> tuple[Stage, Mapping[str, Any]] | None:
    """The entry a recipe-string name (any case) stands for, with the fields that name presets."""
    key = name.strip().lower()
    for s in STAGES.values():
        for n, preset in s.names.items():
            if n.lower() == key:
                return s, preset
    return None


def _names_text(s: Stage) -> str:
    first = s.names[s.name]
    others = []
    for n, preset in list(s.names.items())[1:]:
        if dict(preset) == dict(first):
            others.append(n)
        else:
            others.append(f"{n} = {s.name}:" + ",".join(f"{k}={v}" for k, v in preset.items()))
    return s.name + (f" ({'; '.join(others)})" if others else "")


def recipe_help() -> str:
    """The recipe syntax and every stage name, for ``--help`` and error messages."""
    names = ", ".join(_names_text(s) for s in STAGES.values())
    return (f"stages separated by ',' or '+'; each NAME or NAME:key=value,key=value (keys are the config's "
            f"fields). Names: {names}. Example: 'lowrank:ratio=0.5,prune:amount=0.3,int8-static'")


# ---------------------------------------------------------------- the "auto" recipe
AUTO_HELP = ("'auto': search pruning x low-rank x int8 x every backend for the fastest model within the "
             "tolerance, distilling pruned/factorized candidates on the calibration data (torchfast.search)")


# ---------------------------------------------------------------- stages vs backends
def _compiles(kind: str, accepted: Iterable[str]) -> bool:
    return kind in _AS_FLOAT or kind in accepted


def check_backend(recipe: Iterable[Any], backend: str) -> None:
    """Refuse, before any stage runs, a stage whose model ``backend`` cannot compile whatever the stage
    chooses (a torch.ao int8 model on inductor): the message names the stage, the backend and what works.
    ``recipe`` holds the stages the model goes through before compiling (not one the backend lowers itself);
    ``backend="auto"`` accepts every stage (eager compiles every kind)."""
    if backend == "auto":
        return
    from .backends.registry import BACKENDS, get_backend
    from .config import ConfigError
    from .pipeline import describe

    accepted = get_backend(backend).quantized
    for cfg in recipe:
        stage = stage_of(cfg)
        if stage is None:
            continue
        kinds = stage.kinds(cfg)
        if any(_compiles(k, accepted) for k in kinds):
            continue
        fixes = []
        for change in stage.variants:
            try:
                alt = cfg.replace(**change)
            except (ConfigError, TypeError, ValueError):
                continue
            if alt != cfg and any(_compiles(k, accepted) for k in stage.kinds(alt)):
                fixes.append(f"{describe(alt)} for {backend}")
        if stage.engine_int8 and backend in ("onnxruntime", "openvino"):
            fixes.append(f"it as the last stage of the recipe ({backend} then quantizes with its own int8 toolchain)")
        others = [n for n, b in BACKENDS.items() if n != backend and any(_compiles(k, b.quantized) for k in kinds)]
        fixes.append("backend=" + " / ".join(repr(n) for n in [*others, "auto"]))
        what = " or ".join(PRODUCES[k] for k in kinds)
        raise ConfigError(f"recipe stage {describe(cfg)} makes {what}, which backend {backend!r} cannot compile; "
                          f"use {', or '.join(fixes)}")
