// ops.cu: the model's non-GEMM ops of the CUDA backend: embedding, RoPE, the MoE router and
// its auxiliary-loss sums, the dispatch plan, permute / unpermute, and cross-entropy. Each
// mirrors the CPU op of the same name in kernels/cpu/ and is tested against it by
// tests/cuda/test_cuda_moe_ops.c. No floating-point atomics: every sum has a fixed order that
// depends on the shapes only, so the results are the same bits from run to run.
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/kernels_cuda.h"

// Prints a message about a wrong argument (a bug in the caller) and exits like CUDA_CHECK.
static void die_(const char *fn, const char *what) {
    fprintf(stderr, "moet: fatal: %s: %s\n", fn, what);
    exit(EXIT_FAILURE);
}

// ---------------------------------------------------------------------------------------
// Row-wise launch sizing: one block per row (grid-stride over the rows), threads over the
// columns. A block is at most 256 threads and no wider than the row needs (D = 48 gets 64).
enum { ROW_MAX_THREADS = 256 };
enum { ROW_MAX_BLOCKS = 1 << 20 };

static unsigned row_threads_(int D) {
    const int t = (D + 31) / 32 * 32;
    return (unsigned)(t < 32 ? 32 : t > ROW_MAX_THREADS ? ROW_MAX_THREADS : t);
}

static unsigned row_blocks_(size_t rows) {
    return (unsigned)(rows < (size_t)ROW_MAX_BLOCKS ? rows : (size_t)ROW_MAX_BLOCKS);
}

// ---------------------------------------------------------------------------------------
// Row gather: out[r] = src[idx[r]] for r < R. Embedding forward (idx = tokens, src = wte) and
// permute forward (idx = row_token, src = x) are both this copy.
// out is (R,D), src is (?,D), idx is (R)
static __global__ void gather_rows_kernel(float *out, const float *src, const int32_t *idx, int R,
                                          int D) {
    for (int r = blockIdx.x; r < R; r += gridDim.x) {
        const float *s = src + (size_t)idx[r] * D;
        float *o = out + (size_t)r * D;
        for (int c = threadIdx.x; c < D; c += blockDim.x) o[c] = s[c];
    }
}

static void gather_rows_(float *out, const float *src, const int32_t *idx, int R, int D) {
    if (R <= 0 || D <= 0) return;
    gather_rows_kernel<<<row_blocks_((size_t)R), row_threads_(D)>>>(out, src, idx, R, D);
    CUDA_CHECK_LAUNCH();
}

// ---------------------------------------------------------------------------------------
// Embedding

void cuda_embedding_forward(float *out, const int32_t *tokens, const float *wte, int N, int D) {
    gather_rows_(out, wte, tokens, N, D);
}

// The backward plan lives in scratch as int32: uniq (N) the distinct token ids in increasing
// order, start (N+1) where each one's run begins in pos, pos (N) the positions sorted by token
// id and, within a token, in increasing position (only the first n_unique entries of uniq and
// n_unique + 1 of start are used).
size_t cuda_embedding_backward_scratch_bytes(int N) {
    if (N <= 0) return 0;
    return (3 * (size_t)N + 1) * sizeof(int32_t);
}

// Builds the plan above on the host into plan (3N+1). pos is sorted by a stable LSD radix
// sort on the token ids, 8 bits a pass and only as many passes as the largest id needs
// (2 for a 50k vocabulary): O(N) where a comparison sort would be O(N log N), and stable, so
// each token's positions stay in increasing order. Returns n_unique.
static int embedding_plan_(int32_t *plan, const int32_t *tokens, int N) {
    int32_t *uniq = plan, *start = plan + N, *pos = plan + 2 * (size_t)N + 1;
    int32_t *tmp = (int32_t *)malloc((size_t)N * sizeof(int32_t));
    if (!tmp) die_("cuda_embedding_backward", "out of host memory for the sort of the tokens");
    uint32_t max_tok = 0;
    for (int i = 0; i < N; i++) {
        if (tokens[i] < 0)
            die_("cuda_embedding_backward", "a token id is negative (tokens_host must hold the "
                                            "HOST copy of the token ids)");
        if ((uint32_t)tokens[i] > max_tok) max_tok = (uint32_t)tokens[i];
        pos[i] = i;
    }
    for (int shift = 0; shift < 32 && (shift == 0 || (max_tok >> shift) != 0); shift += 8) {
        size_t bucket[257] = {0}; // bucket[d + 1] counts digit d, then the prefix sums
        for (int i = 0; i < N; i++) bucket[(((uint32_t)tokens[pos[i]] >> shift) & 255u) + 1]++;
        for (int d = 0; d < 256; d++) bucket[d + 1] += bucket[d];
        for (int i = 0; i < N; i++)
            tmp[bucket[((uint32_t)tokens[pos[i]] >> shift) & 255u]++] = pos[i];
        memcpy(pos, tmp, (size_t)N * sizeof(int32_t));
    }
    free(tmp);
    int nu = 0;
    for (int i = 0; i < N; i++) {
        const int32_t tok = tokens[pos[i]];
        if (i == 0 || tok != uniq[nu - 1]) {
            uniq[nu] = tok;
            start[nu] = i;
            nu++;
        }
    }
    start[nu] = N;
    return nu;
}

// dwte[uniq[u]] += dout[pos[p]] for p in [start[u], start[u+1]), in that (position) order.
// One block per distinct token, threads over the columns: each column starts from dwte's
// value and adds the rows one at a time, exactly the additions of the CPU op in the same
// order (the same bits), and no two blocks write the same row, so no atomics are needed.
// dwte is (V,D), dout is (N,D)
static __global__ void embedding_backward_kernel(float *dwte, const float *dout,
                                                 const int32_t *uniq, const int32_t *start,
                                                 const int32_t *pos, int n_unique, int D) {
    for (int u = blockIdx.x; u < n_unique; u += gridDim.x) {
        float *dst = dwte + (size_t)uniq[u] * D;
        const int p0 = start[u], p1 = start[u + 1];
        for (int c = threadIdx.x; c < D; c += blockDim.x) {
            float acc = dst[c];
            for (int p = p0; p < p1; p++) acc += dout[(size_t)pos[p] * D + c];
            dst[c] = acc;
        }
    }
}

