"""Triton Inference Server: (a) a model repository for Triton's PyTorch backend, (b) a real Triton via PyTriton.

(a) ``write_model_repository`` writes ``repo/NAME/1/model.pt`` (TorchScript) and ``repo/NAME/config.pbtxt``
whose ``dynamic_batching`` block carries our knobs (``max_batch_size``, ``max_queue_delay_microseconds``,
``preferred_batch_size``, ``default_queue_policy``). Point ``tritonserver --model-repository repo`` at it.

(b) ``serve_pytriton`` starts a real ``tritonserver`` (bundled in ``nvidia-pytriton``) whose dynamic batcher
batches requests for a torchfast model, on 127.0.0.1. nvidia-pytriton 0.7 pins ``numpy<2``, so install
it in its own environment (``pip install nvidia-pytriton``); its bundled Python-backend stub links
libpython, which we make findable by putting the running Python's ``lib`` dir on ``LD_LIBRARY_PATH``.
"""
from __future__ import annotations

import os
import socket
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from ..specs import dtype_name

_TRITON_TYPES = {torch.float32: "TYPE_FP32", torch.float16: "TYPE_FP16", torch.bfloat16: "TYPE_BF16",
                 torch.float64: "TYPE_FP64", torch.int64: "TYPE_INT64", torch.int32: "TYPE_INT32",
                 torch.int16: "TYPE_INT16", torch.int8: "TYPE_INT8", torch.uint8: "TYPE_UINT8", torch.bool: "TYPE_BOOL"}


@dataclass(frozen=True)
class TritonBatching:
    """Our batcher's knobs in Triton's words (validated on construction)."""

    max_batch_size: int = 32
    max_delay_ms: float = 5.0
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_size: int = 0           # 0 = unbounded (Triton's default)
    timeout_ms: float | None = None   # default per-request queue timeout
    timeout_action: str = "REJECT"    # or "DELAY"
    allow_timeout_override: bool = True
    priority_levels: int = 0

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.max_delay_ms < 0:
            raise ValueError(f"max_delay_ms must be >= 0, got {self.max_delay_ms}")
        bad = [b for b in self.preferred_batch_sizes if not 1 <= b <= self.max_batch_size]
        if bad:
            raise ValueError(f"preferred_batch_sizes {bad} must lie in 1..max_batch_size={self.max_batch_size}")
        if self.timeout_action not in ("REJECT", "DELAY"):
            raise ValueError(f"timeout_action must be 'REJECT' or 'DELAY', got {self.timeout_action!r}")

    @property
    def max_queue_delay_microseconds(self) -> int:
        return int(round(self.max_delay_ms * 1000))


def _as_tuple(x: Any) -> tuple[torch.Tensor, ...]:
    if isinstance(x, torch.Tensor):
        return (x,)
    if isinstance(x, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in x):
        return tuple(x)
    raise TypeError("Triton's PyTorch backend passes positional tensors: example_inputs must be a tensor or a "
                    f"tuple of tensors, got {type(x).__name__}")


def _outputs_of(out: Any) -> tuple[torch.Tensor, ...]:
    if isinstance(out, torch.Tensor):
        return (out,)
    if isinstance(out, (tuple, list)):
        return tuple(_outputs_of(o)[0] for o in out)
    raise TypeError(f"Triton's PyTorch backend needs tensor outputs, the model returned {type(out).__name__}")


def _tensor_block(kind: str, name: str, t: torch.Tensor, dynamic: Sequence[int]) -> str:
    if t.dtype not in _TRITON_TYPES:
        raise TypeError(f"{kind} {name!r}: dtype {t.dtype} has no Triton type")
    dims = [-1 if i + 1 in dynamic else int(d) for i, d in enumerate(t.shape[1:])]
    return (f"  {{\n    name: \"{name}\"\n    data_type: {_TRITON_TYPES[t.dtype]}\n"
            f"    dims: [ {', '.join(str(d) for d in dims) or '1'} ]\n  }}")


