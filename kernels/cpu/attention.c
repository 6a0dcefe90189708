// CPU kernels: causal softmax attention, blocked flash-style. Each (batch, head, query block)
// is one strip: S = scale * Q_blk K^T over the keys up to the end of the block only (the
// causal upper triangle beyond it is never computed), a stable softmax per row, O = P V.
// Forward saves lse = logsumexp of each row; backward recomputes P from it block by block.
#include "kernels/kernels.h"

#include <cblas.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include "kernels/cpu/lane_sums.h"
#include "kernels/cpu/simd_math.h"

// Query rows per block. A strip of scores is (ATTN_BQ, T) floats per thread: 1 MiB at T=4096.
#define ATTN_BQ 64

// Below this many multiply-adds (B*H*T*T*Dh, twice the causal count) the whole op runs on the
// calling thread: tiny problems (tests, toy configs) gain nothing from waking the team.
#define ATTN_PAR_MIN (1 << 22)

// Kernels return no error code; running out of memory for scratch is fatal.
static float *scratch_alloc_(int T) {
    float *p = malloc((size_t)ATTN_BQ * (size_t)(T > 0 ? T : 1) * sizeof(float));
    if (!p) {
        fprintf(stderr,
                "moet kernels: out of memory for the attention scratch (T=%d)\n"
                "---> HINT: reduce the sequence length or the thread count\n",
                T);
        abort();
    }
    return p;
}

// The causal softmax of one row of scores in place: the first nk of its kend entries become
// probabilities, the rest 0. Returns the row's log-sum-exp.
static float softmax_row_(float *row, int nk, int kend) {
    float m = row[0];
#pragma omp simd reduction(max : m)
    for (int j = 1; j < nk; j++) m = row[j] > m ? row[j] : m;
    double sum = 0.0;
#pragma omp simd reduction(+ : sum)
    for (int j = 0; j < nk; j++) {
        const float e = expf(row[j] - m);
        row[j] = e;
        sum += e;
    }
    const float inv = (float)(1.0 / sum);
    for (int j = 0; j < nk; j++) row[j] *= inv;
    for (int j = nk; j < kend; j++) row[j] = 0.0f;
    return (float)((double)m + log(sum));
}

// out, q, k, v are (B,T,H,Dh); lse is (B,H,T)
void attention_forward(float *out, float *lse, const float *q, const float *k, const float *v,
                       int B, int T, int H, int Dh) {
    const int ld = H * Dh; // row stride of one head's (T,Dh) slice inside (B,T,H,Dh)
    const float scale = 1.0f / sqrtf((float)Dh);
    const int nqb = (T + ATTN_BQ - 1) / ATTN_BQ;
    const int nbh = B * H;
    const int nwork = nbh * nqb;
#pragma omp parallel if ((size_t)nbh * T * T * Dh >= ATTN_PAR_MIN)
    {
        float *s = scratch_alloc_(T); // scores, then probabilities; (bq, kend)
        // the last query blocks (the most keys) first, for a balanced dynamic schedule
#pragma omp for schedule(dynamic, 1)
        for (int w = 0; w < nwork; w++) {
            const int qb = nqb - 1 - w / nbh, bh = w % nbh, b = bh / H, h = bh % H;
            const int q0 = qb * ATTN_BQ;
            const int bq = q0 + ATTN_BQ < T ? ATTN_BQ : T - q0;
            const int kend = q0 + bq; // keys [0, kend): the causal window of the whole block
            const size_t base = (size_t)b * T * ld + (size_t)h * Dh;
            const float *qb_ptr = q + base + (size_t)q0 * ld;
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, bq, kend, Dh, scale, qb_ptr, ld,
                        k + base, ld, 0.0f, s, kend);
            float *lse_bh = lse + (size_t)bh * T;
            for (int i = 0; i < bq; i++) // query q0+i sees keys [0, q0+i]
                lse_bh[q0 + i] = softmax_row_(s + (size_t)i * kend, q0 + i + 1, kend);
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, bq, Dh, kend, 1.0f, s, kend,
                        v + base, ld, 0.0f, out + base + (size_t)q0 * ld, ld);
        }
        free(s);
    }
}

