// ops_profile: where a training step goes, op by op, on any backend (`moet bench --profile`).
// ops_profile(inner) returns a table whose every op calls inner's (so results are bit for bit
// the same) and, between ops_profile_step_begin and _end, puts a mark before and after it. On
// a GPU the marks are events on the stream every op runs on (inner->mark): the GPU stamps them
// when it gets there, so an op's time is its time on the GPU, and the time between one op's
// end and the next op's start is time the GPU waited for the host. On the CPU (no inner->mark)
// the marks read the host clock: the ops have finished when they return.
// The times add up per (op, C, OC) over the profiled steps; matmuls and attention also count
// their FLOPs (attention the full (T,T) square, as ARCHITECTURE §10's 12·L·D·T per token), the
// other ops the bytes they must move at least (fp32 operands read once, outputs written once;
// an accumulated output read and written), for their bandwidth.
// Memory ops that move or clear data (zero, to_device, to_host, copy) are timed too; alloc,
// free, sync and the bookkeeping ops pass straight through.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kernels/ops.h"

// The timed ops, by their names in the table: an id OP_name each, a wrapper name_ each.
// clang-format off
#define TIMED_OPS_(X) \
    X(zero) X(to_device) X(to_host) X(copy) X(embedding_forward) X(embedding_backward) \
    X(rmsnorm_forward) X(rmsnorm_backward) X(matmul_forward) X(matmul_backward) X(rope_forward) \
    X(rope_backward) X(rope_forward_at) X(attention_forward_cached) X(attention_forward) \
    X(attention_backward) X(swiglu_forward) X(swiglu_backward) X(add_forward) X(router_forward) \
    X(router_backward) X(router_aux_sums) X(moe_plan) X(permute_forward) X(permute_backward) \
    X(unpermute_forward) X(unpermute_backward) X(grouped_matmul_forward) \
    X(grouped_matmul_backward) X(grouped_matmul_forward_pair) X(grouped_matmul_backward_pair) \
    X(crossentropy_forward) X(crossentropy_forward_backward) X(adamw_update) X(sum_squares) \
    X(scale_inplace) X(zero_fill)
// clang-format on
#define ID_(f) OP_##f,
enum { TIMED_OPS_(ID_) OP_COUNT_ };
#define NAME_(f) #f,
static const char *const OP_NAMES_[OP_COUNT_] = {TIMED_OPS_(NAME_)};

// One timed call of the current step: marks a (before) and b (after).
typedef struct {
    int op, c, oc, a, b;
    double flops, bytes;
} Call_;

// The process's profiler: the wrapped table, the current step's calls, the totals.
static struct {
    const Ops *in;  // the backend
    Ops table;      // what ops_profile returns
    int active;     // inside step_begin .. step_end
    int n_marks;    // marks used in this step (mark 0: the step's start)
    double *host_t; // host clock per mark, where the backend has no marks (grows)
    int host_cap;
    Call_ *calls; // this step's calls (grows)
    int n_calls, cap_calls;
    OpsProfileRow *rows; // the totals (grows)
    int n_rows, cap_rows;
    int steps;
    double span_ms, between_ms;
} P_;

