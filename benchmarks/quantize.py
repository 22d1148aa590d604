"""Quantization on real models: size, latency (interleaved vs fp32, medians), fidelity.

Run under the shared lock:  flock /tmp/torchfast-bench.lock .venv/bin/python benchmarks/quantize.py
Sections: article (digits MLP + CNN), minilm, resnet, accuracy (int8 that keeps accuracy, vs NNCF). ``--only`` picks some; ``--runs`` trades time for noise.
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
    from torchfast.zoo.minilm import batches, load_minilm, mean_pool
    model, tok = load_minilm()
    bl = batches(tok, n_batches=4, batch_size=8, seq_len=128)
    x = bl[0]
    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stock = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8)
    ours, rep = tf.quantize(model, tf.Int8Dynamic(), example_inputs=x, calibration=bl)
    plain, _ = tf.quantize(model, tf.Int8Dynamic(smooth=False), example_inputs=x)
    cands = [("fp32", model), ("torch.ao quantize_dynamic, stock (per-tensor, 7-bit)", stock),
             ("torchfast Int8Dynamic(smooth=False)", plain),
             (f"torchfast Int8Dynamic, default ({rep.summary['layers quantized']} int8 layers, "
              f"{rep.summary['activation bits']}-bit act, {rep.summary.get('float rewrite before int8', 'no rewrite')})",
              ours)]
    lr = _lowrank(model, bl[1:3], x, method="svd", flops_reduction=1.25, allocation="global")
    if lr is not None:
        q, _ = tf.quantize(lr, tf.Int8Dynamic(), example_inputs=x)
        cands.append(("low-rank (1.25x fewer FLOPs, global) + Int8Dynamic", q))
    held = batches(tok, n_batches=6, batch_size=8, seq_len=128, offset=64)  # 48 sentences no step has seen

    def pooled(m):
        def run(**b):
            return mean_pool(m(**b).last_hidden_state, b["attention_mask"])
        return run
    for name, m in cands:
        cmp = compare_latency(model, m, x, runs=runs, threads=threads)
        fid = fidelity(pooled(model), pooled(m), held)
        rows.append({"model": "all-MiniLM-L6-v2 b8 s128", "variant": name, "size (MB)": size_of(m).mb,
                     "latency (ms)": cmp.candidate.median_ms, "speedup": cmp.speedup,
                     "embedding cosine (48 held-out)": fid.cosine, "worst sentence": fid.worst_cosine})
        bar.update(1)
    val = batches(tok, n_batches=2, batch_size=8, seq_len=128, offset=32)  # between calibration and held-out
    rows.append(_minilm_compiled_int8(model, x, bl, val, held, runs, threads))
    bar.update(1)
    return rows


def _minilm_compiled_int8(bert, x, calibration, validation, held, runs: int, threads: int) -> dict:
    """int8 on the compile path: ``tf.compile(backend="auto", int8=Int8Static(...))`` builds every backend's
    int8 (torch.ao, OpenVINO+NNCF, ONNX Runtime) and keeps the fastest within its cosine bound. Measured on the
    sentence embedding (the bound's output) against the eager fp32 embedder."""
    from torchfast.zoo.minilm import SentenceEmbedder
    embed = SentenceEmbedder(bert).eval()
    c = tf.compile(embed, x, backend="auto", int8=tf.Int8Static(calibration=calibration), calibration=calibration,
                   validation=validation, min_cosine_int8=0.99, runs=10, progress=False)
    cmp = compare_latency(embed, c, x, runs=runs, threads=threads)
    fid = fidelity(embed, c, held)
    return {"model": "all-MiniLM-L6-v2 b8 s128", "variant": f"torchfast compile(backend='auto', int8=Int8Static): "
            f"{c.report.summary.get('chosen', '?')}", "size (MB)": None, "latency (ms)": cmp.candidate.median_ms,
            "speedup": cmp.speedup, "embedding cosine (48 held-out)": fid.cosine, "worst sentence": fid.worst_cosine}


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


class _OpenVINO:
    """A compiled OpenVINO model as a callable on one tensor: the engine used directly, as its users do."""

    def __init__(self, ov_model, threads: int) -> None:
        import openvino as ov
        self.compiled = ov.Core().compile_model(ov_model, "CPU", {"INFERENCE_NUM_THREADS": threads,
                                                                  "PERFORMANCE_HINT": "LATENCY"})
        self.request = self.compiled.create_infer_request()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.request.infer([x.numpy()])[self.compiled.output(0)].copy())


def _nncf_int8(model, x, calibration, threads: int) -> _OpenVINO:
    """NNCF's default post-training int8 (its own preset, fast bias correction), compiled by OpenVINO."""
    import nncf
    import openvino as ov
    with torch.no_grad():
        om = ov.convert_model(model, example_input=x)
    q = nncf.quantize(om, nncf.Dataset(calibration), subset_size=sum(b.shape[0] for b in calibration))
    return _OpenVINO(q, threads)


def _agreement(reference, candidate, batches) -> float:
    with torch.no_grad():
        same = [(reference(b).argmax(-1) == candidate(b).argmax(-1)).float() for b in batches]
    return torch.cat(same).mean().item()


