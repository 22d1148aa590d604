"""OpenVINO backend on real trained models: fp32 fidelity, dynamic batch, dict inputs and ModelOutput,
int8 through NNCF (static and weight-compressed), IR artifacts and their errors."""
from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

pytest.importorskip("openvino")

import torchfast  # noqa: E402
from torchfast.backends import openvino as tov  # noqa: E402
from torchfast.backends.registry import BackendError  # noqa: E402
from torchfast.config import ConfigError  # noqa: E402
from torchfast.measure import fidelity  # noqa: E402


def _minilm_batch(tok, n: int, offset: int = 0, seq_len: int = 32) -> dict:
    from torchfast.zoo.minilm import encode, sentences
    return encode(tok, sentences(n, offset=offset), seq_len=seq_len)


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.reshape(1, -1).double(), b.reshape(1, -1).double()).item()


# ---------------------------------------------------------------- options
@pytest.mark.parametrize("bad", [{"hint": "fast"}, {"precision": "int8"}, {"route": "dynamo"}, {"threads": 0},
                                 {"threads": 1.5}, {"device": ""}])
def test_options_reject_bad_values(bad):
    with pytest.raises(ConfigError, match=next(iter(bad))):
        tov.Options(**bad)


def test_unknown_device_lists_available_ones(digits_cnn):
    model, data = digits_cnn
    with pytest.raises(BackendError, match="not available here; available: .*CPU"):
        tov.build(model, data.x_test[:2], tov.Options(device="NOSUCHDEVICE"))


