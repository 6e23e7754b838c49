"""Quantize one weight at a time, in chunks, without holding a large model in memory.

A weight stored in an external-data file is read with ``os.pread`` one chunk at a time (whole
blocks only), quantized, and appended to a spill file beside it; the initializer then points
into the spill file. The pages read and written stay in the page cache, not in the process, and
saving the model copies the spill file's ranges inside the kernel (``qeff.passes.model_io``).
An in-memory weight is quantized in memory.
"""

from __future__ import annotations

__all__ = ["WeightError", "Spill", "quantize_tensor"]

import dataclasses
import os
import shutil
import tempfile
import weakref
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx_ir as ir

from qeff.passes.mx import quantize_dequantize

_CHUNK_BYTES = 64 << 20


@dataclasses.dataclass
class WeightError:
    """Quantization error of one weight, accumulated chunk by chunk."""

    signal: float = 0.0  # sum of x^2
    noise: float = 0.0  # sum of (x - q)^2
    max_abs: float = 0.0

    def add(self, original: np.ndarray, quantized: np.ndarray) -> None:
        x = original.astype(np.float64)
        diff = x - quantized
        self.signal += float(np.dot(x.ravel(), x.ravel()))
        self.noise += float(np.dot(diff.ravel(), diff.ravel()))
        self.max_abs = max(self.max_abs, float(np.max(np.abs(diff))) if diff.size else 0.0)

    @property
    def sqnr_db(self) -> float:
        if self.noise == 0:
            return float("inf")
        if self.signal == 0:
            return float("-inf")
        return 10.0 * float(np.log10(self.signal / self.noise))


class Spill:
    """A data file that receives rewritten weights; removed when ``owner`` is garbage-collected."""

    def __init__(self, owner: object, near: Path | None) -> None:
        folder = near if near is not None and os.access(near, os.W_OK) else None
        self.folder = Path(tempfile.mkdtemp(prefix=".qeff-mx-", dir=folder))
        weakref.finalize(owner, shutil.rmtree, self.folder, True)
        self.name = "weights.data"
        self._file = open(self.folder / self.name, "wb")  # noqa: SIM115 - closed in finish()
        weakref.finalize(owner, self._file.close)
        self.offset = 0

    def write(self, array: np.ndarray) -> None:
        self._file.write(memoryview(np.ascontiguousarray(array)).cast("B"))
        self.offset += array.nbytes

    def tensor(self, start: int, like: ir.TensorProtocol) -> ir.ExternalTensor:
        self._file.flush()
        return ir.ExternalTensor(self.name, start, self.offset - start, like.dtype, shape=like.shape,
                                 name=like.name, base_dir=self.folder)


def _chunks(outer: int, length: int, inner: int, block: int) -> list[tuple[int, int, int]]:
    """Contiguous (start element, outer rows, axis rows) pieces of an [outer, length, inner]
    array, each holding whole blocks and about ``_CHUNK_BYTES``."""
    row = length * inner * 4
    if outer > 1 or row <= _CHUNK_BYTES:
        per = max(1, _CHUNK_BYTES // max(row, 1))
        return [(o * length * inner, min(per, outer - o), length) for o in range(0, outer, per)]
    per = max(block, (_CHUNK_BYTES // (inner * 4)) // block * block)
    return [(a * inner, 1, min(per, length - a)) for a in range(0, length, per)]


def quantize_tensor(tensor: ir.TensorProtocol, axis: int, spill: Callable[[], Spill], error: WeightError,
                    advance: Callable[[int], None], **options) -> ir.TensorProtocol:
    """The MX-quantized copy of a float32 ``tensor`` (blocks along ``axis``)."""
    shape = tuple(tensor.shape.numpy())
    axis %= len(shape)
    outer = int(np.prod(shape[:axis], dtype=np.int64))
    inner = int(np.prod(shape[axis + 1:], dtype=np.int64))
    length = shape[axis]
    if not isinstance(tensor, ir.ExternalTensor):
        original = np.ascontiguousarray(tensor.numpy()).reshape(outer, length, inner)
        result = quantize_dequantize(original, axis=1, **options)
        error.add(original, result)
        advance(tensor.nbytes)
        return ir.tensor(result.reshape(shape), name=tensor.name)
    target = spill()
    start = target.offset
    fd = os.open(tensor.path, os.O_RDONLY)
    try:
        for first, rows, span in _chunks(outer, length, inner, options.get("block", 32)):
            count = rows * span * inner
            buffer = np.empty(count, np.float32)
            view = memoryview(buffer).cast("B")
            done = 0
            while done < view.nbytes:  # pread may return less than asked
                got = os.preadv(fd, [view[done:]], (tensor.offset or 0) + first * 4 + done)
                if got == 0:
                    raise OSError(f"external data of {tensor.name!r} ends early in {tensor.path}")
                done += got
            original = buffer.reshape(rows, span, inner)
            result = quantize_dequantize(original, axis=1, **options)
            error.add(original, result)
            target.write(result)
            advance(count * 4)
    finally:
        os.close(fd)
    return target.tensor(start, tensor)
