// comm: the ranks of a run and their collectives (ARCHITECTURE §4). A Comm is a group of ranks
// plus two transports (tables of collectives, comm_impl.h): one for host memory (MPI, or the
// one-rank stub used for groups of one rank and for builds without MPI) and one for the
// backend's memory (the host one on the CPU backend; on a GPU, MPI staged through host memory,
// or NCCL from comm_nccl.c). A watchdog thread aborts the job when a collective hangs.
#include "train/comm.h"

#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "train/comm_impl.h"

// Process-wide statistics (collectives run on the main thread only: MPI_THREAD_FUNNELED).
static CommStats g_stats;

void comm_stats(CommStats *s) {
    *s = g_stats;
}

void comm_stats_reset(void) {
    memset(&g_stats, 0, sizeof g_stats);
}

// ---- the one-rank stub: a group of one rank, where every collective is a copy or nothing ----

static int stub_allreduce_f32_(Comm *c, float *buf, size_t n, MoetErr *err) {
    (void)c, (void)buf, (void)n, (void)err;
    return 0;
}

static int stub_allreduce_f64_(Comm *c, double *buf, size_t n, MoetErr *err) {
    (void)c, (void)buf, (void)n, (void)err;
    return 0;
}

static int stub_alltoall_i64_(Comm *c, const int64_t *send, int64_t *recv, int count,
                              MoetErr *err) {
    (void)c, (void)err;
    if (count > 0 && send != recv) memmove(recv, send, (size_t)count * sizeof *send);
    return 0;
}

static int stub_alltoallv_(Comm *c, const void *send, const int64_t *send_counts, void *recv,
                           const int64_t *recv_counts, size_t elem_size, MoetErr *err) {
    (void)c;
    if (send_counts[0] != recv_counts[0] || send_counts[0] < 0)
        return moet_errf(err, MOET_EFAIL,
                         "all-to-all-v: one rank sends %lld rows to itself but expects %lld",
                         (long long)send_counts[0], (long long)recv_counts[0]);
    size_t bytes = (size_t)send_counts[0] * elem_size;
    if (bytes > 0 && send != recv) memmove(recv, send, bytes);
    return 0;
}

static int stub_bcast_(Comm *c, void *buf, size_t bytes, int root, MoetErr *err) {
    (void)c, (void)buf, (void)bytes;
    if (root != 0)
        return moet_errf(err, MOET_EFAIL, "broadcast: root %d is not in a group of 1 rank", root);
    return 0;
}

static int stub_barrier_(Comm *c, MoetErr *err) {
    (void)c, (void)err;
    return 0;
}

static int stub_allgatherv_f32_(Comm *c, float *buf, const size_t *counts, MoetErr *err) {
    (void)c, (void)buf, (void)counts, (void)err;
    return 0;
}

static const CommTransport stub_transport = {
    "stub",
    stub_allreduce_f32_,
    stub_allreduce_f64_,
    stub_allreduce_f64_,
    stub_alltoall_i64_,
    stub_alltoallv_,
    stub_bcast_,
    stub_barrier_,
    stub_allgatherv_f32_,
};

// ---- backend memory: host buffers (CPU backend) ----

#if MOET_MPI
static int mpi_ialltoallv_(Comm *c, const void *send, const int64_t *send_counts, void *recv,
                           const int64_t *recv_counts, size_t elem_size, MoetErr *err);
static int mpi_a2a_wait_(Comm *c, MoetErr *err);
#endif

static int host_buf_allreduce_(Comm *c, float *buf, size_t n, int async, MoetErr *err) {
    (void)async; // done on return
    return c->t->allreduce_sum_f32(c, buf, n, err);
}

static int host_buf_alltoallv_(Comm *c, const void *send, const int64_t *send_counts, void *recv,
                               const int64_t *recv_counts, size_t elem_size, MoetErr *err) {
    return c->t->alltoallv(c, send, send_counts, recv, recv_counts, elem_size, err);
}

static int host_buf_allgatherv_(Comm *c, float *buf, const size_t *counts, MoetErr *err) {
    return c->t->allgatherv_f32(c, buf, counts, err);
}

// Started all-to-all-v: MPI_Ialltoallv on groups of several ranks, else done at once.
static int host_buf_alltoallv_start_(Comm *c, const void *send, const int64_t *send_counts,
                                     void *recv, const int64_t *recv_counts, size_t elem_size,
                                     MoetErr *err) {
#if MOET_MPI
    if (c->size > 1)
        return mpi_ialltoallv_(c, send, send_counts, recv, recv_counts, elem_size, err);
#endif
    return c->t->alltoallv(c, send, send_counts, recv, recv_counts, elem_size, err);
}

// The all-reduces of the MPI transports are done on return; the all-to-all-v may be pending.
static int host_buf_wait_(Comm *c, MoetErr *err) {
#if MOET_MPI
    if (c->size > 1) return mpi_a2a_wait_(c, err);
#endif
    (void)c, (void)err;
    return 0;
}

static const CommBufTransport host_buf_transport = {
    "host",          host_buf_allreduce_, host_buf_alltoallv_, host_buf_allgatherv_,
    host_buf_wait_,  NULL,                host_buf_alltoallv_start_,
};

