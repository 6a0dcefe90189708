// optim: AdamW, the lr schedule, gradient norm and clipping (see optim.h).
#include "train/optim.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>


#define PI_ 3.14159265358979323846 // M_PI is not in C11

void optim_create(Optim *o, const Model *m) {
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

void optim_free(Optim *o) {
    if (!o->ops) return;
    if (o->exp_avg_h != o->exp_avg) free(o->exp_avg_h);
    if (o->exp_avg_sq_h != o->exp_avg_sq) free(o->exp_avg_sq_h);
    o->ops->free(o->exp_avg);
    o->ops->free(o->exp_avg_sq);
    memset(o, 0, sizeof *o);
}

void optim_download(Optim *o) {
    o->ops->to_host(o->exp_avg_h, o->exp_avg, o->n * sizeof(float));
    o->ops->to_host(o->exp_avg_sq_h, o->exp_avg_sq, o->n * sizeof(float));
}

void optim_upload(Optim *o) {
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
    for (int i = 0; i < m->n_tensors; i++) {
        const ParamTensor *t = &m->tensors[i];
        float wd = t->decay ? c->weight_decay : 0.0f;
        m->ops->adamw_update(m->params + t->offset, m->grads + t->offset, o->exp_avg + t->offset,
                     o->exp_avg_sq + t->offset, t->numel, lr, c->beta1, c->beta2, c->eps, wd,
                     (int)o->t, grad_scale);
    }
}
