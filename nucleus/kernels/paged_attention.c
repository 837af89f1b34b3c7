/* Decode attention straight from the paged KV cache, float32, for the CPU.
 *
 * The torch path gathers every sequence's blocks into a padded (B, max_context, ...) copy and then
 * runs attention over it: the cache is read twice, written once, and short sequences pay for the
 * longest. Here each sequence is one task that reads its own blocks in place, a whole cache row
 * (every KV head) at a time. Arithmetic: scores = q.k * scale, softmax in float32 (max
 * subtracted), the probability-weighted sum of values. NaN in q or the cache propagates to the
 * output. Built and loaded by nucleus/kernels/cpu.py.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "simd.h"

static inline float dot(const float *a, const float *b, int64_t n) {
    int64_t i = 0;
    float total = 0.0f;
#ifdef __AVX2__
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    for (; i + 16 <= n; i += 16) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
    }
    total = hsum8(_mm256_add_ps(s0, s1));
#endif
    for (; i < n; i++) total += a[i] * b[i];
    return total;
}

/* row[i] = exp(row[i] - max(row)) / sum, in place. */
static void softmax(float *row, int64_t n) {
    float peak = -INFINITY;
    for (int64_t i = 0; i < n; i++) peak = row[i] > peak ? row[i] : peak;
    float total = 0.0f;
    int64_t i = 0;
#ifdef __AVX2__
    __m256 sum8 = _mm256_setzero_ps();
    const __m256 peak8 = _mm256_set1_ps(peak);
    for (; i + 8 <= n; i += 8) {
        const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(row + i), peak8));
        _mm256_storeu_ps(row + i, e);
        sum8 = _mm256_add_ps(sum8, e);
    }
    total = hsum8(sum8);
#endif
    for (; i < n; i++) {
        row[i] = expf(row[i] - peak);
        total += row[i];
    }
    const float inv = 1.0f / total;
    for (i = 0; i < n; i++) row[i] *= inv;
}

/* q, out: (num_seqs, n_heads, head_dim); k_cache, v_cache: one layer,
 * (num_blocks, block_size, n_kv_heads, head_dim); block_tables: (num_seqs, table_width);
 * context_lens: (num_seqs,), each >= 1. Query heads [g * group, (g + 1) * group) read KV head g.
 * Returns 0, or -1 if a scratch allocation failed. */
int paged_decode_attention_f32(const float *q, const float *k_cache, const float *v_cache,
                               float *out, const int64_t *block_tables, int64_t table_width,
                               const int64_t *context_lens, int64_t num_seqs, int64_t n_heads,
                               int64_t n_kv_heads, int64_t head_dim, int64_t block_size,
                               float scale, int num_threads) {
    const int64_t group = n_heads / n_kv_heads;
    const int64_t row_stride = n_kv_heads * head_dim; /* one position, every KV head */
    const int64_t block_stride = block_size * row_stride;
    int64_t max_context = 1;
    for (int64_t s = 0; s < num_seqs; s++)
        if (context_lens[s] > max_context) max_context = context_lens[s];
    int failed = 0;

#pragma omp parallel num_threads(num_threads) reduction(| : failed)
    {
        float *scores = malloc(sizeof(float) * n_heads * max_context);
        if (!scores) failed = 1;
#pragma omp for schedule(dynamic, 1)
        for (int64_t s = 0; s < num_seqs; s++) {
            if (!scores) continue;
            const int64_t context = context_lens[s];
            const int64_t *table = block_tables + s * table_width;
            const float *qs = q + s * n_heads * head_dim;
            float *os = out + s * n_heads * head_dim;

            for (int64_t pos = 0; pos < context; pos++) {
                const float *k = k_cache + table[pos / block_size] * block_stride +
                                 (pos % block_size) * row_stride;
                for (int64_t h = 0; h < n_heads; h++)
                    scores[h * context + pos] =
                        dot(qs + h * head_dim, k + (h / group) * head_dim, head_dim) * scale;
            }
            for (int64_t h = 0; h < n_heads; h++) softmax(scores + h * context, context);

            for (int64_t h = 0; h < n_heads; h++) {
                const float *p = scores + h * context;
                const int64_t v_offset = (h / group) * head_dim;
                float *o = os + h * head_dim;
                int64_t d = 0;
#ifdef __AVX2__
                for (; d + 32 <= head_dim; d += 32) {
                    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
                    for (int64_t pos = 0; pos < context; pos++) {
                        const float *v = v_cache + table[pos / block_size] * block_stride +
                                         (pos % block_size) * row_stride + v_offset + d;
                        const __m256 pp = _mm256_set1_ps(p[pos]);
                        a0 = _mm256_fmadd_ps(pp, _mm256_loadu_ps(v), a0);
                        a1 = _mm256_fmadd_ps(pp, _mm256_loadu_ps(v + 8), a1);
                        a2 = _mm256_fmadd_ps(pp, _mm256_loadu_ps(v + 16), a2);
                        a3 = _mm256_fmadd_ps(pp, _mm256_loadu_ps(v + 24), a3);
                    }
                    _mm256_storeu_ps(o + d, a0);
                    _mm256_storeu_ps(o + d + 8, a1);
                    _mm256_storeu_ps(o + d + 16, a2);
                    _mm256_storeu_ps(o + d + 24, a3);
                }
#endif
                for (; d < head_dim; d++) {
                    float acc = 0.0f;
                    for (int64_t pos = 0; pos < context; pos++)
                        acc += p[pos] * v_cache[table[pos / block_size] * block_stride +
                                                (pos % block_size) * row_stride + v_offset + d];
                    o[d] = acc;
                }
            }
        }
        free(scores);
    }
    return failed ? -1 : 0;
}
