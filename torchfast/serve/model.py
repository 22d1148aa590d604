"""What a server serves: a callable model plus its declared inputs, loaded from an artifact or the zoo.

``load_served_model("digits")`` trains the digits CNN (~10 s, real data, ~99 % accuracy) so that
``torchfast serve`` alone starts something useful; ``"minilm"`` serves all-MiniLM-L6-v2 sentence
embeddings with pad-and-mask batching; any torchvision classifier name serves that architecture
(random weights: for load tests); a path serves what ``torchfast.save`` wrote (TorchScript ``.pt``,
ExportedProgram ``.pt2``, ONNX ``.onnx`` or OpenVINO IR ``.xml``; the last three declare their inputs).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..specs import InputSpec, dtype_name, parse_dtype  # noqa: F401  (serving's names for the shared spec)
from .collate import SequencePadding


@dataclass
class ServedModel:
    """A model ready to batch: call style (one tensor, or keyword inputs), declared inputs, batching hints."""

    name: str
    model: Callable
    inputs: tuple[InputSpec, ...]
    keyword_inputs: bool = False       # call model(**{name: tensor}) instead of model(tensor, ...)
    sequence: SequencePadding | None = None
    max_batch_size: int | None = None  # a fixed-shape artifact caps (and pads to) its batch size
    fixed_batch: bool = False
    description: str = ""
    extra: dict = field(default_factory=dict)  # published in metadata: JSON scalars (or lists of them) only
    knobs: dict = field(default_factory=dict)  # per-model batcher knobs, over the server's defaults
    tokenizer: Any = field(default=None, repr=False)  # for clients of this process; never published

    def metadata(self) -> dict[str, Any]:
        """The model's interface as plain JSON: nothing from its internals, nothing from the server's disk."""
        extra = {str(k): v for k, v in self.extra.items() if _json_scalar(v)
                 or (isinstance(v, (list, tuple)) and len(v) <= 64 and all(_json_scalar(e) for e in v))}
        return {"name": self.name, "description": self.description,
                "inputs": [s.to_dict() for s in self.inputs], "keyword_inputs": self.keyword_inputs,
                "sequence_padding": self.sequence is not None, **extra}

    def example(self, rows: int = 1) -> dict[str, torch.Tensor]:
        """A valid request of ``rows`` rows (zeros; ones for integer inputs, 8 for dynamic sizes)."""
        return {s.name: s.example(rows) for s in self.inputs}

    def request(self, tensors: dict[str, torch.Tensor]) -> Any:
        """Validate named tensors against the declared inputs and shape them as the model is called."""
        known = {s.name for s in self.inputs}
        unknown = sorted(set(tensors) - known)
        if unknown:
            raise ValueError(f"unknown input(s) {unknown}; model {self.name!r} takes {sorted(known)}")
        missing = [s.name for s in self.inputs if s.name not in tensors]
        if missing:
            raise ValueError(f"missing input(s) {missing}; model {self.name!r} takes {sorted(known)}")
        for s in self.inputs:
            s.check(tensors[s.name])
        if self.keyword_inputs:
            return {s.name: tensors[s.name] for s in self.inputs}
        if len(self.inputs) == 1:
            return tensors[self.inputs[0].name]
        return tuple(tensors[s.name] for s in self.inputs)


def _json_scalar(v: Any) -> bool:
    return v is None or isinstance(v, (str, bool, int, float))


class MiniLMEmbedder(torch.nn.Module):
    """all-MiniLM-L6-v2 as its users call it: token ids + mask -> mean-pooled, L2-normalized embedding."""

    def __init__(self, bert: torch.nn.Module):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        from ..zoo.minilm import mean_pool
        out = self.bert(input_ids=input_ids, attention_mask=attention_mask)
        return {"embedding": mean_pool(out.last_hidden_state, attention_mask)}


def builtin_model(name: str) -> ServedModel:
    """The zoo models a bare ``torchfast serve NAME`` can start without any file."""
    if name == "digits":
        from ..zoo.digits import trained_cnn
        model, data = trained_cnn()
        acc = data.eval_fn(model)
        return ServedModel("digits", model.eval(), (InputSpec("input", (1, 16, 16)),),
                           description=f"DigitsCNN trained at startup on scikit-learn digits "
                                       f"(test accuracy {acc:.3f}); input: normalized 16x16 images",
                           extra={"test_accuracy": round(acc, 4), "outputs": ["logits[10]"]})
    if name == "minilm":
        from ..zoo.minilm import load_minilm
        bert, tok = load_minilm()
        seq = SequencePadding(dims={"input_ids": 1, "attention_mask": 1},
                              values={"input_ids": tok.pad_token_id or 0}, output_dims=None, multiple_of=8)
        longest = getattr(bert.config, "max_position_embeddings", None)
        return ServedModel("minilm", MiniLMEmbedder(bert).eval(),
                           (InputSpec("input_ids", (-1,), "int64", (longest,)),
                            InputSpec("attention_mask", (-1,), "int64", (longest,))),
                           keyword_inputs=True, sequence=seq, tokenizer=tok,
                           extra={"max_sequence_length": longest},
                           description="all-MiniLM-L6-v2 sentence embeddings (mean-pooled, normalized, 384-d)")
    import torchvision
    if name in torchvision.models.list_models(module=torchvision.models):
        model = torchvision.models.get_model(name, weights=None).eval()
        return ServedModel(name, model, (InputSpec("input", (3, 224, 224)),),
                           description=f"torchvision {name} with random weights (for load tests, not accuracy)")
    raise ValueError(f"unknown model {name!r}: give a path to a torchfast.save artifact (.pt, .pt2, .onnx, .xml), "
                     f"'digits', 'minilm' or a torchvision model name")


def load_artifact(path: str | Path) -> Any:
    """Load what torchfast.save wrote (ExportedPrograms as programs, so their input shapes are known).

    Goes through ``torchfast.load`` with its safe default: a file that would run code while loading (a
    pickle beyond tensors, native code, a program whose strings become Python) raises UnsafeArtifactError.
    """
    from ..export import load
    path = Path(path)
    obj = load(str(path), program=True)
    if not callable(obj) and not isinstance(obj, torch.export.ExportedProgram):
        raise ValueError(f"{path} holds {type(obj).__name__} (weights only?), not a runnable model; save it "
                         f"with torchfast.save(model, path, format='torchscript' or 'exported_program')")
    return obj


def _specs_from_exported(ep: Any) -> tuple[tuple[InputSpec, ...], int | None]:
    specs, batch = [], None
    user = [s for s in ep.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
    nodes = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    for s in user:
        val = nodes[s.arg.name].meta.get("val")
        if val is None or not hasattr(val, "shape"):
            continue
        dims = [d if isinstance(d, int) else -1 for d in val.shape]
        if dims and dims[0] != -1:
            batch = dims[0]
        tops = [None if isinstance(d, int) else _upper_bound(ep, d) for d in val.shape[1:]]
        specs.append(InputSpec(s.arg.name, tuple(dims[1:]), dtype_name(val.dtype),
                               tuple(tops) if any(t is not None for t in tops) else None))
    return tuple(specs), batch


def _upper_bound(ep: Any, dim: Any) -> int | None:
    """The largest size the program accepts for a dynamic dim (None when unbounded)."""
    try:
        rng = ep.range_constraints.get(dim.node.expr)
        upper = int(rng.upper) if rng is not None and rng.upper.is_finite else None
    except (AttributeError, TypeError, ValueError):
        return None
    return upper if upper is not None and 0 < upper < (1 << 62) else None


def _specs_from_engine(runner: Any, path: Path) -> tuple[tuple[InputSpec, ...], int | None, bool]:
    """InputSpecs of an ONNX / OpenVINO artifact from the shapes its engine declares, in the call's order."""
    declared = {e.name: e for e in runner.engine_inputs}
    names = list(runner.sig.input_names)
    unread = [n for n in names if n not in declared]
    if unread:
        raise ValueError(f"{path}: the graph does not read input(s) {unread} that the model's call takes, so "
                         f"their shape is unknown; export the model without them to serve it")
    specs, batches = [], set()
    for n in names:
        e = declared[n]
        if not e.batched:
            raise ValueError(f"{path}: input {n!r} is a scalar; served models take batched inputs")
        batches.add(e.batch)
        specs.append(InputSpec(n, e.shape, e.dtype))
    if len(batches) > 1:
        raise ValueError(f"{path}: inputs disagree on the batch size {sorted(batches)}; cannot batch requests")
    batch = batches.pop()
    return tuple(specs), (None if batch == -1 else batch), runner.sig.n_positional == 0


