"""Where each parameter of a model is in its checkpoint, including parameters that transformers
builds from several checkpoint tensors while loading; and reading them in bounded ranges.

``from_pretrained`` does not always copy a checkpoint tensor into the parameter of the same
name. Its conversion mapping (``transformers.conversion_mapping``, applied by
``transformers.core_model_loading``) first renames keys (Mixtral's ``block_sparse_moe`` is the
model's ``mlp``), then may join several tensors into one parameter: Mixtral's per-expert ``w1``
and ``w3`` are each stacked over the experts (``MergeModulelist``) and the two stacks
concatenated along axis 1 (``Concatenate``) into ``experts.gate_up_proj``; the ``w2`` are stacked
into ``experts.down_proj``. :func:`checkpoint_sources` runs that same mapping over the checkpoint's
names, without reading a tensor, and gives each parameter its source: a
:class:`~.safetensors_index.CheckpointTensor`, or a :class:`FusedTensor` describing the join as
the runs of consecutive elements each checkpoint tensor contributes to the parameter (flat order).
Reading a range of a fused parameter reads the parts of the runs that overlap it.

Only those two joins are understood. A parameter transformers builds with another operation
(a transpose, a split, a permutation, dequantisation), or from experts not numbered 0, 1, 2, ...
(transformers stacks whatever it finds in name order, which would then not be expert order),
gets an :class:`Unmapped` source saying why: the export falls back to loading the model rather
than guess. Pieces that cannot be joined (different shapes) are an :class:`~qeff.errors.ExportError`,
as ``from_pretrained`` fails on them too.
"""

from __future__ import annotations

import bisect
import logging
import math
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qeff.errors import ExportError

from .safetensors_index import CheckpointTensor, read_into

logger = logging.getLogger(__name__)

__all__ = ["FusedTensor", "Run", "Source", "SourceMap", "Unmapped", "checkpoint_sources", "open_files",
           "pieces_of", "read_elements"]

_HINT = "the checkpoint is incomplete or damaged, or does not belong to this config.json"
# A join along a late axis splits every piece into short runs; past this many the layout is not
# worth streaming (each run is one read) and loading the model is the better way.
_MAX_RUNS = 1 << 16


@dataclass(frozen=True)
class Run:
    """``count`` consecutive elements of a fused parameter, from element ``start`` on (flat order),
    are elements ``offset ..`` of checkpoint tensor ``tensor``."""

    start: int
    tensor: CheckpointTensor
    offset: int
    count: int


@dataclass(frozen=True)
class FusedTensor:
    """A parameter that is checkpoint tensors stacked and concatenated (see the module docstring):
    ``pieces`` in the order transformers joins them, ``runs`` covering the parameter once, in order."""

    name: str
    shape: tuple[int, ...]
    pieces: tuple[CheckpointTensor, ...]
    runs: tuple[Run, ...]
    _starts: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_starts", tuple(run.start for run in self.runs))

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def runs_in(self, first: int, count: int) -> Iterator[Run]:
        """The parts of the runs covering elements ``first .. first + count``, each with ``start``
        relative to ``first``."""
        yield from _slice_runs(self.runs, self._starts, first, count)


@dataclass(frozen=True)
class Unmapped:
    """A parameter transformers builds in a way this module does not reproduce: ``reason`` says how."""

    name: str
    reason: str


Source = CheckpointTensor | FusedTensor


@dataclass
class SourceMap:
    """Each state-dict name the checkpoint fills, with its source; and the checkpoint's names that
    fill nothing (e.g. a layout transformers converts with a mapping not registered for the model)."""

    by_name: dict[str, Source | Unmapped]
    unused: set[str]
    # Why no name could be mapped at all (transformers' mapping failed), or None.
    failure: str | None = None


def pieces_of(source: Source) -> tuple[CheckpointTensor, ...]:
    return source.pieces if isinstance(source, FusedTensor) else (source,)


# --- reading -------------------------------------------------------------------------------


