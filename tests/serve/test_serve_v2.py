"""The Open Inference Protocol (KServe v2) with the real Triton client (tritonclient[http]) against our
server on 127.0.0.1 (free port, bounded, stopped): health, metadata, JSON and binary tensors of every
datatype, BYTES texts, errors, deadlines, priorities and the same batchers and metrics as /v1."""
from __future__ import annotations

import json
import os
import signal
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
httpclient = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

from torchfast.serve.collate import SequencePadding  # noqa: E402
from torchfast.serve.http import ServerThread, _v2_priority, create_app  # noqa: E402
from torchfast.serve.model import InputSpec, ServedModel  # noqa: E402

pytestmark = pytest.mark.timeout(120)
ROOT = Path(__file__).resolve().parents[2]


class Gated(nn.Module):
    """Linear(4, 3) that waits for its gate and records the first value of every row it computes."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(4, 3)
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.seen: list[float] = []

    def forward(self, x):
        self.entered.set()
        assert self.gate.wait(30)
        self.seen.extend(x[:, 0].tolist())
        return self.lin(x)


class Kinds(nn.Module):
    """One input and one output per datatype, so every datatype travels both ways."""

    def forward(self, u8, i32, i64, f16, bf16, f64, flag):
        return {"u8": u8 + 1, "i32": i32 * 3, "i64": i64 - 7, "f16": f16 * 2, "bf16": bf16 * 2, "f64": f64 / 4,
                "flag": ~flag}


class CharTokenizer:
    """A tokenizer as transformers' are called: texts -> padded input_ids + attention_mask."""

    def __call__(self, texts, padding=True, truncation=True, max_length=None, return_tensors="pt"):
        ids = [[ord(c) % 97 + 1 for c in t][:max_length] or [1] for t in texts]
        n = max(len(i) for i in ids)
        return {"input_ids": torch.tensor([i + [0] * (n - len(i)) for i in ids]),
                "attention_mask": torch.tensor([[1] * len(i) + [0] * (n - len(i)) for i in ids])}


class Lengths(nn.Module):
    def forward(self, input_ids, attention_mask):
        return {"length": attention_mask.sum(-1, keepdim=True), "checksum": (input_ids * attention_mask).sum(-1)}


KINDS = [("u8", "uint8", "UINT8"), ("i32", "int32", "INT32"), ("i64", "int64", "INT64"), ("f16", "float16", "FP16"),
         ("bf16", "bfloat16", "BF16"), ("f64", "float64", "FP64"), ("flag", "bool", "BOOL")]


@pytest.fixture(scope="module")
def server():
    vec = Gated().eval()
    models = [ServedModel("vec", vec, (InputSpec("input", (4,)),), knobs={"max_batch_size": 4}),
              ServedModel("kinds", Kinds(), tuple(InputSpec(n, (2,), dt) for n, dt, _ in KINDS)),
              ServedModel("text", Lengths(), (InputSpec("input_ids", (-1,), "int64", (16,)),
                                              InputSpec("attention_mask", (-1,), "int64", (16,))),
                          keyword_inputs=True, tokenizer=CharTokenizer(),
                          sequence=SequencePadding(dims={"input_ids": 1, "attention_mask": 1}, output_dims=None))]
    app = create_app(models, max_batch_size=8, max_delay_ms=2, max_queue_size=2, timeout_ms=20_000,
                     max_body_bytes=4096, max_priority=2)
    with ServerThread(app) as srv:
        client = httpclient.InferenceServerClient(srv.url.removeprefix("http://"), network_timeout=30)
        try:
            yield srv, client, vec, app
        finally:
            client.close()


def _input(name, array, datatype, binary):
    i = httpclient.InferInput(name, list(array.shape), datatype)
    i.set_data_from_numpy(array, binary_data=binary)
    return i


def _vec_input(x, binary=True):
    return _input("input", x, "FP32", binary)