def load_served_model(source: str, name: str | None = None, input_shape: tuple[int, ...] | None = None,
                      input_dtype: str = "float32") -> ServedModel:
    """A path to an artifact, or a built-in name. ``input_shape`` (per row) declares a TorchScript input."""
    p = Path(source)
    if not p.exists():
        served = builtin_model(source)
        if name:
            served.name = name
        return served
    obj = load_artifact(p)
    model, specs, batch, keyword = obj, (), None, False
    if isinstance(obj, torch.export.ExportedProgram):
        specs, batch = _specs_from_exported(obj)
        model = obj.module()
    elif getattr(obj, "engine_inputs", None) and input_shape is None:
        specs, batch, keyword = _specs_from_engine(obj, p)
    if input_shape is not None:
        specs = (InputSpec("input", tuple(input_shape), input_dtype),)
    if not specs:
        raise ValueError(f"{p}: the artifact does not declare its input shape; pass --input-shape "
                         f"(per row, e.g. 3,224,224) and --input-dtype")
    served = ServedModel(name or p.stem.split(".")[0], model, specs, keyword_inputs=keyword, max_batch_size=batch,
                         fixed_batch=batch is not None, description=f"artifact {p.name}")
    if batch is not None:
        served.extra["fixed_batch_size"] = batch
    return served
