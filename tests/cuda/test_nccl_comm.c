// test_nccl_comm: comm's NCCL transport (train/comm_nccl.c, ARCHITECTURE §4) on the cuda
// backend: all-reduce (sync, and started + waited, ordered against the backend's ops),
// all-to-all-v with uneven and zero row counts, all-gather-v with uneven, zero and equal parts,
// on the world and on the EP and expert-DP groups of every ep the world allows, against results
// computed on the host from every rank's (deterministic) data. One GPU per rank: run alone or
// under mpirun; exits 77 (skipped) where this node has fewer GPUs than ranks.
// TEST_NCCL_STALL=1 (with the emulator's EMU_NCCL_STALL=1, tools/cuda-emu/run.sh): only starts
// an all-reduce that never finishes and waits for it, which must end the job with the
// transport's timeout message after TEST_NCCL_TIMEOUT_S (default 60) seconds.
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/ops.h"
#include "tests/testutil.h"
#include "train/comm.h"
#include "train/comm_impl.h" // comm_nccl_available, comm_nccl_setup

static Parallel g_p;
static const Ops *g_ops;

// Group c's member j as a world rank (§4).
static int member_(const Comm *c, int j) {
    if (c == g_p.world) return j;
    if (c == g_p.ep) return g_p.rank / g_p.ep_size * g_p.ep_size + j;
    return j * g_p.ep_size + g_p.rank % g_p.ep_size;
}

// World rank wr's input: n floats from a seed of its own (every rank can compute every rank's).
static float *input_(int wr, size_t n, uint64_t salt) {
    float *x = malloc((n ? n : 1) * sizeof *x);
    tu_fill_uniform(x, n, 1000 + 17 * (uint64_t)wr + salt, 1.0f);
    return x;
}

static float *dev_from_(const float *h, size_t n) {
    float *d = g_ops->alloc(n * sizeof *d);
    g_ops->to_device(d, h, n * sizeof *d);
    return d;
}

static float *host_from_(const float *d, size_t n) {
    float *h = malloc((n ? n : 1) * sizeof *h);
    g_ops->to_host(h, d, n * sizeof *h);
    return h;
}

// The group's sum in rank order ((x_0 + x_1) + x_2) + ..., as comm.c's MPI transport takes it.
static float *host_sum_(const Comm *c, size_t n, uint64_t salt) {
    float *s = input_(member_(c, 0), n, salt);
    for (int j = 1; j < comm_size(c); j++) {
        float *x = input_(member_(c, j), n, salt);
        for (size_t i = 0; i < n; i++) s[i] += x[i];
        free(x);
    }
    return s;
}

// NCCL's sum order is its own (ring / tree): exact for 1 or 2 ranks (a + b = b + a), a few ulp
// of the summands' magnitude beyond.
static int check_sum_(const char *name, const Comm *c, const float *got, const float *want,
                      size_t n) {
    double atol = comm_size(c) <= 2 ? 0.0 : 1e-6 * comm_size(c);
    return tu_allclose(name, got, want, n, atol, 0.0);
}

static const char *name_(const Comm *c) {
    return c == g_p.world ? "world" : c == g_p.ep ? "EP group" : "expert-DP group";
}

static void set_ep_(int ep) {
    MoetErr err;
    int rc = comm_set_ep(&g_p, ep, &err);
    if (rc) fprintf(stderr, "rank %d: %s\n", g_p.rank, err.msg);
    CU_ASSERT_EQUAL_FATAL(rc, 0);
    CU_ASSERT_STRING_EQUAL(comm_buf_transport(g_p.ep), "nccl");
    CU_ASSERT_STRING_EQUAL(comm_buf_transport(g_p.edp), "nccl");
}

// The ep values to try: 1, 2 (if it divides and differs from the world), the world.
static int ep_choices_(int *eps) {
    int n = 0, W = g_p.world_size;
    eps[n++] = 1;
    if (W % 2 == 0 && W != 2) eps[n++] = 2;
    if (W != 1) eps[n++] = W;
    return n;
}

static void each_group_(void (*fn)(Comm *c)) {
    int eps[3], n = ep_choices_(eps);
    for (int i = 0; i < n; i++) {
        set_ep_(eps[i]);
        Comm *groups[3] = {g_p.world, g_p.ep, g_p.edp};
        for (int k = 0; k < 3; k++) fn(groups[k]);
    }
    set_ep_(1);
}

// ---- all-reduce ----

