"""Fuzz the HTTP API with hypothesis: a bounded number of generated requests (bodies, media types,
headers, paths; the /v1 routes and the Open Inference Protocol's /v2 ones, JSON and binary), none may
get a 5xx. The server runs on 127.0.0.1 and is stopped at the end."""
from __future__ import annotations

import gzip
import io
import json
import os
import string
from collections import Counter

import httpx
import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.extra import numpy as hnp  # noqa: E402

from torchfast.serve.collate import SequencePadding  # noqa: E402
from torchfast.serve.http import ServerThread, create_app  # noqa: E402
from torchfast.serve.model import InputSpec, ServedModel  # noqa: E402

pytestmark = pytest.mark.timeout(300)
EXAMPLES = int(os.environ.get("TORCHFAST_FUZZ_EXAMPLES", "150"))   # benchmarks/RESULTS.md ran 2,000
CODES: Counter = Counter()


class Sum(nn.Module):
    """Answers any request that passes the declared inputs (whatever the values: inf, nan, huge)."""

    def forward(self, ids, mask):
        return {"total": (ids.float() * mask).sum(-1, keepdim=True), "first": ids[:, :1]}


class Affine(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 2)

    def forward(self, x):
        return self.lin(x)


@pytest.fixture(scope="module")
def client():
    models = [ServedModel("vec", Affine().eval(), (InputSpec("input", (4,)),)),
              ServedModel("pair", Sum(), (InputSpec("ids", (-1,), "int32", (64,)),
                                          InputSpec("mask", (-1,), "float32", (64,))), keyword_inputs=True,
                          sequence=SequencePadding(dims={"ids": 1, "mask": 1}, output_dims=None))]
    app = create_app(models, max_batch_size=8, max_delay_ms=1, max_queue_size=1024, timeout_ms=30_000,
                     max_body_bytes=1 << 20, body_timeout_s=5, max_priority=2)
    with ServerThread(app) as srv:
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            yield c
    print(f"\nfuzz: {sum(CODES.values())} requests, status codes {dict(sorted(CODES.items(), key=str))}")


json_leaf = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
                      st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=5))
json_value = st.recursive(json_leaf, lambda kids: st.one_of(st.lists(kids, max_size=5),
                                                            st.dictionaries(st.text(max_size=6), kids, max_size=4)),
                          max_leaves=40)
rows4 = st.lists(st.lists(st.floats(width=32, allow_nan=False, allow_infinity=False), min_size=4, max_size=4),
                 min_size=1, max_size=9)
ragged = st.lists(st.lists(st.integers(-300, 2**40), min_size=0, max_size=70), min_size=0, max_size=9)
json_doc = st.one_of(
    json_value,
    st.fixed_dictionaries({"inputs": st.one_of(json_value, rows4, ragged)}),
    st.fixed_dictionaries({"inputs": st.fixed_dictionaries({"ids": ragged, "mask": ragged})}),
    st.fixed_dictionaries({"inputs": st.dictionaries(st.sampled_from(["ids", "mask", "input", "x"]),
                                                     st.one_of(ragged, json_value), max_size=3)}),
)
dtypes = st.one_of(hnp.scalar_dtypes(), hnp.byte_string_dtypes(), hnp.unicode_string_dtypes(),
                   hnp.array_dtypes(max_size=2), st.sampled_from([np.dtype(">f4"), np.dtype(">i8"), np.dtype("<f2")]))
arrays = dtypes.flatmap(lambda dt: hnp.arrays(dt, hnp.array_shapes(min_dims=0, max_dims=3, max_side=5)))
header_text = st.text(alphabet=string.printable.strip() + " ", max_size=30).map(str.strip)  # legal header values


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


@st.composite
def requests(draw):
    path = draw(st.sampled_from(["/v1/models/vec/infer", "/v1/models/pair/infer", "/v1/models/nope/infer",
                                 "/v1/models/vec", "/v1/models", "/healthz", "/readyz", "/metrics"]))
    kind = draw(st.sampled_from(["json", "json", "npy", "safetensors", "bytes"]))
    if kind == "json":
        body = json.dumps(draw(json_doc)).encode()
        ctype = draw(st.sampled_from(["application/json", "", "application/json; charset=utf-8"]))
    elif kind == "npy":
        body = _npy(draw(arrays))
        ctype = draw(st.sampled_from(["application/x-npy", "application/octet-stream"]))
    elif kind == "safetensors":
        from safetensors.torch import save
        n = draw(st.integers(1, 9))
        length = draw(st.integers(1, 70))
        body = save({"ids": torch.randint(-5, 5, (n, length), dtype=draw(st.sampled_from([torch.int32, torch.int64]))),
                     "mask": torch.ones(n, draw(st.sampled_from([length, length + 1])))})
        ctype = "application/x-safetensors"
    else:
        body = draw(st.binary(max_size=200))
        ctype = draw(st.one_of(st.sampled_from(["application/json", "application/x-npy", "text/plain"]), header_text))
    headers = {"content-type": ctype} if ctype else {}
    for h in ("x-priority", "x-timeout-ms", "x-request-id", "accept"):
        if draw(st.booleans()):
            headers[h] = draw(st.one_of(header_text, st.integers(-10**6, 10**6).map(str)))
    return path, body, headers


@settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(req=requests())
def test_fuzzed_requests_never_get_a_5xx(client, req):
    path, body, headers = req
    if path.endswith("/infer"):
        r = client.post(path, content=body, headers=headers)
    else:
        r = client.get(path)
    CODES[r.status_code] += 1
    assert r.status_code < 500, (path, headers, body[:200], r.status_code, r.text[:300])
    if r.status_code >= 400:
        assert "error" in r.json()


V2_DATATYPES = ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32",
                "FP64", "BF16", "BYTES"]
