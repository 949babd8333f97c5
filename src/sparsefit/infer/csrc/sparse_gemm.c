/* y = x W^T + b with W kept compressed: a bitmask per row plus the row's kept values, packed.
 *
 * Decoding one token reads every weight once, so its time is bound by the bytes read: a bitmask (1 bit per
 * weight) and the kept values (4 bytes each in float32, 2 in bf16, 1 in int8) instead of 4 bytes per weight.
 * The mask of row i is ceil(in / 8) bytes, little bit order (bit t of byte c is column 8c + t), as
 * sparsefit's compressed export stores it; row i's values start at row_start[i] and the value buffer has 16
 * entries of padding at its end (the vector paths load 8 or 16 values at a time and mask what they do not need).
 *
 * x is [batch, in] and y is [batch, out], both float32 and row-major. Each byte of the mask becomes one
 * 8-lane vector of W's row: its popcount(byte) values are loaded at once and moved to their columns with a
 * permutation from a 256-entry table (AVX2 has no expand instruction; AVX-512 has, and takes 16 columns at a
 * time), the lanes of pruned weights zeroed,
 * then multiplied with the 8 matching entries of every input row of the batch: the values are read once for
 * the whole batch. Rows are split over OpenMP threads (torch's own OpenMP runtime when torch is loaded).
 *
 * int8 values carry one float32 scale per row (scales[i]); float32 and bf16 ones take scales = NULL.
 */
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

enum { VALUES_F32 = 0, VALUES_BF16 = 1, VALUES_I8 = 2 };

/* ---- portable path: any x86 or other CPU, any width ---- */

static inline float value_at(const void *values, int kind, int64_t k) {
    if (kind == VALUES_F32) return ((const float *)values)[k];
    if (kind == VALUES_BF16) {
        uint32_t bits = (uint32_t)((const uint16_t *)values)[k] << 16;
        float out;
        memcpy(&out, &bits, sizeof out);
        return out;
    }
    return (float)((const int8_t *)values)[k];
}

static void rows_portable(const uint8_t *mask, const void *values, int kind, const int64_t *row_start,
                          const float *scales, const float *x, const float *bias, float *y, int64_t out,
                          int64_t in, int64_t batch, int64_t first, int64_t last) {
    const int64_t nbytes = (in + 7) / 8;
    for (int64_t i = first; i < last; i++) {
        const uint8_t *row = mask + i * nbytes;
        for (int64_t b = 0; b < batch; b++) {
            const float *xb = x + b * in;
            int64_t k = row_start[i];
            float acc = 0.0f;
            for (int64_t c = 0; c < nbytes; c++) {
                unsigned bits = row[c];
                while (bits) {
                    int t = __builtin_ctz(bits);
                    acc += value_at(values, kind, k++) * xb[8 * c + t];
                    bits &= bits - 1;
                }
            }
            if (scales) acc *= scales[i];
            y[b * out + i] = acc + (bias ? bias[i] : 0.0f);
        }
    }
}

/* ---- AVX2 + FMA path (x86-64), chosen at run time ---- */
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define AVX2 __attribute__((target("avx2,fma")))

static int32_t PERMUTE[256][8]; /* lane t of byte m takes packed value number rank(t) */
static int32_t KEEP[256][8];    /* all ones where bit t of m is set */

static void build_tables(void) {
    for (int m = 0; m < 256; m++) {
        int rank = 0;
        for (int t = 0; t < 8; t++) {
            int set = (m >> t) & 1;
            PERMUTE[m][t] = set ? rank : 0;
            KEEP[m][t] = set ? -1 : 0;
            rank += set;
        }
    }
}

AVX2 static inline __m256 expand(const void *values, int kind, int64_t k, unsigned m) {
    __m256 v;
    if (kind == VALUES_F32) {
        v = _mm256_loadu_ps((const float *)values + k);
    } else if (kind == VALUES_BF16) {
        __m128i half = _mm_loadu_si128((const __m128i *)((const uint16_t *)values + k));
        v = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16));
    } else {
        __m128i bytes = _mm_loadl_epi64((const __m128i *)((const int8_t *)values + k));
        v = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes));
    }
    v = _mm256_permutevar8x32_ps(v, _mm256_loadu_si256((const __m256i *)PERMUTE[m]));
    return _mm256_and_ps(v, _mm256_castsi256_ps(_mm256_loadu_si256((const __m256i *)KEEP[m])));
}

