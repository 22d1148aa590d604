"""The batcher survives every interleaving of cancel / deadline / close / model error.

Each test forces a race that used to kill the worker thread (a cancel landing while the worker expires
the same request, a model raising a BaseException, a failure inside the worker itself, a close in the
middle of a batch) and checks two things: every accepted request got exactly one answer, and the
batcher still serves correct answers afterwards.
"""
from __future__ import annotations

import concurrent.futures as cf
import random
import threading
import time
from collections import Counter

import pytest
import torch
from torch import nn

from torchfast.serve import BatcherClosed, DynamicBatcher, ModelError, RequestTimeout, WorkerError

pytestmark = pytest.mark.timeout(120)


class Halt(BaseException):
    """What user code raising a KeyboardInterrupt-like exception looks like to the worker."""


class Model(nn.Module):
    """y = 2x + 1; a row of -999 raises RuntimeError, -777 raises a BaseException; can be held by a gate."""

    def __init__(self):
        super().__init__()
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def forward(self, x):
        self.entered.set()
        assert self.gate.wait(30), "test gate never opened"
        if (x == -999).any():
            raise RuntimeError("injected model failure")
        if (x == -777).any():
            raise Halt("user code raised a BaseException")
        return x * 2 + 1


class Ledger:
    """Counts the answers each future delivers (a done callback fires once per completion)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.answers: Counter = Counter()
        self.futures: dict[int, cf.Future] = {}

    def track(self, rid: int, fut: cf.Future) -> cf.Future:
        self.futures[rid] = fut

        def cb(_f, rid=rid):
            with self.lock:
                self.answers[rid] += 1
        fut.add_done_callback(cb)
        return fut

    def assert_each_answered_once(self, timeout: float = 30.0) -> None:
        # polled, not cf.wait: a future cancelled by its client stays CANCELLED (not CANCELLED_AND_NOTIFIED),
        # which cf.wait never counts as done, so it would always sit out the whole timeout
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not all(f.done() for f in self.futures.values()):
            time.sleep(0.005)
        assert all(f.done() for f in self.futures.values()), "a request was never answered"
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(self.answers[r] != 1 for r in self.futures):
            time.sleep(0.01)  # a cancel's callbacks may still be running on the cancelling thread
        assert {r: self.answers[r] for r in self.futures if self.answers[r] != 1} == {}


def still_serves(b: DynamicBatcher) -> None:
    x = torch.full((2, 4), 3.0)
    torch.testing.assert_close(b(x, timeout_ms=10_000), x * 2 + 1)
    assert b.running


def test_cancel_at_the_moment_of_expiry_leaves_the_worker_alive():
    """The cancel lands (future cancelled, its callback waiting for the lock) while the deadline expires."""
    m = Model()
    b = DynamicBatcher(m, max_batch_size=4, max_delay_ms=1)
    ledger = Ledger()
    try:
        for i in range(60):
            m.gate.clear()
            m.entered.clear()
            busy = ledger.track(10_000 + i, b.submit_future(torch.zeros(1, 4)))
            assert m.entered.wait(10)                     # the worker is inside the model
            fut = ledger.track(i, b.submit_future(torch.zeros(1, 4), timeout_ms=5))
            r = fut._tf_request
            with b._cond:                                 # hold the lock across the deadline
                time.sleep(0.01)
                canceller = threading.Thread(target=fut.cancel)
                canceller.start()                         # cancels, then blocks in the done callback
                deadline = time.monotonic() + 5
                while not fut.cancelled() and time.monotonic() < deadline:
                    time.sleep(0.0005)
                assert fut.cancelled()
                if i % 2 == 0:
                    b._expire(r)                          # the expiry path on an already-cancelled future
                m.gate.set()
            canceller.join(10)
            busy.result(10)
        ledger.assert_each_answered_once()
        assert all(ledger.futures[i].cancelled() for i in range(60))
        still_serves(b)
    finally:
        m.gate.set()
        b.close()


def test_cancels_from_other_threads_racing_deadlines():
    m = Model()
    b = DynamicBatcher(m, max_batch_size=8, max_delay_ms=1, max_queue_size=4096)
    ledger = Ledger()
    rng = random.Random(0)
    try:
        for i in range(400):
            fut = ledger.track(i, b.submit_future(torch.full((1, 4), float(i)),
                                                   timeout_ms=rng.choice([0.5, 1, 2, 5, None])))
            if rng.random() < 0.5:
                threading.Timer(rng.uniform(0, 0.004), fut.cancel).start()
            if i % 50 == 0:
                with b._cond:                              # stall the worker across many deadlines
                    time.sleep(0.006)
        ledger.assert_each_answered_once()
        for i, f in ledger.futures.items():
            if f.cancelled():
                continue
            e = f.exception()
            if e is None:
                torch.testing.assert_close(f.result(), torch.full((1, 4), float(i)) * 2 + 1)
            else:
                assert isinstance(e, RequestTimeout), repr(e)
        still_serves(b)
    finally:
        b.close()


def test_base_exception_from_the_model_fails_only_its_request():
    b = DynamicBatcher(Model(), max_batch_size=8, max_delay_ms=20)
    try:
        good = [b.submit_future(torch.full((1, 4), float(i))) for i in range(3)]
        bad = b.submit_future(torch.full((1, 4), -777.0))
        with pytest.raises(ModelError, match="Halt"):
            bad.result(10)
        for i, f in enumerate(good):
            torch.testing.assert_close(f.result(10), torch.full((1, 4), float(i)) * 2 + 1)
        with pytest.raises(ModelError):
            b(torch.full((1, 4), -777.0))
        still_serves(b)
    finally:
        b.close()


def test_a_failure_inside_the_worker_answers_the_batch_and_keeps_serving():
    m = Model()
    b = DynamicBatcher(m, max_batch_size=8, max_delay_ms=20, start=False)
    ledger = Ledger()
    real_run, real_trim = b._run, b._trim_to_bucket
    fails = {"run": 1, "trim": 1}

    def run_once_broken(batch):
        if fails["run"]:
            fails["run"] -= 1
            raise RuntimeError("worker bug while running a batch")
        return real_run(batch)

    def trim_once_broken(group, rows):
        if fails["trim"]:
            fails["trim"] -= 1
            raise MemoryError("worker bug while cutting a batch")
        return real_trim(group, rows)

    b._run, b._trim_to_bucket = run_once_broken, trim_once_broken
    try:
        futs = [ledger.track(i, b.submit_future(torch.full((1, 4), float(i)))) for i in range(4)]
        b.start()
        ledger.assert_each_answered_once()
        errors = [f.exception() for f in futs]
        assert all(e is None or isinstance(e, WorkerError) for e in errors), errors
        assert any(isinstance(e, WorkerError) for e in errors)  # the batch that hit the bug was answered
        assert "worker bug" in str(next(e for e in errors if e is not None))
        still_serves(b)
        snap = b.snapshot()
        assert snap["error"] >= 1 and snap["answered"] == snap["accepted"]
    finally:
        b.close()


@pytest.mark.parametrize("drain", [True, False])
def test_close_mid_batch_answers_everything_once(drain):
    m = Model()
    m.gate.clear()
    b = DynamicBatcher(m, max_batch_size=2, max_delay_ms=0, max_queue_size=64, start=False)
    ledger = Ledger()
    futs = [ledger.track(i, b.submit_future(torch.full((1, 4), float(i)))) for i in range(2)]
    b.start()                                             # both are queued: the first batch holds them both
    assert m.entered.wait(10)                             # a batch is running, held by the gate
    futs += [ledger.track(i, b.submit_future(torch.full((1, 4), float(i)))) for i in range(2, 12)]
    futs[5].cancel()
    closer = threading.Thread(target=b.close, kwargs={"drain": drain, "timeout": 30})
    closer.start()
    time.sleep(0.05)
    with pytest.raises(BatcherClosed):
        b.submit_future(torch.zeros(1, 4))
    m.gate.set()
    closer.join(30)
    assert not closer.is_alive()
    ledger.assert_each_answered_once()
    for i, f in enumerate(futs):
        if i == 5:
            assert f.cancelled()
        elif i < 2 or drain:
            torch.testing.assert_close(f.result(), torch.full((1, 4), float(i)) * 2 + 1)
        else:
            assert isinstance(f.exception(), BatcherClosed)


def test_random_interleavings_every_request_answered_once_then_still_serving():
    """Many threads: random deadlines, cancels from other threads, model errors of both kinds."""
    m = Model()
    b = DynamicBatcher(m, max_batch_size=16, max_delay_ms=1, preferred_batch_sizes=[1, 2, 4, 8, 16],
                       max_queue_size=10_000)
    ledger = Ledger()
    kinds: dict[int, str] = {}
    stop = time.monotonic() + 3.0
    rid = iter(range(10**9))
    rid_lock = threading.Lock()

    def client(seed: int):
        rng = random.Random(seed)
        while time.monotonic() < stop:
            with rid_lock:
                i = next(rid)
            x = torch.full((rng.randint(1, 3), 4), float(i))
            kind = rng.choices(["ok", "error", "halt"], [0.9, 0.05, 0.05])[0]
            if kind == "error":
                x[0, 0] = -999
            elif kind == "halt":
                x[0, 0] = -777
            kinds[i] = kind
            fut = ledger.track(i, b.submit_future(x, timeout_ms=rng.choice([1, 3, 10, None])))
            if rng.random() < 0.3:
                threading.Timer(rng.uniform(0, 0.003), fut.cancel).start()
            if rng.random() < 0.02:
                with b._cond:
                    time.sleep(0.004)
            time.sleep(rng.uniform(0, 0.001))

    threads = [threading.Thread(target=client, args=(s,)) for s in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    try:
        ledger.assert_each_answered_once()
        seen = Counter()
        for i, f in ledger.futures.items():
            if f.cancelled():
                seen["cancelled"] += 1
                continue
            e = f.exception()
            if e is None:
                assert kinds[i] == "ok"
                assert bool((f.result() == float(i) * 2 + 1).all())
                seen["ok"] += 1
            elif isinstance(e, RequestTimeout):
                seen["timeout"] += 1
            else:
                assert kinds[i] != "ok", f"request {i} failed with {e!r}"
                assert isinstance(e, ModelError if kinds[i] == "halt" else RuntimeError), repr(e)
                seen[kinds[i]] += 1
        assert seen["ok"] > 50 and seen["cancelled"] > 0, seen
        still_serves(b)
    finally:
        b.close()