// ---- backend memory: device buffers over the host transport, staged through host memory ----
// (several ranks may share one GPU; the copies wait for the ops before them)

static void *stage_(Comm *c, size_t bytes) {
    if (c->a2a_recv) moet_die("internal: staging on the %s while an all-to-all-v is pending",
                              c->label);
    if (c->stage_bytes < bytes) {
        free(c->stage);
        c->stage = moet_malloc(bytes);
        c->stage_bytes = bytes;
    }
    return c->stage;
}

static int staged_allreduce_(Comm *c, float *buf, size_t n, int async, MoetErr *err) {
    (void)async;
    if (c->size == 1 || n == 0) return 0;
    float *h = stage_(c, n * sizeof(float));
    c->ops->to_host(h, buf, n * sizeof(float));
    int rc = c->t->allreduce_sum_f32(c, h, n, err);
    if (!rc) c->ops->to_device(buf, h, n * sizeof(float));
    return rc;
}

// Where the received rows start in the stage: after the sent ones, and never at the same address
// (Open MPI's non-blocking collectives take send == recv for MPI_IN_PLACE).
static size_t recv_off_(size_t send_bytes) {
    return (send_bytes + 63) / 64 * 64 + 64;
}

static int staged_allgatherv_(Comm *c, float *buf, const size_t *counts, MoetErr *err) {
    if (c->size == 1) return 0;
    size_t total = 0, mine = 0;
    for (int j = 0; j < c->size; j++) {
        if (j == c->rank) mine = total;
        total += counts[j];
    }
    float *h = stage_(c, total * sizeof(float));
    if (counts[c->rank]) c->ops->to_host(h + mine, buf + mine, counts[c->rank] * sizeof(float));
    int rc = c->t->allgatherv_f32(c, h, counts, err);
    if (!rc && total) c->ops->to_device(buf, h, total * sizeof(float));
    return rc;
}

// Started: the send rows staged now, the received ones copied to the device at the wait (a
// group of one rank copies at once).
static int staged_alltoallv_start_(Comm *c, const void *send, const int64_t *send_counts,
                                   void *recv, const int64_t *recv_counts, size_t elem_size,
                                   MoetErr *err) {
    int64_t ns = 0, nr = 0;
    for (int j = 0; j < c->size; j++) ns += send_counts[j], nr += recv_counts[j];
    if (c->size == 1) {
        if (ns != nr)
            return moet_errf(err, MOET_EFAIL,
                             "all-to-all-v: one rank sends %lld rows to itself but expects %lld",
                             (long long)ns, (long long)nr);
        if (ns > 0 && send != recv) c->ops->copy(recv, send, (size_t)ns * elem_size);
        return 0;
    }
#if MOET_MPI
    size_t sb = (size_t)ns * elem_size, rb = (size_t)nr * elem_size, ro = recv_off_(sb);
    char *h = stage_(c, ro + rb);
    if (sb) c->ops->to_host(h, send, sb);
    int rc = mpi_ialltoallv_(c, h, send_counts, h + ro, recv_counts, elem_size, err);
    if (rc) return rc;
    c->a2a_recv = recv;
    c->a2a_recv_bytes = rb;
    c->a2a_recv_off = ro;
    return 0;
#else
    return moet_errf(err, MOET_EFAIL, "all-to-all-v over %d ranks without MPI", c->size);
#endif
}

static int staged_wait_(Comm *c, MoetErr *err) {
    if (!c->a2a_recv) return 0;
#if MOET_MPI
    int rc = mpi_a2a_wait_(c, err);
    void *recv = c->a2a_recv;
    c->a2a_recv = NULL;
    if (!rc && c->a2a_recv_bytes)
        c->ops->to_device(recv, (char *)c->stage + c->a2a_recv_off, c->a2a_recv_bytes);
    return rc;
#else
    (void)err;
    return 0;
#endif
}

static int staged_alltoallv_(Comm *c, const void *send, const int64_t *send_counts, void *recv,
                             const int64_t *recv_counts, size_t elem_size, MoetErr *err) {
    int rc = staged_alltoallv_start_(c, send, send_counts, recv, recv_counts, elem_size, err);
    return rc ? rc : staged_wait_(c, err);
}

static const CommBufTransport staged_buf_transport = {
    "mpi-staged", staged_allreduce_, staged_alltoallv_, staged_allgatherv_,
    staged_wait_, NULL,              staged_alltoallv_start_,
};

// ---- MPI ----

#if MOET_MPI

// Turns an MPI error code into a message naming the collective.
static int mpi_err_(int rc, MoetErr *err, const char *what, const Comm *c) {
    char s[MPI_MAX_ERROR_STRING];
    int len = 0;
    if (MPI_Error_string(rc, s, &len) != MPI_SUCCESS) snprintf(s, sizeof s, "error %d", rc);
    return moet_errf(err, MOET_EFAIL,
                     "MPI %s failed on rank %d of a group of %d: %s\n"
                     "---> HINT: another rank has probably died; see its messages above",
                     what, c->rank, c->size, s);
}

