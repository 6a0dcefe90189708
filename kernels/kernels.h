// kernels: the op set that every backend implements, forward and backward.
// kernels/cpu/ is the fp32 reference (C11 + OpenMP + OpenBLAS sgemm); kernels/cuda/ mirrors it
// op for op and is tested against it. The model code calls only these functions.
#pragma once
#include <stddef.h>
#include <stdint.h>

// Conventions (dimension letters as in STYLE.md):
//   B batch, T sequence, D d_model, H heads, Dh head dim, F expert/MLP width, E experts,
//   K top-k, V padded vocab, N tokens on this rank (B*T), R routed rows (N*K).
// - Matrices are row-major; weights are stored (out, in) as in HF / torch.nn.Linear.
// - Every backward function ACCUMULATES (+=) into its gradient outputs, activations and
//   parameters alike; the caller zeroes them. A NULL gradient output is skipped.
//   Exceptions, marked WRITES below: the backward of an op whose input has no other way into
//   the loss in the model (rope, swiglu, permute, unpermute, the grouped expert matmuls' input,
//   the cross-entropy) writes (=) those gradients, so the caller neither zeroes them nor has
//   them read back (less memory traffic). Parameter gradients always accumulate.
// - Forward functions overwrite their outputs.
// - Token-indexed activations are (N, C) with N = B*T in (b, t) order.

// ---------------------------------------------------------------------------------------
// Embedding
// out is (N,D), tokens is (N), wte is (V,D)
void embedding_forward(float *out, const int32_t *tokens, const float *wte, int N, int D);
// dwte is (V,D); rows of tokens that repeat are summed in token order (deterministic)
void embedding_backward(float *dwte, const float *dout, const int32_t *tokens, int N, int D);

// ---------------------------------------------------------------------------------------
// RMSNorm: out = x * rsqrt(mean(x^2) + eps) * w, reductions in fp32 (double on CPU).
// out, x are (N,D), w is (D), rstd is (N) and is saved for backward
void rmsnorm_forward(float *out, float *rstd, const float *x, const float *w, int N, int D,
                     float eps);
void rmsnorm_backward(float *dx, float *dw, const float *dout, const float *x, const float *w,
                      const float *rstd, int N, int D);

// ---------------------------------------------------------------------------------------
// Matmul: out = inp @ w^T (torch.nn.Linear without bias).
// out is (N,OC), inp is (N,C), w is (OC,C)
void matmul_forward(float *out, const float *inp, const float *w, int N, int C, int OC);
// dinp is (N,C), dw is (OC,C), dout is (N,OC)
void matmul_backward(float *dinp, float *dw, const float *dout, const float *inp, const float *w,
                     int N, int C, int OC);

// ---------------------------------------------------------------------------------------
// RoPE, rotate-half layout (pairs i and i + Dh/2), HF convention; position = t within each
// sequence. inp/out are (B,T,H,Dh) = (N, H*Dh). Both may work in place (out == inp,
// dinp == dout); backward WRITES dinp = R^T dout.
void rope_forward(float *out, const float *inp, int B, int T, int H, int Dh, float theta);
void rope_backward(float *dinp, const float *dout, int B, int T, int H, int Dh, float theta);
// RoPE for generation: one sequence of T rows at positions pos0 .. pos0+T-1 (a prompt, or the
// tokens after a KV cache of pos0). inp/out are (T,H,Dh); in place allowed.
void rope_forward_at(float *out, const float *inp, int T, int H, int Dh, float theta, int pos0);

// ---------------------------------------------------------------------------------------
// Causal softmax attention, scale 1/sqrt(Dh), n_kv = n_heads.
// q, k, v, out are (B,T,H,Dh); lse is (B,H,T): the log-sum-exp of each softmax row, saved so
// that backward recomputes the probabilities block by block instead of storing (T,T).
void attention_forward(float *out, float *lse, const float *q, const float *k, const float *v,
                       int B, int T, int H, int Dh);
