/* The masked weight gradient (SDDMM), reading (tokens, features) activations where they lie.

     out[e] = sum_t lhs[t, lhs_feat[r]] * rhs[t, rhs_feat[col[e]]]   for each entry e of CSR row r

   torch.sparse.sampled_addmm wants both operands tokens-last, so the torch path first copies whole
   activations into that layout (most of its time at 1% density). Here tokens go in blocks of TB: a
   block's touched features are packed feature-major into two small fp32 buffers that stay in L2,
   and each kept entry adds a TB-long dot of two packed rows. Threads take disjoint token blocks into
   private accumulators, summed at the end. Inputs fp32 or bf16; products and sums in fp32.

   Built on first use by randmask/native.py (cc -O3 -march=native -fopenmp -shared -fPIC, or with
   pthreads where the compiler has no OpenMP); the torch path is the fallback wherever neither builds.
   The packing transposes and the dot products have AVX-512 (16-lane) and AVX2 + FMA (8-lane) forms;
   any other CPU runs the portable C, which the compiler vectorises as it can. */
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifndef TB
#define TB 64 /* tokens per block: (n_lhs + n_rhs) * TB * 4 bytes of packed buffers per thread. 32, 64
                 and 128 timed alike here; 256 packs slower (the buffers leave L2). */
#endif
#ifndef LANES
#define LANES 16 /* independent partial sums per dot: vectorises without reassociating */
#endif

/* The vector path is chosen at build time from what the compiler targets (-march=native: this CPU):
   AVX-512, else AVX2 + FMA, else the portable C below. RANDMASK_PORTABLE forces the portable path and
   RANDMASK_NO_AVX512 the AVX2 one (randmask.native's RANDMASK_NATIVE_PATH; the tests build each). */
#if defined(__AVX512F__) && !defined(RANDMASK_PORTABLE) && !defined(RANDMASK_NO_AVX512) && TB % 16 == 0 \
    && LANES == 16
#define RANDMASK_AVX512 1
#include <immintrin.h>
#elif defined(__AVX2__) && defined(__FMA__) && !defined(RANDMASK_PORTABLE) && TB % 16 == 0 && LANES == 16
#define RANDMASK_AVX2 1
#include <immintrin.h>
#endif

/* Which path this build compiled: randmask.native reports it (and the tests check the one they asked for). */
const char *randmask_sddmm_path(void) {
#if defined(RANDMASK_AVX512)
    return "avx512";
#elif defined(RANDMASK_AVX2)
    return "avx2";
#else
    return "portable";
#endif
}

typedef struct {
    const void *data;    /* (tokens, stride) row-major, fp32 or bf16 */
    int64_t stride;      /* elements between consecutive tokens */
    int bf16;
    const int64_t *feat; /* the packed features (NULL: 0 .. n-1) */
    int64_t n;
} operand_t;

typedef struct {
    operand_t lhs, rhs;
    const int32_t *col, *row_of; /* row_of[e]: the CSR row of entry e */
    int64_t nnz;
    int64_t tokens, n_blocks_begin, n_blocks_end;
    float *acc; /* (nnz,) zeroed by the caller */
    int failed;
} job_t;

static inline float bf16_to_float(uint16_t v) {
    uint32_t bits = (uint32_t)v << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

#ifdef RANDMASK_AVX512
static inline __m512 pd_lo(__m512 a, __m512 b) {
    return _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(a), _mm512_castps_pd(b)));
}
static inline __m512 pd_hi(__m512 a, __m512 b) {
    return _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(a), _mm512_castps_pd(b)));
}