static void *scratch_(Comm *c, size_t bytes) {
    if (c->scratch_bytes < bytes) {
        free(c->scratch);
        c->scratch = moet_malloc(bytes);
        c->scratch_bytes = bytes;
    }
    return c->scratch;
}

static void add_f32_(void *acc, const void *x, size_t n) {
    float *a = acc;
    const float *b = x;
    for (size_t i = 0; i < n; i++) a[i] += b[i];
}

static void add_f64_(void *acc, const void *x, size_t n) {
    double *a = acc;
    const double *b = x;
    for (size_t i = 0; i < n; i++) a[i] += b[i];
}

// Deterministic all-reduce sum, a hand-made reduce-scatter + all-gather. Each segment of the
// buffer is split into size chunks; an all-to-all-v brings chunk r of every rank to rank r, which
// sums them in rank order ((x_0 + x_1) + x_2) + ... and an all-gather-v hands the summed chunks
// back. Every element is summed by exactly one rank in one fixed order, so all ranks get the same
// bits, and a run is reproducible for a given group size; each rank sends about 2x the buffer,
// as in a ring all-reduce. Segments keep the MPI counts (ints) and the scratch buffer bounded.
static int mpi_allreduce_sum_(Comm *c, void *buf, size_t n, size_t esz, MPI_Datatype type,
                              void (*add)(void *acc, const void *x, size_t n), MoetErr *err) {
    const size_t seg_max = (size_t)1 << 24; // elements per round: chunks fit an int easily
    int P = c->size, r = c->rank;
    int *counts = moet_malloc(4 * (size_t)P * sizeof(int));
    int *displs = counts + P, *rcounts = counts + 2 * P, *rdispls = counts + 3 * P;
    char *scratch = scratch_(c, (n < seg_max ? n : seg_max) * esz);
    int rc = MPI_SUCCESS;
    for (size_t off = 0; off < n && rc == MPI_SUCCESS; off += seg_max) {
        size_t m = n - off < seg_max ? n - off : seg_max;
        char *seg = (char *)buf + off * esz;
        for (int j = 0, d = 0; j < P; j++) {
            counts[j] = (int)(m / (size_t)P) + (j < (int)(m % (size_t)P));
            displs[j] = d;
            d += counts[j];
        }
        int mine = counts[r];
        for (int j = 0; j < P; j++) {
            rcounts[j] = mine;
            rdispls[j] = j * mine;
        }
        rc = MPI_Alltoallv(seg, counts, displs, type, scratch, rcounts, rdispls, type, c->mpi);
        if (rc != MPI_SUCCESS) break;
        // Chunk r of rank 0, then + rank 1's, + rank 2's, ...: the rank order of the API.
        char *out = seg + (size_t)displs[r] * esz;
        memcpy(out, scratch, (size_t)mine * esz);
        for (int j = 1; j < P; j++) add(out, scratch + (size_t)j * mine * esz, (size_t)mine);
        rc = MPI_Allgatherv(MPI_IN_PLACE, 0, type, seg, counts, displs, type, c->mpi);
    }
    free(counts);
    return rc == MPI_SUCCESS ? 0 : mpi_err_(rc, err, "all-reduce (sum)", c);
}

static int mpi_allreduce_f32_(Comm *c, float *buf, size_t n, MoetErr *err) {
    return mpi_allreduce_sum_(c, buf, n, sizeof *buf, MPI_FLOAT, add_f32_, err);
}

static int mpi_allreduce_f64_(Comm *c, double *buf, size_t n, MoetErr *err) {
    return mpi_allreduce_sum_(c, buf, n, sizeof *buf, MPI_DOUBLE, add_f64_, err);
}

// The maximum is exact whatever the order, so MPI's own all-reduce does.
static int mpi_allreduce_max_f64_(Comm *c, double *buf, size_t n, MoetErr *err) {
    for (size_t off = 0; off < n; off += (size_t)1 << 30) {
        size_t m = n - off < ((size_t)1 << 30) ? n - off : ((size_t)1 << 30);
        int rc = MPI_Allreduce(MPI_IN_PLACE, buf + off, (int)m, MPI_DOUBLE, MPI_MAX, c->mpi);
        if (rc != MPI_SUCCESS) return mpi_err_(rc, err, "all-reduce (max)", c);
    }
    return 0;
}

static int mpi_alltoall_i64_(Comm *c, const int64_t *send, int64_t *recv, int count, MoetErr *err) {
    int rc = MPI_Alltoall(send, count, MPI_INT64_T, recv, count, MPI_INT64_T, c->mpi);
    return rc == MPI_SUCCESS ? 0 : mpi_err_(rc, err, "all-to-all (int64)", c);
}

