// test_ops_profile: the op-level profiler of kernels/cpu/ops_profile.c (`moet bench --profile`):
// training through it gives the same bits; it times every op of the table and nothing outside
// the profiled steps; the calls and FLOPs it adds up are the model's; time spent between ops
// is counted there and not in an op.
#include <math.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "kernels/ops.h"
#include "tests/testutil.h"
#include "train/config.h"
#include "train/model.h"
#include "train/optim.h"

enum { L_ = 2, B_ = 4, T_ = 32, D_ = 64, H_ = 4, E_ = 8, K_ = 2, F_ = 48, STEPS_ = 4 };

static void tiny_(Config *c) {
    MoetErr err;
    config_defaults(c);
    const char *sets[] = {
        "model.d_model=64",     "model.n_layers=2",     "model.n_heads=4",
        "model.vocab_size=300", "model.max_seq_len=32", "moe.n_experts=8",
        "moe.expert_d_ff=48",   "moe.top_k=2",          "train.seq_len=32",
        "train.micro_batch=4",  "train.global_batch=4", "train.max_steps=20",
        "data.eos_id=0",
    };
    for (size_t i = 0; i < sizeof sets / sizeof sets[0]; i++)
        if (config_set(c, sets[i], &err)) fprintf(stderr, "%s\n", err.msg);
    if (config_validate(c, "tiny", &err)) fprintf(stderr, "%s\n", err.msg);
}

// Trains the tiny MoE for `steps` steps on ops (profiled steps from `profile_from` on, -1: none)
// and returns the losses.
static void train_(const Ops *ops, double *loss, int steps, int profile_from) {
    Config c;
    Model m;
    Optim o;
    MoetErr err;
    tiny_(&c);
    CU_ASSERT_EQUAL_FATAL(model_create_ops(&m, &c, ops, 0, 1, &err), 0);
    model_init_weights(&m, 3);
    CU_ASSERT_EQUAL_FATAL(model_set_batch(&m, B_, T_, &err), 0);
    optim_create(&o, &m);
    int32_t tok[B_ * T_];
    for (int i = 0; i < B_ * T_; i++) tok[i] = (i * 37 + i / 32) % 300;
    for (int s = 0; s < steps; s++) {
        if (profile_from >= 0 && s >= profile_from) ops_profile_step_begin();
        model_zero_grad(&m);
        model_forward_train(&m, tok);
        model_backward(&m);
        double g = optim_grad_norm(&m, NULL);
        optim_step(&o, &m, &c, 3e-3f, optim_clip_scale(g, 1.0f));
        ops->sync();
        ops_profile_step_end();
        loss[s] = m.loss;
    }
    optim_free(&o);
    model_free(&m);
}

static const OpsProfileRow *find_(const OpsProfileRow *r, int n, const char *op, int c, int oc) {
    for (int i = 0; i < n; i++)
        if (strcmp(r[i].op, op) == 0 && r[i].c == c && r[i].oc == oc) return &r[i];
    return NULL;
}

// ---------------------------------------------------------------------------------------

// Every function of the profiled table is the profiler's own, except the ones it passes through
// (memory management, sync, the parameter bookkeeping, the marks); an optional op the backend
// lacks stays NULL. A new op added to Ops without a wrapper fails here.
static void test_wraps_every_op(void) {
    typedef void (*Fn_)(void);
    static const size_t pass[] = {
        offsetof(Ops, alloc),
        offsetof(Ops, free),
        offsetof(Ops, sync),
        offsetof(Ops, mem_stats),
        offsetof(Ops, params_register),
        offsetof(Ops, params_written),
        offsetof(Ops, mark),
        offsetof(Ops, mark_ms),
    };
    const Ops *in = ops_cpu();
    const Ops *p = ops_profile(in);
    CU_ASSERT_PTR_NOT_EQUAL(p, in);
    CU_ASSERT_STRING_EQUAL(p->name, in->name);
    CU_ASSERT_EQUAL(p->on_device, in->on_device);
    int wrapped = 0, nulls = 0;
    for (size_t off = offsetof(Ops, alloc); off + sizeof(Fn_) <= sizeof(Ops); off += sizeof(Fn_)) {
        Fn_ a, b;
        memcpy(&a, (const char *)in + off, sizeof a);
        memcpy(&b, (const char *)p + off, sizeof b);
        int passed = 0;
        for (size_t i = 0; i < sizeof pass / sizeof pass[0]; i++) passed |= pass[i] == off;
        if (passed || !a) {
            if (a != b) printf("\n  field at offset %zu changed, expected passed through\n", off);
            CU_ASSERT(a == b);
            nulls += !a && !passed;
        } else {
            if (a == b) printf("\n  field at offset %zu is not wrapped\n", off);
            CU_ASSERT(a != b);
            wrapped++;
        }
    }
    printf("\n  %d ops wrapped, %d optional ops NULL as on the CPU table\n", wrapped, nulls);
    CU_ASSERT_EQUAL(wrapped, 36); // 37 timed ops, the forward pair op absent on the CPU
    CU_ASSERT_EQUAL(nulls, 1);
    CU_ASSERT(p->grouped_matmul_forward_pair == NULL); // the CPU table has no forward pair
}

// Training through the profiled table gives the same losses, bit for bit.
static void test_same_results(void) {
    double plain[STEPS_], prof[STEPS_];
    train_(ops_cpu(), plain, STEPS_, -1);
    train_(ops_profile(ops_cpu()), prof, STEPS_, 1);
    CU_ASSERT(memcmp(plain, prof, sizeof plain) == 0);
}

