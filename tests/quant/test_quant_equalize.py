"""Cross-layer equalization and BatchNorm folding: exact in float, and the per-channel ranges even out."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchfast as tf
from torchfast.modules import state_snapshot, training_flags
from torchfast.quant.equalize import ChannelClamp, EqualizeError, equalize, fold_batchnorm


def _randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) * 3 + 0.05)
                m.weight.copy_(torch.rand(n, generator=g) * 3 + 0.02)   # per-channel ranges 100x apart
                m.bias.copy_(torch.rand(n, generator=g) - 0.5)
    return model.eval()


def _cbr(cin, cout, k=1, groups=1, act=nn.ReLU):
    layers = [nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, act()) if act else nn.Sequential(*layers)


class Block(nn.Module):
    """1x1 expand -> 3x3 depthwise -> 1x1 project, residual add (MobileNetV2 style)."""

    def __init__(self, c: int, act=nn.ReLU) -> None:
        super().__init__()
        self.expand = _cbr(c, 4 * c, act=act)
        self.dw = _cbr(4 * c, 4 * c, 3, groups=4 * c, act=act)
        self.project = _cbr(4 * c, c, act=None)

    def forward(self, x):
        return x + self.project(self.dw(self.expand(x)))


class TinyMobileNet(nn.Module):
    def __init__(self, act=nn.ReLU) -> None:
        super().__init__()
        self.stem = _cbr(3, 8, 3, act=act)
        self.blocks = nn.Sequential(Block(8, act), Block(8, act))
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> float:
    err = float((a - b).abs().max() / b.abs().max())
    assert err <= tol, err
    return err


def _out(model, x):
    with torch.no_grad():
        return model(x)


def test_fold_batchnorm_is_exact_and_leaves_identity():
    torch.manual_seed(0)
    model = _randomize_bn(TinyMobileNet())
    x = torch.randn(2, 3, 12, 12)
    folded = fold_batchnorm(model)
    _close(_out(folded, x), _out(model, x))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert isinstance(folded.stem[1], nn.Identity) and folded.stem[0].bias is not None
    neutral = fold_batchnorm(model, replace_with="neutral")
    _close(_out(neutral, x), _out(model, x))
    assert isinstance(neutral.stem[1], nn.BatchNorm2d) and float(neutral.stem[1].running_var.min()) == 1.0
    assert isinstance(model.stem[1], nn.BatchNorm2d)  # the caller's model is untouched


def test_depthwise_chains_are_equalized_exactly():
    torch.manual_seed(0)
    model = _randomize_bn(TinyMobileNet())
    model.blocks[1].train()  # a submodule flag of the caller's that must survive
    before, flags = state_snapshot(model), training_flags(model)
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        model.eval()
        ref = model(x)
        model.blocks[1].train()
    out, rep = equalize(model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert training_flags(model) == flags
    assert out.blocks[1].training and not out.blocks[0].training
    out.eval()
    _close(_out(out, x), ref)
    pairs = {(r["layer"], r["next"]) for r in rep.where(applied=True)}
    assert ("blocks.0.expand.0", "blocks.0.dw.0") in pairs and ("blocks.0.dw.0", "blocks.0.project.0") in pairs
    assert ("stem.0", "blocks.0.expand.0") not in pairs  # the stem's output also feeds the residual add
    dw = next(r for r in rep.rows if r["layer"] == "blocks.0.dw.0")
    assert dw["out range ratio after"] < dw["out range ratio before"] / 3
    assert rep.summary["chains found by"] == "torch.fx graph" and rep.summary["batchnorms folded"] == 7


def test_relu6_skipped_or_clamped():
    torch.manual_seed(0)
    model = _randomize_bn(TinyMobileNet(act=nn.ReLU6))
    x = torch.randn(2, 3, 12, 12) * 3
    ref = _out(model, x)
    skipped, rep = equalize(model)
    assert not rep.where(applied=True)
    assert any("ReLU6 is not scale-equivariant" in r["reason"] for r in rep.where(applied=False))
    clamped, rep = equalize(model, relu6="clamp")
    assert len(rep.where(applied=True)) == 4
    assert isinstance(clamped.blocks[0].expand[2], ChannelClamp)
    _close(_out(clamped, x), ref)


def test_torchvision_mobilenet_v2_and_resnet18():
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    x = torch.randn(1, 3, 32, 32)
    mb = _randomize_bn(tv.models.mobilenet_v2())
    out, rep = equalize(mb, relu6="clamp")
    _close(_out(out, x), _out(mb, x))
    assert len(rep.where(applied=True)) == 33 + 3  # expand->dw, dw->project per block; first block dw->project
    rn = _randomize_bn(tv.models.resnet18())
    out, rep = equalize(rn)
    _close(_out(out, x), _out(rn, x))
    assert {r["layer"] for r in rep.where(applied=True)} == {f"layer{i}.{j}.conv1" for i in range(1, 5) for j in (0, 1)}


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.ReLU(), nn.Conv2d(16, 4, 1))

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace this
            x = x * 2
        return self.body(x)


def test_sequential_fallback_when_the_model_does_not_trace():
    torch.manual_seed(0)
    model = _randomize_bn(Untraceable())
    x = torch.randn(2, 3, 8, 8)
    out, rep = equalize(model)
    assert rep.summary["chains found by"].startswith("nn.Sequential adjacency")
    assert len(rep.where(applied=True)) == 2
    _close(_out(out, x), _out(model, x))


class WeightStandardized(nn.Conv2d):
    def forward(self, x):
        w = (self.weight - self.weight.mean((1, 2, 3), keepdim=True)) / self.weight.std((1, 2, 3), keepdim=True)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


class Shapes(nn.Module):
    """Chains rescaling would break: a shared conv, a weight-transforming subclass, a SiLU in between."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(4, 4, 1)
        self.shared = nn.Conv2d(4, 4, 1)
        self.ws = nn.Sequential(WeightStandardized(4, 4, 1), nn.ReLU())
        self.b = nn.Conv2d(4, 4, 1)
        self.c = nn.Sequential(nn.Conv2d(4, 4, 1), nn.SiLU(), nn.Conv2d(4, 4, 1))
        self.mlp = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 4))

    def forward(self, x):
        x = self.shared(torch.relu(self.a(x)))
        x = self.shared(x)
        x = self.b(self.ws(x))
        return self.mlp(self.c(x).mean((2, 3)))


