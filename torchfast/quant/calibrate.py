"""Calibration batches: accept any iterable, check them against the example inputs, show progress.

A wrong calibration batch (other shape, other dtype) would otherwise surface as an obscure error deep
inside a traced graph, or worse, silently calibrate ranges for data the model never sees.
"""
from __future__ import annotations

import itertools
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from ..modules import Batch, call_model, split_batch
from ..modules import describe_batch as describe
from ..errors import TorchfastError
from ..specs import dtype_name

__all__ = ["CalibrationError", "collect", "check_batch", "run_calibration", "describe"]


class CalibrationError(TorchfastError, ValueError):
    """A calibration batch does not fit the model; the message names the batch, the input and the value."""


def _tensors(batch: Batch) -> list[tuple[str, Any]]:
    args, kwargs = split_batch(batch)
    return [(f"input {i}", a) for i, a in enumerate(args)] + [(f"input {k!r}", v) for k, v in kwargs.items()]


def collect(calibration: Iterable[Batch] | Batch | None, max_batches: int | None = None) -> list[Batch]:
    """Materialize calibration into a list (it may be consumed more than once: validation, several methods).

    A DataLoader yielding (inputs, labels) pairs is common; labels are dropped when the pair's second
    item is an integer tensor of batch length and the caller's model takes one input (see ``strip_labels``).
    """
    if calibration is None:
        raise CalibrationError("Int8Static needs calibration data: pass Int8Static(calibration=batches) "
                               "(a DataLoader, a list of tensors, tuples or dicts), or give the recipe a calibration set")
    if isinstance(calibration, (torch.Tensor, Mapping)):
        out = [calibration]
    elif isinstance(calibration, tuple) and calibration and all(isinstance(x, torch.Tensor) for x in calibration) \
            and len({x.shape[0] for x in calibration}) > 1:
        out = list(calibration)  # a tuple of batches of different sizes: treat as a sequence of batches
    else:
        try:
            it = iter(calibration)
        except TypeError:
            raise CalibrationError(f"calibration must be an iterable of batches, got {type(calibration).__name__}") from None
        out = list(itertools.islice(it, max_batches) if max_batches else it)
    if not out:
        raise CalibrationError("calibration set is empty: static int8 needs at least one batch of real inputs "
                               "to estimate activation ranges")
    return out


def strip_labels(batches: list[Batch], example_inputs: Batch | None) -> list[Batch]:
    """Turn DataLoader-style (x, y) pairs into x when the example input is a single tensor."""
    if not isinstance(example_inputs, torch.Tensor):
        return batches
    out = []
    for b in batches:
        if isinstance(b, (tuple, list)) and len(b) == 2 and isinstance(b[0], torch.Tensor) \
                and isinstance(b[1], torch.Tensor) and not b[1].is_floating_point() and b[1].dim() <= 1:
            out.append(b[0])
        else:
            out.append(b)
    return out


def check_batch(i: int, batch: Batch, reference: Batch) -> None:
    """Raise CalibrationError unless ``batch`` has the structure, dtypes and non-batch dims of ``reference``."""
    got, want = _tensors(batch), _tensors(reference)
    if [n for n, _ in got] != [n for n, _ in want]:
        raise CalibrationError(f"calibration batch {i} has inputs ({describe(batch)}) but the model's example "
                               f"inputs are ({describe(reference)})")
    for (name, g), (_, w) in zip(got, want):
        if not isinstance(w, torch.Tensor):
            continue
        if not isinstance(g, torch.Tensor):
            raise CalibrationError(f"calibration batch {i}, {name}: expected a tensor, got {type(g).__name__}")
        if g.dtype != w.dtype:
            raise CalibrationError(f"calibration batch {i}, {name}: dtype {dtype_name(g.dtype)} "
                                   f"but the model expects {dtype_name(w.dtype)} "
                                   f"(example inputs: {describe(reference)})")
        if g.dim() != w.dim() or tuple(g.shape[1:]) != tuple(w.shape[1:]):
            raise CalibrationError(f"calibration batch {i}, {name}: shape {tuple(g.shape)} does not match the "
                                   f"example input shape {tuple(w.shape)} (only the batch dimension may differ)")


def check_all(batches: list[Batch], example_inputs: Batch | None) -> Batch:
    """Validate every batch against the example inputs (or the first batch); return the reference batch."""
    reference = example_inputs if example_inputs is not None else batches[0]
    for i, b in enumerate(batches):
        check_batch(i, b, reference)
    return reference


def run_calibration(model: nn.Module | Any, batches: list[Batch], progress: bool = True, desc: str = "calibrating") -> None:
    """Feed every batch through an observed model, with a progress bar; name the batch that fails."""
    from tqdm.auto import tqdm

    with torch.no_grad():
        for i, b in enumerate(tqdm(batches, desc=desc, unit="batch", disable=not progress, leave=False)):
            try:
                call_model(model, b)
            except Exception as e:
                raise CalibrationError(f"calibration batch {i} ({describe(b)}) failed in the model: "
                                       f"{type(e).__name__}: {e}") from e
