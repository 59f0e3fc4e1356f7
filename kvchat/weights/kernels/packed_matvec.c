/* kvchat's one-token product with block-packed weights, in float32 (see kvchat/weights/quant.py).
 *
 * The weight [rows, cols] is w[r, c] = q[r, c] * scale[r, c / 32] + offset[r, c / 32], so
 *   y[v, r] = sum_b scale[r, b] * (sum_j x[v, 32b + j] * q[r, 32b + j]) + offset[r, b] * (sum_j x[v, 32b + j]).
 * Two forms: int8 q with float32 scales and offsets (packed_*), and 4-bit q (0..15, two to a byte: byte j of a
 * block holds q[32b + j] in its low half and q[32b + 16 + j] in its high half) with float16 scales and offsets
 * (packed4_*). Both compute in the same order of operations, so the same weights give the same float32 bits.
 * Built at run time by kvchat with the machine's compiler (-O3 -march=native, OpenMP when it has it). */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#define VECTORS 1
/* Weights stream from memory once per token: asking for them 4 KiB ahead keeps more reads in flight than the
 * hardware prefetcher does alone (the product measured 8-15% faster on the default model's matrices). */
#define AHEAD 4096
#define PREFETCH(p) _mm_prefetch((const char *)(p), _MM_HINT_T0)
/* Scales and offsets are asked for twice as many blocks ahead; LINE is how many blocks of q share a cache line. */
#define SCALES_AHEAD(LINE) (2 * AHEAD * (LINE) / 64)
#endif

static float half_to_float(uint16_t h) {  /* exact: every float16 is a float32 */
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exponent = (h >> 10) & 31, mantissa = h & 1023, bits;
    if (exponent == 31) bits = sign | 0x7f800000u | (mantissa << 13);
    else if (exponent) bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
    else if (!mantissa) bits = sign;
    else {  /* subnormal: normalise */
        exponent = 113;
        while (!(mantissa & 1024)) { mantissa <<= 1; exponent--; }
        bits = sign | (exponent << 23) | ((mantissa & 1023) << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
#endif
}

/* The block sums of x [vectors, cols]: xsum [vectors, cols / 32], shared by every row. */
static void block_sums(const float *x, int64_t vectors, int64_t cols, float *xsum) {
    const int64_t blocks = cols / 32;
    for (int64_t v = 0; v < vectors; v++)
        for (int64_t b = 0; b < blocks; b++) {
            float s = 0.0f;
            for (int j = 0; j < 32; j++) s += x[v * cols + b * 32 + j];
            xsum[v * blocks + b] = s;
        }
}

/* sum_b offset[b] * xsum[b], with offsets given as float32 (offset) or float16 (offset16), in vector lanes, the
 * same sum for both. */
#if defined(__AVX512F__)
static float shift_of(const float *offset, const uint16_t *offset16, const float *xs, int64_t blocks) {
    __m512 lanes = _mm512_setzero_ps();
    int64_t b = 0;
    for (; b + 16 <= blocks; b += 16) {
        __m512 o = offset ? _mm512_loadu_ps(offset + b) : _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(offset16 + b)));
        lanes = _mm512_fmadd_ps(o, _mm512_loadu_ps(xs + b), lanes);
    }
    float shift = _mm512_reduce_add_ps(lanes);
    for (; b < blocks; b++) shift += (offset ? offset[b] : half_to_float(offset16[b])) * xs[b];
    return shift;
}
#else
static float shift_of(const float *offset, const uint16_t *offset16, const float *xs, int64_t blocks) {
    float lanes[8] = {0};
    int64_t b = 0;
    for (; b + 8 <= blocks; b += 8)
        for (int l = 0; l < 8; l++)
            lanes[l] += (offset ? offset[b + l] : half_to_float(offset16[b + l])) * xs[b + l];
    float shift = 0.0f;
    for (int l = 0; l < 8; l++) shift += lanes[l];
    for (; b < blocks; b++) shift += (offset ? offset[b] : half_to_float(offset16[b])) * xs[b];
    return shift;
}
#endif

/* One row's sum_b scale[b] * dot_b, with the block dot products in two accumulators (even and odd blocks) so
 * that consecutive blocks do not wait for each other. WEIGHTS(b, ...) yields block b's 32 weights as floats,
 * BLOCK_INTO adds scale[b] * dot_b into a vector of lanes, and sum_lanes adds a vector's lanes up. */
