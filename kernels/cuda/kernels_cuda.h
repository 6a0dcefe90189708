// kernels_cuda: the CUDA backend's public API, usable from C11. Device management, device
// memory helpers, and device-pointer versions of the ops in kernels/kernels.h (same names with
// a cuda_ prefix, same shapes, same semantics); tests/cuda/ checks each against the CPU op.
#pragma once
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// Conventions
// - Every pointer passed to a cuda_* op is a DEVICE pointer (from cuda_malloc), except the
//   host buffers of cuda_memcpy_* and the info string of cuda_init. Shapes, layouts and the
//   dimension letters are those of kernels.h; as there, forward ops overwrite their outputs,
//   backward ops ACCUMULATE (+=) into their gradients (the caller zeroes them) except the
//   ones kernels.h marks WRITES (rope, swiglu, permute, unpermute, the grouped expert matmuls'
//   dinp, the cross-entropy), and a NULL gradient output is skipped.
// - Streams: for now every op is enqueued on the default (legacy NULL) stream of the calling
//   thread's current device, so ops run in call order and cuda_memcpy_* (synchronous) sees
//   their results. Ops return before the GPU has finished, except cuda_sum_squares, which
//   returns a host value and therefore waits. A stream argument comes when overlap needs it.
// - Errors. cuda_device_count never fails (0 means "no usable device"). cuda_init returns
//   0 on success or 1 (MOET_EFAIL) and a readable message in info. Everything else treats a
//   CUDA error as fatal: it prints "moet: fatal: CUDA error at file:line: call: error" with a
//   hint to stderr and exits with status 1. (After a failed kernel the CUDA context is
//   unusable, and bad launch arguments are bugs, so there is nothing a caller could do.)
//   Kernel faults surface at the next synchronizing call; compile kernels/cuda with
//   -DMOET_CUDA_SYNC_CHECK to synchronize after every launch and report the guilty op.
// - Determinism: every op gives bitwise identical results from run to run on the same
//   device. Reductions use fixed-order trees and per-block partial sums with a second pass,
//   never floating-point atomics; their blocking depends on the shape only, not on the GPU.
// - Scratch: ops that need temporary device memory take it as an argument, sized by the
//   matching *_scratch_bytes function, so that memory stays in the caller's arena.
// - bf16 buffers are uint16_t arrays holding the raw bits of bfloat16 (__nv_bfloat16).

// ---------------------------------------------------------------------------------------
// Devices
// Number of CUDA devices, 0 where there is no driver or no device (never aborts; unexpected
// errors from the runtime are printed as a note and also give 0).
int cuda_device_count(void);
// Selects `device` for the calling thread and checks that it can run this build (compute
// capability 8.0+, code compiled for its architecture). On success writes a one-line
// description into info (name, sm_XY, SM count, memory, driver / runtime versions); on
// failure writes what went wrong and what to do. With info NULL or infolen <= 0 the line goes
// to stderr instead. Returns 0 on success, 1 on failure.
int cuda_init(int device, char *info, int infolen);
// Waits for all work queued on the current device.
void cuda_synchronize(void);

// ---------------------------------------------------------------------------------------
// Device memory (fatal on error, like moet_malloc: an out-of-memory message says how much
// was asked for and how much is free)
void *cuda_malloc(size_t bytes); // 256-byte aligned; bytes == 0 still gives a valid pointer
void cuda_free(void *dptr);      // NULL is ignored
void cuda_zero(void *dptr, size_t bytes);
// Both are ordered with the ops on the default stream. h2d returns when src may be reused;
// d2h waits for the queued ops and returns with dst filled.
void cuda_memcpy_h2d(void *dst, const void *src, size_t bytes);
void cuda_memcpy_d2h(void *dst, const void *src, size_t bytes);

// ---------------------------------------------------------------------------------------
// RMSNorm: out = x * rsqrt(mean(x^2) + eps) * w, reductions in fp32.
// out, x are (N,D), w is (D), rstd is (N) and is saved for backward (may be NULL when no
// backward follows). out may alias x.
void cuda_rmsnorm_forward(float *out, float *rstd, const float *x, const float *w, int N, int D,
                          float eps);
