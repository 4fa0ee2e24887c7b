/* sparsecraft CPU kernels: y = x W^T (+ b) with W stored dense or as a per-row bitmask + packed values.
 *
 * Bitmask format (one output row at a time): `words` = ceil(K / 64) uint64 mask words per row (bit k of word w is
 * input column 64 w + k; padding bits are 0), the row's nonzero values packed contiguously in column order,
 * row r's values starting at rowptr[r]; the value array has >= 16 elements of padding after the last value.
 * Values and activations are float32, bfloat16 or float16; arithmetic is float32. Bitmask values may also be int8
 * with one float32 scale per row (symmetric): the row's dot product with the int8 values is multiplied by its scale
 * once, y = scale_r * (x . q_r) + b_r, with activations and outputs in the model's dtype.
 *
 * Paths: a portable scalar path (any C compiler, any CPU), an AVX2+FMA path (_avx2_template.h) and an AVX-512F
 * path (_avx512_kernels.h) for x86-64, compiled with function target attributes; the widest one the CPU and the OS
 * support is chosen at run time. Threads: OpenMP over output rows when the compiler has it
 * (the library links libgomp; after `import torch` that is torch's own libgomp, so both share one thread pool).
 *
 * This is a CPython extension module whose functions take raw addresses (tensor.data_ptr()) so that building it
 * needs no torch headers. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include "_kernels_common.h"
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__linux__)
#include <sys/mman.h>
#endif

#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
#define SC_HAVE_AVX2 1
#include <cpuid.h>
#include <immintrin.h>
#define SC_AVX2 __attribute__((target("avx2,fma,f16c,popcnt")))
#define SC_NOINLINE __attribute__((noinline))
#else
#define SC_HAVE_AVX2 0
#endif
/* AVX-512F needs a compiler that knows the target (GCC >= 5, clang) */
#if SC_HAVE_AVX2 && (defined(__clang__) || __GNUC__ >= 5)
#define SC_HAVE_AVX512 1
#define SC_AVX512 __attribute__((target("avx512f,avx2,fma,f16c,popcnt")))
#define SC_AVX512W __attribute__((target("avx512f,avx512bw,avx512vbmi2,avx2,fma,f16c,popcnt")))
#define SC_AVX512BF __attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi2,avx512bf16,avx2,fma,f16c,popcnt")))
#define SC_AVX512VN __attribute__((target("avx512f,avx512bw,avx512vbmi2,avx512vnni,avx2,fma,f16c,popcnt")))
#else
#define SC_HAVE_AVX512 0
#endif

/* ------------------------------------------------------------------ scalar path (portable reference) */
static void run_scalar(const Job *j, int64_t r0, int64_t r1) {
    const int64_t kp = j->words * 64;
    float *wrow = (float *)sc_aligned_alloc((size_t)kp * sizeof(float));
    if (!wrow) return;
    const size_t es = j->wtype == DT_F32 ? 4 : j->wtype == DT_I8 ? 1 : 2;
    for (int64_t r = r0; r < r1; ++r) {
        memset(wrow, 0, (size_t)kp * sizeof(float));
        if (j->format == FMT_BITMASK) {
            const uint64_t *mk = j->mask + r * j->words;
            int64_t pos = j->rowptr[r];
            for (int64_t w = 0; w < j->words; ++w)
                for (uint64_t u = mk[w]; u; u &= u - 1) {
                    int b = 0;
                    while (!((u >> b) & 1u)) ++b;
                    wrow[w * 64 + b] = load_f32(j->wtype, j->w, pos++);
                }
        } else {
            const char *row = (const char *)j->w + (size_t)(r * j->wstride) * es;
            for (int64_t k = 0; k < j->K; ++k) wrow[k] = load_f32(j->wtype, row, k);
        }
        for (int64_t m = 0; m < j->M; ++m) {
            const float *x = j->xf + m * kp;
            float s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
            for (int64_t k = 0; k < kp; k += 8)
                for (int i = 0; i < 8; ++i) s[i] += wrow[k + i] * x[k + i];
            store_out(j, m, r, ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7])));
        }
    }
    sc_aligned_free(wrow);
}

/* ------------------------------------------------------------------ AVX2 path */
#if SC_HAVE_AVX2
/* vpshufb controls: byte m -> 8 lanes; lane i takes packed value popcount(m & ((1 << i) - 1)) if bit i is set,
 * else 0 (control byte 0x80 writes zero). */
