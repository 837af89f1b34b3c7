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
        out[b].sum = sum;
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

/* ---- blocks of 32 (Q4_0, Q4_1, Q8_0), eight rows interleaved ---------------------------------
 *
 * These matrices are multiplied in a layout of their own, made once when the model is loaded
 * (repack_rows8: the same bytes, rearranged): for each group of 8 rows and each block of 32
 * columns, the 8 rows' scales (float16), the 8 minimums for Q4_1, then the values in groups of 4
 * columns, each group the 8 rows' 4 values side by side (32 bytes: Q8_0 has 8 such groups, stored
 * as w + 128; Q4_0/Q4_1 have 4, whose low nibbles are columns 4g..4g+3 and high nibbles columns
 * 16+4g..16+4g+3, as in the file's blocks). One `dpbusd` of a group with 4 activations broadcast
 * to every lane then adds 4 products to each of the 8 rows' sums: the lanes are the rows, so the
 * block's scales multiply all 8 sums at once and no sum crosses lanes. llama.cpp's repacked Q4_0
 * ("q4_0_8x8") is the same idea. */

#define ROWS8 8

/* Bytes of one block of 8 interleaved rows. */
static int64_t group_block_bytes(int64_t type) {
    return type == GGML_Q4_0 ? 144 : type == GGML_Q4_1 ? 160 : 272;
}

int64_t repacked_bytes(int64_t type, int64_t rows, int64_t cols) {
    return (rows + ROWS8 - 1) / ROWS8 * (cols / QK) * group_block_bytes(type);
}

/* The interleaved form of a (rows, cols) Q4_0/Q4_1/Q8_0 matrix; rows past the last are zeros. */
void repack_rows8(int64_t type, const void *src, int64_t rows, int64_t cols, void *dst) {
    const int64_t nb = cols / QK, bb = block_bytes(type), gb = group_block_bytes(type);
    const int64_t groups = (rows + ROWS8 - 1) / ROWS8;
    const int scale_fields = type == GGML_Q4_1 ? 2 : 1, q_offset = 2 * scale_fields;
    const int q_bytes = type == GGML_Q8_0 ? 32 : 16;
#pragma omp parallel for schedule(static)
    for (int64_t g = 0; g < groups; g++)
        for (int64_t b = 0; b < nb; b++) {
            uint8_t *out = (uint8_t *)dst + (g * nb + b) * gb;
            memset(out, 0, gb);
            for (int r = 0; r < ROWS8 && g * ROWS8 + r < rows; r++) {
                const uint8_t *blk = (const uint8_t *)src + ((g * ROWS8 + r) * nb + b) * bb;
                for (int f = 0; f < scale_fields; f++) memcpy(out + 16 * f + 2 * r, blk + 2 * f, 2);
                uint8_t *values = out + 16 * scale_fields;
                for (int j = 0; j < q_bytes / 4; j++)
                    for (int i = 0; i < 4; i++) {
                        const uint8_t byte = blk[q_offset + 4 * j + i];
                        values[32 * j + 4 * r + i] = type == GGML_Q8_0 ? byte ^ 0x80 : byte;
                    }
            }
        }
}

/* Column k of row r of block b of an interleaved group (for dequantize_row and the scalar path):
 * the integer value as stored (Q4: 0..15, Q8_0: w + 128). */
static inline int stored_value(int64_t type, const uint8_t *gblk, int r, int k) {
    const uint8_t *values = gblk + (type == GGML_Q4_1 ? 32 : 16);
    if (type == GGML_Q8_0) return values[32 * (k / 4) + 4 * r + k % 4];
    const uint8_t byte = values[32 * ((k % 16) / 4) + 4 * r + k % 4];
    return k < 16 ? byte & 0x0F : byte >> 4;
}

/* The offset the integer sums take away: Q4_0 stores q + 8, Q8_0 w + 128. */
static inline int value_offset(int64_t type) {
    return type == GGML_Q4_0 ? 8 : type == GGML_Q8_0 ? 128 : 0;
}

