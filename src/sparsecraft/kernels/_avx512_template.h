/* AVX-512F kernels for one weight dtype; included by _avx512_kernels.h once per dtype with
 *   SFX             name suffix (f32, bf16, f16)
 *   WT              stored element type (float or uint16_t)
 *   EXPAND16(p, k)  __m512: the popcount(k) packed values at p placed at the set bits of the 16-bit mask k, zeros
 *                   elsewhere (reads 16 stored values from p: the packed buffer has 16 values of padding)
 *   LOAD16(p)       __m512: 16 consecutive stored values at p converted to fp32
 * Every function here is compiled for avx512f and only called after a runtime CPU check; the per-thread driver
 * FN(run) comes from _run_template.h. One expand instruction places 16 values (the AVX2 path needs a table lookup,
 * a shuffle and a popcount per 8), so each 64-bit mask word takes 4 steps. */

#define CAT_(a, b) a##_##b
#define CAT(a, b) CAT_(a, b)
#define FN(name) CAT(CAT(name, avx512), SFX)
#define ISA_ATTR SC_AVX512
#define VEC __m512
#define VHSUM(v) hsum512(v)
#define LANES 16
/* The 16-bit piece J (0..3) of mask word u. */
#define PIECE(u, J) ((unsigned)((u) >> (16 * (J))) & 0xffffu)

/* ---- bitmask, one x row (decode GEMV): two weight rows at a time, two accumulators each ---- */
SC_AVX512 SC_NOINLINE static void FN(bm_gemv_pair)(const float *x, const uint64_t *m0, const uint64_t *m1,
                                                   const WT *v0, const WT *v1, int64_t words, float *o0, float *o1) {
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), b0 = _mm512_setzero_ps(), b1 = _mm512_setzero_ps();
    for (int64_t w = 0; w < words; ++w) {
        const uint64_t u0 = m0[w], u1 = m1[w];
        const float *xp = x + w * 64;
        _mm_prefetch((const char *)v0 + SC_PF_VALUES, _MM_HINT_T0);
        _mm_prefetch((const char *)v1 + SC_PF_VALUES, _MM_HINT_T0);
        _mm_prefetch((const char *)(m0 + w) + SC_PF_MASK, _MM_HINT_T0);
        _mm_prefetch((const char *)(m1 + w) + SC_PF_MASK, _MM_HINT_T0);
#define STEP(J, A, B)                                                          \
    {                                                                          \
        const unsigned k0 = PIECE(u0, J), k1 = PIECE(u1, J);                   \
        const __m512 xv = _mm512_loadu_ps(xp + 16 * (J));                      \
        A = _mm512_fmadd_ps(EXPAND16(v0, k0), xv, A);                          \
        v0 += _mm_popcnt_u32(k0);                                              \
        B = _mm512_fmadd_ps(EXPAND16(v1, k1), xv, B);                          \
        v1 += _mm_popcnt_u32(k1);                                              \
    }
        STEP(0, a0, b0) STEP(1, a1, b1) STEP(2, a0, b0) STEP(3, a1, b1)
#undef STEP
    }
    *o0 = hsum512(_mm512_add_ps(a0, a1));
    *o1 = hsum512(_mm512_add_ps(b0, b1));
}

/* ---- bitmask, tile of TM = 6 x rows (stride xs) x 2 weight rows over mask words [wa, wb) ---- */
#define FMA6(W0, W1)                                                           \
    {                                                                          \
        __m512 xv = _mm512_loadu_ps(xb);                                       \
        c00 = _mm512_fmadd_ps(W0, xv, c00); c01 = _mm512_fmadd_ps(W1, xv, c01); \
        xv = _mm512_loadu_ps(xb + xs);                                         \
        c10 = _mm512_fmadd_ps(W0, xv, c10); c11 = _mm512_fmadd_ps(W1, xv, c11); \
        xv = _mm512_loadu_ps(xb + 2 * xs);                                     \
        c20 = _mm512_fmadd_ps(W0, xv, c20); c21 = _mm512_fmadd_ps(W1, xv, c21); \
        xv = _mm512_loadu_ps(xb + 3 * xs);                                     \
        c30 = _mm512_fmadd_ps(W0, xv, c30); c31 = _mm512_fmadd_ps(W1, xv, c31); \
        xv = _mm512_loadu_ps(xb + 4 * xs);                                     \
        c40 = _mm512_fmadd_ps(W0, xv, c40); c41 = _mm512_fmadd_ps(W1, xv, c41); \
        xv = _mm512_loadu_ps(xb + 5 * xs);                                     \
        c50 = _mm512_fmadd_ps(W0, xv, c50); c51 = _mm512_fmadd_ps(W1, xv, c51); \
    }
