/* AVX-512F kernels for one stored weight value type; included by _avx512_kernels.h once per type with
 *   SFX   name suffix (f32, bf16, f16, i8), naming the helpers the kernels call:
 *         expand16_SFX(p, k)  __m512: the popcount(k) packed values at p placed at the set bits of the 16-bit mask
 *                             k, zeros elsewhere (reads 16 stored values from p: the packed buffer has 16 values
 *                             of padding)
 *         load16_SFX(p)       __m512: 16 consecutive stored values at p converted to fp32
 *   WT    stored element type (float, uint16_t or int8_t)
 * and optionally WIDE16 (16-bit value types on CPUs with AVX512_VBMI2): the bitmask kernels then place 32 values
 * with one vpexpandw (EXPAND32 / WIDEN / WIDEN_ROW helpers, named from SFX too) instead of 16 with vexpandps; the
 * functions are named ..._avx512w_SFX and compiled for SC_AVX512W. With ROW_X_PERMUTE, WIDEN_ROW yields lanes in
 * the order of the function ROW_X_PERMUTE names, and the decode driver hands the row kernel x permuted that way.
 * WIDE8 (int8 values with VBMI2): the decode row places a mask word's 64 values with one vpexpandb (widen4_i8,
 * permute64); its GEMM tiles are the AVX-512F ones.
 * Every function here is compiled for avx512f and only called after a runtime CPU check; the per-thread driver
 * FN(run) comes from _run_template.h. One expand instruction places 16 values (the AVX2 path needs a table lookup,
 * a shuffle and a popcount per 8), so each 64-bit mask word takes 4 steps (2 with WIDE16). Decode (one x row) runs
 * one weight row at a time (bm_gemv_row). SFX, WT and WIDE16 are undefined at the end. */

#define CAT_(a, b) a##_##b
#define CAT(a, b) CAT_(a, b)
#if defined(WIDE16) || defined(WIDE8)
#define FN(name) CAT(CAT(name, avx512w), SFX)
#define ISA_ATTR SC_AVX512W
#define EXPAND32(p, k) CAT(expand32, SFX)(p, k)
#define WIDEN(e, h) CAT(widen, SFX)(e, h)
#define WIDEN_ROW(e, h) CAT(widen_row, SFX)(e, h)
#else
#define FN(name) CAT(CAT(name, avx512), SFX)
#define ISA_ATTR SC_AVX512
#endif
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

/* ---- bitmask, one x row (decode GEMV): one weight row at a time, so each thread reads its values and mask words
 * as two sequential streams (two rows at a time interleave four, which this CPU family's prefetchers follow worse),
 * the values also prefetched SC_PF_ROW bytes ahead ---- */
ISA_ATTR SC_NOINLINE static float FN(bm_gemv_row)(const float *x, const uint64_t *m, const WT *v, int64_t words) {
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
    for (int64_t w = 0; w < words; ++w) {
        const uint64_t u = m[w];
        const float *xp = x + w * 64;
        _mm_prefetch((const char *)v + SC_PF_ROW, _MM_HINT_T0);
#ifdef WIDE16 /* one vpexpandw places 32 16-bit values: two per mask word */
        const unsigned k0 = (unsigned)u, k1 = (unsigned)(u >> 32);
        const __m512i e0 = EXPAND32(v, k0);
        v += _mm_popcnt_u32(k0);
        const __m512i e1 = EXPAND32(v, k1);
        v += _mm_popcnt_u32(k1);
        a0 = _mm512_fmadd_ps(WIDEN_ROW(e0, 0), _mm512_loadu_ps(xp), a0);
        a1 = _mm512_fmadd_ps(WIDEN_ROW(e0, 1), _mm512_loadu_ps(xp + 16), a1);
        a2 = _mm512_fmadd_ps(WIDEN_ROW(e1, 0), _mm512_loadu_ps(xp + 32), a2);
        a3 = _mm512_fmadd_ps(WIDEN_ROW(e1, 1), _mm512_loadu_ps(xp + 48), a3);
#elif defined(WIDE8) /* one vpexpandb places the word's 64 int8 values */
        __m512 q4[4];
        widen4_i8(expand64_i8(v, u), q4);
        v += _mm_popcnt_u64(u);
        a0 = _mm512_fmadd_ps(q4[0], _mm512_loadu_ps(xp), a0);
        a1 = _mm512_fmadd_ps(q4[1], _mm512_loadu_ps(xp + 16), a1);
        a2 = _mm512_fmadd_ps(q4[2], _mm512_loadu_ps(xp + 32), a2);
        a3 = _mm512_fmadd_ps(q4[3], _mm512_loadu_ps(xp + 48), a3);
#else
#define STEP(J, A)                                                             \
    {                                                                          \
        const unsigned k = PIECE(u, J);                                        \
        A = _mm512_fmadd_ps(EXPAND16(v, k), _mm512_loadu_ps(xp + 16 * (J)), A); \
        v += _mm_popcnt_u32(k);                                                \
    }
        STEP(0, a0) STEP(1, a1) STEP(2, a2) STEP(3, a3)
#undef STEP
#endif
    }
    return hsum512(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
}

/* ---- bitmask, tile of TM = 6 x rows (stride xs) x 2 weight rows over mask words [wa, wb) ---- */
ISA_ATTR SC_NOINLINE static void FN(bm_tile)(const float *x, int64_t xs, const uint64_t *m0, const uint64_t *m1,
                                              const WT **pv0, const WT **pv1, int64_t wa, int64_t wb, __m512 *acc) {
    const WT *v0 = *pv0, *v1 = *pv1;
    ACC_IN
    for (int64_t w = wa; w < wb; ++w) {
        const uint64_t u0 = m0[w], u1 = m1[w];
        const float *xp = x + w * 64;
#ifdef WIDE16
#define STEP(H)                                                                \
    {                                                                          \
        const unsigned k0 = (unsigned)(u0 >> (32 * (H))), k1 = (unsigned)(u1 >> (32 * (H))); \
        const __m512i e0 = EXPAND32(v0, k0), e1 = EXPAND32(v1, k1);            \
        v0 += _mm_popcnt_u32(k0);                                              \
        v1 += _mm_popcnt_u32(k1);                                              \
        const float *xb = xp + 32 * (H);                                       \
        {                                                                      \
            const __m512 w0 = WIDEN(e0, 0), w1 = WIDEN(e1, 0);                 \
            FMA6(w0, w1)                                                       \
        }                                                                      \
        xb += 16;                                                              \
        {                                                                      \
            const __m512 w0 = WIDEN(e0, 1), w1 = WIDEN(e1, 1);                 \
            FMA6(w0, w1)                                                       \
        }                                                                      \
    }
        STEP(0) STEP(1)
#else
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
#endif
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
#ifdef WIDE16
#undef EXPAND32
#undef WIDEN
#undef WIDEN_ROW
#undef WIDE16
#endif
#undef WIDE8
