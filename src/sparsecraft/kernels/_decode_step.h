/* One decode step of a LLaMA-family model in one call (sparsecraft.runtime.native): embedding, every block
 * (RMSNorm, q/k/v projections, optional per-head q/k RMSNorm, RoPE, the KV cache write, attention, o projection,
 * RMSNorm, gated MLP, residuals), the final norm and lm_head, for one token. Activations, the KV cache and all
 * elementwise arithmetic are float32; the projections are the kernels' own jobs (dense or bitmask, any stored value
 * type) with float32 outputs, so the weights are read exactly as SparseLinear reads them. Included by
 * _sparsekernels.c after the kernels and the driver (Job, pick, run_job).
 *
 * The model is described by int64 arrays that the Python side fills from the model's modules:
 *   header: STEP_HEADER values (see the enum; H_ROUND_BF16: round the inputs of bf16 projections to bf16, see
 *           step_round_input), then the lm_head linear (LIN_FIELDS)
 *   layers: per block LAYER_FIELDS values: 7 linears (q, k, v, o, gate, up, down), then ln1, ln2, q_norm, k_norm
 *           (float32 weights, q/k norms 0 when absent), k cache, v cache (float32 [kv_heads, max_len, head_dim]),
 *           the sliding window (0: none)
 *   params: float64 [eps of the block norms, eps of the final norm, eps of the q/k norms, attention scale]
 * The attention stage includes the q/k norms and RoPE of the step (everything between the q/k/v and o projections). */
#include <time.h>

enum { LIN_FORMAT, LIN_WTYPE, LIN_N, LIN_K, LIN_MASK, LIN_ROWPTR, LIN_VALUES, LIN_WSTRIDE, LIN_SCALE, LIN_BIAS,
       LIN_FIELDS };
enum { H_LAYERS, H_HIDDEN, H_HEADS, H_KV_HEADS, H_HEAD_DIM, H_INTER, H_VOCAB, H_MAX_LEN, H_EMBED, H_EMBED_DTYPE,
       H_NORM, H_ROUND_BF16, STEP_HEADER };
enum { L_LINEARS = 0, L_LN1 = 7 * LIN_FIELDS, L_LN2, L_QN, L_KN, L_KCACHE, L_VCACHE, L_WINDOW, LAYER_FIELDS };

/* With round_bf16, the input x (K values) shared by the `count` projections at d (q/k/v, gate/up, or one) is rounded in
 * place to bf16 (round to nearest even) when one of them has bf16 values, as the model's own bf16 forward feeds
 * them: the kernels then take one vdpbf16ps per 32 values instead of two. x is only ever a projection's input. */
static void step_round_input(float *x, const int64_t *d, int count, int round_bf16) {
    int bf16 = 0;
    for (int i = 0; i < count; ++i) bf16 |= d[i * LIN_FIELDS + LIN_WTYPE] == DT_BF16;
    if (round_bf16 && bf16)
        for (int64_t i = 0; i < d[LIN_K]; ++i) x[i] = to_f32_bf16(from_f32_bf16(x[i]));
}

/* y[N] (float32) = W x (+ b) for x float32 padded with zeros to a multiple of 64 */
static void step_linear(const int64_t *d, const float *x, float *y, int path, int nthreads) {
    Job j;
    memset(&j, 0, sizeof(j));
    j.dtype = DT_F32;
    j.format = (int)d[LIN_FORMAT];
    j.wtype = (int)d[LIN_WTYPE];
    j.N = d[LIN_N];
    j.K = d[LIN_K];
    j.M = 1;
    j.words = (j.K + 63) / 64;
    j.xf = x;
    j.mask = (const uint64_t *)(uintptr_t)d[LIN_MASK];
    j.rowptr = (const int64_t *)(uintptr_t)d[LIN_ROWPTR];
    j.w = (const void *)(uintptr_t)d[LIN_VALUES];
    j.wstride = d[LIN_WSTRIDE];
    j.scale = (const float *)(uintptr_t)d[LIN_SCALE];
    j.bias = (const void *)(uintptr_t)d[LIN_BIAS];
    j.y = y;
    j.ystride = j.N;
    run_job(&j, pick(j.wtype, path), nthreads);
}

