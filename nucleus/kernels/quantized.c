/* Matrix products with GGUF weights in the file's own blocks, as llama.cpp computes them on x86.
 *
 * The weights stay as they are in the (memory-mapped) file: Q4_0 and Q4_1 at 4.5 and 5 bits a
 * value, Q8_0 at 8.5, the K-quants Q4_K, Q5_K and Q6_K at 4.5, 5.5 and 6.5; F32, F16 and BF16
 * matrices are read as they are too. The activations of a quantized weight are first quantized to
 * 8 bits per block, the way llama.cpp quantizes them (its Q8_0/Q8_1 for the blocks of 32, Q8_K for
 * the K-quants): `d = max|x| / 127`, `q = round(x / d)`. Each block's dot product is then a sum of
 * integer products, exact, scaled once by the two blocks' scales; float32 accumulates the blocks.
 *
 * The error this allows, against the float32 product of the dequantized weights and the float32
 * activations, comes from the activations alone (the integer sums are exact and the weights are
 * the dequantizer's values): each activation moves by at most half its block's step plus the
 * float16 rounding of that step, so an output moves by at most
 *     sum over blocks b of  d_b * (1/2 + 127 * 2^-11) * sum_{k in b} |w_k|      (blocks of 32)
 *     sum over blocks b of  d_b / 2 * sum_{k in b} |w_k|                         (K-quants)
 * plus, for Q4_1, |m_b| * 2^-10 * d_b * |sum q_b| per block (the float16 rounding of llama.cpp's
 * block sum), plus float32 rounding. docs/cpu.md states it; tests/kernels/test_quantized.py checks
 * it, and checks the kernels against a torch twin of the integer arithmetic.
 *
 * Inner loops: a 32-block's 4-bit values are unpacked to bytes in a 256-bit register and
 * multiplied with the activation bytes by `maddubs` (u8 x s8 pairs into i16, then i32 by `madd`),
 * or by one `dpbusd` where the CPU has VNNI; signed weights (Q4_0, Q8_0) go through the sign
 * trick, |w| times sign(w) * x. K-quant sub-block scales are integers, applied by the `madd`
 * itself, so a K-quant block costs one float conversion per 256 values.
 */
#include "kernels.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "simd.h"

#define QK 32   /* values in a block of Q4_0/Q4_1/Q8_0 */
#define QK_K 256 /* values in a K-quant super-block */

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

