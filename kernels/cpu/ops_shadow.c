// ops_shadow: the CPU backend behind the device-memory discipline of kernels/ops.h, to test
// without a GPU the code paths that a GPU takes. Its buffers are host memory, but alloc hands
// out TAGGED pointers (a high address bit set, which makes them non-canonical on x86-64 and
// invalid on every 64-bit platform we build for): any host code that reads or writes backend
// memory directly, instead of through to_host / to_device, crashes at once. Every op removes
// the tag from its backend arguments and calls the CPU op, so results are bit-identical to
// ops_cpu(); arguments marked HOST in ops.h are passed through untouched, so a backend pointer
// passed where a host one belongs crashes too. `[train] device = cpu-shadow` selects it.
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/kernels.h"
#include "kernels/ops.h"

#define TAG_ (1ull << 62)

static void *tag_(void *p) {
    return p ? (void *)((uintptr_t)p ^ TAG_) : NULL;
}
// untags a backend pointer (NULL stays NULL); a pointer without the tag is a host pointer
// passed where backend memory belongs: a bug, reported at once
static void *un_(const void *p) {
    if (!p) return NULL;
    if (!((uintptr_t)p & TAG_)) {
        fprintf(stderr,
                "moet: fatal: ops_shadow: a host pointer %p was passed as backend "
                "memory\n",
                p);
        abort();
    }
    return (void *)((uintptr_t)p ^ TAG_);
}
#define F_(p) ((float *)un_(p))
#define I_(p) ((int32_t *)un_(p))

// Bytes handed out by alloc and not yet freed, and their peak, as the CUDA backend counts them
// (kernels/cuda/device.cu): the requested sizes (256 for a request of 0). Each block carries its
// size in a header in front of what alloc returns, so free knows what to subtract. (Backend
// memory is allocated from the main thread, as on the GPU: no locking.)
enum { SH_HEADER_ = 64 }; // keeps the 64-byte alignment of the returned block
static size_t sh_in_use_, sh_peak_;

static void *sh_alloc_(size_t bytes) {
    void *p = NULL;
    size_t counted = bytes ? bytes : 256;
    size_t n = (counted + 63) / 64 * 64;
    if (posix_memalign(&p, 64, SH_HEADER_ + n) != 0) {
        fprintf(stderr, "moet: fatal: out of memory allocating %zu bytes\n", bytes);
        exit(1);
    }
    memset(p, 0, SH_HEADER_ + n);
    memcpy(p, &counted, sizeof counted);
    sh_in_use_ += counted;
    if (sh_in_use_ > sh_peak_) sh_peak_ = sh_in_use_;
    return tag_((char *)p + SH_HEADER_);
}
static void sh_free_(void *p) {
    if (!p) return;
    char *block = (char *)un_(p) - SH_HEADER_;
    size_t counted;
    memcpy(&counted, block, sizeof counted);
    sh_in_use_ -= counted;
    free(block);
}
static void sh_zero_(void *p, size_t bytes) {
    if (bytes) memset(un_(p), 0, bytes);
}
static void sh_to_device_(void *dst, const void *src, size_t bytes) {
    if (bytes) memcpy(un_(dst), src, bytes);
}
static void sh_to_host_(void *dst, const void *src, size_t bytes) {
    if (bytes) memcpy(dst, un_(src), bytes);
}
static void sh_copy_(void *dst, const void *src, size_t bytes) {
    if (bytes && dst != src) memcpy(un_(dst), un_(src), bytes);
}
static void sh_sync_(void) {}
static void sh_mem_stats_(size_t *in_use, size_t *peak) {
    if (in_use) *in_use = sh_in_use_;
    if (peak) *peak = sh_peak_;
}