// dx is (N,D), dw is (D), dout and x are (N,D), w is (D), rstd is (N) from the forward.
// dw is reduced without atomics: each block sums its rows into a (D) partial in scratch, then
// a second kernel adds the partials to dw in a fixed order. scratch is a device buffer of
// cuda_rmsnorm_backward_scratch_bytes(N, D) bytes (unused, may be NULL, when dw is NULL).
// With dw set, D is limited by shared memory (D floats per block): D <= 12000 on any GPU,
// up to about 40000 on A100 and 56000 on H100 (opt-in shared memory); larger D is fatal.
void cuda_rmsnorm_backward(float *dx, float *dw, const float *dout, const float *x, const float *w,
                           const float *rstd, int N, int D, void *scratch);
size_t cuda_rmsnorm_backward_scratch_bytes(int N, int D);

// ---------------------------------------------------------------------------------------
// SwiGLU: out = silu(g) * u. out, g, u are (n); out may alias g or u. Backward writes dg, du.
void cuda_swiglu_forward(float *out, const float *g, const float *u, size_t n);
void cuda_swiglu_backward(float *dg, float *du, const float *dout, const float *g, const float *u,
                          size_t n);

// ---------------------------------------------------------------------------------------
// Residual: out = a + b (out may alias a or b). n elements.
void cuda_add_forward(float *out, const float *a, const float *b, size_t n);

// ---------------------------------------------------------------------------------------
// Optimizer and reductions over flat buffers
// AdamW exactly as adamw_update in kernels.h (decoupled weight decay, bias-corrected, step t
// starts at 1, g = grad_scale * grad). p, grad, m, v are (n).
void cuda_adamw_update(float *p, const float *grad, float *m, float *v, size_t n, float lr,
                       float b1, float b2, float eps, float wd, int t, float grad_scale);
// Sum of x^2 over (n) elements, squared and accumulated in double (as on the CPU), in two
// deterministic passes: per-block partials, then one block sums them in order. Waits for the
// result. scratch is a device buffer of cuda_sum_squares_scratch_bytes(n) bytes (<= 8.2 KB).
double cuda_sum_squares(const float *x, size_t n, void *scratch);
size_t cuda_sum_squares_scratch_bytes(size_t n);

// ---------------------------------------------------------------------------------------
// bf16 casts for the compute copies of the fp32 master weights and activations.
// fp32 -> bf16 rounds to nearest even (relative error <= 2^-8; inf stays inf, NaN stays NaN,
// values beyond the bf16 range round to inf). bf16 -> fp32 is exact. out and in are (n).
void cuda_f32_to_bf16(uint16_t *out, const float *in, size_t n);
void cuda_bf16_to_f32(float *out, const uint16_t *in, size_t n);

// ---------------------------------------------------------------------------------------
// Scaling: x *= s over (n) elements.
void cuda_scale_inplace(float *x, float s, size_t n);
// Device memory handed out by cuda_malloc and not yet freed: now and at its peak (bytes).
// cuda_mem_reset_peak sets the peak to the current use.
void cuda_mem_stats(size_t *in_use, size_t *peak);
void cuda_mem_reset_peak(void);
// Device to device copy, ordered with the ops on the default stream.
void cuda_memcpy_d2d(void *dst, const void *src, size_t bytes);

// =======================================================================================
// The model's ops (gemm.cu, attention.cu, ops.cu). Semantics as the CPU ops of kernels.h.

