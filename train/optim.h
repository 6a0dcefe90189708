// optim: AdamW over the model's flat parameter buffer, the learning-rate schedule, and the
// global gradient norm with clipping. The moments exp_avg / exp_avg_sq are laid out like
// m->params (one float per parameter), so checkpoints store them under the same tensor names.
#pragma once
#include <stddef.h>
#include <stdint.h>

#include "train/comm.h"
#include "train/config.h"
#include "train/model.h"

// ZeRO-1 (optim_create_sharded): the parameters of a group of ranks that hold the same tensors
// (the world for the shared tensors, the expert-DP group for this rank's experts), laid end to
// end in table order, are cut into one contiguous part per rank of the group; a rank keeps the
// AdamW moments of its part only, updates its part, and the group all-gathers the parameters.
typedef struct {
    Comm *comm;          // world (shared tensors) or expert-DP group (expert tensors)
    size_t size;         // floats of the group's tensors
    size_t *counts;      // (group size) floats of each rank's part
    size_t lo;           // this rank's part: [lo, lo + counts[rank]) of the group's floats
    size_t base;         // the group's tensors are params[base, base + size) when contiguous
    int contiguous;
} OptimShard;

// The part of one tensor this rank updates.
typedef struct {
    size_t param_off;    // into params / grads
    size_t mom_off;      // into exp_avg / exp_avg_sq
    size_t flat_off;     // into its group's floats
    size_t n;
    int decay, group;
} OptimSeg;

typedef struct {
    const Ops *ops;    // the model's backend
    size_t n;          // moment floats: m->n_params, or this rank's parts (ZeRO-1)
    float *exp_avg;    // (n) first moment (backend memory)
    float *exp_avg_sq; // (n) second moment (backend memory)
    // host copies for checkpoints (= exp_avg, exp_avg_sq on the CPU): optim_download before a
    // save, optim_upload after a load. ZeRO-1: NULL; see optim_gather_host / optim_scatter_host.
    float *exp_avg_h, *exp_avg_sq_h;
    int64_t t;         // AdamW steps taken (bias correction); the next update uses t + 1
    // ZeRO-1 (sharded = 1)
    int sharded;
    OptimShard shard[2]; // [0] shared tensors over the world, [1] expert tensors over the EDP
    OptimSeg *segs;
    int n_segs;
} Optim;

// Allocates zeroed moments for m on m's backend (t = 0).
void optim_create(Optim *o, const Model *m);
// The same with ZeRO-1 over the ranks of par (see OptimShard). Every rank calls it.
void optim_create_sharded(Optim *o, const Model *m, Parallel *par);
void optim_free(Optim *o);
void optim_download(Optim *o);
void optim_upload(Optim *o);
// ZeRO-1 checkpoints hold the full moments: optim_gather_host all-gathers them into host
// arrays laid out like m->params (n_params floats each, allocated by the caller); every rank
// of the groups calls it. optim_scatter_host takes this rank's parts from such arrays.
int optim_gather_host(Optim *o, const Model *m, float *exp_avg_h, float *exp_avg_sq_h,
                      MoetErr *err);
void optim_scatter_host(Optim *o, const float *exp_avg_h, const float *exp_avg_sq_h);
// ZeRO-1, after optim_step: every rank gets the parameters the others updated (all-gather over
// each group; m->grads serves as scratch, so call it after the gradients are used).
int optim_gather_params(Optim *o, Model *m, MoetErr *err);

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

// One AdamW step (t += 1) with learning rate lr over every tensor (ZeRO-1: over this rank's
// parts; then optim_gather_params); the gradient is multiplied
// by grad_scale first (clipping). Weight decay c->weight_decay applies to the tensors whose
// table flag `decay` is set: every matrix, embeddings and lm_head included (as OLMoE, which
// decays its embeddings), but not the RMSNorm weights (q_norm, k_norm, layer norms). Tensors
// flagged no_optim (the expert bias) are skipped here, in the gradient norm and by ZeRO-1.
void optim_step(Optim *o, Model *m, const Config *c, float lr, float grad_scale);
