/* AVX-512F kernels for one stored weight value type; included by _avx512_kernels.h once per type with
 *   SFX   name suffix (f32, bf16, f16, i8), naming the helpers the kernels call:
 *         expand16_SFX(p, k)  __m512: the popcount(k) packed values at p placed at the set bits of the 16-bit mask
 *                             k, zeros elsewhere (reads 16 stored values from p: the packed buffer has 16 values
 *                             of padding)
 *         load16_SFX(p)       __m512: 16 consecutive stored values at p converted to fp32
 *   WT    stored element type (float, uint16_t or int8_t)
 * Every function here is compiled for avx512f and only called after a runtime CPU check; the per-thread driver
 * FN(run) comes from _run_template.h. One expand instruction places 16 values (the AVX2 path needs a table lookup,
 * a shuffle and a popcount per 8), so each 64-bit mask word takes 4 steps. SFX and WT are undefined at the end. */

#define CAT_(a, b) a##_##b
#define CAT(a, b) CAT_(a, b)
#define FN(name) CAT(CAT(name, avx512), SFX)
#define ISA_ATTR SC_AVX512
#define VEC __m512
#define VHSUM(v) hsum512(v)
#define LANES 16
#define VZERO() _mm512_setzero_ps()
#define VLOADU(p) _mm512_loadu_ps(p)
#define VFMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define VADD(a, b) _mm512_add_ps(a, b)
#define EXPAND16(p, k) CAT(expand16, SFX)(p, k)
#define LOADV(p) CAT(load16, SFX)(p)
#include "_shared_kernels.h"
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

#undef FMA6
#undef ACC_IN
#undef ACC_OUT
#undef PIECE

#include "_run_template.h" /* also undefines the ISA macros */
#undef EXPAND16
#undef SFX
#undef WT