void cuda_embedding_backward(float *dwte, const float *dout, const int32_t *tokens_host, int N,
                             int D, void *scratch) {
    if (!dwte || N <= 0 || D <= 0) return;
    if (!scratch)
        die_("cuda_embedding_backward",
             "scratch is NULL (allocate cuda_embedding_backward_scratch_bytes(N) bytes)");
    const size_t plan_n = 3 * (size_t)N + 1;
    int32_t *plan = (int32_t *)calloc(plan_n, sizeof(int32_t)); // unused tail entries stay 0
    if (!plan) die_("cuda_embedding_backward", "out of host memory for the plan");
    const int nu = embedding_plan_(plan, tokens_host, N);
    // Synchronous copy on the default stream: ordered after any earlier op that used this
    // scratch, and the host buffer may be freed when it returns.
    int32_t *d_plan = (int32_t *)scratch;
    cuda_memcpy_h2d(d_plan, plan, plan_n * sizeof(int32_t));
    free(plan);
    embedding_backward_kernel<<<row_blocks_((size_t)nu), row_threads_(D)>>>(
        dwte, dout, d_plan, d_plan + N, d_plan + 2 * (size_t)N + 1, nu, D);
    CUDA_CHECK_LAUNCH();
}

// ---------------------------------------------------------------------------------------
// RoPE, rotate-half (pairs i and i + Dh/2), angle t * theta^(-2i/Dh).
// The inverse frequencies are computed on the host with the CPU op's expression (glibc pow,
// double) and passed by value, so the device gets the same bits; the angle t * inv_freq is one
// double multiply on both sides, and cos / sin are taken in double (CUDA's double sin / cos are
// within 2 ulp of double, far below the final rounding to float). The angle reaches
// 4096 radians at the longest contexts, where a float angle would already be off by ~2e-4.
enum { ROPE_MAX_HALF = 256 }; // Dh <= 512
enum { ROPE_THREADS = 256 };

typedef struct {
    double inv_freq[ROPE_MAX_HALF]; // 2 KB of kernel parameters
} RopeFreqs;

// Rotates every (b, t, h) row of src (row t is position pos0 + t) by +angle (dir = 1, forward)
// or -angle (dir = -1, the transpose, backward): dst = R src. One block per position t: its
// threads first put cos and sin of the Dh/2 angles at t into shared memory, then rotate every
// pair (b, h, i) at that t. Both elements of a pair are read by the thread that writes them,
// before it writes, so dst may alias src. The arithmetic is
// spelled with __fmul_rn / __fadd_rn so that nvcc does not fuse it into FMAs: the CPU op
// (ISO C, no contraction) rounds each product, and so the results match it bit for bit.
// dst, src are (B,T,H,Dh); dynamic shared memory is 2 * (Dh/2) floats
static __global__ void rope_kernel(float *dst, const float *src, int B, int T, int H, int Dh,
                                   RopeFreqs f, float dir, int pos0) {
    extern __shared__ float cs[]; // cos at [0, half), dir * sin at [half, 2 half)
    const int t = blockIdx.x;
    const int half = Dh / 2;
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        double s, c;
        sincos((double)(pos0 + t) * f.inv_freq[i], &s, &c);
        cs[i] = (float)c;
        cs[half + i] = dir * (float)s;
    }
    __syncthreads();
    const size_t ld = (size_t)H * Dh;
    const size_t n_pairs = (size_t)B * H * half;
    for (size_t p = threadIdx.x; p < n_pairs; p += blockDim.x) {
        const int i = (int)(p % half);
        const size_t bh = p / half;
        const int h = (int)(bh % H), b = (int)(bh / H);
        const size_t o = ((size_t)b * T + t) * ld + (size_t)h * Dh + i;
        const float x1 = src[o], x2 = src[o + half];
        const float c = cs[i], s = cs[half + i];
        const float y1 = __fsub_rn(__fmul_rn(x1, c), __fmul_rn(x2, s));
        const float y2 = __fadd_rn(__fmul_rn(x2, c), __fmul_rn(x1, s));
        dst[o] = y1;
        dst[o + half] = y2;
    }
}

static void rope_apply_(const char *fn, float *dst, const float *src, int B, int T, int H, int Dh,
                        float theta, float dir, int pos0) {
    if (B <= 0 || T <= 0 || H <= 0 || Dh < 2) return;
    const int half = Dh / 2;
    if (half > ROPE_MAX_HALF) die_(fn, "the head dimension Dh is above 512 (ROPE_MAX_HALF)");
    RopeFreqs f;
    memset(&f, 0, sizeof f);
    for (int i = 0; i < half; i++) f.inv_freq[i] = pow((double)theta, -2.0 * i / Dh);
    const size_t smem = 2 * (size_t)half * sizeof(float);
    rope_kernel<<<(unsigned)T, ROPE_THREADS, smem>>>(dst, src, B, T, H, Dh, f, dir, pos0);
    CUDA_CHECK_LAUNCH();
}

// out, inp are (B,T,H,Dh) and may be the same buffer
void cuda_rope_forward(float *out, const float *inp, int B, int T, int H, int Dh, float theta) {
    rope_apply_("cuda_rope_forward", out, inp, B, T, H, Dh, theta, 1.0f, 0);
}

// one sequence, rows at positions pos0 .. pos0+T-1 (generation)
void cuda_rope_forward_at(float *out, const float *inp, int T, int H, int Dh, float theta,
                          int pos0) {
    rope_apply_("cuda_rope_forward_at", out, inp, 1, T, H, Dh, theta, 1.0f, pos0);
}