// ---------------------------------------------------------------------------------------
// GEMM precision of every cuBLAS call (matmul, grouped matmul, attention's batched GEMMs):
// 1 (the default): bf16 tensor cores with fp32 accumulation, CUBLAS_COMPUTE_32F_FAST_16BF on
//   fp32 storage: cuBLAS rounds the operands to bf16 (8 significant bits) and accumulates the
//   products in fp32; outputs, master weights and gradients stay fp32.
// 0: exact fp32 (CUBLAS_COMPUTE_32F, TF32 off): the tight comparison with the CPU backend.
void cuda_set_gemm_bf16(int on);
int cuda_gemm_bf16(void);
// Operands of the bf16-mode GEMMs. 1 (the default): each op converts its fp32 operands to bf16
//   (round to nearest even: the rounding FAST_16BF allows) into a workspace and runs cuBLAS on
//   the copies (A, B CUDA_R_16BF, C CUDA_R_32F, CUBLAS_COMPUTE_32F), so that cuBLAS uses the
//   bf16 tensor cores; given fp32 operands with FAST_16BF it picked TF32 kernels (half the rate)
//   on the H100. Outputs, beta = 1 accumulation and everything else stay fp32 as above.
// 0: fp32 operands with CUBLAS_COMPUTE_32F_FAST_16BF (as described above; cuBLAS chooses).
// -1: as the environment variable MOET_CUDA_GEMM_OPERANDS says: fp32 -> 0, bf16, empty or
//   unset -> 1, anything else is fatal. This is also the initial state, read at the first GEMM, so that one
//   device run can A/B the two: MOET_CUDA_GEMM_OPERANDS=fp32 moet bench CONFIG.
// The getter gives the setting, whether or not bf16 mode is on; fp32 mode ignores it.
void cuda_set_gemm_bf16_operands(int on);
int cuda_gemm_bf16_operands(void);
// The bf16 operand workspace: one device buffer, grown to what the largest chunk of an op
// needs, kept until the process ends and counted by cuda_mem_stats. Ops cut their work into
// chunks (rows, experts, heads) that fit the limit (default 1 GiB; 0 restores it; a lower limit
// frees a larger buffer); only a single chunk that cannot be cut further (one weight matrix
// with one row; one sequence's q, k, v, dO with one head's bf16 P and dS) may exceed it.
// cuda_gemm_workspace_bytes gives the bytes allocated now.
void cuda_set_gemm_workspace_limit(size_t bytes);
size_t cuda_gemm_workspace_bytes(void);
// How the bf16-operand GEMMs reach cuBLAS. 1 (the default): through cuBLASLt, with the
//   algorithm chosen once per shape class and kept in a cache of gemm.cu. The class is the
//   exact shape, except that a dimension no leading dimension bounds (an expert's row count)
//   is rounded up to 8 steps per octave (2560 stays, 2561..2816 become 2816): the experts' row
//   counts change every step, and cublasGemmEx runs its host-side heuristic for every new
//   shape. A cached algorithm that cuBLASLt refuses for the exact shape falls back to
//   cublasGemmEx for that call (counted, see CudaHostStats). The choice depends on the shape
//   class only, never on the order of calls, so results stay run-to-run identical.
// 0: cublasGemmEx on every call, as before 2026-11-27.
// -1: as MOET_CUDA_GEMM_LT says: 0 -> 0; 1, empty or unset -> 1; anything else is fatal (also
//   the initial state, read at the first GEMM: MOET_CUDA_GEMM_LT=0 moet bench CONFIG is the A/B).
void cuda_set_gemm_lt(int on);
int cuda_gemm_lt(void);
// Streams of the grouped expert GEMMs on bf16 operands (gemm.cu). n >= 2: the experts of each
//   piece of rows are issued round-robin on n non-blocking streams (each with its own cuBLAS
//   handle and 32 MiB cuBLASLt workspace), between a fork after the piece's conversions and a
//   join before the next op, so that small expert GEMMs fill the GPU together (pieces with
//   fewer than 16 rows per expert on average, as in decoding, stay on the legacy stream).
//   Results are the same bits for every n. 1: all on the legacy stream, as before 2026-11-27.
//   Default 4; at most 8 (larger values are clamped, smaller give 1).
// -1: as MOET_CUDA_GEMM_STREAMS says: unset or empty -> 4; 1..8 -> that; anything else is fatal
//   (also the initial state, read at the first grouped GEMM).
void cuda_set_gemm_streams(int n);
int cuda_gemm_streams(void);

