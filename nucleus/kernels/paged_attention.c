/* Attention straight from the paged KV cache, float32, for the CPU: decode rows, causal prefill
 * chunks, and the store of new keys and values into their cache slots (one copy per row, where
 * index_copy_ dispatches twice).
 *
 * The torch path gathers every sequence's blocks into a padded (B, max_context, ...) copy and then
 * runs attention over it: the cache is read twice, written once, and short sequences pay for the
 * longest. Here decode attention is one task per sequence that reads its own blocks in place, a
 * whole cache row (every KV head) at a time; prefill attention is a register-tiled product over
 * each chunk's own keys (below). Arithmetic: scores = q.k * scale, softmax in float32 (max
 * subtracted), the probability-weighted sum of values. NaN in q or the cache propagates to the
 * output of the rows that see it. Built and loaded by nucleus/kernels/cpu.py.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"
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

#ifdef __AVX2__
/* dot(a, k[i], n) for 8 rows k[i] at once, n a multiple of 16, each summed in `dot`'s order: two
 * accumulators, added, then the 8 lanes as hsum8 adds them ((0+4)+(2+6)) + ((1+5)+(3+7)), the
 * reductions of the 8 done side by side. */
static inline __attribute__((always_inline)) __m256 load8(const void *p, int64_t i, const int F16) {
#ifdef __F16C__
    if (F16) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)p + i)));
#endif
    return _mm256_loadu_ps((const float *)p + i);
}

