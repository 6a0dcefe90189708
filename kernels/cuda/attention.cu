// attention.cu: causal softmax attention on the GPU, forward and backward, mirroring
// attention_forward / attention_backward of kernels/cpu/attention.c (scale 1/sqrt(Dh),
// n_kv = n_heads; lse saved by the forward, probabilities recomputed by the backward). Tested
// against the CPU op by tests/cuda/test_cuda_gemm.c.
//
// Plan, per sequence b (the heads of one sequence are one strided batch of GEMMs):
//   forward:  S = scale Q K^T              (H,T,T) into scratch, cuBLAS
//             P = causal softmax(S), lse    in place, one block per row
//             O = P V                       cuBLAS
//   backward: S = scale Q K^T, dP = dO V^T  cuBLAS, into the two halves of scratch
//             P = exp(S - lse) (causal), D_t = rowsum(dO * O), dS = P * (dP - D_t)
//                                           in place, one block per row
//             dV += P^T dO, dQ += scale dS K, dK += scale dS^T Q   cuBLAS, beta = 1
// First version: the GEMMs compute the whole (T,T) square and the softmax zeroes the causal
// upper triangle, so half of the score FLOPs are wasted (2x), and scratch holds full (H,T,T)
// matrices (2 GiB of backward scratch at T = 4096, H = 16). A flash-attention kernel that
// walks key blocks up to the diagonal would remove both.
//
// Layout: q, k, v, out and their gradients are (B,T,H,Dh) row-major: for sequence b and head h
// the (T,Dh) matrix starts at q + b*T*H*Dh + h*Dh with row stride ld = H*Dh, and the next
// head is Dh elements further (the batch stride). Read column-major, that matrix is the
// (Dh,T) matrix Q^T with leading dimension ld. The scores of head h are the row-major (T,T)
// matrix at s + h*T*T (row = query t, column = key j), column-major the (T,T) matrix S^T.
// lse is (B,H,T), so lse + b*H*T is indexed by the row number h*T + t of the scores.
//
// Determinism: cuBLAS is reproducible on one GPU model (no atomics, one stream) and the row
// kernel reduces with the fixed trees of common.cuh: results are bitwise identical run to run.
#include <math.h>

#include "kernels/cuda/cublas_util.cuh"
#include "kernels/cuda/kernels_cuda.h"

enum { ATTN_ROW_THREADS = 128 }; // threads per softmax row (a multiple of 32)

size_t cuda_attention_scratch_bytes(int T, int H) {
    if (T <= 0 || H <= 0) return 0;
    // two (H,T,T) float matrices: scores / probabilities, and dP / dS (backward only)
    return 2 * (size_t)H * (size_t)T * (size_t)T * sizeof(float);
}

// ---------------------------------------------------------------------------------------
// Forward

// Causal softmax of one sequence's scores, in place: one block per row (h, t) of s (H*Tq rows
// of length Tk). Query t is position off + t, off = Tk - Tq (0 in training; the cached
// positions in generation), and sees keys [0, off + t]: p_j = exp(s_j - m) / sum over those,
// with m the row max (stability); later keys get exactly 0, so that O = P V over the full
// rectangle adds nothing from the future. lse (NULL: not wanted) = m + log(sum) is the
// log-sum-exp of the scaled scores, as on the CPU. The sum is an fp32 tree over <= Tk terms in
// (0, 1]: relative error ~ log2(Tk) ulp.
static __global__ void attention_softmax_kernel(float *s, float *lse, int Tq, int Tk) {
    __shared__ float red[32];
    const int row = blockIdx.x; // h*Tq + t
    const int t = row % Tq;
    const int nk = Tk - Tq + t + 1;
    float *sr = s + (size_t)row * Tk;
    float m = -INFINITY;
    for (int j = threadIdx.x; j < nk; j += blockDim.x) m = fmaxf(m, sr[j]);
    m = block_max_f32(m, red);
    float sum = 0.0f;
    for (int j = threadIdx.x; j < nk; j += blockDim.x) {
        const float e = expf(sr[j] - m);
        sr[j] = e; // read back below by the same thread
        sum += e;
    }
    sum = block_sum_f32(sum, red); // >= 1: the max term is exp(0)
    const float inv = 1.0f / sum;
    for (int j = threadIdx.x; j < Tk; j += blockDim.x) sr[j] = j < nk ? sr[j] * inv : 0.0f;
    if (lse && threadIdx.x == 0) lse[row] = m + logf(sum);
}

// Stops with a message when a caller passed no scratch (a bug in the caller).
static void need_scratch_(const char *fn, const void *scratch) {
    if (scratch) return;
    fprintf(stderr, "moet: fatal: %s: scratch is NULL (allocate cuda_attention_scratch_bytes(T, "
                    "H) bytes)\n", fn);
    exit(EXIT_FAILURE);
}

