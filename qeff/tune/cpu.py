"""The CPU backend of ``qeff tune``: the configurator's search, measured with onnxruntime.

What the card's batch size, instances and cores are on the card, batch size, sessions running
side by side and intra-op threads per session are here; onnxruntime's graph optimisation level
is a fourth knob. Each point is one ``qeff bench`` measurement (:func:`qeff.runtime.throughput.bench_model`):
a warm-up call per session, then every session calling ``run`` for ``seconds``. The numbers
are real and noisy; a point is measured once per search. No file is written.
"""

from __future__ import annotations

__all__ = ["CpuBackend", "session_settings"]

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from qeff.tune.search import Measurement
from qeff.tune.space import OPT_LEVELS, Space

logger = logging.getLogger(__name__)


def session_settings(config: Mapping[str, int | None]) -> str:
    """The onnxruntime settings of ``config``, as the lines a user writes."""
    return (f"{config['instances']} InferenceSession(s) side by side, batch size {config['batch-size']}; "
            f"SessionOptions: intra_op_num_threads = {config['threads']}, "
            f"graph_optimization_level = GraphOptimizationLevel.{OPT_LEVELS[int(config['opt-level'])]}")


class CpuBackend:
    """Measures points of a ``cpu`` :class:`~qeff.tune.space.Space` on ``model`` (no KV cache)."""

    def __init__(self, model: str | os.PathLike, space: Space, *, seq_len: int = 128, seconds: float = 1.0,
                 on_result: Callable[[dict, Measurement], None] | None = None) -> None:
        self.model = Path(model)
        self.space = space
        self.seq_len = seq_len
        self.seconds = seconds
        self.on_result = on_result

    def evaluate(self, points: Sequence[Mapping[str, int]]) -> list[Measurement]:
        from qeff.runtime.throughput import bench_model

        out = []
        for point in points:
            config = self.space.config(point)
            # One point at a time: side-by-side sessions of two points would share the cores.
            row = bench_model(self.model, [int(config["batch-size"])], [int(config["instances"])],
                              seq_len=self.seq_len, duration=self.seconds, threads=int(config["threads"]),
                              opt_level=int(config["opt-level"]))[0]
            m = Measurement(row.inferences_per_s, row.p50_ms, row.p90_ms, row.p99_ms,
                            details={"calls": row.calls, "seconds": row.seconds})
            logger.debug("%s: %.1f inf/s, p50 %.3f ms", config, m.inf_per_s, m.p50_ms)
            if self.on_result is not None:
                self.on_result(config, m)
            out.append(m)
        return out