#if defined(__AVX512F__)
typedef __m512 lanes_t;
#define ZERO_LANES _mm512_setzero_ps
#define ADD_LANES _mm512_add_ps
static inline float sum_lanes(__m512 v) { return _mm512_reduce_add_ps(v); }
#define BLOCK_INTO(acc, b, WEIGHTS, SCALE) do { \
        __m512 w0, w1; \
        WEIGHTS(b, w0, w1); \
        __m512 dot = _mm512_fmadd_ps(_mm512_loadu_ps(xv + (b) * 32), w0, _mm512_mul_ps(_mm512_loadu_ps(xv + (b) * 32 + 16), w1)); \
        acc = _mm512_fmadd_ps(dot, _mm512_set1_ps(SCALE(b)), acc); \
    } while (0)
#define INT8_WEIGHTS(b, w0, w1) do { \
        w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(qr + (b) * 32)))); \
        w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(qr + (b) * 32 + 16)))); \
    } while (0)
#define NIBBLE_WEIGHTS(b, w0, w1) do { \
        __m512i n = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(qr + (b) * 16))); \
        w0 = _mm512_cvtepi32_ps(_mm512_and_si512(n, _mm512_set1_epi32(15))); \
        w1 = _mm512_cvtepi32_ps(_mm512_srli_epi32(n, 4)); \
    } while (0)
#elif VECTORS
typedef __m256 lanes_t;
#define ZERO_LANES _mm256_setzero_ps
#define ADD_LANES _mm256_add_ps
static inline float sum_lanes(__m256 v) {
    __m128 half = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    half = _mm_add_ps(half, _mm_movehl_ps(half, half));
    half = _mm_add_ss(half, _mm_shuffle_ps(half, half, 1));
    return _mm_cvtss_f32(half);
}
#define BLOCK_INTO(acc, b, WEIGHTS, SCALE) do { \
        __m256 w[4]; \
        WEIGHTS(b, w); \
        const float *xb = xv + (b) * 32; \
        __m256 dot = _mm256_mul_ps(_mm256_loadu_ps(xb), w[0]); \
        for (int k = 1; k < 4; k++) dot = _mm256_fmadd_ps(_mm256_loadu_ps(xb + 8 * k), w[k], dot); \
        acc = _mm256_fmadd_ps(dot, _mm256_set1_ps(SCALE(b)), acc); \
    } while (0)
#define INT8_WEIGHTS(b, w) do { \
        for (int k = 0; k < 4; k++) \
            w[k] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(qr + (b) * 32 + 8 * k)))); \
    } while (0)
#define NIBBLE_WEIGHTS(b, w) do { \
        __m256i n0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(qr + (b) * 16))); \
        __m256i n1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(qr + (b) * 16 + 8))); \
        w[0] = _mm256_cvtepi32_ps(_mm256_and_si256(n0, _mm256_set1_epi32(15))); \
        w[1] = _mm256_cvtepi32_ps(_mm256_and_si256(n1, _mm256_set1_epi32(15))); \
        w[2] = _mm256_cvtepi32_ps(_mm256_srli_epi32(n0, 4)); \
        w[3] = _mm256_cvtepi32_ps(_mm256_srli_epi32(n1, 4)); \
    } while (0)
#endif

#if VECTORS
#define ROW(qb_of, WEIGHTS, SCALE, LINE) do { \
        lanes_t even = ZERO_LANES(), odd = ZERO_LANES(); \
        int64_t b = 0; \
        for (; b + 1 < blocks; b += 2) { \
            if (!(b & (LINE - 1))) PREFETCH(qb_of(b) + AHEAD); \
            if (!(b & 15)) { PREFETCH(sr + b + SCALES_AHEAD(LINE)); PREFETCH(or_ + b + SCALES_AHEAD(LINE)); } \
            BLOCK_INTO(even, b, WEIGHTS, SCALE); \
            BLOCK_INTO(odd, b + 1, WEIGHTS, SCALE); \
        } \
        if (b < blocks) BLOCK_INTO(even, b, WEIGHTS, SCALE); \
        y[v * rows + r] = sum_lanes(ADD_LANES(even, odd)) + shift; \
    } while (0)
