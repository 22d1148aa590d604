"""Where the command line gets a model and its inputs from: ``torchvision:NAME``, ``hf:PATH``,
``zoo:NAME``, ``module:callable`` / ``file.py:callable``, or a saved artifact (``torchfast.load``).

A source gives the model, one example batch of the requested shape, calibration batches, and — for the
built-in trained models — a real task metric, so a shell user gets the same verified pipeline as the API.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from .cli import MODEL_HELP  # lives with the parser, so that --help does not import torch
from .dropin import eval_mode
from .errors import TorchfastError
from .specs import InputSpec, SpecError, parse_dtype

__all__ = ["Source", "load_source", "parse_shape", "input_specs", "make_inputs", "SourceError", "MODEL_HELP"]


class SourceError(TorchfastError, ValueError):
    """The MODEL argument or the input options cannot be turned into a model (a usage error)."""


@dataclass
class Source:
    model: nn.Module
    example: Any                                   # one batch at the requested shape
    make_batch: Callable[[int], Any]               # batch of size n, same per-sample shape
    calibration: list = field(default_factory=list)
    eval_fn: Callable | None = None
    description: str = ""
    validation: list = field(default_factory=list)  # fidelity batches, distinct from the calibration ones
    image_prep: Any = None                          # cli_data.ImagePrep: how --calibration FOLDER images are normalized
    tokenize: Callable[[list[str]], Any] | None = None  # sentences -> a batch, for --calibration FILE.txt


def parse_shape(text: str) -> tuple[int, ...]:
    """``1,3,224,224`` or ``1x3x224x224`` -> (1, 3, 224, 224)."""
    import re
    parts = re.split(r"\s*[,x]\s*", text.strip())
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        raise SourceError(f"--input-shape {text!r}: expected integers like 1,3,224,224") from None
    if any(d < 1 for d in shape):
        raise SourceError(f"--input-shape {text!r}: every dimension must be >= 1")
    return shape


def _dtype(name: str) -> torch.dtype:
    try:
        return parse_dtype(name, "--input-dtype")
    except SpecError as e:
        raise SourceError(str(e)) from None


def input_specs(shapes: list[tuple[int, ...]], dtypes: list[torch.dtype]) -> list[InputSpec]:
    """The positional inputs ``--input-shape``/``--input-dtype`` declare: each shape's dims after the batch
    dim, any batch size; the last dtype given repeats (float32 when none is)."""
    return [InputSpec(f"input {i}", s[1:], dtypes[min(i, len(dtypes) - 1)] if dtypes else torch.float32)
            for i, s in enumerate(shapes)]


def make_inputs(specs: list[InputSpec], rows: int, seed: int = 0, high: int = 100) -> Any:
    """Random inputs of ``rows`` rows: normal floats, integers in [0, high). One spec -> a tensor, several -> a tuple."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for s in specs:
        shape, dt = (rows, *s.shape), s.torch_dtype
        out.append(torch.randn(shape, generator=g).to(dt) if dt.is_floating_point
                   else torch.randint(0, high, shape, generator=g, dtype=dt))
    return out[0] if len(out) == 1 else tuple(out)


def _random_source(model: nn.Module, shapes, dtypes, n_calib: int, desc: str, high: int = 100) -> Source:
    specs, rows = input_specs(shapes, dtypes), shapes[0][0]

    def make(n: int, seed: int = 0):
        return make_inputs(specs, n, seed, high)
    calib = [make(rows, seed=100 + i) for i in range(n_calib)]
    val = [make(rows, seed=200 + i) for i in range(4)]
    return Source(eval_mode(model), make(rows), lambda n: make(n), calib, None, desc, val)


