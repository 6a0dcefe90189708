// comm_impl: the inside of a Comm, shared by comm.c and the transports that live in their own
// files (comm_nccl.c). Not for other callers: they use comm.h.
#pragma once
#include <stddef.h>
#include <stdint.h>

#include "kernels/ops.h"
#include "train/comm.h"

#if MOET_MPI
#include <mpi.h>
#endif

// Collectives on host memory (control plane: losses, counts, flags; and the CPU backend's
// buffers). MPI, or the one-rank stub.
typedef struct {
    const char *name;
    int (*allreduce_sum_f32)(Comm *c, float *buf, size_t n, MoetErr *err);
    int (*allreduce_sum_f64)(Comm *c, double *buf, size_t n, MoetErr *err);
    int (*allreduce_max_f64)(Comm *c, double *buf, size_t n, MoetErr *err);
    int (*alltoall_i64)(Comm *c, const int64_t *send, int64_t *recv, int count, MoetErr *err);
    int (*alltoallv)(Comm *c, const void *send, const int64_t *send_counts, void *recv,
                     const int64_t *recv_counts, size_t elem_size, MoetErr *err);
    int (*bcast)(Comm *c, void *buf, size_t bytes, int root, MoetErr *err);
    int (*barrier)(Comm *c, MoetErr *err);
    // in place: see comm_buf_allgatherv_f32
    int (*allgatherv_f32)(Comm *c, float *buf, const size_t *counts, MoetErr *err);
} CommTransport;

// Collectives on backend memory (data plane: gradients, parameters, expert rows), with the
// semantics of the comm_buf_* functions of comm.h. Host memory (CPU backend): the host
// transport; device memory: staged through host memory over MPI, or NCCL.
typedef struct {
    const char *name;
    // async = 1: may return before the sum is done (comm_buf_allreduce_start_f32)
    int (*allreduce_sum_f32)(Comm *c, float *buf, size_t n, int async, MoetErr *err);
    int (*alltoallv)(Comm *c, const void *send, const int64_t *send_counts, void *recv,
                     const int64_t *recv_counts, size_t elem_size, MoetErr *err);
    int (*allgatherv_f32)(Comm *c, float *buf, const size_t *counts, MoetErr *err);
    // waits for the started all-reduces and the started all-to-all-v
    int (*wait)(Comm *c, MoetErr *err);
    void (*release)(Comm *c); // frees the transport's state (c->nccl); may be NULL
    // comm_buf_alltoallv_start (a transport without asynchrony may finish it on return)
    int (*alltoallv_start)(Comm *c, const void *send, const int64_t *send_counts, void *recv,
                           const int64_t *recv_counts, size_t elem_size, MoetErr *err);
} CommBufTransport;

struct Comm {
    const CommTransport *t;     // host collectives
    const CommBufTransport *bt; // backend-memory collectives
    const Ops *ops;             // the backend whose memory bt moves (NULL: host memory)
    const char *label;          // "world", "EP group", "expert-DP group" (messages)
    int rank, size;
    int world_rank; // this process's rank in the world (messages)
#if MOET_MPI
    MPI_Comm mpi;  // MPI_COMM_NULL for the stub build's world
    void *scratch; // receive buffer of the deterministic all-reduce, grown on demand
    size_t scratch_bytes;
#endif
    void *stage; // host staging buffer of the MPI transport for device memory
    size_t stage_bytes;
    // the started all-to-all-v of the MPI transports (one at a time)
#if MOET_MPI
    MPI_Request a2a_req; // MPI_REQUEST_NULL: none
    MPI_Datatype a2a_type;
#endif
    int *a2a_counts; // (4 x size) counts and displacements, alive until the wait
    void *a2a_recv;  // staged: the device destination, filled from the stage at the wait
    size_t a2a_recv_bytes, a2a_recv_off;
    int a2a_started; // comm_buf_alltoallv_start ran, its comm_buf_wait has not
    void *nccl;      // the NCCL transport's state (comm_nccl.c)
};

// NCCL (comm_nccl.c): gives world, ep and edp NCCL communicators (ncclGetUniqueId on the
// world's rank 0 + MPI_Bcast, ncclCommSplit for the groups) on the GPU the cuda backend uses,
// and sets their bt to the NCCL transport. Needs p->world->ops to be the cuda backend.
// Collectives and waits that last longer than timeout_s (> 0) abort the communicators and the
// job, naming the rank and the collective. Builds without CUDA / NCCL: an error that says so.
int comm_nccl_setup(Parallel *p, double timeout_s, MoetErr *err);
// 1 when this build has the NCCL transport.
int comm_nccl_available(void);

// The watchdog of comm.c: a collective (any transport) marks its start and end, and a
// collective unfinished after the timeout aborts the job. The NCCL transport calls these
// around its host-side waits.
void comm_watch_begin(Comm *c, const char *what);
void comm_watch_end(void);