static inline float bf16_to_f32(const void *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    const uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

int act_kind(int64_t type) {
    switch (type) {
        case GGML_Q4_0:
        case GGML_Q4_1:
        case GGML_Q8_0: return ACT_Q8_32;
        case GGML_Q4_K:
        case GGML_Q5_K:
        case GGML_Q6_K: return ACT_Q8_256;
        default: return ACT_F32;
    }
}

int64_t act_row_bytes(int kind, int64_t cols) {
    switch (kind) {
        case ACT_Q8_32: return cols / QK * (int64_t)sizeof(act_q8_32);
        case ACT_Q8_256: return cols / QK_K * (int64_t)sizeof(act_q8_256);
        default: return cols * 4;
    }
}

/* Bytes of one block, and values in it. */
static int64_t block_bytes(int64_t type) {
    switch (type) {
        case GGML_F32: return 4;
        case GGML_F16:
        case GGML_BF16: return 2;
        case GGML_Q4_0: return 18;
        case GGML_Q4_1: return 20;
        case GGML_Q8_0: return 34;
        case GGML_Q4_K: return 144;
        case GGML_Q5_K: return 176;
        case GGML_Q6_K: return 210;
        default: return 0;
    }
}

static int64_t block_values(int64_t type) {
    switch (act_kind(type)) {
        case ACT_Q8_32: return QK;
        case ACT_Q8_256: return QK_K;
        default: return 1;
    }
}

int64_t weight_row_bytes(int64_t type, int64_t cols) {
    return cols / block_values(type) * block_bytes(type);
}

/* ---- activations ----------------------------------------------------------------------------- */

static inline int has_nan(const float *x, int n) {
#ifdef __AVX2__
    __m256 any = _mm256_setzero_ps();
    for (int j = 0; j < n; j += 8) {
        const __m256 v = _mm256_loadu_ps(x + j);
        any = _mm256_or_ps(any, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    }
    return _mm256_movemask_ps(any) != 0;
#else
    for (int j = 0; j < n; j++)
        if (isnan(x[j])) return 1;
    return 0;
#endif
}

static void quantize_row_q8_32(const float *x, int64_t K, act_q8_32 *out) {
    for (int64_t b = 0; b < K / QK; b++, x += QK) {
        float amax = 0.0f;
        int sum = 0;
#ifdef __AVX2__
        const __m256 sign = _mm256_set1_ps(-0.0f);
        __m256 m8 = _mm256_andnot_ps(sign, _mm256_loadu_ps(x));
        for (int j = 8; j < QK; j += 8)
            m8 = _mm256_max_ps(m8, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + j)));
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m8), _mm256_extractf128_ps(m8, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        amax = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
#else
        for (int j = 0; j < QK; j++) amax = fabsf(x[j]) > amax ? fabsf(x[j]) : amax;
#endif
        /* A NaN input gives a NaN scale, so the products it feeds are NaN too (an infinite one
         * gives an infinite scale and zero quants: NaN as well). */
        const float d = has_nan(x, QK) ? NAN : amax / 127.0f;
        const float id = amax != 0.0f ? 127.0f / amax : 0.0f;
#ifdef __AVX2__
        const __m256 mul = _mm256_set1_ps(id);
        __m256i i32[4];
        for (int j = 0; j < 4; j++) {
            const __m256 v = _mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(x + 8 * j), mul),
                                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            i32[j] = _mm256_cvtps_epi32(v);
        }
        const __m256i s32 = _mm256_add_epi32(_mm256_add_epi32(i32[0], i32[1]),
                                             _mm256_add_epi32(i32[2], i32[3]));
        __m128i s = _mm_add_epi32(_mm256_castsi256_si128(s32), _mm256_extracti128_si256(s32, 1));
        s = _mm_hadd_epi32(s, s);
        s = _mm_hadd_epi32(s, s);
        sum = _mm_cvtsi128_si32(s);
        /* Pack to bytes in order: packs interleaves the 128-bit lanes, the permute restores it. */
        const __m256i p16a = _mm256_packs_epi32(i32[0], i32[1]);
        const __m256i p16b = _mm256_packs_epi32(i32[2], i32[3]);
        const __m256i p8 = _mm256_packs_epi16(p16a, p16b);
        _mm256_storeu_si256((__m256i *)out[b].q,
                            _mm256_permutevar8x32_epi32(p8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
#else
        for (int j = 0; j < QK; j++) {
            const int v = (int)nearbyintf(x[j] * id);
            out[b].q[j] = (int8_t)v;
            sum += v;
        }
#endif
        out[b].d = round_to_f16(d);
        out[b].s = round_to_f16(d * (float)sum);
    }
}

/* llama.cpp's quantize_row_q8_K: the scale comes from the value of largest magnitude, with its
 * sign, so that value becomes -127 exactly. */
static void quantize_row_q8_256(const float *x, int64_t K, act_q8_256 *out) {
    for (int64_t b = 0; b < K / QK_K; b++, x += QK_K) {
        float amax = 0.0f, max = 0.0f;
        for (int j = 0; j < QK_K; j++) {
            const float ax = fabsf(x[j]);
            if (ax > amax) {
                amax = ax;
                max = x[j];
            }
        }
        if (amax == 0.0f || has_nan(x, QK_K)) { /* zeros, or a NaN that must reach the output */
            memset(&out[b], 0, sizeof(act_q8_256));
            out[b].d = has_nan(x, QK_K) ? NAN : 0.0f;
            continue;
        }
        const float iscale = -127.0f / max;
        for (int j = 0; j < QK_K; j++) {
            const int v = (int)nearbyintf(iscale * x[j]);
            out[b].q[j] = (int8_t)(v < 127 ? v : 127);
        }
        for (int g = 0; g < QK_K / 16; g++) {
            int sum = 0;
            for (int j = 0; j < 16; j++) sum += out[b].q[16 * g + j];
            out[b].bsums[g] = (int16_t)sum;
        }
        out[b].d = 1.0f / iscale;
    }
}

void quantize_row(int kind, const float *x, int64_t K, void *out) {
    if (kind == ACT_Q8_32) quantize_row_q8_32(x, K, out);
    else if (kind == ACT_Q8_256) quantize_row_q8_256(x, K, out);
    else memcpy(out, x, K * sizeof(float));
}

void quantize_rows(const team *t, int kind, const float *x, int64_t ldx, int64_t M, int64_t K,
                   void *out) {
    const int64_t row_bytes = act_row_bytes(kind, K);
    int64_t lo, hi;
    team_range(t, M, &lo, &hi);
    for (int64_t m = lo; m < hi; m++) quantize_row(kind, x + m * ldx, K, (char *)out + m * row_bytes);
}

/* ---- weights to float ------------------------------------------------------------------------ */

/* The eight 6-bit scales and mins of a Q4_K/Q5_K super-block (12 packed bytes). */
static inline void k_scales_mins(const uint8_t *s, uint8_t *sc, uint8_t *mn) {
    for (int j = 0; j < 4; j++) {
        sc[j] = s[j] & 63;
        mn[j] = s[j + 4] & 63;
        sc[j + 4] = (s[j + 8] & 0x0F) | ((s[j] >> 6) << 4);
        mn[j + 4] = (s[j + 8] >> 4) | ((s[j + 4] >> 6) << 4);
    }
}

void dequantize_row(const nc_matrix *w, int64_t row, float *out) {
    const int64_t K = w->cols, type = w->type;
    const uint8_t *p = (const uint8_t *)w->data + row * weight_row_bytes(type, K);
    const int64_t bb = block_bytes(type);
    switch (type) {
        case GGML_F32: memcpy(out, p, K * 4); return;
        case GGML_F16:
            for (int64_t k = 0; k < K; k++) out[k] = fp16_to_f32(p + 2 * k);
            return;
        case GGML_BF16:
            for (int64_t k = 0; k < K; k++) out[k] = bf16_to_f32(p + 2 * k);
            return;
        default: break;
    }
    for (int64_t b = 0; b < K / block_values(type); b++, p += bb) {
        float *o = out + b * block_values(type);
        if (type == GGML_Q8_0) {
            const float d = fp16_to_f32(p);
            for (int j = 0; j < QK; j++) o[j] = (float)(int8_t)p[2 + j] * d;
        } else if (type == GGML_Q4_0) {
            const float d = fp16_to_f32(p);
            for (int j = 0; j < 16; j++) {
                o[j] = d * (float)((p[2 + j] & 0x0F) - 8);
                o[j + 16] = d * (float)((p[2 + j] >> 4) - 8);
            }
        } else if (type == GGML_Q4_1) {
            const float d = fp16_to_f32(p), m = fp16_to_f32(p + 2);
            for (int j = 0; j < 16; j++) {
                o[j] = d * (float)(p[4 + j] & 0x0F) + m;
                o[j + 16] = d * (float)(p[4 + j] >> 4) + m;
            }
        } else if (type == GGML_Q4_K || type == GGML_Q5_K) {
            const float d = fp16_to_f32(p), dmin = fp16_to_f32(p + 2);
            uint8_t sc[8], mn[8];
            k_scales_mins(p + 4, sc, mn);
            const uint8_t *qh = p + 16, *qs = p + (type == GGML_Q5_K ? 48 : 16);
            for (int s = 0; s < 8; s++) {
                const float scale = d * (float)sc[s], minimum = dmin * (float)mn[s];
                for (int l = 0; l < 32; l++) {
                    const uint8_t byte = qs[(s / 2) * 32 + l];
                    int q = s % 2 ? byte >> 4 : byte & 0x0F;
                    if (type == GGML_Q5_K) q |= ((qh[l] >> s) & 1) << 4;
                    o[32 * s + l] = scale * (float)q - minimum;
                }
            }
        } else if (type == GGML_Q6_K) {
            const float d = fp16_to_f32(p + 208);
            const int8_t *scales = (const int8_t *)(p + 192);
            for (int half = 0; half < 2; half++) {
                const uint8_t *ql = p + 64 * half, *qh = p + 128 + 32 * half;
                for (int v = 0; v < 128; v++) {
                    const int low = v < 64 ? ql[v % 64] & 0x0F : ql[v % 64] >> 4;
                    const int high = (qh[v % 32] >> (2 * (v / 32))) & 3;
                    const int q = (low | (high << 4)) - 32;
                    o[128 * half + v] = d * (float)scales[(128 * half + v) / 16] * (float)q;
                }
            }
        }
    }
}

/* ---- blocks of 32 (Q4_0, Q4_1, Q8_0) --------------------------------------------------------- */

#ifdef __AVX2__
/* sum over each group of 4 of u8 a times s8 b: 8 x int32. */
static inline __m256i dot_u8s8(__m256i a, __m256i b) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), a, b);
#elif defined(__AVXVNNI__)
    return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), a, b);
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1));
#endif
}