def config_pbtxt(name: str, inputs: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor], batching: TritonBatching,
                 instance_count: int = 1, kind: str = "KIND_CPU", dynamic_dims: Sequence[int] = ()) -> str:
    """The text of config.pbtxt (protobuf text format of Triton's ModelConfig)."""
    b = batching
    ins = ",\n".join(_tensor_block("input", f"INPUT__{i}", t, dynamic_dims) for i, t in enumerate(inputs))
    outs = ",\n".join(_tensor_block("output", f"OUTPUT__{i}", t, ()) for i, t in enumerate(outputs))
    policy = [f"    timeout_action: {b.timeout_action}",
              f"    default_timeout_microseconds: {int(round((b.timeout_ms or 0) * 1000))}",
              f"    allow_timeout_override: {'true' if b.allow_timeout_override else 'false'}",
              f"    max_queue_size: {b.max_queue_size}"]
    lines = [f'name: "{name}"', 'platform: "pytorch_libtorch"', f"max_batch_size: {b.max_batch_size}",
             f"input [\n{ins}\n]", f"output [\n{outs}\n]",
             f"instance_group [\n  {{\n    count: {instance_count}\n    kind: {kind}\n  }}\n]",
             "dynamic_batching {"]
    if b.preferred_batch_sizes:
        lines.append(f"  preferred_batch_size: [ {', '.join(str(s) for s in b.preferred_batch_sizes)} ]")
    lines.append(f"  max_queue_delay_microseconds: {b.max_queue_delay_microseconds}")
    if b.priority_levels:
        lines += [f"  priority_levels: {b.priority_levels}", "  default_priority_level: 1"]
    lines += ["  default_queue_policy {", *policy, "  }", "}"]
    return "\n".join(lines) + "\n"


def write_model_repository(model: Any, repo: str | Path, example_inputs: Any, name: str = "model",
                           batching: TritonBatching | None = None, *, instance_count: int = 1, kind: str = "KIND_CPU",
                           dynamic_dims: Sequence[int] = (), version: int = 1) -> Path:
    """Write a Triton model repository for ``model`` (an nn.Module is frozen to TorchScript); returns the model dir.

    ``dynamic_dims``: per-row input dims (1-based, after the batch dim) declared -1 (e.g. sequence length).
    """
    batching = batching or TritonBatching()
    inputs = _as_tuple(example_inputs)
    if inputs[0].shape[0] < 1:
        raise ValueError("example_inputs need a leading batch dimension of at least 1")
    if any(c in name for c in "/\\ ") or not name:
        raise ValueError(f"model name {name!r} must be a non-empty name without slashes or spaces")
    mdir = Path(repo) / name
    (mdir / str(version)).mkdir(parents=True, exist_ok=True)
    path = mdir / str(version) / "model.pt"
    if isinstance(model, torch.jit.ScriptModule):
        scripted = model
        torch.jit.save(scripted, str(path))
    else:
        from ..export import save
        save(model, path, format="torchscript", example_inputs=inputs)
        scripted = torch.jit.load(str(path))
    with torch.no_grad():
        outputs = _outputs_of(scripted(*inputs))
    (mdir / "config.pbtxt").write_text(config_pbtxt(name, inputs, outputs, batching, instance_count, kind,
                                                    dynamic_dims))
    return mdir


def parse_pbtxt(text: str) -> dict:
    """A small reader for protobuf text format (enough for config.pbtxt): repeated fields become lists."""
    import re
    tokens = re.findall(r'"(?:[^"\\]|\\.)*"|[{}\[\]:,]|[^\s{}\[\]:,]+', text)
    pos = 0

    def value(tok: str) -> Any:
        if tok.startswith('"'):
            return tok[1:-1]
        if tok in ("true", "false"):
            return tok == "true"
        try:
            return int(tok)
        except ValueError:
            try:
                return float(tok)
            except ValueError:
                return tok  # enum

    def message(end: str | None) -> dict:
        nonlocal pos
        out: dict = {}
        while pos < len(tokens) and tokens[pos] != end:
            key = tokens[pos]
            pos += 1
            if tokens[pos] == ":":
                pos += 1
            if tokens[pos] == "[":
                pos += 1
                items = []
                while tokens[pos] != "]":
                    if tokens[pos] == "{":
                        pos += 1
                        items.append(message("}"))
                    else:
                        items.append(value(tokens[pos]))
                    pos += 1
                    if tokens[pos] == ",":
                        pos += 1
                val: Any = items
            elif tokens[pos] == "{":
                pos += 1
                val = message("}")
            else:
                val = value(tokens[pos])
            pos += 1
            if key in out:
                prev = out[key]
                out[key] = (prev if isinstance(prev, list) else [prev]) + (val if isinstance(val, list) else [val])
            else:
                out[key] = val
        return out

    return message(None)