static uint8_t LUT_BF16[256][32] __attribute__((aligned(32))); /* fp32 lane = bf16 << 16 */
static uint8_t LUT_F16[256][16] __attribute__((aligned(16)));  /* 8 x fp16, then vcvtph2ps */
static int32_t LUT_F32[256][8] __attribute__((aligned(32)));   /* vpermps index; sign bit set = zero lane */
/* int8: byte 3 of lane i takes packed value popcount(m & ((1 << i) - 1)), bytes 0-2 zero: the lane is q * 2^24 as
 * int32, one vcvtdq2ps from fp32 (no sign extension step); the kernels multiply their sums by 2^-24 (exact) */
static uint8_t LUT_Q24[256][32] __attribute__((aligned(32)));

static void init_luts(void) {
    for (int m = 0; m < 256; ++m) {
        int p = 0;
        for (int i = 0; i < 8; ++i) {
            int on = (m >> i) & 1;
            LUT_BF16[m][4 * i + 0] = 0x80;
            LUT_BF16[m][4 * i + 1] = 0x80;
            LUT_BF16[m][4 * i + 2] = on ? (uint8_t)(2 * p) : 0x80;
            LUT_BF16[m][4 * i + 3] = on ? (uint8_t)(2 * p + 1) : 0x80;
            LUT_F16[m][2 * i + 0] = on ? (uint8_t)(2 * p) : 0x80;
            LUT_F16[m][2 * i + 1] = on ? (uint8_t)(2 * p + 1) : 0x80;
            LUT_F32[m][i] = on ? p : (int32_t)0x80000000u;
            LUT_Q24[m][4 * i + 0] = LUT_Q24[m][4 * i + 1] = LUT_Q24[m][4 * i + 2] = 0x80;
            LUT_Q24[m][4 * i + 3] = on ? (uint8_t)p : 0x80;
            p += on;
        }
    }
}

SC_AVX2 static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* Byte b of mask word u times 32: the offset of its 32-byte LUT row. */
#define LUTOFF(u, b) ((b) == 0 ? ((u) << 5) & 0x1fe0u : ((u) >> (8 * (b) - 5)) & 0x1fe0u)
/* Expand: the popcount(m) packed values at p placed at the set bits of mask byte m (zeros elsewhere), as 8 fp32
 * lanes. `off` is m * 32, the byte offset of m's LUT row (the f16 and int8 LUTs have 16- and 8-byte rows, so it is
 * divided by 2 and 4). */
SC_AVX2 static inline __m256 expandi_bf16(const uint16_t *p, uint64_t off) {
    __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_shuffle_epi8(v, _mm256_load_si256((const __m256i *)((const char *)LUT_BF16 + off))));
}
SC_AVX2 static inline __m256 expandi_f16(const uint16_t *p, uint64_t off) {
    __m128i c = _mm_load_si128((const __m128i *)((const char *)LUT_F16 + (off >> 1)));
    return _mm256_cvtph_ps(_mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)p), c));
}
SC_AVX2 static inline __m256 expandi_f32(const float *p, uint64_t off) {
    __m256i idx = _mm256_load_si256((const __m256i *)((const char *)LUT_F32 + off));
    __m256 v = _mm256_permutevar8x32_ps(_mm256_loadu_ps(p), idx);
    return _mm256_blendv_ps(v, _mm256_setzero_ps(), _mm256_castsi256_ps(idx));
}
/* int8: the 8 value bytes at p broadcast to both 128-bit lanes, placed as q * 2^24 per fp32 lane (see LUT_Q24); the
 * callers scale by EXPAND_SCALE = 2^-24. In a harness on a Zen 3 host this step ran 0.68 ns per 8 positions at 50%
 * against 0.85 ns for the vpshufb + vpmovsxbd + vcvtdq2ps form it replaced (the bf16 step: 0.68-0.86 ns). */
SC_AVX2 static inline __m256 expandi_i8(const int8_t *p, uint64_t off) { /* 8 bytes read */
    int64_t q;
    memcpy(&q, p, 8);
    const __m256i v = _mm256_set1_epi64x(q);
    return _mm256_cvtepi32_ps(_mm256_shuffle_epi8(v, _mm256_load_si256((const __m256i *)((const char *)LUT_Q24 + off))));
}
SC_AVX2 static inline __m256 load8_bf16(const uint16_t *p) {
    __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
}
SC_AVX2 static inline __m256 load8_f16(const uint16_t *p) {
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
}
SC_AVX2 static inline __m256 load8_f32(const float *p) { return _mm256_loadu_ps(p); }
SC_AVX2 static inline __m256 load8_i8(const int8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}

