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
// Causal query blocks (cuda_set_attention_query_block): the queries go in blocks of qb rows,
// and every GEMM above runs per block against keys [0, t0 + qb) only: the scores, P and dS of
// block [t0, t0 + qb) are its rows of the (T,T) matrices, columns below t0 + qb. The row
// kernels write P and dS up to the block's last key (exact zeros past the diagonal), and
// nothing beyond, which no GEMM reads. With 4 blocks the GEMMs do 5/8 of the square's work;
// the masked triangle inside each block is still computed and zeroed. Scratch still holds full
// (H,T,T) matrices (2 GiB of backward scratch at T = 4096, H = 16). A flash-attention kernel
// that walks key tiles up to the diagonal would do only the causal half, in on-chip memory.
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
//
// bf16 operands (the default in bf16 mode, see gemm.cu): the same GEMMs on bf16 operands in the
// GEMM workspace. Per sequence the (T,H*Dh) blocks of q, k, v (and dO) are converted once each,
// keeping their layout, so the head strides and ld stay. The scores S and dP stay fp32 in
// scratch; the row kernels' bf16 twins read them and write P (and dS) straight in bf16 to the
// workspace, in chunks of heads that fit its limit, and the GEMMs that consume P and dS follow
// chunk by chunk. (Converting fp32 P and dS afterwards would read and write 1.5x the (H,T,T)
// matrices again, 1.5 GiB per matrix at T = 4096, H = 16: more than bf16 saves in the GEMMs.)
// The fp32-operand functions are the path of fp32 mode and of MOET_CUDA_GEMM_OPERANDS=fp32.
#include <math.h>

#include "kernels/cuda/cublas_util.cuh"
#include "kernels/cuda/kernels_cuda.h"

enum { ATTN_ROW_THREADS = 128 }; // threads per softmax row (a multiple of 32)

// ---------------------------------------------------------------------------------------
// Causal query blocks

// 0: the default rule of cuda_attention_query_block; -1: not yet read from
// MOET_CUDA_ATTN_QBLOCK (read at the first attention)
static int query_block_ = -1;

static int query_block_from_env_(void) {
    const char *s = getenv("MOET_CUDA_ATTN_QBLOCK");
    if (!s || !*s) return 0;
    char *end = NULL;
    const long v = strtol(s, &end, 10);
    if (*end != '\0' || v < 0 || v > (1L << 30)) {
        fprintf(stderr,
                "moet: fatal: MOET_CUDA_ATTN_QBLOCK=%s: expected a number of query rows >= 0\n"
                "---> HINT: unset it (or 0) for the default blocks; a value >= seq_len runs the "
                "attention as one block (the A/B comparison)\n",
                s);
        exit(EXIT_FAILURE);
    }
    if (v > 0)
        fprintf(stderr, "moet: note: MOET_CUDA_ATTN_QBLOCK=%ld: attention in query blocks of %ld "
                        "rows\n", v, v);
    return (int)v;
}

void cuda_set_attention_query_block(int qb) {
    query_block_ = qb < 0 ? query_block_from_env_() : qb;
}

int cuda_attention_query_block(int T) {
    if (query_block_ < 0) query_block_ = query_block_from_env_();
    if (query_block_ > 0) return query_block_ < T ? query_block_ : T;
    if (T < 512) return T;
    const int qb = ((T + 3) / 4 + 63) / 64 * 64;
    return qb < T ? qb : T;
}

// The keys the rows of query t's block reach: [0, kend) with kend = min(Tk, (t / qb + 1) * qb),
// or Tk when qb >= Tq (one block: every row whole; generation, where Tq < Tk, always). The row
// kernels write that far, the GEMMs read that far.
static __device__ __forceinline__ int block_key_end_(int t, int qb, int Tq, int Tk) {
    if (qb >= Tq) return Tk;
    const long long e = ((long long)(t / qb) + 1) * qb;
    return e < Tk ? (int)e : Tk;
}

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
// rectangle adds nothing from the future; the row is written up to its query block's last key
// (block_key_end_; qb >= Tq: the whole row). lse (NULL: not wanted) = m + log(sum) is the
// log-sum-exp of the scaled scores, as on the CPU. The sum is an fp32 tree over <= Tk terms in
// (0, 1]: relative error ~ log2(Tk) ulp.
static __global__ void attention_softmax_kernel(float *s, float *lse, int Tq, int Tk, int qb) {
    __shared__ float red[32];
    const int row = blockIdx.x; // h*Tq + t
    const int t = row % Tq;
    const int nk = Tk - Tq + t + 1;
    const int kend = block_key_end_(t, qb, Tq, Tk);
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
    for (int j = threadIdx.x; j < kend; j += blockDim.x) sr[j] = j < nk ? sr[j] * inv : 0.0f;
    if (lse && threadIdx.x == 0) lse[row] = m + logf(sum);
}