// Per query block: P = exp(scale Q K^T - lse) (causal), D_i = rowsum(dO * O),
// dV += P^T dO, dS = P * (dO V^T - D), dQ += scale dS K, dK += scale dS^T Q.
// One (b,h) per task: it owns its dk/dv slice, so blocks accumulate in a fixed order, no races.
// dq, dk, dv, dout, out, q, k, v are (B,T,H,Dh); lse is (B,H,T)
void attention_backward(float *dq, float *dk, float *dv, const float *dout, const float *out,
                        const float *lse, const float *q, const float *k, const float *v, int B,
                        int T, int H, int Dh) {
    if (!dq && !dk && !dv) return;
    const int ld = H * Dh;
    const float scale = 1.0f / sqrtf((float)Dh);
    const int nqb = (T + ATTN_BQ - 1) / ATTN_BQ;
    const int nbh = B * H;
#pragma omp parallel if ((size_t)nbh * T * T * Dh >= ATTN_PAR_MIN)
    {
        float *p = scratch_alloc_(T);  // probabilities (bq, kend)
        float *dp = scratch_alloc_(T); // dP, then dS in place (bq, kend)
        double dsum[ATTN_BQ];          // D_i of the block
#pragma omp for schedule(dynamic, 1)
        for (int bh = 0; bh < nbh; bh++) {
            const int b = bh / H, h = bh % H;
            const size_t base = (size_t)b * T * ld + (size_t)h * Dh;
            const float *lse_bh = lse + (size_t)bh * T;
            for (int qb = 0; qb < nqb; qb++) {
                const int q0 = qb * ATTN_BQ;
                const int bq = q0 + ATTN_BQ < T ? ATTN_BQ : T - q0;
                const int kend = q0 + bq;
                const size_t qoff = base + (size_t)q0 * ld;
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, bq, kend, Dh, scale, q + qoff,
                            ld, k + base, ld, 0.0f, p, kend);
                for (int i = 0; i < bq; i++) {
                    float *row = p + (size_t)i * kend;
                    const int nk = q0 + i + 1;
                    const float l = lse_bh[q0 + i];
#pragma omp simd
                    for (int j = 0; j < nk; j++) row[j] = expf(row[j] - l);
                    for (int j = nk; j < kend; j++) row[j] = 0.0f;
                    const float *go = dout + qoff + (size_t)i * ld,
                                *o = out + qoff + (size_t)i * ld;
                    dsum[i] = lane_dot(go, o, (size_t)Dh);
                }
                if (dv) {
                    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, kend, Dh, bq, 1.0f, p,
                                kend, dout + qoff, ld, 1.0f, dv + base, ld);
                }
                if (!dq && !dk) continue;
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, bq, kend, Dh, 1.0f,
                            dout + qoff, ld, v + base, ld, 0.0f, dp, kend);
                for (int i = 0; i < bq; i++) {
                    float *ds = dp + (size_t)i * kend;
                    const float *pr = p + (size_t)i * kend;
                    const float d = (float)dsum[i];
                    for (int j = 0; j < kend; j++) ds[j] = pr[j] * (ds[j] - d);
                }
                if (dq) {
                    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, bq, Dh, kend, scale, dp,
                                kend, k + base, ld, 1.0f, dq + qoff, ld);
                }
                if (dk) {
                    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, kend, Dh, bq, scale, dp,
                                kend, q + qoff, ld, 1.0f, dk + base, ld);
                }
            }
        }
        free(dp);
        free(p);
    }
}

// Generation: the same strips as attention_forward, over one sequence whose first Tk-Tq
// positions are cached. Query block rows [q0, q0+bq) are positions off+q0 .. and see the keys
// [0, off+q0+bq).
// out, q are (Tq,H,Dh); k, v are (Tk,H,Dh)
void attention_forward_cached(float *out, const float *q, const float *k, const float *v, int Tq,
                              int Tk, int H, int Dh) {
    const int ld = H * Dh;
    const int off = Tk - Tq;
    const float scale = 1.0f / sqrtf((float)Dh);
    const int nqb = (Tq + ATTN_BQ - 1) / ATTN_BQ;
    const int nwork = H * nqb;
#pragma omp parallel if ((size_t)H * Tq * Tk * Dh >= ATTN_PAR_MIN)
    {
        float *s = scratch_alloc_(Tk);
#pragma omp for schedule(dynamic, 1)
        for (int w = 0; w < nwork; w++) {
            const int qb = nqb - 1 - w / H, h = w % H;
            const int q0 = qb * ATTN_BQ;
            const int bq = q0 + ATTN_BQ < Tq ? ATTN_BQ : Tq - q0;
            const int kend = off + q0 + bq;
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, bq, kend, Dh, scale,
                        q + (size_t)q0 * ld + (size_t)h * Dh, ld, k + (size_t)h * Dh, ld, 0.0f, s,
                        kend);
            for (int i = 0; i < bq; i++) softmax_row_(s + (size_t)i * kend, off + q0 + i + 1, kend);
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, bq, Dh, kend, 1.0f, s, kend,
                        v + (size_t)h * Dh, ld, 0.0f, out + (size_t)q0 * ld + (size_t)h * Dh, ld);
        }
        free(s);
    }
}
