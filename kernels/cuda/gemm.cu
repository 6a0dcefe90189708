// gemm.cu: the cuBLAS GEMMs of the CUDA backend: dense matmul (torch.nn.Linear without bias)
// and the grouped expert matmul, forward and backward, plus the process's cuBLAS handle and the
// GEMM precision switch that attention.cu shares. Mirrors kernels/cpu/matmul.c op for op and is
// tested against it by tests/cuda/test_cuda_gemm.c.
//
// Row-major on column-major cuBLAS: a row-major (R,S) matrix X with row stride ld is, read
// column-major, the (S,R) matrix X^T with leading dimension ld. So every row-major product
// Y = A B is computed as the column-major product Y^T = B^T A^T, with no copies: the operands
// swap places and each keeps or flips its transpose. Each call below states the column-major
// equation it computes, in terms of the row-major names.
#include "kernels/cuda/cublas_util.cuh"
#include "kernels/cuda/kernels_cuda.h"

// ---------------------------------------------------------------------------------------
// GEMM precision and the cuBLAS handle

// 1: bf16 tensor cores with fp32 accumulation (the default), 0: exact fp32. See kernels_cuda.h.
static int gemm_bf16_ = 1;

void cuda_set_gemm_bf16(int on) {
    gemm_bf16_ = on != 0;
}

int cuda_gemm_bf16(void) {
    return gemm_bf16_;
}

// CUBLAS_COMPUTE_32F_FAST_16BF lets cuBLAS round the fp32 operands to bf16 (or, where it
// prefers, to TF32, which is more precise) and accumulate in fp32; CUBLAS_COMPUTE_32F under
// CUBLAS_DEFAULT_MATH is plain fp32 FMA, no TF32 and no emulation.
static cublasComputeType_t gemm_compute_type_(void) {
    return gemm_bf16_ ? CUBLAS_COMPUTE_32F_FAST_16BF : CUBLAS_COMPUTE_32F;
}

cublasHandle_t cublas_handle_(void) {
    static cublasHandle_t handle = NULL;
    if (!handle) {
        CUBLAS_CHECK(cublasCreate(&handle));
        // the legacy default stream, where every other op of the backend runs (in call order)
        CUBLAS_CHECK(cublasSetStream(handle, 0));
        // Explicit, though both are the defaults: the math mode must not allow TF32 or BF16x9
        // emulation behind CUBLAS_COMPUTE_32F, and no routine may use floating-point atomics
        // (determinism; cuBLAS is then bitwise reproducible on one GPU model with one stream).
        CUBLAS_CHECK(cublasSetMathMode(handle, CUBLAS_DEFAULT_MATH));
        CUBLAS_CHECK(cublasSetAtomicsMode(handle, CUBLAS_ATOMICS_NOT_ALLOWED));
        // The handle lives as long as the process (cuBLAS's default workspace included: it is
        // not counted by cuda_mem_stats).
    }
    return handle;
}

void gemm_f32_(cublasOperation_t transa, cublasOperation_t transb, int m, int n, int k, float alpha,
               const float *A, int lda, const float *B, int ldb, float beta, float *C, int ldc) {
    CUBLAS_CHECK(cublasGemmEx(cublas_handle_(), transa, transb, m, n, k, &alpha, A, CUDA_R_32F, lda,
                              B, CUDA_R_32F, ldb, &beta, C, CUDA_R_32F, ldc, gemm_compute_type_(),
                              CUBLAS_GEMM_DEFAULT));
}

void gemm_f32_strided_batched_(cublasOperation_t transa, cublasOperation_t transb, int m, int n,
                               int k, float alpha, const float *A, int lda, long long strideA,
                               const float *B, int ldb, long long strideB, float beta, float *C,
                               int ldc, long long strideC, int batch_count) {
    CUBLAS_CHECK(cublasGemmStridedBatchedEx(cublas_handle_(), transa, transb, m, n, k, &alpha, A,
                                            CUDA_R_32F, lda, strideA, B, CUDA_R_32F, ldb, strideB,
                                            &beta, C, CUDA_R_32F, ldc, strideC, batch_count,
                                            gemm_compute_type_(), CUBLAS_GEMM_DEFAULT));
}

