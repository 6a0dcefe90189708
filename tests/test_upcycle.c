// test_upcycle: upcycle_model (train/upcycle.h) on the CPU backend. A dense model from
// configs/tiny-dense.ini (d_ff 256) upcycled into configs/tiny-moe.ini with norm_topk_prob =
// true, as 8 copies (G = 1, expert_d_ff 256) and as 4 copies of 2 slices (G = 2, expert_d_ff
// 128), must give the dense model's logits up to float rounding (ARCHITECTURE §9). Also: non-MLP
// tensors copied bit for bit, the slices and their scale, whole copies picked by top-k, the
// router's rows per copy and its N(0, S) statistics and determinism, a wrong scale or
// norm_topk_prob = false visibly changes the logits, and each error case names what is wrong.
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tests/testutil.h"
#include "train/config.h"
#include "train/model.h"
#include "train/upcycle.h"

#define B_          2
#define T_          32
#define DENSE_SEED_ 7
// Max |logit difference| / max |logit| allowed: the sums differ only in rounding (the experts'
// weighted combine and the down_proj x G), measured ~3e-7; 1e-5 leaves a wide margin and is
// still far below what a wrong upcycle gives (test_sensitivity: > 1e-2).
#define LOGIT_RTOL_ 1e-5

static void config_(Config *c, const char *path, const char **sets, int n) {
    MoetErr err;
    if (config_from_cli(c, path, n, (char *const *)sets, &err)) {
        fprintf(stderr, "%s\n", err.msg);
        CU_FAIL_FATAL("config");
    }
}

static void dense_config_(Config *c) {
    config_(c, "configs/tiny-dense.ini", NULL, 0);
}

// tiny-moe.ini with norm_topk_prob = true, expert_d_ff F and the extra sets.
static void moe_config_(Config *c, int F, const char *extra1, const char *extra2) {
    char f[48];
    snprintf(f, sizeof f, "moe.expert_d_ff=%d", F);
    const char *sets[4] = {"moe.norm_topk_prob=true", f, extra1, extra2};
    config_(c, "configs/tiny-moe.ini", sets, 2 + (extra1 != NULL) + (extra2 != NULL));
}

static void create_(Model *m, const Config *c, int ep_size) {
    MoetErr err;
    CU_ASSERT_EQUAL_FATAL(model_create(m, c, 0, ep_size, &err), 0);
    m->keep_logits = 1;  // the logits of every position are compared
    CU_ASSERT_EQUAL_FATAL(model_set_batch(m, B_, T_, &err), 0);
}

static void dense_model_(Model *m) {
    Config c;
    dense_config_(&c);
    create_(m, &c, 1);
    model_init_weights(m, DENSE_SEED_);
}

static UpcycleOpts opts_(int G, uint64_t seed) {
    return (UpcycleOpts){.granularity = G,
                         .router_std = 0.02f,
                         .seed = seed,
                         .dense_name = "dense",
                         .moe_name = "moe"};
}

// An upcycled MoE of granularity G (expert_d_ff 256 / G) from dense; extra: a --set or NULL.
static void upcycled_(Model *moe, const Model *dense, int G, uint64_t seed, const char *extra) {
    Config c;
    MoetErr err;
    moe_config_(&c, 256 / G, extra, NULL);
    create_(moe, &c, 1);
    UpcycleOpts o = opts_(G, seed);
    int rc = upcycle_model(dense, moe, &o, &err);
    if (rc) fprintf(stderr, "%s\n", err.msg);
    CU_ASSERT_EQUAL_FATAL(rc, 0);
}

static void tokens_(int32_t *tok, int vocab) {
    uint64_t s = 2025;
    for (int i = 0; i < B_ * T_; i++) tok[i] = (int32_t)(tu_rand_u64(&s) % (uint64_t)vocab);
}

