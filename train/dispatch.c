// dispatch: the token dispatcher of expert parallelism (see dispatch.h).
#include "train/dispatch.h"

#include <stdlib.h>
#include <string.h>

// One layer's exchange plan (host) and saved rows (backend memory).
typedef struct {
    int64_t rows, cap;       // received rows; capacity of the buffers below (rows)
    int64_t *send_counts;    // (ep) rows to each rank
    int64_t *recv_counts;    // (ep) rows from each rank
    int32_t *offsets;        // (El+1) over the regrouped rows
    int32_t *perm, *inv;     // (cap) host: regrouped row i = received row perm[i]; inv = perm^-1
    int32_t *perm_d, *inv_d; // (cap) backend copies, the gather indices of regroup / unregroup
    float *x, *g, *u, *a;    // (cap,D), (cap,F) x3
} DispLayer;

struct Dispatcher {
    Comm *comm;
    const Ops *ops;          // the backend whose memory holds the rows
    int ep, L, E, El, D, F;
    int one_set;             // 1: every layer uses layers[0] (recompute: forward reruns the
                             // layer right before its backward, refilling the set)
    DispLayer *layers;       // (L)
    int64_t *cnt_send;       // (E) per-expert counts, as int64 (El to each rank)
    int64_t *cnt_recv;       // (ep*El) [src][local expert]
    int64_t *pos;            // (ep*El) scratch: start of [src][local expert] in received order
    // scratch shared by all layers (backend memory), grown on demand
    int64_t scap;            // rows
    float *raw;              // (scap,D) rows in received (per-source) order
    float *y, *d_y, *d_x;    // (scap,D)
    float *d_g, *d_u, *d_a;  // (scap,F)
};

// Grows the backend buffer *p to hold n floats (contents are not kept).
static void grow_f_(const Ops *k, float **p, size_t n) {
    k->free(*p);
    *p = k->alloc(n ? n * sizeof(float) : sizeof(float));
}

static void ensure_scratch_(Dispatcher *d, int64_t rows) {
    if (rows <= d->scap && d->raw) return;
    int64_t cap = rows + rows / 2 + 16;
    size_t nd = (size_t)cap * d->D, nf = (size_t)cap * d->F;
    grow_f_(d->ops, &d->raw, nd);
    grow_f_(d->ops, &d->y, nd);
    grow_f_(d->ops, &d->d_y, nd);
    grow_f_(d->ops, &d->d_x, nd);
    grow_f_(d->ops, &d->d_g, nf);
    grow_f_(d->ops, &d->d_u, nf);
    grow_f_(d->ops, &d->d_a, nf);
    d->scap = cap;
}

static void ensure_layer_(Dispatcher *d, DispLayer *ly, int64_t rows) {
    if (rows <= ly->cap && ly->perm) return;
    int64_t cap = rows + rows / 2 + 16;
    size_t nd = (size_t)cap * d->D, nf = (size_t)cap * d->F;
    const Ops *k = d->ops;
    free(ly->perm);
    free(ly->inv);
    ly->perm = moet_malloc((size_t)cap * sizeof(int32_t));
    ly->inv = moet_malloc((size_t)cap * sizeof(int32_t));
    k->free(ly->perm_d);
    k->free(ly->inv_d);
    ly->perm_d = k->alloc((size_t)cap * sizeof(int32_t));
    ly->inv_d = k->alloc((size_t)cap * sizeof(int32_t));
    grow_f_(k, &ly->x, nd);
    grow_f_(k, &ly->g, nf);
    grow_f_(k, &ly->u, nf);
    grow_f_(k, &ly->a, nf);
    ly->cap = cap;
}