/* 16 bytes of 4-bit values -> 32 bytes: low nibbles (values 0-15), then high (16-31). */
static inline __m256i nibbles_32(const uint8_t *qs) {
    const __m128i b = _mm_loadu_si128((const __m128i *)qs);
    return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(b, 4), b), _mm256_set1_epi8(0x0F));
}

/* One weight block ready to multiply: `u` the bytes that go in unsigned (|w|, or the Q4_1
 * nibbles), `w` the signed values (for the sign trick), `d` and `m` its scale and minimum. */
typedef struct {
    __m256i u, w;
    float d, m;
} wblock32;

static inline __attribute__((always_inline)) wblock32 load_block32(const int type,
                                                                   const uint8_t *p) {
    wblock32 b;
    b.d = fp16_to_f32(p);
    b.m = 0.0f;
    if (type == GGML_Q4_1) {
        b.m = fp16_to_f32(p + 2);
        b.u = nibbles_32(p + 4);
        b.w = b.u;
    } else {
        b.w = type == GGML_Q4_0 ? _mm256_sub_epi8(nibbles_32(p + 2), _mm256_set1_epi8(8))
                                : _mm256_loadu_si256((const __m256i *)(p + 2));
        b.u = _mm256_sign_epi8(b.w, b.w);
    }
    return b;
}

