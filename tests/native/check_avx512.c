/* Runs sparsecraft's AVX-512 kernels (src/sparsecraft/kernels/_avx512_kernels.h) on the plain-C emulation of
 * their intrinsics (avx512_emulation.h) and checks every result against a float64 reference: both formats
 * (bitmask, dense with a row stride), fp32 / bf16 / fp16 weights, int8 bitmask values with per-row scales (stored
 * zeros included) and fp32 / bf16 / fp16 outputs, GEMV and GEMM tiles (M = 1..17), odd sizes, all-zero and no-zero
 * rows, with and without bias, and the row ranges the OpenMP split hands to threads.
 * Prints one line per value type (and output dtype) and "ok"; exits 1 on the first result outside the tolerance.
 * Built and run by tests/test_kernels.py::test_avx512_kernels_emulated (with AddressSanitizer where available,
 * the packed values allocated with exactly the documented 16 values of padding). */
#include <stdio.h>
#include <stdlib.h>

#include "avx512_emulation.h"
#define SC_AVX512
#define SC_NOINLINE
#include "_kernels_common.h"
#include "_avx512_kernels.h"

typedef void (*RunFn)(const Job *, int64_t, int64_t);

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;
static uint64_t rnd(void) { /* xorshift64* */
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return rng_state * 0x2545f4914f6cdd1dull;
}
static double uniform(void) { return (double)(rnd() >> 11) * (1.0 / 9007199254740992.0); }
static float normalish(void) { return (float)((uniform() + uniform() + uniform() - 1.5) * 2.0); }

/* a random value stored in dtype (bit pattern), and its exact value; int8: any of -127..127, zero included */
static void random_value(int dtype, void *dst, int64_t i, double *exact) {
    if (dtype == DT_I8) {
        int8_t q = (int8_t)((int)(rnd() % 255) - 127);
        ((int8_t *)dst)[i] = q;
        *exact = q;
        return;
    }
    float f = normalish();
    if (f == 0.0f) f = 0.25f;
    if (dtype == DT_F32) {
        ((float *)dst)[i] = f;
        *exact = f;
    } else if (dtype == DT_BF16) {
        uint32_t u;
        memcpy(&u, &f, 4);
        uint16_t h = (uint16_t)(u >> 16);
        if ((h & 0x7fff) == 0) h |= 0x3f80; /* keep it nonzero */
        ((uint16_t *)dst)[i] = h;
        uint32_t back = (uint32_t)h << 16;
        float g;
        memcpy(&g, &back, 4);
        *exact = g;
    } else {
        uint16_t h = (uint16_t)(((rnd() & 1) << 15) | ((10 + rnd() % 10) << 10) | (rnd() & 0x3ff)); /* normal */
        ((uint16_t *)dst)[i] = h;
        *exact = emu_half_to_float(h);
    }
}

static size_t esize(int dtype) { return dtype == DT_F32 ? 4 : dtype == DT_I8 ? 1 : 2; }