#define ACC_IN                                                                 \
    __m512 c00 = acc[0], c01 = acc[1], c10 = acc[2], c11 = acc[3], c20 = acc[4], c21 = acc[5]; \
    __m512 c30 = acc[6], c31 = acc[7], c40 = acc[8], c41 = acc[9], c50 = acc[10], c51 = acc[11];
#define ACC_OUT                                                                \
    acc[0] = c00; acc[1] = c01; acc[2] = c10; acc[3] = c11; acc[4] = c20; acc[5] = c21; \
    acc[6] = c30; acc[7] = c31; acc[8] = c40; acc[9] = c41; acc[10] = c50; acc[11] = c51;

SC_AVX512 SC_NOINLINE static void FN(bm_tile)(const float *x, int64_t xs, const uint64_t *m0, const uint64_t *m1,
                                              const WT **pv0, const WT **pv1, int64_t wa, int64_t wb, __m512 *acc) {
    const WT *v0 = *pv0, *v1 = *pv1;
    ACC_IN
    for (int64_t w = wa; w < wb; ++w) {
        const uint64_t u0 = m0[w], u1 = m1[w];
        const float *xp = x + w * 64;
#define STEP(J)                                                                \
    {                                                                          \
        const unsigned k0 = PIECE(u0, J), k1 = PIECE(u1, J);                   \
        const __m512 w0 = EXPAND16(v0, k0), w1 = EXPAND16(v1, k1);             \
        v0 += _mm_popcnt_u32(k0);                                              \
        v1 += _mm_popcnt_u32(k1);                                              \
        const float *xb = xp + 16 * (J);                                       \
        FMA6(w0, w1)                                                           \
    }
        STEP(0) STEP(1) STEP(2) STEP(3)
#undef STEP
    }
    ACC_OUT
    *pv0 = v0;
    *pv1 = v1;
}

/* ---- dense, one x row: two weight rows, elements [0, kv) with kv a multiple of 16 ---- */
SC_AVX512 SC_NOINLINE static void FN(dn_gemv_pair)(const float *x, const WT *r0, const WT *r1, int64_t kv, float *o0,
                                                   float *o1) {
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), b0 = _mm512_setzero_ps(), b1 = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 32 <= kv; k += 32) {
        __m512 x0 = _mm512_loadu_ps(x + k), x1 = _mm512_loadu_ps(x + k + 16);
        a0 = _mm512_fmadd_ps(LOAD16(r0 + k), x0, a0);
        b0 = _mm512_fmadd_ps(LOAD16(r1 + k), x0, b0);
        a1 = _mm512_fmadd_ps(LOAD16(r0 + k + 16), x1, a1);
        b1 = _mm512_fmadd_ps(LOAD16(r1 + k + 16), x1, b1);
    }
    for (; k < kv; k += 16) {
        __m512 x0 = _mm512_loadu_ps(x + k);
        a0 = _mm512_fmadd_ps(LOAD16(r0 + k), x0, a0);
        b0 = _mm512_fmadd_ps(LOAD16(r1 + k), x0, b0);
    }
    *o0 = hsum512(_mm512_add_ps(a0, a1));
    *o1 = hsum512(_mm512_add_ps(b0, b1));
}

/* ---- dense, tile of TM = 6 x rows x 2 weight rows over elements [ka, kb) (multiples of 16) ---- */
SC_AVX512 SC_NOINLINE static void FN(dn_tile)(const float *x, int64_t xs, const WT *r0, const WT *r1, int64_t ka,
                                              int64_t kb, __m512 *acc) {
    ACC_IN
    for (int64_t k = ka; k < kb; k += 16) {
        __m512 w0 = LOAD16(r0 + k), w1 = LOAD16(r1 + k);
        const float *xb = x + k;
        FMA6(w0, w1)
    }
    ACC_OUT
}
#undef FMA6
#undef ACC_IN
#undef ACC_OUT
#undef PIECE

#include "_run_template.h"

#undef FN
#undef ISA_ATTR
#undef VEC
#undef VHSUM
#undef LANES
#undef CAT
#undef CAT_