#else
#define ROW(qb_of, WEIGHTS, SCALE, LINE) do { \
        float acc[2][8] = {{0}}; \
        for (int64_t b = 0; b < blocks; b++) { \
            float w[32], dot[8]; \
            WEIGHTS(b, w); \
            for (int l = 0; l < 8; l++) dot[l] = xv[b * 32 + l] * w[l]; \
            for (int k = 1; k < 4; k++) for (int l = 0; l < 8; l++) dot[l] += xv[b * 32 + 8 * k + l] * w[8 * k + l]; \
            for (int l = 0; l < 8; l++) acc[b & 1][l] += dot[l] * SCALE(b); \
        } \
        float total = 0.0f; \
        for (int l = 0; l < 8; l++) total += acc[0][l] + acc[1][l]; \
        y[v * rows + r] = total + shift; \
    } while (0)
#define INT8_WEIGHTS(b, w) do { for (int j = 0; j < 32; j++) w[j] = (float)qr[(b) * 32 + j]; } while (0)
#define NIBBLE_WEIGHTS(b, w) do { \
        for (int j = 0; j < 16; j++) { w[j] = (float)(qr[(b) * 16 + j] & 15); w[j + 16] = (float)(qr[(b) * 16 + j] >> 4); } \
    } while (0)
#endif

#define INT8_AT(b) (qr + (b) * 32)
#define NIBBLE_AT(b) (qr + (b) * 16)
#define FLOAT_SCALE(b) (sr[b])
#define HALF_SCALE(b) half_to_float(sr[b])

void packed_matvec(const float *x, int64_t vectors, const int8_t *q, const float *scale, const float *offset,
                   int64_t rows, int64_t cols, float *xsum, float *y, int threads) {
    const int64_t blocks = cols / 32;
    block_sums(x, vectors, cols, xsum);
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const int8_t *qr = q + r * cols;
        const float *sr = scale + r * blocks, *or_ = offset + r * blocks;
        for (int64_t v = 0; v < vectors; v++) {
            const float *xv = x + v * cols;
            const float shift = shift_of(or_, 0, xsum + v * blocks, blocks);
            ROW(INT8_AT, INT8_WEIGHTS, FLOAT_SCALE, 2);
        }
    }
}

void packed4_matvec(const float *x, int64_t vectors, const uint8_t *q, const uint16_t *scale, const uint16_t *offset,
                    int64_t rows, int64_t cols, float *xsum, float *y, int threads) {
    const int64_t blocks = cols / 32;
    block_sums(x, vectors, cols, xsum);
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const uint8_t *qr = q + r * (cols / 2);
        const uint16_t *sr = scale + r * blocks, *or_ = offset + r * blocks;
        for (int64_t v = 0; v < vectors; v++) {
            const float *xv = x + v * cols;
            const float shift = shift_of(0, or_, xsum + v * blocks, blocks);
            ROW(NIBBLE_AT, NIBBLE_WEIGHTS, HALF_SCALE, 4);
        }
    }
}

/* w[r, c] = q[r, c] * scale[r, c / 32] + offset[r, c / 32]: the float32 weight, for a prompt's matrix product.
 * Two roundings (a product, then a sum: no fused multiply-add), as quant.unpack computes it. UNPACK_BLOCK(wb, WEIGHTS,
 * b, s, o) writes block b's 32 weights at wb. */
#if defined(__AVX512F__)
#define UNPACK_BLOCK(wb, WEIGHTS, b, s, o) do { \
        __m512 w0, w1, scale_ = _mm512_set1_ps(s), offset_ = _mm512_set1_ps(o); \
        WEIGHTS(b, w0, w1); \
        _mm512_storeu_ps((wb), _mm512_add_ps(_mm512_mul_ps(w0, scale_), offset_)); \
        _mm512_storeu_ps((wb) + 16, _mm512_add_ps(_mm512_mul_ps(w1, scale_), offset_)); \
    } while (0)
#elif VECTORS
#define UNPACK_BLOCK(wb, WEIGHTS, b, s, o) do { \
        __m256 w[4], scale_ = _mm256_set1_ps(s), offset_ = _mm256_set1_ps(o); \
        WEIGHTS(b, w); \
        for (int k = 0; k < 4; k++) _mm256_storeu_ps((wb) + 8 * k, _mm256_add_ps(_mm256_mul_ps(w[k], scale_), offset_)); \
    } while (0)
#else
#define UNPACK_BLOCK(wb, WEIGHTS, b, s, o) do { \
        float w[32]; \
        WEIGHTS(b, w); \
        for (int j = 0; j < 32; j++) { float product = w[j] * (s); (wb)[j] = product + (o); } \
    } while (0)