// ---------------------------------------------------------------------------------------
// Matmul

// out is (N,OC), inp is (N,C), w is (OC,C)
void cuda_matmul_forward(float *out, const float *inp, const float *w, int N, int C, int OC) {
    if (N <= 0 || OC <= 0) return;
    if (C <= 0) { // an empty sum, as on the CPU (cuBLAS would reject lda = 0)
        CUDA_CHECK(cudaMemsetAsync(out, 0, (size_t)N * OC * sizeof(float), 0));
        return;
    }
    // column-major: out^T (OC,N) = w (OC,C) * inp^T (C,N)
    // (w is stored as the column-major (C,OC) w^T, hence op T; inp as the column-major inp^T)
    gemm_f32_(CUBLAS_OP_T, CUBLAS_OP_N, OC, N, C, 1.0f, w, C, inp, C, 0.0f, out, OC);
}

// dinp += dout @ w; dw += dout^T @ inp (beta = 1: backward accumulates); NULL outputs skipped.
// dinp is (N,C), dw is (OC,C), dout is (N,OC), inp is (N,C), w is (OC,C)
void cuda_matmul_backward(float *dinp, float *dw, const float *dout, const float *inp,
                          const float *w, int N, int C, int OC) {
    if (N <= 0 || C <= 0 || OC <= 0) return;
    if (dinp) {
        // column-major: dinp^T (C,N) += w^T (C,OC) * dout^T (OC,N)
        // (w stored as the column-major (C,OC) w^T: op N; dout as the column-major dout^T: op N)
        gemm_f32_(CUBLAS_OP_N, CUBLAS_OP_N, C, N, OC, 1.0f, w, C, dout, OC, 1.0f, dinp, C);
    }
    if (dw) {
        // column-major: dw^T (C,OC) += inp^T (C,N) * dout (N,OC)
        // (inp stored as the column-major (C,N) inp^T: op N; dout as the column-major (OC,N)
        // dout^T, transposed back: op T)
        gemm_f32_(CUBLAS_OP_N, CUBLAS_OP_T, C, OC, N, 1.0f, inp, C, dout, OC, 1.0f, dw, C);
    }
}

// ---------------------------------------------------------------------------------------
// Grouped expert matmul: one cuBLAS GEMM per expert with rows, over its contiguous row range,
// in expert order. Simple and robust; the later optimisation is one
// cublasGemmGroupedBatchedEx call for all experts (one launch instead of E).
// out is (R,OC), inp is (R,C), w is (E,OC,C), offsets_host is (E+1), a HOST array

void cuda_grouped_matmul_forward(float *out, const float *inp, const float *w,
                                 const int32_t *offsets_host, int E, int C, int OC) {
    for (int e = 0; e < E; e++) {
        const int r0 = offsets_host[e], n = offsets_host[e + 1] - r0;
        if (n <= 0) continue;
        cuda_matmul_forward(out + (size_t)r0 * OC, inp + (size_t)r0 * C, w + (size_t)e * OC * C, n,
                            C, OC);
    }
}

// dinp is (R,C), dw is (E,OC,C), dout is (R,OC); experts without rows keep their dw untouched.
void cuda_grouped_matmul_backward(float *dinp, float *dw, const float *dout, const float *inp,
                                  const float *w, const int32_t *offsets_host, int E, int C,
                                  int OC) {
    if (!dinp && !dw) return;
    for (int e = 0; e < E; e++) {
        const int r0 = offsets_host[e], n = offsets_host[e + 1] - r0;
        if (n <= 0) continue;
        cuda_matmul_backward(dinp ? dinp + (size_t)r0 * C : NULL,
                             dw ? dw + (size_t)e * OC * C : NULL, dout + (size_t)r0 * OC,
                             inp + (size_t)r0 * C, w + (size_t)e * OC * C, n, C, OC);
    }
}