// Forward both on the same tokens; returns max |moe - dense| / max |dense| over the logits
// and prints it with the absolute figures and both losses.
static double logit_diff_(Model *dense, Model *moe, const char *what) {
    int32_t tok[B_ * T_];
    tokens_(tok, dense->cfg.vocab_size);
    model_forward(dense, tok);
    model_forward(moe, tok);
    const size_t n = (size_t)B_ * T_ * dense->V;
    double max_abs = 0, max_ref = 0, max_rel_el = 0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)moe->logits[i] - dense->logits[i]), r = fabs(dense->logits[i]);
        max_abs = fmax(max_abs, d);
        max_ref = fmax(max_ref, r);
        if (r > 1e-2) max_rel_el = fmax(max_rel_el, d / r);
    }
    printf("\n    %s: logits (%d x %d): max |diff| %.3g, max |logit| %.3g, ratio %.3g, max "
           "elementwise rel diff (|logit| > 0.01) %.3g; ce dense %.9f moe %.9f\n",
           what, B_ * T_, dense->V, max_abs, max_ref, max_abs / max_ref, max_rel_el, dense->ce,
           moe->ce);
    return max_abs / max_ref;
}

// Non-MLP tensors: bit-identical copies.
static void check_copied_(const Model *dense, const Model *moe) {
    int n_copied = 0;
    for (int i = 0; i < moe->n_tensors; i++) {
        const ParamTensor *t = &moe->tensors[i];
        if (strstr(t->name, ".mlp.")) continue;
        const ParamTensor *d = model_find_tensor(dense, t->name);
        CU_ASSERT_FATAL(d != NULL && d->numel == t->numel);
        CU_ASSERT(memcmp(moe->params_h + t->offset, dense->params_h + d->offset,
                         t->numel * sizeof(float)) == 0);
        n_copied++;
    }
    CU_ASSERT_EQUAL(n_copied, 3 + 8 * moe->L);
}

static const float *tensor_(const Model *m, const char *fmt, int l) {
    char name[MODEL_NAME_MAX];
    snprintf(name, sizeof name, fmt, l);
    const ParamTensor *t = model_find_tensor(m, name);
    CU_ASSERT_FATAL(t != NULL);
    return m->params_h + t->offset;
}

// Expert e = j*G + s: gate/up rows [s*F, (s+1)*F), down columns of the slice times G; router
// rows equal within a copy, different across copies.
static void check_layout_(const Model *dense, const Model *moe, int G) {
    const int E = moe->E, F = moe->F, D = moe->D, Fd = dense->F;
    for (int l = 0; l < moe->L; l++) {
        const float *dg = tensor_(dense, "model.layers.%d.mlp.gate_proj.weight", l);
        const float *du = tensor_(dense, "model.layers.%d.mlp.up_proj.weight", l);
        const float *dd = tensor_(dense, "model.layers.%d.mlp.down_proj.weight", l);
        const float *eg = tensor_(moe, "model.layers.%d.mlp.experts.gate_proj.weight", l);
        const float *eu = tensor_(moe, "model.layers.%d.mlp.experts.up_proj.weight", l);
        const float *ed = tensor_(moe, "model.layers.%d.mlp.experts.down_proj.weight", l);
        const float *r = tensor_(moe, "model.layers.%d.mlp.gate.weight", l);
        int rows_ok = 1, down_ok = 1, router_ok = 1;
        for (int e = 0; e < E; e++) {
            const int s = e % G;
            const size_t blk = (size_t)F * D;
            rows_ok &= !memcmp(eg + e * blk, dg + s * blk, blk * 4);
            rows_ok &= !memcmp(eu + e * blk, du + s * blk, blk * 4);
            for (int d = 0; d < D; d++)
                for (int f = 0; f < F; f++)
                    down_ok &= ed[((size_t)e * D + d) * F + f] ==
                               (float)G * dd[(size_t)d * Fd + s * F + f];
            // same copy: the same row; the next copy: another
            const float *row = r + (size_t)e * D, *first = r + (size_t)(e - s) * D;
            router_ok &= !memcmp(row, first, D * 4);
            if (e + G < E) router_ok &= memcmp(row, r + (size_t)(e + G) * D, D * 4) != 0;
        }
        CU_ASSERT(rows_ok);
        CU_ASSERT(down_ok);
        CU_ASSERT(router_ok);
    }
}

// top-k picked whole copies: the K experts of a token are K/G copies, each with all G slices.
static void check_whole_copies_(const Model *moe, int G) {
    const int N = B_ * T_, K = moe->K;
    int bad = 0;
    for (int l = 0; l < moe->L; l++)
        for (int t = 0; t < N; t++) {
            const int32_t *idx = moe->acts[l].topk_idx + (size_t)t * K;
            int count[64] = {0};
            for (int k = 0; k < K; k++) count[idx[k] / G]++;
            for (int k = 0; k < K; k++) bad += count[idx[k] / G] != G;
        }
    printf("    G = %d: tokens whose top-%d is not whole copies: %d of %d\n", G, K, bad,
           moe->L * N);
    CU_ASSERT_EQUAL(bad, 0);
}

