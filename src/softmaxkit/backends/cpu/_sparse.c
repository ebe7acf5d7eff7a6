/* Sparsemax / 1.5-entmax rows and their Fenchel-Young losses for CPUs: softmaxkit's CPU fast path.
 *
 * Plain C99 (no Python or torch headers), compiled on first use by softmaxkit/backends/cpu/_build.py and
 * called through ctypes on raw tensor pointers; each call handles rows [start, stop), so Python splits the
 * rows over threads (ctypes releases the GIL).
 *
 * Both maps are p_j = φ(v_j − t) in shifted, scaled coordinates v_j = (x_j − m)·c with m = max_j x_j:
 *
 *   sparsemax   c = 1,   φ(d) = d_+      (p = [x − τ]_+,        τ = m + t)
 *   1.5-entmax  c = 1/2, φ(d) = d_+²     (p = [(x − τ)/2]_+²,   τ = m + 2t)
 *
 * with t the unique root of Σ_j φ(v_j − t) = 1. Since max_j p_j = φ(−t) <= 1, t >= −1: the support {v > t}
 * lies in the candidate set {v > −1} (x > m − 1, resp. x > m − 2).
 *
 * Per row (linear time, no full sort):
 *   1. max pass: m. A row with a NaN, a +inf, or every entry −inf has no solution: its p, t, loss and
 *      gradients are NaN, every entry of the row (the PyTorch path gives NaN too, in entries that depend on
 *      its top-k order).
 *   2. candidate pass: the v > −1 are compacted into the per-thread scratch row (capacity C: any count,
 *      all-equal rows included); with AVX-512 by a compare and a register compress per 16 entries.
 *   3. filter passes on the candidate set S (which always contains the support): a lower bound t' <= t from S
 *      (sparsemax: Michelot's (Σ_S v − 1)/|S|; 1.5-entmax: the larger of a Newton step on the convex,
 *      decreasing Σ_S φ(v − t) − 1 from the current bound, and mean_S − 1/√|S| from Cauchy–Schwarz), then
 *      S ← {v ∈ S : v > t' − margin}. The margin covers the rounding of t' (a few ulps times |S|), so no
 *      support entry is ever dropped; it stops when nothing more is dropped.
 *   4. the few survivors are sorted (insertion sort; qsort past 32) and t comes from the sorted closed form,
 *      exact on any superset of the support (Martins & Astudillo 2016; Peters et al. 2019, Alg. 2):
 *        sparsemax: s = max{j : 1 + j·v_(j) > Σ_{i<=j} v_(i)},  t = (Σ_{i<=s} v_(i) − 1)/s;
 *        1.5-entmax: t_j = μ_j − √max(0, (1 − M_j)/j) (μ_j, M_j the mean and Σ(v − μ_j)² of the j largest,
 *                    by Welford's update), s = max{j : t_j <= v_(j)}, t = t_s.
 *   5. output pass: p = φ(v − t); the loss needs no pass: from the sorted support,
 *        sparsemax  ℓ = (1 + Σ p²)/2 − (x_y − τ),  Σ p² = Σ_{i<=s}(v_(i) − t)²;
 *        1.5-entmax ℓ = (2/3) Σ p^{3/2} + 4/3 − (x_y − τ),  Σ p^{3/2} = Σ_{i<=s}(v_(i) − t)³.
 *
 * Backward of the map, from the saved output p and the upstream g, two passes and no temporaries:
 *   grad = s ⊙ (g − Σ s g / Σ s),  s = 1[p > 0] (sparsemax) or √p (1.5-entmax).
 * Backward of the losses recomputes p from x and the row's (m, t): grad = scale·(p − e_y), one pass.
 *
 * fp16/bf16 are computed in fp32, float64 in float64; results are rounded once to the input's dtype. The
 * threshold solve (every sum over the candidates, t itself, the loss) is double for every dtype: over a
 * wide near-uniform row (C ~ 10^5 candidates within 1 of the max) an fp32 prefix sum is off by units, and
 * fp32 rounding of t alone shifts every one of the C entries by the same ulp. The (m, t) row statistics
 * are double; the output pass subtracts t as t_hi + t_lo in the compute type, so it stays vectorised.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__F16C__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#define TILE 512
#define LANES 16
#define SMALL_SORT 32
#define MAX_FILTER_PASSES 64

#define KIND_SPARSEMAX 0
#define KIND_ENTMAX15 1

/* ------------------------------------------------------------------------------------- dtype converters */
#include "_dtypes.h" /* load_/store_bf16 and _f16, shared with _cross_entropy.c */

