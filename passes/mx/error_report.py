"""The per-weight quantization error of the MX passes as a table and a per-layer plot."""

from __future__ import annotations

__all__ = ["weight_error_table", "plot_weight_errors", "layer_of"]

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from qeff.common.atomic import save_figure_atomic
from qeff.errors import QeffError

_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")
_MAX_ROWS = 30


def layer_of(label: str) -> int | None:
    """The decoder layer a weight name belongs to (``…layers.3.mlp…`` → 3), or None."""
    match = _LAYER.search(label)
    return int(match.group(1)) if match else None


def weight_error_table(pass_name: str, weights: Mapping[str, Mapping[str, Any]]):
    """A rich table of the weights with the lowest SQNR first (all of them when few)."""
    from rich.table import Table

    rows = sorted(weights.items(), key=lambda item: (item[1]["sqnr_db"] is None, item[1]["sqnr_db"] or 0.0))
    shown = rows if len(rows) <= _MAX_ROWS else rows[:_MAX_ROWS]
    title = f"{pass_name}: per-weight error" + (f" (the {_MAX_ROWS} worst of {len(rows)}; all in --report)"
                                                if len(shown) < len(rows) else "")
    table = Table(title=title)
    for column in ("weight", "shape", "axis", "SQNR dB", "max abs error"):
        table.add_column(column, justify="left" if column == "weight" else "right")
    for name, w in shown:
        measured = w["sqnr_db"] is not None
        table.add_row(name, "×".join(map(str, w["shape"])), str(w["axis"]),
                      f"{w['sqnr_db']:.2f}" if measured else "not yet written",
                      f"{w['max_abs_error']:.3g}" if measured else "—")
    return table


def plot_weight_errors(per_pass: Mapping[str, Mapping[str, Mapping[str, Any]]], path: str | Path) -> Path:
    """Draw SQNR (top) and max abs error (bottom) of every weight against its layer, one
    marker series per kind of weight (the name after the layer index)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise QeffError("--plot needs matplotlib", "pip install matplotlib (or the package's [plot] extra)") from None
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    for pass_name, weights in per_pass.items():
        series: dict[str, tuple[list[float], list[float], list[float]]] = {}
        last = max((layer_of(n) or 0 for n in weights), default=0)
        for name, w in weights.items():
            if w["sqnr_db"] is None:
                continue  # a streamed weight not written yet
            layer = layer_of(name)
            kind = _LAYER.split(name)[-1] if layer is not None else name.rsplit(".", 2)[-2] if "." in name else name
            x = layer if layer is not None else last + 1  # lm_head and other weights after the layers
            xs, sqnr, err = series.setdefault(f"{pass_name}: {kind}", ([], [], []))
            xs.append(x)
            sqnr.append(w["sqnr_db"])
            err.append(w["max_abs_error"])
        for label, (xs, sqnr, err) in sorted(series.items()):
            top.plot(xs, sqnr, marker="o", linestyle="", label=label)
            bottom.plot(xs, err, marker="o", linestyle="", label=label)
    top.set_ylabel("SQNR (dB)")
    bottom.set_ylabel("max abs error")
    bottom.set_yscale("log")
    bottom.set_xlabel("layer (weights outside the layers to the right)")
    top.legend(fontsize="x-small", ncol=3)
    top.grid(True, alpha=0.3)
    bottom.grid(True, alpha=0.3)
    figure.tight_layout()
    return save_figure_atomic(figure, path, dpi=100)