static void dequantize_row8(const nc_matrix *w, int64_t row, float *out) {
    const int64_t type = w->type, nb = w->cols / QK, gb = group_block_bytes(type);
    const uint8_t *group = (const uint8_t *)w->data + (row / ROWS8) * nb * gb;
    const int r = (int)(row % ROWS8), offset = value_offset(type);
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *gblk = group + b * gb;
        const float d = fp16_to_f32(gblk + 2 * r);
        const float m = type == GGML_Q4_1 ? fp16_to_f32(gblk + 16 + 2 * r) : 0.0f;
        for (int k = 0; k < QK; k++) {
            const float q = (float)(stored_value(type, gblk, r, k) - offset);
            out[b * QK + k] = type == GGML_Q4_1 ? d * q + m : type == GGML_Q8_0 ? q * d : d * q;
        }
    }
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
    if (act_kind(type) == ACT_Q8_32) {
        dequantize_row8(w, row, out);
        return;
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

#ifdef __AVX2__
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define DPBUSD(acc, a, b) _mm256_dpbusd_epi32(acc, a, b)
#elif defined(__AVXVNNI__)
#define DPBUSD(acc, a, b) _mm256_dpbusd_avx_epi32(acc, a, b)
#endif

/* Sums of the 8 rows (lanes) of one interleaved block with one row of activations: `w` the 8
 * operands (groups of 4 columns, unsigned), x the activations. */
static inline __attribute__((always_inline)) __m256i block8_sums(const int type, const __m256i *w,
                                                                const act_q8_32 *x) {
#define XB(k) _mm256_set1_epi32(*(const int32_t *)(x->q + 4 * (k)))
#ifdef DPBUSD
    (void)type;
    __m256i s0 = DPBUSD(_mm256_setzero_si256(), w[0], XB(0));
    __m256i s1 = DPBUSD(_mm256_setzero_si256(), w[1], XB(1));
    __m256i s2 = DPBUSD(_mm256_setzero_si256(), w[2], XB(2));
    __m256i s3 = DPBUSD(_mm256_setzero_si256(), w[3], XB(3));
    s0 = DPBUSD(s0, w[4], XB(4));
    s1 = DPBUSD(s1, w[5], XB(5));
    s2 = DPBUSD(s2, w[6], XB(6));
    s3 = DPBUSD(s3, w[7], XB(7));
    return _mm256_add_epi32(_mm256_add_epi32(s0, s1), _mm256_add_epi32(s2, s3));
#else
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i sum = _mm256_setzero_si256();
    if (type == GGML_Q8_0) { /* w + 128 overflows maddubs' pairs: back to signed, sign trick */
        for (int k = 0; k < 8; k++) {
            const __m256i ws = _mm256_xor_si256(w[k], _mm256_set1_epi8((char)0x80));
            const __m256i p = _mm256_maddubs_epi16(_mm256_sign_epi8(ws, ws),
                                                   _mm256_sign_epi8(XB(k), ws));
            sum = _mm256_add_epi32(sum, _mm256_madd_epi16(p, ones));
        }
    } else { /* 4-bit: two operands' pairs fit one int16 */
        for (int k = 0; k < 4; k++) {
            const __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(w[k], XB(k)),
                                               _mm256_maddubs_epi16(w[k + 4], XB(k + 4)));
            sum = _mm256_add_epi32(sum, _mm256_madd_epi16(p, ones));
        }
    }
    return sum;
#endif
#undef XB
}

/* Whether the sums above include the stored offset (they do but for Q8_0 without VNNI). */
static inline int sums_include_offset(const int type) {
#ifdef DPBUSD
    return type != GGML_Q4_1;
#else
    return type == GGML_Q4_0;
#endif
}

