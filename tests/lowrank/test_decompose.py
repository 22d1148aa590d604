"""The SVD behind every factorization: the Gram route taken for long matrices gives LAPACK's answer."""
from __future__ import annotations

import importlib

import pytest
import torch
from torch import nn

import torchfast as tf

dec = importlib.import_module("torchfast.lowrank.decompose")  # the module, not the function of that name


def _decaying(m: int, n: int, seed: int = 0) -> torch.Tensor:
    """A matrix with singular values from 1 down to 1e-4, like a trained layer's."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(m, k, generator=g))
    V, _ = torch.linalg.qr(torch.randn(n, k, generator=g))
    return (U * torch.logspace(0, -4, k)) @ V.T


@pytest.mark.parametrize("shape", [(64, 300), (300, 64)])
def test_gram_route_matches_lapack(shape, monkeypatch):
    monkeypatch.setattr(dec, "GRAM_MIN_SIDE", 32)
    M = _decaying(*shape)
    U1, S1, V1 = torch.linalg.svd(M, full_matrices=False)
    U2, S2, V2 = dec.thin_svd(M)
    assert U2.shape == U1.shape and S2.shape == S1.shape and V2.shape == V1.shape
    torch.testing.assert_close(S2[:32], S1[:32], rtol=1e-4, atol=0)
    for r in (8, 32):  # the same best rank-r approximation
        best = (U1[:, :r] * S1[:r]) @ V1[:r]
        got = (U2[:, :r] * S2[:r]) @ V2[:r]
        assert (got - best).norm() / M.norm() < 1e-5
    full = (U2 * S2) @ V2
    assert (full - M).norm() / M.norm() < 1e-5  # exact at full rank, tiny directions included
    assert torch.allclose(U2.T @ U2 if shape[0] <= shape[1] else V2 @ V2.T, torch.eye(min(shape)), atol=1e-4)


def test_gram_route_rank_deficient(monkeypatch):
    monkeypatch.setattr(dec, "GRAM_MIN_SIDE", 8)
    g = torch.Generator().manual_seed(1)
    M = torch.randn(40, 5, generator=g) @ torch.randn(5, 90, generator=g)  # rank 5 of 40
    U, S, Vh = dec.thin_svd(M)
    assert torch.isfinite(U).all() and torch.isfinite(Vh).all()
    assert (S[5:] < 1e-3 * S[0]).all()
    assert ((U[:, :5] * S[:5]) @ Vh[:5] - M).norm() / M.norm() < 1e-5


def test_long_linear_decomposes_exactly_at_full_rank(monkeypatch):
    monkeypatch.setattr(dec, "GRAM_MIN_SIDE", 16)
    torch.manual_seed(0)
    layer = nn.Sequential(nn.Linear(96, 48), nn.ReLU(), nn.Linear(48, 10)).eval()
    x = torch.randn(4, 96)
    out, rep = tf.decompose(layer, tf.LowRank(rank={"0": 48}, min_flops_reduction=0.0, progress=False),
                            example_inputs=x)
    assert type(out[0]).__name__.startswith("LowRank")
    torch.testing.assert_close(out(x), layer(x), rtol=1e-4, atol=1e-5)