// The bf16 copy of the parameters for the GEMMs on bf16 operands (weights.cu). p[0..n) are the
//   model's parameters (NULL or n = 0: none): a GEMM op whose weight lies there reads a bf16
//   copy of them instead of converting the weight itself; the copy is converted block by block
//   where a GEMM needs it, kept up to date by cuda_adamw_update, and marked stale where
//   cuda_weights_written says something else wrote (ops_cuda.cu calls it for to_device, copy,
//   zero, zero_fill and scale_inplace; Ops.params_written for writes outside the op table).
//   2 bytes of device memory per parameter, allocated at the first GEMM that uses it.
void cuda_weights_register(const float *p, size_t n);
void cuda_weights_written(const void *p, size_t bytes);
void cuda_weights_freed(const void *p); // p is being freed: forget it if it is the registered p
size_t cuda_weight_copy_bytes(void);    // allocated now (0 before the first use)
// 1 (the default): the copy above; 0: every op converts its weights, as before 2026-11-27.
// -1: as MOET_CUDA_WEIGHT_COPY says: unset, empty or 1 -> 1; 0 -> 0; anything else is fatal
//   (also the initial state, read at the first registration). Takes effect at the next
//   cuda_weights_register.
void cuda_set_weight_copy(int on);
int cuda_weight_copy(void);

// Host-side accounting of the GEMM calls and of the waits for the device, for `moet bench` to
// tell a host-bound step (the host busy issuing work while the GPU idles) from a device-bound
// one (the host waiting in copies to the host). Counted since the last reset.
typedef struct CudaHostStats {
    unsigned long long gemm_calls; // cuBLAS / cuBLASLt GEMM calls (a batched call counts once)
    unsigned long long lt_calls;   // of these, run by cuBLASLt with a cached algorithm
    unsigned long long lt_queries; // cuBLASLt heuristic queries (algorithm cache misses)
    unsigned long long lt_fallbacks; // cached algorithm refused: cublasGemmEx ran instead
    unsigned long long side_calls; // GEMM calls issued on a side stream (cuda_set_gemm_streams)
    unsigned long long weight_converted; // parameters converted into the weight copy (weights.cu)
    double gemm_host_s;            // host seconds inside the GEMM library calls
    double wait_s;                 // host seconds in copies to the host and device syncs
} CudaHostStats;
void cuda_host_stats(CudaHostStats *s);
void cuda_host_stats_reset(void);
// Timing marks (Ops.mark, Ops.mark_ms): cuda_mark records event i (created on first use) on
// the legacy stream; cuda_mark_ms waits for event j and returns the ms from event i to j.
void cuda_mark(int i);
double cuda_mark_ms(int i, int j);

// Matmul (cuBLAS, row-major as kernels.h): out = inp @ w^T; backward accumulates
// dinp += dout @ w and dw += dout^T @ inp (either may be NULL).
void cuda_matmul_forward(float *out, const float *inp, const float *w, int N, int C, int OC);
void cuda_matmul_backward(float *dinp, float *dw, const float *dout, const float *inp,
                          const float *w, int N, int C, int OC);

// Grouped expert matmul as kernels.h, except that offsets (E+1) is a HOST array (the row
// counts decide the GEMM shapes, which cuBLAS takes from the host). Backward writes dinp (beta =
// 0) and accumulates dw; experts with no rows are skipped (their dw is untouched).
void cuda_grouped_matmul_forward(float *out, const float *inp, const float *w,
                                 const int32_t *offsets_host, int E, int C, int OC);
void cuda_grouped_matmul_backward(float *dinp, float *dw, const float *dout, const float *inp,
                                  const float *w, const int32_t *offsets_host, int E, int C,
                                  int OC);