static void sh_embedding_forward_(float *out, const int32_t *tokens, const float *wte, int N,
                                  int D) {
    embedding_forward(F_(out), I_(tokens), F_(wte), N, D);
}
static void sh_embedding_backward_(float *dwte, const float *dout, const int32_t *tokens_host,
                                   int N, int D) {
    embedding_backward(F_(dwte), F_(dout), tokens_host, N, D);
}
static void sh_rmsnorm_forward_(float *out, float *rstd, const float *x, const float *w, int N,
                                int D, float eps) {
    rmsnorm_forward(F_(out), F_(rstd), F_(x), F_(w), N, D, eps);
}
static void sh_rmsnorm_backward_(float *dx, float *dw, const float *dout, const float *x,
                                 const float *w, const float *rstd, int N, int D) {
    rmsnorm_backward(F_(dx), F_(dw), F_(dout), F_(x), F_(w), F_(rstd), N, D);
}
static void sh_matmul_forward_(float *out, const float *inp, const float *w, int N, int C, int OC) {
    matmul_forward(F_(out), F_(inp), F_(w), N, C, OC);
}
static void sh_matmul_backward_(float *dinp, float *dw, const float *dout, const float *inp,
                                const float *w, int N, int C, int OC) {
    matmul_backward(F_(dinp), F_(dw), F_(dout), F_(inp), F_(w), N, C, OC);
}
static void sh_rope_forward_(float *out, const float *inp, int B, int T, int H, int Dh,
                             float theta) {
    rope_forward(F_(out), F_(inp), B, T, H, Dh, theta);
}
static void sh_rope_backward_(float *dinp, const float *dout, int B, int T, int H, int Dh,
                              float theta) {
    rope_backward(F_(dinp), F_(dout), B, T, H, Dh, theta);
}
static void sh_rope_forward_at_(float *out, const float *inp, int T, int H, int Dh, float theta,
                                int pos0) {
    rope_forward_at(F_(out), F_(inp), T, H, Dh, theta, pos0);
}
static void sh_attention_forward_cached_(float *out, const float *q, const float *k,
                                         const float *v, int Tq, int Tk, int H, int Dh) {
    attention_forward_cached(F_(out), F_(q), F_(k), F_(v), Tq, Tk, H, Dh);
}
static void sh_attention_forward_(float *out, float *lse, const float *q, const float *k,
                                  const float *v, int B, int T, int H, int Dh) {
    attention_forward(F_(out), F_(lse), F_(q), F_(k), F_(v), B, T, H, Dh);
}
static void sh_attention_backward_(float *dq, float *dk, float *dv, const float *dout,
                                   const float *out, const float *lse, const float *q,
                                   const float *k, const float *v, int B, int T, int H, int Dh) {
    attention_backward(F_(dq), F_(dk), F_(dv), F_(dout), F_(out), F_(lse), F_(q), F_(k), F_(v), B,
                       T, H, Dh);
}
static void sh_swiglu_forward_(float *out, const float *g, const float *u, size_t n) {
    swiglu_forward(F_(out), F_(g), F_(u), n);
}
static void sh_swiglu_backward_(float *dg, float *du, const float *dout, const float *g,
                                const float *u, size_t n) {
    swiglu_backward(F_(dg), F_(du), F_(dout), F_(g), F_(u), n);
}
static void sh_add_forward_(float *out, const float *a, const float *b, size_t n) {
    add_forward(F_(out), F_(a), F_(b), n);
}
static void sh_router_forward_(float *probs, float *lse, int32_t *topk_idx, float *topk_w,
                               const float *logits, const float *bias, int N, int E, int K,
                               int norm_topk, int score_fn) {
    router_forward(F_(probs), F_(lse), I_(topk_idx), F_(topk_w), F_(logits), F_(bias), N, E, K,
                   norm_topk, score_fn);
}
static void sh_router_backward_(float *dlogits, const float *dtopk_w, const float *dprob_bias,
                                float dz_coef, const float *probs, const float *lse,
                                const float *logits, const int32_t *topk_idx, const float *topk_w,
                                int N, int E, int K, int norm_topk, int score_fn) {
    router_backward(F_(dlogits), F_(dtopk_w), F_(dprob_bias), dz_coef, F_(probs), F_(lse),
                    F_(logits), I_(topk_idx), F_(topk_w), N, E, K, norm_topk, score_fn);
}
static void sh_router_aux_sums_(double *prob_sum_host, double *lse_sq_sum_host, const float *probs,
                                const float *lse, int N, int E) {
    router_aux_sums(prob_sum_host, lse_sq_sum_host, F_(probs), F_(lse), N, E);
}
static void sh_moe_plan_(int32_t *counts, int32_t *offsets, int32_t *row_token, int32_t *assign_row,
                         const int32_t *topk_idx, int N, int K, int E) {
    moe_plan(I_(counts), I_(offsets), I_(row_token), I_(assign_row), I_(topk_idx), N, K, E);
}
static void sh_permute_forward_(float *xp, const float *x, const int32_t *row_token, int R, int D) {
    permute_forward(F_(xp), F_(x), I_(row_token), R, D);
}
static void sh_permute_backward_(float *dx, const float *dxp, const int32_t *assign_row, int N,
                                 int K, int D) {
    permute_backward(F_(dx), F_(dxp), I_(assign_row), N, K, D);
}
static void sh_unpermute_forward_(float *out, const float *yp, const float *topk_w,
                                  const int32_t *assign_row, int N, int K, int D) {
    unpermute_forward(F_(out), F_(yp), F_(topk_w), I_(assign_row), N, K, D);
}
static void sh_unpermute_backward_(float *dyp, float *dtopk_w, const float *dout, const float *yp,
                                   const float *topk_w, const int32_t *assign_row, int N, int K,
                                   int D) {
    unpermute_backward(F_(dyp), F_(dtopk_w), F_(dout), F_(yp), F_(topk_w), I_(assign_row), N, K, D);
}
static void sh_grouped_matmul_forward_(float *out, const float *inp, const float *w,
                                       const int32_t *offsets_host, int E, int C, int OC) {
    grouped_matmul_forward(F_(out), F_(inp), F_(w), offsets_host, E, C, OC);
}
static void sh_grouped_matmul_backward_(float *dinp, float *dw, const float *dout, const float *inp,
                                        const float *w, const int32_t *offsets_host, int E, int C,
                                        int OC) {
    grouped_matmul_backward(F_(dinp), F_(dw), F_(dout), F_(inp), F_(w), offsets_host, E, C, OC);
}
static void sh_grouped_matmul_backward_pair_(float *dinp, float *dw_a, float *dw_b,
                                             const float *dout_a, const float *dout_b,
                                             const float *inp, const float *w_a, const float *w_b,
                                             const int32_t *offsets_host, int E, int C, int OC) {
    grouped_matmul_backward_pair(F_(dinp), F_(dw_a), F_(dw_b), F_(dout_a), F_(dout_b), F_(inp),
                                 F_(w_a), F_(w_b), offsets_host, E, C, OC);
}
static double sh_crossentropy_forward_(float *losses, const float *logits, const int32_t *targets,
                                       int N, int V) {
    return crossentropy_forward(F_(losses), F_(logits), I_(targets), N, V);
}
static double sh_crossentropy_forward_backward_(float *dlogits, float *losses, const float *logits,
                                                const int32_t *targets, int N, int V, float scale) {
    return crossentropy_forward_backward(F_(dlogits), F_(losses), F_(logits), I_(targets), N, V,
                                         scale);
}
static void sh_adamw_update_(float *p, const float *grad, float *m, float *v, size_t n, float lr,
                             float b1, float b2, float eps, float wd, int t, float grad_scale) {
    adamw_update(F_(p), F_(grad), F_(m), F_(v), n, lr, b1, b2, eps, wd, t, grad_scale);
}
static double sh_sum_squares_(const float *x, size_t n) {
    return sum_squares(F_(x), n);
}
static void sh_scale_inplace_(float *x, float s, size_t n) {
    scale_inplace(F_(x), s, n);
}
static void sh_zero_fill_(float *x, size_t n) {
    zero_fill(F_(x), n);
}