AVX2 static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* One row against up to 4 input rows (NB, a constant after inlining): the row's vector is expanded once. */
AVX2 __attribute__((always_inline)) static inline void row_avx2(const uint8_t *row, int64_t nbytes,
                                                                const void *values, int kind, int64_t k,
                                                                const float *x, int64_t in, const int NB,
                                                                float *sums) {
    __m256 acc[4][2];
    for (int r = 0; r < 4; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    int64_t c = 0;
    for (; c + 1 < nbytes; c += 2) { /* two accumulators: the FMA latency, not its throughput, bounds one */
        unsigned m0 = row[c], m1 = row[c + 1];
        __m256 w0 = expand(values, kind, k, m0);
        k += __builtin_popcount(m0);
        __m256 w1 = expand(values, kind, k, m1);
        k += __builtin_popcount(m1);
        for (int r = 0; r < NB; r++) {
            acc[r][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + r * in + 8 * c), acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + r * in + 8 * c + 8), acc[r][1]);
        }
    }
    for (; c < nbytes; c++) {
        unsigned m = row[c];
        __m256 w = expand(values, kind, k, m);
        k += __builtin_popcount(m);
        for (int r = 0; r < NB; r++) acc[r][0] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + r * in + 8 * c), acc[r][0]);
    }
    for (int r = 0; r < NB; r++) sums[r] = hsum(_mm256_add_ps(acc[r][0], acc[r][1]));
}

AVX2 static void rows_avx2(const uint8_t *mask, const void *values, int kind, const int64_t *row_start,
                           const float *scales, const float *x, const float *bias, float *y, int64_t out,
                           int64_t in, int64_t batch, int64_t first, int64_t last) {
    const int64_t nbytes = in / 8; /* callers take this path only when in % 8 == 0 */
    float sums[4];
    for (int64_t i = first; i < last; i++) {
        const uint8_t *row = mask + i * nbytes;
        const float scale = scales ? scales[i] : 1.0f, add = bias ? bias[i] : 0.0f;
        for (int64_t b = 0; b < batch; b += 4) {
            int64_t nb = batch - b < 4 ? batch - b : 4;
            const float *xb = x + b * in;
            if (nb == 4) row_avx2(row, nbytes, values, kind, row_start[i], xb, in, 4, sums);
            else if (nb == 3) row_avx2(row, nbytes, values, kind, row_start[i], xb, in, 3, sums);
            else if (nb == 2) row_avx2(row, nbytes, values, kind, row_start[i], xb, in, 2, sums);
            else row_avx2(row, nbytes, values, kind, row_start[i], xb, in, 1, sums);
            for (int64_t r = 0; r < nb; r++) y[(b + r) * out + i] = sums[r] * scale + add;
        }
    }
}

/* ---- AVX-512F path: float32 values and widths that are a multiple of 16 (bf16 and int8 take AVX2) ---- */
#define AVX512 __attribute__((target("avx512f")))

/* Two mask bytes are one 16-bit lane mask: byte 2c holds columns 16c..16c+7, byte 2c+1 the next 8, and a
 * little-endian 16-bit read of them puts column 16c + t at bit t. The expand instruction moves the popcount
 * values loaded (16, the buffer's padding covers the over-read) to the set lanes and zeroes the others. */
