"""The configurator's search: a local search from each starting point, or the whole grid.

The search only sees a function that measures a list of points (``evaluate``), so it runs the
same against the card, onnxruntime or a formula. Rules:

- **Objective.** ``max-throughput`` maximises inferences/s; ``min-latency`` minimises the
  median latency of one inference call (p50). A failed measurement (a compile or a run that
  failed) scores worst and is kept in the results with its reason.
- **Local search.** From each starting point a fresh search: evaluate the point's neighbours,
  move to the best one if it beats the current point, stop when none does or when the start has
  used ``max_evals`` evaluations. A neighbour is one step up or down in one parameter (batch
  sizes step between powers of two), plus, when both cores and instances are searched, a
  *trade*: one step of one of them with the other set to the most that still fits on the cores
  available — best throughput usually lies on that boundary, which single steps cannot walk.
  Only points with ``cores × instances <= total cores`` are ever measured.
- **Cache.** A point is measured once per search, however many starts reach it; each start still
  counts the points it looked at against its own ``max_evals``.
- **Grid.** ``exhaustive`` measures every feasible point.
"""

from __future__ import annotations

__all__ = ["Measurement", "StartResult", "SearchResult", "run_search", "score", "neighbours"]

import dataclasses
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from qeff.tune.space import Space

logger = logging.getLogger(__name__)

Point = dict[str, int]
Evaluate = Callable[[Sequence[Point]], Sequence["Measurement"]]
# Points measured per call of ``evaluate`` on the grid: large enough for parallel compiles,
# small enough that progress shows.
_GRID_CHUNK = 32


@dataclasses.dataclass
class Measurement:
    """One configuration's numbers (latencies of one inference call, in ms)."""

    inf_per_s: float = 0.0
    p50_ms: float = math.nan
    p90_ms: float = math.nan
    p99_ms: float = math.nan
    error: str | None = None  # why the configuration could not be measured
    reused: bool = False  # taken from an earlier run's results, not measured again
    details: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None


def score(m: Measurement, objective: str) -> float:
    """Higher is better, for either objective; a failure is worst."""
    if not m.ok:
        return -math.inf
    value = m.inf_per_s if objective == "max-throughput" else -m.p50_ms
    return value if math.isfinite(value) else -math.inf


@dataclasses.dataclass
class StartResult:
    initial: Point
    best: Point
    evaluations: int  # points this start looked at (cached ones included)
    moves: int
    stopped: str  # "converged" or "budget"


@dataclasses.dataclass
class SearchResult:
    objective: str
    evaluated: list[tuple[Point, Measurement]]  # every point measured, in order
    starts: list[StartResult]
    grid_size: int

    @property
    def best(self) -> tuple[Point, Measurement] | None:
        ok = [(p, m) for p, m in self.evaluated if m.ok]
        return max(ok, key=lambda pm: score(pm[1], self.objective)) if ok else None

    @property
    def reused(self) -> int:
        return sum(1 for _, m in self.evaluated if m.reused)


def _key(point: Mapping[str, int]) -> tuple[tuple[str, int], ...]:
    return tuple(sorted(point.items()))


def _step(values: tuple[int, ...], current: int, direction: int) -> int | None:
    i = values.index(current) + direction
    return values[i] if 0 <= i < len(values) else None


def _most_that_fits(space: Space, point: Point, name: str) -> int | None:
    """The largest searched value of ``name`` that keeps ``point`` feasible."""
    for value in reversed(space.values[name]):
        if space.feasible({**point, name: value}):
            return value
    return None


def neighbours(space: Space, point: Point) -> list[Point]:
    """The feasible neighbours of ``point``, in a fixed order (see the module's rules)."""
    found: list[Point] = []
    for name, values in space.values.items():
        for direction in (-1, 1):
            value = _step(values, point[name], direction)
            if value is not None:
                found.append({**point, name: value})
    cores = space.cores_name
    if cores in space.values and "instances" in space.values:
        for moved, other in ((cores, "instances"), ("instances", cores)):
            for direction in (-1, 1):
                value = _step(space.values[moved], point[moved], direction)
                if value is None:
                    continue
                fit = _most_that_fits(space, {**point, moved: value}, other)
                if fit is not None and fit != point[other]:
                    found.append({**point, moved: value, other: fit})
    unique: dict[tuple, Point] = {}
    for p in found:
        if space.feasible(p):
            unique.setdefault(_key(p), p)
    return list(unique.values())


class _Cache:
    """Measurements by point; asks ``evaluate`` only for points not measured yet."""

    def __init__(self, evaluate: Evaluate) -> None:
        self.evaluate = evaluate
        self.results: dict[tuple, Measurement] = {}
        self.order: list[tuple[Point, Measurement]] = []

    def measure(self, points: Sequence[Point]) -> list[Measurement]:
        new = [p for p in dict((_key(p), p) for p in points).values() if _key(p) not in self.results]
        if new:
            measured = list(self.evaluate(new))
            if len(measured) != len(new):
                raise RuntimeError(f"evaluate returned {len(measured)} measurements for {len(new)} points")
            for p, m in zip(new, measured):
                self.results[_key(p)] = m
                self.order.append((dict(p), m))
        return [self.results[_key(p)] for p in points]


def _local_search(space: Space, cache: _Cache, initial: Point) -> StartResult:
    objective = space.objective
    seen = {_key(initial)}
    current = dict(initial)
    current_score = score(cache.measure([current])[0], objective)
    moves = 0
    while True:
        candidates = neighbours(space, current)
        unseen = [p for p in candidates if _key(p) not in seen]
        budget = space.max_evals - len(seen)
        stopped = "budget" if unseen and budget < len(unseen) else "converged"
        unseen = unseen[:max(budget, 0)]
        seen.update(_key(p) for p in unseen)
        cache.measure(unseen)
        # Points of this start only: a neighbour not looked at (over budget) cannot be chosen.
        looked = [p for p in candidates if _key(p) in seen]
        scores = [score(cache.results[_key(p)], objective) for p in looked]
        best_i = max(range(len(looked)), key=lambda i: scores[i], default=None)
        if best_i is None or scores[best_i] <= current_score:
            return StartResult(dict(initial), current, len(seen), moves, stopped)
        current, current_score = looked[best_i], scores[best_i]
        moves += 1
        logger.info("start %s: moved to %s (score %.4g)", initial, current, current_score)
        if stopped == "budget":
            return StartResult(dict(initial), current, len(seen), moves, stopped)


def run_search(space: Space, evaluate: Evaluate) -> SearchResult:
    """Search ``space`` with ``evaluate`` (a function measuring a list of points, in order)."""
    cache = _Cache(evaluate)
    starts: list[StartResult] = []
    if space.exhaustive:
        points = list(space.grid())
        for i in range(0, len(points), _GRID_CHUNK):
            cache.measure(points[i:i + _GRID_CHUNK])
        grid_size = len(points)
    else:
        for initial in space.initial:
            starts.append(_local_search(space, cache, dict(initial)))
        grid_size = space.grid_size()
    return SearchResult(space.objective, cache.order, starts, grid_size)
