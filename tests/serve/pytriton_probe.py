"""Run by test_serve_triton.py with a Python that has nvidia-pytriton (numpy<2): a real Triton server on
127.0.0.1 batching a torchfast model; prints one JSON line of findings. Also checks a generated
config.pbtxt against Triton's real ModelConfig protobuf schema."""
from __future__ import annotations

import json
import sys
import tempfile
import threading

import numpy as np
import torch
from torch import nn


def main() -> None:
    sys.path.insert(0, sys.argv[1])  # the repository root
    from torchfast.serve.model import InputSpec, ServedModel
    from torchfast.serve.triton import TritonBatching, serve_pytriton, write_model_repository

    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2
    repo = tempfile.mkdtemp()
    mdir = write_model_repository(nn.Linear(4, 3).eval(), repo, torch.randn(2, 4), name="lin",
                                  batching=TritonBatching(16, 2.0, (4, 8), max_queue_size=64, timeout_ms=100))
    cfg = text_format.Parse((mdir / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    found = {"proto_max_batch_size": cfg.max_batch_size,
             "proto_delay_us": cfg.dynamic_batching.max_queue_delay_microseconds,
             "proto_preferred": list(cfg.dynamic_batching.preferred_batch_size),
             "proto_queue": cfg.dynamic_batching.default_queue_policy.max_queue_size}

    torch.manual_seed(0)
    lin = nn.Linear(4, 3).eval()
    gate = threading.Event()
    sizes = []

    class Held(nn.Module):
        def forward(self, x):
            sizes.append(x.shape[0])
            gate.wait(30)  # the first call holds the others in Triton's queue: they must batch
            return lin(x)

    served = ServedModel("lin", Held(), (InputSpec("input", (4,)),))
    gate.set()
    triton = serve_pytriton(served, TritonBatching(max_batch_size=16, max_delay_ms=50))
    sizes.clear()
    gate.clear()
    try:
        from tritonclient.http import InferenceServerClient, InferInput
        xs = [np.random.randn(1, 4).astype(np.float32) for _ in range(12)]
        results = [None] * len(xs)

        def one(i):
            with InferenceServerClient(triton.http_url.removeprefix("http://")) as c:
                inp = InferInput("input", list(xs[i].shape), "FP32")
                inp.set_data_from_numpy(xs[i])
                results[i] = c.infer("lin", [inp]).as_numpy("output")
        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(xs))]
        threads[0].start()
        threading.Event().wait(1.0)
        for t in threads[1:]:
            t.start()
        threading.Event().wait(1.0)
        gate.set()
        for t in threads:
            t.join(60)
        ok = all(r is not None and np.allclose(r, lin(torch.from_numpy(x)).detach().numpy(), atol=1e-5)
                 for r, x in zip(results, xs))
        found.update(answers_ok=ok, batch_sizes=sizes, served=len([r for r in results if r is not None]))
    finally:
        triton.stop()
    print("PYTRITON_RESULT " + json.dumps(found))


if __name__ == "__main__":
    main()
