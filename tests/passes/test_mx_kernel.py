"""The MX kernel against an independent reference: every element grid enumerated from its bit
layout, the block scale from exact rational arithmetic, rounding by choosing the nearest grid
point. Bit-exact comparison, for every format × rounding × scale rule, on edge-case blocks."""

from __future__ import annotations

import bisect
import functools
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from qeff.errors import PassOptionError
from qeff.passes.mx import quantize_dequantize, quantize_dequantize_numpy, quantize_with_error

# (exponent bits, mantissa bits, bias, reserved top codes) of each float element format.
_LAYOUT = {"fp8_e4m3": (4, 3, 7, "e4m3"), "fp8_e5m2": (5, 2, 15, "ieee"), "fp6_e3m2": (3, 2, 3, None),
           "fp6_e2m3": (2, 3, 1, None), "fp4_e2m1": (2, 1, 1, None)}
_FLT_MAX = Fraction(float(np.finfo(np.float32).max))
_EMAX = {"fp8_e4m3": 8, "fp8_e5m2": 15, "fp6_e3m2": 4, "fp6_e2m3": 2, "fp4_e2m1": 2, "int8": 0}


@functools.lru_cache(maxsize=None)
def _grid(fmt: str, int8: str = "symmetric", negative: bool = False) -> list[Fraction]:
    """Every non-negative finite element value in code order (adjacent codes differ in the last bit)."""
    if fmt == "int8":
        top = 128 if (negative and int8 == "full") else 127
        return [Fraction(k, 64) for k in range(top + 1)]
    ebits, mbits, bias, reserved = _LAYOUT[fmt]
    values = []
    for field in range(2 ** ebits):
        for mantissa in range(2 ** mbits):
            if reserved == "ieee" and field == 2 ** ebits - 1:
                continue  # Inf/NaN codes
            if reserved == "e4m3" and field == 2 ** ebits - 1 and mantissa == 2 ** mbits - 1:
                continue  # the NaN code
            if field == 0:
                values.append(Fraction(mantissa, 2 ** mbits) * Fraction(2) ** (1 - bias))
            else:
                values.append((1 + Fraction(mantissa, 2 ** mbits)) * Fraction(2) ** (field - bias))
    return values


def _floor_log2(x: Fraction) -> int:
    e = x.numerator.bit_length() - x.denominator.bit_length()
    while Fraction(2) ** e > x:
        e -= 1
    while Fraction(2) ** (e + 1) <= x:
        e += 1
    return e


def _round_onto(grid: list[Fraction], a: Fraction, nearest: bool) -> Fraction:
    if a >= grid[-1]:
        return grid[-1]  # saturate
    i = bisect.bisect_right(grid, a) - 1
    low, high = grid[i], grid[i + 1]
    if a - low != high - a:
        return low if a - low < high - a else high
    if nearest:
        return high  # ties away from zero
    return low if i % 2 == 0 else high  # ties to the even code


def reference(values: np.ndarray, fmt: str, block: int, rounding: str, scale: str, int8: str) -> np.ndarray:
    """MX quantize-dequantize of a 1-D float32 array, blocks along it, in exact arithmetic."""
    out = np.empty_like(values)
    for start in range(0, len(values), block):
        chunk = values[start:start + block]
        if not np.isfinite(chunk).all():
            out[start:start + block] = np.nan
            continue
        amax = max(abs(Fraction(float(v))) for v in chunk)
        s = -127 if amax == 0 else _floor_log2(amax) - _EMAX[fmt] + (scale == "ocp_plus1")
        s = min(max(s, -127), 127)
        # Saturation at the largest element whose value stays within float32.
        grids = {sign: [g for g in _grid(fmt, int8, sign) if g * Fraction(2) ** s <= _FLT_MAX] for sign in (False, True)}
        for i, v in enumerate(chunk):
            a = abs(Fraction(float(v))) / Fraction(2) ** s
            negative = bool(np.signbit(v))
            r = _round_onto(grids[negative], a, rounding == "nearest") * Fraction(2) ** s
            as_float = np.float32(float(r))
            assert Fraction(float(as_float)) == r, "the result must be representable"
            out[start + i] = -as_float if negative else as_float
    return out


