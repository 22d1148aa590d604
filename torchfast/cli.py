"""The ``torchfast`` command: optimize | bench | export | serve.

Exit codes a shell script can act on: 0 ok, 2 usage or bad input (the message says which option or
value), 1 the work itself failed (the message names the step; ``--debug`` shows the traceback).
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback
from typing import Any, Sequence

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
# torchfast.export.FORMATS, spelled out so that --help does not import torch (a test keeps them equal)
FORMATS = ("torchscript", "exported_program", "tensorrt", "state_dict", "onnx", "openvino")
MODEL_HELP = ("MODEL is one of: torchvision:NAME (e.g. torchvision:resnet50; random weights unless "
              "--weights), hf:PATH (a Hugging Face encoder folder or hub id; token inputs), "
              "zoo:digits-cnn | zoo:digits-mlp | zoo:minilm (built-in, trained, real data and metric), "
              "package.module:callable or path/to/file.py:callable (returns an nn.Module, or (module, example_inputs)), "
              "or the path of a saved artifact (.pt TorchScript, .pt2 ExportedProgram)")

DESCRIPTION = """Make a trained PyTorch model faster and smaller for inference, with every step measured.

commands:
  optimize  apply a recipe (low-rank, pruning, quantization, ...) stage by stage, verify each stage
            against the original, roll back stages that break the tolerance, compile, save; or
            (--recipe auto, the default) search the recipes and backends for the fastest faithful model
  bench     latency/throughput table over batch sizes, baseline and candidate timed interleaved
  export    save a model as TorchScript (.pt), ExportedProgram (.pt2), ONNX or OpenVINO IR; check it loads back
  serve     serve a model over HTTP with dynamic batching (torchfast serve --help)

examples:
  torchfast optimize torchvision:resnet50 --input-shape 8,3,224,224 --recipe prune:amount=0.3,int8-static \\
      --backend torchscript --out r50.pt --report report.md
  torchfast optimize zoo:digits-cnn --recipe lowrank:ratio=0.5,int8-static --chart stages.png
  torchfast optimize torchvision:resnet50 --recipe auto --backend auto --calibration images/ --time-budget 10m \\
      --out r50.xml --chart candidates.png
  torchfast bench torchvision:mobilenet_v3_large --backend inductor --batch 1,8,32
  torchfast export torchvision:resnet18 --input-shape 1,3,224,224 --format exported_program --out r18.pt2
  torchfast serve r18.pt2     # the artifact records its inputs: no --input-shape needed
