"""Int8Static's activation x weight precision: the most precise pair the kernels compute exactly here."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import torchfast as tf
from torchfast.config import ConfigError
from torchfast.quant.static_precision import Precision, static_precision


def _packed_weights(q: nn.Module) -> list[torch.Tensor]:
    return [m.weight().int_repr() for m in q.modules()
            if type(m).__module__.startswith("torch.ao.nn.quantized") and callable(getattr(m, "weight", None))]


def test_plan_follows_full_range():
    assert static_precision(False) == Precision(7, 8)
    assert static_precision(True).activation_bits == 8
    assert static_precision(None) in (Precision(8, 8), Precision(8, 7), Precision(7, 8))
    assert static_precision(None).describe().endswith("-bit weights")


def test_default_precision_is_exact_at_the_top_of_both_ranges():
    """Every activation at 255 (or 127) times every weight at the top of its range: no int16 saturation."""
    p = static_precision()
    model = nn.Sequential(nn.Conv2d(64, 8, 3, bias=False), nn.Flatten(), nn.Linear(8 * 4 * 4, 4, bias=False)).eval()
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "weight"):
                m.weight.fill_(1.0)
    cal = [torch.ones(2, 64, 6, 6), torch.zeros(2, 64, 6, 6)]
    q, rep = tf.quantize(model, tf.Int8Static(calibration=cal, progress=False, bias_correction=False,
                                              equalize=False, islands=False, keep_slower=True))
    assert rep.summary["activation bits"] == p.activation_bits and rep.summary["weight bits"] == p.weight_bits
    weights = _packed_weights(q)
    assert weights and all(int(w.abs().max()) <= 2 ** (p.weight_bits - 1) for w in weights)
    x = torch.ones(2, 64, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(q(x), model(x), rtol=2e-2, atol=0)


def test_seven_bit_activations_on_request():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    cal = [torch.rand(4, 3, 10, 10) for _ in range(2)]
    q, rep = tf.quantize(model, tf.Int8Static(calibration=cal, progress=False, full_range=False, keep_slower=True))
    assert (rep.summary["activation bits"], rep.summary["weight bits"]) == (7, 8)
    assert all(int(w.abs().max()) > 64 for w in _packed_weights(q))


@pytest.mark.skipif(static_precision() == Precision(7, 8), reason="the int8 kernels here compute 7-bit activations only")
def test_eight_bit_activations_are_closer_to_float():
    """Per-tensor activations are the coarse part of int8: a bit more of them beats a bit less of per-channel
    weights (the pre-VNNI pair) or costs nothing (VNNI)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(32, 16, 1)).eval()
    g = torch.Generator().manual_seed(0)
    cal = [torch.rand(8, 3, 16, 16, generator=g) for _ in range(4)]
    held = [torch.rand(8, 3, 16, 16, generator=g) for _ in range(3)]

    def error(full_range):
        q, _ = tf.quantize(model, tf.Int8Static(calibration=cal, progress=False, full_range=full_range,
                                                bias_correction=False, equalize=False, keep_slower=True))
        with torch.no_grad():
            return sum(float((q(x) - model(x)).square().sum()) for x in held) / \
                sum(float(model(x).square().sum()) for x in held)
    default, seven = error(None), error(False)
    print(f"int8 static relative squared error: {default:.3g} ({static_precision().describe()}), "
          f"{seven:.3g} (7-bit activations)")
    assert default < 0.7 * seven


@pytest.mark.parametrize("bad", ["yes", 1, 8])
def test_full_range_must_be_a_flag(bad):
    with pytest.raises(ConfigError, match="Int8Static.full_range"):
        tf.Int8Static(full_range=bad)


def test_full_range_round_trips():
    cfg = tf.Int8Static(full_range=False)
    assert tf.Int8Static.from_dict(cfg.to_dict()).full_range is False