static void step_rmsnorm(const float *x, const float *w, float eps, int64_t n, float *out) {
    double ss = 0.0;
    for (int64_t i = 0; i < n; ++i) ss += (double)x[i] * x[i];
    const float r = 1.0f / sqrtf((float)(ss / (double)n) + eps);
    for (int64_t i = 0; i < n; ++i) out[i] = w[i] * (x[i] * r);
}

/* rotate_half RoPE on one head: cos/sin hold head_dim values (the two halves repeat the frequencies) */
static void step_rope(float *v, const float *cs, const float *sn, int64_t d) {
    const int64_t h = d / 2;
    for (int64_t i = 0; i < h; ++i) {
        const float a = v[i], b = v[i + h];
        v[i] = a * cs[i] - b * sn[i];
        v[i + h] = b * cs[i + h] + a * sn[i + h];
    }
}

static double step_now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}
/* with a timing array: seconds in the projections (lm_head included) and in attention (RoPE, cache write, scores,
 * softmax, weighted sum) are added to timing[0] and timing[1] */
#define TIMED(slot, stmt)                                                      \
    do {                                                                       \
        double t_ = timing ? step_now() : 0.0;                                 \
        stmt;                                                                  \
        if (timing) timing[slot] += step_now() - t_;                           \
    } while (0)

