// moe: one mixture-of-experts block (router, dispatch, experts, combine) and the dense MLP.
#include "train/moe.h"

#include <string.h>

#include "train/dispatch.h"

// ---------------------------------------------------------------------------------------
// router: logits = ln2 @ gate^T, scores (softmax or sigmoid), top-k by score + expert bias;
// the two auxiliary losses of §3.

// f_e of the load-balancing loss for layer l as counts (into m->lb_counts; returns their
// total): the plan's counts of this micro-batch (lb_scope = micro_batch, the total is N*K), or
// the global batch's: fixed by the trainer's pre-pass, or summed over lb_global_comm here (the
// same one all-reduce on every rank, whatever the routing). Integers: every route to the
// global counts gives the same f, bit for bit.
static int64_t lb_counts_(Model *m, int l, const int32_t *counts) {
    const int E = m->E;
    int64_t *fc = m->lb_counts + (size_t)l * E;
    if (m->lb_global_counts) {
        memcpy(fc, m->lb_global_counts + (size_t)l * E, (size_t)E * sizeof(int64_t));
    } else {
        for (int e = 0; e < E; e++) fc[e] = counts[e];
        if (m->lb_global_comm) {
            double d[E];
            MoetErr err;
            for (int e = 0; e < E; e++) d[e] = (double)fc[e];
            if (comm_allreduce_sum_f64(m->lb_global_comm, d, (size_t)E, &err))
                moet_die("lb_scope = global_batch: summing the expert counts: %s", err.msg);
            for (int e = 0; e < E; e++) fc[e] = (int64_t)d[e];
        }
    }
    int64_t total = 0;
    for (int e = 0; e < E; e++) total += fc[e];
    return total;
}

// Routes the layer's tokens: logits, scores, top-k and the dispatch plan, then the two
// auxiliary losses. f_e = assignments to e / all assignments, of the micro-batch or of the
// global batch (lb_counts_); P_e is the mean routing probability of this micro-batch (sigmoid:
// of the scores normalised over the experts). Sums in double, in token order: deterministic.
static void route_(Model *m, int l, MoeLayerLoss *loss) {
    LayerActs *a = &m->acts[l];
    LayerParams *p = &m->p.layers[l];
    int N = m->B * m->T, D = m->D, E = m->E, K = m->K;
    const Ops *k = m->ops;
    k->matmul_forward(a->rlogits, a->ln2, p->router, N, D, E);
    k->router_forward(a->rprobs, a->rlse, a->topk_idx, a->topk_w, a->rlogits, p->expert_bias, N, E,
                      K, m->cfg.norm_topk_prob, m->score_fn);
    k->moe_plan(a->counts, a->offsets, a->row_token, a->assign_row, a->topk_idx, N, K, E);
    // the row counts decide the expert GEMM shapes and the losses: the host needs them (one
    // copy; the offsets are their prefix sums, as moe_plan computes them)
    int32_t *counts = m->counts_h + (size_t)l * E;
    int32_t *offsets = m->offsets_h + (size_t)l * (E + 1);
    k->to_host(counts, a->counts, (size_t)E * sizeof(int32_t));
    offsets[0] = 0;
    for (int e = 0; e < E; e++) offsets[e + 1] = offsets[e] + counts[e];

    double P[E], zsum;
    k->router_aux_sums(P, &zsum, a->rprobs, a->rlse, N, E);
    const int64_t *fc = m->lb_counts + (size_t)l * E;
    const int64_t total = lb_counts_(m, l, counts);
    double lb = 0.0;
    for (int e = 0; e < E; e++) {
        // (micro_batch: total = N*K exactly, so this is assignments / (N*K) as in §3)
        lb += (total > 0 ? (double)fc[e] / (double)total : 0.0) * (P[e] / N);
        m->expert_tokens[(size_t)l * E + e] = counts[e];
    }
    loss->lb = E * lb;
    loss->z = zsum / N;
}

// ---------------------------------------------------------------------------------------
// forward: route, permute rows by expert, grouped SwiGLU, unpermute + combine.

// A failed collective inside forward / backward leaves the other ranks of the group waiting:
// there is no way to recover, so the process ends (mpirun then ends the job).
static void ep_check_(int rc, const MoetErr *err) {
    if (rc) moet_die("expert parallel dispatch: %s", err->msg);
}

// The experts' gate and up projections of the same rows x: one call where the backend has the
// pair op (cuda converts x to bf16 once for both), else two. g = x @ w_gate^T, u = x @ w_up^T.
static void gate_up_forward_(const Ops *k, float *g, float *u, const float *x,
                             const LayerParams *p, const int32_t *offsets, int E, int D, int F) {
    if (k->grouped_matmul_forward_pair) {
        k->grouped_matmul_forward_pair(g, u, x, p->w_gate, p->w_up, offsets, E, D, F);
        return;
    }
    k->grouped_matmul_forward(g, x, p->w_gate, offsets, E, D, F);
    k->grouped_matmul_forward(u, x, p->w_up, offsets, E, D, F);
}

