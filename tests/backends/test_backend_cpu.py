"""CPU backends on real trained models: plain, factorized and int8-quantized, static and dynamic batch.

Compiles are slow on 2 cores, so the models are the small trained digits nets; dynamo caches are
reset before each inductor test so nothing compiled by one test can hide a bug in another.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import torchfast
from torchfast.measure import fidelity


@pytest.fixture()
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _factorize(mlp: nn.Module, rank: int = 32) -> nn.Module:
    """A factorized model built here by truncated SVD (Linear -> Linear(rank) -> Linear)."""
    m = copy.deepcopy(mlp)
    for name, mod in list(m.named_modules()):
        for cname, child in list(mod.named_children()):
            if isinstance(child, nn.Linear) and min(child.weight.shape) > rank:
                u, s, vh = torch.linalg.svd(child.weight.detach(), full_matrices=False)
                first = nn.Linear(child.in_features, rank, bias=False)
                second = nn.Linear(rank, child.out_features, bias=child.bias is not None)
                first.weight.data = (torch.diag(s[:rank]) @ vh[:rank]).contiguous()
                second.weight.data = u[:, :rank].contiguous()
                if child.bias is not None:
                    second.bias.data = child.bias.detach().clone()
                setattr(mod, cname, nn.Sequential(first, second))
    return m.eval()


def _ao_int8(model: nn.Module, calib: list[torch.Tensor]) -> nn.Module:
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx
    p = prepare_fx(copy.deepcopy(model).eval(), get_default_qconfig_mapping("x86"), (calib[0],))
    with torch.no_grad():
        for b in calib:
            p(b)
    return convert_fx(p)


@pytest.mark.parametrize("backend", ["eager", "torchscript", "export"])
def test_cnn_keeps_accuracy_and_batch_polymorphism(digits_cnn, backend):
    model, data = digits_cnn
    x = data.x_test[:8]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fast = torchfast.compile(model, x, backend=backend, dynamic_batch=True)
    assert isinstance(fast, nn.Module) and fast.backend == backend
    assert fast.compile_time_s > 0
    s = fast.report.summary
    assert s["max_abs_err"] < 1e-4 and s["other_batch_max_abs_err"] < 1e-4
    fid = fidelity(model, fast, [data.x_test[:100], data.x_test[100:300]], eval_fn=data.eval_fn)
    assert fid.top1_agreement == 1.0 and fid.max_abs_err < 1e-4
    assert fid.metric == pytest.approx(fid.baseline_metric) and fid.metric > 0.95
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_torchscript_runs_ao_int8_model_exactly(digits_cnn):
    model, data = digits_cnn
    q = _ao_int8(model, data.calibration(4))
    x = data.x_test[:16]
    fast = torchfast.compile(q, x, backend="torchscript", dynamic_batch=True)
    assert fast.report.summary["quantized"] == "ao"
    with torch.inference_mode():
        torch.testing.assert_close(fast(data.x_test[:50]), q(data.x_test[:50]), atol=1e-5, rtol=0)
    # and the int8 model still classifies digits
    assert data.eval_fn(fast) > 0.9


def test_torchscript_and_export_run_factorized_model(digits_mlp):
    model, data = digits_mlp
    fac = _factorize(model, rank=32)
    x = data.x_test[:8]
    for backend in ("torchscript", "export"):
        fast = torchfast.compile(fac, x, backend=backend, dynamic_batch=True)
        fid = fidelity(fac, fast, data.x_test[:200])
        assert fid.max_abs_err < 1e-4, backend


def test_inductor_compiles_once_and_matches(digits_mlp, fresh_dynamo):
    model, data = digits_mlp
    x = data.x_test[:8]
    fast = torchfast.compile(model, x, backend="inductor", dynamic_batch=True)
    s = fast.report.summary
    assert s["graphs"] >= 1 and s["graph_breaks"] == 0 and s["freezing"] is True
    assert s["max_abs_err"] < 1e-4 and s["other_batch_max_abs_err"] < 1e-4
    fid = fidelity(model, fast, [data.x_test[:5], data.x_test[5:64]], eval_fn=data.eval_fn)
    assert fid.top1_agreement == 1.0 and fid.metric == pytest.approx(fid.baseline_metric)
    # compile time is measured apart: the compiled model now runs without compiling again
    from torch._dynamo.utils import counters
    frames = counters["stats"]["unique_graphs"]
    fast(data.x_test[:13])
    assert counters["stats"]["unique_graphs"] == frames


def test_inductor_compiles_factorized_model(digits_mlp, fresh_dynamo):
    model, data = digits_mlp
    fac = _factorize(model, rank=32)
    fast = torchfast.compile(fac, data.x_test[:8], backend="inductor", freezing=True)
    assert fidelity(fac, fast, data.x_test[:100]).max_abs_err < 1e-4


def test_inductor_channels_last_matches_and_leaves_the_model_alone(digits_cnn, fresh_dynamo):
    model, data = digits_cnn
    x = data.x_test[:8]
    fast = torchfast.compile(model, x, backend="inductor", channels_last=True)
    assert fast.report.summary["channels_last"] is True
    assert fidelity(model, fast, [x, data.x_test[8:16]]).max_abs_err < 1e-4
    assert all(p.is_contiguous() for p in model.parameters())   # the NHWC layout went to a copy


def test_inductor_cpp_wrapper_reaches_torch_compile(digits_mlp, monkeypatch):
    """Plumbing only (a cpp_wrapper build compiles C++ for a minute): the option is inductor's."""
    from torchfast.backends import inductor
    seen = {}
    calls = iter([(0, 0), (1, 0)])

    def fake_compile(model, backend, options, **kw):
        seen.update(options, backend=backend)
        return model
    monkeypatch.setattr(inductor.torch, "compile", fake_compile)
    monkeypatch.setattr(inductor, "_counters", lambda: next(calls))
    model, data = digits_mlp
    built = inductor.build(model, data.x_test[:4], inductor.Options(cpp_wrapper=True))
    assert seen["backend"] == "inductor" and seen["cpp_wrapper"] is True and built.info["cpp_wrapper"] is True


