/* AVX2 + FMA kernels for one stored weight value type; included by _sparsekernels.c once per type with
 *   SFX   name suffix (f32, bf16, f16, i8), naming the helpers the kernels call:
 *         expandi_SFX(p, o)  __m256: the popcount(m) packed values at p placed at the set bits of mask byte
 *                            m = o / 32, zeros elsewhere (o = LUTOFF(word, b), the byte offset of m's LUT row)
 *         load8_SFX(p)       __m256: 8 consecutive stored values at p converted to fp32
 *   WT    stored element type (float, uint16_t or int8_t)
 *   EXPAND_SCALE  (optional) the factor every expanded sum is multiplied by (a power of two: exact); default 1
 * Every function here is compiled for avx2/fma/f16c/popcnt and only called after a runtime CPU check; the per-thread
 * driver FN(run) comes from _run_template.h. SFX and WT are undefined at the end. */

#ifndef EXPAND_SCALE
#define EXPAND_SCALE 1.0f
#define EXPAND_SCALE_DEFAULT
#endif
#define CAT_(a, b) a##_##b
#define CAT(a, b) CAT_(a, b)
#define FN(name) CAT(CAT(name, avx2), SFX)
#define ISA_ATTR SC_AVX2
#define VEC __m256
#define VHSUM(v) hsum256(v)
#define LANES 8
#define VZERO() _mm256_setzero_ps()
#define VLOADU(p) _mm256_loadu_ps(p)
#define VFMA(a, b, c) _mm256_fmadd_ps(a, b, c)
#define VADD(a, b) _mm256_add_ps(a, b)
#define EXPANDI(p, o) CAT(expandi, SFX)(p, o)
#define LOADV(p) CAT(load8, SFX)(p)
#include "_shared_kernels.h"

/* ---- bitmask, one x row (decode GEMV): one weight row at a time, two accumulators ----
 * Per mask byte: LUTOFF(word, b) is byte b times 32 (the LUT row offset, 32-byte rows), its popcount advances the
 * value cursor. Loads per byte: LUT row, values, x chunk. One row at a time keeps each thread on two sequential
 * streams (mask words, values); the earlier two-row kernel shared the x load between rows but read four streams,
 * and ran 1.3x against this kernel's 1.6x of the dense row at 50% in a harness on a Zen 3 host (1.1B-model shapes,
 * 2 threads, interleaved runs; 70%: 1.9x against 2.05x). */
SC_AVX2 SC_NOINLINE static float FN(bm_gemv_row)(const float *x, const uint64_t *m, const WT *v, int64_t words) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    for (int64_t w = 0; w < words; ++w) {
        const uint64_t u = m[w];
        const float *xp = x + w * 64;
        /* the value cursor depends on the mask words, so the out-of-order core cannot run far ahead by itself */
        _mm_prefetch((const char *)v + SC_PF_VALUES, _MM_HINT_T0);
#define STEP(B, A)                                                             \
    {                                                                          \
        const uint64_t i = LUTOFF(u, B);                                       \
        A = _mm256_fmadd_ps(EXPANDI(v, i), _mm256_loadu_ps(xp + 8 * B), A);    \
        v += _mm_popcnt_u64(i);                                                \
    }
        STEP(0, a0) STEP(1, a1) STEP(2, a0) STEP(3, a1) STEP(4, a0) STEP(5, a1) STEP(6, a0) STEP(7, a1)
#undef STEP
    }
    return hsum256(_mm256_add_ps(a0, a1)) * EXPAND_SCALE;
}

/* ---- bitmask, tile of TM = 6 x rows (stride xs) x 2 weight rows over mask words [wa, wb) ----
 * acc[i*2+j] += x row i . weight row j (12 accumulators: each expanded weight chunk feeds 6 FMAs); the two value
 * cursors advance past the consumed values. */
SC_AVX2 SC_NOINLINE static void FN(bm_tile)(const float *x, int64_t xs, const uint64_t *m0, const uint64_t *m1,
                                            const WT **pv0, const WT **pv1, int64_t wa, int64_t wb, __m256 *acc) {
    const WT *v0 = *pv0, *v1 = *pv1;
    ACC_IN
    for (int64_t w = wa; w < wb; ++w) {
        uint64_t u0 = m0[w], u1 = m1[w];
        const float *xp = x + w * 64;
#define STEP(B)                                                                \
    {                                                                          \
        uint64_t q0 = LUTOFF(u0, B), q1 = LUTOFF(u1, B);                       \
        __m256 w0 = EXPANDI(v0, q0), w1 = EXPANDI(v1, q1);                     \
        v0 += _mm_popcnt_u64(q0);                                              \
        v1 += _mm_popcnt_u64(q1);                                              \
        const float *xb = xp + 8 * B;                                          \
        FMA6(w0, w1)                                                           \
    }
        STEP(0) STEP(1) STEP(2) STEP(3) STEP(4) STEP(5) STEP(6) STEP(7)
#undef STEP
    }
    ACC_OUT
    *pv0 = v0;
    *pv1 = v1;
}

#undef FMA6
#undef ACC_IN
#undef ACC_OUT

#include "_run_template.h" /* also undefines the ISA macros */
#undef EXPANDI
#ifdef EXPAND_SCALE_DEFAULT
#undef EXPAND_SCALE
#undef EXPAND_SCALE_DEFAULT
#endif
#undef SFX
#undef WT
