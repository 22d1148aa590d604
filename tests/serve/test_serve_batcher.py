"""DynamicBatcher behaviour: batching, buckets, shapes, deadlines, back-pressure, isolation, shutdown.

Timing never decides a test: a gate (threading.Event) holds the model so requests pile up in a
known state, then the gate opens.
"""
from __future__ import annotations

import asyncio
import threading

import pytest
import torch
from torch import nn

from torchfast.serve import (BatcherClosed, DynamicBatcher, NonFiniteOutput, QueueFull, RequestTimeout,
                             SequencePadding)

pytestmark = pytest.mark.timeout(60)


class Gated(nn.Module):
    """y = 2x + 1 row-wise; records the batch shapes it saw; can hold until released; fails on -999 rows."""

    def __init__(self, hold: bool = False):
        super().__init__()
        self.gate = threading.Event()
        if not hold:
            self.gate.set()
        self.entered = threading.Event()
        self.shapes: list[tuple] = []
        self.rows_seen: list[torch.Tensor] = []

    def forward(self, x):
        self.entered.set()
        assert self.gate.wait(30), "test gate never opened"
        self.shapes.append(tuple(x.shape))
        self.rows_seen.append(x.detach().clone())
        if (x == -999).any():
            raise ValueError("poisoned row -999 in batch")
        return x * 2 + 1


def expected(x):
    return x * 2 + 1


def test_results_match_model_for_each_form_of_request():
    lin = nn.Linear(4, 3).eval()
    with DynamicBatcher(lin, max_batch_size=8, max_delay_ms=2) as b:
        x = torch.randn(3, 4)
        torch.testing.assert_close(b(x), lin(x).detach())
    with DynamicBatcher(lambda a, c: a + c, max_batch_size=4) as b:
        a, c = torch.randn(2, 3), torch.randn(2, 3)
        torch.testing.assert_close(b((a, c)), a + c)
    with DynamicBatcher(lambda p, q: {"sum": p + q, "diff": p - q}, max_batch_size=4) as b:
        out = b({"p": a, "q": c})
        torch.testing.assert_close(out["sum"], a + c)
        torch.testing.assert_close(out["diff"], a - c)


def test_requests_pile_up_into_one_batch_and_answers_do_not_mix():
    m = Gated(hold=True)
    b = DynamicBatcher(m, max_batch_size=16, max_delay_ms=300)
    first = b.submit_future(torch.full((1, 2), -1.0))
    assert m.entered.wait(10)
    xs = [torch.full((1 + i % 2, 2), float(i)) for i in range(8)]  # 12 rows, queued behind the held call
    futs = [b.submit_future(x) for x in xs]
    assert b.queue_depth() == 8
    m.gate.set()
    for x, f in zip(xs, futs):
        torch.testing.assert_close(f.result(10), expected(x))
    first.result(10)
    b.close()
    assert m.shapes[1] == (12, 2)  # all eight requests ran as one batch (closing drains without waiting)
    snap = b.snapshot()
    assert snap["accepted"] == snap["ok"] == 9 and snap["max_batch_size_seen"] == 12


def test_padding_buckets_pad_run_and_slice():
    m = Gated(hold=True)
    b = DynamicBatcher(m, max_batch_size=8, max_delay_ms=300, preferred_batch_sizes=[1, 2, 4, 8])
    b.submit_future(torch.zeros(1, 3))
    assert m.entered.wait(10)
    xs = [torch.randn(3, 3), torch.randn(3, 3)]  # 6 rows fill no bucket exactly: pad to 8
    futs = [b.submit_future(x) for x in xs]
    m.gate.set()
    outs = [f.result(10) for f in futs]
    b.close()
    assert m.shapes[1] == (8, 3)
    assert torch.equal(m.rows_seen[1][6:], m.rows_seen[1][5:6].expand(2, 3))  # padding repeats a real row
    for x, y in zip(xs, outs):
        assert y.shape == (3, 3)  # padding never reaches an answer
        torch.testing.assert_close(y, expected(x))
    assert b.snapshot()["padded_rows"] == 2
    with pytest.raises(ValueError, match="preferred_batch_sizes"):
        DynamicBatcher(m, max_batch_size=16, preferred_batch_sizes=[1, 8], start=False)


