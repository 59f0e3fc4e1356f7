/* kvchat's one-token product with block-packed weights, in float32 (see kvchat/weights/quant.py), and the direct
 * decode step (kvchat/weights/direct.py).
 *
 * The weight [rows, cols] is w[r, c] = q[r, c] * scale[r, c / 32] + offset[r, c / 32], so
 *   y[v, r] = sum_b scale[r, b] * (sum_j x[v, 32b + j] * q[r, 32b + j]) + offset[r, b] * (sum_j x[v, 32b + j]).
 * Forms of 32-input blocks: int8 q with float32 scales and offsets (packed_*), and 4-bit q (0..15, two to a
 * byte: byte j of a block holds q[32b + j] in its low half and q[32b + 16 + j] in its high half) with float16
 * (packed4_*) or float32 (packed4f_*) scales and offsets. All compute in the same order of operations, so the
 * same weights give the same float32 bits in each. And one form of 16-input blocks (GGUF's K-quants with 16
 * inputs a scale: Q6_K, Q3_K, Q2_K): int8 q with float32 scales and offsets a 16-input block (packed16_*).
 * GGUF's Q6_K also has a form of its own, the file's size (packed6_*): 6-bit values, a 16-input block in 12 bytes
 * (bytes 0..7: value j's low four bits in byte j's low half, value j + 8's in its high half; bytes 8..11, a
 * little-endian 32-bit word: value j's two high bits at bits 2j and 2j + 1), each value 32 above the weight's
 * integer; and per super-block of 256 inputs 18 bytes: 16 int8 sub-scales, then a float16 d. The block's scale
 * is d * sub-scale, exact in float32, so the products are those of the int8 form of 16-input blocks, to the bit.
 * Weights kept as 16-bit floats (a bfloat16 or float16 model's own numbers: wide_bf16_*, wide_f16_*) are the
 * 32-input form with every scale 1 and no offsets: each widens to float32 exactly, and the row is computed in
 * the same order (acc[l] = fma(dot[l], 1, acc[l]), which is acc[l] + dot[l]).
 *
 * Built when kvchat is installed (setup.py), once per code path, into one library: this file is compiled with
 * -DKVCHAT_PATH=scalar (portable C) and, on x86-64, again with -DKVCHAT_PATH=avx2 -mavx2 -mfma -mf16c; each
 * exported function carries its path's name (packed_matvec_avx2) and kvchat picks the path the CPU runs
 * (module.c says which). Every path computes the same bits, in one defined order (no contraction of a * b + c
 * but where written as a fused multiply-add, -ffp-contract=off):
 * - a row of a product: block b's dot product in 8 lanes, lane l = fma(x[24 + l], w[24 + l], fma(x[16 + l],
 *   w[16 + l], fma(x[8 + l], w[8 + l], x[l] * w[l]))); blocks alternate between two accumulators of 8 lanes
 *   (even blocks, odd blocks; an odd last block goes to the even one), acc[l] = fma(dot[l], scale[b], acc[l]);
 *   the row is lanes(even + odd) + shift, where lanes(e) = ((e0 + e4) + (e2 + e6)) + ((e1 + e5) + (e3 + e7))
 *   and shift = sum_b offset[b] * (sum_j x[32b + j]) in 8 lanes of plain products and sums, added up in order
 *   (0 where the offsets are all zero and not given);
 * - a row of 16-input blocks likewise, but block b's dot product is lane l = fma(x[8 + l], w[8 + l], x[l] * w[l])
 *   and the shift's block sums are over 16 inputs;
 * - a dot product in attention: 8 lanes of plain products and sums, then lanes(.) (in order where the length
 *   is no multiple of 8);
 * - everything else in plain C, the same statements on every path. */
#if !defined(KVCHAT_PATH)
#error "compile with -DKVCHAT_PATH=scalar (or avx2, with -mavx2 -mfma -mf16c): see setup.py"
#endif
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define KVCHAT_JOIN2(name, path) name##_##path
#define KVCHAT_JOIN(name, path) KVCHAT_JOIN2(name, path)
#define packed_matvec KVCHAT_JOIN(packed_matvec, KVCHAT_PATH)
#define packed4_matvec KVCHAT_JOIN(packed4_matvec, KVCHAT_PATH)
#define packed_unpack KVCHAT_JOIN(packed_unpack, KVCHAT_PATH)
#define packed4_unpack KVCHAT_JOIN(packed4_unpack, KVCHAT_PATH)
#define packed4f_matvec KVCHAT_JOIN(packed4f_matvec, KVCHAT_PATH)
#define packed4f_unpack KVCHAT_JOIN(packed4f_unpack, KVCHAT_PATH)
#define packed16_matvec KVCHAT_JOIN(packed16_matvec, KVCHAT_PATH)
#define packed16_unpack KVCHAT_JOIN(packed16_unpack, KVCHAT_PATH)
#define llama_step KVCHAT_JOIN(llama_step, KVCHAT_PATH)
#define packed6_matvec KVCHAT_JOIN(packed6_matvec, KVCHAT_PATH)
#define packed6_unpack KVCHAT_JOIN(packed6_unpack, KVCHAT_PATH)
#define wide_bf16_matvec KVCHAT_JOIN(wide_bf16_matvec, KVCHAT_PATH)
#define wide_bf16_unpack KVCHAT_JOIN(wide_bf16_unpack, KVCHAT_PATH)
#define wide_f16_matvec KVCHAT_JOIN(wide_f16_matvec, KVCHAT_PATH)
#define wide_f16_unpack KVCHAT_JOIN(wide_f16_unpack, KVCHAT_PATH)

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define VECTORS 1
/* Weights stream from memory once per token: asking for them 4 KiB ahead keeps more reads in flight than the
 * hardware prefetcher does alone (the product measured 8-15% faster on the default model's matrices). */