/* In: r[i] = row i of a 16x16 tile. Out: r[j] = column j, rows in order. */
static inline void transpose16(__m512 r[16]) {
    __m512 t[16], q[16];
    for (int i = 0; i < 8; i++) { /* chunk c of t[2i] / t[2i+1]: columns 4c, 4c+1 / 4c+2, 4c+3 of rows 2i, 2i+1 */
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; i++) { /* chunk c of q[4i + m]: column 4c + m of rows 4i .. 4i+3 */
        q[4 * i] = pd_lo(t[4 * i], t[4 * i + 2]);
        q[4 * i + 1] = pd_hi(t[4 * i], t[4 * i + 2]);
        q[4 * i + 2] = pd_lo(t[4 * i + 1], t[4 * i + 3]);
        q[4 * i + 3] = pd_hi(t[4 * i + 1], t[4 * i + 3]);
    }
    for (int m = 0; m < 4; m++) { /* column 4c + m: chunk c of q[m], q[4+m], q[8+m], q[12+m] */
        __m512 u = _mm512_shuffle_f32x4(q[m], q[4 + m], 0x88), v = _mm512_shuffle_f32x4(q[m], q[4 + m], 0xDD);
        __m512 w = _mm512_shuffle_f32x4(q[8 + m], q[12 + m], 0x88), z = _mm512_shuffle_f32x4(q[8 + m], q[12 + m], 0xDD);
        r[m] = _mm512_shuffle_f32x4(u, w, 0x88);
        r[8 + m] = _mm512_shuffle_f32x4(u, w, 0xDD);
        r[4 + m] = _mm512_shuffle_f32x4(v, z, 0x88);
        r[12 + m] = _mm512_shuffle_f32x4(v, z, 0xDD);
    }
}

/* A full 16-token x 16-feature tile of contiguous features, transposed in registers: each store is one
   whole line of buf (the scalar loop below costs ~2 cycles per element; this, a fraction of one). */
static inline void pack_tile16(const operand_t *op, int64_t t, int64_t f0, float *out) {
    __m512 r[16];
    for (int i = 0; i < 16; i++) {
        if (op->bf16) { /* bf16 -> fp32: the 16 bits become the high half */
            __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)op->data + (t + i) * op->stride + f0));
            r[i] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
        } else {
            r[i] = _mm512_loadu_ps((const float *)op->data + (t + i) * op->stride + f0);
        }
    }
    transpose16(r);
    for (int j = 0; j < 16; j++)
        _mm512_store_ps(out + j * TB, r[j]);
}
#endif

#ifdef RANDMASK_AVX2
#ifndef PREFETCH_BYTES
#define PREFETCH_BYTES 128
#endif

/* In: r[i] = row i of an 8x8 tile. Out: r[j] = column j, rows in order (the 8-lane transpose16). */
static inline void transpose8(__m256 r[8]) {
    __m256 t[8], q[8];
    for (int i = 0; i < 4; i++) { /* per 128-bit half h of t[2i] / t[2i+1]: columns 4h, 4h+1 / 4h+2, 4h+3 of rows 2i, 2i+1 */
        t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 2; i++) { /* half h of q[4i + m]: column 4h + m of rows 4i .. 4i+3 */
        q[4 * i] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
        q[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
        q[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
        q[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
    }
    for (int m = 0; m < 4; m++) { /* column m: low halves of q[m], q[4+m]; column 4+m: their high halves */
        r[m] = _mm256_permute2f128_ps(q[m], q[4 + m], 0x20);
        r[4 + m] = _mm256_permute2f128_ps(q[m], q[4 + m], 0x31);
    }
}

/* A full 16-token x 16-feature tile as four 8x8 register transposes: each store is half a line of buf. */
static inline void pack_tile16(const operand_t *op, int64_t t, int64_t f0, float *out) {
    /* The 16 rows are 16 streams, more than this CPU's prefetcher follows: fetch each row 128 bytes
       ahead (an AVX2 EPYC, 1 thread: the kernel 1.4x faster; 64 to 256 bytes alike, 1024 slower). */
    size_t elem = op->bf16 ? 2 : 4;
    if (f0 + (int64_t)(PREFETCH_BYTES / elem) < op->n)
        for (int i = 0; i < 16; i++)
            _mm_prefetch((const char *)op->data + ((t + i) * op->stride + f0) * elem + PREFETCH_BYTES, _MM_HINT_T0);
    for (int fh = 0; fh < 16; fh += 8)
        for (int th = 0; th < 16; th += 8) {
            __m256 r[8];
            for (int i = 0; i < 8; i++) {
                int64_t at = (t + th + i) * op->stride + f0 + fh;
                if (op->bf16) { /* bf16 -> fp32: the 16 bits become the high half */
                    __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)op->data + at));
                    r[i] = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
                } else {
                    r[i] = _mm256_loadu_ps((const float *)op->data + at);
                }
            }
            transpose8(r);
            for (int j = 0; j < 8; j++)
                _mm256_store_ps(out + (fh + j) * TB + th, r[j]);
        }
}
#endif

