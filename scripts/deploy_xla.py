#!/usr/bin/env python
"""Deploy a model on a TPU host with torch_xla: optimize -> XLA compile -> smoke test -> StableHLO + ExportedProgram.

    PJRT_DEVICE=TPU python scripts/deploy_xla.py torchvision:resnet50 --input-shape 8,3,224,224 --out deploy/r50

Compiles with ``torch.compile(backend="openxla")`` on ``torch_xla.device()`` (the PJRT device comes from
PJRT_DEVICE), checks the XLA outputs against CPU eager, and writes OUT/model.pt2 (ExportedProgram, loads
with plain torch) and OUT/stablehlo/ (torch_xla's StableHLO bundle: the portable XLA program + weights,
servable without PyTorch). PJRT_DEVICE=CPU runs the same path on a CPU (what `make test-xla` checks).
XLA compiles one program per input shape, so the artifact is for the batch size given.

Needs torch_xla (which pins its own torch: torch_xla 2.9.0 needs torch 2.9.1); without it, exit code 2.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def fail(msg: str, code: int = 2) -> "None":
    print(f"deploy_xla: {msg}", file=sys.stderr)
    raise SystemExit(code)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="torchvision:NAME, module:callable, file.py:callable or a saved artifact")
    ap.add_argument("--input-shape", action="append", help="per input, batch first, e.g. 8,3,224,224 (repeatable)")
    ap.add_argument("--recipe", default="", help="torchfast recipe applied first (default: none)")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="bf16 is the TPU's native type")
    ap.add_argument("--calibration", type=int, default=4)
    ap.add_argument("--no-stablehlo", action="store_true", help="skip the StableHLO bundle")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    if importlib.util.find_spec("torch_xla") is None:
        fail("torch_xla is not installed: on a TPU host pip install torch_xla (it pins its torch version); "
             "`make test-xla` builds a CPU environment for it")
    if not os.environ.get("PJRT_DEVICE"):
        fail("set PJRT_DEVICE (TPU on a TPU host, CPU to try the path on a CPU)")

    import torch

    import torchfast
    from torchfast.cli_models import load_source
    from torchfast.measure import fidelity

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    src = load_source(args.model, args.input_shape, calibration=args.calibration)
    model, example = src.model.eval(), src.example
    if args.recipe:
        model = torchfast.optimize(model, example, recipe=args.recipe, backend="eager",
                                   calibration=src.calibration).transformed
    fast = torchfast.compile(model, example, backend="xla", dtype=args.dtype)
    print(fast.report)
    (out / "report.md").write_text(str(fast.report))
    batches = [b for b in (src.validation or src.calibration or [example])]
    fid = fidelity(model, lambda *a, **k: fast(*a, **k).cpu(), batches)
    print(f"smoke test (XLA on {fast.report.summary.get('pjrt_device')} vs CPU eager): cosine {fid.cosine:.6f}, "
          f"max abs err {fid.max_abs_err:.3g}")
    if fid.cosine < (0.999 if args.dtype == "fp32" else 0.99):
        fail(f"XLA outputs do not reproduce the model (cosine {fid.cosine:.5f})", code=1)
    ep_path = torchfast.save(model, out / "model.pt2", format="exported_program", example_inputs=example,
                             dynamic_batch=False)   # XLA programs are per shape; StableHLO needs static dims
    print(f"wrote {ep_path}")
    if not args.no_stablehlo:
        from torch_xla.stablehlo import exported_program_to_stablehlo
        shlo = exported_program_to_stablehlo(torch.export.load(str(ep_path)))
        shlo.save(str(out / "stablehlo"))
        print(f"wrote {out / 'stablehlo'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