// The scaled scores of one sequence, s[h*T*T + t*T + j] = scale * q_t . k_j per head, into s
// (H,T,T). Forward and backward both call this one GEMM, so the backward recomputes exactly the
// forward's scores. Per head h, column-major: S^T (T,T) = scale * K (T,Dh) * Q^T (Dh,T) (K is
// stored as the column-major (Dh,T) K^T: op T; Q as Q^T: op N). qb, kb point at the sequence.
static void scores_(float *s, const float *qb, const float *kb, int T, int H, int Dh,
                    float scale) {
    const int ld = H * Dh;
    gemm_f32_strided_batched_(CUBLAS_OP_T, CUBLAS_OP_N, T, T, Dh, scale, kb, ld, Dh, qb, ld, Dh,
                              0.0f, s, T, (long long)T * T, H);
}

// out, q, k, v are (B,T,H,Dh); lse is (B,H,T); scratch is cuda_attention_scratch_bytes(T, H)
void cuda_attention_forward(float *out, float *lse, const float *q, const float *k, const float *v,
                            int B, int T, int H, int Dh, void *scratch) {
    if (B <= 0 || T <= 0 || H <= 0 || Dh <= 0) return;
    need_scratch_("cuda_attention_forward", scratch);
    const int ld = H * Dh;
    const long long TT = (long long)T * T;
    const float scale = 1.0f / sqrtf((float)Dh);
    float *s = (float *)scratch; // (H,T,T)
    for (int b = 0; b < B; b++) {
        const size_t base = (size_t)b * T * ld;
        const float *qb = q + base, *kb = k + base, *vb = v + base;
        scores_(s, qb, kb, T, H, Dh, scale);
        attention_softmax_kernel<<<(unsigned)(H * T), ATTN_ROW_THREADS>>>(
            s, lse + (size_t)b * H * T, T, T);
        CUDA_CHECK_LAUNCH();
        // Per head, column-major: O^T (Dh,T) = V^T (Dh,T) * P^T (T,T)
        // (V stored as V^T: op N; row-major P read column-major is P^T: op N); O^T with
        // leading dimension ld is exactly the head's columns of out (B,T,H,Dh).
        gemm_f32_strided_batched_(CUBLAS_OP_N, CUBLAS_OP_N, Dh, T, T, 1.0f, vb, ld, Dh, s, T, TT,
                                  0.0f, out + base, ld, Dh, H);
    }
}

// ---------------------------------------------------------------------------------------
// Backward

// One block per row (h, t) of one sequence. p holds S (the scaled scores) and receives
// P = exp(S - lse) for keys j <= t and exactly 0 beyond (the forward's probabilities, exact up
// to rounding since lse is their normaliser). When ds is set it holds dP = dO V^T and receives
// dS = P * (dP - D_t) (0 beyond t), where D_t = dO_t . O_t = sum_j P_tj dP_tj is the softmax
// Jacobian's correction, an fp32 tree over the Dh products. dout_b and out_b point at the
// sequence's (T,H,Dh) block.
static __global__ void attention_backward_rows_kernel(float *p, float *ds, const float *lse_b,
                                                      const float *dout_b, const float *out_b,
                                                      int T, int H, int Dh) {
    __shared__ float red[32];
    const int row = blockIdx.x; // h*T + t
    const int h = row / T, t = row % T;
    float *pr = p + (size_t)row * T;
    float *dsr = ds ? ds + (size_t)row * T : NULL;
    float d = 0.0f;
    if (dsr) { // the same for the whole block, so every thread reaches the block sum
        const size_t off = ((size_t)t * H + h) * Dh;
        for (int c = threadIdx.x; c < Dh; c += blockDim.x) d += dout_b[off + c] * out_b[off + c];
        d = block_sum_f32(d, red);
    }
    const float l = lse_b[row];
    for (int j = threadIdx.x; j < T; j += blockDim.x) {
        const float pj = j <= t ? expf(pr[j] - l) : 0.0f;
        pr[j] = pj;
        if (dsr) dsr[j] = j <= t ? pj * (dsr[j] - d) : 0.0f;
    }
}

