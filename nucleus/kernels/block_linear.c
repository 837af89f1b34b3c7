/* y = x W^T with W held as 8-bit integers in blocks of 32: W[n, k] = scale[n, k/32] * q[n, k] +
 * offset[n, k/32], float32 activations and accumulation.
 *
 * GGUF's Q8_0, Q4_0 and Q4_1 weights are exactly this (an f16 scale times a small integer, plus an
 * f16 minimum for Q4_1): each weight is rebuilt with one fused multiply-add, which gives the same
 * float32 value the dequantizer writes (the product is exact, so one rounding either way). The
 * matrix product therefore equals the float32 one up to summation order, while reading a quarter
 * of the bytes: at the small row counts of decoding, where a float32 GEMM waits on memory, that
 * is most of the time.
 *
 * Layout (packed by nucleus/kernels/cpu.py): W in panels of 16 output rows, k-major inside a panel,
 * so a panel row `q[p][k][0..16)` is 16 contiguous bytes: q (N/16, K, 16) int8, scale and offset
 * (N/16, K/32, 16) float32. Each thread rebuilds one float32 panel (K x 16) at a time and runs a
 * 6 x 16 register tile over it (12 accumulators, 2 panel loads and 6 broadcasts per 12 FMAs).
 */
#include <stdint.h>
#include <stdlib.h>

#ifdef __AVX2__
#include <immintrin.h>
#endif

#define QBLOCK 32
#define PANEL 16
#define MR 6
#ifndef MC
#define MC 96
#endif

static void rebuild_panel(const int8_t *q, const float *scale, const float *offset, int64_t K,
                          float *w) {
    for (int64_t k = 0; k < K; k++) {
        const float *s = scale + (k / QBLOCK) * PANEL, *o = offset + (k / QBLOCK) * PANEL;
        const int8_t *qk = q + k * PANEL;
        float *wk = w + k * PANEL;
#ifdef __AVX2__
        const __m128i bytes = _mm_loadu_si128((const __m128i *)qk);
        const __m256 lo = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes));
        const __m256 hi = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(bytes, 8)));
        _mm256_storeu_ps(wk, _mm256_fmadd_ps(_mm256_loadu_ps(s), lo, _mm256_loadu_ps(o)));
        _mm256_storeu_ps(wk + 8,
                         _mm256_fmadd_ps(_mm256_loadu_ps(s + 8), hi, _mm256_loadu_ps(o + 8)));
#else
        for (int j = 0; j < PANEL; j++) wk[j] = __builtin_fmaf(s[j], (float)qk[j], o[j]);
#endif
    }
}

/* y[m0 + r, n0 .. n0 + 16) = x[m0 + r, :] . w for r < ROWS (a compile-time constant at each call
 * site, so the accumulators live in registers). */
static inline __attribute__((always_inline)) void tile(const float *x, const float *w, float *y,
                                                       int64_t K, int64_t N, int64_t m0,
                                                       int64_t n0, const int ROWS) {
#ifdef __AVX2__
    __m256 acc[MR][2];
    for (int r = 0; r < ROWS; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k++) {
        const __m256 w0 = _mm256_loadu_ps(w + k * PANEL), w1 = _mm256_loadu_ps(w + k * PANEL + 8);
        for (int r = 0; r < ROWS; r++) {
            const __m256 xv = _mm256_broadcast_ss(x + (m0 + r) * K + k);
            acc[r][0] = _mm256_fmadd_ps(xv, w0, acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(xv, w1, acc[r][1]);
        }
    }
    for (int r = 0; r < ROWS; r++) {
        _mm256_storeu_ps(y + (m0 + r) * N + n0, acc[r][0]);
        _mm256_storeu_ps(y + (m0 + r) * N + n0 + 8, acc[r][1]);
    }
#else
    for (int r = 0; r < ROWS; r++) {
        float acc[PANEL] = {0};
        for (int64_t k = 0; k < K; k++)
            for (int j = 0; j < PANEL; j++) acc[j] += x[(m0 + r) * K + k] * w[k * PANEL + j];
        for (int j = 0; j < PANEL; j++) y[(m0 + r) * N + n0 + j] = acc[j];
    }
#endif
}

/* The same product for the first ROWS <= 4 rows, rebuilding each panel row in registers as it
 * goes: with so few rows, storing and reloading the rebuilt panel would cost more than the FMAs. */
static inline __attribute__((always_inline)) void tile_direct(const float *x, const int8_t *q,
                                                              const float *scale,
                                                              const float *offset, float *y,
                                                              int64_t K, int64_t N, int64_t n0,
                                                              const int ROWS) {
#ifdef __AVX2__
    __m256 acc[4][2];
    for (int r = 0; r < ROWS; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (int64_t b = 0; b < K / QBLOCK; b++) {
        const __m256 s0 = _mm256_loadu_ps(scale + b * PANEL), s1 = _mm256_loadu_ps(scale + b * PANEL + 8);
        const __m256 o0 = _mm256_loadu_ps(offset + b * PANEL), o1 = _mm256_loadu_ps(offset + b * PANEL + 8);
        for (int64_t k = b * QBLOCK; k < (b + 1) * QBLOCK; k++) {
            const __m128i bytes = _mm_loadu_si128((const __m128i *)(q + k * PANEL));
            const __m256 w0 = _mm256_fmadd_ps(s0, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes)), o0);
            const __m256 w1 = _mm256_fmadd_ps(
                s1, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(bytes, 8))), o1);
            for (int r = 0; r < ROWS; r++) {
                const __m256 xv = _mm256_broadcast_ss(x + r * K + k);
                acc[r][0] = _mm256_fmadd_ps(xv, w0, acc[r][0]);
                acc[r][1] = _mm256_fmadd_ps(xv, w1, acc[r][1]);
            }
        }
    }
    for (int r = 0; r < ROWS; r++) {
        _mm256_storeu_ps(y + r * N + n0, acc[r][0]);
        _mm256_storeu_ps(y + r * N + n0 + 8, acc[r][1]);
    }
