/* sparsecraft CPU kernels: what every path shares (dtypes, the job description, conversions, output stores).
 * Plain C with no intrinsics, so that tests/native/ can compile the vector kernels against an emulation too. */
#ifndef SC_KERNELS_COMMON_H
#define SC_KERNELS_COMMON_H
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* software prefetch distances (bytes ahead of the value cursor / the current mask word) */
#ifndef SC_PF_VALUES
#define SC_PF_VALUES 4096
#endif
#ifndef SC_PF_ROW /* the AVX-512 one-row GEMV kernels: values only */
#define SC_PF_ROW 1024
#endif
#ifndef SC_PF_MASK
#define SC_PF_MASK 1024
#endif

enum { DT_F32 = 0, DT_BF16 = 1, DT_F16 = 2, DT_I8 = 3 }; /* DT_I8: stored weight values only (wtype) */
enum { TM = 6 }; /* x rows per GEMM tile (the x buffer is padded to a multiple of TM rows when M > 1) */
enum { FMT_DENSE = 0, FMT_BITMASK = 1 };
/* AVX512: every AVX-512 kernel the CPU has; AVX512W: the VBMI2 kernels but not the BF16/VNNI dot-product ones;
 * AVX512F: AVX-512F kernels only */
enum { PATH_AUTO = 0, PATH_SCALAR = 1, PATH_AVX2 = 2, PATH_AVX512 = 3, PATH_AVX512F = 4, PATH_AVX512W = 5 };

typedef struct {
    int dtype;              /* activations, bias and outputs: DT_F32, DT_BF16 or DT_F16 */
    int wtype;              /* the stored weight values: dtype, or DT_I8 (bitmask only, with per-row scales) */
    int format;
    int64_t N, K, M, words;
    const float *xf;        /* x as float32, rows padded to words*64 columns (and to TM rows when M > 1) */
    const uint64_t *mask;   /* bitmask: [N, words] */
    const int64_t *rowptr;  /* bitmask: [N + 1] */
    const void *w;          /* bitmask: packed values; dense: [N, wstride]; in wtype */
    int64_t wstride;
    const float *scale;     /* wtype DT_I8: [N] float32, y[m, r] = scale[r] * (x_m . q_r) + bias[r]; else NULL */
    const void *bias;       /* [N] in dtype, or NULL */
    void *y;                /* [M, ystride] in dtype */
    int64_t ystride;
} Job;

/* ------------------------------------------------------------------ conversions */
static inline float bits_f32(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline uint32_t f32_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

static inline float to_f32_f32(float v) { return v; }
static inline float to_f32_i8(int8_t v) { return (float)v; }
static inline float to_f32_bf16(uint16_t v) { return bits_f32((uint32_t)v << 16); }
static inline float to_f32_f16(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    if (e == 0) {
        float f = (float)m * (1.0f / 16777216.0f); /* subnormal (or zero): m * 2^-24 */
        return bits_f32(f32_bits(f) | sign);
    }
    if (e == 31) return bits_f32(sign | 0x7f800000u | (m << 13));
    return bits_f32(sign | ((e + 112u) << 23) | (m << 13));
}
static inline uint16_t from_f32_bf16(float f) { /* round to nearest even, as torch does */
    uint32_t u = f32_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}
static inline uint16_t from_f32_f16(float f) { /* round to nearest even */
    uint32_t u = f32_bits(f), sign = u & 0x80000000u;
    uint16_t o;
    u ^= sign;
    if (u >= 0x47800000u) {
        o = u > 0x7f800000u ? 0x7e00 : 0x7c00;
    } else if (u < 0x38800000u) {
        float t = bits_f32(u) + 0.5f;
        o = (uint16_t)(f32_bits(t) - 0x3f000000u);
    } else {
        uint32_t odd = (u >> 13) & 1u;
        u += 0xc8000fffu + odd;
        o = (uint16_t)(u >> 13);
    }
    return (uint16_t)(o | (sign >> 16));
}

static inline float load_f32(int dtype, const void *p, int64_t i) {
    if (dtype == DT_F32) return ((const float *)p)[i];
    if (dtype == DT_I8) return (float)((const int8_t *)p)[i];
    if (dtype == DT_BF16) return to_f32_bf16(((const uint16_t *)p)[i]);
    return to_f32_f16(((const uint16_t *)p)[i]);
}

/* y[m, r] = (scale[r] *) v (+ bias[r]), rounded to dtype: the row scale of int8 values multiplies the row's
 * float32 dot product once */
static inline void store_out(const Job *j, int64_t m, int64_t r, float v) {
    if (j->scale) v *= j->scale[r];
    if (j->bias) v += load_f32(j->dtype, j->bias, r);
    int64_t i = m * j->ystride + r;
    if (j->dtype == DT_F32) ((float *)j->y)[i] = v;
    else if (j->dtype == DT_BF16) ((uint16_t *)j->y)[i] = from_f32_bf16(v);
    else ((uint16_t *)j->y)[i] = from_f32_f16(v);
}

static void *sc_aligned_alloc(size_t n) {
    void *p = NULL;
#if defined(_WIN32)
    p = _aligned_malloc(n ? n : 1, 64);
#else
    if (posix_memalign(&p, 64, n ? n : 1)) p = NULL;
#endif
    return p;
}
static void sc_aligned_free(void *p) {
#if defined(_WIN32)
    _aligned_free(p);
#else
    free(p);
#endif
}

static inline int popcount64(uint64_t v) {
#if defined(__GNUC__)
    return __builtin_popcountll(v);
#else
    int c = 0;
    while (v) { v &= v - 1; ++c; }
    return c;
#endif
}

#endif