static void allreduce_sync_(Comm *c) {
    const size_t n = 1001;
    MoetErr err;
    float *x = input_(g_p.rank, n, 1), *want = host_sum_(c, n, 1);
    float *d = dev_from_(x, n);
    int rc = comm_buf_allreduce_sum_f32(c, d, n, &err);
    if (rc) fprintf(stderr, "rank %d: %s\n", g_p.rank, err.msg);
    CU_ASSERT_EQUAL(rc, 0);
    float *got = host_from_(d, n);
    char what[96];
    snprintf(what, sizeof what, "sync all-reduce on the %s (ep %d)", name_(c), g_p.ep_size);
    CU_ASSERT(check_sum_(what, c, got, want, n));
    free(got), free(x), free(want);
    g_ops->free(d);
}

static void test_allreduce_sync(void) {
    each_group_(allreduce_sync_);
}

// Two buckets started on c, with backend ops around them that must stay in order: the inputs
// are halved by an op just before the start (the collective must see the halves), and doubled
// by an op just after the wait (it must see the sums). Scaling by powers of two is exact.
static void allreduce_async_(Comm *c) {
    const size_t n1 = 777, n2 = 64;
    MoetErr err;
    float *x1 = input_(g_p.rank, n1, 2), *x2 = input_(g_p.rank, n2, 3);
    float *w1 = host_sum_(c, n1, 2), *w2 = host_sum_(c, n2, 3);
    for (size_t i = 0; i < n1; i++) x1[i] *= 2.0f; // halved back on the device
    float *d1 = dev_from_(x1, n1), *d2 = dev_from_(x2, n2);
    g_ops->scale_inplace(d1, 0.5f, n1);
    CU_ASSERT_EQUAL(comm_buf_allreduce_start_f32(c, d1, n1, &err), 0);
    CU_ASSERT_EQUAL(comm_buf_allreduce_start_f32(c, d2, n2, &err), 0);
    int rc = comm_buf_wait(c, &err);
    if (rc) fprintf(stderr, "rank %d: %s\n", g_p.rank, err.msg);
    CU_ASSERT_EQUAL(rc, 0);
    g_ops->scale_inplace(d1, 2.0f, n1);
    for (size_t i = 0; i < n1; i++) w1[i] *= 2.0f;
    CU_ASSERT_EQUAL(comm_buf_wait(c, &err), 0); // nothing started: returns at once
    float *g1 = host_from_(d1, n1), *g2 = host_from_(d2, n2);
    char what[96];
    snprintf(what, sizeof what, "started all-reduce on the %s (ep %d)", name_(c), g_p.ep_size);
    CU_ASSERT(check_sum_(what, c, g1, w1, n1));
    CU_ASSERT(check_sum_(what, c, g2, w2, n2));
    free(g1), free(g2), free(x1), free(x2), free(w1), free(w2);
    g_ops->free(d1), g_ops->free(d2);
}

static void test_allreduce_async(void) {
    each_group_(allreduce_async_);
}

// ---- all-to-all-v ----

enum { ROW = 3 }; // floats per row (12-byte rows)

// Rows group member a sends to member b in round k: k = 0 uneven and none empty, k = 1 member 0
// sends nothing at all, k = 2 uneven with empty pairs.
static int64_t rows_(int a, int b, int k) {
    if (k == 0) return 1 + (2 * a + 3 * b) % 4;
    if (k == 1) return a == 0 ? 0 : 1 + (a + b) % 3;
    return (a + 2 * b) % 3 * (1 + a);
}

// Row r from world rank a to world rank b, column q.
static float row_val_(int a, int b, int64_t r, int q) {
    return (float)(a * 10000 + b * 1000 + r * 4 + q);
}

