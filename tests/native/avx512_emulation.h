/* A plain-C emulation of the AVX-512F intrinsics sparsecraft's AVX-512 kernels use (and nothing else), written
 * from Intel's documented operation of each, so that check_avx512.c can run those kernels on CPUs without
 * AVX-512. Deliberately independent of the kernels' own helpers (its own fp16 decoding, fmaf for the fused
 * multiply-add). Loads read exactly the bytes the instruction reads, so AddressSanitizer sees over-reads. */
#ifndef SC_AVX512_EMULATION_H
#define SC_AVX512_EMULATION_H
#include <math.h>
#include <stdint.h>
#include <string.h>

typedef struct { float f[16]; } __m512;       /* 16 x fp32 */
typedef struct { uint32_t u[16]; } __m512i;   /* 16 x 32-bit integer lanes */
typedef struct { uint16_t h[16]; } __m256i;   /* 256 bits, used here only as 16 x 16-bit lanes */
typedef struct { int8_t b[16]; } __m128i;     /* 128 bits, used here only as 16 x int8 lanes */
typedef uint16_t __mmask16;

#define _MM_HINT_T0 3
#define _mm_prefetch(p, hint) ((void)(p), (void)(hint)) /* a hint: no architectural effect */

static inline unsigned _mm_popcnt_u32(unsigned v) { return (unsigned)__builtin_popcount(v); }

static inline __m512 _mm512_setzero_ps(void) {
    __m512 r;
    for (int i = 0; i < 16; ++i) r.f[i] = 0.0f;
    return r;
}
static inline __m512 _mm512_loadu_ps(const void *p) { /* 64 bytes */
    __m512 r;
    memcpy(r.f, p, sizeof r.f);
    return r;
}
static inline __m256i _mm256_loadu_si256(const __m256i *p) { /* 32 bytes */
    __m256i r;
    memcpy(r.h, p, sizeof r.h);
    return r;
}
static inline __m128i _mm_loadu_si128(const __m128i *p) { /* 16 bytes */
    __m128i r;
    memcpy(r.b, p, sizeof r.b);
    return r;
}
static inline __m512i _mm512_cvtepi8_epi32(__m128i a) { /* sign-extend 16 x int8 */
    __m512i r;
    for (int i = 0; i < 16; ++i) r.u[i] = (uint32_t)(int32_t)a.b[i];
    return r;
}
static inline __m512 _mm512_cvtepi32_ps(__m512i a) { /* int32 -> fp32, round to nearest (exact below 2^24) */
    __m512 r;
    for (int i = 0; i < 16; ++i) r.f[i] = (float)(int32_t)a.u[i];
    return r;
}
static inline __m512 _mm512_add_ps(__m512 a, __m512 b) {
    for (int i = 0; i < 16; ++i) a.f[i] += b.f[i];
    return a;
}
static inline __m512 _mm512_fmadd_ps(__m512 a, __m512 b, __m512 c) { /* a * b + c, one rounding */
    for (int i = 0; i < 16; ++i) c.f[i] = fmaf(a.f[i], b.f[i], c.f[i]);
    return c;
}
static inline float _mm512_reduce_add_ps(__m512 a) { /* the order is unspecified; pairwise here */
    for (int w = 8; w >= 1; w /= 2)
        for (int i = 0; i < w; ++i) a.f[i] += a.f[i + w];
    return a.f[0];
}
static inline __m512i _mm512_cvtepu16_epi32(__m256i a) { /* zero-extend 16 x u16 */
    __m512i r;
    for (int i = 0; i < 16; ++i) r.u[i] = a.h[i];
    return r;
}
static inline __m512i _mm512_slli_epi32(__m512i a, unsigned n) {
    for (int i = 0; i < 16; ++i) a.u[i] = n > 31 ? 0u : a.u[i] << n;
    return a;
}
static inline __m512 _mm512_castsi512_ps(__m512i a) { /* reinterpret the bits */
    __m512 r;
    memcpy(r.f, a.u, sizeof r.f);
    return r;
}
static inline float emu_half_to_float(uint16_t h) { /* IEEE binary16 -> binary32, exact */
    const int sign = h >> 15, e = (h >> 10) & 0x1f, m = h & 0x3ff;
    float v;
    if (e == 0) v = ldexpf((float)m, -24);
    else if (e == 31) v = m ? NAN : INFINITY;
    else v = ldexpf((float)(m | 0x400), e - 25);
    return sign ? -v : v;
}
static inline __m512 _mm512_cvtph_ps(__m256i a) {
    __m512 r;
    for (int i = 0; i < 16; ++i) r.f[i] = emu_half_to_float(a.h[i]);
    return r;
}
/* Expand: the low popcount(k) elements of a go, in order, to the lanes whose bit in k is set; other lanes 0. */
static inline __m512 _mm512_maskz_expand_ps(__mmask16 k, __m512 a) {
    __m512 r;
    int m = 0;
    for (int i = 0; i < 16; ++i) r.f[i] = ((k >> i) & 1) ? a.f[m++] : 0.0f;
    return r;
}
#endif