#define SFX f32
#define WT float
#include "_avx2_template.h"
#define SFX bf16
#define WT uint16_t
#include "_avx2_template.h"
#define SFX f16
#define WT uint16_t
#include "_avx2_template.h"
#define SFX i8
#define WT int8_t
#define EXPAND_SCALE (1.0f / 16777216.0f) /* expandi_i8 places q * 2^24 */
#include "_avx2_template.h"
#undef EXPAND_SCALE

static int cpu_avx2 = -1; /* avx2 + fma + f16c + popcnt, with OS support for ymm state */
static int detect_avx2(void) {
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return 0;
    int fma = (c >> 12) & 1, popcnt = (c >> 23) & 1, osxsave = (c >> 27) & 1, avx = (c >> 28) & 1,
        f16c = (c >> 29) & 1;
    if (!(fma && popcnt && osxsave && avx && f16c)) return 0;
    unsigned lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    if ((lo & 6u) != 6u) return 0; /* xmm and ymm state enabled by the OS */
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return 0;
    return (b >> 5) & 1; /* avx2 */
}
#endif

#if SC_HAVE_AVX512
#include "_avx512_kernels.h"

static int cpu_avx512 = -1; /* avx512f (with the AVX2 path's fma/f16c/popcnt), with OS support for zmm state */
static int detect_avx512(void) {
    unsigned a, b, c, d;
    if (!detect_avx2() || !__get_cpuid_count(7, 0, &a, &b, &c, &d) || !((b >> 16) & 1)) return 0;
    unsigned lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return (lo & 0xe6u) == 0xe6u; /* xmm, ymm, opmask, zmm 0-15 upper halves and zmm 16-31 enabled by the OS */
}
static int cpu_vbmi2 = -1; /* AVX-512F + BW + VBMI2 (vpexpandw) */
static int detect_vbmi2(void) {
    unsigned a, b, c, d;
    if (!cpu_avx512 || !__get_cpuid_count(7, 0, &a, &b, &c, &d)) return 0;
    return ((b >> 30) & 1) && ((c >> 6) & 1);
}
static int cpu_bf16 = -1, cpu_vnni = -1; /* with VBMI2: AVX512_BF16 (vdpbf16ps), AVX512_VNNI (vpdpbusd) */
static int detect_bf16(void) {
    unsigned a, b, c, d;
    if (!cpu_vbmi2 || !__get_cpuid_count(7, 1, &a, &b, &c, &d)) return 0;
    return (a >> 5) & 1;
}
static int detect_vnni(void) {
    unsigned a, b, c, d;
    if (!cpu_vbmi2 || !__get_cpuid_count(7, 0, &a, &b, &c, &d)) return 0;
    return (c >> 11) & 1;
}
#include "_avx512_dot_kernels.h"
#endif

static int have_avx2(void) {
#if SC_HAVE_AVX2
    return cpu_avx2;
#else
    return 0;
#endif
}

static int have_avx512(void) {
#if SC_HAVE_AVX512
    return cpu_avx512;
#else
    return 0;
#endif
}

static int have_vbmi2(void) {
#if SC_HAVE_AVX512
    return cpu_vbmi2;
#else
    return 0;
#endif
}

static int have_bf16(void) {
#if SC_HAVE_AVX512
    return cpu_bf16;
#else
    return 0;
#endif
}

static int have_vnni(void) {
#if SC_HAVE_AVX512
    return cpu_vnni;
#else
    return 0;
#endif
}

/* PATH_AUTO -> the widest path the CPU has (AVX-512, then AVX2, then scalar); other paths unchanged */
static int resolve_path(int path) {
    if (path != PATH_AUTO) return path;
    return have_avx512() ? PATH_AVX512 : have_avx2() ? PATH_AVX2 : PATH_SCALAR;
}

/* ------------------------------------------------------------------ driver */
typedef void (*RunFn)(const Job *, int64_t, int64_t);