int dispatch_create(Dispatcher **out, Comm *ep, const Ops *ops, int L, int E, int D, int F,
                    int one_set, MoetErr *err) {
    *out = NULL;
    int n = comm_size(ep);
    if (n < 1 || E <= 0 || E % n != 0)
        return moet_errf(err, MOET_EUSAGE, "expert parallel degree %d does not divide %d experts",
                         n, E);
    Dispatcher *d = calloc(1, sizeof *d);
    if (!d) moet_die("out of memory creating the token dispatcher");
    d->comm = ep;
    d->ops = ops;
    d->one_set = one_set;
    d->ep = n;
    d->L = L;
    d->E = E;
    d->El = E / n;
    d->D = D;
    d->F = F;
    d->layers = calloc((size_t)L, sizeof(DispLayer));
    d->cnt_send = calloc((size_t)E, sizeof(int64_t));
    d->cnt_recv = calloc((size_t)E, sizeof(int64_t));
    d->pos = calloc((size_t)E, sizeof(int64_t));
    if (!d->layers || !d->cnt_send || !d->cnt_recv || !d->pos)
        moet_die("out of memory creating the token dispatcher");
    for (int l = 0; l < L; l++) {
        DispLayer *ly = &d->layers[l];
        ly->send_counts = calloc((size_t)n, sizeof(int64_t));
        ly->recv_counts = calloc((size_t)n, sizeof(int64_t));
        ly->offsets = calloc((size_t)d->El + 1, sizeof(int32_t));
        if (!ly->send_counts || !ly->recv_counts || !ly->offsets)
            moet_die("out of memory creating the token dispatcher");
    }
    *out = d;
    return MOET_OK;
}

void dispatch_free(Dispatcher *d) {
    if (!d) return;
    const Ops *k = d->ops;
    for (int l = 0; l < d->L; l++) {
        DispLayer *ly = &d->layers[l];
        free(ly->send_counts);
        free(ly->recv_counts);
        free(ly->offsets);
        free(ly->perm);
        free(ly->inv);
        k->free(ly->perm_d);
        k->free(ly->inv_d);
        k->free(ly->x);
        k->free(ly->g);
        k->free(ly->u);
        k->free(ly->a);
    }
    free(d->layers);
    free(d->cnt_send);
    free(d->cnt_recv);
    free(d->pos);
    k->free(d->raw);
    k->free(d->y);
    k->free(d->d_y);
    k->free(d->d_x);
    k->free(d->d_g);
    k->free(d->d_u);
    k->free(d->d_a);
    free(d);
}

// dst[i] = src[idx[i]] for rows of width w: the backend's row gather (permute_forward). With
// idx = perm it regroups received rows, with idx = perm^-1 it undoes that.
static void gather_rows_(const Ops *k, float *dst, const float *src, const int32_t *idx,
                         int64_t rows, int w) {
    if (rows > 0) k->permute_forward(dst, src, idx, (int)rows, w);
}

// The plan and saved rows of layer l (one set for all layers with one_set).
static DispLayer *layer_(Dispatcher *d, int l) {
    return &d->layers[d->one_set ? 0 : l];
}

static void rows_of_(Dispatcher *d, DispLayer *ly, DispatchRows *rows) {
    rows->rows = ly->rows;
    rows->offsets = ly->offsets;
    rows->x = ly->x;
    rows->g = ly->g;
    rows->u = ly->u;
    rows->a = ly->a;
    rows->y = d->y;
}