def test_health_and_metadata(server):
    _, c, _, _ = server
    assert c.is_server_live() and c.is_server_ready()
    assert c.is_model_ready("vec") and c.is_model_ready("vec", "1")
    assert not c.is_model_ready("vec", "2") and not c.is_model_ready("nope")
    meta = c.get_server_metadata()
    assert meta["name"] == "torchfast" and "binary_tensor_data" in meta["extensions"]
    vec = c.get_model_metadata("vec")
    assert vec["versions"] == ["1"] and vec["platform"] == "pytorch"
    assert vec["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 4]}]
    assert vec["outputs"] == [{"name": "output", "datatype": "FP32", "shape": [-1, 3]}]
    assert c.get_model_metadata("vec", "1") == vec
    kinds = c.get_model_metadata("kinds")
    assert [(i["name"], i["datatype"]) for i in kinds["inputs"]] == [(n, v2) for n, _, v2 in KINDS]
    assert [(o["name"], o["datatype"], o["shape"]) for o in kinds["outputs"]] == [(n, v2, [-1, 2]) for n, _, v2 in KINDS]
    text = c.get_model_metadata("text")
    assert text["inputs"][0] == {"name": "input_ids", "datatype": "INT64", "shape": [-1, -1]}
    assert text["parameters"]["text_input"]["datatype"] == "BYTES"
    assert [(o["name"], o["shape"]) for o in text["outputs"]] == [("length", [-1, 1]), ("checksum", [-1])]
    cfg = c.get_model_config("vec")
    assert cfg["max_batch_size"] == 4 and cfg["input"] == [{"name": "input", "data_type": "TYPE_FP32", "dims": [4]}]
    for call in (lambda: c.get_model_metadata("nope"), lambda: c.get_model_metadata("vec", "7")):
        with pytest.raises(InferenceServerException) as e:
            call()
        assert e.value.status() == "404"
    srv = server[0]
    r = httpx.get(srv.url + "/v2/models/vec/infer")  # a wrong method or path answers in the same shape
    assert r.status_code == 405 and "GET /v2/models/vec/infer" in r.json()["error"]
    assert "error" in httpx.get(srv.url + "/v2/nothing").json()


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_every_datatype_round_trips(server, binary):
    _, c, _, _ = server
    rng = np.random.default_rng(0)
    import ml_dtypes
    arrays = {"u8": np.array([[0, 254], [7, 9]], np.uint8), "i32": np.array([[-5, 2**30], [1, 2]], np.int32),
              "i64": np.array([[2**40, -3], [0, 1]], np.int64), "f16": rng.standard_normal((2, 2)).astype(np.float16),
              "bf16": np.array([[1.5, -2.0], [0.25, 8.0]], ml_dtypes.bfloat16),
              "f64": rng.standard_normal((2, 2)), "flag": np.array([[True, False], [False, False]])}
    inputs = [_input(n, arrays[n], v2, binary or v2 == "BF16") for n, _, v2 in KINDS]  # the client sends BF16 binary
    outputs = [httpclient.InferRequestedOutput(n, binary_data=binary) for n, _, _ in KINDS]
    r = c.infer("kinds", inputs, outputs=outputs)
    want = {"u8": arrays["u8"] + 1, "i32": arrays["i32"] * 3, "i64": arrays["i64"] - 7, "f16": arrays["f16"] * 2,
            "bf16": (arrays["bf16"].astype(np.float32) * 2), "f64": arrays["f64"] / 4, "flag": ~arrays["flag"]}
    for n, _, v2 in KINDS:
        got = r.as_numpy(n)
        assert r.get_output(n)["datatype"] == v2 and got.shape == (2, 2)
        np.testing.assert_array_equal(got.astype(np.float64) if n == "bf16" else got,
                                      want[n].astype(np.float64) if n == "bf16" else want[n])


def test_answers_match_the_model_json_binary_and_mixed(server):
    _, c, vec, _ = server
    x = np.random.default_rng(1).standard_normal((3, 4)).astype(np.float32)
    want = vec.lin(torch.from_numpy(x)).detach().numpy()
    for binary_in in (False, True):
        for binary_out in (False, True):
            r = c.infer("vec", [_vec_input(x, binary_in)], request_id=f"req-{binary_in}-{binary_out}",
                        outputs=[httpclient.InferRequestedOutput("output", binary_data=binary_out)])
            np.testing.assert_allclose(r.as_numpy("output"), want, rtol=1e-5, atol=1e-6)
            resp = r.get_response()
            assert resp["id"] == f"req-{binary_in}-{binary_out}" and resp["model_name"] == "vec"
            assert resp["model_version"] == "1"
            assert ("binary_data_size" in resp["outputs"][0].get("parameters", {})) == binary_out
    r = c.infer("vec", [_vec_input(x)], model_version="1", request_compression_algorithm="gzip")
    np.testing.assert_allclose(r.as_numpy("output"), want, rtol=1e-5, atol=1e-6)  # no outputs named: all, binary


def test_bytes_texts_are_tokenized_on_the_server(server):
    _, c, _, _ = server
    texts = np.array(["hi", "hello there", "é"], dtype=object)
    for binary in (False, True):
        r = c.infer("text", [_input("text", texts, "BYTES", binary)])
        assert r.as_numpy("length").reshape(-1).tolist() == [2, 11, 1]
        tok = CharTokenizer()(["hello there"])
        assert r.as_numpy("checksum")[1] == int(tok["input_ids"].sum())
    with pytest.raises(InferenceServerException) as e:  # a tensor model takes no texts: both datatypes named
        c.infer("vec", [_input("input", np.array([b"abcd"], dtype=object), "BYTES", True)])
    assert e.value.status() == "400" and "FP32" in e.value.message() and "BYTES" in e.value.message()


def _post(srv, doc, path="/v2/models/vec/infer", **kw):
    return httpx.post(srv.url + path, content=json.dumps(doc) if not isinstance(doc, bytes) else doc, timeout=30, **kw)


def _doc(**inp):
    return {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4], **inp}]}


