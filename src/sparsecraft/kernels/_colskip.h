/* Column-skipping GEMV for activation (contextual) sparsity, decode (one x row):
 *   y = W (x masked) + b,  x_k kept where !(|x_k| < t_k)   (activation/hooks.py's ThresholdMask comparison)
 * with W stored transposed, wt [K, ws]: row k holds input feature k's weights over the N outputs (float32, bfloat16
 * or float16). Only the rows of kept features are read, so a skipped input channel skips one contiguous run of N
 * values (TEAL's layout, on the CPU). t: none (exact zeros skipped), one value, or one per feature (float32).
 *
 * Threads split the kept features (not the outputs): each reads whole rows of W^T, so at low sparsity a thread's
 * reads are one long sequential stream, and accumulates all N outputs in float32 in a private buffer (L1/L2), four
 * kept features per pass over it (one load and one store of the buffer per 4 weight rows); then every thread sums
 * one slice of the outputs over the threads' buffers and stores it. (Splitting the outputs instead, each thread
 * reading half of every row, ran at 11-12 GB/s against 17 GB/s for the dense kernel on a Zen 3 host.)
 * Included by _sparsekernels.c after the ISA helpers; defines py_colskip. */

typedef struct {
    int dtype, wtype;
    int64_t N, nact, ws;
    const int32_t *idx; /* kept features, ascending */
    const float *xv;    /* their x values (float32) */
    const void *wt;
    const void *bias;
    void *y;
} CsJob;

/* outputs [n0, n1): the sum over the nt thread buffers (acc[t * N + n]), plus bias, in the output dtype */
static void cs_store(const CsJob *c, const float *acc, int nt, int64_t n0, int64_t n1) {
    Job j; /* store_out's view: bias, output dtype, no scale */
    memset(&j, 0, sizeof(j));
    j.dtype = c->dtype;
    j.bias = c->bias;
    j.y = c->y;
    j.ystride = c->N;
    for (int64_t n = n0; n < n1; ++n) {
        float v = acc[n];
        for (int t = 1; t < nt; ++t) v += acc[(size_t)t * (size_t)c->N + (size_t)n];
        store_out(&j, 0, n, v);
    }
}

/* kept features [a0, a1) into acc [N] (zeroed here) */
static void cs_scalar(const CsJob *c, int64_t a0, int64_t a1, float *acc) {
    const int64_t len = c->N;
    const size_t es = c->wtype == DT_F32 ? 4 : 2;
    memset(acc, 0, (size_t)len * sizeof(float));
    for (int64_t a = a0; a < a1; ++a) {
        const char *w = (const char *)c->wt + (size_t)c->idx[a] * (size_t)c->ws * es;
        const float xv = c->xv[a];
        for (int64_t n = 0; n < len; ++n) acc[n] += xv * load_f32(c->wtype, w, n);
    }
}

/* the vector paths: CS_KERNEL(NAME, ATTR, VEC, LANES, SET1, LOADU, STOREU, FMA, LOADW, WT) */
#define CS_KERNEL(NAME, ATTR, VEC, LANES, SET1, LOADU, STOREU, FMA, LOADW, WT)                                  \
    ATTR static void NAME(const CsJob *c, int64_t a0, int64_t a1, float *acc) {                                 \
        const int64_t len = c->N, lv = len & ~(int64_t)(LANES - 1);                                             \
        const WT *base = (const WT *)c->wt;                                                                     \
        memset(acc, 0, (size_t)len * sizeof(float));                                                            \
        int64_t a = a0;                                                                                         \
        for (; a + 4 <= a1; a += 4) {                                                                           \
            const WT *w0 = base + (size_t)c->idx[a] * c->ws, *w1 = base + (size_t)c->idx[a + 1] * c->ws;       \
            const WT *w2 = base + (size_t)c->idx[a + 2] * c->ws, *w3 = base + (size_t)c->idx[a + 3] * c->ws;   \
            const float s0 = c->xv[a], s1 = c->xv[a + 1], s2 = c->xv[a + 2], s3 = c->xv[a + 3];                 \
            const VEC x0 = SET1(s0), x1 = SET1(s1), x2 = SET1(s2), x3 = SET1(s3);                               \
            for (int64_t n = 0; n < lv; n += LANES) {                                                           \
                VEC s = LOADU(acc + n);                                                                         \
                s = FMA(LOADW(w0 + n), x0, s);                                                                  \
                s = FMA(LOADW(w1 + n), x1, s);                                                                  \
                s = FMA(LOADW(w2 + n), x2, s);                                                                  \
                s = FMA(LOADW(w3 + n), x3, s);                                                                  \
                STOREU(acc + n, s);                                                                             \
            }                                                                                                   \
            for (int64_t n = lv; n < len; ++n) {                                                                \
                float s = acc[n];                                                                               \
                s += s0 * load_f32(c->wtype, w0, n);                                                            \
                s += s1 * load_f32(c->wtype, w1, n);                                                            \
                s += s2 * load_f32(c->wtype, w2, n);                                                            \
                s += s3 * load_f32(c->wtype, w3, n);                                                            \
                acc[n] = s;                                                                                     \
            }                                                                                                   \
        }                                                                                                       \
        for (; a < a1; ++a) {                                                                                   \
            const WT *w0 = base + (size_t)c->idx[a] * c->ws;                                                    \
            const float s0 = c->xv[a];                                                                          \
            const VEC x0 = SET1(s0);                                                                            \
            for (int64_t n = 0; n < lv; n += LANES) STOREU(acc + n, FMA(LOADW(w0 + n), x0, LOADU(acc + n)));    \
            for (int64_t n = lv; n < len; ++n) acc[n] += s0 * load_f32(c->wtype, w0, n);                        \
        }                                                                                                       \
    }