/* y[c * ldy + r] for weight rows r < NR (row bytes `wstride`) and activation rows c < MR (blocks
 * `astride` apart): llama.cpp's ggml_vec_dot_q4_0_q8_0 / q4_1_q8_1 / q8_0_q8_0 for each pair, the
 * weight blocks unpacked once for all MR rows. */
static inline __attribute__((always_inline)) void tile32(const int type, const uint8_t *w,
                                                         int64_t wstride, const act_q8_32 *a,
                                                         int64_t astride, int64_t nb, float *y,
                                                         int64_t ldy, const int NR,
                                                         const int MR) {
    __m256 acc[4][4];
    float mins[4][4];
    for (int r = 0; r < NR; r++)
        for (int c = 0; c < MR; c++) {
            acc[r][c] = _mm256_setzero_ps();
            mins[r][c] = 0.0f;
        }
    const int64_t bb = type == GGML_Q4_0 ? 18 : type == GGML_Q4_1 ? 20 : 34;
    for (int64_t b = 0; b < nb; b++) {
        wblock32 wb[4];
        for (int r = 0; r < NR; r++) wb[r] = load_block32(type, w + r * wstride + b * bb);
        for (int c = 0; c < MR; c++) {
            const act_q8_32 *ab = a + c * astride + b;
            const __m256i x = _mm256_loadu_si256((const __m256i *)ab->q);
            for (int r = 0; r < NR; r++) {
                const __m256i xs = type == GGML_Q4_1 ? x : _mm256_sign_epi8(x, wb[r].w);
                const __m256 sum = _mm256_cvtepi32_ps(dot_u8s8(wb[r].u, xs));
                acc[r][c] = _mm256_fmadd_ps(_mm256_set1_ps(wb[r].d * ab->d), sum, acc[r][c]);
                if (type == GGML_Q4_1) mins[r][c] += wb[r].m * ab->s;
            }
        }
    }
    for (int r = 0; r < NR; r++)
        for (int c = 0; c < MR; c++) y[c * ldy + r] = hsum8(acc[r][c]) + mins[r][c];
}
#endif