"""


class UsageError(Exception):
    """Bad command-line input: exit code 2."""


def _usage_types() -> tuple[type, ...]:
    from .backends import BackendError
    from .cli_models import SourceError
    from .config import ConfigError
    from .pipeline import ExampleInputError
    return (UsageError, SourceError, ConfigError, ExampleInputError, BackendError)


# ---------------------------------------------------------------- parser
def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    p.add_argument("--input-shape", action="append", metavar="SHAPE",
                   help="shape of one example batch, batch dim first, e.g. 8,3,224,224 (repeat for several "
                        "positional inputs; hf:/zoo:minilm take BATCH,SEQ)")
    p.add_argument("--input-dtype", action="append", metavar="DTYPE",
                   help="dtype of the example inputs (default float32; integer dtypes get ids in [0, 100))")
    p.add_argument("--weights", default=None, help="torchvision weights name, e.g. DEFAULT (downloads; default: random weights)")
    p.add_argument("--calibration", default="8", metavar="N|PATH",
                   help="calibration batches for data-aware stages, int8 and distillation, the last quarter held out "
                        "for fidelity: a number of batches (random inputs of the example's shape, real data for "
                        "zoo: models; default 8) or unlabeled data: a folder of images, a .txt file of sentences "
                        "(one per line; hf:/zoo:minilm) or a .pt/.npy file of input tensors, shaped and "
                        "normalized like the example batch")


def _run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runs", type=int, default=20, help="timed runs per model for each latency figure (default 20)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads while timing (default: torch's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--debug", action="store_true", help="print the traceback on errors")


def _backend_args(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("--backend", default=default,
                   help=f"compile target: eager, torchscript, inductor, export, onnxruntime, openvino, tensorrt (CUDA), "
                        f"xla (TPU), or auto (build every available one, keep the fastest faithful one) (default {default})")
    p.add_argument("--device", default=None, help="device to compile for: cpu, cuda, xla (default: the model's)")
    p.add_argument("--dtype", default=None, help="compute dtype for the backend: fp32, fp16, bf16 (default fp32)")
    p.add_argument("--backend-option", action="append", default=[], metavar="KEY=VALUE",
                   help="backend option, repeatable (e.g. max_autotune=true for inductor)")
    p.add_argument("--dynamic-batch", action="store_true",
                   help="compile (and save) one model that accepts any batch size; bench: compile once instead of once per size")


def build_parser() -> argparse.ArgumentParser:
    from .stages import AUTO_HELP, recipe_help

    parser = argparse.ArgumentParser(prog="torchfast", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    from . import __version__
    parser.add_argument("--version", action="version", version=f"torchfast {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("optimize", help="apply a recipe with per-stage verification, compile, save",
                       description="Apply RECIPE to MODEL stage by stage. Each stage is measured against the original "
                                   "(latency interleaved, size, FLOPs, output fidelity, task metric for zoo: models) and "
                                   "rolled back when it breaks --tolerance; the result is compiled for --backend.")
    _model_args(p)
    p.add_argument("--recipe", default="auto",
                   help=f"the stages, in order: {recipe_help()}. {AUTO_HELP} (the default; bounded by "
                        f"--time-budget); 'none': no stage")
    p.add_argument("--time-budget", default="10m", metavar="DURATION",
                   help="how long --recipe auto may search: 90s, 10m, 1h30m, or 'none' (default 10m); when it runs "
                        "out, the best candidate found so far is returned and the report says so")
    p.add_argument("--search-space", default=None, metavar="SPEC",
                   help="what --recipe auto may try, as KEY=VALUE pairs with '/' between choices: "
                        "prune=0/0.3,lowrank=none/global,int8=static/dynamic,backends=eager/openvino,finalists=1 "
                        "(fields of torchfast.search.SearchSpace; default: all of it)")
    _backend_args(p, "auto")
    p.add_argument("--tolerance", default=None, metavar="SPEC",
                   help="bounds vs the original that make a stage roll back: min_cosine=0.99,max_rel_err=...,"
                        "min_top1_agreement=...,max_metric_drop=0.01,min_speedup=1.05; 'off' keeps every stage "
                        "(default min_cosine=0.99,max_metric_drop=0.01)")
    p.add_argument("--keep-going", action="store_true", help="a stage that raises is rolled back and reported instead of aborting")
    p.add_argument("--out", default=None, metavar="PATH", help="save the optimized model (.pt TorchScript, .pt2 ExportedProgram, .onnx, .xml OpenVINO IR)")
    p.add_argument("--format", default=None,
                   choices=FORMATS,
                   help="artifact format for --out (default: from the extension: .pt2 -> exported_program, "
                        ".onnx -> onnx, .xml -> openvino, else torchscript)")
    p.add_argument("--report", default=None, metavar="PATH", help="write the full report (.md markdown with per-layer tables, .json JSON)")
    p.add_argument("--chart", default=None, metavar="PNG", help="write a speed-vs-fidelity chart per stage (needs matplotlib)")
    _run_args(p)

    b = sub.add_parser("bench", help="latency/throughput over batch sizes vs the eager baseline",
                       description="Time MODEL (or a saved artifact) at each --batch size. The baseline (eager MODEL, or "
                                   "--baseline) and the candidate (MODEL after --recipe, compiled for --backend, or the "
                                   "artifact) run interleaved; medians and their ratio are reported.")
    _model_args(b)
    b.add_argument("--batch", default="1,8,32", help="comma-separated batch sizes (default 1,8,32)")
    b.add_argument("--recipe", default=None, help=f"apply these stages to the candidate first: {recipe_help()}")
    b.add_argument("--baseline", default=None, metavar="MODEL", help="baseline model when MODEL is a saved artifact")
    b.add_argument("--json", default=None, metavar="PATH", help="also write the table as JSON")
    _backend_args(b, "eager")
    _run_args(b)

    e = sub.add_parser("export", help="save a model as a deployable artifact and verify it loads back",
                       description="Save MODEL in --format, load it back with torchfast.load and compare its outputs with "
                                   "the model's on the example inputs (exit 1 if they differ).")
    _model_args(e)
    e.add_argument("--format", default=None, choices=FORMATS,
                   help="artifact format (default: from the extension of --out)")
    e.add_argument("--out", required=True, metavar="PATH", help="where to write the artifact")
    e.add_argument("--recipe", default=None, help=f"apply these stages before exporting (no verification; use optimize for that): {recipe_help()}")
    e.add_argument("--debug", action="store_true", help="print the traceback on errors")

    sub.add_parser("serve", add_help=False, help="serve a model over HTTP with dynamic batching (torchfast serve --help)",
                   description="Delegates to torchfast.serve.cli.")
    return parser


# ---------------------------------------------------------------- helpers
def _kv(items: Sequence[str], what: str) -> dict[str, Any]:
    from .recipe_syntax import parse_value
    out = {}
    for item in items:
        for tok in item.split(","):
            if not tok.strip():
                continue
            k, sep, v = tok.partition("=")
            if not sep or not k.strip():
                raise UsageError(f"{what}: expected KEY=VALUE, got {tok!r}")
            out[k.strip()] = parse_value(v)
    return out


def _tolerance(spec: str | None):
    from .tolerance import Tolerance
    if spec is None:
        return Tolerance()
    if spec.strip().lower() in ("off", "none"):
        return Tolerance.off()
    import dataclasses
    fields = {f.name for f in dataclasses.fields(Tolerance)}
    kv = _kv([spec], "--tolerance")
    unknown = sorted(set(kv) - fields)
    if unknown:
        raise UsageError(f"--tolerance: unknown bound(s) {', '.join(unknown)}; known: {', '.join(sorted(fields))}")
    return Tolerance(**kv)


_SPACE_CHOICES = ("prune", "lowrank", "int8", "backends")  # SearchSpace fields that hold a tuple of choices


def _search_space(spec: str):
    """``prune=0/0.3,lowrank=none/global,finalists=1`` -> SearchSpace; one choice is a one-element tuple."""
    import dataclasses

    from .search import SearchSpace
    fields = {f.name for f in dataclasses.fields(SearchSpace)}
    kv = _kv([spec], "--search-space")
    unknown = sorted(set(kv) - fields)
    if unknown:
        raise UsageError(f"--search-space: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(fields))}")
    for k in _SPACE_CHOICES:
        if k in kv and not isinstance(kv[k], tuple) and not (k == "backends" and kv[k] is None):
            kv[k] = (kv[k],)
    if "int8" in kv:  # 'none' is an int8 mode here, not a missing value
        kv["int8"] = tuple("none" if m is None else m for m in kv["int8"])
    return SearchSpace(**kv)


def _recipe(spec: str | None, model) -> list:
    from .recipe_syntax import parse_recipe
    if spec is None or spec.strip() == "":
        return []
    return parse_recipe(spec, model)  # 'none' is no stage; 'auto' (the search) is optimize's alone


def _duration(text: str) -> float:
    """``90``, ``90s``, ``10m``, ``1h30m``, ``1.5h`` -> seconds; ``none``/``inf`` -> no budget."""
    import math
    import re
    t = text.strip().lower()
    if t in ("none", "inf", "off"):
        return math.inf
    parts = re.fullmatch(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s?)?", t)
    if not t or parts is None or not any(parts.groups()):
        raise UsageError(f"--time-budget {text!r}: expected a duration like 90s, 10m, 1h30m or 'none'")
    h, m, sec = (float(g) if g else 0.0 for g in parts.groups())
    total = 3600 * h + 60 * m + sec
    if total <= 0:
        raise UsageError(f"--time-budget {text!r}: the budget must be positive")
    return total


def _backend_options(a) -> dict[str, Any]:
    opts = _kv(a.backend_option, "--backend-option")
    if a.device:
        opts["device"] = a.device
    if a.dtype:
        opts["dtype"] = a.dtype
    if getattr(a, "dynamic_batch", False):
        opts["dynamic_batch"] = True
    return opts


def _format_for(path: str, fmt: str | None) -> str:
    if fmt:
        return fmt
    from .export import format_for_path
    return format_for_path(path)


def save_artifact(model, path: str, fmt: str, example) -> None:
    from .export import save
    kwargs = {"example_inputs": example}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        save(model, path, format=fmt, **kwargs)
    except Exception as e:
        raise RuntimeError(f"saving the model as {fmt} to {path} failed{_save_hint(fmt)}: {type(e).__name__}: {e}") from e


def _save_hint(fmt: str) -> str:
    return (" (torchao-quantized and other tensor-subclass models cannot be traced to TorchScript: "
            "use --format exported_program or a .pt2 path)") if fmt == "torchscript" else ""


def _write_report(report, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(report.to_json() if path.endswith(".json") else report.to_markdown() + "\n")


# ---------------------------------------------------------------- commands
def cmd_optimize(a) -> int:
    from .cli_models import load_source
    from .pipeline import optimize

    from .search import is_auto

    tol = _tolerance(a.tolerance)
    auto = is_auto(a.recipe)
    if a.search_space is not None and not auto:
        raise UsageError(f"--search-space shapes the search of --recipe auto; --recipe {a.recipe!r} runs its stages as given")
    space = _search_space(a.search_space) if a.search_space is not None else None
    budget = _duration(a.time_budget) if auto else None
    src = load_source(a.model, a.input_shape, a.input_dtype, a.calibration, a.weights)
    recipe = (space or "auto") if auto else _recipe(a.recipe, src.model)
    what = (f"auto (search, {'no' if budget == float('inf') else f'{budget:g}s'} budget)" if auto
            else ", ".join(type(c).__name__ for c in recipe) or "(none)")
    print(f"model: {src.description}; recipe: {what}; backend: {a.backend}", file=sys.stderr)
    result = optimize(src.model, src.example, recipe, backend=a.backend, backend_options=_backend_options(a),
                      eval_fn=src.eval_fn, tolerance=tol, calibration=src.calibration or None,
                      validation=src.validation or None,
                      runs=a.runs, threads=a.threads, on_error="skip" if a.keep_going else "raise",
                      progress=False if a.no_progress else None, time_budget_s=budget)
    print(result.table())
    if a.report:
        _write_report(result.report, a.report)
        print(f"\nreport written to {a.report}")
    if a.chart:
        result.chart(a.chart, title=f"{a.model}: " + ("every candidate of the search" if auto
                                                       else "speed vs fidelity per stage"))
        print(f"chart written to {a.chart}")
    if a.out:
        fmt = _format_for(a.out, a.format)
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        try:
            result.save(a.out, fmt)
        except Exception as e:
            raise RuntimeError(f"saving the model as {fmt} to {a.out} failed{_save_hint(fmt)}: {type(e).__name__}: {e}") from e
        print(f"saved {fmt} artifact to {a.out}")
    return EXIT_OK


def _parse_batches(text: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--batch {text!r}: expected comma-separated integers like 1,8,32") from None
    if not out or any(b < 1 for b in out):
        raise UsageError(f"--batch {text!r}: batch sizes must be >= 1")
    return out


def cmd_bench(a) -> int:
    import copy

    from tqdm.auto import tqdm

    from .cli_models import load_source
    from .measure import compare_latency, latency
    from .dropin import eval_mode
    from .recipe import apply_recipe
    from .report import format_table

    sizes = _parse_batches(a.batch)
    src = load_source(a.model, a.input_shape, a.input_dtype, a.calibration, a.weights)
    is_artifact = os.path.exists(a.model)
    base_src = load_source(a.baseline, a.input_shape, a.input_dtype, 0, a.weights) if a.baseline else None
    baseline = base_src.model if base_src else (None if is_artifact else src.model)
    recipe = _recipe(a.recipe, src.model) if a.recipe else []
    opts = _backend_options(a)
    from .stages import check_backend
    check_backend(recipe, a.backend)  # a stage the backend cannot compile fails before the recipe's work
    candidate = src.model
    if recipe:
        candidate, _ = apply_recipe(copy.deepcopy(src.model), recipe, src.example, src.calibration or None)
        eval_mode(candidate)
    compiled_once = None
    if a.backend != "eager" or opts:
        from .backends import compile as tf_compile
        if a.dynamic_batch:
            compiled_once = tf_compile(candidate, src.example, backend=a.backend, **opts)

    rows = []
    for n in tqdm(sizes, desc="bench", unit="batch size", disable=True if a.no_progress else None):
        batch = src.make_batch(n)
        cand = candidate
        if compiled_once is not None:
            cand = compiled_once
        elif a.backend != "eager" or opts:
            cand = tf_compile(candidate, batch, backend=a.backend, **opts)
        if baseline is None:
            lat = latency(cand, batch, runs=a.runs, threads=a.threads)
            rows.append({"batch": n, "latency (ms)": lat.median_ms, "p90 (ms)": lat.p90_ms,
                         "samples/s": n / (lat.median_ms / 1e3)})
            continue
        cmp = compare_latency(baseline, cand, batch, runs=a.runs, threads=a.threads)
        rows.append({"batch": n, "baseline (ms)": cmp.baseline.median_ms, "candidate (ms)": cmp.candidate.median_ms,
                     "speedup": cmp.speedup, "baseline samples/s": n / (cmp.baseline.median_ms / 1e3),
                     "candidate samples/s": n / (cmp.candidate.median_ms / 1e3)})
    what = f"{a.model}" + (f" + {a.recipe}" if recipe else "") + f" on {a.backend}"
    base_what = a.baseline or ("(none: artifact timed alone; pass --baseline MODEL)" if baseline is None else f"{a.model} eager")
    import torch
    print(f"candidate: {what}\nbaseline: {base_what}\nmedians of {a.runs} interleaved runs, "
          f"{a.threads or torch.get_num_threads()} threads\n")
    print(format_table(rows))
    if a.json:
        import json
        with open(a.json, "w") as f:
            json.dump({"candidate": what, "baseline": base_what, "rows": rows}, f, indent=2)
    return EXIT_OK


def cmd_export(a) -> int:
    import copy

    import torch

    from .cli_models import load_source
    from .measure import fidelity
    from .dropin import eval_mode
    from .recipe import apply_recipe

    src = load_source(a.model, a.input_shape, a.input_dtype, a.calibration, a.weights)
    model = src.model
    recipe = _recipe(a.recipe, model) if a.recipe else []
    if recipe:
        model, _ = apply_recipe(copy.deepcopy(model), recipe, src.example, src.calibration or None)
        eval_mode(model)
    fmt = _format_for(a.out, a.format)
    save_artifact(model, a.out, fmt, src.example)
    from .export import load
    loaded = load(a.out)
    if hasattr(loaded, "module") and not isinstance(loaded, torch.nn.Module):
        loaded = loaded.module()
    fid = fidelity(model, loaded, src.example)
    size = os.path.getsize(a.out) if os.path.isfile(a.out) else None
    print(f"saved {fmt} artifact to {a.out}" + (f" ({size / 1e6:.2f} MB)" if size else ""))
    print(f"loaded back: max abs err {fid.max_abs_err:.3g}, cosine {fid.cosine:.6f} vs the model on the example inputs")
    if not fid.cosine >= 0.9999:
        print(f"torchfast export: error: the artifact does not reproduce the model's outputs (cosine {fid.cosine:.6f})",
              file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


def cmd_serve(rest: list[str]) -> int:
    try:
        from .serve import cli as serve_cli
    except ImportError as e:
        print(f"torchfast serve: error: the serving command is not available ({e}); install the serve extra: "
              f"pip install 'torchfast[serve]'", file=sys.stderr)
        return EXIT_FAILURE
    if not (hasattr(serve_cli, "add_arguments") and hasattr(serve_cli, "run")):
        print("torchfast serve: error: torchfast.serve.cli has no add_arguments()/run(); this build cannot serve "
              "from the command line", file=sys.stderr)
        return EXIT_FAILURE
    p = argparse.ArgumentParser(prog="torchfast serve", description=(serve_cli.__doc__ or "").strip() or None)
    serve_cli.add_arguments(p)
    args = p.parse_args(rest)
    rc = serve_cli.run(args)
    return EXIT_OK if rc is None else int(rc)


# ---------------------------------------------------------------- entry point
def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv[:1] == ["serve"]:
        try:
            return cmd_serve(argv[1:])
        except SystemExit as e:  # argparse inside the serve command
            return int(e.code or 0)
    try:
        a = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    if a.command is None:
        parser.print_help()
        return EXIT_USAGE
    debug = getattr(a, "debug", False)
    usage = _usage_types()
    try:
        return {"optimize": cmd_optimize, "bench": cmd_bench, "export": cmd_export}[a.command](a)
    except usage as e:
        print(f"torchfast {a.command}: error: {e}", file=sys.stderr)
        if debug:
            traceback.print_exc()
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"torchfast {a.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        print(f"torchfast {a.command}: error: {type(e).__name__}: {e}", file=sys.stderr)
        if debug:
            traceback.print_exc()
        else:
            print("(run again with --debug for the traceback)", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
