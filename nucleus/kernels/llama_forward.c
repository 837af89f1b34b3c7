/* The Llama forward pass over GGUF weights, for the CPU: one call per engine step, one OpenMP
 * parallel region for the whole step.
 *
 * The same model as nucleus/model.py (RMSNorm, RoPE on interleaved pairs, GQA attention through
 * the paged KV cache, SwiGLU, the residual stream in float32), computed the way llama.cpp computes
 * a GGUF model: each matrix product quantizes its input to 8 bits per block and multiplies the
 * file's own blocks (quantized.c), and the KV cache holds float16. What Python would spend per layer at batch 1 (a dozen kernel
 * calls, their argument checks and temporaries, the thread pool woken for each) is here a
 * barrier between stages: at the default model's size that overhead, not arithmetic, was most of
 * a decode step.
 *
 * A step is a flat batch of tokens: sequence s owns rows [start, start + q_len) of it, the last
 * q_len positions of its context_len; their keys and values are stored at `slots` before
 * attention reads them. Rows with q_len 1 take the decode path, longer ones the prefill kernel.
 * The result is the final normed hidden state of every row, as Transformer.forward returns it;
 * the logits of the rows that need them are one more product (quantized_linear_f32 with the
 * output matrix). Built by nucleus/kernels/library.py, driven by nucleus/cpu/model.py.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"
#include "simd.h"

typedef struct {
    nc_matrix wq, wk, wv, wo, w1, w2, w3;
    const float *attn_norm, *ffn_norm;
} nc_layer;

typedef struct {
    int64_t n_layers, dim, n_heads, n_kv_heads, head_dim, ffn_dim, vocab;
    float norm_eps;
    const float *rope_freqs; /* head_dim / 2 angular frequencies */
    nc_matrix tok_embd;
    const float *norm;
    const nc_layer *layers;
} nc_model;

typedef struct {
    /* The KV cache: keys and values of every layer, (n_layers, num_blocks, block_size,
     * n_kv_heads, head_dim) float16 each, as llama.cpp keeps them. */
    uint16_t *k_cache, *v_cache;
    int64_t num_blocks, block_size;
    /* The flat batch. */
    const int64_t *tokens, *positions, *slots;
    int64_t num_tokens;
    /* Its sequences (attn_seqs' fields, `which` unused). */
    const int64_t *seq_start, *seq_len, *seq_context, *block_tables;
    int64_t num_seqs, table_width;
    /* The final normed hidden states, (num_tokens, dim). */
    float *hidden;
    int64_t num_threads;
} nc_batch;

enum { FORWARD_OK = 0, FORWARD_NO_MEMORY = -1, FORWARD_BAD_BATCH = -2 };

/* dst = x as float16 (the cache's form). */
static void store_f16(uint16_t *dst, const float *x, int64_t n) {
    int64_t i = 0;
#if defined(__AVX2__) && defined(__F16C__)
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(dst + i), _mm256_cvtps_ph(_mm256_loadu_ps(x + i), 0));
#endif
    for (; i < n; i++) dst[i] = f32_to_fp16(x[i]);
}

/* x rounded to float16 values in place: the queries, as llama.cpp's product with a float16
 * cache rounds them. */
static void round_f16(float *x, int64_t n) {
    int64_t i = 0;
#if defined(__AVX2__) && defined(__F16C__)
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(x + i, _mm256_cvtph_ps(_mm256_cvtps_ph(_mm256_loadu_ps(x + i), 0)));
#endif
    for (; i < n; i++) x[i] = round_to_f16(x[i]);
}

/* Every index the step will follow is in range: a bad one is refused before anything runs. */
static int check_batch(const nc_model *m, const nc_batch *b) {
    const int64_t T = b->num_tokens, slots = b->num_blocks * b->block_size;
    for (int64_t t = 0; t < T; t++)
        if (b->tokens[t] < 0 || b->tokens[t] >= m->vocab || b->slots[t] < 0 ||
            b->slots[t] >= slots || b->positions[t] < 0)
            return 0;
    int64_t covered = 0;
    for (int64_t s = 0; s < b->num_seqs; s++) {
        const int64_t start = b->seq_start[s], n = b->seq_len[s], ctx = b->seq_context[s];
        if (start != covered || n < 1 || ctx < n) return 0;
        covered += n;
        const int64_t blocks = (ctx + b->block_size - 1) / b->block_size;
        if (blocks > b->table_width) return 0;
        for (int64_t j = 0; j < blocks; j++) {
            const int64_t block = b->block_tables[s * b->table_width + j];
            if (block < 0 || block >= b->num_blocks) return 0;
        }
    }
    return covered == T;
}