void attention_backward(float *dq, float *dk, float *dv, const float *dout, const float *out,
                        const float *lse, const float *q, const float *k, const float *v, int B,
                        int T, int H, int Dh);
// Attention of Tq new queries over a KV cache of one sequence (generation): the cache holds the
// keys and values of positions 0 .. Tk-1, the queries are positions Tk-Tq .. Tk-1 (already in
// the cache), and query i sees keys [0, Tk-Tq+i]. q, out are (Tq,H,Dh); k, v are (Tk,H,Dh).
// Tq = Tk is the causal attention_forward of one sequence (without lse).
void attention_forward_cached(float *out, const float *q, const float *k, const float *v, int Tq,
                              int Tk, int H, int Dh);

// ---------------------------------------------------------------------------------------
// SwiGLU: out = silu(g) * u. out, g, u are (n). Backward WRITES dg and du.
void swiglu_forward(float *out, const float *g, const float *u, size_t n);
void swiglu_backward(float *dg, float *du, const float *dout, const float *g, const float *u,
                     size_t n);

// ---------------------------------------------------------------------------------------
// Residual: out = a + b (out may alias a or b). n elements.
void add_forward(float *out, const float *a, const float *b, size_t n);

// ---------------------------------------------------------------------------------------
// Router: the scores of the logits, top-k selection, the top-k weights (§3 and issue 11).
//   score_fn ROUTER_SOFTMAX (OLMoE): probs = softmax(logits); the score s = probs.
//   score_fn ROUTER_SIGMOID (DeepSeek-V3): s = sigmoid(logits); probs = s / sum_e s, the scores
//     normalised over all experts (the P of the load-balancing loss).
// Both: lse = logsumexp(logits) (the z-loss stays on the logits), exp / sigmoid in double and
// probs rounded to float once. Top-k by s + bias[e] (a float addition; bias NULL: by s),
// descending; ties go to the lower expert index. The bias only chooses: weights = the k scores
// s of the chosen experts, divided by their sum when norm_topk is set.
// logits, probs are (N,E); bias is (E) or NULL; lse is (N); topk_idx, topk_w are (N,K)
enum { ROUTER_SOFTMAX = 0, ROUTER_SIGMOID = 1 };
void router_forward(float *probs, float *lse, int32_t *topk_idx, float *topk_w,
                    const float *logits, const float *bias, int N, int E, int K, int norm_topk,
                    int score_fn);
// Router backward. dprobs (the gradient reaching probs) = the top-k weights' gradient dtopk_w
// (through the optional renormalisation) on the scores of the chosen experts, plus
// dprob_bias[e] on probs[t,e] for every token (the load-balancing term); then through the score
// function, plus dz_coef * 2*lse * softmax(logits) (the z-loss):
//   softmax: dlogits += J_softmax^T dprobs + dz_coef * 2*lse*probs
//   sigmoid: dlogits += s(1-s) * (d/ds of both terms, s -> probs = s/sum s included)
//            + dz_coef * 2*lse*exp(logits - lse)
// dlogits, logits are (N,E); dtopk_w is (N,K) or NULL (zero); dprob_bias is (E) or NULL;
// dz_coef is one scalar, d loss / d lse_t^2, the same for every token (0 to skip). logits is
// read by the sigmoid only (NULL allowed for softmax). topk_w is not read: the backward
// recomputes the weights from probs (softmax) or the logits (sigmoid) in double.
void router_backward(float *dlogits, const float *dtopk_w, const float *dprob_bias,
                     float dz_coef, const float *probs, const float *lse, const float *logits,
                     const int32_t *topk_idx, const float *topk_w, int N, int E, int K,
                     int norm_topk, int score_fn);

// The sums behind the auxiliary losses of §3: prob_sum[e] = sum_t probs[t,e] and
// *lse_sq_sum = sum_t lse[t]^2, accumulated in double in token order.
// probs is (N,E), lse is (N), prob_sum is (E)
void router_aux_sums(double *prob_sum, double *lse_sq_sum, const float *probs, const float *lse,
                     int N, int E);