/* `k` are 8 rows of float32, or of float16 with F16 (widened as they are read). */
static inline __attribute__((always_inline)) __m256 dot8_of(const float *a, const void *const *k,
                                                            int64_t n, const int F16) {
    __m256 v[8];
    for (int i = 0; i < 8; i++) {
        __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
        for (int64_t d = 0; d < n; d += 16) {
            s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + d), load8(k[i], d, F16), s0);
            s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + d + 8), load8(k[i], d + 8, F16), s1);
        }
        v[i] = _mm256_add_ps(s0, s1);
    }
    /* lanes l and l + 4 of each: [v0 | v1] pairs -> x_i = (l0+l4, l1+l5, l2+l6, l3+l7) */
    __m256 x[4];
    for (int i = 0; i < 4; i++)
        x[i] = _mm256_add_ps(_mm256_permute2f128_ps(v[2 * i], v[2 * i + 1], 0x20),
                             _mm256_permute2f128_ps(v[2 * i], v[2 * i + 1], 0x31));
    /* (x0 + x2), (x1 + x3) of each, then their sum */
    const __m256 y0 = _mm256_add_ps(_mm256_shuffle_ps(x[0], x[1], _MM_SHUFFLE(1, 0, 1, 0)),
                                    _mm256_shuffle_ps(x[0], x[1], _MM_SHUFFLE(3, 2, 3, 2)));
    const __m256 y1 = _mm256_add_ps(_mm256_shuffle_ps(x[2], x[3], _MM_SHUFFLE(1, 0, 1, 0)),
                                    _mm256_shuffle_ps(x[2], x[3], _MM_SHUFFLE(3, 2, 3, 2)));
    /* y0 = [v0: a b | v2: a b | v1: a b | v3: a b] (a = x0+x2, b = x1+x3); likewise y1 for 4-7 */
    const __m256 z = _mm256_add_ps(_mm256_shuffle_ps(y0, y1, _MM_SHUFFLE(2, 0, 2, 0)),
                                   _mm256_shuffle_ps(y0, y1, _MM_SHUFFLE(3, 1, 3, 1)));
    /* z = [v0 v2 v4 v6 | v1 v3 v5 v7]: into order */
    return _mm256_permutevar8x32_ps(z, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

static inline __m256 dot8(const float *a, const float *const *k, int64_t n) {
    return dot8_of(a, (const void *const *)k, n, 0);
}
#endif

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

/* The query heads of KV head g of one decode row: scores against every cached key of the
 * sequence, softmax, the probability-weighted sum of the values. scores: group * context. */
static void decode_task_f32(const float *q, const float *k_cache, const float *v_cache,
                            float *out, const int64_t *table, int64_t context, int64_t g,
                            const attn_shape *shape, float *scores) {
    const int64_t head_dim = shape->head_dim, block_size = shape->block_size;
    const int64_t group = shape->n_heads / shape->n_kv_heads;
    const int64_t row_stride = shape->n_kv_heads * head_dim; /* one position, every KV head */
    const int64_t block_stride = block_size * row_stride;
    const int64_t kv_offset = g * head_dim;

    int64_t pos = 0;
#ifdef __AVX2__
    if (head_dim % 16 == 0) /* eight positions at a time, summed as `dot` sums one */
        for (; pos + 8 <= context; pos += 8) {
            const float *k[8];
            for (int i = 0; i < 8; i++)
                k[i] = k_cache + table[(pos + i) / block_size] * block_stride +
                       ((pos + i) % block_size) * row_stride + kv_offset;
            for (int64_t j = 0; j < group; j++) {
                const __m256 s = _mm256_mul_ps(dot8(q + (g * group + j) * head_dim, k, head_dim),
                                               _mm256_set1_ps(shape->scale));
                _mm256_storeu_ps(scores + j * context + pos, s);
            }
        }
#endif
    for (; pos < context; pos++) {
        const float *k = k_cache + table[pos / block_size] * block_stride +
                         (pos % block_size) * row_stride + kv_offset;
        for (int64_t j = 0; j < group; j++)
            scores[j * context + pos] =
                dot(q + (g * group + j) * head_dim, k, head_dim) * shape->scale;
    }
    for (int64_t j = 0; j < group; j++) softmax(scores + j * context, context);

    for (int64_t j = 0; j < group; j++) {
        const float *p = scores + j * context;
        float *o = out + (g * group + j) * head_dim;
        int64_t d = 0;
#ifdef __AVX2__
        for (; d + 32 <= head_dim; d += 32) {
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            for (int64_t pos = 0; pos < context; pos++) {
                const float *v = v_cache + table[pos / block_size] * block_stride +
                                 (pos % block_size) * row_stride + kv_offset + d;
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
                                        (pos % block_size) * row_stride + kv_offset + d];
            o[d] = acc;
        }
    }
}

/* decode_task_f32 over a float16 cache: the keys and values widened as they are read, the
 * probabilities rounded to float16 before they weight the values (llama.cpp's arithmetic). */
static void decode_task_f16(const float *q, const uint16_t *k_cache, const uint16_t *v_cache,
                            float *out, const int64_t *table, int64_t context, int64_t g,
                            const attn_shape *shape, float *scores) {
    const int64_t head_dim = shape->head_dim, block_size = shape->block_size;
    const int64_t group = shape->n_heads / shape->n_kv_heads;
    const int64_t row_stride = shape->n_kv_heads * head_dim;
    const int64_t block_stride = block_size * row_stride;
    const int64_t kv_offset = g * head_dim;
#define KV_ROW(pos) (table[(pos) / block_size] * block_stride + ((pos) % block_size) * row_stride + kv_offset)

    int64_t pos = 0;
#if defined(__AVX2__) && defined(__F16C__)
    if (head_dim % 16 == 0)
        for (; pos + 8 <= context; pos += 8) {
            const void *k[8];
            for (int i = 0; i < 8; i++) k[i] = k_cache + KV_ROW(pos + i);
            for (int64_t j = 0; j < group; j++) {
                const __m256 s = dot8_of(q + (g * group + j) * head_dim, k, head_dim, 1);
                _mm256_storeu_ps(scores + j * context + pos,
                                 _mm256_mul_ps(s, _mm256_set1_ps(shape->scale)));
            }
        }
#endif
    for (; pos < context; pos++) {
        const uint16_t *k = k_cache + KV_ROW(pos);
        for (int64_t j = 0; j < group; j++) {
            const float *qj = q + (g * group + j) * head_dim;
            int64_t d = 0;
            float total = 0.0f;
#if defined(__AVX2__) && defined(__F16C__)
            __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
            for (; d + 16 <= head_dim; d += 16) {
                s0 = _mm256_fmadd_ps(_mm256_loadu_ps(qj + d),
                                     _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(k + d))), s0);
                s1 = _mm256_fmadd_ps(_mm256_loadu_ps(qj + d + 8),
                                     _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(k + d + 8))), s1);
            }
            total = hsum8(_mm256_add_ps(s0, s1));
