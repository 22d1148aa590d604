"""Bias correction: the int8 model of a corrected float model is closer to the float model."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import torchfast as tf
from torchfast.modules import state_snapshot, training_flags
from torchfast.quant.bias_correction import BiasCorrectionError, correct_bias
from torchfast.quant.calibrate import CalibrationError
from torchfast.quant.static_precision import static_precision


def _lattice(conv: nn.Conv2d, seed: int, frac: float = 0.45) -> nn.Conv2d:
    """Weights at (k + 0.45) steps of their own int8 grid (8- or 7-bit, as Int8Static uses here): every one
    rounds down by 0.45 of a step, so on non-negative inputs int8 shifts each output channel's mean by a
    clear, systematic amount."""
    half_range = 2 ** (static_precision().weight_bits - 1) - 0.5   # symmetric scale = max |w| / half_range
    g = torch.Generator().manual_seed(seed)
    cout = conv.out_channels
    step = 0.002 + 0.002 * torch.rand(cout, generator=g)
    k = int(half_range) // 2
    w = (torch.randint(-k, k, conv.weight.shape, generator=g).float() + frac) * step.view(-1, 1, 1, 1)
    w.view(cout, -1)[:, 0] = half_range * step   # the largest weight sets the symmetric scale to exactly `step`
    with torch.no_grad():
        conv.weight.copy_(w)
        if conv.bias is not None:
            conv.bias.zero_()
    return conv


def _fixture() -> nn.Module:
    return nn.Sequential(_lattice(nn.Conv2d(4, 16, 3, padding=1), 0), nn.ReLU(),
                         _lattice(nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), 1), nn.ReLU(),
                         _lattice(nn.Conv2d(16, 8, 1), 2)).eval()


def _data(n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(8, 4, 12, 12, generator=g) for _ in range(n)]


def _int8_error(model: nn.Module, reference: nn.Module, cal, held_out) -> float:
    q, _ = tf.quantize(model, tf.Int8Static(calibration=cal, progress=False, bias_correction=False, equalize=False))
    with torch.no_grad():
        return sum(float((q(x) - reference(x)).pow(2).sum()) for x in held_out) / \
            sum(float(reference(x).pow(2).sum()) for x in held_out)


@pytest.mark.parametrize("sequential", [True, False])
def test_corrected_int8_model_is_closer_to_float(sequential):
    model = _fixture()
    model[1].train()  # a submodule flag of the caller's that must survive
    before, flags = state_snapshot(model), training_flags(model)
    cal, held_out = _data(4, 0), _data(3, 1)
    corrected, rep = correct_bias(model, cal, sequential=sequential)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items()) and training_flags(model) == flags
    assert corrected[1].training and not corrected[0].training
    model.eval(), corrected.eval()
    for a, b in zip(model, corrected):  # only biases move; the depthwise conv gained one
        if isinstance(a, nn.Conv2d):
            assert torch.equal(a.weight, b.weight) and b.bias is not None
    assert corrected[2].bias.abs().max() > 0
    plain, fixed = _int8_error(model, model, cal, held_out), _int8_error(corrected, model, cal, held_out)
    print(f"int8 static relative squared error: {plain:.3g} plain, {fixed:.3g} bias-corrected")
    assert fixed < plain / 3
    assert [r["layer"] for r in rep.where(applied=True)] == ["0", "2", "4"]
    assert all(r["mean |shift| after"] < r["mean |shift| before"] / 3 for r in rep.where(applied=True))


def test_activation_rounding_variant_and_linear_layers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    cal = [torch.rand(16, 12) for _ in range(3)]
    corrected, rep = correct_bias(model, cal, activations=True)
    assert rep.summary["activations rounded"] is True and len(rep.where(applied=True)) == 2
    with torch.no_grad():
        assert float((corrected(cal[0]) - model(cal[0])).abs().max()) < 0.05  # a correction, not a new model


class Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)

    def forward(self, x):
        return self.b(self.a(self.a(x)))


def test_layer_run_twice_is_left_alone():
    model = Shared().eval()
    corrected, rep = correct_bias(model, [torch.rand(4, 8)])
    row = next(r for r in rep.rows if r["layer"] == "a")
    assert row["applied"] is False and "runs 2 times" in row["reason"]
    assert torch.equal(corrected.a.bias, model.a.bias)


def test_bad_input_names_the_problem():
    model = _fixture()
    with pytest.raises(CalibrationError, match="calibration"):
        correct_bias(model, None)
    with pytest.raises(CalibrationError, match="calibration batch 0"):
        correct_bias(model, [torch.rand(2, 3, 8, 8)])
    with pytest.raises(BiasCorrectionError, match="per_channel"):
        correct_bias(model, _data(1, 0), per_channel="yes")
    with pytest.raises(tf.TorchfastError, match="nope"):
        correct_bias(model, _data(1, 0), exclude=["nope"])


@pytest.mark.parametrize("parametrized", [False, True], ids=["plain weights", "parametrized weight"])
def test_simulation_twin_leaves_the_model_and_the_result_consistent(parametrized):
    """The rounded simulation shares the model's other tensors: its rounded weights and corrected biases must
    never leak into the user's model or into the corrected copy (a bias-free conv gets its bias on the copy)."""
    from torch.nn.utils import parametrize

    class Scaled(nn.Module):
        def forward(self, w):
            return w * 1.0

    torch.manual_seed(0)
    model = nn.Sequential(_lattice(nn.Conv2d(4, 16, 3, padding=1, bias=False), 0), nn.ReLU(),
                          _lattice(nn.Conv2d(16, 8, 3, padding=1), 1)).eval()
    if parametrized:
        parametrize.register_parametrization(model[2], "weight", Scaled())
    before = state_snapshot(model)
    batches = [torch.rand(4, 4, 8, 8) for _ in range(3)]
    out, rep = correct_bias(model, batches, sequential=False)
    after = state_snapshot(model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert model[0].bias is None and out[0].bias is not None
    assert torch.equal(out[0].weight, model[0].weight)  # float weights: the rounding stayed on the simulation
    assert rep.summary["layers corrected"] == 2
    row = next(r for r in rep.rows if r["layer"] == "2")  # the correction went into the copy once, not twice
    assert float((out[2].bias - model[2].bias).abs().max()) == pytest.approx(row["max |correction|"], rel=1e-5)