// attention_softmax_kernel's bf16 twin, for the bf16 operand path: reads the scores s of one
// block of rows (nrows = a chunk of heads times Tq, each Tk long; query t = row % Tq as there)
// and writes the probabilities, rounded to nearest bf16, to p16 (same layout), s untouched.
// The exponentials are recomputed in the last pass instead of stored (the row is in cache), so
// P's values are exactly the fp32 kernel's, then rounded. lse (NULL: not wanted) as there.
static __global__ void attention_softmax_bf16_kernel(__nv_bfloat16 *p16, float *lse, const float *s,
                                                     int Tq, int Tk, int qb) {
    __shared__ float red[32];
    const int row = blockIdx.x;
    const int t = row % Tq;
    const int nk = Tk - Tq + t + 1;
    const int kend = block_key_end_(t, qb, Tq, Tk);
    const float *sr = s + (size_t)row * Tk;
    __nv_bfloat16 *pr = p16 + (size_t)row * Tk;
    float m = -INFINITY;
    for (int j = threadIdx.x; j < nk; j += blockDim.x) m = fmaxf(m, sr[j]);
    m = block_max_f32(m, red);
    float sum = 0.0f;
    for (int j = threadIdx.x; j < nk; j += blockDim.x) sum += expf(sr[j] - m);
    sum = block_sum_f32(sum, red);
    const float inv = 1.0f / sum;
    for (int j = threadIdx.x; j < kend; j += blockDim.x)
        pr[j] = __float2bfloat16_rn(j < nk ? expf(sr[j] - m) * inv : 0.0f);
    if (lse && threadIdx.x == 0) lse[row] = m + logf(sum);
}

// Heads per chunk in the workspace when `fixed` elements of it are taken and each head needs
// nslices (Tq,Tk) bf16 matrices: as many as the limit leaves room for (at least 1), then
// evened out over the chunks that makes (16 heads that fit 14 at a time go as 8 + 8).
static int head_chunk_(size_t fixed, size_t TqTk, int nslices, int H) {
    const size_t limit = gemm_workspace_limit_elems_();
    const size_t slack = 127 * (size_t)nslices; // what ws_align_ may add to the slices
    const size_t avail = limit > fixed + slack ? limit - fixed - slack : 0;
    size_t hc = avail / (TqTk * (size_t)nslices);
    if (hc < 1) hc = 1;
    if (hc >= (size_t)H) return H;
    const int chunks = (int)((H + hc - 1) / hc);
    return (H + chunks - 1) / chunks;
}

// The causal softmax and O = P V of one sequence on bf16 operands, in chunks of hc heads: per
// chunk the bf16 softmax writes the chunk's P into p16 (room for hc (Tq,Tk) matrices), then
// the chunk's heads multiply it. s is the sequence's (H,Tq,Tk) scores, lse its (H,Tq) or NULL,
// v16 the bf16 copy of its (Tk,H*Dh) values, out its (Tq,H*Dh) output.
// Per head, column-major: O^T (Dh,Tq) = V^T (Dh,Tk) * P^T (Tk,Tq), as the fp32 path.
// qb: the query blocks (qb >= Tq: one block; generation, where Tq != Tk, always passes Tq);
// block [t0, t0 + nq) multiplies keys [0, t0 + nq) only.
static void softmax_pv_bf16_(float *out, float *lse, const float *s, const __nv_bfloat16 *v16,
                             __nv_bfloat16 *p16, int Tq, int Tk, int H, int Dh, int hc, int qb) {
    const int ld = H * Dh;
    const long long TqTk = (long long)Tq * Tk;
    for (int h0 = 0; h0 < H; h0 += hc) {
        const int nh = hc < H - h0 ? hc : H - h0;
        attention_softmax_bf16_kernel<<<(unsigned)(nh * Tq), ATTN_ROW_THREADS>>>(
            p16, lse ? lse + (size_t)h0 * Tq : NULL, s + (size_t)h0 * TqTk, Tq, Tk, qb);
        CUDA_CHECK_LAUNCH();
        for (int t0 = 0; t0 < Tq; t0 += qb) {
            const int nq = qb < Tq - t0 ? qb : Tq - t0, nk = qb >= Tq ? Tk : t0 + nq;
            gemm_bf16_strided_batched_(CUBLAS_OP_N, CUBLAS_OP_N, Dh, nq, nk, 1.0f, v16 + h0 * Dh,
                                       ld, Dh, p16 + (size_t)t0 * Tk, Tk, TqTk, 0.0f,
                                       out + (size_t)t0 * ld + h0 * Dh, ld, Dh, nh);
        }
    }
}

