/* OCP microscaling (MX v1.0) quantize-dequantize of float32 arrays, exact to the bit.
 *
 * The array is viewed as [outer, axis_len, inner] (C order); blocks of `block` elements run
 * along the middle axis, one block per (outer, inner) column, the last one padded with zeros.
 * Per block:
 *   - a NaN or Inf anywhere makes the whole block NaN;
 *   - the shared exponent is s = floor(log2 amax) - emax (+1 for the ocp_plus1 rule), with the
 *     floor read from the bits of amax (subnormals included), clamped to [-127, 127];
 *   - each element v/2^s is rounded onto the element grid (quantum 2^(max(e, emin) - mbits) at
 *     binade e) to nearest, ties to even or away from zero, saturating at the largest finite
 *     element, and multiplied back by 2^s.
 * Everything is integer arithmetic on the IEEE bits except two multiplications by powers of two
 * whose results are representable, so no step rounds: the result does not depend on the FPU's
 * rounding mode or on compiler flags.
 *
 * Python: quantize_dequantize(src, dst, outer, axis_len, inner, block, emax, emin, mbits,
 *                             max_pos, max_neg, nearest, plus1[, with_stats]) -> None | tuple
 * src and dst are C-contiguous float32 buffers of outer*axis_len*inner elements (they may be the
 * same buffer); max_pos/max_neg are the saturation magnitudes of positive and negative elements.
 * With with_stats (src and dst distinct) it returns (sum x^2, sum (x-q)^2, max |x-q|), read back
 * slab by slab while the slab is in cache; for an empty array (any dimension 0, nothing written)
 * that is (0, 0, 0). The GIL is released while the kernel runs.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* The loops below are cloned for AVX2 and picked at load time by an ifunc resolver. That needs
 * GCC's target_clones on x86-64 and a loader with ifunc (glibc); anywhere else (another
 * architecture, clang, musl, or QEFF_NO_TARGET_CLONES defined) they are plain functions built for
 * the baseline target, with the same results: the kernel never depends on the instruction set. */
#define QEFF_CLONES
#if !defined(QEFF_NO_TARGET_CLONES) && defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && \
    defined(__linux__) && defined(__GLIBC__) && defined(__has_attribute)
#if __has_attribute(target_clones)
#undef QEFF_CLONES
#define QEFF_CLONES __attribute__((target_clones("avx2", "default")))
#endif
#endif

typedef struct {
    int emax;       /* exponent of the largest element binade */
    int emin;       /* exponent of the smallest normal element (for int8: 0, one fixed quantum) */
    int mbits;      /* mantissa bits of an element */
    float max_pos;  /* largest positive element */
    float max_neg;  /* largest negative element's magnitude */
    int nearest;    /* 1: ties away from zero; 0: ties to even */
    int plus1;      /* 1: the ocp_plus1 scale rule */
} mx_format;

/* What one block needs, derived from its shared exponent s. */
typedef struct {
    uint32_t nan;      /* all ones: the block held NaN or Inf */
    int32_t c;         /* emin - mbits + s + 150: the rounding shift of an element-subnormal value
                          is c - max(field, 1), where field is the value's fp32 exponent field */
    uint32_t max_pos;  /* bits of max_pos * 2^s and max_neg * 2^s: saturation, unscaled */
    uint32_t max_neg;
} block_params;

