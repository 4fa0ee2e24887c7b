/* What the AVX2 and AVX-512 kernels share, written once over the ISA's vector macros; included near the top of
 * _avx2_template.h / _avx512_template.h, which define
 *   VEC, LANES, VZERO(), VLOADU(p) (LANES floats), VFMA(a, b, c) (a * b + c), VADD(a, b), VHSUM(v)
 *   LOADV(p)   LANES consecutive stored values at p converted to fp32;  ISA_ATTR, FN(name), WT
 * It defines FMA6 / ACC_IN / ACC_OUT (the GEMM tile's 6 x rows x 2 weight rows of accumulators, used by the ISA's
 * bitmask tile too) and the dense kernels FN(dn_gemv_row) and FN(dn_tile). The ISA template undefines the macros. */

/* acc[i*2+j] += x row i . weight row j over one vector of columns at xb (12 accumulators: each weight vector
 * feeds 6 FMAs) */
#define FMA6(W0, W1)                                                           \
    {                                                                          \
        VEC xv = VLOADU(xb);                                                   \
        c00 = VFMA(W0, xv, c00); c01 = VFMA(W1, xv, c01);                      \
        xv = VLOADU(xb + xs);                                                  \
        c10 = VFMA(W0, xv, c10); c11 = VFMA(W1, xv, c11);                      \
        xv = VLOADU(xb + 2 * xs);                                              \
        c20 = VFMA(W0, xv, c20); c21 = VFMA(W1, xv, c21);                      \
        xv = VLOADU(xb + 3 * xs);                                              \
        c30 = VFMA(W0, xv, c30); c31 = VFMA(W1, xv, c31);                      \
        xv = VLOADU(xb + 4 * xs);                                              \
        c40 = VFMA(W0, xv, c40); c41 = VFMA(W1, xv, c41);                      \
        xv = VLOADU(xb + 5 * xs);                                              \
        c50 = VFMA(W0, xv, c50); c51 = VFMA(W1, xv, c51);                      \
    }
#define ACC_IN                                                                 \
    VEC c00 = acc[0], c01 = acc[1], c10 = acc[2], c11 = acc[3], c20 = acc[4], c21 = acc[5]; \
    VEC c30 = acc[6], c31 = acc[7], c40 = acc[8], c41 = acc[9], c50 = acc[10], c51 = acc[11];
#define ACC_OUT                                                                \
    acc[0] = c00; acc[1] = c01; acc[2] = c10; acc[3] = c11; acc[4] = c20; acc[5] = c21; \
    acc[6] = c30; acc[7] = c31; acc[8] = c40; acc[9] = c41; acc[10] = c50; acc[11] = c51;

/* ---- dense, one x row, one weight row (a single sequential stream per thread: two rows at a time interleave two
 * streams, which Zen 3/4's prefetchers follow at about 2/3 of the bandwidth), elements [0, kv), kv a multiple of
 * LANES ---- */
ISA_ATTR SC_NOINLINE static float FN(dn_gemv_row)(const float *x, const WT *r, int64_t kv) {
    VEC a0 = VZERO(), a1 = VZERO(), a2 = VZERO(), a3 = VZERO();
    int64_t k = 0;
    for (; k + 4 * LANES <= kv; k += 4 * LANES) {
        a0 = VFMA(LOADV(r + k), VLOADU(x + k), a0);
        a1 = VFMA(LOADV(r + k + LANES), VLOADU(x + k + LANES), a1);
        a2 = VFMA(LOADV(r + k + 2 * LANES), VLOADU(x + k + 2 * LANES), a2);
        a3 = VFMA(LOADV(r + k + 3 * LANES), VLOADU(x + k + 3 * LANES), a3);
    }
    for (; k < kv; k += LANES) a0 = VFMA(LOADV(r + k), VLOADU(x + k), a0);
    return VHSUM(VADD(VADD(a0, a1), VADD(a2, a3)));
}

/* ---- dense, tile of TM = 6 x rows x 2 weight rows over elements [ka, kb) (multiples of LANES) ---- */
ISA_ATTR SC_NOINLINE static void FN(dn_tile)(const float *x, int64_t xs, const WT *r0, const WT *r1, int64_t ka,
                                             int64_t kb, VEC *acc) {
    ACC_IN
    for (int64_t k = ka; k < kb; k += LANES) {
        VEC w0 = LOADV(r0 + k), w1 = LOADV(r1 + k);
        const float *xb = x + k;
        FMA6(w0, w1)
    }
    ACC_OUT
}