def test_unsafe_chains_are_left_alone_and_listed():
    torch.manual_seed(0)
    model = Shapes().eval()
    x = torch.randn(2, 4, 6, 6)
    out, rep = equalize(model)
    _close(_out(out, x), _out(model, x))
    assert {(r["layer"], r["next"]) for r in rep.where(applied=True)} == {("b", "c.0"), ("mlp.0", "mlp.2")}
    reasons = {r["layer"]: r["reason"] for r in rep.where(applied=False)}
    assert "SiLU is not scale-equivariant" in reasons["c.0"]
    assert torch.equal(out.shared.weight, model.shared.weight) and torch.equal(out.ws[0].weight, model.ws[0].weight)


def test_bad_arguments_name_the_problem():
    with pytest.raises(EqualizeError, match="iterations"):
        equalize(TinyMobileNet(), iterations=0)
    with pytest.raises(EqualizeError, match="relu6"):
        equalize(TinyMobileNet(), relu6="relu")
    with pytest.raises(TypeError, match="nn.Module"):
        equalize("model")


def test_exclude_leaves_named_layers_alone():
    torch.manual_seed(0)
    model = _randomize_bn(TinyMobileNet())
    out, rep = equalize(model, exclude=["blocks.0.dw.*"])
    layers = {r["layer"] for r in rep.where(applied=True)}
    assert "blocks.0.dw.0" not in layers and "blocks.0.expand.0" not in layers and "blocks.1.dw.0" in layers
    assert torch.equal(out.blocks[0].dw[0].weight, model.blocks[0].dw[0].weight)
    assert any("excluded by equalize.exclude" in r["reason"] for r in rep.where(applied=False))
    with pytest.raises(tf.TorchfastError, match="nope"):
        equalize(model, exclude=["nope"])
