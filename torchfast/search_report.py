"""What ``recipe="auto"`` tried, as data: one record per candidate, the Pareto front, the result object.

Every point of the search space the search touched is a :class:`Trial` and becomes a row of the report:
what it applied, how far it got (probe, race, recovery, full measurement), its speed and fidelity
against the original, and, when it was not chosen, why. The Pareto front (no other fully measured
candidate is both faster and more faithful) is marked, so a user who would trade speed for fidelity
differently can read the alternative off the table and rerun it as an explicit recipe.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from .config import Config
from .measure import Fidelity
from .pipeline import Optimized, describe
from .report import Report

__all__ = ["Trial", "Searched", "pareto_front", "search_report"]


@dataclass
class Trial:
    """One candidate: a structure (pruning amount x low-rank setting), optionally int8, optionally a backend."""
    prune: float
    lowrank: Any                     # None, a FLOPs reduction (float) or "global"
    int8: str = "none"               # "none" | "static" | "dynamic"
    backend: str | None = None       # None: the eager PyTorch model (probe / race rows)
    configs: list[Config] = field(default_factory=list)
    status: str = "pending"          # ok | needs recovery | finalist | measured | chosen | rejected | failed | dropped | not evaluated
    rung: str = "probe"
    note: str = ""
    fidelity: Fidelity | None = None
    metric: float | None = None
    speedup: float | None = None     # vs the original, interleaved (race: eager, short; measure: full)
    latency_ms: float | None = None
    size_mb: float | None = None
    flops: int | None = None
    recovered: str | None = None     # "cosine 0.68 -> 0.996 (150 steps)"
    seconds: float = 0.0             # time spent building / recovering / compiling it
    pareto: bool = False
    model: Any = field(default=None, repr=False)      # the eager model (structure, int8) or the compiled one
    eager: Any = field(default=None, repr=False)      # measure rung: the PyTorch model the engine was built from
    reports: list[Report] = field(default_factory=list, repr=False)

    @property
    def structure(self) -> str:
        parts = []
        if self.prune:
            parts.append(f"prune {self.prune:g}")
        if self.lowrank is not None:
            parts.append("lowrank 2x global" if self.lowrank == "global" else f"lowrank {self.lowrank:g}x")
        return " + ".join(parts) or "original"

    @property
    def name(self) -> str:
        out = self.structure
        if self.int8 != "none":
            out += f" + int8 {self.int8}"
        if self.backend is not None:
            out += f" @ {self.backend}"
        return out

    def row(self, baseline_metric: float | None, tolerance_has_worst: bool) -> dict[str, Any]:
        f = self.fidelity
        row: dict[str, Any] = {"candidate": self.name, "status": self.status, "rung": self.rung,
                               "speedup": self.speedup, "cosine": None if f is None else f.cosine}
        if tolerance_has_worst:
            row["worst cosine"] = None if f is None else f.worst_cosine
        row["top-1 agree"] = None if f is None else f.top1_agreement
        if baseline_metric is not None:
            row["metric"] = self.metric
            row["metric drop"] = None if self.metric is None else baseline_metric - self.metric
        row.update({"size (MB)": self.size_mb, "MFLOPs": None if self.flops is None else self.flops / 1e6,
                    "pareto": self.pareto, "applied": ", ".join(spell(c) for c in self.configs) or "-",
                    "recovery": self.recovered, "time (s)": round(self.seconds, 2), "note": self.note})
        return row


def spell(config: Config) -> str:
    """A config as the user would write it: the fields that make this candidate (pruning amount always),
    without the search's own switches (progress bars, never-slower timing left to the engines)."""
    quiet = {k: v for k, v in (("progress", True), ("keep_slower", False)) if hasattr(config, k)}
    text = describe(config.replace(**quiet) if quiet else config)
    if type(config).__name__ == "ChannelPruning" and "amount=" not in text:
        text = text.replace("ChannelPruning(", f"ChannelPruning(amount={config.amount!r}, ", 1).replace(", )", ")")
    return text


def beats(o: Trial, t: Trial, fid: Callable[[Trial], float], eps: float = 0.0) -> bool:
    """``o`` is at least as fast and as faithful as ``t`` (fidelities within ``eps`` are equal), better in one."""
    return o.speedup >= t.speedup and fid(o) >= fid(t) - eps and (o.speedup > t.speedup or fid(o) > fid(t) + eps)


def pareto_front(trials: list[Trial], key: str) -> list[Trial]:
    """Fully measured trials no other one beats on both speed and fidelity (``key``: "cosine" or "metric")."""
    def fid(t: Trial) -> float | None:
        return t.metric if key == "metric" else (None if t.fidelity is None else t.fidelity.cosine)
    pts = [t for t in trials if t.rung == "measure" and t.speedup is not None and fid(t) is not None]
    eps = 1e-6   # fidelities this close are equal (float noise of engines that compute the same thing)
    front = []
    for t in pts:
        dominated = any(o is not t and beats(o, t, fid, eps) for o in pts)
        if not dominated:
            front.append(t)
    return sorted(front, key=lambda t: t.speedup)


def search_report(trials: list[Trial], summary: dict[str, Any], baseline_metric: float | None,
                  tolerance_has_worst: bool, notes: list[str]) -> Report:
    """The Pareto table: fully measured candidates first (fastest first), then the rest in search order."""
    key = "metric" if baseline_metric is not None else "cosine"
    for t in trials:
        t.pareto = False
    for t in pareto_front(trials, key):
        t.pareto = True
    measured = sorted((t for t in trials if t.rung == "measure"),
                      key=lambda t: (t.status != "chosen", -(t.speedup or 0.0)))
    rest = [t for t in trials if t.rung != "measure"]
    rep = Report("optimize: auto", summary=summary)
    for t in measured + rest:
        rep.add_row(**t.row(baseline_metric, tolerance_has_worst))
    for n in notes:
        rep.note(n)
    return rep


@dataclass(repr=False)
class Searched(Optimized):
    """What ``optimize(recipe="auto")`` returns: an :class:`~torchfast.pipeline.Optimized` (the chosen
    model, drop-in; ``transformed``; ``save()``) whose ``report`` is the table of every candidate, plus
    the candidates themselves. ``chosen`` is None when the original was returned (``reason`` says why)."""
    trials: list[Trial] = field(default_factory=list)
    chosen: Trial | None = None
    reason: str = ""
    budget_exhausted: bool = False

    @property
    def pareto(self) -> list[Trial]:
        return [t for t in self.trials if t.pareto]

    def chart(self, path: str, **kwargs: Any) -> str:
        """PNG of speedup vs fidelity for every fully measured candidate, Pareto front and choice marked
        (needs matplotlib: ``pip install 'torchfast[plot]'``)."""
        from .chart import plot
        return plot(self.report, path, **kwargs)

    def __repr__(self) -> str:
        what = self.chosen.name if self.chosen is not None else f"original ({self.reason})"
        return f"Searched(chosen={what!r}, speedup={self.speedup}, candidates={len(self.trials)})"

