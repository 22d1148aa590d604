"""Tolerance: what a transform may cost in fidelity (and must buy in speed) before it is rolled back.

One object for every place that keeps or refuses a change by measurement: ``optimize()`` per stage,
``quantize()`` with a budget (per-layer float fallback), ``backend="auto"`` per engine.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .config import Config, ConfigError, check_range
from .measure import Fidelity

__all__ = ["Tolerance", "as_tolerance"]


@dataclass(frozen=True)
class Tolerance(Config):
    """Every bound is against the ORIGINAL model (so costs accumulate across stages); ``None`` switches a
    bound off.

    - ``min_cosine``: mean per-sample cosine similarity of the outputs (logits, embeddings) on the
      validation inputs.
    - ``min_worst_cosine``: the lowest per-sample cosine (the worst sentence / image), for users who
      cannot ship one bad answer behind a good average.
    - ``max_rel_err``: ||out - ref|| / ||ref|| over all validation outputs.
    - ``min_top1_agreement``: fraction of samples whose argmax is unchanged (classifiers).
    - ``max_metric_drop``: largest allowed drop of ``eval_fn``'s metric, in the metric's own units
      (0.01 = one point of accuracy when eval_fn returns a fraction). Needs ``eval_fn``.
    - ``min_speedup``: the stage must make the model at least this many times faster than the model
      before it (timed interleaved); e.g. 1.05 drops stages that do not pay for themselves.
    """
    min_cosine: float | None = 0.99
    max_rel_err: float | None = None
    min_top1_agreement: float | None = None
    max_metric_drop: float | None = 0.01
    min_speedup: float | None = None
    min_worst_cosine: float | None = None

    def validate(self) -> None:
        n = type(self).__name__
        for name in ("min_cosine", "min_worst_cosine"):
            if getattr(self, name) is not None:
                check_range(n, name, getattr(self, name), -1.0, 1.0)
        if self.max_rel_err is not None:
            check_range(n, "max_rel_err", self.max_rel_err, 0.0, None)
        if self.min_top1_agreement is not None:
            check_range(n, "min_top1_agreement", self.min_top1_agreement, 0.0, 1.0)
        if self.max_metric_drop is not None:
            check_range(n, "max_metric_drop", self.max_metric_drop, None, None)
        if self.min_speedup is not None:
            check_range(n, "min_speedup", self.min_speedup, 0.0, None, lo_inclusive=False)

    @classmethod
    def off(cls) -> "Tolerance":
        """No bound at all: every stage is kept (still measured and reported)."""
        return cls(min_cosine=None, max_rel_err=None, min_top1_agreement=None, max_metric_drop=None,
                   min_speedup=None, min_worst_cosine=None)

    def violations(self, fid: Fidelity, metric_drop: float | None = None,
                   stage_speedup: float | None = None) -> list[str]:
        """Human-readable list of the bounds ``fid`` breaks (empty: within tolerance)."""
        out = []
        if self.min_cosine is not None and not fid.cosine >= self.min_cosine:
            out.append(f"cosine {fid.cosine:.4f} < min_cosine {self.min_cosine}")
        if self.min_worst_cosine is not None and fid.worst_cosine is not None \
                and not fid.worst_cosine >= self.min_worst_cosine:
            out.append(f"worst-sample cosine {fid.worst_cosine:.4f} < min_worst_cosine {self.min_worst_cosine}")
        if self.max_rel_err is not None and not fid.rel_err <= self.max_rel_err:
            out.append(f"rel_err {fid.rel_err:.4g} > max_rel_err {self.max_rel_err}")
        if (self.min_top1_agreement is not None and fid.top1_agreement is not None
                and not fid.top1_agreement >= self.min_top1_agreement):
            out.append(f"top1_agreement {fid.top1_agreement:.4f} < min_top1_agreement {self.min_top1_agreement}")
        if self.max_metric_drop is not None and metric_drop is not None and not metric_drop <= self.max_metric_drop:
            out.append(f"metric drop {metric_drop:.4g} > max_metric_drop {self.max_metric_drop}")
        if self.min_speedup is not None and stage_speedup is not None and not stage_speedup >= self.min_speedup:
            out.append(f"stage speedup {stage_speedup:.3f}x < min_speedup {self.min_speedup}")
        return out


def as_tolerance(tolerance: Any) -> Tolerance:
    """A Tolerance from a Tolerance, a dict of its fields, or None (the default bounds)."""
    if tolerance is None:
        return Tolerance()
    if isinstance(tolerance, Tolerance):
        return tolerance
    if isinstance(tolerance, dict):
        names = {f.name for f in dataclasses.fields(Tolerance)}
        unknown = sorted(set(tolerance) - names)
        if unknown:
            raise ConfigError(f"unknown tolerance field(s) {unknown}; known: {sorted(names)}")
        return Tolerance(**tolerance)
    raise ConfigError(f"tolerance must be a torchfast.Tolerance, a dict of its fields or None; "
                      f"got {type(tolerance).__name__}")
