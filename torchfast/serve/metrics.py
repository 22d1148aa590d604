"""Batcher metrics: Prometheus series (one CollectorRegistry per batcher) and a plain Python snapshot.

The snapshot is kept by hand (cheap counters and a bounded window of recent timings) so tests,
benchmarks and users without ``prometheus-client`` see the same numbers the scraper sees.
"""
from __future__ import annotations

import threading
from collections import deque
from typing import Any

OUTCOMES = ("ok", "error", "timeout", "cancelled", "disconnected", "rejected", "closed")


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


class BatcherMetrics:
    """Counters and histograms of one DynamicBatcher.

    Prometheus names (prefix ``torchfast_batcher_``, label ``model``): ``queue_depth`` (gauge),
    ``batch_size`` (histogram of real rows per model call), ``padded_rows_total``,
    ``queue_wait_seconds`` / ``compute_seconds`` (histograms), ``requests_total{outcome}``
    (ok, error, timeout, cancelled, disconnected, rejected, closed), ``batches_total``,
    ``isolation_reruns_total``, ``abandoned_answers_total``. ``disconnected``: the caller went away (an HTTP
    client closed its connection) while the request waited, so it was withdrawn and never computed;
    ``abandoned_answers``: the caller went away while its batch was already running, so the answer was
    computed for nobody (that request's outcome is still ``ok`` or ``error``).
    """

    def __init__(self, name: str, max_batch_size: int, window: int = 4096) -> None:
        self.name = name
        self._lock = threading.Lock()
        self.accepted = 0
        self.outcomes = {k: 0 for k in OUTCOMES}
        self.batches = 0
        self.rows = 0
        self.padded_rows = 0
        self.reruns = 0
        self.abandoned = 0
        self.queue_depth = 0
        self._wait = deque(maxlen=window)
        self._compute = deque(maxlen=window)
        self._sizes = deque(maxlen=window)
        self.registry = None
        try:
            import prometheus_client as pc
        except ImportError:  # metrics still work as a snapshot
            return
        reg = pc.CollectorRegistry(auto_describe=True)
        p = "torchfast_batcher_"
        size_buckets = sorted({1, 2, 4, 8, 16, 32, 64, 128, 256, max_batch_size} & set(range(1, max_batch_size + 1)))
        lat = (.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1.0, 2.5, 5.0, 10.0)
        self.registry = reg
        self._p_depth = pc.Gauge(p + "queue_depth", "Requests waiting in the queue", ["model"], registry=reg)
        self._p_size = pc.Histogram(p + "batch_size", "Real rows per model call", ["model"],
                                    buckets=size_buckets, registry=reg)
        self._p_pad = pc.Counter(p + "padded_rows", "Rows added to reach a padding bucket", ["model"], registry=reg)
        self._p_wait = pc.Histogram(p + "queue_wait_seconds", "Time from submit to the start of the batch",
                                    ["model"], buckets=lat, registry=reg)
        self._p_compute = pc.Histogram(p + "compute_seconds", "Model call time per batch", ["model"],
                                       buckets=lat, registry=reg)
        self._p_req = pc.Counter(p + "requests", "Requests by outcome", ["model", "outcome"], registry=reg)
        self._p_batches = pc.Counter(p + "batches", "Model calls", ["model"], registry=reg)
        self._p_rerun = pc.Counter(p + "isolation_reruns", "Extra model calls made to isolate a failing request",
                                   ["model"], registry=reg)
        self._p_abandoned = pc.Counter(p + "abandoned_answers", "Answers computed after their caller had gone",
                                       ["model"], registry=reg)
        for o in OUTCOMES:
            self._p_req.labels(name, o)
        self._p_abandoned.labels(name)
        self._p_depth.labels(name).set(0)

    # ---------------------------------------------------------------- updates (called by the batcher)
    def set_depth(self, depth: int) -> None:
        self.queue_depth = depth
        if self.registry is not None:
            self._p_depth.labels(self.name).set(depth)

    def on_accept(self) -> None:
        with self._lock:
            self.accepted += 1

    def on_outcome(self, outcome: str, n: int = 1) -> None:
        with self._lock:
            self.outcomes[outcome] += n
        if self.registry is not None:
            self._p_req.labels(self.name, outcome).inc(n)

    def on_batch(self, rows: int, padded: int, compute_s: float, waits: list[float]) -> None:
        with self._lock:
            self.batches += 1
            self.rows += rows
            self.padded_rows += padded
            self._sizes.append(rows)
            self._compute.append(compute_s)
            self._wait.extend(waits)
        if self.registry is not None:
            self._p_batches.labels(self.name).inc()
            self._p_size.labels(self.name).observe(rows)
            self._p_pad.labels(self.name).inc(padded)
            self._p_compute.labels(self.name).observe(compute_s)
            for w in waits:
                self._p_wait.labels(self.name).observe(w)

    def on_rerun(self) -> None:
        with self._lock:
            self.reruns += 1
        if self.registry is not None:
            self._p_rerun.labels(self.name).inc()

    def on_abandoned(self) -> None:
        with self._lock:
            self.abandoned += 1
        if self.registry is not None:
            self._p_abandoned.labels(self.name).inc()

    # ---------------------------------------------------------------- reading
    def snapshot(self) -> dict[str, Any]:
        """A plain dict: counts by outcome, queue depth, batch sizes and timing quantiles (recent window)."""
        with self._lock:
            sizes, waits, comp = list(self._sizes), list(self._wait), list(self._compute)
            answered = sum(v for k, v in self.outcomes.items() if k != "rejected")
            return {
                "model": self.name,
                "accepted": self.accepted,
                "answered": answered,
                "in_flight": self.accepted - answered,
                **{k: v for k, v in self.outcomes.items()},
                "queue_depth": self.queue_depth,
                "batches": self.batches,
                "rows": self.rows,
                "padded_rows": self.padded_rows,
                "isolation_reruns": self.reruns,
                "abandoned_answers": self.abandoned,
                "mean_batch_size": (sum(sizes) / len(sizes)) if sizes else None,
                "max_batch_size_seen": max(sizes) if sizes else None,
                "queue_wait_p50_ms": _ms(_quantile(waits, 0.5)),
                "queue_wait_p99_ms": _ms(_quantile(waits, 0.99)),
                "compute_p50_ms": _ms(_quantile(comp, 0.5)),
                "compute_p99_ms": _ms(_quantile(comp, 0.99)),
            }

    def prometheus_text(self) -> bytes:
        if self.registry is None:
            raise ImportError("Prometheus metrics need prometheus-client: pip install 'torchfast[serve]'")
        from prometheus_client import generate_latest
        return generate_latest(self.registry)


def _ms(v: float | None) -> float | None:
    return None if v is None else round(v * 1000.0, 3)


def merged_prometheus_text(metrics: list[BatcherMetrics]) -> bytes:
    """One exposition for several batchers: families of the same name are merged (label ``model`` tells them apart)."""
    from prometheus_client import CollectorRegistry, generate_latest

    families: dict[str, Any] = {}
    for m in metrics:
        if m.registry is None:
            raise ImportError("Prometheus metrics need prometheus-client: pip install 'torchfast[serve]'")
        for fam in m.registry.collect():
            if fam.name in families:
                families[fam.name].samples.extend(fam.samples)
            else:
                families[fam.name] = fam

    class _Merged:
        def collect(self):
            return list(families.values())

    reg = CollectorRegistry(auto_describe=False)
    reg.register(_Merged())
    return generate_latest(reg)
