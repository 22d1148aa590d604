"""int8 static on the trained digits MobileNet, plain convs vs TF-"same"-padding conv subclasses, with and
without ``canonicalize`` first: which layers are int8, top-1 agreement with fp32 and accuracy on the
held-out digits, latency vs fp32 (interleaved medians, same run).

Run under the shared lock:
    flock /tmp/torchfast-bench.lock .venv/bin/python benchmarks/canonical_int8.py [--batch 64] [--runs 30]
``--size 32`` trains the same architecture on even inputs, where TF "same" padding of the stride-2 convs is
asymmetric and canonicalize keeps it as a size-dependent ``SamePad2d`` before a plain conv.
"""
from __future__ import annotations

import argparse
import dataclasses
import warnings

import torch

import torchfast as tf
from torchfast.measure import compare_latency, fidelity
from torchfast.quant.canonical import canonicalize
from torchfast.report import format_table
from torchfast.zoo.mobile import trained_mobilenet

warnings.simplefilter("ignore")


def _int8_rows(rep) -> tuple[int, int, int, int]:
    """(convs+linears int8, kept float, depthwise int8, depthwise total) from a quantize report."""
    conv = [r for r in rep.rows if r["type"] in ("Conv2d", "Linear", "SameConv2d")]
    dw = [r for r in conv if "depthwise.0" in r["layer"]]
    return (sum(r["applied"] is True for r in conv), sum(r["applied"] is not True for r in conv),
            sum(r["applied"] is True for r in dw), len(dw))


def _folded_int8(model, calib):
    """canonicalize's output through torch.ao FX directly, with the pad patterns and the int8 pad fold
    (what the Int8Static path does once it uses them)."""
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    from torchfast.quant.int8_pad import fold_int8_pads, pad_backend_config
    from torchfast.quant.static import fx_qconfig_mapping
    from torchfast.quant.static_precision import static_precision

    mapping = fx_qconfig_mapping(tf.Int8Static(calibration=calib), static_precision())
    prepared = prepare_fx(model, mapping, (calib[0],), backend_config=pad_backend_config())
    with torch.no_grad():
        for b in calib:
            prepared(b)
    q = convert_fx(prepared, backend_config=pad_backend_config())
    return q, fold_int8_pads(q)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--size", type=int, default=33)
    ap.add_argument("--act", default="relu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for variant in ("plain", "same-padding", "same-padding + canonicalize", "  + int8 pad fold (torch.ao direct)"):
        model, data = trained_mobilenet(size=args.size, act=args.act, same_padding=variant != "plain")
        x = data.x_test[:args.batch]
        calib = data.calibration()
        src, note = model, ""
        if "canonicalize" in variant or "fold" in variant:
            src, changes = canonicalize(model, calib)
            kinds = sorted({c.action for c in changes})
            note = f"{len(changes)} layers: " + "; ".join(f"{sum(c.action == k for c in changes)}x {k}" for k in kinds)
        if "fold" in variant:
            q, counts = _folded_int8(src, calib)
            note = f"pads folded into int8 convs: {counts['folded']}, run on int8: {counts['on int8']}"
            import torch.ao.nn.quantized as nnq
            n_int8 = sum(isinstance(m, (nnq.Conv2d, nnq.Linear)) for m in q.modules())
            n_float = sum(type(m) in (torch.nn.Conv2d, torch.nn.Linear) for m in q.modules())
            dw_int8 = sum(isinstance(m, nnq.Conv2d) and m.groups > 1 for m in q.modules())
            dw_all = sum(isinstance(m, torch.nn.Conv2d) and m.groups > 1 for m in model.modules())
        else:
            # keep_slower: time the int8 model itself, whatever quantize's own speed check would decide
            keep = {"keep_slower": True} if "keep_slower" in {f.name for f in dataclasses.fields(tf.Int8Static)} \
                else {}
            q, rep = tf.quantize(src, tf.Int8Static(calibration=calib, progress=False, **keep), example_inputs=x)
            n_int8, n_float, dw_int8, dw_all = _int8_rows(rep)
        fid = fidelity(model, q, [b for b, _ in data.test_batches()], eval_fn=data.eval_fn)
        cmp = compare_latency(model, q, x, runs=args.runs, warmup=5)
        rows.append({"model": f"{variant} ({args.size}x{args.size}, {args.act})", "conv/linear int8": n_int8,
                     "kept float": n_float, "depthwise int8": f"{dw_int8}/{dw_all}",
                     "top-1 agreement": f"{fid.top1_agreement:.4f}",
                     "accuracy fp32 -> int8": f"{fid.baseline_metric:.4f} -> {fid.metric:.4f}",
                     "fp32 ms": f"{cmp.baseline.median_ms:.2f}", "int8 ms": f"{cmp.candidate.median_ms:.2f}",
                     "speedup": f"{cmp.speedup:.2f}x", "canonicalize": note})
    print(f"batch {args.batch}, {args.threads} threads, {args.runs} interleaved runs each")
    print(format_table(rows))


if __name__ == "__main__":
    main()
