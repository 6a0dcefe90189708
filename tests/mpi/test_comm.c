// test_comm: the groups and collectives of train/comm (ARCHITECTURE §4), run under mpirun with 2
// and 4 ranks by ctest (and as a plain one-rank program). Every rank runs every test; only rank
// 0 prints CUnit's report, and the process fails when any rank failed.
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/ops.h"
#include "tests/testutil.h"
#include "train/comm.h"

static Parallel g_p;

// The world rank of member j of this rank's EP group / expert-DP group (§4).
static int ep_member(int j) {
    return g_p.rank / g_p.ep_size * g_p.ep_size + j;
}
static int edp_member(int j) {
    return j * g_p.ep_size + g_p.rank % g_p.ep_size;
}

// The ep values to try on this world: 1, 2 (if it divides), world.
static int ep_choices(int *eps) {
    int n = 0, W = g_p.world_size;
    eps[n++] = 1;
    if (W % 2 == 0 && W != 2) eps[n++] = 2;
    if (W != 1) eps[n++] = W;
    return n;
}

static void set_ep(int ep) {
    MoetErr err;
    int rc = comm_set_ep(&g_p, ep, &err);
    CU_ASSERT_EQUAL_FATAL(rc, 0);
}

static void test_groups(void) {
    int eps[3], n = ep_choices(eps), W = g_p.world_size, r = g_p.rank;
    CU_ASSERT_EQUAL(comm_rank(g_p.world), r);
    CU_ASSERT_EQUAL(comm_size(g_p.world), W);
    CU_ASSERT(g_p.local_rank >= 0 && g_p.local_rank < W);
    for (int i = 0; i < n; i++) {
        int ep = eps[i];
        set_ep(ep);
        CU_ASSERT_EQUAL(g_p.ep_size, ep);
        CU_ASSERT_EQUAL(g_p.ep_rank, r % ep);
        CU_ASSERT_EQUAL(comm_size(g_p.ep), ep);
        CU_ASSERT_EQUAL(comm_rank(g_p.ep), r % ep);
        CU_ASSERT_EQUAL(comm_size(g_p.edp), W / ep);
        CU_ASSERT_EQUAL(comm_rank(g_p.edp), r / ep);
        // Who is in each group: every member sends its world rank to every other.
        MoetErr err;
        int64_t send[64], recv[64];
        for (int j = 0; j < W; j++) send[j] = r;
        CU_ASSERT_EQUAL(comm_alltoall_i64(g_p.ep, send, recv, 1, &err), 0);
        for (int j = 0; j < ep; j++) CU_ASSERT_EQUAL(recv[j], r / ep * ep + j);
        CU_ASSERT_EQUAL(comm_alltoall_i64(g_p.edp, send, recv, 1, &err), 0);
        for (int j = 0; j < W / ep; j++) CU_ASSERT_EQUAL(recv[j], j * ep + r % ep);
    }
    set_ep(1);
}

static void test_bad_ep(void) {
    int W = g_p.world_size;
    MoetErr err = {{0}};
    char want[256];
    CU_ASSERT_EQUAL(comm_set_ep(&g_p, W + 1, &err), MOET_EUSAGE);
    snprintf(want, sizeof want, "[parallel] ep = %d does not divide the world of %d ranks", W + 1,
             W);
    CU_ASSERT_STRING_EQUAL(err.msg, want);
    CU_ASSERT_EQUAL(comm_set_ep(&g_p, 0, &err), MOET_EUSAGE);
    CU_ASSERT_PTR_NOT_NULL(strstr(err.msg, "ep = 0"));
    // A refused ep leaves the groups as they were.
    CU_ASSERT_EQUAL(g_p.ep_size, 1);
    CU_ASSERT_EQUAL(comm_size(g_p.ep), 1);
    CU_ASSERT_EQUAL(comm_size(g_p.edp), W);
}