// dinp = R(-angle) dout (written); dinp may alias dout
void cuda_rope_backward(float *dinp, const float *dout, int B, int T, int H, int Dh, float theta) {
    if (!dinp) return;
    rope_apply_("cuda_rope_backward", dinp, dout, B, T, H, Dh, theta, -1.0f, 0);
}

// ---------------------------------------------------------------------------------------
// Router forward: one warp per token (E is small: 8 to 256).
// Scores as the CPU op: softmax with the max in fp32, exp and sum in double, probs rounded to
// float once; or sigmoid in double rounded to float once. So both backends give the same
// scores to within an ulp and, above all, exactly equal scores for equal logits (which the tie
// rule below relies on).
// Top-k on the key s + bias (one float addition; s without a bias): K passes; pass j takes the
// best expert in the order (key descending, index ascending) among those that come strictly
// after pass j-1's pick in that order. That is the CPU's partial selection sort with its
// strict >, without a "taken" list. Each lane scans its experts e = lane, lane + 32, ... (it
// reads back only the scores it wrote itself), then an xor butterfly with the same total order
// leaves the winner (its key, index and score) in every lane.
// Sigmoid: p holds the scores until the top-k is taken, then s / sum_e s (each lane its own).
// probs, logits are (N,E); bias is (E) or NULL; lse is (N); topk_idx, topk_w are (N,K)
enum { ROUTER_WARPS = 8 };                       // tokens per block
enum { SCORE_SOFTMAX_ = 0, SCORE_SIGMOID_ = 1 }; // kernels.h's ROUTER_SOFTMAX, ROUTER_SIGMOID

__device__ __forceinline__ float sigmoid_score_(float x) {
    return (float)(1.0 / (1.0 + exp(-(double)x)));
}

static __global__ void router_forward_kernel(float *probs, float *lse, int32_t *topk_idx,
                                             float *topk_w, const float *logits, const float *bias,
                                             int N, int E, int K, int norm_topk, int sigmoid) {
    const int t = blockIdx.x * ROUTER_WARPS + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (t >= N) return; // the whole warp leaves together; no block barrier follows
    const float *l = logits + (size_t)t * E;
    float *p = probs + (size_t)t * E;

    float m = -INFINITY;
    for (int e = lane; e < E; e += 32) m = fmaxf(m, l[e]);
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    double sum = 0.0;
    for (int e = lane; e < E; e += 32) sum += exp((double)l[e] - m);
    sum = warp_sum_f64(sum);
    for (int e = lane; e < E; e += 32)
        p[e] = sigmoid ? sigmoid_score_(l[e]) : (float)(exp((double)l[e] - m) / sum);
    if (lane == 0) lse[t] = (float)((double)m + log(sum));

    int32_t *idx = topk_idx + (size_t)t * K;
    float *w = topk_w + (size_t)t * K;
    float prev_k = 0.0f;
    int prev_e = -1;
    double wsum = 0.0;
    for (int j = 0; j < K; j++) {
        float bk = 0.0f, bs = 0.0f; // best key, its score
        int be = -1;                // -1: no candidate yet
        for (int e = lane; e < E; e += 32) {
            const float se = p[e];
            const float ke = bias ? se + bias[e] : se;
            const bool after = j == 0 || ke < prev_k || (ke == prev_k && e > prev_e);
            if (after && (be < 0 || ke > bk)) { // e ascends: the strict > keeps the lower index
                bk = ke;
                bs = se;
                be = e;
            }
        }
        for (int o = 16; o > 0; o >>= 1) {
            const float ok = __shfl_xor_sync(0xffffffffu, bk, o);
            const float os = __shfl_xor_sync(0xffffffffu, bs, o);
            const int oe = __shfl_xor_sync(0xffffffffu, be, o);
            if (oe >= 0 && (be < 0 || ok > bk || (ok == bk && oe < be))) {
                bk = ok;
                bs = os;
                be = oe;
            }
        }
        prev_k = bk;
        prev_e = be;
        wsum += bs;
        if (lane == 0) {
            idx[j] = be;
            w[j] = bs;
        }
    }
    // w[j] holds the score of idx[j] exactly; lane 0 reads back what it wrote. (wsum is 0 only
    // for sigmoid scores that all underflow: equal weights then, as on the CPU.)
    if (norm_topk && lane == 0)
        for (int j = 0; j < K; j++) w[j] = wsum > 0 ? (float)(w[j] / wsum) : 1.0f / K;
    if (sigmoid) {
        double S = 0.0;
        for (int e = lane; e < E; e += 32) S += p[e];
        S = warp_sum_f64(S);
        for (int e = lane; e < E; e += 32) p[e] = S > 0 ? (float)(p[e] / S) : 1.0f / E;
    }
}

void cuda_router_forward_ext(float *probs, float *lse, int32_t *topk_idx, float *topk_w,
                             const float *logits, const float *bias, int N, int E, int K,
                             int norm_topk, int score_fn) {
    if (N <= 0 || E <= 0) return;
    if (K < 0 || K > E) die_("cuda_router_forward", "top-k needs 0 <= K <= E");
    if (score_fn != SCORE_SOFTMAX_ && score_fn != SCORE_SIGMOID_)
        die_("cuda_router_forward", "score_fn is ROUTER_SOFTMAX or ROUTER_SIGMOID");
    const unsigned blocks = (unsigned)((N + ROUTER_WARPS - 1) / ROUTER_WARPS);
    router_forward_kernel<<<blocks, ROUTER_WARPS * 32>>>(
        probs, lse, topk_idx, topk_w, logits, bias, N, E, K, norm_topk, score_fn == SCORE_SIGMOID_);
    CUDA_CHECK_LAUNCH();
}

