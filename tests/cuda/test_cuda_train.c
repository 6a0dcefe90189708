// test_cuda_train: whole training steps on the GPU against the CPU backend (the reference).
// configs/tiny-moe.ini (2 layers, d_model 64, 8 experts top-2, vocab 50304, 4 x 128 tokens)
// trains 20 steps (forward, backward, grad norm + clipping, AdamW with the config's schedule) on
// the same synthetic tokens on both backends:
//   - GEMMs in fp32: the loss of every step equals the CPU's within RTOL_FP32;
//   - GEMMs in bf16: within RTOL_BF16;
//   - a GPU run checkpointed at step 10 and resumed (new model, optimizer loaded from the file)
//     gives the uninterrupted GPU run's losses and weights bit for bit;
//   - the GPU checkpoint of step 10 resumed on the CPU continues like the GPU run (RTOL_FP32):
//     the file format does not depend on the device;
//   - the balancing options of issue 11 (sigmoid router, the expert bias updated after every
//     step from the loads, the lb's f from a routing pre-pass as lb_scope = global_batch takes
//     it) in fp32: within RTOL_FP32 of the CPU, and the bias on the GPU moved.
// Exits 77 (ctest "skipped") where no CUDA device exists.
#define _POSIX_C_SOURCE 200809L // mkdtemp
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kernels/ops.h"
#include "tests/testutil.h"
#include "train/ckpt.h"
#include "train/config.h"
#include "train/model.h"
#include "train/optim.h"

// Tolerances on the per-step loss (relative). fp32: both backends compute the same functions
// in fp32 and differ in the order of their sums (cuBLAS tiles vs OpenBLAS, warp trees vs
// loops): ~1e-6 relative per op at step 1. AdamW divides each gradient by its own running RMS,
// so a parameter whose gradient is mostly rounding noise still moves by ~lr; over 20 steps
// that lets the two trajectories drift apart, and a router near a tie may send a token to
// another expert. Nothing here has run on a GPU yet: a host emulation of the CUDA kernels
// (tools/cuda-emu, the GPU's code with plain fp32 / libm rounding) stays within 2.5e-9 of the
// CPU's losses (~10.9 falling to ~9.9) in fp32 and 2.2e-5 with bf16-rounded GEMM operands.
// RTOL_FP32 = 2e-3 leaves room for the GPU's own rounding (fused multiply-adds, fast-math
// exp) to be amplified ~1000x by the drift above,
// while a wrong op (a missing term, a wrong index) moves the loss by 1e-2 or more within a
// few steps. bf16: every GEMM operand carries a relative error up to 2^-9 (8 significant
// bits), ~3e-3 per product, averaging down over the D = 64..128 term dot products to ~5e-4 on
// the logits at step 1; the same drift then acts on a larger seed: 2e-2.
#define RTOL_FP32 2e-3
#define RTOL_BF16 2e-2
#define STEPS     20
#define SAVE_AT   10

static Config cfg_, cfg_bal_;

static void load_config_(void) {
    MoetErr err;
    char *sets[] = {"optim.warmup_steps=5", "train.max_steps=20"};
    char *bal[] = {"optim.warmup_steps=5",      "train.max_steps=20",
                   "moe.router=sigmoid",        "moe.norm_topk_prob=true",
                   "moe.bias_update_rate=0.01", "moe.lb_scope=global_batch"};
    if (config_from_cli(&cfg_, "configs/tiny-moe.ini", 2, sets, &err) ||
        config_from_cli(&cfg_bal_, "configs/tiny-moe.ini", 6, bal, &err)) {
        fprintf(stderr, "test_cuda_train: %s\n", err.msg);
        exit(1);
    }
}

// The tokens of step s: a fixed mixture of a few frequent ids and random ones, so that the
// loss falls from ln(V) within 20 steps (10.87 -> 9.91 on the CPU backend).
static void tokens_(int32_t *tok, int n, int step) {
    uint64_t st = 0x5DEECE66Dull * (uint64_t)(step + 1);
    for (int i = 0; i < n; i++) {
        uint64_t r = tu_rand_u64(&st);
        tok[i] = (r & 3) ? (int32_t)(100 + (r >> 8) % 16) : (int32_t)((r >> 8) % 50280);
    }
}

typedef struct {
    Config c;
    Model m;
    Optim o;
} Run;

