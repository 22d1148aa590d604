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
from .recipe import apply_recipe
from .report import format_table
from .zoo.digits import trained_cnn


def demo_rows(calibration) -> list[tuple[str, Callable[[], list]]]:
    """(row name, recipe factory). Factories import lazily so one missing optional extra skips one row."""
    def lowrank():
        from .lowrank import LowRank
        # 2x fewer FLOPs, spent where the whitened spectra say it costs least (uniform ratio 0.5 drops ~9 points)
        return [LowRank(method="auto", flops_reduction=2.0, allocation="global")]

    def int8_static():
        from .quant import Int8Static
        return [Int8Static(calibration=calibration, progress=False)]

    def lowrank_int8():
        from .lowrank import LowRank
        from .quant import Int8Static
        return [LowRank(method="auto", flops_reduction=2.0, allocation="global"),
                Int8Static(calibration=calibration, progress=False)]

    def pruned():
        from .prune import ChannelPruning
        return [ChannelPruning(amount=0.3, importance="bn_scale")]

    def pruned_lowrank_int8():
        from .lowrank import LowRank
        from .prune import ChannelPruning
        from .quant import Int8Static
        return [ChannelPruning(amount=0.3, importance="bn_scale"), LowRank(method="auto", ratio=0.5),
                Int8Static(calibration=calibration, progress=False)]
    return [("low-rank (data-aware, 2x fewer FLOPs)", lowrank),
            ("int8 static (FX, x86, histogram)", int8_static),
            ("low-rank (2x fewer FLOPs) + int8 static", lowrank_int8),
            ("pruned 30% channels (bn_scale, no fine-tune)", pruned),
            ("pruned 30% + low-rank 0.5 + int8 static", pruned_lowrank_int8)]


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
        return {"model": name, "params": s.params, "size (MB)": s.mb,
                "MFLOPs/img": None if flops is None else flops / 1e6,
                "FLOPs ratio": None if not flops else base_flops / flops,
                "latency (ms, median)": speedup[0], "speedup": speedup[1],
                "test accuracy (%)": 100 * data.eval_fn(m)}

    base_lat = latency(model, example, runs=runs, threads=threads)
    rows = [row("original (fp32)", model, (base_lat.median_ms, 1.0))]
    for name, recipe_fn in demo_rows(calibration):
        try:
            recipe = recipe_fn()
        except ImportError as e:
            print(f"  skipping '{name}': {e}")
            continue
        print(f"running recipe: {name} ...", flush=True)
        m, reports = apply_recipe(copy.deepcopy(model), recipe, example_inputs=example, calibration=calibration)
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
