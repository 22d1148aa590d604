"""Is torchfast's backend="auto" as fast as the best engine a user could call directly?

For each model and batch, in one run: eager, TorchScript, inductor, ONNX Runtime and OpenVINO used
*directly* (as their own docs show, outside torchfast), their direct int8 (ONNX Runtime QDQ static for the
CNNs / dynamic for MiniLM; OpenVINO + NNCF, transformer preset for MiniLM), and torchfast
``compile(backend="auto")`` in fp32 and with ``int8=Int8Static(calibration=...)`` (token dicts for MiniLM).
All candidates of a row are timed round-robin with eager (``measure.compare_many``, medians) and the
speedup is eager median / candidate median. Fidelity: mean output cosine vs eager on 4 held-out batches
(MiniLM: the mean-pooled sentence embedding; worst sentence too). CNNs have random weights with BatchNorm
statistics re-estimated on random images; MiniLM is the real pretrained model on real sentences (seq 128).

``--pruned`` adds the composition row: resnet50 pruned 30% (torchfast.prune, channel counts multiples of 16)
then ``auto`` with int8, vs
OpenVINO int8 of the unpruned model, timed side by side.

    .venv/bin/python benchmarks/backends.py --models resnet50 --batches 1,8 --json out/r50.json
    .venv/bin/python benchmarks/backends.py --models minilm --batches 1,8
    .venv/bin/python benchmarks/backends.py --models resnet50 --batches 1 --pruned --only-pruned
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torchfast as tf  # noqa: E402
from torchfast.measure import compare_many  # noqa: E402
from torchfast.report import format_table  # noqa: E402
from torchfast.zoo.minilm import SentenceEmbedder  # noqa: E402

THREADS = 2
# the int8 fidelity bound given to auto: random-weight CNNs lose more to int8 than trained ones (OpenVINO's
# own int8 of them measures ~0.97 here); MiniLM is the real model, held to 0.99
INT8_COSINE = {False: 0.97, True: 0.99}


# ---------------------------------------------------------------- models and data
def build(name: str):
    if name == "minilm":
        from torchfast.zoo.minilm import load_minilm
        bert, tok = load_minilm()
        return SentenceEmbedder(bert).eval(), tok
    import torchvision
    torch.manual_seed(0)
    m = getattr(torchvision.models, name)(weights=None)
    m.train()
    for mod in m.modules():                      # re-estimate BatchNorm statistics on random images
        if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
            mod.reset_running_stats()
            mod.momentum = None
    with torch.no_grad():
        for _ in range(8):
            m(torch.randn(8, 3, 224, 224))
    return m.eval(), None


def data(name: str, tok, batch: int, n: int, offset: int) -> list:
    if name == "minilm":
        from torchfast.zoo.minilm import batches
        return [{k: b[k] for k in ("input_ids", "attention_mask")} for b in batches(tok, n, batch, 128, offset=offset)]
    g = torch.Generator().manual_seed(offset)
    return [torch.randn(batch, 3, 224, 224, generator=g) for _ in range(n)]


def output_of(out) -> torch.Tensor:
    return (out if isinstance(out, torch.Tensor) else out[0]).float()


def call(m, b):
    with torch.inference_mode():
        return m(**b) if isinstance(b, dict) else m(b)


def fidelity(name, ref, cand, held) -> tuple[float, float]:
    """(mean, worst) per-sample cosine vs the reference on held-out batches."""
    sims = []
    for b in held:
        a = output_of(call(ref, b))
        a = a.reshape(a.shape[0], -1)
        c = output_of(call(cand, b)).reshape(a.shape[0], -1)
        sims.append(torch.nn.functional.cosine_similarity(a.double(), c.double(), dim=1))
    s = torch.cat(sims)
    return s.mean().item(), s.min().item()


# ---------------------------------------------------------------- engines used directly, as a user would
def _feeds(b) -> dict:
    if isinstance(b, dict):  # the exported MiniLM takes ids and mask (token_type_ids stay at their default)
        return {k: b[k].numpy() for k in ("input_ids", "attention_mask")}
    return {"x": b.numpy()}


class Direct:
    """Runs an engine on torch inputs and gives torch outputs, shaped as output_of() expects."""

    def __init__(self, run):
        self.run = run

    def __call__(self, *args, **kwargs):
        b = kwargs if kwargs else args[0]
        return torch.from_numpy(np.asarray(self.run(_feeds(b))))


def onnx_file(name, model, x, path: Path) -> Path:
    args = (x["input_ids"], x["attention_mask"]) if name == "minilm" else (x,)
    names = ["input_ids", "attention_mask"] if name == "minilm" else ["x"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, args, str(path), input_names=names, output_names=["y"], dynamo=True,
                          external_data=False)
    return path


def ort_session(path: Path) -> Direct:
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = THREADS, 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # spinning idle threads would steal the cores of whichever engine is timed next (all are timed in turn)
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    return Direct(lambda f: sess.run(None, {k: v for k, v in f.items() if k in names})[0])


def ov_compiled(ov_model) -> Direct:
    import openvino as ov
    cm = ov.Core().compile_model(ov_model, "CPU", {"INFERENCE_NUM_THREADS": THREADS, "PERFORMANCE_HINT": "LATENCY",
                                                  "INFERENCE_PRECISION_HINT": "f32"})
    req = cm.create_infer_request()
    return Direct(lambda f: req.infer(list(f.values()))[cm.output(0)].copy())


def ov_model(name, model, x):
    import openvino as ov
    ex = (x["input_ids"], x["attention_mask"]) if name == "minilm" else x
    return ov.convert_model(model, example_input=ex)


def direct_candidates(name, model, x, calib, tmp: Path, bar) -> dict:
    minilm = name == "minilm"
    out: dict = {}

    def add(label, fn):
        bar.set_postfix_str(f"{name} {label}")
        t0 = time.perf_counter()
        try:
            out[label] = (fn(), time.perf_counter() - t0, None)
        except Exception as e:  # noqa: BLE001 - an engine that fails is a result
            out[label] = (None, time.perf_counter() - t0, f"{type(e).__name__}: {str(e).splitlines()[0][:120]}")

    def torchscript():
        with torch.no_grad():
            kw = dict(example_kwarg_inputs=x) if minilm else dict(example_inputs=(x,))
            t = torch.jit.trace(model, strict=False, **kw)
            return torch.jit.optimize_for_inference(torch.jit.freeze(t.eval()))

    def inductor():
        import torch._inductor.config as cfg
        cfg.freezing = True
        c = torch.compile(model)
        call(c, x)
        return c

    fp32 = onnx_file(name, model, x, tmp / f"{name}.onnx")
    add("direct torchscript", torchscript)
    add("direct inductor", inductor)
    add("direct onnxruntime", lambda: ort_session(fp32))
    add("direct openvino", lambda: ov_compiled(ov_model(name, model, x)))

    import onnxruntime.quantization as oq
    if minilm:
        def ort_int8():
            q = tmp / "ort_dyn.onnx"
            oq.quantize_dynamic(str(fp32), str(q), weight_type=oq.QuantType.QInt8)
            return ort_session(q)
    else:
        def ort_int8():
            class Reader(oq.CalibrationDataReader):
                def __init__(self):
                    self.it = iter(calib)

                def get_next(self):
                    b = next(self.it, None)
                    return None if b is None else _feeds(b)
            pre, q = tmp / "pre.onnx", tmp / "ort_static.onnx"
            oq.quant_pre_process(str(fp32), str(pre))
            oq.quantize_static(str(pre), str(q), Reader(), quant_format=oq.QuantFormat.QDQ, per_channel=True,
                               activation_type=oq.QuantType.QUInt8, weight_type=oq.QuantType.QInt8)
            return ort_session(q)
    add("direct onnxruntime int8", ort_int8)

    def ov_int8():
        import nncf
        ds = nncf.Dataset(calib, lambda b: (b["input_ids"], b["attention_mask"]) if minilm else b)
        kw = {"model_type": nncf.ModelType.TRANSFORMER} if minilm else {}
        q = nncf.quantize(ov_model(name, model, x), ds, subset_size=len(calib) * (calib[0]["input_ids"].shape[0]
                                                                                   if minilm else calib[0].shape[0]), **kw)
        return ov_compiled(q)
    add("direct openvino int8 (nncf)", ov_int8)
    return out


# ---------------------------------------------------------------- one row
def bench(name, model, tok, batch, bar, pruned_only=False, pruned=False) -> list[dict]:
    x = data(name, tok, batch, 1, 0)[0]
    # the same calibration samples at every batch size: 64 sentences / 32 images, in batches of `batch`
    calib = data(name, tok, batch, max(1, (64 if name == "minilm" else 32) // batch), 100)
    held = data(name, tok, batch, 4, 200)
    tmp = Path(tempfile.mkdtemp(prefix="tf-bench-"))
    int8 = tf.Int8Static(calibration=calib)   # token batches (dicts) too: each engine calibrates them its own way
    cands: dict = {}
    if not pruned_only:
        cands = direct_candidates(name, model, x, calib, tmp, bar)

        def auto(**kw):
            t0 = time.perf_counter()
            try:
                c = tf.compile(model, x, backend="auto", runs=10, progress=False, validation=held[:2],
                               min_cosine_int8=INT8_COSINE[name == "minilm"], **kw)
                print(f"\n{name} b{batch} auto{' int8' if kw else ''}:\n{c.report.to_markdown().split('## compile: ')[1]}")
                return c, time.perf_counter() - t0, None
            except Exception as e:  # noqa: BLE001
                return None, time.perf_counter() - t0, f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
        bar.set_postfix_str(f"{name} auto fp32")
        cands["torchfast auto fp32"] = auto()
        bar.set_postfix_str(f"{name} auto int8")
        cands["torchfast auto int8"] = auto(int8=int8, calibration=calib)
    if pruned and name != "minilm":
        bar.set_postfix_str(f"{name} pruned")
        t0 = time.perf_counter()
        # channel counts kept multiples of 16: the int8 kernels work in blocks of 16 output channels
        p, _ = tf.prune(model, tf.ChannelPruning(amount=0.3, importance="l2", round_to=16), example_inputs=x)
        fid_p = fidelity(name, model, p, held)
        c = tf.compile(p, x, backend="auto", int8=int8, calibration=calib, runs=10, progress=False,
                       validation=held[:2], min_cosine_int8=INT8_COSINE[False])
        cands["torchfast prune 30% + auto int8"] = (c, time.perf_counter() - t0, None)
        print(f"\n{name} b{batch} pruned, auto int8:\n{c.report.to_markdown().split('## compile: ')[1]}")
        if "direct openvino int8 (nncf)" not in cands:
            cands["direct openvino int8 (nncf)"] = direct_candidates(name, model, x, calib, tmp, bar)[
                "direct openvino int8 (nncf)"]
        print(f"\n{name} pruned 30% (float, before int8): cosine vs original {fid_p[0]:.4f} (worst {fid_p[1]:.4f})")
    ok = {k: v[0] for k, v in cands.items() if v[0] is not None}
    bar.set_postfix_str(f"{name} b{batch} timing")
    with torch.inference_mode():
        call(model, x)
    t_eager = time.perf_counter()
    call(model, x)
    dt = time.perf_counter() - t_eager
    runs = int(min(30, max(8, 6.0 / max(dt, 1e-4) / max(1, len(ok)))))
    timed = compare_many({"eager": (lambda m: (lambda *a, **k: m(*a, **k)))(model), **ok}, x, warmup=2, runs=runs,
                         threads=THREADS)
    base = timed["eager"].median_ms
    rows = [{"model": name, "batch": batch, "candidate": "eager", "speedup": 1.0, "ms": base, "cosine": 1.0,
             "worst cosine": 1.0}]
    for k, (m, secs, err) in cands.items():
        row = {"model": name, "batch": batch, "candidate": k, "build (s)": round(secs, 1)}
        if m is None:
            row["note"] = err
        else:
            row["speedup"] = base / timed[k].median_ms
            row["ms"] = timed[k].median_ms
            row["cosine"], row["worst cosine"] = fidelity(name, model, m, held)
            if hasattr(m, "report") and getattr(m.report, "summary", {}).get("chosen"):
                row["note"] = f"chose {m.report.summary['chosen']}"
        rows.append(row)
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="resnet50,mobilenet_v3_large,minilm")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--pruned", action="store_true", help="add resnet50 pruned 30%% + auto int8 vs OpenVINO int8")
    ap.add_argument("--only-pruned", action="store_true", help="only the pruned composition row")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(THREADS)
    t0 = time.perf_counter()
    rows: list[dict] = []
    plan = [(m, int(b)) for m in a.models.split(",") for b in a.batches.split(",")]
    bar = tqdm(plan, desc="backends", unit="row")
    current = None
    for name, batch in bar:
        if current is None or current[0] != name:
            torch._dynamo.reset()
            current = (name, *build(name))
        model, tok = copy.deepcopy(current[1]), current[2]
        rows += bench(name, model, tok, batch, bar, pruned_only=a.only_pruned, pruned=a.pruned or a.only_pruned)
        if a.json:
            Path(a.json).parent.mkdir(parents=True, exist_ok=True)
            Path(a.json).write_text(json.dumps(rows, indent=2))
    bar.close()
    print(f"\ntorch {torch.__version__}, {THREADS} threads, total {time.perf_counter() - t0:.0f} s")
    print(format_table(rows, ["model", "batch", "candidate", "speedup", "cosine", "worst cosine", "ms", "build (s)",
                              "note"]))


if __name__ == "__main__":
    main()