/* The portable form of tile32, one pair at a time. */
#ifndef __AVX2__
static void dot32_scalar(int64_t type, const uint8_t *w, const act_q8_32 *a, int64_t nb,
                         float *y) {
    float total = 0.0f;
    const int64_t bb = block_bytes(type);
    for (int64_t b = 0; b < nb; b++, w += bb) {
        int sum = 0;
        for (int j = 0; j < QK; j++) {
            int q;
            if (type == GGML_Q8_0) q = (int8_t)w[2 + j];
            else {
                const uint8_t byte = w[(type == GGML_Q4_1 ? 4 : 2) + j % 16];
                q = (j < 16 ? byte & 0x0F : byte >> 4) - (type == GGML_Q4_0 ? 8 : 0);
            }
            sum += q * a[b].q[j];
        }
        total += fp16_to_f32(w) * a[b].d * (float)sum;
        if (type == GGML_Q4_1) total += fp16_to_f32(w + 2) * a[b].s;
    }
    *y = total;
}
#endif

/* ---- K-quants (Q4_K, Q5_K, Q6_K) ------------------------------------------------------------ */

/* One K-quant super-block times 256 activations, as integers: `sum` is the dot product of the
 * block's unsigned values with the activations, each sub-block's integer scale applied; `msum`
 * is what the minimums (Q4_K, Q5_K) or Q6_K's offset of 32 take away. The block's value is
 * `x.d * (d * sum - dmin * msum)`. */
typedef struct {
#ifdef __AVX2__
    __m256i sum; /* 8 lanes, summed at the end of the row as llama.cpp does */
#else
    int sum;
#endif
    int msum;
    float d, dmin;
} kdot;

static inline __attribute__((always_inline)) kdot kblock_dot(const int type, const uint8_t *p,
                                                             const act_q8_256 *a) {
    const int8_t *x = a->q;
    kdot r;
    r.msum = 0;
#ifdef __AVX2__
    __m256i sumi = _mm256_setzero_si256();
    const __m256i m4 = _mm256_set1_epi8(0x0F);
#else
    int sumi = 0;
#endif
    if (type == GGML_Q6_K) {
        r.d = r.dmin = fp16_to_f32(p + 208);
        const int8_t *scales = (const int8_t *)(p + 192);
        for (int g = 0; g < 16; g++) r.msum += 32 * scales[g] * a->bsums[g];
#ifdef __AVX2__
        const __m256i m2 = _mm256_set1_epi8(3);
        for (int half = 0; half < 2; half++) {
            const uint8_t *ql = p + 64 * half, *qh = p + 128 + 32 * half;
            const __m256i l0 = _mm256_loadu_si256((const __m256i *)ql);
            const __m256i l1 = _mm256_loadu_si256((const __m256i *)(ql + 32));
            const __m256i h = _mm256_loadu_si256((const __m256i *)qh);
            /* Values 0-31, 32-63, 64-95, 96-127 of the half: low or high nibbles of the two
             * 32-byte halves of ql, bits 4-5 from successive bit pairs of qh. */
            __m256i q[4];
            q[0] = _mm256_or_si256(_mm256_and_si256(l0, m4),
                                   _mm256_slli_epi16(_mm256_and_si256(h, m2), 4));
            q[1] = _mm256_or_si256(
                _mm256_and_si256(l1, m4),
                _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(h, 2), m2), 4));
            q[2] = _mm256_or_si256(
                _mm256_and_si256(_mm256_srli_epi16(l0, 4), m4),
                _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(h, 4), m2), 4));
            q[3] = _mm256_or_si256(
                _mm256_and_si256(_mm256_srli_epi16(l1, 4), m4),
                _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(h, 6), m2), 4));
            for (int j = 0; j < 4; j++) {
                const int g = 8 * half + 2 * j; /* the two groups of 16 in these 32 values */
                const __m256i xv = _mm256_loadu_si256((const __m256i *)(x + 128 * half + 32 * j));
                const __m256i scale = _mm256_set_m128i(_mm_set1_epi16(scales[g + 1]),
                                                       _mm_set1_epi16(scales[g]));
                sumi = _mm256_add_epi32(
                    sumi, _mm256_madd_epi16(_mm256_maddubs_epi16(q[j], xv), scale));
            }
        }