// ---------------------------------------------------------------------------------------
// Dispatch plan: a stable counting sort of the N*K assignments by expert. Routed row r
// (0 <= r < R = N*K) holds token row_token[r]; expert e owns rows [offsets[e], offsets[e+1]).
// assign_row[t*K + j] is the row that assignment (t, j) went to. Within an expert, rows are in
// (t, j) order, so the plan is deterministic.
// counts is (E), offsets is (E+1), row_token is (R), assign_row is (N*K)
void moe_plan(int32_t *counts, int32_t *offsets, int32_t *row_token, int32_t *assign_row,
              const int32_t *topk_idx, int N, int K, int E);

// Permute: xp[r] = x[row_token[r]]. xp is (R,D), x is (N,D)
void permute_forward(float *xp, const float *x, const int32_t *row_token, int R, int D);
// WRITES dx[t] = sum_j dxp[assign_row[t*K+j]], j in order: a gather per token, no atomics
void permute_backward(float *dx, const float *dxp, const int32_t *assign_row, int N, int K,
                      int D);

// Unpermute + weighted combine: out[t] = sum_j w[t,j] * yp[assign_row[t*K+j]], j in order.
// out is (N,D), yp is (R,D), topk_w is (N,K)
void unpermute_forward(float *out, const float *yp, const float *topk_w,
                       const int32_t *assign_row, int N, int K, int D);
// WRITES dyp[row] = w * dout[t] and dtopk_w[t,j] = dot(dout[t], yp[row]) for every
// assignment (t, j) and its row = assign_row[t*K+j]: every routed row once
void unpermute_backward(float *dyp, float *dtopk_w, const float *dout, const float *yp,
                        const float *topk_w, const int32_t *assign_row, int N, int K, int D);

// ---------------------------------------------------------------------------------------
// Grouped expert matmul over rows permuted by expert: for every expert e,
// out[offsets[e]:offsets[e+1]] = inp[same rows] @ w[e]^T.
// out is (R,OC), inp is (R,C), w is (E,OC,C), offsets is (E+1) with offsets[0] = 0
void grouped_matmul_forward(float *out, const float *inp, const float *w,
                            const int32_t *offsets, int E, int C, int OC);
// WRITES dinp[offsets[e]:offsets[e+1]] = dout[same rows] @ w[e] (the rows of every expert);
// dw[e] += dout[rows]^T @ inp[rows]; experts with no rows get no gradient.
// dinp is (R,C), dw is (E,OC,C)
void grouped_matmul_backward(float *dinp, float *dw, const float *dout, const float *inp,
                             const float *w, const int32_t *offsets, int E, int C, int OC);
// The backward of two grouped matmuls of the same input (the experts' gate and up): WRITES
// dinp = dout_a @ w_a + dout_b @ w_b per expert (a's product, then b's added to it), and
// dw_a, dw_b accumulate as in grouped_matmul_backward. Any output may be NULL.
void grouped_matmul_backward_pair(float *dinp, float *dw_a, float *dw_b, const float *dout_a,
                                  const float *dout_b, const float *inp, const float *w_a,
                                  const float *w_b, const int32_t *offsets, int E, int C, int OC);

// ---------------------------------------------------------------------------------------
// The same matmuls with bf16 operands and fp32 accumulation (kernels/cpu/gemm_bf16.c,
// [train] precision = bf16 on cpu, through oneDNN): the operands are rounded to bf16 (nearest
// even), the products and the accumulation into out / dinp / dw are fp32.
// cpu_bf16_gemm_open returns 0 where they can run, else 1 with the reason in why (a build
// without oneDNN, a CPU without bf16 dot products); the matmuls exit with that reason.
int cpu_bf16_gemm_open(char *why, int len);
const char *cpu_bf16_gemm_info(void); // e.g. "oneDNN 2.6.3 bf16 matmul"
void matmul_forward_bf16(float *out, const float *inp, const float *w, int N, int C, int OC);
void matmul_backward_bf16(float *dinp, float *dw, const float *dout, const float *inp,
                          const float *w, int N, int C, int OC);