@pytest.mark.parametrize("doc,status,needles", [
    (_doc(datatype="FP8"), 400, ["'FP8'", "FP32"]),
    (_doc(datatype="INT64"), 400, ["declares datatype FP32", "sends INT64"]),
    (_doc(shape=[1, 3]), 400, ["holds 3 values", "has 4"]),
    (_doc(shape=[2, 2]), 422, ["must have shape [batch, 4], got [2, 2]"]),
    (_doc(shape=[9, 4], data=[0.0] * 36), 422, ["more than max_batch_size"]),
    (_doc(name="other"), 422, ["unknown input"]),
    (_doc(name="text", datatype="BYTES", data=["a"], shape=[1]), 422, ["unknown input", "'input'"]),
    (_doc(data=[1, 2, "x", 4]), 422, ["rectangular array of numbers"]),
    ({"inputs": []}, 400, ['"inputs"']),
    (b"{nope", 400, ["not valid JSON"]),
    ({**_doc(), "parameters": {"timeout": -1}}, 400, ["parameters.timeout"]),
    ({**_doc(), "outputs": [{"name": "nope"}]}, 400, ["unknown output", "'output'"]),
    ({**_doc(), "outputs": [{"name": "output", "parameters": {"classification": 3}}]}, 400, ["classification"]),
    (_doc(parameters={"shared_memory_region": "r"}), 400, ["shared memory"]),
    (_doc(parameters={"binary_data_size": 16}), 400, ["binary_data_size"]),
    (_doc(data=[[0.0] * 4] * 200, shape=[200, 4]), 413, ["exceeds the limit"]),
])
def test_bad_requests_get_clear_errors(server, doc, status, needles):
    srv, _, _, _ = server
    r = _post(srv, doc)
    assert r.status_code == status, r.text
    for n in needles:
        assert n in r.json()["error"]


def test_binary_framing_errors(server):
    srv, _, _, _ = server
    head = json.dumps({"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32",
                                   "parameters": {"binary_data_size": 16}}]}).encode()
    raw = np.arange(4, dtype="<f4").tobytes()
    ok = _post(srv, head + raw, headers={"Inference-Header-Content-Length": str(len(head))})
    assert ok.status_code == 200 and ok.headers["content-type"] == "application/json"
    for body, length, needle in [(head + raw + b"xx", len(head), "belong to no input"),
                                 (head + raw[:8], len(head), "binary_data_size 16"),
                                 (head + raw, len(head) + 999, "Inference-Header-Content-Length"),
                                 (head + raw, "abc", "Inference-Header-Content-Length")]:
        r = _post(srv, body, headers={"Inference-Header-Content-Length": str(length)})
        assert r.status_code == 400 and needle in r.json()["error"], r.text