// The pair of grouped matmuls of one input (the experts' gate and up): forward, the results of
// the two calls on (out_a, w_a) then (out_b, w_b); backward as kernels.h's
// grouped_matmul_backward_pair (dinp = dout_a @ w_a + dout_b @ w_b written, dw_a and dw_b
// accumulated). On bf16 operands the input's rows are converted once, not twice.
void cuda_grouped_matmul_forward_pair(float *out_a, float *out_b, const float *inp,
                                      const float *w_a, const float *w_b,
                                      const int32_t *offsets_host, int E, int C, int OC);
void cuda_grouped_matmul_backward_pair(float *dinp, float *dw_a, float *dw_b, const float *dout_a,
                                       const float *dout_b, const float *inp, const float *w_a,
                                       const float *w_b, const int32_t *offsets_host, int E,
                                       int C, int OC);

// ---------------------------------------------------------------------------------------
// Causal attention as kernels.h (q, k, v, out (B,T,H,Dh); lse (B,H,T)): per sequence, batched
// GEMMs over the heads for the scores, a causal softmax kernel that saves lse, and batched
// GEMMs for the output; backward recomputes the probabilities from lse. scratch holds the
// score matrices of one sequence: cuda_attention_scratch_bytes(T, H) bytes.
void cuda_attention_forward(float *out, float *lse, const float *q, const float *k,
                            const float *v, int B, int T, int H, int Dh, void *scratch);
void cuda_attention_backward(float *dq, float *dk, float *dv, const float *dout, const float *out,
                             const float *lse, const float *q, const float *k, const float *v,
                             int B, int T, int H, int Dh, void *scratch);
size_t cuda_attention_scratch_bytes(int T, int H);
// Causal query blocks of the training attention: the queries go in blocks of qb rows, and
// block [t0, t0 + qb) computes its scores, probabilities and products against keys [0, t0 + qb)
// only, so the GEMMs skip most of the masked upper triangle (with 4 blocks they do 5/8 of the
// square's work). 0 (the default) picks qb: T itself below T = 512 (one block), else
// ceil(T / 4) rounded up to a multiple of 64. Any qb >= 1 forces that size (for the tests).
// -1, also the initial setting (read at the first attention): as MOET_CUDA_ATTN_QBLOCK says
// (unset or 0: the default rule; N: blocks of N rows, so N >= seq_len runs one block, the A/B
// comparison; anything else is fatal).
// Results equal the unblocked ones up to fp32 summation order (the backward's dK and dV sum
// over the blocks in block order: still the same bits from run to run).
void cuda_set_attention_query_block(int qb);
int cuda_attention_query_block(int T);
// The flash forward (attention_flash.cu, opt-in): in bf16-operand mode the training
// attention's forward runs as one fused kernel per sequence (scores on chip, the causal half of
// the work, no (H,T,T) matrix) for head sizes 16, 32, 64 and 128; the backward is unchanged (it
// recomputes the scores and reads the forward's lse). On an H100 it is no faster than the GEMM
// path yet, so it is off by default. cuda_set_attention_flash(1) on, 0 off (the GEMM path,
// with its query blocks), -1 (also the initial setting, read at the first attention): as
// MOET_CUDA_ATTN_FLASH says (1 on; unset, empty or 0 off; anything else fatal).
// cuda_attention_flash(Dh): 1 when a forward of head size Dh takes the kernel.
void cuda_set_attention_flash(int on);
int cuda_attention_flash(int Dh);
// Generation (kernels.h attention_forward_cached): Tq queries over Tk cached keys of one
// sequence; scratch holds the (H,Tq,Tk) scores: cuda_attention_cached_scratch_bytes bytes.
void cuda_attention_forward_cached(float *out, const float *q, const float *k, const float *v,
                                   int Tq, int Tk, int H, int Dh, void *scratch);
size_t cuda_attention_cached_scratch_bytes(int Tq, int Tk, int H);

// ---------------------------------------------------------------------------------------
// Embedding. Backward is deterministic without atomics: the host sorts the token positions by
// token id (stable), the plan goes to scratch, and one block per distinct token sums its
// rows in position order. tokens_host is the HOST copy of the (N) token ids.
void cuda_embedding_forward(float *out, const int32_t *tokens, const float *wte, int N, int D);
void cuda_embedding_backward(float *dwte, const float *dout, const int32_t *tokens_host, int N,
                             int D, void *scratch);