void cuda_router_forward(float *probs, float *lse, int32_t *topk_idx, float *topk_w,
                         const float *logits, int N, int E, int K, int norm_topk) {
    cuda_router_forward_ext(probs, lse, topk_idx, topk_w, logits, NULL, N, E, K, norm_topk,
                            SCORE_SOFTMAX_);
}

// ---------------------------------------------------------------------------------------
// Router backward: one warp per token, the CPU op's double-precision formulas.
// Softmax:
//   dprobs_e = dprob_bias_e + g_e, g nonzero only at the top-k experts:
//     norm_topk 0: g_j = dw_j;  norm_topk 1: g_j = (dw_j - sum_k dw_k w_k) / s, s = sum_k p_k
//   dlogits_e += p_e (dprobs_e - sum_f p_f dprobs_f) + dz_coef * 2 lse p_e
// The sums over the K top-k entries are short: every lane computes them itself, in the CPU's
// order. The sum over E of p * dprob_bias is a lane-strided sum and a butterfly (double).
// Like the CPU op, each top-k entry gets two float additions: the common term, then p_j g_j;
// lane e % 32 owns dlogits[e] for both, so they happen in program order.
// Sigmoid (s = sigmoid(l) recomputed from the logits as the forward computed it, S = sum s,
// ssum = sum of the chosen s; c = dprob_bias):
//   ds_f = (c_f - sum_e c_e s_e / S) / S
//          + [f chosen as j] (dw_j, or (dw_j - sum_k dw_k w_k) / ssum)
//   dlogits_f += s_f (1 - s_f) ds_f + dz_coef * 2 lse exp(l_f - lse)    (one float addition)
// The sums over E (S, sum c s / S) are lane-strided sums and butterflies.
// dlogits, probs, logits are (N,E); dtopk_w, topk_idx are (N,K); dprob_bias is (E); lse is (N)
static __global__ void router_backward_kernel(float *dlogits, const float *dtopk_w,
                                              const float *dprob_bias, float dz_coef,
                                              const float *probs, const float *lse,
                                              const int32_t *topk_idx, int N, int E, int K,
                                              int norm_topk) {
    const int t = blockIdx.x * ROUTER_WARPS + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (t >= N) return; // whole warp
    const float *p = probs + (size_t)t * E;
    const int32_t *idx = topk_idx + (size_t)t * K;
    const float *dw = dtopk_w ? dtopk_w + (size_t)t * K : NULL;
    float *dl = dlogits + (size_t)t * E;

    double s = 0.0, dw_dot_w = 0.0; // top-k sum, and sum_k dw_k w_k (norm_topk)
    if (dw && norm_topk) {
        for (int j = 0; j < K; j++) s += p[idx[j]];
        for (int j = 0; j < K; j++) dw_dot_w += (double)dw[j] * (p[idx[j]] / s);
    }
    double pdot = 0.0; // sum_f p_f dprobs_f
    if (dprob_bias) {
        for (int e = lane; e < E; e += 32) pdot += (double)p[e] * dprob_bias[e];
        pdot = warp_sum_f64(pdot);
    }
    if (dw) {
        for (int j = 0; j < K; j++) {
            const double g = norm_topk ? (dw[j] - dw_dot_w) / s : dw[j];
            pdot += p[idx[j]] * g;
        }
    }
    const double zc = 2.0 * (double)dz_coef * lse[t];
    for (int e = lane; e < E; e += 32) {
        const double bias = dprob_bias ? dprob_bias[e] : 0.0;
        dl[e] += (float)(p[e] * (bias - pdot + zc));
    }
    if (dw) {
        for (int j = 0; j < K; j++) {
            const int e = idx[j];
            if ((e & 31) != lane) continue;
            const double g = norm_topk ? (dw[j] - dw_dot_w) / s : dw[j];
            dl[e] += (float)(p[e] * g);
        }
    }
}

static __global__ void router_backward_sigmoid_kernel(float *dlogits, const float *dtopk_w,
                                                      const float *dprob_bias, float dz_coef,
                                                      const float *lse, const float *logits,
                                                      const int32_t *topk_idx, int N, int E, int K,
                                                      int norm_topk) {
    const int t = blockIdx.x * ROUTER_WARPS + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (t >= N) return; // whole warp
    const float *l = logits + (size_t)t * E;
    const int32_t *idx = topk_idx + (size_t)t * K;
    const float *dw = dtopk_w ? dtopk_w + (size_t)t * K : NULL;
    float *dl = dlogits + (size_t)t * E;

    double S = 0.0;
    for (int e = lane; e < E; e += 32) S += sigmoid_score_(l[e]);
    S = warp_sum_f64(S);
    double ssum = 0.0, dw_dot_w = 0.0; // every lane, in top-k order
    if (dw) {
        for (int j = 0; j < K; j++) ssum += sigmoid_score_(l[idx[j]]);
        if (norm_topk && ssum > 0)
            for (int j = 0; j < K; j++)
                dw_dot_w += (double)dw[j] * (sigmoid_score_(l[idx[j]]) / ssum);
    }
    const bool lb = dprob_bias && S > 0;
    double cq = 0.0;
    if (lb) {
        for (int e = lane; e < E; e += 32) cq += (double)dprob_bias[e] * (sigmoid_score_(l[e]) / S);
        cq = warp_sum_f64(cq);
    }
    const float lt = lse[t];
    const double zc = 2.0 * (double)dz_coef * lt;
    for (int e = lane; e < E; e += 32) {
        const double se = sigmoid_score_(l[e]);
        double ds = lb ? (dprob_bias[e] - cq) / S : 0.0;
        for (int j = 0; dw && j < K; j++) {
            if (idx[j] != e) continue;
            ds += !norm_topk ? dw[j] : ssum > 0 ? (dw[j] - dw_dot_w) / ssum : 0.0;
        }
        const double dz = zc != 0.0 ? zc * exp((double)l[e] - lt) : 0.0;
        dl[e] += (float)(se * (1.0 - se) * ds + dz);
    }
}