static void check_equal_logits_(int G) {
    Model dense, moe;
    dense_model_(&dense);
    upcycled_(&moe, &dense, G, 42, NULL);
    check_copied_(&dense, &moe);
    check_layout_(&dense, &moe, G);
    char what[64];
    snprintf(what, sizeof what, "G = %d (E 8, k 2, expert_d_ff %d)", G, moe.F);
    double rel = logit_diff_(&dense, &moe, what);
    CU_ASSERT(rel <= LOGIT_RTOL_);
    CU_ASSERT(fabs(dense.ce - moe.ce) <= 1e-5);
    check_whole_copies_(&moe, G);
    model_free(&moe);
    model_free(&dense);
}

static void test_g1(void) {
    check_equal_logits_(1);
}
static void test_g2(void) {
    check_equal_logits_(2);
}

// The comparison can see a wrong upcycle: down_proj without the factor G, and
// norm_topk_prob = false (the MLP output then scaled by the top-k mass), both move the logits
// far more than LOGIT_RTOL_.
static void test_sensitivity(void) {
    Model dense, moe;
    dense_model_(&dense);
    upcycled_(&moe, &dense, 2, 42, NULL);
    for (int l = 0; l < moe.L; l++) {
        char name[MODEL_NAME_MAX];
        snprintf(name, sizeof name, "model.layers.%d.mlp.experts.down_proj.weight", l);
        const ParamTensor *t = model_find_tensor(&moe, name);
        for (size_t i = 0; i < t->numel; i++) moe.params_h[t->offset + i] *= 0.5f;
    }
    model_upload_params(&moe);
    double rel = logit_diff_(&dense, &moe, "G = 2 without the x G on down_proj");
    CU_ASSERT(rel > 1000 * LOGIT_RTOL_);
    model_free(&moe);

    upcycled_(&moe, &dense, 1, 42, "moe.norm_topk_prob=false");
    rel = logit_diff_(&dense, &moe, "G = 1, norm_topk_prob = false");
    CU_ASSERT(rel > 1000 * LOGIT_RTOL_);
    model_free(&moe);
    model_free(&dense);
}

// The router: N(0, S) per element (mean ~0, std ~S over E/G x D x L draws), the same for the same
// seed, another for another seed; row j of G = 1 is row j*G of G = 2 (draws keyed by copy).
static void test_router(void) {
    Model dense, a, b, c, g2;
    dense_model_(&dense);
    upcycled_(&a, &dense, 1, 42, NULL);
    upcycled_(&b, &dense, 1, 42, NULL);
    upcycled_(&c, &dense, 1, 43, NULL);
    upcycled_(&g2, &dense, 2, 42, NULL);
    double sum = 0, sum2 = 0;
    long n = 0;
    int same_b = 1, same_c = 1, g2_ok = 1;
    const int E = a.E, D = a.D;
    for (int l = 0; l < a.L; l++) {
        const char *fmt = "model.layers.%d.mlp.gate.weight";
        const float *ra = tensor_(&a, fmt, l), *rb = tensor_(&b, fmt, l);
        const float *rc = tensor_(&c, fmt, l), *r2 = tensor_(&g2, fmt, l);
        same_b &= !memcmp(ra, rb, (size_t)E * D * 4);
        same_c &= !memcmp(ra, rc, (size_t)E * D * 4);
        for (int j = 0; j < E / 2; j++) g2_ok &= !memcmp(ra + j * D, r2 + 2 * j * D, D * 4);
        for (int i = 0; i < E * D; i++, n++) {
            sum += ra[i];
            sum2 += (double)ra[i] * ra[i];
        }
    }
    const double mean = sum / n, sd = sqrt(sum2 / n - mean * mean);
    printf("\n    router, seed 42, S = 0.02: %ld draws, mean %.5f, std %.5f\n", n, mean, sd);
    CU_ASSERT(fabs(mean) < 0.15 * 0.02);
    CU_ASSERT(fabs(sd - 0.02) < 0.1 * 0.02);
    CU_ASSERT(same_b);
    CU_ASSERT(!same_c);
    CU_ASSERT(g2_ok);
    model_free(&a);
    model_free(&b);
    model_free(&c);
    model_free(&g2);
    model_free(&dense);
}