#define AHEAD 4096
#define PREFETCH(p) _mm_prefetch((const char *)(p), _MM_HINT_T0)
/* Scales and offsets are asked for twice as many blocks ahead; LINE is how many blocks of q share a cache line. */
#define SCALES_AHEAD(LINE) (2 * AHEAD * (LINE) / 64)
#else
#define VECTORS 0
#endif

/* lanes(e): the defined sum of 8 lanes (see the top of this file), as the vector path's shuffles add them. */
static inline float sum8(const float *e) {
    const float h0 = e[0] + e[4], h1 = e[1] + e[5], h2 = e[2] + e[6], h3 = e[3] + e[7];
    return (h0 + h2) + (h1 + h3);
}

static float half_to_float(uint16_t h) {  /* exact: every float16 is a float32 */
#if VECTORS  /* (F16C comes with the AVX2 path; the conversion is exact either way) */
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

static float bfloat16_to_float(uint16_t h) {  /* exact: a bfloat16 is a float32's upper half */
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* The scale of 16-input block b of a row of 6-bit values (see the top of this file): d * sub-scale, exact. */
static inline float six_scale(const uint8_t *sr, int64_t b) {
    const uint8_t *super = sr + (b >> 4) * 18;
    uint16_t d;
    memcpy(&d, super + 16, 2);
    return half_to_float(d) * (float)(int8_t)super[b & 15];
}

/* Value j (0..15) of a 16-input block of 6-bit values, as the weight's integer. */
static inline float six_value(const uint8_t *qb, uint32_t high, int j) {
    const int low = j < 8 ? (qb[j] & 15) : (qb[j - 8] >> 4);
    return (float)((low | (int)(((high >> (2 * j)) & 3) << 4)) - 32);
}

/* The block sums of x [vectors, cols] over blocks of `size` inputs: xsum [vectors, cols / size], shared by every
 * row. */
static void block_sums(const float *x, int64_t vectors, int64_t cols, int size, float *xsum) {
    const int64_t blocks = cols / size;
    for (int64_t v = 0; v < vectors; v++)
        for (int64_t b = 0; b < blocks; b++) {
            float s = 0.0f;
            for (int j = 0; j < size; j++) s += x[v * cols + b * size + j];
            xsum[v * blocks + b] = s;
        }
}

/* sum_b offset[b] * xsum[b], with offsets given as float32 (offset) or float16 (offset16), in vector lanes, the
 * same sum for both. */
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

/* One row's sum_b scale[b] * dot_b, with the block dot products in two accumulators (even and odd blocks) so
 * that consecutive blocks do not wait for each other. WEIGHTS(b, ...) yields block b's 32 weights as floats,
 * BLOCK_INTO adds scale[b] * dot_b into a vector of lanes, and sum_lanes adds a vector's lanes up. */
#if VECTORS
typedef __m256 lanes_t;
#define ZERO_LANES _mm256_setzero_ps
#define ADD_LANES _mm256_add_ps
static inline float sum_lanes(__m256 v) {  /* sum8's order: (e0+e4, e1+e5, e2+e6, e3+e7), then (h0+h2) + (h1+h3) */
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
#define BLOCK16_INTO(acc, b) do { \
        const int8_t *qb_ = qr + (b) * 16; \
        const float *xb = xv + (b) * 16; \
        __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)qb_))); \
        __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(qb_ + 8)))); \
        __m256 dot = _mm256_fmadd_ps(_mm256_loadu_ps(xb + 8), w1, _mm256_mul_ps(_mm256_loadu_ps(xb), w0)); \
        acc = _mm256_fmadd_ps(dot, _mm256_set1_ps(sr[b]), acc); \
    } while (0)
/* A 16-input block of 6-bit values as 16 int8 weights in one register: the low nibbles spread to bytes 0..15, the
 * high pairs moved to bits 4 and 5 of each value's byte (the word shifted by 4, 2, 0 and -2 in four lanes, so
 * that byte m of lane k holds value 4m + k's pair there; a shuffle puts them in order), less 32. */
#define SIX_VALUES(qb_) __extension__ ({ \
        const __m128i packed_ = _mm_loadl_epi64((const __m128i *)(qb_)); \
        const __m128i low_ = _mm_and_si128(_mm_unpacklo_epi64(packed_, _mm_srli_epi16(packed_, 4)), \
                                           _mm_set1_epi8(15)); \
        uint32_t word_; \
        memcpy(&word_, (qb_) + 8, 4); \
        const __m128i pairs_ = _mm_and_si128(_mm_srlv_epi32(_mm_sllv_epi32(_mm_set1_epi32((int)word_), \
            _mm_setr_epi32(4, 2, 0, 0)), _mm_setr_epi32(0, 0, 0, 2)), _mm_set1_epi8(0x30)); \
        _mm_sub_epi8(_mm_or_si128(low_, _mm_shuffle_epi8(pairs_, \
            _mm_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15))), _mm_set1_epi8(32)); \
    })
#define SIX_BLOCK_INTO(acc, b, s) do { \
        const __m128i values_ = SIX_VALUES(qr + (b) * 12); \
        const float *xb = xv + (b) * 16; \
        const __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(values_)); \
        const __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(values_, values_))); \
        __m256 dot = _mm256_fmadd_ps(_mm256_loadu_ps(xb + 8), w1, _mm256_mul_ps(_mm256_loadu_ps(xb), w0)); \
        acc = _mm256_fmadd_ps(dot, _mm256_set1_ps(s), acc); \
    } while (0)