/* The 8-bit forms of one input, one buffer per kind of activation the consumers want. */
typedef struct {
    void *q32, *q256;
} act_buffers;

static inline const void *act_for(const act_buffers *a, const nc_matrix *w) {
    const int kind = act_kind(w->type);
    return kind == ACT_Q8_32 ? a->q32 : kind == ACT_Q8_256 ? a->q256 : NULL;
}

/* Quantize row x (K values) for every consumer among `ws`. */
static void quantize_for(const nc_matrix *const *ws, int count, const float *x, int64_t K,
                         int64_t row, const act_buffers *a) {
    int done32 = 0, done256 = 0;
    for (int i = 0; i < count; i++) {
        const int kind = act_kind(ws[i]->type);
        if (kind == ACT_Q8_32 && !done32) {
            quantize_row(kind, x, K, (char *)a->q32 + row * act_row_bytes(kind, K));
            done32 = 1;
        } else if (kind == ACT_Q8_256 && !done256) {
            quantize_row(kind, x, K, (char *)a->q256 + row * act_row_bytes(kind, K));
            done256 = 1;
        }
    }
}

/* Batches of at most this many rows do the row-wise stages (norms, quantization, SwiGLU) in
 * every thread, each into its own copy: the product that follows then needs no barrier. Larger
 * ones split the rows and wait. */
#define SMALL_BATCH 8

/* The buffers of the row-wise stages: one set per thread for a small batch, else one shared. */
typedef struct {
    float *x;   /* the residual stream (T, dim) */
    float *hn;  /* normed (T, dim) */
    float *a;   /* SwiGLU output (T, ffn_dim) */
    act_buffers act;
} row_buffers;

