/* Fused cross-entropy rows for CPUs: softmaxkit's CPU fast path.
 *
 * Plain C99 (no Python or torch headers), compiled on first use by softmaxkit/backends/cpu/_build.py with
 * the system C compiler (-O3 -march=native) and called through ctypes on raw tensor pointers. Python splits
 * the rows over threads (ctypes releases the GIL), so each call here handles rows [start, stop).
 *
 * For one row x (C classes), z = softcap(x) / T with softcap(x) = c·tanh(x/c):
 *
 *   stats pass:    lse = m + log Σ_j exp(z_j − m),  m = max_j z_j  (= transform(max_j x_j), transform is
 *                  monotonic), plus z_y and Σ_j w_j (z_j − m) (only when label smoothing needs it; a class
 *                  with w_j = 0 counts 0, also at z_j = −inf; accumulated and returned in double for every
 *                  dtype, so huge fp32 rows do not overflow it);
 *   gradient pass (p_j = exp(z_j − m) / Σ_c exp(z_c − m), with m and the sum kept per row in row_stats):
 *                  g_j = [s·(A + 2λ·lse)·p_j − s·(ε/C)·w_j − s·(1−ε)·w_y·δ_{jy}] · dz_j/dx_j,
 *                  p_j = exp(z_j − lse), A = (1−ε)·w_y + (ε/C)·Σ_c w_c, s the row's upstream scale
 *                  (0 on ignored rows), dz/dx = (1 − tanh²(x/c)) / T.
 *
 * When both passes run in one call (forward with the gradient fused in), the stats pass keeps e_j = exp(z_j − m)
 * (and dz/dx under softcap) in a per-thread scratch row of C floats that stays in L2, and the gradient pass
 * uses p_j = e_j / Σe: one exp and one transform per element instead of two.
 *
 * A row is processed in tiles of TILE elements converted into a local fp32 (fp64 for double input) buffer,
 * so the arithmetic loops are alias-free and vectorise, and the gradient may overwrite x (in-place backward):
 * every tile is read completely before it is written. fp16/bf16 inputs are computed in fp32, float64 in
 * float64 with libm's exp/tanh/log. The fp32 exp is a Cephes-style polynomial (≤ 2 ulp on [−87.3, 88],
 * exactly 0 below, so −inf masked classes give 0); reductions use LANES independent partial sums.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(__F16C__) || defined(__SSE2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#define TILE 512
#define LANES 16

#define FLAG_STATS 1
#define FLAG_GRAD 2
#define FLAG_STREAM 4 /* write the gradient with non-temporal stores (a large, fresh buffer) */
#define FLAG_KEEP 8   /* stats only: keep each row's e = exp(z − m) (then dz/dx) at scratch + (i − start)·stride */

/* ------------------------------------------------------------------------------------------ fp32 maths */
static inline float sk_expf(float x) {
    const float hi = 88.0f, lo = -87.33654f; /* k stays in [−126, 127] */
    float xc = x < lo ? lo : (x > hi ? hi : x);
    /* round to nearest by the 1.5·2^23 trick: vectorises without -fno-trapping-math (floorf does not) */
    float k = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    float r = xc - k * 0.693359375f;
    r = r + k * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    int32_t ki = (int32_t)k;
    uint32_t bits = (uint32_t)(ki + 127) << 23;
    union { uint32_t u; float f; } scale = {.u = bits}; /* 2^k; memcpy here blocks GCC's vectoriser */
    float y = p * scale.f;
    return x < lo ? 0.0f : y; /* NaN propagates through xc */
}

/* tanh from exp: (1 − e)/(1 + e) with e = exp(−2|u|); an odd Taylor polynomial below |u| = 1/8 where that
 * form cancels (truncation error < 1e-11 relative there). */
static inline float sk_tanhf(float u) {
    float a = fabsf(u);
    float e = sk_expf(-2.0f * a);
    float t = (1.0f - e) / (1.0f + e);
    float u2 = u * u;
    float poly = u * (1.0f + u2 * (-1.0f / 3.0f + u2 * (2.0f / 15.0f + u2 * (-17.0f / 315.0f + u2 * (62.0f / 2835.0f)))));
    return a < 0.125f ? poly : copysignf(t, u);
}

