"""The one way qeff opens an onnxruntime session: quiet, CPU unless asked, and a model
onnxruntime cannot load becomes a one-line :class:`~qeff.errors.VerificationError`."""

from __future__ import annotations

__all__ = ["onnxruntime_session", "run_model"]

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from qeff.errors import VerificationError


def onnxruntime_session(model: str | os.PathLike | bytes, providers: Sequence[str] | None = None, *,
                        purpose: str = "", hint: str | None = None, optimize: bool = True,
                        threads: int | None = None, prepack: bool = True, level: int | None = None):
    """An onnxruntime ``InferenceSession`` (warnings silenced).

    ``optimize=False`` turns graph optimisations off, for graphs whose every node must run as
    written (the fp16 simulation's rounding casts); ``threads`` caps the intra-op threads.
    ``prepack=False`` keeps MatMul weights where onnxruntime maps them from the external-data
    file instead of copying each into a packed buffer: the weights then live once, in the page
    cache, and a one-row MatMul (a decode step) does not use the packing anyway.
    ``level`` (0 none, 1 basic, 2 extended, 3 all) sets the graph optimisation level and
    overrides ``optimize``.
    """
    import onnxruntime as ort

    # onnxruntime logs its own errors to stderr before raising them; the exception is reported
    # (as one line), so its log stays quiet, the process-wide one included.
    ort.set_default_logger_severity(4)
    options = ort.SessionOptions()
    options.log_severity_level = 4
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if level is not None:
        levels = ("ORT_DISABLE_ALL", "ORT_ENABLE_BASIC", "ORT_ENABLE_EXTENDED", "ORT_ENABLE_ALL")
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, levels[level])
    if threads is not None:
        options.intra_op_num_threads = threads
    if not prepack:
        options.add_session_config_entry("session.disable_prepacking", "1")
    source = model if isinstance(model, bytes) else str(model)
    try:
        return ort.InferenceSession(source, options, providers=list(providers or ["CPUExecutionProvider"]))
    except Exception as e:  # onnxruntime's errors share no base class beyond Exception
        name = "the model" if isinstance(model, bytes) else Path(model).name
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise VerificationError(f"onnxruntime cannot load {name}{purpose}: {reason}", hint) from e


def run_model(model: str | os.PathLike | bytes, feeds: Mapping[str, np.ndarray], *, purpose: str = "",
              hint: str | None = None) -> dict[str, np.ndarray]:
    """Run a model once on the CPU with the feeds it takes; every output by name."""
    session = onnxruntime_session(model, purpose=purpose, hint=hint)
    wanted = {i.name for i in session.get_inputs()}
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, {k: v for k, v in feeds.items() if k in wanted})))
