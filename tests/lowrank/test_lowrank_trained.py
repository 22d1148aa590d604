"""Fidelity on real trained models: the digits CNN and the pretrained all-MiniLM-L6-v2."""
from __future__ import annotations

import pytest
import torch

import torchfast as tf
from torchfast.measure import count_flops


def test_digits_cnn_global_data_aware_keeps_accuracy(digits_cnn):
    model, data = digits_cnn
    base = data.eval_fn(model)
    x = data.x_test[:64]
    out, rep = tf.decompose(model, tf.LowRank(method="auto", flops_reduction=2.0, allocation="global"),
                            calibration=data.calibration(), example_inputs=x, inplace=False)
    ratio = count_flops(model, x) / count_flops(out, x)
    assert ratio >= 1.5, rep
    assert data.eval_fn(out) >= base - 0.01, rep
    # the classifier head is cheap and sensitive: global allocation keeps it
    assert not rep.where(layer="classifier.4")[0]["applied"]


def test_data_aware_beats_weight_svd_on_output_error(digits_cnn):
    model, data = digits_cnn
    cal = data.calibration(n_batches=4)
    cfg = tf.LowRank(method="channel", ratio=0.25)
    _, free = tf.decompose(model, cfg.replace(data_aware=False), calibration=cal, inplace=False)
    _, aware = tf.decompose(model, cfg, calibration=cal, inplace=False)
    for a, f in zip(aware.rows, free.rows):
        if a.get("output_err") is not None and a["applied"]:
            assert a["output_err"] <= f["output_err"] + 1e-6, (a, f)
            assert a["weight_err"] >= f["weight_err"] - 1e-6  # weight SVD is optimal for the weight error


def test_budget_search_stays_within_budget(digits_cnn):
    model, data = digits_cnn
    xs, ys = data.x_train[-256:], data.y_train[-256:]  # held-out-ish slice; never the test set

    def val(m):
        with torch.inference_mode():
            return (m(xs).argmax(-1) == ys).float().mean().item()

    cfg = tf.LowRank(method="channel", eval_fn=val, budget=0.01, search_ratios=(0.125, 0.25, 0.5), progress=False)
    out, rep = tf.decompose(model, cfg, calibration=data.calibration(n_batches=2), inplace=False)
    s = rep.summary
    assert s["search_metric_after"] >= s["search_metric_before"] - 0.01
    assert abs(val(out) - s["search_metric_after"]) < 1e-6
    assert s["layers_factorized"] >= 1


def test_minilm_whitened_svd_beats_weight_svd(minilm):
    from torchfast.zoo.minilm import batches, embedding_cosine, encode, sentences
    model, tok = minilm
    texts = sentences(64)
    cal = [encode(tok, texts[i:i + 32], seq_len=64, pad_to_max=False) for i in (0, 32)]  # ~2k real tokens
    ev = batches(tok, n_batches=1, batch_size=16, seq_len=48, offset=200)
    cfg = tf.LowRank(method="svd", ratio=0.5, min_flops_reduction=0, exclude=("pooler",))  # the encoder's Linears
    free, _ = tf.decompose(model, cfg, inplace=False)
    aware, rep = tf.decompose(model, cfg, calibration=cal, inplace=False)
    assert rep.summary["layers_factorized"] == 36
    c_free, c_aware = embedding_cosine(model, free, ev), embedding_cosine(model, aware, ev)
    assert c_aware > c_free + 0.1 and c_aware > 0.8, (c_free, c_aware)