void grouped_matmul_forward_bf16(float *out, const float *inp, const float *w,
                                 const int32_t *offsets, int E, int C, int OC);
void grouped_matmul_backward_bf16(float *dinp, float *dw, const float *dout, const float *inp,
                                  const float *w, const int32_t *offsets, int E, int C, int OC);
void grouped_matmul_backward_pair_bf16(float *dinp, float *dw_a, float *dw_b, const float *dout_a,
                                       const float *dout_b, const float *inp, const float *w_a,
                                       const float *w_b, const int32_t *offsets, int E, int C,
                                       int OC);
// bf16 of n floats, round to nearest even (NaN stays NaN), as the GEMMs above see them
void bf16_round(uint16_t *dst, const float *src, size_t n);
// The bf16 copy of the model's parameters that the matmuls above read their weights from
// (ops_cpu_bf16's Ops.params_register; the CPU twin of kernels/cuda/weights.cu). p[0..n) are
// the parameters (NULL or n = 0: none): a matmul whose weight lies there whole reads the copy,
// rounded block by block where stale, instead of rounding the weight itself. Writes mark blocks
// stale: cpu_bf16_weights_written (ops_cpu.c calls it for to_device, copy, zero, zero_fill,
// scale_inplace and adamw_update on that table; Ops.params_written for writes outside it).
// cpu_bf16_weight_converted counts the values ever rounded into the copy. The switch: 1 (the
// default) or 0, every op rounds its weights (MOET_CPU_WEIGHT_COPY, read at the first
// registration; cpu_bf16_set_weight_copy(-1) reads it again).
void cpu_bf16_weights_register(const float *p, size_t n);
void cpu_bf16_weights_written(const void *p, size_t bytes);
void cpu_bf16_weights_freed(const void *p); // p is being freed: forget it if it is registered
size_t cpu_bf16_weight_copy_bytes(void);    // allocated now (0 before the first matmul)
unsigned long long cpu_bf16_weight_converted(void);
void cpu_bf16_set_weight_copy(int on);
int cpu_bf16_weight_copy(void);

// ---------------------------------------------------------------------------------------
// Cross-entropy over the full padded vocabulary. targets[i] < 0 means "no target" (the last
// position of each sequence). logits is (N,V); losses is (N) (0 where no target).
// Returns the sum of the losses (double precision accumulation).
double crossentropy_forward(float *losses, const float *logits, const int32_t *targets, int N,
                            int V);
// Fused forward + backward in one pass over the logits: dlogits = scale*(softmax - onehot)
// WRITTEN (not accumulated) into dlogits, which may alias logits; rows without target get 0.
// losses may be NULL. Returns the summed loss, like crossentropy_forward.
double crossentropy_forward_backward(float *dlogits, float *losses, const float *logits,
                                     const int32_t *targets, int N, int V, float scale);

// ---------------------------------------------------------------------------------------
// Optimizer and reductions over flat buffers
// AdamW (decoupled weight decay, bias-corrected; step t starts at 1):
// m = b1*m + (1-b1)*g; v = b2*v + (1-b2)*g^2; p -= lr*(mhat/(sqrt(vhat)+eps) + wd*p),
// where g = grad_scale * grad. All (n).
void adamw_update(float *p, const float *grad, float *m, float *v, size_t n, float lr, float b1,
                  float b2, float eps, float wd, int t, float grad_scale);
double sum_squares(const float *x, size_t n);   // sum of x^2 (double accumulation)
void scale_inplace(float *x, float s, size_t n);
void zero_fill(float *x, size_t n);

// ---------------------------------------------------------------------------------------
// Backend information
int kernels_num_threads(void);      // threads the CPU kernels use (OpenMP)
const char *kernels_blas_info(void); // e.g. "OpenBLAS 0.3.21 (OpenMP, 2 threads)"