typedef void (*CsFn)(const CsJob *, int64_t, int64_t, float *);

#if SC_HAVE_AVX2
CS_KERNEL(cs_avx2_f32, SC_AVX2, __m256, 8, _mm256_set1_ps, _mm256_loadu_ps, _mm256_storeu_ps, _mm256_fmadd_ps,
          load8_f32, float)
CS_KERNEL(cs_avx2_bf16, SC_AVX2, __m256, 8, _mm256_set1_ps, _mm256_loadu_ps, _mm256_storeu_ps, _mm256_fmadd_ps,
          load8_bf16, uint16_t)
CS_KERNEL(cs_avx2_f16, SC_AVX2, __m256, 8, _mm256_set1_ps, _mm256_loadu_ps, _mm256_storeu_ps, _mm256_fmadd_ps,
          load8_f16, uint16_t)
#endif
#if SC_HAVE_AVX512
SC_AVX512 static inline __m512 cs_load16_f32(const float *p) { return _mm512_loadu_ps(p); }
SC_AVX512 static inline __m512 cs_load16_bf16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}
SC_AVX512 static inline __m512 cs_load16_f16(const uint16_t *p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
}
CS_KERNEL(cs_avx512_f32, SC_AVX512, __m512, 16, _mm512_set1_ps, _mm512_loadu_ps, _mm512_storeu_ps,
          _mm512_fmadd_ps, cs_load16_f32, float)
CS_KERNEL(cs_avx512_bf16, SC_AVX512, __m512, 16, _mm512_set1_ps, _mm512_loadu_ps, _mm512_storeu_ps,
          _mm512_fmadd_ps, cs_load16_bf16, uint16_t)
CS_KERNEL(cs_avx512_f16, SC_AVX512, __m512, 16, _mm512_set1_ps, _mm512_loadu_ps, _mm512_storeu_ps,
          _mm512_fmadd_ps, cs_load16_f16, uint16_t)
#endif
#undef CS_KERNEL

static CsFn cs_pick(int wtype, int path) {
#if SC_HAVE_AVX512
    static const CsFn avx512[] = {cs_avx512_f32, cs_avx512_bf16, cs_avx512_f16};
    if (path == PATH_AVX512 || path == PATH_AVX512F || path == PATH_AVX512W) return avx512[wtype];
#endif
#if SC_HAVE_AVX2
    static const CsFn avx2[] = {cs_avx2_f32, cs_avx2_bf16, cs_avx2_f16};
    if (path == PATH_AVX2) return avx2[wtype];
#endif
    (void)wtype;
    (void)path;
    return cs_scalar;
}

/* thread t of nt: kept features [nact t / nt, nact (t + 1) / nt) into acc + t N; after the barrier the caller
 * sums its output slice (a multiple of 16 wide) over the buffers */
static void cs_part(const CsJob *c, CsFn fn, float *acc, int t, int nt) {
    fn(c, c->nact * t / nt, c->nact * (t + 1) / nt, acc + (size_t)t * (size_t)c->N);
}
static void cs_sum(const CsJob *c, const float *acc, int nbuf, int t, int nt) {
    const int64_t blocks = (c->N + 15) / 16;
    int64_t n0 = blocks * t / nt * 16, n1 = t + 1 == nt ? c->N : blocks * (t + 1) / nt * 16;
    if (n1 > c->N) n1 = c->N;
    if (n0 < n1) cs_store(c, acc, nbuf, n0, n1);
}