/* The 16 block scales of a super-block of 6-bit values: d * sub-scale, exact (as six_scale). */
static inline void six_scales(const uint8_t *super, float *out) {
    uint16_t d;
    memcpy(&d, super + 16, 2);
    const __m256 d_ = _mm256_set1_ps(half_to_float(d));
    const __m128i sub = _mm_loadu_si128((const __m128i *)super);
    _mm256_storeu_ps(out, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(sub)), d_));
    _mm256_storeu_ps(out + 8, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(sub, 8))), d_));
}
#define BF16_WEIGHTS(b, w) do { \
        for (int k = 0; k < 4; k++) \
            w[k] = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32( \
                _mm_loadu_si128((const __m128i *)(qr + (b) * 32 + 8 * k))), 16)); \
    } while (0)
#define F16_WEIGHTS(b, w) do { \
        for (int k = 0; k < 4; k++) w[k] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(qr + (b) * 32 + 8 * k))); \
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
            if ((LINE) == 1) PREFETCH(qb_of(b + 1) + AHEAD); \
            if (!(b & 15)) { PREFETCH(sr + b + SCALES_AHEAD(LINE)); if (or_) PREFETCH(or_ + b + SCALES_AHEAD(LINE)); } \
            BLOCK_INTO(even, b, WEIGHTS, SCALE); \
            BLOCK_INTO(odd, b + 1, WEIGHTS, SCALE); \
        } \
        if (b < blocks) BLOCK_INTO(even, b, WEIGHTS, SCALE); \
        y[v * rows + r] = sum_lanes(ADD_LANES(even, odd)) + shift; \
    } while (0)
#define ROW16() do { \
        lanes_t even = ZERO_LANES(), odd = ZERO_LANES(); \
        int64_t b = 0; \
        for (; b + 1 < blocks; b += 2) { \
            if (!(b & 3)) PREFETCH(qr + b * 16 + AHEAD); \
            if (!(b & 15)) { PREFETCH(sr + b + SCALES_AHEAD(4)); if (or_) PREFETCH(or_ + b + SCALES_AHEAD(4)); } \
            BLOCK16_INTO(even, b); \
            BLOCK16_INTO(odd, b + 1); \
        } \
        if (b < blocks) BLOCK16_INTO(even, b); \
        y[v * rows + r] = sum_lanes(ADD_LANES(even, odd)) + shift; \
    } while (0)
#define ROW6() do { \
        lanes_t even = ZERO_LANES(), odd = ZERO_LANES(); \
        for (int64_t super = 0; super < blocks / 16; super++) { \
            float scales_[16]; \
            PREFETCH(sr + super * 18 + SCALES_AHEAD(4)); \
            six_scales(sr + super * 18, scales_); \
            for (int i = 0; i < 16; i += 2) { \
                const int64_t b = super * 16 + i; \
                if (!(i & 3)) PREFETCH(qr + b * 12 + AHEAD); \
                SIX_BLOCK_INTO(even, b, scales_[i]); \
                SIX_BLOCK_INTO(odd, b + 1, scales_[i + 1]); \
            } \
        } \
        y[v * rows + r] = sum_lanes(ADD_LANES(even, odd)) + shift; \
    } while (0)
#else
/* A row in the defined order, blocks of SIZE inputs (32 or 16): WEIGHTS(b, w) writes block b's weights into w,
 * SCALE(b) is its scale. */
#define ROW_OF(SIZE, WEIGHTS, SCALE) do { \
        float acc[2][8] = {{0}}; \
        for (int64_t b = 0; b < blocks; b++) { \
            float w[SIZE], dot[8]; \
            WEIGHTS(b, w); \
            const float *xb = xv + b * (SIZE); \
            for (int l = 0; l < 8; l++) dot[l] = xb[l] * w[l]; \
            for (int k = 1; k < (SIZE) / 8; k++) \
                for (int l = 0; l < 8; l++) dot[l] = fmaf(xb[8 * k + l], w[8 * k + l], dot[l]); \
            const float s_ = SCALE(b); \
            for (int l = 0; l < 8; l++) acc[b & 1][l] = fmaf(dot[l], s_, acc[b & 1][l]); \
        } \
        float even_odd[8]; \
        for (int l = 0; l < 8; l++) even_odd[l] = acc[0][l] + acc[1][l]; \
        y[v * rows + r] = sum8(even_odd) + shift; \
    } while (0)
#define ROW(qb_of, WEIGHTS, SCALE, LINE) ROW_OF(32, WEIGHTS, SCALE)
#define INT8_16_WEIGHTS(b, w) do { for (int j = 0; j < 16; j++) w[j] = (float)qr[(b) * 16 + j]; } while (0)
#define SIX_WEIGHTS(b, w) do { \
        uint32_t high_; \
        memcpy(&high_, qr + (b) * 12 + 8, 4); \
        for (int j = 0; j < 16; j++) w[j] = six_value(qr + (b) * 12, high_, j); \
    } while (0)
