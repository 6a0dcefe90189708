// optim: AdamW, the lr schedule, gradient norm and clipping (see optim.h).
#include "train/optim.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>


#define PI_ 3.14159265358979323846 // M_PI is not in C11

void optim_create(Optim *o, const Model *m) {
    memset(o, 0, sizeof *o);
    o->ops = m->ops;
    o->n = m->n_params;
    o->exp_avg = o->ops->alloc(o->n * sizeof(float));
    o->exp_avg_sq = o->ops->alloc(o->n * sizeof(float));
    if (o->ops->on_device) {
        o->exp_avg_h = moet_calloc(o->n * sizeof(float));
        o->exp_avg_sq_h = moet_calloc(o->n * sizeof(float));
    } else {
        o->exp_avg_h = o->exp_avg;
        o->exp_avg_sq_h = o->exp_avg_sq;
    }
    o->t = 0;
}

// ---- ZeRO-1 ----

// The parts of group g (0: shared tensors, 1: expert tensors) and this rank's segments of them.
static void shard_group_(Optim *o, const Model *m, int g, Comm *comm, size_t *mom) {
    OptimShard *sh = &o->shard[g];
    int P = comm_size(comm), r = comm_rank(comm);
    sh->comm = comm;
    sh->counts = moet_calloc((size_t)P * sizeof(size_t));
    size_t size = 0, end = 0;
    sh->contiguous = 1;
    for (int i = 0; i < m->n_tensors; i++) {
        const ParamTensor *t = &m->tensors[i];
        if (t->is_expert != g || t->no_optim) continue;
        if (size == 0) sh->base = end = t->offset;
        if (t->offset != end) sh->contiguous = 0;
        end = t->offset + t->numel;
        size += t->numel;
    }
    sh->size = size;
    size_t per = (size + (size_t)P - 1) / (size_t)P;
    for (int j = 0; j < P; j++) {
        size_t lo = per * (size_t)j < size ? per * (size_t)j : size;
        size_t hi = lo + per < size ? lo + per : size;
        sh->counts[j] = hi - lo;
        if (j == r) sh->lo = lo;
    }
    size_t lo = sh->lo, hi = lo + sh->counts[r], f = 0;
    for (int i = 0; i < m->n_tensors; i++) {
        const ParamTensor *t = &m->tensors[i];
        if (t->is_expert != g || t->no_optim) continue;
        size_t a = f > lo ? f : lo, b = f + t->numel < hi ? f + t->numel : hi;
        if (a < b) {
            o->segs = realloc(o->segs, (size_t)(o->n_segs + 1) * sizeof *o->segs);
            if (!o->segs) moet_die("out of memory (optimizer segments)");
            o->segs[o->n_segs++] = (OptimSeg){t->offset + (a - f), *mom, a, b - a, t->decay, g};
            *mom += b - a;
        }
        f += t->numel;
    }
}

void optim_create_sharded(Optim *o, const Model *m, Parallel *par) {
    memset(o, 0, sizeof *o);
    o->ops = m->ops;
    o->sharded = 1;
    size_t mom = 0;
    shard_group_(o, m, 0, par->world, &mom);
    shard_group_(o, m, 1, par->edp, &mom);
    o->n = mom;
    o->exp_avg = o->ops->alloc((mom ? mom : 1) * sizeof(float));
    o->exp_avg_sq = o->ops->alloc((mom ? mom : 1) * sizeof(float));
}

// The group's floats laid out like the parameters: each tensor of group g copied from its place
// in flat (the tensors end to end, table order) to dst + its offset, with copy.
static void unpack_group_(const Model *m, int g, float *dst, const float *flat,
                          void (*copy)(void *dst, const void *src, size_t bytes)) {
    size_t f = 0;
    for (int i = 0; i < m->n_tensors; i++) {
        const ParamTensor *t = &m->tensors[i];
        if (t->is_expert != g || t->no_optim) continue;
        copy(dst + t->offset, flat + f, t->numel * sizeof(float));
        f += t->numel;
    }
}

