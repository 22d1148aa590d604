"""Nothing lost, nothing duplicated: many concurrent clients, random cancellations, timeouts and
injected model failures against one batcher; every accepted request gets exactly one, correct answer."""
from __future__ import annotations

import asyncio
import random
import threading
import time
from collections import Counter

import pytest
import torch

from torchfast.serve import DynamicBatcher, QueueFull, RequestTimeout

pytestmark = pytest.mark.timeout(90)


class Flaky(torch.nn.Module):
    """y = 2x + 1; a short random compute time; raises on any row holding -999; NaN never."""

    def __init__(self, seed: int = 0):
        super().__init__()
        self.rng = random.Random(seed)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        time.sleep(self.rng.uniform(0, 0.002))
        if (x[:, 0] == -999).any():
            raise RuntimeError("injected model failure")
        return x * 2 + 1


def _request(i: int, rng: random.Random) -> tuple[torch.Tensor, bool]:
    rows = rng.randint(1, 3)
    x = torch.full((rows, 4), float(i))
    poison = rng.random() < 0.08
    if poison:
        x[rng.randrange(rows), 0] = -999
    return x, poison


def test_no_request_lost_or_duplicated_under_concurrency():
    b = DynamicBatcher(Flaky(), max_batch_size=16, max_delay_ms=2, preferred_batch_sizes=[1, 2, 4, 8, 16],
                       max_queue_size=64)
    answers: Counter = Counter()   # request id -> number of answers delivered to its future
    outcomes: Counter = Counter()
    lock = threading.Lock()
    wrong: list = []

    def track(fut, rid):
        def cb(_f):
            with lock:
                answers[rid] += 1
        fut.add_done_callback(cb)

    def check(rid, x, poison, fn):
        try:
            y = fn()
        except RuntimeError as e:
            if isinstance(e, RequestTimeout):
                kind = "timeout"
            elif "injected" in str(e) and poison:
                kind = "error"
            else:
                kind = "unexpected"
                wrong.append((rid, repr(e)))
        except (asyncio.CancelledError, QueueFull) as e:
            kind = "cancelled" if isinstance(e, asyncio.CancelledError) else "rejected"
        else:
            kind = "ok"
            if poison or not torch.equal(y, x * 2 + 1):
                wrong.append((rid, "wrong answer"))
        with lock:
            outcomes[kind] += 1

    def thread_client(tid: int):
        rng = random.Random(tid)
        for k in range(40):
            rid = f"t{tid}-{k}"
            x, poison = _request(tid * 1000 + k, rng)
            timeout = rng.choice([None, None, None, 1, 50])
            try:
                fut = b.submit_future(x, timeout_ms=timeout)
            except QueueFull:
                with lock:
                    outcomes["rejected"] += 1
                continue
            track(fut, rid)
            r = fut._tf_request

            def wait(fut=fut, r=r):
                if r.deadline is None:
                    return fut.result()
                try:
                    return fut.result(timeout=max(0, r.deadline - time.monotonic()))
                except TimeoutError:
                    b._expire(r)
                    return fut.result()
            check(rid, x, poison, wait)

    async def async_clients():
        rng = random.Random(99)

        async def one(k):
            x, poison = _request(50_000 + k, rng)
            task = asyncio.ensure_future(b.submit(x, timeout_ms=rng.choice([None, 20])))
            if rng.random() < 0.25:
                await asyncio.sleep(rng.uniform(0, 0.004))
                task.cancel()

            async def get():
                return await task
            try:
                y = await get()
            except asyncio.CancelledError:
                with lock:
                    outcomes["cancelled"] += 1
                return
            except QueueFull:
                with lock:
                    outcomes["rejected"] += 1
                return
            except RuntimeError as e:
                ok = isinstance(e, RequestTimeout) or ("injected" in str(e) and poison)
                with lock:
                    outcomes["timeout" if isinstance(e, RequestTimeout) else "error"] += 1
                if not ok:
                    wrong.append((k, repr(e)))
                return
            if poison or not torch.equal(y, x * 2 + 1):
                wrong.append((k, "wrong async answer"))
            with lock:
                outcomes["ok"] += 1
        for start in range(0, 400, 100):
            await asyncio.gather(*[one(k) for k in range(start, start + 100)])

    threads = [threading.Thread(target=thread_client, args=(t,)) for t in range(12)]
    for t in threads:
        t.start()
    asyncio.run(async_clients())
    for t in threads:
        t.join(60)
    b.close()
    snap = b.snapshot()
    info = f"batcher: {snap}; clients: {dict(outcomes)}"
    assert not wrong, (wrong[:5], info)
    assert all(v == 1 for v in answers.values()), "a future was answered twice"
    assert snap["in_flight"] == 0 and snap["queue_depth"] == 0, info
    assert snap["accepted"] == snap["ok"] + snap["error"] + snap["timeout"] + snap["cancelled"], info
    assert snap["accepted"] + snap["rejected"] == 12 * 40 + 400, info
    assert snap["rejected"] == outcomes["rejected"], info
    # a task cancelled after the batcher resolved its request (an answer computed, an error, or its deadline
    # expired) but before the task resumed is cancelled for its client and counted ok/error/timeout by the batcher
    late = outcomes["cancelled"] - snap["cancelled"]
    answered = ("ok", "error", "timeout")
    assert late >= 0 and sum(snap[k] for k in answered) == sum(outcomes[k] for k in answered) + late, info
    assert all(outcomes[k] <= snap[k] for k in answered), info
    assert outcomes["ok"] > 50 and outcomes["error"] > 0 and outcomes["cancelled"] > 0, info
    assert snap["max_batch_size_seen"] > 1, info  # it really batched
