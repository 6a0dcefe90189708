// ops_cuda: the CUDA backend's op table (kernels/ops.h): device memory from cuda_malloc, copies
// through cudaMemcpy, and the cuda_* ops of kernels_cuda.h. The ops that need temporary device
// memory get it from one scratch buffer owned here, grown on demand: every op runs on the
// default stream in call order, so one op's scratch is free again when the next op starts.
#include <cuda_runtime.h>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/kernels_cuda.h"
#include "kernels/ops.h"

// ---------------------------------------------------------------------------------------
// scratch

static void *scratch_buf_;
static size_t scratch_bytes_;

static void *scratch_(size_t bytes) {
    if (bytes > scratch_bytes_) {
        cuda_free(scratch_buf_); // cudaFree waits for the ops that used the old buffer
        // grow by 1/4 at least, so that slowly rising needs do not reallocate every time
        size_t grow = scratch_bytes_ + scratch_bytes_ / 4;
        scratch_bytes_ = bytes > grow ? bytes : grow;
        scratch_buf_ = cuda_malloc(scratch_bytes_);
    }
    return scratch_buf_;
}

// ---------------------------------------------------------------------------------------
// memory

static void *dev_alloc_(size_t bytes) {
    void *p = cuda_malloc(bytes);
    cuda_zero(p, bytes);
    return p;
}

static void dev_free_(void *p) {
    cuda_weights_freed(p); // the parameters' buffer takes its bf16 copy with it
    cuda_free(p);
}

// The writes through this table that may land in the registered parameters (the model writes
// them only so, besides adamw_update, which keeps their bf16 copy up to date itself) mark the
// copy stale there (kernels/cuda/weights.cu).
static void dev_zero_(void *p, size_t bytes) {
    cuda_weights_written(p, bytes);
    cuda_zero(p, bytes);
}

static void dev_to_device_(void *dst, const void *host_src, size_t bytes) {
    cuda_weights_written(dst, bytes);
    cuda_memcpy_h2d(dst, host_src, bytes);
}

static void dev_copy_(void *dst, const void *src, size_t bytes) {
    cuda_weights_written(dst, bytes);
    if (dst != src) cuda_memcpy_d2d(dst, src, bytes);
}

static void scale_inplace_(float *x, float s, size_t n) {
    cuda_weights_written(x, n * sizeof(float));
    cuda_scale_inplace(x, s, n);
}

// ---------------------------------------------------------------------------------------
// ops that take scratch

static void rmsnorm_backward_(float *dx, float *dw, const float *dout, const float *x,
                              const float *w, const float *rstd, int N, int D) {
    void *s = dw ? scratch_(cuda_rmsnorm_backward_scratch_bytes(N, D)) : NULL;
    cuda_rmsnorm_backward(dx, dw, dout, x, w, rstd, N, D, s);
}

static void attention_forward_(float *out, float *lse, const float *q, const float *k,
                               const float *v, int B, int T, int H, int Dh) {
    cuda_attention_forward(out, lse, q, k, v, B, T, H, Dh,
                           scratch_(cuda_attention_scratch_bytes(T, H)));
}

static void attention_forward_cached_(float *out, const float *q, const float *k,
                                      const float *v, int Tq, int Tk, int H, int Dh) {
    cuda_attention_forward_cached(out, q, k, v, Tq, Tk, H, Dh,
                                  scratch_(cuda_attention_cached_scratch_bytes(Tq, Tk, H)));
}

static void attention_backward_(float *dq, float *dk, float *dv, const float *dout,
                                const float *out, const float *lse, const float *q, const float *k,
                                const float *v, int B, int T, int H, int Dh) {
    cuda_attention_backward(dq, dk, dv, dout, out, lse, q, k, v, B, T, H, Dh,
                            scratch_(cuda_attention_scratch_bytes(T, H)));
}

static void embedding_backward_(float *dwte, const float *dout, const int32_t *tokens_host, int N,
                                int D) {
    cuda_embedding_backward(dwte, dout, tokens_host, N, D,
                            scratch_(cuda_embedding_backward_scratch_bytes(N)));
}

static void router_aux_sums_(double *prob_sum_host, double *lse_sq_sum_host, const float *probs,
                             const float *lse, int N, int E) {
    cuda_router_aux_sums(prob_sum_host, lse_sq_sum_host, probs, lse, N, E,
                         scratch_(cuda_router_aux_sums_scratch_bytes(N, E)));
}

static void moe_plan_(int32_t *counts, int32_t *offsets, int32_t *row_token, int32_t *assign_row,
                      const int32_t *topk_idx, int N, int K, int E) {
    cuda_moe_plan(counts, offsets, row_token, assign_row, topk_idx, N, K, E,
                  scratch_(cuda_moe_plan_scratch_bytes(N, K, E)));
}

static double crossentropy_forward_(float *losses, const float *logits, const int32_t *targets,
                                    int N, int V) {
    return cuda_crossentropy_forward(losses, logits, targets, N, V,
                                     scratch_(cuda_crossentropy_scratch_bytes(N)));
}

static double crossentropy_forward_backward_(float *dlogits, float *losses, const float *logits,
                                             const int32_t *targets, int N, int V, float scale) {
    return cuda_crossentropy_forward_backward(dlogits, losses, logits, targets, N, V, scale,
                                              scratch_(cuda_crossentropy_scratch_bytes(N)));
}

