"""Compile backends vs eager fp32 on this CPU, with ONNX Runtime and OpenVINO as reference points.

For each model and batch: latency ratio (eager median / candidate median, interleaved in one run) of
torchscript, inductor (freezing), export (ExportedProgram.module()), ONNX Runtime fp32 and OpenVINO fp32
(both fed the same ONNX file, exported from the same ExportedProgram), plus each candidate's relative
error vs eager on the timed batch. Every candidate is built once per model with a dynamic batch
dimension and serves all batch sizes (compile time is reported apart, in the first row). ``--int8`` adds the int8 rows (torchfast.quant Int8Static + the
backend that runs it, vs ONNX Runtime static int8) when torchfast.quant is present.

    flock /tmp/torchfast-bench.lock .venv/bin/python benchmarks/backends.py           # ~7 min on 2 cores
    flock /tmp/torchfast-bench.lock .venv/bin/python benchmarks/backends.py --models resnet50 --batches 8
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torchfast  # noqa: E402
from torchfast.backends.export import export_program  # noqa: E402
from torchfast.measure import compare_latency  # noqa: E402
from torchfast.modules import call_model, first_tensor, split_batch  # noqa: E402
from torchfast.report import format_table  # noqa: E402

THREADS = 2


def build_model(name: str):
    if name == "minilm":
        from torchfast.zoo.minilm import load_minilm
        model, tok = load_minilm()
        return model.eval(), tok
    import torchvision
    return getattr(torchvision.models, name)(weights=None).eval(), None


def example(name: str, tok, batch: int):
    if name == "minilm":
        from torchfast.zoo.minilm import batches
        return batches(tok, 1, batch, 128)[0]
    g = torch.Generator().manual_seed(0)
    return torch.randn(batch, 3, 224, 224, generator=g)


# ---------------------------------------------------------------- ONNX reference runtimes
def to_onnx(model, x, path: Path) -> list[str]:
    """ONNX from the same ExportedProgram torchfast exports (dynamic batch); returns the input names."""
    ep = export_program(model, x, dynamic_batch=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(ep, f=str(path), external_data=False)
    import onnx
    return [i.name for i in onnx.load(str(path), load_external_data=False).graph.input]


def _feeds(x, names):
    args, kwargs = split_batch(x)
    vals = list(args) + [kwargs[k] for k in names if k in kwargs] if kwargs else list(args)
    return {n: v.numpy() for n, v in zip(names, vals)}


def ort_runner(path: Path, names):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = THREADS
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])

    def run(*args, **kwargs):
        x = kwargs if kwargs else (args if len(args) > 1 else args[0])
        return torch.from_numpy(sess.run(None, _feeds(x, names))[0])
    return run


def openvino_runner(path: Path, names):
    import openvino as ov
    core = ov.Core()
    # fp32 for real: OpenVINO's CPU plugin otherwise runs bf16 where the CPU has bf16 instructions
    compiled = core.compile_model(str(path), "CPU", {"INFERENCE_NUM_THREADS": THREADS, "PERFORMANCE_HINT": "LATENCY",
                                                     "INFERENCE_PRECISION_HINT": "f32"})
    req = compiled.create_infer_request()

    def run(*args, **kwargs):
        x = kwargs if kwargs else (args if len(args) > 1 else args[0])
        res = req.infer(_feeds(x, names))
        return torch.from_numpy(res[compiled.output(0)].copy())
    return run


# ---------------------------------------------------------------- int8 rows
def int8_candidates(model, x, calib, onnx_path: Path, tmp: Path) -> dict:
    """torchfast Int8Static (FX, x86 kernels) run by TorchScript, and ONNX Runtime static int8 (QDQ) on the
    same calibration batches."""
    out = {}
    t0 = time.perf_counter()
    q, _ = torchfast.quantize(copy.deepcopy(model), torchfast.Int8Static(calibration=calib), example_inputs=x)
    out["int8 torchscript"] = (torchfast.compile(q, x, backend="torchscript", dynamic_batch=True),
                               time.perf_counter() - t0)
    import onnxruntime.quantization as oq

    names = to_onnx(model, x, onnx_path)

    class Reader(oq.CalibrationDataReader):
        def __init__(self):
            self.it = iter(calib)

        def get_next(self):
            b = next(self.it, None)
            return None if b is None else _feeds(b, names)
    t0 = time.perf_counter()
    qpath = tmp / "int8.onnx"
    pre = tmp / "pre.onnx"
    oq.quant_pre_process(str(onnx_path), str(pre))
    oq.quantize_static(str(pre), str(qpath), Reader(), quant_format=oq.QuantFormat.QDQ, per_channel=True,
                       activation_type=oq.QuantType.QUInt8, weight_type=oq.QuantType.QInt8)
    out["ort int8"] = (ort_runner(qpath, names), time.perf_counter() - t0)
    return out


# ---------------------------------------------------------------- main
def runs_for(model, x) -> int:
    with torch.inference_mode():
        call_model(model, x)
        t0 = time.perf_counter()
        call_model(model, x)
        dt = time.perf_counter() - t0
    return int(min(40, max(8, 5.0 / max(dt, 1e-4))))   # ~5 s of eager time per comparison, 8..40 runs


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="resnet50,mobilenet_v3_large,minilm")
    ap.add_argument("--batches", default=None, help="override batch sizes (default: 1,8 for vision, 8 for minilm)")
    ap.add_argument("--backends", default="torchscript,inductor,export,ort,openvino")
    ap.add_argument("--int8", action="store_true", help="only the int8 rows (torchfast Int8Static vs ORT int8)")
    ap.add_argument("--json", default=None, help="write the rows as JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    backends = args.backends.split(",")
    plan = []
    for name in args.models.split(","):
        bs = [int(b) for b in args.batches.split(",")] if args.batches else ([8] if name == "minilm" else [1, 8])
        plan += [(name, b) for b in bs]
    rows = []
    t_start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="tf-bench-"))
    cache: dict[str, tuple] = {}
    compiled: dict[str, dict] = {}
    if args.int8:
        backends = ["int8 torchscript", "ort int8"]
    bar = tqdm(total=len(plan) * len(backends), desc="backends", unit="run")
    for name, batch in plan:
        if name not in cache:
            cache = {name: build_model(name)}          # one model in memory at a time
        model, tok = cache[name]
        x = example(name, tok, batch)
        with torch.inference_mode():
            ref = first_tensor(call_model(model, x))
        runs = runs_for(model, x)
        onnx_path = tmp / f"{name}.onnx"
        if name not in compiled:
            compiled.clear()        # candidates of the previous model go (memory)
            torch._dynamo.reset()
            compiled[name] = {}
        for backend in backends:
            bar.set_postfix_str(f"{name} b{batch} {backend}")
            row = {"model": name, "batch": batch, "backend": backend}
            try:
                t0 = time.perf_counter()
                cand = compiled[name].get(backend)      # one dynamic-batch build per model serves every batch
                if cand is None and args.int8:
                    calib = [example(name, tok, batch) + 0.5 * torch.randn_like(example(name, tok, batch))
                             for _ in range(4)] if name != "minilm" else None
                    if calib is None:
                        raise ValueError("int8 rows are for the vision models")
                    for k, (c, secs) in int8_candidates(model, x, calib, onnx_path, tmp).items():
                        compiled[name][k] = c
                        compiled[name][k + ":s"] = secs
                    cand = compiled[name][backend]
                    row["compile_s"] = compiled[name][backend + ":s"]
                elif cand is None:
                    if backend in ("ort", "openvino"):
                        if "onnx_names" not in compiled[name]:
                            compiled[name]["onnx_names"] = to_onnx(model, x, onnx_path)
                        cand = (ort_runner if backend == "ort" else openvino_runner)(onnx_path, compiled[name]["onnx_names"])
                        call_model(cand, x)
                    else:
                        cand = torchfast.compile(model, x, backend=backend, dynamic_batch=True)
                    compiled[name][backend] = cand
                    row["compile_s"] = time.perf_counter() - t0
                elif backend + ":s" in compiled[name] and "compile_s" not in row and batch == plan[0][1]:
                    row["compile_s"] = compiled[name][backend + ":s"]
                with torch.inference_mode():
                    out = first_tensor(call_model(cand, x))
                row["rel_err"] = ((out.float() - ref).norm() / ref.norm()).item()
                cmp = compare_latency(model, cand, x, runs=runs, warmup=2, threads=THREADS)
                row.update(eager_ms=cmp.baseline.median_ms, ms=cmp.candidate.median_ms, speedup=cmp.speedup)
            except Exception as e:  # a backend that fails is a result too
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:100]}"
            rows.append(row)
            bar.update(1)
    bar.close()
    print(f"\ntorch {torch.__version__}, {THREADS} threads, total {time.perf_counter() - t_start:.0f} s")
    cols = ["model", "batch", "backend", "speedup", "eager_ms", "ms", "rel_err", "compile_s"]
    if any("error" in r for r in rows):
        cols.append("error")
    print(format_table(rows, cols))
    if args.json:
        import json
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