/* stored value type (DT_F32, DT_BF16, DT_F16, DT_I8; checked by the caller) and path (PATH_SCALAR, PATH_AVX2,
 * PATH_AVX512 (with the VBMI2 kernels where the CPU has them, and for decode the BF16 / VNNI dot-product kernels of
 * _avx512_dot_kernels.h), PATH_AVX512W (VBMI2 but no dot-product kernels), PATH_AVX512F (neither); the vector
 * paths only once the CPU check passed) -> the per-thread driver. The kernels are written
 * per value type only: activations arrive as float32 (xf) and store_out writes the output dtype. */
static RunFn pick(int wtype, int path) {
#if SC_HAVE_AVX512
    static const RunFn avx512[] = {run_avx512_f32, run_avx512_bf16, run_avx512_f16, run_avx512_i8};
    static const RunFn avx512w[] = {run_avx512_f32, run_avx512w_bf16, run_avx512w_f16, run_avx512w_i8};
    if (path == PATH_AVX512) { /* decode on the dot-product instructions where the CPU has them */
        if (wtype == DT_BF16 && have_bf16()) return run_avx512x_bf16;
        if (wtype == DT_I8 && have_vnni()) return run_avx512x_i8;
    }
    if (path == PATH_AVX512 || path == PATH_AVX512W) return (have_vbmi2() ? avx512w : avx512)[wtype];
    if (path == PATH_AVX512F) return avx512[wtype];
#endif
#if SC_HAVE_AVX2
    static const RunFn avx2[] = {run_avx2_f32, run_avx2_bf16, run_avx2_f16, run_avx2_i8};
    if (path == PATH_AVX2) return avx2[wtype];
#endif
    (void)wtype;
    (void)path;
    return run_scalar;
}

#ifdef _OPENMP
/* First row of thread t's share, balancing packed values + mask words (bitmask) or rows (dense); even. */
static int64_t split_row(const Job *j, int t, int nt) {
    if (t <= 0) return 0;
    if (t >= nt) return j->N;
    int64_t r;
    if (j->format == FMT_BITMASK) {
        const int64_t per_row = 16 * j->words; /* a mask word costs about as much as 16 packed values */
        double total = (double)j->rowptr[j->N] + (double)per_row * (double)j->N;
        double goal = total * t / nt;
        int64_t lo = 0, hi = j->N;
        while (lo < hi) {
            int64_t mid = (lo + hi) / 2;
            if ((double)j->rowptr[mid] + (double)per_row * (double)mid < goal) lo = mid + 1;
            else hi = mid;
        }
        r = lo;
    } else {
        r = j->N * t / nt;
    }
    r &= ~(int64_t)1;
    return r;
}
#endif

static void run_job(const Job *j, RunFn fn, int nthreads) {
#ifdef _OPENMP
    /* below ~64k multiply-adds one thread finishes before a team would have started */
    if (nthreads > 1 && j->N >= 4 && (double)j->N * (double)j->K * (double)j->M >= 65536.0) {
#pragma omp parallel num_threads(nthreads)
        {
            int t = omp_get_thread_num(), nt = omp_get_num_threads();
            int64_t r0 = split_row(j, t, nt), r1 = split_row(j, t + 1, nt);
            if (r1 > r0) fn(j, r0, r1);
        }
        return;
    }
#endif
    (void)nthreads;
    fn(j, 0, j->N);
}

static int parse_i64(PyObject *const *args, Py_ssize_t n, int64_t *out) {
    for (Py_ssize_t i = 0; i < n; ++i) {
        out[i] = (int64_t)PyLong_AsLongLong(args[i]);
        if (out[i] == -1 && PyErr_Occurred()) return -1;
    }
    return 0;
}

/* matmul(dtype, format, path, nthreads, N, K, M, words, x, x_stride, mask, rowptr, w, w_stride, bias, y, y_stride
 *        [, wtype, scale])
 * Every pointer is an address (int); x is [M, x_stride] in dtype with K valid columns. wtype (default dtype) is the
 * stored values' type: dtype, DT_I8 (bitmask only) with scale the address of N float32 row scales, or a 16-bit type
 * under float32 activations (as the decode step runs them). */
