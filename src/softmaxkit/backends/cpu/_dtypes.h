/* dtype converters shared by the C kernels (_cross_entropy.c, _sparse.c): tiles of fp32/fp64 are copied,
 * bf16 is widened by a shift and narrowed with round-to-nearest-even (NaN kept a NaN), fp16 through F16C
 * where the compiler targets it and by bit manipulation elsewhere (subnormals included).
 *
 * Each kernel source is compiled on its own (one library per source and dtype); _build.py hashes this
 * header together with the source, so a change here rebuilds both. */
#ifndef SOFTMAXKIT_DTYPES_H
#define SOFTMAXKIT_DTYPES_H
#include <stdint.h>
#include <string.h>
#if defined(__F16C__) || defined(__SSE2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

static inline void load_f32(const float *src, float *dst, int64_t n) { memcpy(dst, src, (size_t)n * sizeof(float)); }
static inline void store_f32(const float *src, float *dst, int64_t n) { memcpy(dst, src, (size_t)n * sizeof(float)); }
static inline void load_f64(const double *src, double *dst, int64_t n) { memcpy(dst, src, (size_t)n * sizeof(double)); }
static inline void store_f64(const double *src, double *dst, int64_t n) { memcpy(dst, src, (size_t)n * sizeof(double)); }

static inline void load_bf16(const uint16_t *src, float *dst, int64_t n) {
    for (int64_t j = 0; j < n; j++) {
        uint32_t bits = (uint32_t)src[j] << 16;
        memcpy(&dst[j], &bits, sizeof(float));
    }
}

static inline void store_bf16(const float *src, uint16_t *dst, int64_t n) {
    for (int64_t j = 0; j < n; j++) {
        uint32_t bits;
        memcpy(&bits, &src[j], sizeof bits);
        uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16; /* round to nearest even */
        uint32_t quiet = (bits >> 16) | 0x40u;                             /* keep NaN a NaN */
        dst[j] = (uint16_t)(((bits & 0x7FFFFFFFu) > 0x7F800000u) ? quiet : rounded);
    }
}

/* IEEE half <-> float by bits (used where F16C is absent, and for tails). */
static inline float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exponent = (h >> 10) & 0x1Fu, mantissa = h & 0x3FFu, bits;
    if (exponent == 0x1Fu) {
        bits = sign | 0x7F800000u | (mantissa << 13);
    } else if (exponent != 0) {
        bits = sign | ((exponent + 112u) << 23) | (mantissa << 13);
    } else if (mantissa == 0) {
        bits = sign;
    } else { /* subnormal half: normalise */
        int shift = 0;
        while (!(mantissa & 0x400u)) {
            mantissa <<= 1;
            shift++;
        }
        bits = sign | ((uint32_t)(113 - shift) << 23) | ((mantissa & 0x3FFu) << 13);
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline uint16_t float_to_half(float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    uint32_t sign = (bits >> 16) & 0x8000u, absolute = bits & 0x7FFFFFFFu;
    if (absolute > 0x7F800000u) return (uint16_t)(sign | 0x7E00u);      /* NaN */
    if (absolute >= 0x477FF000u) return (uint16_t)(sign | 0x7C00u);     /* rounds to ±inf */
    if (absolute < 0x38800000u) {                                        /* subnormal or zero half */
        float magnitude;
        memcpy(&magnitude, &absolute, sizeof magnitude);
        /* adding 0.5 (2^-1) aligns the half-subnormal grid (2^-24) to the float's last bits, RNE */
        float shifted = magnitude + 0.5f;
        uint32_t sbits;
        memcpy(&sbits, &shifted, sizeof sbits);
        return (uint16_t)(sign | (sbits - 0x3F000000u));
    }
    uint32_t mantissa_odd = (absolute >> 13) & 1u;
    absolute += 0xC8000FFFu + mantissa_odd; /* rebias exponent (−112 << 23) and round to nearest even */
    return (uint16_t)(sign | (absolute >> 13));
}

static inline void load_f16(const uint16_t *src, float *dst, int64_t n) {
    int64_t j = 0;
#if defined(__F16C__)
    for (; j + 8 <= n; j += 8) {
        __m128i h = _mm_loadu_si128((const __m128i *)(src + j));
        _mm256_storeu_ps(dst + j, _mm256_cvtph_ps(h));
    }
#endif
    for (; j < n; j++) dst[j] = half_to_float(src[j]);
}

static inline void store_f16(const float *src, uint16_t *dst, int64_t n) {
    int64_t j = 0;
#if defined(__F16C__)
    for (; j + 8 <= n; j += 8) {
        __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(src + j), _MM_FROUND_TO_NEAREST_INT);
        _mm_storeu_si128((__m128i *)(dst + j), h);
    }
#endif
    for (; j < n; j++) dst[j] = float_to_half(src[j]);
}

#endif /* SOFTMAXKIT_DTYPES_H */
