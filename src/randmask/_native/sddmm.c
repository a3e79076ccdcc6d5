/* The masked weight gradient (SDDMM), reading (tokens, features) activations where they lie.

     out[e] = sum_t lhs[t, lhs_feat[r]] * rhs[t, rhs_feat[col[e]]]   for each entry e of CSR row r

   torch.sparse.sampled_addmm wants both operands tokens-last, so the torch path first copies whole
   activations into that layout (most of its time at 1% density). Here tokens go in blocks of TB: a
   block's touched features are packed feature-major into two small fp32 buffers that stay in L2,
   and each kept entry adds a TB-long dot of two packed rows. Threads take disjoint token blocks into
   private accumulators, summed at the end. Inputs fp32 or bf16; products and sums in fp32.

   Built on first use by randmask/native.py (cc -O3 -march=native -shared -fPIC -pthread); the torch
   path is the fallback wherever it cannot be built. */
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

typedef struct {
    const void *data;    /* (tokens, stride) row-major, fp32 or bf16 */
    int64_t stride;      /* elements between consecutive tokens */
    int bf16;
    const int64_t *feat; /* the packed features (NULL: 0 .. n-1) */
    int64_t n;
} operand_t;

typedef struct {
    operand_t lhs, rhs;
    const int32_t *crow, *col;
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

/* buf[f * TB + t] = op[t0 + t, feat[f]] for t < nt, 0 for nt <= t < TB. In tiles of LANES tokens x
   LANES features: LANES input rows are read forward together (few enough streams to prefetch) and
   each tile writes whole 64-byte lines of buf (a TB-token sweep per feature tile would read TB rows
   at once and run slower than the memory). */
static void pack(const operand_t *op, int64_t t0, int64_t nt, float *buf) {
    for (int64_t ts = 0; ts < nt; ts += LANES) {
        int64_t te = ts + LANES < nt ? ts + LANES : nt;
        for (int64_t f0 = 0; f0 < op->n; f0 += LANES) {
            int64_t f1 = f0 + LANES < op->n ? f0 + LANES : op->n;
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

static void *run_job(void *arg) {
    job_t *job = (job_t *)arg;
    float *lbuf = aligned_alloc(64, (size_t)(job->lhs.n > 0 ? job->lhs.n : 1) * TB * sizeof(float));
    float *rbuf = aligned_alloc(64, (size_t)(job->rhs.n > 0 ? job->rhs.n : 1) * TB * sizeof(float));
    if (!lbuf || !rbuf) {
        job->failed = 1;
    } else {
        for (int64_t b = job->n_blocks_begin; b < job->n_blocks_end; b++) {
            int64_t t0 = b * TB, nt = job->tokens - t0 < TB ? job->tokens - t0 : TB;
            pack(&job->lhs, t0, nt, lbuf);
            pack(&job->rhs, t0, nt, rbuf);
            for (int64_t r = 0; r < job->lhs.n; r++) {
                const float *a = lbuf + r * TB;
                for (int64_t e = job->crow[r]; e < job->crow[r + 1]; e++)
                    job->acc[e] += dot(a, rbuf + (int64_t)job->col[e] * TB);
            }
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
    job_t jobs[64];
    pthread_t tids[64];
    int started[64] = {0};
    int failed = 0;
    for (int i = 0; i < threads; i++) {
        job_t *job = &jobs[i];
        job->lhs = (operand_t){lhs, lhs_stride, lhs_bf16, lhs_feat, n_lhs};
        job->rhs = (operand_t){rhs, rhs_stride, rhs_bf16, rhs_feat, n_rhs};
        job->crow = crow;
        job->col = col;
        job->tokens = tokens;
        job->n_blocks_begin = n_blocks * i / threads;
        job->n_blocks_end = n_blocks * (i + 1) / threads;
        job->failed = 0;
        job->acc = i == 0 ? out : calloc((size_t)(nnz > 0 ? nnz : 1), sizeof(float));
        if (!job->acc) {
            failed = 1;
            continue;
        }
        if (i > 0 && pthread_create(&tids[i], NULL, run_job, job) == 0)
            started[i] = 1;
        else if (i > 0)
            run_job(job); /* no thread: do its share here */
    }
    if (jobs[0].acc)
        run_job(&jobs[0]);
    for (int i = 1; i < threads; i++) {
        if (started[i])
            pthread_join(tids[i], NULL);
        if (jobs[i].acc) {
            for (int64_t e = 0; e < nnz; e++)
                out[e] += jobs[i].acc[e];
            free(jobs[i].acc);
        }
        failed |= jobs[i].failed;
    }
    return failed | jobs[0].failed;
}
