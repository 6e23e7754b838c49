"""Quantize one weight at a time, in chunks, without holding a large model in memory.

A weight stored in an external-data file is replaced by a :class:`StreamedQuantizedTensor`: a
lazy tensor that, when the model is saved, reads the weight one chunk at a time (whole blocks
only; see ``_read_chunks``), quantizes it, measures the error and writes each chunk straight to
the output file (``tofile``). A large model is read once and written once, and only a few chunks
are ever in memory. An in-memory weight is quantized in memory.
"""

from __future__ import annotations

__all__ = ["WeightError", "StreamedQuantizedTensor", "quantize_tensor"]

import concurrent.futures
import dataclasses
import mmap
import os
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import onnx_ir as ir

from qeff.passes.mx import block_layout, quantize_with_error

_CHUNK_BYTES = 32 << 20


@dataclasses.dataclass
class WeightError:
    """Quantization error of one weight, accumulated chunk by chunk (sums from the C kernel)."""

    signal: float = 0.0  # sum of x^2
    noise: float = 0.0  # sum of (x - q)^2
    max_abs: float = 0.0

    def add(self, stats: tuple[float, float, float]) -> None:
        signal, noise, max_abs = stats
        self.signal += signal
        self.noise += noise
        self.max_abs = max(self.max_abs, max_abs) if not np.isnan(max_abs) else float("nan")

    @property
    def sqnr_db(self) -> float:
        if self.noise == 0:
            return float("inf")
        if self.signal == 0:
            return float("-inf")
        return 10.0 * float(np.log10(self.signal / self.noise))


def _chunks(outer: int, length: int, inner: int, block: int) -> list[tuple[int, int, int]]:
    """Contiguous (start element, outer rows, axis rows) pieces of an [outer, length, inner]
    array, each holding whole blocks and about ``_CHUNK_BYTES``."""
    row = length * inner * 4
    if outer > 1 or row <= _CHUNK_BYTES:
        per = max(1, _CHUNK_BYTES // max(row, 1))
        return [(o * length * inner, min(per, outer - o), length) for o in range(0, outer, per)]
    per = max(block, (_CHUNK_BYTES // (inner * 4)) // block * block)
    return [(a * inner, 1, min(per, length - a)) for a in range(0, length, per)]


def _read_chunks(source: ir.ExternalTensor, axis: int, block: int) -> Iterator[np.ndarray]:
    """The [rows, span, inner] pieces of an external float32 tensor, read-only.

    Each piece is a fresh ``mmap`` of its byte range with ``MAP_POPULATE``: the page cache is
    mapped, not copied, and unmapped as soon as the caller drops the piece, so only a piece or
    two is ever resident. The next piece is mapped in a background thread while the caller works
    on the current one.
    """
    outer, length, inner = block_layout(tuple(source.shape.numpy()), axis)
    pieces = _chunks(outer, length, inner, block)
    fd = os.open(source.path, os.O_RDONLY)
    flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)

    def read(index: int) -> np.ndarray:
        first, rows, span = pieces[index]
        start = (source.offset or 0) + first * 4
        aligned = start - start % mmap.ALLOCATIONGRANULARITY
        count = rows * span * inner
        if start + count * 4 > os.fstat(fd).st_size:
            raise OSError(f"external data of {source.name!r} ends early in {source.path}")
        mapping = mmap.mmap(fd, start - aligned + count * 4, flags=flags, prot=mmap.PROT_READ, offset=aligned)
        return np.frombuffer(mapping, np.float32, count, start - aligned).reshape(rows, span, inner)

    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as reader:
            ahead = reader.submit(read, 0) if pieces else None
            for index in range(len(pieces)):
                piece = ahead.result()
                ahead = reader.submit(read, index + 1) if index + 1 < len(pieces) else None
                yield piece
                del piece  # unmaps it
    finally:
        os.close(fd)


class StreamedQuantizedTensor(ir.LazyTensor):
    """The MX quantize-dequantize of an external float32 weight, computed when it is read
    (``numpy``, ``tobytes``) or, chunk by chunk, when it is written (``tofile``). Each full
    evaluation measures the quantization error and hands it to ``measured``, so a large model is
    read once: its weights are quantized, measured and written in one pass, at save time."""

    def __init__(self, source: ir.ExternalTensor, axis: int, options: dict[str, Any],
                 measured: Callable[[WeightError], None] | None = None) -> None:
        super().__init__(self._whole, source.dtype, source.shape, name=source.name)
        self.source, self.axis, self.options, self.measured = source, axis, options, measured

    def chunks(self) -> Iterator[np.ndarray]:
        """Quantized pieces; each stays valid until two more have been taken."""
        error = WeightError()
        outputs: list[np.ndarray] = []
        for index, original in enumerate(_read_chunks(self.source, self.axis, self.options.get("block", 32))):
            if len(outputs) < 3:
                outputs.append(np.empty_like(original))
            out = outputs[index % 3]
            if out.size < original.size:
                out = outputs[index % 3] = np.empty_like(original)
            quantized, stats = quantize_with_error(original, axis=1, out=out.reshape(-1)[:original.size]
                                                   .reshape(original.shape), **self.options)
            error.add(stats)
            yield quantized
        if self.measured is not None:
            self.measured(error)

    def _whole(self) -> ir.Tensor:
        pieces = [c.reshape(-1).copy() for c in self.chunks()]
        array = np.concatenate(pieces) if pieces else np.empty(0, np.float32)
        return ir.tensor(array.reshape(tuple(self.shape.numpy())), name=self.name)

    def tofile(self, file: Any) -> None:
        """Write chunk by chunk; each write runs in a thread while the next chunk is quantized."""
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as writer:
            pending = None
            for chunk in self.chunks():
                if pending is not None:
                    pending.result()  # frees the buffer the next chunk goes into
                pending = writer.submit(file.write, memoryview(chunk).cast("B"))
            if pending is not None:
                pending.result()


def quantize_tensor(tensor: ir.TensorProtocol, axis: int,
                    **options: Any) -> tuple[ir.TensorProtocol, WeightError | None]:
    """The MX-quantized version of a float32 ``tensor`` (blocks along ``axis``) and its error.
    An external tensor is not read here: it comes back as a :class:`StreamedQuantizedTensor`,
    and its error (None here) is measured when it is written."""
    if isinstance(tensor, ir.ExternalTensor):
        return StreamedQuantizedTensor(tensor, axis, options), None
    shape = tuple(tensor.shape.numpy())
    original = np.ascontiguousarray(tensor.numpy()).reshape(block_layout(shape, axis))
    result, stats = quantize_with_error(original, axis=1, **options)
    error = WeightError()
    error.add(stats)
    return ir.tensor(result.reshape(shape), name=tensor.name), error
