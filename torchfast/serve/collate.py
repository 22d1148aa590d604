"""Stacking requests into one batch and slicing the answers back out, without ever mixing shapes.

A request is a tensor, a tuple/list of tensors (positional inputs) or a dict of tensors (keyword
inputs), each with a leading batch dimension of the same size ``n >= 1``. Requests are stacked only
with requests of the same *signature* (structure, dtypes, trailing shapes); a dimension the caller
declared as a padded sequence dimension is left out of the signature and padded to the longest
request (pad-and-mask: the caller pads the attention mask with 0 so padding is masked out).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F

Key = str | int


@dataclass(frozen=True)
class SequencePadding:
    """How to batch variable-length sequence inputs: pad, run, cut the padding off the outputs.

    dims: input (dict key, or positional index) -> the dimension that varies (not 0, the batch dim).
    values: pad value per input (default 0; pad token ids with the tokenizer's pad id and the attention
        mask with 0 so the model ignores the padding).
    output_dims: output (dict key / tuple index) -> its sequence dimension, or one int for every tensor
        output with that many dims; outputs named here are cut back to each request's own length.
        Outputs not named (e.g. a pooled embedding) are returned whole.
    multiple_of: round the padded length up to a multiple (length buckets for shape-specialized backends).
    """

    dims: Mapping[Key, int] = field(default_factory=lambda: {"input_ids": 1, "attention_mask": 1,
                                                            "token_type_ids": 1})
    values: Mapping[Key, float] = field(default_factory=dict)
    output_dims: Mapping[Key, int] | int | None = field(default_factory=lambda: {"last_hidden_state": 1})
    multiple_of: int = 1

    def __post_init__(self) -> None:
        for k, d in self.dims.items():
            if d == 0:
                raise ValueError(f"SequencePadding.dims[{k!r}] = 0: dim 0 is the batch dimension")
        if self.multiple_of < 1:
            raise ValueError(f"SequencePadding.multiple_of must be >= 1, got {self.multiple_of}")


@dataclass
class Parsed:
    kind: str                      # "tensor" | "seq" | "dict"
    keys: tuple                    # dict keys or positional indices
    leaves: tuple[torch.Tensor, ...]
    rows: int
    length: int | None             # sequence length when padded inputs are present
    signature: tuple


def parse(x: Any, seq: SequencePadding | None = None) -> Parsed:
    """Validate one request and compute the signature it may be batched under (clear errors on bad input)."""
    if isinstance(x, torch.Tensor):
        kind, keys, leaves = "tensor", (0,), (x,)
    elif isinstance(x, Mapping):
        kind, keys, leaves = "dict", tuple(x.keys()), tuple(x.values())
    elif isinstance(x, (tuple, list)):
        kind, keys, leaves = "seq", tuple(range(len(x))), tuple(x)
    else:
        raise TypeError(f"a request must be a tensor, a tuple/list of tensors or a dict of tensors, "
                        f"got {type(x).__name__}")
    if not leaves:
        raise ValueError("a request must hold at least one tensor")
    rows, length, sig = None, None, [kind]
    for k, t in zip(keys, leaves):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"request input {k!r} must be a tensor, got {type(t).__name__}")
        if t.dim() == 0:
            raise ValueError(f"request input {k!r} is a scalar; inputs need a leading batch dimension")
        if rows is None:
            rows = t.shape[0]
        elif t.shape[0] != rows:
            raise ValueError(f"request inputs disagree on the batch size: input {k!r} has {t.shape[0]} rows, "
                             f"expected {rows}")
        shape: list = list(t.shape[1:])
        pdim = seq.dims.get(k) if seq is not None else None
        if pdim is not None:
            d = pdim % t.dim()
            if d == 0:
                raise ValueError(f"SequencePadding dim for input {k!r} resolves to the batch dimension")
            if length is None:
                length = t.shape[d]
            elif t.shape[d] != length:
                raise ValueError(f"padded inputs disagree on the sequence length: input {k!r} has "
                                 f"{t.shape[d]}, expected {length}")
            shape[d - 1] = None
        sig.append((k, t.dtype, t.device.type, tuple(shape)))
    if rows == 0:
        raise ValueError("a request must hold at least one row (its leading dimension is 0)")
    return Parsed(kind, keys, leaves, rows, length, tuple(sig))


def collate(group: Sequence[Parsed], seq: SequencePadding | None, pad_rows: int) -> tuple[Any, int | None]:
    """Stack a same-signature group (padding sequences, then repeating the last row ``pad_rows`` times).

    Returns the model batch (same structure as the requests) and the padded sequence length.
    Padding rows repeat a real row, so no model ever sees made-up values that could produce NaN.
    """
    first = group[0]
    target = None
    if seq is not None and first.length is not None:
        target = max(p.length for p in group)
        m = seq.multiple_of
        target = -(-target // m) * m
    out = []
    for i, k in enumerate(first.keys):
        parts = [p.leaves[i] for p in group]
        pdim = seq.dims.get(k) if seq is not None else None
        if pdim is not None and target is not None:
            value = seq.values.get(k, 0)
            padded = []
            for t in parts:
                d = pdim % t.dim()
                extra = target - t.shape[d]
                if extra:
                    pad = [0, 0] * (t.dim() - 1 - d) + [0, extra]
                    t = F.pad(t, pad, value=value)
                padded.append(t)
            parts = padded
        t = parts[0] if len(parts) == 1 else torch.cat(parts, 0)
        if pad_rows:
            t = torch.cat([t, t[-1:].expand(pad_rows, *t.shape[1:])], 0)
        out.append(t)
    if first.kind == "tensor":
        return out[0], target
    if first.kind == "dict":
        return dict(zip(first.keys, out)), target
    return tuple(out), target


def split_outputs(out: Any, group: Sequence[Parsed], total_rows: int, seq: SequencePadding | None) -> list[Any]:
    """Cut a batch output back into one answer per request (rows, and sequence padding if declared).

    Every returned tensor is a fresh copy: answers never share storage with each other or with padding.
    """
    spans, off = [], 0
    for p in group:
        spans.append((off, p.rows, p.length))
        off += p.rows
    return [_slice(out, s, total_rows, seq, None) for s in spans]


def _seq_dim(seq: SequencePadding | None, key: Key | None, t: torch.Tensor) -> int | None:
    if seq is None or seq.output_dims is None:
        return None
    if isinstance(seq.output_dims, int):
        d = seq.output_dims
        return d if -t.dim() <= d < t.dim() and d % t.dim() != 0 else None
    return seq.output_dims.get(key) if key is not None else None


def _slice(out: Any, span: tuple, total: int, seq: SequencePadding | None, key: Key | None) -> Any:
    off, n, length = span
    if isinstance(out, torch.Tensor):
        if out.dim() == 0 or out.shape[0] != total:
            raise RuntimeError(f"model output {'' if key is None else repr(key) + ' '}has shape "
                               f"{tuple(out.shape)}; expected a leading batch dimension of {total} "
                               f"(the batch size) to split it between requests")
        t = out[off:off + n]
        d = _seq_dim(seq, key, t)
        if d is not None and length is not None:
            t = t.narrow(d, 0, length)
        return t.clone()
    if isinstance(out, Mapping):
        d = {k: _slice(v, span, total, seq, k) for k, v in out.items()}
        try:
            return type(out)(**d)
        except Exception:
            return d
    if isinstance(out, (tuple, list)):
        vals = [_slice(v, span, total, seq, i) for i, v in enumerate(out)]
        return type(out)(vals) if isinstance(out, list) else tuple(vals)
    return out  # None / python scalars are shared answers (nothing per-row to split)