#define SIX_SCALE(b) six_scale(sr, (b))
#define ROW16() ROW_OF(16, INT8_16_WEIGHTS, FLOAT_SCALE)
#define ROW6() ROW_OF(16, SIX_WEIGHTS, SIX_SCALE)
#define INT8_WEIGHTS(b, w) do { for (int j = 0; j < 32; j++) w[j] = (float)qr[(b) * 32 + j]; } while (0)
#define BF16_WEIGHTS(b, w) do { for (int j = 0; j < 32; j++) w[j] = bfloat16_to_float(qr[(b) * 32 + j]); } while (0)
#define F16_WEIGHTS(b, w) do { for (int j = 0; j < 32; j++) w[j] = half_to_float(qr[(b) * 32 + j]); } while (0)
#define NIBBLE_WEIGHTS(b, w) do { \
        for (int j = 0; j < 16; j++) { w[j] = (float)(qr[(b) * 16 + j] & 15); w[j + 16] = (float)(qr[(b) * 16 + j] >> 4); } \
    } while (0)
#endif

#define INT8_AT(b) (qr + (b) * 32)
#define NIBBLE_AT(b) (qr + (b) * 16)
#define WIDE_AT(b) ((const char *)(qr + (b) * 32))
#define FLOAT_SCALE(b) (sr[b])
#define ONE_SCALE(b) 1.0f
#define HALF_SCALE(b) half_to_float(sr[b])

/* The body of every product: each row of each vector, in the order defined at the top. QT and ST are the types
 * of q and of the scales and offsets (HALF: float16 ones), ROW_BYTES the bytes of q a row, SIZE the inputs a
 * block. offset NULL: every offset is zero (symmetric blocks, as GGUF's Q8_0 and Q6_K): the shift is 0 and the
 * offsets are never read (the memory a token reads is the weights and scales alone). */
#define MATVEC(QT, ST, HALF, ROW_BYTES, SIZE, ROW_STATEMENT) do { \
        const int64_t blocks = cols / (SIZE); \
        if (offset) block_sums(x, vectors, cols, (SIZE), xsum); \
        _Pragma("omp parallel for num_threads(threads) schedule(static)") \
        for (int64_t r = 0; r < rows; r++) { \
            const QT *qr = q + r * (ROW_BYTES); \
            const ST *sr = scale + r * blocks, *or_ = offset ? offset + r * blocks : 0; \
            (void)sr; /* (16-bit floats: no scales read) */ \
            for (int64_t v = 0; v < vectors; v++) { \
                const float *xv = x + v * cols; \
                const float *xs = xsum + v * blocks; \
                const float shift = !or_ ? 0.0f : (HALF) ? shift_of(0, (const uint16_t *)or_, xs, blocks) \
                                                         : shift_of((const float *)or_, 0, xs, blocks); \
                ROW_STATEMENT; \
            } \
        } \
    } while (0)

void packed_matvec(const float *x, int64_t vectors, const int8_t *q, const float *scale, const float *offset,
                   int64_t rows, int64_t cols, float *xsum, float *y, int threads) {
    MATVEC(int8_t, float, 0, cols, 32, ROW(INT8_AT, INT8_WEIGHTS, FLOAT_SCALE, 2));
}

void packed4_matvec(const float *x, int64_t vectors, const uint8_t *q, const uint16_t *scale, const uint16_t *offset,
                    int64_t rows, int64_t cols, float *xsum, float *y, int threads) {
    MATVEC(uint8_t, uint16_t, 1, cols / 2, 32, ROW(NIBBLE_AT, NIBBLE_WEIGHTS, HALF_SCALE, 4));
}

void packed4f_matvec(const float *x, int64_t vectors, const uint8_t *q, const float *scale, const float *offset,
                     int64_t rows, int64_t cols, float *xsum, float *y, int threads) {
    MATVEC(uint8_t, float, 0, cols / 2, 32, ROW(NIBBLE_AT, NIBBLE_WEIGHTS, FLOAT_SCALE, 4));
}

void packed16_matvec(const float *x, int64_t vectors, const int8_t *q, const float *scale, const float *offset,
                     int64_t rows, int64_t cols, float *xsum, float *y, int threads) {
    MATVEC(int8_t, float, 0, cols, 16, ROW16());
}

/* 6-bit values (see the top of this file): q [rows, cols / 16, 12 bytes], scale [rows, cols / 256, 18 bytes]; the
 * offsets are all zero (`offset` is not read). sr is the row's super-block bytes. */
void packed6_matvec(const float *x, int64_t vectors, const uint8_t *q, const uint8_t *scale, const float *offset,
                    int64_t rows, int64_t cols, float *xsum, float *y, int threads) {
    const int64_t row_scale_bytes = cols / 256 * 18;
    (void)offset;
    const int64_t blocks = cols / 16;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const uint8_t *qr = q + r * (cols / 16 * 12);
        const uint8_t *sr = scale + r * row_scale_bytes;
        for (int64_t v = 0; v < vectors; v++) {
            const float *xv = x + v * cols;
            const float shift = 0.0f;
            ROW6();
        }
    }
    (void)xsum;
}

/* w = (value - 32) * (d * sub-scale) + 0, as the int8 form of 16-input blocks unpacks its weights. */
void packed6_unpack(const uint8_t *q, const uint8_t *scale, const float *offset, int64_t rows, int64_t cols,
                    float *out, int threads) {
    (void)offset;
    const int64_t blocks = cols / 16;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const uint8_t *qr = q + r * (blocks * 12), *sr = scale + r * (cols / 256 * 18);
        for (int64_t b = 0; b < blocks; b++) {
            const uint8_t *qb = qr + b * 12;
            uint32_t high;
            memcpy(&high, qb + 8, 4);
            const float s = six_scale(sr, b);
            for (int j = 0; j < 16; j++) {
                const float product = six_value(qb, high, j) * s;
                out[r * cols + b * 16 + j] = product + 0.0f;
            }
        }
    }
}

