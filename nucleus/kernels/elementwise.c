/* Row-wise float32 operations of the Llama block, one pass each, for the CPU: RMSNorm, the
 * SwiGLU gate and RoPE. torch spends six passes (and temporaries) on the first, two on the second
 * and eight ops on the third, which at decode batch sizes cost more in dispatch than in
 * arithmetic. Same formulas as nucleus.model: x * rsqrt(mean(x^2) + eps) * weight, silu(a) * b
 * with silu(a) = a / (1 + exp(-a)), and RoPE's complex product; only the summation order of the
 * mean, and the rounding of the product's sums (see rotary_f32), differ. Built by
 * nucleus/kernels/cpu.py.
 */
#include <math.h>
#include <stdint.h>

#include "kernels.h"
#include "simd.h"

void rms_norm_row(const float *x, const float *weight, float *out, int64_t D, float eps) {
    int64_t i = 0;
    float total = 0.0f;
#ifdef __AVX2__
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    for (; i + 16 <= D; i += 16) {
        const __m256 a = _mm256_loadu_ps(x + i), b = _mm256_loadu_ps(x + i + 8);
        s0 = _mm256_fmadd_ps(a, a, s0);
        s1 = _mm256_fmadd_ps(b, b, s1);
    }
    total = hsum8(_mm256_add_ps(s0, s1));
#endif
    for (; i < D; i++) total += x[i] * x[i];
    const float r = 1.0f / sqrtf(total / (float)D + eps);
    i = 0;
#ifdef __AVX2__
    const __m256 r8 = _mm256_set1_ps(r);
    for (; i + 8 <= D; i += 8)
        _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), r8),
                                                _mm256_loadu_ps(weight + i)));
#endif
    for (; i < D; i++) out[i] = x[i] * r * weight[i];
}

void silu_mul_row(const float *a, const float *b, float *o, int64_t H) {
    int64_t i = 0;
#ifdef __AVX2__
    const __m256 one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps();
    for (; i + 8 <= H; i += 8) {
        const __m256 av = _mm256_loadu_ps(a + i);
        const __m256 e = exp8(_mm256_sub_ps(zero, av));
        const __m256 s = _mm256_div_ps(av, _mm256_add_ps(one, e));
        _mm256_storeu_ps(o + i, _mm256_mul_ps(s, _mm256_loadu_ps(b + i)));
    }
#endif
    for (; i < H; i++) o[i] = a[i] / (1.0f + expf(-a[i])) * b[i];
}

void rotary_row(float *x, const float *cs, int64_t heads, int64_t head_dim) {
    for (int64_t h = 0; h < heads; h++) {
        float *xh = x + h * head_dim;
        for (int64_t i = 0; i < head_dim / 2; i++) {
            const float a = xh[2 * i], b = xh[2 * i + 1];
            const float c = cs[2 * i], d = cs[2 * i + 1];
            xh[2 * i] = a * c - b * d;
            xh[2 * i + 1] = a * d + b * c;
        }
    }
}

/* out[m, :] = x[m, :] / sqrt(mean(x[m, :]^2) + eps) * weight, x and out (M, D). */
void rms_norm_f32(const float *x, const float *weight, float *out, int64_t M, int64_t D,
                  float eps, int num_threads) {
#pragma omp parallel for schedule(static) num_threads(num_threads) if (M * D > 16384)
    for (int64_t m = 0; m < M; m++) rms_norm_row(x + m * D, weight, out + m * D, D, eps);
}

/* The SwiGLU gate on fused gate/up rows: x (M, 2H) holds [gate | up] per row, out (M, H) gets
 * gate / (1 + exp(-gate)) * up. */
void silu_mul_f32(const float *x, float *out, int64_t M, int64_t H, int num_threads) {
#pragma omp parallel for schedule(static) num_threads(num_threads) if (M * H > 16384)
    for (int64_t m = 0; m < M; m++) silu_mul_row(x + m * 2 * H, x + m * 2 * H + H, out + m * H, H);
}

/* RoPE in place: each pair (x[2i], x[2i+1]) of x (T, heads, head_dim; token t's heads start at
 * x + t * stride_t, one after another) times freqs[t, i] =
 * (cos, sin) of freqs (T, head_dim / 2, 2), as the complex product (a c - b d, a d + b c), each
 * product and sum rounded (the build does not contract them into FMAs). torch's vectorised
 * complex multiply fuses some of these steps, so the two differ in the last bit of about a
 * quarter of the values; both are within one rounding of the exact product. */
void rotary_f32(float *x, const float *freqs, int64_t T, int64_t stride_t, int64_t heads,
                int64_t head_dim, int num_threads) {
#pragma omp parallel for schedule(static) num_threads(num_threads) if (T * heads * head_dim > 65536)
    for (int64_t t = 0; t < T; t++) rotary_row(x + t * stride_t, freqs + t * head_dim, heads, head_dim);
}