def _ulps_below(x: float, n: int) -> np.float32:
    v = np.float32(x)
    for _ in range(n):
        v = np.nextafter(v, np.float32(0))
    return v


def edge_cases(fmt: str) -> np.ndarray:
    """Blocks of 32 (and a trailing partial block) that exercise each rule."""
    rng = np.random.default_rng(7)
    top = float(_grid(fmt)[-1])
    blocks = []
    example = np.zeros(32, np.float32)
    example[:8] = [2 ** -6, 2 ** -5, 2 ** -4, 2 ** -3, 0.25, 0.5, 1, 8]
    blocks.append(example)
    grid = [float(g) for g in _grid(fmt)]
    midpoints = [(a + b) / 2 for a, b in zip(grid, grid[1:])]
    for i in range(0, len(midpoints), 31):  # the block max fixes the scale at 2^0 (ocp)
        part = midpoints[i:i + 31]
        signs = np.where(np.arange(len(part)) % 2, -1, 1)
        blocks.append(np.array([top] + list(part * signs) + [0] * (31 - len(part)), np.float32))
    above = [np.nextafter(np.float32(top), np.float32(np.inf)), top * 1.01, -top * 1.02, top * 1.06]
    blocks.append(np.array(above + [top / 3] * 28, np.float32))  # saturation just above max_norm
    blocks.append(np.array([1e-40, -3e-42, 2 ** -149, 1e-45, -1.2e-38, 0.0, 7e-39] * 4 + [5e-41] * 4, np.float32))
    blocks.append(np.concatenate([rng.standard_normal(16) * 1e-30, [1e-41] * 16]).astype(np.float32))
    for k, counts in ((0, range(1, 45)), (3, (1, 2, 44)), (-5, range(1, 45)), (60, (1, 7, 44)), (-100, (1, 3, 44))):
        for n in counts:
            peak = _ulps_below(2.0 ** k, n)
            row = (rng.standard_normal(32) * float(peak) / 4).astype(np.float32)
            row[n % 32] = -peak if n % 2 else peak
            blocks.append(np.clip(row, -peak, peak).astype(np.float32))
    blocks.append(np.zeros(32, np.float32))
    blocks.append(np.full(32, -0.0, np.float32))
    for bad in (np.nan, np.inf, -np.inf):
        row = rng.standard_normal(32).astype(np.float32)
        row[5] = bad
        blocks.append(row)
    flt_max = np.finfo(np.float32).max
    blocks.append(np.array([flt_max, -flt_max, flt_max / 2, 1.0] * 8, np.float32))
    blocks.append(np.array([-flt_max, flt_max * 0.75, -1e30, 3.0] * 8, np.float32))
    for _ in range(4):
        blocks.append((rng.standard_normal(32) * 10.0 ** rng.integers(-6, 6)).astype(np.float32))
    tail = (rng.standard_normal(7) * 3).astype(np.float32)
    return np.concatenate(blocks + [tail])


FLOAT_CASES = [(f, r, s) for f in _EMAX for r in ("even", "nearest") for s in ("ocp", "ocp_plus1")]


@pytest.mark.parametrize("fmt,rounding,scale", FLOAT_CASES)
def test_kernel_is_bit_exact_along_the_last_axis(fmt, rounding, scale):
    x = edge_cases(fmt)
    want = reference(x, fmt, 32, rounding, scale, "symmetric")
    got = quantize_dequantize(x, fmt, rounding=rounding, scale=scale)
    _assert_bits_equal(got, want)
    _assert_bits_equal(quantize_dequantize_numpy(x, fmt, rounding=rounding, scale=scale), want)


