// memplan: predicts, from a config and a world size alone, what one rank of `moet train` holds
// in backend memory (by component) and in host staging memory, and the bytes it sends per
// optimizer step, counted as train/comm.c's counters count them (the trainer's "comm a2a X MB,
// allreduce Y MB" and metrics.jsonl's alltoall_bytes / allreduce_bytes). Used by `moet info`.
#pragma once
#include <stddef.h>

#include "train/config.h"

typedef struct {
    // backend bytes per rank (GPU memory on cuda; on cpu / cpu-shadow what ops->alloc hands out)
    double params;      // local parameters: non-expert + E/ep experts, fp32
    double grads;       // their gradients, plus the trainer's accumulation buffer when accum > 1
    double optim;       // AdamW exp_avg + exp_avg_sq (zero = 1: this rank's shard)
    double activations; // the model's arena for one micro-batch (model_activation_floats)
    double dispatch;    // ep > 1: the dispatcher's received rows, saved and scratch (balanced)
    double scratch;     // cuda: attention scores of one sequence, forward and backward, and
                        // (bf16 GEMMs) the bf16 operand workspace, at most 1 GiB; cpu with
                        // precision = bf16: the two bf16 operand buffers of gemm_bf16.c
    double weight_copy; // bf16 GEMMs: the parameters' bf16 copy, 2 bytes each (cuda:
                        // kernels/cuda/weights.cu, 0 with MOET_CUDA_WEIGHT_COPY=0; cpu:
                        // kernels/cpu/gemm_bf16.c, 0 with MOET_CPU_WEIGHT_COPY=0)
    double total;
    double host_stage; // host bytes: MPI staging of device buffers, per group its largest call
                       // (0 on cpu and over NCCL)
    // bytes one rank sends per optimizer step, as comm.c counts them
    double a2a_bytes;       // all-to-all(-v): every row sent, the rows kept for itself included
    double allreduce_bytes; // all-reduces: the buffer bytes contributed (gradients + scalars)
    double allgather_bytes; // zero = 1: this rank's parameter shard, all-gathered after AdamW
    // the quantities the numbers above follow from
    int accum;              // micro-batches per rank per step: global_batch / (micro_batch*world)
    int edp;                // expert-data-parallel group size: world / ep
    double local_params;    // parameters on this rank (floats)
    double routed_rows;     // R = micro_batch * seq_len * top_k rows per micro-batch (0 dense)
    double a2a_exact_bytes; // the part of a2a_bytes that does not depend on the routing: the
                            // rows this rank sends out in dispatch (its own R) and the counts;
                            // the rest (combine and backward return) sends back the rows it
                            // received, R on average when routing is balanced
    double allreduce_grad_bytes; // the gradient part of allreduce_bytes
} MemPlan;

// Bytes per rank for the run of config c on `world` ranks (ep, zero, recompute, micro_batch,
// seq_len, global_batch, device and comm from c). world % c->ep must be 0 (as comm_init checks).
void memplan_predict(const Config *c, int world, MemPlan *mp);

// "memory: peak backend <X> MiB per rank (predicted <Y> MiB)" for the trainer's log after step
// 1, with X the measured peak (ops->mem_stats) and Y = mp->total. Returns snprintf's count.
int memplan_format_peak(char *buf, size_t n, double peak_bytes, const MemPlan *mp);
