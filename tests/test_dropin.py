"""wrap(): the drop-in module keeps the original signature and checks inputs against the example's specs."""
import copy
import inspect

import pytest
import torch
from torch import nn

import torchfast as tf
from torchfast.dropin import InputError

import pipeline_stages as st


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, image, scale: float = 1.0):
        return self.conv(image).mean((2, 3)) * scale


def test_signature_shape_dtype_errors_name_the_argument():
    m = Net().eval()
    x = torch.randn(2, 3, 8, 8)
    w = tf.wrap(m, x)
    assert list(inspect.signature(w).parameters) == ["image", "scale"]
    torch.testing.assert_close(w(x), m(x))
    torch.testing.assert_close(w(torch.randn(5, 3, 8, 8), scale=2.0).shape, torch.Size([5, 4]))  # batch dim free
    torch.testing.assert_close(w(image=x), m(x))
    with pytest.raises(InputError, match=r"input 'image' must have shape \[batch, 3, 8, 8\], got \[2, 3, 9, 8\]"):
        w(torch.randn(2, 3, 9, 8))
    with pytest.raises(InputError, match=r"input 'image' must have shape .* got \[3, 8, 8\]"):
        w(torch.randn(3, 8, 8))
    with pytest.raises(InputError, match="input 'image' must have dtype float32, got float64.*cast_inputs"):
        w(x.double())
    with pytest.raises(InputError, match="input 'image' must have dtype float32, got int64$"):
        w(x.long())  # no cast hint: casting would not make integers floating
    with pytest.raises(TypeError, match=r"wrapped model\(image, scale: float = 1.0\).*missing a required argument: 'image'"):
        w(img=x)
    cast = tf.wrap(m, x, cast_inputs=True)
    torch.testing.assert_close(cast(x.double()), m(x))
    assert "image: [batch, 3, 8, 8] float32" in repr(w)
    fixed = tf.wrap(m, x, dynamic_dims=())  # no dynamic dim: the batch size is the example's too
    with pytest.raises(InputError, match=r"input 'image' must have shape \[2, 3, 8, 8\], got \[5, 3, 8, 8\]"):
        fixed(torch.randn(5, 3, 8, 8))


def test_compiled_artifact_gets_the_original_signature_back():
    m = st.TwoInputs().eval()
    ids = torch.randint(0, 50, (3, 6))
    mask = torch.ones(3, 6, dtype=torch.long)
    with torch.no_grad():
        traced = torch.jit.trace(m, (ids, mask))
    w = tf.wrap(traced, {"input_ids": ids, "attention_mask": mask}, like=m, dynamic_dims=(0, 1))
    assert list(inspect.signature(w).parameters) == ["input_ids", "attention_mask"]
    torch.testing.assert_close(w(attention_mask=mask, input_ids=ids), m(ids, mask))
    torch.testing.assert_close(w(ids[:, :4], mask[:, :4]), m(ids[:, :4], mask[:, :4]))  # seq dim declared dynamic
    with pytest.raises(InputError, match="input 'attention_mask' must have shape"):
        w(ids, torch.ones(3, 6, 2, dtype=torch.long))
    strict = tf.wrap(m, {"input_ids": ids, "attention_mask": mask}, dynamic_dims={"input_ids": (0,)})
    with pytest.raises(InputError, match=r"'input_ids' must have shape \[batch, 6\]"):
        strict(ids[:, :4], mask[:, :4])


def test_nested_and_plain_callables_and_no_example():
    def f(pair):
        a, b = pair
        return a + b
    x = (torch.randn(2, 3), torch.randn(2, 3))
    w = tf.wrap(f, (x,))
    torch.testing.assert_close(w(x), x[0] + x[1])
    with pytest.raises(InputError, match=r"input 'pair\[1\]' must have shape \[batch, 3\]"):
        w((x[0], torch.randn(2, 4)))
    free = tf.wrap(Net())  # no example inputs: signature and device only
    assert free(torch.randn(1, 3, 5, 5)).shape == (1, 4)
    with pytest.raises(TypeError, match="needs a model"):
        tf.wrap(42)


def test_runs_under_inference_mode_and_keeps_outputs_on_input_device():
    m = Net()
    w = tf.wrap(m, torch.randn(1, 3, 4, 4))
    out = w(torch.randn(2, 3, 4, 4))
    assert out.is_inference() and not m.training
    assert tf.wrap(m, inference_mode=False)(torch.randn(1, 3, 4, 4)).requires_grad


@pytest.mark.skipif(not torch.cuda.is_available(), reason="moving inputs across devices needs a CUDA GPU")
def test_inputs_move_to_the_model_device_and_back():
    m = Net().cuda()
    x = torch.randn(2, 3, 8, 8)
    w = tf.wrap(m, x.cuda())
    out = w(x)
    assert out.device.type == "cpu"
    torch.testing.assert_close(out, m(x.cuda()).cpu())
    with pytest.raises(InputError, match="expected device cuda"):
        tf.wrap(m, x.cuda(), move_inputs=False)(x)


def test_inputs_reach_the_wrapped_model_in_the_form_of_the_example():
    # engines compiled from a dict batch (OpenVINO, ONNX Runtime) take keyword inputs only, traced ones
    # positionals only: a call that names the same inputs is passed on as the example was given
    class Pair(nn.Module):
        def forward(self, input_ids, attention_mask, **kwargs):   # Hugging Face forwards take **kwargs
            return (input_ids * attention_mask).float()
    calls = []

    def engine(*args, **kwargs):
        calls.append((len(args), sorted(kwargs)))
        return Pair()(*args, **kwargs)
    ids, mask = torch.ones(2, 4, dtype=torch.long), torch.ones(2, 4, dtype=torch.long)
    w = tf.wrap(engine, {"input_ids": ids, "attention_mask": mask}, like=Pair())
    w(input_ids=ids, attention_mask=mask)
    w(ids, attention_mask=mask)
    w(ids, mask)
    assert calls == [(0, ["attention_mask", "input_ids"])] * 3
    calls.clear()
    w = tf.wrap(engine, (ids, mask), like=Pair())
    w(input_ids=ids, attention_mask=mask)
    w(ids, mask)
    assert calls == [(2, [])] * 2
    calls.clear()
    w(ids, mask, extra=ids)   # other inputs than the example's: passed on as called
    assert calls == [(2, ["extra"])]


def test_a_model_with_kwargs_compiled_from_a_dict_runs_however_it_is_called():
    pytest.importorskip("onnxruntime")

    class Encoder(nn.Module):   # the shape of a Hugging Face encoder's forward
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(50, 8)
            self.out = nn.Linear(8, 8)

        def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, **kwargs):
            h = self.emb(input_ids) * attention_mask.unsqueeze(-1)
            return {"last_hidden_state": self.out(h)}
    m = Encoder().eval()
    ids = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    w = tf.wrap(tf.compile(m, batch, backend="onnxruntime"), batch, like=m)
    ref = m(**batch)["last_hidden_state"]
    for out in (w(**batch), w(ids, batch["attention_mask"]), w(ids, attention_mask=batch["attention_mask"])):
        torch.testing.assert_close(out["last_hidden_state"], ref, atol=1e-5, rtol=1e-4)
    with pytest.raises(TypeError, match="token_type_ids"):
        w(**batch, token_type_ids=ids)