/* buf[f * TB + t] = op[t0 + t, feat[f]] for t < nt, 0 for nt <= t < TB. In tiles of LANES tokens x
   LANES features: LANES input rows are read forward together (few enough streams to prefetch) and
   each tile writes whole 64-byte lines of buf (a TB-token sweep per feature tile would read TB rows
   at once and run slower than the memory). */
static void pack(const operand_t *op, int64_t t0, int64_t nt, int64_t tokens, float *buf) {
    size_t elem = op->bf16 ? 2 : 4;
    for (int64_t ts = 0; ts < nt; ts += LANES) {
        int64_t te = ts + LANES < nt ? ts + LANES : nt;
        for (int64_t f0 = 0; f0 < op->n; f0 += LANES) {
            int64_t f1 = f0 + LANES < op->n ? f0 + LANES : op->n;
            int64_t f_first = op->feat ? op->feat[f0] : f0;
            /* Gathered features come from DRAM in scattered lines: fetch the same columns LANES tokens
               ahead (a third faster at 0.1% density; no change for contiguous features). */
            if (op->feat)
                for (int64_t t = ts; t < te && t0 + t + LANES < tokens; t++)
                    __builtin_prefetch((const char *)op->data + ((t0 + t + LANES) * op->stride + f_first) * elem, 0, 2);
#if defined(RANDMASK_AVX512) || defined(RANDMASK_AVX2)
            if (!op->feat && te - ts == 16 && f1 - f0 == 16) {
                pack_tile16(op, t0 + ts, f0, buf + f0 * TB + ts);
                continue;
            }
#endif
            for (int64_t t = ts; t < te; t++) {
                if (op->bf16) {
                    const uint16_t *row = (const uint16_t *)op->data + (t0 + t) * op->stride;
                    for (int64_t f = f0; f < f1; f++)
                        buf[f * TB + t] = bf16_to_float(row[op->feat ? op->feat[f] : f]);
                } else {
                    const float *row = (const float *)op->data + (t0 + t) * op->stride;
                    for (int64_t f = f0; f < f1; f++)
                        buf[f * TB + t] = row[op->feat ? op->feat[f] : f];
                }
            }
        }
    }
    if (nt < TB)
        for (int64_t f = 0; f < op->n; f++)
            memset(buf + f * TB + nt, 0, (size_t)(TB - nt) * sizeof(float));
}

static inline float dot(const float *restrict a, const float *restrict b) {
    float s[LANES] = {0};
    for (int t = 0; t < TB; t += LANES)
        for (int l = 0; l < LANES; l++)
            s[l] += a[t + l] * b[t + l];
    float total = 0.0f;
    for (int l = 0; l < LANES; l++)
        total += s[l];
    return total;
}

#ifdef RANDMASK_AVX512

/* Lane i of the result = the sum of v[i]'s 16 lanes. Four shuffle-and-add levels halve the partial sums
   per entry (16 -> 8 -> 4 -> 2 -> 1) while packing more entries per vector; `order` undoes the lane
   order they leave. About 3 instructions per entry against ~8 for a horizontal sum of each. */
static inline __m512 reduce16(const __m512 v[16], __m512i order) {
    __m512 a[8], b[4], c[2];
    for (int i = 0; i < 8; i++) /* [v.lo256 + v.hi256 | w.lo256 + w.hi256] */
        a[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44),
                             _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xEE));
    for (int i = 0; i < 4; i++) /* one 128-bit chunk of 4 partials per entry */
        b[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0x88),
                             _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0xDD));
    for (int i = 0; i < 2; i++) /* within each chunk: 2 partials of two entries */
        c[i] = _mm512_add_ps(_mm512_shuffle_ps(b[2 * i], b[2 * i + 1], 0x44),
                             _mm512_shuffle_ps(b[2 * i], b[2 * i + 1], 0xEE));
    __m512 d = _mm512_add_ps(_mm512_shuffle_ps(c[0], c[1], 0x88), _mm512_shuffle_ps(c[0], c[1], 0xDD));
    return _mm512_permutexvar_ps(order, d);
}