// Rank q's value at i: big values that cancel, so that the order of the sum shows in the bits
// (in f32, (1e8 + 1) - 1e8 = 0 but (1e8 - 1e8) + 1 = 1).
static float value_f32(int q, size_t i) {
    static const float base[] = {1e8f, -1e8f, 1.0f, 3.0e-3f, 7.5e7f, -2.5f};
    return base[(q + i) % 6] * (1.0f + (float)(i % 7) * 0.125f) + (float)q * 1e-4f;
}

static double value_f64(int q, size_t i) {
    static const double base[] = {1e17, -1e17, 1.0, 3.0e-3, 7.5e16, -2.5};
    return base[(q + i) % 6] * (1.0 + (double)(i % 7) * 0.125) + q * 1e-7;
}

// Sums a group's values for element i in the group's rank order, as comm promises.
static float want_f32(int (*member)(int), int size, size_t i) {
    float acc = value_f32(member(0), i);
    for (int j = 1; j < size; j++) acc += value_f32(member(j), i);
    return acc;
}

static double want_f64(int (*member)(int), int size, size_t i) {
    double acc = value_f64(member(0), i);
    for (int j = 1; j < size; j++) acc += value_f64(member(j), i);
    return acc;
}

static void check_sum_f32(Comm *c, int (*member)(int), size_t n) {
    MoetErr err;
    float *x = malloc((n + 1) * sizeof *x), *want = malloc((n + 1) * sizeof *want);
    for (size_t i = 0; i < n; i++) x[i] = value_f32(g_p.rank, i);
    for (size_t i = 0; i < n; i++) want[i] = want_f32(member, comm_size(c), i);
    int rc = comm_allreduce_sum_f32(c, x, n, &err);
    CU_ASSERT_EQUAL(rc, 0);
    if (rc) fprintf(stderr, "rank %d: %s\n", g_p.rank, err.msg);
    size_t bad = 0;
    for (size_t i = 0; i < n; i++) bad += memcmp(&x[i], &want[i], sizeof *x) != 0;
    if (bad)
        fprintf(stderr, "rank %d: f32 sum of %zu over %d ranks: %zu elements differ\n", g_p.rank, n,
                comm_size(c), bad);
    CU_ASSERT_EQUAL(bad, 0);
    // Identical bits on every rank: compare with the group's rank 0.
    if (n > 0) {
        memcpy(want, x, n * sizeof *x);
        CU_ASSERT_EQUAL(comm_bcast(c, want, n * sizeof *x, 0, &err), 0);
        CU_ASSERT_EQUAL(memcmp(want, x, n * sizeof *x), 0);
    }
    free(x);
    free(want);
}

static int world_member(int j) {
    return j;
}

static void test_allreduce_f32_groups(void) {
    int eps[3], n_ep = ep_choices(eps);
    const size_t sizes[] = {0, 1, 3, 5, 64, 1001, 100003};
    for (int e = 0; e < n_ep; e++) {
        set_ep(eps[e]);
        for (size_t s = 0; s < sizeof sizes / sizeof *sizes; s++) {
            check_sum_f32(g_p.world, world_member, sizes[s]);
            check_sum_f32(g_p.ep, ep_member, sizes[s]);
            check_sum_f32(g_p.edp, edp_member, sizes[s]);
        }
    }
    set_ep(1);
}

// The test data must be able to tell the orders apart: with 3 or more ranks, some element's
// sum in reverse rank order differs from the rank-order sum.
static void test_order_matters(void) {
    int W = g_p.world_size;
    if (W < 3) return;
    int differ = 0;
    for (size_t i = 0; i < 64; i++) {
        float fwd = want_f32(world_member, W, i), rev = value_f32(W - 1, i);
        for (int q = W - 2; q >= 0; q--) rev += value_f32(q, i);
        differ += memcmp(&fwd, &rev, sizeof fwd) != 0;
    }
    CU_ASSERT(differ > 0);
}

