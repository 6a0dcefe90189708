// comm_nccl: the NCCL transport of comm's backend-memory collectives (ARCHITECTURE §4): one NCCL
// communicator per group (world, EP, expert-DP) on the GPU of the cuda backend, and one
// communication stream per process, fenced against the backend's stream with events.
// Builds without CUDA or NCCL have a stub that says so.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "train/comm_impl.h"

#if MOET_CUDA && MOET_NCCL
#include <cuda_runtime_api.h>
#include <nccl.h>
#include <time.h>

// Ordering. The cuda backend runs every op on the legacy default stream. Every NCCL call goes
// to one communication stream of the process (non-blocking, so that it never syncs implicitly
// with the legacy stream), fenced by events:
//   legacy --ev_in--> comm stream: the collective starts after the ops issued before the call;
//   comm stream --ev_out--> legacy: the ops issued after the call (or after comm_buf_wait, for
//   the started all-reduces) see its result.
// One stream for all groups keeps the NCCL kernels in issue order, the same on every rank, so
// collectives of different communicators can never wait on each other in a cycle; and a
// started all-reduce overlaps with the backward ops still running on the legacy stream.
// Communicators are non-blocking (ncclConfig_t.blocking = 0): init, split, enqueue and
// finalize may return ncclInProgress, and the host polls ncclCommGetAsyncError with the
// timeout, so that a dead peer at set-up or a hung collective ends the job with a message
// instead of a hang.

// The state shared by the groups of the process: the stream, the fences, the live
// communicators (comm_abort aborts them all). Freed with the last group.
typedef struct {
    cudaStream_t stream; // the communication stream
    cudaEvent_t ev_in;   // recorded on the legacy stream, waited on by the comm stream
    cudaEvent_t ev_out;  // recorded on the comm stream, waited on by the legacy stream
    int device;
    double timeout_s; // > 0: limit of every host wait
    int refs;         // groups using this state
    ncclComm_t live[8];
    int n_live;
} NcclShared;

// One group's part (Comm.nccl).
typedef struct {
    NcclShared *sh;
    ncclComm_t comm;
    int started;     // all-reduces started since the last wait
    int a2a_started; // an all-to-all-v started since the last wait
    double t_first;  // when the first of them started (the timeout counts from there)
} NcclGroup;

static const char *label_(const Comm *c) {
    return c->label ? c->label : "group";
}

static int cuda_fail_(const Comm *c, cudaError_t e, const char *call, MoetErr *err) {
    return moet_errf(err, MOET_EFAIL, "rank %d: %s for NCCL on the %s failed: %s (%s)",
                     c->world_rank, call, label_(c), cudaGetErrorName(e), cudaGetErrorString(e));
}