static void expect_error_(const Config *dense, const Config *moe, int G, int code,
                          const char *want1, const char *want2) {
    MoetErr err = {{0}};
    UpcycleOpts o = opts_(G, 1);
    int rc = upcycle_check(dense, moe, &o, &err);
    printf("    G = %d: %s\n", G, err.msg);
    CU_ASSERT_EQUAL(rc, code);
    CU_ASSERT(strstr(err.msg, want1) != NULL);
    if (want2) CU_ASSERT(strstr(err.msg, want2) != NULL);
}

static void test_errors(void) {
    Config dc, mc;
    dense_config_(&dc);
    printf("\n");
    // d_ff = 256 is not G x expert_d_ff: the message says which granularity fits
    moe_config_(&mc, 128, NULL, NULL);
    expect_error_(&dc, &mc, 1, MOET_EUSAGE, "d_ff = 256",
                  "use granularity 2, or set moe.expert_d_ff=256");
    // top_k = 3 is no multiple of G = 2: top-k could split a copy
    moe_config_(&mc, 128, "moe.top_k=3", NULL);
    expect_error_(&dc, &mc, 2, MOET_EUSAGE, "top_k = 3", "multiple of granularity 2");
    moe_config_(&mc, 64, "moe.top_k=2", NULL);
    expect_error_(&dc, &mc, 4, MOET_EUSAGE, "top_k = 2", "multiple of granularity 4");
    // E = 6 experts are not copies of 4 slices
    moe_config_(&mc, 64, "moe.n_experts=6", "moe.top_k=4");
    expect_error_(&dc, &mc, 4, MOET_EUSAGE, "does not divide [moe] n_experts = 6", NULL);
    // another d_model: the first tensor that differs, both shapes and the key
    moe_config_(&mc, 256, "model.d_model=128", NULL);
    expect_error_(&dc, &mc, 1, MOET_EUSAGE,
                  "model.embed_tokens.weight is [50304, 64] in dense but the MoE config moe "
                  "wants [50304, 128]",
                  "[model] d_model is 64 in dense but 128 in moe");
    // more layers: a tensor the dense model lacks
    moe_config_(&mc, 256, "model.n_layers=3", NULL);
    expect_error_(&dc, &mc, 1, MOET_EUSAGE,
                  "model.layers.2.input_layernorm.weight exists in moe but not in dense",
                  "[model] n_layers is 2 in dense but 3 in moe");
    // an MoE parent, a dense target, a bad granularity or router std
    moe_config_(&mc, 256, NULL, NULL);
    expect_error_(&mc, &mc, 1, MOET_EUSAGE, "dense is an MoE model ([moe] n_experts = 8)", NULL);
    expect_error_(&dc, &dc, 1, MOET_EUSAGE, "moe is a dense config", NULL);
    expect_error_(&dc, &mc, 0, MOET_EUSAGE, "granularity 0", NULL);
    MoetErr err;
    UpcycleOpts o = opts_(1, 1);
    o.router_std = -1;
    CU_ASSERT_EQUAL(upcycle_check(&dc, &mc, &o, &err), MOET_EUSAGE);
    CU_ASSERT(strstr(err.msg, "router std -1") != NULL);

    // a model that holds only some experts (ep 2) cannot be filled here
    Model dense, half;
    dense_model_(&dense);
    create_(&half, &mc, 2);
    o = opts_(1, 1);
    CU_ASSERT_EQUAL(upcycle_model(&dense, &half, &o, &err), MOET_EFAIL);
    printf("    ep 2: %s\n", err.msg);
    CU_ASSERT(strstr(err.msg, "holds 4 of its 8 experts") != NULL);
    model_free(&half);
    model_free(&dense);
}

int main(void) {
    const TuTest tests[] = {
        {"G = 1: 8 copies give the dense model's logits", test_g1},
        {"G = 2: 4 copies x 2 slices give the dense model's logits", test_g2},
        {"a wrong scale or norm_topk_prob = false changes the logits", test_sensitivity},
        {"router: N(0, S), deterministic, keyed by copy", test_router},
        {"errors name the tensor or key", test_errors},
    };
    return tu_run("upcycle", tests, (int)(sizeof tests / sizeof tests[0]));
}
