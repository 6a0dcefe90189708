// test_recompute: [train] recompute = full (activation recomputation) against recompute = none.
// Backward reruns each layer's forward from its saved input, so the results must be
// BIT-identical, not close: losses, every gradient, the expert token counts, the dlogits and the
// order of the gradient hook calls, for a tiny dense model and a tiny MoE (norm_topk_prob off
// and on), over two micro-batches in a row (the arena is reused, gradients accumulate). The
// arena must be smaller with full and exactly what model_activation_floats predicts.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tests/testutil.h"
#include "train/config.h"
#include "train/model.h"

static void tiny_config_(Config *c, int n_experts, int norm_topk, const char *recompute) {
    MoetErr err;
    config_defaults(c);
    // three layers: backward reruns the first two (the last one's are still in place)
    const char *sets[] = {
        "model.d_model=32",     "model.n_layers=3",     "model.n_heads=4",
        "model.vocab_size=100", "model.max_seq_len=16", "model.d_ff=48",
        "model.init_std=0.2",   "moe.expert_d_ff=24",   "moe.top_k=2",
        "moe.lb_coef=0.5",      "moe.z_coef=0.1",       "train.seq_len=12",
        "train.micro_batch=2",  "train.global_batch=2", "train.max_steps=1",
        "data.eos_id=0",
    };
    for (size_t i = 0; i < sizeof sets / sizeof sets[0]; i++)
        if (config_set(c, sets[i], &err)) fprintf(stderr, "%s\n", err.msg);
    char s[64];
    snprintf(s, sizeof s, "moe.n_experts=%d", n_experts);
    if (config_set(c, s, &err)) fprintf(stderr, "%s\n", err.msg);
    if (config_set(c, norm_topk ? "moe.norm_topk_prob=true" : "moe.norm_topk_prob=false", &err))
        fprintf(stderr, "%s\n", err.msg);
    snprintf(s, sizeof s, "train.recompute=%s", recompute);
    if (config_set(c, s, &err)) fprintf(stderr, "%s\n", err.msg);
    if (config_validate(c, "tiny", &err)) fprintf(stderr, "%s\n", err.msg);
}

// The gradient hook's calls, in order.
typedef struct {
    int parts[64];
    int n;
} HookLog;

static void hook_(void *ctx, int part) {
    HookLog *h = ctx;
    if (h->n < 64) h->parts[h->n++] = part;
}

static int same_(const void *a, const void *b, size_t bytes) {
    return memcmp(a, b, bytes) == 0;
}

static void check_equal_(int n_experts, int norm_topk) {
    const char *what = n_experts ? (norm_topk ? "moe, norm_topk" : "moe") : "dense";
    Config cn, cf;
    tiny_config_(&cn, n_experts, norm_topk, "none");
    tiny_config_(&cf, n_experts, norm_topk, "full");
    Model mn, mf;
    MoetErr err;
    CU_ASSERT_EQUAL_FATAL(model_create(&mn, &cn, 0, 1, &err), 0);
    CU_ASSERT_EQUAL_FATAL(model_create(&mf, &cf, 0, 1, &err), 0);
    CU_ASSERT_EQUAL_FATAL(model_set_batch(&mn, cn.micro_batch, cn.seq_len, &err), 0);
    CU_ASSERT_EQUAL_FATAL(model_set_batch(&mf, cf.micro_batch, cf.seq_len, &err), 0);
    CU_ASSERT(mn.recompute == 0 && mf.recompute == 1);

    // memory: full keeps one layer's working set instead of L; both as predicted
    size_t an = mn.arena_floats + mn.iarena_ints, af = mf.arena_floats + mf.iarena_ints;
    CU_ASSERT_EQUAL(an, model_activation_floats(&cn, cn.micro_batch, cn.seq_len, n_experts));
    CU_ASSERT_EQUAL(af, model_activation_floats(&cf, cf.micro_batch, cf.seq_len, n_experts));
    CU_ASSERT(af < an);
    printf("\n    %s: arena %zu floats (none), %zu (full)\n", what, an, af);

    model_init_weights(&mn, 31337);
    model_init_weights(&mf, 31337);
    HookLog hn = {0}, hf = {0};
    mn.grad_hook = mf.grad_hook = hook_;
    mn.grad_hook_ctx = &hn;
    mf.grad_hook_ctx = &hf;
    model_zero_grad(&mn);
    model_zero_grad(&mf);

    int N = mn.B * mn.T, L = mn.L, E = mn.E > 0 ? mn.E : 1;
    int32_t *tokens = malloc(sizeof(int32_t) * N);
    uint64_t s = 2024;
    for (int mb = 0; mb < 2; mb++) {
        for (int i = 0; i < N; i++)
            tokens[i] = (int32_t)(tu_rand_u64(&s) % (uint64_t)cn.vocab_size);
        model_forward_train(&mn, tokens);
        model_forward_train(&mf, tokens);
        int fwd_same = mn.loss == mf.loss && mn.ce == mf.ce && mn.lb == mf.lb && mn.z == mf.z &&
                       same_(mn.layer_lb, mf.layer_lb, L * sizeof(double)) &&
                       same_(mn.layer_z, mf.layer_z, L * sizeof(double)) &&
                       same_(mn.logits, mf.logits, (size_t)mn.head_rows * mn.V * sizeof(float));
        model_backward(&mn);
        model_backward(&mf);
        // backward must not have changed what forward reported
        int loss_same = mn.loss == mf.loss && mn.lb == mf.lb && mn.z == mf.z;
        int grads_same = same_(mn.grads, mf.grads, mn.n_params * sizeof(float));
        int dlogits_same =
            same_(mn.logits, mf.logits, (size_t)mn.head_rows * mn.V * sizeof(float));
        int tokens_same =
            same_(mn.expert_tokens, mf.expert_tokens, (size_t)L * E * sizeof(int64_t));
        int64_t routed = 0;
        for (int i = 0; i < L * E; i++) routed += mf.expert_tokens[i];
        printf("    micro-batch %d: loss %.9f (ce %.9f lb %.9f z %.9f): forward %s, grads %s, "
               "dlogits %s, expert_tokens %s\n",
               mb, mf.loss, mf.ce, mf.lb, mf.z, fwd_same ? "same" : "DIFFER",
               grads_same ? "same" : "DIFFER", dlogits_same ? "same" : "DIFFER",
               tokens_same ? "same" : "DIFFER");
        CU_ASSERT(fwd_same);
        CU_ASSERT(loss_same);
        CU_ASSERT(grads_same);
        CU_ASSERT(dlogits_same);
        CU_ASSERT(tokens_same);
        // every token counted once per layer: the rerun must not count again
        if (mn.E > 0) CU_ASSERT_EQUAL(routed, (int64_t)L * N * mn.K);
        if (!grads_same)
            for (int t = 0; t < mn.n_tensors; t++) {
                const ParamTensor *pt = &mn.tensors[t];
                if (!same_(mn.grads + pt->offset, mf.grads + pt->offset, pt->numel * 4))
                    printf("      differs: %s\n", pt->name);
            }
    }
    // hooks: L, L-1 .. 0, -1 per backward, identical in both
    CU_ASSERT_EQUAL(hn.n, 2 * (L + 2));
    CU_ASSERT_EQUAL(hf.n, hn.n);
    CU_ASSERT(same_(hn.parts, hf.parts, (size_t)hn.n * sizeof(int)));
    for (int i = 0; i < hn.n; i++) CU_ASSERT_EQUAL(hf.parts[i], L - i % (L + 2));

    // an eval-only forward (no backward) after training: the same loss
    model_forward(&mn, tokens);
    model_forward(&mf, tokens);
    CU_ASSERT(mn.loss == mf.loss);
    free(tokens);
    model_free(&mn);
    model_free(&mf);
}