# ---------------------------------------------------------------- (b) a real Triton through PyTriton
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _libpython_dir() -> str:
    return sysconfig.get_config_var("LIBDIR") or ""


def serve_pytriton(served: Any, batching: TritonBatching | None = None, *, http_port: int | None = None,
                   grpc_port: int | None = None, host: str = "127.0.0.1", instances: int = 1) -> Any:
    """Start a real Triton server (PyTriton) serving a :class:`~torchfast.serve.model.ServedModel`.

    Returns the running ``pytriton.triton.Triton`` (use as a context manager, or ``.stop()``); its
    ``http_url`` attribute is set. Triton's own dynamic batcher does the batching; our callable runs each
    batch under ``torch.inference_mode``.
    """
    try:
        import numpy as np
        from pytriton.decorators import batch
        from pytriton.model_config import DynamicBatcher, ModelConfig, QueuePolicy, Tensor, TimeoutAction
        from pytriton.triton import Triton, TritonConfig
    except ImportError as e:
        raise ImportError("serve_pytriton needs nvidia-pytriton (it pins numpy<2: install it in its own "
                          "environment with `pip install nvidia-pytriton`)") from e
    from .codecs import named_outputs as _named_outputs

    b = batching or TritonBatching()
    lib = _libpython_dir()
    if lib and lib not in os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep):
        os.environ["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (lib, os.environ.get("LD_LIBRARY_PATH")) if p)
    example = served.example()
    with torch.inference_mode():
        outs = _named_outputs(served.model(**served.request(example)) if served.keyword_inputs
                              else _call(served, served.request(example)))
    inputs = [Tensor(name=s.name, dtype=np.dtype(s.dtype).type, shape=tuple(s.shape)) for s in served.inputs]
    outputs = [Tensor(name=k, dtype=np.dtype(dtype_name(v.dtype)).type,
                      shape=tuple(-1 if served.sequence is not None and i > 0 else d
                                  for i, d in enumerate(v.shape[1:]))) for k, v in outs.items()]

    @batch
    def infer(**arrays):
        tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}
        with torch.inference_mode():
            out = _call(served, served.request(tensors))
        return {k: v.numpy() for k, v in _named_outputs(out).items()}

    policy = QueuePolicy(timeout_action=TimeoutAction[b.timeout_action],
                         default_timeout_microseconds=int(round((b.timeout_ms or 0) * 1000)),
                         allow_timeout_override=b.allow_timeout_override, max_queue_size=b.max_queue_size)
    cfg = TritonConfig(http_address=host, grpc_address=host, http_port=http_port or _free_port(),
                       grpc_port=grpc_port or _free_port(), metrics_port=_free_port(), allow_metrics=False,
                       log_verbose=0)
    triton = Triton(config=cfg)
    triton.bind(model_name=served.name, infer_func=[infer] * instances, inputs=inputs, outputs=outputs,
                config=ModelConfig(max_batch_size=b.max_batch_size, batcher=DynamicBatcher(
                    max_queue_delay_microseconds=b.max_queue_delay_microseconds,
                    preferred_batch_size=list(b.preferred_batch_sizes) or None, default_queue_policy=policy)),
                strict=False)
    triton.run()
    triton.http_url = f"http://{host}:{cfg.http_port}"
    return triton


def _call(served: Any, x: Any) -> Any:
    if isinstance(x, dict):
        return served.model(**x)
    if isinstance(x, tuple):
        return served.model(*x)
    return served.model(x)