#else
    for (int r = 0; r < ROWS; r++)
        for (int j = 0; j < PANEL; j++) {
            float acc = 0.0f;
            for (int64_t k = 0; k < K; k++)
                acc += x[r * K + k] * __builtin_fmaf(scale[(k / QBLOCK) * PANEL + j],
                                                     (float)q[k * PANEL + j],
                                                     offset[(k / QBLOCK) * PANEL + j]);
            y[r * N + n0 + j] = acc;
        }
#endif
}

/* x: (M, K) float32; q, scale, offset: packed as above; y: (M, N) float32. K must be a multiple
 * of 32 and N of 16. Returns 0, or -1 if a scratch allocation failed. */
int block_int8_linear_f32(const float *x, const int8_t *q, const float *scale, const float *offset,
                          float *y, int64_t M, int64_t K, int64_t N, int num_threads) {
    int failed = 0;
#pragma omp parallel num_threads(num_threads) reduction(| : failed)
    {
        float *w = aligned_alloc(64, sizeof(float) * K * PANEL);
        if (!w) failed = 1;
        /* Rows in chunks that stay in cache while every panel passes over them. */
        for (int64_t c0 = 0; c0 < M; c0 += MC) {
            const int64_t rows = M - c0 < MC ? M - c0 : MC;
            const float *xc = x + c0 * K;
            float *yc = y + c0 * N;
#pragma omp for schedule(static)
            for (int64_t p = 0; p < N / PANEL; p++) {
                if (!w) continue;
                const int8_t *qp = q + p * K * PANEL;
                const float *sp = scale + p * (K / QBLOCK) * PANEL;
                const float *op = offset + p * (K / QBLOCK) * PANEL;
                const int64_t n0 = p * PANEL;
                switch (rows) {
                    case 1: tile_direct(xc, qp, sp, op, yc, K, N, n0, 1); continue;
                    case 2: tile_direct(xc, qp, sp, op, yc, K, N, n0, 2); continue;
                    case 3: tile_direct(xc, qp, sp, op, yc, K, N, n0, 3); continue;
                    case 4: tile_direct(xc, qp, sp, op, yc, K, N, n0, 4); continue;
                    default: break;
                }
                rebuild_panel(qp, sp, op, K, w);
                int64_t m0 = 0;
                for (; m0 + MR <= rows; m0 += MR) tile(xc, w, yc, K, N, m0, n0, MR);
                switch (rows - m0) {
                    case 5: tile(xc, w, yc, K, N, m0, n0, 5); break;
                    case 4: tile(xc, w, yc, K, N, m0, n0, 4); break;
                    case 3: tile(xc, w, yc, K, N, m0, n0, 3); break;
                    case 2: tile(xc, w, yc, K, N, m0, n0, 2); break;
                    case 1: tile(xc, w, yc, K, N, m0, n0, 1); break;
                    default: break;
                }
            }
        }
        free(w);
    }
    return failed ? -1 : 0;
}