static void host_copy_(void *dst, const void *src, size_t bytes) {
    memcpy(dst, src, bytes);
}

int optim_gather_params(Optim *o, Model *m, MoetErr *err) {
    const Ops *k = o->ops;
    for (int g = 0; g < 2; g++) {
        OptimShard *sh = &o->shard[g];
        if (sh->size == 0 || comm_size(sh->comm) == 1) continue;
        // the collective writes the parameters outside the op table: the backend's converted
        // copy of them (kernels/ops.h, params_register) must hear of it
        if (k->params_written) k->params_written(m->params, m->n_params * sizeof(float));
        if (sh->contiguous) { // in place
            int rc = comm_buf_allgatherv_f32(sh->comm, m->params + sh->base, sh->counts, err);
            if (rc) return rc;
            continue;
        }
        // pack this rank's part into the group's floats (in m->grads), gather, unpack
        float *flat = m->grads;
        for (int i = 0; i < o->n_segs; i++) {
            const OptimSeg *s = &o->segs[i];
            if (s->group == g) k->copy(flat + s->flat_off, m->params + s->param_off,
                                       s->n * sizeof(float));
        }
        int rc = comm_buf_allgatherv_f32(sh->comm, flat, sh->counts, err);
        if (rc) return rc;
        unpack_group_(m, g, m->params, flat, k->copy);
    }
    return 0;
}

// Moments of this rank's parts <-> host arrays laid out like params.
int optim_gather_host(Optim *o, const Model *m, float *exp_avg_h, float *exp_avg_sq_h,
                      MoetErr *err) {
    float *dst[2] = {exp_avg_h, exp_avg_sq_h};
    const float *src[2] = {o->exp_avg, o->exp_avg_sq};
    for (int g = 0; g < 2; g++) {
        OptimShard *sh = &o->shard[g];
        if (sh->size == 0) continue;
        float *flat = moet_malloc(sh->size * sizeof(float));
        for (int v = 0; v < 2; v++) {
            for (int i = 0; i < o->n_segs; i++) {
                const OptimSeg *s = &o->segs[i];
                if (s->group == g)
                    o->ops->to_host(flat + s->flat_off, src[v] + s->mom_off, s->n * sizeof(float));
            }
            int rc = comm_size(sh->comm) > 1 ? comm_allgatherv_f32(sh->comm, flat, sh->counts, err)
                                              : 0;
            if (rc) {
                free(flat);
                return rc;
            }
            unpack_group_(m, g, dst[v], flat, host_copy_);
        }
        free(flat);
    }
    return 0;
}

void optim_scatter_host(Optim *o, const float *exp_avg_h, const float *exp_avg_sq_h) {
    for (int i = 0; i < o->n_segs; i++) {
        const OptimSeg *s = &o->segs[i];
        o->ops->to_device(o->exp_avg + s->mom_off, exp_avg_h + s->param_off, s->n * sizeof(float));
        o->ops->to_device(o->exp_avg_sq + s->mom_off, exp_avg_sq_h + s->param_off,
                          s->n * sizeof(float));
    }
}

void optim_free(Optim *o) {
    if (!o->ops) return;
    for (int g = 0; g < 2; g++) free(o->shard[g].counts);
    free(o->segs);
    if (o->exp_avg_h != o->exp_avg) free(o->exp_avg_h);
    if (o->exp_avg_sq_h != o->exp_avg_sq) free(o->exp_avg_sq_h);
    o->ops->free(o->exp_avg);
    o->ops->free(o->exp_avg_sq);
    memset(o, 0, sizeof *o);
}

void optim_download(Optim *o) {
    if (o->sharded) return; // optim_gather_host
    o->ops->to_host(o->exp_avg_h, o->exp_avg, o->n * sizeof(float));
    o->ops->to_host(o->exp_avg_sq_h, o->exp_avg_sq, o->n * sizeof(float));
}