/* 16-bit float weights: `scale` is never read (any address), `offset` must be NULL. A block is a cache line. */
void wide_bf16_matvec(const float *x, int64_t vectors, const uint16_t *q, const float *scale, const float *offset,
                      int64_t rows, int64_t cols, float *xsum, float *y, int threads) {
    MATVEC(uint16_t, float, 0, cols, 32, ROW(WIDE_AT, BF16_WEIGHTS, ONE_SCALE, 1));
}

void wide_f16_matvec(const float *x, int64_t vectors, const uint16_t *q, const float *scale, const float *offset,
                     int64_t rows, int64_t cols, float *xsum, float *y, int threads) {
    MATVEC(uint16_t, float, 0, cols, 32, ROW(WIDE_AT, F16_WEIGHTS, ONE_SCALE, 1));
}

/* w[r, c] = q[r, c] * scale[r, c / 32] + offset[r, c / 32]: the float32 weight, for a prompt's matrix product.
 * Two roundings (a product, then a sum: no fused multiply-add), as quant.unpack computes it; offset NULL: every
 * offset is zero (0 is still added, as to a stored zero). UNPACK_BLOCK(wb, WEIGHTS,
 * b, s, o) writes block b's 32 weights at wb. */
#if VECTORS
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

/* The body of the unpacking of 32-input blocks: QT the type of q, ROW_BYTES its bytes a row, VALUE what makes a
 * stored scale or offset a float. */
#define AS_IS(v) (v)
#define UNPACK(QT, ROW_BYTES, WEIGHTS, VALUE) do { \
        const int64_t blocks = cols / 32; \
        _Pragma("omp parallel for num_threads(threads) schedule(static)") \
        for (int64_t r = 0; r < rows; r++) { \
            const QT *qr = q + r * (ROW_BYTES); \
            for (int64_t b = 0; b < blocks; b++) \
                UNPACK_BLOCK(out + r * cols + b * 32, WEIGHTS, b, VALUE(scale[r * blocks + b]), \
                             offset ? VALUE(offset[r * blocks + b]) : 0.0f); \
        } \
    } while (0)

void packed_unpack(const int8_t *q, const float *scale, const float *offset, int64_t rows, int64_t cols, float *out,
                   int threads) {
    UNPACK(int8_t, cols, INT8_WEIGHTS, AS_IS);
}

void packed4_unpack(const uint8_t *q, const uint16_t *scale, const uint16_t *offset, int64_t rows, int64_t cols,
                    float *out, int threads) {
    UNPACK(uint8_t, cols / 2, NIBBLE_WEIGHTS, half_to_float);
}

void packed4f_unpack(const uint8_t *q, const float *scale, const float *offset, int64_t rows, int64_t cols,
                     float *out, int threads) {
    UNPACK(uint8_t, cols / 2, NIBBLE_WEIGHTS, AS_IS);
}

/* The same for 16-input blocks: w[r, c] = q[r, c] * scale[r, c / 16] + offset[r, c / 16]. */
void packed16_unpack(const int8_t *q, const float *scale, const float *offset, int64_t rows, int64_t cols, float *out,
                     int threads) {
    const int64_t blocks = cols / 16;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++)
        for (int64_t b = 0; b < blocks; b++) {
            const float s = scale[r * blocks + b], o = offset ? offset[r * blocks + b] : 0.0f;
            for (int j = 0; j < 16; j++) {
                const float product = (float)q[r * cols + b * 16 + j] * s;
                out[r * cols + b * 16 + j] = product + o;
            }
        }
}

/* The float32 weight of 16-bit float ones: each widened, exactly. */
#define WIDEN(TO_FLOAT) do { \
        _Pragma("omp parallel for num_threads(threads) schedule(static)") \
        for (int64_t r = 0; r < rows; r++) \
            for (int64_t c = 0; c < cols; c++) out[r * cols + c] = TO_FLOAT(q[r * cols + c]); \
    } while (0)

void wide_bf16_unpack(const uint16_t *q, const float *scale, const float *offset, int64_t rows, int64_t cols,
                      float *out, int threads) {
    WIDEN(bfloat16_to_float);
}

void wide_f16_unpack(const uint16_t *q, const float *scale, const float *offset, int64_t rows, int64_t cols,
                     float *out, int threads) {
    WIDEN(half_to_float);
}

/* ---- One token through a Llama-family decoder whose matrices are all packed (kvchat/weights/direct.py) ----
 * The layer as transformers' LlamaDecoderLayer computes it: x += o(attention(rope(q), rope(k), v)) over the cache,
 * then x += down(silu(gate) * up), each after an RMS norm (Qwen2: q, k and v with biases; Qwen3: each query and
 * key head RMS-normed before its rotation); the new token's key and value rows are written at slot
 * n of the layer's cache (in its KV form) before it attends over slots 0..n (read back from that form). Grouped-query heads: query head h reads kv head
 * h / (heads / kv_heads), as transformers' repeat_kv. */

typedef struct {
    const void *q, *scale, *offset;  /* a packing in one of the forms (the top of this file); offset NULL: all zero */
    int64_t rows, cols;
    int64_t form;  /* one of the MAT_* forms */
} Mat;

enum { MAT_INT8, MAT_NIBBLES_HALF, MAT_NIBBLES_FLOAT, MAT_INT8_16, MAT_BFLOAT16, MAT_FLOAT16, MAT_SIX };

