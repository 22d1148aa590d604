"""Ray Serve on a local single-node cluster (127.0.0.1, started and shut down here, bounded in time)."""
from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

import pytest
import torch
from torch import nn

ray = pytest.importorskip("ray", reason="Ray is optional: pip install 'torchfast[ray]'")
serve = pytest.importorskip("ray.serve")

pytestmark = [pytest.mark.ray, pytest.mark.timeout(240)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Poisonable(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        if (x == -999).any():
            raise ValueError("poisoned row")
        return self.lin(x)


def _factory():
    from torchfast.serve.model import InputSpec, ServedModel
    return ServedModel("lin", Poisonable().eval(), (InputSpec("input", (4,)),))


def test_ray_serve_batches_and_isolates_errors():
    import httpx
    from torchfast.serve.ray import ray_deployment
    port = _free_port()
    here = Path(__file__).resolve().parent
    path = os.pathsep.join([str(here.parents[1]), str(here), os.environ.get("PYTHONPATH", "")])
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             configure_logging=False, _node_ip_address="127.0.0.1",
             runtime_env={"env_vars": {"PYTHONPATH": path}})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = ray_deployment(_factory, name="lin", replicas=1, max_batch_size=16, max_delay_ms=50,
                             preferred_batch_sizes=[4, 8, 16], num_cpus_per_replica=0.5)
        handle = serve.run(app, name="lin", route_prefix="/lin")
        ref = Poisonable().eval()
        xs = [torch.full((1 + i % 2, 4), float(i)) for i in range(24)]
        xs[5] = torch.full((1, 4), -999.0)
        results: list = [None] * len(xs)

        def one(i):
            try:
                results[i] = handle.infer.remote(xs[i]).result(timeout_s=60)
            except Exception as e:  # noqa: BLE001
                results[i] = e
        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(xs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(90)
        for i, (x, r) in enumerate(zip(xs, results)):
            if i == 5:
                assert isinstance(r, Exception) and "poisoned row" in str(r)
            else:
                torch.testing.assert_close(r, ref(x).detach())
        stats = handle.stats.remote().result(timeout_s=30)
        assert max(stats["batch_sizes"]) > 2  # @serve.batch grouped concurrent requests
        assert stats["error"] == 1 and stats["padded_rows"] >= 0
        r = httpx.post(f"http://127.0.0.1:{port}/lin", json={"inputs": [[1.0, 2.0, 3.0, 4.0]]}, timeout=30)
        assert r.status_code == 200, r.text
        torch.testing.assert_close(torch.tensor(r.json()["outputs"]["output"]["data"]),
                                   ref(torch.tensor([[1.0, 2.0, 3.0, 4.0]])).detach())
        bad = httpx.post(f"http://127.0.0.1:{port}/lin", json={"inputs": [[1.0]]}, timeout=30)
        assert bad.status_code == 422 and "shape" in bad.json()["error"]
    finally:
        serve.shutdown()
        ray.shutdown()