void cuda_router_backward_ext(float *dlogits, const float *dtopk_w, const float *dprob_bias,
                              float dz_coef, const float *probs, const float *lse,
                              const float *logits, const int32_t *topk_idx, const float *topk_w,
                              int N, int E, int K, int norm_topk, int score_fn) {
    (void)topk_w; // recomputed in double, as on the CPU
    if (!dlogits || N <= 0 || E <= 0) return;
    if (K < 0 || K > E) die_("cuda_router_backward", "top-k needs 0 <= K <= E");
    const unsigned blocks = (unsigned)((N + ROUTER_WARPS - 1) / ROUTER_WARPS);
    if (score_fn == SCORE_SIGMOID_) {
        if (!logits) die_("cuda_router_backward", "the sigmoid router's backward needs the logits");
        router_backward_sigmoid_kernel<<<blocks, ROUTER_WARPS * 32>>>(
            dlogits, dtopk_w, dprob_bias, dz_coef, lse, logits, topk_idx, N, E, K, norm_topk);
    } else if (score_fn == SCORE_SOFTMAX_) {
        router_backward_kernel<<<blocks, ROUTER_WARPS * 32>>>(
            dlogits, dtopk_w, dprob_bias, dz_coef, probs, lse, topk_idx, N, E, K, norm_topk);
    } else {
        die_("cuda_router_backward", "score_fn is ROUTER_SOFTMAX or ROUTER_SIGMOID");
    }
    CUDA_CHECK_LAUNCH();
}

void cuda_router_backward(float *dlogits, const float *dtopk_w, const float *dprob_bias,
                          float dz_coef, const float *probs, const float *lse,
                          const int32_t *topk_idx, const float *topk_w, int N, int E, int K,
                          int norm_topk) {
    cuda_router_backward_ext(dlogits, dtopk_w, dprob_bias, dz_coef, probs, lse, NULL, topk_idx,
                             topk_w, N, E, K, norm_topk, SCORE_SOFTMAX_);
}

// ---------------------------------------------------------------------------------------
// Router auxiliary-loss sums, in double, in two deterministic passes over E+1 columns (the E
// probability columns and lse^2 as column E). Pass 1: the tokens are cut into G groups of
// AUX_ROWS consecutive rows (G depends on N only); block g sums its rows in order for every
// column (threads over the columns: coalesced) into partial (G, E+1). Pass 2: one block per
// column adds the G partials with a fixed block tree into result (E+1), which goes to the host.
// scratch: partial (G, E+1) then result (E+1), doubles.
enum { AUX_ROWS = 64 };
enum { AUX_THREADS = 256 };

static int aux_groups_(int N) {
    return (N + AUX_ROWS - 1) / AUX_ROWS;
}

size_t cuda_router_aux_sums_scratch_bytes(int N, int E) {
    if (N <= 0 || E <= 0) return 0;
    return ((size_t)aux_groups_(N) + 1) * ((size_t)E + 1) * sizeof(double);
}

// partial is (G, E+1); probs is (N,E); lse is (N)
static __global__ void aux_sums_partial_kernel(double *partial, const float *probs,
                                               const float *lse, int N, int E) {
    const int t0 = blockIdx.x * AUX_ROWS;
    const int t1 = min(N, t0 + AUX_ROWS);
    for (int c = threadIdx.x; c <= E; c += blockDim.x) {
        double acc = 0.0;
        if (c < E) {
            for (int t = t0; t < t1; t++) acc += probs[(size_t)t * E + c];
        } else {
            for (int t = t0; t < t1; t++) acc += (double)lse[t] * lse[t];
        }
        partial[(size_t)blockIdx.x * (E + 1) + c] = acc;
    }
}

// result[c] = sum over g of partial[g, c]; one block per column c.
static __global__ void aux_sums_final_kernel(double *result, const double *partial, int G, int E) {
    __shared__ double red[32];
    const int c = blockIdx.x;
    double acc = 0.0;
    for (int g = threadIdx.x; g < G; g += blockDim.x) acc += partial[(size_t)g * (E + 1) + c];
    acc = block_sum_f64(acc, red);
    if (threadIdx.x == 0) result[c] = acc;
}

void cuda_router_aux_sums(double *prob_sum_host, double *lse_sq_sum_host, const float *probs,
                          const float *lse, int N, int E, void *scratch) {
    if (E <= 0) return;
    if (N <= 0) {
        for (int e = 0; e < E; e++) prob_sum_host[e] = 0.0;
        *lse_sq_sum_host = 0.0;
        return;
    }
    if (!scratch)
        die_("cuda_router_aux_sums",
             "scratch is NULL (allocate cuda_router_aux_sums_scratch_bytes(N, E) bytes)");
    const int G = aux_groups_(N);
    double *partial = (double *)scratch;
    double *result = partial + (size_t)G * (E + 1);
    aux_sums_partial_kernel<<<(unsigned)G, AUX_THREADS>>>(partial, probs, lse, N, E);
    CUDA_CHECK_LAUNCH();
    aux_sums_final_kernel<<<(unsigned)(E + 1), AUX_THREADS>>>(result, partial, G, E);
    CUDA_CHECK_LAUNCH();
    cuda_memcpy_d2h(prob_sum_host, result, (size_t)E * sizeof(double));
    cuda_memcpy_d2h(lse_sq_sum_host, result + E, sizeof(double));
}