/* One side (keys or values) of a layer's cache, rows of head_dim values in a KV form (kvchat/cache/kv_forms.py):
 * FORM_FLOAT32 as computed, FORM_FLOAT16 / FORM_BFLOAT16 rounded to that type, FORM_Q8 int8 values with a float16
 * scale a block, FORM_Q4 4-bit values two a byte (even index in the low half) with a float16 scale and offset a
 * block. Each part is [kv_heads, capacity, width of the part]: kv head g, slot t of `data` at
 * (g * capacity + t) * (its width), of `scale` and `offset` at (g * capacity + t) * (head_dim / block). */
enum { FORM_FLOAT32, FORM_FLOAT16, FORM_BFLOAT16, FORM_Q8, FORM_Q4 };

typedef struct {
    int64_t form, block, capacity;
    void *data;
    uint16_t *scale, *offset;
} Side;

typedef struct {
    const float *attn_norm, *mlp_norm;  /* [hidden] */
    Mat q, k, v, o, gate, up, down;
    Side keys, values;
    const float *q_bias, *k_bias, *v_bias;  /* [heads * head_dim], [kv_heads * head_dim] twice; or NULL */
    const float *q_norm, *k_norm;  /* [head_dim], each head's RMS norm before its rotation; or NULL */
} StepLayer;

typedef struct {
    int64_t layers, hidden, heads, kv_heads, head_dim, intermediate;
    float eps, scaling;
    const StepLayer *layer;
    const float *final_norm;  /* [hidden] */
    Mat head;  /* [vocab, hidden] */
} StepModel;

static void product(const Mat *m, const float *x, float *xsum, float *y, int threads) {
    switch (m->form) {
    case MAT_NIBBLES_HALF:
        packed4_matvec(x, 1, (const uint8_t *)m->q, (const uint16_t *)m->scale, (const uint16_t *)m->offset, m->rows,
                       m->cols, xsum, y, threads);
        break;
    case MAT_NIBBLES_FLOAT:
        packed4f_matvec(x, 1, (const uint8_t *)m->q, (const float *)m->scale, (const float *)m->offset, m->rows,
                        m->cols, xsum, y, threads);
        break;
    case MAT_SIX:
        packed6_matvec(x, 1, (const uint8_t *)m->q, (const uint8_t *)m->scale, 0, m->rows, m->cols, xsum, y, threads);
        break;
    case MAT_BFLOAT16:
        wide_bf16_matvec(x, 1, (const uint16_t *)m->q, (const float *)m->scale, 0, m->rows, m->cols, xsum, y, threads);
        break;
    case MAT_FLOAT16:
        wide_f16_matvec(x, 1, (const uint16_t *)m->q, (const float *)m->scale, 0, m->rows, m->cols, xsum, y, threads);
        break;
    case MAT_INT8_16:
        packed16_matvec(x, 1, (const int8_t *)m->q, (const float *)m->scale, (const float *)m->offset, m->rows,
                        m->cols, xsum, y, threads);
        break;
    default:
        packed_matvec(x, 1, (const int8_t *)m->q, (const float *)m->scale, (const float *)m->offset, m->rows,
                      m->cols, xsum, y, threads);
    }
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
    if (n % 8 == 0) {
#if VECTORS
        __m256 acc = _mm256_setzero_ps();
        for (int64_t i = 0; i < n; i += 8) acc = _mm256_add_ps(acc, _mm256_mul_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i)));
        return sum_lanes(acc);
#else
        float acc[8] = {0};
        for (int64_t i = 0; i < n; i += 8)
            for (int l = 0; l < 8; l++) { float p = a[i + l] * b[i + l]; acc[l] = acc[l] + p; }
        return sum8(acc);
#endif
    }
    float s = 0.0f;
    for (int64_t i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}

static uint16_t float_to_half(float f) {  /* round to nearest, ties to even, as torch's .half() (NaN: 0x7e00) */
    uint32_t bits;
    memcpy(&bits, &f, 4);
    const uint32_t sign = (bits >> 16) & 0x8000, magnitude = bits & 0x7fffffffu;
    if (magnitude > 0x7f800000u) return (uint16_t)(sign | 0x7e00);  /* NaN */
    if (magnitude >= 0x477ff000u) return (uint16_t)(sign | 0x7c00);  /* rounds past 65504: infinity */
    if (magnitude < 0x38800000u) {  /* a subnormal half (or zero): in units of 2^-24, rounded to even */
        if (magnitude < 0x33000000u) return (uint16_t)sign;
        const uint32_t mantissa = (magnitude & 0x7fffffu) | 0x800000u, shift = 126 - (magnitude >> 23);
        uint32_t half = mantissa >> shift;
        const uint32_t rest = mantissa & ((1u << shift) - 1), midway = 1u << (shift - 1);
        if (rest > midway || (rest == midway && (half & 1))) half++;
        return (uint16_t)(sign | half);
    }
    uint32_t half = ((magnitude >> 13) - (112u << 10));
    const uint32_t rest = magnitude & 0x1fffu;
    if (rest > 0x1000u || (rest == 0x1000u && (half & 1))) half++;
    return (uint16_t)(sign | half);
}

static uint16_t float_to_bfloat16(float f) {  /* round to nearest, ties to even, as torch's .bfloat16() */
    uint32_t bits;
    memcpy(&bits, &f, 4);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    bits += 0x7fffu + ((bits >> 16) & 1);
    return (uint16_t)(bits >> 16);
}

