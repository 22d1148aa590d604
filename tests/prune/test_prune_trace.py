"""Channel splits in the dependency graph: ``chunk`` (sizes re-derived from the width) is pruned
symmetrically; ``split`` at sizes the model's code holds (CSP blocks: ``x.split(self.c, 1)``) keeps those
channels, so the pruned model still runs and computes what the masked original computes."""
from __future__ import annotations

import copy

import torch
from torch import nn

import torchfast as tf
from torchfast.prune.api import plan
from torchfast.prune.structured import mask_removed


class CSPBlock(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c = 16
        self.conv_in = nn.Conv2d(3, 32, 1)
        self.branch = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU())
        self.conv_out = nn.Conv2d(32, 8, 1)

    def forward(self, x):
        a, b = torch.relu(self.conv_in(x)).split(self.c, dim=1)   # fixed size from the model's own attribute
        return self.conv_out(torch.cat([a, self.branch(b)], 1))


class ChunkBlock(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv_in = nn.Conv2d(3, 32, 1)
        self.left = nn.Conv2d(16, 8, 3, padding=1)
        self.right = nn.Conv2d(16, 8, 3, padding=1)

    def forward(self, x):
        a, b = torch.relu(self.conv_in(x)).chunk(2, dim=1)
        return self.left(a) + self.right(b)


def _pruned_and_masked(model, x, cfg):
    g, _, _, removed = plan(copy.deepcopy(model), x, cfg)
    masked = mask_removed(copy.deepcopy(model), g, removed)
    pruned, rep = tf.prune(model, cfg, example_inputs=x)
    return pruned, masked, removed, rep


def test_a_split_at_fixed_sizes_keeps_its_channels_and_the_model_runs():
    model, x = CSPBlock().eval(), torch.randn(2, 3, 8, 8)
    pruned, masked, removed, rep = _pruned_and_masked(model, x, tf.ChannelPruning(amount=0.5))
    assert pruned.conv_in.out_channels == 32                      # the split input stays whole
    assert any("splits the channel dimension at fixed sizes" in str(r.get("reason")) for r in rep.rows)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), masked(x), atol=1e-5, rtol=1e-4)


def test_chunk_halves_lose_the_same_positions():
    model, x = ChunkBlock().eval(), torch.randn(2, 3, 8, 8)
    pruned, masked, removed, _ = _pruned_and_masked(model, x, tf.ChannelPruning(amount=0.25))
    assert removed and pruned.conv_in.out_channels == 24 and pruned.left.in_channels == 12 == pruned.right.in_channels
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), masked(x), atol=1e-5, rtol=1e-4)
