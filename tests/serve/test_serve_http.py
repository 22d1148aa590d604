"""The HTTP server end to end on 127.0.0.1 (free port, bounded, stopped): formats, validation, status codes."""
from __future__ import annotations

import asyncio
import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from torchfast.serve.http import ServerThread, create_app  # noqa: E402
from torchfast.serve.model import InputSpec, ServedModel, load_served_model  # noqa: E402

pytestmark = pytest.mark.timeout(90)
ROOT = Path(__file__).resolve().parents[2]


class Gated(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def forward(self, x):
        self.entered.set()
        assert self.gate.wait(30)
        if (x == -999).any():
            raise ValueError("poisoned input row")
        return self.lin(x)


class TwoInputs(nn.Module):
    def forward(self, ids, mask):
        return {"summed": (ids * mask).sum(-1, keepdim=True).float(), "count": mask.sum(-1)}


@pytest.fixture(scope="module")
def server():
    torch.manual_seed(0)
    vec = Gated().eval()
    models = [ServedModel("vec", vec, (InputSpec("input", (4,)),)),
              ServedModel("two", TwoInputs(), (InputSpec("ids", (-1,), "int64"), InputSpec("mask", (-1,), "int64")),
                          keyword_inputs=False)]
    app = create_app(models, max_batch_size=8, max_delay_ms=2, max_queue_size=2, timeout_ms=20_000,
                     max_body_bytes=4096)
    with ServerThread(app) as srv:
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            yield srv, c, vec


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def test_json_and_npy_answers_match_the_model(server):
    _, c, vec = server
    x = torch.randn(3, 4)
    want = vec.lin(x).detach()
    r = c.post("/v1/models/vec/infer", json={"inputs": x.tolist()})
    assert r.status_code == 200, r.text
    out = r.json()["outputs"]["output"]
    assert out["shape"] == [3, 3] and out["dtype"] == "float32"
    torch.testing.assert_close(torch.tensor(out["data"]), want)
    r = c.post("/v1/models/vec/infer", content=_npy(x.numpy()), headers={"content-type": "application/x-npy"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/x-npy"
    torch.testing.assert_close(torch.from_numpy(np.load(io.BytesIO(r.content))), want)


def test_safetensors_multi_input(server):
    from safetensors.torch import load, save
    _, c, _ = server
    ids, mask = torch.arange(10).reshape(2, 5), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    r = c.post("/v1/models/two/infer", content=save({"ids": ids, "mask": mask}),
               headers={"content-type": "application/x-safetensors"})
    assert r.status_code == 200, r.text
    out = load(r.content)
    torch.testing.assert_close(out["summed"], torch.tensor([[3.0], [35.0]]))
    r = c.post("/v1/models/two/infer", json={"inputs": {"ids": ids.tolist(), "mask": mask.tolist()}})
    assert r.json()["outputs"]["count"]["data"] == [3, 5]


@pytest.mark.parametrize("kwargs,status,needle", [
    (dict(json={"inputs": [[1.0, 2.0]]}), 422, "input 'input' must have shape [batch, 4], got [1, 2]"),
    (dict(json={"inputs": [[1.0, 2.0, 3.0, 4.0], [1.0]]}), 422, "rectangular"),
    (dict(json={"inputs": {"nope": [[1, 2, 3, 4]]}}), 422, "unknown input"),
    (dict(json={"x": 1}), 400, '"inputs"'),
    (dict(content=b"{not json", headers={"content-type": "application/json"}), 400, "not valid JSON"),
    (dict(content=_npy(np.zeros((1, 4))), headers={"content-type": "application/x-npy"}), 422, "dtype float32, got float64"),
    (dict(content=b"abc", headers={"content-type": "text/csv"}), 415, "unsupported content-type"),
    (dict(json={"inputs": np.zeros((300, 4)).tolist()}), 413, "exceeds the limit"),
    (dict(json={"inputs": np.zeros((9, 4)).tolist()}), 422, "more than max_batch_size"),
])
def test_bad_requests_get_clear_4xx(server, kwargs, status, needle):
    _, c, _ = server
    r = c.post("/v1/models/vec/infer", **kwargs)
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]


def test_int_input_rejects_fractions_and_unknown_model_is_404(server):
    _, c, _ = server
    r = c.post("/v1/models/two/infer", json={"inputs": {"ids": [[1.5]], "mask": [[1]]}})
    assert r.status_code == 422 and "integers" in r.json()["error"]
    r = c.post("/v1/models/missing/infer", json={"inputs": [[0, 0, 0, 0]]})
    assert r.status_code == 404 and "vec" in r.json()["error"]


def test_health_ready_metadata_metrics(server):
    _, c, _ = server
    assert c.get("/healthz").json() == {"status": "ok"}
    assert c.get("/readyz").json()["models"] == ["two", "vec"]
    meta = c.get("/v1/models/two").json()
    assert meta["inputs"] == [{"name": "ids", "shape": [-1, -1], "dtype": "int64"},
                              {"name": "mask", "shape": [-1, -1], "dtype": "int64"}]
    assert meta["batching"]["max_batch_size"] == 8
    text = c.get("/metrics").text
    for name in ("torchfast_batcher_queue_depth", "torchfast_batcher_batch_size_bucket",
                 "torchfast_batcher_queue_wait_seconds", "torchfast_batcher_compute_seconds",
                 'torchfast_batcher_requests_total{model="vec",outcome="rejected"}'):
        assert name in text
    assert text.count("# TYPE torchfast_batcher_queue_depth gauge") == 1  # two models, one family


def test_queue_full_is_503_with_retry_after_and_timeout_is_504(server):
    srv, c, vec = server
    vec.gate.clear()
    vec.entered.clear()
    try:
        async def burst():
            async with httpx.AsyncClient(base_url=srv.url, timeout=30) as ac:
                post = lambda i: asyncio.ensure_future(  # noqa: E731
                    ac.post("/v1/models/vec/infer", json={"inputs": [[float(i)] * 4]}))
                first = post(0)
                await asyncio.get_running_loop().run_in_executor(None, vec.entered.wait, 10)
                tasks = [first] + [post(i) for i in range(1, 6)]
                await asyncio.sleep(0.5)
                timed = await ac.post("/v1/models/vec/infer", json={"inputs": [[0.0] * 4]},
                                      headers={"x-timeout-ms": "30"})
                vec.gate.set()
                return timed, await asyncio.gather(*tasks)
        timed, rs = asyncio.run(burst())
    finally:
        vec.gate.set()
    codes = sorted(r.status_code for r in rs)
    assert codes == [200, 200, 200, 503, 503, 503]  # 1 running + 2 queued fit, the rest are refused at once
    assert all(r.headers.get("retry-after") for r in rs if r.status_code == 503)
    assert timed.status_code == 503  # the queue is still full: refused at once, not after its timeout


def test_expired_request_is_504(server):
    srv, c, vec = server
    vec.gate.clear()
    vec.entered.clear()
    try:
        async def go():
            async with httpx.AsyncClient(base_url=srv.url, timeout=30) as ac:
                first = asyncio.ensure_future(ac.post("/v1/models/vec/infer", json={"inputs": [[1.0] * 4]}))
                await asyncio.get_running_loop().run_in_executor(None, vec.entered.wait, 10)
                timed = await ac.post("/v1/models/vec/infer?timeout_ms=30", json={"inputs": [[2.0] * 4]})
                vec.gate.set()
                return timed, await first
        timed, first = asyncio.run(go())
    finally:
        vec.gate.set()
    assert first.status_code == 200
    assert timed.status_code == 504 and "timed out" in timed.json()["error"]
    assert c.post("/v1/models/vec/infer?timeout_ms=-1", json={"inputs": [[2.0] * 4]}).status_code == 400


def test_concurrent_clients_each_get_their_own_answer_and_errors_stay_alone(server):
    srv, _, vec = server

    async def go():
        async with httpx.AsyncClient(base_url=srv.url, timeout=60,
                                     limits=httpx.Limits(max_connections=64)) as ac:
            async def one(i):
                x = [[-999.0 if i % 7 == 3 else float(i), 1.0, 2.0, 3.0]]
                for _ in range(200):  # the queue is tiny (2): honour Retry-After quickly
                    r = await ac.post("/v1/models/vec/infer", json={"inputs": x})
                    if r.status_code != 503:
                        return i, x, r
                    await asyncio.sleep(0.01)
                return i, x, r
            return await asyncio.gather(*[one(i) for i in range(48)])
    for i, x, r in asyncio.run(go()):
        if i % 7 == 3:
            body = r.json()
            assert r.status_code == 500 and "ValueError" in body["error"], body
            assert "poisoned" not in body["error"] and body["request_id"] in body["error"]  # detail: server log
        else:
            assert r.status_code == 200, r.text
            torch.testing.assert_close(torch.tensor(r.json()["outputs"]["output"]["data"]),
                                       vec.lin(torch.tensor(x)).detach())


def test_artifacts_torchscript_and_exported_program(tmp_path):
    net = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2)).eval()
    x = torch.randn(3, 6)
    ts = tmp_path / "net.pt"
    torch.jit.trace(net, x[:1]).save(str(ts))
    with pytest.raises(ValueError, match="does not declare its inputs.*--input-shape"):
        load_served_model(str(ts))
    with pytest.raises(ValueError, match="takes it as one row, so pass --input-shape 1,6"):
        load_served_model(str(ts), input_shape=(6,))         # the per-row spelling serve once took
    with pytest.raises(ValueError, match="does not run on --input-shape 2,7"):
        load_served_model(str(ts), input_shape=(2, 7))
    m = load_served_model(str(ts), input_shape=(2, 6))        # one example batch, batch dim first
    assert m.name == "net"
    torch.testing.assert_close(m.model(x), net(x))
    ep = torch.export.export(net, (x,), dynamic_shapes=({0: torch.export.Dim("batch", max=1024)},))
    torch.export.save(ep, str(tmp_path / "net.pt2"))
    m2 = load_served_model(str(tmp_path / "net.pt2"))
    assert [s.to_dict() for s in m2.inputs] == [{"name": "input", "shape": [-1, 6], "dtype": "float32"}]
    assert not m2.fixed_batch
    static = torch.export.export(net, (x[:1],))
    torch.export.save(static, str(tmp_path / "one.pt2"))
    m3 = load_served_model(str(tmp_path / "one.pt2"))
    assert m3.fixed_batch and m3.max_batch_size == 1
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        load_served_model("nope")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_serves_an_artifact_and_drains_on_sigterm(tmp_path):
    net = nn.Linear(4, 2).eval()
    torch.jit.trace(net, torch.randn(1, 4)).save(str(tmp_path / "lin.pt"))
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "torchfast.serve", str(tmp_path / "lin.pt"), "--input-shape", "1,4",
                             "--port", str(port), "--log-level", "warning", "--threads", "1"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()
            try:
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not become ready in 60 s"
            time.sleep(0.2)
        x = torch.randn(2, 4)
        r = httpx.post(url + "/v1/models/lin/infer", json={"inputs": x.tolist()}, timeout=10)
        torch.testing.assert_close(torch.tensor(r.json()["outputs"]["output"]["data"]), net(x).detach())
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after its graceful shutdown
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_server_stop_drains_in_flight_requests():
    vec = Gated().eval()
    vec.gate.clear()
    app = create_app([ServedModel("vec", vec, (InputSpec("input", (4,)),))], max_batch_size=4, max_delay_ms=1,
                     warmup=False)
    srv = ServerThread(app).start()
    results: list = []

    def one(i):
        results.append(httpx.post(srv.url + "/v1/models/vec/infer", json={"inputs": [[float(i)] * 4]}, timeout=30))
    clients = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    for t in clients:
        t.start()
    assert vec.entered.wait(10)
    time.sleep(0.3)  # the other requests reach the queue
    stopper = threading.Thread(target=srv.stop)
    stopper.start()  # shutting down while 6 requests are accepted and unanswered
    time.sleep(0.3)
    vec.gate.set()
    for t in clients:
        t.join(30)
    stopper.join(30)
    assert sorted(r.status_code for r in results) == [200] * 6
    assert not app.state.torchfast["ready"]