static void run_open_cfg_(Run *r, const Ops *ops, const Config *c) {
    MoetErr err;
    r->c = *c;
    if (model_create_ops(&r->m, &r->c, ops, 0, 1, &err) ||
        model_set_batch(&r->m, r->c.micro_batch, r->c.seq_len, &err)) {
        fprintf(stderr, "test_cuda_train: %s\n", err.msg);
        exit(1);
    }
    optim_create(&r->o, &r->m);
}

static void run_open_(Run *r, const Ops *ops) {
    run_open_cfg_(r, ops, &cfg_);
}

static void run_close_(Run *r) {
    optim_free(&r->o);
    model_free(&r->m);
}

// Steps first+1 .. last, as the trainer does with accumulation 1; losses[s-1] receives step s.
static void run_steps_(Run *r, int first, int last, double *losses) {
    const int n = r->c.micro_batch * r->c.seq_len;
    int32_t *tok = malloc((size_t)n * sizeof *tok);
    const int global = strcmp(r->c.lb_scope, "global_batch") == 0;
    const size_t LE = (size_t)r->m.L * (r->m.E > 0 ? r->m.E : 1);
    int64_t *counts = calloc(LE, sizeof *counts);
    for (int s = first + 1; s <= last; s++) {
        tokens_(tok, n, s);
        model_zero_grad(&r->m);
        if (global) { // the trainer's routing pre-pass (here of the step's one micro-batch)
            model_forward_route(&r->m, tok);
            memcpy(counts, r->m.expert_tokens, LE * sizeof *counts);
            r->m.lb_global_counts = counts;
        }
        model_forward_train(&r->m, tok);
        model_backward(&r->m);
        r->m.lb_global_counts = NULL;
        double gnorm = optim_grad_norm(&r->m, NULL);
        optim_step(&r->o, &r->m, &r->c, (float)optim_lr(&r->c, s),
                   optim_clip_scale(gnorm, r->c.grad_clip));
        if (r->c.bias_update_rate > 0)
            model_update_expert_bias(&r->m, r->m.expert_tokens, r->c.bias_update_rate);
        losses[s - 1] = r->m.loss;
    }
    free(counts);
    free(tok);
}

static int losses_close_(const char *what, const double *got, const double *want, int from, int to,
                         double rtol) {
    int ok = 1;
    double worst = 0;
    for (int s = from; s < to; s++) {
        double rel = fabs(got[s] - want[s]) / fabs(want[s]);
        if (rel > worst) worst = rel;
        if (!(rel <= rtol)) {
            fprintf(stderr, "  %s: step %d loss %.7f, want %.7f (rel %.2e > %.1e)\n", what, s + 1,
                    got[s], want[s], rel, rtol);
            ok = 0;
        }
    }
    printf("  %s: steps %d..%d, worst relative loss difference %.2e (tolerance %.1e)\n", what,
           from + 1, to, worst, rtol);
    return ok;
}

static double cpu_losses_[STEPS];

static void cpu_reference_(void) {
    static int done = 0;
    if (done) return;
    Run r;
    run_open_(&r, ops_cpu());
    model_init_weights(&r.m, r.c.seed);
    run_steps_(&r, 0, STEPS, cpu_losses_);
    run_close_(&r);
    done = 1;
}

static void gpu_vs_cpu_(int bf16, double rtol) {
    cpu_reference_();
    char info[512];
    CU_ASSERT_EQUAL_FATAL(ops_cuda_open(0, bf16, info, sizeof info), 0);
    Run r;
    run_open_(&r, ops_cuda());
    model_init_weights(&r.m, r.c.seed);
    double gpu[STEPS];
    run_steps_(&r, 0, STEPS, gpu);
    run_close_(&r);
    CU_ASSERT_TRUE(losses_close_(bf16 ? "gpu bf16 vs cpu" : "gpu fp32 vs cpu", gpu, cpu_losses_, 0,
                                 STEPS, rtol));
    // and it learns: on the CPU the loss falls from 10.87 to 9.91 over these 20 steps
    CU_ASSERT_TRUE(gpu[STEPS - 1] < gpu[0] - 0.5);
}

static void test_fp32_vs_cpu(void) {
    gpu_vs_cpu_(0, RTOL_FP32);
}
static void test_bf16_vs_cpu(void) {
    gpu_vs_cpu_(1, RTOL_BF16);
}

