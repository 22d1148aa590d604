"""save/load: artifacts reproduce outputs, load with plain torch (no torchfast), and loading is safe by default."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import torchfast
from torchfast.export import artifact_format


def _plain_torch(script: str, cwd) -> str:
    """Run ``script`` in a fresh interpreter where torchfast cannot be imported."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # drop the source tree from sys.path and the editable-install finder (`pip install -e .`) from sys.meta_path
    code = (f"import os, sys\nsys.path = [p for p in sys.path if p not in ('', '.') and os.path.abspath(p) != {root!r}]\n"
            "sys.meta_path = [f for f in sys.meta_path if '__editable__' not in getattr(f, '__module__', '')\n"
            "                 and '__editable__' not in getattr(type(f), '__module__', '')]\n"
            + script)
    r = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


@pytest.mark.parametrize("fmt,suffix", [("torchscript", "pt"), ("exported_program", "pt2")])
def test_artifact_loads_with_plain_torch_and_matches(digits_cnn, tmp_path, fmt, suffix):
    model, data = digits_cnn
    x = data.x_test[:8]
    path = torchfast.save(model, tmp_path / f"cnn.{suffix}", format=fmt, example_inputs=x, dynamic_batch=True)
    assert artifact_format(path) == fmt
    ref = model(data.x_test[:32]).detach()
    torch.save(data.x_test[:32].clone(), tmp_path / "x.pt")
    torch.save(ref, tmp_path / "ref.pt")
    load = "torch.jit.load(p)" if fmt == "torchscript" else "torch.export.load(p).module()"
    out = _plain_torch(textwrap.dedent(f"""
        import torch
        try:
            import torchfast
            raise SystemExit("torchfast must not be importable here")
        except ImportError:
            pass
        p = {str(path)!r}
        m = {load}
        x = torch.load({str(tmp_path / 'x.pt')!r}, weights_only=True)
        ref = torch.load({str(tmp_path / 'ref.pt')!r}, weights_only=True)
        out = m(x)       # batch 32 through an artifact traced with batch 8
        print((out - ref).abs().max().item())
    """), cwd=tmp_path)
    assert float(out.strip().splitlines()[-1]) < 1e-4
    # torchfast.load gives the same
    loaded = torchfast.load(path)
    torch.testing.assert_close(loaded(data.x_test[:32]), ref, atol=1e-4, rtol=1e-4)


def test_compiled_model_saves_its_own_artifact(digits_mlp, tmp_path):
    model, data = digits_mlp
    x = data.x_test[:4]
    ts = torchfast.compile(model, x, backend="torchscript")
    ep = torchfast.compile(model, x, backend="export")
    p1 = torchfast.save(ts, tmp_path / "a.pt")                        # the frozen module, not re-traced
    p2 = torchfast.save(ep, tmp_path / "b.pt2", format="exported_program")
    p3 = torchfast.save(ts, tmp_path / "c.pt2", format="exported_program")   # from the compiled model's source
    for p in (p1, p2, p3):
        torch.testing.assert_close(torchfast.load(p)(x), model(x), atol=1e-5, rtol=1e-5)
    assert isinstance(torchfast.load(p2, program=True), torch.export.ExportedProgram)


def test_ao_int8_model_round_trips_as_torchscript(digits_cnn, tmp_path):
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx
    model, data = digits_cnn
    p = prepare_fx(model, get_default_qconfig_mapping("x86"), (data.x_test[:8],))
    for b in data.calibration(2):
        p(b)
    q = convert_fx(p)
    path = torchfast.save(q, tmp_path / "q.pt", example_inputs=data.x_test[:8])
    loaded = torchfast.load(path)
    torch.testing.assert_close(loaded(data.x_test[:20]), q(data.x_test[:20]), atol=1e-5, rtol=0)


def test_load_is_safe_by_default(tmp_path):
    lin = torch.nn.Linear(3, 2)
    torch.save(lin.state_dict(), tmp_path / "w.pt")
    sd = torchfast.load(tmp_path / "w.pt")                # tensors only: weights_only load
    assert set(sd) == {"weight", "bias"}
    torch.save(lin, tmp_path / "pickled.pt")               # a pickled module: arbitrary code on load
    with pytest.raises(RuntimeError, match="allow_pickle=True only for files you trust"):
        torchfast.load(tmp_path / "pickled.pt")
    assert isinstance(torchfast.load(tmp_path / "pickled.pt", allow_pickle=True), torch.nn.Linear)


def test_save_rejects_bad_requests(tmp_path):
    lin = torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match="format must be one of"):
        torchfast.save(lin, tmp_path / "x", format="tflite")
    with pytest.raises(ValueError, match="needs example_inputs"):
        torchfast.save(lin, tmp_path / "x.pt")
    with pytest.raises(FileNotFoundError):
        torchfast.load(tmp_path / "missing.pt")


def test_save_unwraps_a_dropin_wrapper(digits_mlp, tmp_path):
    """tf.save(optimize(...).model) / tf.save(wrap(compiled)) saves the compiled module the wrapper holds."""
    model, data = digits_mlp
    x = data.x_test[:8]
    wrapped = torchfast.wrap(torchfast.compile(model, x, backend="torchscript"), x, like=model)
    path = torchfast.save(wrapped, tmp_path / "mlp.pt", format="torchscript")
    loaded = torch.jit.load(str(path))
    torch.testing.assert_close(loaded(x), model(x).detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("suffix", [".onnx", ".xml"])
def test_save_picks_the_engine_format_from_the_extension(tmp_path, suffix):
    pytest.importorskip("onnxruntime" if suffix == ".onnx" else "openvino")
    torch.manual_seed(0)
    lin = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.ReLU()).eval()
    x = torch.randn(4, 3)
    path = torchfast.save(lin, tmp_path / f"m{suffix}", example_inputs=x)
    assert artifact_format(path) == ("onnx" if suffix == ".onnx" else "openvino")
    torch.testing.assert_close(torchfast.load(path)(x), lin(x), atol=1e-5, rtol=1e-5)
