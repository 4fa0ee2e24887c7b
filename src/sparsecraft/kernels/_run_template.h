/* The per-thread driver of one vector ISA and stored weight value type: output rows [r0, r1) for all M x rows, calling
 * that ISA's kernels. Included at the end of _avx2_template.h / _avx512_template.h, which define
 *   FN(name)   the name with the ISA and value type suffix; SFX that suffix (f32, bf16, f16, i8); WT the stored type
 *   ISA_ATTR   the function target attribute; VEC the vector type; VHSUM(v) its horizontal sum; LANES its fp32 lanes
 * and the kernels FN(bm_gemv_row) (bitmask decode, one weight row), FN(dn_gemv_row) (dense over [0, kv), kv = K
 * rounded down to LANES), FN(bm_tile) and FN(dn_tile). Undefines those macros at its end. */

/* ---- one thread's share: output rows [r0, r1) for all M x rows ---- */
ISA_ATTR static void FN(run)(const Job *j, int64_t r0, int64_t r1) {
    const int bitmask = j->format == FMT_BITMASK;
    const WT *vals = (const WT *)j->w;
    const int64_t words = j->words, kp = words * 64, kv = j->K & ~(int64_t)(LANES - 1);
    if (j->M == 1) {
        const float *x = j->xf;
        if (!bitmask) { /* dense decode: one weight row at a time, a single sequential stream per thread */
            for (int64_t r = r0; r < r1; ++r) {
                float o = FN(dn_gemv_row)(x, vals + r * j->wstride, kv);
                for (int64_t k = kv; k < j->K; ++k) o += CAT(to_f32, SFX)(vals[r * j->wstride + k]) * x[k];
                store_out(j, 0, r, o);
            }
            return;
        }
        const float *xr = x; /* the bitmask row kernel's x */
#ifdef ROW_X_PERMUTE
        float *xperm = (float *)sc_aligned_alloc((size_t)kp * sizeof(float));
        if (!xperm) return;
        ROW_X_PERMUTE(x, xperm, kp);
        xr = xperm;
#endif
        for (int64_t r = r0; r < r1; ++r)
            store_out(j, 0, r, FN(bm_gemv_row)(xr, j->mask + r * words, vals + j->rowptr[r], words));
#ifdef ROW_X_PERMUTE
        sc_aligned_free(xperm);
#endif
        return;
    }
    /* GEMM: blocks of RB output rows; K in blocks of KBW words (x tile stays in L1); x in tiles of TM rows */
    enum { RB = 16, KBW = 16, NACC = 2 * TM };
    const int64_t tiles = (j->M + TM - 1) / TM;
    VEC *acc = (VEC *)sc_aligned_alloc((size_t)tiles * (RB / 2) * NACC * sizeof(VEC));
    if (!acc) return;
    const WT *cur[RB], *nxt[RB];
    for (int64_t rb = r0; rb < r1; rb += RB) {
        int64_t re = rb + RB < r1 ? rb + RB : r1, npairs = (re - rb + 1) / 2;
        memset(acc, 0, (size_t)tiles * (RB / 2) * NACC * sizeof(VEC));
        if (bitmask)
            for (int64_t r = rb; r < re; ++r) cur[r - rb] = vals + j->rowptr[r];
        int64_t kend = bitmask ? words : kv, kstep = bitmask ? KBW : KBW * 64;
        for (int64_t ka = 0; ka < kend; ka += kstep) {
            int64_t kb = ka + kstep < kend ? ka + kstep : kend;
            /* x tile outermost: its TM rows x KBW words stay in L1 while the weight block (in L2) streams by */
            for (int64_t t = 0; t < tiles; ++t) {
                const float *xt = j->xf + t * TM * kp;
                for (int64_t p = 0; p < npairs; ++p) {
                    int64_t ra = rb + 2 * p, rs = ra + 1 < re ? ra + 1 : ra;
                    VEC *a = acc + (t * (RB / 2) + p) * NACC;
                    if (bitmask) {
                        const WT *v0 = cur[ra - rb], *v1 = cur[rs - rb];
                        FN(bm_tile)(xt, kp, j->mask + ra * words, j->mask + rs * words, &v0, &v1, ka, kb, a);
                        if (t == tiles - 1) {
                            nxt[ra - rb] = v0;
                            nxt[rs - rb] = v1;
                        }
                    } else {
                        FN(dn_tile)(xt, kp, vals + ra * j->wstride, vals + rs * j->wstride, ka, kb, a);
                    }
                }
            }
            if (bitmask) memcpy(cur, nxt, sizeof(cur));
        }
        for (int64_t p = 0; p < npairs; ++p) {
            int64_t ra = rb + 2 * p, rs = ra + 1 < re ? ra + 1 : ra;
            for (int64_t m = 0; m < j->M; ++m) {
                const VEC *a = acc + ((m / TM) * (RB / 2) + p) * NACC + (m % TM) * 2;
                float o0 = VHSUM(a[0]), o1 = VHSUM(a[1]);
#ifdef EXPAND_SCALE
                if (bitmask) { /* the ISA's expanded values were scaled (a power of two) */
                    o0 *= EXPAND_SCALE;
                    o1 *= EXPAND_SCALE;
                }
#endif
                if (!bitmask) {
                    const float *x = j->xf + m * kp;
                    for (int64_t k = kv; k < j->K; ++k) {
                        o0 += CAT(to_f32, SFX)(vals[ra * j->wstride + k]) * x[k];
                        o1 += CAT(to_f32, SFX)(vals[rs * j->wstride + k]) * x[k];
                    }
                }
                store_out(j, m, ra, o0);
                if (rs != ra) store_out(j, m, rs, o1);
            }
        }
    }
    sc_aligned_free(acc);
}

/* the including ISA template's macros end here */
#undef FN
#undef ISA_ATTR
#undef VEC
#undef VHSUM
#undef LANES
#undef VZERO
#undef VLOADU
#undef VFMA
#undef VADD
#undef LOADV
#undef CAT
#undef CAT_
