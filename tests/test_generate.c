// test_generate: the KV-cached forward of generation (model_forward_cached) against the training
// forward (model_forward) on the same sequence. The logits of position t must be the same
// whether the sequence runs at once or as a prompt followed by one token at a time over the
// cache: the same ops in the same order, except that attention sums over the cached keys in
// other blocks, so the logits agree to fp32 rounding (atol 1e-5 + rtol 1e-4; the logits are
// O(1) here, and a wrong position, a stale cache row or a missing key moves them by O(0.1)).
// Dense and MoE (norm_topk off and on), on the CPU and on cpu-shadow (the GPU code path).
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/kernels.h"
#include "tests/testutil.h"
#include "train/config.h"
#include "train/model.h"

enum { T_ = 19, PROMPT_ = 6 };

static void tiny_config_(Config *c, int n_experts, int norm_topk) {
    MoetErr err;
    config_defaults(c);
    const char *sets[] = {
        "model.d_model=32",  "model.n_layers=3",   "model.n_heads=4",  "model.vocab_size=100",
        "model.max_seq_len=24", "model.d_ff=48",   "model.init_std=0.2", "moe.expert_d_ff=24",
        "moe.top_k=2",       "train.seq_len=19",   "train.micro_batch=1", "train.global_batch=1",
        "train.max_steps=1",
        "data.eos_id=0",
    };
    for (size_t i = 0; i < sizeof sets / sizeof sets[0]; i++)
        if (config_set(c, sets[i], &err)) fprintf(stderr, "%s\n", err.msg);
    char s[64];
    snprintf(s, sizeof s, "moe.n_experts=%d", n_experts);
    if (config_set(c, s, &err)) fprintf(stderr, "%s\n", err.msg);
    if (config_set(c, norm_topk ? "moe.norm_topk_prob=true" : "moe.norm_topk_prob=false", &err))
        fprintf(stderr, "%s\n", err.msg);
    if (config_validate(c, "tiny", &err)) fprintf(stderr, "%s\n", err.msg);
}

static void check_cached_(const Ops *ops, int n_experts, int norm_topk) {
    Config c;
    tiny_config_(&c, n_experts, norm_topk);
    MoetErr err;
    Model full, gen;
    CU_ASSERT_EQUAL_FATAL(model_create_ops(&full, &c, ops, 0, 1, &err), 0);
    CU_ASSERT_EQUAL_FATAL(model_create_ops(&gen, &c, ops, 0, 1, &err), 0);
    model_init_weights(&full, 4242);
    model_init_weights(&gen, 4242);
    int32_t tokens[T_];
    uint64_t rng = 99;
    for (int t = 0; t < T_; t++) tokens[t] = (int32_t)(tu_rand_u64(&rng) % 100);

    const int V = full.V;
    full.keep_logits = 1;  // every position's logits are compared
    CU_ASSERT_EQUAL_FATAL(model_set_batch(&full, 1, T_, &err), 0);
    model_forward(&full, tokens);
    float *want = malloc((size_t)T_ * V * sizeof(float)), *got = malloc((size_t)V * sizeof(float));
    ops->to_host(want, full.logits, (size_t)T_ * V * sizeof(float));

    // the arena holds the prompt; the cache the whole sequence
    KVCache kv;
    CU_ASSERT_EQUAL_FATAL(model_set_batch(&gen, 1, PROMPT_, &err), 0);
    CU_ASSERT_EQUAL_FATAL(model_kv_create(&gen, &kv, T_, &err), 0);
    char name[128];
    int all_ok = 1;
    for (int t = PROMPT_ - 1; t < T_; t++) {
        if (t == PROMPT_ - 1) model_forward_cached(&gen, &kv, tokens, PROMPT_);
        else model_forward_cached(&gen, &kv, &tokens[t], 1);
        CU_ASSERT_EQUAL(kv.len, t + 1);
        ops->to_host(got, gen.logits, (size_t)V * sizeof(float));
        snprintf(name, sizeof name, "%s E=%d norm_topk=%d: logits of position %d", ops->name,
                 n_experts, norm_topk, t);
        all_ok &= tu_allclose(name, got, want + (size_t)t * V, (size_t)V, 1e-5, 1e-4);
    }
    CU_ASSERT_TRUE(all_ok);
    // the cache is full: no room for another token
    CU_ASSERT_EQUAL(kv.len, kv.cap);
    model_kv_free(&gen, &kv);
    CU_ASSERT_NOT_EQUAL(model_kv_create(&gen, &kv, c.max_seq_len + 1, &err), 0);
    CU_ASSERT_PTR_NOT_NULL(strstr(err.msg, "max_seq_len"));
    free(want);
    free(got);
    model_free(&full);
    model_free(&gen);
}

static void test_dense(void) {
    check_cached_(ops_cpu(), 0, 0);
    check_cached_(ops_cpu_shadow(), 0, 0);
}

static void test_moe(void) {
    check_cached_(ops_cpu(), 8, 0);
    check_cached_(ops_cpu(), 8, 1);
    check_cached_(ops_cpu_shadow(), 8, 0);
}

// The two ops generation adds, on the CPU: rope_forward_at over rows pos0.. is rope_forward's
// rotation of those rows bit for bit; attention_forward_cached over a cache gives the last rows
// of the causal attention over the whole sequence.
static void test_ops(void) {
    const int T = 70, H = 3, Dh = 16, n = T * H * Dh, pos0 = 64, Tq = T - pos0;
    float *x = malloc(n * sizeof(float)), *rot = malloc(n * sizeof(float));
    float *rot_at = malloc(n * sizeof(float));
    tu_fill_uniform(x, (size_t)n, 7, 1.0f);
    rope_forward(rot, x, 1, T, H, Dh, 10000.0f);
    const size_t off = (size_t)pos0 * H * Dh, nq = (size_t)Tq * H * Dh;
    ops_cpu()->rope_forward_at(rot_at, x + off, Tq, H, Dh, 10000.0f, pos0);
    CU_ASSERT_TRUE(memcmp(rot_at, rot + off, nq * sizeof(float)) == 0);

    float *k = malloc(n * sizeof(float)), *v = malloc(n * sizeof(float));
    float *out = malloc(n * sizeof(float)), *lse = malloc((size_t)H * T * sizeof(float));
    tu_fill_uniform(k, (size_t)n, 8, 1.0f);
    tu_fill_uniform(v, (size_t)n, 9, 1.0f);
    attention_forward(out, lse, x, k, v, 1, T, H, Dh);
    float *got = malloc((size_t)n * sizeof(float));
    ops_cpu()->attention_forward_cached(got, x + off, k, v, Tq, T, H, Dh);
    CU_ASSERT_TRUE(tu_allclose("attention_forward_cached: the last rows", got, out + off, nq,
                               1e-6, 1e-5));
    ops_cpu()->attention_forward_cached(got, x, k, v, T, T, H, Dh);  // Tq = Tk: all of it
    CU_ASSERT_TRUE(tu_allclose("attention_forward_cached Tq = Tk", got, out, (size_t)n, 1e-6,
                               1e-5));
    free(x), free(rot), free(rot_at), free(k), free(v), free(out), free(lse), free(got);
}

int main(void) {
    static const TuTest tests[] = {
        {"ops: rope_forward_at, attention_forward_cached", test_ops},
        {"dense: cached logits = full forward", test_dense},
        {"moe: cached logits = full forward", test_moe},
    };
    return tu_run("generate", tests, (int)(sizeof tests / sizeof tests[0]));
}
