/* AVX-512F kernels: per-value-type expand / load helpers and the instantiations of _avx512_template.h, which define
 * run_avx512_f32, run_avx512_bf16, run_avx512_f16 and run_avx512_i8 (one thread's rows; see _run_template.h).
 *
 * The includer provides the AVX-512 intrinsics (<immintrin.h> in _sparsekernels.c; tests/native/ includes an
 * emulation of the few used here instead, so that the kernels' logic is checked on CPUs without AVX-512) and
 * defines SC_AVX512 (the function target attribute) and SC_NOINLINE. Packed values are expanded in registers
 * (vexpandps zmm{k}{z}, zmm) after a plain 16-value load, not with the memory form of expand, which some
 * implementations run slowly. */
SC_AVX512 static inline float hsum512(__m512 v) { return _mm512_reduce_add_ps(v); }

SC_AVX512 static inline __m512 load16_f32(const float *p) { return _mm512_loadu_ps(p); }
SC_AVX512 static inline __m512 load16_bf16(const uint16_t *p) { /* bf16 -> fp32: the 16 bits become the high half */
    __m512i v = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
}
SC_AVX512 static inline __m512 load16_f16(const uint16_t *p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
}
SC_AVX512 static inline __m512 load16_i8(const int8_t *p) { /* int8 -> int32 -> fp32 (exact) */
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}
SC_AVX512 static inline __m512 expand16_f32(const float *p, unsigned k) {
    return _mm512_maskz_expand_ps((__mmask16)k, load16_f32(p));
}
SC_AVX512 static inline __m512 expand16_bf16(const uint16_t *p, unsigned k) {
    return _mm512_maskz_expand_ps((__mmask16)k, load16_bf16(p));
}
SC_AVX512 static inline __m512 expand16_f16(const uint16_t *p, unsigned k) {
    return _mm512_maskz_expand_ps((__mmask16)k, load16_f16(p));
}
SC_AVX512 static inline __m512 expand16_i8(const int8_t *p, unsigned k) { /* 16 bytes read, converted, expanded */
    return _mm512_maskz_expand_ps((__mmask16)k, load16_i8(p));
}

#define SFX f32
#define WT float
#include "_avx512_template.h"
#define SFX bf16
#define WT uint16_t
#include "_avx512_template.h"
#define SFX f16
#define WT uint16_t
#include "_avx512_template.h"
#define SFX i8
#define WT int8_t
#include "_avx512_template.h"

#ifdef SC_AVX512W
/* With AVX512_VBMI2 (SC_AVX512W: Ice Lake, Sapphire Rapids, Zen 4 and later), 16-bit values are placed 32 at a time
 * by vpexpandw after one 64-byte load (the packed buffer has 32 values of padding) and widened to fp32 in two
 * halves. Not built into tests/native (the emulation covers AVX-512F only); tests/test_kernels.py runs them on
 * such CPUs against the same float64 reference. */
/* The load stays a separate instruction (SC_IN_REGISTER): compilers fold it into the memory form of vpexpand{b,w},
 * which Zen 4 runs markedly slower (a harness: 239 against 292 us for a 5632x2048 50% bf16 GEMV). */
#define SC_IN_REGISTER(v) __asm__("" : "+v"(v))
SC_AVX512W static inline __m512i expand32_bf16(const uint16_t *p, unsigned k) {
    __m512i raw = _mm512_loadu_si512((const void *)p);
    SC_IN_REGISTER(raw);
    return _mm512_maskz_expand_epi16((__mmask32)k, raw);
}
SC_AVX512W static inline __m512 widen_bf16(__m512i e, int h) { /* 16 values of half h as fp32 */
    __m256i half = h ? _mm512_extracti64x4_epi64(e, 1) : _mm512_castsi512_si256(e);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}
/* The decode GEMV widens bf16 in-lane instead: vpunpck{l,h}wd with zero puts values 0-3, 8-11, 16-19, 24-27
 * (low) and 4-7, 12-15, 20-23, 28-31 (high) of a 32-value block in fp32 lanes, at a fraction of vpmovzxwd's cost
 * on Zen 4; the driver permutes x the same way once per call (ROW_X_PERMUTE, permute32). */
SC_AVX512W static inline __m512 widen_row_bf16(__m512i e, int h) {
    const __m512i z = _mm512_setzero_si512();
    return _mm512_castsi512_ps(h ? _mm512_unpackhi_epi16(z, e) : _mm512_unpacklo_epi16(z, e));
}
#define expand32_f16 expand32_bf16 /* the same 16-bit placement */
SC_AVX512W static inline __m512 widen_f16(__m512i e, int h) {
    return _mm512_cvtph_ps(h ? _mm512_extracti64x4_epi64(e, 1) : _mm512_castsi512_si256(e));
}
#define widen_row_f16 widen_f16
/* x in the lane order widen_row_bf16 produces, per block of 32 values (n a multiple of 32) */
static void permute32(const float *x, float *out, int64_t n) {
    for (int64_t b = 0; b < n; b += 32)
        for (int q = 0; q < 4; ++q) {
            memcpy(out + b + 4 * q, x + b + 8 * q, 4 * sizeof(float));
            memcpy(out + b + 16 + 4 * q, x + b + 8 * q + 4, 4 * sizeof(float));
        }
}

#define WIDE16 1
#define ROW_X_PERMUTE permute32
#define SFX bf16
#define WT uint16_t
#include "_avx512_template.h"
#undef ROW_X_PERMUTE
#define WIDE16 1
#define SFX f16
#define WT uint16_t
#include "_avx512_template.h"
#undef expand32_f16
#undef widen_row_f16

/* int8 values: one vpexpandb places a whole mask word's 64 values; they are sign-extended in-lane (vpunpck{l,h}bw
 * and vpunpck{l,h}wd of the value with itself, then arithmetic shifts), so vector q of 4 holds, in 128-bit lane L,
 * values 16 L + 4 q .. 16 L + 4 q + 3; permute64 puts x in that order. */
SC_AVX512W static inline __m512i expand64_i8(const int8_t *p, uint64_t k) {
    __m512i raw = _mm512_loadu_si512((const void *)p);
    SC_IN_REGISTER(raw);
    return _mm512_maskz_expand_epi8((__mmask64)k, raw);
}
SC_AVX512W static inline void widen4_i8(__m512i e, __m512 *v) {
    const __m512i lo = _mm512_srai_epi16(_mm512_unpacklo_epi8(e, e), 8), hi = _mm512_srai_epi16(_mm512_unpackhi_epi8(e, e), 8);
    v[0] = _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_unpacklo_epi16(lo, lo), 16));
    v[1] = _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_unpackhi_epi16(lo, lo), 16));
    v[2] = _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_unpacklo_epi16(hi, hi), 16));
    v[3] = _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_unpackhi_epi16(hi, hi), 16));
}
static void permute64(const float *x, float *out, int64_t n) { /* n a multiple of 64 */
    for (int64_t b = 0; b < n; b += 64)
        for (int q = 0; q < 4; ++q)
            for (int l = 0; l < 4; ++l) memcpy(out + b + 16 * q + 4 * l, x + b + 16 * l + 4 * q, 4 * sizeof(float));
}

#define WIDE8 1
#define ROW_X_PERMUTE permute64
#define SFX i8
#define WT int8_t
#include "_avx512_template.h"
#undef ROW_X_PERMUTE
#endif

