// comm: the ranks of a run and their collectives (ARCHITECTURE §4). A Comm is a group of ranks
// plus a transport (a table of collectives): MPI, or the one-rank stub used for groups of one
// rank and for builds without MPI. A NCCL transport is one more table.
#include "train/comm.h"

#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#if MOET_MPI
#include <mpi.h>
#endif

// The collectives of one transport. Every rank of a group calls the same ones in the same order.
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
} CommTransport;

struct Comm {
    const CommTransport *t;
    int rank, size;
#if MOET_MPI
    MPI_Comm mpi;  // MPI_COMM_NULL for the stub build's world
    void *scratch; // receive buffer of the deterministic all-reduce, grown on demand
    size_t scratch_bytes;
#endif
};

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

static const CommTransport stub_transport = {
    "stub",
    stub_allreduce_f32_,
    stub_allreduce_f64_,
    stub_allreduce_f64_,
    stub_alltoall_i64_,
    stub_alltoallv_,
    stub_bcast_,
    stub_barrier_,
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
// buffer may exceed 2^31 bytes as long as the row counts and offsets fit an int.
static int mpi_alltoallv_(Comm *c, const void *send, const int64_t *send_counts, void *recv,
                          const int64_t *recv_counts, size_t elem_size, MoetErr *err) {
    int P = c->size;
    if (elem_size == 0 || elem_size > INT_MAX)
        return moet_errf(err, MOET_EFAIL, "all-to-all-v: row size %zu bytes is not supported",
                         elem_size);
    int *sc = moet_malloc(4 * (size_t)P * sizeof(int));
    int *sd = sc + P, *rcn = sc + 2 * P, *rd = sc + 3 * P;
    int64_t so = 0, ro = 0;
    for (int j = 0; j < P; j++) {
        if (send_counts[j] < 0 || recv_counts[j] < 0 || so > INT_MAX || ro > INT_MAX ||
            send_counts[j] > INT_MAX - so || recv_counts[j] > INT_MAX - ro) {
            free(sc);
            return moet_errf(err, MOET_EFAIL,
                             "all-to-all-v: row counts (%lld to / %lld from rank %d) are "
                             "negative or their sums exceed 2^31-1 rows\n"
                             "---> HINT: use smaller micro-batches",
                             (long long)send_counts[j], (long long)recv_counts[j], j);
        }
        sc[j] = (int)send_counts[j];
        sd[j] = (int)so;
        rcn[j] = (int)recv_counts[j];
        rd[j] = (int)ro;
        so += send_counts[j];
        ro += recv_counts[j];
    }
    MPI_Datatype row;
    int rc = MPI_Type_contiguous((int)elem_size, MPI_BYTE, &row);
    if (rc == MPI_SUCCESS) rc = MPI_Type_commit(&row);
    if (rc == MPI_SUCCESS) {
        rc = MPI_Alltoallv(send, sc, sd, row, recv, rcn, rd, row, c->mpi);
        MPI_Type_free(&row);
    }
    free(sc);
    return rc == MPI_SUCCESS ? 0 : mpi_err_(rc, err, "all-to-all-v", c);
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

static const CommTransport mpi_transport = {
    "mpi",
    mpi_allreduce_f32_,
    mpi_allreduce_f64_,
    mpi_allreduce_max_f64_,
    mpi_alltoall_i64_,
    mpi_alltoallv_,
    mpi_bcast_,
    mpi_barrier_,
};

static int mpi_we_initialized = 0; // 1: comm_init started MPI, so comm_finalize ends it

// Wraps an MPI communicator (taking ownership). Groups of one rank use the stub transport.
static Comm *comm_wrap_(MPI_Comm m) {
    Comm *c = moet_calloc(sizeof *c);
    c->mpi = m;
    MPI_Comm_set_errhandler(m, MPI_ERRORS_RETURN);
    MPI_Comm_rank(m, &c->rank);
    MPI_Comm_size(m, &c->size);
    c->t = c->size == 1 ? &stub_transport : &mpi_transport;
    return c;
}
#endif // MOET_MPI

static void comm_free_(Comm *c) {
    if (!c) return;
#if MOET_MPI
    if (c->mpi != MPI_COMM_NULL) MPI_Comm_free(&c->mpi);
    free(c->scratch);
#endif
    free(c);
}

// ---- groups ----

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
    p->ep = comm_wrap_(ep_comm);
    p->edp = comm_wrap_(edp_comm);
#else
    p->ep = moet_calloc(sizeof(Comm));
    p->edp = moet_calloc(sizeof(Comm));
    *p->ep = *p->edp = (Comm){&stub_transport, 0, 1};
#endif
    p->ep_rank = p->rank % ep;
    p->ep_size = ep;
    return 0;
}

// The rank within the node: from the launcher's environment, else from the ranks sharing
// memory with this one (collective).
static int local_rank_(const Parallel *p) {
    int shm_rank = 0;
#if MOET_MPI
    MPI_Comm shm;
    if (MPI_Comm_split_type(p->world->mpi, MPI_COMM_TYPE_SHARED, p->rank, MPI_INFO_NULL, &shm) ==
        MPI_SUCCESS) {
        MPI_Comm_rank(shm, &shm_rank);
        MPI_Comm_free(&shm);
    }
#else
    (void)p;
#endif
    const char *vars[] = {"OMPI_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID"};
    for (int i = 0; i < 2; i++) {
        const char *s = getenv(vars[i]);
        if (s && *s) return atoi(s);
    }
    return shm_rank;
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
    p->world = comm_wrap_(world);
#else
    (void)argc, (void)argv;
    p->world = moet_calloc(sizeof(Comm));
    *p->world = (Comm){&stub_transport, 0, 1};
#endif
    p->rank = p->world->rank;
    p->world_size = p->world->size;
    p->local_rank = local_rank_(p);
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

// ---- the public collectives: dispatch to the transport and count ----

int comm_allreduce_sum_f32(Comm *c, float *buf, size_t n, MoetErr *err) {
    double t0 = moet_time();
    int rc = c->t->allreduce_sum_f32(c, buf, n, err);
    g_stats.allreduce_bytes += (double)n * sizeof *buf;
    g_stats.allreduce_s += moet_time() - t0;
    return rc;
}

int comm_allreduce_sum_f64(Comm *c, double *buf, size_t n, MoetErr *err) {
    double t0 = moet_time();
    int rc = c->t->allreduce_sum_f64(c, buf, n, err);
    g_stats.allreduce_bytes += (double)n * sizeof *buf;
    g_stats.allreduce_s += moet_time() - t0;
    return rc;
}

int comm_allreduce_max_f64(Comm *c, double *buf, size_t n, MoetErr *err) {
    double t0 = moet_time();
    int rc = c->t->allreduce_max_f64(c, buf, n, err);
    g_stats.allreduce_bytes += (double)n * sizeof *buf;
    g_stats.allreduce_s += moet_time() - t0;
    return rc;
}

// Bytes "sent" by an all-to-all count every block of the send buffer, the one a rank keeps
// for itself included, so the numbers do not depend on the group size.
int comm_alltoall_i64(Comm *c, const int64_t *send, int64_t *recv, int count, MoetErr *err) {
    double t0 = moet_time();
    int rc = c->t->alltoall_i64(c, send, recv, count, err);
    g_stats.alltoall_bytes += (double)count * c->size * sizeof *send;
    g_stats.alltoall_s += moet_time() - t0;
    return rc;
}

int comm_alltoallv(Comm *c, const void *send, const int64_t *send_counts, void *recv,
                   const int64_t *recv_counts, size_t elem_size, MoetErr *err) {
    double t0 = moet_time();
    int rc = c->t->alltoallv(c, send, send_counts, recv, recv_counts, elem_size, err);
    double rows = 0;
    for (int j = 0; j < c->size; j++) rows += (double)send_counts[j];
    g_stats.alltoall_bytes += rows * (double)elem_size;
    g_stats.alltoall_s += moet_time() - t0;
    return rc;
}

// Every rank counts the broadcast payload (the root sends it, the others take part).
int comm_bcast(Comm *c, void *buf, size_t bytes, int root, MoetErr *err) {
    double t0 = moet_time();
    int rc = c->t->bcast(c, buf, bytes, root, err);
    g_stats.other_bytes += (double)bytes;
    g_stats.other_s += moet_time() - t0;
    return rc;
}

int comm_barrier(Comm *c, MoetErr *err) {
    double t0 = moet_time();
    int rc = c->t->barrier(c, err);
    g_stats.other_s += moet_time() - t0;
    return rc;
}