shapes = st.one_of(st.lists(st.integers(0, 9), max_size=4), st.lists(st.integers(-3, 2**62), max_size=3), json_value)
numbers = st.lists(st.one_of(st.floats(width=32), st.integers(-(2**65), 2**65), st.booleans(), st.text(max_size=3)),
                   max_size=40)


@st.composite
def v2_tensor(draw):
    t = {"name": draw(st.sampled_from(["input", "ids", "mask", "text", "x", ""])),
         "shape": draw(shapes), "datatype": draw(st.one_of(st.sampled_from(V2_DATATYPES), st.text(max_size=5)))}
    if draw(st.booleans()):
        t["data"] = draw(st.one_of(numbers, ragged, rows4, json_value))
    else:
        t["parameters"] = {"binary_data_size": draw(st.one_of(st.integers(-2, 64), json_value))}
    for k in draw(st.lists(st.sampled_from(["name", "shape", "datatype"]), max_size=1)):
        del t[k]
    return t


@st.composite
def v2_near_valid(draw):
    """A well-formed request for vec or pair (JSON or binary tensors), with at most one field spoiled."""
    model = draw(st.sampled_from(["vec", "pair"]))
    rows = draw(st.integers(0, 9))
    if model == "vec":
        arrays = {"input": (np.asarray(draw(hnp.arrays(np.float32, (rows, 4)))), "FP32")}
    else:
        length = draw(st.integers(1, 70))
        arrays = {"ids": (np.asarray(draw(hnp.arrays(np.int32, (rows, length)))), "INT32"),
                  "mask": (np.ones((rows, draw(st.sampled_from([length, length + 1]))), np.float32), "FP32")}
    inputs, blobs = [], []
    for name, (a, dt) in arrays.items():
        t = {"name": name, "shape": list(a.shape), "datatype": dt}
        if draw(st.booleans()):
            raw = a.astype(a.dtype.newbyteorder("<")).tobytes()
            t["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            t["data"] = [None if isinstance(v, float) and not np.isfinite(v) else v for v in a.reshape(-1).tolist()]
        inputs.append(t)
    spoil = draw(st.sampled_from([None, None, "shape", "datatype", "name", "size"]))
    if spoil == "shape":
        inputs[0]["shape"] = draw(st.lists(st.integers(0, 9), max_size=3))
    elif spoil == "datatype":
        inputs[0]["datatype"] = draw(st.sampled_from(V2_DATATYPES))
    elif spoil == "name":
        inputs[0]["name"] = draw(st.sampled_from(["input", "ids", "mask", "text"]))
    elif spoil == "size" and "parameters" in inputs[0]:
        inputs[0]["parameters"]["binary_data_size"] += draw(st.integers(-3, 3))
    doc = {"id": draw(st.text(max_size=8)), "inputs": inputs,
           "parameters": {"binary_data_output": draw(st.booleans()), "priority": draw(st.integers(0, 4)),
                          "timeout": draw(st.integers(10**7, 10**8))}}  # 10-100 s: a 504 here would be a fault
    head = json.dumps(doc).encode()
    headers = {"inference-header-content-length": str(len(head))} if blobs else {}
    return f"/v2/models/{model}/infer", head + b"".join(blobs), headers


@st.composite
def v2_requests(draw):
    path = draw(st.sampled_from(["/v2/models/vec/infer", "/v2/models/pair/infer", "/v2/models/vec/versions/1/infer",
                                 "/v2/models/vec/versions/x/infer", "/v2/models/nope/infer", "/v2", "/v2/health/live",
                                 "/v2/health/ready", "/v2/models/pair", "/v2/models/vec/ready",
                                 "/v2/models/pair/versions/1/config"]))
    doc: dict = {"inputs": draw(st.lists(v2_tensor(), max_size=3))}
    if draw(st.booleans()):
        doc["parameters"] = draw(st.dictionaries(st.sampled_from(["timeout", "priority", "binary_data_output", "x"]),
                                                 json_leaf, max_size=3))
    if draw(st.booleans()):
        doc["outputs"] = draw(st.one_of(json_value, st.lists(st.fixed_dictionaries(
            {"name": st.sampled_from(["output", "total", "first", "nope"]),
             "parameters": st.dictionaries(st.sampled_from(["binary_data", "classification"]), json_leaf)}),
            max_size=2)))
    if draw(st.integers(0, 9)) == 0:
        doc = draw(json_value)
    head = json.dumps(doc).encode()
    blob = draw(st.one_of(st.just(b""), st.binary(max_size=80),
                          st.just(np.arange(4, dtype="<f4").tobytes()), st.just(np.arange(8, dtype="<i4").tobytes())))
    headers = {"content-type": "application/octet-stream" if blob else "application/json"}
    if blob or draw(st.booleans()):
        headers["inference-header-content-length"] = draw(st.one_of(
            st.just(str(len(head))), st.integers(-5, len(head) + len(blob) + 5).map(str), header_text))
    body = head + blob
    if draw(st.integers(0, 9)) == 0:
        headers["content-encoding"] = draw(st.sampled_from(["gzip", "deflate", "br"]))
        body = gzip.compress(body) if draw(st.booleans()) else body
    return path, body, headers


@settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(req=st.one_of(v2_requests(), v2_near_valid()))
def test_fuzzed_v2_requests_never_get_a_5xx(client, req):
    path, body, headers = req
    if path.endswith("/infer"):
        r = client.post(path, content=body, headers=headers)
    else:
        r = client.get(path)
    CODES[f"v2 {r.status_code}"] += 1
    assert r.status_code < 500, (path, headers, body[:300], r.status_code, r.text[:300])
    if r.status_code >= 400:
        assert "error" in r.json()
