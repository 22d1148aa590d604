"""Self-distillation without labels: how much of what pruning / low-rank cost does tf.distill win back?

Run under the shared lock (2 cores for everyone):
    flock /tmp/torchfast-bench.lock .venv/bin/python benchmarks/distill.py
The trained digits CNN (scikit-learn digits, real test set) is pruned / factorized, then distilled from
the original on the training images alone: labels are used only to report test accuracy. For reference,
the same student fine-tuned 2 epochs on the labelled training set (torchfast.finetune). Last, optimize()
with the unlabeled calibration batches: the pruning stage it used to roll back, recovered.
``--sections batchnorm``: mobilenet_v3_large trained on the digits, pruned 50% and refit, distilled with its
BatchNorm layers in train mode vs with their statistics fixed (``distill(batchnorm=...)``), and with mixup
copies of the batches (``augment=...``).
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torchfast as tf  # noqa: E402
from torchfast.measure import compare_latency, fidelity  # noqa: E402
from torchfast.report import format_table  # noqa: E402


def students(m, d, x):
    yield "prune 30% (l2)", tf.prune(m, tf.ChannelPruning(amount=0.3, importance="l2"), example_inputs=x)[0]
    yield "prune 50% (l2)", tf.prune(m, tf.ChannelPruning(amount=0.5, importance="l2"), example_inputs=x)[0]
    yield "lowrank ratio=0.5", tf.decompose(m, tf.LowRank(ratio=0.5), calibration=d.calibration())[0]


def recovery(steps: int, runs: int, sections: tuple[str, ...] = ("students", "optimize")) -> str:
    from torchfast.zoo.digits import trained_cnn
    m, d = trained_cnn(seed=0)
    x = d.x_test[:64]
    unlabeled = [d.x_train[i:i + 64] for i in range(0, len(d.x_train), 64)]     # images only
    labelled = [(d.x_train[i:i + 64], d.y_train[i:i + 64]) for i in range(0, len(d.x_train), 64)]
    base = d.eval_fn(m)
    rows = [{"model": "original", "recovery": "-", "test acc (%)": 100 * base, "drop (pt)": 0.0, "cosine": 1.0,
             "top-1 agree": 1.0}]

    def row(name, how, s, steps_done=None, seconds=None, labels="no"):
        f = fidelity(m, s, d.x_test)
        acc = d.eval_fn(s)
        rows.append({"model": name, "recovery": how, "labels": labels, "test acc (%)": 100 * acc,
                     "drop (pt)": 100 * (base - acc), "cosine": f.cosine, "top-1 agree": f.top1_agreement,
                     "steps": steps_done, "time (s)": seconds})

    t_all = time.perf_counter()
    for name, s in (students(m, d, x) if "students" in sections else ()):
        row(name, "none", s)
        t0 = time.perf_counter()
        ds, rep = tf.distill(s, m, unlabeled, steps=steps, progress=False)
        row(name, "tf.distill", ds, rep.summary["steps"], time.perf_counter() - t0)
        t0 = time.perf_counter()
        fs, frep = tf.finetune(copy.deepcopy(s), labelled, F.cross_entropy, epochs=2, lr=2e-3)  # trains in place
        row(name, "finetune 2 epochs", fs, frep.summary["steps"], time.perf_counter() - t0, labels="yes")
        print(f"{name}: done ({time.perf_counter() - t_all:.0f}s)", flush=True)
    if "students" in sections:
        print(format_table(rows), flush=True)
    if "optimize" not in sections:
        return ""

    # optimize(): the pruning stage that used to be rolled back, recovered from 8 unlabeled batches of 32
    t0 = time.perf_counter()
    res = tf.optimize(m, x, "prune:amount=0.3", calibration=d.calibration(), eval_fn=d.eval_fn, runs=runs,
                      progress=False)
    took = time.perf_counter() - t0
    keep = ("stage", "applied", "speedup", "cosine", "cosine before recovery", "metric", "metric drop",
            "metric drop before recovery", "note")
    opt_rows = [{k: r.get(k) for k in keep} for r in res.report.rows]
    out = (f"\noptimize(model, x, 'prune:amount=0.3', calibration=data.calibration(), eval_fn=...) "
           f"({took:.0f}s):\n\n" + format_table(opt_rows))
    cmp = compare_latency(m, res.transformed, x, runs=runs, threads=2)
    out += f"\n\npruned + distilled vs original, batch 64, eager: {cmp.speedup:.2f}x"
    return out


def batchnorm_modes(steps: int, models: tuple[str, ...] = ("mobilenet_v3_large",)) -> str:
    """distill(batchnorm=...) on torchvision nets trained on the digits, pruned 50% and refit (no labels):
    BatchNorm in train mode vs statistics fixed, checked on the test images the search never sees."""
    from torchfast.zoo.vision import trained_torchvision
    rows = []
    for name in models:
        m, d = trained_torchvision(name)
        unlabeled = [d.x_train[i:i + 64] for i in range(0, len(d.x_train), 64)]
        calib = unlabeled[:18]
        pruned, _ = tf.prune(m, tf.ChannelPruning(amount=0.5, round_to=8), example_inputs=calib[0], calibration=calib)
        f = fidelity(m, pruned, d.x_test)
        rows.append({"model": f"{name} (trained on digits), pruned 50% + refit", "batchnorm": "-", "steps": 0,
                     "test cosine": f.cosine, "test acc (%)": 100 * d.eval_fn(pruned),
                     "unpruned acc (%)": 100 * d.eval_fn(m)})
        for mode, augment in (("train", "none"), ("auto", "none"), ("auto", "auto")):
            t0 = time.perf_counter()
            s, rep = tf.distill(pruned, m, calib, steps=steps, batchnorm=mode, augment=augment, progress=False)
            f = fidelity(m, s, d.x_test)
            rows.append({"model": "", "batchnorm": rep.summary["batchnorm"], "augment": rep.summary["augment"],
                         "steps": rep.summary["steps"],
                         "best step": rep.summary["best step"], "test cosine": f.cosine,
                         "test acc (%)": 100 * d.eval_fn(s), "time (s)": time.perf_counter() - t0})
        print(f"{name}: done", flush=True)
    return format_table(rows)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300, help="distillation steps per student (default 300)")
    p.add_argument("--runs", type=int, default=15, help="timed runs per model in optimize() (default 15)")
    p.add_argument("--sections", default="students,optimize",
                   help="students (distill vs fine-tune per student), optimize (the recovered stage), batchnorm "
                        "(train-mode vs fixed statistics on pruned torchvision nets); default students,optimize")
    a = p.parse_args(argv)
    sections = tuple(a.sections.split(","))
    bad = set(sections) - {"students", "optimize", "batchnorm"}
    if bad:
        p.error(f"unknown section(s) {', '.join(sorted(bad))}: choose from students, optimize, batchnorm")
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    if {"students", "optimize"} & set(sections):
        print(recovery(a.steps, a.runs, sections), flush=True)
    if "batchnorm" in sections:
        print(batchnorm_modes(a.steps), flush=True)
    print(f"\ntotal {time.perf_counter() - t0:.0f}s, torch {torch.__version__}, {torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
