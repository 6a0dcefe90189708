// trainer: the training loop of `moet train` (ARCHITECTURE §4, §6, §7, §10): model and data,
// gradient accumulation, AdamW with schedule and clipping, logging to stdout and metrics.jsonl,
// evaluation, checkpoints, resume (bit-exact on CPU) and stopping on SIGTERM / SIGUSR1.
#pragma once
#include <stdint.h>

#include "kernels/ops.h"
#include "train/comm.h"
#include "train/common.h"
#include "train/config.h"

typedef struct {
    const char *resume; // "latest", a checkpoint directory or file: model + optimizer +
                        // trainer state, continue at step + 1; NULL: a fresh run
    const char *init;   // a checkpoint whose weights start a fresh run (step 0, new
                        // optimizer); NULL: initialise from train.seed
    int64_t stop_at;    // > 0: stop after this step (checkpoint, exit 0) although the lr
                        // schedule runs to train.max_steps, like a pre-empted run; 0: none
} TrainOpts;

// Trains c (already validated) on the ranks of par: data parallel over the world (gradients
// and losses summed in rank order, so world W with accumulation 1 equals world 1 with
// accumulation W bit for bit; other splits agree to rounding); rank 0 prints, writes metrics.jsonl and the checkpoints.
// With ep > 1 the experts are split over each EP group (model_set_comm), expert gradients are
// summed over the expert-DP group, and checkpoints are written collectively (ckpt_save_par).
// The gradient sums start in buckets during the last micro-batch's backward (gradsync), over
// [parallel] comm (NCCL or MPI); [parallel] zero = 1 shards the AdamW moments (optim); a
// collective or a micro-batch unfinished after [parallel] timeout_s ends the job (comm).
// Load balancing ([moe]): lb_scope = global_batch takes the lb loss's expert counts over the
// whole global batch (a routing pre-pass of the step's micro-batches when a rank has several,
// else a count all-reduce in each MoE layer); bias_update_rate > 0 updates the expert bias after
// every optimizer step from the step's global loads. Every logged step appends the per-layer
// loads to checkpoint.dir/expert_load.tsv.
// Returns 0 when max_steps (or stop_at) is reached
// or after a signal-triggered checkpoint, MOET_EFAIL on a non-finite loss or gradient (no
// checkpoint is written then), a failed checkpoint write or a data error, MOET_EUSAGE for bad
// options (e.g. --resume with --init).
int trainer_run(const Config *c, const TrainOpts *o, Parallel *par, MoetErr *err);

// The machine's sgemm peak in GFLOP/s, measured now: the best of 9 timed 2048^3 sgemm calls
// with the kernels' threads (the first call only warms up). The MFU denominator on CPU (§10).
double cpu_sgemm_peak_gflops(void);
// The same through the bf16 matmul of precision = bf16 on cpu (kernels/cpu/gemm_bf16.c).
double cpu_bf16_peak_gflops(void);
// The measured peak of the CPU backend `ops` does its GEMMs with: bf16 for ops_cpu_bf16(),
// else sgemm (ARCHITECTURE §10: MFU on cpu is against the machine's measured GEMM peak).
double cpu_peak_gflops(const Ops *ops);
// Its name in the output: "bf16 GEMM" or "sgemm".
const char *cpu_peak_kind(const Ops *ops);