static void test_allreduce_f64(void) {
    MoetErr err;
    size_t n = 777;
    double *x = malloc(n * sizeof *x);
    for (size_t i = 0; i < n; i++) x[i] = value_f64(g_p.rank, i);
    CU_ASSERT_EQUAL_FATAL(comm_allreduce_sum_f64(g_p.world, x, n, &err), 0);
    size_t bad = 0;
    for (size_t i = 0; i < n; i++) {
        double w = want_f64(world_member, g_p.world_size, i);
        bad += memcmp(&x[i], &w, sizeof w) != 0;
    }
    CU_ASSERT_EQUAL(bad, 0);
    free(x);
}

static void test_allreduce_max(void) {
    MoetErr err;
    int W = g_p.world_size, r = g_p.rank;
    double x[5] = {r, -r, (r == W - 1) ? INFINITY : 0.0, r == 0 ? 1e300 : -1e300, -0.5 * r};
    CU_ASSERT_EQUAL_FATAL(comm_allreduce_max_f64(g_p.world, x, 5, &err), 0);
    CU_ASSERT_EQUAL(x[0], W - 1);
    CU_ASSERT_EQUAL(x[1], 0.0);
    CU_ASSERT(isinf(x[2]) && x[2] > 0);
    CU_ASSERT_EQUAL(x[3], 1e300);
    CU_ASSERT_EQUAL(x[4], 0.0);
}

static void test_alltoall_i64(void) {
    MoetErr err;
    int P = g_p.world_size, r = g_p.rank, count = 3;
    int64_t *send = calloc((size_t)P * count, sizeof *send);
    int64_t *recv = malloc((size_t)P * count * sizeof *recv);
    for (int j = 0; j < P; j++)
        for (int k = 0; k < count; k++) send[j * count + k] = r * 1000 + j * 10 + k;
    CU_ASSERT_EQUAL_FATAL(comm_alltoall_i64(g_p.world, send, recv, count, &err), 0);
    for (int j = 0; j < P; j++)
        for (int k = 0; k < count; k++) CU_ASSERT_EQUAL(recv[j * count + k], j * 1000 + r * 10 + k);
    free(send);
    free(recv);
}

// Rows that group rank s sends to group rank d: uneven, 0 for some pairs, nothing at all from
// rank 1 and nothing at all to rank 2.
static int64_t rows_(int s, int d) {
    if (s == 1 || d == 2) return 0;
    return (s + 2 * d) % 3 + (s == d) * 2;
}

static float cell_(int s, int d, int64_t k, int col) {
    return (float)(s * 10000 + d * 100 + k) + 0.25f * (float)col;
}

// All-to-all-v of rows of 3 floats in group c; counts travel by comm_alltoall_i64 as in the MoE.
static void check_alltoallv(Comm *c) {
    MoetErr err;
    int P = comm_size(c), r = comm_rank(c);
    int64_t *sc = malloc((size_t)P * sizeof *sc), *rc = malloc((size_t)P * sizeof *rc);
    int64_t ns = 0, nr = 0;
    for (int d = 0; d < P; d++) ns += sc[d] = rows_(r, d);
    CU_ASSERT_EQUAL_FATAL(comm_alltoall_i64(c, sc, rc, 1, &err), 0);
    for (int s = 0; s < P; s++) {
        CU_ASSERT_EQUAL(rc[s], rows_(s, r));
        nr += rc[s];
    }
    float *send = calloc(((size_t)ns + 1) * 3, sizeof *send);
    float *recv = malloc(((size_t)nr + 1) * 3 * sizeof *recv);
    for (int d = 0, row = 0; d < P; d++)
        for (int64_t k = 0; k < sc[d]; k++, row++)
            for (int col = 0; col < 3; col++) send[row * 3 + col] = cell_(r, d, k, col);
    for (int64_t i = 0; i < (nr + 1) * 3; i++) recv[i] = -1.0f; // the sentinel row at the end
    CU_ASSERT_EQUAL_FATAL(comm_alltoallv(c, send, sc, recv, rc, 3 * sizeof(float), &err), 0);
    size_t bad = 0;
    for (int s = 0, row = 0; s < P; s++)
        for (int64_t k = 0; k < rc[s]; k++, row++)
            for (int col = 0; col < 3; col++) bad += recv[row * 3 + col] != cell_(s, r, k, col);
    for (int col = 0; col < 3; col++) bad += recv[nr * 3 + col] != -1.0f;
    CU_ASSERT_EQUAL(bad, 0);
    free(send);
    free(recv);
    free(sc);
    free(rc);
}

