"""Quantization on real models: size, latency (interleaved vs fp32, medians), fidelity.

Run under the shared lock:  flock /tmp/torchfast-bench.lock .venv/bin/python benchmarks/quantize.py
Sections: article (digits MLP + CNN), minilm, resnet. ``--only`` picks some; ``--runs`` trades time for noise.
"""
from __future__ import annotations

import argparse
import copy
import time
import warnings

import torch
from tqdm.auto import tqdm

import torchfast as tf
from torchfast.measure import compare_latency, fidelity, size_of
from torchfast.report import format_table

warnings.simplefilter("ignore")
PT2E = False


def _lowrank(model, calibration, example_inputs, **kw):
    try:
        out, _ = tf.decompose(model, tf.LowRank(**kw), calibration=calibration, example_inputs=example_inputs,
                              inplace=False)
        return out
    except Exception as e:  # low-rank may refuse (speed guard) or be unavailable
        print(f"  low-rank skipped: {type(e).__name__}: {e}")
        return None


def article(runs: int, threads: int, bar) -> list[dict]:
    from torchfast.zoo.digits import trained_cnn, trained_mlp
    rows = []
    for label, (model, data) in (("MLP 784-128-10 (28x28)", trained_mlp()), ("digits CNN (16x16)", trained_cnn())):
        x = data.x_test[:64]
        base_acc = data.eval_fn(model)
        cands = [("fp32", model)]
        q, _ = tf.quantize(model, tf.Int8Dynamic(), example_inputs=x); cands.append(("int8 dynamic", q))
        q, _ = tf.quantize(model, tf.Int8Static(calibration=data.calibration(), progress=False), example_inputs=x)
        cands.append(("int8 static", q))
        if PT2E and "CNN" in label:
            q, _ = tf.quantize(model, tf.Int8Static(calibration=data.calibration(), method="pt2e", progress=False),
                               example_inputs=x)
            q(x)  # compile outside the timed region
            cands.append(("int8 static PT2E + inductor", q))
        lr = _lowrank(model, data.calibration(), x, method="auto", flops_reduction=2.0, allocation="global")
        if lr is not None:
            q, _ = tf.quantize(lr, tf.Int8Static(calibration=data.calibration(), progress=False), example_inputs=x)
            cands.append(("low-rank (2x fewer FLOPs, global) + int8 static", q))
        for name, m in cands:
            cmp = compare_latency(model, m, x, runs=runs, threads=threads)
            rows.append({"model": label, "variant": name, "size (MB)": size_of(m).mb,
                         "latency b64 (ms)": cmp.candidate.median_ms, "speedup": cmp.speedup,
                         "accuracy (%)": 100 * data.eval_fn(m), "Δ acc (pts)": 100 * (data.eval_fn(m) - base_acc)})
            bar.update(1)
    return rows


def minilm(runs: int, threads: int, bar) -> list[dict]:
    from torchfast.zoo.minilm import batches, embedding_cosine, load_minilm
    model, tok = load_minilm()
    bl = batches(tok, n_batches=4, batch_size=8, seq_len=128)
    x = bl[0]
    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stock = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8)
    ours, rep = tf.quantize(model, tf.Int8Dynamic(), example_inputs=x)
    cands = [("fp32", model), ("torch.ao quantize_dynamic, stock (per-tensor, 7-bit)", stock),
             (f"torchfast Int8Dynamic (auto: {rep.summary['layers quantized']} int8 layers, "
              f"{rep.summary['activation bits']}-bit act)", ours)]
    lr = _lowrank(model, bl[1:3], x, method="svd", flops_reduction=1.25, allocation="global")
    if lr is not None:
        q, _ = tf.quantize(lr, tf.Int8Dynamic(), example_inputs=x)
        cands.append(("low-rank (1.25x fewer FLOPs, global) + Int8Dynamic", q))
    for name, m in cands:
        cmp = compare_latency(model, m, x, runs=runs, threads=threads)
        rows.append({"model": "all-MiniLM-L6-v2 b8 s128", "variant": name, "size (MB)": size_of(m).mb,
                     "latency (ms)": cmp.candidate.median_ms, "speedup": cmp.speedup,
                     "embedding cosine": embedding_cosine(model, m, bl)})
        bar.update(1)
    return rows


def _resnet(name: str) -> torch.nn.Module:
    import torchvision
    torch.manual_seed(0)
    m = getattr(torchvision.models, name)()
    m.train()  # random weights: re-estimate BN statistics or activations collapse and int8 says nothing
    with torch.no_grad():
        for _ in range(4):
            m(torch.randn(8, 3, 224, 224))
    return m.eval()


def resnet(runs: int, threads: int, bar, names=("resnet18", "resnet50")) -> list[dict]:
    rows = []
    for name in names:
        model = _resnet(name)
        cal = [torch.randn(8, 3, 224, 224) for _ in range(4)]
        q, rep = tf.quantize(model, tf.Int8Static(calibration=cal, progress=False), example_inputs=cal[0][:1])
        fid = fidelity(model, q, [torch.randn(8, 3, 224, 224)])
        for bs in (1, 8):
            x = torch.randn(bs, 3, 224, 224)
            cmp = compare_latency(model, q, x, runs=runs if bs == 1 else max(5, runs // 2), threads=threads)
            rows.append({"model": f"{name} (random weights, BN re-estimated)", "batch": bs,
                         "fp32 (ms)": cmp.baseline.median_ms, "int8 static FX (ms)": cmp.candidate.median_ms,
                         "speedup": cmp.speedup, "size fp32/int8 (MB)": f"{size_of(model).mb:.1f}/{size_of(q).mb:.1f}",
                         "output cosine": fid.cosine, "top-1 agree": fid.top1_agreement})
            bar.update(1)
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--only", nargs="*", default=["article", "minilm", "resnet"])
    p.add_argument("--runs", type=int, default=12)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--pt2e", action="store_true", help="add the PT2E + inductor row for the digits CNN (compiles)")
    a = p.parse_args(argv)
    global PT2E
    PT2E = a.pt2e
    torch.set_num_threads(a.threads)
    total = {"article": 7 + a.pt2e, "minilm": 4, "resnet": 4}
    t0 = time.perf_counter()
    out = []
    with tqdm(total=sum(total[s] for s in a.only), desc="quantize benchmark", unit="row") as bar:
        for section in a.only:
            rows = globals()[section](a.runs, a.threads, bar)
            out.append(f"### {section}\n\n" + format_table(rows))
    print(f"\n{a.threads} threads, torch {torch.__version__}, latency interleaved with fp32, medians "
          f"({a.runs} runs), {time.perf_counter() - t0:.0f}s\n")
    print("\n\n".join(out))


if __name__ == "__main__":
    main()