/* decode_step(header, layers, params, token, pos, cos, sin, logits, path, nthreads, timing) */
static PyObject *py_decode_step(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 11) {
        PyErr_SetString(PyExc_TypeError, "decode_step takes 11 integer arguments");
        return NULL;
    }
    int64_t a[11];
    if (parse_i64(args, 11, a)) return NULL;
    double *timing = (double *)(uintptr_t)a[10];
    const int64_t *hd = (const int64_t *)(uintptr_t)a[0], *layers = (const int64_t *)(uintptr_t)a[1];
    const double *params = (const double *)(uintptr_t)a[2];
    const int64_t token = a[3], pos = a[4];
    const float *cosv = (const float *)(uintptr_t)a[5], *sinv = (const float *)(uintptr_t)a[6];
    float *logits = (float *)(uintptr_t)a[7];
    int path = (int)a[8], nthreads = (int)a[9];
    const int rnd = (int)hd[H_ROUND_BF16];
    const int64_t L = hd[H_LAYERS], E = hd[H_HIDDEN], H = hd[H_HEADS], G = hd[H_KV_HEADS], D = hd[H_HEAD_DIM],
                  I = hd[H_INTER], V = hd[H_VOCAB], T = hd[H_MAX_LEN];
    if (token < 0 || token >= V || pos < 0 || pos >= T || G < 1 || H % G || D % 2) {
        PyErr_SetString(PyExc_ValueError, "decode_step: token or position out of range, or inconsistent heads");
        return NULL;
    }
    path = resolve_path(path);
    const int64_t pad = 64;
    int64_t wide = E > H * D ? E : H * D; /* the longest activation vector, plus zero padding */
    wide = (wide > I ? wide : I) + pad;
    /* x (residual), xn (normed input, padded), q, k, v, att (padded), g, u (padded), scores */
    float *buf = (float *)sc_aligned_alloc((size_t)(6 * wide + 2 * I + pad + H * T) * sizeof(float));
    if (!buf) return PyErr_NoMemory();
    Py_BEGIN_ALLOW_THREADS
    memset(buf, 0, (size_t)(6 * wide + 2 * I + pad + H * T) * sizeof(float));
    float *x = buf, *xn = x + wide, *q = xn + wide, *k = q + wide, *v = k + wide, *att = v + wide, *g = att + wide,
          *u = g + I + pad, *scores = u + I;
    const float eps = (float)params[0], eps_out = (float)params[1], eps_qk = (float)params[2],
                scale = (float)params[3];
    for (int64_t i = 0; i < E; ++i) x[i] = load_f32((int)hd[H_EMBED_DTYPE], (const void *)(uintptr_t)hd[H_EMBED],
                                                    token * E + i);
    const int64_t group = H / G;
    for (int64_t l = 0; l < L; ++l) {
        const int64_t *ly = layers + l * LAYER_FIELDS;
        const int64_t *lin = ly + L_LINEARS;
        step_rmsnorm(x, (const float *)(uintptr_t)ly[L_LN1], eps, E, xn);
        step_round_input(xn, lin, 3, rnd);
        TIMED(0, step_linear(lin + 0 * LIN_FIELDS, xn, q, path, nthreads);
              step_linear(lin + 1 * LIN_FIELDS, xn, k, path, nthreads);
              step_linear(lin + 2 * LIN_FIELDS, xn, v, path, nthreads));
        const double t_attn = timing ? step_now() : 0.0;
        const float *qn = (const float *)(uintptr_t)ly[L_QN], *kn = (const float *)(uintptr_t)ly[L_KN];
        float *kc = (float *)(uintptr_t)ly[L_KCACHE], *vc = (float *)(uintptr_t)ly[L_VCACHE];
        for (int64_t h = 0; h < H; ++h) {
            if (qn) step_rmsnorm(q + h * D, qn, eps_qk, D, q + h * D);
            step_rope(q + h * D, cosv, sinv, D);
        }
        for (int64_t h = 0; h < G; ++h) {
            if (kn) step_rmsnorm(k + h * D, kn, eps_qk, D, k + h * D);
            step_rope(k + h * D, cosv, sinv, D);
            memcpy(kc + (h * T + pos) * D, k + h * D, (size_t)D * sizeof(float));
            memcpy(vc + (h * T + pos) * D, v + h * D, (size_t)D * sizeof(float));
        }
        const int64_t window = ly[L_WINDOW], t0 = window > 0 && pos - window + 1 > 0 ? pos - window + 1 : 0;
#ifdef _OPENMP
#pragma omp parallel for num_threads(nthreads) schedule(static) if (H * (pos - t0 + 1) * D > 32768)
#endif
        for (int64_t h = 0; h < H; ++h) {
            const float *qh = q + h * D, *kh = kc + (h / group) * T * D, *vh = vc + (h / group) * T * D;
            float *s = scores + h * T, *o = att + h * D, mx = -INFINITY, sum = 0.0f;
            for (int64_t t = t0; t <= pos; ++t) {
                float dot = 0.0f;
                for (int64_t i = 0; i < D; ++i) dot += qh[i] * kh[t * D + i];
                s[t] = dot * scale;
                mx = s[t] > mx ? s[t] : mx;
            }
            for (int64_t t = t0; t <= pos; ++t) {
                s[t] = expf(s[t] - mx);
                sum += s[t];
            }
            for (int64_t i = 0; i < D; ++i) o[i] = 0.0f;
            for (int64_t t = t0; t <= pos; ++t) {
                const float p = s[t] / sum;
                for (int64_t i = 0; i < D; ++i) o[i] += p * vh[t * D + i];
            }
        }
        if (timing) timing[1] += step_now() - t_attn;
        step_round_input(att, lin + 3 * LIN_FIELDS, 1, rnd);
        TIMED(0, step_linear(lin + 3 * LIN_FIELDS, att, xn, path, nthreads));
        for (int64_t i = 0; i < E; ++i) x[i] += xn[i];
        step_rmsnorm(x, (const float *)(uintptr_t)ly[L_LN2], eps, E, xn);
        step_round_input(xn, lin + 4 * LIN_FIELDS, 2, rnd);
        TIMED(0, step_linear(lin + 4 * LIN_FIELDS, xn, g, path, nthreads);
              step_linear(lin + 5 * LIN_FIELDS, xn, u, path, nthreads));
        for (int64_t i = 0; i < I; ++i) g[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
        step_round_input(g, lin + 6 * LIN_FIELDS, 1, rnd);
        TIMED(0, step_linear(lin + 6 * LIN_FIELDS, g, xn, path, nthreads));
        for (int64_t i = 0; i < E; ++i) x[i] += xn[i];
    }
    step_rmsnorm(x, (const float *)(uintptr_t)hd[H_NORM], eps_out, E, xn);
    step_round_input(xn, hd + STEP_HEADER, 1, rnd);
    TIMED(0, step_linear(hd + STEP_HEADER, xn, logits, path, nthreads));
    Py_END_ALLOW_THREADS
    sc_aligned_free(buf);
    Py_RETURN_NONE;
}