class _Files:
    """Read-only descriptors of checkpoint files, opened on first use (a fused parameter may
    read from several shards)."""

    def __init__(self) -> None:
        self._descriptors: dict[Path, int] = {}

    def descriptor(self, path: Path) -> int:
        if path not in self._descriptors:
            self._descriptors[path] = os.open(path, os.O_RDONLY)
        return self._descriptors[path]

    def close(self) -> None:
        for fd in self._descriptors.values():
            os.close(fd)
        self._descriptors.clear()


@contextmanager
def open_files() -> Iterator[_Files]:
    files = _Files()
    try:
        yield files
    finally:
        files.close()


def read_elements(files: _Files, source: Source, first: int, count: int, out: np.ndarray | None = None) -> np.ndarray:
    """Elements ``first .. first + count`` of ``source`` (flat order) as float32: into ``out`` (a
    contiguous float32 array of ``count`` elements) when given, else into a new array."""
    if out is None:
        out = np.empty(count, np.float32)
    if isinstance(source, CheckpointTensor):
        read_into(files.descriptor(source.path), source, first, out)
        return out
    for run in source.runs_in(first, count):
        read_into(files.descriptor(run.tensor.path), run.tensor, run.offset, out[run.start:run.start + run.count])
    return out


def _slice_runs(runs: tuple[Run, ...] | list[Run], starts: tuple[int, ...] | list[int], first: int,
                count: int) -> Iterator[Run]:
    end = first + count
    i = max(0, bisect.bisect_right(starts, first) - 1)
    while i < len(runs) and runs[i].start < end:
        run = runs[i]
        lo, hi = max(first, run.start), min(end, run.start + run.count)
        if lo < hi:
            yield Run(lo - first, run.tensor, run.offset + lo - run.start, hi - lo)
        i += 1


# --- joining -------------------------------------------------------------------------------


class _TooFragmented(Exception):
    pass


@dataclass(frozen=True)
class _Part:
    """A checkpoint tensor, or tensors already joined: shape, runs over its flat order, pieces."""

    shape: tuple[int, ...]
    runs: tuple[Run, ...]
    pieces: tuple[CheckpointTensor, ...]

    @classmethod
    def of(cls, tensor: CheckpointTensor) -> _Part:
        return cls(tensor.shape, (Run(0, tensor, 0, tensor.numel),), (tensor,))

    def describe(self) -> str:
        first = self.pieces[0]
        if len(self.pieces) == 1:
            return f"tensor {first.name!r} (shape {list(self.shape)} in {first.path.name})"
        return f"the {len(self.pieces)} tensors from {first.name!r} on (joined shape {list(self.shape)})"


def _axis(dim: int, rank: int) -> int | None:
    axis = dim + rank if dim < 0 else dim
    return axis if 0 <= axis < rank else None


def _join(parts: list[_Part], dim: int, *, stacked: bool, target: str) -> _Part:
    """``torch.stack(parts, dim)`` (``stacked``) or ``torch.cat(parts, dim)``, as runs."""
    first = parts[0]
    # A stacked part is the part with a size-1 axis inserted at ``dim``: both joins are then a
    # concatenation along ``axis``.
    rank = len(first.shape) + (1 if stacked else 0)
    axis = _axis(dim, rank)
    if axis is None:
        raise ExportError(f"transformers joins {first.describe()} into {target!r} along axis {dim}, "
                          "which the pieces do not have", _HINT)
    views = [p.shape[:axis] + (1,) + p.shape[axis:] if stacked else p.shape for p in parts]
    for part, view in zip(parts[1:], views[1:]):
        if len(view) != rank or view[:axis] != views[0][:axis] or view[axis + 1:] != views[0][axis + 1:]:
            raise ExportError(f"{part.describe()} cannot be joined with {first.describe()} into {target!r}", _HINT)
    outer = math.prod(views[0][:axis])
    blocks = [math.prod(view[axis:]) for view in views]
    row = sum(blocks)
    runs: list[Run] = []
    starts = [[run.start for run in part.runs] for part in parts]
    for o in range(outer):
        at = o * row
        for part, part_starts, block in zip(parts, starts, blocks):
            for run in _slice_runs(part.runs, part_starts, o * block, block):
                _append_run(runs, Run(at + run.start, run.tensor, run.offset, run.count))
            at += block
    shape = views[0][:axis] + (sum(view[axis] for view in views),) + views[0][axis + 1:]
    return _Part(shape, tuple(runs), tuple(t for p in parts for t in p.pieces))