// Saves run r after step `step` into dir; returns the file's path in path.
static void save_(Run *r, const char *dir, int step, char *path, size_t n) {
    MoetErr err;
    char ini[8192];
    config_to_ini(&r->c, ini, sizeof ini);
    TrainState st;
    memset(&st, 0, sizeof st);
    st.step = step;
    st.optim_step = r->o.t;
    CkptSaveOpts so = {dir, 2, 0, 0};
    model_download_params(&r->m);
    optim_download(&r->o);
    if (ckpt_save(&so, &r->m, r->o.exp_avg_h, r->o.exp_avg_sq_h, &st, ini, path, n, &err)) {
        fprintf(stderr, "test_cuda_train: %s\n", err.msg);
        CU_FAIL("ckpt_save");
    }
}

static void load_(Run *r, const char *path) {
    MoetErr err;
    TrainState st;
    if (ckpt_load(path, &r->m, r->o.exp_avg_h, r->o.exp_avg_sq_h, &st, &err)) {
        fprintf(stderr, "test_cuda_train: %s\n", err.msg);
        CU_FAIL("ckpt_load");
        return;
    }
    optim_upload(&r->o);
    r->o.t = st.optim_step;
}

static void test_resume(void) {
    cpu_reference_();
    char info[512], dir[] = "/tmp/moet-cuda-train-XXXXXX", path[1100];
    CU_ASSERT_EQUAL_FATAL(ops_cuda_open(0, 1, info, sizeof info), 0);
    CU_ASSERT_PTR_NOT_NULL_FATAL(mkdtemp(dir));

    // uninterrupted GPU run, and its weights after step 20
    Run a;
    run_open_(&a, ops_cuda());
    model_init_weights(&a.m, a.c.seed);
    double full[STEPS];
    run_steps_(&a, 0, STEPS, full);
    model_download_params(&a.m);

    // the same run stopped after step 10 and resumed from its checkpoint in a new model
    Run b;
    run_open_(&b, ops_cuda());
    model_init_weights(&b.m, b.c.seed);
    double part[STEPS];
    run_steps_(&b, 0, SAVE_AT, part);
    save_(&b, dir, SAVE_AT, path, sizeof path);
    run_close_(&b);
    Run c;
    run_open_(&c, ops_cuda());
    load_(&c, path);
    run_steps_(&c, SAVE_AT, STEPS, part);
    model_download_params(&c.m);
    CU_ASSERT_EQUAL(memcmp(full, part, sizeof full), 0);
    CU_ASSERT_EQUAL(memcmp(a.m.params_h, c.m.params_h, a.m.n_params * sizeof(float)), 0);
    printf("  gpu resume at step %d: losses and weights %s\n", SAVE_AT,
           memcmp(full, part, sizeof full) == 0 ? "bit-identical" : "DIFFER");
    run_close_(&c);

    // the GPU's step-10 checkpoint continued on the CPU (fp32 GEMMs for the comparison)
    CU_ASSERT_EQUAL_FATAL(ops_cuda_open(0, 0, info, sizeof info), 0);
    Run g;
    run_open_(&g, ops_cuda());
    model_init_weights(&g.m, g.c.seed);
    double gfull[STEPS], mixed[STEPS];
    run_steps_(&g, 0, STEPS, gfull);
    run_close_(&g);
    Run h;
    run_open_(&h, ops_cuda());
    model_init_weights(&h.m, h.c.seed);
    run_steps_(&h, 0, SAVE_AT, mixed);
    char dir2[] = "/tmp/moet-cuda-train-XXXXXX", path2[1100];
    CU_ASSERT_PTR_NOT_NULL_FATAL(mkdtemp(dir2));
    save_(&h, dir2, SAVE_AT, path2, sizeof path2);
    run_close_(&h);
    Run k;
    run_open_(&k, ops_cpu());
    load_(&k, path2);
    run_steps_(&k, SAVE_AT, STEPS, mixed);
    run_close_(&k);
    CU_ASSERT_TRUE(
        losses_close_("gpu steps 1-10, cpu 11-20 vs gpu", mixed, gfull, SAVE_AT, STEPS, RTOL_FP32));
    run_close_(&a);
    char cmd[2400];
    snprintf(cmd, sizeof cmd, "rm -rf '%s' '%s'", dir, dir2);
    if (system(cmd) != 0) fprintf(stderr, "test_cuda_train: could not remove %s\n", dir);
}

