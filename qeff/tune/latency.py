"""Per-inference latency files of ``qaic-runner --aic-profiling-type latency``, and their percentiles.

A file (``aic-profiling-program-N-latency.txt``, one per activation) is four header lines, then
a CSV table, one row per inference. Its columns are ``Sample``, ``queueDepth``,
``numInfInQueue`` and latencies in microseconds whose names end in ``Us`` (``hostRoundTripUs``,
``enqTimeUs``, …, ``totalRoundtripTimeUs``; which ones depends on the runtime and on how the
model was compiled). Fields may be padded with spaces; ``N/A`` (or an empty field) marks a value
the runtime did not record.

Rules: every ``…Us`` column is reported, under its name without the suffix, in milliseconds;
a column with no value in any file is left out; ``keep_middle`` (a percentage) keeps the middle
inferences of each file, dropping as many from its start as from its end; files are then
combined. Percentiles interpolate linearly between samples (NumPy's default). A file that does
not follow the format is a one-line :class:`~qeff.errors.QeffError`, naming the file and line.
"""

from __future__ import annotations

__all__ = ["LatencyTable", "read_latency_file", "latency_stats", "format_stats", "STATS", "TOTAL"]

import csv
import dataclasses
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from qeff.errors import QeffError

logger = logging.getLogger(__name__)

HEADER_LINES = 4
COUNTERS = ("Sample", "queueDepth", "numInfInQueue")
STATS = ("mean", "min", "50%", "75%", "90%", "95%", "99%", "max")
TOTAL = "totalRoundtripTime"  # host call to completion: the latency of one inference call
_MISSING = ("", "N/A", "NA", "nan", "NaN")


@dataclasses.dataclass
class LatencyTable:
    """Latencies in µs by column name (without ``Us``), one value per inference (NaN: not recorded)."""

    columns: dict[str, np.ndarray]
    inferences: int

    def stats(self) -> dict[str, dict[str, float]]:
        """Per column: mean, min, 50 %, 75 %, 90 %, 95 %, 99 %, max, in milliseconds."""
        out: dict[str, dict[str, float]] = {}
        for name, values in self.columns.items():
            ms = values[~np.isnan(values)] / 1000.0
            if ms.size == 0:
                continue
            row = {"mean": float(ms.mean()), "min": float(ms.min())}
            for q in (50, 75, 90, 95, 99):
                row[f"{q}%"] = float(np.percentile(ms, q))
            row["max"] = float(ms.max())
            out[name] = row
        return out


def _number(text: str, path: Path, line: int, column: str) -> float:
    text = text.strip()
    if text in _MISSING:
        return math.nan
    try:
        value = float(text)
    except ValueError:
        raise QeffError(f"{path}: line {line}: {column} is {text[:20]!r}, not a number",
                        "give qaic-runner's --aic-profiling-type latency files") from None
    if not math.isfinite(value):
        raise QeffError(f"{path}: line {line}: {column} is {text!r}", "give qaic-runner's latency files")
    return value


def read_latency_file(path: str | os.PathLike) -> tuple[list[str], list[list[float]]]:
    """The latency column names (with ``Us``) and one row of µs per inference."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8", errors="strict").splitlines()
    except FileNotFoundError:
        raise QeffError(f"{path} does not exist", "give the aic-profiling-program-N-latency.txt files") from None
    except (OSError, UnicodeDecodeError) as e:
        raise QeffError(f"{path} cannot be read: {getattr(e, 'strerror', None) or e}",
                        "give qaic-runner's latency text files") from None
    if len(lines) <= HEADER_LINES:
        raise QeffError(f"{path} has {len(lines)} lines: no table after the {HEADER_LINES} header lines",
                        "give qaic-runner's --aic-profiling-type latency files")
    rows = list(csv.reader(lines[HEADER_LINES:], skipinitialspace=True))
    header = [h.strip() for h in rows[0]]
    if "Sample" not in header:
        raise QeffError(f"{path}: line {HEADER_LINES + 1} is not the table's header (no Sample column)",
                        "give qaic-runner's --aic-profiling-type latency files")
    wanted = [i for i, h in enumerate(header) if h.endswith("Us") and len(h) > 2]
    if not wanted:
        raise QeffError(f"{path}: the table has no latency column (a name ending in Us)",
                        "give qaic-runner's --aic-profiling-type latency files")
    data = []
    for offset, row in enumerate(rows[1:], start=HEADER_LINES + 2):
        if not any(field.strip() for field in row):
            continue  # a blank line (e.g. the file's end)
        if len(row) != len(header):
            raise QeffError(f"{path}: line {offset} has {len(row)} fields, the header {len(header)}",
                            "the file is cut or not a latency file")
        data.append([_number(row[i], path, offset, header[i]) for i in wanted])
    if not data:
        raise QeffError(f"{path} has a header but no inference", "run longer, or check --aic-profiling-num-samples")
    return [header[i] for i in wanted], data


def _keep_middle(rows: list[list[float]], percent: float) -> list[list[float]]:
    drop = int(round(len(rows) * (1.0 - percent / 100.0) / 2.0))
    return rows[drop:len(rows) - drop]


def latency_stats(paths: Sequence[str | os.PathLike], keep_middle: float | None = None) -> LatencyTable:
    """All ``paths`` read and combined (each trimmed to its middle ``keep_middle`` % first)."""
    if not paths:
        raise QeffError("no latency file given", "e.g. qeff latency-stats out/aic-profiling-program-0-latency.txt")
    if keep_middle is not None and not 0 < keep_middle <= 100:
        raise QeffError(f"--keep-middle {keep_middle} is not a percentage above 0", "e.g. --keep-middle 90")
    columns: dict[str, list[float]] = {}
    count = 0
    for path in paths:
        names, rows = read_latency_file(path)
        if keep_middle is not None:
            rows = _keep_middle(rows, keep_middle)
        for name in names:
            # A column that one file lacks is "not recorded" for that file's inferences.
            columns.setdefault(name, [math.nan] * count)
        for name, values in columns.items():
            if name in names:
                i = names.index(name)
                values.extend(r[i] for r in rows)
            else:
                values.extend([math.nan] * len(rows))
        count += len(rows)
    if count == 0:
        raise QeffError(f"--keep-middle {keep_middle:g} keeps no inference", "keep a larger percentage")
    table = {name[:-2]: np.array(values, dtype=np.float64) for name, values in columns.items()}
    return LatencyTable({k: v for k, v in table.items() if not np.isnan(v).all()}, count)


def format_stats(stats: dict[str, dict[str, float]]) -> list[str]:
    """Fixed-width lines (ms, three decimals): a wide table is printed whole, never folded."""
    width = max([len("latency (ms)"), *map(len, stats)])
    cells = {name: [f"{row[s]:.3f}" for s in STATS] for name, row in stats.items()}
    col = max([8, *(len(c) for values in cells.values() for c in values)])
    lines = [f"{'latency (ms)':<{width}}" + "".join(f"  {s:>{col}}" for s in STATS)]
    for name, values in cells.items():
        lines.append(f"{name:<{width}}" + "".join(f"  {v:>{col}}" for v in values))
    return lines

