"""Measurement: latency, size, FLOPs and fidelity.

Every claim torchfast makes rests on these functions. Latency on shared 2-core machines is noisy,
so comparisons are always interleaved (baseline and candidate alternate run by run) and reported as
medians and a ratio of medians.
"""
from __future__ import annotations

import contextlib
import io
import math
import statistics
import time
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable, Iterable

import torch
from torch import nn

from .config import ConfigError
from .modules import Batch, batches_list, call_model, first_tensor

__all__ = [
    "Timing", "DEFAULT_TIMING", "Latency", "Comparison", "Size", "Fidelity",
    "latency", "compare_latency", "size_of", "count_flops", "fidelity", "outputs", "compare_outputs", "accuracy",
    "fixed_threads", "resolve_timing",
]


# ---------------------------------------------------------------- timing settings
@dataclass(frozen=True)
class Timing:
    """How torchfast times models for every speed decision: one place to make timing longer or pin threads.

    runs: timed calls per model; warmup: untimed calls per model first; threads: torch intra-op threads
    while timing (None: leave torch's setting); settle: untimed calls of a model right before each of its
    timed calls (engines with their own thread pools leave workers spinning after a call, which the next
    model timed pays for). :data:`DEFAULT_TIMING` is what whole-model comparisons use when the caller
    gives no numbers; quicker checks (one layer, one kernel, the first round among backends) use
    ``DEFAULT_TIMING.scaled(share)``, so changing the default lengthens or shortens them all alike.
    """
    runs: int = 20
    warmup: int = 3
    threads: int | None = None
    settle: int = 0

    def __post_init__(self) -> None:
        for name, lo in (("runs", 1), ("warmup", 0), ("threads", 1), ("settle", 0)):
            v = getattr(self, name)
            if v is None and name == "threads":
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ConfigError(f"Timing.{name} must be an integer >= {lo}"
                                  + (" or None" if name == "threads" else "") + f", got {v!r}")

    def scaled(self, share: float) -> Timing:
        """A quicker (share < 1) or longer timing: ``share`` of the runs and warm-up calls (at least one run)."""
        if not share > 0:
            raise ValueError(f"Timing.scaled: share must be > 0, got {share!r}")
        return replace(self, runs=max(1, round(self.runs * share)), warmup=math.ceil(self.warmup * share))

    def to_dict(self) -> dict:
        return asdict(self)


DEFAULT_TIMING = Timing()
"""The timing used wherever a caller gives none. Replace it (``torchfast.measure.DEFAULT_TIMING =
Timing(runs=50, threads=4)``) to change every speed decision at once; it is read at each call."""


def resolve_timing(timing: Timing | None = None, *, share: float = 1.0, runs: int | None = None,
                   warmup: int | None = None, threads: int | None = None, settle: int | None = None) -> Timing:
    """The timing a measurement uses: ``timing``, else ``share`` of :data:`DEFAULT_TIMING` as it is now
    (a quick check takes a share of the default), with the numbers the caller gave explicitly on top."""
    if timing is None:
        t = DEFAULT_TIMING if share == 1.0 else DEFAULT_TIMING.scaled(share)
    elif isinstance(timing, Timing):
        t = timing
    else:
        raise TypeError(f"timing must be a torchfast.measure.Timing, got {type(timing).__name__}")
    given = {k: v for k, v in (("runs", runs), ("warmup", warmup), ("threads", threads), ("settle", settle))
             if v is not None}
    return replace(t, **given) if given else t


# ---------------------------------------------------------------- latency
@dataclass(frozen=True)
class Latency:
    median_ms: float
    p90_ms: float
    mean_ms: float
    min_ms: float
    runs: int
    threads: int

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Comparison:
    """Baseline vs candidate, timed interleaved in one run. ``speedup`` > 1 means the candidate is faster."""
    baseline: Latency
    candidate: Latency

    @property
    def speedup(self) -> float:
        return self.baseline.median_ms / self.candidate.median_ms if self.candidate.median_ms > 0 else math.inf

    def to_dict(self) -> dict:
        return {"baseline": self.baseline.to_dict(), "candidate": self.candidate.to_dict(), "speedup": self.speedup}


@contextlib.contextmanager
def fixed_threads(threads: int | None):
    """Pin torch's intra-op thread count for the block (None: leave as is)."""
    old = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(old)