// Counts and displacements are in rows: the datatype is one row (MPI_Type_contiguous), so a
// buffer may exceed 2^31 bytes as long as the row counts and offsets fit an int. arr: 4 x size
// ints (send counts, send displacements, receive counts, receive displacements).
static int a2a_setup_(Comm *c, const int64_t *send_counts, const int64_t *recv_counts,
                      size_t elem_size, int *arr, MPI_Datatype *row, MoetErr *err) {
    int P = c->size;
    if (elem_size == 0 || elem_size > INT_MAX)
        return moet_errf(err, MOET_EFAIL, "all-to-all-v: row size %zu bytes is not supported",
                         elem_size);
    int *sc = arr, *sd = arr + P, *rcn = arr + 2 * P, *rd = arr + 3 * P;
    int64_t so = 0, ro = 0;
    for (int j = 0; j < P; j++) {
        if (send_counts[j] < 0 || recv_counts[j] < 0 || so > INT_MAX || ro > INT_MAX ||
            send_counts[j] > INT_MAX - so || recv_counts[j] > INT_MAX - ro)
            return moet_errf(err, MOET_EFAIL,
                             "all-to-all-v: row counts (%lld to / %lld from rank %d) are "
                             "negative or their sums exceed 2^31-1 rows\n"
                             "---> HINT: use smaller micro-batches",
                             (long long)send_counts[j], (long long)recv_counts[j], j);
        sc[j] = (int)send_counts[j];
        sd[j] = (int)so;
        rcn[j] = (int)recv_counts[j];
        rd[j] = (int)ro;
        so += send_counts[j];
        ro += recv_counts[j];
    }
    int rc = MPI_Type_contiguous((int)elem_size, MPI_BYTE, row);
    if (rc == MPI_SUCCESS) rc = MPI_Type_commit(row);
    return rc == MPI_SUCCESS ? 0 : mpi_err_(rc, err, "all-to-all-v (row type)", c);
}

static int mpi_alltoallv_(Comm *c, const void *send, const int64_t *send_counts, void *recv,
                          const int64_t *recv_counts, size_t elem_size, MoetErr *err) {
    int P = c->size;
    int *arr = moet_malloc(4 * (size_t)P * sizeof(int));
    MPI_Datatype row;
    int rc = a2a_setup_(c, send_counts, recv_counts, elem_size, arr, &row, err);
    if (rc) {
        free(arr);
        return rc;
    }
    rc = MPI_Alltoallv(send, arr, arr + P, row, recv, arr + 2 * P, arr + 3 * P, row, c->mpi);
    MPI_Type_free(&row);
    free(arr);
    return rc == MPI_SUCCESS ? 0 : mpi_err_(rc, err, "all-to-all-v", c);
}

// The same, started (MPI_Ialltoallv); mpi_a2a_wait_ completes it.
static int mpi_ialltoallv_(Comm *c, const void *send, const int64_t *send_counts, void *recv,
                           const int64_t *recv_counts, size_t elem_size, MoetErr *err) {
    int P = c->size;
    if (c->a2a_req != MPI_REQUEST_NULL)
        return moet_errf(err, MOET_EFAIL, "all-to-all-v: one is already started on the %s",
                         c->label);
    if (!c->a2a_counts) c->a2a_counts = moet_malloc(4 * (size_t)P * sizeof(int));
    int *arr = c->a2a_counts;
    int rc = a2a_setup_(c, send_counts, recv_counts, elem_size, arr, &c->a2a_type, err);
    if (rc) return rc;
    rc = MPI_Ialltoallv(send, arr, arr + P, c->a2a_type, recv, arr + 2 * P, arr + 3 * P,
                        c->a2a_type, c->mpi, &c->a2a_req);
    if (rc != MPI_SUCCESS) {
        MPI_Type_free(&c->a2a_type);
        c->a2a_req = MPI_REQUEST_NULL;
        return mpi_err_(rc, err, "all-to-all-v (start)", c);
    }
    return 0;
}

static int mpi_a2a_wait_(Comm *c, MoetErr *err) {
    if (c->a2a_req == MPI_REQUEST_NULL) return 0;
    int rc = MPI_Wait(&c->a2a_req, MPI_STATUS_IGNORE);
    MPI_Type_free(&c->a2a_type);
    c->a2a_req = MPI_REQUEST_NULL;
    return rc == MPI_SUCCESS ? 0 : mpi_err_(rc, err, "all-to-all-v (wait)", c);
}

static int mpi_bcast_(Comm *c, void *buf, size_t bytes, int root, MoetErr *err) {
    if (root < 0 || root >= c->size)
        return moet_errf(err, MOET_EFAIL, "broadcast: root %d is not in a group of %d ranks", root,
                         c->size);
    for (size_t off = 0; off < bytes; off += (size_t)1 << 30) {
        size_t m = bytes - off < ((size_t)1 << 30) ? bytes - off : ((size_t)1 << 30);
        int rc = MPI_Bcast((char *)buf + off, (int)m, MPI_BYTE, root, c->mpi);
        if (rc != MPI_SUCCESS) return mpi_err_(rc, err, "broadcast", c);
    }
    return 0;
}

static int mpi_barrier_(Comm *c, MoetErr *err) {
    int rc = MPI_Barrier(c->mpi);
    return rc == MPI_SUCCESS ? 0 : mpi_err_(rc, err, "barrier", c);
}

