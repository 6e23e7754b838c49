"""MX quantize-dequantize in plain NumPy: the same result as the C kernel, bit for bit.

It is the baseline ``bench/bench_mx.py`` measures the kernel against, and a readable statement
of the arithmetic. The per-element work runs in float64, where every intermediate here is exact.
"""

from __future__ import annotations

__all__ = ["quantize_dequantize_numpy"]

import numpy as np

from qeff.passes.mx.formats import ElementFormat, element_format


def quantize_dequantize_numpy(array: np.ndarray, fmt: str | ElementFormat = "fp6_e2m3", *, axis: int = -1,
                              block: int = 32, rounding: str = "even", scale: str = "ocp",
                              int8: str = "symmetric") -> np.ndarray:
    from qeff.passes.mx import check_array, resolve_options

    axis = check_array(array, axis)
    fmt = resolve_options(fmt if isinstance(fmt, ElementFormat) else element_format(fmt), block, rounding, scale, int8)
    x = np.moveaxis(array, axis, -1)
    length = x.shape[-1]
    padded = -(-length // block) * block
    if padded != length:
        x = np.concatenate([x, np.zeros((*x.shape[:-1], padded - length), np.float32)], axis=-1)
    blocks = x.reshape(*x.shape[:-1], padded // block, block)

    magnitude_bits = blocks.view(np.uint32) & np.uint32(0x7FFFFFFF)
    amax_bits = magnitude_bits.max(axis=-1, keepdims=True)
    nonfinite = amax_bits >= 0x7F800000
    amax = np.where(nonfinite, 0, amax_bits).view(np.float32).astype(np.float64)
    _, exponent = np.frexp(amax)  # amax = m * 2^exponent, m in [0.5, 1): exact, subnormals included
    shared = exponent.astype(np.int64) - 1 - fmt.emax + (scale == "ocp_plus1")
    shared = np.where(amax > 0, np.clip(shared, -127, 127), -127)

    scaled = np.ldexp(np.abs(blocks.astype(np.float64)), -shared)
    _, binade = np.frexp(scaled)
    quantum = np.maximum(binade.astype(np.int64) - 1, fmt.emin) - fmt.mbits
    steps = np.ldexp(scaled, -quantum)
    steps = np.rint(steps) if rounding == "even" else np.floor(steps + 0.5)
    elements = np.ldexp(steps, quantum)

    # Saturation at the largest element, or, where that times 2^shared is beyond float32, at
    # the largest element that is not (the top float32 binade with mbits of mantissa).
    negative = np.signbit(blocks)
    top = float(np.array(0x7F7FFFFF & ~((1 << (23 - fmt.mbits)) - 1), np.uint32).view(np.float32))
    limits = [np.ldexp(np.float64(m), shared) for m in (fmt.max_norm, fmt.max_negative(int8))]
    limits = [np.where(limit > np.finfo(np.float32).max, top, limit) for limit in limits]
    result = np.minimum(np.ldexp(elements, shared), np.where(negative, limits[1], limits[0])).astype(np.float32)
    result = np.where(negative, -result, result)
    result = np.where(nonfinite, np.float32(np.nan), result)
    result = result.reshape(*x.shape[:-1], padded)[..., :length]
    return np.ascontiguousarray(np.moveaxis(result, -1, axis))