@pytest.mark.parametrize("fmt,rounding,scale", FLOAT_CASES[::3])
def test_blocks_along_axis_zero_and_a_middle_axis(fmt, rounding, scale):
    """Blocks along axis 0 of a [K, N] MatMul weight, and along axis 1 of a 3-D array, equal the
    reference run on each column."""
    x = edge_cases(fmt)
    k = len(x) - len(x) % 32 + 5  # a trailing partial block in every column
    columns = np.stack([np.roll(x, 3 * j)[:k] for j in range(3)], axis=1)  # [K, 3]
    got = quantize_dequantize(columns, fmt, axis=0, rounding=rounding, scale=scale)
    for j in range(3):
        _assert_bits_equal(got[:, j], reference(columns[:, j].copy(), fmt, 32, rounding, scale, "symmetric"))
    cube = np.stack([columns, -columns], axis=0)  # [2, K, 3], blocks along axis 1
    got3 = quantize_dequantize(cube, fmt, axis=1, rounding=rounding, scale=scale)
    _assert_bits_equal(got3[0], got)
    _assert_bits_equal(got3[1], quantize_dequantize(-columns, fmt, axis=0, rounding=rounding, scale=scale))
    _assert_bits_equal(quantize_dequantize_numpy(cube, fmt, axis=1, rounding=rounding, scale=scale), got3)


@pytest.mark.parametrize("rounding", ["even", "nearest"])
def test_int8_full_range_adds_code_minus_128(rounding):
    x = edge_cases("int8")
    want = reference(x, "int8", 32, rounding, "ocp", "full")
    _assert_bits_equal(quantize_dequantize(x, "int8", rounding=rounding, int8="full"), want)
    block = np.array([1.0, -1.995, 1.5], np.float32)  # amax in [1, 2): scale 1, codes of 1/64
    assert quantize_dequantize(block, "int8", int8="full")[1] == -2.0
    assert quantize_dequantize(block, "int8")[1] == np.float32(-127 / 64)


def test_worked_example_sums():
    """[2^-6 … 1, 8] zero-padded to 32, fp6_e2m3, ties to even: the OCP scale 2^1 flushes the
    four smallest elements (2^-4/2 = 0.03125 is a tie to 0); the +1 rule's 2^2 also 0.25."""
    x = np.zeros(32, np.float32)
    x[:8] = [2 ** -6, 2 ** -5, 2 ** -4, 2 ** -3, 0.25, 0.5, 1, 8]
    assert float(quantize_dequantize(x, "fp6_e2m3").astype(np.float64) @ np.ones(32)) == 9.75
    assert float(quantize_dequantize(x, "fp6_e2m3", scale="ocp_plus1").astype(np.float64) @ np.ones(32)) == 9.5


@pytest.mark.parametrize("fmt,values,even,nearest", [
    # fp4_e2m1 grid 0, .5, 1, 1.5, 2, 3, 4, 6: 5 is a tie of 4 (even code) and 6; 2.5 of 2 and 3.
    ("fp4_e2m1", [6, 5, 2.5, 0.25, 0.75, -5], [6, 4, 2, 0, 1, -4], [6, 6, 3, 0.5, 1, -6]),
    # int8, block max 1 (scale 2^0): 32.5/64 is a tie of codes 32 and 33.
    ("int8", [1.0, 32.5 / 64, -0.5 / 64], [1.0, 0.5, -0.0], [1.0, 33 / 64, -1 / 64]),
    # fp8_e4m3: 480 is above max_norm 448 in the same binade: saturates; 9 is between 8 and 9.
    ("fp8_e4m3", [480, 9, -17], [448, 9, -16], [448, 9, -18]),
])
def test_hand_derived_values(fmt, values, even, nearest):
    x = np.array(values, np.float32)
    np.testing.assert_array_equal(quantize_dequantize(x, fmt), np.array(even, np.float32))
    np.testing.assert_array_equal(quantize_dequantize(x, fmt, rounding="nearest"), np.array(nearest, np.float32))