AVX512 __attribute__((always_inline)) static inline void row_avx512(const uint8_t *row, int64_t nwords,
                                                                    const float *values, int64_t k,
                                                                    const float *x, int64_t in, const int NB,
                                                                    float *sums) {
    __m512 acc[4][2];
    for (int r = 0; r < 4; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    int64_t c = 0;
    for (; c + 1 < nwords; c += 2) {
        /* Without it, on an AMD EPYC with AVX-512, this path ran 1.7x slower than the AVX2 one on weights out of
         * cache (9.0 against 5.5 ms for 40 MB) though faster in cache; with it, 3.6 ms (the distance, 512 to
         * 2048 bytes, makes no difference; the AVX2 path gains nothing from it). */
        _mm_prefetch((const char *)(values + k) + 1024, _MM_HINT_T0);
        uint16_t m0, m1;
        memcpy(&m0, row + 2 * c, 2);
        memcpy(&m1, row + 2 * c + 2, 2);
        __m512 w0 = _mm512_maskz_expand_ps(m0, _mm512_loadu_ps(values + k));
        k += __builtin_popcount(m0);
        __m512 w1 = _mm512_maskz_expand_ps(m1, _mm512_loadu_ps(values + k));
        k += __builtin_popcount(m1);
        for (int r = 0; r < NB; r++) {
            acc[r][0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + r * in + 16 * c), acc[r][0]);
            acc[r][1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + r * in + 16 * c + 16), acc[r][1]);
        }
    }
    for (; c < nwords; c++) {
        uint16_t m;
        memcpy(&m, row + 2 * c, 2);
        __m512 w = _mm512_maskz_expand_ps(m, _mm512_loadu_ps(values + k));
        k += __builtin_popcount(m);
        for (int r = 0; r < NB; r++) acc[r][0] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + r * in + 16 * c), acc[r][0]);
    }
    for (int r = 0; r < NB; r++) sums[r] = _mm512_reduce_add_ps(_mm512_add_ps(acc[r][0], acc[r][1]));
}

AVX512 static void rows_avx512(const uint8_t *mask, const float *values, const int64_t *row_start,
                               const float *x, const float *bias, float *y, int64_t out, int64_t in, int64_t batch,
                               int64_t first, int64_t last) {
    const int64_t nbytes = in / 8, nwords = in / 16; /* callers take this path only when in % 16 == 0 */
    float sums[4];
    for (int64_t i = first; i < last; i++) {
        const uint8_t *row = mask + i * nbytes;
        const float add = bias ? bias[i] : 0.0f;
        for (int64_t b = 0; b < batch; b += 4) {
            int64_t nb = batch - b < 4 ? batch - b : 4;
            const float *xb = x + b * in;
            if (nb == 4) row_avx512(row, nwords, values, row_start[i], xb, in, 4, sums);
            else if (nb == 3) row_avx512(row, nwords, values, row_start[i], xb, in, 3, sums);
            else if (nb == 2) row_avx512(row, nwords, values, row_start[i], xb, in, 2, sums);
            else row_avx512(row, nwords, values, row_start[i], xb, in, 1, sums);
            for (int64_t r = 0; r < nb; r++) y[(b + r) * out + i] = sums[r] + add;
        }
    }
}

AVX2 static void unpack_avx2(const uint8_t *mask, const void *values, int kind, const int64_t *row_start,
                             const float *scales, float *dense, int64_t in, int64_t first, int64_t last) {
    const int64_t nbytes = in / 8;
    for (int64_t i = first; i < last; i++) {
        const uint8_t *row = mask + i * nbytes;
        const __m256 scale = _mm256_set1_ps(scales ? scales[i] : 1.0f);
        int64_t k = row_start[i];
        for (int64_t c = 0; c < nbytes; c++) {
            unsigned m = row[c];
            _mm256_storeu_ps(dense + i * in + 8 * c, _mm256_mul_ps(expand(values, kind, k, m), scale));
            k += __builtin_popcount(m);
        }
    }
}
#endif

static void unpack_portable(const uint8_t *mask, const void *values, int kind, const int64_t *row_start,
                            const float *scales, float *dense, int64_t in, int64_t first, int64_t last) {
    const int64_t nbytes = (in + 7) / 8;
    for (int64_t i = first; i < last; i++) {
        const uint8_t *row = mask + i * nbytes;
        const float scale = scales ? scales[i] : 1.0f;
        float *out = dense + i * in;
        memset(out, 0, (size_t)in * sizeof(float));
        int64_t k = row_start[i];
        for (int64_t c = 0; c < nbytes; c++) {
            unsigned bits = row[c];
            while (bits) {
                int t = __builtin_ctz(bits);
                out[8 * c + t] = value_at(values, kind, k++) * scale;
                bits &= bits - 1;
            }
        }
    }
}

