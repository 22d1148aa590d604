#!/usr/bin/env python
"""Deploy a model on an NVIDIA GPU with TensorRT: optimize -> TensorRT engine -> artifact -> smoke test -> Triton repo.

    python scripts/deploy_tensorrt.py torchvision:resnet50 --input-shape 8,3,224,224 --precision fp16 \\
        --max-batch 32 --out deploy/resnet50

Writes OUT/model.ep (a TensorRT-compiled ExportedProgram: ``import torch_tensorrt; torch.export.load``),
OUT/report.md, and OUT/triton/NAME/{config.pbtxt, 1/model.pt} — a Triton model repository for the
PyTorch (libtorch) backend with dynamic batching (the TorchScript engine needs Torch-TensorRT's runtime
library loaded in Triton, e.g. the NGC PyTorch/Triton containers). ``--precision int8`` quantizes with NVIDIA
ModelOpt on the calibration batches first (TensorRT 10+ no longer calibrates by itself).

Needs CUDA and torch_tensorrt; without them it stops at once with exit code 2.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def fail(msg: str, code: int = 2) -> "None":
    print(f"deploy_tensorrt: {msg}", file=sys.stderr)
    raise SystemExit(code)


def check_environment() -> None:
    import torch
    if not torch.cuda.is_available():
        fail(f"no CUDA GPU visible to torch {torch.__version__} (torch.cuda.is_available() is False); "
             "run this on a machine with an NVIDIA GPU and a CUDA build of torch")
    if importlib.util.find_spec("torch_tensorrt") is None:
        fail("torch_tensorrt is not installed; pip install 'torchfast[tensorrt]' (torch-tensorrt==2.14.0) on this host")


def modelopt_int8(model, calibration):
    """INT8 Q/DQ with NVIDIA ModelOpt, calibrated on real batches (TensorRT's strongly typed int8 path)."""
    if importlib.util.find_spec("modelopt") is None:
        fail("--precision int8 needs NVIDIA ModelOpt: pip install nvidia-modelopt")
    import modelopt.torch.quantization as mtq
    from torchfast.modules import call_model

    def forward_loop(m):
        for b in calibration:
            call_model(m, b)
    return mtq.quantize(model, mtq.INT8_DEFAULT_CFG, forward_loop)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="torchvision:NAME, module:callable, file.py:callable or a saved artifact")
    ap.add_argument("--input-shape", action="append", help="per input, batch first, e.g. 8,3,224,224 (repeatable)")
    ap.add_argument("--recipe", default="", help="torchfast recipe applied first, e.g. 'lowrank(ratio=0.5)' (default: none)")
    ap.add_argument("--precision", default="fp16", choices=["fp32", "fp16", "bf16", "int8"])
    ap.add_argument("--max-batch", type=int, default=32, help="largest batch the engine and Triton accept")
    ap.add_argument("--max-delay-ms", type=float, default=5.0, help="Triton dynamic batching queue delay")
    ap.add_argument("--name", default="model", help="model name in the Triton repository")
    ap.add_argument("--calibration", type=int, default=8, help="calibration batches (int8, data-aware recipes)")
    ap.add_argument("--out", required=True, help="output directory")
    args = ap.parse_args(argv)
    check_environment()                       # exit 2 before any work when CUDA/TensorRT are missing

    import torch
    import torch_tensorrt

    import torchfast
    from torchfast.cli_models import load_source
    from torchfast.measure import fidelity
    from torchfast.modules import split_batch
    from torchfast.serve.triton import TritonBatching, config_pbtxt

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    src = load_source(args.model, args.input_shape, calibration=args.calibration)
    model, example = src.model.eval(), src.example
    if args.recipe:
        res = torchfast.optimize(model, example, recipe=args.recipe, backend="eager", calibration=src.calibration,
                                 eval_fn=src.eval_fn)
        (out / "recipe_report.md").write_text(str(res.report))
        model = res.transformed
    if args.precision == "int8":
        model = modelopt_int8(model.cuda(), [torchfast.modules.move_batch(b, "cuda") for b in src.calibration or [example]])
    fast = torchfast.compile(model, example, backend="tensorrt", device="cuda", dynamic_batch=True,
                             precision=args.precision, max_batch=args.max_batch)
    print(fast.report)
    (out / "report.md").write_text(str(fast.report))

    ep_path = torchfast.save(fast, out / "model.ep", format="tensorrt")
    # smoke test: the saved engine, loaded back, reproduces the model on validation batches
    loaded = torch.export.load(str(ep_path)).module()
    batches = src.validation or src.calibration or [example]
    fid = fidelity(src.model, lambda *a, **k: loaded(*[t.cuda() for t in a], **{n: t.cuda() for n, t in k.items()}),
                   batches)
    print(f"smoke test (saved engine vs eager fp32): cosine {fid.cosine:.5f}, max abs err {fid.max_abs_err:.3g}, "
          f"top-1 agreement {fid.top1_agreement}")
    if fid.cosine < 0.99:
        fail(f"the saved engine does not reproduce the model (cosine {fid.cosine:.4f})", code=1)

    # Triton: TorchScript engine + config.pbtxt with dynamic batching
    args_in, kwargs_in = split_batch(example)
    if kwargs_in:
        fail("Triton's PyTorch backend takes positional inputs (INPUT__0...); this model takes keyword inputs", code=1)
    mdir = out / "triton" / args.name
    (mdir / "1").mkdir(parents=True, exist_ok=True)
    cuda_in = [t.cuda() for t in args_in]
    torch_tensorrt.save(fast.artifact, str(mdir / "1" / "model.pt"), output_format="torchscript", arg_inputs=cuda_in)
    with torch.no_grad():
        outs = fast(*args_in)
    outs = (outs,) if isinstance(outs, torch.Tensor) else tuple(outs)
    batching = TritonBatching(max_batch_size=args.max_batch, max_delay_ms=args.max_delay_ms)
    (mdir / "config.pbtxt").write_text(config_pbtxt(args.name, list(args_in), list(outs), batching, kind="KIND_GPU"))
    print(f"wrote {ep_path}, {mdir}/config.pbtxt, {mdir}/1/model.pt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
