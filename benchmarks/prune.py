"""Structured pruning and sparse kernels on this CPU: what they buy, what they cost.

Run under the shared lock (2 cores for everyone):
    flock /tmp/torchfast-bench.lock .venv/bin/python benchmarks/prune.py
Sections: vision (resnet50 / mobilenet_v3_large / vit_b_16, batch 1 and 8, 30% and 50%), digits
(trained CNN accuracy vs ratio, before/after fine-tune), minilm (embedding cosine vs heads/neurons
removed), sparse (CSR/BSR Linear vs dense on MiniLM shapes), tp (Torch-Pruning on resnet50 as reference),
refit (least-squares refit of the layers that lost inputs vs slicing alone, on torchvision nets trained on
the digits and on all-MiniLM-L6-v2; no labels, no training).
Latency ratios are interleaved medians (torchfast.measure.compare_latency) in one run.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torchfast as tf  # noqa: E402
from torchfast.measure import compare_latency, count_flops
from torchfast.report import format_table


def _params(m):
    return sum(p.numel() for p in m.parameters())


def vision(runs1: int, runs8: int) -> str:
    import torchvision
    rows = []
    models = [("resnet50", lambda: torchvision.models.resnet50()),
              ("mobilenet_v3_large", lambda: torchvision.models.mobilenet_v3_large()),
              ("vit_b_16", lambda: torchvision.models.vit_b_16())]
    bar = tqdm(total=len(models) * 2, desc="vision")
    for name, ctor in models:
        torch.manual_seed(0)
        m = ctor().eval()
        x1, x8 = torch.randn(1, 3, 224, 224), torch.randn(8, 3, 224, 224)
        f0 = count_flops(m, x1)
        for amount in (0.3, 0.5):
            t0 = time.perf_counter()
            pm, rep = tf.prune(m, tf.ChannelPruning(amount=amount, importance="l2"), example_inputs=x1, inplace=False)
            t_prune = time.perf_counter() - t0
            row = {"model": name, "amount": amount, "params (M)": _params(pm) / 1e6,
                   "params ratio": _params(pm) / _params(m), "GFLOPs/img": count_flops(pm, x1) / 1e9,
                   "FLOPs ratio": count_flops(pm, x1) / f0, "prune time (s)": t_prune}
            for bs, x, runs in ((1, x1, runs1), (8, x8, runs8)):
                row[f"speedup b{bs}"] = compare_latency(m, pm, x, runs=runs, warmup=2, threads=2).speedup
            rows.append(row)
            bar.update(1)
        rows.insert(len(rows) - 2, {"model": name, "amount": 0.0, "params (M)": _params(m) / 1e6, "params ratio": 1.0,
                                    "GFLOPs/img": f0 / 1e9, "FLOPs ratio": 1.0})
    bar.close()
    return format_table(rows)


def torch_pruning_reference(runs8: int) -> str:
    try:
        import torch_pruning as tp
    except ImportError:
        return "torch-pruning is not installed (pip install 'torchfast[bench]'); reference skipped"
    import torchvision
    torch.manual_seed(0)
    m = torchvision.models.resnet50().eval()
    x1, x8 = torch.randn(1, 3, 224, 224), torch.randn(8, 3, 224, 224)
    t0 = time.perf_counter()
    ours, _ = tf.prune(m, tf.ChannelPruning(amount=0.5, importance="l2"), example_inputs=x1, inplace=False)
    t_ours = time.perf_counter() - t0
    theirs = copy.deepcopy(m)
    t0 = time.perf_counter()
    pruner = tp.pruner.MetaPruner(theirs, x1, importance=tp.importance.MagnitudeImportance(p=2), pruning_ratio=0.5,
                                  ignored_layers=[theirs.fc])
    pruner.step()
    t_tp = time.perf_counter() - t0
    rows = []
    for name, pm, t in (("torchfast", ours, t_ours), ("torch-pruning 1.6.1", theirs, t_tp)):
        rows.append({"tool (resnet50, 50%, L2)": name, "params (M)": _params(pm) / 1e6,
                     "GFLOPs/img": count_flops(pm, x1) / 1e9, "prune time (s)": t,
                     "speedup b8 vs original": compare_latency(m, pm, x8, runs=runs8, warmup=2, threads=2).speedup})
    return format_table(rows)


def digits() -> str:
    from torchfast.zoo.digits import trained_cnn
    m, d = trained_cnn(seed=0)
    train = [(d.x_train[i:i + 64], d.y_train[i:i + 64]) for i in range(0, len(d.x_train), 64)]
    base = d.eval_fn(m)
    x = d.x_test[:64]
    rows = [{"amount": 0.0, "importance": "-", "params ratio": 1.0, "acc pruned (%)": 100 * base,
             "acc pruned + BN re-estimated (%)": None, "acc after 2-epoch fine-tune (%)": None}]
    for amount in tqdm((0.3, 0.5, 0.7), desc="digits"):
        for imp in ("l2", "bn_scale", "taylor"):
            cfg = tf.ChannelPruning(amount=amount, importance=imp)
            bare, _ = tf.prune(m, dataclasses.replace(cfg, recalibrate_bn=False), example_inputs=x,
                               calibration=d.calibration())
            # unlabeled training images: 7 batches re-estimate the BatchNorm statistics, the 8th judges them
            pm, rep = tf.prune(m, cfg, example_inputs=x, calibration=d.calibration())
            acc = d.eval_fn(pm)
            cmp = compare_latency(m, pm, x, runs=20, threads=2)
            pm, frep = tf.finetune(pm, train, F.cross_entropy, epochs=2, lr=2e-3)
            # the tables in RESULTS.md give after/before; the report says "x fewer" (before/after)
            rows.append({"amount": amount, "importance": imp, "params ratio": 1 / rep.summary["params: x fewer"],
                         "FLOPs ratio": 1 / rep.summary["FLOPs: x fewer"], "speedup b64": cmp.speedup,
                         "acc pruned (%)": 100 * d.eval_fn(bare), "acc pruned + BN re-estimated (%)": 100 * acc,
                         "acc after 2-epoch fine-tune (%)": 100 * d.eval_fn(pm)})
    return format_table(rows)


def minilm(runs: int) -> str:
    from torchfast.zoo.minilm import batches, embedding_cosine, load_minilm
    m, tok = load_minilm()
    ev = batches(tok, n_batches=4, batch_size=8, seq_len=128, offset=64)
    ex = batches(tok, n_batches=1, batch_size=8, seq_len=128)[0]
    heads = [f"encoder.layer.{i}.attention.self" for i in range(6)]
    mlp = [f"encoder.layer.{i}.intermediate.dense" for i in range(6)]
    settings = [("heads", 0.25, heads), ("heads", 0.5, heads), ("MLP neurons", 0.25, mlp), ("MLP neurons", 0.5, mlp),
                ("both", 0.25, heads + mlp), ("both", 0.5, heads + mlp)]
    rows = []
    for what, amount, layers in tqdm(settings, desc="minilm"):
        for imp in ("l2", "taylor"):
            cfg = tf.ChannelPruning(amount=0.0, importance=imp, layer_amounts={n: amount for n in layers})
            pm, rep = tf.prune(m, cfg, example_inputs=ex, calibration=ev[:2], inplace=False)
            rows.append({"removed": what, "amount": amount, "importance": imp,
                         "params ratio": 1 / rep.summary["params: x fewer"],  # after/before, as in RESULTS.md
                         "embedding cosine (held-out)": embedding_cosine(m, pm, ev[2:]),
                         "speedup b8 s128": compare_latency(m, pm, ex, runs=runs, warmup=2, threads=2).speedup
                         if imp == "l2" else None})
    return format_table(rows)


def sparse(runs: int) -> str:
    from torchfast.prune.sparse import SparseLinear, magnitude_mask
    rows = []
    shapes = [(384, 384), (384, 1536), (1536, 384)]
    for (i, o) in tqdm(shapes, desc="sparse"):
        for n_rows in (128, 1024):
            x = torch.randn(n_rows, i)
            for sp in (0.5, 0.7, 0.8, 0.9, 0.95, 0.98):
                torch.manual_seed(0)
                w = torch.randn(o, i)
                w = w * magnitude_mask(w, sp)
                row = {"layer": f"{i}->{o}", "rows": n_rows, "sparsity": sp}
                for layout in ("csr", "bsr"):
                    sl = SparseLinear(w, None, layout, 16)
                    row[f"{layout} speedup"] = compare_latency(lambda t: F.linear(t, w), sl, x, runs=runs,
                                                               threads=2).speedup
                rows.append(row)
    return format_table(rows)


def refit(models: tuple[str, ...] = ("resnet18", "mobilenet_v3_large", "resnet50")) -> str:
    """Fidelity on held-out data after pruning, with BatchNorm re-estimation only vs with the refit first."""
    from torchfast.measure import fidelity
    from torchfast.zoo.minilm import batches, embedding_cosine, load_minilm
    from torchfast.zoo.vision import trained_torchvision
    rows = []
    settings = [(name, a) for name in models for a in (0.3, 0.5)] + [("all-MiniLM-L6-v2", a) for a in (0.25, 0.5)]
    bar = tqdm(total=len(settings) * 2, desc="refit")
    for name in models:
        m, d = trained_torchvision(name)
        unlabeled = [d.x_train[i:i + 64] for i in range(0, len(d.x_train), 64)]
        for amount in (0.3, 0.5):
            for how in (False, None):
                t0 = time.perf_counter()
                pm, rep = tf.prune(m, tf.ChannelPruning(amount=amount, reconstruct=how), example_inputs=unlabeled[0],
                                   calibration=unlabeled)
                took = time.perf_counter() - t0
                f = fidelity(m, pm, d.x_test)
                rows.append({"model": f"{name} (trained on digits)", "amount": amount,
                             "after pruning": "refit + BN re-estimated" if how is None else "BN re-estimated",
                             "FLOPs ratio": 1 / rep.summary["FLOPs: x fewer"], "test cosine": f.cosine,
                             "worst cosine": f.worst_cosine, "accuracy (%)": 100 * d.eval_fn(pm),
                             "accuracy unpruned (%)": 100 * d.eval_fn(m), "prune time (s)": took,
                             "note": rep.summary.get("layers refit", "-")})
                bar.update(1)
    m, tok = load_minilm()
    cal = batches(tok, n_batches=8, batch_size=8, seq_len=128)
    held = batches(tok, n_batches=6, batch_size=8, seq_len=128, offset=64)
    layers = [f"encoder.layer.{i}.{part}" for i in range(6) for part in ("attention.self", "intermediate.dense")]
    for amount in (0.25, 0.5):
        for how in (False, None):
            t0 = time.perf_counter()
            pm, rep = tf.prune(m, tf.ChannelPruning(amount=0.0, layer_amounts={n: amount for n in layers},
                                                    reconstruct=how), example_inputs=cal[0], calibration=cal)
            rows.append({"model": "all-MiniLM-L6-v2 (heads + MLP neurons)", "amount": amount,
                         "after pruning": "refit" if how is None else "sliced",
                         "FLOPs ratio": 1 / rep.summary["FLOPs: x fewer"], "test cosine": embedding_cosine(m, pm, held),
                         "prune time (s)": time.perf_counter() - t0, "note": rep.summary.get("layers refit", "-")})
            bar.update(1)
    return format_table(rows)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", default="vision,tp,digits,minilm,sparse,refit")
    p.add_argument("--runs", type=int, default=15)
    a = p.parse_args(argv)
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    for s in a.sections.split(","):
        t = time.perf_counter()
        if s == "vision":
            out = vision(a.runs, max(5, a.runs // 2))
        elif s == "tp":
            out = torch_pruning_reference(max(5, a.runs // 2))
        elif s == "digits":
            out = digits()
        elif s == "minilm":
            out = minilm(max(5, a.runs // 2))
        elif s == "sparse":
            out = sparse(a.runs)
        elif s == "refit":
            out = refit()
        else:
            raise SystemExit(f"unknown section {s!r}")
        print(f"\n### {s} ({time.perf_counter() - t:.0f}s)\n\n{out}\n", flush=True)
    print(f"total {time.perf_counter() - t0:.0f}s, torch {torch.__version__}, {torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