# ---------------------------------------------------------------- fp32
def test_cnn_matches_eager_and_serves_any_batch(digits_cnn):
    model, data = digits_cnn
    x = data.x_test[:8]
    fast = torchfast.compile(model, x, backend="openvino", dynamic_batch=True)
    s = fast.report.summary
    assert s["precision"] == "f32" and s["device"] == "CPU" and s["route"] in ("export", "convert_model")
    assert s["max_abs_err"] < 1e-4 and s["other_batch_max_abs_err"] < 1e-4
    fid = fidelity(model, fast, [data.x_test[:1], data.x_test[1:10], data.x_test[10:300]], eval_fn=data.eval_fn)
    assert fid.top1_agreement == 1.0 and fid.max_abs_err < 1e-4
    assert fid.metric == pytest.approx(fid.baseline_metric)
    # one request per thread: concurrent callers get their own answers
    want = [model(data.x_test[i * 5:(i + 1) * 5]) for i in range(4)]
    got: dict[int, torch.Tensor] = {}
    threads = [threading.Thread(target=lambda i=i: got.__setitem__(i, fast(data.x_test[i * 5:(i + 1) * 5])))
               for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(4):
        torch.testing.assert_close(got[i], want[i].detach(), atol=1e-4, rtol=0)


def test_static_build_by_tracing_names_the_wrong_shape(digits_cnn):
    model, data = digits_cnn
    built = tov.build(model, data.x_test[:4], tov.Options(route="convert_model"))
    assert built.info["route"] == "convert_model"
    assert [p.get_any_name() for p in built.artifact.inputs] == ["x"]
    with torch.inference_mode():
        torch.testing.assert_close(built.runnable(data.x_test[4:8]), model(data.x_test[4:8]), atol=1e-4, rtol=0)
    with pytest.raises(BackendError, match=r"input 'x' has shape \(5, 1, 16, 16\).*dynamic_batch=True"):
        built.runnable(data.x_test[:5])


def test_bf16_request_runs_in_bf16(digits_cnn):
    model, data = digits_cnn
    fast = torchfast.compile(model, data.x_test[:8], backend="openvino", dtype="bf16")
    import openvino as ov
    native = "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    # the report says what the engine compiled: CPUs without AVX512-BF16/AMX compute bf16 requests in f32
    assert fast.report.summary["precision"] == ("bf16" if native else "f32")
    out = fast(data.x_test[:8])
    assert out.dtype == torch.bfloat16
    assert (out.float().argmax(1) == model(data.x_test[:8]).argmax(1)).float().mean() >= 0.85


def test_minilm_dict_inputs_dynamic_batch(minilm):
    model, tok = minilm
    fast = torchfast.compile(model, _minilm_batch(tok, 4), backend="openvino", dynamic_batch=True)
    other = _minilm_batch(tok, 6, offset=40)
    with torch.inference_mode():
        ref = model(**other)
        out = fast(**other)
    assert type(out) is type(ref)
    assert out.last_hidden_state.shape == (6, 32, 384) and out.pooler_output.shape == (6, 384)
    assert _cos(out.last_hidden_state, ref.last_hidden_state) > 0.9999
    assert _cos(out["pooler_output"], ref.pooler_output) > 0.9999
    with pytest.raises(TypeError, match="keyword input"):
        fast(other["input_ids"])


# ---------------------------------------------------------------- int8 through NNCF
def test_int8_static_keeps_digits_accuracy(digits_cnn, capfd):
    model, data = digits_cnn
    x = data.x_test[:16]
    capfd.readouterr()
    q = torchfast.compile(model, x, backend="openvino", dynamic_batch=True,
                          int8=torchfast.Int8Static(calibration=data.calibration(4)))
    out, err = capfd.readouterr()
    assert "Statistics collection" not in out + err and "Fast Bias correction" not in out + err  # NNCF's bars
    s = q.report.summary
    assert s["int8"] == "static" and s["calibration_batches"] == 4 and s["model_type"] == "default"
    ops = {op.get_type_name() for op in q.artifact.get_ops()}
    assert "FakeQuantize" in ops
    with torch.inference_mode():
        fp32, int8 = data.eval_fn(model), data.eval_fn(q)
        agree = (q(data.x_test).argmax(1) == model(data.x_test).argmax(1)).float().mean().item()
    assert int8 >= fp32 - 0.01 or agree >= 0.97


def test_int8_weight_compression_for_dynamic_mode(digits_cnn):
    model, data = digits_cnn
    built = tov.build_int8(model, data.x_test[:8], tov.Options(), mode="dynamic", dynamic_batch=True)
    assert built.info["int8"] == "dynamic" and any("compress_weights" in n for n in built.notes)
    with torch.inference_mode():
        assert data.eval_fn(built.runnable) >= data.eval_fn(model) - 0.01


def test_int8_static_needs_calibration(digits_cnn):
    model, data = digits_cnn
    for calib in (None, []):
        with pytest.raises(BackendError, match="needs calibration batches for DigitsCNN"):
            tov.build_int8(model, data.x_test[:8], tov.Options(), mode="static", calibration=calib)
    with pytest.raises(BackendError, match=r"calibration batch 0: .*keyword"):
        tov.build_int8(model, data.x_test[:8], tov.Options(), calibration=[{"x": data.x_test[:8]}])


def test_int8_static_minilm_transformer_preset(minilm):
    from torchfast.zoo.minilm import embedding_cosine
    model, tok = minilm
    calib = [_minilm_batch(tok, 8, offset=100 + 8 * i) for i in range(3)]
    built = tov.build_int8(model, _minilm_batch(tok, 4), tov.Options(), dynamic_batch=True, calibration=calib)
    assert built.info["model_type"] == "transformer"
    held_out = [_minilm_batch(tok, 8, offset=300)]
    assert embedding_cosine(model, built.runnable, held_out) >= 0.98


# ---------------------------------------------------------------- IR artifacts
def test_artifact_round_trip_tensor_output(digits_cnn, tmp_path):
    model, data = digits_cnn
    built = tov.build(model, data.x_test[:4], tov.Options(route="convert_model"), dynamic_batch=True)
    xml = tov.save_artifact(built.artifact, tmp_path / "digits")
    assert xml == tmp_path / "digits.xml" and (tmp_path / "digits.bin").is_file()
    loaded = tov.load_artifact(xml, device="cpu")  # the torch spelling, as torchfast.load passes it
    x = data.x_test[:7]
    with torch.inference_mode():
        torch.testing.assert_close(loaded(x), built.runnable(x), atol=1e-6, rtol=0)
        torch.testing.assert_close(loaded(x=x), built.runnable(x), atol=1e-6, rtol=0)
    # through the public save/load: the format follows the .xml extension
    fast = torchfast.compile(model, data.x_test[:4], backend="openvino", dynamic_batch=True, verify=False)
    path = torchfast.save(fast, tmp_path / "public.xml")
    again = torchfast.load(path)
    with torch.inference_mode():
        torch.testing.assert_close(again(x), model(x), atol=1e-4, rtol=0)


def test_artifact_round_trip_model_output_as_dict(tmp_path):
    pytest.importorskip("transformers")
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(50, 8)
            self.lin = nn.Linear(8, 4)

        def forward(self, input_ids, attention_mask):
            h = self.lin(self.emb(input_ids) * attention_mask.unsqueeze(-1))
            return BaseModelOutputWithPooling(last_hidden_state=h, pooler_output=h.mean(1))

    torch.manual_seed(0)
    m = Encoder().eval()
    batch = {"input_ids": torch.randint(0, 50, (3, 7)), "attention_mask": torch.ones(3, 7, dtype=torch.long)}
    built = tov.build(m, batch, tov.Options(route="convert_model"), dynamic_batch=True)
    xml = tov.save_artifact(built.artifact, tmp_path / "enc.xml")
    loaded = tov.load_artifact(xml)
    other = {k: v[:2] for k, v in batch.items()}
    out, ref = loaded(**other), m(**other)
    assert type(out) is dict and list(out) == ["last_hidden_state", "pooler_output"]
    torch.testing.assert_close(out["last_hidden_state"], ref.last_hidden_state.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(out["pooler_output"], ref.pooler_output.detach(), atol=1e-5, rtol=0)
    with pytest.raises(TypeError, match="keyword input"):
        loaded(other["input_ids"], other["attention_mask"])


def test_broken_artifacts_give_clear_errors(digits_cnn, tmp_path):
    model, data = digits_cnn
    with pytest.raises(BackendError, match="no OpenVINO model at"):
        tov.load_artifact(tmp_path / "nothing.xml")
    built = tov.build(model, data.x_test[:2], tov.Options(route="convert_model"))
    built.artifact.set_rt_info('{"input_names": ["x"]', ["torchfast", "signature"])
    xml = tov.save_artifact(built.artifact, tmp_path / "m")
    with pytest.raises(BackendError, match="signature stored in the model is malformed"):
        tov.load_artifact(xml)
    xml.with_suffix(".bin").unlink()
    with pytest.raises(BackendError, match=r"m.bin is missing"):
        tov.load_artifact(xml)
    (tmp_path / "bad.xml").write_text("<net><layers><layer id='0'")
    (tmp_path / "bad.bin").write_bytes(b"\0" * 16)
    with pytest.raises(BackendError, match="not a readable OpenVINO model"):
        tov.load_artifact(tmp_path / "bad.xml")
    with pytest.raises(BackendError, match="save_artifact takes the openvino.Model"):
        tov.save_artifact(model, tmp_path / "x")


def _fake_quantized_ops(built) -> dict[str, bool]:
    """Convolution/MatMul op name -> whether a FakeQuantize (int8 at run time) feeds it, through the ops
    between it and the previous compute op (pooling, reshapes, activations)."""
    compute = ("Convolution", "GroupConvolution", "MatMul")

    def fed_by_fq(node, seen) -> bool:
        for inp in node.inputs():
            src = inp.get_source_output().get_node()
            if id(src) in seen:
                continue
            seen.add(id(src))
            kind = src.get_type_name()
            if kind == "FakeQuantize":
                return True
            if kind not in compute + ("Parameter",) and fed_by_fq(src, seen):
                return True
        return False
    return {op.get_friendly_name(): fed_by_fq(op, set()) for op in built.artifact.get_ops()
            if op.get_type_name() in compute}


@pytest.mark.parametrize("route", ["export", "convert_model"])
def test_int8_exclude_keeps_those_layers_float(digits_cnn, route):
    model, data = digits_cnn
    calib = data.calibration()
    if route == "export":
        full = _fake_quantized_ops(tov.build_int8(model, data.x_test[:8], tov.Options(), calibration=calib))
        assert len(full) == 5 and all(full.values()), full
    built = tov.build_int8(model, data.x_test[:8], tov.Options(route=route), calibration=calib, dynamic_batch=True,
                           exclude=("classifier.*", "features.7"))
    got = _fake_quantized_ops(built)
    assert sum(got.values()) == 2 and sum(not v for v in got.values()) == 3, got
    note = next(n for n in built.notes if n.startswith("kept float on OpenVINO (exclude): "))
    assert all(m in note for m in ("classifier.1", "classifier.4", "features.7")) and "features.3" not in note, note
    with torch.inference_mode():
        assert data.eval_fn(built.runnable) >= data.eval_fn(model) - 0.01
    with pytest.raises(BackendError, match=r"exclude=\['features.1'\]: none of the OpenVINO ops"):
        tov.build_int8(model, data.x_test[:8], tov.Options(route=route), calibration=calib, exclude=("features.1",))


def test_nncf_preset_and_model_type_are_backend_options(digits_cnn):
    model, data = digits_cnn
    c = torchfast.compile(model, data.x_test[:8], backend="openvino", int8=torchfast.Int8Static(),
                          calibration=data.calibration(), quant_preset="mixed", model_type="default")
    with torch.inference_mode():
        assert c(data.x_test[:8]).shape == (8, 10)   # compile() took them: unknown options are an error
    built = tov.build_int8(model, data.x_test[:8], tov.Options(quant_preset="mixed"), calibration=data.calibration())
    assert built.info["preset"] == "mixed" and built.info["model_type"] == "default"
    with pytest.raises(ConfigError, match="OpenVINOOptions.quant_preset"):
        tov.Options(quant_preset="fast")
