/* Decode (one x row) kernels on AVX-512's dot-product instructions, for CPUs that have them (Cooper Lake,
 * Sapphire Rapids, Zen 4 and later): they take a whole mask word's values in one or two instructions after the
 * expand, where the VBMI2 kernels widen and multiply in four (bf16) or sixteen (int8) steps. Included by
 * _sparsekernels.c after _avx512_kernels.h (it calls that file's run_avx512w_bf16 / run_avx512w_i8 for batches);
 * defines run_avx512x_bf16 and run_avx512x_i8.
 *
 * bf16 values (SC_AVX512BF: AVX512_BF16 + VBMI2): vdpbf16ps multiplies 32 bf16 weight values by 32 bf16 x values
 * in pairs, accumulating in float32. x (float32 in the job) is split once per call into hi = bf16(x) and
 * lo = bf16(x - hi); when lo is all zero (x was bf16 already: a bf16 model's activations) one vdpbf16ps per 32
 * values is exact; otherwise two (hi and lo) keep x to about 16 significant bits. Both the bitmask kernel (one
 * vpexpandw per 32 positions) and the dense one use it.
 *
 * int8 values (SC_AVX512VN: AVX512_VNNI + VBMI2): vpdpbusd multiplies unsigned bytes by signed bytes in groups of
 * four into int32 lanes. x is quantized once per call in blocks of 256 columns (4 mask words): s_b = max|x| / 255,
 * |x| / s_b = q1 + q2 / 256 with q1 = floor, q2 = round of the rest (both unsigned bytes: |x| to about 16 bits of
 * its block's maximum, |error| <= s_b / 256), and x's signs go onto the weights (a masked negation by the word's
 * sign bits; int8 values are in [-127, 127], so negation is exact). Per block the two int32 dot products are exact
 * and meet float32 once: y_r = scale_r * sum_b s_b (D1_b + D2_b / 256). */

#define SC_XBLOCK_WORDS 4 /* mask words per x quantization block (256 columns) */

/* x [n] float32 (n a multiple of 32) -> hi, lo bf16 (round to nearest even); returns 1 when lo is all zero */
SC_AVX512BF static int split_bf16_x(const float *x, uint16_t *hi, uint16_t *lo, int64_t n) {
    __m512i any = _mm512_setzero_si512();
    for (int64_t k = 0; k < n; k += 16) {
        const __m512 v = _mm512_loadu_ps(x + k);
        const __m256i h = (__m256i)_mm512_cvtneps_pbh(v);
        const __m512 hf = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
        const __m256i l = (__m256i)_mm512_cvtneps_pbh(_mm512_sub_ps(v, hf));
        _mm256_storeu_si256((__m256i *)(hi + k), h);
        _mm256_storeu_si256((__m256i *)(lo + k), l);
        any = _mm512_or_si512(any, _mm512_castsi256_si512(l));
    }
    /* a lo of -0.0 (0x8000) is a zero too */
    return !_mm512_test_epi16_mask(any, _mm512_set1_epi16(0x7fff));
}

#define SC_DP(acc, w, xv) _mm512_dpbf16_ps(acc, (__m512bh)(w), (__m512bh)(xv))
/* mask word W of the row: e0 and e1 hold its two halves' values in place (zeros elsewhere); v moves past them */
#define SC_EXPAND_WORD_BF16(W)                                                                                 \
    const uint64_t u = m[W];                                                                                   \
    _mm_prefetch((const char *)v + SC_PF_ROW, _MM_HINT_T0);                                                    \
    const unsigned k0 = (unsigned)u, k1 = (unsigned)(u >> 32);                                                 \
    const __m512i e0 = expand32_bf16(v, k0);                                                                   \
    v += _mm_popcnt_u32(k0);                                                                                   \
    const __m512i e1 = expand32_bf16(v, k1);                                                                   \
    v += _mm_popcnt_u32(k1);

SC_AVX512BF SC_NOINLINE static float bm_row_dp_bf16(const uint16_t *xh, const uint64_t *m, const uint16_t *v,
                                                    int64_t words) {
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    for (int64_t w = 0; w < words; ++w) {
        const uint16_t *xp = xh + w * 64;
        SC_EXPAND_WORD_BF16(w)
        a0 = SC_DP(a0, e0, _mm512_loadu_si512((const void *)xp));
        a1 = SC_DP(a1, e1, _mm512_loadu_si512((const void *)(xp + 32)));
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
}

SC_AVX512BF SC_NOINLINE static float bm_row_dp2_bf16(const uint16_t *xh, const uint16_t *xl, const uint64_t *m,
                                                     const uint16_t *v, int64_t words) {
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), b0 = _mm512_setzero_ps(), b1 = _mm512_setzero_ps();
    for (int64_t w = 0; w < words; ++w) {
        SC_EXPAND_WORD_BF16(w)
        a0 = SC_DP(a0, e0, _mm512_loadu_si512((const void *)(xh + w * 64)));
        a1 = SC_DP(a1, e1, _mm512_loadu_si512((const void *)(xh + w * 64 + 32)));
        b0 = SC_DP(b0, e0, _mm512_loadu_si512((const void *)(xl + w * 64)));
        b1 = SC_DP(b1, e1, _mm512_loadu_si512((const void *)(xl + w * 64 + 32)));
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(b0, b1)));
}