#endif

void packed_unpack(const int8_t *q, const float *scale, const float *offset, int64_t rows, int64_t cols, float *out,
                   int threads) {
    const int64_t blocks = cols / 32;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const int8_t *qr = q + r * cols;
        for (int64_t b = 0; b < blocks; b++)
            UNPACK_BLOCK(out + r * cols + b * 32, INT8_WEIGHTS, b, scale[r * blocks + b], offset[r * blocks + b]);
    }
}

void packed4_unpack(const uint8_t *q, const uint16_t *scale, const uint16_t *offset, int64_t rows, int64_t cols,
                    float *out, int threads) {
    const int64_t blocks = cols / 32;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const uint8_t *qr = q + r * (cols / 2);
        for (int64_t b = 0; b < blocks; b++)
            UNPACK_BLOCK(out + r * cols + b * 32, NIBBLE_WEIGHTS, b, half_to_float(scale[r * blocks + b]),
                         half_to_float(offset[r * blocks + b]));
    }
}

/* ---- One token through a Llama-family decoder whose matrices are all packed (kvchat/weights/direct.py) ----
 * The layer as transformers' LlamaDecoderLayer computes it: x += o(attention(rope(q), rope(k), v)) over the cache,
 * then x += down(silu(gate) * up), each after an RMS norm; the new token's key and value rows are written at slot
 * n of the layer's cache before it attends over slots 0..n. Grouped-query heads: query head h reads kv head
 * h / (heads / kv_heads), as transformers' repeat_kv. */

typedef struct {
    const void *q, *scale, *offset;  /* a packing in either form (see the top of this file) */
    int64_t rows, cols;
    int64_t nibbles;  /* 1: the 4-bit form, 0: int8 */
} Mat;

typedef struct {
    const float *attn_norm, *mlp_norm;  /* [hidden] */
    Mat q, k, v, o, gate, up, down;
    float *keys, *values;  /* the layer's cache: kv head g, slot t at [g * head_stride + t * head_dim] */
    int64_t head_stride;
} StepLayer;

typedef struct {
    int64_t layers, hidden, heads, kv_heads, head_dim, intermediate;
    float eps, scaling;
    const StepLayer *layer;
    const float *final_norm;  /* [hidden] */
    Mat head;  /* [vocab, hidden] */
} StepModel;

static void product(const Mat *m, const float *x, float *xsum, float *y, int threads) {
    if (m->nibbles)
        packed4_matvec(x, 1, (const uint8_t *)m->q, (const uint16_t *)m->scale, (const uint16_t *)m->offset, m->rows,
                       m->cols, xsum, y, threads);
    else
        packed_matvec(x, 1, (const int8_t *)m->q, (const float *)m->scale, (const float *)m->offset, m->rows,
                      m->cols, xsum, y, threads);
}

/* out = weight * (x / sqrt(mean(x^2) + eps)), as LlamaRMSNorm (x * rsqrt(variance + eps), then the weight). */
static void rms_norm(const float *x, const float *weight, int64_t n, float eps, float *out) {
    float squares = 0.0f;
    for (int64_t i = 0; i < n; i++) squares += x[i] * x[i];
    const float inverse = 1.0f / sqrtf(squares / (float)n + eps);
    for (int64_t i = 0; i < n; i++) { float scaled = x[i] * inverse; out[i] = weight[i] * scaled; }
}

/* v * cos + rotate_half(v) * sin, in place, for one head (cos and sin [head_dim], their halves equal). */
static void rope(float *v, const float *cos_, const float *sin_, int64_t dim) {
    const int64_t half = dim / 2;
    for (int64_t i = 0; i < half; i++) {
        const float x1 = v[i], x2 = v[i + half];
        float a = x1 * cos_[i], b = (-x2) * sin_[i];
        float c = x2 * cos_[i + half], d = x1 * sin_[i + half];
        v[i] = a + b;
        v[i + half] = c + d;
    }
}

static float dot(const float *a, const float *b, int64_t n) {
#if VECTORS && !defined(__AVX512F__)
    if (n % 8 == 0) {
        __m256 acc = _mm256_setzero_ps();
        for (int64_t i = 0; i < n; i += 8) acc = _mm256_add_ps(acc, _mm256_mul_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i)));
        return sum_lanes(acc);
    }
