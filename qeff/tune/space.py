"""Search spaces of ``qeff tune``: both published JSON formats, read into one checked :class:`Space`.

Two formats describe the same thing, a box of integer parameters, starting points and an
objective:

- the older one: ``max_func_eval``, ``objective`` (``maximize_inf_rate`` | ``minimize_latency``),
  ``params`` (``cores``, ``mos``, ``ols``, ``bs``, ``instances``, each ``{"min", "max"}``),
  ``initial_values`` (a list of points) and optional ``static_params`` (fixed values of
  parameters left out of the search);
- the newer one: ``search-mode`` (``optimized`` | ``exhaustive``), ``objective``
  (``max-throughput`` | ``min-latency``), ``search-parameters`` (``cores``, ``mos``, ``ols``,
  ``batch-size``, ``instances``, ``set-size``), ``initial-values``; ``max-func-eval`` and
  ``static-parameters`` are read as in the older format.

Parameter names are kept in the newer spelling (``batch-size``, ``set-size``). The card backend
searches cores, mos, ols, batch-size, instances and set-size; the CPU backend batch-size,
instances, threads (intra-op threads per session) and opt-level (onnxruntime's graph
optimisation level, 0 = none … 3 = all). A parameter neither searched nor static takes its
default (see :data:`DEFAULTS`).

Rules, each a one-line :class:`~qeff.errors.QeffError` when broken: the file is a JSON object
with known keys only; every bound is a whole number, ``min <= max``, within the parameter's
valid range; batch-size bounds are powers of two and the batch sizes searched are the powers of
two between them; ``cores × instances`` (CPU: ``threads × instances``) of every starting and
static point is at most the cores available (``total_cores``), and so is ``cores`` alone.
"""

from __future__ import annotations

__all__ = ["Space", "load_space", "parse_space", "BACKEND_PARAMS", "DEFAULTS", "OBJECTIVES", "OPT_LEVELS"]

import dataclasses
import itertools
import json
import logging
import operator
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from qeff.errors import QeffError

logger = logging.getLogger(__name__)

BACKEND_PARAMS = {
    "aic": ("cores", "mos", "ols", "batch-size", "instances", "set-size"),
    "cpu": ("batch-size", "instances", "threads", "opt-level"),
}
# The parameter that shares the cores between instances, per backend.
_CORES = {"aic": "cores", "cpu": "threads"}
_ALIASES = {"bs": "batch-size", "batch_size": "batch-size", "batchSize": "batch-size", "set_size": "set-size",
            "opt_level": "opt-level"}
# Smallest value each parameter takes (opt-level 0 disables onnxruntime's graph optimisations).
_LOW = {"opt-level": 0}
_HIGH = {"opt-level": 3}
# None: not passed to the compiler, which then picks its own; "share": the cores left per instance.
DEFAULTS: dict[str, int | str | None] = {"cores": "share", "threads": "share", "mos": None, "ols": None,
                                         "batch-size": 1, "instances": 1, "set-size": 1, "opt-level": 3}
OBJECTIVES = {"max-throughput": "max-throughput", "min-latency": "min-latency",
              "maximize_inf_rate": "max-throughput", "minimize_latency": "min-latency"}
OPT_LEVELS = ("ORT_DISABLE_ALL", "ORT_ENABLE_BASIC", "ORT_ENABLE_EXTENDED", "ORT_ENABLE_ALL")
_MODES = ("optimized", "exhaustive")
_KEYS = {
    "old": {"max_func_eval", "objective", "params", "initial_values", "static_params"},
    "new": {"search-mode", "objective", "search-parameters", "initial-values", "static-parameters",
            "max-func-eval"},
}
DEFAULT_MAX_EVALS = 200  # what the tuning guide recommends for max_func_eval


