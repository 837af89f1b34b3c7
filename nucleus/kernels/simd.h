/* Helpers shared by the C sources of the CPU kernels (nucleus/kernels): float16 conversions, and
 * AVX2 ones. */
#ifndef NUCLEUS_SIMD_H
#define NUCLEUS_SIMD_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__F16C__) || defined(__AVX2__)
#include <immintrin.h>
#endif

/* The float16 at p (little-endian, unaligned) as a float. */
static inline float fp16_to_f32(const void *p) {
    uint16_t h;
    memcpy(&h, p, 2);
#ifdef __F16C__
    return _cvtsh_ss(h);
#else
    const uint32_t exp = (h >> 10) & 0x1F, man = h & 0x3FF;
    float v;
    if (exp == 0) v = ldexpf((float)man, -24);
    else if (exp == 31) v = man ? NAN : INFINITY;
    else v = ldexpf((float)(man | 0x400), (int)exp - 25);
    return (h & 0x8000) ? -v : v;
#endif
}

/* x rounded to the nearest float16 value (ties to even), as a float. */
static inline float round_to_f16(float x) {
#ifdef __F16C__
    return _cvtsh_ss(_cvtss_sh(x, 0));
#else
    if (x == 0.0f || !isfinite(x)) return x;
    int e;
    frexpf(x, &e);
    const int quantum = e - 11 > -24 ? e - 11 : -24;
    const float r = ldexpf(nearbyintf(ldexpf(x, -quantum)), quantum);
    return fabsf(r) > 65504.0f ? copysignf(INFINITY, x) : r;
#endif
}

/* The float16 bits of x, rounded to nearest (ties to even). */
static inline uint16_t f32_to_fp16(float x) {
#ifdef __F16C__
    return _cvtss_sh(x, 0);
#else
    const float r = round_to_f16(x), a = fabsf(r);
    const uint16_t sign = signbit(r) ? 0x8000 : 0;
    if (isnan(a)) return sign | 0x7E00;
    if (isinf(a)) return sign | 0x7C00;
    if (a < 6.103515625e-05f) return sign | (uint16_t)(a * 16777216.0f); /* subnormal: a / 2^-24 */
    int e;
    const float m = frexpf(a, &e); /* a = m 2^e, m in [0.5, 1) */
    return sign | (uint16_t)((e + 14) << 10) | (uint16_t)(m * 2048.0f - 1024.0f);
#endif
}

#ifdef __AVX2__
#include <immintrin.h>

/* exp(x) for 8 floats: range reduction by ln 2 and a degree-5 polynomial (Cephes' expf), within
 * 2 ulp of expf on [-87, 88] (clamped outside). NaN stays NaN: the clamps take x second. */
static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_set1_ps(88.3762626647949f), x);
    x = _mm256_max_ps(_mm256_set1_ps(-87.3365447505531f), x);
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
    const __m256i e = _mm256_slli_epi32(
        _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

#endif
