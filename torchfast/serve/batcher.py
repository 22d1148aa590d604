"""DynamicBatcher: group concurrent inference requests into batches, and lose none of them.

One worker thread owns the model. Requests wait in a priority queue (highest priority, then oldest
first); a batch is cut when it holds ``max_batch_size`` rows or when the oldest waiting request has
waited ``max_delay_ms`` (so a lone request never waits longer than that). Each request moves through
QUEUED -> RUNNING -> DONE under one lock, and its answer is a ``concurrent.futures.Future`` set exactly
once: a result, its own error, a timeout, a cancellation, or a shutdown error - never two, never none.
A cancel racing the worker never makes it complete a done future, a model raising a ``BaseException``
fails only its own request (as :class:`ModelError`), and a failure inside the worker itself answers the
requests it had taken with :class:`WorkerError` while the worker goes on serving.
"""
from __future__ import annotations

import asyncio
import bisect
import concurrent.futures as cf
import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Sequence

import torch

from .collate import Parsed, SequencePadding, collate, parse, split_outputs
from .metrics import BatcherMetrics
from ..errors import TorchfastError


class ServeError(TorchfastError, RuntimeError):
    """Base class of the batcher's own errors."""


class QueueFull(ServeError):
    """The queue holds ``max_queue_size`` requests; the request was rejected at once (back-pressure)."""


class RequestTimeout(ServeError, TimeoutError):
    """The request's deadline passed before it could run; it was never run."""


class BatcherClosed(ServeError):
    """The batcher is shut down (or shutting down without draining) and accepts no more requests."""


class CallerGone(ServeError):
    """The caller stopped waiting (an HTTP client closed its connection): a request still queued was withdrawn
    and never computed (outcome ``disconnected``); one already running finished for nobody."""


class NonFiniteOutput(ServeError):
    """``nan_guard`` is on and this request's output holds NaN or Inf."""


class ModelError(ServeError):
    """The model raised something that is not an ``Exception`` (a ``BaseException`` subclass from user
    code); it is handed to the request as this ordinary error so no caller or event loop is torn down."""


class WorkerError(ServeError):
    """The batcher itself failed while this request was in flight; the request was answered with this
    error and the worker went on serving the others."""


_QUEUED, _RUNNING, _DONE = 0, 1, 2


@dataclass(eq=False)
class _Request:
    parsed: Parsed
    priority: int
    seq: int
    t_submit: float
    deadline: float | None
    future: cf.Future = field(default_factory=cf.Future)
    state: int = _QUEUED

    @property
    def sort_key(self) -> tuple:
        return (-self.priority, self.seq)


