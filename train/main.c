// main: the `moet` command line, git style: `moet <command> [args]`, each command with --help.
// Exit status: 0 success, 2 usage or configuration error, 1 any other failure.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>

#include "kernels/kernels.h"
#include "train/cli.h"
#include "train/common.h"
#include "train/config.h"
#include "train/memplan.h"
#include "train/model.h"
#include "train/optim.h"
#include "train/trainer.h"

#define MAX_SETS 256

// ---------------------------------------------------------------------------------------
// shared argument handling

typedef struct {
    const char *config;
    char *sets[MAX_SETS];
    int n_sets;
} ConfigArgs;

// Takes `--set k=v` / `--set=k=v` at argv[*i]; returns 1 if it consumed the argument.
static int take_set_(ConfigArgs *ca, int argc, char **argv, int *i, MoetErr *err, int *rc) {
    const char *a = argv[*i];
    const char *val = NULL;
    if (strcmp(a, "--set") == 0) {
        if (*i + 1 >= argc) {
            *rc = moet_errf(err, MOET_EUSAGE, "--set needs section.key=value");
            return 1;
        }
        val = argv[++*i];
    } else if (strncmp(a, "--set=", 6) == 0) {
        val = a + 6;
    } else {
        return 0;
    }
    if (ca->n_sets == MAX_SETS) {
        *rc = moet_errf(err, MOET_EUSAGE, "too many --set options (at most %d)", MAX_SETS);
        return 1;
    }
    ca->sets[ca->n_sets++] = (char *)val;
    return 1;
}

static int want_help_(int argc, char **argv) {
    for (int i = 1; i < argc; i++)
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) return 1;
    return 0;
}

static void human_(char *buf, size_t n, double x) {
    if (x >= 1e9) snprintf(buf, n, "%.2fB", x / 1e9);
    else if (x >= 1e6) snprintf(buf, n, "%.2fM", x / 1e6);
    else if (x >= 1e3) snprintf(buf, n, "%.2fK", x / 1e3);
    else snprintf(buf, n, "%.0f", x);
}

static void bytes_(char *buf, size_t n, double b) {
    if (b >= 1024.0 * 1024 * 1024) snprintf(buf, n, "%.2f GiB", b / (1024.0 * 1024 * 1024));
    else snprintf(buf, n, "%.1f MiB", b / (1024.0 * 1024));
}

// ---------------------------------------------------------------------------------------
// moet info

static const char *INFO_HELP =
    "usage: moet info CONFIG [--set section.key=value]... [--world W] [--ep E]\n"
    "\n"
    "Prints the resolved configuration, the parameter counts (total, active, by component),\n"
    "the training FLOPs per token (6*N_active + 12*L*d_model*seq_len), the memory each rank\n"
    "needs and the bytes each rank sends per optimizer step, for a world of W ranks (default:\n"
    "[parallel] ep) with expert parallelism E (default: [parallel] ep; E divides W and\n"
    "n_experts). Memory (train/memplan.h): fp32 parameters, gradients (and the accumulation\n"
    "buffer when a rank takes several micro-batches per step), AdamW moments (sharded with\n"
    "[parallel] zero = 1), the activations of one micro-batch ([train] recompute), the expert\n"
    "dispatcher's rows (ep > 1, balanced routing), the CUDA attention scratch and bf16 GEMM\n"
    "operand workspace (at most 1 GiB), and the host\n"
    "staging of device buffers over MPI. Communication is counted as the trainer's \"comm a2a\n"
    "X MB, allreduce Y MB\" counts it (MB = 1e6 bytes): all-to-all rows sent, the rows a rank\n"
    "keeps for itself included; all-reduce buffer bytes contributed; ZeRO-1's all-gather of\n"
    "the rank's parameter shard.\n";

static void info_mem_line_(const char *name, double b, const char *note) {
    char a[32];
    bytes_(a, sizeof a, b);
    printf("%-22s %10s%s%s\n", name, a, note[0] ? "  " : "", note);
}

// the trainer's unit for communication: MB = 1e6 bytes, and the exact count
static void info_comm_line_(const char *name, double b, const char *note) {
    printf("%-22s %12.1f MB  (%.0f bytes)%s%s\n", name, b / 1e6, b, note[0] ? "  " : "", note);
}