def test_buckets_run_the_largest_filled_bucket_instead_of_padding():
    m = Gated(hold=True)
    b = DynamicBatcher(m, max_batch_size=8, max_delay_ms=300, preferred_batch_sizes=[1, 2, 4, 8])
    b.submit_future(torch.zeros(1, 3))
    assert m.entered.wait(10)
    xs = [torch.randn(1, 3) for _ in range(5)]  # 5 rows: run 4 now, 1 next (as Triton's preferred sizes)
    futs = [b.submit_future(x) for x in xs]
    m.gate.set()
    for x, f in zip(xs, futs):
        torch.testing.assert_close(f.result(10), expected(x))
    b.close()
    assert m.shapes[1:] == [(4, 3), (1, 3)] and b.snapshot()["padded_rows"] == 0


def test_different_shapes_are_never_stacked():
    m = Gated(hold=True)
    b = DynamicBatcher(m, max_batch_size=32, max_delay_ms=300)
    b.submit_future(torch.zeros(1, 2))
    assert m.entered.wait(10)
    xs = [torch.randn(1, 2 + i % 3) for i in range(9)]
    futs = [b.submit_future(x) for x in xs]
    m.gate.set()
    for x, f in zip(xs, futs):
        torch.testing.assert_close(f.result(10), expected(x))
    b.close()
    assert sorted(m.shapes[1:]) == [(3, 2), (3, 3), (3, 4)]


def test_oversized_and_malformed_requests_fail_alone_at_submit():
    with DynamicBatcher(Gated(), max_batch_size=4) as b:
        with pytest.raises(ValueError, match="5 rows, more than max_batch_size=4"):
            b(torch.zeros(5, 2))
        with pytest.raises(TypeError, match="must be a tensor"):
            b([torch.zeros(1, 2), "text"])
        with pytest.raises(ValueError, match="disagree on the batch size"):
            b({"a": torch.zeros(2, 2), "b": torch.zeros(3, 2)})
        with pytest.raises(ValueError, match="scalar"):
            b(torch.tensor(1.0))


def test_queue_full_rejects_immediately():
    m = Gated(hold=True)
    b = DynamicBatcher(m, max_batch_size=1, max_delay_ms=0, max_queue_size=3)
    running = b.submit_future(torch.zeros(1, 2))
    assert m.entered.wait(10)
    queued = [b.submit_future(torch.ones(1, 2)) for _ in range(3)]
    with pytest.raises(QueueFull, match="queue is full"):
        b.submit_future(torch.ones(1, 2))
    m.gate.set()
    for f in [running, *queued]:
        f.result(10)
    b.close()
    assert b.snapshot()["rejected"] == 1


def test_expired_request_is_answered_with_timeout_and_never_runs():
    m = Gated(hold=True)
    b = DynamicBatcher(m, max_batch_size=4, max_delay_ms=0)
    running = b.submit_future(torch.zeros(1, 2))
    assert m.entered.wait(10)
    with pytest.raises(RequestTimeout, match="timed out"):
        b(torch.full((1, 2), 7.0), timeout_ms=50)
    late = b.submit_future(torch.full((1, 2), 8.0), timeout_ms=50)
    with pytest.raises(RequestTimeout):  # nobody waits on it: the worker drops it when the gate opens
        threading.Timer(0.2, m.gate.set).start()
        late.result(10)
    running.result(10)
    b.close()
    seen = torch.cat(m.rows_seen)
    assert not (seen == 7.0).any() and not (seen == 8.0).any()
    assert b.snapshot()["timeout"] == 2


def test_priorities_run_first():
    m = Gated(hold=True)
    b = DynamicBatcher(m, max_batch_size=1, max_delay_ms=0)
    b.submit_future(torch.zeros(1, 1))
    assert m.entered.wait(10)
    futs = [b.submit_future(torch.full((1, 1), float(i)), priority=p) for i, p in enumerate([0, 0, 5, 1, 5])]
    m.gate.set()
    [f.result(10) for f in futs]
    b.close()
    order = [int(s.item()) for s in m.rows_seen[1:]]
    assert order == [2, 4, 3, 0, 1]


