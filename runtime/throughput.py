"""``qeff bench``: inferences per second and latency percentiles of a model without a KV cache.

For each batch size and each number of instances, ``instances`` sessions run side by side, one
thread each (onnxruntime releases the GIL while it computes; the CPU threads are split between
the instances), every one calling ``run`` on the same random batch for ``duration`` seconds after
a warm-up call. Reported per configuration: inferences/s (samples, i.e. batch rows, per second
over all instances), calls, and the latency of one call at p50/p90/p99 — the numbers the card's
throughput runs report, so CPU and card can be compared. ``threads`` (intra-op threads per
session, instead of the even split) and ``opt_level`` (onnxruntime's graph optimisation level,
0 none … 3 all) are the knobs ``qeff tune`` searches.
"""

from __future__ import annotations

__all__ = ["BenchRow", "bench_model", "encoder_feeds"]

import concurrent.futures
import dataclasses
import math
import numbers
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from qeff.errors import QeffError


@dataclasses.dataclass
class BenchRow:
    batch_size: int
    instances: int
    calls: int
    seconds: float
    inferences_per_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float


def encoder_feeds(names_types: Sequence[tuple[str, np.dtype, tuple]], batch: int, seq: int,
                  seed: int = 0) -> dict[str, np.ndarray]:
    """Random token ids, a full attention mask and zero token types for one batch."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for name, dtype, shape in names_types:
        dims = [batch if i == 0 else (d if isinstance(d, int) else seq) for i, d in enumerate(shape)]
        if name == "attention_mask":
            feeds[name] = np.ones(dims, dtype)
        elif name == "input_ids":
            feeds[name] = rng.integers(3, 100, dims).astype(dtype)
        else:
            feeds[name] = np.zeros(dims, dtype)
    return feeds


def _sessions(model: Path, count: int, threads: int | None = None, opt_level: int | None = None):
    from qeff.common.onnxrt import onnxruntime_session

    if threads is None:
        threads = max(1, (os.cpu_count() or 1) // count)  # the CPU is shared between the instances
    return [onnxruntime_session(model, purpose=" for qeff bench", threads=threads, level=opt_level)
            for _ in range(count)]


def _is_whole(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_counts(values: Sequence[int], what: str, example: str) -> None:
    if not values:
        raise QeffError(f"no {what} given", f"e.g. {example}")
    for v in values:
        if not _is_whole(v) or v < 1:
            raise QeffError(f"{what} {v!r} must be a whole number >= 1", f"e.g. {example}")


def bench_model(model: str | os.PathLike, batch_sizes: Sequence[int], instances: Sequence[int], *,
                seq_len: int = 128, duration: float = 2.0, threads: int | None = None,
                opt_level: int | None = None) -> list[BenchRow]:
    _check_counts(batch_sizes, "batch size", "--batch-size 1,4,8")
    _check_counts(instances, "instance count", "--instances 1,2")
    if not _is_whole(seq_len) or seq_len < 1:
        raise QeffError(f"seq_len {seq_len!r} must be a whole number >= 1", "e.g. --seq-len 128")
    # NaN fails every comparison and an infinite duration never stops, so both are named here.
    if isinstance(duration, bool) or not isinstance(duration, numbers.Real) or not math.isfinite(duration) \
            or duration <= 0:
        raise QeffError(f"duration {duration!r} must be a finite number of seconds above 0", "e.g. --duration 2")
    if threads is not None and (not _is_whole(threads) or threads < 1):
        raise QeffError(f"threads {threads!r} must be a whole number >= 1", "e.g. 2")
    if opt_level is not None and (not _is_whole(opt_level) or not 0 <= opt_level <= 3):
        raise QeffError(f"opt_level {opt_level!r} must be 0, 1, 2 or 3", "3 is onnxruntime's default")
    path = Path(model)
    if not path.is_file():
        raise QeffError(f"model {path} does not exist", "give an .onnx file")
    rows = []
    for n in instances:
        sessions = _sessions(path, n, threads, opt_level)
        specs = [(i.name, np.dtype({"tensor(int64)": np.int64, "tensor(int32)": np.int32,
                                    "tensor(float)": np.float32}.get(i.type, np.int64)), tuple(i.shape))
                 for i in sessions[0].get_inputs()]
        if any(name.startswith("past_") for name, _, _ in specs):
            raise QeffError("qeff bench measures models without a KV cache (encoders)",
                            "for a KV model use qeff run, which reports tokens/s")
        for b in batch_sizes:
            feeds = encoder_feeds(specs, b, seq_len)
            rows.append(_measure(sessions, feeds, b, duration))
    return rows


def _measure(sessions: list, feeds: dict[str, np.ndarray], batch: int, duration: float) -> BenchRow:
    for s in sessions:
        s.run(None, feeds)  # warm-up: first-call allocations stay out of the numbers
    latencies: list[float] = []
    lock = threading.Lock()
    stop_at = time.perf_counter() + duration

    def worker(session) -> None:
        local = []
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            session.run(None, feeds)
            local.append(time.perf_counter() - t0)
        with lock:
            latencies.extend(local)

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(len(sessions)) as pool:
        list(pool.map(worker, sessions))
    seconds = time.perf_counter() - start
    ms = np.array(latencies) * 1e3
    return BenchRow(batch, len(sessions), len(latencies), seconds, len(latencies) * batch / seconds,
                    float(np.percentile(ms, 50)), float(np.percentile(ms, 90)), float(np.percentile(ms, 99)))
