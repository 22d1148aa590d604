"""Low-rank factorization: what it saves and what it costs, measured side by side.

    flock /tmp/torchfast-bench.lock .venv/bin/python benchmarks/lowrank.py [--quick] [--write]

1. torchvision resnet50 / vgg16 (random weights: speed only): FLOPs ratio (FlopCounterMode) and
   latency ratio vs the original (interleaved, medians) at batch 1 and 8, for a few settings.
2. The trained digits CNN: test accuracy vs FLOPs, data-free vs data-aware, uniform vs global rank
   allocation, plus an optional short fine-tune (reported as such).
3. The pretrained all-MiniLM-L6-v2: mean-pooled embedding cosine vs the original on real sentences
   (Python's bundled docs) against FLOPs saved; weight SVD vs activation-whitened SVD.
``--write`` replaces the "## Low-rank decomposition" section of benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import copy
import json
import re
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

import torchfast as tf
from torchfast.measure import compare_latency, count_flops
from torchfast.report import format_table

SECTION = "## Low-rank decomposition"


def _is_spatial(m, name):
    return isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1)


def _convs(m, name):
    return isinstance(m, torch.nn.Conv2d)


def _refused(model, keep) -> tuple[str, ...]:
    """LowRank.exclude for the Conv2d/Linear layers ``keep(module, name)`` does not accept."""
    return tuple(n for n, m in model.named_modules()
                 if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and not keep(m, n))


def vision(runs: int, quick: bool) -> tuple[str, list[dict]]:
    import torchvision
    settings = [
        ("tucker ratio 0.25, kxk convs", tf.LowRank(method="tucker", ratio=0.25), _is_spatial),
        ("tucker ratio 0.25, kxk convs, speed guard", tf.LowRank(method="tucker", ratio=0.25, speed_guard=True), _is_spatial),
        ("auto flops_reduction 2, all convs, speed guard", tf.LowRank(method="auto", flops_reduction=2.0,
                                                                      speed_guard=True), _convs),
    ]
    models = [("resnet50", torchvision.models.resnet50), ("vgg16", torchvision.models.vgg16)]
    rows = []
    for mname, ctor in models:
        torch.manual_seed(0)
        base = ctor().eval()
        x1, x8 = torch.randn(1, 3, 224, 224), torch.randn(8, 3, 224, 224)
        f_base = count_flops(base, x1)
        use = settings if (mname == "resnet50" and not quick) else settings[1:2]
        for sname, cfg, filt in tqdm(use, desc=mname, leave=False):
            t0 = time.perf_counter()
            m, rep = tf.decompose(copy.deepcopy(base), cfg.replace(progress=False, exclude=_refused(base, filt)),
                                  example_inputs=x8)
            t_dec = time.perf_counter() - t0
            f = count_flops(m, x1)
            for bs, x in ((1, x1), (8, x8)):
                r = runs if bs == 1 else max(4, runs // 2)
                if mname == "vgg16":
                    r = max(4, r // 2)
                cmp = compare_latency(base, m, x, runs=r, warmup=1)
                rows.append({"model": mname, "setting": sname, "batch": bs,
                             "layers factorized": f"{rep.summary['layers_factorized']}/{rep.summary['layers_considered']}",
                             "GFLOPs/img": f / 1e9, "FLOPs ratio": f_base / f,
                             "latency ms (orig)": cmp.baseline.median_ms, "latency ms (low-rank)": cmp.candidate.median_ms,
                             "speedup": cmp.speedup, "runs": r, "decompose s": t_dec})
            print(format_table(rows[-2:]), flush=True)
    return format_table(rows), rows


def digits(finetune_epochs: int) -> tuple[str, list[dict]]:
    from torchfast.zoo.digits import train, trained_cnn
    model, data = trained_cnn(seed=0)
    x = data.x_test[:64]
    cal = data.calibration()
    f_base = count_flops(model, x[:1])
    rows = [{"setting": "original", "calibration": "-", "FLOPs ratio": 1.0, "params": sum(p.numel() for p in model.parameters()),
             "test acc %": 100 * data.eval_fn(model), "fine-tuned": "no"}]
    grid = []
    for fr, alloc in ((2.0, "uniform"), (4.0, "uniform"), (2.0, "global"), (3.0, "global"), (4.0, "global")):
        grid.append((f"auto flops_reduction {fr}, {alloc}", tf.LowRank(method="auto", flops_reduction=fr, allocation=alloc)))
    grid.append(("auto ratio 0.5, uniform (every layer)", tf.LowRank(method="auto", ratio=0.5)))
    for name, cfg in tqdm(grid, desc="digits", leave=False):
        for aware in (False, True):
            m, rep = tf.decompose(model, cfg.replace(progress=False, data_aware=aware), calibration=cal,
                                  example_inputs=x, inplace=False)
            rows.append({"setting": name, "calibration": "data-aware" if aware else "data-free",
                         "FLOPs ratio": f_base / count_flops(m, x[:1]), "params": sum(p.numel() for p in m.parameters()),
                         "test acc %": 100 * data.eval_fn(m), "fine-tuned": "no"})
            if finetune_epochs and aware and name.startswith("auto flops_reduction 4.0, uniform"):
                ft = train(copy.deepcopy(m).train(), data, epochs=finetune_epochs, lr=5e-4)
                rows.append({**rows[-1], "test acc %": 100 * data.eval_fn(ft),
                             "fine-tuned": f"yes ({finetune_epochs} epochs, lr 5e-4, train split)"})
    return format_table(rows), rows


def minilm() -> tuple[str, list[dict]]:
    from torchfast.zoo.minilm import batches, embedding_cosine, encode, load_minilm, sentences
    model, tok = load_minilm()
    texts = sentences(96)
    cal = [encode(tok, texts[i:i + 16], seq_len=128, pad_to_max=False) for i in range(0, 96, 16)]  # no pad flood
    ev = batches(tok, n_batches=4, batch_size=16, seq_len=128, offset=300)  # other sentences
    f_base = count_flops(model, ev[0])
    forced = dict(min_flops_reduction=0)  # every encoder Linear, even where no FLOPs are saved
    grid = [
        ("rank 50% (every Linear)", tf.LowRank(method="svd", ratio=0.5, **forced)),
        ("rank 35% (every Linear)", tf.LowRank(method="svd", ratio=0.35, **forced)),
        ("energy 0.95 (every Linear)", tf.LowRank(method="svd", energy=0.95, **forced)),
        ("rank 50% (only where FLOPs drop)", tf.LowRank(method="svd", ratio=0.5)),
        ("flops_reduction 1.25, global", tf.LowRank(method="svd", flops_reduction=1.25, allocation="global")),
        ("flops_reduction 1.5, global", tf.LowRank(method="svd", flops_reduction=1.5, allocation="global")),
    ]
    rows = []
    for name, cfg in tqdm(grid, desc="minilm", leave=False):
        for aware in (False, True):
            m, rep = tf.decompose(model, cfg.replace(progress=False, data_aware=aware, exclude=("pooler",)),
                                  calibration=cal, inplace=False)  # the encoder's Linears only
            f = count_flops(m, ev[0])
            rows.append({"setting": name, "factorization": "activation-whitened SVD" if aware else "weight SVD",
                         "layers": f"{rep.summary['layers_factorized']}/{rep.summary['layers_considered']}",
                         "params saved %": 100 * (1 - sum(p.numel() for p in m.parameters()) /
                                                  sum(p.numel() for p in model.parameters())),
                         "FLOPs saved %": 100 * (1 - f / f_base), "embedding cosine": embedding_cosine(model, m, ev)})
        print(format_table(rows[-2:]), flush=True)
    return format_table(rows), rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer settings and runs")
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--finetune-epochs", type=int, default=2)
    p.add_argument("--only", choices=["vision", "digits", "minilm"], default=None)
    p.add_argument("--write", action="store_true", help="write the section into benchmarks/RESULTS.md")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    parts = {}
    if a.only in (None, "digits"):
        parts["digits"] = digits(a.finetune_epochs)[0]
        print(parts["digits"], flush=True)
    if a.only in (None, "minilm"):
        parts["minilm"] = minilm()[0]
        print(parts["minilm"], flush=True)
    if a.only in (None, "vision"):
        parts["vision"] = vision(a.runs, a.quick)[0]
        print(parts["vision"], flush=True)
    took = time.perf_counter() - t0
    print(f"\ntotal {took:.0f}s", flush=True)
    if a.write:
        # sections not rerun (--only) keep the figures of their last run
        cache = Path("/tmp/torchfast-lowrank-parts.json")
        old = json.loads(cache.read_text()) if cache.exists() else {}
        cache.write_text(json.dumps({**old, **parts}))
        write({**old, **parts}, a, took)


def write(parts: dict, a, took: float) -> None:
    cmd = "flock /tmp/torchfast-bench.lock .venv/bin/python benchmarks/lowrank.py --write" + (" --quick" if a.quick else "")
    if a.only:
        cmd += f"  (this update: --only {a.only})"
    body = [SECTION, "", f"Command: `{cmd}` ({took:.0f} s, {a.threads} threads, "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}).", ""]
    if "vision" in parts:
        body += ["### torchvision resnet50 / vgg16 (random weights, speed only)", "",
                 "FLOPs by FlopCounterMode (2 per multiply-add) for one image; latency interleaved with the original "
                 "in one run (medians). Decomposition and speed guard use the batch-8 input shapes.", "", parts["vision"], ""]
    if "digits" in parts:
        body += ["### Trained digits CNN (scikit-learn digits, 360 test images)", "",
                 "FLOPs ratio of the whole model; calibration = 256 training images (no labels). "
                 "Fine-tuned rows are marked.", "", parts["digits"], ""]
    if "minilm" in parts:
        body += ["### all-MiniLM-L6-v2 (pretrained), encoder Linears", "",
                 "Embedding cosine = mean-pooled sentence embedding vs the original on 64 real sentences "
                 "(Python's bundled docs, seq 128), not seen in calibration (96 sentences). FLOPs of the whole model.",
                 "", parts["minilm"], ""]
    text = "\n".join(body).rstrip() + "\n"
    path = Path(__file__).with_name("RESULTS.md")
    cur = path.read_text() if path.exists() else "# Benchmark results\n"
    pat = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    new = pat.sub(lambda _: text + "\n", cur) if pat.search(cur) else cur.rstrip() + "\n\n" + text
    path.write_text(new)
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