// The totals: the profiled steps only, the model's calls and FLOPs, ops + between = span.
static void test_accounting(void) {
    double loss[STEPS_];
    train_(ops_profile(ops_cpu()), loss, STEPS_, 1); // step 0 unprofiled (a warm-up)
    enum { MAXR = 128 };
    OpsProfileRow r[MAXR];
    int steps = 0;
    double span = 0, between = 0;
    const int n = ops_profile_rows(r, MAXR, &steps, &span, &between);
    const int S = STEPS_ - 1;
    CU_ASSERT_EQUAL(steps, S);
    CU_ASSERT(n > 10 && n <= MAXR);
    double inside = 0;
    for (int i = 0; i < n && i < MAXR; i++) {
        CU_ASSERT(r[i].calls > 0 && r[i].ms >= 0.0);
        if (i > 0) CU_ASSERT(r[i].ms <= r[i - 1].ms); // largest first
        inside += r[i].ms;
    }
    CU_ASSERT(between >= 0.0);
    CU_ASSERT(fabs(inside + between - span) <= 1e-9 * span);
    double before = 0;
    for (int i = 0; i < n && i < MAXR; i++) before += r[i].before_ms;
    CU_ASSERT(before >= 0.0 && before <= between + 1e-9 * span); // between also has the tail
    printf("\n  %d steps: %.2f ms per step, %.3f ms of it between ops, %d rows\n", steps,
           span / steps, between / steps, n);

    const OpsProfileRow *x = find_(r, n, "embedding_forward", 0, 0);
    CU_ASSERT(x && x->calls == S);
    // attention: one forward and one backward per layer and step, the full square's FLOPs
    const double sq = (double)B_ * T_ * T_ * H_ * (D_ / H_);
    x = find_(r, n, "attention_forward", 0, 0);
    CU_ASSERT(x && x->calls == (long)S * L_ && x->flops == 4.0 * sq * S * L_);
    x = find_(r, n, "attention_backward", 0, 0);
    CU_ASSERT(x && x->calls == (long)S * L_ && x->flops == 8.0 * sq * S * L_);
    // the experts (no forward pair op on the CPU): gate and up [D -> F], down [F -> D] on
    // R = N*K rows
    const double R = (double)B_ * T_ * K_;
    x = find_(r, n, "grouped_matmul_forward", D_, F_);
    CU_ASSERT(x && x->calls == 2L * S * L_ && x->flops == 2.0 * R * D_ * F_ * 2 * S * L_);
    x = find_(r, n, "grouped_matmul_forward", F_, D_);
    CU_ASSERT(x && x->calls == (long)S * L_ && x->flops == 2.0 * R * F_ * D_ * S * L_);
    // their backward computes dinp and dw: two GEMMs per call
    x = find_(r, n, "grouped_matmul_backward", F_, D_);
    CU_ASSERT(x && x->calls == (long)S * L_ && x->flops == 4.0 * R * F_ * D_ * S * L_);
    // gate and up's backward as one pair: four GEMMs
    x = find_(r, n, "grouped_matmul_backward_pair", D_, F_);
    CU_ASSERT(x && x->calls == (long)S * L_ && x->flops == 8.0 * R * D_ * F_ * S * L_);
    // the router [D -> E] and the LM head [D -> V] are dense matmuls
    CU_ASSERT(find_(r, n, "matmul_forward", D_, E_) != NULL);
    CU_ASSERT(find_(r, n, "crossentropy_forward_backward", 0, 0) != NULL);
    CU_ASSERT(find_(r, n, "adamw_update", 0, 0) != NULL);

    // a second profiled table starts from zero
    ops_profile(ops_cpu());
    CU_ASSERT_EQUAL(ops_profile_rows(r, MAXR, &steps, &span, &between), 0);
    CU_ASSERT(steps == 0 && span == 0.0);
}

// Host time between two ops is "between", not in either op; ops outside a step are not timed.
static void test_between(void) {
    const Ops *p = ops_profile(ops_cpu());
    float *x = p->alloc(1000 * sizeof(float));
    p->zero_fill(x, 1000); // outside a step: not counted
    ops_profile_step_begin();
    p->zero_fill(x, 1000);
    const struct timespec ts = {0, 30 * 1000 * 1000};
    nanosleep(&ts, NULL);
    p->scale_inplace(x, 2.0f, 1000);
    ops_profile_step_end();
    p->zero_fill(x, 1000); // after it: not counted
    p->free(x);
    OpsProfileRow r[8];
    int steps = 0;
    double span = 0, between = 0;
    const int n = ops_profile_rows(r, 8, &steps, &span, &between);
    CU_ASSERT_EQUAL(n, 2);
    CU_ASSERT_EQUAL(steps, 1);
    const OpsProfileRow *z = find_(r, n, "zero_fill", 0, 0);
    const OpsProfileRow *s = find_(r, n, "scale_inplace", 0, 0);
    CU_ASSERT(z && z->calls == 1 && z->ms < 10.0);
    CU_ASSERT(s && s->calls == 1 && s->ms < 10.0);
    CU_ASSERT(between >= 29.0);
    // the sleep is the time before scale_inplace, not before the first op
    CU_ASSERT(s && s->before_ms >= 29.0 && s->before_ms <= between);
    CU_ASSERT(z && z->before_ms < 10.0);
    printf("\n  30 ms of host sleep between two ops: %.2f ms between, %.3f + %.3f ms in the ops\n",
           between, z ? z->ms : -1.0, s ? s->ms : -1.0);
}

int main(void) {
    const TuTest tests[] = {
        {"every op of the table is wrapped", test_wraps_every_op},
        {"training through the profiler gives the same bits", test_same_results},
        {"calls, FLOPs and times add up", test_accounting},
        {"host time between ops is not an op's", test_between},
    };
    return tu_run("ops_profile", tests, (int)(sizeof tests / sizeof tests[0]));
}