int llama_forward(const nc_model *m, const nc_batch *b) {
    if (!check_batch(m, b)) return FORWARD_BAD_BATCH;
    const int64_t T = b->num_tokens, D = m->dim, H = m->n_heads, KVH = m->n_kv_heads;
    const int64_t hd = m->head_dim, F = m->ffn_dim, QW = H * hd, KVW = KVH * hd;
    const int64_t K_max = D > QW ? (D > F ? D : F) : (QW > F ? QW : F);
    const int64_t layer_stride = b->num_blocks * b->block_size * KVW;
    const attn_shape shape = {H, KVH, hd, b->block_size, 1.0f / sqrtf((float)hd), 1};
    const int nthreads = b->num_threads > 0 ? (int)b->num_threads : 1;
    const int small = T <= SMALL_BATCH;
    const int copies = small ? nthreads : 1;

    /* The sequences by attention path; the row of each flat token's sequence path. */
    int64_t *which = malloc(sizeof(int64_t) * (b->num_seqs + 1));
    char *decode_row = calloc(T + 1, 1);
    int64_t num_decode = 0, max_decode_ctx = 1, max_prefill_ctx = 1;
    if (which && decode_row) {
        for (int64_t s = 0; s < b->num_seqs; s++)
            if (b->seq_len[s] == 1) {
                which[num_decode++] = s;
                decode_row[b->seq_start[s]] = 1;
                if (b->seq_context[s] > max_decode_ctx) max_decode_ctx = b->seq_context[s];
            }
        int64_t n = num_decode;
        for (int64_t s = 0; s < b->num_seqs; s++)
            if (b->seq_len[s] > 1) {
                which[n++] = s;
                if (b->seq_context[s] > max_prefill_ctx) max_prefill_ctx = b->seq_context[s];
            }
    }
    const attn_seqs decode = {b->seq_start, b->seq_len, b->seq_context, b->block_tables, which,
                              b->table_width, num_decode};
    const attn_seqs prefill = {b->seq_start, b->seq_len, b->seq_context, b->block_tables,
                               which ? which + num_decode : NULL, b->table_width,
                               b->num_seqs - num_decode};
    const int has_prefill = prefill.count > 0;
    const int64_t ld = prefill_scratch_ld(max_prefill_ctx), group = H / KVH;

    /* Shared: the products' outputs, the RoPE table, the prefill kernel's scratch. */
    float *q = malloc(sizeof(float) * T * QW);
    float *k = malloc(sizeof(float) * T * KVW);
    float *v = malloc(sizeof(float) * T * KVW);
    float *att = malloc(sizeof(float) * T * QW);
    float *o = malloc(sizeof(float) * T * D);   /* attention's projection, then the FFN's */
    float *gu = malloc(sizeof(float) * T * 2 * F); /* [gate | up] per row */
    float *rope = malloc(sizeof(float) * T * hd);  /* (cos, sin) per pair */
    float *kt = has_prefill ? malloc(sizeof(float) * KVH * hd * ld) : NULL;
    float *vt = has_prefill ? malloc(sizeof(float) * KVH * hd * ld) : NULL;
    const float **v_rows = has_prefill ? malloc(sizeof(float *) * KVH * ld) : NULL;
    /* Per thread: attention scratch, and the row buffers (all threads' in one allocation). */
    const int64_t scores_len = group * max_decode_ctx + (has_prefill ? 6 * ld : 0);
    float *scores = malloc(sizeof(float) * scores_len * nthreads);
    const int64_t act32 = T * act_row_bytes(ACT_Q8_32, K_max) + 64;
    const int64_t act256 = T * act_row_bytes(ACT_Q8_256, K_max) + 64;
    const int64_t row_floats = T * (2 * D + F);
    float *row_mem = malloc((sizeof(float) * row_floats + act32 + act256) * copies);
    int ok = which && decode_row && q && k && v && att && o && gu && rope && scores && row_mem &&
             (!has_prefill || (kt && vt && v_rows));

    if (ok) {
        team_shared shared = {0};
#pragma omp parallel num_threads(nthreads)
        {
            team t = team_join(&shared);
            float *my_scores = scores + t.ith * scores_len;
            const int copy = small ? t.ith : 0;
            char *mem = (char *)row_mem + copy * (sizeof(float) * row_floats + act32 + act256);
            const row_buffers rb = {(float *)mem, (float *)mem + T * D, (float *)mem + 2 * T * D,
                                    {mem + sizeof(float) * row_floats,
                                     mem + sizeof(float) * row_floats + act32}};
            int64_t lo, hi;           /* rows of the row-wise stages */
            if (small) lo = 0, hi = T;
            else team_range(&t, T, &lo, &hi);
#define END_ROW_STAGE() \
    if (!small) team_barrier(&t)

            for (int64_t r = lo; r < hi; r++) {
                dequantize_row(&m->tok_embd, b->tokens[r], rb.x + r * D);
            }
            {
                int64_t rlo, rhi;
                team_range(&t, T, &rlo, &rhi);
                for (int64_t r = rlo; r < rhi; r++) {
                    const float pos = (float)b->positions[r];
                    for (int64_t i = 0; i < hd / 2; i++) {
                        const float angle = pos * m->rope_freqs[i];
                        rope[r * hd + 2 * i] = cosf(angle);
                        rope[r * hd + 2 * i + 1] = sinf(angle);
                    }
                }
            }
            team_barrier(&t);

            for (int64_t l = 0; l < m->n_layers; l++) {
                const nc_layer *L = m->layers + l;
                uint16_t *kc = b->k_cache + l * layer_stride, *vc = b->v_cache + l * layer_stride;
                const nc_matrix *qkv[3] = {&L->wq, &L->wk, &L->wv};
                const nc_matrix *gate_up[2] = {&L->w1, &L->w3};

                /* x += the previous block's FFN output; hn = norm(x); its 8-bit forms */
                for (int64_t r = lo; r < hi; r++) {
                    float *xr = rb.x + r * D;
                    if (l > 0)
                        for (int64_t i = 0; i < D; i++) xr[i] += o[r * D + i];
                    rms_norm_row(xr, L->attn_norm, rb.hn + r * D, D, m->norm_eps);
                    quantize_for(qkv, 3, rb.hn + r * D, D, r, &rb.act);
                }
                END_ROW_STAGE();
                matmul_rows(&t, &L->wq, rb.hn, D, act_for(&rb.act, &L->wq), T, q, QW);
                matmul_rows(&t, &L->wk, rb.hn, D, act_for(&rb.act, &L->wk), T, k, KVW);
                matmul_rows(&t, &L->wv, rb.hn, D, act_for(&rb.act, &L->wv), T, v, KVW);
                team_barrier(&t);

                /* Decode rows: each (row, KV head) task ropes its heads, stores its K and V
                 * and attends. Prefill rows: RoPE and the store first, then the chunks. */
                for (int64_t task; (task = team_next(&t, decode.count * KVH)) >= 0;) {
                    const int64_t s = which[task / KVH], g = task % KVH, r = b->seq_start[s];
                    float *kr = k + r * KVW + g * hd, *qr = q + r * QW + g * group * hd;
                    rotary_row(qr, rope + r * hd, group, hd);
                    rotary_row(kr, rope + r * hd, 1, hd);
                    round_f16(qr, group * hd);
                    store_f16(kc + b->slots[r] * KVW + g * hd, kr, hd);
                    store_f16(vc + b->slots[r] * KVW + g * hd, v + r * KVW + g * hd, hd);
                    decode_task(q + r * QW, kc, vc, att + r * QW,
                                b->block_tables + s * b->table_width, b->seq_context[s], g,
                                &shape, my_scores);
                }
                team_next_done(&t, decode.count * KVH);
                if (has_prefill) {
                    int64_t plo, phi;
                    team_range(&t, T, &plo, &phi);
                    for (int64_t r = plo; r < phi; r++) {
                        if (decode_row[r]) continue;
                        rotary_row(q + r * QW, rope + r * hd, H, hd);
                        rotary_row(k + r * KVW, rope + r * hd, KVH, hd);
                        round_f16(q + r * QW, QW);
                        store_f16(kc + b->slots[r] * KVW, k + r * KVW, KVW);
                        store_f16(vc + b->slots[r] * KVW, v + r * KVW, KVW);
                    }
                    team_barrier(&t);
                    prefill_attention_body(&t, q, kc, vc, att, &prefill, &shape, kt, vt, v_rows,
                                           ld, my_scores + group * max_decode_ctx);
                } else {
                    team_barrier(&t);
                }

                /* the attention's output projection */
                for (int64_t r = lo; r < hi; r++)
                    quantize_for((const nc_matrix *[]){&L->wo}, 1, att + r * QW, QW, r, &rb.act);
                END_ROW_STAGE();
                matmul_rows(&t, &L->wo, att, QW, act_for(&rb.act, &L->wo), T, o, D);
                team_barrier(&t);

                /* x += attention; hn = norm(x); the gate and up projections */
                for (int64_t r = lo; r < hi; r++) {
                    float *xr = rb.x + r * D;
                    for (int64_t i = 0; i < D; i++) xr[i] += o[r * D + i];
                    rms_norm_row(xr, L->ffn_norm, rb.hn + r * D, D, m->norm_eps);
                    quantize_for(gate_up, 2, rb.hn + r * D, D, r, &rb.act);
                }
                END_ROW_STAGE();
                matmul_rows(&t, &L->w1, rb.hn, D, act_for(&rb.act, &L->w1), T, gu, 2 * F);
                matmul_rows(&t, &L->w3, rb.hn, D, act_for(&rb.act, &L->w3), T, gu + F, 2 * F);
                team_barrier(&t);

                /* SwiGLU, then the down projection (into o: the next stage adds it to x) */
                for (int64_t r = lo; r < hi; r++) {
                    silu_mul_row(gu + r * 2 * F, gu + r * 2 * F + F, rb.a + r * F, F);
                    quantize_for((const nc_matrix *[]){&L->w2}, 1, rb.a + r * F, F, r, &rb.act);
                }
                END_ROW_STAGE();
                matmul_rows(&t, &L->w2, rb.a, F, act_for(&rb.act, &L->w2), T, o, D);
                team_barrier(&t);
            }

            /* x += the last block's output; the final norm, each row by one thread */
            int64_t flo, fhi;
            team_range(&t, T, &flo, &fhi);
            if (!small) flo = lo, fhi = hi;
            for (int64_t r = flo; r < fhi; r++) {
                float *xr = rb.x + r * D;
                for (int64_t i = 0; i < D; i++) xr[i] += o[r * D + i];
                rms_norm_row(xr, m->norm, b->hidden + r * D, D, m->norm_eps);
            }
#undef END_ROW_STAGE
        }
    }
    free(which);
    free(decode_row);
    free(q);
    free(k);
    free(v);
    free(att);
    free(o);
    free(gu);
    free(rope);
    free(kt);
    free(vt);
    free(v_rows);
    free(scores);
    free(row_mem);
    return ok ? FORWARD_OK : FORWARD_NO_MEMORY;
}