#else
        for (int half = 0; half < 2; half++) {
            const uint8_t *ql = p + 64 * half, *qh = p + 128 + 32 * half;
            for (int v = 0; v < 128; v++) {
                const int low = v < 64 ? ql[v % 64] & 0x0F : ql[v % 64] >> 4;
                const int high = (qh[v % 32] >> (2 * (v / 32))) & 3;
                sumi += scales[(128 * half + v) / 16] * (low | (high << 4)) * x[128 * half + v];
            }
        }
#endif
    } else {
        r.d = fp16_to_f32(p);
        r.dmin = fp16_to_f32(p + 2);
        uint8_t sc[8], mn[8];
        k_scales_mins(p + 4, sc, mn);
        for (int s = 0; s < 8; s++) r.msum += mn[s] * (a->bsums[2 * s] + a->bsums[2 * s + 1]);
        const uint8_t *qh = p + 16, *qs = p + (type == GGML_Q5_K ? 48 : 16);
#ifdef __AVX2__
        const __m256i hbits = type == GGML_Q5_K ? _mm256_loadu_si256((const __m256i *)qh)
                                                : _mm256_setzero_si256();
        const __m256i one = _mm256_set1_epi8(1);
        for (int j = 0; j < 4; j++) {
            const __m256i bits = _mm256_loadu_si256((const __m256i *)(qs + 32 * j));
            __m256i lo = _mm256_and_si256(bits, m4);
            __m256i hi = _mm256_and_si256(_mm256_srli_epi16(bits, 4), m4);
            if (type == GGML_Q5_K) { /* bit s of qh[l] is bit 4 of value l of sub-block s */
                const __m256i h0 = _mm256_srl_epi16(hbits, _mm_cvtsi32_si128(2 * j));
                const __m256i h1 = _mm256_srl_epi16(hbits, _mm_cvtsi32_si128(2 * j + 1));
                lo = _mm256_or_si256(lo, _mm256_slli_epi16(_mm256_and_si256(h0, one), 4));
                hi = _mm256_or_si256(hi, _mm256_slli_epi16(_mm256_and_si256(h1, one), 4));
            }
            const __m256i x0 = _mm256_loadu_si256((const __m256i *)(x + 64 * j));
            const __m256i x1 = _mm256_loadu_si256((const __m256i *)(x + 64 * j + 32));
            const __m256i p0 =
                _mm256_madd_epi16(_mm256_maddubs_epi16(lo, x0), _mm256_set1_epi16(sc[2 * j]));
            const __m256i p1 =
                _mm256_madd_epi16(_mm256_maddubs_epi16(hi, x1), _mm256_set1_epi16(sc[2 * j + 1]));
            sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(p0, p1));
        }
#else
        for (int s = 0; s < 8; s++)
            for (int l = 0; l < 32; l++) {
                const uint8_t byte = qs[(s / 2) * 32 + l];
                int q = s % 2 ? byte >> 4 : byte & 0x0F;
                if (type == GGML_Q5_K) q |= ((qh[l] >> s) & 1) << 4;
                sumi += sc[s] * q * x[32 * s + l];
            }
#endif
    }
    r.sum = sumi;
    return r;
}

/* y[c * ldy] for activation rows c < MR of one K-quant weight row (`nb` super-blocks). */
static inline __attribute__((always_inline)) void tile_k(const int type, const uint8_t *w,
                                                         const act_q8_256 *a, int64_t astride,
                                                         int64_t nb, float *y, int64_t ldy,
                                                         const int MR) {
    const int64_t bb = type == GGML_Q4_K ? 144 : type == GGML_Q5_K ? 176 : 210;
    float mins[4] = {0};
#ifdef __AVX2__
    __m256 acc[4];
    for (int c = 0; c < MR; c++) acc[c] = _mm256_setzero_ps();
#else
    float acc[4] = {0};
#endif
    for (int64_t b = 0; b < nb; b++)
        for (int c = 0; c < MR; c++) {
            const act_q8_256 *ab = a + c * astride + b;
            const kdot k = kblock_dot(type, w + b * bb, ab);
#ifdef __AVX2__
            acc[c] = _mm256_fmadd_ps(_mm256_set1_ps(ab->d * k.d), _mm256_cvtepi32_ps(k.sum), acc[c]);
#else
            acc[c] += ab->d * k.d * (float)k.sum;
#endif
            mins[c] += ab->d * k.dmin * (float)k.msum;
        }
    for (int c = 0; c < MR; c++) {
#ifdef __AVX2__
        y[c * ldy] = hsum8(acc[c]) - mins[c];
#else
        y[c * ldy] = acc[c] - mins[c];
#endif
    }
}