def test_queue_full_is_503_timeout_is_504_and_priority_orders_the_queue(server):
    srv, c, vec, app = server
    vec.gate.clear()
    vec.entered.clear()
    vec.seen.clear()
    results: dict = {}

    def post(key, value, **params):
        doc = {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [value, 0, 0, 0]}]}
        if params:
            doc["parameters"] = params
        results[key] = _post(srv, doc)
    threads = [threading.Thread(target=post, args=("first", 1.0))]
    try:
        threads[0].start()
        assert vec.entered.wait(10)
        b = app.state.torchfast["batchers"]["vec"]
        for key, value, params in [("default", 2.0, {}), ("urgent", 3.0, {"priority": 1})]:
            threads.append(threading.Thread(target=post, args=(key, value), kwargs=params))
            threads[-1].start()
            deadline = time.monotonic() + 10
            while b.queue_depth() < len(threads) - 1 and time.monotonic() < deadline:
                time.sleep(0.01)
        assert b.queue_depth() == 2
        with pytest.raises(InferenceServerException) as e:  # 1 running + 2 queued: full
            c.infer("vec", [_vec_input(np.zeros((1, 4), np.float32))])
        assert e.value.status() == "503" and "queue is full" in e.value.message()
    finally:
        vec.gate.set()
        for t in threads:
            t.join(30)
    assert {k: r.status_code for k, r in results.items()} == {"first": 200, "default": 200, "urgent": 200}
    assert vec.seen[-3:] == [1.0, 3.0, 2.0]  # Triton's level 1 ran before the default level
    vec.gate.clear()
    vec.entered.clear()
    t = threading.Thread(target=post, args=("first", 1.0))
    try:
        t.start()
        assert vec.entered.wait(10)
        with pytest.raises(InferenceServerException) as e:
            c.infer("vec", [_vec_input(np.zeros((1, 4), np.float32))], timeout=30_000)  # microseconds
        assert e.value.status() == "504" and "timed out" in e.value.message()
    finally:
        vec.gate.set()
        t.join(30)


def test_triton_priority_levels_on_our_scale():
    assert [_v2_priority(level, 2) for level in (0, 1, 2, 3, 4)] == [0, 2, 1, 0, -1]
    assert [_v2_priority(level, 0) for level in (0, 1, 2)] == [0, 0, -1]  # no client jumps the default queue


def test_v2_requests_share_the_batcher_and_its_metrics(server):
    srv, c, _, app = server
    b = app.state.torchfast["batchers"]["vec"]
    before = b.snapshot()["ok"]
    for _ in range(3):
        c.infer("vec", [_vec_input(np.ones((1, 4), np.float32))])
    assert b.snapshot()["ok"] == before + 3
    text = httpx.get(srv.url + "/metrics").text
    assert 'torchfast_batcher_requests_total{model="vec",outcome="ok"}' in text


def test_cli_serves_an_exported_program_over_v2(tmp_path):
    net = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2)).eval()
    x = torch.randn(3, 6)
    ep = torch.export.export(net, (x,), dynamic_shapes=({0: torch.export.Dim("batch", max=1024)},))
    torch.export.save(ep, str(tmp_path / "net.pt2"))
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "torchfast.serve", str(tmp_path / "net.pt2"), "--port", str(port),
                             "--log-level", "warning", "--threads", "1"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        c = httpclient.InferenceServerClient(f"127.0.0.1:{port}", network_timeout=10)
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()
            try:
                if c.is_server_ready():
                    break
            except Exception:  # noqa: BLE001 - not listening yet
                pass
            assert time.monotonic() < deadline, "server did not become ready in 60 s"
            time.sleep(0.2)
        meta = c.get_model_metadata("net")
        assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 6]}]
        r = c.infer("net", [_input(meta["inputs"][0]["name"], x.numpy(), "FP32", True)])
        np.testing.assert_allclose(r.as_numpy(meta["outputs"][0]["name"]), net(x).detach().numpy(), rtol=1e-5,
                                   atol=1e-6)
        c.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