class DynamicBatcher:
    """Batch concurrent requests to ``model`` (any callable: eager, compiled, TorchScript, optimized).

    Knobs are named as Triton's users know them. ``preferred_batch_sizes`` are padding buckets: a batch
    of 5 rows with buckets (1, 2, 4, 8) runs as 8 rows and the 3 padding rows are cut off. ``timeout_ms``
    is the default per-request deadline (``None``: wait as long as it takes). ``sequence`` batches
    variable-length inputs by padding; without it, requests of different shapes never share a batch.
    ``isolate_errors``: when a batch fails, it is split in halves and re-run until the failing
    request is alone, so only it gets the error. ``nan_guard``: a request whose output holds NaN/Inf
    fails with :class:`NonFiniteOutput`.
    """

    def __init__(self, model: Callable, max_batch_size: int = 32, max_delay_ms: float = 5.0, *,
                 preferred_batch_sizes: Sequence[int] | None = None, max_queue_size: int = 1024,
                 timeout_ms: float | None = None, sequence: SequencePadding | None = None,
                 isolate_errors: bool = True, nan_guard: bool = False, inference_mode: bool = True,
                 name: str = "model", start: bool = True) -> None:
        if not callable(model):
            raise TypeError(f"model must be callable, got {type(model).__name__}")
        if int(max_batch_size) < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_delay_ms < 0:
            raise ValueError(f"max_delay_ms must be >= 0, got {max_delay_ms}")
        if int(max_queue_size) < 1:
            raise ValueError(f"max_queue_size must be >= 1, got {max_queue_size}")
        if timeout_ms is not None and timeout_ms <= 0:
            raise ValueError(f"timeout_ms must be > 0 or None, got {timeout_ms}")
        buckets = sorted(set(int(b) for b in preferred_batch_sizes or ()))
        if buckets and (buckets[0] < 1 or buckets[-1] < max_batch_size):
            raise ValueError(f"preferred_batch_sizes {tuple(buckets)} must be >= 1 and include a size >= "
                             f"max_batch_size={max_batch_size} so every batch fits a bucket")
        self.model = model
        self.max_batch_size = int(max_batch_size)
        self.max_delay_ms = float(max_delay_ms)
        self.preferred_batch_sizes = tuple(buckets)
        self.max_queue_size = int(max_queue_size)
        self.timeout_ms = timeout_ms
        self.sequence = sequence
        self.isolate_errors = isolate_errors
        self.nan_guard = nan_guard
        self.inference_mode = inference_mode
        self.name = name
        self.metrics = BatcherMetrics(name, self.max_batch_size)
        self._cond = threading.Condition()
        self._queue: list[_Request] = []          # sorted by (-priority, seq)
        self._seq = itertools.count()
        self._accepting = True
        self._thread: threading.Thread | None = None
        self._in_flight: list[_Request] = []     # taken by the worker, not yet answered
        if start:
            self.start()

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> "DynamicBatcher":
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=f"torchfast-batcher-{self.name}",
                                                daemon=True)
                self._thread.start()
        return self

    @property
    def running(self) -> bool:
        return self._accepting and self._thread is not None and self._thread.is_alive()

    def close(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop accepting; with ``drain`` run every accepted request first, else answer them BatcherClosed."""
        with self._cond:
            self._accepting = False
            if not drain:
                for r in list(self._queue):
                    self._finish_queued(r, exc=BatcherClosed(f"batcher {self.name!r} closed before this "
                                                            f"request ran"), outcome="closed")
            self._cond.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    async def aclose(self, drain: bool = True, timeout: float | None = None) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.close, drain, timeout)

    def __enter__(self) -> "DynamicBatcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:  # a forgotten batcher must not leave a thread waiting forever
        try:
            with self._cond:
                self._accepting = False
                self._cond.notify_all()
        except Exception:
            pass

    # ---------------------------------------------------------------- submitting
    def check(self, x: Any) -> Parsed:
        """Validate a request without queueing it (TypeError/ValueError naming the input and the problem)."""
        p = parse(x, self.sequence)
        if p.rows > self.max_batch_size:
            raise ValueError(f"request has {p.rows} rows, more than max_batch_size={self.max_batch_size}; "
                             f"split it or raise max_batch_size")
        return p

    def submit_future(self, x: Any, *, timeout_ms: float | None = None, priority: int = 0) -> cf.Future:
        """Enqueue one request; the future gets exactly one answer. Raises QueueFull / BatcherClosed now."""
        p = self.check(x)
        t = timeout_ms if timeout_ms is not None else self.timeout_ms
        if t is not None and t <= 0:
            raise ValueError(f"timeout_ms must be > 0, got {t}")
        now = time.monotonic()
        with self._cond:
            if not self._accepting:
                self.metrics.on_outcome("rejected")
                raise BatcherClosed(f"batcher {self.name!r} is shut down and accepts no requests")
            if len(self._queue) >= self.max_queue_size:
                self.metrics.on_outcome("rejected")
                raise QueueFull(f"batcher {self.name!r} queue is full ({self.max_queue_size} requests "
                                f"waiting); retry later")
            r = _Request(p, int(priority), next(self._seq), now, None if t is None else now + t / 1000.0)
            bisect.insort(self._queue, r, key=lambda q: q.sort_key)
            self.metrics.on_accept()
            self.metrics.set_depth(len(self._queue))
            self._cond.notify_all()
        r.future.add_done_callback(lambda f, r=r: self._on_done(r, f))
        r.future._tf_request = r  # lets the waiting helpers expire it
        return r.future

    def __call__(self, x: Any, *, timeout_ms: float | None = None, priority: int = 0) -> Any:
        """Blocking, thread-safe: submit and wait for this request's own answer (or its own error)."""
        fut = self.submit_future(x, timeout_ms=timeout_ms, priority=priority)
        r = fut._tf_request
        try:
            if r.deadline is None:
                return fut.result()
            try:
                return fut.result(timeout=max(0.0, r.deadline - time.monotonic()))
            except cf.TimeoutError:
                self._expire(r)
                return fut.result()  # expired -> RequestTimeout; already running -> its real answer
        except BaseException as e:
            if not fut.done():       # KeyboardInterrupt etc.: withdraw the request if it has not started
                fut.cancel()
            raise e

    async def submit(self, x: Any, *, timeout_ms: float | None = None, priority: int = 0,
                     gone: Awaitable | None = None) -> Any:
        """asyncio: await this request's answer. Cancelling the awaiting task removes a waiting request.

        ``gone``: an awaitable that finishes when the caller no longer wants the answer (its HTTP client
        disconnected). A request still queued is then withdrawn, never computed, and counted as
        ``disconnected``; one already running finishes and its answer is dropped (``abandoned_answers``).
        Either way :class:`CallerGone` is raised at once, and no other request is touched.
        """
        try:
            fut = self.submit_future(x, timeout_ms=timeout_ms, priority=priority)
        except BaseException:
            if asyncio.iscoroutine(gone):
                gone.close()  # refused at once: nothing to watch
            raise
        r = fut._tf_request
        afut = asyncio.wrap_future(fut)  # cancelling afut cancels fut (only possible while still queued)
        watch = asyncio.ensure_future(gone) if gone is not None else None
        deadline = r.deadline
        try:
            while not afut.done():
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                done, _ = await asyncio.wait({afut} if watch is None else {afut, watch}, timeout=left,
                                             return_when=asyncio.FIRST_COMPLETED)
                if afut in done:
                    break
                if watch is not None and watch in done:
                    if watch.cancelled() or watch.exception() is not None:
                        watch = None  # the watcher itself failed: keep waiting, without it
                        continue
                    self._abandon(r)
                    afut.cancel()  # nobody reads it now; a late answer lands nowhere
                    raise CallerGone(f"the caller of a request to {self.name!r} went away before its answer")
                self._expire(r)  # the deadline passed: a queued request times out, a running one finishes
                deadline = None
            return await afut
        except asyncio.CancelledError:
            afut.cancel()  # the caller went away: withdraw the request if it has not started
            raise
        finally:
            if watch is not None and not watch.done():
                watch.cancel()

    # ---------------------------------------------------------------- state transitions (under the lock)
    def _remove(self, r: _Request) -> None:
        i = bisect.bisect_left(self._queue, r.sort_key, key=lambda q: q.sort_key)
        if i < len(self._queue) and self._queue[i] is r:
            del self._queue[i]
        self.metrics.set_depth(len(self._queue))

    def _finish_queued(self, r: _Request, exc: BaseException, outcome: str) -> None:
        if r.state == _QUEUED:
            self._remove(r)
            r.state = _DONE
            r._outcome = outcome
            _settle(r.future, exc=exc)

    def _expire(self, r: _Request) -> None:
        with self._cond:
            waited = (time.monotonic() - r.t_submit) * 1000.0
            self._finish_queued(r, RequestTimeout(
                f"request to {self.name!r} timed out after {waited:.0f} ms in the queue (deadline "
                f"{(r.deadline - r.t_submit) * 1000.0:.0f} ms); it was not run"), "timeout")

    def _abandon(self, r: _Request) -> None:
        with self._cond:
            if r.state == _QUEUED:
                self._finish_queued(r, CallerGone(f"the caller of a request to {self.name!r} went away while it "
                                                  f"waited; it was not run"), "disconnected")
                return
        self.metrics.on_abandoned()

    def _on_done(self, r: _Request, fut: cf.Future) -> None:
        outcome = getattr(r, "_outcome", None)
        if fut.cancelled():
            with self._cond:
                if r.state == _QUEUED:
                    self._remove(r)
                r.state = _DONE
            outcome = "cancelled"
        self.metrics.on_outcome(outcome or "ok")

    # ---------------------------------------------------------------- the worker
    def _loop(self) -> None:
        while True:
            self._in_flight = []
            try:
                batch = self._next_batch()
                if batch is None:
                    return
                self._run(batch)
            except BaseException as e:  # noqa: BLE001 - the worker outlives any failure of its own
                self._fail_in_flight(e)

    def _fail_in_flight(self, e: BaseException) -> None:
        """Answer every request taken for the failed batch (and not yet answered) with a WorkerError."""
        err = WorkerError(f"batcher {self.name!r} failed while running this request "
                          f"({type(e).__name__}: {str(e)[:200]}); the request may be retried")
        err.__cause__ = e
        for r in self._in_flight:
            with self._cond:
                if r.state == _QUEUED:
                    self._remove(r)
                r.state = _DONE
                if not r.future.done():
                    r._outcome = "error"
            _settle(r.future, exc=err)
        self._in_flight = []
        time.sleep(0.001)  # a failure that repeats must not spin a core

    def _next_batch(self) -> list[_Request] | None:
        with self._cond:
            while True:
                now = time.monotonic()
                for r in [q for q in self._queue if q.deadline is not None and q.deadline <= now]:
                    self._expire(r)  # re-entrant: Condition wraps an RLock
                if not self._queue:
                    if not self._accepting:
                        return None
                    self._cond.wait()
                    continue
                group, rows = self._pick()
                oldest = min(q.t_submit for q in self._queue)
                due = oldest + self.max_delay_ms / 1000.0
                if rows >= self.max_batch_size or not self._accepting or now >= due:
                    break
                nearest = min([due] + [q.deadline for q in self._queue if q.deadline is not None])
                self._cond.wait(max(0.0, nearest - now))
            taken = self._in_flight
            for r in self._trim_to_bucket(group, rows):
                self._remove(r)
                try:
                    running = r.future.set_running_or_notify_cancel()
                except RuntimeError:  # the caller completed the future itself: nothing left to answer
                    running = False
                if running:
                    r.state = _RUNNING
                    taken.append(r)
                else:
                    r.state = _DONE  # cancelled just now; _on_done counts it
            return list(taken)

    def _pick(self) -> tuple[list[_Request], int]:
        """The head request's shape group, in priority order, up to max_batch_size rows."""
        head = self._queue[0]
        group, rows = [head], head.parsed.rows
        for q in itertools.islice(self._queue, 1, None):
            if rows >= self.max_batch_size:
                break
            if q.parsed.signature == head.parsed.signature and rows + q.parsed.rows <= self.max_batch_size:
                group.append(q)
                rows += q.parsed.rows
        return group, rows

    def _trim_to_bucket(self, group: list[_Request], rows: int) -> list[_Request]:
        """With padding buckets, run the largest bucket the waiting rows fill exactly (as Triton's preferred
        batch sizes do) and leave the rest for the next batch, instead of padding 17 rows up to 32."""
        if not self.preferred_batch_sizes or rows in self.preferred_batch_sizes:
            return group
        fits = [b for b in self.preferred_batch_sizes if b <= rows]
        if not fits:
            return group
        target, taken, n = fits[-1], [], 0
        for r in group:
            if n + r.parsed.rows <= target:
                taken.append(r)
                n += r.parsed.rows
        return taken if n == target else group

    def _run(self, batch: list[_Request]) -> None:
        if not batch:
            return
        start = time.monotonic()
        waits = [start - r.t_submit for r in batch]
        answers = self._run_isolated(batch, first=True, waits=waits)
        for r, (ok, val) in zip(batch, answers):
            with self._cond:
                r.state = _DONE
                r._outcome = "ok" if ok else "error"
            if ok:
                _settle(r.future, result=val)
            else:
                _settle(r.future, exc=val)

    def _run_isolated(self, group: list[_Request], first: bool = False, waits=None) -> list[tuple[bool, Any]]:
        try:
            return [(True, v) for v in self._call(group, waits if first else None)]
        except BaseException as e:  # noqa: BLE001 - any model error is the request's answer
            if not isinstance(e, Exception):
                wrapped = ModelError(f"model {self.name!r} raised {type(e).__name__}: {str(e)[:200]}")
                wrapped.__cause__ = e
                e = wrapped
            if len(group) == 1:
                return [(False, e)]
            if not self.isolate_errors:
                return [(False, e)] * len(group)
            mid = len(group) // 2
            self.metrics.on_rerun()
            left = self._run_isolated(group[:mid])
            self.metrics.on_rerun()
            return left + self._run_isolated(group[mid:])

    def _call(self, group: list[_Request], waits: list[float] | None) -> list[Any]:
        parsed = [r.parsed for r in group]
        rows = sum(p.rows for p in parsed)
        total = rows
        if self.preferred_batch_sizes:
            total = next(b for b in self.preferred_batch_sizes if b >= rows)
        x, _ = collate(parsed, self.sequence, total - rows)
        t0 = time.monotonic()
        if self.inference_mode:
            with torch.inference_mode():
                out = _call_model(self.model, x)
        else:
            out = _call_model(self.model, x)
        compute = time.monotonic() - t0
        answers = split_outputs(out, parsed, total, self.sequence)
        self.metrics.on_batch(rows, total - rows, compute, waits or [])
        if self.nan_guard:
            bad = [i for i, a in enumerate(answers) if not _finite(a)]
            if bad and len(group) > 1:
                raise NonFiniteOutput(f"{len(bad)} of {len(group)} requests produced NaN/Inf; isolating")
            if bad:
                raise NonFiniteOutput(f"model {self.name!r} produced NaN/Inf for this request "
                                      f"(nan_guard is on); check its input values")
        return answers

    # ---------------------------------------------------------------- batches formed elsewhere
    def run_batch(self, xs: Sequence[Any]) -> list[Any]:
        """Run requests another batcher already grouped (Ray Serve's ``@serve.batch``) with our collation:
        shape groups, padding buckets, sequence padding and error isolation. Returns one entry per request:
        its answer, or the exception that is its own error (never raised, so one bad input fails alone)."""
        answers: list[Any] = [None] * len(xs)
        groups: dict[tuple, list[tuple[int, _Request]]] = {}
        now = time.monotonic()
        for i, x in enumerate(xs):
            try:
                p = self.check(x)
            except (TypeError, ValueError) as e:
                answers[i] = e
                continue
            groups.setdefault(p.signature, []).append((i, _Request(p, 0, i, now, None)))
        for members in groups.values():
            chunk, rows = [], 0
            for item in members + [None]:
                if item is None or rows + item[1].parsed.rows > self.max_batch_size:
                    if chunk:
                        for (i, _), (ok, val) in zip(chunk, self._run_isolated([r for _, r in chunk], True, [])):
                            answers[i] = val
                            self.metrics.on_accept()
                            self.metrics.on_outcome("ok" if ok else "error")
                    chunk, rows = [], 0
                if item is not None:
                    chunk.append(item)
                    rows += item[1].parsed.rows
        return answers

    # ---------------------------------------------------------------- introspection
    def queue_depth(self) -> int:
        with self._cond:
            return len(self._queue)

    def snapshot(self) -> dict[str, Any]:
        """Counts by outcome, queue depth, batch sizes and timing quantiles as a plain dict."""
        return self.metrics.snapshot()


def _settle(fut: cf.Future, result: Any = None, exc: BaseException | None = None) -> bool:
    """Complete ``fut`` unless it is already done (cancelled by its caller at the same moment): a request
    is answered at most once, and a lost race never raises inside the worker."""
    try:
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(result)
        return True
    except (cf.InvalidStateError, RuntimeError):
        return False


def _call_model(model: Callable, x: Any) -> Any:
    if isinstance(x, dict):
        return model(**x)
    if isinstance(x, tuple):
        return model(*x)
    return model(x)


def _finite(a: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return not a.is_floating_point() or bool(torch.isfinite(a).all())
    if isinstance(a, dict):
        return all(_finite(v) for v in a.values())
    if isinstance(a, (tuple, list)):
        return all(_finite(v) for v in a)
    return True
