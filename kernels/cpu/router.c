// CPU kernels: the MoE router's scores (softmax, or sigmoid as in DeepSeek-V3) and top-k
// selection with an optional selection bias (forward), and its backward through the top-k
// weights (optionally renormalised), the load-balancing term on the probabilities and the
// z-loss on the log-sum-exp. One token per iteration; E and K are small.
#include "kernels/kernels.h"

#include <math.h>

// Loops over fewer elements than this run on the calling thread: waking the team costs more
// than it saves, and on a loaded machine a barrier can wait a whole time slice for a thread.
#define PAR_MIN 65536

// The sigmoid score of a logit: in double, rounded to float once (the CUDA op does the same, and
// the backward recomputes exactly the forward's value).
static inline float sigmoid_(float x) {
    return (float)(1.0 / (1.0 + exp(-(double)x)));
}

// probs, logits are (N,E); bias is (E) or NULL; lse is (N); topk_idx, topk_w are (N,K)
void router_forward(float *probs, float *lse, int32_t *topk_idx, float *topk_w, const float *logits,
                    const float *bias, int N, int E, int K, int norm_topk, int score_fn) {
    const int sig = score_fn == ROUTER_SIGMOID;
#pragma omp parallel for schedule(static) if ((size_t)N * E * K >= PAR_MIN)
    for (int t = 0; t < N; t++) {
        const float *l = logits + (size_t)t * E;
        float *p = probs + (size_t)t * E;
        float m = l[0];
        for (int e = 1; e < E; e++) m = l[e] > m ? l[e] : m;
        double sum = 0.0;
        for (int e = 0; e < E; e++) sum += exp((double)l[e] - m);
        // p holds the scores s until the end (sigmoid: normalised once the top-k is taken)
        for (int e = 0; e < E; e++)
            p[e] = sig ? sigmoid_(l[e]) : (float)(exp((double)l[e] - m) / sum);
        lse[t] = (float)((double)m + log(sum));

        // partial selection sort on the key s + bias: pass j takes the largest key not yet
        // taken; the strict > keeps the lower expert index on ties
        int32_t *idx = topk_idx + (size_t)t * K;
        float *w = topk_w + (size_t)t * K;
        double wsum = 0.0;
        for (int j = 0; j < K; j++) {
            int best = -1;
            float best_key = 0.0f;
            for (int e = 0; e < E; e++) {
                int taken = 0;
                for (int jj = 0; jj < j; jj++) taken |= idx[jj] == e;
                if (taken) continue;
                const float key = bias ? p[e] + bias[e] : p[e];
                if (best < 0 || key > best_key) {
                    best = e;
                    best_key = key;
                }
            }
            idx[j] = best;
            wsum += p[best];
        }
        // (wsum is 0 only for sigmoid scores that all underflow: equal weights then)
        for (int j = 0; j < K; j++)
            w[j] = !norm_topk ? p[idx[j]] : wsum > 0 ? (float)(p[idx[j]] / wsum) : 1.0f / K;
        if (sig) {
            double S = 0.0;
            for (int e = 0; e < E; e++) S += p[e];
            for (int e = 0; e < E; e++) p[e] = S > 0 ? (float)(p[e] / S) : 1.0f / E;
        }
    }
}

// The sigmoid router's backward for token t (see router_backward). With s_e = sigmoid(l_e),
// S = sum_e s_e, q_e = s_e / S (probs) and the weights w_j = s_j (/ ssum = sum_k s_k with
// norm_topk):
//   d/ds_f of sum_e c_e q_e   = (c_f - sum_e c_e q_e) / S          (c = dprob_bias)
//   d/ds_j of the weights     = dw_j, or (dw_j - sum_k dw_k w_k) / ssum   (chosen experts)
//   dlogits_f += s_f (1 - s_f) ds_f + dz_coef * 2 lse exp(l_f - lse)
// Sums in double in expert and top-k order; one float addition per element.
static void sigmoid_backward_token_(float *dl, const float *dw, const float *dprob_bias,
                                    float dz_coef, float lse, const float *l, const int32_t *idx,
                                    int E, int K, int norm_topk) {
    double S = 0.0;
    for (int e = 0; e < E; e++) S += sigmoid_(l[e]);
    double ssum = 0.0, dw_dot_w = 0.0;
    if (dw) {
        for (int j = 0; j < K; j++) ssum += sigmoid_(l[idx[j]]);
        if (norm_topk && ssum > 0)
            for (int j = 0; j < K; j++) dw_dot_w += (double)dw[j] * (sigmoid_(l[idx[j]]) / ssum);
    }
    const int lb = dprob_bias && S > 0;
    double cq = 0.0;
    if (lb)
        for (int e = 0; e < E; e++) cq += (double)dprob_bias[e] * (sigmoid_(l[e]) / S);
    const double zc = 2.0 * (double)dz_coef * lse;
    for (int e = 0; e < E; e++) {
        const double s = sigmoid_(l[e]);
        double ds = lb ? (dprob_bias[e] - cq) / S : 0.0;
        for (int j = 0; dw && j < K; j++) {
            if (idx[j] != e) continue;
            ds += !norm_topk ? dw[j] : ssum > 0 ? (dw[j] - dw_dot_w) / ssum : 0.0;
        }
        const double dz = zc != 0.0 ? zc * exp((double)l[e] - lse) : 0.0;
        dl[e] += (float)(s * (1.0 - s) * ds + dz);
    }
}

// softmax: dprobs_e = dprob_bias_e + g_e, where g is nonzero only at the top-k experts:
//   norm_topk 0: w_j = p_j, so g_j = dw_j
//   norm_topk 1: w_j = p_j / s with s = sum_k p_k, so g_j = (dw_j - sum_k dw_k w_k) / s
// softmax: dlogits_e += p_e (dprobs_e - sum_f p_f dprobs_f); z-loss: += dz_coef * 2 lse p_e.
// dlogits, probs, logits are (N,E); dtopk_w, topk_idx, topk_w are (N,K); dprob_bias is (E) or
// NULL; lse is (N). A NULL dtopk_w counts as zero.
void router_backward(float *dlogits, const float *dtopk_w, const float *dprob_bias, float dz_coef,
                     const float *probs, const float *lse, const float *logits,
                     const int32_t *topk_idx, const float *topk_w, int N, int E, int K,
                     int norm_topk, int score_fn) {
    if (!dlogits) return;
    (void)topk_w; // recomputed in double, to the same effect
    if (score_fn == ROUTER_SIGMOID) {
#pragma omp parallel for schedule(static) if ((size_t)N * E * K >= PAR_MIN)
        for (int t = 0; t < N; t++)
            sigmoid_backward_token_(
                dlogits + (size_t)t * E, dtopk_w ? dtopk_w + (size_t)t * K : NULL, dprob_bias,
                dz_coef, lse[t], logits + (size_t)t * E, topk_idx + (size_t)t * K, E, K, norm_topk);
        return;
    }
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