#define CUDA_TRY_(c, call)                                                                         \
    do {                                                                                           \
        cudaError_t e_ = (call);                                                                   \
        if (e_ != cudaSuccess) return cuda_fail_((c), e_, #call, err);                             \
    } while (0)

static int nccl_fail_(const Comm *c, ncclComm_t comm, ncclResult_t r, const char *what,
                      MoetErr *err) {
    const char *last = ncclGetLastError(comm);
    return moet_errf(err, MOET_EFAIL,
                     "rank %d: NCCL %s on the %s (%d ranks) failed: %s%s%s\n"
                     "---> HINT: NCCL_DEBUG=WARN shows NCCL's own report; a remote error means "
                     "another rank failed first (see its messages)",
                     c->world_rank, what, label_(c), c->size, ncclGetErrorString(r),
                     last && *last ? ": " : "", last && *last ? last : "");
}

// Aborts every communicator of the process and ends the job (all ranks) with msg.
static void abort_all_(NcclShared *sh, const char *msg) __attribute__((noreturn));
static void abort_all_(NcclShared *sh, const char *msg) {
    for (int i = 0; i < sh->n_live; i++) ncclCommAbort(sh->live[i]);
    sh->n_live = 0;
    comm_abort_msg(NULL, 1, msg);
}

static void pause_(double waited_s) {
    // spin for the first millisecond (an enqueue or a short collective), then sleep a little
    if (waited_s < 1e-3) return;
    struct timespec ts = {0, 50 * 1000};
    nanosleep(&ts, NULL);
}

// Waits while a non-blocking NCCL call (r) on comm is in progress. A call that fails returns
// the error; one still in progress after the timeout aborts the job. t_limit <= 0: no limit.
static int settle_(const Comm *c, NcclShared *sh, ncclComm_t comm, ncclResult_t r, const char *what,
                   double t_limit, MoetErr *err) {
    double t0 = moet_time();
    while (r == ncclInProgress) {
        double waited = moet_time() - t0;
        if (t_limit > 0 && waited > t_limit) {
            char msg[512];
            snprintf(msg, sizeof msg,
                     "rank %d: NCCL %s on the %s did not finish within %.0f s (a peer is dead "
                     "or stuck); aborting the communicators and the job",
                     c->world_rank, what, label_(c), t_limit);
            if (sh) abort_all_(sh, msg);
            ncclCommAbort(comm);
            comm_abort_msg(NULL, 1, msg);
        }
        pause_(waited);
        ncclResult_t q = ncclCommGetAsyncError(comm, &r);
        if (q != ncclSuccess) r = q;
    }
    return r == ncclSuccess ? 0 : nccl_fail_(c, comm, r, what, err);
}

// An asynchronous error on any communicator (a peer died, a network error) ends the job:
// checked before every collective and while waiting, so that a failure shows at once.
static void check_async_(const Comm *c, NcclShared *sh, const char *what) {
    for (int i = 0; i < sh->n_live; i++) {
        ncclResult_t state = ncclSuccess, q = ncclCommGetAsyncError(sh->live[i], &state);
        if (q != ncclSuccess) state = q;
        if (state == ncclSuccess || state == ncclInProgress) continue;
        const char *last = ncclGetLastError(sh->live[i]);
        char msg[768];
        snprintf(msg, sizeof msg,
                 "rank %d: NCCL error at the %s on the %s: %s%s%s; aborting the communicators "
                 "and the job",
                 c->world_rank, what, label_(c), ncclGetErrorString(state),
                 last && *last ? ": " : "", last && *last ? last : "");
        abort_all_(sh, msg);
    }
}

static void live_remove_(NcclShared *sh, ncclComm_t comm) {
    for (int i = 0; i < sh->n_live; i++)
        if (sh->live[i] == comm) sh->live[i] = sh->live[--sh->n_live];
}

// ---- ordering fences ----

// The comm stream waits for the ops issued so far on the legacy stream.
static int fence_in_(const Comm *c, NcclShared *sh, MoetErr *err) {
    CUDA_TRY_(c, cudaEventRecord(sh->ev_in, cudaStreamLegacy));
    CUDA_TRY_(c, cudaStreamWaitEvent(sh->stream, sh->ev_in, 0));
    return 0;
}

// The legacy stream waits for the comm stream's work so far.
static int fence_out_(const Comm *c, NcclShared *sh, MoetErr *err) {
    CUDA_TRY_(c, cudaEventRecord(sh->ev_out, sh->stream));
    CUDA_TRY_(c, cudaStreamWaitEvent(cudaStreamLegacy, sh->ev_out, 0));
    return 0;
}

// ---- the collectives ----

static int nccl_allreduce_(Comm *c, float *buf, size_t n, int async, MoetErr *err) {
    NcclGroup *g = c->nccl;
    NcclShared *sh = g->sh;
    if (n == 0) return 0; // every rank has the same n
    check_async_(c, sh, "all-reduce");
    int rc = fence_in_(c, sh, err);
    if (rc) return rc;
    ncclResult_t r = ncclAllReduce(buf, buf, n, ncclFloat, ncclSum, g->comm, sh->stream);
    rc = settle_(c, sh, g->comm, r, "all-reduce", sh->timeout_s, err);
    if (rc) return rc;
    if (async) {
        if (g->started++ == 0) g->t_first = moet_time();
        return 0;
    }
    return fence_out_(c, sh, err);
}

// Rows are contiguous in rank order: peer j's rows start after those of peers 0..j-1. Peers
// with 0 rows are skipped on both sides (the counts agree: what i sends to j is what j
// expects from i).
static int nccl_a2a_(Comm *c, const void *send, const int64_t *send_counts, void *recv,
                     const int64_t *recv_counts, size_t elem_size, int async, MoetErr *err) {
    NcclGroup *g = c->nccl;
    NcclShared *sh = g->sh;
    for (int j = 0; j < c->size; j++)
        if (send_counts[j] < 0 || recv_counts[j] < 0)
            return moet_errf(err, MOET_EFAIL,
                             "rank %d: all-to-all-v on the %s: negative row count (%lld to / "
                             "%lld from rank %d)",
                             c->world_rank, label_(c), (long long)send_counts[j],
                             (long long)recv_counts[j], j);
    check_async_(c, sh, "all-to-all-v");
    int rc = fence_in_(c, sh, err);
    if (rc) return rc;
    ncclResult_t r = ncclGroupStart(), first = ncclSuccess;
    if (r != ncclSuccess) return nccl_fail_(c, g->comm, r, "group start (all-to-all-v)", err);
    size_t so = 0, ro = 0; // byte offsets
    for (int j = 0; j < c->size; j++) {
        size_t sb = (size_t)send_counts[j] * elem_size, rb = (size_t)recv_counts[j] * elem_size;
        if (sb > 0 && first == ncclSuccess)
            first = ncclSend((const char *)send + so, sb, ncclUint8, j, g->comm, sh->stream);
        if (rb > 0 && first == ncclSuccess)
            first = ncclRecv((char *)recv + ro, rb, ncclUint8, j, g->comm, sh->stream);
        so += sb;
        ro += rb;
    }
    r = ncclGroupEnd(); // always closes the group, also after a failed call inside it
    if (first != ncclSuccess && first != ncclInProgress)
        return nccl_fail_(c, g->comm, first, "send / receive (all-to-all-v)", err);
    rc = settle_(c, sh, g->comm, r, "all-to-all-v", sh->timeout_s, err);
    if (rc) return rc;
    if (async) { // the legacy stream waits for it at nccl_wait_
        g->a2a_started = 1;
        return 0;
    }
    return fence_out_(c, sh, err);
}

static int nccl_alltoallv_(Comm *c, const void *send, const int64_t *send_counts, void *recv,
                           const int64_t *recv_counts, size_t elem_size, MoetErr *err) {
    return nccl_a2a_(c, send, send_counts, recv, recv_counts, elem_size, 0, err);
}

// Started: the MoE backward's expert weight gradients run on the legacy stream meanwhile.
static int nccl_alltoallv_start_(Comm *c, const void *send, const int64_t *send_counts, void *recv,
                                 const int64_t *recv_counts, size_t elem_size, MoetErr *err) {
    return nccl_a2a_(c, send, send_counts, recv, recv_counts, elem_size, 1, err);
}

// In place: rank j's part is buf[d_j, d_j + counts[j]). Equal parts: one ncclAllGather (its
// in-place form: sendbuff = recvbuff + rank * count); else one broadcast per rooted part,
// grouped so that they run together.
static int nccl_allgatherv_(Comm *c, float *buf, const size_t *counts, MoetErr *err) {
    NcclGroup *g = c->nccl;
    NcclShared *sh = g->sh;
    int equal = 1;
    size_t total = 0, mine = 0;
    for (int j = 0; j < c->size; j++) {
        if (j == c->rank) mine = total;
        total += counts[j];
        equal &= counts[j] == counts[0];
    }
    if (total == 0) return 0;
    check_async_(c, sh, "all-gather");
    int rc = fence_in_(c, sh, err);
    if (rc) return rc;
    ncclResult_t r;
    if (equal) {
        r = ncclAllGather(buf + mine, buf, counts[0], ncclFloat, g->comm, sh->stream);
    } else {
        r = ncclGroupStart();
        if (r != ncclSuccess) return nccl_fail_(c, g->comm, r, "group start (all-gather)", err);
        ncclResult_t first = ncclSuccess;
        size_t d = 0;
        for (int j = 0; j < c->size; j++) {
            if (counts[j] > 0 && first == ncclSuccess)
                first =
                    ncclBroadcast(buf + d, buf + d, counts[j], ncclFloat, j, g->comm, sh->stream);
            d += counts[j];
        }
        r = ncclGroupEnd();
        if (first != ncclSuccess && first != ncclInProgress)
            return nccl_fail_(c, g->comm, first, "broadcast (all-gather)", err);
    }
    rc = settle_(c, sh, g->comm, r, "all-gather", sh->timeout_s, err);
    return rc ? rc : fence_out_(c, sh, err);
}

// Makes the legacy stream wait for everything on the comm stream (the started all-reduces of
// every group), and waits on the host until it is done, checking every communicator for
// asynchronous errors: an error, or the timeout counted from the first start, aborts the job.
static int nccl_wait_(Comm *c, MoetErr *err) {
    NcclGroup *g = c->nccl;
    NcclShared *sh = g->sh;
    if (g->started == 0) {
        // a started all-to-all-v alone: the legacy stream waits for it on the device (no host
        // wait inside the backward; a hang shows at the step's next host wait)
        if (!g->a2a_started) return 0;
        g->a2a_started = 0;
        return fence_out_(c, sh, err);
    }
    g->started = 0;
    g->a2a_started = 0;
    int rc = fence_out_(c, sh, err);
    if (rc) return rc;
    char msg[768];
    double t0 = g->t_first;
    for (;;) {
        cudaError_t e = cudaEventQuery(sh->ev_out);
        if (e == cudaSuccess) return 0;
        if (e != cudaErrorNotReady) return cuda_fail_(c, e, "cudaEventQuery (all-reduce)", err);
        check_async_(c, sh, "wait for the all-reduces");
        double waited = moet_time() - t0;
        if (sh->timeout_s > 0 && waited > sh->timeout_s) {
            snprintf(msg, sizeof msg,
                     "rank %d: NCCL all-reduce on the %s did not finish within %.0f s (a peer is "
                     "dead or stuck); aborting the communicators and the job",
                     c->world_rank, label_(c), sh->timeout_s);
            abort_all_(sh, msg);
        }
        pause_(waited);
    }
}

static void nccl_release_(Comm *c) {
    NcclGroup *g = c->nccl;
    if (!g) return;
    NcclShared *sh = g->sh;
    if (g->comm) {
        // finalize flushes the communicator's pending work; a communicator that cannot
        // finish it (a dead peer) is aborted instead
        int live = 0;
        for (int i = 0; i < sh->n_live; i++) live |= sh->live[i] == g->comm;
        if (live) {
            ncclResult_t r = ncclCommFinalize(g->comm);
            double t0 = moet_time();
            while (r == ncclInProgress &&
                   (sh->timeout_s <= 0 || moet_time() - t0 < sh->timeout_s)) {
                pause_(moet_time() - t0);
                if (ncclCommGetAsyncError(g->comm, &r) != ncclSuccess) r = ncclInternalError;
            }
            if (r == ncclSuccess) {
                r = ncclCommDestroy(g->comm);
                if (r != ncclSuccess && r != ncclInProgress)
                    moet_log("rank %d: NCCL ncclCommDestroy of the %s: %s", c->world_rank,
                             label_(c), ncclGetErrorString(r));
            } else {
                moet_log("rank %d: NCCL finalize of the %s: %s; aborting the communicator",
                         c->world_rank, label_(c),
                         r == ncclInProgress ? "timed out" : ncclGetErrorString(r));
                ncclCommAbort(g->comm);
            }
            live_remove_(sh, g->comm);
        }
    }
    free(g);
    c->nccl = NULL;
    if (--sh->refs == 0) {
        if (sh->ev_in) cudaEventDestroy(sh->ev_in);
        if (sh->ev_out) cudaEventDestroy(sh->ev_out);
        if (sh->stream) cudaStreamDestroy(sh->stream);
        free(sh);
    }
}

static const CommBufTransport nccl_transport = {
    "nccl",     nccl_allreduce_, nccl_alltoallv_,       nccl_allgatherv_,
    nccl_wait_, nccl_release_,   nccl_alltoallv_start_,
};

// ---- set-up ----

// Gives group c the NCCL transport and its part of sh; the communicator comes after (release
// copes with none, when the set-up fails half-way).
static NcclGroup *attach_(Comm *c, NcclShared *sh) {
    NcclGroup *g = moet_calloc(sizeof *g);
    g->sh = sh;
    sh->refs++;
    c->nccl = g;
    c->bt = &nccl_transport;
    return g;
}

static int new_shared_(const Comm *c, double timeout_s, NcclShared **out, MoetErr *err) {
    NcclShared *sh = moet_calloc(sizeof *sh);
    sh->timeout_s = timeout_s;
    *out = sh;
    CUDA_TRY_(c, cudaGetDevice(&sh->device));
    CUDA_TRY_(c, cudaStreamCreateWithFlags(&sh->stream, cudaStreamNonBlocking));
    CUDA_TRY_(c, cudaEventCreateWithFlags(&sh->ev_in, cudaEventDisableTiming));
    CUDA_TRY_(c, cudaEventCreateWithFlags(&sh->ev_out, cudaEventDisableTiming));
    return 0;
}

// The world communicator: ncclGetUniqueId on rank 0, broadcast over the host transport (MPI,
// or nothing for a world of one).
static int init_world_(Parallel *p, double timeout_s, MoetErr *err) {
    Comm *w = p->world;
    NcclShared *sh = NULL;
    int rc = new_shared_(w, timeout_s, &sh, err);
    NcclGroup *g = attach_(w, sh); // from here, release frees sh
    if (rc) return rc;
    ncclUniqueId id;
    memset(&id, 0, sizeof id);
    ncclResult_t r = ncclSuccess;
    if (w->rank == 0) r = ncclGetUniqueId(&id);
    // every rank takes part in the broadcast, also when rank 0 failed (it sends zeros and
    // reports; the others then fail in init)
    rc = w->t->bcast(w, &id, sizeof id, 0, err);
    if (r != ncclSuccess) return nccl_fail_(w, NULL, r, "ncclGetUniqueId", err);
    if (rc) return rc;
    ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
    config.blocking = 0;
    config.commName = "moet world";
    r = ncclCommInitRankConfig(&g->comm, w->size, id, w->rank, &config);
    if (r != ncclSuccess && r != ncclInProgress) {
        rc = nccl_fail_(w, NULL, r, "ncclCommInitRankConfig", err);
        if (g->comm) ncclCommAbort(g->comm);
        g->comm = NULL;
        return rc;
    }
    sh->live[sh->n_live++] = g->comm;
    return settle_(w, NULL, g->comm, r, "communicator set-up (ncclCommInitRankConfig)", timeout_s,
                   err);
}

// A non-blocking ncclCommSplit leaves the child's handle NULL until the split's job is done
// (NCCL writes it from its own thread, whatever the parent reports meanwhile): waits for it,
// watching the parent for errors, for at most t_limit seconds.
static int await_child_(const Comm *c, ncclComm_t parent, ncclComm_t *child, double t_limit,
                        MoetErr *err) {
    double t0 = moet_time();
    while (!__atomic_load_n(child, __ATOMIC_ACQUIRE)) {
        double waited = moet_time() - t0;
        ncclResult_t state = ncclSuccess, q = ncclCommGetAsyncError(parent, &state);
        if (q != ncclSuccess) state = q;
        if (state != ncclSuccess && state != ncclInProgress)
            return nccl_fail_(c, parent, state, "communicator split (ncclCommSplit)", err);
        if (t_limit > 0 && waited > t_limit) {
            char msg[512];
            snprintf(msg, sizeof msg,
                     "rank %d: NCCL communicator split for the %s did not finish within %.0f s "
                     "(a peer is dead or stuck); aborting the job",
                     c->world_rank, label_(c), t_limit);
            ncclCommAbort(parent);
            comm_abort_msg(NULL, 1, msg);
        }
        pause_(waited);
    }
    return 0;
}

// A group from the world: ncclCommSplit with the colors and keys of comm_set_ep's MPI split.
static int split_(Parallel *p, Comm *c, int color, const char *name, MoetErr *err) {
    NcclGroup *wg = p->world->nccl;
    NcclShared *sh = wg->sh;
    NcclGroup *g = attach_(c, sh);
    ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
    config.blocking = 0;
    config.commName = name;
    ncclResult_t r = ncclCommSplit(wg->comm, color, p->rank, &g->comm, &config);
    if (r != ncclSuccess && r != ncclInProgress) {
        if (g->comm) ncclCommAbort(g->comm);
        g->comm = NULL;
        return nccl_fail_(c, wg->comm, r, "ncclCommSplit", err);
    }
    // a split is collective over the parent: both must settle
    int rc = settle_(p->world, NULL, wg->comm, r, "communicator split (ncclCommSplit)",
                     sh->timeout_s, err);
    if (rc) return rc;
    if ((rc = await_child_(c, wg->comm, &g->comm, sh->timeout_s, err))) return rc;
    if (sh->n_live < (int)(sizeof sh->live / sizeof *sh->live)) sh->live[sh->n_live++] = g->comm;
    rc = settle_(c, NULL, g->comm, ncclInProgress, "communicator split (ncclCommSplit)",
                 sh->timeout_s, err);
    if (rc) return rc;
    int n = 0, rank = -1;
    r = ncclCommCount(g->comm, &n);
    if (r == ncclSuccess) r = ncclCommUserRank(g->comm, &rank);
    if (r != ncclSuccess) return nccl_fail_(c, g->comm, r, "ncclCommCount", err);
    if (n != c->size || rank != c->rank)
        return moet_errf(err, MOET_EFAIL,
                         "rank %d: the NCCL %s has rank %d of %d but the MPI group rank %d of %d "
                         "(a bug in comm_nccl.c's split)",
                         p->rank, label_(c), rank, n, c->rank, c->size);
    return 0;
}

int comm_nccl_available(void) {
    return 1;
}

int comm_nccl_setup(Parallel *p, double timeout_s, MoetErr *err) {
    Comm *w = p->world;
    if (!(w->ops && w->ops->on_device && strcmp(w->ops->name, "cuda") == 0))
        return moet_errf(err, MOET_EUSAGE,
                         "[parallel] comm = nccl needs the cuda backend ([train] device = cuda); "
                         "this run's backend is %s",
                         w->ops ? w->ops->name : "the host");
    int rc = 0;
    // comm_set_ep calls this again for its new EP and expert-DP groups: the world stays
    if (!w->nccl) rc = init_world_(p, timeout_s, err);
    if (rc) return rc;
    int ep = p->ep_size;
    if (!p->ep->nccl) rc = split_(p, p->ep, p->rank / ep, "moet EP group", err);
    if (!rc && !p->edp->nccl) rc = split_(p, p->edp, p->rank % ep, "moet expert-DP group", err);
    return rc;
}

#else // no NCCL in this build

int comm_nccl_available(void) {
    return 0;
}

int comm_nccl_setup(Parallel *p, double timeout_s, MoetErr *err) {
    (void)p, (void)timeout_s;
#if MOET_CUDA
    const char *why = "CMake found no nccl.h / libnccl";
#else
    const char *why = "it was built without CUDA";
#endif
    return moet_errf(err, MOET_EUSAGE,
                     "[parallel] comm = nccl: this build has no NCCL (%s)\n"
                     "---> HINT: use [parallel] comm = mpi (or auto), or rebuild with CUDA and "
                     "NCCL (CMake looks in the CUDA toolkit, /usr/local/cuda and $NCCL_ROOT)",
                     why);
}

#endif