static void alltoallv_(Comm *c) {
    MoetErr err;
    int P = comm_size(c), me = comm_rank(c), wr = g_p.rank;
    for (int k = 0; k < 3; k++) {
        int64_t sc[64], rc_[64], ns = 0, nr = 0;
        for (int j = 0; j < P; j++) {
            sc[j] = rows_(me, j, k);
            rc_[j] = rows_(j, me, k);
            ns += sc[j];
            nr += rc_[j];
        }
        float *hs = malloc((size_t)(ns ? ns : 1) * ROW * sizeof *hs);
        float *want = malloc((size_t)(nr ? nr : 1) * ROW * sizeof *want);
        for (int j = 0, o = 0; j < P; j++)
            for (int64_t r = 0; r < sc[j]; r++, o++)
                for (int q = 0; q < ROW; q++) hs[o * ROW + q] = row_val_(wr, member_(c, j), r, q);
        for (int j = 0, o = 0; j < P; j++)
            for (int64_t r = 0; r < rc_[j]; r++, o++)
                for (int q = 0; q < ROW; q++) want[o * ROW + q] = row_val_(member_(c, j), wr, r, q);
        float *ds = dev_from_(hs, (size_t)ns * ROW);
        float *dr = g_ops->alloc((size_t)(nr ? nr : 1) * ROW * sizeof(float));
        int rc = comm_buf_alltoallv(c, ds, sc, dr, rc_, ROW * sizeof(float), &err);
        if (rc) fprintf(stderr, "rank %d: %s\n", wr, err.msg);
        CU_ASSERT_EQUAL(rc, 0);
        float *got = host_from_(dr, (size_t)nr * ROW);
        char what[96];
        snprintf(what, sizeof what, "all-to-all-v round %d on the %s (ep %d)", k, name_(c),
                 g_p.ep_size);
        CU_ASSERT(tu_allclose(what, got, want, (size_t)nr * ROW, 0.0, 0.0));
        free(got);
        // started, then waited for (the MoE backward's overlap): the same rows
        g_ops->zero(dr, (size_t)(nr ? nr : 1) * ROW * sizeof(float));
        rc = comm_buf_alltoallv_start(c, ds, sc, dr, rc_, ROW * sizeof(float), &err);
        if (!rc) rc = comm_buf_wait(c, &err);
        if (rc) fprintf(stderr, "rank %d: %s\n", wr, err.msg);
        CU_ASSERT_EQUAL(rc, 0);
        got = host_from_(dr, (size_t)nr * ROW);
        snprintf(what, sizeof what, "started all-to-all-v round %d on the %s (ep %d)", k, name_(c),
                 g_p.ep_size);
        CU_ASSERT(tu_allclose(what, got, want, (size_t)nr * ROW, 0.0, 0.0));
        free(got), free(hs), free(want);
        g_ops->free(ds), g_ops->free(dr);
    }
}

static void test_alltoallv(void) {
    each_group_(alltoallv_);
}

// ---- all-gather-v ----

static void allgatherv_(Comm *c) {
    MoetErr err;
    int P = comm_size(c), me = comm_rank(c);
    // k = 0: uneven, rank 1's part empty; k = 1: uneven, none empty; k = 2: equal parts (NCCL's
    // all-gather)
    for (int k = 0; k < 3; k++) {
        size_t counts[64], total = 0, mine = 0;
        for (int j = 0; j < P; j++) {
            counts[j] = k == 2 ? 6 : k == 0 && j == 1 ? 0 : 5 + 3 * (size_t)j;
            if (j == me) mine = total;
            total += counts[j];
        }
        float *h = malloc(total * sizeof *h), *want = malloc(total * sizeof *want);
        for (int j = 0, d = 0; j < P; j++) {
            float *x = input_(member_(c, j), counts[j], 4 + k);
            memcpy(want + d, x, counts[j] * sizeof *x);
            free(x);
            d += (int)counts[j];
        }
        for (size_t i = 0; i < total; i++) h[i] = -7.0f; // others' parts: overwritten
        memcpy(h + mine, want + mine, counts[me] * sizeof *h);
        float *d = dev_from_(h, total);
        int rc = comm_buf_allgatherv_f32(c, d, counts, &err);
        if (rc) fprintf(stderr, "rank %d: %s\n", g_p.rank, err.msg);
        CU_ASSERT_EQUAL(rc, 0);
        float *got = host_from_(d, total);
        char what[96];
        snprintf(what, sizeof what, "all-gather-v (%s parts) on the %s (ep %d)",
                 k == 2   ? "equal"
                 : k == 1 ? "uneven"
                          : "uneven, empty",
                 name_(c), g_p.ep_size);
        CU_ASSERT(tu_allclose(what, got, want, total, 0.0, 0.0));
        free(got), free(h), free(want);
        g_ops->free(d);
    }
}

static void test_allgatherv(void) {
    each_group_(allgatherv_);
}

// ---- several groups at once ----

