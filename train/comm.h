// comm: the ranks of a run and their collectives (ARCHITECTURE §4): the world, this rank's
// expert-parallel (EP) group and its expert-data-parallel (EDP) group, behind transports:
// host memory moves over MPI; backend memory (gradients, parameters and expert rows, in GPU
// memory on a GPU) over NCCL, or over MPI staged through host memory. Built without MPI
// (-DMOET_MPI=OFF): a one-rank stub. A watchdog aborts the job when a collective hangs.
#pragma once
#include <stddef.h>
#include <stdint.h>

#include "train/common.h"

typedef struct Comm Comm;

// Bytes and seconds spent in collectives, per kind, since the last comm_stats_reset.
typedef struct {
    double alltoall_bytes, alltoall_s;    // bytes this rank sent in all-to-all(-v)
    double allreduce_bytes, allreduce_s;  // bytes this rank contributed to all-reduces
    double allgather_bytes, allgather_s;  // bytes this rank contributed to all-gathers (ZeRO-1)
    double other_bytes, other_s;          // broadcast, barrier
} CommStats;

typedef struct {
    Comm *world;      // all ranks
    Comm *ep;         // ranks [g*ep, (g+1)*ep): they split the experts (this rank holds
                      // experts [ep_rank*E/ep, (ep_rank+1)*E/ep))
    Comm *edp;        // ranks holding the same experts: {r : r % ep == rank % ep}
    int rank, world_size;
    int ep_rank, ep_size;
    int local_rank;   // rank within the node (from the launcher's environment), for GPUs
    int local_size;   // ranks on this node
} Parallel;

struct Ops;

// Starts MPI (when built with it and launched by mpirun / srun; a plain start is a world of
// one), checks world % ep == 0, and builds the groups. Errors (bad ep) are MOET_EUSAGE.
int comm_init(int *argc, char ***argv, int ep, Parallel *p, MoetErr *err);
// Rebuilds the groups for another ep on the same world (tests).
int comm_set_ep(Parallel *p, int ep, MoetErr *err);
void comm_finalize(Parallel *p);
// Ends every rank of the job: the failing rank calls this after printing its error, so that no
// other rank waits forever in a collective.
void comm_abort(Parallel *p, int code) __attribute__((noreturn));
// The same, printing "rank R: aborting the job (exit code C): <reason>" first (reason NULL: a
// pointer to the error printed above). p may be NULL or half-built (before comm_init ends).
void comm_abort_msg(Parallel *p, int code, const char *reason) __attribute__((noreturn));

int comm_rank(const Comm *c);
int comm_size(const Comm *c);

// In-place sum over the group. The sum is taken in rank order 0, 1, ..., size-1 (as doubles
// are not used, the order matters): every rank gets identical bits, and a run is
// bitwise-reproducible for a given world size.
int comm_allreduce_sum_f32(Comm *c, float *buf, size_t n, MoetErr *err);
int comm_allreduce_sum_f64(Comm *c, double *buf, size_t n, MoetErr *err);
int comm_allreduce_max_f64(Comm *c, double *buf, size_t n, MoetErr *err);

// All-to-all of fixed-size items: rank i sends send[j*count .. (j+1)*count) to rank j and
// receives rank j's block into recv[j*count ..]. int64 items (counts exchange).
int comm_alltoall_i64(Comm *c, const int64_t *send, int64_t *recv, int count, MoetErr *err);
// All-to-all-v of rows of elem_size bytes: send_counts[j] rows (contiguous, in rank order j)
// go to rank j; recv_counts[j] rows arrive from rank j, laid out in rank order. Every rank
// calls it, also when all its counts are 0.
int comm_alltoallv(Comm *c, const void *send, const int64_t *send_counts, void *recv,
                   const int64_t *recv_counts, size_t elem_size, MoetErr *err);
int comm_bcast(Comm *c, void *buf, size_t bytes, int root, MoetErr *err);
// In-place all-gather of host floats (see comm_buf_allgatherv_f32).
int comm_allgatherv_f32(Comm *c, float *buf, const size_t *counts, MoetErr *err);
int comm_barrier(Comm *c, MoetErr *err);

// ---- backend memory (the data plane) ----

// Says where the data-plane buffers live (ops: the model's backend) and what moves them:
// transport "mpi" (device buffers staged through host memory, so several ranks may share one
// GPU), "nccl" (NCCL communicators; the cuda backend, one rank per GPU) or "auto" (nccl on the
// cuda backend when this build has NCCL, the world has several ranks and the node a GPU per
// rank, else mpi). Every rank
// calls it once, after comm_init. timeout_s > 0: a collective unfinished after that many
// seconds aborts the job, naming the rank and the collective (the watchdog; 0: none).
int comm_use_backend(Parallel *p, const struct Ops *ops, const char *transport, double timeout_s,
                     MoetErr *err);
// "stub", "mpi", "mpi-staged" or "nccl": what moves this group's backend buffers.
const char *comm_buf_transport(const Comm *c);

// The collectives above on backend memory (as the host versions; on a GPU the result is
// ordered before the ops issued after the call).
int comm_buf_allreduce_sum_f32(Comm *c, float *buf, size_t n, MoetErr *err);
int comm_buf_alltoallv(Comm *c, const void *send, const int64_t *send_counts, void *recv,
                       const int64_t *recv_counts, size_t elem_size, MoetErr *err);
// In-place all-gather of floats: rank j contributes buf[d_j, d_j + counts[j]) with d_j the sum
// of counts[0..j); afterwards every rank holds all parts (ZeRO-1's parameter gather).
int comm_buf_allgatherv_f32(Comm *c, float *buf, const size_t *counts, MoetErr *err);
// Gradient buckets: starts the sum of buf over the group and may return before it is done (on
// NCCL it runs on a communication stream, overlapping the ops issued meanwhile; on MPI it is
// done on return). comm_buf_wait(c) waits for every started sum of c; the results are ready
// for the ops issued after it. The same starts in the same order on every rank.
int comm_buf_allreduce_start_f32(Comm *c, float *buf, size_t n, MoetErr *err);
// The all-to-all-v, started: recv is complete (and send free again) after comm_buf_wait(c). One
// started all-to-all-v per group at a time. The MoE backward sends the input gradients back
// with it while the expert weight gradients are computed.
int comm_buf_alltoallv_start(Comm *c, const void *send, const int64_t *send_counts, void *recv,
                             const int64_t *recv_counts, size_t elem_size, MoetErr *err);
int comm_buf_wait(Comm *c, MoetErr *err);

// A watched phase (the trainer's forward + backward of a micro-batch on a GPU, where a hung
// NCCL exchange would block the host in a later device-to-host copy rather than in a
// collective): unfinished after the timeout of comm_use_backend, it aborts the job like a late
// collective, naming what.
void comm_watch_phase_begin(Comm *c, const char *what);
void comm_watch_phase_end(void);

// The statistics of the whole process (all groups).
void comm_stats(CommStats *s);
void comm_stats_reset(void);
