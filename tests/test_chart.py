"""chart.plot: a speed-vs-fidelity PNG per stage from a report, and the install hint without matplotlib."""
import sys

import pytest
import torch
from torch import nn

import torchfast as tf
from torchfast.chart import plot

import pipeline_stages as st


def _report(metric=True):
    r = tf.Report("optimize")
    for name, ok, sp, cos, met in [("original", True, 1.0, 1.0, 0.99), ("LowRank(ratio=0.5)", True, 1.4, 0.995, 0.985),
                                   ("Int8Static()", False, 2.5, 0.9, 0.8), ("compile: inductor", True, 1.9, 0.995, 0.985)]:
        r.add_row(stage=name, applied=ok, speedup=sp, cosine=cos, **({"metric": met} if metric else {}))
    return r


def test_png_from_report_dict_and_optimized(tmp_path):
    pytest.importorskip("matplotlib")
    p = plot(_report(), tmp_path / "a.png")
    data = open(p, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert open(plot(_report(False).to_dict(), tmp_path / "b.png", fidelity="cosine"), "rb").read(4) == b"\x89PNG"
    with pytest.raises(ValueError, match="no task metric"):
        plot(_report(False), tmp_path / "c.png", fidelity="metric")
    with pytest.raises(ValueError, match="no stage"):
        plot(tf.Report("empty"), tmp_path / "d.png")
    torch.manual_seed(0)
    res = tf.optimize(nn.Sequential(nn.Linear(8, 4)), torch.randn(4, 8), [st.Noise(1e-4), st.Noise(5.0)],
                      runs=2, warmup=1, progress=False)
    assert open(res.chart(str(tmp_path / "e.png")), "rb").read(4) == b"\x89PNG"


def test_missing_matplotlib_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"pip install 'torchfast\[plot\]'"):
        plot(_report(), tmp_path / "x.png")
