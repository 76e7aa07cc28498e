/* The soft-target KL block on the CPU, in three passes over each row (distill.losses.native).
 *
 * For fp32 (or bf16) rows a = s / T and b = t / T of a (n, V) block, row by row:
 *   pass 1: the maxima m_a, m_b;
 *   pass 2: e_a = exp(a - m_a), e_b = exp(b - m_b) (kept in a per-call scratch), their sums Z_a, Z_b,
 *           and D = sum_v e_b (b - a);
 *   pass 3: g = e_a / Z_a - e_b / Z_b, written to g_out (fp32 or bf16) and added to the column sums.
 * The row's KL(softmax(b) || softmax(a)) is D / Z_b + (m_a + log Z_a) - (m_b + log Z_b), since the
 * teacher's probabilities sum to 1. A row of the vocabulary (30,522 floats is 122 KB) stays in the
 * core's L2 cache through the three passes; PyTorch's eager kernel makes about twenty passes over
 * (32, V) blocks that do not.
 *
 * Logits are floored at float32's min / 4 on reading (-inf from vocabulary padding would give
 * 0 * -inf = NaN); exp of anything below -87.3 is 0, as the probability of a floored logit is.
 * Compiled at first use with the machine's own ISA (-march=native); no PyTorch headers, called
 * through ctypes with the tensors' data pointers.
 *
 * Threads: the *_par entry points split the rows over OpenMP's threads. Built with -fopenmp, this
 * library needs libgomp.so.1, and the loader gives it the one PyTorch has already loaded: the row
 * ranges run on PyTorch's own intra-op threads. Any other threads would share the cores with PyTorch's
 * OpenMP worker, which spins for some milliseconds after each parallel op (the projection's matmul
 * just before): a (384, 30,522) fp32 block took 14 ms that way on 2 cores, against 8 ms alone.
 * Built without OpenMP (distill_openmp() is 0), or where the process ends up with a second libgomp, the
 * caller runs row ranges on threads of its own.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define FLOOR (-8.50705917e37f) /* float32 min / 4, as distill.losses.kernels.LOGIT_FLOOR */

