"""The xla backend on a real torch_xla runtime (``make test-xla``: torch 2.9.1 + torch_xla 2.9.0, PJRT_DEVICE=CPU).

On the CPU PJRT device torch_xla really lowers, compiles and executes the graph, so these tests check the
code path end to end (device placement, openxla compile, sync, outputs) — not TPU speed.
"""
from __future__ import annotations

import os

import pytest
import torch
from torch import nn

torch_xla = pytest.importorskip("torch_xla", reason="torch_xla is not installed here; run `make test-xla`")

import torchfast  # noqa: E402
from torchfast.backends import BackendError  # noqa: E402


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(1))
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


def _model():
    torch.manual_seed(0)
    m = SmallCNN().eval()
    with torch.no_grad():  # non-trivial BN statistics
        m.features[1].running_mean.uniform_(-0.5, 0.5)
        m.features[1].running_var.uniform_(0.5, 2.0)
    return m


@pytest.mark.parametrize("mode", ["compile", "lazy"])
def test_xla_matches_cpu_eager(mode):
    assert os.environ.get("PJRT_DEVICE"), "run with PJRT_DEVICE set (make test-xla sets CPU)"
    model = _model()
    x = torch.randn(4, 1, 16, 16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fast = torchfast.compile(model, x, backend="xla", mode=mode)
    assert fast.device.type == "xla"
    assert fast.report.summary["pjrt_device"] == os.environ["PJRT_DEVICE"]
    out = fast(x)                       # CPU input: moved to the XLA device by the wrapper
    assert out.device.type == "xla"
    ref = model(x)
    torch.testing.assert_close(out.cpu(), ref, atol=1e-5, rtol=1e-5)
    # the user's model stayed on the CPU, unchanged
    assert all(t.device.type == "cpu" for t in model.state_dict().values())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # a second input of the same shape reuses the compiled program and is still right
    x2 = torch.randn(4, 1, 16, 16)
    torch.testing.assert_close(fast(x2).cpu(), model(x2), atol=1e-5, rtol=1e-5)


def test_xla_refuses_dynamic_batch_before_work():
    with pytest.raises(BackendError, match="dynamic batch"):
        torchfast.compile(_model(), torch.randn(2, 1, 16, 16), backend="xla", dynamic_batch=True)


def test_xla_refuses_fp16():
    with pytest.raises(BackendError, match="fp16"):
        torchfast.compile(_model(), torch.randn(2, 1, 16, 16), backend="xla", dtype="fp16")


def test_deploy_xla_script_end_to_end(tmp_path):
    """scripts/deploy_xla.py: compile on the PJRT device, smoke test vs CPU eager, ExportedProgram + StableHLO."""
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[2]
    (tmp_path / "mk.py").write_text(
        "import torch\nfrom torch import nn\n"
        "def make():\n    torch.manual_seed(0)\n"
        "    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),\n"
        "                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)).eval()\n")
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, str(root / "scripts/deploy_xla.py"), f"{tmp_path / 'mk.py'}:make",
                        "--input-shape", "4,3,32,32", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "smoke test" in r.stdout and "cosine 1.0000" in r.stdout
    assert (out / "model.pt2").exists() and (out / "stablehlo" / "functions").is_dir()
    ep = torch.export.load(str(out / "model.pt2"))
    assert ep.module()(torch.randn(4, 3, 32, 32)).shape == (4, 10)