def test_dict_inputs_and_structured_outputs_survive_tracing():
    """Keyword inputs (like HF tokenizers give) and a ModelOutput-like result type, on every CPU backend."""
    from collections import OrderedDict

    class Out(OrderedDict):
        pass

    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(50, 8)
            self.lin = nn.Linear(8, 4)

        def forward(self, input_ids, attention_mask):
            h = self.emb(input_ids) * attention_mask.unsqueeze(-1)
            return Out(last_hidden_state=self.lin(h), pooled=h.mean(1))

    torch.manual_seed(0)
    m = TwoInputs().eval()
    batch = {"input_ids": torch.randint(0, 50, (3, 7)), "attention_mask": torch.ones(3, 7)}
    ref = m(**batch)
    for backend in ("torchscript", "export"):
        fast = torchfast.compile(m, batch, backend=backend, dynamic_batch=True)
        out = fast(**batch)
        assert isinstance(out, Out), backend
        torch.testing.assert_close(out["last_hidden_state"], ref["last_hidden_state"])


def test_export_minilm_dynamic_batch(minilm):
    from torchfast.zoo.minilm import batches, embedding_cosine
    model, tok = minilm
    b = batches(tok, 2, 4, 32)
    fast = torchfast.compile(model, b[0], backend="export", dynamic_batch=True)
    out = fast(**b[0])
    assert type(out).__name__ == type(model(**b[0])).__name__    # the HF output type survives
    assert embedding_cosine(model, fast, b) > 0.9999
    small = {k: v[:1] for k, v in b[1].items()}                  # batch 1 through the dynamic program
    torch.testing.assert_close(fast(**small).last_hidden_state, model(**small).last_hidden_state,
                               atol=1e-4, rtol=1e-4)


def test_scripted_module_only_for_script_backends(digits_mlp):
    model, data = digits_mlp
    ts = torch.jit.trace(model, data.x_test[:2])
    fast = torchfast.compile(ts, data.x_test[:2], backend="torchscript")
    torch.testing.assert_close(fast(data.x_test[:4]), model(data.x_test[:4]))
    with pytest.raises(torchfast.backends.BackendError, match="TorchScript module"):
        torchfast.compile(ts, data.x_test[:2], backend="inductor")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (inductor CUDA path: fp16/bf16, CUDA graphs)")
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_inductor_cuda_half_with_cudagraphs(digits_cnn, dtype, fresh_dynamo):
    model, data = digits_cnn
    x = data.x_test[:32]
    fast = torchfast.compile(model, x, backend="inductor", device="cuda", dtype=dtype, cudagraphs=True)
    assert fast.report.summary["cudagraphs"] is True
    out = fast(x)                                     # CPU fp32 input: moved and cast by the wrapper
    assert out.device.type == "cuda"
    fid = fidelity(model, fast, data.x_test[:256], eval_fn=data.eval_fn)
    assert fid.top1_agreement > 0.99 and fid.metric > fid.baseline_metric - 0.01
    assert all(p.device.type == "cpu" for p in model.parameters())   # the user's model stayed put