// The balancing options of issue 11 on the GPU (fp32 GEMMs) against the CPU.
static void test_balancing_vs_cpu(void) {
    char info[512];
    Run c, g;
    double cpu[STEPS], gpu[STEPS];
    run_open_cfg_(&c, ops_cpu(), &cfg_bal_);
    model_init_weights(&c.m, c.c.seed);
    run_steps_(&c, 0, STEPS, cpu);
    CU_ASSERT_EQUAL_FATAL(ops_cuda_open(0, 0, info, sizeof info), 0);
    run_open_cfg_(&g, ops_cuda(), &cfg_bal_);
    model_init_weights(&g.m, g.c.seed);
    run_steps_(&g, 0, STEPS, gpu);
    CU_ASSERT_TRUE(losses_close_("gpu fp32 vs cpu, sigmoid + bias + global lb", gpu, cpu, 0, STEPS,
                                 RTOL_FP32));
    model_download_params(&g.m);
    const ParamTensor *t = model_find_tensor(&g.m, "model.layers.1.mlp.gate.expert_bias");
    CU_ASSERT_PTR_NOT_NULL_FATAL(t);
    int moved = 0, same = 1;
    for (size_t e = 0; e < t->numel; e++) {
        moved |= g.m.params_h[t->offset + e] != 0.0f;
        same &= g.m.params_h[t->offset + e] == c.m.params_h[t->offset + e];
    }
    CU_ASSERT_TRUE(moved);
    printf("  expert bias of layer 1 after %d steps: %s the CPU's\n", STEPS,
           same ? "bit-identical to" : "differs from (a routing flip)");
    run_close_(&c);
    run_close_(&g);
}

// The op profiler on the GPU table (`moet bench --profile`): events around every op on the
// legacy stream. The same bits as without it; the times are events' differences, none negative;
// the experts' gate and up go through the pair op, counted with both GEMMs' FLOPs.
static void test_profile(void) {
    char info[512];
    CU_ASSERT_EQUAL_FATAL(ops_cuda_open(0, 1, info, sizeof info), 0);
    enum { S = 2 };
    double plain[S], prof[S];
    Run r;
    run_open_(&r, ops_cuda());
    model_init_weights(&r.m, r.c.seed);
    run_steps_(&r, 0, S, plain);
    run_close_(&r);
    run_open_(&r, ops_profile(ops_cuda()));
    model_init_weights(&r.m, r.c.seed);
    for (int s = 0; s < S; s++) {
        ops_profile_step_begin();
        run_steps_(&r, s, s + 1, prof);
        ops_profile_step_end();
    }
    const Config c = r.c;
    run_close_(&r);
    CU_ASSERT(memcmp(plain, prof, sizeof plain) == 0);

    enum { MAXR = 128 };
    OpsProfileRow rows[MAXR];
    int steps = 0;
    double span = 0, between = 0;
    const int n = ops_profile_rows(rows, MAXR, &steps, &span, &between);
    CU_ASSERT_EQUAL(steps, S);
    CU_ASSERT(n > 10 && n <= MAXR);
    CU_ASSERT(span > 0.0 && between >= -1e-3 * span);
    const OpsProfileRow *pair = NULL;
    for (int i = 0; i < n && i < MAXR; i++) {
        CU_ASSERT(rows[i].ms >= 0.0 && rows[i].calls > 0 && rows[i].before_ms >= 0.0);
        if (strcmp(rows[i].op, "grouped_matmul_forward_pair") == 0) pair = &rows[i];
    }
    const double R = (double)c.micro_batch * c.seq_len * c.top_k;
    CU_ASSERT_FATAL(pair != NULL);
    CU_ASSERT(pair->c == c.d_model && pair->oc == c.expert_d_ff);
    CU_ASSERT_EQUAL(pair->calls, (long)S * c.n_layers);
    CU_ASSERT(pair->flops == 4.0 * R * c.d_model * c.expert_d_ff * S * c.n_layers);
    printf("  %d profiled steps: %.2f ms per step, %.2f ms between ops, %d rows\n", steps,
           span / steps, between / steps, n);
}

int main(void) {
    if (ops_cuda() == NULL || ops_cuda_device_count() == 0) {
        printf("skipped: no CUDA device\n");
        return TU_SKIP;
    }
    load_config_();
    static const TuTest tests[] = {
        {"20 steps, GEMMs in fp32, vs the CPU", test_fp32_vs_cpu},
        {"20 steps, GEMMs in bf16, vs the CPU", test_bf16_vs_cpu},
        {"resume on the GPU (bitwise) and GPU -> CPU", test_resume},
        {"20 steps, sigmoid router, expert bias, global-batch lb, vs the CPU",
         test_balancing_vs_cpu},
        {"the op profiler on the GPU: same bits, times and FLOPs add up", test_profile},
    };
    return tu_run("cuda_train", tests, (int)(sizeof tests / sizeof tests[0]));
}
