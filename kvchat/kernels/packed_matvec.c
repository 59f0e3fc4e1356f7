/* kvchat's one-token product with block-packed int8 weights, in float32 (see kvchat/quant.py).
 *
 * The weight [rows, cols] is w[r, c] = q[r, c] * scale[r, c / 32] + offset[r, c / 32], so
 *   y[v, r] = sum_b scale[r, b] * (sum_j x[v, 32b + j] * q[r, 32b + j]) + offset[r, b] * (sum_j x[v, 32b + j]).
 * Built at run time by kvchat with the machine's compiler (-O3 -march=native, OpenMP when it has it). */
#include <stdint.h>
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
/* Weights stream from memory once per token: asking for them 4 KiB ahead keeps more reads in flight than the
 * hardware prefetcher does alone (the product measured 8-15% faster on the default model's matrices). */
#define AHEAD 4096
#define PREFETCH(qb, sr, or_, b) do { \
        if (!((b) & 1)) _mm_prefetch((const char *)((qb) + AHEAD), _MM_HINT_T0); \
        if (!((b) & 15)) { _mm_prefetch((const char *)((sr) + (b) + AHEAD / 16), _MM_HINT_T0); \
                           _mm_prefetch((const char *)((or_) + (b) + AHEAD / 16), _MM_HINT_T0); } \
    } while (0)
#endif

void packed_matvec(const float *x, int64_t vectors, const int8_t *q, const float *scale, const float *offset,
                   int64_t rows, int64_t cols, float *xsum, float *y, int threads) {
    const int64_t blocks = cols / 32;
    for (int64_t v = 0; v < vectors; v++)  /* the block sums of x, shared by every row */
        for (int64_t b = 0; b < blocks; b++) {
            float s = 0.0f;
            for (int j = 0; j < 32; j++) s += x[v * cols + b * 32 + j];
            xsum[v * blocks + b] = s;
        }
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const int8_t *qr = q + r * cols;
        const float *sr = scale + r * blocks, *or_ = offset + r * blocks;
        for (int64_t v = 0; v < vectors; v++) {
            const float *xv = x + v * cols, *xs = xsum + v * blocks;
            float shift = 0.0f;
#if defined(__AVX512F__)
            __m512 acc = _mm512_setzero_ps();
            for (int64_t b = 0; b < blocks; b++) {
                const int8_t *qb = qr + b * 32;
                PREFETCH(qb, sr, or_, b);
                __m512 w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)qb)));
                __m512 w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(qb + 16))));
                __m512 dot = _mm512_fmadd_ps(_mm512_loadu_ps(xv + b * 32), w0,
                                             _mm512_mul_ps(_mm512_loadu_ps(xv + b * 32 + 16), w1));
                acc = _mm512_fmadd_ps(dot, _mm512_set1_ps(sr[b]), acc);
                shift += or_[b] * xs[b];
            }
            y[v * rows + r] = _mm512_reduce_add_ps(acc) + shift;
#elif defined(__AVX2__) && defined(__FMA__)
            __m256 acc = _mm256_setzero_ps();
            for (int64_t b = 0; b < blocks; b++) {
                const int8_t *qb = qr + b * 32;
                const float *xb = xv + b * 32;
                PREFETCH(qb, sr, or_, b);
                __m256 dot = _mm256_setzero_ps();
                for (int j = 0; j < 32; j += 8) {
                    __m256 w = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(qb + j))));
                    dot = _mm256_fmadd_ps(_mm256_loadu_ps(xb + j), w, dot);
                }
                acc = _mm256_fmadd_ps(dot, _mm256_set1_ps(sr[b]), acc);
                shift += or_[b] * xs[b];
            }
            __m128 half = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
            half = _mm_add_ps(half, _mm_movehl_ps(half, half));
            half = _mm_add_ss(half, _mm_shuffle_ps(half, half, 1));
            y[v * rows + r] = _mm_cvtss_f32(half) + shift;
#else
            float acc = 0.0f;
            for (int64_t b = 0; b < blocks; b++) {
                float lanes[8] = {0};
                for (int j = 0; j < 32; j += 8)
                    for (int l = 0; l < 8; l++) lanes[l] += xv[b * 32 + j + l] * (float)qr[b * 32 + j + l];
                float dot = 0.0f;
                for (int l = 0; l < 8; l++) dot += lanes[l];
                acc += sr[b] * dot;
                shift += or_[b] * xs[b];
            }
            y[v * rows + r] = acc + shift;
#endif
        }
    }
}

/* w[r, c] = q[r, c] * scale[r, c / 32] + offset[r, c / 32]: the float32 weight, for a prompt's matrix product. */
void packed_unpack(const int8_t *q, const float *scale, const float *offset, int64_t rows, int64_t cols, float *w,
                   int threads) {
    const int64_t blocks = cols / 32;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++)
        for (int64_t b = 0; b < blocks; b++) {
            const float s = scale[r * blocks + b], o = offset[r * blocks + b];
            const int8_t *qb = q + r * cols + b * 32;
            float *wb = w + r * cols + b * 32;
            for (int j = 0; j < 32; j++) {
                float product = (float)qb[j] * s;  /* two roundings, as quant.unpack computes it */
                wb[j] = product + o;
            }
        }
}
