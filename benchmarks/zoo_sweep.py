"""Every torchfast transform on every model of two zoos: torchvision's classifiers and timm architectures.

For each model (random weights, eval mode, one image at the model's input size; each model in its own process, one
thread, with a time limit), run ``prune`` (ChannelPruning 30%), ``decompose`` (LowRank defaults), ``quantize`` (Int8Dynamic
and Int8Static on 2 calibration batches) and ``compile`` (TorchScript), each on the original model, with a short
timing behind every speed decision inside them (``--timing-runs``). A cell is

- ``ok``: the transform returned a model that runs and keeps the output shape; the cell shows how many
  layers it changed and skipped (each skipped layer has a named reason in the report);
- ``refused``: a torchfast error saying what and why (e.g. "nothing to trace");
- ``RAW``: any other exception -- a traceback from deep inside torch reaching the user, which is a bug.

    .venv/bin/python benchmarks/zoo_sweep.py                      # both zoos
    .venv/bin/python benchmarks/zoo_sweep.py --zoo timm --models resnet18,convnext_atto
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import time
import traceback
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# timm architectures: a spread of families and the layer types model libraries add (same-padding and
# weight-standardized convs, BatchNorm+activation, LayerNorm2d, attention blocks, re-parameterizable blocks)
TIMM = ["resnet18", "resnet26d", "tf_efficientnet_b0", "efficientnet_b0", "mobilenetv3_small_100", "lcnet_050",
        "ghostnet_100", "rexnet_100", "regnetx_002", "dla34", "densenet121", "repvgg_a0", "mobileone_s0",
        "nf_resnet26", "nfnet_l0", "convnext_atto", "convnextv2_atto", "edgenext_xx_small", "poolformer_s12",
        "vit_tiny_patch16_224", "deit_tiny_patch16_224", "pit_ti_224", "levit_128s", "mobilevit_xxs",
        "efficientformer_l1", "fastvit_t8", "resmlp_12_224", "mixer_s16_224", "ese_vovnet19b_dw", "hrnet_w18_small",
        "cspresnet50", "gernet_s", "selecsls42b", "tinynet_e", "fbnetc_100", "mnasnet_small", "xcit_nano_12_p16_224",
        "coat_lite_tiny", "crossvit_tiny_240", "swin_tiny_patch4_window7_224"]

TRANSFORMS = ["prune", "decompose", "int8 dynamic", "int8 static", "compile torchscript"]


def _build(zoo: str, name: str):
    import torch
    torch.manual_seed(0)
    if zoo == "timm":
        import timm
        m = timm.create_model(name, pretrained=False)
        size = m.pretrained_cfg.get("input_size", (3, 224, 224)) if hasattr(m, "pretrained_cfg") else (3, 224, 224)
    else:
        import torchvision
        m = torchvision.models.get_model(name, weights=None)
        size = (3, 299, 299) if name == "inception_v3" else (3, 224, 224)
    return m.eval(), torch.randn(1, *size, generator=torch.Generator().manual_seed(1))


def _counts(report) -> str:
    rows = getattr(report, "rows", []) or []
    done = sum(1 for r in rows if r.get("applied") in (True, "yes"))
    skipped = [r for r in rows if r.get("applied") not in (True, "yes")]
    unnamed = sum(1 for r in skipped if not r.get("reason"))
    return f"{done} changed, {len(skipped)} kept" + (f" ({unnamed} without reason)" if unnamed else "")


def _run_one(zoo: str, name: str, transforms: list[str], q: "mp.Queue", timing_runs: int) -> None:
    warnings.filterwarnings("ignore")
    import torch
    torch.set_num_threads(1)
    import torchfast as tf
    from torchfast import measure
    # pass/fail, not speed: every speed decision inside the transforms takes a short timing
    measure.DEFAULT_TIMING = measure.Timing(runs=timing_runs, warmup=1)
    out: dict[str, str] = {}
    try:
        model, x = _build(zoo, name)
        with torch.no_grad():
            ref = model(x)
    except Exception as e:  # noqa: BLE001 - a model the zoo cannot build is not a torchfast result
        q.put({"model": name, "zoo": zoo, "build": f"{type(e).__name__}: {str(e)[:100]}"})
        return
    shape = tuple(ref.shape) if isinstance(ref, torch.Tensor) else None
    calib = [torch.randn_like(x) for _ in range(2)]

    def attempt(label, fn):
        t0 = time.perf_counter()
        try:
            m, rep = fn()
            with torch.no_grad():
                y = m(x)
            if shape is not None and tuple(y.shape) != shape:
                out[label] = f"RAW: output shape {tuple(y.shape)} != {shape}"
            else:
                out[label] = f"ok: {_counts(rep)} ({time.perf_counter() - t0:.0f} s)"
        except Exception as e:  # noqa: BLE001 - classified below
            first = str(e).splitlines()[0][:160] if str(e) else ""
            if isinstance(e, tf.TorchfastError):
                out[label] = f"refused: {type(e).__name__}: {first}"
            else:
                tb = traceback.extract_tb(e.__traceback__)[-1]
                out[label] = f"RAW: {type(e).__name__}: {first} [{Path(tb.filename).name}:{tb.lineno}]"

    steps = {
        "prune": lambda: tf.prune(model, tf.ChannelPruning(amount=0.3), example_inputs=x),
        "decompose": lambda: tf.decompose(model, tf.LowRank(), example_inputs=x),
        "int8 dynamic": lambda: tf.quantize(model, tf.Int8Dynamic(), example_inputs=x),
        "int8 static": lambda: tf.quantize(model, tf.Int8Static(calibration=calib, progress=False), example_inputs=x),
        "compile torchscript": lambda: (lambda c: (c, c.report))(tf.compile(model, x, backend="torchscript")),
    }
    for t in transforms:
        q.put({"model": name, "zoo": zoo, **out, "running": t})  # a process that dies says where
        attempt(t, steps[t])
    q.put({"model": name, "zoo": zoo, **out})


def _drain(q, latest: dict, name: str, wait: float = 0.0) -> dict | None:
    """The final result if it came; progress messages only update ``latest``."""
    while True:
        try:
            msg = q.get(timeout=wait) if wait else q.get_nowait()
        except Exception:  # noqa: BLE001 - queue.Empty
            return None
        if "running" not in msg:
            return msg
        latest[name] = msg


def _unfinished(progress: dict | None, name: str, zoo: str, why: str) -> dict:
    """The cells that finished before a kill, and the one that was running."""
    if progress is None:
        return {"model": name, "zoo": zoo, "build": why}
    running = progress.pop("running")
    return {**progress, running: f"{why} during {running}"}


def sweep(zoo: str, names: list[str], transforms: list[str], timeout_s: float, jobs: int, bar,
          partial=None, timing_runs: int = 4) -> list[dict]:
    """Each model in its own process (at most ``jobs`` at once), killed after ``timeout_s``."""
    ctx = mp.get_context("spawn")
    results: dict[str, dict] = {}
    latest: dict[str, dict] = {}  # each model's last progress message
    todo = list(names)
    live: dict[str, tuple] = {}
    while todo or live:
        while todo and len(live) < jobs:
            name = todo.pop(0)
            q = ctx.Queue()
            p = ctx.Process(target=_run_one, args=(zoo, name, transforms, q, timing_runs), daemon=True)
            p.start()
            live[name] = (p, q, time.perf_counter())
        time.sleep(0.5)
        for name, (p, q, t0) in list(live.items()):
            got = _drain(q, latest, name)
            if got is None and p.is_alive() and time.perf_counter() - t0 < timeout_s:
                continue
            if got is None and p.is_alive():
                p.kill()
                got = _unfinished(latest.get(name), name, zoo, f"timeout after {timeout_s:.0f} s")
            elif got is None:
                p.join(1)
                got = _drain(q, latest, name, wait=2) or _unfinished(latest.get(name), name, zoo,
                                                                    f"process died (exit {p.exitcode})")
            p.join(5)
            got["time (s)"] = round(time.perf_counter() - t0)
            results[name] = got
            del live[name]
            if partial is not None:  # a long sweep keeps what it has so far
                partial([results[n] for n in names if n in results])
            bar.set_postfix_str(f"{zoo}:{name}")
            bar.update(1)
    return [results[n] for n in names]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", default="torchvision,timm")
    ap.add_argument("--models", default=None, help="comma-separated names (default: the whole zoo)")
    ap.add_argument("--transforms", default=",".join(TRANSFORMS))
    ap.add_argument("--timeout-s", type=float, default=600)
    ap.add_argument("--jobs", type=int, default=2, help="models at once, one thread each (default 2)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--timing-runs", type=int, default=4,
                    help="timed runs behind each speed decision inside the transforms (default 4: the sweep checks "
                         "that every transform works, not which kernel is fastest)")
    a = ap.parse_args(argv)
    from tqdm import tqdm

    from torchfast.report import format_table
    plan = []
    for zoo in a.zoo.split(","):
        if a.models:
            names = a.models.split(",")
        elif zoo == "timm":
            names = TIMM
        else:
            import torchvision
            names = torchvision.models.list_models(module=torchvision.models)
        plan.append((zoo, names))
    transforms = a.transforms.split(",")
    rows: list[dict] = []
    with tqdm(total=sum(len(n) for _, n in plan), desc="zoo sweep", unit="model") as bar:
        for zoo, names in plan:
            done = list(rows)
            save = (lambda got, _done=done: Path(a.json).write_text(json.dumps(_done + got, indent=2))) if a.json else None
            rows += sweep(zoo, names, transforms, a.timeout_s, a.jobs, bar, partial=save, timing_runs=a.timing_runs)
            if a.json:
                Path(a.json).write_text(json.dumps(rows, indent=2))
    cols = ["zoo", "model", "build"] + transforms + ["time (s)"]
    print(format_table(rows, [c for c in cols if any(c in r for r in rows)]))
    raw = [(r["model"], t, r[t]) for r in rows for t in transforms if str(r.get(t, "")).startswith("RAW")]
    summary = {t: {k: sum(1 for r in rows if str(r.get(t, "")).startswith(k)) for k in ("ok", "refused", "RAW")}
               for t in transforms}
    for t in transforms:  # killed for time or memory, or never reached after such a kill
        summary[t]["not finished"] = len(rows) - sum(summary[t].values())
    print(json.dumps(summary, indent=1))
    unfinished = sum(s["not finished"] for s in summary.values())
    print(f"{len(rows)} models, {len(raw)} raw tracebacks, {unfinished} cells not finished")
    for m, t, msg in raw:
        print(f"  {m} / {t}: {msg}")
    return 1 if raw or unfinished else 0


if __name__ == "__main__":
    raise SystemExit(main())
