// moe: one mixture-of-experts block (router, dispatch, experts, combine) and the dense MLP.
#include "train/moe.h"

#include <string.h>

#include "kernels/kernels.h"

// ---------------------------------------------------------------------------------------
// router: logits = ln2 @ gate^T, softmax, top-k; the two auxiliary losses of §3.

// Routes the layer's tokens: logits, softmax, top-k and the dispatch plan, then the two
// auxiliary losses. f_e = assignments to e / (N*K) comes from the plan's counts; P_e is the
// mean routing probability. Sums in double, in token order: deterministic.
static void route_(Model *m, int l, MoeLayerLoss *loss) {
    LayerActs *a = &m->acts[l];
    LayerParams *p = &m->p.layers[l];
    int N = m->B * m->T, D = m->D, E = m->E, K = m->K;
    matmul_forward(a->rlogits, a->ln2, p->router, N, D, E);
    router_forward(a->rprobs, a->rlse, a->topk_idx, a->topk_w, a->rlogits, N, E, K,
                   m->cfg.norm_topk_prob);
    moe_plan(a->counts, a->offsets, a->row_token, a->assign_row, a->topk_idx, N, K, E);

    double lb = 0.0, z = 0.0;
    for (int e = 0; e < E; e++) {
        double P = 0.0;
        for (int t = 0; t < N; t++) P += a->rprobs[(size_t)t * E + e];
        lb += ((double)a->counts[e] / ((double)N * K)) * (P / N);
        m->expert_tokens[(size_t)l * E + e] = a->counts[e];
    }
    for (int t = 0; t < N; t++) z += (double)a->rlse[t] * a->rlse[t];
    loss->lb = E * lb;
    loss->z = z / N;
}

// ---------------------------------------------------------------------------------------
// forward: route, permute rows by expert, grouped SwiGLU, unpermute + combine.

void moe_forward(Model *m, int l, MoeLayerLoss *loss) {
    LayerActs *a = &m->acts[l];
    LayerParams *p = &m->p.layers[l];
    int N = m->B * m->T, D = m->D, E = m->E, K = m->K, F = m->F, R = N * K;
    route_(m, l, loss);
    permute_forward(a->xp, a->ln2, a->row_token, R, D);
    grouped_matmul_forward(a->g, a->xp, p->w_gate, a->offsets, E, D, F);
    grouped_matmul_forward(a->u, a->xp, p->w_up, a->offsets, E, D, F);
    swiglu_forward(a->a, a->g, a->u, (size_t)R * F);
    grouped_matmul_forward(a->yp, a->a, p->w_down, a->offsets, E, F, D);
    unpermute_forward(a->mlp_out, a->yp, a->topk_w, a->assign_row, N, K, D);
}

void moe_backward(Model *m, int l, const float *d_out, float *d_ln2, double lb_scale,
                  double z_scale) {
    LayerActs *a = &m->acts[l];
    LayerParams *p = &m->p.layers[l];
    LayerParams *gp = &m->g.layers[l];
    int N = m->B * m->T, D = m->D, E = m->E, K = m->K, F = m->F, R = N * K;

    // combine
    zero_fill(m->d_yp, (size_t)R * D);
    zero_fill(m->d_topk_w, (size_t)N * K);
    unpermute_backward(m->d_yp, m->d_topk_w, d_out, a->yp, a->topk_w, a->assign_row, N, K, D);
    // experts
    zero_fill(m->d_a, (size_t)R * F);
    grouped_matmul_backward(m->d_a, gp->w_down, m->d_yp, a->a, p->w_down, a->offsets, E, F, D);
    zero_fill(m->d_g, (size_t)R * F);
    zero_fill(m->d_u, (size_t)R * F);
    swiglu_backward(m->d_g, m->d_u, m->d_a, a->g, a->u, (size_t)R * F);
    zero_fill(m->d_xp, (size_t)R * D);
    grouped_matmul_backward(m->d_xp, gp->w_gate, m->d_g, a->xp, p->w_gate, a->offsets, E, D, F);
    grouped_matmul_backward(m->d_xp, gp->w_up, m->d_u, a->xp, p->w_up, a->offsets, E, D, F);
    // dispatch
    permute_backward(d_ln2, m->d_xp, a->assign_row, N, K, D);

    // router: lb = E * sum_e f_e * mean_t p_te, so d lb / d p_te = E * f_e / N (f constant);
    // z = mean_t lse_t^2, so d z / d lse_t^2 = 1/N.
    float dprob_bias[E];
    for (int e = 0; e < E; e++)
        dprob_bias[e] = (float)(lb_scale * E * ((double)a->counts[e] / ((double)N * K)) / N);
    zero_fill(m->d_rlogits, (size_t)N * E);
    router_backward(m->d_rlogits, m->d_topk_w, dprob_bias, (float)(z_scale / N), a->rprobs,
                    a->rlse, a->topk_idx, a->topk_w, N, E, K, m->cfg.norm_topk_prob);
    matmul_backward(d_ln2, gp->router, m->d_rlogits, a->ln2, p->router, N, D, E);
}

// ---------------------------------------------------------------------------------------
// dense SwiGLU MLP: out = down(silu(gate(x)) * up(x))

void mlp_forward(Model *m, int l) {
    LayerActs *a = &m->acts[l];
    LayerParams *p = &m->p.layers[l];
    int N = m->B * m->T, D = m->D, F = m->F;
    matmul_forward(a->g, a->ln2, p->w_gate, N, D, F);
    matmul_forward(a->u, a->ln2, p->w_up, N, D, F);
    swiglu_forward(a->a, a->g, a->u, (size_t)N * F);
    matmul_forward(a->mlp_out, a->a, p->w_down, N, F, D);
}

void mlp_backward(Model *m, int l, const float *d_out, float *d_ln2) {
    LayerActs *a = &m->acts[l];
    LayerParams *p = &m->p.layers[l];
    LayerParams *gp = &m->g.layers[l];
    int N = m->B * m->T, D = m->D, F = m->F;
    zero_fill(m->d_a, (size_t)N * F);
    matmul_backward(m->d_a, gp->w_down, d_out, a->a, p->w_down, N, F, D);
    zero_fill(m->d_g, (size_t)N * F);
    zero_fill(m->d_u, (size_t)N * F);
    swiglu_backward(m->d_g, m->d_u, m->d_a, a->g, a->u, (size_t)N * F);
    matmul_backward(d_ln2, gp->w_gate, m->d_g, a->ln2, p->w_gate, N, D, F);
    matmul_backward(d_ln2, gp->w_up, m->d_u, a->ln2, p->w_up, N, D, F);
}
