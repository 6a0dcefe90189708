// ops: the op set of kernels.h as a table of functions, one table per backend, so that the
// model, the optimizer and the trainer run the same code on the CPU and on a GPU
// (ARCHITECTURE §8). ops_cpu() wraps kernels/cpu/ (the reference); ops_cuda() wraps the
// cuda_* functions of kernels/cuda/kernels_cuda.h.
//
// Memory. Buffers from alloc belong to the backend: on the GPU they are device memory that the
// host must not read or write; data moves with to_device / to_host. Every op takes backend
// pointers, except the few arguments marked HOST below, which are small host arrays the caller
// already has (the expert row offsets that decide GEMM shapes, the token ids, the auxiliary
// loss sums). Ops that need temporary memory (attention scores, reduction partials) take it
// from a scratch buffer the backend owns and grows on demand.
// Order. The ops run in call order; to_host and the functions that return a value wait for the
// ops before them.
#pragma once
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct Ops {
    const char *name; // "cpu" or "cuda"
    int on_device;    // 1: alloc gives memory the host must not touch

    // memory
    void *(*alloc)(size_t bytes); // zeroed; fatal when out of memory
    void (*free)(void *p);        // NULL is ignored
    void (*zero)(void *p, size_t bytes);
    void (*to_device)(void *dst, const void *host_src, size_t bytes);
    void (*to_host)(void *host_dst, const void *src, size_t bytes);
    void (*copy)(void *dst, const void *src, size_t bytes);
    void (*sync)(void);
    // bytes allocated through alloc now and at the peak (0, 0 where not tracked)
    void (*mem_stats)(size_t *in_use, size_t *peak);
    // Optional (NULL: nothing to do). params_register: p[0..n) are the model's parameters, the
    // weights of the matmuls, until the next call or until free(p) (NULL, 0: none). A backend
    // may keep them converted for its GEMMs (cuda: a bf16 copy, kernels/cuda/weights.cu); it
    // notices the writes through this table (to_device, copy, zero, zero_fill, scale_inplace,
    // adamw_update). Whatever writes into them otherwise (a collective) calls params_written
    // for the bytes it writes, before the next matmul reads them.
    void (*params_register)(const float *p, size_t n);
    void (*params_written)(const void *p, size_t bytes);
    // Optional timing marks for ops_profile (NULL: the host clock serves, as on the CPU, whose
    // ops have finished when they return). mark(i) records mark i (i >= 0) in the order of the
    // ops: on cuda an event on the stream every op runs on, timestamped when the GPU gets
    // there. mark_ms(i, j) waits for mark j and returns the milliseconds from mark i to mark j.
    void (*mark)(int i);
    double (*mark_ms)(int i, int j);

    // the ops of kernels.h (same arguments and semantics unless noted)
    void (*embedding_forward)(float *out, const int32_t *tokens, const float *wte, int N, int D);
    // tokens_host: HOST copy of the (N) token ids
    void (*embedding_backward)(float *dwte, const float *dout, const int32_t *tokens_host, int N,
                               int D);
    void (*rmsnorm_forward)(float *out, float *rstd, const float *x, const float *w, int N, int D,
                            float eps);
    void (*rmsnorm_backward)(float *dx, float *dw, const float *dout, const float *x,
                             const float *w, const float *rstd, int N, int D);
    void (*matmul_forward)(float *out, const float *inp, const float *w, int N, int C, int OC);
    void (*matmul_backward)(float *dinp, float *dw, const float *dout, const float *inp,
                            const float *w, int N, int C, int OC);
    void (*rope_forward)(float *out, const float *inp, int B, int T, int H, int Dh, float theta);
    void (*rope_backward)(float *dinp, const float *dout, int B, int T, int H, int Dh, float theta);
    void (*rope_forward_at)(float *out, const float *inp, int T, int H, int Dh, float theta,
                            int pos0);
    void (*attention_forward_cached)(float *out, const float *q, const float *k, const float *v,
                                     int Tq, int Tk, int H, int Dh);
    void (*attention_forward)(float *out, float *lse, const float *q, const float *k,
                              const float *v, int B, int T, int H, int Dh);
    void (*attention_backward)(float *dq, float *dk, float *dv, const float *dout, const float *out,
                               const float *lse, const float *q, const float *k, const float *v,
                               int B, int T, int H, int Dh);
    void (*swiglu_forward)(float *out, const float *g, const float *u, size_t n);
    void (*swiglu_backward)(float *dg, float *du, const float *dout, const float *g, const float *u,
                            size_t n);
    void (*add_forward)(float *out, const float *a, const float *b, size_t n);
    void (*router_forward)(float *probs, float *lse, int32_t *topk_idx, float *topk_w,
                           const float *logits, const float *bias, int N, int E, int K,
                           int norm_topk, int score_fn);
    void (*router_backward)(float *dlogits, const float *dtopk_w, const float *dprob_bias,
                            float dz_coef, const float *probs, const float *lse,
                            const float *logits, const int32_t *topk_idx, const float *topk_w,
                            int N, int E, int K, int norm_topk, int score_fn);
    // HOST outputs: prob_sum_host (E), *lse_sq_sum_host (see router_aux_sums in kernels.h)
    void (*router_aux_sums)(double *prob_sum_host, double *lse_sq_sum_host, const float *probs,
                            const float *lse, int N, int E);
    void (*moe_plan)(int32_t *counts, int32_t *offsets, int32_t *row_token, int32_t *assign_row,
                     const int32_t *topk_idx, int N, int K, int E);
    void (*permute_forward)(float *xp, const float *x, const int32_t *row_token, int R, int D);
    void (*permute_backward)(float *dx, const float *dxp, const int32_t *assign_row, int N, int K,
                             int D);
    void (*unpermute_forward)(float *out, const float *yp, const float *topk_w,
                              const int32_t *assign_row, int N, int K, int D);
    void (*unpermute_backward)(float *dyp, float *dtopk_w, const float *dout, const float *yp,
                               const float *topk_w, const int32_t *assign_row, int N, int K, int D);
    // offsets_host: HOST (E+1) row offsets
    void (*grouped_matmul_forward)(float *out, const float *inp, const float *w,
                                   const int32_t *offsets_host, int E, int C, int OC);
    void (*grouped_matmul_backward)(float *dinp, float *dw, const float *dout, const float *inp,
                                    const float *w, const int32_t *offsets_host, int E, int C,
                                    int OC);
    // Optional (NULL: the two calls): the grouped matmul of one input with two weight tensors
    // (the experts' gate and up), with the results of grouped_matmul_forward on (out_a, w_a)
    // then (out_b, w_b). For a backend that converts its operands (cuda: the input's rows once,
    // not twice).
    void (*grouped_matmul_forward_pair)(float *out_a, float *out_b, const float *inp,
                                        const float *w_a, const float *w_b,
                                        const int32_t *offsets_host, int E, int C, int OC);
    // The backward of those two (kernels.h; every backend has it: dinp is written, so two
    // grouped_matmul_backward calls could not sum into it).
    void (*grouped_matmul_backward_pair)(float *dinp, float *dw_a, float *dw_b,
                                         const float *dout_a, const float *dout_b,
                                         const float *inp, const float *w_a, const float *w_b,
                                         const int32_t *offsets_host, int E, int C, int OC);
    double (*crossentropy_forward)(float *losses, const float *logits, const int32_t *targets,
                                   int N, int V);
    double (*crossentropy_forward_backward)(float *dlogits, float *losses, const float *logits,
                                            const int32_t *targets, int N, int V, float scale);
    void (*adamw_update)(float *p, const float *grad, float *m, float *v, size_t n, float lr,
                         float b1, float b2, float eps, float wd, int t, float grad_scale);
    double (*sum_squares)(const float *x, size_t n);
    void (*scale_inplace)(float *x, float s, size_t n);
    void (*zero_fill)(float *x, size_t n);
} Ops;