/* ---- float weights (F32, F16, BF16) with float32 activations --------------------------------- */

static void dot_float_row(int64_t type, const uint8_t *w, const float *x, int64_t K, float *y) {
    int64_t k = 0;
    float total = 0.0f;
#ifdef __AVX2__
    __m256 acc = _mm256_setzero_ps();
    for (; k + 8 <= K; k += 8) {
        __m256 wv;
        if (type == GGML_F32) wv = _mm256_loadu_ps((const float *)w + k);
        else {
            const __m128i h = _mm_loadu_si128((const __m128i *)(w + 2 * k));
#ifdef __F16C__
            if (type == GGML_F16) wv = _mm256_cvtph_ps(h);
            else
#endif
            if (type == GGML_BF16)
                wv = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
            else {
                float tmp[8];
                for (int j = 0; j < 8; j++) tmp[j] = fp16_to_f32(w + 2 * (k + j));
                wv = _mm256_loadu_ps(tmp);
            }
        }
        acc = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + k), acc);
    }
    total = hsum8(acc);
#endif
    for (; k < K; k++) {
        const float wk = type == GGML_F32   ? ((const float *)w)[k]
                         : type == GGML_F16 ? fp16_to_f32(w + 2 * k)
                                            : bf16_to_f32(w + 2 * k);
        total += wk * x[k];
    }
    *y = total;
}

/* ---- the product ----------------------------------------------------------------------------- */

#define NR32 4 /* weight rows per tile (blocks of 32) */
#define MR 4   /* activation rows per tile */

#define BY_MR(rows, call, ...)                \
    switch (rows) {                           \
        case 4: call(__VA_ARGS__, 4); break;  \
        case 3: call(__VA_ARGS__, 3); break;  \
        case 2: call(__VA_ARGS__, 2); break;  \
        default: call(__VA_ARGS__, 1); break; \
    }

/* Weight rows [n0, n0 + NR) of a 32-block matrix times all M activation rows. */
static inline __attribute__((always_inline)) void rows32(const int type, const uint8_t *wp,
                                                         int64_t row_bytes, const act_q8_32 *a,
                                                         int64_t nb, int64_t M, float *y,
                                                         int64_t ldy, const int NR) {
    for (int64_t m0 = 0; m0 < M; m0 += MR) {
        const int rows = M - m0 < MR ? (int)(M - m0) : MR;
#ifdef __AVX2__
        if (NR == NR32) {
            BY_MR(rows, tile32, type, wp, row_bytes, a + m0 * nb, nb, nb, y + m0 * ldy, ldy, NR32)
        } else {
            BY_MR(rows, tile32, type, wp, row_bytes, a + m0 * nb, nb, nb, y + m0 * ldy, ldy, 1)
        }
#else
        for (int r = 0; r < NR; r++)
            for (int c = 0; c < rows; c++)
                dot32_scalar(type, wp + r * row_bytes, a + (m0 + c) * nb, nb,
                             y + (m0 + c) * ldy + r);
#endif
    }
}

static inline __attribute__((always_inline)) void matmul32(const team *tm, const int type,
                                                           const nc_matrix *w, const act_q8_32 *a,
                                                           int64_t M, float *y, int64_t ldy) {
    const int64_t N = w->rows, nb = w->cols / QK, row_bytes = weight_row_bytes(type, w->cols);
    const uint8_t *data = w->data;
    int64_t lo, hi;
    team_range(tm, (N + NR32 - 1) / NR32, &lo, &hi);
    for (int64_t t = lo; t < hi; t++) {
        const int64_t n0 = t * NR32;
        if (n0 + NR32 <= N) rows32(type, data + n0 * row_bytes, row_bytes, a, nb, M, y + n0, ldy, NR32);
        else
            for (int64_t n = n0; n < N; n++)
                rows32(type, data + n * row_bytes, row_bytes, a, nb, M, y + n, ldy, 1);
    }
}