// In place. One MPI_Allgatherv when the whole buffer's float offsets fit MPI's ints, else
// each rank's part broadcast from it in pieces of 2^30 floats.
static int mpi_allgatherv_f32_(Comm *c, float *buf, const size_t *counts, MoetErr *err) {
    int P = c->size, rc = MPI_SUCCESS;
    size_t total = 0;
    for (int j = 0; j < P; j++) total += counts[j];
    if (total <= (size_t)INT_MAX) {
        int *rcn = moet_malloc(2 * (size_t)P * sizeof(int)), *rd = rcn + P;
        for (int j = 0, d = 0; j < P; j++) {
            rcn[j] = (int)counts[j];
            rd[j] = d;
            d += rcn[j];
        }
        rc = MPI_Allgatherv(MPI_IN_PLACE, 0, MPI_FLOAT, buf, rcn, rd, MPI_FLOAT, c->mpi);
        free(rcn);
    } else {
        const size_t piece = (size_t)1 << 30;
        size_t base = 0;
        for (int j = 0; j < P && rc == MPI_SUCCESS; base += counts[j], j++)
            for (size_t off = 0; off < counts[j] && rc == MPI_SUCCESS; off += piece) {
                size_t n = counts[j] - off < piece ? counts[j] - off : piece;
                rc = MPI_Bcast(buf + base + off, (int)n, MPI_FLOAT, j, c->mpi);
            }
    }
    return rc == MPI_SUCCESS ? 0 : mpi_err_(rc, err, "all-gather", c);
}

static const CommTransport mpi_transport = {
    "mpi",
    mpi_allreduce_f32_,
    mpi_allreduce_f64_,
    mpi_allreduce_max_f64_,
    mpi_alltoall_i64_,
    mpi_alltoallv_,
    mpi_bcast_,
    mpi_barrier_,
    mpi_allgatherv_f32_,
};

static int mpi_we_initialized = 0; // 1: comm_init started MPI, so comm_finalize ends it

// Wraps an MPI communicator (taking ownership). Groups of one rank use the stub transport.
static Comm *comm_wrap_(MPI_Comm m, const char *label, int world_rank) {
    Comm *c = moet_calloc(sizeof *c);
    c->mpi = m;
    MPI_Comm_set_errhandler(m, MPI_ERRORS_RETURN);
    MPI_Comm_rank(m, &c->rank);
    MPI_Comm_size(m, &c->size);
    c->t = c->size == 1 ? &stub_transport : &mpi_transport;
    c->bt = &host_buf_transport;
    c->label = label;
    c->world_rank = world_rank < 0 ? c->rank : world_rank;
    c->a2a_req = MPI_REQUEST_NULL;
    return c;
}
#endif // MOET_MPI

#if !MOET_MPI
// The one group of one rank of a build without MPI.
static Comm *stub_comm_(const char *label) {
    Comm *c = moet_calloc(sizeof *c);
    c->t = &stub_transport;
    c->bt = &host_buf_transport;
    c->label = label;
    c->size = 1;
    return c;
}
#endif

static void comm_free_(Comm *c) {
    if (!c) return;
    if (c->bt && c->bt->release) c->bt->release(c);
    free(c->stage);
    free(c->a2a_counts);
#if MOET_MPI
    if (c->mpi != MPI_COMM_NULL) MPI_Comm_free(&c->mpi);
    free(c->scratch);
#endif
    free(c);
}

// ---- groups ----

static void use_ops_(Comm *c, const Ops *ops);
static double g_timeout_s;   // the watchdog's limit (0: none)
static volatile int g_aborting; // comm_abort_msg runs: the watchdog keeps quiet

static int check_ep_(int ep, int world, MoetErr *err) {
    if (ep < 1) return moet_errf(err, MOET_EUSAGE, "[parallel] ep = %d must be >= 1", ep);
    if (world % ep != 0)
        return moet_errf(err, MOET_EUSAGE,
                         "[parallel] ep = %d does not divide the world of %d ranks", ep, world);
    return 0;
}

int comm_set_ep(Parallel *p, int ep, MoetErr *err) {
    int rc = check_ep_(ep, p->world_size, err);
    if (rc) return rc;
    comm_free_(p->ep);
    comm_free_(p->edp);
    p->ep = p->edp = NULL;
#if MOET_MPI
    // EP group g = world ranks [g*ep, (g+1)*ep); expert-DP group = {r : r % ep == rank % ep}.
    // Key = world rank, so group ranks follow world order.
    MPI_Comm ep_comm, edp_comm;
    int mrc = MPI_Comm_split(p->world->mpi, p->rank / ep, p->rank, &ep_comm);
    if (mrc != MPI_SUCCESS) return mpi_err_(mrc, err, "split (EP group)", p->world);
    mrc = MPI_Comm_split(p->world->mpi, p->rank % ep, p->rank, &edp_comm);
    if (mrc != MPI_SUCCESS) {
        MPI_Comm_free(&ep_comm);
        return mpi_err_(mrc, err, "split (expert-DP group)", p->world);
    }
    p->ep = comm_wrap_(ep_comm, "EP group", p->rank);
    p->edp = comm_wrap_(edp_comm, "expert-DP group", p->rank);
#else
    p->ep = stub_comm_("EP group");
    p->edp = stub_comm_("expert-DP group");
#endif
    p->ep_rank = p->rank % ep;
    p->ep_size = ep;
    // new groups after comm_use_backend: the same backend and transport as the world's
    if (p->world->ops) {
        use_ops_(p->ep, p->world->ops);
        use_ops_(p->edp, p->world->ops);
        if (p->world->nccl) return comm_nccl_setup(p, g_timeout_s, err);
    }
    return 0;
}

