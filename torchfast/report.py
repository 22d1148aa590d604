"""Report: what a transform did, layer by layer, as a table people can read and JSON machines can.

Every transform returns ``(model, Report)``. A report has a title, a summary (headline figures),
rows (usually one per layer: what changed and why, or why not) and free-form notes.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

__all__ = ["Report", "format_table", "fmt"]


def fmt(v: Any) -> str:
    """Human formatting: floats to 4 significant digits, big ints with thousands separators."""
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            return str(v)
        if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
            return f"{v:.3e}"
        return f"{v:.4g}"
    if isinstance(v, (tuple, list)):
        return "x".join(fmt(x) for x in v) if all(isinstance(x, int) for x in v) else ", ".join(fmt(x) for x in v)
    return str(v)


def format_table(rows: Sequence[dict], columns: Sequence[str] | None = None) -> str:
    """A markdown table (readable as plain text too) of ``rows`` with ``columns`` (default: all keys, in order)."""
    if not rows:
        return "(no rows)"
    if columns is None:
        columns = []
        for r in rows:
            for k in r:
                if k not in columns:
                    columns.append(k)
    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    def line(vals):
        return "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"
    out = [line(columns), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(row) for row in cells]
    return "\n".join(out)


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return str(v)
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if hasattr(v, "to_dict"):
        return _jsonable(v.to_dict())
    return str(v)


@dataclass
class Report:
    title: str
    summary: dict[str, Any] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    columns: list[str] | None = None
    children: list["Report"] = field(default_factory=list)

    def add_row(self, **row: Any) -> dict[str, Any]:
        self.rows.append(row)
        return row

    def note(self, text: str) -> None:
        self.notes.append(text)

    def where(self, **match: Any) -> list[dict[str, Any]]:
        """Rows whose fields equal all of ``match`` (e.g. ``report.where(applied=False)``)."""
        return [r for r in self.rows if all(r.get(k) == v for k, v in match.items())]

    def table(self, columns: Sequence[str] | None = None) -> str:
        return format_table(self.rows, columns or self.columns)

    def to_markdown(self) -> str:
        parts = [f"## {self.title}"]
        if self.summary:
            parts.append("\n".join(f"- {k}: {fmt(v)}" for k, v in self.summary.items()))
        if self.rows:
            parts.append(self.table())
        if self.notes:
            parts.append("\n".join(f"> {n}" for n in self.notes))
        for c in self.children:
            parts.append(c.to_markdown())
        return "\n\n".join(parts)

    __str__ = to_markdown

    def to_dict(self) -> dict[str, Any]:
        return _jsonable({"title": self.title, "summary": self.summary, "rows": self.rows,
                          "notes": self.notes, "children": [c.to_dict() for c in self.children]})

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Report":
        return cls(title=d["title"], summary=d.get("summary", {}), rows=d.get("rows", []),
                   notes=d.get("notes", []), children=[cls.from_dict(c) for c in d.get("children", [])])
