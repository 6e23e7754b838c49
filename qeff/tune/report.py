"""What ``qeff tune`` shows and writes: the ranked table, the JSON, the Pareto plot.

Rules: rows are ranked by the objective (failures last, in the order they were measured); the
Pareto front is every measured point that no other point beats on both throughput (higher) and
p99 latency (lower); the plot draws throughput against p99 latency for every measured point,
joins the front, and marks the best point. The plot is written like every other output: staged
beside its path and renamed into place, so a failure leaves no half file.
"""

from __future__ import annotations

__all__ = ["Row", "rank", "pareto_front", "result_table", "result_json", "plot_front", "describe"]

import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from qeff.common.paths import check_plot_file
from qeff.tune.search import Measurement, SearchResult, score
from qeff.tune.space import Space

logger = logging.getLogger(__name__)

_SHORT = {"batch-size": "bs", "instances": "inst", "set-size": "set", "opt-level": "opt"}


@dataclasses.dataclass
class Row:
    config: dict[str, int | None]
    measurement: Measurement
    order: int  # when it was measured (0: first)


def rank(result: SearchResult, space: Space) -> list[Row]:
    rows = [Row(space.config(p), m, i) for i, (p, m) in enumerate(result.evaluated)]
    return sorted(rows, key=lambda r: (-score(r.measurement, space.objective), r.order))


def pareto_front(rows: Sequence[Row]) -> list[Row]:
    """The non-dominated rows (throughput up, p99 down), by rising p99."""
    ok = [r for r in rows if r.measurement.ok and math.isfinite(r.measurement.p99_ms)]
    front = []
    for r in ok:
        a = r.measurement
        dominated = any(o.measurement.inf_per_s >= a.inf_per_s and o.measurement.p99_ms <= a.p99_ms
                        and (o.measurement.inf_per_s > a.inf_per_s or o.measurement.p99_ms < a.p99_ms) for o in ok)
        if not dominated:
            front.append(r)
    return sorted(front, key=lambda r: (r.measurement.p99_ms, -r.measurement.inf_per_s))


def describe(config: Mapping[str, Any]) -> str:
    return " ".join(f"{_SHORT.get(k, k)} {'-' if v is None else v}" for k, v in config.items())


def _ms(value: float) -> str:
    return f"{value:.3f}" if math.isfinite(value) else "—"


def result_table(rows: Sequence[Row], space: Space, title: str, top: int | None = None):
    """A rich table of the ``top`` best rows (all when None)."""
    from rich import box
    from rich.table import Table

    names = list(rows[0].config) if rows else []
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD)
    table.add_column("#", justify="right")
    for name in names:
        table.add_column(_SHORT.get(name, name), justify="right", no_wrap=True)
    for column in ("inf/s", "p50 ms", "p90 ms", "p99 ms"):
        table.add_column(column, justify="right", no_wrap=True)
    for i, r in enumerate(rows[:top] if top else rows, start=1):
        m = r.measurement
        cells = ["—" if r.config[n] is None else str(r.config[n]) for n in names]
        if m.ok:
            table.add_row(str(i), *cells, f"{m.inf_per_s:,.1f}", _ms(m.p50_ms), _ms(m.p90_ms), _ms(m.p99_ms))
        else:
            table.add_row(str(i), *cells, "failed", "—", "—", "—")
    return table


def _number(value: float) -> float | None:
    return value if math.isfinite(value) else None  # JSON has no NaN


def result_json(result: SearchResult, space: Space, rows: Sequence[Row], *, model: str, backend: str,
                best_settings: str | None, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    front = {id(r) for r in pareto_front(rows)}

    def row(r: Row) -> dict[str, Any]:
        m = r.measurement
        return {"config": r.config, "inf_per_s": _number(m.inf_per_s) if m.ok else None,
                "p50_ms": _number(m.p50_ms), "p90_ms": _number(m.p90_ms), "p99_ms": _number(m.p99_ms),
                "error": m.error, "reused": m.reused, "pareto": id(r) in front, "measured_as": r.order,
                "details": m.details}

    best = rows[0] if rows and rows[0].measurement.ok else None
    return {
        "model": model, "backend": backend, "objective": space.objective,
        "mode": "exhaustive" if space.exhaustive else "optimized",
        "space": space.to_dict(),
        "evaluations": len(result.evaluated), "reused": result.reused, "grid_size": result.grid_size,
        "starts": [{"initial": s.initial, "best": space.config(s.best), "evaluations": s.evaluations,
                    "moves": s.moves, "stopped": s.stopped} for s in result.starts],
        "best": row(best) if best else None,
        "best_settings": best_settings,
        "rows": [row(r) for r in rows],
        **(dict(extra) if extra else {}),
    }


def plot_front(rows: Sequence[Row], path: str | Path, title: str) -> Path:
    """Throughput against p99 latency: every measured point, the Pareto front joined, the best ringed."""
    check_plot_file(path)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from qeff.common.atomic import save_figure_atomic

    ok = [r for r in rows if r.measurement.ok and math.isfinite(r.measurement.p99_ms)]
    front = pareto_front(rows)
    figure, axes = plt.subplots(figsize=(8, 5.5))
    axes.scatter([r.measurement.p99_ms for r in ok], [r.measurement.inf_per_s for r in ok], s=18, color="#9aa5b1",
                 label=f"measured ({len(ok)})", zorder=2)
    if front:
        axes.plot([r.measurement.p99_ms for r in front], [r.measurement.inf_per_s for r in front], "-o",
                  color="#d9480f", markersize=6, label=f"Pareto front ({len(front)})", zorder=3)
        for r in front:
            axes.annotate(describe(r.config), (r.measurement.p99_ms, r.measurement.inf_per_s), fontsize=7,
                          xytext=(5, -9), textcoords="offset points", color="#7a2a05")
    if rows and rows[0] in ok:
        best = rows[0].measurement
        axes.scatter([best.p99_ms], [best.inf_per_s], s=160, facecolors="none", edgecolors="#1c7ed6", linewidths=2,
                     label="best for the objective", zorder=4)
    axes.set_xlabel("p99 latency of one call (ms)")
    axes.set_ylabel("throughput (inferences/s)")
    axes.set_title(title, fontsize=10)
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    return save_figure_atomic(figure, path, dpi=110)