static inline __attribute__((always_inline)) void matmul_k(const team *tm, const int type,
                                                           const nc_matrix *w, const act_q8_256 *a,
                                                           int64_t M, float *y, int64_t ldy) {
    const int64_t nb = w->cols / QK_K, row_bytes = weight_row_bytes(type, w->cols);
    int64_t lo, hi;
    team_range(tm, w->rows, &lo, &hi);
    for (int64_t n = lo; n < hi; n++) {
        const uint8_t *wp = (const uint8_t *)w->data + n * row_bytes;
        for (int64_t m0 = 0; m0 < M; m0 += MR) {
            const int rows = M - m0 < MR ? (int)(M - m0) : MR;
            BY_MR(rows, tile_k, type, wp, a + m0 * nb, nb, nb, y + m0 * ldy + n, ldy)
        }
    }
}

void matmul_rows(const team *t, const nc_matrix *w, const float *x, int64_t ldx, const void *xq,
                 int64_t M, float *y, int64_t ldy) {
    switch (w->type) {
        case GGML_Q4_0: matmul32(t, GGML_Q4_0, w, xq, M, y, ldy); return;
        case GGML_Q4_1: matmul32(t, GGML_Q4_1, w, xq, M, y, ldy); return;
        case GGML_Q8_0: matmul32(t, GGML_Q8_0, w, xq, M, y, ldy); return;
        case GGML_Q4_K: matmul_k(t, GGML_Q4_K, w, xq, M, y, ldy); return;
        case GGML_Q5_K: matmul_k(t, GGML_Q5_K, w, xq, M, y, ldy); return;
        case GGML_Q6_K: matmul_k(t, GGML_Q6_K, w, xq, M, y, ldy); return;
        default: break;
    }
    const int64_t K = w->cols, row_bytes = weight_row_bytes(w->type, K);
    int64_t lo, hi;
    team_range(t, w->rows, &lo, &hi);
    for (int64_t n = lo; n < hi; n++)
        for (int64_t m = 0; m < M; m++)
            dot_float_row(w->type, (const uint8_t *)w->data + n * row_bytes, x + m * ldx, K,
                          y + m * ldy + n);
}

/* ---- standalone entry points (their own parallel region), for the torch seam and the tests --- */

/* y (M, N) = x (M, K) . w^T through the activations' 8-bit form (or float32 for float weights).
 * Returns 0, -1 if the scratch allocation failed, -2 for a type the kernels do not multiply. */
int quantized_linear_f32(const nc_matrix *w, const float *x, int64_t M, float *y,
                         int num_threads) {
    if (block_bytes(w->type) == 0 || w->cols % block_values(w->type)) return -2;
    const int kind = act_kind(w->type);
    void *xq = NULL;
    if (kind != ACT_F32) {
        xq = malloc((size_t)(M * act_row_bytes(kind, w->cols)));
        if (!xq) return -1;
    }
    team_shared shared = {0};
#pragma omp parallel num_threads(num_threads)
    {
        team t = team_join(&shared);
        if (kind != ACT_F32) {
            quantize_rows(&t, kind, x, w->cols, M, w->cols, xq);
            team_barrier(&t);
        }
        matmul_rows(&t, w, x, w->cols, xq, M, y, w->rows);
    }
    free(xq);
    return 0;
}

/* The 8-bit form of x (M, K) for weights of `type` (for the tests' twin). */
void quantize_activations_f32(int64_t type, const float *x, int64_t M, int64_t K, void *out) {
    team_shared shared = {0};
    const team t = team_join(&shared); /* outside a parallel region: a team of one */
    quantize_rows(&t, act_kind(type), x, K, M, K, out);
}

/* Rows [row0, row0 + count) of w as float32, (count, cols). */
void dequantize_rows_f32(const nc_matrix *w, int64_t row0, int64_t count, float *out) {
    for (int64_t r = 0; r < count; r++) dequantize_row(w, row0 + r, out + r * w->cols);
}
