// gemm.cu: the cuBLAS GEMMs of the CUDA backend: dense matmul (torch.nn.Linear without bias)
// and the grouped expert matmul, forward and backward, plus the process's cuBLAS handle, the
// GEMM precision switch that attention.cu shares, and the bf16 operand path (conversion
// workspace and kernel). Mirrors kernels/cpu/matmul.c op for op and is tested against it by
// tests/cuda/test_cuda_gemm.c.
//
// Row-major on column-major cuBLAS: a row-major (R,S) matrix X with row stride ld is, read
// column-major, the (S,R) matrix X^T with leading dimension ld. So every row-major product
// Y = A B is computed as the column-major product Y^T = B^T A^T, with no copies: the operands
// swap places and each keeps or flips its transpose. Each call below states the column-major
// equation it computes, in terms of the row-major names.
//
// bf16 operands (the default in bf16 mode). cuBLAS given fp32 operands and
// CUBLAS_COMPUTE_32F_FAST_16BF may pick TF32 kernels, and on the H100 it did for every GEMM of
// bench-gpu-olmoe (ncu, bench/results/2026-11-26-vs-pytorch.md): half of bf16's tensor-core
// rate. So each op converts its fp32 operands to bf16 (round to nearest even, one vectorised
// kernel) into a workspace owned by this file, and multiplies the copies with
// A, B = CUDA_R_16BF, C = CUDA_R_32F, CUBLAS_COMPUTE_32F: bf16 tensor cores, fp32 accumulation,
// fp32 outputs and beta = 1 accumulation into the fp32 gradients exactly as before. The
// rounding is the one FAST_16BF was allowed to do, so the numerics are those the tests already
// bound. A/B switch for one device run: MOET_CUDA_GEMM_OPERANDS=fp32 in the environment (read
// at the first GEMM) restores the fp32 operands with FAST_16BF; =bf16 or unset is the default;
// anything else is fatal. See bench/results/2026-11-26-gpu-bf16-operands.md.
//
// The workspace grows to what one chunk of an op needs and stays allocated (like the cuBLAS
// handle) until the process ends; cuda_mem_stats counts it. Ops cut their work into chunks
// (rows, experts, heads) so that a chunk fits GEMM_WORKSPACE_LIMIT (1 GiB by default,
// cuda_set_gemm_workspace_limit); only a single weight matrix plus one row, or one sequence's
// q, k, v, dO plus one head's (T,T) scores, can exceed it, and then the workspace holds that.
#include <string.h>

#include "kernels/cuda/cublas_util.cuh"
#include "kernels/cuda/kernels_cuda.h"

// ---------------------------------------------------------------------------------------
// GEMM precision and the cuBLAS handle

// 1: bf16 tensor cores with fp32 accumulation (the default), 0: exact fp32. See kernels_cuda.h.
static int bf16_mode_ = 1;

void cuda_set_gemm_bf16(int on) {
    bf16_mode_ = on != 0;
}

int cuda_gemm_bf16(void) {
    return bf16_mode_;
}

// 1: bf16 copies of the operands (the default), 0: fp32 operands with FAST_16BF, -1: not yet
// read from MOET_CUDA_GEMM_OPERANDS (read at the first GEMM, or by cuda_set_gemm_bf16_operands).
static int operands_bf16_ = -1;

static int operands_from_env_(void) {
    const char *s = getenv("MOET_CUDA_GEMM_OPERANDS");
    if (!s || !*s || strcmp(s, "bf16") == 0) return 1;
    if (strcmp(s, "fp32") == 0) {
        fprintf(stderr, "moet: note: MOET_CUDA_GEMM_OPERANDS=fp32: the bf16-mode GEMMs take fp32 "
                        "operands (CUBLAS_COMPUTE_32F_FAST_16BF; cuBLAS may run TF32)\n");
        return 0;
    }
    fprintf(stderr,
            "moet: fatal: MOET_CUDA_GEMM_OPERANDS=%s: expected bf16 (the default) or fp32\n"
            "---> HINT: unset it, or set it to fp32 to run the bf16-mode GEMMs on fp32 "
            "operands (the A/B comparison)\n",
            s);
    exit(EXIT_FAILURE);
}

void cuda_set_gemm_bf16_operands(int on) {
    operands_bf16_ = on < 0 ? operands_from_env_() : on != 0;
}