/* Tile access: VIEW gives a tile of the input in the compute type (the input itself for f32/f64, else
 * converted into buf); TARGET gives where to compute an output tile (the output itself for f32/f64, else
 * buf) and COMMIT rounds buf into the output (nothing to do for f32/f64). */
#define SAME_TYPE_ACCESS(T)                                                                                  \
    static inline const T *view_##T(const T *src, T *buf, int64_t n) {                                        \
        (void)buf, (void)n;                                                                                   \
        return src;                                                                                           \
    }                                                                                                         \
    static inline T *target_##T(T *dst, T *buf) {                                                            \
        (void)buf;                                                                                            \
        return dst;                                                                                           \
    }                                                                                                         \
    static inline void commit_##T(const T *buf, T *dst, int64_t n) { (void)buf, (void)dst, (void)n; }
SAME_TYPE_ACCESS(float)
SAME_TYPE_ACCESS(double)

#define CONVERTED_ACCESS(NAME)                                                                               \
    static inline const float *view_##NAME(const uint16_t *src, float *buf, int64_t n) {                     \
        load_##NAME(src, buf, n);                                                                             \
        return buf;                                                                                           \
    }                                                                                                         \
    static inline float *target_##NAME(uint16_t *dst, float *buf) {                                           \
        (void)dst;                                                                                            \
        return buf;                                                                                           \
    }                                                                                                         \
    static inline void commit_##NAME(const float *buf, uint16_t *dst, int64_t n) { store_##NAME(buf, dst, n); }
CONVERTED_ACCESS(bf16)
CONVERTED_ACCESS(f16)

/* ------------------------------------------------------------------------------ tile arithmetic (ACC_T) */
/* One set per compute type (F: f for float, d for double). Every loop is branch-free over a tile already
 * converted to the compute type, so it vectorises; `kind` is decided outside the loops. */