static PyObject *py_matmul(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 17 && nargs != 19) {
        PyErr_SetString(PyExc_TypeError, "matmul takes 17 or 19 integer arguments");
        return NULL;
    }
    int64_t a[19];
    if (parse_i64(args, nargs, a)) return NULL;
    Job j;
    j.dtype = (int)a[0];
    j.wtype = nargs == 19 ? (int)a[17] : j.dtype;
    j.scale = nargs == 19 ? (const float *)(uintptr_t)a[18] : NULL;
    j.format = (int)a[1];
    int path = (int)a[2], nthreads = (int)a[3];
    j.N = a[4];
    j.K = a[5];
    j.M = a[6];
    j.words = a[7];
    const void *x = (const void *)(uintptr_t)a[8];
    int64_t xstride = a[9];
    j.mask = (const uint64_t *)(uintptr_t)a[10];
    j.rowptr = (const int64_t *)(uintptr_t)a[11];
    j.w = (const void *)(uintptr_t)a[12];
    j.wstride = a[13];
    j.bias = (const void *)(uintptr_t)a[14];
    j.y = (void *)(uintptr_t)a[15];
    j.ystride = a[16];
    if (j.dtype < DT_F32 || j.dtype > DT_F16 || j.format < FMT_DENSE || j.format > FMT_BITMASK || j.N < 0 ||
        j.K < 0 || j.M < 1 || j.words != (j.K + 63) / 64 || (j.format == FMT_BITMASK && !j.rowptr) ||
        (j.wtype != j.dtype && (j.wtype != DT_I8 || j.format != FMT_BITMASK) &&
         !(j.dtype == DT_F32 && (j.wtype == DT_BF16 || j.wtype == DT_F16))) || (j.wtype == DT_I8) != !!j.scale) {
        PyErr_SetString(PyExc_ValueError, "matmul: inconsistent arguments");
        return NULL;
    }
    path = resolve_path(path);
    if ((path == PATH_AVX2 && !have_avx2()) ||
        ((path == PATH_AVX512 || path == PATH_AVX512F || path == PATH_AVX512W) && !have_avx512()) ||
        path < PATH_AUTO || path > PATH_AVX512W) {
        PyErr_SetString(PyExc_RuntimeError, "matmul: the requested vector path is missing on this CPU (or build)");
        return NULL;
    }
    if (j.N == 0) Py_RETURN_NONE;
    const int64_t kp = j.words * 64, rows = j.M == 1 ? 1 : (j.M + TM - 1) / TM * TM;
    float *xf = (float *)sc_aligned_alloc((size_t)(rows * kp) * sizeof(float));
    if (!xf) return PyErr_NoMemory();
    Py_BEGIN_ALLOW_THREADS
    memset(xf, 0, (size_t)(rows * kp) * sizeof(float));
    for (int64_t m = 0; m < j.M; ++m) {
        float *dst = xf + m * kp;
        if (j.dtype == DT_F32) {
            memcpy(dst, (const float *)x + m * xstride, (size_t)j.K * sizeof(float));
        } else if (j.dtype == DT_BF16) {
            const uint16_t *src = (const uint16_t *)x + m * xstride;
            for (int64_t k = 0; k < j.K; ++k) dst[k] = to_f32_bf16(src[k]);
        } else {
            const uint16_t *src = (const uint16_t *)x + m * xstride;
            for (int64_t k = 0; k < j.K; ++k) dst[k] = to_f32_f16(src[k]);
        }
    }
    j.xf = xf;
    run_job(&j, pick(j.wtype, path), nthreads);
    Py_END_ALLOW_THREADS
    sc_aligned_free(xf);
    Py_RETURN_NONE;
}

/* pack(esize, N, K, words, w, s_row, s_col, rowptr, mask_out, vals_out): element (r, k) of W is at
 * w + (r * s_row + k * s_col) * esize; rowptr [N + 1] holds the prefix counts of nonzeros (sign bit ignored). */
static PyObject *py_pack(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 11) {
        PyErr_SetString(PyExc_TypeError, "pack takes 11 integer arguments");
        return NULL;
    }
    int64_t a[11];
    if (parse_i64(args, 11, a)) return NULL;
    int64_t es = a[0], N = a[1], K = a[2], words = a[3], srow = a[5], scol = a[6];
    int nthreads = (int)a[10];
    const char *w = (const char *)(uintptr_t)a[4];
    const int64_t *rowptr = (const int64_t *)(uintptr_t)a[7];
    uint64_t *mask = (uint64_t *)(uintptr_t)a[8];
    char *vals = (char *)(uintptr_t)a[9];
    if ((es != 2 && es != 4) || words != (K + 63) / 64) {
        PyErr_SetString(PyExc_ValueError, "pack: inconsistent arguments");
        return NULL;
    }
    int bad = 0;
    Py_BEGIN_ALLOW_THREADS