def test_idempotent_and_in_place():
    x = np.random.default_rng(0).standard_normal((64, 96)).astype(np.float32)
    once = quantize_dequantize(x, "fp6_e2m3", axis=0)
    _assert_bits_equal(quantize_dequantize(once, "fp6_e2m3", axis=0), once)
    quantize_dequantize(x, "fp6_e2m3", axis=0, out=x)
    _assert_bits_equal(x, once)


@pytest.mark.parametrize("call,error,message", [
    (lambda: quantize_dequantize(np.ones(4, np.float64), "int8"), TypeError, "float32"),
    (lambda: quantize_dequantize(np.ones(4, np.float32), "fp6_e2m2"), PassOptionError, "fp6_e2m3"),
    (lambda: quantize_dequantize(np.ones(4, np.float32), rounding="up"), PassOptionError, "rounding"),
    (lambda: quantize_dequantize(np.ones(4, np.float32), scale="max"), PassOptionError, "scale"),
    (lambda: quantize_dequantize(np.ones(4, np.float32), axis=2), ValueError, "axis 2"),
    (lambda: quantize_dequantize(np.ones(4, np.float32), block=0), ValueError, "block"),
    (lambda: quantize_dequantize(np.array(1.0, np.float32), "int8"), ValueError, "axis"),
    (lambda: quantize_dequantize(np.ones(4, np.float32), out=np.ones(3, np.float32)), ValueError, "out"),
])
def test_clear_errors(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_kernel_refuses_inconsistent_buffers():
    """The extension itself checks sizes, so a wrong call raises instead of reading out of bounds."""
    from qeff.passes.mx import _kernel

    x = np.ones(8, np.float32)
    with pytest.raises(ValueError, match="bytes"):
        _kernel.quantize_dequantize(x, np.empty(4, np.float32), 1, 8, 1, 32, 2, 0, 3, 7.5, 7.5, False, False)
    with pytest.raises(ValueError, match="block"):
        _kernel.quantize_dequantize(x, np.empty(8, np.float32), 1, 8, 1, 0, 2, 0, 3, 7.5, 7.5, False, False)
    with pytest.raises(TypeError):
        _kernel.quantize_dequantize(x, x.tobytes(), 1, 8, 1, 32, 2, 0, 3, 7.5, 7.5, False, False)  # read-only


# Every place a zero can sit in the kernel's [outer, axis_len, inner] view: (shape, axis).
ZERO_SIZE_CASES = [((0, 64, 5), 1), ((4, 0, 5), 1), ((4, 64, 0), 1), ((0,), 0), ((0, 7), 0), ((7, 0), 0),
                   ((0, 7), -1), ((7, 0), -1), ((3, 0, 0), 0), ((0, 3, 2), -1), ((3, 2, 0), -1)]

# The calls of ZERO_SIZE_CASES in a child, since before they were handled an inner extent of 0
# sent the kernel down the rows path over outer * axis_len elements of an empty buffer. The
# extension is also called directly, so that it is the kernel that is checked, not the wrapper.
ZERO_SIZE_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    from qeff.passes.mx import _kernel, quantize_dequantize, quantize_with_error

    for shape, axis in %r:
        x = np.zeros(shape, np.float32)
        q = quantize_dequantize(x, "fp6_e2m3", axis=axis)
        out, stats = quantize_with_error(x, "fp8_e4m3", axis=axis, block=16)
        print(shape, axis, q.shape, out.shape, stats)
    for outer, length, inner in ((4096, 64, 0), (4096, 0, 0), (0, 64, 4096), (4096, 0, 1)):
        empty = np.zeros(0, np.float32)
        for stats in (False, True):
            got = _kernel.quantize_dequantize(empty, np.zeros(0, np.float32), outer, length, inner, 32,
                                              2, 0, 3, 7.5, 7.5, False, False, stats)
            print("kernel", outer, length, inner, got)
""")


def test_zero_size_inputs_do_not_crash_the_kernel():
    try:
        result = subprocess.run([sys.executable, "-c", ZERO_SIZE_SCRIPT % (ZERO_SIZE_CASES,)], capture_output=True,
                                text=True, timeout=60)
    except subprocess.TimeoutExpired as e:  # a corrupted heap can hang the child as well as kill it
        pytest.fail(f"the child hung:\n{e.stdout.decode() if e.stdout else ''}")
    assert result.returncode == 0, f"exit status {result.returncode}:\n{result.stdout}{result.stderr}"
    want = [f"{shape} {axis} {shape} {shape} (0.0, 0.0, 0.0)" for shape, axis in ZERO_SIZE_CASES]
    for dims in ("4096 64 0", "4096 0 0", "0 64 4096", "4096 0 1"):
        want += [f"kernel {dims} None", f"kernel {dims} (0.0, 0.0, 0.0)"]
    assert result.stdout.splitlines() == want


@pytest.mark.parametrize("shape,axis", ZERO_SIZE_CASES)
def test_zero_size_arrays_give_empty_results(shape, axis):
    x = np.zeros(shape, np.float32)
    for fmt in ("fp4_e2m1", "int8"):
        got = quantize_dequantize(x, fmt, axis=axis)
        assert got.shape == shape and got.dtype == np.float32
        out = np.empty(shape, np.float32)
        assert quantize_dequantize(x, fmt, axis=axis, out=out) is out
        q, stats = quantize_with_error(x, fmt, axis=axis)
        assert q.shape == shape and stats == (0.0, 0.0, 0.0)


def test_kernel_rejects_dimensions_whose_product_overflows():
    from qeff.passes.mx import _kernel

    empty = np.zeros(0, np.float32)
    big = 2 ** 40
    for outer, length, inner in ((big, big, 1), (1, big, big), (big, 1, big), (2 ** 62, 1, 1)):
        with pytest.raises(ValueError, match="too large"):
            _kernel.quantize_dequantize(empty, empty.copy(), outer, length, inner, 32, 2, 0, 3, 7.5, 7.5, False, False)


def _compile_kernel(compiler: str, folder: Path, *defines: str) -> bytes:
    paths = sysconfig.get_paths()
    source = Path(__file__).resolve().parents[2] / "passes" / "mx" / "_kernel.c"
    obj = folder / f"kernel{len(defines)}.o"
    command = [compiler, "-c", "-fPIC", "-O3", "-std=c11", "-fno-trapping-math", "-Wall", "-Werror", *defines,
               f"-I{paths['include']}", f"-I{paths['platinclude']}", "-o", str(obj), str(source)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stderr}"
    return obj.read_bytes()


def test_kernel_builds_without_target_clones(tmp_path):
    """Where the compiler or the target cannot dispatch on the CPU (no target_clones, no ifunc),
    the kernel is plain C: QEFF_NO_TARGET_CLONES forces that path here."""
    compiler = next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), None)
    if compiler is None:
        pytest.skip("no C compiler")
    if not Path(sysconfig.get_paths()["include"], "Python.h").is_file():
        pytest.skip("no Python headers")
    plain = _compile_kernel(compiler, tmp_path, "-DQEFF_NO_TARGET_CLONES")
    assert b"avx2" not in plain  # no clone, no resolver: nothing that needs the CPU to have AVX2
    default = _compile_kernel(compiler, tmp_path)
    macros = subprocess.run([compiler, "-dM", "-E", "-x", "c", "/dev/null"], capture_output=True, text=True).stdout
    if "__x86_64__" in macros and "__clang__" not in macros and "__linux__" in macros:
        assert b"avx2" in default  # the clones are still there where they can be


def _assert_bits_equal(got: np.ndarray, want: np.ndarray) -> None:
    got, want = np.ascontiguousarray(got), np.ascontiguousarray(want)
    nan = np.isnan(want)
    assert (np.isnan(got) == nan).all(), "NaN blocks differ"
    g, w = got[~nan].view(np.uint32), want[~nan].view(np.uint32)
    bad = np.flatnonzero(g != w)
    assert bad.size == 0, f"{bad.size} elements differ, first: got {got[~nan][bad[0]]!r} want {want[~nan][bad[0]]!r}"