#endif
            for (; d < head_dim; d++) total += qj[d] * fp16_to_f32(k + d);
            scores[j * context + pos] = total * shape->scale;
        }
    }
    for (int64_t j = 0; j < group; j++) {
        float *p = scores + j * context;
        softmax(p, context);
        for (int64_t pos = 0; pos < context; pos++) p[pos] = round_to_f16(p[pos]);
    }

    for (int64_t j = 0; j < group; j++) {
        const float *p = scores + j * context;
        float *o = out + (g * group + j) * head_dim;
        int64_t d = 0;
#if defined(__AVX2__) && defined(__F16C__)
        for (; d + 32 <= head_dim; d += 32) {
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            for (int64_t pos = 0; pos < context; pos++) {
                const __m128i *v = (const __m128i *)(v_cache + KV_ROW(pos) + d);
                const __m256 pp = _mm256_set1_ps(p[pos]);
                a0 = _mm256_fmadd_ps(pp, _mm256_cvtph_ps(_mm_loadu_si128(v)), a0);
                a1 = _mm256_fmadd_ps(pp, _mm256_cvtph_ps(_mm_loadu_si128(v + 1)), a1);
                a2 = _mm256_fmadd_ps(pp, _mm256_cvtph_ps(_mm_loadu_si128(v + 2)), a2);
                a3 = _mm256_fmadd_ps(pp, _mm256_cvtph_ps(_mm_loadu_si128(v + 3)), a3);
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
                acc += p[pos] * fp16_to_f32(v_cache + KV_ROW(pos) + d);
            o[d] = acc;
        }
    }
#undef KV_ROW
}

void decode_task(const float *q, const void *k_cache, const void *v_cache, float *out,
                 const int64_t *table, int64_t context, int64_t g, const attn_shape *shape,
                 float *scores) {
    if (shape->kv_f16)
        decode_task_f16(q, k_cache, v_cache, out, table, context, g, shape, scores);
    else
        decode_task_f32(q, k_cache, v_cache, out, table, context, g, shape, scores);
}

static inline int64_t seq_at(const attn_seqs *seqs, int64_t i) {
    return seqs->which ? seqs->which[i] : i;
}

static inline int64_t row_of(const attn_seqs *seqs, int64_t s) {
    return seqs->start ? seqs->start[s] : s;
}

void decode_attention_body(team *t, const float *q, const void *k_cache, const void *v_cache,
                           float *out, const attn_seqs *seqs, const attn_shape *shape,
                           float *scores) {
    const int64_t n_kv = shape->n_kv_heads, row = shape->n_heads * shape->head_dim;
    const int64_t tasks = seqs->count * n_kv;
    for (int64_t task; (task = team_next(t, tasks)) >= 0;) {
        const int64_t s = seq_at(seqs, task / n_kv), r = row_of(seqs, s);
        decode_task(q + r * row, k_cache, v_cache, out + r * row,
                    seqs->block_tables + s * seqs->table_width, seqs->context_len[s],
                    task % n_kv, shape, scores);
    }
    team_next_done(t, tasks);
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
    const attn_shape shape = {n_heads, n_kv_heads, head_dim, block_size, scale, 0};
    const attn_seqs seqs = {NULL, NULL, context_lens, block_tables, NULL, table_width, num_seqs};
    int64_t max_context = 1;
    for (int64_t s = 0; s < num_seqs; s++)
        if (context_lens[s] > max_context) max_context = context_lens[s];
    const int64_t per_thread = (n_heads / n_kv_heads) * max_context;
    float *scores = malloc(sizeof(float) * per_thread * (num_threads > 0 ? num_threads : 1));
    if (!scores) return -1;
    team_shared shared = {0};
#pragma omp parallel num_threads(num_threads)
    {
        team t = team_join(&shared);
        decode_attention_body(&t, q, k_cache, v_cache, out, &seqs, &shape,
                              scores + t.ith * per_thread);
    }
    free(scores);
    return 0;
}