def _sync(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def _input_device(batch: Batch) -> torch.device | None:
    if isinstance(batch, torch.Tensor):
        return batch.device
    if isinstance(batch, dict):
        batch = list(batch.values())
    if isinstance(batch, (tuple, list)):
        for x in batch:
            d = _input_device(x)
            if d is not None:
                return d
    return None


def _summarize(times_s: list[float], threads: int) -> Latency:
    ms = sorted(t * 1e3 for t in times_s)
    p90 = ms[min(len(ms) - 1, int(math.ceil(0.9 * len(ms))) - 1)]
    return Latency(median_ms=statistics.median(ms), p90_ms=p90, mean_ms=statistics.fmean(ms),
                   min_ms=ms[0], runs=len(ms), threads=threads)


def _timer(model: Callable, batch: Batch, device: torch.device | None) -> Callable[[], float]:
    def once() -> float:
        _sync(device)
        t0 = time.perf_counter()
        call_model(model, batch)
        _sync(device)
        return time.perf_counter() - t0
    return once


def latency(model: Callable, batch: Batch, *, warmup: int | None = None, runs: int | None = None,
            threads: int | None = None, min_time_s: float = 0.0, timing: Timing | None = None) -> Latency:
    """Median/p90 latency of ``model(batch)`` under ``inference_mode`` with a fixed thread count.

    Numbers not given come from ``timing`` (default :data:`DEFAULT_TIMING`: 20 runs, 3 warm-up calls).
    """
    t = resolve_timing(timing, runs=runs, warmup=warmup, threads=threads)
    device = _input_device(batch)
    with fixed_threads(t.threads) as n, torch.inference_mode():
        once = _timer(model, batch, device)
        for _ in range(t.warmup):
            once()
        times = []
        t_start = time.perf_counter()
        while len(times) < t.runs or (time.perf_counter() - t_start) < min_time_s:
            for _ in range(t.settle):
                once()
            times.append(once())
    return _summarize(times, n)


def compare_latency(baseline: Callable, candidate: Callable, batch: Batch, candidate_batch: Batch | None = None, *,
                    warmup: int | None = None, runs: int | None = None, threads: int | None = None,
                    settle: int | None = None, timing: Timing | None = None) -> Comparison:
    """Time baseline and candidate alternately (A B B A ...) so machine noise hits both alike.

    Numbers not given come from ``timing`` (default :data:`DEFAULT_TIMING`).
    """
    t = resolve_timing(timing, runs=runs, warmup=warmup, threads=threads, settle=settle)
    cbatch = batch if candidate_batch is None else candidate_batch
    device = _input_device(batch)
    with fixed_threads(t.threads) as n, torch.inference_mode():
        a, b = _timer(baseline, batch, device), _timer(candidate, cbatch, _input_device(cbatch))
        for _ in range(t.warmup):
            a(), b()
        ta, tb = [], []
        for i in range(t.runs):
            for timer, out in ((a, ta), (b, tb)) if i % 2 == 0 else ((b, tb), (a, ta)):
                for _ in range(t.settle):
                    timer()
                out.append(timer())
    return Comparison(_summarize(ta, n), _summarize(tb, n))


def compare_many(models: dict[str, Callable], batch: Batch, *, warmup: int | None = None, runs: int | None = None,
                 threads: int | None = None, settle: int | None = None, timing: Timing | None = None
                 ) -> dict[str, Latency]:
    """Time several models round-robin, the order rotating every round, so noise hits all alike.

    Numbers not given come from ``timing`` (default :data:`DEFAULT_TIMING`); see :class:`Timing` for
    ``settle``, which matters most here: engines with their own thread pools (OpenVINO, ONNX Runtime,
    PyTorch's OpenMP) leave workers spinning for a while after a call; the next engine timed right after
    them pays for it, which a deployment running one engine never does.
    """
    t = resolve_timing(timing, runs=runs, warmup=warmup, threads=threads, settle=settle)
    device = _input_device(batch)
    names = list(models)
    with fixed_threads(t.threads) as n, torch.inference_mode():
        timers = {k: _timer(models[k], batch, device) for k in names}
        for _ in range(t.warmup):
            for k in names:
                timers[k]()
        times: dict[str, list[float]] = {k: [] for k in names}
        for i in range(t.runs):
            order = names[i % len(names):] + names[:i % len(names)]
            for k in (order if i % 2 == 0 else order[::-1]):
                for _ in range(t.settle):
                    timers[k]()
                times[k].append(timers[k]())
    return {k: _summarize(v, n) for k, v in times.items()}


# ---------------------------------------------------------------- size
@dataclass(frozen=True)
class Size:
    params: int          # number of parameter elements (packed/quantized weights counted by element)
    buffers: int         # number of buffer elements
    bytes: int           # serialized state_dict size
    @property
    def mb(self) -> float:
        return self.bytes / 1e6

    def to_dict(self) -> dict:
        return {**asdict(self), "mb": self.mb}


def serialized_bytes(model: nn.Module) -> int:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.tell()


def size_of(model: nn.Module) -> Size:
    """Parameter/buffer element counts and the bytes of the serialized state_dict.

    Quantized modules keep weights in packed params that are neither parameters nor buffers; the
    serialized size still counts them, which is what users pay on disk.
    """
    params = sum(p.numel() for p in model.parameters())
    bufs = sum(b.numel() for b in model.buffers())
    return Size(params=params, buffers=bufs, bytes=serialized_bytes(model))


# ---------------------------------------------------------------- FLOPs
def count_flops(model: Callable, batch: Batch, per_module: bool = False) -> int | tuple[int, dict[str, int]]:
    """FLOPs of one forward (a multiply-add counts 2) via ``torch.utils.flop_counter.FlopCounterMode``.

    Returns the total, or (total, {module name: flops}) with ``per_module``. Quantized kernels are not
    counted by FlopCounterMode; callers compare FLOPs before quantization.
    """
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        call_model(model, batch)
    total = counter.get_total_flops()
    if not per_module:
        return total
    per = {k: sum(v.values()) for k, v in counter.get_flop_counts().items()}
    return total, per


# ---------------------------------------------------------------- fidelity
@dataclass(frozen=True)
class Fidelity:
    max_abs_err: float
    rel_err: float          # ||a - b|| / ||a|| over all outputs
    cosine: float           # mean per-sample cosine similarity of flattened outputs
    top1_agreement: float | None  # for outputs with a class dimension; None for one-column outputs
    samples: int
    metric: float | None = None          # task metric of the candidate, via eval_fn
    baseline_metric: float | None = None  # the same metric of the reference
    worst_cosine: float | None = None     # lowest per-sample cosine (the worst image / sentence)

    def to_dict(self) -> dict:
        return asdict(self)


def outputs(model: Callable, batches: Iterable[Batch] | Batch,
            output_fn: Callable[[Any], torch.Tensor] | None = None) -> list[torch.Tensor]:
    """The tensors ``fidelity`` compares, one per batch (float32, CPU): computed once, compared many times."""
    outs = []
    with torch.inference_mode():
        for b in batches_list(batches):
            o = call_model(model, b)
            o = output_fn(o) if output_fn is not None else first_tensor(o)
            outs.append(o.detach().float().cpu())
    return outs


def compare_outputs(ref: list[torch.Tensor], cand: list[torch.Tensor]) -> Fidelity:
    """Fidelity of ``cand`` against ``ref`` (lists of per-batch outputs, first dimension = samples)."""
    if not ref:
        raise ValueError("fidelity needs at least one input batch")
    for i, (r, c) in enumerate(zip(ref, cand)):
        if r.shape != c.shape:
            raise ValueError(f"output shapes differ on batch {i}: reference {tuple(r.shape)}, candidate {tuple(c.shape)}")
    r = torch.cat([x.reshape(x.shape[0], -1) if x.dim() else x.reshape(1, 1) for x in ref])
    c = torch.cat([x.reshape(x.shape[0], -1) if x.dim() else x.reshape(1, 1) for x in cand])
    diff = (r - c)
    max_abs = diff.abs().max().item()
    rel = (diff.norm() / r.norm().clamp_min(1e-12)).item()
    # cosine is scale-free: scaled to the reference's range first, so outputs of tiny magnitude (1e-14, a deep
    # net with vanishing activations) are compared as they are, not flattened by the zero-norm guard
    scale = r.abs().max().double().clamp_min(1e-300)
    per_sample = torch.nn.functional.cosine_similarity(r.double() / scale, c.double() / scale, dim=1, eps=1e-12)
    cos, worst = per_sample.mean().item(), per_sample.min().item()
    top1 = None
    if ref[0].dim() == 2 and ref[0].shape[-1] > 1:
        ra = torch.cat([x.argmax(-1) for x in ref])
        ca = torch.cat([x.argmax(-1) for x in cand])
        top1 = (ra == ca).float().mean().item()
    return Fidelity(max_abs_err=max_abs, rel_err=rel, cosine=cos, top1_agreement=top1, samples=r.shape[0],
                    worst_cosine=worst)


def fidelity(reference: Callable, candidate: Callable, batches: Iterable[Batch] | Batch, *,
             output_fn: Callable[[Any], torch.Tensor] | None = None,
             candidate_batches: Iterable[Batch] | Batch | None = None,
             eval_fn: Callable[[Callable], float] | None = None) -> Fidelity:
    """How closely ``candidate`` reproduces ``reference`` on real inputs.

    ``output_fn`` maps a raw model output to the tensor to compare (default: the first tensor, or
    ``logits``/``last_hidden_state``). The first dimension is the sample dimension. ``eval_fn(model)``
    returns a task metric (e.g. accuracy), reported for both models.
    """
    bl = batches_list(batches)
    if not bl:
        raise ValueError("fidelity needs at least one input batch")
    cbl = bl if candidate_batches is None else batches_list(candidate_batches)
    fid = compare_outputs(outputs(reference, bl, output_fn), outputs(candidate, cbl, output_fn))
    if eval_fn is not None:
        fid = replace(fid, metric=float(eval_fn(candidate)), baseline_metric=float(eval_fn(reference)))
    return fid


def accuracy(model: Callable, batches: Iterable[tuple[Batch, torch.Tensor]]) -> float:
    """Top-1 accuracy over (inputs, labels) pairs; a ready ``eval_fn`` building block."""
    correct = total = 0
    with torch.inference_mode():
        for x, y in batches:
            pred = first_tensor(call_model(model, x)).argmax(-1)
            correct += (pred.cpu() == y.cpu()).sum().item()
            total += y.numel()
    if total == 0:
        raise ValueError("accuracy needs at least one labelled sample")
    return correct / total
