"""Artifacts carry their signature: save(..., example_inputs=x) records inputs (batch dim -1), dtypes and
outputs inside the file, load returns it, reading it unpickles nothing; int8 models name the formats they save in."""
from __future__ import annotations

import json
import pickle
import zipfile

import pytest
import torch
from torch import nn

import torchfast as tf
from torchfast.export import SaveError, read_signature
from torchfast.signature import SIGNATURE_FILE, Signature, SignatureError


class TokenNet(nn.Module):
    """Keyword token inputs, a dict output: what encoders look like."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(50, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, input_ids, attention_mask):
        h = self.emb(input_ids) * attention_mask.unsqueeze(-1).float()
        return {"pooled": self.out(h.sum(1)), "tokens": attention_mask.sum(1)}


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(4 * 6 * 6, 3)

    def forward(self, image):
        return self.fc(torch.relu(self.conv(image)).flatten(1))


def _tokens(rows=2, length=5):
    g = torch.Generator().manual_seed(0)
    return {"input_ids": torch.randint(0, 50, (rows, length), generator=g),
            "attention_mask": torch.ones(rows, length, dtype=torch.int64)}


@pytest.mark.parametrize("suffix", ["pt", "pt2"])
def test_saved_artifact_records_its_signature_and_load_returns_it(tmp_path, suffix):
    net = Net().eval()
    x = torch.randn(3, 1, 8, 8)
    path = tf.save(net, tmp_path / f"net.{suffix}", example_inputs=x)
    want = {"version": 1, "inputs": [{"name": "image", "shape": [-1, 1, 8, 8], "dtype": "float32"}],
            "outputs": ["output"], "keyword_inputs": False}
    assert read_signature(path).to_dict() == want
    loaded = tf.load(path)
    assert loaded.torchfast_signature.to_dict() == want
    x5 = torch.randn(5, 1, 8, 8)                                        # any batch size, as recorded
    torch.testing.assert_close(loaded(x5), net(x5), atol=1e-5, rtol=1e-5)
    if suffix == "pt2":
        assert tf.load(path, program=True).torchfast_signature.to_dict() == want


@pytest.mark.parametrize("suffix", ["pt", "pt2"])
def test_keyword_inputs_and_dict_outputs_are_recorded(tmp_path, suffix):
    net = TokenNet().eval()
    path = tf.save(net, tmp_path / f"tok.{suffix}", example_inputs=_tokens())
    sig = tf.load(path).torchfast_signature
    assert sig.keyword_inputs and sig.input_names == ("input_ids", "attention_mask")
    assert [s.dtype for s in sig.inputs] == ["int64", "int64"]
    assert [s.dims() for s in sig.inputs] == [(-1, 5), (-1, 5)]
    assert sig.outputs == ("pooled", "tokens")


def test_a_wrapped_model_records_the_dims_it_declared_dynamic(tmp_path):
    net = TokenNet().eval()
    wrapped = tf.wrap(net, _tokens(), dynamic_dims={"input_ids": (0, 1), "attention_mask": (0, 1)})
    sig = read_signature(tf.save(wrapped, tmp_path / "tok.pt", example_inputs=_tokens()))
    assert [s.dims() for s in sig.inputs] == [(-1, -1), (-1, -1)]
    loaded = tf.load(tmp_path / "tok.pt")
    longer = _tokens(rows=3, length=9)
    torch.testing.assert_close(loaded(**longer)["pooled"], net(**longer)["pooled"], atol=1e-5, rtol=1e-5)


def test_an_artifact_saved_without_example_inputs_or_by_plain_torch_has_none(tmp_path):
    net = Net().eval()
    torch.jit.trace(net, torch.randn(2, 1, 8, 8)).save(str(tmp_path / "plain.pt"))
    assert read_signature(tmp_path / "plain.pt") is None and tf.load(tmp_path / "plain.pt").torchfast_signature is None
    # a plain-torch ExportedProgram still says what it takes, from the program itself
    ep = torch.export.export(net, (torch.randn(2, 1, 8, 8),))
    torch.export.save(ep, str(tmp_path / "plain.pt2"))
    assert read_signature(tmp_path / "plain.pt2") is None
    assert tf.load(tmp_path / "plain.pt2").torchfast_signature.inputs[0].dims() == (2, 1, 8, 8)


def test_reading_the_signature_unpickles_nothing(tmp_path, monkeypatch):
    path = tf.save(Net().eval(), tmp_path / "net.pt", example_inputs=torch.randn(2, 1, 8, 8))

    def refuse(*a, **k):
        raise AssertionError("read_signature must not unpickle or load the model")
    for target, attr in [(pickle, "loads"), (pickle, "load"), (pickle, "Unpickler"), (torch, "load"),
                         (torch.jit, "load"), (torch.export, "load")]:
        monkeypatch.setattr(target, attr, refuse)
    assert read_signature(path).input_names == ("image",)


def _with_member(src, dst, text: str):
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename.endswith(f"extra/{SIGNATURE_FILE}"):
                data = text.encode()
            zout.writestr(info, data)


@pytest.mark.parametrize("doc, needle", [
    ({"version": 1, "inputs": [{"name": "x", "shape": [-1, 4], "dtype": "os.system"}]}, "unknown dtype"),
    ({"version": 1, "inputs": [{"name": "x", "shape": [-1, 0]}]}, "positive sizes"),
    ({"version": 1, "inputs": [{"name": "x\n", "shape": [-1]}]}, "printable name"),
    ({"version": 1, "inputs": [{"name": "x", "shape": [-1]}, {"name": "x", "shape": [-1]}]}, "unique"),
    ({"version": 2, "inputs": []}, "field version"),
    ("[" * 100_000, "not the JSON"),
])
def test_a_tampered_signature_is_refused_naming_the_field(tmp_path, doc, needle):
    path = tf.save(Net().eval(), tmp_path / "net.pt", example_inputs=torch.randn(2, 1, 8, 8))
    _with_member(path, tmp_path / "bad.pt", doc if isinstance(doc, str) else json.dumps(doc))
    with pytest.raises(SignatureError, match=needle):
        tf.load(tmp_path / "bad.pt")


def test_signature_round_trips_through_json():
    from torchfast.specs import InputSpec
    sig = Signature((InputSpec("ids", (-1,), "int64", (512,)), InputSpec("scale", (), "float16", batch=None),
                     InputSpec("image", (3, 8, 8), batch=4)), ("output",), True)
    assert Signature.from_json(sig.to_json()) == sig
    assert sig.fixed_batch is None                               # one input takes any batch size
    assert Signature(sig.inputs[2:]).fixed_batch == 4


def test_ao_int8_model_as_exported_program_names_the_formats_it_saves_in(tmp_path):
    x = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    cal = [torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(1, 3)]
    q, _ = tf.quantize(Net().eval(), tf.Int8Static(calibration=cal, progress=False, keep_slower=True),
                       example_inputs=x)
    ref = q(x)
    with pytest.raises(SaveError, match="torch.ao quantized modules.*format='torchscript'.*method='pt2e'"):
        tf.save(q, tmp_path / "q.pt2", example_inputs=x)
    assert not (tmp_path / "q.pt2").exists()
    torch.testing.assert_close(q(x), ref)                               # the model is untouched
    path = tf.save(q, tmp_path / "q.pt", example_inputs=x)              # the format it names works
    torch.testing.assert_close(tf.load(path)(x), ref, atol=1e-5, rtol=0)
    assert tf.load(path).torchfast_signature.inputs[0].dims() == (-1, *x.shape[1:])


def test_pt2e_int8_model_saves_as_an_exported_program(tmp_path):
    pytest.importorskip("torchao")
    from torchfast.quant.pt2e import quantize_pt2e_static
    net = Net().eval()
    cal = [torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    q, _ = quantize_pt2e_static(net, tf.Int8Static(calibration=cal, method="pt2e", progress=False), cal, cal[0])
    path = tf.save(q, tmp_path / "q8.pt2", example_inputs=cal[0])      # the torch.compile'd PT2E graph
    loaded = tf.load(path)
    torch.testing.assert_close(loaded(cal[1]), q._orig_mod(cal[1]))
    assert loaded.torchfast_signature.inputs[0].dims() == (-1, 1, 8, 8)


def test_optimize_result_saves_the_dims_it_was_told_are_dynamic(tmp_path):
    net = TokenNet().eval()
    res = tf.optimize(net, _tokens(), [], backend="eager", runs=2, progress=False,
                      dynamic_dims={"input_ids": (0, 1), "attention_mask": (0, 1)})
    sig = read_signature(res.save(str(tmp_path / "tok.pt")))
    assert [s.dims() for s in sig.inputs] == [(-1, -1), (-1, -1)] and sig.outputs == ("pooled", "tokens")
