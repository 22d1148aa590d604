"""recipe="auto": how fast does the search get, within the tolerance, from unlabeled data alone?

Run under the shared lock (2 cores for everyone):
    flock /tmp/torchfast-bench.lock .venv/bin/python benchmarks/search.py [--only digits|minilm|zoo]

digits: the trained digits CNN (scikit-learn digits). The search gets the training images WITHOUT labels
(calibration, distillation, its fidelity checks on the ones it holds out) and a training batch as the
example it times; no eval_fn. The test labels are used afterwards, only to report accuracy. Target: >= 6x
eager fp32 at <= 1 point of test-accuracy drop.

minilm: all-MiniLM-L6-v2 as its users run it (token ids + mask -> mean-pooled, normalized sentence
embedding), searched on unlabeled sentences; then checked on 48 held-out sentences the search never saw.
Target: >= 3x at a worst-sentence embedding cosine >= 0.99.

zoo: unmodified torchvision architectures (resnet50, mobilenet_v3_large) trained on the digits at 64x64
(``torchfast.zoo.vision``), searched on unlabeled training images at output cosine >= 0.98; the check times
the returned model side by side with eager fp32 and with OpenVINO's own int8 (NNCF) of the unpruned model.
Target: >= 1.5x that OpenVINO int8.

Each row's "speedup" is the search's own (eager fp32 original and candidate timed round-robin in one
run); "check" re-times the returned drop-in model against the original head to head, interleaved.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torchfast as tf  # noqa: E402
from torchfast.measure import compare_latency, fidelity  # noqa: E402
from torchfast.report import format_table  # noqa: E402
from torchfast.zoo.minilm import SentenceEmbedder  # noqa: E402

KEEP = ("candidate", "status", "speedup", "cosine", "worst cosine", "top-1 agree", "size (MB)", "pareto",
        "recovery", "note")


def _table(res, n: int = 12) -> str:
    measured = [r for r in res.report.rows if r["rung"] == "measure" and r["speedup"] is not None][:n]
    return format_table([{k: r.get(k) for k in KEEP if k in r} for r in measured])


def _summary(res) -> str:
    keys = ("result", "time", "time budget", "candidates")
    return "\n".join(f"- {k}: {res.report.summary[k]}" for k in keys if k in res.report.summary)


def _save(res, path: str | None, name: str) -> None:
    if path:
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / f"{name}.md").write_text(res.table() + "\n")
        try:
            res.chart(str(Path(path) / f"{name}.png"), title=f"{name}: recipe='auto', every candidate")
        except ImportError:
            pass


def digits(budget: float, runs: int, steps: int, report: str | None = None) -> str:
    from torchfast.zoo.digits import trained_cnn
    t0 = time.perf_counter()
    m, d = trained_cnn(seed=0)
    trained = time.perf_counter() - t0
    x = d.x_train[:64]                                              # a training batch: no test image is seen
    unlabeled = [d.x_train[i:i + 64] for i in range(0, len(d.x_train), 64)]   # images only
    tol = tf.Tolerance(min_cosine=0.99, min_top1_agreement=0.99, max_metric_drop=None)
    t0 = time.perf_counter()
    res = tf.optimize(m, x, "auto", backend="auto", calibration=unlabeled, tolerance=tol, time_budget_s=budget,
                      runs=runs, threads=2, recover={"steps": steps}, progress=False)
    took = time.perf_counter() - t0
    _save(res, report, "digits")
    base, acc = d.eval_fn(m), d.eval_fn(res.model)
    check = compare_latency(m, res.model, d.x_test[:64], runs=4 * runs, warmup=5, threads=2)
    f = fidelity(m, res.model, d.x_test)
    return (f"### digits CNN (trained {trained:.0f}s), recipe='auto', {len(unlabeled)} unlabeled batches of 64, "
            f"search {took:.0f}s\n\n{_summary(res)}\n\n{_table(res)}\n\n"
            f"test accuracy: original {100 * base:.2f}%, returned {100 * acc:.2f}% (drop {100 * (base - acc):.2f} pt); "
            f"test-set cosine {f.cosine:.4f}, top-1 agreement {f.top1_agreement:.4f}\n"
            f"check: returned model vs eager fp32 on a batch of 64 test images, interleaved: {check.speedup:.2f}x "
            f"({check.baseline.median_ms:.2f} ms -> {check.candidate.median_ms:.2f} ms)")


def minilm(budget: float, runs: int, steps: int, prune: tuple, report: str | None = None) -> str:
    from torchfast.zoo.minilm import encode, load_minilm, sentences
    bert, tok = load_minilm()
    model = SentenceEmbedder(bert).eval()
    bs, seq = 8, 128

    def batches(texts):
        return [{k: v for k, v in encode(tok, texts[i:i + bs], seq).items() if k in ("input_ids", "attention_mask")}
                for i in range(0, len(texts), bs)]
    unlabeled = batches(sentences(160, offset=0))        # 20 batches: calibration, distillation, search checks
    held_out = batches(sentences(48, offset=400))        # 6 batches the search never sees
    space = tf.SearchSpace(prune=prune, lowrank=(None,), finalists=1)
    tol = tf.Tolerance(min_cosine=0.99, min_worst_cosine=0.99, max_metric_drop=None)
    t0 = time.perf_counter()
    res = tf.optimize(model, unlabeled[0], space, backend="auto", calibration=unlabeled, tolerance=tol,
                      time_budget_s=budget, runs=runs, threads=2, recover={"steps": steps}, progress=False)
    took = time.perf_counter() - t0
    _save(res, report, "minilm")
    f = fidelity(model, res.model, held_out)
    check = compare_latency(model, res.model, held_out[0], runs=2 * runs, warmup=3, threads=2)
    return (f"### all-MiniLM-L6-v2 (batch {bs}, seq {seq}), prune {prune}, no low-rank, search {took:.0f}s\n\n"
            f"{_summary(res)}\n\n"
            f"{_table(res)}\n\n48 held-out sentences: embedding cosine mean {f.cosine:.4f}, worst {f.worst_cosine:.4f}\n"
            f"check: returned model vs eager fp32, interleaved: {check.speedup:.2f}x "
            f"({check.baseline.median_ms:.1f} ms -> {check.candidate.median_ms:.1f} ms)")


def zoo(name: str, budget: float, runs: int, steps: int, report: str | None = None) -> str:
    from torchfast.measure import compare_many
    from torchfast.zoo.vision import trained_torchvision
    t0 = time.perf_counter()
    m, d = trained_torchvision(name)
    trained = time.perf_counter() - t0
    x = d.x_train[:64]
    unlabeled = [d.x_train[i:i + 64] for i in range(0, len(d.x_train), 64)]
    tol = tf.Tolerance(min_cosine=0.98, max_metric_drop=None)
    t0 = time.perf_counter()
    res = tf.optimize(m, x, "auto", backend="auto", calibration=unlabeled, tolerance=tol, time_budget_s=budget,
                      runs=runs, threads=2, recover={"steps": steps}, progress=False)
    took = time.perf_counter() - t0
    _save(res, report, name)
    ov_int8 = tf.compile(m, x, backend="openvino", dynamic_batch=True,
                         int8=tf.Int8Static(calibration=unlabeled[:8], progress=False))
    test = d.x_test[:64]
    lat = compare_many({"eager fp32": m, "returned": res.model, "openvino int8 (unpruned)": ov_int8}, test,
                       runs=4 * runs, warmup=5, threads=2)
    base = lat["eager fp32"].median_ms
    f, f_ov = fidelity(m, res.model, d.x_test), fidelity(m, ov_int8, d.x_test)
    acc, acc_ov, acc0 = d.eval_fn(res.model), d.eval_fn(ov_int8), d.eval_fn(m)
    rows = [{"model": k, "speedup vs eager fp32": base / lat[k].median_ms,
             "vs openvino int8": lat["openvino int8 (unpruned)"].median_ms / lat[k].median_ms,
             "test cosine": c, "test accuracy (%)": 100 * a}
            for k, c, a in (("eager fp32", 1.0, acc0), ("returned", f.cosine, acc),
                            ("openvino int8 (unpruned)", f_ov.cosine, acc_ov))]
    return (f"### {name} (trained on digits at 64x64 in {trained:.0f}s), recipe='auto', {len(unlabeled)} unlabeled "
            f"batches of 64, search {took:.0f}s\n\n{_summary(res)}\n\n{_table(res)}\n\n"
            f"check on a batch of 64 test images, round-robin ({4 * runs} runs):\n\n{format_table(rows)}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=("digits", "minilm", "zoo"), default=None,
                   help="one section (default: digits and minilm)")
    p.add_argument("--zoo-models", default="resnet50,mobilenet_v3_large", help="zoo section: torchvision names")
    p.add_argument("--budget", type=float, default=600, help="time budget per search, seconds (default 600)")
    p.add_argument("--runs", type=int, default=20, help="timed runs per model in the full measurement (default 20)")
    p.add_argument("--steps", type=int, default=300, help="distillation steps per recovered structure (default 300)")
    p.add_argument("--minilm-prune", default="0", help="pruning amounts the MiniLM search tries (default 0: none)")
    p.add_argument("--report", default=None, metavar="DIR", help="write each search's full table (.md) and chart (.png) here")
    a = p.parse_args(argv)
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    if a.only in (None, "digits"):
        print(digits(a.budget, a.runs, a.steps, a.report), flush=True)
    if a.only in (None, "minilm"):
        prune = tuple(float(v) for v in a.minilm_prune.split(","))
        print("\n" + minilm(a.budget, a.runs, a.steps, prune, a.report), flush=True)
    if a.only == "zoo":
        for name in a.zoo_models.split(","):
            print("\n" + zoo(name, a.budget, a.runs, a.steps, a.report), flush=True)
    print(f"\ntotal {time.perf_counter() - t0:.0f}s, torch {torch.__version__}, {torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