int cuda_gemm_bf16_operands(void) {
    if (operands_bf16_ < 0) operands_bf16_ = operands_from_env_();
    return operands_bf16_;
}

int gemm_bf16_operands_(void) {
    return bf16_mode_ && cuda_gemm_bf16_operands();
}

// The compute type of the fp32 entry points. CUBLAS_COMPUTE_32F_FAST_16BF lets cuBLAS round
// the fp32 operands to bf16 (or, where it prefers, to TF32, which is more precise: the H100 did
// for every GEMM) and accumulate in fp32; in bf16 mode the ops come here only with bf16
// operands off (MOET_CUDA_GEMM_OPERANDS=fp32). CUBLAS_COMPUTE_32F under CUBLAS_DEFAULT_MATH is
// plain fp32 FMA, no TF32 and no emulation. (gemm_bf16_ below: CUBLAS_COMPUTE_32F on bf16
// operands runs on the bf16 tensor cores under CUBLAS_DEFAULT_MATH.)
static cublasComputeType_t gemm_compute_type_(void) {
    return bf16_mode_ ? CUBLAS_COMPUTE_32F_FAST_16BF : CUBLAS_COMPUTE_32F;
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

void gemm_bf16_(cublasOperation_t transa, cublasOperation_t transb, int m, int n, int k,
                float alpha, const __nv_bfloat16 *A, int lda, const __nv_bfloat16 *B, int ldb,
                float beta, float *C, int ldc) {
    CUBLAS_CHECK(cublasGemmEx(cublas_handle_(), transa, transb, m, n, k, &alpha, A, CUDA_R_16BF,
                              lda, B, CUDA_R_16BF, ldb, &beta, C, CUDA_R_32F, ldc,
                              CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

void gemm_bf16_strided_batched_(cublasOperation_t transa, cublasOperation_t transb, int m, int n,
                                int k, float alpha, const __nv_bfloat16 *A, int lda,
                                long long strideA, const __nv_bfloat16 *B, int ldb,
                                long long strideB, float beta, float *C, int ldc, long long strideC,
                                int batch_count) {
    CUBLAS_CHECK(cublasGemmStridedBatchedEx(cublas_handle_(), transa, transb, m, n, k, &alpha, A,
                                            CUDA_R_16BF, lda, strideA, B, CUDA_R_16BF, ldb, strideB,
                                            &beta, C, CUDA_R_32F, ldc, strideC, batch_count,
                                            CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

// ---------------------------------------------------------------------------------------
// The bf16 conversion workspace and kernel

// 1 GiB: bench-gpu-olmoe's lm_head backward then goes in three pieces of rows and the expert
// backward in two chunks of experts, everything else in one; the workspace peaks at 1007 MiB,
// 1.3% of an 80 GB GPU (bench/results/2026-11-26-gpu-bf16-operands.md).
#define GEMM_WORKSPACE_LIMIT ((size_t)1 << 30)
static size_t ws_limit_ = GEMM_WORKSPACE_LIMIT; // bytes
static void *ws_ = NULL;
static size_t ws_bytes_ = 0;

void cuda_set_gemm_workspace_limit(size_t bytes) {
    ws_limit_ = bytes ? bytes : GEMM_WORKSPACE_LIMIT;
    if (ws_bytes_ > ws_limit_) { // shrink: the next op allocates what it needs under the limit
        CUDA_CHECK(cudaDeviceSynchronize());
        cuda_free(ws_);
        ws_ = NULL;
        ws_bytes_ = 0;
    }
}

size_t cuda_gemm_workspace_bytes(void) {
    return ws_bytes_;
}

size_t gemm_workspace_limit_elems_(void) {
    return ws_limit_ / sizeof(__nv_bfloat16);
}

__nv_bfloat16 *gemm_workspace_(size_t elems) {
    const size_t bytes = elems * sizeof(__nv_bfloat16);
    if (bytes > ws_bytes_) {
        // whole MiB and at least twice the old size (never past the limit unless the need
        // itself is): the needs of training steps creep up with the experts' rows as the
        // routing changes, and every growth waits for the GPU and reallocates. (On the H100,
        // growing by whole MiB alone kept bench-gpu-olmoe's steps 2-4 at 0.43-0.50 s against
        // 0.35-0.37 s once the buffer had settled.)
        size_t grow = (bytes + ((size_t)1 << 20) - 1) & ~(((size_t)1 << 20) - 1);
        if (grow < 2 * ws_bytes_) grow = 2 * ws_bytes_;
        if (grow > ws_limit_) grow = bytes > ws_limit_ ? bytes : ws_limit_;
        // the GEMMs queued on the old buffer must finish before it goes (cudaFree would wait
        // too, but not by contract)
        CUDA_CHECK(cudaDeviceSynchronize());
        cuda_free(ws_);
        ws_ = cuda_malloc(grow);
        ws_bytes_ = grow;
    }
    return (__nv_bfloat16 *)ws_;
}

enum { CVT_THREADS = 256, CVT_MAX_BLOCKS = 1024 }; // 1024 x 256 threads: one wave on an H100

// Grid-stride: with vec4, thread i converts the quads i, i + stride, ... (a 16-byte load and
// an 8-byte store each), then the n % 4 tail one by one; without, every element one by one.
static __global__ void f32_to_bf16_rn_kernel(__nv_bfloat16 *out, const float *in, size_t n,
                                             int vec4) {
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    const size_t t = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    size_t done = 0;
    if (vec4) {
        const size_t nq = n / 4;
        const float4 *in4 = (const float4 *)in;
        uint2 *out4 = (uint2 *)out;
        for (size_t q = t; q < nq; q += stride) {
            const float4 f = in4[q];
            uint2 b;
            b.x = (unsigned)__bfloat16_as_ushort(__float2bfloat16_rn(f.x)) |
                  (unsigned)__bfloat16_as_ushort(__float2bfloat16_rn(f.y)) << 16;
            b.y = (unsigned)__bfloat16_as_ushort(__float2bfloat16_rn(f.z)) |
                  (unsigned)__bfloat16_as_ushort(__float2bfloat16_rn(f.w)) << 16;
            out4[q] = b;
        }
        done = nq * 4;
    }
    for (size_t i = done + t; i < n; i += stride) out[i] = __float2bfloat16_rn(in[i]);
}

void f32_to_bf16_rn_(__nv_bfloat16 *out, const float *in, size_t n) {
    if (n == 0) return;
    const int vec4 = (uintptr_t)in % 16 == 0 && (uintptr_t)out % 8 == 0;
    const size_t items = vec4 ? (n + 3) / 4 : n;
    size_t blocks = (items + CVT_THREADS - 1) / CVT_THREADS;
    if (blocks > CVT_MAX_BLOCKS) blocks = CVT_MAX_BLOCKS;
    f32_to_bf16_rn_kernel<<<(unsigned)blocks, CVT_THREADS>>>(out, in, n, vec4);
    CUDA_CHECK_LAUNCH();
}

// ---------------------------------------------------------------------------------------
// The matmuls on bf16 operands. The dense matmul is the grouped one with a single expert
// (offsets {0, N}). The work goes in chunks of whole experts [e0,e1) whose bf16 weights and
// rows fit the workspace limit together (an expert whose rows alone do not fit gets a chunk of
// its own, walked in pieces of rows). Per chunk: the weights of its experts with rows are
// converted (contiguous runs in one launch), then per piece of rows the rows' operands, then
// one GEMM per expert on its rows of the piece, in expert order. Forward:
//   out (R,OC) = inp (R,C) @ w_e^T per expert; workspace: weights, inp rows.
// Backward (each output optional): dinp += dout @ w_e; dw_e += dout^T @ inp, the latter summed
// over the pieces (beta = 1). Workspace: weights (dinp only), dout rows, inp rows (dw only).
// cuBLAS cannot take the experts in one call here: cublasGemmGroupedBatchedEx (cuBLAS 12.5+)
// accepts bf16 A and B only with a bf16 C, and the outputs must stay fp32.

// What a chunk needs in the workspace: nw experts' weights of wsz elements each (0: none) and
// `rows` rows of the slices of widths width[0..nwidth).
static size_t ws_need_(size_t nw, size_t wsz, size_t rows, const size_t *width, int nwidth) {
    size_t need = ws_align_(nw * wsz);
    for (int i = 0; i < nwidth; i++) need += ws_align_(rows * width[i]);
    return need;
}

// The chunk that starts at expert e0: returns e1 (> e0) and the rows per piece (*piece, >= 1).
// Greedy: as many experts as fit with all their rows; an expert that does not fit alone gets
// pieces of rows as even as the fewest that fit make them.
static int plan_chunk_(const int32_t *off, int e0, int E, size_t wsz, const size_t *width,
                       int nwidth, size_t *piece) {
    const size_t limit = gemm_workspace_limit_elems_();
    int e1 = e0 + 1;
    while (e1 < E && ws_need_((size_t)(e1 + 1 - e0), wsz, (size_t)(off[e1 + 1] - off[e0]), width,
                              nwidth) <= limit)
        e1++;
    const size_t rows = (size_t)(off[e1] - off[e0]);
    *piece = rows > 0 ? rows : 1;
    if (e1 == e0 + 1 && ws_need_(1, wsz, rows, width, nwidth) > limit) {
        // one expert whose rows do not fit: as many rows per piece as the limit leaves room for
        size_t per_row = 0;
        for (int i = 0; i < nwidth; i++) per_row += width[i];
        const size_t fixed = ws_align_(wsz) + 128 * (size_t)nwidth; // alignment slack
        size_t r = limit > fixed ? (limit - fixed) / per_row : 0;
        if (r < 1) r = 1;
        const size_t pieces = (rows + r - 1) / r; // then evened out: no small last piece
        *piece = (rows + pieces - 1) / pieces;
    }
    return e1;
}

// Converts the weights of the experts of [e0,e1) that have rows into wb (expert e at
// (e - e0) * wsz), one launch per run of consecutive such experts: all of them in one launch in
// training, only the few routed ones when a handful of tokens is decoded.
static void convert_weights_(__nv_bfloat16 *wb, const float *w, const int32_t *off, int e0, int e1,
                             size_t wsz) {
    for (int a = e0; a < e1;) {
        if (off[a + 1] == off[a]) {
            a++;
            continue;
        }
        int b = a + 1;
        while (b < e1 && off[b + 1] > off[b]) b++;
        f32_to_bf16_rn_(wb + (size_t)(a - e0) * wsz, w + (size_t)a * wsz, (size_t)(b - a) * wsz);
        a = b;
    }
}

static void grouped_forward_bf16_(float *out, const float *inp, const float *w, const int32_t *off,
                                  int E, int C, int OC) {
    const size_t wsz = (size_t)OC * C, width[1] = {(size_t)C};
    for (int e0 = 0; e0 < E;) {
        if (off[e0 + 1] == off[e0]) { // no rows: nothing to convert or compute
            e0++;
            continue;
        }
        size_t piece;
        const int e1 = plan_chunk_(off, e0, E, wsz, width, 1, &piece);
        const size_t rows = (size_t)(off[e1] - off[e0]);
        const size_t pr = piece < rows ? piece : rows;
        __nv_bfloat16 *wb = gemm_workspace_(ws_need_((size_t)(e1 - e0), wsz, pr, width, 1));
        __nv_bfloat16 *xb = wb + ws_align_((size_t)(e1 - e0) * wsz);
        convert_weights_(wb, w, off, e0, e1, wsz);
        for (int a = off[e0]; a < off[e1]; a += (int)pr) {
            const int b = a + (int)pr < off[e1] ? a + (int)pr : off[e1];
            f32_to_bf16_rn_(xb, inp + (size_t)a * C, (size_t)(b - a) * C);
            for (int e = e0; e < e1; e++) {
                const int r0 = off[e] > a ? off[e] : a, r1 = off[e + 1] < b ? off[e + 1] : b;
                if (r1 <= r0) continue;
                // column-major: out^T (OC,n) = w_e (OC,C) * inp^T (C,n), as cuda_matmul_forward
                gemm_bf16_(CUBLAS_OP_T, CUBLAS_OP_N, OC, r1 - r0, C, 1.0f,
                           wb + (size_t)(e - e0) * wsz, C, xb + (size_t)(r0 - a) * C, C, 0.0f,
                           out + (size_t)r0 * OC, OC);
            }
        }
        e0 = e1;
    }
}

static void grouped_backward_bf16_(float *dinp, float *dw, const float *dout, const float *inp,
                                   const float *w, const int32_t *off, int E, int C, int OC) {
    const size_t wsz = dinp ? (size_t)OC * C : 0;    // the weights only for dinp
    const size_t width[2] = {(size_t)OC, (size_t)C}; // dout rows; inp rows only for dw
    const int nwidth = dw ? 2 : 1;
    for (int e0 = 0; e0 < E;) {
        if (off[e0 + 1] == off[e0]) { // no rows: dw_e stays untouched
            e0++;
            continue;
        }
        size_t piece;
        const int e1 = plan_chunk_(off, e0, E, wsz, width, nwidth, &piece);
        const size_t rows = (size_t)(off[e1] - off[e0]);
        const size_t pr = piece < rows ? piece : rows;
        __nv_bfloat16 *wb = gemm_workspace_(ws_need_((size_t)(e1 - e0), wsz, pr, width, nwidth));
        __nv_bfloat16 *gb = wb + ws_align_((size_t)(e1 - e0) * wsz);
        __nv_bfloat16 *xb = gb + ws_align_(pr * OC);
        if (dinp) convert_weights_(wb, w, off, e0, e1, wsz);
        for (int a = off[e0]; a < off[e1]; a += (int)pr) {
            const int b = a + (int)pr < off[e1] ? a + (int)pr : off[e1];
            f32_to_bf16_rn_(gb, dout + (size_t)a * OC, (size_t)(b - a) * OC);
            if (dw) f32_to_bf16_rn_(xb, inp + (size_t)a * C, (size_t)(b - a) * C);
            for (int e = e0; e < e1; e++) {
                const int r0 = off[e] > a ? off[e] : a, r1 = off[e + 1] < b ? off[e + 1] : b;
                if (r1 <= r0) continue;
                const __nv_bfloat16 *g = gb + (size_t)(r0 - a) * OC;
                if (dinp) // column-major: dinp^T (C,n) += w_e^T (C,OC) * dout^T (OC,n)
                    gemm_bf16_(CUBLAS_OP_N, CUBLAS_OP_N, C, r1 - r0, OC, 1.0f,
                               wb + (size_t)(e - e0) * wsz, C, g, OC, 1.0f, dinp + (size_t)r0 * C,
                               C);
                if (dw) // column-major: dw_e^T (C,OC) += inp^T (C,n) * dout (n,OC)
                    gemm_bf16_(CUBLAS_OP_N, CUBLAS_OP_T, C, OC, r1 - r0, 1.0f,
                               xb + (size_t)(r0 - a) * C, C, g, OC, 1.0f, dw + (size_t)e * OC * C,
                               C);
            }
        }
        e0 = e1;
    }
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
    if (gemm_bf16_operands_()) {
        const int32_t off[2] = {0, N};
        grouped_forward_bf16_(out, inp, w, off, 1, C, OC);
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
    if (N <= 0 || C <= 0 || OC <= 0 || (!dinp && !dw)) return;
    if (gemm_bf16_operands_()) {
        const int32_t off[2] = {0, N};
        grouped_backward_bf16_(dinp, dw, dout, inp, w, off, 1, C, OC);
        return;
    }
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
// in expert order; on bf16 operands, the whole input and weights converted once per call (in
// chunks, see above) and one GEMM per expert on the copies.
// out is (R,OC), inp is (R,C), w is (E,OC,C), offsets_host is (E+1), a HOST array

void cuda_grouped_matmul_forward(float *out, const float *inp, const float *w,
                                 const int32_t *offsets_host, int E, int C, int OC) {
    if (E > 0 && C > 0 && OC > 0 && gemm_bf16_operands_()) {
        grouped_forward_bf16_(out, inp, w, offsets_host, E, C, OC);
        return;
    }
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
    if (E > 0 && C > 0 && OC > 0 && gemm_bf16_operands_()) {
        grouped_backward_bf16_(dinp, dw, dout, inp, w, offsets_host, E, C, OC);
        return;
    }
    for (int e = 0; e < E; e++) {
        const int r0 = offsets_host[e], n = offsets_host[e + 1] - r0;
        if (n <= 0) continue;
        cuda_matmul_backward(dinp ? dinp + (size_t)r0 * C : NULL,
                             dw ? dw + (size_t)e * OC * C : NULL, dout + (size_t)r0 * OC,
                             inp + (size_t)r0 * C, w + (size_t)e * OC * C, n, C, OC);
    }
}
