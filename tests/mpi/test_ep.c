// test_ep: expert parallelism (ARCHITECTURE §4) against the single-rank MoE layer.
//
// Every rank takes its OWN tokens (seeded by rank) and the same weights (model_init_weights
// gives identical weights for any expert layout). The reference is ep = 1: every rank runs the
// full model on its tokens. Then for ep = world size (and 2 when the world is 4) the model with
// local experts and the token dispatcher runs the same tokens, and
//   - loss, ce, lb, z must be BIT-EXACT: the router and plan are the same, each routed row meets
//     the same expert weights, and one row's GEMM result does not depend on the other rows of
//     the GEMM (OpenBLAS reduces each output element over C in a fixed order), so every token
//     gets identical expert outputs and sums; checked with ==;
//   - every non-expert gradient must be bit-exact for the same reason (the input gradients of
//     the routed rows are per-row products; everything else is the unchanged local code);
//   - each local expert gradient slice sums the contributions of the tokens of ALL ranks of
//     the EP group, so it is compared with the sum over the EP group of the ep = 1 expert
//     gradients (comm_allreduce_sum_f32), sliced. Only the summation order differs (one sgemm
//     over the rows of all sources vs per-rank sgemms added in rank order): fp32 rounding of
//     sums of at most ep*N*K = 4*48 terms, each rounding <= 6e-8 relative; we require
//     |diff| <= 2e-6 * max|g| of the tensor (observed: <= 2.8e-7 for np 2 and 4).
// One case forces rank 0 to route nothing to any peer in layer 0 (its router there is zero:
// uniform probabilities, ties go to the lowest experts, which rank 0 owns), so the collectives
// run with 0 rows for some peers. The dispatcher's layout itself is checked exactly with
// synthetic rows, including a rank that sends nothing at all.
//
// Runs under mpirun -np 2 and -np 4 (and as one rank). Only rank 0 prints; pass/fail is
// combined over the ranks so that every rank exits non-zero on any failure.
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/kernels.h"
#include "tests/testutil.h"
#include "train/comm.h"
#include "train/config.h"
#include "train/dispatch.h"
#include "train/model.h"

#define E_TEST 8
#define EXPERT_RTOL 2e-6

static Parallel g_par;

// 1 when ok on every rank of the world.
static int all_ok_(int ok) {
    double v = ok ? 0.0 : 1.0;
    MoetErr err;
    if (comm_allreduce_max_f64(g_par.world, &v, 1, &err)) {
        fprintf(stderr, "allreduce: %s\n", err.msg);
        return 0;
    }
    return v == 0.0;
}

// The ep degrees to test: the world size, and 2 when the world is 4.
static int ep_list_(int *eps) {
    int n = 0;
    eps[n++] = g_par.world_size;
    if (g_par.world_size == 4) eps[n++] = 2;
    return n;
}

static void tiny_config_(Config *c) {
    MoetErr err;
    config_defaults(c);
    const char *sets[] = {
        "model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.vocab_size=100",
        "model.max_seq_len=16", "model.d_ff=48", "model.init_std=0.2", "moe.n_experts=8",
        "moe.expert_d_ff=24", "moe.top_k=2", "moe.lb_coef=0.5", "moe.z_coef=0.1",
        "train.seq_len=12", "train.micro_batch=2", "train.global_batch=2", "train.max_steps=1",
        "data.eos_id=0",
    };
    for (size_t i = 0; i < sizeof sets / sizeof sets[0]; i++)
        if (config_set(c, sets[i], &err)) fprintf(stderr, "%s\n", err.msg);
    if (config_validate(c, "tiny", &err)) fprintf(stderr, "%s\n", err.msg);
}

typedef struct {
    double loss, ce, lb, z;
    float *grads;
    int64_t *expert_tokens;
} RunOut;