/* ------------------------------------------------------------------------------------- dtype converters */
#include "_dtypes.h"

/* out[j] = exp(in[j] − shift) over a tile (out may be in). With
 * AVX-512 (AVX2 + FMA: 8 lanes, sk_exp8) the fp32 version runs 16 lanes at a time with the same Cephes polynomial as sk_expf and fewer
 * instructions (vscalefps for 2^k, which also gives exact 0 on underflow; vrndscaleps for rounding); the
 * tail of a tile goes through sk_expf. A given element always takes the same route (tiles are cut the same
 * way in every pass), so the fused and the deferred gradient still round identically. */
#if defined(__AVX512F__)
static inline __m512 sk_exp16(__m512 x) {
    const __m512 lo = _mm512_set1_ps(-87.33654f), hi = _mm512_set1_ps(88.0f);
    __m512 xc = _mm512_min_ps(hi, _mm512_max_ps(lo, x)); /* NaN stays NaN (it is the second operand) */
    __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693359375f), xc);
    r = _mm512_fmadd_ps(k, _mm512_set1_ps(2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.0f));
    __m512 y = _mm512_scalef_ps(p, k);
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ), y, _mm512_setzero_ps());
}
#elif defined(__AVX2__) && defined(__FMA__)
/* The same polynomial, 8 lanes, for AVX2 CPUs (GCC does not vectorise sk_expf's loop: its clamps are control
 * flow without -fno-trapping-math, so without this every exp there was scalar). 2^k is built in the exponent
 * bits (k is in [−126, 127] after the clamp); a NaN lane stays NaN (its r is NaN). */