def test_error_isolation_only_the_bad_request_fails():
    m = Gated(hold=True)
    b = DynamicBatcher(m, max_batch_size=16, max_delay_ms=300)
    b.submit_future(torch.zeros(1, 2))
    assert m.entered.wait(10)
    xs = [torch.full((1, 2), float(i)) for i in range(10)]
    xs[6] = torch.tensor([[-999.0, 1.0]])
    futs = [b.submit_future(x) for x in xs]
    m.gate.set()
    for i, (x, f) in enumerate(zip(xs, futs)):
        if i == 6:
            with pytest.raises(ValueError, match="poisoned"):
                f.result(10)
        else:
            torch.testing.assert_close(f.result(10), expected(x))
    b.close()
    s = b.snapshot()
    assert s["error"] == 1 and s["ok"] == 10 and s["isolation_reruns"] > 0


def test_nan_guard_fails_only_the_non_finite_request():
    lin = nn.Linear(3, 2)
    with DynamicBatcher(lin, max_batch_size=8, max_delay_ms=50, nan_guard=True) as b:
        futs = [b.submit_future(torch.randn(1, 3)) for _ in range(3)]
        bad = b.submit_future(torch.tensor([[float("nan"), 0.0, 0.0]]))
        futs += [b.submit_future(torch.randn(1, 3)) for _ in range(3)]
        with pytest.raises(NonFiniteOutput, match="NaN"):
            bad.result(10)
        assert all(torch.isfinite(f.result(10)).all() for f in futs)


def test_async_cancellation_removes_the_waiting_request():
    m = Gated(hold=True)
    b = DynamicBatcher(m, max_batch_size=4, max_delay_ms=0)

    async def main():
        running = asyncio.ensure_future(b.submit(torch.zeros(1, 2)))
        await asyncio.get_running_loop().run_in_executor(None, m.entered.wait, 10)
        waiting = asyncio.ensure_future(b.submit(torch.full((1, 2), 5.0)))
        await asyncio.sleep(0.05)
        assert b.queue_depth() == 1
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert b.queue_depth() == 0
        m.gate.set()
        await running

    asyncio.run(main())
    b.close()
    assert not (torch.cat(m.rows_seen) == 5.0).any()
    assert b.snapshot()["cancelled"] == 1


def test_graceful_shutdown_drains_every_accepted_request():
    m = Gated(hold=True)
    b = DynamicBatcher(m, max_batch_size=4, max_delay_ms=10_000)
    futs = [b.submit_future(torch.full((1, 2), float(i))) for i in range(11)]
    closer = threading.Thread(target=b.close)
    closer.start()
    with pytest.raises(BatcherClosed):
        for _ in range(100):  # close() may not have flipped the flag yet
            b.submit_future(torch.zeros(1, 2))
            threading.Event().wait(0.01)
    m.gate.set()
    closer.join(10)
    assert not closer.is_alive()
    for i, f in enumerate(futs):
        torch.testing.assert_close(f.result(0), expected(torch.full((1, 2), float(i))))


def test_shutdown_without_drain_answers_waiting_requests_with_closed():
    m = Gated(hold=True)
    b = DynamicBatcher(m, max_batch_size=1, max_delay_ms=0)
    running = b.submit_future(torch.zeros(1, 2))
    assert m.entered.wait(10)
    waiting = [b.submit_future(torch.ones(1, 2)) for _ in range(3)]
    b.close(drain=False, timeout=0.1)
    m.gate.set()
    running.result(10)
    for f in waiting:
        with pytest.raises(BatcherClosed):
            f.result(10)
    assert b.snapshot()["closed"] == 3


def test_sequence_padding_matches_unbatched_minilm(minilm):
    model, tok = minilm
    from torchfast.zoo.minilm import sentences
    texts = sentences(6)
    enc = [dict(tok([t], return_tensors="pt")) for t in texts]  # lengths differ
    assert len({e["input_ids"].shape[1] for e in enc}) > 1
    seq = SequencePadding(values={"input_ids": tok.pad_token_id}, multiple_of=8)
    with torch.inference_mode():
        ref = [model(**e).last_hidden_state for e in enc]
    with DynamicBatcher(model, max_batch_size=8, max_delay_ms=200, sequence=seq) as b:
        futs = [b.submit_future(e) for e in enc]
        outs = [f.result(30) for f in futs]
    for r, o in zip(ref, outs):
        assert o.last_hidden_state.shape == r.shape
        torch.testing.assert_close(o.last_hidden_state, r, atol=1e-4, rtol=1e-4)
    assert b.snapshot()["batches"] < len(enc)
