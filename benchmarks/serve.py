"""Serving under load, loopback only: does dynamic batching pay, and does it lose anything?

For ResNet-18 (224x224, padding buckets 1..32) and all-MiniLM-L6-v2 (real sentences, 64 tokens):
closed-loop HTTP clients (a separate process) at 1, 8, 32, 64 concurrent clients against our server
with batching (max_batch_size 32) and without (batch size 1), windows interleaved A B B A; the offline
batched throughput at batch 32 (measure.latency) as the ceiling; and the same load through a real
Triton server's dynamic batcher (PyTriton) when a Python with nvidia-pytriton is given. Then a soak:
many asyncio clients with injected failures, timeouts and cancellations against one batcher for a
bounded time: lost / duplicated answers and memory (RSS) over time.

``--protocols-only``: what speaking the Open Inference Protocol costs. The same batched server and model
at 32 clients through /v1 (the model's usual body: .npy for ResNet-18, JSON for MiniLM), /v2 with JSON
tensors and /v2 with binary tensors, windows interleaved (v1, v2 JSON, v2 binary, then reversed), one
client library (httpx, bodies built once) so only the server's side differs.

    flock /tmp/torchfast-bench.lock .venv/bin/python benchmarks/serve.py \
        [--pytriton-python /path/to/venv-with-pytriton/bin/python]
    flock /tmp/torchfast-bench.lock .venv/bin/python benchmarks/serve.py --protocols-only
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


# ---------------------------------------------------------------- load generator (its own process)
def _pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))] if s else float("nan")


async def _closed_loop(send, concurrency: int, seconds: float, warm_s: float) -> dict:
    lat, codes = [], {}
    t_end = time.perf_counter() + warm_s + seconds
    t_meas = time.perf_counter() + warm_s

    async def worker():
        while time.perf_counter() < t_end:
            t0 = time.perf_counter()
            code = await send()
            t1 = time.perf_counter()
            if t0 >= t_meas:  # only requests started inside the measured window
                lat.append(t1 - t0)
                codes[code] = codes.get(code, 0) + 1
    t0 = time.perf_counter()
    await asyncio.gather(*[worker() for _ in range(concurrency)])
    elapsed = time.perf_counter() - max(t0 + warm_s, t0)
    ok = codes.get(200, 0)
    return {"requests": len(lat), "ok": ok, "codes": codes, "throughput": ok / elapsed,
            "p50_ms": _pct(lat, 0.5) * 1e3, "p99_ms": _pct(lat, 0.99) * 1e3}


def client_main(a: argparse.Namespace) -> None:
    payload = Path(a.payload).read_bytes()
    if a.kind == "http":
        import httpx

        async def run():
            async with httpx.AsyncClient(base_url=a.client, timeout=120,
                                         limits=httpx.Limits(max_connections=a.concurrency + 4)) as c:
                headers = {"content-type": a.content_type, "accept": "application/x-npy"
                           if a.content_type == "application/x-npy" else "application/json"}
                path = f"/v1/models/{a.model}/infer"
                if a.header_length is not None:  # the Open Inference Protocol (0: JSON tensors only)
                    path = f"/v2/models/{a.model}/infer"
                    headers = {"content-type": a.content_type}
                    if a.header_length:
                        headers["inference-header-content-length"] = str(a.header_length)

                async def send():
                    r = await c.post(path, content=payload, headers=headers)
                    return r.status_code
                return await _closed_loop(send, a.concurrency, a.seconds, a.warm)
    else:  # a real Triton server (KServe v2 protocol, binary tensors)
        import numpy as np
        from tritonclient.http.aio import InferenceServerClient, InferInput
        arrays = dict(np.load(io.BytesIO(payload)))

        async def run():
            c = InferenceServerClient(a.client.removeprefix("http://"), conn_limit=a.concurrency + 4, conn_timeout=120)
            types = {np.dtype("float32"): "FP32", np.dtype("int64"): "INT64"}

            async def send():
                inputs = []
                for k, v in arrays.items():
                    i = InferInput(k, list(v.shape), types[v.dtype])
                    i.set_data_from_numpy(v, binary_data=True)
                    inputs.append(i)
                try:
                    await c.infer(a.model, inputs)
                    return 200
                except Exception:  # noqa: BLE001
                    return 500
            try:
                return await _closed_loop(send, a.concurrency, a.seconds, a.warm)
            finally:
                await c.close()
    print("CLIENT_RESULT " + json.dumps(asyncio.run(run())), flush=True)


def run_client(python: str, kind: str, url: str, model: str, payload: Path, content_type: str,
               concurrency: int, seconds: float, warm: float, header_length: int | None = None) -> dict:
    cmd = [python, __file__, "--client", url, "--kind", kind, "--model", model, "--payload", str(payload),
           "--content-type", content_type, "--concurrency", str(concurrency), "--seconds", str(seconds),
           "--warm", str(warm)]
    if header_length is not None:
        cmd += ["--header-length", str(header_length)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + warm + 300)
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("CLIENT_RESULT ")]
    if not line:
        raise RuntimeError(f"load generator failed:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    return json.loads(line[0].split(" ", 1)[1])


# ---------------------------------------------------------------- PyTriton server (its own process)
def pytriton_server_main(a: argparse.Namespace) -> None:
    import torch
    torch.set_num_threads(a.threads)
    from torchfast.serve.model import builtin_model
    from torchfast.serve.triton import TritonBatching, serve_pytriton
    served = builtin_model(a.pytriton_server)
    buckets = tuple(int(b) for b in a.buckets.split(",")) if a.buckets else ()
    triton = serve_pytriton(served, TritonBatching(max_batch_size=32, max_delay_ms=a.delay,
                                                   preferred_batch_sizes=buckets), http_port=a.port)
    print("PYTRITON_READY", flush=True)
    try:
        sys.stdin.read()  # until the parent closes our stdin
    finally:
        triton.stop()


# ---------------------------------------------------------------- the benchmark
def _payloads(tmp: Path):
    import numpy as np
    import torch
    from torchfast.zoo.minilm import load_minilm, sentences
    x = torch.randn(1, 3, 224, 224).numpy()
    buf = io.BytesIO()
    np.save(buf, x)
    (tmp / "resnet.npy").write_bytes(buf.getvalue())
    buf = io.BytesIO()
    np.savez(buf, input=x)
    (tmp / "resnet.npz").write_bytes(buf.getvalue())
    _, tok = load_minilm()
    enc = tok([sentences(1, offset=7)[0]], padding="max_length", truncation=True, max_length=64,
              return_tensors="np")
    ids, mask = enc["input_ids"].astype("int64"), enc["attention_mask"].astype("int64")
    (tmp / "minilm.json").write_text(json.dumps({"inputs": {"input_ids": ids.tolist(),
                                                            "attention_mask": mask.tolist()}}))
    buf = io.BytesIO()
    np.savez(buf, input_ids=ids, attention_mask=mask)
    (tmp / "minilm.npz").write_bytes(buf.getvalue())
    for name, arrays in (("resnet", {"input": x}), ("minilm", {"input_ids": ids, "attention_mask": mask})):
        _v2_payloads(tmp, name, arrays)


def _v2_payloads(tmp: Path, name: str, arrays: dict) -> None:
    """``NAME_v2.json`` (JSON tensors) and ``NAME_v2.bin`` (binary tensors; its header's length in ``.len``)."""
    from torchfast.serve.v2 import datatype_of
    import torch
    types = {k: datatype_of(torch.from_numpy(v).dtype) for k, v in arrays.items()}
    doc = {"inputs": [{"name": k, "shape": list(v.shape), "datatype": types[k], "data": v.reshape(-1).tolist()}
                      for k, v in arrays.items()]}
    (tmp / f"{name}_v2.json").write_text(json.dumps(doc))
    blobs = [v.astype(v.dtype.newbyteorder("<")).tobytes() for v in arrays.values()]
    head = json.dumps({"inputs": [{"name": k, "shape": list(v.shape), "datatype": types[k],
                                   "parameters": {"binary_data_size": len(b)}}
                                  for (k, v), b in zip(arrays.items(), blobs)],
                       "parameters": {"binary_data_output": True}}).encode()
    (tmp / f"{name}_v2.bin").write_bytes(head + b"".join(blobs))
    (tmp / f"{name}_v2.len").write_text(str(len(head)))


SPECS = {  # name -> (payload, content type, max_delay_ms, padding buckets, offline example)
    "resnet18": ("resnet.npy", "application/x-npy", 10.0, (1, 2, 4, 8, 16, 32)),
    "minilm": ("minilm.json", "application/json", 5.0, ()),
}


def _offline(served, rows: int, runs: int = 5) -> float:
    import torch
    from torchfast.measure import latency
    ex = served.example()
    if served.name == "minilm":
        ex = {k: torch.ones(rows, 64, dtype=torch.int64) for k in ex}
    else:
        ex = {k: torch.randn(rows, *v.shape[1:]) for k, v in ex.items()}
    x = served.request(ex)
    fn = (lambda: served.model(**x)) if isinstance(x, dict) else (lambda: served.model(x))
    lat = latency(lambda _: fn(), None, warmup=1, runs=runs if rows > 1 else 3 * runs)
    return rows / (lat.median_ms / 1e3)


def bench_model(name: str, a, tmp: Path, rows: list, tqdm) -> None:
    import dataclasses

    from torchfast.serve.http import ServerThread, create_app
    from torchfast.serve.model import builtin_model
    payload, ctype, delay, buckets = SPECS[name]
    served = builtin_model(name)
    b1 = dataclasses.replace(served, name=name + "_b1", knobs={"max_batch_size": 1, "preferred_batch_sizes": None})
    ceiling = _offline(served, 32)
    single = _offline(served, 1)
    app = create_app([served, b1], max_batch_size=32, max_delay_ms=delay, preferred_batch_sizes=buckets or None,
                     max_queue_size=1024, timeout_ms=120_000, max_body_bytes=64 << 20)
    triton = None
    if a.pytriton_python:
        port = _free_port()
        log = open(tmp / f"pytriton-{name}.log", "w+")
        triton = subprocess.Popen([a.pytriton_python, __file__, "--pytriton-server", name, "--port", str(port),
                                   "--delay", str(delay), "--buckets", ",".join(map(str, buckets)),
                                   "--threads", str(a.threads)], stdin=subprocess.PIPE,
                                  stdout=log, stderr=subprocess.STDOUT, text=True, cwd=tmp)
        t_start = time.monotonic()
        while "PYTRITON_READY" not in (tmp / f"pytriton-{name}.log").read_text():
            if triton.poll() is not None or time.monotonic() - t_start > 300:
                raise RuntimeError("PyTriton server did not start:\n" + (tmp / f"pytriton-{name}.log").read_text()[-3000:])
            time.sleep(0.5)
    try:
        with ServerThread(app) as srv:
            bar = tqdm(total=len(a.levels) * (2 * a.rounds + (1 if triton else 0)), desc=name, leave=False)
            for c in a.levels:
                ceiling_c = _offline(served, 32, runs=3)  # re-measured per level: the machine's load drifts
                res: dict[str, list] = {"batched": [], "b1": []}
                for r in range(a.rounds):
                    order = ["batched", "b1"] if r % 2 == 0 else ["b1", "batched"]
                    for mode in order:
                        model = name if mode == "batched" else name + "_b1"
                        res[mode].append(run_client(sys.executable, "http", srv.url, model, tmp / payload, ctype,
                                                    c, a.seconds, a.warm))
                        bar.update()
                snap = app.state.torchfast["batchers"][name].snapshot()
                tri = None
                if triton:
                    tri = run_client(a.pytriton_python, "triton", f"http://127.0.0.1:{port}", name,
                                     tmp / payload.replace(".npy", ".npz").replace(".json", ".npz"), "", c,
                                     a.seconds, a.warm)
                    bar.update()
                med = lambda xs, k: statistics.median(x[k] for x in xs)  # noqa: E731
                tb, t1 = med(res["batched"], "throughput"), med(res["b1"], "throughput")
                rows.append({
                    "model": name, "clients": c,
                    "batched req/s": round(tb, 1), "bs1 req/s": round(t1, 1),
                    "batched/bs1": round(tb / t1, 2) if t1 else None,
                    "offline bs32 /s": round(ceiling_c, 1), "of ceiling": f"{tb / ceiling_c:.0%}",
                    "p50 ms": round(med(res["batched"], "p50_ms")), "p99 ms": round(med(res["batched"], "p99_ms")),
                    "bs1 p50/p99 ms": f"{med(res['b1'], 'p50_ms'):.0f}/{med(res['b1'], 'p99_ms'):.0f}",
                    "mean batch": round(snap["mean_batch_size"] or 0, 1),
                    "triton req/s": round(tri["throughput"], 1) if tri else "n/a",
                    "triton p50/p99 ms": f"{tri['p50_ms']:.0f}/{tri['p99_ms']:.0f}" if tri else "n/a",
                    "p99 bound ms": round(delay + 2 * 32 / ceiling_c * 1e3),
                    "non-200": sum(v for x in res["batched"] + res["b1"] for k, v in x["codes"].items()
                                   if str(k) != "200"),
                })
            bar.close()
    finally:
        if triton:
            triton.stdin.close()
            triton.wait(60)
    rows.append({"model": name, "clients": "offline", "batched req/s": round(ceiling, 1),
                 "bs1 req/s": round(single, 1), "batched/bs1": round(ceiling / single, 2),
                 "of ceiling": "100%", "p50 ms": round(32 / ceiling * 1e3)})


def bench_protocols(name: str, a, tmp: Path, rows: list, tqdm) -> None:
    """/v1 vs /v2 JSON vs /v2 binary tensors against one batched server, windows interleaved."""
    from torchfast.serve.http import ServerThread, create_app
    from torchfast.serve.model import builtin_model
    payload, ctype, delay, buckets = SPECS[name]
    stem = payload.split(".")[0]
    served = builtin_model(name)
    app = create_app([served], max_batch_size=32, max_delay_ms=delay, preferred_batch_sizes=buckets or None,
                     max_queue_size=1024, timeout_ms=120_000, max_body_bytes=64 << 20)
    modes = {"v1": (tmp / payload, ctype, None),
             "v2 JSON": (tmp / f"{stem}_v2.json", "application/json", 0),
             "v2 binary": (tmp / f"{stem}_v2.bin", "application/octet-stream",
                           int((tmp / f"{stem}_v2.len").read_text()))}
    res: dict[str, list] = {m: [] for m in modes}
    c = a.protocol_clients
    with ServerThread(app) as srv:
        with tqdm(total=len(modes) * a.rounds, desc=f"{name} protocols", leave=False) as bar:
            for r in range(a.rounds):
                for mode in (list(modes) if r % 2 == 0 else list(reversed(modes))):
                    body, media, hlen = modes[mode]
                    res[mode].append(run_client(sys.executable, "http", srv.url, name, body, media, c, a.seconds,
                                                a.warm, header_length=hlen))
                    bar.update()
    med = lambda xs, k: statistics.median(x[k] for x in xs)  # noqa: E731
    base = med(res["v1"], "throughput")
    for mode, (body, _, _) in modes.items():
        tp = med(res[mode], "throughput")
        route = f"v1 ({'.npy' if payload.endswith('.npy') else 'JSON'})" if mode == "v1" else mode
        rows.append({"model": name, "clients": c, "route": route, "body bytes": body.stat().st_size,
                     "req/s": round(tp, 1), "vs v1": round(tp / base, 2) if base else None,
                     "p50 ms": round(med(res[mode], "p50_ms")), "p99 ms": round(med(res[mode], "p99_ms")),
                     "non-200": sum(v for x in res[mode] for k, v in x["codes"].items() if str(k) != "200")})


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def soak(seconds: float, tqdm) -> dict:
    """Many asyncio clients, 5 % poisoned requests (3 % raising an Exception, 2 % a BaseException), 5 % short
    deadlines, 10 % cancelled by their caller and 5 % cancelled from another thread at about their deadline,
    while a second thread holds the batcher's lock for a few ms every 50 ms (forcing cancels, deadlines and
    batch cuts to interleave): count every answer."""
    import threading

    import torch

    from torchfast.serve import DynamicBatcher, ModelError, QueueFull
    from torchfast.zoo.digits import DigitsCNN
    torch.manual_seed(0)
    cnn = DigitsCNN().eval()

    class Halt(BaseException):
        pass

    class Poisonable(torch.nn.Module):
        def forward(self, x):
            if (x[:, 0, 0, 0] == -999).any():
                raise RuntimeError("injected failure")
            if (x[:, 0, 0, 0] == -777).any():
                raise Halt("injected BaseException")
            return cnn(x)
    b = DynamicBatcher(Poisonable(), max_batch_size=32, max_delay_ms=2, preferred_batch_sizes=[1, 2, 4, 8, 16, 32],
                       max_queue_size=256)
    answers: dict[int, int] = {}
    outcome = {"ok": 0, "error": 0, "timeout": 0, "cancelled": 0, "rejected": 0, "wrong": 0}
    rss, rng = [], random.Random(0)
    x0 = torch.randn(1, 1, 16, 16)
    with torch.inference_mode():
        y0 = cnn(x0)

    async def client(cid: int, t_end: float):
        k = 0
        while time.monotonic() < t_end:
            k += 1
            rid = cid * 10_000_000 + k
            x = x0.clone()
            roll = rng.random()
            poison = roll < 0.05
            if poison:
                x[0, 0, 0, 0] = -999 if roll < 0.03 else -777
            short = rng.random() < 0.05
            try:
                fut = b.submit_future(x, timeout_ms=2.0 if short else None)
            except QueueFull:
                outcome["rejected"] += 1
                await asyncio.sleep(0.001)
                continue
            answers[rid] = 0
            fut.add_done_callback(lambda _f, rid=rid: answers.__setitem__(rid, answers[rid] + 1))
            afut = asyncio.wrap_future(fut)
            if rng.random() < 0.05:  # cancelled from another thread, about when the deadline expires
                threading.Timer(rng.uniform(0.0015, 0.0025) if short else rng.uniform(0, 0.003), fut.cancel).start()
            elif rng.random() < 0.10:
                await asyncio.sleep(rng.uniform(0, 0.003))
                afut.cancel()
            try:
                y = await afut
                if poison or not torch.allclose(y, y0, atol=1e-5):
                    outcome["wrong"] += 1
                outcome["ok"] += 1
            except asyncio.CancelledError:
                outcome["cancelled"] += 1
            except TimeoutError:
                outcome["timeout"] += 1
            except (RuntimeError, ModelError) as e:
                outcome["error" if "injected" in str(e) and poison else "wrong"] += 1

    stop_holding = threading.Event()

    def hold_lock():  # a worker stalled across deadlines while cancels land
        while not stop_holding.wait(0.05):
            with b._cond:
                time.sleep(rng.uniform(0.001, 0.005))
    holder = threading.Thread(target=hold_lock, daemon=True)
    holder.start()

    async def main():
        t_end = time.monotonic() + seconds
        tasks = [asyncio.ensure_future(client(i, t_end)) for i in range(48)]
        with tqdm(total=int(seconds), desc="soak", leave=False) as bar:
            while time.monotonic() < t_end:
                await asyncio.sleep(1.0)
                rss.append(_rss_mb())
                bar.update()
        await asyncio.gather(*tasks)
    asyncio.run(main())
    stop_holding.set()
    holder.join()
    alive = b.running
    b.close()
    time.sleep(0.2)  # done callbacks of the last answers
    snap = b.snapshot()
    lost = sum(1 for v in answers.values() if v == 0)
    dup = sum(1 for v in answers.values() if v > 1)
    warm = rss[len(rss) // 5] if rss else float("nan")
    return {"accepted": snap["accepted"], "answered": snap["answered"], "lost": lost, "duplicated": dup,
            "wrong": outcome["wrong"], **{k: snap[k] for k in ("ok", "error", "timeout", "cancelled", "rejected")},
            "batches": snap["batches"], "isolation_reruns": snap["isolation_reruns"],
            "rss_mb_after_warmup": round(warm, 1), "rss_mb_end": round(rss[-1], 1) if rss else None,
            "rss_mb_max": round(max(rss), 1) if rss else None, "worker_alive_at_end": alive, "seconds": seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="resnet18,minilm")
    p.add_argument("--levels", default="1,8,32,64")
    p.add_argument("--seconds", type=float, default=6.0, help="measured window per client run")
    p.add_argument("--warm", type=float, default=2.0, help="unmeasured warm-up per client run")
    p.add_argument("--rounds", type=int, default=2, help="interleaved windows per mode and level")
    p.add_argument("--soak-seconds", type=float, default=40.0)
    p.add_argument("--soak-only", action="store_true", help="run only the soak")
    p.add_argument("--protocols-only", action="store_true",
                   help="run only /v1 vs /v2 JSON vs /v2 binary tensors (at --protocol-clients clients)")
    p.add_argument("--protocol-clients", type=int, default=32)
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads per server (1: OpenMP's spinning threads collapse on a shared, "
                        "oversubscribed 2-core machine: MiniLM batch 1 measured 47 ms with 1 thread, 1384 ms with 2)")
    p.add_argument("--pytriton-python", default=os.environ.get("TORCHFAST_PYTRITON_PYTHON"))
    # internal modes
    p.add_argument("--client"), p.add_argument("--kind"), p.add_argument("--model"), p.add_argument("--payload")
    p.add_argument("--content-type"), p.add_argument("--concurrency", type=int)
    p.add_argument("--pytriton-server"), p.add_argument("--port", type=int), p.add_argument("--delay", type=float)
    p.add_argument("--buckets", default="")
    p.add_argument("--header-length", type=int, default=None)
    a = p.parse_args()
    if a.client:
        return client_main(a)
    if a.pytriton_server:
        return pytriton_server_main(a)
    import torch
    from tqdm import tqdm

    from torchfast.report import format_table
    torch.set_num_threads(a.threads)
    a.levels = [int(v) for v in a.levels.split(",")]
    t0 = time.time()
    rows: list[dict] = []
    if a.protocols_only:
        with tempfile.TemporaryDirectory() as d:
            tmp = Path(d)
            _payloads(tmp)
            for name in a.models.split(","):
                bench_protocols(name, a, tmp, rows, tqdm)
        print(format_table(rows))
        print(f"\ntotal {time.time() - t0:.0f} s; torch threads {a.threads}; load average {os.getloadavg()[0]:.1f}")
        return
    if not a.soak_only:
        with tempfile.TemporaryDirectory() as d:
            tmp = Path(d)
            _payloads(tmp)
            for name in a.models.split(","):
                bench_model(name, a, tmp, rows, tqdm)
        print(format_table(rows))
    s = soak(a.soak_seconds, tqdm)
    print("\nsoak:", json.dumps(s))
    print(f"\ntotal {time.time() - t0:.0f} s; torch threads {a.threads}; load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
