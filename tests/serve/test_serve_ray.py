"""Ray Serve on a local single-node cluster (127.0.0.1, started once here and shut down, bounded in time):
batching and error isolation, deadlines and priorities as the local server keeps them, two replicas sharing
the load, and a replica killed mid-load replaced by Ray with every accepted request answered."""
from __future__ import annotations

import functools
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from torch import nn

ray = pytest.importorskip("ray", reason="Ray is optional: pip install 'torchfast[ray]'")
serve = pytest.importorskip("ray.serve", reason="Ray Serve is optional: pip install 'torchfast[ray]'")
httpx = pytest.importorskip("httpx")

pytestmark = [pytest.mark.ray, pytest.mark.timeout(240)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster():
    """One local Ray cluster and Serve instance for the module (~15 s to start on 2 cores)."""
    port = _free_port()
    here = Path(__file__).resolve().parent
    path = os.pathsep.join([str(here.parents[1]), str(here), os.environ.get("PYTHONPATH", "")])
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             configure_logging=False, _node_ip_address="127.0.0.1",
             runtime_env={"env_vars": {"PYTHONPATH": path, "OMP_NUM_THREADS": "1"}})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


class Poisonable(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        if (x == -999).any():
            raise ValueError("poisoned row")
        return self.lin(x)


class Sleepy(nn.Module):
    """Sleeps x[:, 0].max() seconds (a negative value: until the file ``gate`` exists, at most 60 s); answers
    each row with (x[:, 1], the call number, its process id)."""

    def __init__(self, gate: str | None = None):
        super().__init__()
        self.calls, self.gate = 0, gate

    def forward(self, x):
        wait = float(x[:, 0].max())
        deadline = time.monotonic() + 60
        while wait < 0 and self.gate and not os.path.exists(self.gate) and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(max(wait, 0.0))
        self.calls += 1
        n = x.shape[0]
        return torch.stack([x[:, 1], torch.full((n,), float(self.calls)), torch.full((n,), float(os.getpid()))], 1)


def _poisonable():
    from torchfast.serve.model import InputSpec, ServedModel
    return ServedModel("lin", Poisonable().eval(), (InputSpec("input", (4,)),))


def _sleepy(gate: str | None = None):
    from torchfast.serve.model import InputSpec, ServedModel
    return ServedModel("sleepy", Sleepy(gate), (InputSpec("input", (2,)),))


def _row(wait_s: float, tag: float) -> torch.Tensor:
    return torch.tensor([[wait_s, tag]])


def _wait_for(cond, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while True:
        got = cond()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}"
        time.sleep(0.1)


def test_ray_serve_batches_and_isolates_errors(cluster):
    from torchfast.serve.ray import RayClient, ray_deployment
    app = ray_deployment(_poisonable, name="lin", replicas=1, max_batch_size=16, max_delay_ms=50,
                         preferred_batch_sizes=[4, 8, 16], num_cpus_per_replica=0.5)
    handle = serve.run(app, name="lin", route_prefix="/lin")
    try:
        client = RayClient(handle, timeout_ms=60_000)
        ref = Poisonable().eval()
        xs = [torch.full((1 + i % 2, 4), float(i)) for i in range(24)]
        xs[5] = torch.full((1, 4), -999.0)

        def one(i):
            try:
                return client.infer(xs[i])
            except Exception as e:  # noqa: BLE001
                return e
        with ThreadPoolExecutor(24) as pool:
            results = list(pool.map(one, range(len(xs))))
        for i, (x, r) in enumerate(zip(xs, results)):
            if i == 5:
                assert isinstance(r, Exception) and "poisoned row" in str(r)
            else:
                torch.testing.assert_close(r, ref(x).detach())
        stats = handle.stats.remote().result(timeout_s=30)
        assert stats["max_batch_size_seen"] > 2      # concurrent requests shared batches
        assert stats["error"] == 1 and stats["padded_rows"] > 0 and stats["isolation_reruns"] > 0
        r = httpx.post(f"{cluster}/lin", json={"inputs": [[1.0, 2.0, 3.0, 4.0]]}, timeout=30)
        assert r.status_code == 200, r.text
        torch.testing.assert_close(torch.tensor(r.json()["outputs"]["output"]["data"]),
                                   ref(torch.tensor([[1.0, 2.0, 3.0, 4.0]])).detach())
        bad = httpx.post(f"{cluster}/lin", json={"inputs": [[1.0]]}, timeout=30)
        assert bad.status_code == 422 and "shape" in bad.json()["error"]
    finally:
        serve.delete("lin")


def test_deadlines_and_priorities_are_kept_inside_the_replica(cluster, tmp_path):
    from torchfast.serve.batcher import RequestTimeout
    from torchfast.serve.ray import RayClient, ray_deployment
    gate = tmp_path / "open"
    app = ray_deployment(functools.partial(_sleepy, str(gate)), name="sleepy", replicas=1, max_batch_size=1, max_delay_ms=0,
                         max_priority=5, max_ongoing_requests=16, num_cpus_per_replica=0.5, warmup=False)
    handle = serve.run(app, name="sleepy", route_prefix="/sleepy")
    try:
        client = RayClient(handle, timeout_ms=60_000)
        depth = lambda n: handle.stats.remote().result(timeout_s=30)["queue_depth"] >= n  # noqa: E731
        with ThreadPoolExecutor(8) as pool:
            busy = pool.submit(client.infer, _row(-1, 0))                     # holds the model until the gate opens
            _wait_for(lambda: handle.stats.remote().result(timeout_s=30)["in_flight"] >= 1, 30, "the busy call")
            low = []
            for i in range(2):   # one after the other: their arrival order is known
                low.append(pool.submit(client.infer, _row(0, 10 + i)))
                _wait_for(lambda: depth(i + 1), 30, f"low-priority request {i} queued")
            expiring = pool.submit(client.infer, _row(0, 30), timeout_ms=1000)  # waits behind the busy call
            with pytest.raises(RequestTimeout, match="not run"):
                expiring.result(timeout=60)   # answered at its deadline while the model is still held
            high = pool.submit(client.infer, _row(0, 20), priority=3)
            http = pool.submit(httpx.post, f"{cluster}/sleepy", json={"inputs": _row(0, 40).tolist()},
                               headers={"x-priority": "99", "x-timeout-ms": "60000"}, timeout=60)
            _wait_for(lambda: depth(4), 30, "the high-priority and HTTP requests queued")
            gate.touch()
            order = {}
            for f in [busy, *low, high]:
                out = f.result(timeout=60)
                order[float(out[0, 0])] = float(out[0, 1])
            r = http.result(timeout=60)
        assert r.status_code == 200, r.text
        order[40.0] = r.json()["outputs"]["output"]["data"][0][1]
        # the busy call first; x-priority 99 capped at max_priority=5 still runs before priority 3, then the
        # low-priority requests in arrival order; the expired request never ran (5 calls, not 6)
        assert sorted(order, key=order.get) == [0.0, 40.0, 20.0, 10.0, 11.0], order
        stats = handle.stats.remote().result(timeout_s=30)
        assert stats["timeout"] == 1 and stats["batches"] == 5
        late = httpx.post(f"{cluster}/sleepy", json={"inputs": _row(0, 50).tolist()},
                          headers={"x-timeout-ms": "0"}, timeout=30)
        assert late.status_code == 400 and "timeout" in late.json()["error"]
    finally:
        serve.delete("sleepy")


def test_two_replicas_share_the_load_and_a_killed_one_is_replaced_losing_nothing(cluster):
    from torchfast.serve.ray import RayClient, ray_deployment
    app = ray_deployment(_sleepy, name="pair", replicas=2, max_batch_size=4, max_delay_ms=2,
                         num_cpus_per_replica=0.5, health_check_period_s=1.0, warmup=False)
    handle = serve.run(app, name="pair", route_prefix="/pair")
    try:
        client = RayClient(handle, retries=5, timeout_ms=120_000)
        seen: dict = {}

        def both_replicas():
            for _ in range(8):
                st = handle.stats.remote().result(timeout_s=30)
                seen[st["actor_name"]] = st["pid"]
            return len(seen) == 2
        _wait_for(both_replicas, 60, "both replicas to answer")
        n_requests, answered, killed = 200, [], threading.Event()
        lock = threading.Lock()

        def one(i):
            out = client.infer(_row(0.05, i))
            with lock:
                answered.append((i, out, killed.is_set()))
            return out

        with ThreadPoolExecutor(12) as pool:
            futures = [pool.submit(one, i) for i in range(n_requests)]
            _wait_for(lambda: len(answered) >= 40, 60, "40 answers before the kill")
            victim = sorted(seen)[0]
            ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)   # mid-load, as a crash would
            killed.set()
            results = [f.result(timeout=180) for f in futures]
        assert len(results) == n_requests and len(answered) == n_requests
        for i, out, _ in answered:
            assert float(out[0, 0]) == i                                   # each request got its own answer
        before = {float(out[0, 2]) for _, out, after in answered if not after}
        assert before == {float(p) for p in seen.values()}, "requests were not spread over both replicas"
        assert client.retried >= 1, "no request was in flight on the killed replica"
        # Ray replaces the replica: two running again, one of them a new process
        def replaced():
            st = serve.status().applications["pair"].deployments["pair"]
            return st.replica_states.get("RUNNING", 0) == 2 and st.status == "HEALTHY"
        _wait_for(replaced, 90, "Ray to replace the killed replica")
        pids: set = set()

        def new_replica_answers():   # the handle learns of the new replica shortly after the controller
            with ThreadPoolExecutor(8) as pool:
                pids.update(float(o[0, 2]) for o in pool.map(lambda i: client.infer(_row(0.02, i)), range(16)))
            return len(pids) == 2
        _wait_for(new_replica_answers, 60, "the new replica to answer")
        assert float(seen[victim]) not in pids, (pids, seen, victim)
    finally:
        serve.delete("pair")