int dispatch_forward(Dispatcher *d, int l, const int32_t *counts, const float *xp,
                     DispatchRows *rows, MoetErr *err) {
    DispLayer *ly = layer_(d, l);
    int ep = d->ep, El = d->El, D = d->D;
    // 1. counts: the plan's rows for rank j are its experts' rows, contiguous in plan order
    for (int e = 0; e < d->E; e++) d->cnt_send[e] = counts[e];
    int rc = comm_alltoall_i64(d->comm, d->cnt_send, d->cnt_recv, El, err);
    if (rc) return rc;
    int64_t total = 0;
    for (int j = 0; j < ep; j++) {
        int64_t s = 0, r = 0;
        for (int e = 0; e < El; e++) {
            s += d->cnt_send[(size_t)j * El + e];
            d->pos[(size_t)j * El + e] = total + r;  // start of [src j][expert e], received order
            r += d->cnt_recv[(size_t)j * El + e];
        }
        ly->send_counts[j] = s;
        ly->recv_counts[j] = r;
        total += r;
    }
    if (total > INT32_MAX)
        return moet_errf(err, MOET_EFAIL, "expert dispatch: %lld received rows overflow int32",
                         (long long)total);
    ly->rows = total;
    ensure_layer_(d, ly, total);
    ensure_scratch_(d, total);
    // 3. the regrouping plan: local expert major, then source rank, then the source's order
    int64_t i = 0;
    for (int e = 0; e < El; e++) {
        ly->offsets[e] = (int32_t)i;
        for (int j = 0; j < ep; j++) {
            int64_t p0 = d->pos[(size_t)j * El + e], c = d->cnt_recv[(size_t)j * El + e];
            for (int64_t r = 0; r < c; r++) ly->perm[i++] = (int32_t)(p0 + r);
        }
    }
    ly->offsets[El] = (int32_t)i;
    for (int64_t r = 0; r < total; r++) ly->inv[ly->perm[r]] = (int32_t)r;
    if (total > 0) {
        d->ops->to_device(ly->perm_d, ly->perm, (size_t)total * sizeof(int32_t));
        d->ops->to_device(ly->inv_d, ly->inv, (size_t)total * sizeof(int32_t));
    }
    // 2. the rows
    rc = comm_buf_alltoallv(d->comm, xp, ly->send_counts, d->raw, ly->recv_counts,
                            (size_t)D * sizeof(float), err);
    if (rc) return rc;
    gather_rows_(d->ops, ly->x, d->raw, ly->perm_d, total, D);
    rows_of_(d, ly, rows);
    return MOET_OK;
}

int dispatch_combine(Dispatcher *d, int l, float *yp, MoetErr *err) {
    DispLayer *ly = layer_(d, l);
    gather_rows_(d->ops, d->raw, d->y, ly->inv_d, ly->rows, d->D);
    return comm_buf_alltoallv(d->comm, d->raw, ly->recv_counts, yp, ly->send_counts,
                              (size_t)d->D * sizeof(float), err);
}

int dispatch_backward(Dispatcher *d, int l, const float *d_yp, DispatchRows *rows,
                      DispatchGrads *grads, MoetErr *err) {
    DispLayer *ly = layer_(d, l);
    ensure_scratch_(d, ly->rows);
    int rc = comm_buf_alltoallv(d->comm, d_yp, ly->send_counts, d->raw, ly->recv_counts,
                                (size_t)d->D * sizeof(float), err);
    if (rc) return rc;
    gather_rows_(d->ops, d->d_y, d->raw, ly->perm_d, ly->rows, d->D);
    rows_of_(d, ly, rows);
    grads->d_y = d->d_y;
    grads->d_x = d->d_x;
    grads->d_g = d->d_g;
    grads->d_u = d->d_u;
    grads->d_a = d->d_a;
    return MOET_OK;
}

int dispatch_backward_return(Dispatcher *d, int l, float *d_xp, MoetErr *err) {
    int rc = dispatch_backward_return_start(d, l, d_xp, err);
    return rc ? rc : dispatch_wait(d, err);
}

int dispatch_backward_return_start(Dispatcher *d, int l, float *d_xp, MoetErr *err) {
    DispLayer *ly = layer_(d, l);
    gather_rows_(d->ops, d->raw, d->d_x, ly->inv_d, ly->rows, d->D);
    return comm_buf_alltoallv_start(d->comm, d->raw, ly->recv_counts, d_xp, ly->send_counts,
                                    (size_t)d->D * sizeof(float), err);
}

int dispatch_wait(Dispatcher *d, MoetErr *err) {
    return comm_buf_wait(d->comm, err);
}
