"""A client that goes away stops costing: its queued request is withdrawn (never computed) and counted,
the clients that stay get their answers, every accepted request has exactly one outcome, and the
batcher goes on serving. Servers run on 127.0.0.1 (free port), bounded in time, and are stopped."""
from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import httpx
import numpy as np
import pytest
import torch
from torch import nn

from torchfast.serve import CallerGone, DynamicBatcher

pytestmark = pytest.mark.timeout(120)


class Slow(nn.Module):
    """Doubles its input once its gate opens; counts the rows it computed."""

    def __init__(self):
        super().__init__()
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.rows = 0

    def forward(self, x):
        self.entered.set()
        assert self.gate.wait(30)
        self.rows += x.shape[0]
        return x * 2


def _wait_for(cond, what: str, limit: float = 20.0) -> None:
    deadline = time.monotonic() + limit
    while not cond():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.01)


def test_batcher_withdraws_the_request_of_a_caller_that_went_away():
    model = Slow()
    b = DynamicBatcher(model, max_batch_size=1, max_delay_ms=0)

    async def go():
        model.gate.clear()
        running_gone = asyncio.Event()
        running = asyncio.ensure_future(b.submit(torch.ones(1, 2), gone=running_gone.wait()))
        await asyncio.get_running_loop().run_in_executor(None, model.entered.wait, 10)
        events = [asyncio.Event() for _ in range(6)]
        queued = [asyncio.ensure_future(b.submit(torch.full((1, 2), float(i)), gone=e.wait()))
                  for i, e in enumerate(events)]

        async def broken_watcher():
            raise RuntimeError("the watcher itself fails")
        stays = asyncio.ensure_future(b.submit(torch.full((1, 2), 7.0), gone=broken_watcher()))
        await asyncio.sleep(0.05)
        for e in events[:4]:
            e.set()
        running_gone.set()
        gone = await asyncio.gather(*queued[:4], running, return_exceptions=True)
        model.gate.set()
        return gone, await asyncio.gather(*queued[4:], stays)
    try:
        gone, answered = asyncio.run(go())
    finally:
        model.gate.set()
        b.close()
    assert all(isinstance(g, CallerGone) for g in gone), gone
    torch.testing.assert_close(answered[0], torch.full((1, 2), 8.0))
    torch.testing.assert_close(answered[2], torch.full((1, 2), 14.0))  # a failing watcher is ignored, not fatal
    snap = b.snapshot()
    assert snap["disconnected"] == 4 and snap["abandoned_answers"] == 1  # the running one finished for nobody
    assert snap["accepted"] == snap["answered"] == 8 and snap["ok"] == 4
    assert model.rows == 4  # the 4 withdrawn requests were never computed


def _raw_request(port: int, path: str, body: bytes, headers: dict | None = None) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    head = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    s.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n{head}"
              f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    return s


def _bodies(value: float):
    """The same one-row request as /v1 JSON, v2 JSON and v2 binary: (path, body, headers)."""
    v2_head = json.dumps({"inputs": [{"name": "input", "shape": [1, 2], "datatype": "FP32",
                                      "parameters": {"binary_data_size": 8}}]}).encode()
    return [("/v1/models/slow/infer", json.dumps({"inputs": [[value, value]]}).encode(), {}),
            ("/v2/models/slow/infer", json.dumps({"inputs": [{"name": "input", "shape": [1, 2], "datatype": "FP32",
                                                              "data": [value, value]}]}).encode(), {}),
            ("/v2/models/slow/infer", v2_head + np.full(2, value, "<f4").tobytes(),
             {"Inference-Header-Content-Length": str(len(v2_head))})]


def test_disconnected_clients_are_not_computed_and_disturb_no_one():
    pytest.importorskip("fastapi")
    from torchfast.serve.http import ServerThread, create_app
    from torchfast.serve.model import InputSpec, ServedModel
    model = Slow()
    app = create_app([ServedModel("slow", model, (InputSpec("input", (2,)),))], max_batch_size=1, max_delay_ms=0,
                     max_queue_size=64, timeout_ms=60_000)
    leaving, staying = 30, 6
    with ServerThread(app) as srv:
        b = app.state.torchfast["batchers"]["slow"]
        before, rows_before = b.snapshot(), model.rows
        model.gate.clear()
        model.entered.clear()
        answers: dict[int, httpx.Response] = {}

        def stay(i):
            path, body, headers = _bodies(100.0 + i)[i % 3]
            answers[i] = httpx.post(srv.url + path, content=body, headers=headers, timeout=60)
        try:
            first = _raw_request(srv.port, *_bodies(1.0)[0])  # runs, and its client leaves while it runs
            assert model.entered.wait(10)
            socks, threads = [], []
            for i in range(leaving):
                socks.append(_raw_request(srv.port, *_bodies(float(i))[i % 3]))
                if i % 5 == 0 and len(threads) < staying:
                    threads.append(threading.Thread(target=stay, args=(len(threads),)))
                    threads[-1].start()
            _wait_for(lambda: b.queue_depth() == leaving + staying, "every request to reach the queue")
            for s in socks + [first]:
                s.close()
            _wait_for(lambda: b.snapshot()["disconnected"] - before["disconnected"] == leaving,
                      "the server to notice every disconnect")
            assert b.queue_depth() == staying
        finally:
            model.gate.set()
        for t in threads:
            t.join(60)
        _wait_for(lambda: b.snapshot()["in_flight"] == 0, "every accepted request to be answered")
        after = b.snapshot()
        delta = {k: after[k] - before[k] for k in ("accepted", "answered", "ok", "disconnected", "abandoned_answers",
                                                   "error", "timeout", "cancelled", "closed")}
        assert delta == {"accepted": 1 + leaving + staying, "answered": 1 + leaving + staying, "ok": 1 + staying,
                         "disconnected": leaving, "abandoned_answers": 1, "error": 0, "timeout": 0, "cancelled": 0,
                         "closed": 0}
        assert model.rows - rows_before == 1 + staying  # the leavers cost no compute
        for i, r in answers.items():
            assert r.status_code == 200, r.text
        v1 = [r for i, r in answers.items() if i % 3 == 0]
        assert all(r.json()["outputs"]["output"]["data"] == [[2 * (100.0 + i)] * 2] for i, r in answers.items()
                   if i % 3 == 0) and v1
        # the batcher still serves, on both protocols
        r = httpx.post(srv.url + "/v1/models/slow/infer", json={"inputs": [[3.0, 4.0]]}, timeout=30)
        assert r.status_code == 200 and r.json()["outputs"]["output"]["data"] == [[6.0, 8.0]]
        path, body, headers = _bodies(5.0)[1]
        r = httpx.post(srv.url + path, content=body, headers=headers, timeout=30)
        assert r.status_code == 200 and r.json()["outputs"][0]["data"] == [10.0, 10.0]
        text = httpx.get(srv.url + "/metrics").text
        assert f'torchfast_batcher_requests_total{{model="slow",outcome="disconnected"}} {float(leaving)}' in text
        assert 'torchfast_batcher_abandoned_answers_total{model="slow"} 1.0' in text
