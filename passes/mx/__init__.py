"""OCP microscaling (MX) quantize-dequantize: ``quantize_dequantize(array, fmt, axis=…)``.

The work is done by a C kernel (``_kernel.c``, built with the package) that reads the buffer in
place: no torch, no copy of a C-contiguous float32 input. Semantics: DESIGN §3.4 and the
kernel's header. ``quantize_dequantize_numpy`` is the same computation in plain NumPy, kept as
the baseline ``bench/bench_mx.py`` measures the kernel against.
"""

from __future__ import annotations

__all__ = ["quantize_dequantize", "quantize_with_error", "quantize_dequantize_numpy", "FORMATS", "element_format"]

import importlib
from typing import Any

import numpy as np

from qeff.errors import QeffError
from qeff.passes.mx.formats import (
    FORMATS,
    INT8_RANGES,
    ROUNDINGS,
    SCALE_RULES,
    ElementFormat,
    check_choice,
    element_format,
)
from qeff.passes.mx.numpy_impl import quantize_dequantize_numpy


def _load_kernel():
    try:
        return importlib.import_module("qeff.passes.mx._kernel")
    except ImportError as e:  # pragma: no cover - the package build compiles it
        raise QeffError(f"the MX kernel is not built ({e})",
                        "reinstall the package with a C compiler present: pip install -e .") from None


def block_layout(shape: tuple[int, ...], axis: int) -> tuple[int, int, int]:
    """(outer, axis_len, inner): the array viewed as [outer, axis_len, inner] around ``axis``,
    the shape the kernel works on."""
    axis %= len(shape)
    return (int(np.prod(shape[:axis], dtype=np.int64)), shape[axis],
            int(np.prod(shape[axis + 1:], dtype=np.int64)))


def check_array(array: np.ndarray, axis: int) -> int:
    """The normalised axis; a clear error for what the kernel does not take."""
    if not isinstance(array, np.ndarray):
        raise TypeError(f"expected a numpy array, got {type(array).__name__}")
    if array.dtype != np.float32:
        raise TypeError(f"MX quantization takes float32 arrays, got {array.dtype}; "
                        "convert with array.astype(np.float32)")
    if array.ndim == 0:
        raise ValueError("MX quantization needs at least one axis to block along")
    if not -array.ndim <= axis < array.ndim:
        raise ValueError(f"axis {axis} is out of range for an array of {array.ndim} dimensions")
    return axis % array.ndim


def resolve_options(fmt: str | ElementFormat, block: int, rounding: str, scale: str,
                    int8: str) -> ElementFormat:
    fmt = fmt if isinstance(fmt, ElementFormat) else element_format(fmt)
    check_choice("rounding", rounding, ROUNDINGS)
    check_choice("scale rule", scale, SCALE_RULES)
    check_choice("int8 range", int8, INT8_RANGES)
    if block < 1:
        raise ValueError(f"block must be at least 1, got {block}")
    return fmt


def quantize_dequantize(array: np.ndarray, fmt: str | ElementFormat = "fp6_e2m3", *, axis: int = -1,
                        block: int = 32, rounding: str = "even", scale: str = "ocp", int8: str = "symmetric",
                        out: np.ndarray | None = None) -> np.ndarray:
    """The float32 values ``array`` takes after MX quantization to ``fmt`` with blocks of
    ``block`` elements along ``axis``. ``out`` (float32, same shape, C-contiguous; may be
    ``array`` itself) receives the result when given."""
    out, _ = _run(array, fmt, axis, block, rounding, scale, int8, out, stats=False)
    return out


def quantize_with_error(array: np.ndarray, fmt: str | ElementFormat = "fp6_e2m3", *, axis: int = -1,
                        block: int = 32, rounding: str = "even", scale: str = "ocp", int8: str = "symmetric",
                        out: np.ndarray | None = None) -> tuple[np.ndarray, tuple[float, float, float]]:
    """:func:`quantize_dequantize` and its error in one pass over memory: (result, (sum x²,
    sum (x − q)², max |x − q|)), in double. ``out`` must not be ``array``."""
    if out is not None and np.shares_memory(out, array):
        raise ValueError("quantize_with_error needs out separate from the input")
    out, stats = _run(array, fmt, axis, block, rounding, scale, int8, out, stats=True)
    return out, stats


def _run(array: np.ndarray, fmt: str | ElementFormat, axis: int, block: int, rounding: str, scale: str,
         int8: str, out: np.ndarray | None, stats: bool) -> tuple[np.ndarray, Any]:
    axis = check_array(array, axis)
    fmt = resolve_options(fmt, block, rounding, scale, int8)
    source = np.ascontiguousarray(array)
    if out is None:
        out = np.empty_like(source)
    elif out.shape != array.shape or out.dtype != np.float32 or not out.flags.c_contiguous or not out.flags.writeable:
        raise ValueError("out must be a writable C-contiguous float32 array of the input's shape")
    outer, length, inner = block_layout(source.shape, axis)
    result = _load_kernel().quantize_dequantize(
        source, out, outer, length, inner, block, fmt.emax, fmt.emin, fmt.mbits,
        fmt.max_norm, fmt.max_negative(int8), rounding == "nearest", scale == "ocp_plus1", stats,
    )
    return out, result