// ---------------------------------------------------------------------------------------
// Dispatch plan: the stable counting sort of moe_plan, in four small kernels. The A = N*K
// assignments (topk_idx read flat, a = t*K + j) are cut into chunks of PLAN_CHUNK.
//   1. plan_count: per (chunk, expert), how many of the chunk's assignments go to the expert.
//   2. plan_scan: one warp per expert, an exclusive scan over the chunks, in place (the count
//      of (c, e) becomes the number of e's assignments in chunks before c), and the total,
//      counts[e].
//   3. plan_offsets: one warp, offsets = the exclusive scan of counts.
//   4. plan_place: per (chunk, expert), one thread walks the chunk in order and gives each of
//      the expert's assignments the next row, from offsets[e] + its chunk base.
// Rows within an expert are therefore in assignment order, exactly as the CPU's loop gives
// them. Integer counting and scans only: no atomics, nothing that depends on timing.
// A thread of kernels 1 and 4 walks PLAN_CHUNK entries in shared memory (broadcast reads).
enum { PLAN_CHUNK = 512 };
enum { PLAN_THREADS = 256 };
enum { PLAN_SCAN_WARPS = 8 }; // experts per block of plan_scan

static size_t plan_chunks_(size_t A) {
    return (A + PLAN_CHUNK - 1) / PLAN_CHUNK;
}

size_t cuda_moe_plan_scratch_bytes(int N, int K, int E) {
    if (N <= 0 || K <= 0 || E <= 0) return 0;
    return plan_chunks_((size_t)N * K) * (size_t)E * sizeof(int32_t);
}

// Exclusive scan by one warp (all 32 lanes call it) of in[0], in[stride], ... in[(n-1)*stride]
// into out at the same places (out may alias in: each lane reads its element before writing
// it, and no other lane touches it). Tiles of 32 with a shuffle scan and a carry. Returns the
// total to every lane.
static __device__ int32_t warp_exclusive_scan_(int32_t *out, const int32_t *in, int n,
                                               size_t stride) {
    const int lane = threadIdx.x & 31;
    int32_t carry = 0;
    for (int base = 0; base < n; base += 32) {
        const int i = base + lane;
        const int32_t x = i < n ? in[(size_t)i * stride] : 0;
        int32_t incl = x;
        for (int o = 1; o < 32; o <<= 1) {
            const int32_t y = __shfl_up_sync(0xffffffffu, incl, o);
            if (lane >= o) incl += y;
        }
        if (i < n) out[(size_t)i * stride] = carry + incl - x;
        carry += __shfl_sync(0xffffffffu, incl, 31);
    }
    return carry;
}

// Loads chunk blockIdx.x of topk_idx into s_idx (the whole block calls it); returns its length.
static __device__ int plan_load_chunk_(int32_t *s_idx, const int32_t *topk_idx, size_t A) {
    const size_t a0 = (size_t)blockIdx.x * PLAN_CHUNK;
    const int n = (int)(A - a0 < (size_t)PLAN_CHUNK ? A - a0 : (size_t)PLAN_CHUNK);
    for (int i = threadIdx.x; i < n; i += blockDim.x) s_idx[i] = topk_idx[a0 + i];
    __syncthreads();
    return n;
}

// chunk_count is (n_chunks, E), topk_idx is (A)
static __global__ void plan_count_kernel(int32_t *chunk_count, const int32_t *topk_idx, size_t A,
                                         int E) {
    __shared__ int32_t s_idx[PLAN_CHUNK];
    const int n = plan_load_chunk_(s_idx, topk_idx, A);
    for (int e = threadIdx.x; e < E; e += blockDim.x) {
        int32_t c = 0;
        for (int i = 0; i < n; i++) c += s_idx[i] == e;
        chunk_count[(size_t)blockIdx.x * E + e] = c;
    }
}

// chunk_count (n_chunks, E) becomes the exclusive scan over the chunks of each expert;
// counts is (E)
static __global__ void plan_scan_kernel(int32_t *counts, int32_t *chunk_count, int n_chunks,
                                        int E) {
    const int e = blockIdx.x * PLAN_SCAN_WARPS + (threadIdx.x >> 5);
    if (e >= E) return; // the whole warp leaves together
    const int32_t total =
        warp_exclusive_scan_(chunk_count + e, chunk_count + e, n_chunks, (size_t)E);
    if ((threadIdx.x & 31) == 0) counts[e] = total;
}

// One warp. offsets is (E+1), counts is (E)
static __global__ void plan_offsets_kernel(int32_t *offsets, const int32_t *counts, int E) {
    const int32_t total = warp_exclusive_scan_(offsets, counts, E, 1);
    if (threadIdx.x == 0) offsets[E] = total;
}

// chunk_base is (n_chunks, E) from plan_scan; row_token is (A), assign_row is (A)
static __global__ void plan_place_kernel(int32_t *row_token, int32_t *assign_row,
                                         const int32_t *chunk_base, const int32_t *offsets,
                                         const int32_t *topk_idx, size_t A, int K, int E) {
    __shared__ int32_t s_idx[PLAN_CHUNK];
    const int n = plan_load_chunk_(s_idx, topk_idx, A);
    const size_t a0 = (size_t)blockIdx.x * PLAN_CHUNK;
    for (int e = threadIdx.x; e < E; e += blockDim.x) {
        int32_t r = offsets[e] + chunk_base[(size_t)blockIdx.x * E + e];
        for (int i = 0; i < n; i++) {
            if (s_idx[i] != e) continue;
            const size_t a = a0 + (size_t)i;
            row_token[r] = (int32_t)(a / (size_t)K);
            assign_row[a] = r;
            r++;
        }
    }
}

