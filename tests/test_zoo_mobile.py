"""The trained depthwise-separable digits net and its TF-"same"-padding twin: same weights, same outputs."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from torchfast.quant.canonical import canonicalize
from torchfast.zoo.mobile import DigitsMobileNet, SameConv2d, paddings_agree, trained_mobilenet


def test_the_trained_net_is_accurate_and_its_same_padding_twin_agrees(digits_mobilenet):
    model, data = digits_mobilenet
    assert data.eval_fn(model) >= 0.97
    same, same_data = trained_mobilenet(same_padding=True)        # cached weights: no second training
    assert same_data is data
    convs = [m for m in same.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 22 and all(type(m) is SameConv2d for m in convs)
    assert sum(m.groups > 1 for m in convs) == 7                  # the depthwise convs
    for k, v in model.state_dict().items():
        assert torch.equal(v, same.state_dict()[k]), k
    with torch.no_grad():
        torch.testing.assert_close(same(data.x_test[:64]), model(data.x_test[:64]), rtol=1e-5, atol=1e-5)
    with pytest.raises(Exception):
        torch.fx.symbolic_trace(same)                             # as EfficientNet ports: not traceable
    plain, changes = canonicalize(same, data.calibration(n_batches=2))
    assert len(changes) == 22 and all(c.action == "replaced by Conv2d" for c in changes)
    assert [type(m) for m in plain.modules()] == [type(m) for m in model.modules()]
    with torch.no_grad():
        torch.testing.assert_close(plain(data.x_test[:64]), model(data.x_test[:64]), rtol=1e-5, atol=1e-5)


def test_variants_build_and_even_sizes_are_where_the_paddings_differ():
    assert paddings_agree(33) and paddings_agree(17) and not paddings_agree(32)
    x = torch.randn(2, 1, 32, 32)
    for act in ("relu6", "hardswish", "silu"):
        torch.manual_seed(0)
        a = DigitsMobileNet(width=8, act=act).eval()
        b = DigitsMobileNet(width=8, act=act, same_padding=True).eval()
        b.load_state_dict(a.state_dict())
        with torch.no_grad():
            assert a(x).shape == b(x).shape == (2, 10)
            assert not torch.allclose(a(x), b(x))                 # 32x32: asymmetric TF pads shift the grid
    with pytest.raises(ValueError, match="act must be one of"):
        DigitsMobileNet(act="gelu")