def _append_run(runs: list[Run], run: Run) -> None:
    last = runs[-1] if runs else None
    if last is not None and last.tensor is run.tensor and last.offset + last.count == run.offset \
            and last.start + last.count == run.start:
        runs[-1] = Run(last.start, last.tensor, last.offset, last.count + run.count)
        return
    if len(runs) >= _MAX_RUNS:
        raise _TooFragmented
    runs.append(run)


# --- transformers' conversion mapping ------------------------------------------------------


def _conversion_api() -> tuple[Any, Any] | None:
    """transformers' mapping functions, or None where this transformers has none (it then loads
    every tensor under its own name)."""
    try:
        from transformers import core_model_loading
        from transformers.conversion_mapping import get_model_conversion_mapping
    except ImportError:
        return None
    needed = ("WeightConverter", "WeightRenaming", "MergeModulelist", "Concatenate", "rename_source_key",
              "apply_renamings", "dot_natural_key")
    if not all(hasattr(core_model_loading, name) for name in needed):
        return None
    return get_model_conversion_mapping, core_model_loading


def checkpoint_sources(model: Any, checkpoint: dict[str, CheckpointTensor]) -> SourceMap:
    """The source of every state-dict entry of ``model`` (built, on any device) that the
    checkpoint fills, found as ``from_pretrained`` finds it (see the module docstring)."""
    state_dict = model.state_dict()
    api = _conversion_api()
    if api is None:
        logger.debug("this transformers has no weight conversion mapping: checkpoint names are used as they are")
        return SourceMap({n: t for n, t in checkpoint.items() if n in state_dict}, set(checkpoint) - set(state_dict))
    get_mapping, loading = api
    try:
        return _mapped_sources(model, checkpoint, state_dict, get_mapping(model, None, None), loading)
    except (ImportError, AttributeError, TypeError, ValueError, KeyError) as exc:
        # transformers' loading internals are not a stable API: if they changed, say so and let
        # the caller load the model, which uses them the way this transformers means.
        logger.debug("weight conversion mapping failed", exc_info=True)
        return SourceMap({}, set(checkpoint), failure=f"transformers' weight conversion mapping failed ({exc})")


def _mapped_sources(model: Any, checkpoint: dict[str, CheckpointTensor], state_dict: dict[str, Any],
                    transforms: list[Any], loading: Any) -> SourceMap:
    renamings = [t for t in transforms if isinstance(t, loading.WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, loading.WeightConverter)]
    by_pattern = {pattern: converter for converter in converters for pattern in converter.source_patterns}

    plain: dict[str, CheckpointTensor] = {}
    collected: dict[str, dict[str, list[CheckpointTensor]]] = {}
    unused: set[str] = set()
    prefix = model.base_model_prefix
    # Name order decides the order in which transformers stacks tensors (experts 0, 1, 2, ...).
    for key in sorted(checkpoint, key=loading.dot_natural_key):
        target, pattern = loading.rename_source_key(key, renamings, converters, prefix, state_dict)
        if target not in state_dict and key in state_dict:
            # As from_pretrained: a key that is already the model's name is kept.
            target, pattern = loading.rename_source_key(key, [], [], prefix, state_dict)
        if target not in state_dict:
            unused.add(key)
        elif pattern is None:
            plain.setdefault(target, checkpoint[key])  # from_pretrained too keeps the first
        else:
            collected.setdefault(target, {}).setdefault(pattern, []).append(checkpoint[key])

    by_name: dict[str, Source | Unmapped] = dict(plain)
    for target, tensors in collected.items():
        if target in plain:
            by_name[target] = Unmapped(target, "the checkpoint has it both whole and in pieces")
            continue
        converter = by_pattern[next(iter(tensors))]
        by_name[target] = _fused(target, tuple(state_dict[target].shape), converter, tensors, renamings, loading)
    return SourceMap(by_name, unused)