def _digits_mobilenet(**kw):
    from torchfast.zoo.mobile import trained_mobilenet
    model, data = trained_mobilenet(**kw)
    cal = data.calibration(n_batches=8, batch_size=32)
    return model, cal[:6], cal[6:], [b for b, _ in data.test_batches(64)], data, 64


def _trained_torchvision(name: str):
    """The real architecture with trained weights (digits at 64x64, three channels)."""
    from torchfast.zoo.vision import trained_torchvision
    model, data = trained_torchvision(name)
    cal = data.calibration(n_batches=8, batch_size=32)
    return model, cal[:6], cal[6:], [b for b, _ in data.test_batches(64)], data, 64


def _random_torchvision(name: str):
    model = _resnet(name)
    g = torch.Generator().manual_seed(1)
    imgs = [torch.randn(8, 3, 224, 224, generator=g) for _ in range(16)]
    return model, imgs[:4], imgs[4:10], imgs[10:], None, 8


ACCURACY_MODELS = {
    "digits MobileNet (trained, ReLU)": lambda: _digits_mobilenet(),
    "digits MobileNet, 'same'-padding Conv2d subclasses": lambda: _digits_mobilenet(same_padding=True),
    "digits MobileNet (trained, hardswish)": lambda: _digits_mobilenet(act="hardswish"),
    "resnet18 (trained on digits, 64x64)": lambda: _trained_torchvision("resnet18"),
    "mobilenet_v3_large (trained on digits, 64x64)": lambda: _trained_torchvision("mobilenet_v3_large"),
    "resnet18 (random weights, BN re-estimated)": lambda: _random_torchvision("resnet18"),
    "mobilenet_v3_large (random weights, BN re-estimated)": lambda: _random_torchvision("mobilenet_v3_large"),
}
MODELS = None


def _accuracy_models():
    for label, build in ACCURACY_MODELS.items():
        if MODELS and not any(k in label for k in MODELS):
            continue
        yield (label, *build())


def accuracy(runs: int, threads: int, bar) -> list[dict]:
    """Default Int8Static, Int8Static under a top-1 budget, and NNCF's int8 through OpenVINO, same images."""
    from torchfast.measure import compare_many
    from torchfast.quant.static_precision import static_precision
    rows = []
    for label, model, cal, val, held, data, bs in _accuracy_models():
        x = held[0][:bs] if held[0].shape[0] >= bs else torch.cat(held)[:bs]
        cands = {"fp32 eager": model}
        reports = {}
        q, reports["torchfast Int8Static (default)"] = tf.quantize(
            model, tf.Int8Static(calibration=cal + val, progress=False), example_inputs=x)
        cands["torchfast Int8Static (default)"] = q
        if static_precision() != static_precision(False):   # the 7-bit activations torch.ao's x86 default uses
            name = "torchfast Int8Static(full_range=False): 7-bit activations"
            q, reports[name] = tf.quantize(model, tf.Int8Static(calibration=cal + val, progress=False,
                                                                full_range=False), example_inputs=x)
            cands[name] = q
        q, reports["torchfast Int8Static, Tolerance(min_top1_agreement=0.95)"] = tf.quantize(
            model, tf.Int8Static(calibration=cal, progress=False), example_inputs=x, validation=val,
            tolerance=tf.Tolerance(min_top1_agreement=0.95, min_cosine=None, max_metric_drop=None))
        cands["torchfast Int8Static, Tolerance(min_top1_agreement=0.95)"] = q
        cands["OpenVINO + NNCF int8 (default)"] = _nncf_int8(model, x, cal + val, threads)
        lat = compare_many(cands, x, runs=runs, warmup=3, threads=threads, settle=1)
        base = lat["fp32 eager"].median_ms
        base_acc = data.eval_fn(model) if data is not None else None
        for name, m in cands.items():
            rep = reports.get(name)
            row = {"model": label, "variant": name, f"speedup vs fp32 (b{bs})": base / lat[name].median_ms,
                   "held-out top-1 agreement": _agreement(model, m, held)}
            if data is not None:
                acc = data.eval_fn(m)
                row.update({"accuracy (%)": 100 * acc, "Δ acc (pts)": 100 * (acc - base_acc)})
            if rep is not None:
                kept = [r["layer"] for r in rep.rows if not r.get("applied") and r.get("type") in ("Conv2d", "Linear")]
                row["float layers"] = len(kept)
                row["note"] = rep.summary.get("result", "-")
            rows.append(row)
        bar.update(1)
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--only", nargs="*", default=["article", "minilm", "resnet", "accuracy"])
    p.add_argument("--runs", type=int, default=12)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--models", nargs="*", default=None,
                   help="accuracy section: only the models whose label contains one of these words")
    p.add_argument("--pt2e", action="store_true", help="add the PT2E + inductor row for the digits CNN (compiles)")
    a = p.parse_args(argv)
    global PT2E, MODELS
    PT2E, MODELS = a.pt2e, a.models
    torch.set_num_threads(a.threads)
    total = {"article": 7 + a.pt2e, "minilm": 6, "resnet": 4, "accuracy": len(ACCURACY_MODELS) if not a.models else sum(any(k in lbl for k in a.models) for lbl in ACCURACY_MODELS)}
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
