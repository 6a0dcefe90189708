// cublas_util.cuh: private cuBLAS helpers shared by gemm.cu and attention.cu (not part of the
// public API): the CUBLAS_CHECK error check, the one cuBLAS handle of the process, and the two
// fp32 GEMM entry points that apply the precision chosen by cuda_set_gemm_bf16.
#pragma once
#include <cublas_v2.h>

#include "kernels/cuda/common.cuh"

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