// Forward + backward of this rank's tokens with ep = ep_size (ep_comm NULL: local model).
// zero_router0: this rank's layer-0 router is zeroed (all tokens to experts 0..K-1).
static int run_(const Config *c, Comm *ep_comm, int ep_rank, int ep_size, const int32_t *tokens,
                int zero_router0, Model *m, RunOut *out) {
    MoetErr err;
    if (model_create(m, c, ep_rank, ep_size, &err) ||
        model_set_batch(m, c->micro_batch, c->seq_len, &err) ||
        model_set_comm(m, ep_comm, &err)) {
        fprintf(stderr, "rank %d: %s\n", g_par.rank, err.msg);
        return 1;
    }
    model_init_weights(m, 4242);
    if (zero_router0) zero_fill(m->p.layers[0].router, (size_t)m->E * m->D);
    model_zero_grad(m);
    model_forward_train(m, tokens);
    model_backward(m);
    out->loss = m->loss;
    out->ce = m->ce;
    out->lb = m->lb;
    out->z = m->z;
    out->grads = malloc(m->n_params * sizeof(float));
    memcpy(out->grads, m->grads, m->n_params * sizeof(float));
    out->expert_tokens = malloc((size_t)m->L * m->E * sizeof(int64_t));
    memcpy(out->expert_tokens, m->expert_tokens, (size_t)m->L * m->E * sizeof(int64_t));
    return 0;
}

static void check_against_ep1_(int zero_router0) {
    Config c;
    tiny_config_(&c);
    MoetErr err;
    int N = c.micro_batch * c.seq_len;
    int32_t *tokens = malloc(sizeof(int32_t) * N);
    uint64_t s = 1000 + 7919 * (uint64_t)g_par.rank;
    for (int i = 0; i < N; i++) tokens[i] = (int32_t)(tu_rand_u64(&s) % (uint64_t)c.vocab_size);
    int zr = zero_router0 && g_par.rank == 0;

    // the reference: ep 1, this rank's tokens
    Model ref;
    RunOut r1;
    int ok = run_(&c, NULL, 0, 1, tokens, zr, &ref, &r1) == 0;
    ok = all_ok_(ok);
    CU_ASSERT_FATAL(ok);
    if (g_par.rank == 0)
        printf("\n    ep 1 (rank 0): loss %.9g ce %.9g lb %.9g z %.9g\n", r1.loss, r1.ce, r1.lb,
               r1.z);

    int eps[2], n_eps = ep_list_(eps);
    for (int ie = 0; ie < n_eps; ie++) {
        int ep = eps[ie];
        ok = comm_set_ep(&g_par, ep, &err) == 0;
        if (!ok) fprintf(stderr, "rank %d: %s\n", g_par.rank, err.msg);
        CU_ASSERT_FATAL(all_ok_(ok));
        Model m;
        RunOut r;
        ok = run_(&c, g_par.ep, g_par.ep_rank, g_par.ep_size, tokens, zr, &m, &r) == 0;
        CU_ASSERT_FATAL(all_ok_(ok));

        // losses: bit-exact
        int loss_exact = r.loss == r1.loss && r.ce == r1.ce && r.lb == r1.lb && r.z == r1.z;
        if (!loss_exact)
            fprintf(stderr, "rank %d ep %d: loss %.17g/%.17g ce %.17g/%.17g lb %.17g/%.17g "
                    "z %.17g/%.17g\n", g_par.rank, ep, r.loss, r1.loss, r.ce, r1.ce, r.lb,
                    r1.lb, r.z, r1.z);
        // the same routing
        int same_route = memcmp(r.expert_tokens, r1.expert_tokens,
                                (size_t)m.L * m.E * sizeof(int64_t)) == 0;

        // the expert reference: the sum over the EP group of the ep = 1 gradients
        float *gsum = malloc(ref.n_params * sizeof(float));
        memcpy(gsum, r1.grads, ref.n_params * sizeof(float));
        ok = comm_allreduce_sum_f32(g_par.ep, gsum, ref.n_params, &err) == 0;
        CU_ASSERT_FATAL(all_ok_(ok));

        int nonexp_exact = 1, expert_ok = 1;
        double worst_rel = 0.0, nonexp_maxdiff = 0.0;
        for (int i = 0; i < m.n_tensors; i++) {
            const ParamTensor *t = &m.tensors[i], *t1 = &ref.tensors[i];
            const float *g = r.grads + t->offset;
            if (!t->is_expert) {
                const float *g1 = r1.grads + t1->offset;
                for (size_t j = 0; j < t->numel; j++)
                    nonexp_maxdiff = fmax(nonexp_maxdiff, fabs((double)g[j] - g1[j]));
                if (memcmp(g, g1, t->numel * sizeof(float)) != 0) {
                    nonexp_exact = 0;
                    fprintf(stderr, "rank %d ep %d: %s differs from ep 1\n", g_par.rank, ep,
                            t->name);
                }
                continue;
            }
            size_t per = t->numel / (size_t)t->shape[0];
            const float *g1 = gsum + t1->offset + (size_t)m.expert_lo * per;
            double mx = tu_max_abs(g1, t->numel), worst = 0.0;
            for (size_t j = 0; j < t->numel; j++) worst = fmax(worst, fabs((double)g[j] - g1[j]));
            double rel = mx > 0 ? worst / mx : worst;
            worst_rel = fmax(worst_rel, rel);
            if (rel > EXPERT_RTOL) {
                expert_ok = 0;
                fprintf(stderr, "rank %d ep %d: %s max|diff| %.3g, %.3g of max|g| %.3g\n",
                        g_par.rank, ep, t->name, worst, rel, mx);
            }
        }
        // rows this rank sent to each peer in each layer: count the (layer, peer) pairs with 0
        int El = m.n_local_experts, zero_pairs = 0;
        for (int l = 0; l < m.L; l++)
            for (int j = 0; j < g_par.ep_size; j++) {
                int64_t rows = 0;
                for (int e = j * El; e < (j + 1) * El; e++) rows += r.expert_tokens[l * m.E + e];
                zero_pairs += rows == 0 && j != g_par.ep_rank;
            }
        // forced: rank 0 sends nothing to any peer in layer 0
        int forced_ok = 1;
        if (zr && ep > 1)
            forced_ok = zero_pairs >= ep - 1;

        double stats[3] = {worst_rel, nonexp_maxdiff, (double)zero_pairs};
        double tot_zero = stats[2];
        comm_allreduce_max_f64(g_par.world, stats, 2, &err);
        comm_allreduce_sum_f64(g_par.world, &tot_zero, 1, &err);
        int all_loss = all_ok_(loss_exact), all_route = all_ok_(same_route);
        int all_nonexp = all_ok_(nonexp_exact), all_exp = all_ok_(expert_ok);
        int all_forced = all_ok_(forced_ok);
        if (g_par.rank == 0)
            printf("    ep %d (rank 0): loss %.9g ce %.9g lb %.9g z %.9g\n"
                   "      over %d ranks: losses bit-exact %s, routing identical %s, non-expert "
                   "grads bit-exact %s (max|diff| %.3g),\n      expert grads max rel diff %.3g "
                   "(tol %.0e), (layer, peer) pairs with 0 rows sent: %.0f\n",
                   ep, r.loss, r.ce, r.lb, r.z, g_par.world_size, all_loss ? "yes" : "NO",
                   all_route ? "yes" : "NO", all_nonexp ? "yes" : "NO", stats[1], stats[0],
                   EXPERT_RTOL, tot_zero);
        CU_ASSERT(all_loss);
        CU_ASSERT(all_route);
        CU_ASSERT(all_nonexp);
        CU_ASSERT(all_exp);
        CU_ASSERT(all_forced);
        free(gsum);
        free(r.grads);
        free(r.expert_tokens);
        model_free(&m);
    }
    free(r1.grads);
    free(r1.expert_tokens);
    model_free(&ref);
    free(tokens);
    comm_set_ep(&g_par, 1, &err);
}