static void test_alltoallv(void) {
    int eps[3], n_ep = ep_choices(eps);
    check_alltoallv(g_p.world);
    for (int e = 0; e < n_ep; e++) {
        set_ep(eps[e]);
        check_alltoallv(g_p.ep);
    }
    set_ep(1);
}

static void test_bcast_barrier(void) {
    MoetErr err;
    int P = g_p.world_size, root = P - 1;
    unsigned char buf[1000];
    for (int i = 0; i < 1000; i++) buf[i] = (unsigned char)(g_p.rank == root ? i * 7 : 0);
    CU_ASSERT_EQUAL_FATAL(comm_bcast(g_p.world, buf, sizeof buf, root, &err), 0);
    int bad = 0;
    for (int i = 0; i < 1000; i++) bad += buf[i] != (unsigned char)(i * 7);
    CU_ASSERT_EQUAL(bad, 0);
    CU_ASSERT_EQUAL(comm_bcast(g_p.world, buf, 0, 0, &err), 0);
    CU_ASSERT_EQUAL(comm_barrier(g_p.world, &err), 0);
    CU_ASSERT_NOT_EQUAL(comm_bcast(g_p.world, buf, 1, P, &err), 0); // no rank P: refused
    CU_ASSERT_PTR_NOT_NULL(strstr(err.msg, "broadcast"));
}

static void test_stats(void) {
    MoetErr err;
    int P = g_p.world_size;
    float x[10] = {0};
    int64_t a[64] = {0}, b[64];
    char buf[100] = {0};
    comm_stats_reset();
    CommStats s;
    comm_stats(&s);
    CU_ASSERT_EQUAL(s.allreduce_bytes + s.alltoall_bytes + s.other_bytes, 0.0);
    CU_ASSERT_EQUAL(comm_allreduce_sum_f32(g_p.world, x, 10, &err), 0);
    CU_ASSERT_EQUAL(comm_alltoall_i64(g_p.world, a, b, 2, &err), 0);
    CU_ASSERT_EQUAL(comm_bcast(g_p.world, buf, sizeof buf, 0, &err), 0);
    CU_ASSERT_EQUAL(comm_barrier(g_p.world, &err), 0);
    comm_stats(&s);
    CU_ASSERT_EQUAL(s.allreduce_bytes, 40.0);
    CU_ASSERT_EQUAL(s.alltoall_bytes, 16.0 * P);
    CU_ASSERT_EQUAL(s.other_bytes, 100.0);
    CU_ASSERT(s.allreduce_s >= 0 && s.alltoall_s >= 0 && s.other_s >= 0);
    comm_stats_reset();
    comm_stats(&s);
    CU_ASSERT_EQUAL(s.allreduce_bytes + s.alltoall_bytes + s.other_bytes, 0.0);
}

// ---- backend memory: comm_buf_* on the host (cpu) and on device pointers (cpu-shadow: the
// CPU behind pointers the host must not touch, so the MPI transport has to stage them) ----

static float *dev_from_(const Ops *k, const float *h, size_t n) {
    float *d = k->alloc((n ? n : 1) * sizeof(float));
    if (n) k->to_device(d, h, n * sizeof(float));
    return d;
}

