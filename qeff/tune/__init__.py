"""qeff.tune: the Cloud AI model configurator as a command (``qeff tune``), and ``qeff latency-stats``.

A search space (either published JSON format, :mod:`qeff.tune.space`) is searched
(:mod:`qeff.tune.search`: a local search from each starting point, or the whole grid) with a
backend that measures points: the card (:mod:`qeff.tune.aic`: ``qeff compile``'s backend and
``qaic-runner``) or onnxruntime on the CPU (:mod:`qeff.tune.cpu`). :mod:`qeff.tune.report`
ranks the points, finds the Pareto front of throughput and p99 latency, and writes the JSON and
the plot. :mod:`qeff.tune.latency` reads the runner's per-inference latency files.

This package sits above the stages: it imports ``qeff.backend_aic`` and ``qeff.runtime``; no
stage imports it.
"""

from qeff.tune.latency import LatencyTable, format_stats, latency_stats, read_latency_file
from qeff.tune.run import TuneResult, tune_model
from qeff.tune.search import Measurement, SearchResult, neighbours, run_search, score
from qeff.tune.space import BACKEND_PARAMS, Space, load_space, parse_space

__all__ = [
    "tune_model",
    "TuneResult",
    "Space",
    "load_space",
    "parse_space",
    "BACKEND_PARAMS",
    "run_search",
    "neighbours",
    "score",
    "Measurement",
    "SearchResult",
    "latency_stats",
    "read_latency_file",
    "format_stats",
    "LatencyTable",
]