// Its backward: dx = dg @ w_gate + du @ w_up (written), dw_gate += dg^T x, dw_up += du^T x;
// dx NULL, or dw_gate and dw_up both NULL, skips those.
static void gate_up_backward_(const Ops *k, float *dx, float *dw_gate, float *dw_up,
                              const float *dg, const float *du, const float *x,
                              const LayerParams *p, const int32_t *offsets, int E, int D, int F) {
    k->grouped_matmul_backward_pair(dx, dw_gate, dw_up, dg, du, x, p->w_gate, p->w_up, offsets, E,
                                    D, F);
}

// Expert parallelism (m->disp): the routed rows travel to the ranks holding their experts, the
// local experts run on the regrouped received rows, and the outputs travel back (dispatch.h).
static void moe_forward_ep_(Model *m, int l) {
    LayerActs *a = &m->acts[l];
    LayerParams *p = &m->p.layers[l];
    int D = m->D, F = m->F, El = m->n_local_experts;
    const Ops *k = m->ops;
    MoetErr err;
    DispatchRows rw;
    ep_check_(dispatch_forward(m->disp, l, m->counts_h + (size_t)l * m->E, a->xp, &rw, &err),
              &err);
    gate_up_forward_(k, rw.g, rw.u, rw.x, p, rw.offsets, El, D, F);
    if (rw.rows > 0) k->swiglu_forward(rw.a, rw.g, rw.u, (size_t)rw.rows * F);
    k->grouped_matmul_forward(rw.y, rw.a, p->w_down, rw.offsets, El, F, D);
    ep_check_(dispatch_combine(m->disp, l, a->yp, &err), &err);
}

void moe_forward(Model *m, int l, MoeLayerLoss *loss) {
    LayerActs *a = &m->acts[l];
    LayerParams *p = &m->p.layers[l];
    int N = m->B * m->T, D = m->D, E = m->E, K = m->K, F = m->F, R = N * K;
    const Ops *k = m->ops;
    const int32_t *offsets = m->offsets_h + (size_t)l * (E + 1);
    route_(m, l, loss);
    k->permute_forward(a->xp, a->ln2, a->row_token, R, D);
    if (m->disp) {
        moe_forward_ep_(m, l);
    } else {
        gate_up_forward_(k, a->g, a->u, a->xp, p, offsets, E, D, F);
        k->swiglu_forward(a->a, a->g, a->u, (size_t)R * F);
        k->grouped_matmul_forward(a->yp, a->a, p->w_down, offsets, E, F, D);
    }
    k->unpermute_forward(a->mlp_out, a->yp, a->topk_w, a->assign_row, N, K, D);
}

// Backward of the experts under expert parallelism: m->d_yp (R,D) goes to the expert owners,
// the local expert weight gradients accumulate from every source rank's rows, and the input
// gradients come back into m->d_xp (R,D). The input gradients (dgrad) are computed first and
// start their way back; with [parallel] a2a_overlap the weight gradients (wgrad) are computed
// while they travel, else after they have arrived: the same GEMM calls, so the same bits.
static void moe_backward_ep_(Model *m, int l) {
    LayerParams *p = &m->p.layers[l];
    LayerParams *gp = &m->g.layers[l];
    int D = m->D, F = m->F, El = m->n_local_experts;
    const Ops *k = m->ops;
    const int overlap = m->cfg.a2a_overlap;
    MoetErr err;
    DispatchRows rw;
    DispatchGrads dg;
    ep_check_(dispatch_backward(m->disp, l, m->d_yp, &rw, &dg, &err), &err);
    size_t RF = (size_t)rw.rows * F;
    // dgrad, and the input gradients start their way back
    k->grouped_matmul_backward(dg.d_a, NULL, dg.d_y, rw.a, p->w_down, rw.offsets, El, F, D);
    if (RF > 0) k->swiglu_backward(dg.d_g, dg.d_u, dg.d_a, rw.g, rw.u, RF);
    gate_up_backward_(k, dg.d_x, NULL, NULL, dg.d_g, dg.d_u, rw.x, p, rw.offsets, El, D, F);
    ep_check_(dispatch_backward_return_start(m->disp, l, m->d_xp, &err), &err);
    if (!overlap) ep_check_(dispatch_wait(m->disp, &err), &err);
    // wgrad (with the overlap: while the input gradients travel)
    k->grouped_matmul_backward(NULL, gp->w_down, dg.d_y, rw.a, p->w_down, rw.offsets, El, F, D);
    gate_up_backward_(k, NULL, gp->w_gate, gp->w_up, dg.d_g, dg.d_u, rw.x, p, rw.offsets, El, D,
                      F);
    if (overlap) ep_check_(dispatch_wait(m->disp, &err), &err);
}

