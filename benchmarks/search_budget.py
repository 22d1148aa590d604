"""recipe="auto" under a short time budget, on architectures it was not tuned on: does it keep the budget,
and what does a minute buy?

Run under the shared lock (2 cores for everyone):
    flock /tmp/torchfast-bench.lock .venv/bin/python benchmarks/search_budget.py [--budget 60] [--models a,b]

Each model (random weights, eval mode; torchvision and timm classifiers at their input sizes or 160x160,
small Hugging Face encoders called with a dict batch, a model with a tuple input and a tuple output) runs in
its own process: ``optimize(model, x, recipe="auto", calibration=6 unlabeled batches, time_budget_s=B)`` with
the default tolerance (mean output cosine >= 0.99 on held-out batches). A row gives

- the search's wall time against its budget;
- what it returned and its speedup vs eager fp32 from the search's own timing ("search");
- "check": the returned drop-in model re-timed head to head against the original, interleaved, called the
  way a user calls the original (``model(**batch)`` for the encoders);
- the output cosine of the returned model vs the original on 2 fresh batches, and whether the user's model
  (weights, module types, train/eval flags) is untouched.

Random weights: fidelity here says the search kept its bound on these outputs, not an accuracy.
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

MODELS = ["tv:resnet18", "tv:mobilenet_v3_small", "tv:efficientnet_b0", "tv:regnet_x_400mf", "tv:googlenet",
          "tv:densenet121", "tv:swin_t", "timm:vit_tiny_patch16_224", "timm:mobilevit_xxs", "hf:bert",
          "hf:distilbert", "custom:tuple_io"]


def build(name: str):
    """(model, example batch, calibration batches, a fresh batch for the fidelity check)."""
    import torch
    from torch import nn
    g = torch.Generator().manual_seed(1)
    torch.manual_seed(0)
    if name.startswith("tv:") or name.startswith("timm:"):
        if name.startswith("tv:"):
            import torchvision
            m = torchvision.models.get_model(name[3:], weights=None)
            size = (3, 160, 160)
        else:
            import timm
            m = timm.create_model(name[5:], pretrained=False)
            size = tuple(m.pretrained_cfg.get("input_size", (3, 224, 224)))

        def batch(n):
            return torch.randn(n, *size, generator=g)
    elif name.startswith("hf:"):
        import transformers
        small = dict(num_hidden_layers=2, num_attention_heads=2, vocab_size=1000)
        cfg = (transformers.DistilBertConfig(dim=128, n_layers=2, n_heads=2, hidden_dim=256, vocab_size=1000)
               if name == "hf:distilbert" else transformers.BertConfig(hidden_size=128, intermediate_size=256, **small))
        m = transformers.AutoModel.from_config(cfg)

        def batch(n):
            ids = torch.randint(5, 1000, (n, 32), generator=g)
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    elif name == "custom:tuple_io":
        class TwoHeads(nn.Module):
            def __init__(self):
                super().__init__()
                self.a, self.b = nn.Conv2d(3, 32, 3, padding=1), nn.Conv2d(32, 64, 3, padding=1)
                self.fc, self.aux = nn.Linear(64, 10), nn.Linear(64, 4)

            def forward(self, x, scale=None):
                h = torch.relu(self.b(torch.relu(self.a(x)))).mean((2, 3))
                return self.fc(h if scale is None else h * scale), self.aux(h)
        m = TwoHeads()

        def batch(n):
            return (torch.randn(n, 3, 64, 64, generator=g),)
    else:
        raise KeyError(f"unknown model {name!r}")
    return m.eval(), batch(2), [batch(4) for _ in range(6)], [batch(4) for _ in range(2)]


def _call(model, batch):
    return model(**batch) if isinstance(batch, dict) else model(*batch) if isinstance(batch, tuple) else model(batch)


def _first(out):
    import torch
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    if isinstance(out, dict):
        return next(iter(out.values()))
    return out[0]


def _fingerprint(model):
    """The user's model as the search must leave it: tensors, module types, train/eval flags."""
    return ({k: v.detach().clone() for k, v in model.state_dict().items()},
            [(n, type(m).__name__, m.training) for n, m in model.named_modules()])


def _same(a, b) -> bool:
    import torch
    return a[1] == b[1] and a[0].keys() == b[0].keys() and all(torch.equal(a[0][k], b[0][k]) for k in a[0])


def worker(name: str, budget: float, queue) -> None:
    warnings.filterwarnings("ignore")
    import torch
    import torchfast as tf
    from torchfast.measure import compare_latency, compare_outputs
    row = {"model": name, "budget (s)": budget}
    try:
        model, x, calib, fresh = build(name)
        before = _fingerprint(model)
        t0 = time.perf_counter()
        res = tf.optimize(model, x, recipe="auto", calibration=calib, time_budget_s=budget, progress=False)
        wall = time.perf_counter() - t0
        row.update({"wall (s)": round(wall, 1), "wall / budget": round(wall / budget, 2),
                    "returned": res.chosen.name if res.chosen is not None else f"original ({res.reason[:60]})",
                    "search": round(res.chosen.speedup, 2) if res.chosen is not None else 1.0})
        with torch.inference_mode():
            ref = [_first(_call(model, b)).float() for b in fresh]
            got = [_first(_call(res.model, b)).float() for b in fresh]
        fid = compare_outputs(ref, got)
        check = compare_latency(model, lambda *a, **k: res.model(*a, **k), x) if res.chosen is not None else None
        row.update({"check": round(check.speedup, 2) if check is not None else 1.0,
                    "cosine": round(fid.cosine, 4), "worst cosine": round(fid.worst_cosine, 4),
                    "untouched": _same(_fingerprint(model), before),
                    "budget note": res.report.summary["time budget"]})
    except Exception as e:  # noqa: BLE001 - a model the search cannot take is a row
        row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
        row["traceback"] = traceback.format_exc()[-1500:]
    queue.put(row)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=60.0)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args()
    from torchfast.report import format_table
    ctx = mp.get_context("spawn")
    rows = []
    for name in args.models.split(","):
        queue = ctx.Queue()
        proc = ctx.Process(target=worker, args=(name, args.budget, queue))
        proc.start()
        proc.join(args.budget * 4 + 120)
        if proc.is_alive():
            proc.kill()
            row = {"model": name, "error": f"still running after {args.budget * 4 + 120:.0f}s"}
        else:
            row = queue.get() if not queue.empty() else {"model": name, "error": f"process died ({proc.exitcode})"}
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "traceback"}), file=sys.stderr, flush=True)
    cols = ["model", "wall (s)", "wall / budget", "returned", "search", "check", "cosine", "worst cosine", "untouched"]
    print(format_table(rows, cols))
    for r in rows:
        if "error" in r:
            print(f"\n{r['model']}: {r['error']}\n{r.get('traceback', '')}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