def _torchvision(name: str, shapes, dtypes, n_calib: int, weights: str | None) -> Source:
    import torchvision

    try:
        model = torchvision.models.get_model(name, weights=weights)
    except ValueError as e:
        known = ", ".join(torchvision.models.list_models()[:12])
        raise SourceError(f"torchvision has no model {name!r} ({e}); e.g. {known}, ...") from None
    shapes = shapes or [(1, 3, 224, 224)]
    what = f"torchvision {name} ({'weights ' + weights if weights else 'random weights: speed only'})"
    src = _random_source(model, shapes, dtypes or [torch.float32], n_calib, what)
    from .cli_data import ImagePrep
    src.image_prep = ImagePrep((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # the ImageNet statistics
    return src


def _hf(path: str, shapes, n_calib: int) -> Source:
    try:
        from transformers import AutoModel
    except ImportError as e:
        raise SourceError("hf: models need transformers: pip install 'torchfast[text]'") from e
    model = eval_mode(AutoModel.from_pretrained(path))
    batch, seq = shapes[0][:2] if shapes and len(shapes[0]) >= 2 else (1, 128)
    vocab = int(getattr(model.config, "vocab_size", 1000))

    def make(n: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        return {"input_ids": torch.randint(0, vocab, (n, seq), generator=g),
                "attention_mask": torch.ones(n, seq, dtype=torch.long)}
    def tokenizer():
        from transformers import AutoTokenizer
        try:
            return AutoTokenizer.from_pretrained(path)
        except Exception as e:  # noqa: BLE001 - a model folder without a tokenizer
            raise SourceError(f"hf:{path} has no tokenizer to read sentences with ({type(e).__name__}: {e})") from e
    from .cli_data import tokenizer_fn
    return Source(model, make(batch), lambda n: make(n), [make(batch, 100 + i) for i in range(n_calib)], None,
                  f"Hugging Face {path} (random token ids, seq {seq})", [make(batch, 200 + i) for i in range(4)],
                  tokenize=tokenizer_fn(tokenizer, seq, ("input_ids", "attention_mask")))


def _zoo(name: str, shapes, n_calib: int) -> Source:
    if name in ("digits-cnn", "digits-mlp"):
        from .zoo.digits import trained_cnn, trained_mlp
        model, data = trained_cnn() if name == "digits-cnn" else trained_mlp()
        n = shapes[0][0] if shapes else 64
        x = data.x_test
        val = [x[i:i + 64] for i in range(0, len(x), 64)]  # held-out test images; calibration uses training ones
        from .cli_data import ImagePrep
        return Source(eval_mode(model), x[:n], lambda k: x[:k], data.calibration()[:max(1, n_calib)], data.eval_fn,
                      f"trained {name} on scikit-learn digits (metric: test accuracy)", val,
                      image_prep=ImagePrep((0.3,), (0.35,)))  # load_digits' normalization, white digits on black
    if name == "minilm":
        from .zoo.minilm import batches, load_minilm
        model, tok = load_minilm()
        batch, seq = shapes[0][:2] if shapes and len(shapes[0]) >= 2 else (8, 128)
        calib = batches(tok, n_batches=max(1, n_calib), batch_size=batch, seq_len=seq, offset=64)
        ex = batches(tok, 1, batch, seq)[0]
        val = batches(tok, n_batches=4, batch_size=batch, seq_len=seq, offset=64 + batch * max(1, n_calib))
        from .cli_data import tokenizer_fn
        return Source(model, ex, lambda k: batches(tok, 1, k, seq)[0], calib, None,
                      f"all-MiniLM-L6-v2 on real sentences (batch {batch}, seq {seq})", val,
                      tokenize=tokenizer_fn(tok, seq, tuple(ex)))
    raise SourceError(f"unknown zoo model {name!r}; choose digits-cnn, digits-mlp or minilm")


def _callable(spec: str, shapes, dtypes, n_calib: int) -> Source:
    target, _, attr = spec.rpartition(":")
    try:
        if target.endswith(".py"):
            if not os.path.exists(target):
                raise SourceError(f"{target}: no such file")
            mspec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(target))[0], target)
            mod = importlib.util.module_from_spec(mspec)
            import sys
            sys.modules.setdefault(mspec.name, mod)  # dataclasses and pickling look the module up by name
            mspec.loader.exec_module(mod)
        else:
            mod = importlib.import_module(target)
    except ImportError as e:
        raise SourceError(f"cannot import {target!r} for MODEL {spec!r}: {e}") from e
    fn = getattr(mod, attr, None)
    if fn is None:
        raise SourceError(f"{target!r} has no attribute {attr!r} (MODEL {spec!r})")
    made = fn() if callable(fn) and not isinstance(fn, nn.Module) else fn
    example = None
    if isinstance(made, tuple) and len(made) == 2 and isinstance(made[0], nn.Module):
        made, example = made
    if not isinstance(made, nn.Module):
        raise SourceError(f"{spec} returned {type(made).__name__}, not an nn.Module")
    if example is not None and not shapes:
        from .modules import batches_list
        return Source(eval_mode(made), example, lambda n: example, batches_list([example]), None, spec,
                      batches_list([example]))
    if not shapes:
        raise SourceError(f"MODEL {spec!r} needs --input-shape (e.g. --input-shape 1,3,224,224)")
    return _random_source(made, shapes, dtypes or [torch.float32], n_calib, spec)


def _artifact(path: str, shapes, dtypes, n_calib: int) -> Source:
    from .export import load
    obj = load(path)
    if hasattr(obj, "module") and not isinstance(obj, nn.Module):  # an ExportedProgram
        obj = obj.module()
    if not callable(obj):
        raise SourceError(f"{path} holds {type(obj).__name__}, not a runnable model")
    if not shapes:
        raise SourceError(f"a saved artifact needs --input-shape (e.g. --input-shape 1,3,224,224)")
    return _random_source(obj, shapes, dtypes or [torch.float32], n_calib, f"artifact {path}")


def load_source(spec: str, input_shapes: list[str] | None = None, input_dtypes: list[str] | None = None,
                calibration: int | str = 8, weights: str | None = None) -> Source:
    """Turn a MODEL argument and the input options into a :class:`Source` (see MODEL_HELP).

    ``calibration``: a number of batches (random inputs, or the built-in data of zoo: models), or the path
    of unlabeled data (a folder of images, a .txt of sentences, a .pt/.npy of tensors; ``torchfast.cli_data``):
    those batches become the calibration data, and the last quarter of them the fidelity check."""
    if isinstance(calibration, str) and calibration.strip().isdigit():
        calibration = int(calibration)
    if isinstance(calibration, str):
        from .cli_data import load_data
        src = load_source(spec, input_shapes, input_dtypes, 0, weights)
        src.calibration, src.validation = load_data(calibration, src), []
        src.description += f"; calibration: {len(src.calibration)} batch(es) from {calibration}"
        return src
    shapes = [parse_shape(s) for s in (input_shapes or [])]
    dtypes = [_dtype(d) for d in (input_dtypes or [])]
    if calibration < 0:
        raise SourceError(f"--calibration must be >= 0, got {calibration}")
    if os.path.exists(spec) and not spec.endswith(".py"):
        return _artifact(spec, shapes, dtypes, calibration)
    kind, sep, rest = spec.partition(":")
    if not sep or not rest:
        raise SourceError(f"cannot read MODEL {spec!r}: not a file, and not kind:name. {MODEL_HELP}")
    if kind == "torchvision":
        return _torchvision(rest, shapes, dtypes, calibration, weights)
    if kind in ("hf", "huggingface"):
        return _hf(rest, shapes, calibration)
    if kind == "zoo":
        return _zoo(rest, shapes, calibration)
    return _callable(spec, shapes, dtypes, calibration)
