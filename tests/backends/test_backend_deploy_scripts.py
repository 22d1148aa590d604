"""The deployment scripts stop at once, with exit code 2 and a message saying what is missing."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA exit; this machine has a GPU")
def test_deploy_tensorrt_without_cuda_exits_2(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "scripts/deploy_tensorrt.py"), "torchvision:resnet18",
                        "--input-shape", "1,3,64,64", "--out", str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "no CUDA GPU" in r.stderr
    assert not (tmp_path / "out").exists()          # stopped before any work


@pytest.mark.skipif(importlib.util.find_spec("torch_xla") is not None, reason="torch_xla is installed here")
def test_deploy_xla_without_torch_xla_exits_2(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "scripts/deploy_xla.py"), "torchvision:resnet18",
                        "--input-shape", "1,3,64,64", "--out", str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "torch_xla is not installed" in r.stderr and "make test-xla" in r.stderr
