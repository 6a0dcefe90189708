// ops_cpu: the CPU backend's op table (kernels/ops.h): the functions of kernels.h, host
// memory, and copies that are plain memcpy. With this table the model computes exactly what it
// computed when it called kernels.h directly.
#include "kernels/ops.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/kernels.h"

static void *cpu_alloc_(size_t bytes) {
    // 64-byte aligned (cache lines, AVX-512 loads), zeroed; fatal like moet_malloc
    void *p = NULL;
    size_t n = (bytes + 63) / 64 * 64;
    if (posix_memalign(&p, 64, n ? n : 64) != 0) {
        fprintf(stderr, "moet: fatal: out of memory allocating %zu bytes (%.2f GiB)\n", bytes,
                (double)bytes / (1 << 30));
        exit(1);
    }
    memset(p, 0, n ? n : 64);
    return p;
}

static void cpu_free_(void *p) {
    free(p);
}
static void cpu_zero_(void *p, size_t bytes) {
    if (bytes) memset(p, 0, bytes);
}
static void cpu_copy_(void *dst, const void *src, size_t bytes) {
    if (bytes && dst != src) memcpy(dst, src, bytes);
}
static void cpu_sync_(void) {}
static void cpu_mem_stats_(size_t *in_use, size_t *peak) {
    if (in_use) *in_use = 0;
    if (peak) *peak = 0;
}

static const Ops cpu_ops_ = {
    .name = "cpu",
    .on_device = 0,
    .alloc = cpu_alloc_,
    .free = cpu_free_,
    .zero = cpu_zero_,
    .to_device = cpu_copy_,
    .to_host = cpu_copy_,
    .copy = cpu_copy_,
    .sync = cpu_sync_,
    .mem_stats = cpu_mem_stats_,
    .embedding_forward = embedding_forward,
    .embedding_backward = embedding_backward,
    .rmsnorm_forward = rmsnorm_forward,
    .rmsnorm_backward = rmsnorm_backward,
    .matmul_forward = matmul_forward,
    .matmul_backward = matmul_backward,
    .rope_forward = rope_forward,
    .rope_backward = rope_backward,
    .rope_forward_at = rope_forward_at,
    .attention_forward_cached = attention_forward_cached,
    .attention_forward = attention_forward,
    .attention_backward = attention_backward,
    .swiglu_forward = swiglu_forward,
    .swiglu_backward = swiglu_backward,
    .add_forward = add_forward,
    .router_forward = router_forward,
    .router_backward = router_backward,
    .router_aux_sums = router_aux_sums,
    .moe_plan = moe_plan,
    .permute_forward = permute_forward,
    .permute_backward = permute_backward,
    .unpermute_forward = unpermute_forward,
    .unpermute_backward = unpermute_backward,
    .grouped_matmul_forward = grouped_matmul_forward,
    .grouped_matmul_backward = grouped_matmul_backward,
    .grouped_matmul_backward_pair = grouped_matmul_backward_pair,
    .crossentropy_forward = crossentropy_forward,
    .crossentropy_forward_backward = crossentropy_forward_backward,
    .adamw_update = adamw_update,
    .sum_squares = sum_squares,
    .scale_inplace = scale_inplace,
    .zero_fill = zero_fill,
};

const Ops *ops_cpu(void) {
    return &cpu_ops_;
}

static Ops cpu_bf16_ops_;

// The bf16 table's memory ops and writers: those that write into the registered parameters
// mark their bf16 copy stale there (kernels/cpu/gemm_bf16.c), AdamW included.
static void bf16_free_(void *p) {
    cpu_bf16_weights_freed(p);
    free(p);
}
static void bf16_zero_(void *p, size_t bytes) {
    cpu_bf16_weights_written(p, bytes);
    cpu_zero_(p, bytes);
}
static void bf16_copy_(void *dst, const void *src, size_t bytes) {
    cpu_bf16_weights_written(dst, bytes);
    cpu_copy_(dst, src, bytes);
}
static void bf16_zero_fill_(float *x, size_t n) {
    cpu_bf16_weights_written(x, n * sizeof(float));
    zero_fill(x, n);
}
static void bf16_scale_inplace_(float *x, float s, size_t n) {
    cpu_bf16_weights_written(x, n * sizeof(float));
    scale_inplace(x, s, n);
}
static void bf16_adamw_update_(float *p, const float *grad, float *m, float *v, size_t n, float lr,
                               float b1, float b2, float eps, float wd, int t, float grad_scale) {
    cpu_bf16_weights_written(p, n * sizeof(float));
    adamw_update(p, grad, m, v, n, lr, b1, b2, eps, wd, t, grad_scale);
}

int ops_cpu_bf16_open(char *info, int infolen) {
    if (cpu_bf16_gemm_open(info, infolen)) return 1;
    snprintf(info, (size_t)infolen, "%s", cpu_bf16_gemm_info());
    return 0;
}

const Ops *ops_cpu_bf16(void) {
    // the reference table with the matmuls swapped and the writers of the parameters
    // wrapped (above); filled on first use (C has no designated copy-and-override
    // initialiser), always with the same values
    if (!cpu_bf16_ops_.name) {
        Ops o = cpu_ops_;
        o.matmul_forward = matmul_forward_bf16;
        o.matmul_backward = matmul_backward_bf16;
        o.grouped_matmul_forward = grouped_matmul_forward_bf16;
        o.grouped_matmul_backward = grouped_matmul_backward_bf16;
        o.grouped_matmul_backward_pair = grouped_matmul_backward_pair_bf16;
        o.params_register = cpu_bf16_weights_register;
        o.params_written = cpu_bf16_weights_written;
        o.free = bf16_free_;
        o.zero = bf16_zero_;
        o.to_device = bf16_copy_;
        o.copy = bf16_copy_;
        o.zero_fill = bf16_zero_fill_;
        o.scale_inplace = bf16_scale_inplace_;
        o.adamw_update = bf16_adamw_update_;
        cpu_bf16_ops_ = o;
    }
    return &cpu_bf16_ops_;
}

#ifndef MOET_CUDA
// A build without the CUDA backend (MOET_CUDA=OFF or no nvcc).
const Ops *ops_cuda(void) {
    return NULL;
}
int ops_cuda_device_count(void) {
    return 0;
}
double ops_cuda_peak_tflops(void) {
    return 0.0;
}
void ops_cuda_host_stats_reset(void) {}
int ops_cuda_host_stats_line(char *buf, int len, int steps) {
    (void)buf;
    (void)len;
    (void)steps;
    return 0;
}
int ops_cuda_open(int device, int gemm_bf16, char *info, int infolen) {
    (void)device;
    (void)gemm_bf16;
    snprintf(info, (size_t)infolen,
             "this moet was built without the CUDA backend: rebuild on a machine with the CUDA "
             "toolkit (cmake -DMOET_CUDA=ON), or set [train] device = cpu");
    return 1;
}
#endif