static double sum_squares_(const float *x, size_t n) {
    return cuda_sum_squares(x, n, scratch_(cuda_sum_squares_scratch_bytes(n)));
}

static void zero_fill_(float *x, size_t n) {
    dev_zero_(x, n * sizeof(float));
}

// ---------------------------------------------------------------------------------------
// the table

static Ops cuda_ops_;
static int cuda_opened_;

static void fill_table_(Ops *o) {
    o->name = "cuda";
    o->on_device = 1;
    o->alloc = dev_alloc_;
    o->free = dev_free_;
    o->zero = dev_zero_;
    o->to_device = dev_to_device_;
    o->to_host = cuda_memcpy_d2h;
    o->copy = dev_copy_;
    o->sync = cuda_synchronize;
    o->mem_stats = cuda_mem_stats;
    o->params_register = cuda_weights_register;
    o->params_written = cuda_weights_written;
    o->mark = cuda_mark;
    o->mark_ms = cuda_mark_ms;
    o->embedding_forward = cuda_embedding_forward;
    o->embedding_backward = embedding_backward_;
    o->rmsnorm_forward = cuda_rmsnorm_forward;
    o->rmsnorm_backward = rmsnorm_backward_;
    o->matmul_forward = cuda_matmul_forward;
    o->matmul_backward = cuda_matmul_backward;
    o->rope_forward = cuda_rope_forward;
    o->rope_backward = cuda_rope_backward;
    o->rope_forward_at = cuda_rope_forward_at;
    o->attention_forward_cached = attention_forward_cached_;
    o->attention_forward = attention_forward_;
    o->attention_backward = attention_backward_;
    o->swiglu_forward = cuda_swiglu_forward;
    o->swiglu_backward = cuda_swiglu_backward;
    o->add_forward = cuda_add_forward;
    o->router_forward = cuda_router_forward_ext;
    o->router_backward = cuda_router_backward_ext;
    o->router_aux_sums = router_aux_sums_;
    o->moe_plan = moe_plan_;
    o->permute_forward = cuda_permute_forward;
    o->permute_backward = cuda_permute_backward;
    o->unpermute_forward = cuda_unpermute_forward;
    o->unpermute_backward = cuda_unpermute_backward;
    o->grouped_matmul_forward = cuda_grouped_matmul_forward;
    o->grouped_matmul_backward = cuda_grouped_matmul_backward;
    o->grouped_matmul_forward_pair = cuda_grouped_matmul_forward_pair;
    o->grouped_matmul_backward_pair = cuda_grouped_matmul_backward_pair;
    o->crossentropy_forward = crossentropy_forward_;
    o->crossentropy_forward_backward = crossentropy_forward_backward_;
    o->adamw_update = cuda_adamw_update;
    o->sum_squares = sum_squares_;
    o->scale_inplace = scale_inplace_;
    o->zero_fill = zero_fill_;
}

extern "C" const Ops *ops_cuda(void) {
    if (!cuda_ops_.name) fill_table_(&cuda_ops_);
    return &cuda_ops_;
}

extern "C" int ops_cuda_device_count(void) {
    return cuda_device_count();
}

extern "C" int ops_cuda_open(int device, int gemm_bf16, char *info, int infolen) {
    const int n = cuda_device_count();
    if (n == 0)
        return cuda_errf_(info, infolen,
                          "no CUDA GPU is visible to this process (check nvidia-smi and "
                          "CUDA_VISIBLE_DEVICES), or set [train] device = cpu");
    if (device < 0) device = 0;
    if (cuda_init(device % n, info, infolen)) return 1;
    cuda_set_gemm_bf16(gemm_bf16);
    cuda_opened_ = 1;
    return 0;
}

extern "C" double ops_cuda_peak_tflops(void) {
    if (!cuda_opened_) return 0.0;
    int dev = 0;
    cudaDeviceProp p;
    CUDA_CHECK(cudaGetDevice(&dev));
    CUDA_CHECK(cudaGetDeviceProperties(&p, dev));
    if (p.major == 9) return 989.0;                 // H100 / H200 SXM, dense bf16
    if (p.major == 8 && p.minor == 0) return 312.0; // A100
    return 0.0;
}

extern "C" void ops_cuda_host_stats_reset(void) {
    cuda_host_stats_reset();
}

extern "C" int ops_cuda_host_stats_line(char *buf, int len, int steps) {
    CudaHostStats st;
    cuda_host_stats(&st);
    const double n = steps > 0 ? (double)steps : 1.0;
    return snprintf(buf, (size_t)len,
                    "%.0f GEMM calls (%.0f by cuBLASLt from its algorithm cache, %.1f heuristic "
                    "queries, %.1f fallbacks; %.0f on side streams of %d; %.1f M parameters "
                    "converted into the weight copy), %.1f ms of host time in GEMM calls, %.1f ms "
                    "waiting for the GPU",
                    (double)st.gemm_calls / n, (double)st.lt_calls / n, (double)st.lt_queries / n,
                    (double)st.lt_fallbacks / n, (double)st.side_calls / n, cuda_gemm_streams(),
                    1e-6 * (double)st.weight_converted / n, 1e3 * st.gemm_host_s / n,
                    1e3 * st.wait_s / n);
}