void optim_upload(Optim *o) {
    if (o->sharded) return; // optim_scatter_host
    o->ops->to_device(o->exp_avg, o->exp_avg_h, o->n * sizeof(float));
    o->ops->to_device(o->exp_avg_sq, o->exp_avg_sq_h, o->n * sizeof(float));
}

double optim_lr(const Config *c, int64_t step) {
    double lr = c->lr, lo = c->min_lr;
    int64_t W = c->warmup_steps, S = c->max_steps;
    if (step <= W) return W > 0 ? lr * (double)step / (double)W : lr;
    if (strcmp(c->schedule, "constant") == 0) return lr;
    double p = S > W ? (double)(step - W) / (double)(S - W) : 1.0;
    if (p > 1.0) p = 1.0;
    if (p < 0.0) p = 0.0;
    if (strcmp(c->schedule, "linear") == 0) return lo + (lr - lo) * (1.0 - p);
    return lo + (lr - lo) * 0.5 * (1.0 + cos(PI_ * p)); // cosine (config_validate checks)
}

double optim_grad_norm(const Model *m, const ParamTensor **bad) {
    double ss = 0;
    if (bad) *bad = NULL;
    for (int i = 0; i < m->n_tensors; i++) {
        const ParamTensor *t = &m->tensors[i];
        if (t->no_optim) continue; // no gradient by design
        // a double sum of squares is inf or NaN exactly when an element is (floats cannot
        // overflow it)
        double s = m->ops->sum_squares(m->grads + t->offset, t->numel);
        if (bad && !*bad && !isfinite(s)) *bad = t;
        ss += s;
    }
    return sqrt(ss);
}

int optim_grad_norm_ep(const Model *m, Comm *ep, double *norm, const ParamTensor **bad,
                       MoetErr *err) {
    double ss[2] = {0, 0}; // non-expert, expert
    if (bad) *bad = NULL;
    for (int i = 0; i < m->n_tensors; i++) {
        const ParamTensor *t = &m->tensors[i];
        if (t->no_optim) continue;
        double s = m->ops->sum_squares(m->grads + t->offset, t->numel);
        if (bad && !*bad && !isfinite(s)) *bad = t;
        ss[t->is_expert ? 1 : 0] += s;
    }
    if (ep && comm_size(ep) > 1) {
        int rc = comm_allreduce_sum_f64(ep, &ss[1], 1, err);
        if (rc) return rc;
    }
    *norm = sqrt(ss[0] + ss[1]);
    return 0;
}

float optim_clip_scale(double norm, float clip) {
    if (clip > 0 && norm > clip) return (float)(clip / norm);
    return 1.0f;
}

void optim_step(Optim *o, Model *m, const Config *c, float lr, float grad_scale) {
    o->t++;
    for (int i = 0; o->sharded && i < o->n_segs; i++) {
        const OptimSeg *s = &o->segs[i];
        float wd = s->decay ? c->weight_decay : 0.0f;
        m->ops->adamw_update(m->params + s->param_off, m->grads + s->param_off,
                             o->exp_avg + s->mom_off, o->exp_avg_sq + s->mom_off, s->n, lr,
                             c->beta1, c->beta2, c->eps, wd, (int)o->t, grad_scale);
    }
    for (int i = 0; !o->sharded && i < m->n_tensors; i++) {
        const ParamTensor *t = &m->tensors[i];
        if (t->no_optim) continue; // the expert bias: model_update_expert_bias
        float wd = t->decay ? c->weight_decay : 0.0f;
        m->ops->adamw_update(m->params + t->offset, m->grads + t->offset, o->exp_avg + t->offset,
                     o->exp_avg_sq + t->offset, t->numel, lr, c->beta1, c->beta2, c->eps, wd,
                     (int)o->t, grad_scale);
    }
}