/* Store new keys and values k, v (T, row) at cache rows slots[t] of cache_k, cache_v
 * (num_slots, row). Returns 0, or -1 (nothing written) if a slot is out of range. */
int write_kv_f32(const float *k, const float *v, float *cache_k, float *cache_v,
                 const int64_t *slots, int64_t T, int64_t row, int64_t num_slots) {
    for (int64_t t = 0; t < T; t++)
        if (slots[t] < 0 || slots[t] >= num_slots) return -1;
    for (int64_t t = 0; t < T; t++) {
        memcpy(cache_k + slots[t] * row, k + t * row, sizeof(float) * row);
        memcpy(cache_v + slots[t] * row, v + t * row, sizeof(float) * row);
    }
    return 0;
}

#define MR 6  /* query rows per register tile */
#define NR 16 /* keys (score pass) or value columns (value pass) per register tile */

/* s[r][0..16) = scale * (q_r . k_j) for 16 keys j, from ROWS query rows q_r and kt, the keys
 * transposed (head_dim, ld): the outer-product form of a matrix product, 12 FMAs per 2 panel
 * loads and 6 broadcasts. ROWS is a compile-time constant at each call site. */
static inline __attribute__((always_inline)) void score_tile(const float *const *qr,
                                                             const float *kt, int64_t ld,
                                                             int64_t head_dim, float scale,
                                                             float *s, const int ROWS) {
#ifdef __AVX2__
    __m256 acc[MR][2];
    for (int r = 0; r < ROWS; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (int64_t d = 0; d < head_dim; d++) {
        const __m256 k0 = _mm256_loadu_ps(kt + d * ld), k1 = _mm256_loadu_ps(kt + d * ld + 8);
        for (int r = 0; r < ROWS; r++) {
            const __m256 qv = _mm256_broadcast_ss(qr[r] + d);
            acc[r][0] = _mm256_fmadd_ps(qv, k0, acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(qv, k1, acc[r][1]);
        }
    }
    const __m256 sc = _mm256_set1_ps(scale);
    for (int r = 0; r < ROWS; r++) {
        _mm256_storeu_ps(s + r * ld, _mm256_mul_ps(acc[r][0], sc));
        _mm256_storeu_ps(s + r * ld + 8, _mm256_mul_ps(acc[r][1], sc));
    }
#else
    for (int r = 0; r < ROWS; r++)
        for (int j = 0; j < NR; j++) {
            float acc = 0.0f;
            for (int64_t d = 0; d < head_dim; d++) acc += qr[r][d] * kt[d * ld + j];
            s[r * ld + j] = acc * scale;
        }
#endif
}

/* o_r[col .. col + 16) = sum over j < keys of p[r][j] * v_j[col .. col + 16), v_j = v_rows[j]. */
static inline __attribute__((always_inline)) void value_tile(const float *p, int64_t ld,
                                                             const float *const *v_rows,
                                                             int64_t col, int64_t keys,
                                                             float *const *orow, const int ROWS) {
#ifdef __AVX2__
    __m256 acc[MR][2];
    for (int r = 0; r < ROWS; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (int64_t j = 0; j < keys; j++) {
        const float *v = v_rows[j] + col;
        const __m256 v0 = _mm256_loadu_ps(v), v1 = _mm256_loadu_ps(v + 8);
        for (int r = 0; r < ROWS; r++) {
            const __m256 pv = _mm256_broadcast_ss(p + r * ld + j);
            acc[r][0] = _mm256_fmadd_ps(pv, v0, acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(pv, v1, acc[r][1]);
        }
    }
    for (int r = 0; r < ROWS; r++) {
        _mm256_storeu_ps(orow[r] + col, acc[r][0]);
        _mm256_storeu_ps(orow[r] + col + 8, acc[r][1]);
    }
#else
    for (int r = 0; r < ROWS; r++)
        for (int c = 0; c < NR; c++) {
            float acc = 0.0f;
            for (int64_t j = 0; j < keys; j++) acc += p[r * ld + j] * v_rows[j][col + c];
            orow[r][col + c] = acc;
        }
#endif
}

#define BY_ROWS(rows, call, ...)                        \
    switch (rows) {                                     \
        case 6: call(__VA_ARGS__, 6); break;            \
        case 5: call(__VA_ARGS__, 5); break;            \
        case 4: call(__VA_ARGS__, 4); break;            \
        case 3: call(__VA_ARGS__, 3); break;            \
        case 2: call(__VA_ARGS__, 2); break;            \
        default: call(__VA_ARGS__, 1); break;           \
    }

/* Query rows row0 .. row0 + rows (row = local position * group + head in the group) of KV head
 * g of one chunk, attending causally: scores against kt (this head's keys transposed, (head_dim,
 * ld)), softmax over each row's visible keys, then the values (v_rows: each key's values of this
 * head). s: scratch of MR rows of ld floats. */
static void prefill_tile(const float *q, float *out, const float *kt, int64_t ld,
                         const float *const *v_rows, float *s, int64_t row0, int64_t rows,
                         int64_t g, int64_t group, int64_t first_pos, int64_t n_heads,
                         int64_t head_dim, float scale, int round_p) {
    const float *qr[MR];
    float *orow[MR];
    int64_t visible[MR] = {0}; /* how many keys row r sees: its position + 1 */
    for (int64_t r = 0; r < rows; r++) {
        const int64_t t = (row0 + r) / group, h = g * group + (row0 + r) % group;
        qr[r] = q + (t * n_heads + h) * head_dim;
        orow[r] = out + (t * n_heads + h) * head_dim;
        visible[r] = first_pos + t + 1;
    }
    const int64_t keys_min = visible[0], keys_max = visible[rows - 1];

    for (int64_t j0 = 0; j0 < keys_max; j0 += NR)
        BY_ROWS(rows, score_tile, qr, kt + j0, ld, head_dim, scale, s + j0)
    for (int64_t r = 0; r < rows; r++) {
        softmax(s + r * ld, visible[r]);
        if (round_p)
            for (int64_t j = 0; j < visible[r]; j++) s[r * ld + j] = round_to_f16(s[r * ld + j]);
    }

    /* Keys every row of the tile sees go through the register tile; the few after them (the
     * diagonal) are added row by row, so no row reads a value it must not see. */
    for (int64_t col = 0; col < head_dim; col += NR)
        BY_ROWS(rows, value_tile, s, ld, v_rows, col, keys_min, orow)
    for (int64_t r = 0; r < rows; r++)
        for (int64_t j = keys_min; j < visible[r]; j++)
            for (int64_t d = 0; d < head_dim; d++) orow[r][d] += s[r * ld + j] * v_rows[j][d];
}

int64_t prefill_scratch_ld(int64_t max_context) { return (max_context + NR - 1) / NR * NR; }

void prefill_attention_body(team *t, const float *q, const void *k_cache, const void *v_cache,
                            float *out, const attn_seqs *seqs, const attn_shape *shape, float *kt,
                            float *vt, const float **v_rows, int64_t ld, float *s) {
    const int64_t n_heads = shape->n_heads, n_kv_heads = shape->n_kv_heads;
    const int64_t head_dim = shape->head_dim, block_size = shape->block_size;
    const int64_t group = n_heads / n_kv_heads;
    const int64_t row_stride = n_kv_heads * head_dim;
    const int64_t block_stride = block_size * row_stride;
    for (int64_t i = 0; i < seqs->count; i++) {
        const int64_t c = seq_at(seqs, i);
        const int64_t context = seqs->context_len[c], first_pos = context - seqs->q_len[c];
        const int64_t *table = seqs->block_tables + c * seqs->table_width;
        const int64_t rows = seqs->q_len[c] * group, tiles = (rows + MR - 1) / MR;
        const float *qc = q + row_of(seqs, c) * n_heads * head_dim;
        float *oc = out + row_of(seqs, c) * n_heads * head_dim;

        int64_t lo, hi;
        team_range(t, context, &lo, &hi);
        for (int64_t j = lo; j < hi; j++) {
            const int64_t slot = table[j / block_size] * block_stride +
                                 (j % block_size) * row_stride;
            for (int64_t g = 0; g < n_kv_heads; g++) {
                float *ktg = kt + g * head_dim * ld;
                if (shape->kv_f16) { /* widened: keys transposed, values into vt */
                    const uint16_t *k = (const uint16_t *)k_cache + slot + g * head_dim;
                    const uint16_t *v = (const uint16_t *)v_cache + slot + g * head_dim;
                    float *vrow = vt + (g * ld + j) * head_dim;
                    for (int64_t d = 0; d < head_dim; d++) {
                        ktg[d * ld + j] = fp16_to_f32(k + d);
                        vrow[d] = fp16_to_f32(v + d);
                    }
                    v_rows[g * ld + j] = vrow;
                } else {
                    const float *k = (const float *)k_cache + slot + g * head_dim;
                    for (int64_t d = 0; d < head_dim; d++) ktg[d * ld + j] = k[d];
                    v_rows[g * ld + j] = (const float *)v_cache + slot + g * head_dim;
                }
            }
        }
        team_barrier(t);
        /* Later tiles see more keys: hand them out first. */
        const int64_t tasks = n_kv_heads * tiles;
        for (int64_t next; (next = team_next(t, tasks)) >= 0;) {
            const int64_t task = tasks - 1 - next;
            const int64_t g = task / tiles, row0 = (task % tiles) * MR;
            const int64_t n = rows - row0 < MR ? rows - row0 : MR;
            prefill_tile(qc, oc, kt + g * head_dim * ld, ld, v_rows + g * ld, s, row0, n, g,
                         group, first_pos, n_heads, head_dim, shape->scale, shape->kv_f16);
        }
        team_next_done(t, tasks);
        team_barrier(t); /* before the next chunk's keys take the scratch */
    }
}

/* Causal attention of prefill chunks, reading the paged cache in place. Chunk c has q_lens[c]
 * query rows starting at flat row starts[c] of q and out ((T, n_heads, head_dim)), the last
 * q_lens[c] positions of its context_lens[c] keys, found through block_tables[c]. head_dim must
 * be a multiple of 16. Per chunk, each KV head's keys are first transposed into scratch, then
 * tiles of 6 query rows of one KV head (its query heads side by side) are the parallel tasks.
 * Returns 0, or -1 if a scratch allocation failed. */
int paged_prefill_attention_f32(const float *q, const float *k_cache, const float *v_cache,
                                float *out, const int64_t *starts, const int64_t *q_lens,
                                const int64_t *context_lens, const int64_t *block_tables,
                                int64_t table_width, int64_t num_chunks, int64_t n_heads,
                                int64_t n_kv_heads, int64_t head_dim, int64_t block_size,
                                float scale, int num_threads) {
    const attn_shape shape = {n_heads, n_kv_heads, head_dim, block_size, scale, 0};
    const attn_seqs seqs = {starts, q_lens, context_lens, block_tables, NULL, table_width,
                            num_chunks};
    int64_t max_context = 1;
    for (int64_t c = 0; c < num_chunks; c++)
        if (context_lens[c] > max_context) max_context = context_lens[c];
    const int64_t ld = prefill_scratch_ld(max_context);
    float *kt = calloc((size_t)(n_kv_heads * head_dim * ld), sizeof(float));
    const float **v_rows = malloc(sizeof(float *) * n_kv_heads * ld);
    float *s = malloc(sizeof(float) * MR * ld * (num_threads > 0 ? num_threads : 1));
    const int ok = kt && v_rows && s;
    if (ok) {
        team_shared shared = {0};
#pragma omp parallel num_threads(num_threads)
        {
            team t = team_join(&shared);
            prefill_attention_body(&t, q, k_cache, v_cache, out, &seqs, &shape, kt, NULL, v_rows,
                                   ld, s + t.ith * MR * ld);
        }
    }
    free(kt);
    free(v_rows);
    free(s);
    return ok ? 0 : -1;
}
