"""Zero pads in front of int8 convs: folded into the int8 conv (padding (k-1)/2 kept for fbgemm's depthwise
kernels, output cropped) or run on the integers, bit-exact against torch.ao's float round trip."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from torchfast.quant.canonical import PaddedConv, SamePad2d
from torchfast.quant.int8_pad import fold_int8_pads, pad_backend_config, pad_int8


def _convert(model, calib, backend_config):
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    prepared = prepare_fx(copy.deepcopy(model), get_default_qconfig_mapping("x86"), (calib[0],),
                          backend_config=backend_config)
    with torch.no_grad():
        for b in calib:
            prepared(b)
    return convert_fx(prepared, backend_config=backend_config)


def _net(pad_stem, pad_dw3, pad_dw5):
    torch.manual_seed(0)

    def block(pad, conv):
        return nn.Sequential(PaddedConv(pad, conv), nn.BatchNorm2d(conv.out_channels), nn.ReLU())
    # the pads' inputs are int8 op outputs, whose observer the pad shares (a model input gets its own)
    net = nn.Sequential(nn.Conv2d(3, 8, 1),
                        block(pad_stem, nn.Conv2d(8, 16, 3, stride=2, bias=False)),        # not depthwise
                        block(pad_dw3, nn.Conv2d(16, 16, 3, stride=2, groups=16, bias=False)),
                        block(pad_dw5, nn.Conv2d(16, 16, 5, stride=2, groups=16, bias=False)),
                        nn.Conv2d(16, 8, 1))
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(8, 3, 32, 32))                      # BN statistics that are not the identity
    return net.eval()


def test_constant_pads_fold_into_the_int8_convs_exactly():
    model = _net(nn.ZeroPad2d((0, 1, 0, 1)), nn.ZeroPad2d((0, 1, 0, 1)), nn.ZeroPad2d((1, 2, 1, 2)))
    calib = [torch.randn(4, 3, 32, 32) for _ in range(4)]
    q = _convert(model, calib, pad_backend_config())
    xs = calib[:1] + [torch.randn(2, 3, 30, 26)]                # the crop follows the input size
    with torch.no_grad():
        before = [q(x) for x in xs]
    assert fold_int8_pads(q) == {"folded": 3, "on int8": 0}
    with torch.no_grad():
        for x, b in zip(xs, before):
            assert torch.equal(q(x), b)
    code = q.code
    assert code.count(".dequantize()") == 1                     # only the model's output leaves int8
    dw3, dw5 = q.get_submodule("2.0.conv"), q.get_submodule("3.0.conv")
    assert dw3.padding == (1, 1) and dw5.padding == (2, 2)    # (k - 1) / 2: fbgemm's fast depthwise path
    assert q.get_submodule("1.0.conv").padding == (2, 2)       # not depthwise: the pad folds in completely
    assert code.count("pad_int8(") == 2 and code.count("crop_conv_output(") == 3


def test_size_dependent_pads_run_on_the_integers():
    model = _net(SamePad2d((3, 3), (2, 2)), SamePad2d((3, 3), (2, 2)), SamePad2d((5, 5), (2, 2)))
    calib = [torch.randn(4, 3, 32, 32) for _ in range(4)]
    q = _convert(model, calib, pad_backend_config())
    xs = [calib[0], torch.randn(2, 3, 31, 33)]
    with torch.no_grad():
        before = [q(x) for x in xs]
    assert fold_int8_pads(q) == {"folded": 0, "on int8": 3}
    with torch.no_grad():
        for x, b in zip(xs, before):
            assert torch.equal(q(x), b)


def test_with_torch_aos_own_config_only_matching_qparams_change_and_exactly():
    from torch.ao.quantization.backend_config.x86 import get_x86_backend_config

    model = _net(nn.ZeroPad2d((0, 1, 0, 1)), nn.ZeroPad2d((0, 1, 0, 1)), nn.ZeroPad2d((1, 2, 1, 2)))
    calib = [torch.randn(4, 3, 32, 32) for _ in range(4)]
    q = _convert(model, calib, get_x86_backend_config())     # each pad's output observed on its own
    with torch.no_grad():
        before = q(calib[0])
    counts = fold_int8_pads(q)
    assert counts["on int8"] == 0 and counts["folded"] <= 3
    with torch.no_grad():
        assert torch.equal(q(calib[0]), before)


def test_pad_int8_is_the_quantized_zero_pad():
    x = torch.quantize_per_tensor(torch.randn(2, 8, 5, 6), 0.05, 7, torch.quint8)
    got = pad_int8(x, [0, 1, 2, 1])
    want = F.pad(x, (0, 1, 2, 1))
    assert got.q_scale() == want.q_scale() and got.q_zero_point() == want.q_zero_point()
    assert torch.equal(got.int_repr(), want.int_repr())
