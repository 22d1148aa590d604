"""Fuzz the HTTP API with hypothesis: a bounded number of generated requests (bodies, media types,
headers, paths), none may get a 5xx. The server runs on 127.0.0.1 and is stopped at the end."""
from __future__ import annotations

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
    print(f"\nfuzz: {sum(CODES.values())} requests, status codes {dict(sorted(CODES.items()))}")


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