// The CPU backend (always present).
const Ops *ops_cpu(void);
// The CPU backend with bf16 GEMM operands and fp32 accumulation in the dense, expert and
// LM-head matmuls ([train] precision = bf16 on cpu; kernels/cpu/gemm_bf16.c). Everything
// else is ops_cpu()'s. Call ops_cpu_bf16_open first: 0 where it can run, else 1 and the
// reason in info.
const Ops *ops_cpu_bf16(void);
int ops_cpu_bf16_open(char *info, int infolen);
// The CPU backend behind tagged "device" pointers that the host cannot dereference
// (kernels/cpu/ops_shadow.c): bit-identical to ops_cpu(), it proves without a GPU that the
// model, optimizer, trainer and checkpoints move backend memory only through the table.
const Ops *ops_cpu_shadow(void);
// The op-level profiler (kernels/cpu/ops_profile.c, `moet bench --profile`): a table that runs
// every op of `inner` (results bit for bit the same) and, inside ops_profile_step_begin/_end,
// times each op between two marks (inner->mark, else the host clock). The times add up per op
// and shape over the profiled steps: where a step goes, op by op, with the FLOP rate of the
// matmuls and attention, the bandwidth of the other ops, and the time between ops (host code;
// on a GPU the time it waited for the host). One profiled table per process: a second
// ops_profile() call replaces the first.
const Ops *ops_profile(const Ops *inner);
void ops_profile_reset(void);      // forget the totals
void ops_profile_step_begin(void); // the ops from here on are timed
void ops_profile_step_end(void);   // waits for the step's last op and adds its times up
typedef struct {
    const char *op;   // the op's name in the table ("grouped_matmul_forward_pair", ...)
    int c, oc;        // matmuls: inner and output width (C, OC); else 0
    long calls;       // over the profiled steps
    double ms;        // total time inside the op, over the profiled steps
    double before_ms; // total time from the previous op's end (or the step's start) to its start
    double flops;     // total FLOPs (matmuls, attention: full square, as ARCHITECTURE §10); else 0
    double bytes;     // total bytes the other ops must move at least (fp32 reads + writes); else 0
} OpsProfileRow;
// The totals so far, largest ms first: fills rows[0..min(n, max)) and returns n, the number of
// rows there are. *steps, *span_ms (first mark to last, summed over the steps) and *between_ms
// (the span's time outside every op) where not NULL.
int ops_profile_rows(OpsProfileRow *rows, int max, int *steps, double *span_ms, double *between_ms);
// Prints the totals per step as a table (unit "GFLOP/s" or "TFLOP/s" for the rate column).
void ops_profile_print(FILE *f, int tflops);
// The CUDA backend, NULL in a build without CUDA. Call ops_cuda_open first.
const Ops *ops_cuda(void);
// Selects GPU `device` for this process and sets the GEMM precision (bf16: 1, exact fp32: 0).
// Returns 0 and a one-line description in info, or 1 with the reason in info (no CUDA in this
// build, no GPU, unsupported GPU).
int ops_cuda_open(int device, int gemm_bf16, char *info, int infolen);
// Number of CUDA devices (0 without CUDA or without a GPU).
int ops_cuda_device_count(void);
// The dense bf16 tensor-core peak of the open GPU in TFLOP/s for MFU (ARCHITECTURE §10):
// 989 for H100 / H200 (sm_90), 312 for A100 (sm_80), else 0 (unknown).
double ops_cuda_peak_tflops(void);
// The CUDA backend's host-side accounting (CudaHostStats in kernels/cuda/kernels_cuda.h): reset
// it, and write one line about the `steps` steps since the reset into buf: GEMM calls, how
// many cuBLASLt ran from its algorithm cache, heuristic queries, fallbacks, host time inside
// the GEMM calls and host time waiting for the GPU, per step. Returns 0 and writes nothing in
// a build without CUDA.
void ops_cuda_host_stats_reset(void);
int ops_cuda_host_stats_line(char *buf, int len, int steps);

#ifdef __cplusplus
}
#endif
