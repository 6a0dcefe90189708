// optim: AdamW over the model's flat parameter buffer, the learning-rate schedule, and the
// global gradient norm with clipping. The moments exp_avg / exp_avg_sq are laid out like
// m->params (one float per parameter), so checkpoints store them under the same tensor names.
#pragma once
#include <stddef.h>
#include <stdint.h>

#include "train/config.h"
#include "train/model.h"

typedef struct {
    const Ops *ops;    // the model's backend
    size_t n;          // floats, = m->n_params
    float *exp_avg;    // (n) first moment (backend memory)
    float *exp_avg_sq; // (n) second moment (backend memory)
    // host copies for checkpoints (= exp_avg, exp_avg_sq on the CPU): optim_download before a
    // save, optim_upload after a load
    float *exp_avg_h, *exp_avg_sq_h;
    int64_t t;         // AdamW steps taken (bias correction); the next update uses t + 1
} Optim;

// Allocates zeroed moments for m on m's backend (t = 0).
void optim_create(Optim *o, const Model *m);
void optim_free(Optim *o);
void optim_download(Optim *o);
void optim_upload(Optim *o);

// The learning rate of optimizer step `step` (1-based: the first update is step 1). With
// lr = c->lr, W = warmup_steps, S = max_steps, lo = min_lr:
//   step <= W:  lr * step / W                               (linear warmup from 0)
//   step >  W:  p = (step - W) / (S - W), clamped to [0, 1] (p = 1 when S <= W)
//     cosine:   lo + (lr - lo) * 0.5 * (1 + cos(pi * p))
//     linear:   lo + (lr - lo) * (1 - p)
//     constant: lr
// It depends on the step alone, so a resumed run follows the same curve bit for bit.
double optim_lr(const Config *c, int64_t step);

// The global L2 norm of the gradients: sqrt of the sum over every tensor of sum_squares,
// accumulated in double in tensor-table order (deterministic). *bad (may be NULL) receives the
// first tensor in table order whose gradient holds a NaN or an infinity (or whose sum of
// squares overflows), else NULL.
double optim_grad_norm(const Model *m, const ParamTensor **bad);

// The same norm for an expert-parallel model (ARCHITECTURE §4), whose expert tensors hold only
// this rank's experts: the non-expert sum of squares is taken locally (the gradients are
// replicated), the expert sum of squares locally then summed over the EP group `ep` (rank
// order, so every rank of the group gets the same bits); each part in table order. ep NULL or
// of size 1: no communication (the order of the sums differs from optim_grad_norm, so the last
// bits may too). *bad as for optim_grad_norm, for this rank's slice only (a non-finite slice
// elsewhere makes *norm non-finite on every rank of the group). Every rank of ep must call it.
int optim_grad_norm_ep(const Model *m, Comm *ep, double *norm, const ParamTensor **bad,
                       MoetErr *err);

// Clipping factor for a gradient of norm `norm`: clip / norm when clip > 0 and norm > clip,
// else 1.
float optim_clip_scale(double norm, float clip);

// One AdamW step (t += 1) with learning rate lr over every tensor; the gradient is multiplied
// by grad_scale first (clipping). Weight decay c->weight_decay applies to the tensors whose
// table flag `decay` is set: every matrix, embeddings and lm_head included (as OLMoE, which
// decays its embeddings), but not the RMSNorm weights (q_norm, k_norm, layer norms).
void optim_step(Optim *o, Model *m, const Config *c, float lr, float grad_scale);