#define DEFINE_TILE_OPS(F, ACC_T, SQRT)                                                                      \
    static inline int descending_##F(const void *a, const void *b) {                                          \
        ACC_T x = *(const ACC_T *)a, y = *(const ACC_T *)b;                                                   \
        return (x < y) - (x > y);                                                                             \
    }                                                                                                         \
                                                                                                              \
    static void sort_descending_##F(ACC_T *v, int64_t n) {                                                    \
        if (n > SMALL_SORT) {                                                                                 \
            qsort(v, (size_t)n, sizeof(ACC_T), descending_##F);                                               \
            return;                                                                                           \
        }                                                                                                     \
        for (int64_t i = 1; i < n; i++) {                                                                     \
            ACC_T key = v[i];                                                                                 \
            int64_t j = i - 1;                                                                                \
            while (j >= 0 && v[j] < key) {                                                                    \
                v[j + 1] = v[j];                                                                              \
                j--;                                                                                          \
            }                                                                                                 \
            v[j + 1] = key;                                                                                   \
        }                                                                                                     \
    }                                                                                                         \
                                                                                                              \
    /* lane-wise running max over a tile; `nan` lanes count NaN entries. (Accumulators are copied into locals \
     * so that the LANES-wide inner loops vectorise.) */                                                      \
    static inline void tile_max_##F(const ACC_T *restrict buf, int64_t n, ACC_T *restrict acc_out,            \
                                    ACC_T *restrict nan_out) {                                                \
        ACC_T acc[LANES], nan[LANES];                                                                         \
        memcpy(acc, acc_out, sizeof acc);                                                                     \
        memcpy(nan, nan_out, sizeof nan);                                                                     \
        int64_t j = 0;                                                                                        \
        for (; j + LANES <= n; j += LANES)                                                                    \
            for (int k = 0; k < LANES; k++) {                                                                 \
                ACC_T v = buf[j + k];                                                                         \
                acc[k] = v > acc[k] ? v : acc[k];                                                             \
                nan[k] += v != v ? (ACC_T)1 : (ACC_T)0;                                                       \
            }                                                                                                 \
        for (; j < n; j++) {                                                                                  \
            acc[0] = buf[j] > acc[0] ? buf[j] : acc[0];                                                       \
            nan[0] += buf[j] != buf[j] ? (ACC_T)1 : (ACC_T)0;                                                 \
        }                                                                                                     \
        memcpy(acc_out, acc, sizeof acc);                                                                     \
        memcpy(nan_out, nan, sizeof nan);                                                                     \
    }                                                                                                         \
                                                                                                              \
    /* append v = (x − m)·c to cand[count..] where v > −1; returns the new count. A vector test per block of \
     * LANES skips the (usual) blocks without a candidate; cand has room for every entry of the row. */      \
    static inline int64_t tile_collect_portable_##F(const ACC_T *restrict buf, int64_t n, ACC_T m, ACC_T c,  \
                                                    ACC_T *restrict cand, int64_t count) {                    \
        int64_t j = 0;                                                                                        \
        for (; j + LANES <= n; j += LANES) {                                                                  \
            int hit = 0;                                                                                      \
            for (int k = 0; k < LANES; k++) hit |= (buf[j + k] - m) * c > (ACC_T)-1;                          \
            if (!hit) continue;                                                                               \
            for (int k = 0; k < LANES; k++) {                                                                 \
                ACC_T v = (buf[j + k] - m) * c;                                                               \
                cand[count] = v;                                                                              \
                count += v > (ACC_T)-1;                                                                       \
            }                                                                                                 \
        }                                                                                                     \
        for (; j < n; j++) {                                                                                  \
            ACC_T v = (buf[j] - m) * c;                                                                       \
            cand[count] = v;                                                                                  \
            count += v > (ACC_T)-1;                                                                           \
        }                                                                                                     \
        return count;                                                                                         \
    }                                                                                                         \
                                                                                                              \
    /* out = w·φ((x − m)·c − t) (w = 1 for the map), t = t_hi + t_lo given as two ACC_T (the float64 t of  \
     * an fp32 row without a float64 pass: v − t_hi is exact near the threshold, so t's precision reaches    \
     * every entry); NaN m and t (no solution) give NaN */                                                   \
    static inline void tile_probabilities_##F(const ACC_T *restrict x, ACC_T *restrict out, int64_t n,        \
                                              int64_t kind, ACC_T m, ACC_T c, ACC_T t_hi, ACC_T t_lo,         \
                                              ACC_T w) {                                                      \
        if (kind == KIND_SPARSEMAX) {                                                                         \
            for (int64_t j = 0; j < n; j++) {                                                                 \
                ACC_T d = ((x[j] - m) - t_hi) - t_lo;                                                         \
                out[j] = w * (d < 0 ? 0 : d);                                                                 \
            }                                                                                                 \
        } else {                                                                                              \
            for (int64_t j = 0; j < n; j++) {                                                                 \
                ACC_T d = ((x[j] - m) * c - t_hi) - t_lo;                                                     \
                d = d < 0 ? 0 : d;                                                                            \
                out[j] = w * (d * d);                                                                         \
            }                                                                                                 \
        }                                                                                                     \
    }                                                                                                         \
                                                                                                              \
    /* s = 1[p > 0] (sparsemax) or √p (1.5-entmax) over a tile of p; NaN stays NaN */                         \
    static inline void tile_derivative_weights_##F(const ACC_T *restrict p, ACC_T *restrict s, int64_t n,     \
                                                   int64_t kind) {                                            \
        if (kind == KIND_SPARSEMAX) {                                                                         \
            for (int64_t j = 0; j < n; j++) s[j] = p[j] > 0 ? (ACC_T)1 : p[j] != p[j] ? p[j] : (ACC_T)0;     \
        } else {                                                                                              \
            for (int64_t j = 0; j < n; j++) s[j] = SQRT(p[j]);                                                \
        }                                                                                                     \
    }                                                                                                         \
                                                                                                              \
    /* lane-wise Σ s and Σ s·g over a tile, accumulated in double */                                          \
    static inline void tile_jvp_sums_##F(const ACC_T *restrict s, const ACC_T *restrict g, int64_t n,         \
                                         double *restrict acc_s_out, double *restrict acc_sg_out) {           \
        double acc_s[LANES], acc_sg[LANES];                                                                   \
        memcpy(acc_s, acc_s_out, sizeof acc_s);                                                               \
        memcpy(acc_sg, acc_sg_out, sizeof acc_sg);                                                            \
        int64_t j = 0;                                                                                        \
        for (; j + LANES <= n; j += LANES)                                                                    \
            for (int k = 0; k < LANES; k++) {                                                                 \
                acc_s[k] += (double)s[j + k];                                                                 \
                acc_sg[k] += (double)s[j + k] * (double)g[j + k];                                             \
            }                                                                                                 \
        for (; j < n; j++) {                                                                                  \
            acc_s[0] += (double)s[j];                                                                         \
            acc_sg[0] += (double)s[j] * (double)g[j];                                                         \
        }                                                                                                     \
        memcpy(acc_s_out, acc_s, sizeof acc_s);                                                               \
        memcpy(acc_sg_out, acc_sg, sizeof acc_sg);                                                            \
    }                                                                                                         \
                                                                                                              \
    /* The threshold t (in v = (x − m)·c coordinates) from the candidates cand[0..n), a superset of the      \
     * support holding v > −1: filter passes, then the sorted closed form (module comment). Every sum and t \
     * itself are double whatever ACC_T is: the sums run over up to C near-equal entries. Returns the        \
     * support size s >= 1 and leaves the support's v sorted descending in cand[0..s). */                     \
    static int64_t solve_candidates_##F(ACC_T *cand, int64_t n, int64_t kind, double *t_out) {                \
        double t = -1; /* a lower bound of the threshold throughout */                                        \
        for (int pass = 0; pass < MAX_FILTER_PASSES && n > 1; pass++) {                                       \
            double sum = 0, sd = 0, sd2 = 0;                                                                  \
            for (int64_t i = 0; i < n; i++) {                                                                 \
                double v = (double)cand[i], d = v - t;                                                        \
                d = d > 0 ? d : 0;                                                                            \
                sum += v, sd += d, sd2 += d * d;                                                              \
            }                                                                                                 \
            double bound;                                                                                     \
            if (kind == KIND_SPARSEMAX) {                                                                     \
                bound = (sum - 1) / (double)n; /* Michelot: Σ_S (v − τ) <= Σ_S (v − τ)_+ = 1 */               \
            } else {                                                                                          \
                /* Cauchy–Schwarz: Σ_S (v − τ) <= Σ (v − τ)_+ <= √|S| (Σ (v − τ)_+²)^{1/2} = √|S| */          \
                bound = sum / (double)n - 1 / sqrt((double)n);                                                \
                /* Newton on the convex, decreasing F(t) = Σ (v − t)_+² − 1 from a point left of the root */  \
                double newton = sd > 0 ? t + (sd2 - 1) / (2 * sd) : t;                                        \
                bound = newton > bound ? newton : bound;                                                      \
            }                                                                                                 \
            if (bound > t) t = bound;                                                                         \
            /* the double sums err by at most ~n ulps of 1 (every |v| <= 1, every d <= 1): keep a wider band */\
            const double cut = t - 4 * 2.220446049250313e-16 * (double)(n + 4);                               \
            int64_t kept = 0;                                                                                 \
            for (int64_t i = 0; i < n; i++) {                                                                 \
                ACC_T v = cand[i];                                                                            \
                cand[kept] = v;                                                                               \
                kept += (double)v > cut;                                                                      \
            }                                                                                                 \
            if (kept == n) break;                                                                             \
            n = kept;                                                                                         \
        }                                                                                                     \
        sort_descending_##F(cand, n);                                                                         \
        int64_t s = 1;                                                                                        \
        if (kind == KIND_SPARSEMAX) {                                                                         \
            double cumulative = 0, chosen = (double)cand[0];                                                  \
            for (int64_t j = 1; j <= n; j++) {                                                                \
                cumulative += (double)cand[j - 1];                                                            \
                if (1 + (double)j * (double)cand[j - 1] > cumulative) s = j, chosen = cumulative;             \
            }                                                                                                 \
            t = (chosen - 1) / (double)s;                                                                     \
        } else {                                                                                              \
            double mean = 0, m2 = 0;                                                                          \
            t = (double)cand[0] - 1;                                                                          \
            for (int64_t j = 1; j <= n; j++) {                                                                \
                double v = (double)cand[j - 1], delta = v - mean;                                             \
                mean += delta / (double)j; /* Welford: mean and Σ (v − mean)² of the j largest */             \
                m2 += delta * (v - mean);                                                                     \
                double slack = (1 - m2) / (double)j;                                                          \
                double tau_j = mean - sqrt(slack > 0 ? slack : 0);                                            \
                if (tau_j <= v) s = j, t = tau_j;                                                             \
            }                                                                                                 \
        }                                                                                                     \
        *t_out = t;                                                                                           \
        return s;                                                                                             \
    }