// The rank within the node (from the launcher's environment, else from the ranks sharing
// memory with this one) and the number of ranks on the node (collective).
static void local_ranks_(Parallel *p) {
    int shm_rank = 0, shm_size = 1;
#if MOET_MPI
    MPI_Comm shm;
    if (MPI_Comm_split_type(p->world->mpi, MPI_COMM_TYPE_SHARED, p->rank, MPI_INFO_NULL, &shm) ==
        MPI_SUCCESS) {
        MPI_Comm_rank(shm, &shm_rank);
        MPI_Comm_size(shm, &shm_size);
        MPI_Comm_free(&shm);
    }
#endif
    p->local_rank = shm_rank;
    p->local_size = shm_size;
    const char *vars[] = {"OMPI_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID"};
    for (int i = 0; i < 2; i++) {
        const char *s = getenv(vars[i]);
        if (s && *s) {
            p->local_rank = atoi(s);
            break;
        }
    }
}

int comm_init(int *argc, char ***argv, int ep, Parallel *p, MoetErr *err) {
    memset(p, 0, sizeof *p);
#if MOET_MPI
    int inited = 0, provided = 0;
    MPI_Initialized(&inited);
    if (!inited) {
        if (MPI_Init_thread(argc, argv, MPI_THREAD_FUNNELED, &provided) != MPI_SUCCESS)
            return moet_errf(err, MOET_EFAIL, "MPI_Init_thread failed");
        mpi_we_initialized = 1;
        if (provided < MPI_THREAD_FUNNELED)
            moet_log("warning: MPI gives thread level %d < MPI_THREAD_FUNNELED", provided);
    }
    MPI_Comm world;
    if (MPI_Comm_dup(MPI_COMM_WORLD, &world) != MPI_SUCCESS)
        return moet_errf(err, MOET_EFAIL, "MPI_Comm_dup(MPI_COMM_WORLD) failed");
    p->world = comm_wrap_(world, "world", -1);
#else
    (void)argc, (void)argv;
    p->world = stub_comm_("world");
#endif
    p->rank = p->world->rank;
    p->world_size = p->world->size;
    local_ranks_(p);
    moet_set_log_rank(p->rank, p->world_size);
    // On a bad ep every rank fails alike; the caller reports it and calls comm_finalize.
    return comm_set_ep(p, ep, err);
}

void comm_finalize(Parallel *p) {
    comm_free_(p->ep);
    comm_free_(p->edp);
    comm_free_(p->world);
    p->ep = p->edp = p->world = NULL;
#if MOET_MPI
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (mpi_we_initialized && !finalized) MPI_Finalize();
    mpi_we_initialized = 0;
#endif
}

void comm_abort_msg(Parallel *p, int code, const char *reason) {
    g_aborting = 1;
    int rank = p && p->world ? p->rank : 0;
#if MOET_MPI
    int inited = 0, finalized = 0;
    MPI_Initialized(&inited);
    MPI_Finalized(&finalized);
    if (!(p && p->world) && inited && !finalized) MPI_Comm_rank(MPI_COMM_WORLD, &rank);
#endif
    fflush(stdout);
    fprintf(stderr, "rank %d: aborting the job (exit code %d): %s\n", rank, code,
            reason && *reason ? reason : "see the error above");
    fflush(stderr);
#if MOET_MPI
    if (inited && !finalized) MPI_Abort(MPI_COMM_WORLD, code);
#endif
    exit(code);
}

void comm_abort(Parallel *p, int code) {
    comm_abort_msg(p, code, NULL);
}

int comm_rank(const Comm *c) {
    return c->rank;
}

int comm_size(const Comm *c) {
    return c->size;
}

// ---- the watchdog ----
// A collective marks its start (comm_watch_begin) and end; a thread started by comm_use_backend
// checks once a second, and a collective that has run longer than the timeout ends the process
// with a message naming the rank and the collective. The launcher (mpirun; srun with
// --kill-on-bad-exit) then ends the other ranks: no rank waits forever for a dead peer.

static volatile double g_watch_t0;         // start of the running collective, 0: none
static const char *volatile g_watch_what;  // its name
static Comm *volatile g_watch_comm;        // its group
static volatile double g_phase_t0;         // start of the watched phase (comm_watch_phase_*)
static const char *volatile g_phase_what;
static Comm *volatile g_phase_comm;
static int g_watchdog_started;

static void *watchdog_(void *arg) {
    (void)arg;
    for (;;) {
        sleep(1);
        double t0 = g_watch_t0, now = moet_time();
        Comm *c = g_watch_comm;
        const char *what = g_watch_what;
        if (t0 <= 0) { // no collective running: a late phase (blocked elsewhere)?
            t0 = g_phase_t0;
            c = g_phase_comm;
            what = g_phase_what;
        }
        if (g_aborting || t0 <= 0 || g_timeout_s <= 0 || now - t0 <= g_timeout_s) continue;
        fflush(stdout);
        fprintf(stderr,
                "rank %d: %s on the %s (%d ranks) has not finished after %.0f s: another rank is "
                "probably dead or stuck; aborting the job (exit code 1)\n"
                "---> HINT: look for the first error of another rank above; [parallel] "
                "timeout_s sets this limit\n",
                c ? c->world_rank : -1, what ? what : "a collective", c && c->label ? c->label
                : "group", c ? c->size : 0, g_timeout_s);
        fflush(stderr);
        _exit(1);
    }
    return NULL;
}