void cuda_moe_plan(int32_t *counts, int32_t *offsets, int32_t *row_token, int32_t *assign_row,
                   const int32_t *topk_idx, int N, int K, int E, void *scratch) {
    if (E <= 0) return;
    const size_t A = N > 0 && K > 0 ? (size_t)N * K : 0;
    if (A == 0) { // no assignments: every expert is empty
        CUDA_CHECK(cudaMemset(counts, 0, (size_t)E * sizeof(int32_t)));
        CUDA_CHECK(cudaMemset(offsets, 0, ((size_t)E + 1) * sizeof(int32_t)));
        return;
    }
    if (A > (size_t)INT32_MAX) die_("cuda_moe_plan", "N*K routed rows do not fit in int32");
    if (!scratch)
        die_("cuda_moe_plan", "scratch is NULL (allocate cuda_moe_plan_scratch_bytes(N, K, E))");
    const size_t n_chunks = plan_chunks_(A);
    int32_t *chunk_count = (int32_t *)scratch;
    plan_count_kernel<<<(unsigned)n_chunks, PLAN_THREADS>>>(chunk_count, topk_idx, A, E);
    CUDA_CHECK_LAUNCH();
    const unsigned scan_blocks = (unsigned)((E + PLAN_SCAN_WARPS - 1) / PLAN_SCAN_WARPS);
    plan_scan_kernel<<<scan_blocks, PLAN_SCAN_WARPS * 32>>>(counts, chunk_count, (int)n_chunks, E);
    CUDA_CHECK_LAUNCH();
    plan_offsets_kernel<<<1, 32>>>(offsets, counts, E);
    CUDA_CHECK_LAUNCH();
    plan_place_kernel<<<(unsigned)n_chunks, PLAN_THREADS>>>(row_token, assign_row, chunk_count,
                                                            offsets, topk_idx, A, K, E);
    CUDA_CHECK_LAUNCH();
}

// ---------------------------------------------------------------------------------------
// Permute / unpermute. Every routed row belongs to exactly one assignment (t, j), so the
// token-side gathers below write disjoint rows and need no atomics.

// xp is (R,D), x is (N,D), row_token is (R)
void cuda_permute_forward(float *xp, const float *x, const int32_t *row_token, int R, int D) {
    gather_rows_(xp, x, row_token, R, D);
}

// dx[t] = 0 + dxp[assign_row[t*K + j]] for j = 0 .. K-1 in order (written): one block per
// token, threads over the columns, the CPU's additions in the CPU's order (the same bits).
// dx is (N,D), dxp is (R,D), assign_row is (N,K)
static __global__ void permute_backward_kernel(float *dx, const float *dxp,
                                               const int32_t *assign_row, int N, int K, int D) {
    for (int t = blockIdx.x; t < N; t += gridDim.x) {
        float *dst = dx + (size_t)t * D;
        const int32_t *rows = assign_row + (size_t)t * K;
        for (int c = threadIdx.x; c < D; c += blockDim.x) {
            float acc = 0.0f;
            for (int j = 0; j < K; j++) acc += dxp[(size_t)rows[j] * D + c];
            dst[c] = acc;
        }
    }
}

void cuda_permute_backward(float *dx, const float *dxp, const int32_t *assign_row, int N, int K,
                           int D) {
    if (!dx || N <= 0 || D <= 0) return;
    if (K <= 0) { // no routed rows: dx is the empty sum (written, as on the CPU)
        CUDA_CHECK(cudaMemsetAsync(dx, 0, (size_t)N * D * sizeof(float), 0));
        return;
    }
    permute_backward_kernel<<<row_blocks_((size_t)N), row_threads_(D)>>>(dx, dxp, assign_row, N, K,
                                                                         D);
    CUDA_CHECK_LAUNCH();
}

// out[t] = sum_j w[t,j] * yp[assign_row[t*K + j]], j in order from 0: one block per token,
// threads over the columns. Products and sums are rounded separately (__fmul_rn / __fadd_rn,
// no FMA), as in the CPU op.
// out is (N,D), yp is (R,D), topk_w and assign_row are (N,K)
static __global__ void unpermute_forward_kernel(float *out, const float *yp, const float *topk_w,
                                                const int32_t *assign_row, int N, int K, int D) {
    for (int t = blockIdx.x; t < N; t += gridDim.x) {
        float *dst = out + (size_t)t * D;
        const int32_t *rows = assign_row + (size_t)t * K;
        const float *w = topk_w + (size_t)t * K;
        for (int c = threadIdx.x; c < D; c += blockDim.x) {
            float acc = 0.0f;
            for (int j = 0; j < K; j++)
                acc = __fadd_rn(acc, __fmul_rn(w[j], yp[(size_t)rows[j] * D + c]));
            dst[c] = acc;
        }
    }
}

void cuda_unpermute_forward(float *out, const float *yp, const float *topk_w,
                            const int32_t *assign_row, int N, int K, int D) {
    if (N <= 0 || D <= 0) return;
    if (K <= 0) { // no expert output: the combine is zero
        CUDA_CHECK(cudaMemset(out, 0, (size_t)N * D * sizeof(float)));
        return;
    }
    unpermute_forward_kernel<<<row_blocks_((size_t)N), row_threads_(D)>>>(out, yp, topk_w,
                                                                          assign_row, N, K, D);
    CUDA_CHECK_LAUNCH();
}

// One warp per assignment a = (t, j), row = assign_row[a]; both outputs written:
//   dyp[row] = w[a] * dout[t]                        (elementwise, rounded as the CPU does)
//   dtopk_w[a] = (float) sum_c dout[t,c] * yp[row,c]  (double: lane-strided, then butterfly)
// The products of two floats are exact in double, so only the order of the additions differs
// from the CPU's loop. Either output may be NULL.
// dyp is (R,D), dtopk_w is (N,K), dout is (N,D), yp is (R,D), topk_w and assign_row are (N,K)
enum { UNPERM_WARPS = 8 }; // assignments per block

static __global__ void unpermute_backward_kernel(float *dyp, float *dtopk_w, const float *dout,
                                                 const float *yp, const float *topk_w,
                                                 const int32_t *assign_row, size_t A, int K,
                                                 int D) {
    const size_t a = (size_t)blockIdx.x * UNPERM_WARPS + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (a >= A) return; // the whole warp leaves together
    const size_t t = a / (size_t)K;
    const size_t row = (size_t)assign_row[a];
    const float *g = dout + t * D;
    if (dyp) {
        const float w = topk_w[a];
        float *dy = dyp + row * D;
        for (int c = lane; c < D; c += 32) dy[c] = __fmul_rn(w, g[c]);
    }
    if (dtopk_w) {
        const float *y = yp + row * D;
        double dot = 0.0;
        for (int c = lane; c < D; c += 32) dot += (double)g[c] * y[c];
        dot = warp_sum_f64(dot);
        if (lane == 0) dtopk_w[a] = (float)dot;
    }
}