void moe_backward(Model *m, int l, const float *d_out, float *d_ln2, double lb_scale,
                  double z_scale) {
    LayerActs *a = &m->acts[l];
    LayerParams *p = &m->p.layers[l];
    LayerParams *gp = &m->g.layers[l];
    int N = m->B * m->T, D = m->D, E = m->E, K = m->K, F = m->F, R = N * K;
    const Ops *k = m->ops;
    const int32_t *offsets = m->offsets_h + (size_t)l * (E + 1);
    const int64_t *fc = m->lb_counts + (size_t)l * E; // f_e's counts, as forward took them
    int64_t total = 0;
    for (int e = 0; e < E; e++) total += fc[e];

    // combine (the backward ops here write their input gradients: no zeroing, kernels.h)
    k->unpermute_backward(m->d_yp, m->d_topk_w, d_out, a->yp, a->topk_w, a->assign_row, N, K, D);
    // experts
    if (m->disp) {
        moe_backward_ep_(m, l);
    } else {
        k->grouped_matmul_backward(m->d_a, gp->w_down, m->d_yp, a->a, p->w_down, offsets, E, F, D);
        k->swiglu_backward(m->d_g, m->d_u, m->d_a, a->g, a->u, (size_t)R * F);
        gate_up_backward_(k, m->d_xp, gp->w_gate, gp->w_up, m->d_g, m->d_u, a->xp, p, offsets,
                          E, D, F);
    }
    // dispatch: d_ln2 written here, the router's matmul below adds to it
    k->permute_backward(d_ln2, m->d_xp, a->assign_row, N, K, D);

    // router: lb = E * sum_e f_e * mean_t p_te, so d lb / d p_te = E * f_e / N (f constant,
    // also when it counts the global batch); z = mean_t lse_t^2, so d z / d lse_t^2 = 1/N.
    float dprob_bias[E];
    for (int e = 0; e < E; e++)
        dprob_bias[e] =
            (float)(lb_scale * E * (total > 0 ? (double)fc[e] / (double)total : 0.0) / N);
    k->to_device(m->d_prob_bias, dprob_bias, (size_t)E * sizeof(float));
    k->zero_fill(m->d_rlogits, (size_t)N * E);
    k->router_backward(m->d_rlogits, m->d_topk_w, m->d_prob_bias, (float)(z_scale / N), a->rprobs,
                       a->rlse, a->rlogits, a->topk_idx, a->topk_w, N, E, K, m->cfg.norm_topk_prob,
                       m->score_fn);
    k->matmul_backward(d_ln2, gp->router, m->d_rlogits, a->ln2, p->router, N, D, E);
}

// ---------------------------------------------------------------------------------------
// dense SwiGLU MLP: out = down(silu(gate(x)) * up(x))

void mlp_forward(Model *m, int l) {
    LayerActs *a = &m->acts[l];
    LayerParams *p = &m->p.layers[l];
    int N = m->B * m->T, D = m->D, F = m->F;
    m->ops->matmul_forward(a->g, a->ln2, p->w_gate, N, D, F);
    m->ops->matmul_forward(a->u, a->ln2, p->w_up, N, D, F);
    m->ops->swiglu_forward(a->a, a->g, a->u, (size_t)N * F);
    m->ops->matmul_forward(a->mlp_out, a->a, p->w_down, N, F, D);
}

void mlp_backward(Model *m, int l, const float *d_out, float *d_ln2) {
    LayerActs *a = &m->acts[l];
    LayerParams *p = &m->p.layers[l];
    LayerParams *gp = &m->g.layers[l];
    int N = m->B * m->T, D = m->D, F = m->F;
    m->ops->zero_fill(m->d_a, (size_t)N * F);
    m->ops->matmul_backward(m->d_a, gp->w_down, d_out, a->a, p->w_down, N, F, D);
    m->ops->swiglu_backward(m->d_g, m->d_u, m->d_a, a->g, a->u, (size_t)N * F);
    m->ops->zero_fill(d_ln2, (size_t)N * D);
    m->ops->matmul_backward(d_ln2, gp->w_gate, m->d_g, a->ln2, p->w_gate, N, D, F);
    m->ops->matmul_backward(d_ln2, gp->w_up, m->d_u, a->ln2, p->w_up, N, D, F);
}