static __m512i reduce16_order(void) {
    __m512 v[16];
    for (int i = 0; i < 16; i++)
        v[i] = _mm512_set1_ps((float)i); /* lane L of the unpermuted result = 16 * (its entry) */
    __m512i identity = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    float lanes[16];
    _mm512_storeu_ps(lanes, reduce16(v, identity));
    int32_t order[16];
    for (int lane = 0; lane < 16; lane++)
        order[(int)(lanes[lane] / 16.0f)] = lane;
    return _mm512_loadu_si512(order);
}

#endif

#ifdef RANDMASK_AVX2
/* The 8-lane reduce16: lane k of the result = the sum of the 8 lanes of v[slot(k)], where entry k sits in
   slot(k) = 2 * (k % 4) + k / 4. Three shuffle-and-add levels (8 -> 4 -> 2 -> 1 partials per entry) leave
   the entries in that order, so no final permute: ~2.6 instructions per entry. */
static inline int reduce8_slot(int k) { return 2 * (k & 3) + (k >> 2); }

static inline __m256 reduce8(const __m256 v[8]) {
    __m256 a[4], b[2];
    for (int i = 0; i < 4; i++) /* [v.lo128 + v.hi128 | w.lo128 + w.hi128] */
        a[i] = _mm256_add_ps(_mm256_permute2f128_ps(v[2 * i], v[2 * i + 1], 0x20),
                             _mm256_permute2f128_ps(v[2 * i], v[2 * i + 1], 0x31));
    for (int i = 0; i < 2; i++) /* within each half: 2 partials of two entries */
        b[i] = _mm256_add_ps(_mm256_shuffle_ps(a[2 * i], a[2 * i + 1], 0x44),
                             _mm256_shuffle_ps(a[2 * i], a[2 * i + 1], 0xEE));
    return _mm256_add_ps(_mm256_shuffle_ps(b[0], b[1], 0x88), _mm256_shuffle_ps(b[0], b[1], 0xDD));
}
#endif

/* acc[e] += dot(lhs row of e, rhs row of e) for every entry (AVX-512: 16 entries at a time; AVX2: 8). */
static void accumulate(const job_t *job, const float *lbuf, const float *rbuf) {
    int64_t e0 = 0;
#ifdef RANDMASK_AVX512
    __m512i order = reduce16_order(); /* ~50 instructions per token block */
    for (; e0 + 16 <= job->nnz; e0 += 16) {
        __m512 v[16];
        for (int i = 0; i < 16; i++) {
            const float *a = lbuf + (int64_t)job->row_of[e0 + i] * TB, *b = rbuf + (int64_t)job->col[e0 + i] * TB;
            __m512 s = _mm512_mul_ps(_mm512_load_ps(a), _mm512_load_ps(b));
            for (int t = 16; t < TB; t += 16)
                s = _mm512_fmadd_ps(_mm512_load_ps(a + t), _mm512_load_ps(b + t), s);
            v[i] = s;
        }
        _mm512_storeu_ps(job->acc + e0, _mm512_add_ps(_mm512_loadu_ps(job->acc + e0), reduce16(v, order)));
    }
#elif defined(RANDMASK_AVX2)
    for (; e0 + 8 <= job->nnz; e0 += 8) {
        __m256 v[8];
        for (int k = 0; k < 8; k++) {
            const float *a = lbuf + (int64_t)job->row_of[e0 + k] * TB, *b = rbuf + (int64_t)job->col[e0 + k] * TB;
            /* two accumulators: 16 partial sums per entry, as the portable dot keeps */
            __m256 s0 = _mm256_mul_ps(_mm256_load_ps(a), _mm256_load_ps(b));
            __m256 s1 = _mm256_mul_ps(_mm256_load_ps(a + 8), _mm256_load_ps(b + 8));
            for (int t = 16; t < TB; t += 16) {
                s0 = _mm256_fmadd_ps(_mm256_load_ps(a + t), _mm256_load_ps(b + t), s0);
                s1 = _mm256_fmadd_ps(_mm256_load_ps(a + t + 8), _mm256_load_ps(b + t + 8), s1);
            }
            v[reduce8_slot(k)] = _mm256_add_ps(s0, s1);
        }
        _mm256_storeu_ps(job->acc + e0, _mm256_add_ps(_mm256_loadu_ps(job->acc + e0), reduce8(v)));
    }
#endif
    for (; e0 < job->nnz; e0++) /* the portable path, and the vector paths' last nnz % 16 (or % 8) entries */
        job->acc[e0] += dot(lbuf + (int64_t)job->row_of[e0] * TB, rbuf + (int64_t)job->col[e0] * TB);
}