@dataclasses.dataclass(frozen=True)
class Space:
    """A checked search space. ``values`` maps each searched parameter to the values it takes
    (ascending); ``fixed`` holds every other parameter of the backend (None: left to the tool);
    ``initial`` the starting points (searched parameters only)."""

    backend: str
    values: Mapping[str, tuple[int, ...]]
    fixed: Mapping[str, int | None]
    initial: tuple[Mapping[str, int], ...]
    objective: str
    max_evals: int
    exhaustive: bool
    total_cores: int
    source_format: str  # "old" or "new"

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.values)

    @property
    def cores_name(self) -> str:
        return _CORES[self.backend]

    def config(self, point: Mapping[str, int]) -> dict[str, int | None]:
        """Every parameter of the backend for ``point`` (searched values), in the backend's order."""
        merged: dict[str, Any] = {**self.fixed, **point}
        cores = self.cores_name
        if merged.get(cores) == "share":  # not searched, not static: what each instance gets
            merged[cores] = max(1, self.total_cores // int(merged["instances"]))
        return {name: merged[name] for name in BACKEND_PARAMS[self.backend]}

    def feasible(self, point: Mapping[str, int]) -> bool:
        config = self.config(point)
        return int(config[self.cores_name]) * int(config["instances"]) <= self.total_cores

    def grid(self) -> Iterator[dict[str, int]]:
        """Every feasible point, in a fixed order."""
        for combo in itertools.product(*self.values.values()):
            point = dict(zip(self.names, combo))
            if self.feasible(point):
                yield point

    def grid_size(self) -> int:
        return sum(1 for _ in self.grid())

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "objective": self.objective, "max_evals": self.max_evals,
                "mode": "exhaustive" if self.exhaustive else "optimized", "total_cores": self.total_cores,
                "values": {k: list(v) for k, v in self.values.items()}, "fixed": dict(self.fixed),
                "initial": [dict(p) for p in self.initial]}


def _whole(value: object, what: str) -> int:
    try:
        if isinstance(value, bool):
            raise TypeError
        return operator.index(value)
    except TypeError:
        raise QeffError(f"{what} must be a whole number, got {value!r}", "fix the search space file") from None


def _is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def _name(raw: str, backend: str, where: str) -> str:
    name = _ALIASES.get(raw, raw)
    if name not in BACKEND_PARAMS[backend]:
        raise QeffError(f"{where}: unknown parameter {raw!r} for the {backend} backend",
                        f"it searches {', '.join(BACKEND_PARAMS[backend])}")
    return name


def _check_value(name: str, value: int, total_cores: int, where: str) -> None:
    low, high = _LOW.get(name, 1), _HIGH.get(name)
    if name in ("cores", "threads", "instances"):
        high = total_cores
    if value < low or (high is not None and value > high):
        limit = f"between {low} and {high}" if high is not None else f"at least {low}"
        extra = f" (the {total_cores} cores available)" if name in ("cores", "threads", "instances") else ""
        raise QeffError(f"{where}: {name} {value} is out of range: it must be {limit}{extra}",
                        "fix the search space file" + (", or set --total-cores" if extra else ""))