static double now_s_(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void *grow_(void *p, int *cap, int need, size_t elem) {
    if (need <= *cap) return p;
    int c = *cap ? *cap : 256;
    while (c < need) c *= 2;
    p = realloc(p, (size_t)c * elem);
    if (!p) {
        fprintf(stderr, "moet: fatal: ops_profile: out of host memory\n");
        exit(EXIT_FAILURE);
    }
    *cap = c;
    return p;
}

// Records the next mark and returns its number.
static int mark_(void) {
    const int i = P_.n_marks++;
    if (P_.in->mark) {
        P_.in->mark(i);
    } else {
        P_.host_t = grow_(P_.host_t, &P_.host_cap, i + 1, sizeof *P_.host_t);
        P_.host_t[i] = now_s_();
    }
    return i;
}

static double mark_ms_(int i, int j) {
    if (P_.in->mark_ms) return P_.in->mark_ms(i, j);
    return 1e3 * (P_.host_t[j] - P_.host_t[i]);
}

// Before and after an op: begin_ returns the first mark (-1 outside a profiled step).
static int begin_(void) {
    return P_.active ? mark_() : -1;
}
static void end_(int op, int a, double flops, double bytes, int c, int oc) {
    if (a < 0) return;
    const int b = mark_();
    P_.calls = grow_(P_.calls, &P_.cap_calls, P_.n_calls + 1, sizeof *P_.calls);
    P_.calls[P_.n_calls++] = (Call_){op, c, oc, a, b, flops, bytes};
}

static OpsProfileRow *row_(int op, int c, int oc) {
    for (int i = 0; i < P_.n_rows; i++)
        if (P_.rows[i].op == OP_NAMES_[op] && P_.rows[i].c == c && P_.rows[i].oc == oc)
            return &P_.rows[i];
    P_.rows = grow_(P_.rows, &P_.cap_rows, P_.n_rows + 1, sizeof *P_.rows);
    P_.rows[P_.n_rows] = (OpsProfileRow){OP_NAMES_[op], c, oc, 0, 0.0, 0.0, 0.0, 0.0};
    return &P_.rows[P_.n_rows++];
}

void ops_profile_reset(void) {
    P_.n_rows = 0;
    P_.steps = 0;
    P_.span_ms = P_.between_ms = 0.0;
}

void ops_profile_step_begin(void) {
    if (!P_.in) return;
    P_.active = 1;
    P_.n_marks = 0;
    P_.n_calls = 0;
    mark_(); // mark 0: the step's start
}

void ops_profile_step_end(void) {
    if (!P_.in || !P_.active) return;
    const int last = mark_();
    P_.active = 0;
    const double span = mark_ms_(0, last); // waits for the step's last op
    double inside = 0.0;
    int prev = 0; // the mark before the op's start: the step's start, then the previous op's end
    for (int i = 0; i < P_.n_calls; i++) {
        const Call_ *k = &P_.calls[i];
        OpsProfileRow *r = row_(k->op, k->c, k->oc);
        const double ms = mark_ms_(k->a, k->b);
        r->calls++;
        r->ms += ms;
        r->before_ms += mark_ms_(prev, k->a);
        r->flops += k->flops;
        r->bytes += k->bytes;
        inside += ms;
        prev = k->b;
    }
    P_.steps++;
    P_.span_ms += span;
    P_.between_ms += span - inside;
}

static int by_ms_desc_(const void *x, const void *y) {
    const double a = ((const OpsProfileRow *)x)->ms, b = ((const OpsProfileRow *)y)->ms;
    return (a < b) - (a > b);
}

int ops_profile_rows(OpsProfileRow *rows, int max, int *steps, double *span_ms,
                     double *between_ms) {
    qsort(P_.rows, (size_t)P_.n_rows, sizeof *P_.rows, by_ms_desc_);
    for (int i = 0; i < P_.n_rows && i < max; i++) rows[i] = P_.rows[i];
    if (steps) *steps = P_.steps;
    if (span_ms) *span_ms = P_.span_ms;
    if (between_ms) *between_ms = P_.between_ms;
    return P_.n_rows;
}

void ops_profile_print(FILE *f, int tflops) {
    int steps = 0;
    double span = 0.0, between = 0.0;
    const int n = ops_profile_rows(NULL, 0, &steps, &span, &between);
    if (steps == 0) return;
    const double per = 1.0 / steps, unit = tflops ? 1e12 : 1e9;
    fprintf(f, "\nwhere a step goes (--profile: %d step%s, per step; %s):\n", steps,
            steps == 1 ? "" : "s",
            P_.in->mark ? "time on the GPU between events around each op"
                        : "host clock around each op");
    fprintf(f, "%10s %7s %7s %8s %9s %8s  %s\n", "ms", "share", "calls", "before",
            tflops ? "TFLOP/s" : "GFLOP/s", "GB/s", "op [C -> OC]");
    for (int i = 0; i < n; i++) {
        const OpsProfileRow *r = &P_.rows[i];
        char rate[32] = "", bw[32] = "", shape[48] = "";
        if (r->flops > 0.0 && r->ms > 0.0)
            snprintf(rate, sizeof rate, "%.1f", r->flops / (1e-3 * r->ms) / unit);
        if (r->bytes > 0.0 && r->ms > 0.0)
            snprintf(bw, sizeof bw, "%.1f", r->bytes / (1e-3 * r->ms) / 1e9);
        if (r->c || r->oc) snprintf(shape, sizeof shape, " [%d -> %d]", r->c, r->oc);
        fprintf(f, "%10.2f %6.1f%% %7.1f %8.2f %9s %8s  %s%s\n", r->ms * per,
                span > 0.0 ? 100.0 * r->ms / span : 0.0, (double)r->calls * per, r->before_ms * per,
                rate, bw, r->op, shape);
    }
    fprintf(f, "%10.2f %6.1f%% %7s %8s %9s %8s  %s\n", between * per,
            span > 0.0 ? 100.0 * between / span : 0.0, "", "", "", "",
            P_.in->mark ? "(between ops: the GPU waited for the host)"
                        : "(between ops: host code outside the ops)");
    fprintf(f, "%10.2f %6.1f%% %7s %8s %9s %8s  %s\n", span * per, 100.0, "", "", "", "",
            "the step, first mark to last");
    fprintf(f,
            "(before: ms from the previous op's end to this op's start%s; FLOP/s: attention "
            "counts the full (T,T) square, as the MFU; GB/s: the fp32 bytes an op must read "
            "and write at least)\n",
            P_.in->mark ? ", the GPU idle" : "");
}

// ---------------------------------------------------------------------------------------
// The wrapped ops. Each runs inner's between two marks; the FLOP counts are 2 per multiply-add.

#define IN_ (P_.in)

static void zero_(void *p, size_t bytes) {
    const int a = begin_();
    IN_->zero(p, bytes);
    end_(OP_zero, a, 0.0, (double)bytes, 0, 0);
}
static void to_device_(void *dst, const void *src, size_t bytes) {
    const int a = begin_();
    IN_->to_device(dst, src, bytes);
    end_(OP_to_device, a, 0.0, (double)bytes, 0, 0);
}
static void to_host_(void *dst, const void *src, size_t bytes) {
    const int a = begin_();
    IN_->to_host(dst, src, bytes);
    end_(OP_to_host, a, 0.0, (double)bytes, 0, 0);
}
static void copy_(void *dst, const void *src, size_t bytes) {
    const int a = begin_();
    IN_->copy(dst, src, bytes);
    end_(OP_copy, a, 0.0, 2.0 * bytes, 0, 0);
}
static void embedding_forward_(float *out, const int32_t *tokens, const float *wte, int N, int D) {
    const int a = begin_();
    IN_->embedding_forward(out, tokens, wte, N, D);
    end_(OP_embedding_forward, a, 0.0, 8.0 * N * D, 0, 0);
}
static void embedding_backward_(float *dwte, const float *dout, const int32_t *tokens_host, int N,
                                int D) {
    const int a = begin_();
    IN_->embedding_backward(dwte, dout, tokens_host, N, D);
    end_(OP_embedding_backward, a, 0.0, 12.0 * N * D, 0, 0);
}
static void rmsnorm_forward_(float *out, float *rstd, const float *x, const float *w, int N, int D,
                             float eps) {
    const int a = begin_();
    IN_->rmsnorm_forward(out, rstd, x, w, N, D, eps);
    end_(OP_rmsnorm_forward, a, 0.0, 8.0 * N * D, 0, 0);
}
static void rmsnorm_backward_(float *dx, float *dw, const float *dout, const float *x,
                              const float *w, const float *rstd, int N, int D) {
    const int a = begin_();
    IN_->rmsnorm_backward(dx, dw, dout, x, w, rstd, N, D);
    end_(OP_rmsnorm_backward, a, 0.0, 8.0 * N * D * (1 + (dx != NULL)), 0, 0);
}
static void matmul_forward_(float *out, const float *inp, const float *w, int N, int C, int OC) {
    const int a = begin_();
    IN_->matmul_forward(out, inp, w, N, C, OC);
    end_(OP_matmul_forward, a, 2.0 * N * C * OC, 0.0, C, OC);
}
static void matmul_backward_(float *dinp, float *dw, const float *dout, const float *inp,
                             const float *w, int N, int C, int OC) {
    const int a = begin_();
    IN_->matmul_backward(dinp, dw, dout, inp, w, N, C, OC);
    end_(OP_matmul_backward, a, 2.0 * N * C * OC * ((dinp != NULL) + (dw != NULL)), 0.0, C, OC);
}
static void rope_forward_(float *out, const float *inp, int B, int T, int H, int Dh, float theta) {
    const int a = begin_();
    IN_->rope_forward(out, inp, B, T, H, Dh, theta);
    end_(OP_rope_forward, a, 0.0, 8.0 * B * T * H * Dh, 0, 0);
}
static void rope_backward_(float *dinp, const float *dout, int B, int T, int H, int Dh,
                           float theta) {
    const int a = begin_();
    IN_->rope_backward(dinp, dout, B, T, H, Dh, theta);
    end_(OP_rope_backward, a, 0.0, 8.0 * B * T * H * Dh, 0, 0);
}
static void rope_forward_at_(float *out, const float *inp, int T, int H, int Dh, float theta,
                             int pos0) {
    const int a = begin_();
    IN_->rope_forward_at(out, inp, T, H, Dh, theta, pos0);
    end_(OP_rope_forward_at, a, 0.0, 8.0 * T * H * Dh, 0, 0);
}
static void attention_forward_cached_(float *out, const float *q, const float *k, const float *v,
                                      int Tq, int Tk, int H, int Dh) {
    const int a = begin_();
    IN_->attention_forward_cached(out, q, k, v, Tq, Tk, H, Dh);
    end_(OP_attention_forward_cached, a, 4.0 * Tq * Tk * H * Dh, 0.0, 0, 0);
}
static void attention_forward_(float *out, float *lse, const float *q, const float *k,
                               const float *v, int B, int T, int H, int Dh) {
    const int a = begin_();
    IN_->attention_forward(out, lse, q, k, v, B, T, H, Dh);
    end_(OP_attention_forward, a, 4.0 * B * T * (double)T * H * Dh, 0.0, 0, 0);
}
static void attention_backward_(float *dq, float *dk, float *dv, const float *dout,
                                const float *out, const float *lse, const float *q, const float *k,
                                const float *v, int B, int T, int H, int Dh) {
    const int a = begin_();
    IN_->attention_backward(dq, dk, dv, dout, out, lse, q, k, v, B, T, H, Dh);
    end_(OP_attention_backward, a, 8.0 * B * T * (double)T * H * Dh, 0.0, 0, 0);
}
static void swiglu_forward_(float *out, const float *g, const float *u, size_t n) {
    const int a = begin_();
    IN_->swiglu_forward(out, g, u, n);
    end_(OP_swiglu_forward, a, 0.0, 12.0 * n, 0, 0);
}
static void swiglu_backward_(float *dg, float *du, const float *dout, const float *g,
                             const float *u, size_t n) {
    const int a = begin_();
    IN_->swiglu_backward(dg, du, dout, g, u, n);
    end_(OP_swiglu_backward, a, 0.0, 4.0 * n * (3 + (dg != NULL) + (du != NULL)), 0, 0);
}
static void add_forward_(float *out, const float *x, const float *y, size_t n) {
    const int a = begin_();
    IN_->add_forward(out, x, y, n);
    end_(OP_add_forward, a, 0.0, 12.0 * n, 0, 0);
}
static void router_forward_(float *probs, float *lse, int32_t *topk_idx, float *topk_w,
                            const float *logits, const float *bias, int N, int E, int K,
                            int norm_topk, int score_fn) {
    const int a = begin_();
    IN_->router_forward(probs, lse, topk_idx, topk_w, logits, bias, N, E, K, norm_topk, score_fn);
    end_(OP_router_forward, a, 0.0, 8.0 * N * E, 0, 0);
}
static void router_backward_(float *dlogits, const float *dtopk_w, const float *dprob_bias,
                             float dz_coef, const float *probs, const float *lse,
                             const float *logits, const int32_t *topk_idx, const float *topk_w,
                             int N, int E, int K, int norm_topk, int score_fn) {
    const int a = begin_();
    IN_->router_backward(dlogits, dtopk_w, dprob_bias, dz_coef, probs, lse, logits, topk_idx,
                         topk_w, N, E, K, norm_topk, score_fn);
    end_(OP_router_backward, a, 0.0, 12.0 * N * E, 0, 0);
}
static void router_aux_sums_(double *prob_sum_host, double *lse_sq_sum_host, const float *probs,
                             const float *lse, int N, int E) {
    const int a = begin_();
    IN_->router_aux_sums(prob_sum_host, lse_sq_sum_host, probs, lse, N, E);
    end_(OP_router_aux_sums, a, 0.0, 4.0 * N * E, 0, 0);
}
static void moe_plan_(int32_t *counts, int32_t *offsets, int32_t *row_token, int32_t *assign_row,
                      const int32_t *topk_idx, int N, int K, int E) {
    const int a = begin_();
    IN_->moe_plan(counts, offsets, row_token, assign_row, topk_idx, N, K, E);
    end_(OP_moe_plan, a, 0.0, 0.0, 0, 0);
}
static void permute_forward_(float *xp, const float *x, const int32_t *row_token, int R, int D) {
    const int a = begin_();
    IN_->permute_forward(xp, x, row_token, R, D);
    end_(OP_permute_forward, a, 0.0, 8.0 * R * D, 0, 0);
}
static void permute_backward_(float *dx, const float *dxp, const int32_t *assign_row, int N, int K,
                              int D) {
    const int a = begin_();
    IN_->permute_backward(dx, dxp, assign_row, N, K, D);
    end_(OP_permute_backward, a, 0.0, 4.0 * N * D * (K + 1), 0, 0);
}
static void unpermute_forward_(float *out, const float *yp, const float *topk_w,
                               const int32_t *assign_row, int N, int K, int D) {
    const int a = begin_();
    IN_->unpermute_forward(out, yp, topk_w, assign_row, N, K, D);
    end_(OP_unpermute_forward, a, 0.0, 4.0 * N * D * (K + 1), 0, 0);
}
static void unpermute_backward_(float *dyp, float *dtopk_w, const float *dout, const float *yp,
                                const float *topk_w, const int32_t *assign_row, int N, int K,
                                int D) {
    const int a = begin_();
    IN_->unpermute_backward(dyp, dtopk_w, dout, yp, topk_w, assign_row, N, K, D);
    end_(OP_unpermute_backward, a, 0.0,
         4.0 * N * D * (1 + 1.0 * K * (dyp != NULL) + 1.0 * K * (dtopk_w != NULL)), 0, 0);
}
// rows of the grouped matmuls: offsets_host (E+1) is a HOST array
static double rows_(const int32_t *offsets_host, int E) {
    return (double)(offsets_host[E] - offsets_host[0]);
}
static void grouped_matmul_forward_(float *out, const float *inp, const float *w,
                                    const int32_t *offsets_host, int E, int C, int OC) {
    const int a = begin_();
    IN_->grouped_matmul_forward(out, inp, w, offsets_host, E, C, OC);
    end_(OP_grouped_matmul_forward, a, 2.0 * rows_(offsets_host, E) * C * OC, 0.0, C, OC);
}
static void grouped_matmul_backward_(float *dinp, float *dw, const float *dout, const float *inp,
                                     const float *w, const int32_t *offsets_host, int E, int C,
                                     int OC) {
    const int a = begin_();
    IN_->grouped_matmul_backward(dinp, dw, dout, inp, w, offsets_host, E, C, OC);
    end_(OP_grouped_matmul_backward, a,
         2.0 * rows_(offsets_host, E) * C * OC * ((dinp != NULL) + (dw != NULL)), 0.0, C, OC);
}
static void grouped_matmul_forward_pair_(float *out_a, float *out_b, const float *inp,
                                         const float *w_a, const float *w_b,
                                         const int32_t *offsets_host, int E, int C, int OC) {
    const int a = begin_();
    IN_->grouped_matmul_forward_pair(out_a, out_b, inp, w_a, w_b, offsets_host, E, C, OC);
    end_(OP_grouped_matmul_forward_pair, a, 4.0 * rows_(offsets_host, E) * C * OC, 0.0, C, OC);
}
static void grouped_matmul_backward_pair_(float *dinp, float *dw_a, float *dw_b,
                                          const float *dout_a, const float *dout_b,
                                          const float *inp, const float *w_a, const float *w_b,
                                          const int32_t *offsets_host, int E, int C, int OC) {
    const int a = begin_();
    IN_->grouped_matmul_backward_pair(dinp, dw_a, dw_b, dout_a, dout_b, inp, w_a, w_b, offsets_host,
                                      E, C, OC);
    // two GEMMs into dinp, one per dw
    end_(OP_grouped_matmul_backward_pair, a,
         2.0 * rows_(offsets_host, E) * C * OC *
             (2 * (dinp != NULL) + (dw_a != NULL) + (dw_b != NULL)),
         0.0, C, OC);
}
static double crossentropy_forward_(float *losses, const float *logits, const int32_t *targets,
                                    int N, int V) {
    const int a = begin_();
    const double r = IN_->crossentropy_forward(losses, logits, targets, N, V);
    end_(OP_crossentropy_forward, a, 0.0, 4.0 * N * V, 0, 0);
    return r;
}
static double crossentropy_forward_backward_(float *dlogits, float *losses, const float *logits,
                                             const int32_t *targets, int N, int V, float scale) {
    const int a = begin_();
    const double r =
        IN_->crossentropy_forward_backward(dlogits, losses, logits, targets, N, V, scale);
    end_(OP_crossentropy_forward_backward, a, 0.0, 8.0 * N * V, 0, 0);
    return r;
}
static void adamw_update_(float *p, const float *grad, float *m, float *v, size_t n, float lr,
                          float b1, float b2, float eps, float wd, int t, float grad_scale) {
    const int a = begin_();
    IN_->adamw_update(p, grad, m, v, n, lr, b1, b2, eps, wd, t, grad_scale);
    end_(OP_adamw_update, a, 0.0, 28.0 * n, 0, 0);
}
static double sum_squares_(const float *x, size_t n) {
    const int a = begin_();
    const double r = IN_->sum_squares(x, n);
    end_(OP_sum_squares, a, 0.0, 4.0 * n, 0, 0);
    return r;
}
static void scale_inplace_(float *x, float s, size_t n) {
    const int a = begin_();
    IN_->scale_inplace(x, s, n);
    end_(OP_scale_inplace, a, 0.0, 8.0 * n, 0, 0);
}
static void zero_fill_(float *x, size_t n) {
    const int a = begin_();
    IN_->zero_fill(x, n);
    end_(OP_zero_fill, a, 0.0, 4.0 * n, 0, 0);
}

// The wrapped table: inner's, with every timed op replaced; an optional op inner lacks stays
// NULL (the model then takes its fallback, as it would on inner).
#define WRAP_(f) t->f = IN_->f ? f##_ : NULL;

const Ops *ops_profile(const Ops *inner) {
    P_.in = inner;
    P_.active = 0;
    ops_profile_reset();
    Ops *t = &P_.table;
    *t = *inner;
    TIMED_OPS_(WRAP_)
    return t;
}