/* dense row, elements [0, kv), kv a multiple of 32; xl NULL: x is xh exactly. No software prefetch: on Zen 4 a
 * single sequential stream per thread reads fastest without it (34 against 26 GB/s in a harness), while the
 * bitmask rows, whose value cursor advances by a data-dependent amount, gain from it. */
SC_AVX512BF SC_NOINLINE static float dn_row_dp_bf16(const uint16_t *xh, const uint16_t *xl, const uint16_t *r,
                                                    int64_t kv) {
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), b0 = _mm512_setzero_ps(), b1 = _mm512_setzero_ps();
    int64_t k = 0;
    if (!xl) {
        for (; k + 64 <= kv; k += 64) {
            a0 = SC_DP(a0, _mm512_loadu_si512((const void *)(r + k)), _mm512_loadu_si512((const void *)(xh + k)));
            a1 = SC_DP(a1, _mm512_loadu_si512((const void *)(r + k + 32)),
                       _mm512_loadu_si512((const void *)(xh + k + 32)));
        }
        for (; k < kv; k += 32)
            a0 = SC_DP(a0, _mm512_loadu_si512((const void *)(r + k)), _mm512_loadu_si512((const void *)(xh + k)));
        return _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
    }
    for (; k + 64 <= kv; k += 64) {
        const __m512i w0 = _mm512_loadu_si512((const void *)(r + k)), w1 = _mm512_loadu_si512((const void *)(r + k + 32));
        a0 = SC_DP(a0, w0, _mm512_loadu_si512((const void *)(xh + k)));
        a1 = SC_DP(a1, w1, _mm512_loadu_si512((const void *)(xh + k + 32)));
        b0 = SC_DP(b0, w0, _mm512_loadu_si512((const void *)(xl + k)));
        b1 = SC_DP(b1, w1, _mm512_loadu_si512((const void *)(xl + k + 32)));
    }
    for (; k < kv; k += 32) {
        const __m512i w0 = _mm512_loadu_si512((const void *)(r + k));
        a0 = SC_DP(a0, w0, _mm512_loadu_si512((const void *)(xh + k)));
        b0 = SC_DP(b0, w0, _mm512_loadu_si512((const void *)(xl + k)));
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(b0, b1)));
}
#undef SC_DP
#undef SC_EXPAND_WORD_BF16

SC_AVX512BF static void run_avx512x_bf16(const Job *j, int64_t r0, int64_t r1) {
    if (j->M != 1) {
        run_avx512w_bf16(j, r0, r1);
        return;
    }
    const int64_t kp = j->words * 64;
    uint16_t *xh = (uint16_t *)sc_aligned_alloc((size_t)(2 * kp) * sizeof(uint16_t));
    if (!xh) return;
    uint16_t *xl = xh + kp;
    const int exact = split_bf16_x(j->xf, xh, xl, kp);
    const uint16_t *vals = (const uint16_t *)j->w;
    if (j->format == FMT_BITMASK) {
        for (int64_t r = r0; r < r1; ++r) {
            const uint64_t *m = j->mask + r * j->words;
            const uint16_t *v = vals + j->rowptr[r];
            store_out(j, 0, r, exact ? bm_row_dp_bf16(xh, m, v, j->words) : bm_row_dp2_bf16(xh, xl, m, v, j->words));
        }
    } else {
        const int64_t kv = j->K & ~(int64_t)31;
        for (int64_t r = r0; r < r1; ++r) {
            const uint16_t *row = vals + r * j->wstride;
            float o = dn_row_dp_bf16(xh, exact ? NULL : xl, row, kv);
            for (int64_t k = kv; k < j->K; ++k) o += to_f32_bf16(row[k]) * j->xf[k];
            store_out(j, 0, r, o);
        }
    }
    sc_aligned_free(xh);
}

/* x [words * 64] float32 -> per block of SC_XBLOCK_WORDS words: scale s[b]; per column q1, q2 (bytes); per word
 * the sign bits of x (bit k: x[64 w + k] < 0) */
