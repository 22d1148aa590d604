"""Backend declarations: impossible requests fail with one clear error before any work is done."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import torchfast
from torchfast.backends import BackendError, get_backend, list_backends, quantization_kind
from torchfast.config import ConfigError


class Exploding(nn.Module):
    """A model whose forward must never run: proves the error came before any work."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 2)

    def forward(self, x):
        raise AssertionError("the model was called although the request was impossible")


def test_every_backend_declares_its_capabilities():
    assert list_backends() == ["eager", "torchscript", "inductor", "export", "tensorrt", "onnxruntime", "openvino",
                               "xla"]
    for name in list_backends():
        b = get_backend(name)
        assert b.devices and b.dtypes and b.summary
    assert get_backend("tensorrt").devices == ("cuda",)
    assert get_backend("xla").dynamic_batch is False


def test_unknown_backend_lists_choices():
    with pytest.raises(BackendError, match="unknown backend 'tvm'.*eager, torchscript"):
        torchfast.compile(Exploding(), torch.randn(2, 4), backend="tvm")


@pytest.mark.parametrize("backend,kwargs,match", [
    ("torchscript", {"device": "xla"}, "device 'xla' is not supported"),
    ("xla", {"dtype": "fp16"}, "dtype fp16 is not supported"),
    ("xla", {"dynamic_batch": True}, "dynamic batch dimension is not supported"),
    ("inductor", {"dtype": "int8"}, "dtype must be one of fp32, fp16, bf16"),
    ("inductor", {"no_such_option": 1}, "has no option 'no_such_option'; its options are: freezing, max_autotune"),
    ("torchscript", {"method": "compile"}, "TorchScriptOptions.method must be one of"),
])
def test_impossible_combination_fails_before_work(backend, kwargs, match):
    model = Exploding()
    before = model.lin.weight.clone()
    with pytest.raises((BackendError, ConfigError), match=match):
        torchfast.compile(model, torch.randn(2, 4), backend=backend, **kwargs)
    assert torch.equal(model.lin.weight, before)


def test_several_problems_are_listed_in_one_error():
    with pytest.raises(BackendError) as e:
        torchfast.compile(Exploding(), torch.randn(2, 4), backend="xla", dtype="fp16", dynamic_batch=True)
    assert "dtype fp16" in str(e.value) and "dynamic batch" in str(e.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_requested_without_gpu():
    with pytest.raises(BackendError, match="no CUDA GPU"):
        torchfast.compile(Exploding(), torch.randn(2, 4), backend="inductor", device="cuda")


def test_missing_optional_packages_named():
    import importlib.util
    if importlib.util.find_spec("torch_tensorrt") is None:
        with pytest.raises(BackendError, match="torch_tensorrt package, which is not installed"):
            torchfast.compile(Exploding(), torch.randn(2, 4), backend="tensorrt", device="cuda")
    if importlib.util.find_spec("torch_xla") is None:
        with pytest.raises(BackendError, match="torch_xla package, which is not installed"):
            torchfast.compile(Exploding(), torch.randn(2, 4), backend="xla")


def _ao_quantized():
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx
    m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()
    x = torch.randn(4, 1, 8, 8)
    p = prepare_fx(m, get_default_qconfig_mapping("x86"), (x,))
    p(x)
    return convert_fx(p), x


def test_quantization_kind_detection():
    assert quantization_kind(nn.Linear(3, 3)) is None
    q, _ = _ao_quantized()
    assert quantization_kind(q) == "ao"
    dyn = torch.ao.quantization.quantize_dynamic(nn.Sequential(nn.Linear(8, 8)), {nn.Linear}, dtype=torch.qint8)
    assert quantization_kind(dyn) == "ao"


def test_torchao_weights_detected():
    torchao = pytest.importorskip("torchao")
    from torchao.quantization import Int8WeightOnlyConfig, quantize_
    m = nn.Sequential(nn.Linear(64, 64)).eval()
    quantize_(m, Int8WeightOnlyConfig())
    assert quantization_kind(m) == "torchao"


def test_ao_quantized_model_refused_by_inductor_with_a_way_out():
    q, x = _ao_quantized()
    with pytest.raises(BackendError, match="torch.ao quantized modules.*use backend 'torchscript'"):
        torchfast.compile(q, x, backend="inductor")
    with pytest.raises(BackendError, match="torch.ao quantized modules"):
        torchfast.compile(q, x, backend="export")


def test_failed_compile_restores_training_flag_and_weights():
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            if x.sum() > 0:            # export cannot trace this data-dependent branch
                return self.lin(x)
            return -self.lin(x)

    m = DataDependent().train()
    before = m.lin.weight.clone()
    with pytest.raises(BackendError, match="backend 'export' failed to compile DataDependent"):
        torchfast.compile(m, torch.randn(2, 4), backend="export")
    assert m.training and torch.equal(m.lin.weight, before)