static void test_ep_matches_ep1(void) { check_against_ep1_(0); }
static void test_ep_zero_rows_to_peers(void) { check_against_ep1_(1); }

// ---------------------------------------------------------------------------------------
// the dispatcher alone, with synthetic rows whose values name (source, expert, index, column)

// Rows rank `src` of an EP group of `ep` sends to expert e: some 0 (nothing to the next peer;
// the last rank sends nothing at all).
static int syn_count_(int src, int ep, int e, int El) {
    if (ep > 1 && src == ep - 1) return 0;
    if (ep > 1 && e / El == (src + 1) % ep) return 0;
    return (e * 3 + src * 5) % 4;
}

static float syn_val_(int src, int e, int i, int k) {
    return (float)(src * 10000 + e * 100 + i) + 0.125f * (float)k;
}

static void test_dispatch_layout(void) {
    enum { D = 3, F = 2 };
    MoetErr err;
    int eps[2], n_eps = ep_list_(eps);
    for (int ie = 0; ie < n_eps; ie++) {
        int ep = eps[ie];
        CU_ASSERT_FATAL(all_ok_(comm_set_ep(&g_par, ep, &err) == 0));
        int r = g_par.ep_rank, El = E_TEST / ep, lo = r * El;
        Dispatcher *d = NULL;
        CU_ASSERT_FATAL(
            all_ok_(dispatch_create(&d, g_par.ep, ops_cpu(), 2, E_TEST, D, F, 0, &err) == 0));
        int32_t counts[E_TEST];
        int R = 0;
        for (int e = 0; e < E_TEST; e++) R += counts[e] = syn_count_(r, ep, e, El);
        float *xp = malloc(sizeof(float) * (R * D + 1)), *yp = malloc(sizeof(float) * (R * D + 1));
        for (int e = 0, row = 0; e < E_TEST; e++)
            for (int i = 0; i < counts[e]; i++, row++)
                for (int k = 0; k < D; k++) xp[row * D + k] = syn_val_(r, e, i, k);
        int ok = 1;
        for (int l = 0; l < 2; l++) {  // two layers: the saved plans must stay apart
            DispatchRows rw;
            ok &= dispatch_forward(d, l, counts, xp, &rw, &err) == 0;
            // expected: local expert major, then source rank, then the source's order
            int64_t i = 0;
            for (int le = 0; le < El && ok; le++) {
                ok &= rw.offsets[le] == i;
                for (int src = 0; src < ep; src++)
                    for (int j = 0; j < syn_count_(src, ep, lo + le, El); j++, i++)
                        for (int k = 0; k < D; k++)
                            ok &= rw.x[i * D + k] == syn_val_(src, lo + le, j, k);
            }
            ok &= rw.rows == i && rw.offsets[El] == i;
            for (int64_t j = 0; j < rw.rows * D; j++) rw.y[j] = 2.0f * rw.x[j] + (float)l;
            ok &= dispatch_combine(d, l, yp, &err) == 0;
            for (int j = 0; j < R * D; j++) ok &= yp[j] == 2.0f * xp[j] + (float)l;
        }
        for (int l = 1; l >= 0; l--) {  // backward in reverse layer order
            for (int j = 0; j < R * D; j++) yp[j] = 3.0f * xp[j];
            DispatchRows rw;
            DispatchGrads dg;
            ok &= dispatch_backward(d, l, yp, &rw, &dg, &err) == 0;
            for (int64_t j = 0; j < rw.rows * D; j++) { // d_x: the caller writes every row
                ok &= dg.d_y[j] == 3.0f * rw.x[j];
                dg.d_x[j] = dg.d_y[j] - 1.0f;
            }
            ok &= dispatch_backward_return(d, l, yp, &err) == 0;
            for (int j = 0; j < R * D; j++) ok &= yp[j] == 3.0f * xp[j] - 1.0f;
        }
        if (!ok) fprintf(stderr, "rank %d ep %d: dispatch layout mismatch\n", g_par.rank, ep);
        int all = all_ok_(ok);
        if (g_par.rank == 0)
            printf("\n    ep %d: synthetic rows (rank %d sends none) dispatched, combined and "
                   "returned exactly: %s", ep, ep - 1, all ? "yes" : "NO");
        CU_ASSERT(all);
        dispatch_free(d);
        free(xp);
        free(yp);
    }
    if (g_par.rank == 0) printf("\n");
    comm_set_ep(&g_par, 1, &err);
}

int main(int argc, char **argv) {
    MoetErr err;
    if (comm_init(&argc, &argv, 1, &g_par, &err)) {
        fprintf(stderr, "comm_init: %s\n", err.msg);
        return 1;
    }
    // only rank 0 prints the CUnit report; failures on other ranks go to stderr
    if (g_par.rank != 0 && !freopen("/dev/null", "w", stdout)) return 1;
    if (g_par.rank == 0) printf("test_ep: %d rank(s)\n", g_par.world_size);
    const TuTest tests[] = {
        {"dispatcher layout, exact (0 rows to some peers)", test_dispatch_layout},
        {"ep > 1 matches ep 1 (losses, grads)", test_ep_matches_ep1},
        {"ep > 1 with 0 rows to every peer from rank 0 in layer 0", test_ep_zero_rows_to_peers},
    };
    int rc = tu_run("ep", tests, (int)(sizeof tests / sizeof tests[0]));
    int all = all_ok_(rc == 0);
    fflush(stdout);
    comm_finalize(&g_par);
    return all ? 0 : 1;
}
