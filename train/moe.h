// moe: one mixture-of-experts block, in the stages of Megatron-Core's MoE split: router (scores,
// top-k, load-balancing and z losses), dispatch (permute rows by expert), experts (grouped
// SwiGLU GEMMs), combine (unpermute + weighted sum). Dropless; deterministic; no atomics.
#pragma once
#include "train/model.h"

// Loss terms of one layer for the last forward (before lb_coef / z_coef).
typedef struct {
    double lb;  // E * sum_e f_e * P_e  (uniform routing gives 1; f of the micro-batch or of the
                // global batch, [moe] lb_scope)
    double z;   // mean_t logsumexp(logits_t)^2
} MoeLayerLoss;

// Forward of the MoE block of layer l: reads a->ln2 (N,D), writes a->mlp_out (N,D) and every
// saved routing activation; fills *loss, m->expert_tokens[l*E ...] and m->lb_counts[l*E ...]
// (the counts behind the lb loss's f_e: this micro-batch's, or with m->lb_global_counts /
// m->lb_global_comm the global batch's, which backward then uses too).
void moe_forward(Model *m, int l, MoeLayerLoss *loss);
// Backward: d_out (N,D) is the gradient reaching mlp_out; WRITES d_ln2 (N,D), the gradient
// reaching ln2, and ACCUMULATES into the layer's parameter gradients. lb_scale / z_scale are
// d(loss)/d(layer lb) and d(layer z).
void moe_backward(Model *m, int l, const float *d_out, float *d_ln2, double lb_scale,
                  double z_scale);

// The dense SwiGLU MLP (n_experts = 0) in the same place, with the same contract.
void mlp_forward(Model *m, int l);
void mlp_backward(Model *m, int l, const float *d_out, float *d_ln2);