/* 3: AVX-512F (and AVX2 + FMA), 2: AVX2 + FMA, 0: the portable path. */
int sf_isa(void) {
#if defined(__x86_64__) || defined(_M_X64)
    __builtin_cpu_init();
    int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    if (avx2 && __builtin_cpu_supports("avx512f")) return 3;
    if (avx2) return 2;
#endif
    return 0;
}

/* One call's arguments: what each chunk of rows needs (y is the output, or the dense matrix of sf_unpack). */
typedef struct {
    const uint8_t *mask;
    const void *values;
    int kind;
    const int64_t *row_start;
    const float *scales, *x, *bias;
    float *y;
    int64_t out, in, batch;
    int isa;
} Job;

/* Splits the rows into chunks over OpenMP threads and runs rows(job, first, last) on each: the one place that
 * parallelises, for the product and for the unpack. The AVX2 tables are built first (idempotent: racing first
 * calls write the same entries). */
static void for_row_chunks(const Job *job, int threads, void (*rows)(const Job *, int64_t, int64_t)) {
#if defined(__x86_64__) || defined(_M_X64)
    static int tables_built = 0;
    if (job->isa >= 2 && !tables_built) {
        build_tables();
        tables_built = 1;
    }
#endif
    const int64_t chunk = 16; /* rows per task: enough work per task, enough tasks to balance threads */
    const int64_t tasks = (job->out + chunk - 1) / chunk;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(threads > 0 ? threads : 1) if (threads > 1 && tasks > 1)
#else
    (void)threads;
#endif
    for (int64_t task = 0; task < tasks; task++) {
        int64_t first = task * chunk, last = first + chunk < job->out ? first + chunk : job->out;
        rows(job, first, last);
    }
}

static void linear_rows(const Job *j, int64_t first, int64_t last) {
#if defined(__x86_64__) || defined(_M_X64)
    if (j->isa >= 3 && j->kind == VALUES_F32 && j->in % 16 == 0 && !j->scales) {
        rows_avx512(j->mask, (const float *)j->values, j->row_start, j->x, j->bias, j->y, j->out, j->in, j->batch,
                    first, last);
        return;
    }
    if (j->isa >= 2 && j->in % 8 == 0) {
        rows_avx2(j->mask, j->values, j->kind, j->row_start, j->scales, j->x, j->bias, j->y, j->out, j->in,
                  j->batch, first, last);
        return;
    }
#endif
    rows_portable(j->mask, j->values, j->kind, j->row_start, j->scales, j->x, j->bias, j->y, j->out, j->in,
                  j->batch, first, last);
}

static void unpack_rows(const Job *j, int64_t first, int64_t last) {
#if defined(__x86_64__) || defined(_M_X64)
    if (j->isa >= 2 && j->in % 8 == 0) {
        unpack_avx2(j->mask, j->values, j->kind, j->row_start, j->scales, j->y, j->in, first, last);
        return;
    }
#endif
    unpack_portable(j->mask, j->values, j->kind, j->row_start, j->scales, j->y, j->in, first, last);
}

/* isa: what sf_isa() returned, or lower to force a path (2: AVX2, 0: portable); threads: OpenMP threads (ignored
 * without OpenMP). */
void sf_sparse_linear(const uint8_t *mask, const void *values, int kind, const int64_t *row_start,
                      const float *scales, const float *x, const float *bias, float *y, int64_t out, int64_t in,
                      int64_t batch, int isa, int threads) {
    const Job job = {mask, values, kind, row_start, scales, x, bias, y, out, in, batch, isa};
    for_row_chunks(&job, threads, linear_rows);
}

/* The weight as a dense row-major [out, in] float32 matrix (prefill multiplies it with torch's matmul). */
void sf_unpack(const uint8_t *mask, const void *values, int kind, const int64_t *row_start, const float *scales,
               float *dense, int64_t out, int64_t in, int isa, int threads) {
    const Job job = {mask, values, kind, row_start, scales, NULL, NULL, dense, out, in, 1, isa};
    for_row_chunks(&job, threads, unpack_rows);
}
