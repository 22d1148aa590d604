"""A PNG chart of an optimize() report: speed gained vs fidelity kept, one point per stage (or, for
``recipe="auto"``, one per fully measured candidate with the Pareto front and the choice marked).

The trade-off a recipe makes is easiest to judge as a path: each kept stage moves the model right
(faster) and usually down (less faithful); rolled-back stages show where the tolerance stopped it.
matplotlib is optional (``pip install 'torchfast[plot]'``).
"""
from __future__ import annotations

import os
from typing import Any

from .report import Report

__all__ = ["plot"]


def _matplotlib():
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("the chart needs matplotlib, which is not installed: pip install 'torchfast[plot]' "
                          "(or pip install matplotlib)") from e
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    return plt


def _rows(report: Any) -> tuple[list[dict], str]:
    if hasattr(report, "report") and isinstance(report.report, Report):  # an Optimized
        report = report.report
    if isinstance(report, dict):
        report = Report.from_dict(report)
    if not isinstance(report, Report):
        raise TypeError(f"plot() needs an optimize() Report (or Optimized, or its to_dict()), got {type(report).__name__}")
    rows = [r for r in report.rows if r.get("speedup") is not None and r.get("cosine") is not None
            and r.get("rung", "measure") == "measure"]
    if not rows:
        raise ValueError("the report has no stage with both a speedup and a fidelity figure to plot "
                         "(is it an optimize() report?)")
    metric = all(r.get("metric") is not None for r in rows)
    return rows, ("metric" if metric else "cosine")


def plot(report: Any, path: str | os.PathLike, *, title: str | None = None, fidelity: str | None = None,
         dpi: int = 120) -> str:
    """Write a PNG of speedup vs the original (x) against fidelity (y) for every stage; return the path.

    ``fidelity``: ``"cosine"`` (output cosine vs the original) or ``"metric"`` (eval_fn's metric; the
    default when the report has it). Kept stages are joined in order; rolled-back ones are red crosses.
    """
    rows, default = _rows(report)
    key = fidelity or default
    if key not in ("cosine", "metric"):
        raise ValueError(f"fidelity must be 'cosine' or 'metric', got {key!r}")
    if key == "metric" and default != "metric":
        raise ValueError("the report has no task metric (optimize(..., eval_fn=...)); use fidelity='cosine'")
    plt = _matplotlib()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if "candidate" in rows[0]:
        _search(ax, rows, key)
        return _finish(fig, ax, plt, path, dpi, key, title or "torchfast.optimize(recipe='auto'): every candidate")
    kept = [r for r in rows if r.get("applied") in (True, "yes")]
    dropped = [r for r in rows if r not in kept]
    ax.plot([r["speedup"] for r in kept], [r[key] for r in kept], "-o", color="tab:blue", label="kept")
    if dropped:
        ax.plot([r["speedup"] for r in dropped], [r[key] for r in dropped], "x", color="tab:red",
                markersize=9, mew=2, linestyle="none", label="rolled back")
    for i, r in enumerate(rows):  # numbered in recipe order, staggered so coincident points stay readable
        ax.annotate(f"{i}. {r['stage']}", (r["speedup"], r[key]), textcoords="offset points",
                    xytext=(6, 4 - 11 * (i % 3)), fontsize=8)
    return _finish(fig, ax, plt, path, dpi, key, title or "torchfast.optimize: speed vs fidelity per stage")


def _search(ax: Any, rows: list[dict], key: str) -> None:
    """The search's candidates: every fully measured one, the Pareto front joined, the choice starred."""
    front = sorted((r for r in rows if r.get("pareto") in (True, "yes")), key=lambda r: r["speedup"])
    rest = [r for r in rows if r not in front]
    if rest:
        ax.plot([r["speedup"] for r in rest], [r[key] for r in rest], "o", color="tab:grey", alpha=0.6,
                linestyle="none", label="measured")
    if front:
        ax.plot([r["speedup"] for r in front], [r[key] for r in front], "-o", color="tab:blue", label="Pareto front")
    for i, r in enumerate(front):
        ax.annotate(r["candidate"], (r["speedup"], r[key]), textcoords="offset points",
                    xytext=(6, 4 - 11 * (i % 3)), fontsize=7)
    chosen = [r for r in rows if r.get("status") == "chosen"]
    if chosen:
        c = chosen[0]
        ax.plot([c["speedup"]], [c[key]], "*", color="tab:orange", markersize=16, linestyle="none",
                label=f"chosen: {c['candidate']}")
    ax.set_xscale("log")
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.xaxis.set_minor_formatter(NullFormatter())


def _finish(fig: Any, ax: Any, plt: Any, path: str | os.PathLike, dpi: int, key: str, title: str) -> str:
    ax.axvline(1.0, color="grey", lw=0.8, ls=":")
    ax.margins(x=0.25, y=0.1)  # room for the labels
    ax.set_xlabel("speedup vs original (x, interleaved medians)")
    ax.set_ylabel("task metric" if key == "metric" else "output cosine vs original")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    path = os.fspath(path)
    fig.savefig(path, dpi=dpi, format="png")
    plt.close(fig)
    return path