static inline uint32_t bits_of(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float float_of(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

/* 2^k as a float for -149 <= k <= 127 (subnormal powers included). */
static inline float pow2(int k) {
    return k >= -126 ? float_of((uint32_t)(k + 127) << 23) : float_of(1u << (k + 149));
}

/* floor(log2 |x|) of a finite nonzero float from its magnitude bits. */
static inline int floor_log2(uint32_t mag) {
    int field = (int)(mag >> 23);
    if (field) return field - 127;
    return (31 - __builtin_clz(mag)) - 149;
}

static block_params params_for(uint32_t amax, const mx_format *f) {
    block_params p;
    p.nan = amax >= 0x7F800000u ? 0xFFFFFFFFu : 0u;
    int s = (amax && !p.nan) ? floor_log2(amax) - f->emax + f->plus1 : -127;
    if (s < -127) s = -127;
    if (s > 127) s = 127;
    /* Saturation: the largest element times 2^s, exact (a power-of-two scaling) unless it is
     * beyond float32 (ocp_plus1 with amax >= 2^127, int8's -128 at s = 127); then the largest
     * element that is not: the top float32 binade with mbits of mantissa. */
    uint32_t top = 0x7F7FFFFFu & ~((1u << (23 - f->mbits)) - 1u);
    p.c = f->emin - f->mbits + s + 150;
    p.max_pos = bits_of(f->max_pos * pow2(s));
    p.max_neg = bits_of(f->max_neg * pow2(s));
    if (p.max_pos >= 0x7F800000u) p.max_pos = top;
    if (p.max_neg >= 0x7F800000u) p.max_neg = top;
    return p;
}

/* 2^k for -126 <= k <= 127, from the bits. */
static inline float pow2_normal(int32_t k) { return float_of((uint32_t)(k + 127) << 23); }

/* One element, in the unscaled domain: scaling by 2^s is exact, so rounding v at quantum
 * 2^(q+s) is rounding v/2^s at 2^q. v = m * 2^e0 with an integer significand m < 2^24; it is
 * rounded to a multiple of 2^shift in integers and rebuilt with exact power-of-two products.
 * No branches, so the compiler can vectorise the loops that call it. */
static inline uint32_t quantize_element(uint32_t u, int32_t c, uint32_t max_pos, uint32_t max_neg, uint32_t nan,
                                        int32_t mbits, uint32_t nearest) {
    uint32_t sign = u & 0x80000000u;
    uint32_t mag = u & 0x7FFFFFFFu;
    int32_t field = (int32_t)(mag >> 23);
    int32_t biased = field > 1 ? field : 1;
    uint32_t m = field ? (mag & 0x7FFFFFu) | 0x800000u : mag;
    int32_t e0 = biased - 150;
    /* floor(log2 m): 23 for normal fp32; for a subnormal, the exponent of m converted to float
     * (exact below 2^24). */
    int32_t top = field ? 23 : (int32_t)(bits_of((float)(int32_t)mag) >> 23) - 127;
    int32_t shift = c - biased;                           /* element-subnormal quantum */
    int32_t normal = top - mbits;                         /* element-normal: mbits kept */
    shift = shift > normal ? shift : normal;
    shift = shift < 0 ? 0 : (shift > 25 ? 25 : shift);   /* 0: on the grid; 25: below half */
    uint32_t rem = m & ((1u << shift) - 1u);
    uint32_t half = (1u << shift) >> 1;
    uint32_t q = m >> shift;
    uint32_t tie_up = nearest | (q & 1u);
    uint32_t up = (uint32_t)(shift > 0) & ((rem > half) | ((rem == half) & tie_up));
    uint32_t rm = (q + up) << shift;                      /* <= 2^24 */
    int32_t low = e0 < -100;                              /* keep both factors normal */
    float value = (float)(int32_t)rm * pow2_normal(low ? e0 + 64 : e0) * pow2_normal(low ? -64 : 0);
    uint32_t rounded = bits_of(value);                    /* exact; 2^128 only above the limit */
    uint32_t limit = sign ? max_neg : max_pos;
    rounded = rounded > limit ? limit : rounded;
    return ((rounded | sign) & ~nan) | (0x7FC00000u & nan);  /* the canonical quiet NaN */
}

/* Blocks along the last axis (inner == 1): each block contiguous, one set of parameters. */
QEFF_CLONES
static void quantize_rows(const uint32_t *src, uint32_t *dst, Py_ssize_t rows, Py_ssize_t length,
                          Py_ssize_t block, const mx_format *f) {
    const int32_t mbits = f->mbits;
    const uint32_t nearest = f->nearest ? 1u : 0u;
    for (Py_ssize_t r = 0; r < rows; r++) {
        for (Py_ssize_t b = 0; b < length; b += block) {
            const uint32_t *s0 = src + r * length + b;
            uint32_t *d0 = dst + r * length + b;
            Py_ssize_t n = length - b < block ? length - b : block;
            uint32_t amax = 0;
            for (Py_ssize_t i = 0; i < n; i++) {
                uint32_t mag = s0[i] & 0x7FFFFFFFu;
                amax = mag > amax ? mag : amax;
            }
            block_params p = params_for(amax, f);
            for (Py_ssize_t i = 0; i < n; i++)
                d0[i] = quantize_element(s0[i], p.c, p.max_pos, p.max_neg, p.nan, mbits, nearest);
        }
    }
}

/* Blocks along a middle axis (inner > 1): a block row of `inner` columns at a time, so memory
 * is read row by row and the element loop runs across contiguous columns. `scratch` holds
 * 5 * inner words: each column's amax and its block parameters, one array per field so the
 * element loop vectorises. */
QEFF_CLONES
static void quantize_columns(const uint32_t *src, uint32_t *dst, Py_ssize_t outer, Py_ssize_t axis_len,
                             Py_ssize_t inner, Py_ssize_t block, const mx_format *f, uint32_t *scratch) {
    const int32_t mbits = f->mbits;
    const uint32_t nearest = f->nearest ? 1u : 0u;
    uint32_t *amax = scratch, *max_pos = scratch + inner, *max_neg = scratch + 2 * inner;
    uint32_t *nan = scratch + 3 * inner;
    int32_t *c = (int32_t *)(scratch + 4 * inner);
    for (Py_ssize_t o = 0; o < outer; o++) {
        for (Py_ssize_t b = 0; b < axis_len; b += block) {
            const uint32_t *s0 = src + (o * axis_len + b) * inner;
            uint32_t *d0 = dst + (o * axis_len + b) * inner;
            Py_ssize_t n = axis_len - b < block ? axis_len - b : block;
            memset(amax, 0, (size_t)inner * sizeof *amax);
            for (Py_ssize_t i = 0; i < n; i++) {
                const uint32_t *row = s0 + i * inner;
                for (Py_ssize_t j = 0; j < inner; j++) {
                    uint32_t mag = row[j] & 0x7FFFFFFFu;
                    amax[j] = mag > amax[j] ? mag : amax[j];
                }
            }
            for (Py_ssize_t j = 0; j < inner; j++) {
                block_params p = params_for(amax[j], f);
                c[j] = p.c, max_pos[j] = p.max_pos, max_neg[j] = p.max_neg, nan[j] = p.nan;
            }
            for (Py_ssize_t i = 0; i < n; i++) {
                const uint32_t *row = s0 + i * inner;
                uint32_t *out = d0 + i * inner;
                for (Py_ssize_t j = 0; j < inner; j++)
                    out[j] = quantize_element(row[j], c[j], max_pos[j], max_neg[j], nan[j], mbits, nearest);
            }
        }
    }
}

/* Quantization error of `quantized` against `original`: (sum x^2, sum (x-q)^2, max |x-q|) in
 * double, added into acc[0..2]. A NaN anywhere makes the noise sum NaN. */
#if defined(__GNUC__) && !defined(__clang__)
/* The sums are statistics, not quantized values: letting GCC reassociate them vectorises the
 * loop (the order of additions, not the quantization, then depends on the build). */
#pragma GCC push_options
#pragma GCC optimize("associative-math", "no-signed-zeros")
#endif
QEFF_CLONES
static void error_stats(const float *x, const float *q, Py_ssize_t n, double *acc) {
    double signal = 0, noise = 0;
    uint32_t worst = 0;  /* bits of the largest |x - q| in float: integer order is value order */
    for (Py_ssize_t i = 0; i < n; i++) {
        double v = x[i], d = v - (double)q[i];
        uint32_t a = bits_of(x[i] - q[i]) & 0x7FFFFFFFu;
        signal += v * v;
        noise += d * d;                                   /* a NaN difference makes it NaN */
        worst = a > worst ? a : worst;
    }
    acc[0] += signal;
    acc[1] += noise;
    acc[2] = float_of(worst) > acc[2] ? float_of(worst) : acc[2];
}
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif

static PyObject *py_quantize_dequantize(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer src, dst;
    Py_ssize_t outer, axis_len, inner, block;
    mx_format f;
    int with_stats = 0;
    if (!PyArg_ParseTuple(args, "y*w*nnnniiiffpp|p", &src, &dst, &outer, &axis_len, &inner, &block,
                          &f.emax, &f.emin, &f.mbits, &f.max_pos, &f.max_neg, &f.nearest, &f.plus1,
                          &with_stats))
        return NULL;
    PyObject *result = NULL;
    Py_ssize_t count = -1; /* outer * axis_len * inner, only once the product is known to fit */
    if (outer < 0 || axis_len < 0 || inner < 0 || block < 1)
        PyErr_SetString(PyExc_ValueError, "dimensions must be >= 0 and block >= 1");
    else if (axis_len && inner && outer > PY_SSIZE_T_MAX / 4 / axis_len / inner)
        PyErr_SetString(PyExc_ValueError, "array too large");
    else
        count = outer * axis_len * inner; /* <= PY_SSIZE_T_MAX / 4, or 0 with a zero factor */
    if (count < 0) {
        /* the error is set */
    } else if (src.len != count * 4 || dst.len != count * 4) {
        PyErr_Format(PyExc_ValueError, "buffers hold %zd and %zd bytes, expected %zd float32 values",
                     src.len, dst.len, count);
    } else if (!PyBuffer_IsContiguous(&src, 'C') || !PyBuffer_IsContiguous(&dst, 'C')) {
        PyErr_SetString(PyExc_ValueError, "buffers must be C-contiguous");
    } else if (f.mbits < 0 || f.mbits > 22 || f.emin < -126 || f.emax > 127) {
        PyErr_SetString(PyExc_ValueError, "element format out of range");
    } else if (count == 0) {
        /* Nothing to quantize. The paths below need inner >= 1: the rows path, taken whenever
         * inner is not above 1, walks outer * axis_len elements, all past the end of an empty
         * buffer when inner is 0. */
        if (with_stats)
            result = Py_BuildValue("ddd", 0.0, 0.0, 0.0);
        else {
            result = Py_None;
            Py_INCREF(result);
        }
    } else {
        uint32_t *scratch = inner > 1 ? malloc((size_t)inner * 5 * sizeof *scratch) : NULL;
        if (inner > 1 && !scratch) {
            PyErr_NoMemory();
        } else {
            double acc[3] = {0, 0, 0};
            Py_BEGIN_ALLOW_THREADS
            /* In slabs, so that with_stats reads each slab back while it is still in cache. */
            const uint32_t *s0 = src.buf;
            uint32_t *d0 = dst.buf;
            if (inner > 1) {
                for (Py_ssize_t o = 0; o < outer; o++)
                    for (Py_ssize_t b = 0; b < axis_len; b += block) {
                        Py_ssize_t n = axis_len - b < block ? axis_len - b : block;
                        Py_ssize_t at = (o * axis_len + b) * inner;
                        quantize_columns(s0 + at, d0 + at, 1, n, inner, block, &f, scratch);
                        if (with_stats) error_stats((const float *)(s0 + at), (const float *)(d0 + at), n * inner, acc);
                    }
            } else {
                Py_ssize_t rows = axis_len ? (1 << 16) / axis_len + 1 : outer;
                for (Py_ssize_t r = 0; r < outer; r += rows) {
                    Py_ssize_t take = outer - r < rows ? outer - r : rows;
                    quantize_rows(s0 + r * axis_len, d0 + r * axis_len, take, axis_len, block, &f);
                    if (with_stats)
                        error_stats((const float *)(s0 + r * axis_len), (const float *)(d0 + r * axis_len),
                                    take * axis_len, acc);
                }
            }
            Py_END_ALLOW_THREADS
            if (with_stats)
                result = Py_BuildValue("ddd", acc[0], acc[1], acc[1] != acc[1] ? Py_NAN : acc[2]);
            else {
                result = Py_None;
                Py_INCREF(result);
            }
        }
        free(scratch);
    }
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    return result;
}

static PyMethodDef methods[] = {

    {"quantize_dequantize", py_quantize_dequantize, METH_VARARGS,
     "quantize_dequantize(src, dst, outer, axis_len, inner, block, emax, emin, mbits, max_pos, "
     "max_neg, nearest, plus1): MX quantize-dequantize float32 src into dst."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernel",
                                    "OCP MX quantize-dequantize kernel (float32).", -1, methods};

PyMODINIT_FUNC PyInit__kernel(void) { return PyModule_Create(&module); }