void cuda_unpermute_backward(float *dyp, float *dtopk_w, const float *dout, const float *yp,
                             const float *topk_w, const int32_t *assign_row, int N, int K, int D) {
    if ((!dyp && !dtopk_w) || N <= 0 || K <= 0 || D <= 0) return;
    const size_t A = (size_t)N * K;
    const size_t blocks = (A + UNPERM_WARPS - 1) / UNPERM_WARPS;
    unpermute_backward_kernel<<<(unsigned)blocks, UNPERM_WARPS * 32>>>(dyp, dtopk_w, dout, yp,
                                                                       topk_w, assign_row, A, K, D);
    CUDA_CHECK_LAUNCH();
}

// ---------------------------------------------------------------------------------------
// Cross-entropy: one block per row of V logits (V ~ 50k-150k: ~100-300 per thread).
// Three passes over the row as in the CPU op: the max (fp32, exact in any order), the sum of
// expf(x - max) accumulated in double (per thread in order, then the fixed block tree), and,
// for the backward, dl = expf(x - max) * (float)(scale / sum) with scale subtracted at the
// target. The row loss max + log(sum) - x_target (double) goes to row_loss[row] in scratch;
// a second kernel sums the N row losses in a fixed order. A thread touches the same elements
// in every pass, and x_target is read by all threads before the first barrier, so dl may alias
// logits. Rows with target < 0 get loss 0 and (with dl) a zero gradient row.
// dlogits, logits are (N,V); losses, targets are (N); row_loss is (N+1): the total at [N]
enum { CE_THREADS = 512 };
enum { CE_SUM_THREADS = 1024 };

size_t cuda_crossentropy_scratch_bytes(int N) {
    return ((size_t)(N > 0 ? N : 0) + 1) * sizeof(double);
}

static __global__ void crossentropy_kernel(float *dlogits, float *losses, double *row_loss,
                                           const float *logits, const int32_t *targets, int V,
                                           float scale) {
    __shared__ float red_f[32];
    __shared__ double red_d[32];
    const int row = blockIdx.x;
    const int target = targets[row]; // the same for the whole block: uniform branches below
    const float *l = logits + (size_t)row * V;
    float *dl = dlogits ? dlogits + (size_t)row * V : NULL;
    if (target < 0) {
        if (dl)
            for (int i = threadIdx.x; i < V; i += blockDim.x) dl[i] = 0.0f;
        if (threadIdx.x == 0) {
            row_loss[row] = 0.0;
            if (losses) losses[row] = 0.0f;
        }
        return;
    }
    const float xt = l[target]; // before any write (dl may alias logits)
    float m = -INFINITY;
    for (int i = threadIdx.x; i < V; i += blockDim.x) m = fmaxf(m, l[i]);
    m = block_max_f32(m, red_f);
    double sum = 0.0;
    for (int i = threadIdx.x; i < V; i += blockDim.x) sum += (double)expf(l[i] - m);
    sum = block_sum_f64(sum, red_d);
    if (dl) {
        const float k = (float)((double)scale / sum);
        for (int i = threadIdx.x; i < V; i += blockDim.x) {
            float v = __fmul_rn(expf(l[i] - m), k);
            if (i == target) v = __fsub_rn(v, scale);
            dl[i] = v;
        }
    }
    if (threadIdx.x == 0) {
        const double loss = (double)m + log(sum) - (double)xt;
        row_loss[row] = loss;
        if (losses) losses[row] = (float)loss;
    }
}

// row_loss is (N+1): sums [0, N) with a fixed block tree into row_loss[N]. One block.
static __global__ void crossentropy_sum_kernel(double *row_loss, int N) {
    __shared__ double red[32];
    double acc = 0.0;
    for (int i = threadIdx.x; i < N; i += blockDim.x) acc += row_loss[i];
    acc = block_sum_f64(acc, red);
    if (threadIdx.x == 0) row_loss[N] = acc;
}

static double crossentropy_rows_(const char *fn, float *dlogits, float *losses, const float *logits,
                                 const int32_t *targets, int N, int V, float scale, void *scratch) {
    if (N <= 0 || V <= 0) return 0.0;
    if (!scratch) die_(fn, "scratch is NULL (allocate cuda_crossentropy_scratch_bytes(N) bytes)");
    double *row_loss = (double *)scratch;
    crossentropy_kernel<<<(unsigned)N, CE_THREADS>>>(dlogits, losses, row_loss, logits, targets, V,
                                                     scale);
    CUDA_CHECK_LAUNCH();
    crossentropy_sum_kernel<<<1, CE_SUM_THREADS>>>(row_loss, N);
    CUDA_CHECK_LAUNCH();
    double total = 0.0;
    cuda_memcpy_d2h(&total, row_loss + N, sizeof total);
    return total;
}

// losses is (N) or NULL, logits is (N,V), targets is (N)
double cuda_crossentropy_forward(float *losses, const float *logits, const int32_t *targets, int N,
                                 int V, void *scratch) {
    return crossentropy_rows_("cuda_crossentropy_forward", NULL, losses, logits, targets, N, V,
                              1.0f, scratch);
}

// dlogits is (N,V) and may alias logits (NULL: the loss alone, as the CPU op); losses is (N)
// or NULL; targets is (N)
double cuda_crossentropy_forward_backward(float *dlogits, float *losses, const float *logits,
                                          const int32_t *targets, int N, int V, float scale,
                                          void *scratch) {
    return crossentropy_rows_("cuda_crossentropy_forward_backward", dlogits, losses, logits,
                              targets, N, V, scale, scratch);
}