/* One dtype per build (-DSKSP_F32, ...) keeps each compile to a fraction of a second; all without a flag. */
#if !defined(SKSP_F32) && !defined(SKSP_BF16) && !defined(SKSP_F16) && !defined(SKSP_F64)
#define SKSP_F32
#define SKSP_BF16
#define SKSP_F16
#define SKSP_F64
#endif
#if defined(SKSP_F32) || defined(SKSP_BF16) || defined(SKSP_F16)
DEFINE_TILE_OPS(f, float, sqrtf)
#if defined(__AVX512F__)
/* fp32 candidates with AVX-512: per 16 entries one compare and a compress into a register, stored whole, no
 * branch. The store's 16 lanes stay inside cand (C entries): count never exceeds the number of entries read
 * before this block, so count + 16 <= (entries read) + 16 <= C. */
static inline int64_t tile_collect_f(const float *restrict buf, int64_t n, float m, float c, float *restrict cand,
                                     int64_t count) {
    const __m512 shift = _mm512_set1_ps(m), scale = _mm512_set1_ps(c), floor = _mm512_set1_ps(-1.0f);
    int64_t j = 0;
    for (; j + 16 <= n; j += 16) {
        __m512 v = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(buf + j), shift), scale);
        __mmask16 keep = _mm512_cmp_ps_mask(v, floor, _CMP_GT_OQ);
        _mm512_storeu_ps(cand + count, _mm512_maskz_compress_ps(keep, v));
        count += __builtin_popcount((unsigned)keep);
    }
    return tile_collect_portable_f(buf + j, n - j, m, c, cand, count);
}
#else
static inline int64_t tile_collect_f(const float *restrict buf, int64_t n, float m, float c, float *restrict cand,
                                     int64_t count) {
    return tile_collect_portable_f(buf, n, m, c, cand, count);
}
#endif
#endif
#ifdef SKSP_F64
DEFINE_TILE_OPS(d, double, sqrt)
static inline int64_t tile_collect_d(const double *restrict buf, int64_t n, double m, double c,
                                     double *restrict cand, int64_t count) {
    return tile_collect_portable_d(buf, n, m, c, cand, count);
}
#endif

