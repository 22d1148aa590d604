"""Structured pruning on real architectures: exactness at 0%, pruned == masked, widths, params, interface."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torchvision
from torch import nn

import torchfast as tf
from torchfast.modules import first_tensor, state_snapshot
from torchfast.prune.api import plan
from torchfast.prune.structured import mask_removed


def _out(model, x):
    with torch.no_grad():
        return first_tensor(model(**x) if isinstance(x, dict) else model(x))


def _check_pruned_equals_masked(model, x, cfg, atol=1e-4):
    """The rebuilt smaller model computes what the original computes with the removed channels zeroed."""
    work = copy.deepcopy(model).eval()
    g, fams, blocked, removed = plan(work, x, cfg)
    assert removed, "nothing was pruned"
    masked = mask_removed(copy.deepcopy(model).eval(), g, removed)
    pruned, rep = tf.prune(model, cfg, example_inputs=x, inplace=False)
    ref, got = _out(masked, x), _out(pruned, x)
    assert got.shape == _out(model, x).shape
    scale = ref.abs().max().clamp_min(1e-6)
    assert (ref - got).abs().max() / scale < atol
    return pruned, rep, fams


def _params(m):
    return sum(p.numel() for p in m.parameters())


# ------------------------------------------------------------------------------ digits CNN (trained)
def test_digits_zero_amount_is_exact(digits_cnn):
    model, data = digits_cnn
    x = data.x_test[:16]
    pm, rep = tf.prune(model, tf.ChannelPruning(amount=0.0), example_inputs=x, inplace=False)
    assert torch.equal(_out(pm, data.x_test), _out(model, data.x_test))
    assert rep.summary["layers rebuilt"] == 0


@pytest.mark.parametrize("amount", [0.3, 0.5])
def test_digits_widths_params_and_masking(digits_cnn, amount):
    model, data = digits_cnn
    pm, rep, fams = _check_pruned_equals_masked(model, data.x_test[:16], tf.ChannelPruning(amount=amount))
    k = [w - math.floor(w * amount) for w in (32, 64, 128, 256)]
    f = pm.features
    assert [f[0].out_channels, f[3].out_channels, f[7].out_channels, pm.classifier[1].out_features] == k
    assert pm.classifier[4].out_features == 10 and f[0].in_channels == 1  # interface kept
    # params by hand: convs (no bias) + BN (2/ch) + flatten(4x4) -> Linear -> Linear(10)
    expect = (1 * k[0] * 9 + 2 * k[0] + k[0] * k[1] * 9 + 2 * k[1] + k[1] * k[2] * 9 + 2 * k[2]
              + k[2] * 16 * k[3] + k[3] + k[3] * 10 + 10)
    assert _params(pm) == expect == rep.summary["params after"]


def test_digits_finetune_recovers(digits_cnn):
    model, data = digits_cnn
    pm, _ = tf.prune(model, tf.ChannelPruning(amount=0.5, importance="bn_scale"), example_inputs=data.x_test[:16], inplace=False)
    train = [(data.x_train[i:i + 64], data.y_train[i:i + 64]) for i in range(0, len(data.x_train), 64)]
    pm, rep = tf.finetune(pm, train, torch.nn.functional.cross_entropy, epochs=1, lr=2e-3, eval_fn=data.eval_fn)
    assert rep.summary["metric after"] >= 0.95
    assert rep.summary["metric after"] > rep.summary["metric before"]


def test_inplace_commits_into_user_tree(digits_cnn):
    model, data = digits_cnn
    first = model.features[0]
    out, _ = tf.prune(model, tf.ChannelPruning(amount=0.5), example_inputs=data.x_test[:4], inplace=True)
    assert out is model and model.features[0] is not first and model.features[0].out_channels == 16


# ------------------------------------------------------------------------------ torchvision CNNs
def test_resnet18_residual_groups():
    torch.manual_seed(0)
    m = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    pm, rep, fams = _check_pruned_equals_masked(m, x, tf.ChannelPruning(amount=0.5))
    assert len(fams) == 12  # 4 residual streams + the inner channels of 8 blocks
    # one residual stream: every conv writing into / reading from it shares the same width
    assert pm.layer1[0].conv2.out_channels == pm.layer1[1].conv2.out_channels == pm.conv1.out_channels == 32
    assert pm.layer2[0].downsample[0].out_channels == pm.layer2[0].conv2.out_channels == 64
    assert pm.fc.out_features == 10 and pm.conv1.in_channels == 3
    assert 1 / 0.3 < rep.summary["params: x fewer"] < 1 / 0.2


def test_densenet_concat():
    torch.manual_seed(0)
    m = torchvision.models.DenseNet(growth_rate=8, block_config=(2, 2), num_init_features=16, bn_size=2,
                                    num_classes=5).eval()
    pm, rep, _ = _check_pruned_equals_masked(m, torch.randn(2, 3, 32, 32), tf.ChannelPruning(amount=0.5))
    assert pm.features.denseblock1.denselayer2.norm1.num_features == 8 + 4  # 16->8 init + 8->4 growth
    assert pm.classifier.out_features == 5


def test_mobilenet_v3_depthwise_and_se():
    torch.manual_seed(0)
    m = torchvision.models.mobilenet_v3_small(num_classes=10).eval()
    pm, rep, _ = _check_pruned_equals_masked(m, torch.randn(1, 3, 32, 32), tf.ChannelPruning(amount=0.3))
    blk = pm.features[4].block
    dw = blk[1][0]
    assert dw.groups == dw.in_channels == dw.out_channels == blk[0][0].out_channels < 240
    assert blk[2].fc2.out_channels == dw.out_channels and blk[2].fc1.in_channels == dw.out_channels


def test_vgg_flatten_linear_and_global_scope():
    torch.manual_seed(0)
    m = torchvision.models.VGG(torchvision.models.vgg.make_layers([8, "M", 16, "M"]), num_classes=4,
                               init_weights=True).eval()
    m.avgpool = nn.AdaptiveAvgPool2d((2, 2))
    m.classifier = nn.Sequential(nn.Linear(16 * 4, 32), nn.ReLU(), nn.Linear(32, 4))
    pm, rep, _ = _check_pruned_equals_masked(m, torch.randn(2, 3, 16, 16),
                                             tf.ChannelPruning(amount=0.4, scope="global", importance="l1"))
    assert pm.classifier[0].in_features == pm.features[3].out_channels * 4
    assert rep.summary["channels/heads removed"] == math.floor(0.4 * (8 + 16 + 32))


# ------------------------------------------------------------------------------ attention
def test_vit_heads_and_mlp():
    torch.manual_seed(0)
    m = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4,
                                             hidden_dim=64, mlp_dim=128, num_classes=10).eval()
    nn.init.normal_(m.heads.head.weight)  # torchvision zero-inits the head, which would hide any error
    pm, rep, _ = _check_pruned_equals_masked(m, torch.randn(2, 3, 32, 32), tf.ChannelPruning(amount=0.5))
    att = pm.encoder.layers[0].self_attention
    assert att.num_heads == 2 and att.q_proj.out_features == 32 and pm.encoder.layers[0].mlp[0].out_features == 64
    kept = [r for r in rep.where(applied=False) if "class_token" in r["reason"]]
    assert kept, "the hidden dim is tied to the class token parameter and must be reported"


def test_bert_minilm_heads_and_neurons(minilm):
    from torchfast.zoo.minilm import batches, embedding_cosine
    model, tok = minilm
    b = batches(tok, n_batches=1, batch_size=2, seq_len=16)
    p0, _ = tf.prune(model, tf.ChannelPruning(amount=0.0), example_inputs=b[0], inplace=False)
    assert embedding_cosine(model, p0, b) > 0.99999
    pm, rep, _ = _check_pruned_equals_masked(model, b[0], tf.ChannelPruning(amount=0.5), atol=1e-3)
    sa = pm.encoder.layer[0].attention.self
    assert sa.num_attention_heads == 6 and sa.query.out_features == 192
    assert pm.encoder.layer[0].attention.output.dense.in_features == 192
    assert pm.encoder.layer[0].intermediate.dense.out_features == 768
    assert _out(pm, b[0]).shape[-1] == 384  # hidden size (the interface) kept