/* Write row x [dim] at slot t of kv head g, encoded as kvchat.cache.kv_forms.KVForm.encode encodes it. */
static void put_row(const Side *side, int64_t g, int64_t t, const float *x, int64_t dim) {
    const int64_t row = g * side->capacity + t, block = side->block, blocks = dim / block;
    if (side->form == FORM_FLOAT32) {
        memcpy((float *)side->data + row * dim, x, sizeof(float) * (size_t)dim);
    } else if (side->form == FORM_FLOAT16 || side->form == FORM_BFLOAT16) {
        uint16_t *out = (uint16_t *)side->data + row * dim;
        for (int64_t i = 0; i < dim; i++)
            out[i] = side->form == FORM_FLOAT16 ? float_to_half(x[i]) : float_to_bfloat16(x[i]);
    } else if (side->form == FORM_Q8) {
        int8_t *q = (int8_t *)side->data + row * dim;
        for (int64_t b = 0; b < blocks; b++) {
            const float *xb = x + b * block;
            float top = 0.0f;
            for (int64_t j = 0; j < block; j++) top = fmaxf(top, fabsf(xb[j]));
            const float scale = top / 127.0f, divisor = fmaxf(scale, 1e-30f);
            for (int64_t j = 0; j < block; j++) q[b * block + j] = (int8_t)nearbyintf(xb[j] / divisor);
            side->scale[row * blocks + b] = float_to_half(scale);
        }
    } else {
        uint8_t *q = (uint8_t *)side->data + row * ((dim + 1) / 2);
        memset(q, 0, (size_t)((dim + 1) / 2));
        for (int64_t b = 0; b < blocks; b++) {
            const float *xb = x + b * block;
            float low = xb[0], high = xb[0];
            for (int64_t j = 1; j < block; j++) { low = fminf(low, xb[j]); high = fmaxf(high, xb[j]); }
            const float scale = (high - low) / 15.0f, divisor = fmaxf(scale, 1e-30f);
            for (int64_t j = 0; j < block; j++) {
                float level = nearbyintf((xb[j] - low) / divisor);
                level = level < 0.0f ? 0.0f : level > 15.0f ? 15.0f : level;
                const int64_t i = b * block + j;
                q[i / 2] |= (uint8_t)((uint8_t)level << (4 * (i & 1)));
            }
            side->scale[row * blocks + b] = float_to_half(scale);
            side->offset[row * blocks + b] = float_to_half(low);
        }
    }
}

/* Values [lo, hi) of row t of kv head g as float32, as KVForm.decode gives them (lo and hi on block bounds): a
 * pointer into the cache (float32), or `tmp` [hi - lo]. */
static const float *get_row(const Side *side, int64_t g, int64_t t, int64_t dim, int64_t lo, int64_t hi,
                            float *tmp) {
    const int64_t row = g * side->capacity + t, block = side->block, blocks = dim / block;
    if (side->form == FORM_FLOAT32) return (const float *)side->data + row * dim + lo;
    if (side->form == FORM_FLOAT16 || side->form == FORM_BFLOAT16) {
        const uint16_t *in = (const uint16_t *)side->data + row * dim;
        for (int64_t i = lo; i < hi; i++)
            tmp[i - lo] = side->form == FORM_FLOAT16 ? half_to_float(in[i]) : bfloat16_to_float(in[i]);
    } else if (side->form == FORM_Q8) {
        const int8_t *q = (const int8_t *)side->data + row * dim;
        for (int64_t b = lo / block; b < hi / block; b++) {
            const float scale = half_to_float(side->scale[row * blocks + b]);
            float *out = tmp + b * block - lo;
            for (int64_t j = 0; j < block; j++) out[j] = (float)q[b * block + j] * scale;
        }
    } else {
        const uint8_t *q = (const uint8_t *)side->data + row * ((dim + 1) / 2);
        for (int64_t b = lo / block; b < hi / block; b++) {  /* (a block's length is even: 32, or 16, 8, 4, 2) */
            const float scale = half_to_float(side->scale[row * blocks + b]);
            const float offset = half_to_float(side->offset[row * blocks + b]);
            const uint8_t *qb = q + b * block / 2;
            float *out = tmp + b * block - lo;
            for (int64_t j = 0; j < block / 2; j++) {
                float low = (float)(qb[j] & 15) * scale, high = (float)(qb[j] >> 4) * scale;
                out[2 * j] = low + offset;
                out[2 * j + 1] = high + offset;
            }
        }
    }
    return tmp;
}

/* s[0..n] = softmax(s[0..n]), in place. */
static void softmax(float *s, int64_t n) {
    float top = -INFINITY, total = 0.0f;
    for (int64_t t = 0; t <= n; t++) if (s[t] > top) top = s[t];
    for (int64_t t = 0; t <= n; t++) { s[t] = expf(s[t] - top); total += s[t]; }
    const float inverse = 1.0f / total;
    for (int64_t t = 0; t <= n; t++) s[t] *= inverse;
}

/* One query head over slots 0..n of float32 keys and values [slots, dim] (the cache as computed): the same sums,
 * in the same order, as `attend` gives that head; with nothing to decode, heads split over the threads best. */
static void attend_head(const float *q, const float *keys, const float *values, int64_t n, int64_t dim,
                        float scaling, float *s, float *out) {
    for (int64_t t = 0; t <= n; t++) s[t] = dot(q, keys + t * dim, dim) * scaling;
    softmax(s, n);
    for (int64_t i = 0; i < dim; i++) out[i] = 0.0f;
    for (int64_t t = 0; t <= n; t++) {
        const float p = s[t], *v = values + t * dim;
        for (int64_t i = 0; i < dim; i++) { float term = p * v[i]; out[i] += term; }
    }
}

#define MAX_HEAD_DIM 512  /* (kvchat/weights/direct.py refuses wider heads) */