/* y[c * ldy + r] for the 8 rows r of one group and activation rows c < MR. */
static inline __attribute__((always_inline)) void tile8(const int type, const uint8_t *w,
                                                        int64_t nb, const act_q8_32 *a,
                                                        int64_t astride, float *y, int64_t ldy,
                                                        int64_t nrows, const int MR) {
    const int64_t gb = type == GGML_Q4_0 ? 144 : type == GGML_Q4_1 ? 160 : 272;
    __m256 acc[4], macc[4];
    for (int c = 0; c < MR; c++) acc[c] = macc[c] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *p = w + b * gb;
        const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
        const __m256 mw = type == GGML_Q4_1 ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + 16)))
                                            : _mm256_setzero_ps();
        const uint8_t *q = p + (type == GGML_Q4_1 ? 32 : 16);
        __m256i wv[8];
        if (type == GGML_Q8_0) {
            for (int k = 0; k < 8; k++) wv[k] = _mm256_loadu_si256((const __m256i *)(q + 32 * k));
        } else {
            for (int k = 0; k < 4; k++) {
                const __m256i raw = _mm256_loadu_si256((const __m256i *)(q + 32 * k));
                wv[k] = _mm256_and_si256(raw, _mm256_set1_epi8(0x0F));
                wv[k + 4] = _mm256_and_si256(_mm256_srli_epi16(raw, 4), _mm256_set1_epi8(0x0F));
            }
        }
        for (int c = 0; c < MR; c++) {
            const act_q8_32 *x = a + c * astride + b;
            __m256i sums = block8_sums(type, wv, x);
            if (sums_include_offset(type))
                sums = _mm256_sub_epi32(sums, _mm256_set1_epi32(value_offset(type) * x->sum));
            const __m256 scale = _mm256_mul_ps(dw, _mm256_set1_ps(x->d));
            acc[c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), scale, acc[c]);
            if (type == GGML_Q4_1) macc[c] = _mm256_fmadd_ps(mw, _mm256_set1_ps(x->s), macc[c]);
        }
    }
    for (int c = 0; c < MR; c++) {
        const __m256 out = type == GGML_Q4_1 ? _mm256_add_ps(acc[c], macc[c]) : acc[c];
        if (nrows == ROWS8) _mm256_storeu_ps(y + c * ldy, out);
        else {
            float tmp[8];
            _mm256_storeu_ps(tmp, out);
            for (int r = 0; r < nrows; r++) y[c * ldy + r] = tmp[r];
        }
    }
}
#endif

#ifndef __AVX2__
/* The portable form of tile8: one (row, activation row) pair at a time, the same integer sums. */
static void tile8_scalar(int64_t type, const uint8_t *w, int64_t nb, const act_q8_32 *a,
                         int64_t astride, float *y, int64_t ldy, int64_t nrows, int64_t M) {
    const int64_t gb = group_block_bytes(type);
    const int offset = value_offset(type);
    for (int64_t c = 0; c < M; c++)
        for (int r = 0; r < nrows; r++) {
            float total = 0.0f, mins = 0.0f;
            for (int64_t b = 0; b < nb; b++) {
                const uint8_t *gblk = w + b * gb;
                const act_q8_32 *x = a + c * astride + b;
                int sum = 0;
                for (int k = 0; k < QK; k++) sum += stored_value(type, gblk, r, k) * x->q[k];
                if (type != GGML_Q4_1) sum -= offset * x->sum;
                total += (float)sum * (fp16_to_f32(gblk + 2 * r) * x->d);
                if (type == GGML_Q4_1) mins += fp16_to_f32(gblk + 16 + 2 * r) * x->s;
            }
            y[c * ldy + r] = total + mins;
        }
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

#define MR 4 /* activation rows per tile */

#define BY_MR(rows, call, ...)                \
    switch (rows) {                           \
        case 4: call(__VA_ARGS__, 4); break;  \
        case 3: call(__VA_ARGS__, 3); break;  \
        case 2: call(__VA_ARGS__, 2); break;  \
        default: call(__VA_ARGS__, 1); break; \
    }

/* Groups of 8 interleaved rows times all M activation rows. */
static inline __attribute__((always_inline)) void matmul8(const team *tm, const int type,
                                                          const nc_matrix *w, const act_q8_32 *a,
                                                          int64_t M, float *y, int64_t ldy) {
    const int64_t N = w->rows, nb = w->cols / QK, gb = group_block_bytes(type);
    int64_t lo, hi;
    team_range(tm, (N + ROWS8 - 1) / ROWS8, &lo, &hi);
    for (int64_t g = lo; g < hi; g++) {
        const uint8_t *wp = (const uint8_t *)w->data + g * nb * gb;
        const int64_t n0 = g * ROWS8, nrows = N - n0 < ROWS8 ? N - n0 : ROWS8;
#ifdef __AVX2__
        for (int64_t m0 = 0; m0 < M; m0 += MR) {
            const int rows = M - m0 < MR ? (int)(M - m0) : MR;
            BY_MR(rows, tile8, type, wp, nb, a + m0 * nb, nb, y + m0 * ldy + n0, ldy, nrows)
        }
#else
        tile8_scalar(type, wp, nb, a, nb, y + n0, ldy, nrows, M);
#endif
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
        case GGML_Q4_0: matmul8(t, GGML_Q4_0, w, xq, M, y, ldy); return;
        case GGML_Q4_1: matmul8(t, GGML_Q4_1, w, xq, M, y, ldy); return;
        case GGML_Q8_0: matmul8(t, GGML_Q8_0, w, xq, M, y, ldy); return;
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