static void test_dense(void) {
    check_equal_(0, 0);
}
static void test_moe(void) {
    check_equal_(4, 0);
}
static void test_moe_norm_topk(void) {
    check_equal_(4, 1);
}

// Changing m->recompute between model_set_batch calls re-lays out the arena.
static void test_switch(void) {
    Config c;
    tiny_config_(&c, 4, 0, "none");
    Model m;
    MoetErr err;
    CU_ASSERT_EQUAL_FATAL(model_create(&m, &c, 0, 1, &err), 0);
    CU_ASSERT_EQUAL_FATAL(model_set_batch(&m, c.micro_batch, c.seq_len, &err), 0);
    size_t none = m.arena_floats + m.iarena_ints;
    m.recompute = 1;
    CU_ASSERT_EQUAL_FATAL(model_set_batch(&m, c.micro_batch, c.seq_len, &err), 0);
    snprintf(c.recompute, sizeof c.recompute, "full");
    CU_ASSERT_EQUAL(m.arena_floats + m.iarena_ints,
                    model_activation_floats(&c, c.micro_batch, c.seq_len, c.n_experts));
    CU_ASSERT(m.arena_floats + m.iarena_ints < none);
    // every layer but its input shares the working set
    CU_ASSERT(m.acts[0].ln1 == m.acts[2].ln1 && m.acts[0].x != m.acts[2].x);
    model_free(&m);
}

// Expert parallelism (n_local_experts < E): no routed (R,F) expert activations in the arena,
// and model_activation_floats agrees (model_set_batch needs no EP group for this).
static void test_ep_layout(void) {
    for (int full = 0; full < 2; full++) {
        Config c;
        tiny_config_(&c, 4, 0, full ? "full" : "none");
        Model m1, m2;
        MoetErr err;
        CU_ASSERT_EQUAL_FATAL(model_create(&m1, &c, 0, 1, &err), 0);
        CU_ASSERT_EQUAL_FATAL(model_create(&m2, &c, 1, 2, &err), 0);
        CU_ASSERT_EQUAL_FATAL(model_set_batch(&m1, c.micro_batch, c.seq_len, &err), 0);
        CU_ASSERT_EQUAL_FATAL(model_set_batch(&m2, c.micro_batch, c.seq_len, &err), 0);
        size_t a1 = m1.arena_floats + m1.iarena_ints, a2 = m2.arena_floats + m2.iarena_ints;
        CU_ASSERT_EQUAL(a2, model_activation_floats(&c, c.micro_batch, c.seq_len, 2));
        // the (R,F) g, u, a: L layers (none) or one working set (full), plus d_g, d_u, d_a
        size_t rf = (size_t)c.micro_batch * c.seq_len * c.top_k * c.expert_d_ff;
        CU_ASSERT_EQUAL(a1 - a2, (full ? 3 : 3 * (size_t)c.n_layers) * rf + 3 * rf);
        CU_ASSERT(m2.acts[0].g == NULL && m2.d_g == NULL && m1.acts[0].g != NULL);
        model_free(&m1);
        model_free(&m2);
    }
}

int main(void) {
    const TuTest tests[] = {
        {"dense: recompute full is bit-identical to none", test_dense},
        {"MoE: recompute full is bit-identical to none", test_moe},
        {"MoE, norm_topk_prob: recompute full is bit-identical to none", test_moe_norm_topk},
        {"changing recompute re-lays out the arena", test_switch},
        {"expert parallel arena without routed expert activations", test_ep_layout},
    };
    return tu_run("recompute", tests, (int)(sizeof tests / sizeof tests[0]));
}
