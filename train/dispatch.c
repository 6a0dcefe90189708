// dispatch: the token dispatcher of expert parallelism (see dispatch.h).
#include "train/dispatch.h"

#include <stdlib.h>
#include <string.h>

// One layer's exchange plan and saved rows.
typedef struct {
    int64_t rows, cap;       // received rows; capacity of the buffers below (rows)
    int64_t *send_counts;    // (ep) rows to each rank
    int64_t *recv_counts;    // (ep) rows from each rank
    int32_t *offsets;        // (El+1) over the regrouped rows
    int32_t *perm;           // (cap) regrouped row i = received row perm[i]
    float *x, *g, *u, *a;    // (cap,D), (cap,F) x3
} DispLayer;

struct Dispatcher {
    Comm *comm;
    int ep, L, E, El, D, F;
    DispLayer *layers;       // (L)
    int64_t *cnt_send;       // (E) per-expert counts, as int64 (El to each rank)
    int64_t *cnt_recv;       // (ep*El) [src][local expert]
    int64_t *pos;            // (ep*El) scratch: start of [src][local expert] in received order
    // scratch shared by all layers, grown on demand
    int64_t scap;            // rows
    float *raw;              // (scap,D) rows in received (per-source) order
    float *y, *d_y, *d_x;    // (scap,D)
    float *d_g, *d_u, *d_a;  // (scap,F)
};

// Grows *p to hold n floats (contents are not kept).
static void grow_f_(float **p, size_t n) {
    free(*p);
    *p = moet_malloc(n ? n * sizeof(float) : sizeof(float));
}

static void ensure_scratch_(Dispatcher *d, int64_t rows) {
    if (rows <= d->scap && d->raw) return;
    int64_t cap = rows + rows / 2 + 16;
    size_t nd = (size_t)cap * d->D, nf = (size_t)cap * d->F;
    grow_f_(&d->raw, nd);
    grow_f_(&d->y, nd);
    grow_f_(&d->d_y, nd);
    grow_f_(&d->d_x, nd);
    grow_f_(&d->d_g, nf);
    grow_f_(&d->d_u, nf);
    grow_f_(&d->d_a, nf);
    d->scap = cap;
}

static void ensure_layer_(Dispatcher *d, DispLayer *ly, int64_t rows) {
    if (rows <= ly->cap && ly->perm) return;
    int64_t cap = rows + rows / 2 + 16;
    size_t nd = (size_t)cap * d->D, nf = (size_t)cap * d->F;
    free(ly->perm);
    ly->perm = moet_malloc((size_t)cap * sizeof(int32_t));
    grow_f_(&ly->x, nd);
    grow_f_(&ly->g, nf);
    grow_f_(&ly->u, nf);
    grow_f_(&ly->a, nf);
    ly->cap = cap;
}

int dispatch_create(Dispatcher **out, Comm *ep, int L, int E, int D, int F, MoetErr *err) {
    *out = NULL;
    int n = comm_size(ep);
    if (n < 1 || E <= 0 || E % n != 0)
        return moet_errf(err, MOET_EUSAGE, "expert parallel degree %d does not divide %d experts",
                         n, E);
    Dispatcher *d = calloc(1, sizeof *d);
    if (!d) moet_die("out of memory creating the token dispatcher");
    d->comm = ep;
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
    for (int l = 0; l < d->L; l++) {
        DispLayer *ly = &d->layers[l];
        free(ly->send_counts);
        free(ly->recv_counts);
        free(ly->offsets);
        free(ly->perm);
        free(ly->x);
        free(ly->g);
        free(ly->u);
        free(ly->a);
    }
    free(d->layers);
    free(d->cnt_send);
    free(d->cnt_recv);
    free(d->pos);
    free(d->raw);
    free(d->y);
    free(d->d_y);
    free(d->d_x);
    free(d->d_g);
    free(d->d_u);
    free(d->d_a);
    free(d);
}

// dst[i] = src[perm[i]] (regroup) for rows of width w.
static void regroup_(float *dst, const float *src, const int32_t *perm, int64_t rows, int w) {
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < rows; i++)
        memcpy(dst + (size_t)i * w, src + (size_t)perm[i] * w, (size_t)w * sizeof(float));
}

// dst[perm[i]] = src[i] (the inverse).
static void unregroup_(float *dst, const float *src, const int32_t *perm, int64_t rows, int w) {
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < rows; i++)
        memcpy(dst + (size_t)perm[i] * w, src + (size_t)i * w, (size_t)w * sizeof(float));
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
    DispLayer *ly = &d->layers[l];
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
    // 2. the rows
    rc = comm_alltoallv(d->comm, xp, ly->send_counts, d->raw, ly->recv_counts,
                        (size_t)D * sizeof(float), err);
    if (rc) return rc;
    regroup_(ly->x, d->raw, ly->perm, total, D);
    rows_of_(d, ly, rows);
    return MOET_OK;
}

int dispatch_combine(Dispatcher *d, int l, float *yp, MoetErr *err) {
    DispLayer *ly = &d->layers[l];
    unregroup_(d->raw, d->y, ly->perm, ly->rows, d->D);
    return comm_alltoallv(d->comm, d->raw, ly->recv_counts, yp, ly->send_counts,
                          (size_t)d->D * sizeof(float), err);
}

int dispatch_backward(Dispatcher *d, int l, const float *d_yp, DispatchRows *rows,
                      DispatchGrads *grads, MoetErr *err) {
    DispLayer *ly = &d->layers[l];
    ensure_scratch_(d, ly->rows);
    int rc = comm_alltoallv(d->comm, d_yp, ly->send_counts, d->raw, ly->recv_counts,
                            (size_t)d->D * sizeof(float), err);
    if (rc) return rc;
    regroup_(d->d_y, d->raw, ly->perm, ly->rows, d->D);
    memset(d->d_x, 0, (size_t)ly->rows * d->D * sizeof(float));
    rows_of_(d, ly, rows);
    grads->d_y = d->d_y;
    grads->d_x = d->d_x;
    grads->d_g = d->d_g;
    grads->d_u = d->d_u;
    grads->d_a = d->d_a;
    return MOET_OK;
}

int dispatch_backward_return(Dispatcher *d, int l, float *d_xp, MoetErr *err) {
    DispLayer *ly = &d->layers[l];
    unregroup_(d->raw, d->d_x, ly->perm, ly->rows, d->D);
    return comm_alltoallv(d->comm, d->raw, ly->recv_counts, d_xp, ly->send_counts,
                          (size_t)d->D * sizeof(float), err);
}