static inline float bf16_to_float(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t float_to_bf16(float f) { /* round to nearest even, as torch (inputs are finite) */
    uint32_t u;
    memcpy(&u, &f, 4);
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* exp(x) for x <= 0, to about 2 ulp (Cephes' expf polynomial); 0 below -87.3. Branch-free, so
 * that the loops that call it vectorise. */
static inline float exp_nonpositive(float x) {
    float xc = x < -87.3f ? -87.3f : x;
    float n = floorf(xc * 1.44269504088896341f + 0.5f);
    float r = xc - n * 0.693359375f + n * 2.12194440e-4f;
    float r2 = r * r;
    float p = 1.9875691500E-4f;
    p = p * r + 1.3981999507E-3f;
    p = p * r + 8.3334519073E-3f;
    p = p * r + 4.1665795894E-2f;
    p = p * r + 1.6666665459E-1f;
    p = p * r + 5.0000001201E-1f;
    p = p * r2 + r + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, 4);
    return x < -87.3f ? 0.0f : p * scale;
}

static inline float floored(float x) { return x < FLOOR ? FLOOR : x; }

/* Rows [r0, r1) of the block. a, b: (n, V) row-major, fp32 (in_bf16 = 0) or bf16 bits (1).
 * g: (n, V) fp32 or bf16 bits (g_bf16), or NULL for the value only. rows: (n,) fp32 out.
 * colsum: (V,) fp32, added to (may be NULL). scratch: 2 V floats. */
void distill_kl_rows(const void *a, const void *b, int in_bf16, void *g, int g_bf16, float *rows, float *colsum,
                     float *scratch, int64_t r0, int64_t r1, int64_t V) {
    float *ea = scratch, *eb = scratch + V;
    for (int64_t r = r0; r < r1; r++) {
        const float *af = in_bf16 ? NULL : (const float *)a + r * V;
        const float *bf = in_bf16 ? NULL : (const float *)b + r * V;
        const uint16_t *ah = in_bf16 ? (const uint16_t *)a + r * V : NULL;
        const uint16_t *bh = in_bf16 ? (const uint16_t *)b + r * V : NULL;
        /* bf16 rows are widened once into the scratch (pass 0), then read as fp32 */
        if (in_bf16) {
            for (int64_t v = 0; v < V; v++) {
                ea[v] = bf16_to_float(ah[v]);
                eb[v] = bf16_to_float(bh[v]);
            }
            af = ea;
            bf = eb;
        }
        float ma = FLOOR, mb = FLOOR;
#pragma omp simd reduction(max : ma, mb)
        for (int64_t v = 0; v < V; v++) {
            float x = floored(af[v]), y = floored(bf[v]);
            ma = x > ma ? x : ma;
            mb = y > mb ? y : mb;
        }
        float za = 0.0f, zb = 0.0f, d = 0.0f;
#pragma omp simd reduction(+ : za, zb, d)
        for (int64_t v = 0; v < V; v++) {
            float x = floored(af[v]), y = floored(bf[v]);
            float p = exp_nonpositive(x - ma), q = exp_nonpositive(y - mb);
            ea[v] = p; /* in place over the widened bf16 row: read before written */
            eb[v] = q;
            za += p;
            zb += q;
            d += q * (y - x);
        }
        rows[r] = d / zb + (ma + logf(za)) - (mb + logf(zb));
        if (g == NULL)
            continue;
        float ia = 1.0f / za, ib = 1.0f / zb;
        if (g_bf16) {
            uint16_t *gr = (uint16_t *)g + r * V;
            if (colsum) {
#pragma omp simd
                for (int64_t v = 0; v < V; v++) {
                    float x = ea[v] * ia - eb[v] * ib;
                    gr[v] = float_to_bf16(x);
                    colsum[v] += x;
                }
            } else {
#pragma omp simd
                for (int64_t v = 0; v < V; v++)
                    gr[v] = float_to_bf16(ea[v] * ia - eb[v] * ib);
            }
        } else {
            float *gr = (float *)g + r * V;
            if (colsum) {
#pragma omp simd
                for (int64_t v = 0; v < V; v++) {
                    float x = ea[v] * ia - eb[v] * ib;
                    gr[v] = x;
                    colsum[v] += x;
                }
            } else {
#pragma omp simd
                for (int64_t v = 0; v < V; v++)
                    gr[v] = ea[v] * ia - eb[v] * ib;
            }
        }
    }
}

/* The student's side of the cached soft targets (distill.losses.cached), rows [r0, r1):
 * lse[r] = log sum_v exp(a[r, v]) and lse_tail[r] = log sum_{v not in ids[r]} exp(a[r, v]), the tail's
 * own sum (1 - the top's would cancel when the top k hold nearly all the mass). ids: (n, k) int64
 * of distinct tokens. scratch: V floats, all 1 on entry and on return (the mask of the tail). The logits are
 * a[r, v] * mul (mul = 1: a itself, exactly). */
void distill_softmax_stats_rows(const void *a, int in_bf16, float mul, const int64_t *ids, int64_t k, float *lse,
                                float *lse_tail, float *scratch, int64_t r0, int64_t r1, int64_t V) {
    float *keep = scratch;
    for (int64_t r = r0; r < r1; r++) {
        const float *af = in_bf16 ? NULL : (const float *)a + r * V;
        const uint16_t *ah = in_bf16 ? (const uint16_t *)a + r * V : NULL;
        const int64_t *ir = ids + r * k;
        float m = FLOOR;
        if (in_bf16) {
#pragma omp simd reduction(max : m)
            for (int64_t v = 0; v < V; v++) {
                float x = floored(bf16_to_float(ah[v]) * mul);
                m = x > m ? x : m;
            }
        } else {
#pragma omp simd reduction(max : m)
            for (int64_t v = 0; v < V; v++) {
                float x = floored(af[v] * mul);
                m = x > m ? x : m;
            }
        }
        for (int64_t j = 0; j < k; j++)
            keep[ir[j]] = 0.0f;
        float z = 0.0f, zt = 0.0f;
        if (in_bf16) {
#pragma omp simd reduction(+ : z, zt)
            for (int64_t v = 0; v < V; v++) {
                float e = exp_nonpositive(floored(bf16_to_float(ah[v]) * mul) - m);
                z += e;
                zt += keep[v] * e;
            }
        } else {
#pragma omp simd reduction(+ : z, zt)
            for (int64_t v = 0; v < V; v++) {
                float e = exp_nonpositive(floored(af[v] * mul) - m);
                z += e;
                zt += keep[v] * e;
            }
        }
        for (int64_t j = 0; j < k; j++)
            keep[ir[j]] = 1.0f;
        lse[r] = m + logf(z);
        lse_tail[r] = zt > 0.0f ? m + logf(zt) : -INFINITY;
    }
}

/* g[r, v] = alpha[r] * exp(a[r, v] * mul - shift[r]) for rows [r0, r1), into fp32 or bf16 g. */
void distill_scaled_exp_rows(const void *a, int in_bf16, float mul, const float *shift, const float *alpha, void *g,
                             int g_bf16, int64_t r0, int64_t r1, int64_t V) {
    for (int64_t r = r0; r < r1; r++) {
        const float s = shift[r], c = alpha[r];
        if (in_bf16 && g_bf16) {
            const uint16_t *ah = (const uint16_t *)a + r * V;
            uint16_t *gr = (uint16_t *)g + r * V;
#pragma omp simd
            for (int64_t v = 0; v < V; v++)
                gr[v] = float_to_bf16(c * exp_nonpositive(floored(bf16_to_float(ah[v]) * mul) - s));
        } else if (in_bf16) {
            const uint16_t *ah = (const uint16_t *)a + r * V;
            float *gr = (float *)g + r * V;
#pragma omp simd
            for (int64_t v = 0; v < V; v++)
                gr[v] = c * exp_nonpositive(floored(bf16_to_float(ah[v]) * mul) - s);
        } else if (g_bf16) {
            const float *af = (const float *)a + r * V;
            uint16_t *gr = (uint16_t *)g + r * V;
#pragma omp simd
            for (int64_t v = 0; v < V; v++)
                gr[v] = float_to_bf16(c * exp_nonpositive(floored(af[v] * mul) - s));
        } else {
            const float *af = (const float *)a + r * V;
            float *gr = (float *)g + r * V;
#pragma omp simd
            for (int64_t v = 0; v < V; v++)
                gr[v] = c * exp_nonpositive(floored(af[v] * mul) - s);
        }
    }
}

/* ------------------------------------------------------------------ the rows over OpenMP's threads */

int distill_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* This thread's share [*r0, *r1) of n rows, and its index (for its scratch and column sums). */
static inline int my_rows(int64_t n, int64_t *r0, int64_t *r1) {
    int i = 0, t = 1;
#ifdef _OPENMP
    i = omp_get_thread_num();
    t = omp_get_num_threads();
#endif
    *r0 = n * i / t;
    *r1 = n * (i + 1) / t;
    return i;
}

/* distill_kl_rows over rows [0, n) on up to `threads` threads; colsums (NULL or threads x V, each thread
 * adds to its own row of it) and scratch (threads x 2 V) are per thread. */
void distill_kl_rows_par(const void *a, const void *b, int in_bf16, void *g, int g_bf16, float *rows,
                         float *colsums, float *scratch, int64_t n, int64_t V, int threads) {
#pragma omp parallel num_threads(threads)
    {
        int64_t r0, r1;
        int i = my_rows(n, &r0, &r1);
        distill_kl_rows(a, b, in_bf16, g, g_bf16, rows, colsums ? colsums + i * V : NULL, scratch + i * 2 * V, r0,
                        r1, V);
    }
}

/* distill_softmax_stats_rows over rows [0, n); scratch: threads x V, all 1. */
void distill_softmax_stats_rows_par(const void *a, int in_bf16, float mul, const int64_t *ids, int64_t k, float *lse,
                                    float *lse_tail, float *scratch, int64_t n, int64_t V, int threads) {
#pragma omp parallel num_threads(threads)
    {
        int64_t r0, r1;
        int i = my_rows(n, &r0, &r1);
        distill_softmax_stats_rows(a, in_bf16, mul, ids, k, lse, lse_tail, scratch + i * V, r0, r1, V);
    }
}

/* distill_scaled_exp_rows over rows [0, n). */
void distill_scaled_exp_rows_par(const void *a, int in_bf16, float mul, const float *shift, const float *alpha,
                                 void *g, int g_bf16, int64_t n, int64_t V, int threads) {
#pragma omp parallel num_threads(threads)
    {
        int64_t r0, r1;
        my_rows(n, &r0, &r1);
        distill_scaled_exp_rows(a, in_bf16, mul, shift, alpha, g, g_bf16, r0, r1, V);
    }
}
