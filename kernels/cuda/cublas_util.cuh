// cublas_util.cuh: private cuBLAS helpers shared by gemm.cu and attention.cu (not part of the
// public API): the CUBLAS_CHECK error check, the one cuBLAS handle of the process, the two
// fp32 GEMM entry points that apply the precision chosen by cuda_set_gemm_bf16, and the bf16
// operand path (conversion workspace, fp32 -> bf16 conversion, GEMMs on bf16 operands). Every
// entry point counts its calls and host time in CudaHostStats.
#pragma once
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <stdint.h>

#include "kernels/cuda/common.cuh"
#include "kernels/env_switch.h"

// CUBLAS_CHECK(call): like CUDA_CHECK, for cuBLAS calls. On error prints
// "moet: fatal: cuBLAS error at file:line: call: status-name" and exits with status 1.
#define CUBLAS_CHECK(call) cublas_check_((call), #call, __FILE__, __LINE__)

static inline void cublas_check_(cublasStatus_t s, const char *call, const char *file, int line) {
    if (s == CUBLAS_STATUS_SUCCESS) return;
    fprintf(stderr, "moet: fatal: cuBLAS error at %s:%d: %s: %s (%s)\n", file, line, call,
            cublasGetStatusName(s), cublasGetStatusString(s));
    if (s == CUBLAS_STATUS_NOT_INITIALIZED || s == CUBLAS_STATUS_ALLOC_FAILED)
        fprintf(stderr, "---> HINT: cuBLAS could not start: call cuda_init first, and check that "
                        "the GPU has free memory\n");
    else
        fprintf(stderr, "---> HINT: a GEMM got a bad shape or pointer (a bug in the caller), or "
                        "an earlier kernel failed: rebuild with -DMOET_CUDA_SYNC_CHECK\n");
    exit(EXIT_FAILURE);
}

// The process's cuBLAS handle, created on first use on the calling thread's current device and
// bound to the legacy default stream (see "Streams" in kernels_cuda.h). Not thread-safe: one
// host thread drives the device. Defined in gemm.cu.
cublasHandle_t cublas_handle_(void);

// One GEMM on fp32 column-major storage, in cuBLAS's own terms:
//   C (m,n) = alpha * op(A) (m,k) * op(B) (k,n) + beta * C
// with CUBLAS_COMPUTE_32F_FAST_16BF when cuda_gemm_bf16() is on, CUBLAS_COMPUTE_32F (exact
// fp32, no TF32) when it is off. With beta == 0, C is not read. The caller guarantees
// m, n, k > 0 (cuBLAS rejects leading dimensions of 0). Defined in gemm.cu.
void gemm_f32_(cublasOperation_t transa, cublasOperation_t transb, int m, int n, int k, float alpha,
               const float *A, int lda, const float *B, int ldb, float beta, float *C, int ldc);

// batch_count GEMMs as gemm_f32_, matrix i at A + i*strideA, B + i*strideB, C + i*strideC
// (strides in elements; the output matrices may interleave, e.g. heads side by side, as long as
// no element is shared).
void gemm_f32_strided_batched_(cublasOperation_t transa, cublasOperation_t transb, int m, int n,
                               int k, float alpha, const float *A, int lda, long long strideA,
                               const float *B, int ldb, long long strideB, float beta, float *C,
                               int ldc, long long strideC, int batch_count);

// ---------------------------------------------------------------------------------------
// bf16 operands (see "GEMM precision" in kernels_cuda.h). In bf16 mode the ops convert their
// fp32 operands into bf16 copies in one workspace and multiply the copies; fp32 mode and
// MOET_CUDA_GEMM_OPERANDS=fp32 take the fp32 entry points above. All defined in gemm.cu.

// 1 when the GEMMs run on bf16 copies of their operands: cuda_gemm_bf16() and
// cuda_gemm_bf16_operands() are both on.
int gemm_bf16_operands_(void);

// The conversion workspace: a device buffer of at least `elems` bf16 values, grown (never
// shrunk) as needed and counted by cuda_mem_stats. Growing frees the old buffer after waiting
// for the device, so an op asks once per chunk of its work for everything that chunk needs and
// carves the slices itself (ws_align_ keeps each slice 256-byte aligned); the pointer is valid
// until the next call. One workspace serves every op: they never nest.
__nv_bfloat16 *gemm_workspace_(size_t elems);
// The limit that ops plan their chunks against, in bf16 elements (cuda_set_gemm_workspace_limit).
size_t gemm_workspace_limit_elems_(void);
// The flash forward of one sequence (attention_flash.cu): q16, k16, v16 its (T, H*Dh) bf16
// copies, out (T, H*Dh), lse (H, T); Dh as cuda_attention_flash(Dh) accepts.
void cuda_attention_flash_forward_(float *out, float *lse, const __nv_bfloat16 *q16,
                                   const __nv_bfloat16 *k16, const __nv_bfloat16 *v16, int T, int H,
                                   int Dh);

// n rounded up to a multiple of 128 elements (256 bytes): the start of the next slice.
static inline size_t ws_align_(size_t n) {
    return (n + 127) & ~(size_t)127;
}

// out[i] = in[i] rounded to the nearest bf16, ties to even (cvt.rn), for n contiguous values;
// NaN stays NaN, values beyond bf16's range become inf. Vectorised (16-byte loads) when in is
// 16-byte and out 8-byte aligned, element by element otherwise. Enqueued on the default stream.
void f32_to_bf16_rn_(__nv_bfloat16 *out, const float *in, size_t n);

// The registered parameters' bf16 copy (weights.cu, cuda_weights_register). weights_copy_:
// the copy of w[0..n), allocating the copy at its first use, or NULL when the GEMMs take no
// bf16 operands, the copy is off, or [w, w + n) is not inside the parameters. Its values are
// up to date only where weights_copy_ensure_ has run since the last write (it converts the
// stale blocks of [w, w + n) on the default stream; nothing where weights_copy_ is NULL).
// weights_copy_for_update_: for cuda_adamw_update, which writes p[0..n): where its bf16 values
// go in the copy (then written by the caller from the same new values, keeping the copy valid),
// or NULL (the copy, if any, is marked stale there).
const __nv_bfloat16 *weights_copy_(const float *w, size_t n);
void weights_copy_ensure_(const float *w, size_t n);
__nv_bfloat16 *weights_copy_for_update_(const float *p, size_t n);
// gemm_f32_ on bf16 operands: C (m,n) fp32 = alpha * op(A) * op(B) + beta * C, A and B
// CUDA_R_16BF, CUBLAS_COMPUTE_32F (products of bf16 values are exact in fp32; the sums are fp32).
// Through cuBLASLt with an algorithm cached per shape class (cuda_set_gemm_lt, the default), or
// cublasGemmEx. The dimension that varies from call to call (an expert's row count) must be
// n, or k with transa N and transb T, so that the class rounds it (see gemm.cu).
void gemm_bf16_(cublasOperation_t transa, cublasOperation_t transb, int m, int n, int k,
                float alpha, const __nv_bfloat16 *A, int lda, const __nv_bfloat16 *B, int ldb,
                float beta, float *C, int ldc);
// gemm_f32_strided_batched_ on bf16 operands (strides in elements).
void gemm_bf16_strided_batched_(cublasOperation_t transa, cublasOperation_t transb, int m, int n,
                                int k, float alpha, const __nv_bfloat16 *A, int lda,
                                long long strideA, const __nv_bfloat16 *B, int ldb,
                                long long strideB, float beta, float *C, int ldc, long long strideC,
                                int batch_count);