// Accumulates (+=) into dq, dk, dv (each may be NULL); all are (B,T,H,Dh) like dout, out, q, k,
// v; lse is (B,H,T) from the forward; scratch is cuda_attention_scratch_bytes(T, H).
void cuda_attention_backward(float *dq, float *dk, float *dv, const float *dout, const float *out,
                             const float *lse, const float *q, const float *k, const float *v,
                             int B, int T, int H, int Dh, void *scratch) {
    if (B <= 0 || T <= 0 || H <= 0 || Dh <= 0 || (!dq && !dk && !dv)) return;
    need_scratch_("cuda_attention_backward", scratch);
    const int ld = H * Dh;
    const long long TT = (long long)T * T;
    const float scale = 1.0f / sqrtf((float)Dh);
    float *p = (float *)scratch;                  // (H,T,T): S, then P
    float *ds = p + (size_t)H * T * T;            // (H,T,T): dP, then dS
    const int need_ds = dq != NULL || dk != NULL; // dv needs P only
    for (int b = 0; b < B; b++) {
        const size_t base = (size_t)b * T * ld;
        const float *qb = q + base, *kb = k + base, *vb = v + base, *dob = dout + base;
        scores_(p, qb, kb, T, H, Dh, scale);
        if (need_ds) {
            // dP = dO V^T, the same form as S: column-major dP^T (T,T) = V (T,Dh) * dO^T (Dh,T)
            gemm_f32_strided_batched_(CUBLAS_OP_T, CUBLAS_OP_N, T, T, Dh, 1.0f, vb, ld, Dh, dob, ld,
                                      Dh, 0.0f, ds, T, TT, H);
        }
        attention_backward_rows_kernel<<<(unsigned)(H * T), ATTN_ROW_THREADS>>>(
            p, need_ds ? ds : NULL, lse + (size_t)b * H * T, dob, out + base, T, H, Dh);
        CUDA_CHECK_LAUNCH();
        if (dv) {
            // dV += P^T dO. Column-major: dV^T (Dh,T) += dO^T (Dh,T) * P (T,T)
            // (dO stored as dO^T: op N; row-major P read column-major is P^T, so op T gives P)
            gemm_f32_strided_batched_(CUBLAS_OP_N, CUBLAS_OP_T, Dh, T, T, 1.0f, dob, ld, Dh, p, T,
                                      TT, 1.0f, dv + base, ld, Dh, H);
        }
        if (dq) {
            // dQ += scale dS K. Column-major: dQ^T (Dh,T) += scale * K^T (Dh,T) * dS^T (T,T)
            // (K stored as K^T: op N; row-major dS read column-major is dS^T: op N)
            gemm_f32_strided_batched_(CUBLAS_OP_N, CUBLAS_OP_N, Dh, T, T, scale, kb, ld, Dh, ds, T,
                                      TT, 1.0f, dq + base, ld, Dh, H);
        }
        if (dk) {
            // dK += scale dS^T Q. Column-major: dK^T (Dh,T) += scale * Q^T (Dh,T) * dS (T,T)
            // (Q stored as Q^T: op N; dS read column-major is dS^T, so op T gives dS)
            gemm_f32_strided_batched_(CUBLAS_OP_N, CUBLAS_OP_T, Dh, T, T, scale, qb, ld, Dh, ds, T,
                                      TT, 1.0f, dk + base, ld, Dh, H);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Generation: Tq queries (positions Tk-Tq ..) over the Tk cached keys and values of one
// sequence, the forward's three steps on a (Tq,Tk) rectangle per head instead of (T,T).

size_t cuda_attention_cached_scratch_bytes(int Tq, int Tk, int H) {
    if (Tq <= 0 || Tk <= 0 || H <= 0) return 0;
    return (size_t)H * (size_t)Tq * (size_t)Tk * sizeof(float);
}

// out, q are (Tq,H,Dh); k, v are (Tk,H,Dh); scratch is cuda_attention_cached_scratch_bytes
void cuda_attention_forward_cached(float *out, const float *q, const float *k, const float *v,
                                   int Tq, int Tk, int H, int Dh, void *scratch) {
    if (Tq <= 0 || Tk < Tq || H <= 0 || Dh <= 0) return;
    need_scratch_("cuda_attention_forward_cached", scratch);
    const int ld = H * Dh;
    const float scale = 1.0f / sqrtf((float)Dh);
    float *s = (float *)scratch; // (H,Tq,Tk)
    // per head, column-major: S^T (Tk,Tq) = scale * K (Tk,Dh) * Q^T (Dh,Tq)
    gemm_f32_strided_batched_(CUBLAS_OP_T, CUBLAS_OP_N, Tk, Tq, Dh, scale, k, ld, Dh, q, ld, Dh,
                              0.0f, s, Tk, (long long)Tq * Tk, H);
    attention_softmax_kernel<<<(unsigned)(H * Tq), ATTN_ROW_THREADS>>>(s, NULL, Tq, Tk);
    CUDA_CHECK_LAUNCH();
    // O^T (Dh,Tq) = V^T (Dh,Tk) * P^T (Tk,Tq)
    gemm_f32_strided_batched_(CUBLAS_OP_N, CUBLAS_OP_N, Dh, Tq, Tk, 1.0f, v, ld, Dh, s, Tk,
                              (long long)Tq * Tk, 0.0f, out, ld, Dh, H);
}