/* colskip(dtype, wtype, path, nthreads, N, K, x, wt, wt_stride, thr, thr_len, bias, y) -> kept features
 * x [K] in dtype, wt [K, wt_stride] in wtype (wtype = dtype, or a 16-bit type under float32 x), thr float32 [thr_len]
 * with thr_len 0 (skip exact zeros), 1 or K; bias [N] in dtype or 0; y [N] in dtype. */
static PyObject *py_colskip(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 13) {
        PyErr_SetString(PyExc_TypeError, "colskip takes 13 integer arguments");
        return NULL;
    }
    int64_t a[13];
    if (parse_i64(args, 13, a)) return NULL;
    CsJob c;
    c.dtype = (int)a[0];
    c.wtype = (int)a[1];
    int path = (int)a[2], nthreads = (int)a[3];
    c.N = a[4];
    const int64_t K = a[5], thr_len = a[10];
    const void *x = (const void *)(uintptr_t)a[6];
    c.wt = (const void *)(uintptr_t)a[7];
    c.ws = a[8];
    const float *thr = (const float *)(uintptr_t)a[9];
    c.bias = (const void *)(uintptr_t)a[11];
    c.y = (void *)(uintptr_t)a[12];
    if (c.dtype < DT_F32 || c.dtype > DT_F16 || c.wtype < DT_F32 || c.wtype > DT_F16 ||
        (c.wtype != c.dtype && c.dtype != DT_F32) || c.N < 0 || K < 0 || c.ws < c.N ||
        !(thr_len == 0 || thr_len == 1 || thr_len == K) || (thr_len && !thr)) {
        PyErr_SetString(PyExc_ValueError, "colskip: inconsistent arguments");
        return NULL;
    }
    path = resolve_path(path);
    if ((path == PATH_AVX2 && !have_avx2()) ||
        ((path == PATH_AVX512 || path == PATH_AVX512F || path == PATH_AVX512W) && !have_avx512()) ||
        path < PATH_AUTO || path > PATH_AVX512W) {
        PyErr_SetString(PyExc_RuntimeError, "colskip: the requested vector path is missing on this CPU (or build)");
        return NULL;
    }
    int32_t *idx = (int32_t *)sc_aligned_alloc((size_t)(K + 1) * sizeof(int32_t));
    float *xv = (float *)sc_aligned_alloc((size_t)(K + 1) * sizeof(float));
    if (!idx || !xv) {
        sc_aligned_free(idx);
        sc_aligned_free(xv);
        return PyErr_NoMemory();
    }
    int64_t nact = 0;
    int oom = 0;
    Py_BEGIN_ALLOW_THREADS
    for (int64_t k = 0; k < K; ++k) { /* the fused threshold: the same comparison as ThresholdMask */
        const float v = load_f32(c.dtype, x, k);
        const int keep = thr_len ? !(fabsf(v) < thr[thr_len == 1 ? 0 : k]) : v != 0.0f;
        if (keep) {
            idx[nact] = (int32_t)k;
            xv[nact++] = v;
        }
    }
    c.idx = idx;
    c.xv = xv;
    c.nact = nact;
    const CsFn fn = cs_pick(c.wtype, path);
    int nt = 1;
#ifdef _OPENMP
    if (nthreads > 1 && (double)c.N * (double)(nact + 1) >= 65536.0) nt = nthreads;
#endif
    float *acc = c.N > 0 ? (float *)sc_aligned_alloc((size_t)nt * (size_t)c.N * sizeof(float)) : NULL;
    if (c.N > 0 && acc) {
#ifdef _OPENMP
        if (nt > 1) {
#pragma omp parallel num_threads(nt)
            {
                const int t = omp_get_thread_num(), team = omp_get_num_threads();
                if (team == nt) cs_part(&c, fn, acc, t, team);
                else if (t == 0) /* fewer threads than asked: thread 0 does it all */
                    for (int q = 0; q < nt; ++q) cs_part(&c, fn, acc, q, nt);
#pragma omp barrier
                if (team == nt) cs_sum(&c, acc, nt, t, team);
                else if (t == 0) cs_sum(&c, acc, nt, 0, 1);
            }
        } else
#endif
        {
            cs_part(&c, fn, acc, 0, 1);
            cs_sum(&c, acc, 1, 0, 1);
        }
    }
    oom = c.N > 0 && !acc;
    sc_aligned_free(acc);
    Py_END_ALLOW_THREADS
    (void)nthreads;
    sc_aligned_free(idx);
    sc_aligned_free(xv);
    if (oom) return PyErr_NoMemory();
    return PyLong_FromLongLong((long long)nact);
}
