"""int8 static (FX): accuracy on the trained digits models, observers, calibration forms, untraceable code."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import torchfast as tf
from torchfast.modules import state_snapshot


def _is_int8(model) -> int:
    return sum(type(m).__module__.startswith("torch.ao.nn.intrinsic.quantized") or
               type(m).__module__.startswith("torch.ao.nn.quantized") for m in model.modules())


@pytest.mark.parametrize("observer", ["histogram", "minmax", "percentile"])
def test_digits_cnn_int8_static_accuracy(digits_cnn, observer):
    model, data = digits_cnn
    before = state_snapshot(model)
    q, rep = tf.quantize(model, tf.Int8Static(calibration=data.calibration(), observer=observer, progress=False,
                                                   keep_slower=True),
                         example_inputs=data.x_test[:32])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    base, acc = data.eval_fn(model), data.eval_fn(q)
    assert acc >= base - 0.005, (observer, base, acc)
    assert _is_int8(q) >= 5
    convs = [r for r in rep.rows if r["type"] == "Conv2d"]
    assert convs and all(r["applied"] for r in convs)
    assert all("folded into" in r["scheme"] for r in rep.rows if r["type"] == "BatchNorm2d")
    assert rep.summary["observer"] == observer


def test_digits_mlp_int8_static_accuracy(digits_mlp):
    model, data = digits_mlp
    q, rep = tf.quantize(model, tf.Int8Static(calibration=data.calibration(), progress=False))
    assert data.eval_fn(q) >= data.eval_fn(model) - 0.005
    assert rep.summary["layers quantized"] == 2


def test_calibration_forms_dataloader_and_pairs(digits_cnn):
    model, data = digits_cnn
    ds = torch.utils.data.TensorDataset(data.x_train[:128], data.y_train[:128])
    loader = torch.utils.data.DataLoader(ds, batch_size=32)  # yields (x, y): labels are dropped
    q, rep = tf.quantize(model, tf.Int8Static(calibration=loader, observer="minmax", progress=False),
                         example_inputs=data.x_test[:8])
    assert rep.summary["calibration batches"] == 4
    assert data.eval_fn(q) >= data.eval_fn(model) - 0.01
    gen = (data.x_train[i:i + 16] for i in range(0, 64, 16))  # a one-shot generator works too
    q2, rep2 = tf.quantize(model, tf.Int8Static(calibration=gen, observer="minmax", max_batches=2, progress=False))
    assert rep2.summary["calibration batches"] == 2


def test_multi_input_tuple_batches():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.head = nn.Linear(16, 32), nn.Linear(8, 32), nn.Linear(32, 4)

        def forward(self, x, y):
            return self.head(torch.relu(self.a(x) + self.b(y)))

    torch.manual_seed(0)
    m = Two().eval()
    cal = [(torch.randn(16, 16), torch.randn(16, 8)) for _ in range(4)]
    q, rep = tf.quantize(m, tf.Int8Static(calibration=cal, progress=False))
    x = (torch.randn(8, 16), torch.randn(8, 8))
    assert torch.nn.functional.cosine_similarity(m(*x), q(*x)).mean() > 0.99


def test_untraceable_module_stays_float_and_children_quantize():
    class Gate(nn.Module):  # data-dependent control flow: torch.fx cannot trace it
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(32, 32)

        def forward(self, x):
            if x.sum() > 0:
                return self.lin(x)
            return -self.lin(x)

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), Gate(), nn.Linear(32, 4)).eval()
    cal = [torch.randn(16, 16) for _ in range(4)]
    q, rep = tf.quantize(m, tf.Int8Static(calibration=cal, progress=False, islands=False))  # int8 pinned
    assert any("was not quantized as a whole" in n and "2" in n for n in rep.notes)
    assert not _is_int8(q[2]) or "GraphModule" in type(q[2]).__name__ or isinstance(q[2], nn.Module)
    x = torch.randn(8, 16)
    assert torch.nn.functional.cosine_similarity(m(x), q(x)).mean() > 0.98
    assert rep.where(layer="0")[0]["applied"]


def test_exclude_keeps_layer_float(digits_cnn):
    model, data = digits_cnn
    q, rep = tf.quantize(model, tf.Int8Static(calibration=data.calibration(2), exclude=("classifier.4",), progress=False))
    row = rep.where(layer="classifier.4")[0]
    assert not row["applied"] and row["reason"] == "excluded by Int8Static.exclude ('classifier.4')"
    assert isinstance(q.get_submodule("classifier.4"), nn.Linear)


def test_recipe_stage_uses_recipe_calibration(digits_cnn):
    from torchfast.recipe import apply_recipe
    model, data = digits_cnn
    q, reports = apply_recipe(model, [tf.Int8Static(progress=False)], example_inputs=data.x_test[:8],
                              calibration=data.calibration(4))
    assert reports[0].summary["calibration batches"] == 4
    assert data.eval_fn(q) >= data.eval_fn(model) - 0.005


def test_lowrank_then_int8_static(digits_cnn):
    model, data = digits_cnn
    try:
        lr, _ = tf.decompose(model, tf.LowRank(ratio=0.5))
    except Exception as e:
        pytest.skip(f"torchfast.lowrank not usable: {e}")
    q, rep = tf.quantize(lr, tf.Int8Static(calibration=data.calibration(), progress=False))
    assert data.eval_fn(q) >= data.eval_fn(lr) - 0.01
    assert rep.summary["layers quantized"] >= 5


def test_pt2e_flow_converts_with_dynamic_batch(digits_cnn):
    """PT2E (torch.export + X86InductorQuantizer): checked on the converted graph before inductor compiles it
    (compiling takes minutes on 2 cores; benchmarks/quantize.py --pt2e times it)."""
    model, data = digits_cnn
    q, rep = tf.quantize(model, tf.Int8Static(calibration=data.calibration(2), method="pt2e", progress=False),
                         example_inputs=data.x_test[:8])
    assert rep.summary["method"] == "pt2e" and rep.summary["quantize/dequantize pairs"] > 0
    converted = q._orig_mod  # the torch.compile wrapper holds the converted graph
    with torch.no_grad():
        for n in (8, 32):  # batch dimension exported as dynamic
            x = data.x_test[:n]
            assert torch.nn.functional.cosine_similarity(model(x), converted(x)).mean() > 0.99


def test_int8_static_frees_every_build_it_does_not_return():
    """Each variant (plain, bias correction, equalization) is a full FX build; torch.ao memoizes modules
    in a process-wide cache. Once the result is dropped, none of them may stay alive."""
    import gc
    import weakref

    from torch.fx import GraphModule

    def live_graph_modules():
        gc.collect()
        return {id(o) for o in gc.get_objects() if isinstance(o, GraphModule)}

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(),
                          nn.Flatten(), nn.Linear(8 * 4 * 4, 4)).eval()
    x = torch.randn(2, 3, 8, 8)
    before = live_graph_modules()
    q, rep = tf.quantize(model, tf.Int8Static(calibration=[torch.randn(2, 3, 8, 8) for _ in range(4)],
                                              progress=False, keep_slower=True), example_inputs=x)
    assert isinstance(q, GraphModule) and "float rewrite before int8" in rep.summary  # variants were built
    assert live_graph_modules() - before == {id(q)}
    gone = weakref.ref(q)
    del q, rep
    gc.collect()
    assert gone() is None and live_graph_modules() <= before