size_t cuda_embedding_backward_scratch_bytes(int N);

// RoPE as kernels.h (both may work in place; backward writes dinp).
void cuda_rope_forward(float *out, const float *inp, int B, int T, int H, int Dh, float theta);
void cuda_rope_backward(float *dinp, const float *dout, int B, int T, int H, int Dh,
                        float theta);
void cuda_rope_forward_at(float *out, const float *inp, int T, int H, int Dh, float theta,
                          int pos0);

// ---------------------------------------------------------------------------------------
// Router, dispatch plan, permute / unpermute: kernels.h semantics, device pointers.
void cuda_router_forward(float *probs, float *lse, int32_t *topk_idx, float *topk_w,
                         const float *logits, int N, int E, int K, int norm_topk);
void cuda_router_backward(float *dlogits, const float *dtopk_w, const float *dprob_bias,
                          float dz_coef, const float *probs, const float *lse,
                          const int32_t *topk_idx, const float *topk_w, int N, int E, int K,
                          int norm_topk);
// The auxiliary-loss sums of a layer, returned to HOST memory (waits):
// prob_sum_host[e] = sum_t probs[t,e] (E doubles), *lse_sq_sum_host = sum_t lse[t]^2.
void cuda_router_aux_sums(double *prob_sum_host, double *lse_sq_sum_host, const float *probs,
                          const float *lse, int N, int E, void *scratch);
size_t cuda_router_aux_sums_scratch_bytes(int N, int E);
// The router of kernels.h with all of its options (issue 11): score_fn ROUTER_SOFTMAX (0) or
// ROUTER_SIGMOID (1), a selection bias (E floats, or NULL) added to the scores for the top-k
// only, and the logits for the sigmoid's backward (NULL allowed for softmax). cuda_router_forward
// and cuda_router_backward above are its softmax case without a bias.
void cuda_router_forward_ext(float *probs, float *lse, int32_t *topk_idx, float *topk_w,
                             const float *logits, const float *bias, int N, int E, int K,
                             int norm_topk, int score_fn);
void cuda_router_backward_ext(float *dlogits, const float *dtopk_w, const float *dprob_bias,
                              float dz_coef, const float *probs, const float *lse,
                              const float *logits, const int32_t *topk_idx, const float *topk_w,
                              int N, int E, int K, int norm_topk, int score_fn);
// Stable counting sort of the N*K assignments by expert, exactly the plan of moe_plan.
void cuda_moe_plan(int32_t *counts, int32_t *offsets, int32_t *row_token, int32_t *assign_row,
                   const int32_t *topk_idx, int N, int K, int E, void *scratch);
size_t cuda_moe_plan_scratch_bytes(int N, int K, int E);
void cuda_permute_forward(float *xp, const float *x, const int32_t *row_token, int R, int D);
void cuda_permute_backward(float *dx, const float *dxp, const int32_t *assign_row, int N, int K,
                           int D);
void cuda_unpermute_forward(float *out, const float *yp, const float *topk_w,
                            const int32_t *assign_row, int N, int K, int D);
void cuda_unpermute_backward(float *dyp, float *dtopk_w, const float *dout, const float *yp,
                             const float *topk_w, const int32_t *assign_row, int N, int K, int D);

// ---------------------------------------------------------------------------------------
// Cross-entropy as kernels.h: one block per row; the summed loss is reduced in double in a
// fixed order and returned (waits). scratch: cuda_crossentropy_scratch_bytes(N).
double cuda_crossentropy_forward(float *losses, const float *logits, const int32_t *targets,
                                 int N, int V, void *scratch);
double cuda_crossentropy_forward_backward(float *dlogits, float *losses, const float *logits,
                                          const int32_t *targets, int N, int V, float scale,
                                          void *scratch);
size_t cuda_crossentropy_scratch_bytes(int N);

#ifdef __cplusplus
}
#endif