/* Every query head over slots 0..n of its kv head (head h reads kv head h / groups): softmax(q.k * scaling)
 * weighted sum of values, q and out [heads, dim], scores [heads, n + 1]. Three passes, each split evenly over
 * the threads (kv heads are few: 3 on 2 threads would leave one idle a third of the time): the scores by
 * ranges of slots (each key row read and decoded once for its heads), the softmax by head, the weighted sums by
 * kv head and half of the values (each value row decoded once a half). Each head's sums run in slot order. */
static void attend(const float *q, const Side *keys, const Side *values, int64_t heads, int64_t kv_heads, int64_t n,
                   int64_t dim, float scaling, float *scores, float *out, int threads) {
    const int64_t length = n + 1, groups = heads / kv_heads, ranges = 4 * (int64_t)threads;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t c = 0; c < ranges; c++) {
        float tmp[MAX_HEAD_DIM];
        for (int64_t g = 0; g < kv_heads; g++)
            for (int64_t t = c * length / ranges; t < (c + 1) * length / ranges; t++) {
                const float *k = get_row(keys, g, t, dim, 0, dim, tmp);
                for (int64_t r = 0; r < groups; r++) {
                    const int64_t head = g * groups + r;
                    scores[head * length + t] = dot(q + head * dim, k, dim) * scaling;
                }
            }
    }
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t head = 0; head < heads; head++) softmax(scores + head * length, n);
    const int64_t halves = (dim / 2) % values->block == 0 ? 2 : 1, width = dim / halves;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t task = 0; task < kv_heads * halves; task++) {
        float tmp[MAX_HEAD_DIM];
        const int64_t g = task / halves, lo = (task % halves) * width;
        for (int64_t r = 0; r < groups; r++)
            for (int64_t i = 0; i < width; i++) out[(g * groups + r) * dim + lo + i] = 0.0f;
        for (int64_t t = 0; t <= n; t++) {
            const float *v = get_row(values, g, t, dim, lo, lo + width, tmp);
            for (int64_t r = 0; r < groups; r++) {
                const int64_t head = g * groups + r;
                const float p = scores[head * length + t];
                float *o = out + head * dim + lo;
                for (int64_t i = 0; i < width; i++) { float term = p * v[i]; o[i] += term; }
            }
        }
    }
}

/* x [hidden]: the token's embedding in, overwritten; logits [vocab] out. n: the tokens the cache holds before this
 * one (it goes to slot n); cos and sin [head_dim] at position n. Returns 0, or -1 when scratch memory ran out. */
int llama_step(const StepModel *m, float *x, int64_t n, const float *cos_, const float *sin_, float *logits,
               int threads) {
    const int64_t hidden = m->hidden, dim = m->head_dim, heads = m->heads, kv_heads = m->kv_heads;
    const int64_t inter = m->intermediate;
    int64_t widest = hidden > inter ? hidden : inter;
    if (heads * dim > widest) widest = heads * dim;
    float *h = malloc(sizeof(float) * (size_t)(hidden + (heads + 2 * kv_heads) * dim + heads * dim + 2 * inter
                                                + widest / 16 + 1 + heads * (n + 1)));
    if (!h) return -1;
    float *qkv = h + hidden, *att = qkv + (heads + 2 * kv_heads) * dim, *gate_up = att + heads * dim;
    float *xsum = gate_up + 2 * inter, *scores = xsum + widest / 16 + 1;
    for (int64_t l = 0; l < m->layers; l++) {
        const StepLayer *L = &m->layer[l];
        rms_norm(x, L->attn_norm, hidden, m->eps, h);
        float *q = qkv, *k = qkv + heads * dim, *v = k + kv_heads * dim;
        product(&L->q, h, xsum, q, threads);
        product(&L->k, h, xsum, k, threads);
        product(&L->v, h, xsum, v, threads);
        const float *biases[3] = {L->q_bias, L->k_bias, L->v_bias};
        float *outputs[3] = {q, k, v};
        const int64_t widths[3] = {heads * dim, kv_heads * dim, kv_heads * dim};
        for (int i = 0; i < 3; i++)
            if (biases[i]) for (int64_t j = 0; j < widths[i]; j++) outputs[i][j] += biases[i][j];
        for (int64_t g = 0; g < heads + kv_heads; g++) {
            const float *norm = g < heads ? L->q_norm : L->k_norm;
            if (norm) {
                memcpy(att, qkv + g * dim, sizeof(float) * (size_t)dim);  /* (att is free until the attention) */
                rms_norm(att, norm, dim, m->eps, qkv + g * dim);
            }
            rope(qkv + g * dim, cos_, sin_, dim);
        }
        for (int64_t g = 0; g < kv_heads; g++) {
            put_row(&L->keys, g, n, k + g * dim, dim);
            put_row(&L->values, g, n, v + g * dim, dim);
        }
        if (L->keys.form == FORM_FLOAT32 && L->values.form == FORM_FLOAT32) {
            const int64_t groups = heads / kv_heads;
            #pragma omp parallel for num_threads(threads) schedule(static)
            for (int64_t head = 0; head < heads; head++) {
                const int64_t g = head / groups;
                attend_head(q + head * dim, (const float *)L->keys.data + g * L->keys.capacity * dim,
                            (const float *)L->values.data + g * L->values.capacity * dim, n, dim, m->scaling,
                            scores + head * (n + 1), att + head * dim);
            }
        } else {
            attend(q, &L->keys, &L->values, heads, kv_heads, n, dim, m->scaling, scores, att, threads);
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