#ifdef _OPENMP
#pragma omp parallel for num_threads(nthreads) schedule(static) reduction(| : bad)
#endif
    for (int64_t r = 0; r < N; ++r) {
        uint64_t *mk = mask + r * words;
        memset(mk, 0, (size_t)words * 8);
        int64_t pos = rowptr[r];
        for (int64_t k = 0; k < K; ++k) {
            const char *src = w + (r * srow + k * scol) * es;
            int nz;
            if (es == 4) {
                uint32_t u;
                memcpy(&u, src, 4);
                nz = (u & 0x7fffffffu) != 0;
            } else {
                uint16_t u;
                memcpy(&u, src, 2);
                nz = (u & 0x7fffu) != 0;
            }
            if (nz) {
                mk[k >> 6] |= (uint64_t)1 << (k & 63);
                memcpy(vals + pos * es, src, (size_t)es);
                ++pos;
            }
        }
        if (pos != rowptr[r + 1]) bad |= 1;
    }
    Py_END_ALLOW_THREADS
    (void)nthreads;
    if (bad) {
        PyErr_SetString(PyExc_ValueError, "pack: row counts do not match the weight's nonzeros");
        return NULL;
    }
    Py_RETURN_NONE;
}

/* advise_hugepages(address, nbytes): ask Linux for transparent huge pages on the 2 MiB-aligned part of a buffer
 * that has not been touched yet (fewer TLB misses when a kernel streams it); a no-op elsewhere. */
static PyObject *py_advise_hugepages(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "advise_hugepages takes 2 integer arguments");
        return NULL;
    }
    int64_t a[2];
    if (parse_i64(args, 2, a)) return NULL;
    int done = 0;
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    const uintptr_t huge = (uintptr_t)2 << 20, start = ((uintptr_t)a[0] + huge - 1) & ~(huge - 1),
                    end = ((uintptr_t)a[0] + (uintptr_t)a[1]) & ~(huge - 1);
    if (end > start) done = madvise((void *)start, end - start, MADV_HUGEPAGE) == 0;
#endif
    return PyBool_FromLong(done);
}

static PyObject *py_info(PyObject *self, PyObject *unused) {
    (void)self;
    (void)unused;
#ifdef _OPENMP
    int omp = 1, maxthreads = omp_get_max_threads();
#else
    int omp = 0, maxthreads = 1;
#endif
    return Py_BuildValue("{s:i,s:i,s:i,s:i,s:i,s:i,s:i}", "avx2", have_avx2(), "avx512", have_avx512(),
                         "avx512_vbmi2", have_vbmi2(), "avx512_bf16", have_bf16(), "avx512_vnni", have_vnni(),
                         "openmp", omp, "max_threads", maxthreads);
}

#include <math.h>
#include "_decode_step.h" /* decode_step: a whole LLaMA-family decode step (sparsecraft.runtime.native) */
#include "_colskip.h"     /* colskip: the column-skipping GEMV of activation sparsity (kernels/colskip.py) */

static PyMethodDef methods[] = {
    {"matmul", (PyCFunction)(void (*)(void))py_matmul, METH_FASTCALL, "y = x W^T (+ b), raw addresses"},
    {"pack", (PyCFunction)(void (*)(void))py_pack, METH_FASTCALL, "pack a weight into the bitmask format"},
    {"advise_hugepages", (PyCFunction)(void (*)(void))py_advise_hugepages, METH_FASTCALL,
     "madvise(MADV_HUGEPAGE) the 2 MiB-aligned part of an untouched buffer"},
    {"info", py_info, METH_NOARGS, "build and CPU features"},
    {"colskip", (PyCFunction)(void (*)(void))py_colskip, METH_FASTCALL,
     "y = W (x masked by a threshold) + b reading only the kept features' rows of W^T"},
    {"decode_step", (PyCFunction)(void (*)(void))py_decode_step, METH_FASTCALL,
     "one LLaMA-family decode step (embedding .. logits) on the kernels"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_sparsekernels", "sparsecraft CPU kernels", -1, methods,
                                    NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__sparsekernels(void) {
#if SC_HAVE_AVX2
    init_luts();
    cpu_avx2 = detect_avx2();
#endif
#if SC_HAVE_AVX512
    cpu_avx512 = detect_avx512();
    cpu_vbmi2 = detect_vbmi2();
    cpu_bf16 = detect_bf16();
    cpu_vnni = detect_vnni();
#endif
    return PyModule_Create(&module);
}