def _object(value: object, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise QeffError(f"{what} must be a JSON object, got {type(value).__name__}", "fix the search space file")
    return value


def parse_space(data: object, *, backend: str = "aic", total_cores: int = 16, objective: str | None = None,
                exhaustive: bool | None = None) -> Space:
    """Check ``data`` (a parsed JSON document in either format) and return its :class:`Space`.
    ``objective`` and ``exhaustive`` given here override the file's."""
    if backend not in BACKEND_PARAMS:
        raise QeffError(f"unknown backend {backend!r}", "use --backend aic or --backend cpu")
    data = _object(data, "the search space")
    fmt = "new" if "search-parameters" in data else "old" if "params" in data else None
    if fmt is None:
        raise QeffError("the search space has no parameters: neither \"params\" nor \"search-parameters\"",
                        "see qeff tune --help for the two formats")
    unknown = sorted(set(data) - _KEYS[fmt])
    if unknown:
        raise QeffError(f"the search space has unknown key {unknown[0]!r}",
                        f"its format takes {', '.join(sorted(_KEYS[fmt]))}")
    params_key, init_key, static_key, evals_key = (
        ("search-parameters", "initial-values", "static-parameters", "max-func-eval") if fmt == "new"
        else ("params", "initial_values", "static_params", "max_func_eval"))

    chosen = objective if objective is not None else data.get("objective")
    if chosen is None:
        raise QeffError("the search space has no objective", "add \"objective\", or pass --objective")
    if not isinstance(chosen, str) or chosen not in OBJECTIVES:
        raise QeffError(f"unknown objective {chosen!r}",
                        "use max-throughput or min-latency (maximize_inf_rate or minimize_latency)")
    mode = data.get("search-mode", "optimized")
    if mode not in _MODES:
        raise QeffError(f"unknown search-mode {mode!r}", "use optimized or exhaustive")
    max_evals = _whole(data.get(evals_key, DEFAULT_MAX_EVALS), evals_key)
    if max_evals < 1:
        raise QeffError(f"{evals_key} must be at least 1, got {max_evals}", "e.g. 200")

    values: dict[str, tuple[int, ...]] = {}
    for raw, bounds in _object(data[params_key], params_key).items():
        name = _name(raw, backend, params_key)
        if name in values:
            raise QeffError(f"{params_key}: {name} is given twice", "keep one of its spellings")
        bounds = _object(bounds, f"{params_key}.{raw}")
        for key in ("min", "max"):
            if key not in bounds:
                raise QeffError(f"{params_key}.{raw} has no {key!r}", "give both min and max")
        extra = sorted(set(bounds) - {"min", "max"})
        if extra:
            raise QeffError(f"{params_key}.{raw} has unknown key {extra[0]!r}", "give only min and max")
        low, high = _whole(bounds["min"], f"{params_key}.{raw}.min"), _whole(bounds["max"], f"{params_key}.{raw}.max")
        if low > high:
            raise QeffError(f"{params_key}.{raw}: min {low} is above max {high}", "swap them")
        _check_value(name, low, total_cores, params_key)
        _check_value(name, high, total_cores, params_key)
        if name == "batch-size":
            if not (_is_power_of_two(low) and _is_power_of_two(high)):
                raise QeffError(f"{params_key}.{raw}: min {low} and max {high} must be powers of two",
                                "e.g. min 1, max 16")
            values[name] = tuple(2**k for k in range(low.bit_length() - 1, high.bit_length()))
        else:
            values[name] = tuple(range(low, high + 1))
    if not values:
        raise QeffError(f"{params_key} is empty", "give at least one parameter to search")
    # The backend's order, so tables and JSON list parameters the same way every time.
    values = {n: values[n] for n in BACKEND_PARAMS[backend] if n in values}

    fixed: dict[str, int | None] = {n: DEFAULTS[n] for n in BACKEND_PARAMS[backend] if n not in values}  # type: ignore[misc]
    for raw, value in _object(data.get(static_key, {}), static_key).items():
        name = _name(raw, backend, static_key)
        if name in values:
            raise QeffError(f"{static_key}: {name} is also searched", f"remove it from {params_key} or {static_key}")
        number = _whole(value, f"{static_key}.{raw}")
        _check_value(name, number, total_cores, static_key)
        if name == "batch-size" and not _is_power_of_two(number):
            raise QeffError(f"{static_key}: batch-size {number} is not a power of two", "e.g. 8")
        fixed[name] = number

    exhaustive = mode == "exhaustive" if exhaustive is None else exhaustive
    initial: list[dict[str, int]] = []
    raw_initial = data.get(init_key)
    if raw_initial is None and not exhaustive:
        raise QeffError(f"the search space has no {init_key}", "give at least one starting point, or use --grid")
    if raw_initial is not None and not isinstance(raw_initial, list):
        raise QeffError(f"{init_key} must be a list of points", "fix the search space file")
    for i, raw_point in enumerate(raw_initial or []):
        where = f"{init_key}[{i}]"
        point: dict[str, int] = {}
        for raw, value in _object(raw_point, where).items():
            name = _name(raw, backend, where)
            if name not in values:
                raise QeffError(f"{where}: {name} is not searched", f"add it to {params_key} or leave it out here")
            number = _whole(value, f"{where}.{raw}")
            if number not in values[name]:
                allowed = values[name]
                raise QeffError(f"{where}: {name} {number} is outside the searched values "
                                f"{allowed[0]}..{allowed[-1]}" + (" (powers of two)" if name == "batch-size" else ""),
                                "start inside the search range")
            point[name] = number
        missing = [n for n in values if n not in point]
        if missing:
            raise QeffError(f"{where} has no value for {', '.join(missing)}", "give every searched parameter")
        initial.append({n: point[n] for n in values})

    space = Space(backend=backend, values=values, fixed=fixed, initial=tuple(initial), objective=OBJECTIVES[chosen],
                  max_evals=max_evals, exhaustive=exhaustive, total_cores=total_cores, source_format=fmt)
    cores = space.cores_name
    for i, point in enumerate(space.initial):
        if not space.feasible(point):
            config = space.config(point)
            raise QeffError(f"{init_key}[{i}]: {cores} {config[cores]} × instances {config['instances']} is more than "
                            f"the {total_cores} cores available", "start from a point that fits, or set --total-cores")
    if exhaustive and next(space.grid(), None) is None:
        raise QeffError(f"no point of the search space fits: {cores} × instances is above the {total_cores} cores "
                        "available everywhere", "lower the minimum cores or instances, or set --total-cores")
    logger.debug("search space (%s format): %s", fmt, space.to_dict())
    return space


def load_space(path: str | os.PathLike, **kwargs: Any) -> Space:
    """Read and check the search space file at ``path`` (see :func:`parse_space`)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise QeffError(f"--space {path} does not exist", "give the search space JSON file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise QeffError(f"--space {path} cannot be read: {getattr(e, 'strerror', None) or e}",
                        "give a UTF-8 JSON file") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise QeffError(f"--space {path} is not JSON: {e.msg} at line {e.lineno}", "fix the file") from None
    return parse_space(data, **kwargs)