void comm_watch_begin(Comm *c, const char *what) {
    g_watch_comm = c;
    g_watch_what = what;
    g_watch_t0 = moet_time();
}

void comm_watch_end(void) {
    g_watch_t0 = 0;
}

void comm_watch_phase_begin(Comm *c, const char *what) {
    g_phase_comm = c;
    g_phase_what = what;
    g_phase_t0 = moet_time();
}

void comm_watch_phase_end(void) {
    g_phase_t0 = 0;
}

static void watchdog_start_(double timeout_s) {
    g_timeout_s = timeout_s;
    if (timeout_s <= 0 || g_watchdog_started) return;
    pthread_t th;
    pthread_attr_t at;
    pthread_attr_init(&at);
    pthread_attr_setdetachstate(&at, PTHREAD_CREATE_DETACHED);
    if (pthread_create(&th, &at, watchdog_, NULL) == 0) g_watchdog_started = 1;
    else moet_log("warning: could not start the collective watchdog thread");
    pthread_attr_destroy(&at);
}

// ---- the public collectives: dispatch to the transport and count ----

// The bookkeeping around every public collective: the watchdog's mark, then the statistics.
static double enter_(Comm *c, const char *what) {
    comm_watch_begin(c, what);
    return moet_time();
}

static void leave_(double t0, double *bytes_stat, double bytes, double *time_stat) {
    comm_watch_end();
    *bytes_stat += bytes;
    *time_stat += moet_time() - t0;
}

// Rows an all-to-all-v sends (the ones a rank keeps for itself included).
static double rows_(const Comm *c, const int64_t *send_counts) {
    double rows = 0;
    for (int j = 0; j < c->size; j++) rows += (double)send_counts[j];
    return rows;
}

int comm_allreduce_sum_f32(Comm *c, float *buf, size_t n, MoetErr *err) {
    double t0 = enter_(c, "all-reduce (sum)");
    int rc = c->t->allreduce_sum_f32(c, buf, n, err);
    leave_(t0, &g_stats.allreduce_bytes, (double)n * sizeof *buf, &g_stats.allreduce_s);
    return rc;
}

int comm_allreduce_sum_f64(Comm *c, double *buf, size_t n, MoetErr *err) {
    double t0 = enter_(c, "all-reduce (sum)");
    int rc = c->t->allreduce_sum_f64(c, buf, n, err);
    leave_(t0, &g_stats.allreduce_bytes, (double)n * sizeof *buf, &g_stats.allreduce_s);
    return rc;
}

int comm_allreduce_max_f64(Comm *c, double *buf, size_t n, MoetErr *err) {
    double t0 = enter_(c, "all-reduce (max)");
    int rc = c->t->allreduce_max_f64(c, buf, n, err);
    leave_(t0, &g_stats.allreduce_bytes, (double)n * sizeof *buf, &g_stats.allreduce_s);
    return rc;
}

// Bytes "sent" by an all-to-all count every block of the send buffer, the one a rank keeps
// for itself included, so the numbers do not depend on the group size.
int comm_alltoall_i64(Comm *c, const int64_t *send, int64_t *recv, int count, MoetErr *err) {
    double t0 = enter_(c, "all-to-all");
    int rc = c->t->alltoall_i64(c, send, recv, count, err);
    leave_(t0, &g_stats.alltoall_bytes, (double)count * c->size * sizeof *send,
           &g_stats.alltoall_s);
    return rc;
}

int comm_alltoallv(Comm *c, const void *send, const int64_t *send_counts, void *recv,
                   const int64_t *recv_counts, size_t elem_size, MoetErr *err) {
    double t0 = enter_(c, "all-to-all-v");
    int rc = c->t->alltoallv(c, send, send_counts, recv, recv_counts, elem_size, err);
    leave_(t0, &g_stats.alltoall_bytes, rows_(c, send_counts) * (double)elem_size,
           &g_stats.alltoall_s);
    return rc;
}

// Every rank counts the broadcast payload (the root sends it, the others take part).
int comm_bcast(Comm *c, void *buf, size_t bytes, int root, MoetErr *err) {
    double t0 = enter_(c, "broadcast");
    int rc = c->t->bcast(c, buf, bytes, root, err);
    leave_(t0, &g_stats.other_bytes, (double)bytes, &g_stats.other_s);
    return rc;
}

int comm_barrier(Comm *c, MoetErr *err) {
    double t0 = enter_(c, "barrier");
    int rc = c->t->barrier(c, err);
    leave_(t0, &g_stats.other_bytes, 0, &g_stats.other_s);
    return rc;
}

