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
