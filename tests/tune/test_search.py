"""The search on its own, with the stand-in card's formula as the measurement: on the tuning
guide's own space (62,720 boxes, 13,120 of which fit 14 cores) it must return the best point,
found here by evaluating the formula everywhere, for both objectives, measuring each point once
and never a point that does not fit."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from qeff.tune.search import Measurement, neighbours, run_search
from qeff.tune.space import parse_space
from tests.tune.standin_runner import performance

SEED = json.loads((Path(__file__).parent / "data" / "bert_base_dopt.json").read_text())
CORES = 14


def _measure(point: dict) -> Measurement:
    """The formula at ``point``; mos and ols left to the compiler take their best values."""
    rate, latency = performance(point["cores"], point["mos"] or 2, point["ols"] or 3, point["batch-size"],
                                point["instances"], 1)
    return Measurement(inf_per_s=rate, p50_ms=latency / 1000, p90_ms=latency / 1000, p99_ms=latency / 1000)


def _brute_force(objective: str) -> tuple[dict, int]:
    """The best point of the seed's space and the number of points that fit, without qeff."""
    best, best_value, count = None, None, 0
    for c, m, o, b, a in itertools.product(range(1, 15), range(1, 9), range(1, 9), (1, 2, 4, 8, 16), range(1, 15)):
        if c * a > CORES:
            continue
        count += 1
        rate, latency = performance(c, m, o, b, a, 1)
        value = rate if objective == "max-throughput" else -latency
        if best_value is None or value > best_value:
            best, best_value = {"cores": c, "mos": m, "ols": o, "batch-size": b, "instances": a}, value
    return best, count


@pytest.mark.parametrize("objective", ["max-throughput", "min-latency"])
def test_the_local_search_finds_the_best_point_with_fewer_measurements(objective):
    space = parse_space(SEED, total_cores=CORES, objective=objective)
    asked: list[tuple] = []

    def evaluate(points):
        asked.extend(tuple(sorted(p.items())) for p in points)
        return [_measure(space.config(p)) for p in points]

    result = run_search(space, evaluate)
    best, grid = _brute_force(objective)
    found = result.best[0]
    assert found == best
    assert result.grid_size == grid
    assert len(asked) == len(set(asked)) == len(result.evaluated) < grid
    assert all(dict(p)["cores"] * dict(p)["instances"] <= CORES for p in asked)
    assert len(result.starts) == 5 and all(s.evaluations <= SEED["max_func_eval"] for s in result.starts)
    print(f"{objective}: {len(result.evaluated)} points measured of {grid}; best {found}")


def test_the_budget_per_start_is_kept():
    doc = {**SEED, "max_func_eval": 7}
    space = parse_space(doc, total_cores=CORES)
    result = run_search(space, lambda points: [_measure(space.config(p)) for p in points])
    assert [s.evaluations for s in result.starts] == [7] * 5
    assert all(s.stopped == "budget" for s in result.starts)
    assert len(result.evaluated) <= 35


def test_the_grid_measures_every_point_that_fits():
    doc = {"objective": "min-latency", "search-mode": "exhaustive",
           "search-parameters": {"cores": {"min": 1, "max": 6}, "instances": {"min": 1, "max": 6},
                                 "batch-size": {"min": 2, "max": 8}}}
    space = parse_space(doc, total_cores=6)
    result = run_search(space, lambda points: [_measure(space.config(p)) for p in points])
    expected = {(c, a, b) for c in range(1, 7) for a in range(1, 7) for b in (2, 4, 8) if c * a <= 6}
    assert {(p["cores"], p["instances"], p["batch-size"]) for p, _ in result.evaluated} == expected
    assert len(result.evaluated) == len(expected) == result.grid_size


def test_neighbours_step_one_parameter_or_trade_cores_for_instances():
    space = parse_space(SEED, total_cores=CORES)
    point = {"cores": 4, "mos": 1, "ols": 3, "batch-size": 4, "instances": 3}
    found = {tuple(n[k] for k in ("cores", "mos", "ols", "batch-size", "instances")) for n in neighbours(space, point)}
    assert found == {
        (3, 1, 3, 4, 3),  # cores 5 × 3 instances does not fit 14
        (4, 2, 3, 4, 3), (4, 1, 2, 4, 3), (4, 1, 4, 4, 3), (4, 1, 3, 2, 3), (4, 1, 3, 8, 3),
        (4, 1, 3, 4, 2),  # instances 4 does not fit
        (3, 1, 3, 4, 4), (5, 1, 3, 4, 2),  # cores ∓ 1, instances as many as fit
        (7, 1, 3, 4, 2),  # instances 2, cores as many as fit (4 instances: 3 cores, already above)
    }


def test_a_failed_point_is_kept_and_the_search_goes_on():
    doc = {"objective": "max-throughput", "search-parameters": {"batch-size": {"min": 1, "max": 16}},
           "initial-values": [{"batch-size": 1}]}
    space = parse_space(doc, total_cores=16)

    def evaluate(points):  # batch 4 does not compile: the search stops at batch 2, the failure is kept
        return [Measurement(error="compile: out of memory") if p["batch-size"] == 4 else
                _measure(space.config(p)) for p in points]

    result = run_search(space, evaluate)
    assert [p["batch-size"] for p, _ in result.evaluated] == [1, 2, 4]
    assert result.best[0] == {"batch-size": 2}
    assert [m.error for _, m in result.evaluated] == [None, None, "compile: out of memory"]