SC_AVX512VN static void quantize_x_u8(const float *x, int64_t words, uint8_t *q1, uint8_t *q2, uint64_t *sgn,
                                      float *s) {
    for (int64_t w0 = 0, b = 0; w0 < words; w0 += SC_XBLOCK_WORDS, ++b) {
        const int64_t w1 = w0 + SC_XBLOCK_WORDS < words ? w0 + SC_XBLOCK_WORDS : words;
        __m512 mx = _mm512_setzero_ps();
        for (int64_t k = w0 * 64; k < w1 * 64; k += 16)
            mx = _mm512_max_ps(mx, _mm512_abs_ps(_mm512_loadu_ps(x + k)));
        const float amax = _mm512_reduce_max_ps(mx);
        s[b] = amax / 255.0f;
        const __m512 inv = _mm512_set1_ps(amax > 0.0f ? 255.0f / amax : 0.0f), c256 = _mm512_set1_ps(256.0f);
        const __m512i c255 = _mm512_set1_epi32(255);
        for (int64_t w = w0; w < w1; ++w) {
            uint64_t sg = 0;
            for (int q = 0; q < 4; ++q) {
                const int64_t k = w * 64 + 16 * q;
                const __m512 v = _mm512_loadu_ps(x + k);
                sg |= (uint64_t)_mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_LT_OQ) << (16 * q);
                const __m512 t = _mm512_mul_ps(_mm512_abs_ps(v), inv);
                const __m512 f = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
                const __m512i i1 = _mm512_min_epi32(_mm512_cvttps_epi32(f), c255);
                const __m512i i2 = _mm512_min_epi32(
                    _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_sub_ps(t, f), c256)), c255); /* round to nearest */
                _mm_storeu_si128((__m128i *)(q1 + k), _mm512_cvtepi32_epi8(i1));
                _mm_storeu_si128((__m128i *)(q2 + k), _mm512_cvtepi32_epi8(i2));
            }
            sgn[w] = sg;
        }
    }
}

/* one mask word: the values placed, signed by x, dotted with both halves of x; then a block's sums scaled once */
#define SC_VNNI_WORD(W)                                                                                        \
    {                                                                                                          \
        const uint64_t u = m[W];                                                                               \
        __m512i e = expand64_i8(v, u);                                                                         \
        v += _mm_popcnt_u64(u);                                                                                \
        e = _mm512_mask_sub_epi8(e, (__mmask64)sgn[W], z, e);                                                  \
        d1 = _mm512_dpbusd_epi32(d1, _mm512_loadu_si512((const void *)(q1 + (W) * 64)), e);                    \
        d2 = _mm512_dpbusd_epi32(d2, _mm512_loadu_si512((const void *)(q2 + (W) * 64)), e);                    \
    }

#define SC_VNNI_BLOCK_SUM(B)                                                                                   \
    {                                                                                                          \
        const __m512 sb = _mm512_set1_ps(s[B]);                                                                \
        a1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d1), sb, a1);                                                  \
        a2 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d2), sb, a2);                                                  \
    }

SC_AVX512VN SC_NOINLINE static float bm_row_vnni_i8(const uint8_t *q1, const uint8_t *q2, const uint64_t *sgn,
                                                    const float *s, const uint64_t *m, const int8_t *v,
                                                    int64_t words) {
    const __m512i z = _mm512_setzero_si512();
    __m512 a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps();
    int64_t w = 0, b = 0;
    for (; w + SC_XBLOCK_WORDS <= words; w += SC_XBLOCK_WORDS, ++b) {
        _mm_prefetch((const char *)v + SC_PF_ROW, _MM_HINT_T0);
        __m512i d1 = z, d2 = z;
        SC_VNNI_WORD(w) SC_VNNI_WORD(w + 1) SC_VNNI_WORD(w + 2) SC_VNNI_WORD(w + 3)
        SC_VNNI_BLOCK_SUM(b)
    }
    if (w < words) {
        __m512i d1 = z, d2 = z;
        for (; w < words; ++w) SC_VNNI_WORD(w)
        SC_VNNI_BLOCK_SUM(b)
    }
    return _mm512_reduce_add_ps(_mm512_fmadd_ps(a2, _mm512_set1_ps(1.0f / 256.0f), a1));
}
#undef SC_VNNI_WORD
#undef SC_VNNI_BLOCK_SUM

SC_AVX512VN static void run_avx512x_i8(const Job *j, int64_t r0, int64_t r1) {
    if (j->M != 1 || j->format != FMT_BITMASK) {
        run_avx512w_i8(j, r0, r1);
        return;
    }
    const int64_t words = j->words, kp = words * 64, blocks = (words + SC_XBLOCK_WORDS - 1) / SC_XBLOCK_WORDS;
    /* q1, q2 [kp] bytes; sign words [words]; block scales [blocks] */
    uint8_t *buf = (uint8_t *)sc_aligned_alloc((size_t)(2 * kp + 8 * words + 4 * blocks));
    if (!buf) return;
    uint8_t *q1 = buf, *q2 = buf + kp;
    uint64_t *sgn = (uint64_t *)(buf + 2 * kp);
    float *s = (float *)(sgn + words);
    quantize_x_u8(j->xf, words, q1, q2, sgn, s);
    const int8_t *vals = (const int8_t *)j->w;
    for (int64_t r = r0; r < r1; ++r)
        store_out(j, 0, r, bm_row_vnni_i8(q1, q2, sgn, s, j->mask + r * words, vals + j->rowptr[r], words));
    sc_aligned_free(buf);
}