/* ------------------------------------------------------------------------------------------- the rows */
/* SUFFIX: exported name suffix; IN_T: element type of x, p, g and grad; ACC_T: compute type and F its tile
 * ops; ACCESS: the view_/target_/commit_ suffix. */
#define DEFINE_SPARSE_ROWS(SUFFIX, IN_T, ACC_T, F, ACCESS)                                                   \
    /* The threshold of one row: sets *m_out and *t_out and returns the support size s, with cand[0..s) the  \
     * support's v in descending order; 0 (and NaN m, t) for a row without a solution. */                     \
    static int64_t solve_row_##SUFFIX(const IN_T *row, int64_t C, int64_t kind, ACC_T *cand, double *m_out,   \
                                      double *t_out) {                                                        \
        ACC_T buf[TILE], acc[LANES], nan[LANES];                                                              \
        for (int k = 0; k < LANES; k++) acc[k] = -INFINITY, nan[k] = 0;                                       \
        for (int64_t j0 = 0; j0 < C; j0 += TILE) {                                                            \
            int64_t n = C - j0 < TILE ? C - j0 : TILE;                                                        \
            tile_max_##F(view_##ACCESS(row + j0, buf, n), n, acc, nan);                                       \
        }                                                                                                     \
        ACC_T m = acc[0], nans = nan[0];                                                                      \
        for (int k = 1; k < LANES; k++) m = acc[k] > m ? acc[k] : m, nans += nan[k];                          \
        if (nans > 0 || !isfinite(m)) { /* a NaN, a +inf, or every entry −inf */                              \
            *m_out = NAN, *t_out = NAN;                                                                       \
            return 0;                                                                                         \
        }                                                                                                     \
        const ACC_T c = kind == KIND_SPARSEMAX ? (ACC_T)1 : (ACC_T)0.5;                                       \
        int64_t count = 0;                                                                                    \
        for (int64_t j0 = 0; j0 < C; j0 += TILE) {                                                            \
            int64_t n = C - j0 < TILE ? C - j0 : TILE;                                                        \
            count = tile_collect_##F(view_##ACCESS(row + j0, buf, n), n, m, c, cand, count);                  \
        }                                                                                                     \
        *m_out = (double)m;                                                                                   \
        return solve_candidates_##F(cand, count, kind, t_out);                                                \
    }                                                                                                         \
                                                                                                              \
    /* Forward: per row the (m, t) of the threshold into row_stats (N × 2); p into out when given (the map);  \
     * the Fenchel-Young loss of the target class into loss when target is given. */                          \
    void sksp_forward_##SUFFIX(const IN_T *x, int64_t ldx, int64_t start, int64_t stop, int64_t C,           \
                               int64_t kind, ACC_T *scratch, double *row_stats, IN_T *out, int64_t ldo,       \
                               const int64_t *target, ACC_T *loss) {                                          \
        const ACC_T c = kind == KIND_SPARSEMAX ? (ACC_T)1 : (ACC_T)0.5;                                       \
        ACC_T buf[TILE], result[TILE];                                                                        \
        for (int64_t i = start; i < stop; i++) {                                                              \
            const IN_T *row = x + i * ldx;                                                                    \
            double m, t;                                                                                      \
            const int64_t s = solve_row_##SUFFIX(row, C, kind, scratch, &m, &t);                              \
            row_stats[2 * i] = m, row_stats[2 * i + 1] = t;                                                   \
            if (target) {                                                                                     \
                double power_sum = 0; /* Σ p² (sparsemax) or Σ p^{3/2} (1.5-entmax) over the support */       \
                for (int64_t j = 0; j < s; j++) {                                                             \
                    double d = (double)scratch[j] - t;                                                        \
                    power_sum += kind == KIND_SPARSEMAX ? d * d : d * d * d;                                  \
                }                                                                                             \
                ACC_T xy_buf;                                                                                 \
                const double xy = (double)*view_##ACCESS(row + target[i], &xy_buf, 1);                        \
                const double margin = ((xy - m) * (double)c - t) / (double)c; /* x_y − τ */                   \
                loss[i] = s == 0 ? (ACC_T)NAN                                                                 \
                        : (ACC_T)(kind == KIND_SPARSEMAX ? (1 + power_sum) / 2 - margin                       \
                                                         : 2.0 / 3 * power_sum + 4.0 / 3 - margin);           \
            }                                                                                                 \
            if (!out) continue;                                                                               \
            IN_T *p = out + i * ldo;                                                                          \
            const ACC_T t_hi = (ACC_T)t, t_lo = (ACC_T)(t - (double)t_hi);                                    \
            for (int64_t j0 = 0; j0 < C; j0 += TILE) {                                                        \
                int64_t n = C - j0 < TILE ? C - j0 : TILE;                                                    \
                ACC_T *tile = target_##ACCESS(p + j0, result);                                                \
                tile_probabilities_##F(view_##ACCESS(row + j0, buf, n), tile, n, kind, (ACC_T)m, c, t_hi,     \
                                       t_lo, 1);                                                              \
                commit_##ACCESS(tile, p + j0, n);                                                             \
            }                                                                                                 \
        }                                                                                                     \
    }                                                                                                         \
                                                                                                              \
    /* Backward of the map: grad = s ⊙ (g − Σ s g / Σ s), s = 1[p > 0] or √p (as the PyTorch path's dense     \
     * formula: an infinite g where s = 0 gives NaN). */                                                      \
    void sksp_map_backward_##SUFFIX(const IN_T *p, int64_t ldp, const IN_T *g, int64_t ldg, IN_T *grad,      \
                                    int64_t ldr, int64_t start, int64_t stop, int64_t C, int64_t kind) {      \
        ACC_T pb[TILE], gb[TILE], sb[TILE], result[TILE];                                                     \
        double acc_s[LANES], acc_sg[LANES];                                                                   \
        for (int64_t i = start; i < stop; i++) {                                                              \
            const IN_T *prow = p + i * ldp, *grow = g + i * ldg;                                              \
            for (int k = 0; k < LANES; k++) acc_s[k] = 0, acc_sg[k] = 0;                                      \
            for (int64_t j0 = 0; j0 < C; j0 += TILE) {                                                        \
                int64_t n = C - j0 < TILE ? C - j0 : TILE;                                                    \
                tile_derivative_weights_##F(view_##ACCESS(prow + j0, pb, n), sb, n, kind);                    \
                tile_jvp_sums_##F(sb, view_##ACCESS(grow + j0, gb, n), n, acc_s, acc_sg);                     \
            }                                                                                                 \
            double total_s = 0, total_sg = 0;                                                                 \
            for (int k = 0; k < LANES; k++) total_s += acc_s[k], total_sg += acc_sg[k];                       \
            const ACC_T q = (ACC_T)(total_s > 0 ? total_sg / total_s : 0);                                    \
            IN_T *out = grad + i * ldr;                                                                       \
            for (int64_t j0 = 0; j0 < C; j0 += TILE) {                                                        \
                int64_t n = C - j0 < TILE ? C - j0 : TILE;                                                    \
                tile_derivative_weights_##F(view_##ACCESS(prow + j0, pb, n), sb, n, kind);                    \
                const ACC_T *restrict gv = view_##ACCESS(grow + j0, gb, n);                                   \
                ACC_T *restrict tile = target_##ACCESS(out + j0, result);                                     \
                for (int64_t j = 0; j < n; j++) tile[j] = sb[j] * (gv[j] - q);                                \
                commit_##ACCESS(tile, out + j0, n);                                                           \
            }                                                                                                 \
        }                                                                                                     \
    }                                                                                                         \
                                                                                                              \
    /* Backward of the losses: grad = w_i (p − e_y), p recomputed from x and the row's (m, t); rows with     \
     * w_i = 0 (ignored targets, zero upstream) get exact zeros. */                                           \
    void sksp_loss_backward_##SUFFIX(const IN_T *x, int64_t ldx, const double *row_stats,                    \
                                     const int64_t *target, const ACC_T *scale, IN_T *grad, int64_t ldg,      \
                                     int64_t start, int64_t stop, int64_t C, int64_t kind) {                  \
        const ACC_T c = kind == KIND_SPARSEMAX ? (ACC_T)1 : (ACC_T)0.5;                                       \
        ACC_T buf[TILE], result[TILE];                                                                        \
        for (int64_t i = start; i < stop; i++) {                                                              \
            const IN_T *row = x + i * ldx;                                                                    \
            IN_T *out = grad + i * ldg;                                                                       \
            const ACC_T w = scale[i], m = (ACC_T)row_stats[2 * i];                                            \
            const double t = row_stats[2 * i + 1];                                                            \
            const ACC_T t_hi = (ACC_T)t, t_lo = (ACC_T)(t - (double)t_hi);                                    \
            const int64_t y = target[i];                                                                      \
            for (int64_t j0 = 0; j0 < C; j0 += TILE) {                                                        \
                int64_t n = C - j0 < TILE ? C - j0 : TILE;                                                    \
                ACC_T *tile = target_##ACCESS(out + j0, result);                                              \
                if (w == 0) {                                                                                 \
                    memset(tile, 0, (size_t)n * sizeof(ACC_T));                                               \
                } else {                                                                                      \
                    tile_probabilities_##F(view_##ACCESS(row + j0, buf, n), tile, n, kind, m, c, t_hi, t_lo,  \
                                           w);                                                                \
                    if (y >= j0 && y < j0 + n) tile[y - j0] -= w;                                             \
                }                                                                                             \
                commit_##ACCESS(tile, out + j0, n);                                                           \
            }                                                                                                 \
        }                                                                                                     \
    }

#ifdef SKSP_F32
DEFINE_SPARSE_ROWS(f32, float, float, f, float)
#endif
#ifdef SKSP_BF16
DEFINE_SPARSE_ROWS(bf16, uint16_t, float, f, bf16)
#endif
#ifdef SKSP_F16
DEFINE_SPARSE_ROWS(f16, uint16_t, float, f, f16)
#endif
#ifdef SKSP_F64
DEFINE_SPARSE_ROWS(f64, double, double, d, double)
#endif

/* Bumped whenever an exported signature changes; checked by the loader. */
int64_t sksp_abi_version(void) { return 1; }