int comm_allgatherv_f32(Comm *c, float *buf, const size_t *counts, MoetErr *err) {
    double t0 = enter_(c, "all-gather");
    int rc = c->t->allgatherv_f32(c, buf, counts, err);
    leave_(t0, &g_stats.allgather_bytes, (double)counts[c->rank] * sizeof *buf,
           &g_stats.allgather_s);
    return rc;
}

// ---- backend memory ----

// Sets ops and the backend transport on one group (NCCL comes after, from comm_nccl_setup;
// a group that had NCCL from an earlier call gives it back first).
static void use_ops_(Comm *c, const Ops *ops) {
    if (c->nccl && c->bt && c->bt->release) c->bt->release(c);
    c->ops = ops;
    c->bt = ops && ops->on_device ? &staged_buf_transport : &host_buf_transport;
}

int comm_use_backend(Parallel *p, const Ops *ops, const char *transport, double timeout_s,
                     MoetErr *err) {
    watchdog_start_(timeout_s);
    use_ops_(p->world, ops);
    use_ops_(p->ep, ops);
    use_ops_(p->edp, ops);
    int nccl = strcmp(transport, "nccl") == 0;
    if (strcmp(transport, "auto") == 0) {
        // NCCL wants one GPU per rank; several ranks per GPU (tests) stay on MPI, and so does
        // a world of one rank (nothing to move)
        int gpus = ops && strcmp(ops->name, "cuda") == 0 ? ops_cuda_device_count() : 0;
        nccl = comm_nccl_available() && gpus > 0 && p->local_size <= gpus && p->world_size > 1;
    } else if (!nccl && strcmp(transport, "mpi") != 0) {
        return moet_errf(err, MOET_EUSAGE, "[parallel] comm = %s: must be auto, mpi or nccl",
                         transport);
    }
    if (nccl && !(ops && strcmp(ops->name, "cuda") == 0))
        return moet_errf(err, MOET_EUSAGE,
                         "[parallel] comm = nccl needs [train] device = cuda (this run's backend "
                         "is %s): use comm = mpi or auto", ops ? ops->name : "the host");
    return nccl ? comm_nccl_setup(p, timeout_s, err) : 0;
}

const char *comm_buf_transport(const Comm *c) {
    if (c->bt == &host_buf_transport) return c->t->name;
    return c->bt->name;
}

static int buf_allreduce_(Comm *c, float *buf, size_t n, int async, MoetErr *err) {
    double t0 = enter_(c, "all-reduce (sum)");
    int rc = c->bt->allreduce_sum_f32(c, buf, n, async, err);
    leave_(t0, &g_stats.allreduce_bytes, (double)n * sizeof *buf, &g_stats.allreduce_s);
    return rc;
}

int comm_buf_allreduce_sum_f32(Comm *c, float *buf, size_t n, MoetErr *err) {
    return buf_allreduce_(c, buf, n, 0, err);
}

int comm_buf_allreduce_start_f32(Comm *c, float *buf, size_t n, MoetErr *err) {
    return buf_allreduce_(c, buf, n, 1, err);
}

// The wait counts as all-to-all time after comm_buf_alltoallv_start, else as all-reduce time.
int comm_buf_wait(Comm *c, MoetErr *err) {
    double t0 = enter_(c, c->a2a_started ? "all-to-all-v (wait)" : "all-reduce (wait)");
    int rc = c->bt->wait(c, err);
    if (c->a2a_started) leave_(t0, &g_stats.alltoall_bytes, 0, &g_stats.alltoall_s);
    else leave_(t0, &g_stats.allreduce_bytes, 0, &g_stats.allreduce_s);
    c->a2a_started = 0;
    return rc;
}

int comm_buf_alltoallv_start(Comm *c, const void *send, const int64_t *send_counts, void *recv,
                             const int64_t *recv_counts, size_t elem_size, MoetErr *err) {
    double t0 = enter_(c, "all-to-all-v (start)");
    c->a2a_started = 1;
    int rc = c->bt->alltoallv_start(c, send, send_counts, recv, recv_counts, elem_size, err);
    leave_(t0, &g_stats.alltoall_bytes, rows_(c, send_counts) * (double)elem_size,
           &g_stats.alltoall_s);
    return rc;
}

int comm_buf_alltoallv(Comm *c, const void *send, const int64_t *send_counts, void *recv,
                       const int64_t *recv_counts, size_t elem_size, MoetErr *err) {
    double t0 = enter_(c, "all-to-all-v");
    int rc = c->bt->alltoallv(c, send, send_counts, recv, recv_counts, elem_size, err);
    leave_(t0, &g_stats.alltoall_bytes, rows_(c, send_counts) * (double)elem_size,
           &g_stats.alltoall_s);
    return rc;
}

// All-gather bytes: the part this rank contributes (what it sends), like an all-reduce's.
int comm_buf_allgatherv_f32(Comm *c, float *buf, const size_t *counts, MoetErr *err) {
    double t0 = enter_(c, "all-gather");
    int rc = c->bt->allgatherv_f32(c, buf, counts, err);
    leave_(t0, &g_stats.allgather_bytes, (double)counts[c->rank] * sizeof *buf,
           &g_stats.allgather_s);
    return rc;
}
