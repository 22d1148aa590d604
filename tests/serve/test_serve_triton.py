"""Triton: the generated model repository (config parsed, model.pt loaded with plain torch), and a real
Triton server via PyTriton when a Python with nvidia-pytriton is available."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from torchfast.serve.triton import TritonBatching, parse_pbtxt, write_model_repository

ROOT = Path(__file__).resolve().parents[2]


def test_model_repository_carries_our_knobs_and_loads_with_plain_torch(tmp_path):
    from torchfast.zoo.digits import DigitsCNN
    torch.manual_seed(0)
    model = DigitsCNN().eval()           # the architecture is what matters here: exactness vs the original
    images = torch.randn(17, 1, 16, 16)
    x = images[:2]
    knobs = TritonBatching(max_batch_size=32, max_delay_ms=2.5, preferred_batch_sizes=(8, 16, 32),
                           max_queue_size=128, timeout_ms=500)
    mdir = write_model_repository(model, tmp_path / "repo", x, name="digits", batching=knobs, instance_count=2)
    cfg = parse_pbtxt((mdir / "config.pbtxt").read_text())
    assert cfg["name"] == "digits" and cfg["platform"] == "pytorch_libtorch" and cfg["max_batch_size"] == 32
    assert cfg["input"] == [{"name": "INPUT__0", "data_type": "TYPE_FP32", "dims": [1, 16, 16]}]
    assert cfg["output"] == [{"name": "OUTPUT__0", "data_type": "TYPE_FP32", "dims": [10]}]
    assert cfg["instance_group"] == [{"count": 2, "kind": "KIND_CPU"}]
    db = cfg["dynamic_batching"]
    assert db["max_queue_delay_microseconds"] == 2500 and db["preferred_batch_size"] == [8, 16, 32]
    assert db["default_queue_policy"] == {"timeout_action": "REJECT", "default_timeout_microseconds": 500_000,
                                          "allow_timeout_override": True, "max_queue_size": 128}
    loaded = torch.jit.load(str(mdir / "1" / "model.pt"))  # what Triton's PyTorch backend does
    batch = images                                           # a batch size it was not traced with
    with torch.no_grad():
        torch.testing.assert_close(loaded(batch), model(batch), atol=1e-4, rtol=1e-4)


def test_repository_rejects_bad_knobs_and_inputs(tmp_path):
    with pytest.raises(ValueError, match="preferred_batch_sizes"):
        TritonBatching(max_batch_size=8, preferred_batch_sizes=(16,))
    with pytest.raises(ValueError, match="timeout_action"):
        TritonBatching(timeout_action="DROP")
    with pytest.raises(TypeError, match="positional tensors"):
        write_model_repository(nn.Linear(2, 2), tmp_path, {"x": torch.zeros(1, 2)})
    mdir = write_model_repository(nn.Embedding(10, 4), tmp_path, torch.zeros(1, 7, dtype=torch.long),
                                  name="emb", dynamic_dims=(1,))
    cfg = parse_pbtxt((mdir / "config.pbtxt").read_text())
    assert cfg["input"][0]["dims"] == [-1] and cfg["input"][0]["data_type"] == "TYPE_INT64"
    assert "preferred_batch_size" not in cfg["dynamic_batching"]


def _pytriton_python() -> str | None:
    try:
        import pytriton  # noqa: F401
        return sys.executable
    except ImportError:
        return os.environ.get("TORCHFAST_PYTRITON_PYTHON") or None


@pytest.mark.triton
@pytest.mark.timeout(180)
def test_real_triton_server_batches_a_torchfast_model():
    py = _pytriton_python()
    if py is None or not shutil.which(py) and not Path(py).exists():
        pytest.skip("nvidia-pytriton is not importable (it pins numpy<2: install it in its own venv and set "
                    "TORCHFAST_PYTRITON_PYTHON to that venv's python)")
    proc = subprocess.run([py, str(ROOT / "tests" / "serve" / "pytriton_probe.py"), str(ROOT)],
                          capture_output=True, text=True, timeout=170, cwd=str(ROOT.parent))
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("PYTRITON_RESULT ")]
    assert line, proc.stdout[-3000:] + proc.stderr[-3000:]
    found = json.loads(line[0].split(" ", 1)[1])
    assert found["proto_max_batch_size"] == 16 and found["proto_delay_us"] == 2000
    assert found["proto_preferred"] == [4, 8] and found["proto_queue"] == 64  # Triton's own schema accepts it
    assert found["answers_ok"] and found["served"] == 12
    assert max(found["batch_sizes"]) > 1  # Triton's dynamic batcher grouped the waiting requests