// Stops with a message when a caller passed no scratch (a bug in the caller).
static void need_scratch_(const char *fn, const void *scratch) {
    if (scratch) return;
    fprintf(stderr, "moet: fatal: %s: scratch is NULL (allocate cuda_attention_scratch_bytes(T, "
                    "H) bytes)\n", fn);
    exit(EXIT_FAILURE);
}

// The scaled scores of one sequence, s[h*T*T + t*T + j] = scale * q_t . k_j per head, into s
// (H,T,T). Forward and backward both call these GEMMs, so the backward recomputes exactly the
// forward's scores. Per head h, column-major: S^T (T,T) = scale * K (T,Dh) * Q^T (Dh,T) (K is
// stored as the column-major (Dh,T) K^T: op T; Q as Q^T: op N). qb, kb point at the sequence.
// Per query block [t0, t0 + nq) of size qblk, only its keys [0, t0 + nq): S^T's rows below
// t0 + nq in its columns t0 .. t0 + nq - 1.
static void scores_(float *s, const float *qb, const float *kb, int T, int H, int Dh, float scale,
                    int qblk) {
    const int ld = H * Dh;
    for (int t0 = 0; t0 < T; t0 += qblk) {
        const int nq = qblk < T - t0 ? qblk : T - t0;
        gemm_f32_strided_batched_(CUBLAS_OP_T, CUBLAS_OP_N, t0 + nq, nq, Dh, scale, kb, ld, Dh,
                                  qb + (size_t)t0 * ld, ld, Dh, 0.0f, s + (size_t)t0 * T, T,
                                  (long long)T * T, H);
    }
}

// scores_ on bf16 operands (q16, k16: the sequence's bf16 copies); also dP^T = V dO^T, the same
// form, with (v16, do16) for (k16, q16) and scale 1.
static void scores_bf16_(float *s, const __nv_bfloat16 *q16, const __nv_bfloat16 *k16, int T,
                         int H, int Dh, float scale, int qblk) {
    const int ld = H * Dh;
    for (int t0 = 0; t0 < T; t0 += qblk) {
        const int nq = qblk < T - t0 ? qblk : T - t0;
        gemm_bf16_strided_batched_(CUBLAS_OP_T, CUBLAS_OP_N, t0 + nq, nq, Dh, scale, k16, ld, Dh,
                                   q16 + (size_t)t0 * ld, ld, Dh, 0.0f, s + (size_t)t0 * T, T,
                                   (long long)T * T, H);
    }
}

// cuda_attention_forward on bf16 operands; s is the (H,T,T) scratch.
static void attention_forward_bf16_(float *out, float *lse, const float *q, const float *k,
                                    const float *v, int B, int T, int H, int Dh, float *s) {
    const int ld = H * Dh;
    const long long TT = (long long)T * T;
    const float scale = 1.0f / sqrtf((float)Dh);
    const size_t blk = ws_align_((size_t)T * ld); // one sequence's q, k or v in bf16
    const int flash = cuda_attention_flash(Dh);   // attention_flash.cu: no scores in s, no P
    const int hc = head_chunk_(3 * blk, (size_t)TT, 1, H);
    const int qblk = cuda_attention_query_block(T);
    __nv_bfloat16 *q16 = gemm_workspace_(3 * blk + (flash ? 0 : ws_align_((size_t)hc * TT)));
    __nv_bfloat16 *k16 = q16 + blk, *v16 = k16 + blk, *p16 = v16 + blk;
    for (int b = 0; b < B; b++) {
        const size_t base = (size_t)b * T * ld;
        f32_to_bf16_rn_(q16, q + base, (size_t)T * ld);
        f32_to_bf16_rn_(k16, k + base, (size_t)T * ld);
        f32_to_bf16_rn_(v16, v + base, (size_t)T * ld);
        if (flash) {
            cuda_attention_flash_forward_(out + base, lse + (size_t)b * H * T, q16, k16, v16, T, H,
                                          Dh);
            continue;
        }
        // the scores as scores_ computes them: S^T (T,T) = scale * K (T,Dh) * Q^T (Dh,T)
        scores_bf16_(s, q16, k16, T, H, Dh, scale, qblk);
        softmax_pv_bf16_(out + base, lse + (size_t)b * H * T, s, v16, p16, T, T, H, Dh, hc, qblk);
    }
}