// An expert-DP all-reduce started, a world all-reduce started, an EP all-to-all-v and an
// all-gather in between, then the waits in the other order: the order every rank issues.
static void test_interleaved(void) {
    MoetErr err;
    int eps[3], n = ep_choices_(eps);
    set_ep_(eps[n - 1]);
    const size_t ne = 300, nw = 500;
    float *xe = input_(g_p.rank, ne, 8), *xw = input_(g_p.rank, nw, 9);
    float *we = host_sum_(g_p.edp, ne, 8), *ww = host_sum_(g_p.world, nw, 9);
    float *de = dev_from_(xe, ne), *dw = dev_from_(xw, nw);
    CU_ASSERT_EQUAL(comm_buf_allreduce_start_f32(g_p.edp, de, ne, &err), 0);
    CU_ASSERT_EQUAL(comm_buf_allreduce_start_f32(g_p.world, dw, nw, &err), 0);
    allgatherv_(g_p.ep);
    alltoallv_(g_p.ep);
    CU_ASSERT_EQUAL(comm_buf_wait(g_p.world, &err), 0);
    CU_ASSERT_EQUAL(comm_buf_wait(g_p.edp, &err), 0);
    float *ge = host_from_(de, ne), *gw = host_from_(dw, nw);
    CU_ASSERT(check_sum_("interleaved expert-DP all-reduce", g_p.edp, ge, we, ne));
    CU_ASSERT(check_sum_("interleaved world all-reduce", g_p.world, gw, ww, nw));
    free(ge), free(gw), free(xe), free(xw), free(we), free(ww);
    g_ops->free(de), g_ops->free(dw);
    set_ep_(1);
}

static void test_transport(void) {
    CU_ASSERT_EQUAL(comm_nccl_available(), 1);
    CU_ASSERT_STRING_EQUAL(comm_buf_transport(g_p.world), "nccl");
    // a second set-up keeps the communicators (comm_set_ep relies on it)
    MoetErr err;
    CU_ASSERT_EQUAL(comm_nccl_setup(&g_p, 60, &err), 0);
    CU_ASSERT_STRING_EQUAL(comm_buf_transport(g_p.world), "nccl");
}

int main(int argc, char **argv) {
    MoetErr err;
    if (comm_init(&argc, &argv, 1, &g_p, &err) != 0) {
        fprintf(stderr, "test_nccl_comm: %s\n", err.msg);
        comm_abort_msg(&g_p, 1, "comm_init failed");
    }
    if (g_p.rank != 0 && !freopen("/dev/null", "w", stdout)) return 1;
    // one GPU per rank of this node, else every rank skips
    double skip = ops_cuda_device_count() < g_p.local_size;
    if (comm_allreduce_max_f64(g_p.world, &skip, 1, &err) != 0)
        comm_abort_msg(&g_p, 1, "could not agree on skipping");
    if (skip != 0.0) {
        printf("skipped: %d CUDA device(s) for %d rank(s) on this node\n", ops_cuda_device_count(),
               g_p.local_size);
        comm_finalize(&g_p);
        return TU_SKIP;
    }
    char info[512];
    if (ops_cuda_open(g_p.local_rank, 0, info, sizeof info) != 0) {
        fprintf(stderr, "rank %d: %s\n", g_p.rank, info);
        comm_abort_msg(&g_p, 1, "could not open the GPU");
    }
    printf("%s; %d rank(s)\n", info, g_p.world_size);
    g_ops = ops_cuda();
    const char *ts = getenv("TEST_NCCL_TIMEOUT_S");
    if (comm_use_backend(&g_p, g_ops, "nccl", ts && *ts ? atof(ts) : 60, &err) != 0) {
        fprintf(stderr, "rank %d: %s\n", g_p.rank, err.msg);
        comm_abort_msg(&g_p, 1, "could not set up NCCL");
    }
    const char *stall = getenv("TEST_NCCL_STALL");
    if (stall && atoi(stall)) {
        float *d = g_ops->alloc(16 * sizeof(float));
        if (comm_buf_allreduce_start_f32(g_p.world, d, 16, &err) == 0)
            comm_buf_wait(g_p.world, &err); // must not return
        fprintf(stderr, "rank %d: the hung all-reduce returned: %s\n", g_p.rank, err.msg);
        return 1;
    }
    static const TuTest tests[] = {
        {"transport", test_transport},
        {"allreduce_sync", test_allreduce_sync},
        {"allreduce_async", test_allreduce_async},
        {"alltoallv", test_alltoallv},
        {"allgatherv", test_allgatherv},
        {"interleaved", test_interleaved},
    };
    int failed = tu_run("nccl_comm", tests, (int)(sizeof tests / sizeof *tests));
    if (failed && g_p.rank != 0) fprintf(stderr, "rank %d: test_nccl_comm failed\n", g_p.rank);
    double any = failed;
    if (comm_allreduce_max_f64(g_p.world, &any, 1, &err) != 0)
        comm_abort_msg(&g_p, 1, "could not combine the test results");
    comm_finalize(&g_p);
    return any != 0.0;
}