// The sums, all-to-all-v and all-gather of group c through the backend k, against the host
// collectives on the same data (sums: bit for bit).
static void check_buf_(const Ops *k, Comm *c) {
    MoetErr err;
    int P = comm_size(c), r = comm_rank(c);
    // all-reduce, blocking and started + waited, vs the host all-reduce
    size_t n = 1001;
    float *h = malloc(n * sizeof *h), *want = malloc(n * sizeof *want);
    float *got = malloc(n * sizeof *got);
    for (size_t i = 0; i < n; i++) h[i] = want[i] = 0.1f * (float)(r + 1) + 1e-4f * (float)i;
    CU_ASSERT_EQUAL_FATAL(comm_allreduce_sum_f32(c, want, n, &err), 0);
    float *d = dev_from_(k, h, n);
    CU_ASSERT_EQUAL_FATAL(comm_buf_allreduce_sum_f32(c, d, n, &err), 0);
    k->to_host(got, d, n * sizeof(float));
    CU_ASSERT_EQUAL(memcmp(got, want, n * sizeof(float)), 0);
    k->to_device(d, h, n * sizeof(float));
    CU_ASSERT_EQUAL_FATAL(comm_buf_allreduce_start_f32(c, d, 500, &err), 0);
    CU_ASSERT_EQUAL_FATAL(comm_buf_allreduce_start_f32(c, d + 500, n - 500, &err), 0);
    CU_ASSERT_EQUAL_FATAL(comm_buf_wait(c, &err), 0);
    k->to_host(got, d, n * sizeof(float));
    CU_ASSERT_EQUAL(memcmp(got, want, n * sizeof(float)), 0);
    k->free(d);
    // all-gather of uneven parts (rank 1's is empty)
    size_t *counts = malloc((size_t)P * sizeof *counts), total = 0, mine = 0;
    for (int j = 0; j < P; j++) {
        counts[j] = j == 1 ? 0 : (size_t)(3 + 2 * j);
        if (j == r) mine = total;
        total += counts[j];
    }
    float *g = calloc(total + 1, sizeof *g);
    for (size_t i = 0; i < counts[r]; i++) g[mine + i] = (float)(100 * r) + (float)i;
    d = dev_from_(k, g, total);
    CU_ASSERT_EQUAL_FATAL(comm_buf_allgatherv_f32(c, d, counts, &err), 0);
    k->to_host(g, d, total * sizeof(float));
    size_t bad = 0;
    for (int j = 0, o = 0; j < P; o += (int)counts[j], j++)
        for (size_t i = 0; i < counts[j]; i++) bad += g[o + i] != (float)(100 * j) + (float)i;
    CU_ASSERT_EQUAL(bad, 0);
    k->free(d);
    // all-to-all-v of uneven rows (rows_ / cell_ above)
    int64_t *sc = malloc((size_t)P * sizeof *sc), *rc = malloc((size_t)P * sizeof *rc);
    int64_t ns = 0, nr = 0;
    for (int j = 0; j < P; j++) ns += sc[j] = rows_(r, j), nr += rc[j] = rows_(j, r);
    float *send = calloc(((size_t)ns + 1) * 3, sizeof *send);
    float *recv = calloc(((size_t)nr + 1) * 3, sizeof *recv);
    for (int j = 0, row = 0; j < P; j++)
        for (int64_t q = 0; q < sc[j]; q++, row++)
            for (int col = 0; col < 3; col++) send[row * 3 + col] = cell_(r, j, q, col);
    float *ds = dev_from_(k, send, (size_t)ns * 3), *dr = dev_from_(k, recv, (size_t)nr * 3);
    // blocking, then started and waited for (the MoE backward's overlap): the same rows
    for (int started = 0; started < 2; started++) {
        if (nr) k->zero(dr, (size_t)nr * 3 * sizeof(float));
        if (started) {
            CU_ASSERT_EQUAL_FATAL(
                comm_buf_alltoallv_start(c, ds, sc, dr, rc, 3 * sizeof(float), &err), 0);
            CU_ASSERT_EQUAL_FATAL(comm_buf_wait(c, &err), 0);
        } else {
            CU_ASSERT_EQUAL_FATAL(comm_buf_alltoallv(c, ds, sc, dr, rc, 3 * sizeof(float), &err),
                                  0);
        }
        memset(recv, 0, ((size_t)nr + 1) * 3 * sizeof *recv);
        if (nr) k->to_host(recv, dr, (size_t)nr * 3 * sizeof(float));
        bad = 0;
        for (int j = 0, row = 0; j < P; j++)
            for (int64_t q = 0; q < rc[j]; q++, row++)
                for (int col = 0; col < 3; col++)
                    bad += recv[row * 3 + col] != cell_(j, r, q, col);
        CU_ASSERT_EQUAL(bad, 0);
    }
    k->free(ds);
    k->free(dr);
    free(send);
    free(recv);
    free(sc);
    free(rc);
    free(g);
    free(counts);
    free(h);
    free(want);
    free(got);
}

