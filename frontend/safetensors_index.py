"""Reading the table of contents of a safetensors checkpoint, without reading any weight.

A safetensors file is an 8-byte little-endian header length, a JSON header mapping each tensor
name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to the end of
the header), then the raw little-endian tensor bytes. A sharded checkpoint adds
``model.safetensors.index.json``, whose ``weight_map`` names the shard holding each tensor.

Everything that can be wrong with the files is checked here, before the export starts: a shard
the index names that is missing, a header that does not parse, a tensor whose bytes would run
past the end of its file (a truncated download), a tensor listed twice. Each becomes an
:class:`~qeff.errors.ExportError` naming the file and the tensor.
"""

from __future__ import annotations

import json
import logging
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qeff.errors import ExportError

logger = logging.getLogger(__name__)

__all__ = ["INDEX_NAME", "CheckpointTensor", "read_checkpoint", "read_into"]

INDEX_NAME = "model.safetensors.index.json"

# The dtypes a float checkpoint is stored in, with the numpy dtype of their raw bits. bfloat16
# has no numpy dtype: it is read as uint16 and widened by a shift (see ``read_into``).
_RAW_DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2")}
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
             "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
# A header is a few hundred bytes per tensor; anything this large is not a safetensors header.
_MAX_HEADER = 256 << 20

_HINT = "the checkpoint is incomplete or damaged; download or save it again"


@dataclass(frozen=True)
class CheckpointTensor:
    """Where one tensor's bytes are: ``path`` from byte ``start`` to ``end`` (absolute offsets)."""

    name: str
    path: Path
    dtype: str  # safetensors spelling: F32, F16, BF16, ...
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def is_float(self) -> bool:
        return self.dtype in _RAW_DTYPES


def _read_header(path: Path) -> dict[str, CheckpointTensor]:
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise ExportError(f"{path.name} is too short to be a safetensors file ({size} bytes)", _HINT)
            (length,) = struct.unpack("<Q", prefix)
            if length > _MAX_HEADER or 8 + length > size:
                raise ExportError(f"{path.name} is not a safetensors file or is truncated "
                                  f"(header of {length} bytes, file of {size})", _HINT)
            raw = f.read(length)
    except OSError as exc:
        raise ExportError(f"cannot read {path}: {exc.strerror or exc}", _HINT) from exc
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ExportError(f"{path.name} has an unreadable safetensors header: {exc}", _HINT) from exc
    if not isinstance(header, dict):
        raise ExportError(f"{path.name} has a safetensors header that is not a JSON object", _HINT)
    base = 8 + length
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = str(entry["dtype"])
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ExportError(f"{path.name}: the header entry of {name!r} is malformed", _HINT) from exc
        if any(d < 0 for d in shape) or not 0 <= begin <= end:
            raise ExportError(f"{path.name}: the header entry of {name!r} is malformed", _HINT)
        itemsize = _ITEMSIZE.get(dtype)
        if itemsize is not None and end - begin != math.prod(shape) * itemsize:
            raise ExportError(f"{path.name}: tensor {name!r} has {end - begin} bytes for shape {list(shape)} {dtype}",
                              _HINT)
        if base + end > size:
            raise ExportError(f"{path.name} is truncated: tensor {name!r} needs bytes up to {base + end}, "
                              f"the file has {size}", _HINT)
        tensors[name] = CheckpointTensor(name, path, dtype, shape, base + begin, base + end)
    return tensors


def read_checkpoint(folder: str | os.PathLike[str]) -> dict[str, CheckpointTensor]:
    """Every tensor of the safetensors checkpoint in ``folder``, by name (headers only).

    With an index, exactly the shards it names are read, and each tensor must be in the shard
    the index says; without one, every ``*.safetensors`` file in the folder is.
    """
    folder = Path(folder)
    index_path = folder / INDEX_NAME
    if index_path.is_file():
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
            weight_map = index["weight_map"]
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise TypeError("weight_map is not a mapping of names to files")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ExportError(f"{index_path} is not a readable safetensors index: {exc}", _HINT) from exc
        shards: dict[str, dict[str, CheckpointTensor]] = {}
        for shard in sorted(set(weight_map.values())):
            path = folder / shard
            if Path(shard).name != shard or not path.is_file():
                raise ExportError(f"shard {shard!r} named in {INDEX_NAME} is missing from {folder}", _HINT)
            shards[shard] = _read_header(path)
        tensors = {}
        for name, shard in weight_map.items():
            if name not in shards[shard]:
                raise ExportError(f"tensor {name!r} is not in {shard}, where {INDEX_NAME} says it is", _HINT)
            tensors[name] = shards[shard][name]
        return tensors
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        for name, tensor in _read_header(path).items():
            if name in tensors:
                raise ExportError(f"tensor {name!r} is in both {tensors[name].path.name} and {path.name}",
                                  f"keep one checkpoint per folder, or add {INDEX_NAME}")
            tensors[name] = tensor
    return tensors


def read_into(fd: int, tensor: CheckpointTensor, first: int, out: np.ndarray) -> None:
    """Fill the contiguous float32 array ``out`` with elements ``first`` to ``first + out.size`` of
    ``tensor`` (flat order), read with ``pread`` so that nothing of the file stays mapped into this
    process. A float32 tensor is read straight into ``out``; a narrower one through a buffer of its
    own size, widened in place."""
    raw_dtype = _RAW_DTYPES[tensor.dtype]
    if raw_dtype == out.dtype:  # float32 on a little-endian machine: the bytes are the values
        _pread_exactly(fd, tensor, first, memoryview(out).cast("B"))
        return
    raw = np.empty(out.size, raw_dtype)
    _pread_exactly(fd, tensor, first, memoryview(raw).cast("B"))
    if tensor.dtype == "BF16":
        # bfloat16 is the top half of a float32: shifting the bits up is the exact conversion.
        bits = out.view(np.uint32)
        bits[...] = raw
        bits <<= 16
    else:
        out[...] = raw


def _pread_exactly(fd: int, tensor: CheckpointTensor, first: int, view: memoryview) -> None:
    start = tensor.start + first * _RAW_DTYPES[tensor.dtype].itemsize
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], start + done)
        if got <= 0:
            raise ExportError(f"{tensor.path.name} ended while reading tensor {tensor.name!r}", _HINT)
        done += got