int cmd_info(int argc, char **argv, MoetErr *err) {
    if (want_help_(argc, argv)) {
        fputs(INFO_HELP, stdout);
        return MOET_OK;
    }
    ConfigArgs ca = {0};
    int world = 0, ep = 0, rc = MOET_OK;
    for (int i = 1; i < argc; i++) {
        if (take_set_(&ca, argc, argv, &i, err, &rc)) {
            if (rc) return rc;
        } else if (strcmp(argv[i], "--world") == 0 && i + 1 < argc) {
            world = atoi(argv[++i]);
            if (world < 1) return moet_errf(err, MOET_EUSAGE, "--world must be >= 1");
        } else if (strcmp(argv[i], "--ep") == 0 && i + 1 < argc) {
            ep = atoi(argv[++i]);
            if (ep < 1) return moet_errf(err, MOET_EUSAGE, "--ep must be >= 1");
        } else if (argv[i][0] == '-') {
            return moet_errf(err, MOET_EUSAGE, "info: unknown option %s (see moet info --help)",
                             argv[i]);
        } else if (!ca.config) {
            ca.config = argv[i];
        } else {
            return moet_errf(err, MOET_EUSAGE, "info: one CONFIG only (got %s and %s)",
                             ca.config, argv[i]);
        }
    }
    if (!ca.config) return moet_errf(err, MOET_EUSAGE, "info: missing CONFIG (see --help)");
    // --ep E is --set parallel.ep=E, after the other overrides (validated with them)
    char ep_set[48];
    if (ep > 0) {
        if (ca.n_sets == MAX_SETS)
            return moet_errf(err, MOET_EUSAGE, "too many --set options (at most %d)", MAX_SETS);
        snprintf(ep_set, sizeof ep_set, "parallel.ep=%d", ep);
        ca.sets[ca.n_sets++] = ep_set;
    }
    Config c;
    if ((rc = config_from_cli(&c, ca.config, ca.n_sets, ca.sets, err))) return rc;
    if (world == 0) world = c.ep;
    if (world % c.ep != 0)
        return moet_errf(err, MOET_EUSAGE, "--world %d is not a multiple of [parallel] ep %d",
                         world, c.ep);
    if (c.global_batch % (c.micro_batch * world) != 0)
        return moet_errf(err, MOET_EUSAGE,
                         "--world %d: [train] global_batch = %d is not a multiple of micro_batch "
                         "%d x %d ranks (the trainer would refuse)\n---> HINT: --set "
                         "train.micro_batch=M or train.global_batch=G with G %% (M x %d) = 0",
                         world, c.global_batch, c.micro_batch, world, world);

    int need = config_to_ini(&c, NULL, 0);
    char *ini = malloc((size_t)need + 1);
    config_to_ini(&c, ini, need + 1);
    printf("# resolved configuration (%s)\n%s\n", ca.config, ini);
    free(ini);

    ParamCounts pc;
    model_param_counts(&c, &pc);
    char a[32], b[32], note[192];
    printf("# parameters\n");
    printf("%-22s %14lld\n", "embedding", (long long)pc.embed);
    printf("%-22s %14lld\n", "attention", (long long)pc.attention);
    printf("%-22s %14lld\n", "norms", (long long)pc.norms);
    if (c.n_experts > 0) {
        printf("%-22s %14lld\n", "router", (long long)pc.router);
        if (model_has_expert_bias(&c))
            printf("%-22s %14lld  (not trained: aux-loss-free balancing; not counted below)\n",
                   "expert bias", (long long)c.n_layers * c.n_experts);
        printf("%-22s %14lld  (%d experts x %lld)\n", "experts", (long long)pc.experts,
               c.n_experts, (long long)(pc.experts / c.n_experts / c.n_layers));
    } else {
        printf("%-22s %14lld\n", "mlp", (long long)pc.dense_mlp);
    }
    printf("%-22s %14lld\n", "lm_head", (long long)pc.lm_head);
    human_(a, sizeof a, (double)pc.total);
    human_(b, sizeof b, (double)pc.active);
    printf("total parameters:      %14lld  (%s)\n", (long long)pc.total, a);
    printf("active parameters:     %14lld  (%s per token%s)\n", (long long)pc.active, b,
           c.n_experts > 0 ? ", top-k experts" : "");
    human_(a, sizeof a, (double)pc.active_flops);
    double fpt = model_flops_per_token(&c);
    printf("N_active for FLOPs:    %14lld  (%s: attention + router + k experts + lm_head)\n",
           (long long)pc.active_flops, a);
    printf("training FLOPs/token:  %14.4g  (6*N_active + 12*L*d_model*seq_len)\n", fpt);
    printf("FLOPs per global batch:%14.4g  (%d sequences x %d tokens)\n",
           fpt * (double)c.global_batch * c.seq_len, c.global_batch, c.seq_len);

    MemPlan mp;
    memplan_predict(&c, world, &mp);
    const int full = strcmp(c.recompute, "full") == 0;
    printf("\n# memory per rank (world %d, ep %d, zero %d, recompute %s; fp32; micro_batch %d x "
           "seq_len %d, %d micro-batch%s per step)\n",
           world, c.ep, c.zero, c.recompute, c.micro_batch, c.seq_len, mp.accum,
           mp.accum == 1 ? "" : "es");
    human_(a, sizeof a, mp.local_params);
    if (c.ep > 1)
        snprintf(note, sizeof note, "%s floats: shared + %d of %d experts per layer", a,
                 c.n_experts / c.ep, c.n_experts);
    else
        snprintf(note, sizeof note, "%s floats", a);
    info_mem_line_("parameters", mp.params, note);
    info_mem_line_("gradients", mp.grads,
                   mp.accum > 1 ? "and the accumulation buffer (several micro-batches)" : "");
    if (c.zero)
        snprintf(note, sizeof note, "exp_avg + exp_avg_sq, zero 1: 1/%d of the shared, 1/%d "
                 "of the local experts", world, mp.edp);
    else
        snprintf(note, sizeof note, "exp_avg + exp_avg_sq%s", world > 1 ? ", zero 0: full" : "");
    info_mem_line_("AdamW state", mp.optim, note);
    info_mem_line_("activations", mp.activations,
                   full ? "recompute full: each layer's input + one layer's working set"
                        : "recompute none: every layer's");
    if (c.ep > 1) {
        snprintf(note, sizeof note, "ep %d: received rows, 1.5 x %.0f + 16 (balanced routing)",
                 c.ep, mp.routed_rows);
        info_mem_line_("dispatch", mp.dispatch, note);
    }
    if (mp.scratch > 0)
        info_mem_line_("scratch", mp.scratch,
                       strcmp(c.device, "cuda") == 0
                           ? "cuda: attention scores of one sequence, forward and backward; "
                             "bf16 GEMM operands (<= 1 GiB)"
                           : "cpu: the bf16 GEMM operands, two buffers (<= 2 x the largest "
                             "op's)");
    if (mp.weight_copy > 0)
        info_mem_line_("weight copy", mp.weight_copy,
                       strcmp(c.device, "cuda") == 0 ? "cuda: the parameters in bf16 for the GEMMs "
                                                       "(MOET_CUDA_WEIGHT_COPY=0: none)"
                                                     : "cpu: the parameters in bf16 for the GEMMs "
                                                       "(MOET_CPU_WEIGHT_COPY=0: none)");
    info_mem_line_("total", mp.total, "");
    if (mp.host_stage > 0)
        info_mem_line_("host staging", mp.host_stage,
                       "host memory: device buffers staged for MPI ([parallel] comm)");

    printf("\n# communication per optimizer step per rank (world %d, ep %d; MB = 1e6 bytes, "
           "counted as the trainer's \"comm\" log)\n", world, c.ep);
    if (world == 1) {
        printf("none (one rank)\n");
    } else {
        if (c.ep > 1 && c.n_experts > 0) {
            info_comm_line_("all-to-all", mp.a2a_bytes, "");
            printf("%-22s %d micro-batch%s x %d layers x (4 x %.0f rows x %.0f B + %d B counts)\n",
                   "", mp.accum, mp.accum == 1 ? "" : "es", c.n_layers, mp.routed_rows,
                   4.0 * c.d_model, 8 * c.n_experts);
            if (full)
                printf("%-22s + recompute full: the forward exchanges again, %d layer%s x (2 x "
                       "%.0f rows + counts)\n", "", c.n_layers - 1, c.n_layers == 2 ? "" : "s",
                       mp.routed_rows);
            printf("%-22s (balanced routing; %.1f MB of it, the rows sent out, do not depend on "
                   "it)\n", "", mp.a2a_exact_bytes / 1e6);
        } else {
            info_comm_line_("all-to-all", 0, "");
        }
        info_comm_line_("all-reduce", mp.allreduce_bytes, "");
        if (c.ep == 1)
            printf("%-22s fp32 gradients of every tensor over the %d ranks; + %.0f B of "
                   "scalars\n", "", world, mp.allreduce_bytes - mp.allreduce_grad_bytes);
        else if (mp.edp > 1)
            printf("%-22s fp32 gradients: shared over the %d ranks, experts over the %d of their "
                   "expert-DP group; + %.0f B of scalars\n", "", world, mp.edp,
                   mp.allreduce_bytes - mp.allreduce_grad_bytes);
        else
            printf("%-22s fp32 gradients: shared over the %d ranks, experts not at all (ep = "
                   "world); + %.0f B of scalars\n", "", world,
                   mp.allreduce_bytes - mp.allreduce_grad_bytes);
        if (c.zero) {
            info_comm_line_("all-gather", mp.allgather_bytes, "");
            printf("%-22s zero 1: this rank's updated parameter shard\n", "");
        }
    }
    double fstep = fpt * (double)c.global_batch * c.seq_len / world;
    printf("%-22s %12.4g FLOP  (%s)\n", "compute per rank", fstep,
           full ? "model FLOPs; recompute full runs about 1/3 more" : "model FLOPs");
    return MOET_OK;
}

