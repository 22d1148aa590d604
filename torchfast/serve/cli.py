"""``torchfast serve [PATH|MODEL]``: the ``torchfast`` command's serve subcommand (add_arguments()/run());
``python -m torchfast.serve`` runs it on its own."""
from __future__ import annotations

import argparse
import sys
from typing import Sequence


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.replace("x", ",").split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _shape(text: str) -> tuple[int, ...]:
    from ..cli_models import SourceError, parse_shape
    try:
        return parse_shape(text)
    except SourceError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix(f"--input-shape {text!r}: ")) from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="*", default=["digits"],
                   help="artifacts written by torchfast.save (.pt TorchScript, .pt2 ExportedProgram, .onnx, .xml OpenVINO IR) or built-in "
                        "names: digits (trained at startup, the default), minilm, any torchvision model name")
    p.add_argument("--name", action="append", default=None, help="serve the model under this name (repeatable)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--max-delay-ms", type=float, default=5.0,
                   help="longest a request waits for company, from the first request of a batch")
    p.add_argument("--preferred-batch-sizes", type=_ints, default=None,
                   help="padding buckets, e.g. 1,2,4,8,16,32 (for backends compiled for fixed shapes)")
    p.add_argument("--max-queue-size", type=int, default=256, help="beyond this, 503 + Retry-After at once")
    p.add_argument("--timeout-ms", type=float, default=10_000.0, help="default per-request deadline (504 after)")
    p.add_argument("--max-body-mb", type=float, default=16.0, help="request size limit (413 above)")
    p.add_argument("--input-shape", type=_shape, action="append", default=None, metavar="SHAPE",
                   help="shape of one example batch, batch dim first, e.g. 1,3,224,224 (as in torchfast optimize; "
                        "repeat for several positional inputs), for an artifact that does not declare its inputs "
                        "(torchfast.save(..., example_inputs=x) records them); the batch dim is served as any size")
    p.add_argument("--input-dtype", action="append", default=None, metavar="DTYPE",
                   help="dtype of each --input-shape input (default float32; the last one given repeats)")
    p.add_argument("--nan-guard", action="store_true", help="answer NaN/Inf outputs with an error")
    p.add_argument("--max-priority", type=int, default=0,
                   help="highest x-priority a client may ask for (higher asks are capped; default 0: "
                        "clients cannot jump the queue)")
    p.add_argument("--body-timeout-s", type=float, default=30.0,
                   help="a request body must arrive within this many seconds (408 after)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--log-level", default="info")


def run(args: argparse.Namespace) -> int:
    import torch

    from .http import serve_http
    from .model import load_served_model

    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.name or []
    if names and len(names) != len(args.model):
        print(f"error: give one --name per model ({len(args.model)} models, {len(names)} names)", file=sys.stderr)
        return 2
    models = []
    for i, src in enumerate(args.model):
        print(f"torchfast serve: loading {src} ...", file=sys.stderr, flush=True)
        try:
            models.append(load_served_model(src, name=names[i] if names else None,
                                            input_shape=args.input_shape,
                                            input_dtype=args.input_dtype or ["float32"]))
        except (ValueError, FileNotFoundError, RuntimeError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    for m in models:
        print(f"  {m.name}: {m.description}; POST http://{args.host}:{args.port}/v1/models/{m.name}/infer",
              file=sys.stderr)
    serve_http(models, host=args.host, port=args.port, log_level=args.log_level,
               max_batch_size=args.max_batch_size, max_delay_ms=args.max_delay_ms,
               preferred_batch_sizes=args.preferred_batch_sizes, max_queue_size=args.max_queue_size,
               timeout_ms=args.timeout_ms, max_body_bytes=int(args.max_body_mb * (1 << 20)),
               nan_guard=args.nan_guard, max_priority=args.max_priority, body_timeout_s=args.body_timeout_s)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="torchfast serve", description="Serve a model over HTTP with dynamic batching")
    add_arguments(p)
    return run(p.parse_args(argv))