static inline __m256 sk_exp8(__m256 x) {
    const __m256 lo = _mm256_set1_ps(-87.33654f), hi = _mm256_set1_ps(88.0f);
    __m256 xc = _mm256_min_ps(hi, _mm256_max_ps(lo, x)); /* NaN stays NaN (it is the second operand) */
    __m256 k = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(k, _mm256_set1_ps(0.693359375f), xc);
    r = _mm256_fmadd_ps(k, _mm256_set1_ps(2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_add_ps(_mm256_fmadd_ps(_mm256_mul_ps(p, r), r, r), _mm256_set1_ps(1.0f));
    __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
    __m256 y = _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
    return _mm256_blendv_ps(y, _mm256_setzero_ps(), _mm256_cmp_ps(x, lo, _CMP_LT_OQ));
}
#endif

static inline void exp_shift_f32(const float *in, float *out, int64_t n, float shift) {
    int64_t j = 0;
#if defined(__AVX512F__)
    const __m512 s = _mm512_set1_ps(shift);
    for (; j + 16 <= n; j += 16)
        _mm512_storeu_ps(out + j, sk_exp16(_mm512_sub_ps(_mm512_loadu_ps(in + j), s)));
#elif defined(__AVX2__) && defined(__FMA__)
    const __m256 s = _mm256_set1_ps(shift);
    for (; j + 8 <= n; j += 8)
        _mm256_storeu_ps(out + j, sk_exp8(_mm256_sub_ps(_mm256_loadu_ps(in + j), s)));
#endif
    for (; j < n; j++) out[j] = sk_expf(in[j] - shift);
}

static inline void exp_shift_f64(const double *in, double *out, int64_t n, double shift) {
    for (int64_t j = 0; j < n; j++) out[j] = exp(in[j] - shift);
}


/* Copy `bytes` from a local tile to memory with non-temporal stores where the CPU has them: a fresh
 * gradient buffer much larger than the caches is written without first being read into them (no
 * read-for-ownership), which saves a third of the memory traffic of the gradient pass. Unaligned head
 * and tail bytes go through ordinary stores. The caller ends its writes with stream_fence(). */
static inline void stream_bytes(void *dst, const void *src, int64_t bytes) {
    char *d = (char *)dst;
    const char *s = (const char *)src;
#if defined(__AVX512F__) || defined(__AVX__) || defined(__SSE2__)
#if defined(__AVX512F__)
    const int64_t width = 64;
#elif defined(__AVX__)
    const int64_t width = 32;
#else
    const int64_t width = 16;
#endif
    int64_t head = (int64_t)((width - ((uintptr_t)d & (uintptr_t)(width - 1))) & (uintptr_t)(width - 1));
    if (head > bytes) head = bytes;
    memcpy(d, s, (size_t)head);
    int64_t j = head;
    for (; j + width <= bytes; j += width) {
#if defined(__AVX512F__)
        _mm512_stream_si512((void *)(d + j), _mm512_loadu_si512((const void *)(s + j)));
#elif defined(__AVX__)
        _mm256_stream_si256((__m256i *)(d + j), _mm256_loadu_si256((const __m256i *)(s + j)));
#else
        _mm_stream_si128((__m128i *)(d + j), _mm_loadu_si128((const __m128i *)(s + j)));
#endif
    }
    memcpy(d + j, s + j, (size_t)(bytes - j));
#else
    memcpy(d, s, (size_t)bytes);
#endif
}

static inline void stream_fence(void) {
#if defined(__SSE2__)
    _mm_sfence();
#endif
}

/* ------------------------------------------------------------------------------------------- the rows */
/* SUFFIX: exported name suffix; IN_T: element type of x and grad; ACC_T: compute type. */
#define DEFINE_CE_ROWS(SUFFIX, IN_T, ACC_T, LOAD, STORE, EXP, EXP_SHIFT, TANH, LOG)                                     \
    static inline ACC_T transform_##SUFFIX(ACC_T x, ACC_T inv_t, ACC_T softcap) {                            \
        if (softcap > 0) x = softcap * TANH(x / softcap);                                                     \
        return x * inv_t;                                                                                     \
    }                                                                                                         \
                                                                                                              \
    /* z = transform(x) in place over a tile; when dzdx is given, also dz/dx. Not inlined: one compiled     \
     * body for every call site, so the fused and deferred passes round identically (bitwise-equal grads). */ \
    static __attribute__((noinline)) void transform_tile_##SUFFIX(ACC_T *buf, ACC_T *dzdx, int64_t n, ACC_T inv_t,              \
                                               ACC_T softcap) {                                               \
        if (softcap > 0) {                                                                                    \
            ACC_T inv_c = (ACC_T)1 / softcap, scale = softcap * inv_t;                                        \
            for (int64_t j = 0; j < n; j++) {                                                                 \
                ACC_T t = TANH(buf[j] * inv_c);                                                               \
                buf[j] = scale * t;                                                                           \
                if (dzdx) dzdx[j] = ((ACC_T)1 - t * t) * inv_t;                                               \
            }                                                                                                 \
        } else if (inv_t != (ACC_T)1) {                                                                       \
            for (int64_t j = 0; j < n; j++) buf[j] *= inv_t;                                                  \
        }                                                                                                     \
    }                                                                                                         \
                                                                                                              \
    /* out = coefficient · in. Not inlined, like transform_tile: the fused pass (from the kept exp) and the \
     * deferred pass (from a fresh exp) then round identically whatever the compiler contracts around it. */ \
    static __attribute__((noinline)) void scale_tile_##SUFFIX(const ACC_T *in, ACC_T *out, int64_t n,        \
                                                              ACC_T coefficient) {                          \
        for (int64_t j = 0; j < n; j++) out[j] = coefficient * in[j];                                         \
    }                                                                                                         \
                                                                                                              \
    void skce_rows_##SUFFIX(const IN_T *x, int64_t ldx, const int64_t *target, const ACC_T *weight,          \
                            int64_t start, int64_t stop, int64_t num_classes, int64_t ignore_index,           \
                            double eps_d, double inv_t_d, double z_loss_d, double softcap_d,                  \
                            double weight_total_d, int64_t flags, ACC_T *lse, ACC_T *z_target,                \
                            double *z_weighted_sum, const ACC_T *scale, IN_T *grad, int64_t ldg,               \
                            ACC_T *scratch, ACC_T *row_stats) {                                               \
        const ACC_T eps = (ACC_T)eps_d, inv_t = (ACC_T)inv_t_d, z_loss = (ACC_T)z_loss_d;                     \
        const ACC_T softcap = (ACC_T)softcap_d, weight_total = (ACC_T)weight_total_d;                         \
        const int64_t C = num_classes;                                                                        \
        ACC_T buf[TILE], ebuf[TILE], dzdx[TILE], acc[LANES];                                                              \
        const int transformed = softcap > 0 || inv_t != (ACC_T)1;                                             \
        /* fused stats + gradient with a scratch row: keep e = exp(z − m) (and dz/dx) from the stats pass */  \
        ACC_T *keep_e = (flags & FLAG_STATS) && (flags & FLAG_GRAD) ? scratch : 0;                            \
        ACC_T *keep_d = keep_e && softcap > 0 ? scratch + C : 0;                                              \
        /* FLAG_KEEP (vocab-parallel stats): one kept row per row of the call, for skce_vp_grad */            \
        const int keep_rows = (flags & FLAG_STATS) && (flags & FLAG_KEEP) && !(flags & FLAG_GRAD);            \
        const int64_t keep_stride = softcap > 0 ? 2 * C : C;                                                  \
        ACC_T row_total = 1, row_max = 0;                                                                     \
        const int stream = (flags & FLAG_STREAM) && (const void *)grad != (const void *)x;                      \
        for (int64_t i = start; i < stop; i++) {                                                              \
            const IN_T *row = x + i * ldx;                                                                    \
            const int64_t y = target[i];                                                                      \
            const int valid = y != ignore_index;                                                              \
            ACC_T row_lse;                                                                                    \
            if (keep_rows) {                                                                                  \
                keep_e = scratch + (i - start) * keep_stride;                                                 \
                keep_d = softcap > 0 ? keep_e + C : 0;                                                        \
            }                                                                                                 \
            if (flags & FLAG_STATS) {                                                                         \
                /* pass 1: max of the raw row (transform is increasing, so max z = transform(max x)) */       \
                for (int k = 0; k < LANES; k++) acc[k] = -INFINITY;                                           \
                for (int64_t j0 = 0; j0 < C; j0 += TILE) {                                                    \
                    int64_t n = C - j0 < TILE ? C - j0 : TILE;                                                \
                    LOAD(row + j0, buf, n);                                                                   \
                    int64_t j = 0;                                                                            \
                    for (; j + LANES <= n; j += LANES)                                                        \
                        for (int k = 0; k < LANES; k++) acc[k] = buf[j + k] > acc[k] ? buf[j + k] : acc[k];   \
                    for (; j < n; j++) acc[0] = buf[j] > acc[0] ? buf[j] : acc[0];                            \
                }                                                                                             \
                ACC_T m = acc[0];                                                                             \
                for (int k = 1; k < LANES; k++) m = acc[k] > m ? acc[k] : m;                                  \
                m = transform_##SUFFIX(m, inv_t, softcap);                                                    \
                /* an all −inf (or all NaN) row: shift by 0, so Σe = 0 and lse = −inf (or NaN). A +inf max   \
                 * stays: exp(+inf − inf) = NaN makes the row's loss and gradient NaN, as in PyTorch */       \
                if (m == -INFINITY) m = 0;                                                                    \
                /* pass 2: Σ exp(z − m), and Σ w_j (z_j − m) when smoothing (shifted: no ∞ − ∞ at huge z), \
                 * in double: at fp32 z_j − m reaches −6.8e38 and a sum of C of them more, beyond fp32's range \
                 * although the row loss (ε/C)·Σ w_j (m − z_j) fits */                                        \
                double wz[LANES];                                                                             \
                const double m_d = (double)m;                                                                 \
                for (int k = 0; k < LANES; k++) acc[k] = 0, wz[k] = 0;                                        \
                for (int64_t j0 = 0; j0 < C; j0 += TILE) {                                                    \
                    int64_t n = C - j0 < TILE ? C - j0 : TILE;                                                \
                    LOAD(row + j0, buf, n);                                                                   \
                    transform_tile_##SUFFIX(buf, keep_d ? keep_d + j0 : 0, n, inv_t, softcap);                \
                    if (eps > 0) {                                                                            \
                        int64_t j = 0;                                                                        \
                        if (weight) {                                                                         \
                            const ACC_T *w = weight + j0;                                                     \
                            for (; j + LANES <= n; j += LANES)                                                \
                                for (int k = 0; k < LANES; k++)                                               \
                                    wz[k] += w[j + k] != 0 ? (double)w[j + k] * ((double)buf[j + k] - m_d) : 0; \
                            for (; j < n; j++) wz[0] += w[j] != 0 ? (double)w[j] * ((double)buf[j] - m_d) : 0;  \
                        } else {                                                                              \
                            for (; j + LANES <= n; j += LANES)                                                \
                                for (int k = 0; k < LANES; k++) wz[k] += (double)buf[j + k] - m_d;            \
                            for (; j < n; j++) wz[0] += (double)buf[j] - m_d;                                 \
                        }                                                                                     \
                    }                                                                                         \
                    { /* e = exp(z − m), kept for the gradient pass when fused; summed the same way either   \
                       * way, so the fused and the deferred gradient share Σe bit for bit */                  \
                        ACC_T *e = keep_e ? keep_e + j0 : ebuf;                                               \
                        EXP_SHIFT(buf, e, n, m);                                                              \
                        int64_t j = 0;                                                                        \
                        for (; j + LANES <= n; j += LANES)                                                    \
                            for (int k = 0; k < LANES; k++) acc[k] += e[j + k];                               \
                        for (; j < n; j++) acc[0] += e[j];                                                    \
                    }                                                                                         \
                }                                                                                             \
                ACC_T total = 0;                                                                              \
                double weighted = 0;                                                                          \
                for (int k = 0; k < LANES; k++) total += acc[k], weighted += wz[k];                           \
                row_lse = m + LOG(total);                                                                     \
                row_total = total, row_max = m;                                                               \
                row_stats[2 * i] = m, row_stats[2 * i + 1] = total;                                           \
                lse[i] = row_lse;                                                                             \
                if (z_weighted_sum) z_weighted_sum[i] = weighted;                                             \
                if (valid) {                                                                                  \
                    ACC_T xy;                                                                                 \
                    LOAD(row + y, &xy, 1);                                                                    \
                    z_target[i] = transform_##SUFFIX(xy, inv_t, softcap);                                     \
                } else {                                                                                      \
                    z_target[i] = 0;                                                                          \
                }                                                                                             \
            } else {                                                                                          \
                row_lse = lse[i], row_max = row_stats[2 * i], row_total = row_stats[2 * i + 1];               \
            }                                                                                                 \
            if (!(flags & FLAG_GRAD)) continue;                                                               \
            IN_T *out = grad + i * ldg;                                                                       \
            const ACC_T s = scale[i];                                                                         \
            if (!valid || s == 0) { /* ignored row, or zero upstream: an exact zero gradient */               \
                for (int64_t j0 = 0; j0 < C; j0 += TILE) {                                                    \
                    int64_t n = C - j0 < TILE ? C - j0 : TILE;                                                \
                    for (int64_t j = 0; j < n; j++) buf[j] = 0;                                               \
                    STORE(buf, out + j0, n);                                                                  \
                }                                                                                             \
                continue;                                                                                     \
            }                                                                                                 \
            const ACC_T w_y = weight ? weight[y] : (ACC_T)1;                                                  \
            ACC_T row_coefficient = s * ((1 - eps) * w_y + eps / (ACC_T)C * weight_total);                    \
            if (z_loss > 0) row_coefficient += s * 2 * z_loss * row_lse;                                      \
            const ACC_T smooth = s * eps / (ACC_T)C;                                                          \
            const ACC_T target_coefficient = s * (1 - eps) * w_y;                                             \
            /* p_j = exp(z_j − m) / Σe, the same expression in the fused and the deferred pass (bitwise equal) */\
            const ACC_T factor = row_coefficient / row_total;                                                 \
            /* the target entry, computed before the pass may overwrite x (in-place backward) */              \
            ACC_T g_y;                                                                                        \
            {                                                                                                 \
                ACC_T xy, d = 1;                                                                              \
                LOAD(row + y, &xy, 1);                                                                        \
                transform_tile_##SUFFIX(&xy, &d, 1, inv_t, softcap);                                          \
                if (!(softcap > 0)) d = inv_t;                                                                \
                ACC_T wy_smooth = weight ? weight[y] : (ACC_T)1;                                              \
                g_y = (factor * EXP(xy - row_max) - smooth * wy_smooth - target_coefficient) * d;             \
            }                                                                                                 \
            for (int64_t j0 = 0; j0 < C; j0 += TILE) {                                                        \
                int64_t n = C - j0 < TILE ? C - j0 : TILE;                                                    \
                const ACC_T *d = dzdx;                                                                        \
                if (keep_e) { /* p = e / Σe: no second exp, no second transform */                            \
                    const ACC_T *e = keep_e + j0;                                                             \
                    scale_tile_##SUFFIX(e, buf, n, factor);                                                   \
                    if (keep_d) d = keep_d + j0;                                                              \
                } else {                                                                                      \
                    LOAD(row + j0, buf, n);                                                                   \
                    transform_tile_##SUFFIX(buf, softcap > 0 ? dzdx : 0, n, inv_t, softcap);                  \
                    EXP_SHIFT(buf, buf, n, row_max);                                                          \
                    scale_tile_##SUFFIX(buf, buf, n, factor);                                                 \
                }                                                                                             \
                if (eps > 0) {                                                                                \
                    if (weight) {                                                                             \
                        const ACC_T *w = weight + j0;                                                         \
                        for (int64_t j = 0; j < n; j++) buf[j] -= smooth * w[j];                              \
                    } else {                                                                                  \
                        for (int64_t j = 0; j < n; j++) buf[j] -= smooth;                                     \
                    }                                                                                         \
                }                                                                                             \
                if (softcap > 0) {                                                                            \
                    for (int64_t j = 0; j < n; j++) buf[j] *= d[j];                                           \
                } else if (transformed) {                                                                     \
                    for (int64_t j = 0; j < n; j++) buf[j] *= inv_t;                                          \
                }                                                                                             \
                if (y >= j0 && y < j0 + n) buf[y - j0] = g_y;                                                 \
                if (stream && sizeof(IN_T) == sizeof(ACC_T)) { /* fp32/fp64: the tile is already the output */ \
                    stream_bytes(out + j0, buf, n * (int64_t)sizeof(IN_T));                                   \
                } else if (stream) { /* bf16/fp16: convert into a local tile, then stream it out */           \
                    IN_T converted[TILE];                                                                     \
                    STORE(buf, converted, n);                                                                 \
                    stream_bytes(out + j0, converted, n * (int64_t)sizeof(IN_T));                             \
                } else {                                                                                      \
                    STORE(buf, out + j0, n);                                                                  \
                }                                                                                             \
            }                                                                                                 \
        }                                                                                                     \
        if (stream) stream_fence(); /* the streamed gradient is visible before the call returns */            \
    }                                                                                                         \
                                                                                                              \
    /* Vocab-parallel gradient of rows [start, stop) from the e = exp(z − m_local) (and dz/dx) a FLAG_KEEP    \
     * stats call kept (row i at kept + (i − start)·stride), with the global statistics folded by the caller \
     * into per-row coefficients: g_j = [factor_i·e_j − smooth_i·w_j − tc_i·δ_{j y_i}]·dz_j/dx_j, where      \
     * factor_i = s_i(A_i + 2λ LSE_i)·exp(m_local − m)/S, y_i the local target index or −1 (another process  \
     * owns it). Rows with scale_i = 0 (ignored rows) get an exact 0 whatever their logits held. */          \
    void skce_vp_grad_##SUFFIX(const int64_t *target, const ACC_T *weight, int64_t start, int64_t stop,       \
                               int64_t num_classes, double inv_t_d, double softcap_d, const ACC_T *factor,    \
                               const ACC_T *smooth, const ACC_T *target_coefficient, const ACC_T *scale,     \
                               const ACC_T *kept, IN_T *grad, int64_t ldg, int64_t flags) {                   \
        const ACC_T inv_t = (ACC_T)inv_t_d, softcap = (ACC_T)softcap_d;                                       \
        const int64_t C = num_classes, stride = softcap > 0 ? 2 * C : C;                                      \
        const int transformed = softcap > 0 || inv_t != (ACC_T)1;                                             \
        const int stream = (flags & FLAG_STREAM) != 0;                                                        \
        ACC_T buf[TILE];                                                                                      \
        for (int64_t i = start; i < stop; i++) {                                                              \
            IN_T *out = grad + i * ldg;                                                                       \
            const ACC_T *e = kept + (i - start) * stride, *d = softcap > 0 ? e + C : 0;                       \
            const int64_t y = target[i];                                                                      \
            const int zero = scale[i] == 0;                                                                   \
            const ACC_T f = factor[i], sm = smooth ? smooth[i] : (ACC_T)0, tc = target_coefficient[i];        \
            for (int64_t j0 = 0; j0 < C; j0 += TILE) {                                                        \
                int64_t n = C - j0 < TILE ? C - j0 : TILE;                                                    \
                if (zero) {                                                                                   \
                    for (int64_t j = 0; j < n; j++) buf[j] = 0;                                               \
                } else {                                                                                      \
                    scale_tile_##SUFFIX(e + j0, buf, n, f);                                                   \
                    if (sm != 0) {                                                                            \
                        if (weight) {                                                                         \
                            const ACC_T *w = weight + j0;                                                     \
                            for (int64_t j = 0; j < n; j++) buf[j] -= sm * w[j];                              \
                        } else {                                                                              \
                            for (int64_t j = 0; j < n; j++) buf[j] -= sm;                                     \
                        }                                                                                     \
                    }                                                                                         \
                    if (y >= j0 && y < j0 + n) buf[y - j0] -= tc;                                             \
                    if (softcap > 0) {                                                                        \
                        for (int64_t j = 0; j < n; j++) buf[j] *= d[j0 + j];                                  \
                    } else if (transformed) {                                                                 \
                        for (int64_t j = 0; j < n; j++) buf[j] *= inv_t;                                      \
                    }                                                                                         \
                }                                                                                             \
                if (stream && sizeof(IN_T) == sizeof(ACC_T)) {                                                \
                    stream_bytes(out + j0, buf, n * (int64_t)sizeof(IN_T));                                   \
                } else if (stream) {                                                                          \
                    IN_T converted[TILE];                                                                     \
                    STORE(buf, converted, n);                                                                 \
                    stream_bytes(out + j0, converted, n * (int64_t)sizeof(IN_T));                             \
                } else {                                                                                      \
                    STORE(buf, out + j0, n);                                                                  \
                }                                                                                             \
            }                                                                                                 \
        }                                                                                                     \
        if (stream) stream_fence();                                                                           \
    }

/* One dtype per build (-DSKCE_F32, ...) keeps each compile to a fraction of a second; all without a flag. */
#if !defined(SKCE_F32) && !defined(SKCE_BF16) && !defined(SKCE_F16) && !defined(SKCE_F64)
#define SKCE_F32
#define SKCE_BF16
#define SKCE_F16
#define SKCE_F64
#endif
#ifdef SKCE_F32
DEFINE_CE_ROWS(f32, float, float, load_f32, store_f32, sk_expf, exp_shift_f32, sk_tanhf, logf)
#endif
#ifdef SKCE_BF16
DEFINE_CE_ROWS(bf16, uint16_t, float, load_bf16, store_bf16, sk_expf, exp_shift_f32, sk_tanhf, logf)
#endif
#ifdef SKCE_F16
DEFINE_CE_ROWS(f16, uint16_t, float, load_f16, store_f16, sk_expf, exp_shift_f32, sk_tanhf, logf)
#endif
#ifdef SKCE_F64
DEFINE_CE_ROWS(f64, double, double, load_f64, store_f64, exp, exp_shift_f64, tanh, log)
#endif

/* Bumped whenever the exported signature changes; checked by the loader. */
int64_t skce_abi_version(void) { return 5; }
