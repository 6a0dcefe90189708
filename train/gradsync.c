// gradsync: bucketed gradient all-reduce overlapping backward (see gradsync.h).
#include "train/gradsync.h"

#include <stdlib.h>
#include <string.h>

// A run of tensors contiguous in the gradient buffer, reduced by one call.
typedef struct {
    size_t off, n;
} Span;

typedef struct {
    Comm *comm;
    int ready_part; // the bucket may start once backward has finished this part
    int span_lo, span_hi;
} Bucket;

struct GradSync {
    Model *m;
    Bucket *buckets;
    int n_buckets, next; // next bucket to start
    Span *spans;
    int n_spans;
    int *part_tensor_lo, *part_tensor_n; // per part (index part + 1): tensors, in ready order
    int *order;                          // tensor indices in ready order
    float *sum;
    int failed;
    MoetErr err;
    Comm *world, *edp;
};

// The backward part that finishes tensor t: L for the final norm and lm_head, its layer, or
// -1 for the embedding.
static int part_of_(const Model *m, const ParamTensor *t) {
    if (t->layer >= 0) return t->layer;
    return strcmp(t->name, "model.embed_tokens.weight") == 0 ? -1 : m->L;
}

int gradsync_create(GradSync **out, Model *m, Parallel *par, size_t bucket_bytes, MoetErr *err) {
    (void)err;
    GradSync *g = moet_calloc(sizeof *g);
    g->m = m;
    g->world = par->world;
    g->edp = par->edp;
    int nt = m->n_tensors, np = m->L + 2;
    g->order = moet_malloc((size_t)nt * sizeof(int));
    g->part_tensor_lo = moet_calloc((size_t)np * sizeof(int));
    g->part_tensor_n = moet_calloc((size_t)np * sizeof(int));
    // ready order: parts L, L-1, ..., 0, -1; inside a part, table order
    int k = 0;
    for (int p = m->L; p >= -1; p--) {
        g->part_tensor_lo[p + 1] = k;
        for (int i = 0; i < nt; i++)
            if (part_of_(m, &m->tensors[i]) == p) g->order[k++] = i;
        g->part_tensor_n[p + 1] = k - g->part_tensor_lo[p + 1];
    }
    // buckets: tensors in ready order, one open bucket per group, closed at bucket_bytes
    size_t cap = bucket_bytes / sizeof(float);
    if (cap == 0) cap = 1;
    g->buckets = moet_calloc((size_t)nt * sizeof(Bucket));
    int *bucket_of = moet_malloc((size_t)nt * sizeof(int));
    int open[2] = {-1, -1};
    size_t fill[2] = {0, 0};
    for (int j = 0; j < nt; j++) {
        const ParamTensor *t = &m->tensors[g->order[j]];
        int gr = t->is_expert ? 1 : 0;
        Comm *c = gr ? par->edp : par->world;
        bucket_of[j] = -1;
        if (comm_size(c) == 1 || t->no_optim) continue; // nothing to sum (no_optim: no gradient)
        if (open[gr] < 0 || fill[gr] >= cap) {
            open[gr] = g->n_buckets++;
            g->buckets[open[gr]].comm = c;
            fill[gr] = 0;
        }
        g->buckets[open[gr]].ready_part = part_of_(m, t);
        bucket_of[j] = open[gr];
        fill[gr] += t->numel;
    }
    // spans: each bucket's tensors sorted by offset, adjacent ones merged (one call per span)
    g->spans = moet_calloc((size_t)(nt > 0 ? nt : 1) * sizeof(Span));
    for (int bi = 0; bi < g->n_buckets; bi++) {
        Bucket *b = &g->buckets[bi];
        b->span_lo = g->n_spans;
        for (int j = 0; j < nt; j++) {
            if (bucket_of[j] != bi) continue;
            const ParamTensor *t = &m->tensors[g->order[j]];
            int at = g->n_spans++; // insertion by offset
            while (at > b->span_lo && g->spans[at - 1].off > t->offset) {
                g->spans[at] = g->spans[at - 1];
                at--;
            }
            g->spans[at] = (Span){t->offset, t->numel};
        }
        int w = b->span_lo;
        for (int r = b->span_lo + 1; r < g->n_spans; r++) {
            if (g->spans[w].off + g->spans[w].n == g->spans[r].off)
                g->spans[w].n += g->spans[r].n;
            else
                g->spans[++w] = g->spans[r];
        }
        g->n_spans = b->span_lo < g->n_spans ? w + 1 : g->n_spans;
        b->span_hi = g->n_spans;
    }
    free(bucket_of);
    *out = g;
    return MOET_OK;
}

void gradsync_free(GradSync *g) {
    if (!g) return;
    free(g->buckets);
    free(g->spans);
    free(g->order);
    free(g->part_tensor_lo);
    free(g->part_tensor_n);
    free(g);
}

void gradsync_plan(const GradSync *g, int *n_buckets, size_t *max_floats) {
    *n_buckets = g->n_buckets;
    *max_floats = 0;
    for (int i = 0; i < g->n_buckets; i++) {
        size_t n = 0;
        for (int s = g->buckets[i].span_lo; s < g->buckets[i].span_hi; s++) n += g->spans[s].n;
        if (n > *max_floats) *max_floats = n;
    }
}

static void start_(GradSync *g, const Bucket *b) {
    for (int s = b->span_lo; s < b->span_hi && !g->failed; s++)
        if (comm_buf_allreduce_start_f32(b->comm, g->sum + g->spans[s].off, g->spans[s].n, &g->err))
            g->failed = 1;
}

// Backward finished `part`: fold its gradients into the sum, start the buckets it completes.
// Buckets follow ready order, so they start in the same order on every rank.
static void on_part_(void *ctx, int part) {
    GradSync *g = ctx;
    Model *m = g->m;
    if (g->sum != m->grads) {
        int lo = g->part_tensor_lo[part + 1], n = g->part_tensor_n[part + 1];
        for (int j = lo; j < lo + n; j++) {
            const ParamTensor *t = &m->tensors[g->order[j]];
            m->ops->add_forward(g->sum + t->offset, g->sum + t->offset, m->grads + t->offset,
                                t->numel);
        }
    }
    // parts finish in the order L, L-1, ..., -1: a bucket is complete once its ready part is
    while (g->next < g->n_buckets && g->buckets[g->next].ready_part >= part)
        start_(g, &g->buckets[g->next++]);
}

void gradsync_arm(GradSync *g, float *sum) {
    g->sum = sum;
    g->next = 0;
    g->failed = 0;
    g->m->grad_hook = on_part_;
    g->m->grad_hook_ctx = g;
}

int gradsync_finish(GradSync *g, MoetErr *err) {
    g->m->grad_hook = NULL;
    g->m->grad_hook_ctx = NULL;
    while (!g->failed && g->next < g->n_buckets) start_(g, &g->buckets[g->next++]);
    if (!g->failed && comm_buf_wait(g->world, &g->err)) g->failed = 1;
    if (!g->failed && g->edp != g->world && comm_size(g->edp) > 1 && comm_buf_wait(g->edp, &g->err))
        g->failed = 1;
    if (g->failed) {
        *err = g->err;
        return MOET_EFAIL;
    }
    return 0;
}