// out, q, k, v are (B,T,H,Dh); lse is (B,H,T); scratch is cuda_attention_scratch_bytes(T, H)
void cuda_attention_forward(float *out, float *lse, const float *q, const float *k, const float *v,
                            int B, int T, int H, int Dh, void *scratch) {
    if (B <= 0 || T <= 0 || H <= 0 || Dh <= 0) return;
    need_scratch_("cuda_attention_forward", scratch);
    if (gemm_bf16_operands_()) {
        attention_forward_bf16_(out, lse, q, k, v, B, T, H, Dh, (float *)scratch);
        return;
    }
    const int ld = H * Dh;
    const long long TT = (long long)T * T;
    const float scale = 1.0f / sqrtf((float)Dh);
    float *s = (float *)scratch; // (H,T,T)
    const int qblk = cuda_attention_query_block(T);
    for (int b = 0; b < B; b++) {
        const size_t base = (size_t)b * T * ld;
        const float *qb = q + base, *kb = k + base, *vb = v + base;
        scores_(s, qb, kb, T, H, Dh, scale, qblk);
        attention_softmax_kernel<<<(unsigned)(H * T), ATTN_ROW_THREADS>>>(
            s, lse + (size_t)b * H * T, T, T, qblk);
        CUDA_CHECK_LAUNCH();
        // Per head, column-major: O^T (Dh,T) = V^T (Dh,T) * P^T (T,T)
        // (V stored as V^T: op N; row-major P read column-major is P^T: op N); O^T with
        // leading dimension ld is exactly the head's columns of out (B,T,H,Dh). Per query
        // block: O^T's columns t0 .. t0 + nq - 1 from V^T's first t0 + nq columns.
        for (int t0 = 0; t0 < T; t0 += qblk) {
            const int nq = qblk < T - t0 ? qblk : T - t0;
            gemm_f32_strided_batched_(CUBLAS_OP_N, CUBLAS_OP_N, Dh, nq, t0 + nq, 1.0f, vb, ld, Dh,
                                      s + (size_t)t0 * T, T, TT, 0.0f,
                                      out + base + (size_t)t0 * ld, ld, Dh, H);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Backward

// One block per row (h, t) of one sequence. p holds S (the scaled scores) and receives
// P = exp(S - lse) for keys j <= t and exactly 0 beyond (the forward's probabilities, exact up
// to rounding since lse is their normaliser). When ds is set it holds dP = dO V^T and receives
// dS = P * (dP - D_t) (0 beyond t), where D_t = dO_t . O_t = sum_j P_tj dP_tj is the softmax
// Jacobian's correction, an fp32 tree over the Dh products. dout_b and out_b point at the
// sequence's (T,H,Dh) block. Rows are written up to their query block's last key (qb).
static __global__ void attention_backward_rows_kernel(float *p, float *ds, const float *lse_b,
                                                      const float *dout_b, const float *out_b,
                                                      int T, int H, int Dh, int qb) {
    __shared__ float red[32];
    const int row = blockIdx.x; // h*T + t
    const int h = row / T, t = row % T;
    const int kend = block_key_end_(t, qb, T, T);
    float *pr = p + (size_t)row * T;
    float *dsr = ds ? ds + (size_t)row * T : NULL;
    float d = 0.0f;
    if (dsr) { // the same for the whole block, so every thread reaches the block sum
        const size_t off = ((size_t)t * H + h) * Dh;
        for (int c = threadIdx.x; c < Dh; c += blockDim.x) d += dout_b[off + c] * out_b[off + c];
        d = block_sum_f32(d, red);
    }
    const float l = lse_b[row];
    for (int j = threadIdx.x; j < kend; j += blockDim.x) {
        const float pj = j <= t ? expf(pr[j] - l) : 0.0f;
        pr[j] = pj;
        if (dsr) dsr[j] = j <= t ? pj * (dsr[j] - d) : 0.0f;
    }
}

// attention_backward_rows_kernel's bf16 twin, for one chunk of heads [h0, h0 + gridDim.x / T)
// of one sequence: reads S from s and dP from dp (NULL: dS not wanted), the sequence's (H,T,T)
// scratch, and writes the chunk's P to p16 (NULL: not wanted) and dS to ds16, rounded to
// nearest bf16, chunk-relative ((h - h0)*T + t, T long); s and dp are left as they are. The
// values are the fp32 kernel's, then rounded.
static __global__ void attention_backward_rows_bf16_kernel(__nv_bfloat16 *p16, __nv_bfloat16 *ds16,
                                                           const float *s, const float *dp,
                                                           const float *lse_b, const float *dout_b,
                                                           const float *out_b, int T, int H, int Dh,
                                                           int h0, int qb) {
    __shared__ float red[32];
    const int row = blockIdx.x; // (h - h0)*T + t
    const int h = h0 + row / T, t = row % T;
    const int kend = block_key_end_(t, qb, T, T);
    const size_t g = ((size_t)h * T + t) * T; // the row in the sequence's (H,T,T) scratch
    const float *sr = s + g;
    const float *dpr = dp ? dp + g : NULL;
    __nv_bfloat16 *pr = p16 ? p16 + (size_t)row * T : NULL;
    __nv_bfloat16 *dsr = dp ? ds16 + (size_t)row * T : NULL;
    float d = 0.0f;
    if (dpr) { // the same for the whole block, so every thread reaches the block sum
        const size_t off = ((size_t)t * H + h) * Dh;
        for (int c = threadIdx.x; c < Dh; c += blockDim.x) d += dout_b[off + c] * out_b[off + c];
        d = block_sum_f32(d, red);
    }
    const float l = lse_b[h * T + t];
    for (int j = threadIdx.x; j < kend; j += blockDim.x) {
        const float pj = j <= t ? expf(sr[j] - l) : 0.0f;
        if (pr) pr[j] = __float2bfloat16_rn(pj);
        if (dsr) dsr[j] = __float2bfloat16_rn(j <= t ? pj * (dpr[j] - d) : 0.0f);
    }
}

// cuda_attention_backward on bf16 operands; s and dp are the two (H,T,T) halves of scratch.
static void attention_backward_bf16_(float *dq, float *dk, float *dv, const float *dout,
                                     const float *out, const float *lse, const float *q,
                                     const float *k, const float *v, int B, int T, int H, int Dh,
                                     float *s, float *dp) {
    const int ld = H * Dh;
    const long long TT = (long long)T * T;
    const float scale = 1.0f / sqrtf((float)Dh);
    const int need_ds = dq != NULL || dk != NULL; // dv needs P only (and then neither v nor dP)
    const size_t blk = ws_align_((size_t)T * ld);
    const size_t nblk = need_ds ? 4 : 3; // q, k, dO, and v for dP
    const int nslices = (dv != NULL) + need_ds;
    const int hc = head_chunk_(nblk * blk, (size_t)TT, nslices, H);
    const int qblk = cuda_attention_query_block(T);
    const size_t sl = ws_align_((size_t)hc * TT); // one chunk's P or dS
    // the workspace: q, k, dO (and v) of a sequence, then a chunk's P (for dv) and dS (dq, dk)
    __nv_bfloat16 *q16 = gemm_workspace_(nblk * blk + (size_t)nslices * sl);
    __nv_bfloat16 *k16 = q16 + blk, *do16 = k16 + blk;
    __nv_bfloat16 *v16 = need_ds ? do16 + blk : NULL;
    __nv_bfloat16 *p16 = dv ? q16 + nblk * blk : NULL;
    __nv_bfloat16 *ds16 = need_ds ? q16 + nblk * blk + (dv ? sl : 0) : NULL;
    for (int b = 0; b < B; b++) {
        const size_t base = (size_t)b * T * ld;
        f32_to_bf16_rn_(q16, q + base, (size_t)T * ld);
        f32_to_bf16_rn_(k16, k + base, (size_t)T * ld);
        f32_to_bf16_rn_(do16, dout + base, (size_t)T * ld);
        // S, exactly as the forward computed it (the same GEMMs on the same bf16 operands)
        scores_bf16_(s, q16, k16, T, H, Dh, scale, qblk);
        if (need_ds) {
            f32_to_bf16_rn_(v16, v + base, (size_t)T * ld);
            // dP^T (T,T) = V (T,Dh) * dO^T (Dh,T), per query block as S
            scores_bf16_(dp, do16, v16, T, H, Dh, 1.0f, qblk);
        }
        for (int h0 = 0; h0 < H; h0 += hc) {
            const int nh = hc < H - h0 ? hc : H - h0;
            attention_backward_rows_bf16_kernel<<<(unsigned)(nh * T), ATTN_ROW_THREADS>>>(
                p16, ds16, s, need_ds ? dp : NULL, lse + (size_t)b * H * T, dout + base, out + base,
                T, H, Dh, h0, qblk);
            CUDA_CHECK_LAUNCH();
            // per query block [t0, t0 + nq): its rows of P and dS, keys [0, nk)
            for (int t0 = 0; t0 < T; t0 += qblk) {
                const int nq = qblk < T - t0 ? qblk : T - t0, nk = t0 + nq;
                const size_t r = (size_t)t0 * ld + h0 * Dh; // the block's first row, chunk's head
                if (dv) // dV^T (Dh,nk) += dO^T (Dh,nq) * P (nq,nk)
                    gemm_bf16_strided_batched_(CUBLAS_OP_N, CUBLAS_OP_T, Dh, nk, nq, 1.0f, do16 + r,
                                               ld, Dh, p16 + (size_t)t0 * T, T, TT, 1.0f,
                                               dv + base + h0 * Dh, ld, Dh, nh);
                if (dq) // dQ^T (Dh,nq) += scale * K^T (Dh,nk) * dS^T (nk,nq)
                    gemm_bf16_strided_batched_(CUBLAS_OP_N, CUBLAS_OP_N, Dh, nq, nk, scale,
                                               k16 + h0 * Dh, ld, Dh, ds16 + (size_t)t0 * T, T, TT,
                                               1.0f, dq + base + r, ld, Dh, nh);
                if (dk) // dK^T (Dh,nk) += scale * Q^T (Dh,nq) * dS (nq,nk)
                    gemm_bf16_strided_batched_(CUBLAS_OP_N, CUBLAS_OP_T, Dh, nk, nq, scale, q16 + r,
                                               ld, Dh, ds16 + (size_t)t0 * T, T, TT, 1.0f,
                                               dk + base + h0 * Dh, ld, Dh, nh);
            }
        }
    }
}

// Accumulates (+=) into dq, dk, dv (each may be NULL); all are (B,T,H,Dh) like dout, out, q, k,
// v; lse is (B,H,T) from the forward; scratch is cuda_attention_scratch_bytes(T, H).
void cuda_attention_backward(float *dq, float *dk, float *dv, const float *dout, const float *out,
                             const float *lse, const float *q, const float *k, const float *v,
                             int B, int T, int H, int Dh, void *scratch) {
    if (B <= 0 || T <= 0 || H <= 0 || Dh <= 0 || (!dq && !dk && !dv)) return;
    need_scratch_("cuda_attention_backward", scratch);
    if (gemm_bf16_operands_()) {
        attention_backward_bf16_(dq, dk, dv, dout, out, lse, q, k, v, B, T, H, Dh, (float *)scratch,
                                 (float *)scratch + (size_t)H * T * T);
        return;
    }
    const int ld = H * Dh;
    const long long TT = (long long)T * T;
    const float scale = 1.0f / sqrtf((float)Dh);
    float *p = (float *)scratch;                  // (H,T,T): S, then P
    float *ds = p + (size_t)H * T * T;            // (H,T,T): dP, then dS
    const int need_ds = dq != NULL || dk != NULL; // dv needs P only
    const int qblk = cuda_attention_query_block(T);
    for (int b = 0; b < B; b++) {
        const size_t base = (size_t)b * T * ld;
        const float *qb = q + base, *kb = k + base, *vb = v + base, *dob = dout + base;
        scores_(p, qb, kb, T, H, Dh, scale, qblk);
        // dP = dO V^T, the same form as S: column-major dP^T (T,T) = V (T,Dh) * dO^T (Dh,T)
        if (need_ds) scores_(ds, dob, vb, T, H, Dh, 1.0f, qblk);
        attention_backward_rows_kernel<<<(unsigned)(H * T), ATTN_ROW_THREADS>>>(
            p, need_ds ? ds : NULL, lse + (size_t)b * H * T, dob, out + base, T, H, Dh, qblk);
        CUDA_CHECK_LAUNCH();
        // per query block [t0, t0 + nq): its rows of P and dS, keys [0, nk)
        for (int t0 = 0; t0 < T; t0 += qblk) {
            const int nq = qblk < T - t0 ? qblk : T - t0, nk = t0 + nq;
            const size_t r = base + (size_t)t0 * ld; // the block's first row
            if (dv) {
                // dV += P^T dO. Column-major: dV^T (Dh,nk) += dO^T (Dh,nq) * P (nq,nk)
                // (dO stored as dO^T: op N; row-major P read column-major is P^T, so op T
                // gives P)
                gemm_f32_strided_batched_(CUBLAS_OP_N, CUBLAS_OP_T, Dh, nk, nq, 1.0f, dout + r, ld,
                                          Dh, p + (size_t)t0 * T, T, TT, 1.0f, dv + base, ld, Dh,
                                          H);
            }
            if (dq) {
                // dQ += scale dS K. Column-major: dQ^T (Dh,nq) += scale * K^T (Dh,nk) * dS^T
                // (nk,nq) (K stored as K^T: op N; row-major dS read column-major is dS^T: op N)
                gemm_f32_strided_batched_(CUBLAS_OP_N, CUBLAS_OP_N, Dh, nq, nk, scale, kb, ld, Dh,
                                          ds + (size_t)t0 * T, T, TT, 1.0f, dq + r, ld, Dh, H);
            }
            if (dk) {
                // dK += scale dS^T Q. Column-major: dK^T (Dh,nk) += scale * Q^T (Dh,nq) * dS
                // (nq,nk) (Q stored as Q^T: op N; dS read column-major is dS^T, op T gives dS)
                gemm_f32_strided_batched_(CUBLAS_OP_N, CUBLAS_OP_T, Dh, nk, nq, scale, q + r, ld,
                                          Dh, ds + (size_t)t0 * T, T, TT, 1.0f, dk + base, ld, Dh,
                                          H);
            }
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
    if (gemm_bf16_operands_()) { // the same steps on bf16 copies of q, k, v and P
        const size_t bq = ws_align_((size_t)Tq * ld), bk = ws_align_((size_t)Tk * ld);
        const int hc = head_chunk_(bq + 2 * bk, (size_t)Tq * Tk, 1, H);
        __nv_bfloat16 *q16 = gemm_workspace_(bq + 2 * bk + ws_align_((size_t)hc * Tq * Tk));
        __nv_bfloat16 *k16 = q16 + bq, *v16 = k16 + bk, *p16 = v16 + bk;
        f32_to_bf16_rn_(q16, q, (size_t)Tq * ld);
        f32_to_bf16_rn_(k16, k, (size_t)Tk * ld);
        f32_to_bf16_rn_(v16, v, (size_t)Tk * ld);
        gemm_bf16_strided_batched_(CUBLAS_OP_T, CUBLAS_OP_N, Tk, Tq, Dh, scale, k16, ld, Dh, q16,
                                   ld, Dh, 0.0f, s, Tk, (long long)Tq * Tk, H);
        softmax_pv_bf16_(out, NULL, s, v16, p16, Tq, Tk, H, Dh, hc, Tq); // one query block
        return;
    }
    // per head, column-major: S^T (Tk,Tq) = scale * K (Tk,Dh) * Q^T (Dh,Tq)
    gemm_f32_strided_batched_(CUBLAS_OP_T, CUBLAS_OP_N, Tk, Tq, Dh, scale, k, ld, Dh, q, ld, Dh,
                              0.0f, s, Tk, (long long)Tq * Tk, H);
    attention_softmax_kernel<<<(unsigned)(H * Tq), ATTN_ROW_THREADS>>>(s, NULL, Tq, Tk, Tq);
    CUDA_CHECK_LAUNCH();
    // O^T (Dh,Tq) = V^T (Dh,Tk) * P^T (Tk,Tq)
    gemm_f32_strided_batched_(CUBLAS_OP_N, CUBLAS_OP_N, Dh, Tq, Tk, 1.0f, v, ld, Dh, s, Tk,
                              (long long)Tq * Tk, 0.0f, out, ld, Dh, H);
}
