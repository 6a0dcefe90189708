// CPU kernels: the MoE router's softmax and top-k (forward), and its backward through the
// top-k weights (optionally renormalised), the load-balancing term on the probabilities and
// the z-loss on the log-sum-exp. One token per iteration; E and K are small.
#include "kernels/kernels.h"

#include <math.h>

// Loops over fewer elements than this run on the calling thread: waking the team costs more
// than it saves, and on a loaded machine a barrier can wait a whole time slice for a thread.
#define PAR_MIN 65536

// probs, logits are (N,E); lse is (N); topk_idx, topk_w are (N,K)
void router_forward(float *probs, float *lse, int32_t *topk_idx, float *topk_w, const float *logits,
                    int N, int E, int K, int norm_topk) {
#pragma omp parallel for schedule(static) if ((size_t)N * E * K >= PAR_MIN)
    for (int t = 0; t < N; t++) {
        const float *l = logits + (size_t)t * E;
        float *p = probs + (size_t)t * E;
        float m = l[0];
        for (int e = 1; e < E; e++) m = l[e] > m ? l[e] : m;
        double sum = 0.0;
        for (int e = 0; e < E; e++) sum += exp((double)l[e] - m);
        for (int e = 0; e < E; e++) p[e] = (float)(exp((double)l[e] - m) / sum);
        lse[t] = (float)((double)m + log(sum));

        // partial selection sort: pass j takes the largest probability not yet taken; the
        // strict > keeps the lower expert index on ties
        int32_t *idx = topk_idx + (size_t)t * K;
        float *w = topk_w + (size_t)t * K;
        double wsum = 0.0;
        for (int j = 0; j < K; j++) {
            int best = -1;
            for (int e = 0; e < E; e++) {
                int taken = 0;
                for (int jj = 0; jj < j; jj++) taken |= idx[jj] == e;
                if (taken) continue;
                if (best < 0 || p[e] > p[best]) best = e;
            }
            idx[j] = best;
            wsum += p[best];
        }
        for (int j = 0; j < K; j++) w[j] = norm_topk ? (float)(p[idx[j]] / wsum) : p[idx[j]];
    }
}

// dprobs_e = dprob_bias_e + g_e, where g is nonzero only at the top-k experts:
//   norm_topk 0: w_j = p_j, so g_j = dw_j
//   norm_topk 1: w_j = p_j / s with s = sum_k p_k, so g_j = (dw_j - sum_k dw_k w_k) / s
// softmax: dlogits_e += p_e (dprobs_e - sum_f p_f dprobs_f); z-loss: += dz_coef * 2 lse p_e.
// dlogits, probs are (N,E); dtopk_w, topk_idx, topk_w are (N,K); dprob_bias is (E) or NULL;
// lse is (N). A NULL dtopk_w counts as zero.
void router_backward(float *dlogits, const float *dtopk_w, const float *dprob_bias, float dz_coef,
                     const float *probs, const float *lse, const int32_t *topk_idx,
                     const float *topk_w, int N, int E, int K, int norm_topk) {
    if (!dlogits) return;
    (void)topk_w; // recomputed from probs in double, to the same effect
#pragma omp parallel for schedule(static) if ((size_t)N * E * K >= PAR_MIN)
    for (int t = 0; t < N; t++) {
        const float *p = probs + (size_t)t * E;
        const int32_t *idx = topk_idx + (size_t)t * K;
        const float *dw = dtopk_w ? dtopk_w + (size_t)t * K : NULL;
        float *dl = dlogits + (size_t)t * E;

        double s = 0.0, dw_dot_w = 0.0; // top-k sum, and sum_k dw_k w_k (norm_topk)
        if (dw && norm_topk) {
            for (int j = 0; j < K; j++) s += p[idx[j]];
            for (int j = 0; j < K; j++) dw_dot_w += (double)dw[j] * (p[idx[j]] / s);
        }
        // sum_f p_f dprobs_f
        double pdot = 0.0;
        if (dprob_bias) {
            for (int e = 0; e < E; e++) pdot += (double)p[e] * dprob_bias[e];
        }
        if (dw) {
            for (int j = 0; j < K; j++) {
                const double g = norm_topk ? (dw[j] - dw_dot_w) / s : dw[j];
                pdot += p[idx[j]] * g;
            }
        }
        const double zc = 2.0 * (double)dz_coef * lse[t];
        for (int e = 0; e < E; e++) {
            const double bias = dprob_bias ? dprob_bias[e] : 0.0;
            dl[e] += (float)(p[e] * (bias - pdot + zc));
        }
        if (dw) {
            for (int j = 0; j < K; j++) {
                const double g = norm_topk ? (dw[j] - dw_dot_w) / s : dw[j];
                dl[idx[j]] += (float)(p[idx[j]] * g);
            }
        }
    }
}

void router_aux_sums(double *prob_sum, double *lse_sq_sum, const float *probs, const float *lse,
                     int N, int E) {
    for (int e = 0; e < E; e++) {
        double P = 0.0;
        for (int t = 0; t < N; t++) P += probs[(size_t)t * E + e];
        prob_sum[e] = P;
    }
    double z = 0.0;
    for (int t = 0; t < N; t++) z += (double)lse[t] * lse[t];
    *lse_sq_sum = z;
}