// ---------------------------------------------------------------------------------------
// moet bench

static const char *BENCH_HELP =
    "usage: moet bench CONFIG [--set section.key=value]... [--steps N] [--warmup W]\n"
    "                  [--vary-tokens] [--profile]\n"
    "\n"
    "Times training steps (forward, backward and the AdamW update) of the model on random\n"
    "tokens (micro_batch x seq_len from the config) on the config's [train] device, and prints\n"
    "the median step time of N steps after W warm-up steps (defaults 5 and 2), tokens/s,\n"
    "achieved TFLOP/s and MFU (ARCHITECTURE 10: on cpu against the sgemm peak it measures on\n"
    "this machine with the same threads, or with precision = bf16 the bf16 GEMM peak measured\n"
    "the same way; on cuda against the GPU's dense bf16 peak, 989 TFLOP/s on H100 / H200),\n"
    "and the peak memory (host RSS; on cuda also device memory).\n"
    "\n"
    "  --vary-tokens  new random tokens for every step (drawn outside the timed part), so that\n"
    "                 the experts' row counts change from step to step as in training; by\n"
    "                 default every step sees the same tokens\n"
    "  --profile      time every op of the timed steps and print where a step goes: ms per\n"
    "                 step per op (matmuls per shape, with their FLOP rate), and the time\n"
    "                 between ops (host code; on cuda, time the GPU waited for the host). On\n"
    "                 cuda the times are events around each op, so the steps run as usual\n"
    "\n"
    "On cuda it also prints where the host's time went in the timed steps: GEMM calls (and\n"
    "how many cuBLASLt ran from its algorithm cache), host time inside them, and time spent\n"
    "waiting for the GPU. A step that waits near 0 ms is bound by the host, not the GPU.\n";

