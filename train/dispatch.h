// dispatch: the token dispatcher of expert parallelism (ARCHITECTURE §4), Megatron-Core's
// token_dispatcher stage. Inside an EP group of ep ranks, rank j holds experts
// [j*El, (j+1)*El) with El = E/ep. After moe_plan every rank has its R routed rows permuted by
// GLOBAL expert, so the rows bound for rank j are one contiguous block. Forward:
//   1. counts exchange: comm_alltoall_i64 of the E per-expert counts (El to each rank);
//   2. comm_alltoallv of the (R,D) rows; rank s's rows arrive as one block, in its plan order
//      (local expert, then its (t, k) order);
//   3. regroup: the received rows are reordered by local expert, and within an expert by
//      (source rank, row): regrouped row i is received row perm[i]. offsets (El+1) delimit the
//      experts over the regrouped rows, ready for the grouped GEMMs. Deterministic.
// Combine is the exact reverse (un-regroup, all-to-all-v back to the owning ranks, in their
// plan order). Backward runs the same two exchanges for the gradients: d rows out to the
// expert owners, d inputs back. Every rank issues the same collectives in the same order, also
// with 0 rows for a peer. Received-row buffers vary per step and grow on demand.
#pragma once
#include <stddef.h>
#include <stdint.h>

#include "kernels/ops.h"
#include "train/comm.h"
#include "train/common.h"

typedef struct Dispatcher Dispatcher;

// The rows one layer's local experts work on (valid after dispatch_forward for that layer,
// until the next dispatch_forward of the same layer; backward reads x, g, u, a).
typedef struct {
    int64_t rows;            // received rows (all sources)
    const int32_t *offsets;  // (El+1) expert e owns regrouped rows [offsets[e], offsets[e+1])
    float *x;                // (rows,D) regrouped inputs
    float *g, *u, *a;        // (rows,F) expert activations, saved for backward
    float *y;                // (rows,D) expert outputs (scratch, read by dispatch_combine)
} DispatchRows;

// Scratch of one layer's backward, sized for the rows of the last forward of that layer.
typedef struct {
    float *d_y, *d_x;        // (rows,D)
    float *d_g, *d_u, *d_a;  // (rows,F)
} DispatchGrads;

// ep: the EP group (its size divides E). L layers, E global experts, width D, expert width F.
// The rows live in the memory of the backend ops (device memory on a GPU: the exchanges go
// through comm_buf_alltoallv, the regrouping is the backend's row gather); the plan (counts,
// offsets) is host memory. one_set: the layers share one set of saved rows (activation
// recomputation reruns each layer's forward, and so its dispatch_forward, right before its
// backward), so that the dispatcher holds one layer's rows instead of L.
int dispatch_create(Dispatcher **out, Comm *ep, const Ops *ops, int L, int E, int D, int F,
                    int one_set, MoetErr *err);
void dispatch_free(Dispatcher *d);

// Forward, layer l: counts (E, HOST) from moe_plan and xp (R,D) in plan order; exchanges the
// rows and regroups them. Returns the rows the local experts process.
int dispatch_forward(Dispatcher *d, int l, const int32_t *counts, const float *xp,
                     DispatchRows *rows, MoetErr *err);
// Combine, layer l: sends rows->y back; yp (R,D) receives this rank's rows in plan order.
int dispatch_combine(Dispatcher *d, int l, float *yp, MoetErr *err);

// Backward, layer l: d_yp (R,D) in plan order goes to the expert owners; returns the saved
// rows of the layer and gradient scratch with grads->d_y filled (regrouped). The caller writes
// grads->d_x (every row; the experts' backward writes it, kernels.h), then calls
// dispatch_backward_return.
int dispatch_backward(Dispatcher *d, int l, const float *d_yp, DispatchRows *rows,
                      DispatchGrads *grads, MoetErr *err);
// Sends grads->d_x back to the token owners: d_xp (R,D) in plan order (overwritten).
int dispatch_backward_return(Dispatcher *d, int l, float *d_xp, MoetErr *err);
// The same, started: d_xp is complete after dispatch_wait (grads->d_x must stay untouched until
// then; the expert weight gradients may be computed meanwhile).
int dispatch_backward_return_start(Dispatcher *d, int l, float *d_xp, MoetErr *err);
int dispatch_wait(Dispatcher *d, MoetErr *err);