#elif defined(__AVX512F__)
    if (n % 16 == 0) {
        __m512 acc = _mm512_setzero_ps();
        for (int64_t i = 0; i < n; i += 16) acc = _mm512_add_ps(acc, _mm512_mul_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i)));
        return _mm512_reduce_add_ps(acc);
    }
#endif
    float s = 0.0f;
    for (int64_t i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}

/* One query head over slots 0..n of its kv head: softmax(q.k * scaling) weighted sum of values into out. */
static void attend(const float *q, const float *keys, const float *values, int64_t n, int64_t dim, float scaling,
                   float *scores, float *out) {
    float top = -INFINITY;
    for (int64_t t = 0; t <= n; t++) {
        scores[t] = dot(q, keys + t * dim, dim) * scaling;
        if (scores[t] > top) top = scores[t];
    }
    float total = 0.0f;
    for (int64_t t = 0; t <= n; t++) { scores[t] = expf(scores[t] - top); total += scores[t]; }
    const float inverse = 1.0f / total;
    for (int64_t i = 0; i < dim; i++) out[i] = 0.0f;
    for (int64_t t = 0; t <= n; t++) {
        const float p = scores[t] * inverse;
        const float *v = values + t * dim;
        for (int64_t i = 0; i < dim; i++) { float term = p * v[i]; out[i] += term; }
    }
}

/* x [hidden]: the token's embedding in, overwritten; logits [vocab] out. n: the tokens the cache holds before this
 * one (it goes to slot n); cos and sin [head_dim] at position n. Returns 0, or -1 when scratch memory ran out. */
int llama_step(const StepModel *m, float *x, int64_t n, const float *cos_, const float *sin_, float *logits,
               int threads) {
    const int64_t hidden = m->hidden, dim = m->head_dim, heads = m->heads, kv_heads = m->kv_heads;
    const int64_t groups = heads / kv_heads, inter = m->intermediate;
    int64_t widest = hidden > inter ? hidden : inter;
    if (heads * dim > widest) widest = heads * dim;
    float *h = malloc(sizeof(float) * (size_t)(hidden + (heads + 2 * kv_heads) * dim + heads * dim + 2 * inter
                                                + widest / 32 + 1 + heads * (n + 1)));
    if (!h) return -1;
    float *qkv = h + hidden, *att = qkv + (heads + 2 * kv_heads) * dim, *gate_up = att + heads * dim;
    float *xsum = gate_up + 2 * inter, *scores = xsum + widest / 32 + 1;
    for (int64_t l = 0; l < m->layers; l++) {
        const StepLayer *L = &m->layer[l];
        rms_norm(x, L->attn_norm, hidden, m->eps, h);
        float *q = qkv, *k = qkv + heads * dim, *v = k + kv_heads * dim;
        product(&L->q, h, xsum, q, threads);
        product(&L->k, h, xsum, k, threads);
        product(&L->v, h, xsum, v, threads);
        for (int64_t g = 0; g < heads + kv_heads; g++) rope(qkv + g * dim, cos_, sin_, dim);
        for (int64_t g = 0; g < kv_heads; g++) {
            memcpy(L->keys + g * L->head_stride + n * dim, k + g * dim, sizeof(float) * (size_t)dim);
            memcpy(L->values + g * L->head_stride + n * dim, v + g * dim, sizeof(float) * (size_t)dim);
        }
        #pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t head = 0; head < heads; head++) {
            const int64_t g = head / groups;
            attend(q + head * dim, L->keys + g * L->head_stride, L->values + g * L->head_stride, n, dim, m->scaling,
                   scores + head * (n + 1), att + head * dim);
        }
        product(&L->o, att, xsum, h, threads);
        for (int64_t i = 0; i < hidden; i++) x[i] += h[i];
        rms_norm(x, L->mlp_norm, hidden, m->eps, h);
        product(&L->gate, h, xsum, gate_up, threads);
        product(&L->up, h, xsum, gate_up + inter, threads);
        for (int64_t i = 0; i < inter; i++) {
            const float g = gate_up[i];
            const float silu = g / (1.0f + expf(-g));
            gate_up[i] = silu * gate_up[inter + i];
        }
        product(&L->down, gate_up, xsum, h, threads);
        for (int64_t i = 0; i < hidden; i++) x[i] += h[i];
    }
    rms_norm(x, m->final_norm, hidden, m->eps, h);
    product(&m->head, h, xsum, logits, threads);
    free(h);
    return 0;
}