def _fused(target: str, shape: tuple[int, ...], converter: Any, tensors: dict[str, list[CheckpointTensor]],
           renamings: list[Any], loading: Any) -> FusedTensor | Unmapped:
    """The join ``converter`` makes of ``tensors`` (by source pattern, in name order) into the
    parameter ``target`` of ``shape``."""
    joins = (loading.MergeModulelist, loading.Concatenate)
    others = [type(op).__name__ for op in converter.operations if type(op) not in joins]
    if others:
        return Unmapped(target, f"transformers builds it with {', '.join(others)}, which is not streamed")
    if len(converter.target_patterns) != 1 or getattr(converter, "quantization_operation", None) is not None:
        return Unmapped(target, f"transformers builds it with {converter!r}")
    try:
        part = _joined(target, converter, tensors, loading)
    except _TooFragmented:
        return Unmapped(target, f"its pieces are joined in more than {_MAX_RUNS} runs")
    if part is None:
        return Unmapped(target, f"transformers builds it with {converter!r}")
    if part.shape == shape:
        # Pieces that fit can still be in the wrong places: checked once the shape is right, so
        # that a missing piece is reported as the shape error it makes.
        for pattern, group in tensors.items():
            misplaced = _misnumbered(pattern, group, renamings, loading)
            if misplaced is not None:
                return Unmapped(target, f"the pieces matching {pattern!r} are not numbered 0, 1, 2, ... in name "
                                        f"order ({misplaced[0]!r} comes at position {misplaced[1]})")
    return FusedTensor(target, part.shape, part.pieces, part.runs)


def _joined(target: str, converter: Any, tensors: dict[str, list[CheckpointTensor]], loading: Any) -> _Part | None:
    """What the converter's joins make of ``tensors``, as transformers runs them; None if that
    is not one tensor."""
    # Pattern order is the concatenation order (gate before up), whatever order the names sort in.
    state: dict[str, _Part | list[_Part]] = {
        p: [_Part.of(t) for t in tensors[p]] for p in converter.source_patterns if p in tensors
    }
    for op in converter.operations:
        if type(op) is loading.MergeModulelist:
            # A pattern's list is stacked; an already joined part passes through, as in transformers.
            state = {p: _join(v, op.dim, stacked=True, target=target) if isinstance(v, list) else v
                     for p, v in state.items()}
        else:
            parts = [part for v in state.values() for part in (v if isinstance(v, list) else [v])]
            state = {target: _join(parts, op.dim, stacked=False, target=target)}
    results = list(state.values())
    if len(results) != 1 or isinstance(results[0], list):
        return None
    return results[0]


def _misnumbered(pattern: str, group: list[CheckpointTensor], renamings: list[Any],
                 loading: Any) -> tuple[str, int] | None:
    """The first tensor of ``group`` whose number (what the one ``*`` of ``pattern`` stands for)
    is not its position, with that position; None when all are in place. A pattern without ``*``
    numbers nothing; one whose number cannot be found refuses its first tensor."""
    if "*" not in pattern:
        return None
    try:
        # transformers reads a pattern as a regular expression with ``*`` for any text.
        numbered = re.compile(r"(?P<number>\d+)".join(pattern.split("*"))) if pattern.count("*") == 1 else None
    except re.error:
        numbered = None
    for position, tensor in enumerate(group):
        # Patterns match the name after the renamings, as in from_pretrained.
        match = numbered.search(loading.apply_renamings(tensor.name, renamings)) if numbered else None
        if match is None or int(match.group("number")) != position:
            return tensor.name, position
    return None
