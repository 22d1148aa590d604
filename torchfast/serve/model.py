"""What a server serves: a callable model plus its declared inputs, loaded from an artifact or the zoo.

``load_served_model("digits")`` trains the digits CNN (~10 s, real data, ~99 % accuracy) so that
``torchfast serve`` alone starts something useful; ``"minilm"`` serves all-MiniLM-L6-v2 sentence
embeddings with pad-and-mask batching; any torchvision classifier name serves that architecture
(random weights: for load tests); a path serves what ``torchfast.save`` wrote (TorchScript ``.pt``,
ExportedProgram ``.pt2``, ONNX ``.onnx`` or OpenVINO IR ``.xml``), with the inputs it declares: the signature
``torchfast.save(..., example_inputs=x)`` records, or what an ExportedProgram / ONNX / OpenVINO graph says.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..signature import Signature
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
    outputs: tuple[str, ...] = ()      # output names, when the artifact records them

    def metadata(self) -> dict[str, Any]:
        """The model's interface as plain JSON: nothing from its internals, nothing from the server's disk."""
        extra = {str(k): v for k, v in self.extra.items() if _json_scalar(v)
                 or (isinstance(v, (list, tuple)) and len(v) <= 64 and all(_json_scalar(e) for e in v))}
        doc = {"name": self.name, "description": self.description,
               "inputs": [s.to_dict() for s in self.inputs], "keyword_inputs": self.keyword_inputs,
               "sequence_padding": self.sequence is not None}
        if self.outputs:
            doc["outputs"] = list(self.outputs)
        return {**doc, **extra}

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


def load_served_model(source: str, name: str | None = None,
                      input_shape: Sequence[int] | Sequence[Sequence[int]] | None = None,
                      input_dtype: str | Sequence[str] = "float32") -> ServedModel:
    """A path to an artifact, or a built-in name.

    An artifact written by ``torchfast.save(..., example_inputs=x)`` declares its inputs (and ONNX /
    OpenVINO files and ExportedPrograms always do), so it needs nothing else. ``input_shape`` declares the
    inputs of one that does not (a TorchScript file saved by plain torch), or overrides what it declares:
    one example batch, batch dim first (``(1, 3, 224, 224)``), or a list of them for several positional
    inputs, exactly as ``torchfast optimize --input-shape`` takes it; the batch dim is served as any size.
    ``input_dtype``: one dtype, or one per input (the last repeats).
    """
    p = Path(source)
    if not p.exists():
        served = builtin_model(source)
        if name:
            served.name = name
        return served
    obj = load_artifact(p)
    sig = getattr(obj, "torchfast_signature", None)
    model = obj
    if isinstance(obj, torch.export.ExportedProgram):
        model = obj.module()
    shapes = _shapes(input_shape)
    if shapes:
        dtypes = [input_dtype] if isinstance(input_dtype, (str, torch.dtype)) else list(input_dtype or ["float32"])
        sig = declared_signature(model, shapes, dtypes, sig, p)
    elif getattr(obj, "engine_inputs", None):
        specs, batch, keyword = _specs_from_engine(obj, p)
        if batch is not None:   # a static engine: every call runs at its batch size
            specs = tuple(dataclasses.replace(s, batch=batch) for s in specs)
        sig = Signature(specs, sig.outputs if sig is not None else (), keyword)
    if sig is None:
        raise ValueError(f"{p}: the artifact does not declare its inputs (it was saved without example inputs, "
                         f"or by plain torch); save it with torchfast.save(model, path, example_inputs=x), or "
                         f"pass --input-shape with one example batch, batch dim first (e.g. 1,3,224,224), and "
                         f"--input-dtype")
    for s in sig.inputs:
        if not s.batched:
            raise ValueError(f"{p}: input {s.name!r} has no batch dim; served models take batched inputs")
    batch = sig.fixed_batch   # a fixed-batch artifact: requests of any rows, padded to its batch per call
    specs = tuple(dataclasses.replace(s, batch=-1) for s in sig.inputs)
    served = ServedModel(name or p.stem.split(".")[0], model, specs, keyword_inputs=sig.keyword_inputs,
                         max_batch_size=batch, fixed_batch=batch is not None, description=f"artifact {p.name}",
                         outputs=sig.outputs)
    if batch is not None:
        served.extra["fixed_batch_size"] = batch
    return served


def _shapes(input_shape: Any) -> list[tuple[int, ...]]:
    if input_shape is None or len(input_shape) == 0:
        return []
    if all(isinstance(d, int) for d in input_shape):
        return [tuple(input_shape)]
    return [tuple(s) for s in input_shape]


def declared_signature(model: Any, shapes: list[tuple[int, ...]], dtypes: Sequence[Any], recorded: Any,
                       path: Any) -> Signature:
    """The inputs ``--input-shape`` declares (each one example batch, batch dim first), checked by running
    the model once on them: a shape given per row, as ``torchfast serve`` once took it, is named as such."""
    for s in shapes:
        if not s or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in s):
            raise ValueError(f"--input-shape {','.join(map(str, s))}: give one example batch, batch dim first, "
                             f"with every size >= 1 (e.g. 1,3,224,224)")
    names = _input_names(model, len(shapes), recorded)
    dts = [parse_dtype(dtypes[min(i, len(dtypes) - 1)], "--input-dtype") for i in range(len(shapes))]
    specs = tuple(InputSpec(n, s[1:], dt) for n, s, dt in zip(names, shapes, dts))
    why = _runs_batched(model, shapes, dts)
    if why is None:
        return Signature(specs, recorded.outputs if recorded is not None else (), False)
    given = " ".join(f"--input-shape {','.join(map(str, s))}" for s in shapes)
    if _runs_batched(model, [(1, *s) for s in shapes], dts) is None:
        fixed = " ".join(f"--input-shape 1,{','.join(map(str, s))}" for s in shapes)
        raise ValueError(f"{path}: {given} is read as one example batch, batch dim first (as in torchfast "
                         f"optimize); this model takes it as one row, so pass {fixed}")
    raise ValueError(f"{path}: the model does not run on {given} (one example batch, batch dim first, e.g. "
                     f"1,3,224,224) with --input-dtype {', '.join(dtype_name(d) for d in dts)}: {why}")


def _input_names(model: Any, n: int, recorded: Any) -> list[str]:
    if recorded is not None and len(recorded.inputs) == n:
        return [s.name for s in recorded.inputs]
    schema = getattr(getattr(model, "forward", None), "schema", None)
    names = [a.name for a in schema.arguments[1:]] if schema is not None else []
    if len(names) >= n and len(set(names[:n])) == n:
        return names[:n]
    return ["input"] if n == 1 else [f"input_{i}" for i in range(n)]


def _runs_batched(model: Any, shapes: list[tuple[int, ...]], dtypes: list[torch.dtype]) -> str | None:
    """None when the model runs on these inputs and answers with one row per input row, else why not."""
    xs = [torch.zeros(s, dtype=dt) if dt.is_floating_point else torch.ones(s, dtype=dt)
          for s, dt in zip(shapes, dtypes)]
    try:
        with torch.inference_mode():
            out = model(*xs)
    except Exception as e:  # noqa: BLE001 - a wrong shape fails somewhere inside the model
        lines = str(e).strip().splitlines()
        return f"{type(e).__name__}: {lines[-1][:200] if lines else ''}"
    rows = shapes[0][0]
    leaves = [out] if isinstance(out, torch.Tensor) else list(out.values()) if isinstance(out, dict) \
        else list(out) if isinstance(out, (tuple, list)) else []
    tensors = [t for t in leaves if isinstance(t, torch.Tensor)]
    if not tensors:
        return "it returns no tensor"
    if not all(t.dim() > 0 and t.shape[0] == rows for t in tensors):
        return f"it does not answer with {rows} rows (output shapes {[list(t.shape) for t in tensors]})"
    return None