static int cmp_double_(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double median_(double *x, int n) {
    qsort(x, (size_t)n, sizeof *x, cmp_double_);
    return n % 2 ? x[n / 2] : 0.5 * (x[n / 2 - 1] + x[n / 2]);
}

int cmd_bench(int argc, char **argv, MoetErr *err) {
    if (want_help_(argc, argv)) {
        fputs(BENCH_HELP, stdout);
        return MOET_OK;
    }
    ConfigArgs ca = {0};
    int steps = 5, warmup = 2, vary = 0, profile = 0, rc = MOET_OK;
    for (int i = 1; i < argc; i++) {
        if (take_set_(&ca, argc, argv, &i, err, &rc)) {
            if (rc) return rc;
        } else if (strcmp(argv[i], "--steps") == 0 && i + 1 < argc) {
            steps = atoi(argv[++i]);
        } else if (strcmp(argv[i], "--warmup") == 0 && i + 1 < argc) {
            warmup = atoi(argv[++i]);
        } else if (strcmp(argv[i], "--vary-tokens") == 0) {
            vary = 1;
        } else if (strcmp(argv[i], "--profile") == 0) {
            profile = 1;
        } else if (argv[i][0] == '-') {
            return moet_errf(err, MOET_EUSAGE, "bench: unknown option %s (see moet bench "
                             "--help)", argv[i]);
        } else if (!ca.config) {
            ca.config = argv[i];
        } else {
            return moet_errf(err, MOET_EUSAGE, "bench: one CONFIG only");
        }
    }
    if (!ca.config) return moet_errf(err, MOET_EUSAGE, "bench: missing CONFIG (see --help)");
    if (steps < 1 || warmup < 0)
        return moet_errf(err, MOET_EUSAGE, "bench: --steps must be >= 1 and --warmup >= 0");
    Config c;
    if ((rc = config_from_cli(&c, ca.config, ca.n_sets, ca.sets, err))) return rc;
    const Ops *ops;
    char binfo[512];
    if ((rc = model_open_backend(&c, model_local_rank(), &ops, binfo, sizeof binfo, err)))
        return rc;

    int B = c.micro_batch, T = c.seq_len;
    printf("moet bench %s: %d x %d tokens per step, %s\n", ca.config, B, T, binfo);
    double peak;
    const int gpu = strcmp(ops->name, "cuda") == 0;
    const char *peak_kind = cpu_peak_kind(ops);
    if (gpu) {
        peak = model_peak_gflops(ops);
        printf("peak: %.0f TFLOP/s (dense bf16)\n", peak / 1e3);
    } else {
        peak = cpu_peak_gflops(ops);
        printf("%s peak (2048^3, %d threads, best of 9): %.1f GFLOP/s\n", peak_kind,
               kernels_num_threads(), peak);
    }

    Model m;
    // --profile: the model and the optimizer run on the timing wrapper of the backend
    if ((rc = model_create_ops(&m, &c, profile ? ops_profile(ops) : ops, 0, 1, err))) return rc;
    model_init_weights(&m, c.seed);
    if ((rc = model_set_batch(&m, B, T, err))) {
        model_free(&m);
        return rc;
    }
    Optim opt;
    optim_create(&opt, &m);
    int32_t *tokens = moet_malloc((size_t)B * T * sizeof(int32_t));
    uint64_t s = c.seed;
    double *times = malloc(sizeof(double) * (size_t)steps);
    const int cpu_bf16 = ops == ops_cpu_bf16();
    unsigned long long wconv0 = 0; // the CPU weight copy's rounded values before the timed steps
    for (int i = 0; i < warmup + steps; i++) {
        if (i == 0 || vary) // drawn outside the timed part of the step
            for (int j = 0; j < B * T; j++) {
                s = s * 6364136223846793005ull + 1442695040888963407ull;
                tokens[j] = (int32_t)((s >> 33) % (uint64_t)c.vocab_size);
            }
        if (i == warmup) { // count the timed steps only
            ops_cuda_host_stats_reset();
            wconv0 = cpu_bf16_weight_converted();
        }
        double t0 = moet_time();
        if (profile && i >= warmup) ops_profile_step_begin();
        model_zero_grad(&m);
        model_forward_train(&m, tokens);
        model_backward(&m);
        double gnorm = optim_grad_norm(&m, NULL);
        optim_step(&opt, &m, &c, c.lr * 1e-3f, optim_clip_scale(gnorm, c.grad_clip));
        ops->sync();
        double dt = moet_time() - t0;
        ops_profile_step_end(); // adds the step's op times up (nothing without --profile)
        if (i >= warmup) times[i - warmup] = dt;
        printf("step %d%s: %.3f s, loss %.4f (ce %.4f lb %.4f z %.4f)\n", i + 1,
               i < warmup ? " (warm-up)" : "", dt, m.loss, m.ce, m.lb, m.z);
        fflush(stdout);
    }
    if (!gpu) {
        double peak_after = cpu_peak_gflops(ops);
        if (peak_after > peak) peak = peak_after;
    }
    double med = median_(times, steps);
    double tok_s = (double)B * T / med;
    double gflops = model_flops_per_token(&c) * tok_s / 1e9;
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    printf("\nstep time (median of %d): %.3f s\n", steps, med);
    printf("tokens/s:                 %.1f\n", tok_s);
    if (gpu)
        printf("achieved:                 %.1f TFLOP/s\n", gflops / 1e3);
    else
        printf("achieved:                 %.1f GFLOP/s\n", gflops);
    if (gpu)
        printf("MFU:                      %.1f%% of the dense bf16 peak (%.0f TFLOP/s)\n",
               100.0 * gflops / peak, peak / 1e3);
    else
        printf("MFU:                      %.1f%% of the measured %s peak (%.1f GFLOP/s, "
               "best before/after)\n", 100.0 * gflops / peak, peak_kind, peak);
    printf("peak memory (RSS):        %.1f MiB\n", (double)ru.ru_maxrss / 1024.0);
    if (gpu) {
        size_t in_use, dpeak;
        ops->mem_stats(&in_use, &dpeak);
        printf("peak device memory:       %.2f GiB (moet's allocations; cuBLAS workspace "
               "not included)\n", (double)dpeak / (1 << 30));
        char line[512];
        if (ops_cuda_host_stats_line(line, sizeof line, steps) > 0)
            printf("host, per timed step:     %s\n", line);
    }
    if (cpu_bf16)
        printf("weight copy:              %s; %.1f M parameters rounded into it per timed step\n",
               cpu_bf16_weight_copy_bytes() ? "on" : "off (MOET_CPU_WEIGHT_COPY=0)",
               1e-6 * (double)(cpu_bf16_weight_converted() - wconv0) / steps);
    if (profile) ops_profile_print(stdout, gpu);
    free(times);
    free(tokens);
    optim_free(&opt);
    model_free(&m);
    return MOET_OK;
}

// ---------------------------------------------------------------------------------------
// dispatch

typedef struct {
    const char *name;
    int (*fn)(int, char **, MoetErr *);
    const char *summary;
} Command;

static const Command COMMANDS[] = {
    {"info", cmd_info, "resolved config, parameters (total / active), FLOPs per token, memory"},
    {"bench", cmd_bench, "timed forward+backward: tokens/s, MFU, peak memory"},
    {"tokenize", cmd_tokenize, "Dolma JSONL documents -> token shards (.npy + .csv.gz)"},
    {"train", cmd_train, "train: AdamW, schedule, clipping, accumulation, eval, checkpoints"},
    {"inspect", cmd_inspect, "step, tokens, config, tensors of a checkpoint; --verify checks checksums"},
    {"eval", cmd_eval, "loss and perplexity of a checkpoint on token shards"},
    {"generate", cmd_generate, "sample text from a checkpoint (KV cache; greedy at temperature 0)"},
    {"upcycle", cmd_upcycle, "dense checkpoint -> MoE checkpoint (experts copied or sliced)"},
    {"export-hf", cmd_export_hf, "checkpoint -> Hugging Face OlmoeForCausalLM folder"},
    {"import-hf", cmd_import_hf, "Hugging Face OLMoE folder (safetensors) -> checkpoint"},
    {"trace", cmd_trace, "training-data provenance: the documents of a step; where a text was seen"},
};
#define N_COMMANDS ((int)(sizeof COMMANDS / sizeof COMMANDS[0]))

static void usage_(FILE *f) {
    fprintf(f, "usage: moet <command> [options]   (moet <command> --help for details)\n\n"
               "commands:\n");
    for (int i = 0; i < N_COMMANDS; i++)
        fprintf(f, "  %-10s %s\n", COMMANDS[i].name, COMMANDS[i].summary);
}

int main(int argc, char **argv) {
    if (argc < 2 || strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0 ||
        strcmp(argv[1], "help") == 0) {
        usage_(argc < 2 ? stderr : stdout);
        return argc < 2 ? MOET_EUSAGE : MOET_OK;
    }
    for (int i = 0; i < N_COMMANDS; i++) {
        if (strcmp(argv[1], COMMANDS[i].name) != 0) continue;
        MoetErr err = {{0}};
        int rc = COMMANDS[i].fn(argc - 1, argv + 1, &err);
        if (rc) fprintf(stderr, "moet: %s\n", err.msg[0] ? err.msg : "failed");
        return rc;
    }
    fprintf(stderr, "moet: unknown command '%s'\n", argv[1]);
    usage_(stderr);
    return MOET_EUSAGE;
}