static void test_buf(void) {
    MoetErr err;
    const Ops *backends[2] = {ops_cpu(), ops_cpu_shadow()};
    int eps[3], n_ep = ep_choices(eps);
    for (int b = 0; b < 2; b++) {
        const Ops *k = backends[b];
        CU_ASSERT_EQUAL_FATAL(comm_use_backend(&g_p, k, b ? "auto" : "mpi", 0, &err), 0);
        // the host transport for host memory; device memory (cpu-shadow) staged over MPI
        const char *want = g_p.world_size == 1 ? "stub" : b ? "mpi-staged" : "mpi";
        CU_ASSERT_STRING_EQUAL(comm_buf_transport(g_p.world), want);
        check_buf_(k, g_p.world);
        for (int e = 0; e < n_ep; e++) {
            set_ep(eps[e]);
            check_buf_(k, g_p.ep);
            check_buf_(k, g_p.edp);
        }
        set_ep(1);
    }
    // NCCL needs the cuda backend: a clear refusal on the CPU
    CU_ASSERT_EQUAL(comm_use_backend(&g_p, ops_cpu(), "nccl", 0, &err), MOET_EUSAGE);
    CU_ASSERT_PTR_NOT_NULL(strstr(err.msg, "comm = nccl needs [train] device = cuda"));
    CU_ASSERT_EQUAL(comm_use_backend(&g_p, ops_cpu(), "mpi", 0, &err), 0);
}

int main(int argc, char **argv) {
    MoetErr err;
    if (comm_init(&argc, &argv, 1, &g_p, &err) != 0) {
        fprintf(stderr, "test_comm: %s\n", err.msg);
        comm_abort_msg(&g_p, 1, "comm_init failed");
    }
    // Only rank 0 prints the report; the others' failures show on stderr and in the exit code.
    if (g_p.rank != 0 && !freopen("/dev/null", "w", stdout)) return 1;
    static const TuTest tests[] = {
        {"groups", test_groups},
        {"bad_ep", test_bad_ep},
        {"allreduce_f32_groups", test_allreduce_f32_groups},
        {"order_matters", test_order_matters},
        {"allreduce_f64", test_allreduce_f64},
        {"allreduce_max", test_allreduce_max},
        {"alltoall_i64", test_alltoall_i64},
        {"alltoallv", test_alltoallv},
        {"bcast_barrier", test_bcast_barrier},
        {"stats", test_stats},
        {"buf", test_buf},
    };
    int failed = tu_run("comm", tests, (int)(sizeof tests / sizeof *tests));
    if (failed && g_p.rank != 0) fprintf(stderr, "rank %d: test_comm failed\n", g_p.rank);
    double any = failed;
    if (comm_allreduce_max_f64(g_p.world, &any, 1, &err) != 0) {
        fprintf(stderr, "rank %d: %s\n", g_p.rank, err.msg);
        comm_abort_msg(&g_p, 1, "could not combine the test results");
    }
    comm_finalize(&g_p);
    return any != 0.0;
}