static void *run_job(void *arg) {
    job_t *job = (job_t *)arg;
    float *lbuf = aligned_alloc(64, (size_t)(job->lhs.n > 0 ? job->lhs.n : 1) * TB * sizeof(float));
    float *rbuf = aligned_alloc(64, (size_t)(job->rhs.n > 0 ? job->rhs.n : 1) * TB * sizeof(float));
    if (!lbuf || !rbuf) {
        job->failed = 1;
    } else {
        for (int64_t b = job->n_blocks_begin; b < job->n_blocks_end; b++) {
            int64_t t0 = b * TB, nt = job->tokens - t0 < TB ? job->tokens - t0 : TB;
            pack(&job->lhs, t0, nt, job->tokens, lbuf);
            pack(&job->rhs, t0, nt, job->tokens, rbuf);
            accumulate(job, lbuf, rbuf);
        }
    }
    free(lbuf);
    free(rbuf);
    return NULL;
}

/* Returns 0 on success, 1 when memory ran out. out: (nnz,) fp32, entries in CSR order. */
int randmask_sddmm(const void *lhs, int64_t lhs_stride, int lhs_bf16, const int64_t *lhs_feat, int64_t n_lhs,
                   const void *rhs, int64_t rhs_stride, int rhs_bf16, const int64_t *rhs_feat, int64_t n_rhs,
                   int64_t tokens, const int32_t *crow, const int32_t *col, int64_t nnz, float *out,
                   int threads) {
    int64_t n_blocks = (tokens + TB - 1) / TB;
    if (threads < 1)
        threads = 1;
    if (threads > n_blocks)
        threads = (int)(n_blocks > 0 ? n_blocks : 1);
    if (threads > 64)
        threads = 64;
    memset(out, 0, (size_t)nnz * sizeof(float));
    int32_t *row_of = malloc((size_t)(nnz > 0 ? nnz : 1) * sizeof(int32_t));
    if (!row_of)
        return 1;
    for (int64_t r = 0; r < n_lhs; r++)
        for (int64_t e = crow[r]; e < crow[r + 1]; e++)
            row_of[e] = (int32_t)r;
    job_t jobs[64];
    int failed = 0;
    for (int i = 0; i < threads; i++) {
        job_t *job = &jobs[i];
        job->lhs = (operand_t){lhs, lhs_stride, lhs_bf16, lhs_feat, n_lhs};
        job->rhs = (operand_t){rhs, rhs_stride, rhs_bf16, rhs_feat, n_rhs};
        job->col = col;
        job->row_of = row_of;
        job->nnz = nnz;
        job->tokens = tokens;
        job->n_blocks_begin = n_blocks * i / threads;
        job->n_blocks_end = n_blocks * (i + 1) / threads;
        job->failed = 0;
        job->acc = i == 0 ? out : calloc((size_t)(nnz > 0 ? nnz : 1), sizeof(float));
        failed |= job->acc == NULL;
    }
    if (!failed) {
#ifdef _OPENMP
        /* torch's OpenMP pool: loaded after torch, this library binds to the libgomp torch already
           loaded, so its idle workers (still spinning after the last torch op) run these jobs. Threads
           of our own competed with those spinning workers for the 2 cores: 1.4x slower per call. */
#pragma omp parallel for num_threads(threads) schedule(static, 1)
        for (int i = 0; i < threads; i++)
            run_job(&jobs[i]);
#else
        pthread_t tids[64];
        int started[64] = {0};
        for (int i = 1; i < threads; i++)
            started[i] = pthread_create(&tids[i], NULL, run_job, &jobs[i]) == 0;
        run_job(&jobs[0]);
        for (int i = 1; i < threads; i++) {
            if (started[i])
                pthread_join(tids[i], NULL);
            else
                run_job(&jobs[i]); /* no thread: do its share here */
        }
#endif
    }
    for (int i = 0; i < threads; i++) {
        failed |= jobs[i].failed;
        if (i > 0 && jobs[i].acc) {
            for (int64_t e = 0; e < nnz; e++)
                out[e] += jobs[i].acc[e];
            free(jobs[i].acc);
        }
    }
    free(row_of);
    return failed;
}