static const Ops shadow_ops_ = {
    .name = "cpu-shadow",
    .on_device = 1,
    .alloc = sh_alloc_,
    .free = sh_free_,
    .zero = sh_zero_,
    .to_device = sh_to_device_,
    .to_host = sh_to_host_,
    .copy = sh_copy_,
    .sync = sh_sync_,
    .mem_stats = sh_mem_stats_,
    .embedding_forward = sh_embedding_forward_,
    .embedding_backward = sh_embedding_backward_,
    .rmsnorm_forward = sh_rmsnorm_forward_,
    .rmsnorm_backward = sh_rmsnorm_backward_,
    .matmul_forward = sh_matmul_forward_,
    .matmul_backward = sh_matmul_backward_,
    .rope_forward = sh_rope_forward_,
    .rope_backward = sh_rope_backward_,
    .rope_forward_at = sh_rope_forward_at_,
    .attention_forward_cached = sh_attention_forward_cached_,
    .attention_forward = sh_attention_forward_,
    .attention_backward = sh_attention_backward_,
    .swiglu_forward = sh_swiglu_forward_,
    .swiglu_backward = sh_swiglu_backward_,
    .add_forward = sh_add_forward_,
    .router_forward = sh_router_forward_,
    .router_backward = sh_router_backward_,
    .router_aux_sums = sh_router_aux_sums_,
    .moe_plan = sh_moe_plan_,
    .permute_forward = sh_permute_forward_,
    .permute_backward = sh_permute_backward_,
    .unpermute_forward = sh_unpermute_forward_,
    .unpermute_backward = sh_unpermute_backward_,
    .grouped_matmul_forward = sh_grouped_matmul_forward_,
    .grouped_matmul_backward = sh_grouped_matmul_backward_,
    .grouped_matmul_backward_pair = sh_grouped_matmul_backward_pair_,
    .crossentropy_forward = sh_crossentropy_forward_,
    .crossentropy_forward_backward = sh_crossentropy_forward_backward_,
    .adamw_update = sh_adamw_update_,
    .sum_squares = sh_sum_squares_,
    .scale_inplace = sh_scale_inplace_,
    .zero_fill = sh_zero_fill_,
};

const Ops *ops_cpu_shadow(void) {
    return &shadow_ops_;
}
