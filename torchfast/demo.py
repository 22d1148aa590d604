"""``make demo``: train a small CNN on real data (scikit-learn digits), run torchfast recipes on it, print the table.

Each row is a recipe applied to a copy of the trained model by the same stage functions
``optimize()`` uses, then measured side by side against the original.
"""
from __future__ import annotations

import argparse
import copy
import time
from typing import Callable

import torch

from .measure import compare_latency, count_flops, latency, size_of
from .recipe import apply_stage
from .report import format_table
from .zoo.digits import trained_cnn


def demo_rows(calibration, data=None) -> list[tuple[str, Callable[[], list]]]:
    """(row name, recipe factory). Factories import lazily so one missing optional extra skips one row.

    A recipe entry is a torchfast config, or a callable ``model -> model`` for a step that is not a
    transform (the optional fine-tune after pruning, reported as such in the row name).
    """
    def lowrank():
        from .lowrank import LowRank
        # 2x fewer FLOPs, spent where the whitened spectra say it costs least (uniform ratio 0.5 drops ~9 points)
        return [LowRank(method="auto", flops_reduction=2.0, allocation="global")]

    def int8_static():
        from .quant import Int8Static
        return [Int8Static(calibration=calibration, progress=False)]

    def lowrank_int8():
        return lowrank() + int8_static()

    def pruned():
        from .prune import ChannelPruning
        return [ChannelPruning(amount=0.3, importance="bn_scale")]

    def finetuned():
        from .prune import finetune
        import torch.nn.functional as F

        def step(model):
            train = [(data.x_train[i:i + 64], data.y_train[i:i + 64]) for i in range(0, len(data.x_train), 64)]
            model, _ = finetune(model, train, F.cross_entropy, epochs=2, lr=5e-4)
            return model.eval()
        return [step]

    def pruned_ft():
        return pruned() + finetuned()

    def pruned_ft_lowrank_int8():
        return pruned() + finetuned() + lowrank() + int8_static()
    return [("low-rank (data-aware, 2x fewer FLOPs)", lowrank),
            ("int8 static (FX, x86, histogram)", int8_static),
            ("low-rank (2x fewer FLOPs) + int8 static", lowrank_int8),
            ("pruned 30% channels (bn_scale, no fine-tune)", pruned),
            ("pruned 30% + fine-tune (2 epochs)", pruned_ft),
            ("pruned 30% + fine-tune + low-rank + int8 static", pruned_ft_lowrank_int8)]


def run(batch_size: int = 64, runs: int = 30, threads: int | None = None, seed: int = 0) -> str:
    t0 = time.perf_counter()
    print("training the digits CNN on scikit-learn's bundled digits (real data, no download)...", flush=True)
    model, data = trained_cnn(seed=seed)
    print(f"  trained in {time.perf_counter() - t0:.1f}s", flush=True)
    example = data.x_test[:batch_size]
    calibration = data.calibration()
    base_flops = count_flops(model, example[:1])

    def row(name, m, speedup):
        s = size_of(m)
        try:
            flops = count_flops(m, example[:1])
        except Exception:  # quantized kernels are invisible to FlopCounterMode
            flops = None
        # quantized kernels hide their weights from parameters() and their work from FlopCounterMode: "-"
        return {"model": name, "params": s.params or None, "size (MB)": s.mb,
                "MFLOPs/img": flops / 1e6 if flops else None,
                "FLOPs ratio": None if not flops else base_flops / flops,
                "latency (ms, median)": speedup[0], "speedup": speedup[1],
                "test accuracy (%)": 100 * data.eval_fn(m)}

    base_lat = latency(model, example, runs=runs, threads=threads)
    rows = [row("original (fp32)", model, (base_lat.median_ms, 1.0))]
    for name, recipe_fn in demo_rows(calibration, data):
        try:
            recipe = recipe_fn()
        except ImportError as e:
            print(f"  skipping '{name}': {e}")
            continue
        print(f"running recipe: {name} ...", flush=True)
        m = copy.deepcopy(model)
        for step in recipe:
            if callable(step):
                m = step(m)
            else:
                m, _ = apply_stage(m, step, example_inputs=example, calibration=calibration)
        cmp = compare_latency(model, m, example, runs=runs, threads=threads)
        rows.append(row(name, m, (cmp.candidate.median_ms, cmp.speedup)))
    table = format_table(rows)
    print(f"\nbatch {batch_size}, {threads or torch.get_num_threads()} threads, latency interleaved with the original "
          f"({runs} runs each)\n")
    print(table)
    return table


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    run(batch_size=a.batch_size, runs=a.runs, threads=a.threads)


if __name__ == "__main__":
    main()