/* dtype: activations / bias / outputs; wtype: the stored values (dtype, or DT_I8 with a random scale per row) */
static int check_case(int dtype, int wtype, RunFn run, int format, int64_t N, int64_t K, int64_t M, double sparsity,
                      int bias, int splits) {
    const size_t es = esize(wtype);
    const int64_t words = (K + 63) / 64, kp = words * 64, wstride = K + 3;
    double *dense = calloc((size_t)(N * K) + 1, sizeof(double)); /* exact weight values, 0 where pruned */
    uint64_t *mask = calloc((size_t)(N * words) + 1, 8);
    int64_t *rowptr = calloc((size_t)N + 1, 8);
    int64_t nnz = 0;
    for (int64_t r = 0; r < N; ++r) {
        rowptr[r] = nnz;
        for (int64_t k = 0; k < K; ++k) {
            int keep = N >= 2 && r == 0 ? 0 : N >= 2 && r == 1 ? 1 : uniform() >= sparsity;
            if (keep) {
                mask[r * words + k / 64] |= 1ull << (k % 64);
                ++nnz;
            }
        }
    }
    rowptr[N] = nnz;
    /* packed values: exactly nnz + 16 (the documented padding), so an over-read past it is an ASan error */
    void *vals = malloc((size_t)(nnz + 16) * es);
    void *wd = calloc((size_t)(N * wstride) + 1, es);
    memset((char *)vals + nnz * es, 0x7f, 16 * es); /* padding: garbage the expand must not let through */
    float *scale = wtype == DT_I8 ? malloc((size_t)N * sizeof(float) + 1) : NULL;
    for (int64_t r = 0; scale && r < N; ++r) scale[r] = (float)(0.001 + 0.05 * uniform());
    for (int64_t r = 0, p = 0; r < N; ++r)
        for (int64_t k = 0; k < K; ++k)
            if ((mask[r * words + k / 64] >> (k % 64)) & 1) {
                random_value(wtype, vals, p, &dense[r * K + k]);
                if (scale) dense[r * K + k] *= scale[r]; /* exact in double */
                memcpy((char *)wd + (r * wstride + k) * es, (char *)vals + p * es, es);
                ++p;
            }
    void *bvec = bias ? malloc((size_t)N * esize(dtype)) : NULL;
    double *bexact = calloc((size_t)N + 1, sizeof(double));
    for (int64_t r = 0; bias && r < N; ++r) random_value(dtype, bvec, r, &bexact[r]);
    const int64_t rows = M == 1 ? 1 : (M + TM - 1) / TM * TM;
    float *xf = sc_aligned_alloc((size_t)(rows * kp) * sizeof(float));
    memset(xf, 0, (size_t)(rows * kp) * sizeof(float));
    for (int64_t m = 0; m < M; ++m)
        for (int64_t k = 0; k < K; ++k) xf[m * kp + k] = normalish();
    const int64_t ystride = N + 1;
    void *y = calloc((size_t)(M * ystride) + 1, esize(dtype));
    Job j = {.dtype = dtype, .wtype = wtype, .format = format, .N = N, .K = K, .M = M, .words = words, .xf = xf,
             .mask = mask, .rowptr = rowptr, .w = format == FMT_BITMASK ? vals : wd,
             .wstride = format == FMT_BITMASK ? 0 : wstride, .scale = scale, .bias = bvec, .y = y,
             .ystride = ystride};
    /* the rows as OpenMP would hand them to `splits` threads: even boundaries, possibly empty shares */
    for (int t = 0; t < splits; ++t) {
        int64_t r0 = (N * t / splits) & ~(int64_t)1, r1 = t + 1 == splits ? N : (N * (t + 1) / splits) & ~(int64_t)1;
        if (r1 > r0) run(&j, r0, r1);
    }
    const double unit = dtype == DT_F32 ? 0x1p-24 : dtype == DT_BF16 ? 0x1p-8 : 0x1p-11;
    int bad = 0;
    for (int64_t m = 0; m < M && !bad; ++m)
        for (int64_t r = 0; r < N && !bad; ++r) {
            double ref = bexact[r], bound = fabs(bexact[r]);
            for (int64_t k = 0; k < K; ++k) {
                ref += dense[r * K + k] * xf[m * kp + k];
                bound += fabs(dense[r * K + k] * xf[m * kp + k]);
            }
            double got = load_f32(dtype, y, m * ystride + r);
            double tol = unit * fabs(ref) + 4.0 * (double)(K + 2) * 0x1p-24 * bound + 1e-30;
            if (!(fabs(got - ref) <= tol)) {
                printf("FAIL dtype %d wtype %d format %d N %lld K %lld M %lld sparsity %.2f bias %d splits %d: "
                       "y[%lld, %lld] = %.9g, reference %.9g (tolerance %.3g)\n", dtype, wtype, format, (long long)N,
                       (long long)K, (long long)M, sparsity, bias, splits, (long long)m, (long long)r, got, ref, tol);
                bad = 1;
            }
        }
    free(dense); free(mask); free(rowptr); free(vals); free(wd); free(scale); free(bvec); free(bexact); free(y);
    sc_aligned_free(xf);
    return bad;
}

int main(void) {
    static const int64_t shapes[][2] = {{1, 1}, {7, 5}, {2, 64}, {33, 65}, {64, 128}, {19, 300}, {6, 1000},
                                        {10, 2065}};
    static const double sparsities[] = {0.0, 0.5, 0.7, 0.9, 1.0};
    static const int64_t batches[] = {1, 3, 6, 7, 17};
    static const RunFn runs[] = {run_avx512_f32, run_avx512_bf16, run_avx512_f16, run_avx512_i8};
    static const char *names[] = {"float32", "bfloat16", "float16"};
    /* float values in the activations' dtype (both formats), then int8 bitmask values with each activation dtype */
    for (int c = 0; c < 6; ++c) {
        const int wtype = c < 3 ? c : DT_I8, dtype = c % 3;
        int cases = 0;
        for (size_t s = 0; s < sizeof shapes / sizeof *shapes; ++s)
            for (size_t p = 0; p < sizeof sparsities / sizeof *sparsities; ++p)
                for (size_t b = 0; b < sizeof batches / sizeof *batches; ++b)
                    for (int format = wtype == DT_I8 ? FMT_BITMASK : FMT_DENSE; format <= FMT_BITMASK; ++format) {
                        int bias = (int)((s + p + b) & 1), splits = 1 + (int)((s + b) % 3);
                        if (check_case(dtype, wtype, runs[wtype], format, shapes[s][0], shapes[s][1], batches[b],
                                       sparsities[p], bias, splits))
                            return 1;
                        ++cases;
                    }
        if (wtype == DT_I8) printf("int8 -> %s: %d cases match the float64 reference\n", names[dtype], cases);
        else printf("%s: %d cases match the float64 reference\n", names[dtype], cases);
    }
    printf("ok\n");
    return 0;
}
