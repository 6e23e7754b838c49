"""``tune_model``: a search space, a backend and a model in; the ranked measurements out.

Everything that can refuse the run (the model, the tools, a symbol without a value) is checked
before the first measurement. A dry run measures nothing: it returns the plan, the commands the
search would start with (with ``exhaustive``, every command of the grid).
"""

from __future__ import annotations

__all__ = ["TuneResult", "tune_model"]

import dataclasses
import logging
import os
from collections.abc import Callable
from pathlib import Path

from qeff.errors import QeffError
from qeff.tune.report import Row, rank
from qeff.tune.search import Measurement, SearchResult, run_search
from qeff.tune.space import Space

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class TuneResult:
    space: Space
    result: SearchResult | None  # None: a dry run
    rows: list[Row]
    best_settings: str | None  # how to reproduce the best point (commands, or session settings)
    plan: list[str]  # a dry run's commands
    compiles: int = 0  # QPCs compiled by this run (aic)

    @property
    def best(self) -> Row | None:
        return self.rows[0] if self.rows and self.rows[0].measurement.ok else None


def tune_model(model: str | os.PathLike, space: Space, *, dry_run: bool = False, aic=None, seq_len: int = 128,
               seconds: float = 1.0, on_result: Callable[[dict, Measurement], None] | None = None) -> TuneResult:
    """Search ``space`` for ``model``. ``aic`` (an :class:`~qeff.tune.aic.AicSettings`) is needed
    for the card backend; ``seq_len`` and ``seconds`` (per point) are the CPU backend's."""
    model = Path(model)
    if not model.is_file():
        raise QeffError(f"model {model} does not exist", "give an .onnx file without a KV cache")
    first = list(space.grid()) if space.exhaustive else [dict(p) for p in space.initial]
    if space.backend == "cpu":
        from qeff.tune.cpu import CpuBackend, session_settings

        if dry_run:
            plan = [f"measure on onnxruntime: {', '.join(f'{k} {v}' for k, v in space.config(p).items())}"
                    for p in first]
            return TuneResult(space, None, [], None, plan)
        cpu = CpuBackend(model, space, seq_len=seq_len, seconds=seconds, on_result=on_result)
        result = run_search(space, cpu.evaluate)
        rows = rank(result, space)
        best = rows[0] if rows and rows[0].measurement.ok else None
        return TuneResult(space, result, rows, session_settings(best.config) if best else None, [])

    from qeff.tune.aic import AicBackend

    if aic is None:
        raise QeffError("the aic backend needs its settings (model, work folder)", "pass aic=AicSettings(...)")
    backend = AicBackend(space, aic, on_result=on_result)
    backend.check_model()
    if dry_run:
        return TuneResult(space, None, [], None, backend.plan(first))
    backend.check_tools()
    result = run_search(space, backend.evaluate)
    rows = rank(result, space)
    best = rows[0] if rows and rows[0].measurement.ok else None
    settings = f"{backend.qeff_compile_line(best.config)}\n{backend.runner_line(best.config)}" if best else None
    return TuneResult(space, result, rows, settings, [], compiles=backend.compiles)
