"""Saved ONNX (.onnx) and OpenVINO IR (.xml) artifacts load and serve: the artifact declares its inputs
(names, per-row shapes, dtypes, dynamic batch), so ``torchfast serve model.onnx`` needs no --input-shape,
and answers match the original model."""
from __future__ import annotations

import httpx
import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

import torchfast as tf  # noqa: E402
from torchfast.cli import FORMATS, main  # noqa: E402
from torchfast.export import FORMATS as EXPORT_FORMATS  # noqa: E402
from torchfast.serve.http import ServerThread, create_app  # noqa: E402
from torchfast.serve.model import load_served_model  # noqa: E402

pytestmark = pytest.mark.timeout(300)

ENGINES = [pytest.param("onnx", ".onnx", "onnxruntime", id="onnx"),
           pytest.param("openvino", ".xml", "openvino", id="openvino")]


def _need(package: str) -> None:
    pytest.importorskip(package, reason=f"{package} is not installed (pip install 'torchfast[{package}]')")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).mean((2, 3)))


class TokenNet(nn.Module):
    """Takes keyword token inputs with a dynamic sequence length, returns a dict (as encoders do)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(50, 16)
        self.out = nn.Linear(16, 4)

    def forward(self, input_ids, attention_mask):
        h = self.emb(input_ids) * attention_mask.unsqueeze(-1).float()
        return {"pooled": self.out(h.sum(1) / attention_mask.sum(1, keepdim=True).clamp(min=1).float())}


def _serve(served):
    return ServerThread(create_app([served], max_batch_size=8, max_delay_ms=2, timeout_ms=30_000))


@pytest.mark.parametrize("fmt, suffix, package", ENGINES)
def test_cnn_artifact_declares_its_inputs_and_serves(fmt, suffix, package, tmp_path):
    _need(package)
    net = Net().eval()
    x = torch.randn(2, 3, 8, 8)
    c = tf.compile(net, x, backend=package, dynamic_batch=True)
    path = tmp_path / f"net{suffix}"
    tf.save(c, str(path))
    served = load_served_model(str(path))
    assert [(s.name, s.shape, s.dtype) for s in served.inputs] == [("x", (3, 8, 8), "float32")]
    assert served.max_batch_size is None and not served.keyword_inputs     # dynamic batch
    rows = torch.randn(3, 3, 8, 8)
    with _serve(served) as srv, httpx.Client(base_url=srv.url, timeout=60) as cl:
        meta = cl.get(f"/v1/models/{served.name}").json()
        assert meta["inputs"] == [{"name": "x", "shape": [-1, 3, 8, 8], "dtype": "float32"}]
        r = cl.post(f"/v1/models/{served.name}/infer", json={"inputs": rows.tolist()})
        assert r.status_code == 200, r.text
        got = torch.tensor(r.json()["outputs"]["output"]["data"])
        torch.testing.assert_close(got, net(rows).detach(), atol=1e-4, rtol=1e-4)
        bad = cl.post(f"/v1/models/{served.name}/infer", json={"inputs": [[[1.0] * 8] * 8]})
        assert bad.status_code == 422 and "must have shape" in bad.json()["error"]


@pytest.mark.parametrize("fmt, suffix, package", ENGINES)
def test_fixed_batch_artifact_is_served_at_its_batch_size(fmt, suffix, package, tmp_path):
    _need(package)
    net = Net().eval()
    c = tf.compile(net, torch.randn(4, 3, 8, 8), backend=package)          # static shapes: batch 4 only
    path = tmp_path / f"fixed{suffix}"
    tf.save(c, str(path))
    served = load_served_model(str(path))
    assert served.max_batch_size == 4 and served.fixed_batch
    rows = torch.randn(1, 3, 8, 8)
    with _serve(served) as srv, httpx.Client(base_url=srv.url, timeout=60) as cl:
        r = cl.post(f"/v1/models/{served.name}/infer", json={"inputs": rows.tolist()})
        assert r.status_code == 200, r.text
        got = torch.tensor(r.json()["outputs"]["output"]["data"])
        torch.testing.assert_close(got, net(rows).detach(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("fmt, suffix, package", ENGINES)
def test_keyword_token_artifact_serves_dict_outputs(fmt, suffix, package, tmp_path):
    _need(package)
    net = TokenNet().eval()
    ids = torch.randint(1, 50, (2, 6))
    mask = torch.ones_like(ids)
    c = tf.compile(net, {"input_ids": ids, "attention_mask": mask}, backend=package, dynamic_batch=True)
    path = tmp_path / f"tok{suffix}"
    tf.save(c, str(path))
    served = load_served_model(str(path))
    assert [(s.name, s.dtype) for s in served.inputs] == [("input_ids", "int64"), ("attention_mask", "int64")]
    q_ids, q_mask = torch.randint(1, 50, (3, 6)), torch.tensor([[1] * 6, [1] * 3 + [0] * 3, [1] * 6])
    with _serve(served) as srv, httpx.Client(base_url=srv.url, timeout=60) as cl:
        r = cl.post(f"/v1/models/{served.name}/infer",
                    json={"inputs": {"input_ids": q_ids.tolist(), "attention_mask": q_mask.tolist()}})
        assert r.status_code == 200, r.text
        got = torch.tensor(r.json()["outputs"]["pooled"]["data"])
        torch.testing.assert_close(got, net(q_ids, q_mask)["pooled"].detach(), atol=1e-4, rtol=1e-4)


def test_cli_formats_match_the_library():
    assert FORMATS == EXPORT_FORMATS


@pytest.mark.parametrize("fmt, suffix, package", ENGINES)
def test_cli_export_writes_an_engine_artifact_that_reproduces_the_model(fmt, suffix, package, tmp_path, capsys):
    _need(package)
    out = tmp_path / f"r18{suffix}"
    rc = main(["export", "torchvision:resnet18", "--input-shape", "1,3,64,64", "--format", fmt, "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert f"saved {fmt} artifact" in text and out.is_file()
    served = load_served_model(str(out))
    assert served.inputs[0].shape == (3, 64, 64)
    y = served.model(torch.zeros(1, 3, 64, 64))
    assert tuple(y.shape) == (1, 1000) and np.isfinite(y.numpy()).all()
