/* What the C sources of the CPU kernels share: the row and attention bodies (elementwise.c,
 * paged_attention.c) and the matrix products with GGUF weights (quantized.c), which the
 * whole-model forward (llama_forward.c) runs inside one parallel region. */
#ifndef NUCLEUS_KERNELS_H
#define NUCLEUS_KERNELS_H

#include <stdatomic.h>
#include <stdint.h>

/* GGML's type ids of the weight forms the kernels multiply. */
enum {
    GGML_F32 = 0,
    GGML_F16 = 1,
    GGML_Q4_0 = 2,
    GGML_Q4_1 = 3,
    GGML_Q8_0 = 8,
    GGML_Q4_K = 12,
    GGML_Q5_K = 13,
    GGML_Q6_K = 14,
    GGML_BF16 = 30,
};

/* How a weight form wants its activations: float32 as they are (F32/F16/BF16 weights), 8-bit in
 * blocks of 32 (Q4_0/Q4_1/Q8_0: llama.cpp's Q8_0/Q8_1), or 8-bit in blocks of 256 (the K-quants:
 * llama.cpp's Q8_K). */
enum { ACT_F32 = 0, ACT_Q8_32 = 1, ACT_Q8_256 = 2 };

/* A (rows, cols) matrix of GGML `type`, row-major, each row `cols` values in whole blocks. */
typedef struct {
    const void *data;
    int64_t type, rows, cols;
} nc_matrix;

/* 32 activations as `d * q`: d is float16-rounded, as llama.cpp stores it; s = d * sum(q) (also
 * float16-rounded, from the unrounded d) serves the Q4_1 minimum, sum(q) itself the offsets of
 * Q4_0's and Q8_0's stored values. */
typedef struct {
    int8_t q[32];
    float d, s;
    int32_t sum;
} act_q8_32;

/* 256 activations as `d * q` (d float32, possibly negative), with the sums of each 16 q. */
typedef struct {
    float d;
    int16_t bsums[16];
    int8_t q[256];
} act_q8_256;

/* A (rows, cols) Q4_0/Q4_1/Q8_0 matrix is multiplied in the interleaved layout repack_rows8 makes
 * (repacked_bytes long); nc_matrix.data then points at that. */
int64_t repacked_bytes(int64_t type, int64_t rows, int64_t cols);
void repack_rows8(int64_t type, const void *src, int64_t rows, int64_t cols, void *dst);

int act_kind(int64_t type);
int64_t act_row_bytes(int kind, int64_t cols);
int64_t weight_row_bytes(int64_t type, int64_t cols);

/* ---- a team of threads in one parallel region ---- */

/* What the threads of a team share: a barrier and a counter for dynamic schedules. */
typedef struct {
    _Atomic int arrived, phase;
    _Atomic int64_t next;
} team_shared;

/* One thread's view of its team (a copy per thread). */
typedef struct {
    int ith, nth;
    team_shared *shared;
    int64_t next_base; /* where the shared counter starts for the next dynamic loop */
} team;

/* The team of the calling thread in the enclosing OpenMP parallel region (or a team of one). */
team team_join(team_shared *shared);
/* Every thread waits for all: spins briefly, then yields the CPU (a thread the OS took off its
 * core must not be waited for at full spin: on a busy machine that costs whole time slices). */
void team_barrier(const team *t);
/* This thread's share [*lo, *hi) of n items, in contiguous ranges. */
void team_range(const team *t, int64_t n, int64_t *lo, int64_t *hi);
/* The next of n tasks handed out one at a time (-1 when none is left); every thread of the team
 * must call it until it returns -1, and then call team_next_done. */
int64_t team_next(team *t, int64_t n);
void team_next_done(team *t, int64_t n);

/* Bodies called by every thread of a team: each does its share, without a barrier at the end. */
void quantize_row(int kind, const float *x, int64_t K, void *out);
void quantize_rows(const team *t, int kind, const float *x, int64_t ldx, int64_t M, int64_t K,
                   void *out);
/* y[m * ldy + n] = row m of the activations . row n of w, for m < M: `x` float32 (M, ldx) for
 * ACT_F32 weights, else `xq` quantized by quantize_rows for act_kind(w->type). */
void matmul_rows(const team *t, const nc_matrix *w, const float *x, int64_t ldx, const void *xq,
                 int64_t M, float *y, int64_t ldy);
/* Row `row` of w as float32 (exactly the dequantizer's values). */
void dequantize_row(const nc_matrix *w, int64_t row, float *out);

/* ---- rows (elementwise.c) ---- */

/* out = x / sqrt(mean(x^2) + eps) * weight, one row of D. */
void rms_norm_row(const float *x, const float *weight, float *out, int64_t D, float eps);
/* out[i] = silu(gate[i]) * up[i], i < H. */
void silu_mul_row(const float *gate, const float *up, float *out, int64_t H);
/* RoPE in place on `heads` heads of head_dim values, by (cos, sin) pairs `cs` (head_dim / 2). */
void rotary_row(float *x, const float *cs, int64_t heads, int64_t head_dim);

/* ---- attention over the paged KV cache (paged_attention.c) ---- */

/* kv_f16: the cache holds float16 (llama.cpp's default), else float32. With float16, as
 * llama.cpp's products with its cache do, the queries come rounded to float16 (the caller's
 * part) and the attention probabilities are rounded to float16 before they weight the values. */
typedef struct {
    int64_t n_heads, n_kv_heads, head_dim, block_size;
    float scale;
    int kv_f16;
} attn_shape;

/* Where the sequences of a step are: sequence s has rows [start[s], start[s] + q_len[s]) of q
 * and out ((rows, n_heads, head_dim)), the last q_len[s] positions of its context_len[s] keys,
 * whose cache blocks are block_tables[s * table_width ...]. `which` lists the sequences to do. */
typedef struct {
    const int64_t *start, *q_len, *context_len, *block_tables, *which;
    int64_t table_width, count;
} attn_seqs;

/* Decode rows (q_len 1) as (sequence, KV head) tasks, dynamically scheduled; each task's work
 * is `decode_task`. No barrier at the end. `scores`: this thread's scratch, group * max_context
 * floats. */
void decode_attention_body(team *t, const float *q, const void *k_cache, const void *v_cache,
                           float *out, const attn_seqs *seqs, const attn_shape *shape,
                           float *scores);
void decode_task(const float *q, const void *k_cache, const void *v_cache, float *out,
                 const int64_t *table, int64_t context, int64_t g, const attn_shape *shape,
                 float *scores);
/* Causal prefill chunks, with the barriers they need inside and one at the end. Scratch from the
 * caller: kt (n_kv_heads * head_dim * ld floats) and v_rows (n_kv_heads * ld pointers), shared, ld
 * the longest context rounded up to 16 (prefill_scratch_ld); for a float16 cache also vt (as
 * many floats as kt: the values as float32), else NULL; s (6 * ld floats) per thread. */
void prefill_attention_body(team *t, const float *q, const void *k_cache, const void *v_cache,
                            float *out, const attn_seqs *seqs, const attn_shape *shape, float *kt,
                            float *vt, const float **v_rows, int64_t ld, float *s);
int64_t prefill_scratch_ld(int64_t max_context);

#endif
