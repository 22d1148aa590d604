"""A saved artifact serves with no flags: `torchfast serve m.pt` reads the signature tf.save recorded.
Servers are subprocesses on 127.0.0.1 (free port), bounded in time and stopped."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

import torchfast as tf  # noqa: E402

pytestmark = pytest.mark.timeout(120)
ROOT = Path(__file__).resolve().parents[2]


class TokenNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(50, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, input_ids, attention_mask):
        h = self.emb(input_ids) * attention_mask.unsqueeze(-1).float()
        return {"pooled": self.out(h.sum(1))}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(*argv: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen([sys.executable, "-m", "torchfast", "serve", *argv, "--log-level", "warning",
                             "--threads", "1"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _wait_ready(proc: subprocess.Popen, url: str) -> None:
    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None, proc.stdout.read().decode()
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "server did not become ready in 60 s"
        time.sleep(0.2)


def test_saved_artifact_serves_with_no_flags(tmp_path):
    net = TokenNet().eval()
    ids = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(0))
    example = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    path = tf.save(net, tmp_path / "tok.pt", example_inputs=example)
    port = _free_port()
    proc = _serve(str(path), "--port", str(port))
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_ready(proc, url)
        meta = httpx.get(url + "/v1/models/tok", timeout=10).json()
        assert [(i["name"], i["shape"], i["dtype"]) for i in meta["inputs"]] == \
            [("input_ids", [-1, 6], "int64"), ("attention_mask", [-1, 6], "int64")]
        assert meta["outputs"] == ["pooled"]
        q = torch.randint(0, 50, (3, 6), generator=torch.Generator().manual_seed(1))   # 3 rows: any batch
        mask = torch.ones_like(q)
        r = httpx.post(url + "/v1/models/tok/infer",
                       json={"inputs": {"input_ids": q.tolist(), "attention_mask": mask.tolist()}}, timeout=30)
        assert r.status_code == 200, r.text
        torch.testing.assert_close(torch.tensor(r.json()["outputs"]["pooled"]["data"]),
                                   net(q, mask)["pooled"].detach(), atol=1e-5, rtol=1e-5)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def test_artifact_without_signature_exits_with_the_fix(tmp_path, capsys):
    from torchfast.cli import main
    net = nn.Linear(4, 2).eval()
    torch.jit.trace(net, torch.randn(1, 4)).save(str(tmp_path / "plain.pt"))
    for argv, needle in [((), "does not declare its inputs"),
                         (("--input-shape", "4"), "takes it as one row, so pass --input-shape 1,4"),
                         (("--input-shape", "4,x"), "expected integers like 1,3,224,224")]:
        assert main(["serve", str(tmp_path / "plain.pt"), *argv]) == 2   # before any server starts
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err, err
