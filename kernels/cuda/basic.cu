// basic.cu: the memory-bound kernels of the CUDA backend: RMSNorm, SwiGLU, residual add,
// AdamW, sum of squares and the bf16 casts. Each mirrors the CPU op of the same name in
// kernels/cpu/ and is tested against it by tests/cuda/test_cuda_kernels.c.
#include <cuda_bf16.h>
#include <math.h>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/cublas_util.cuh" // weights_copy_for_update_
#include "kernels/cuda/kernels_cuda.h"

static_assert(sizeof(__nv_bfloat16) == sizeof(uint16_t), "bf16 is passed as uint16_t bits");

// Prints a message about a wrong argument (a bug in the caller) and exits like CUDA_CHECK.
static void die_(const char *fn, const char *what) {
    fprintf(stderr, "moet: fatal: %s: %s\n", fn, what);
    exit(EXIT_FAILURE);
}

// ---------------------------------------------------------------------------------------
// RMSNorm forward: one warp per row. The sum of squares is accumulated in fp32 (each lane
// sums D/32 elements in order, then a fixed butterfly), as the kernels.h contract asks; with
// D <= 8192 its relative error stays well below 1e-5.
enum { RMS_FWD_WARPS = 8 }; // rows per block

static __global__ void rmsnorm_forward_kernel(float *out, float *rstd, const float *x,
                                              const float *w, int N, int D, float eps) {
    const int row = blockIdx.x * RMS_FWD_WARPS + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (row >= N) return; // the whole warp leaves together; there is no block barrier
    const float *xr = x + (size_t)row * D;
    float ss = 0.0f;
    for (int j = lane; j < D; j += 32) ss += xr[j] * xr[j];
    ss = warp_sum_f32(ss);
    const float r = rsqrtf(ss / (float)D + eps);
    if (lane == 0 && rstd) rstd[row] = r;
    // out may alias x: each element is read by the same thread just before it is written
    float *outr = out + (size_t)row * D;
    for (int j = lane; j < D; j += 32) outr[j] = xr[j] * r * w[j];
}

void cuda_rmsnorm_forward(float *out, float *rstd, const float *x, const float *w, int N, int D,
                          float eps) {
    if (N <= 0 || D <= 0) return;
    const unsigned blocks = (unsigned)((N + RMS_FWD_WARPS - 1) / RMS_FWD_WARPS);
    rmsnorm_forward_kernel<<<blocks, RMS_FWD_WARPS * 32>>>(out, rstd, x, w, N, D, eps);
    CUDA_CHECK_LAUNCH();
}

// ---------------------------------------------------------------------------------------
// RMSNorm backward. With r = rstd[i] and S = sum_j dout_j w_j x_j over the row:
//   dx_j += r * (dout_j w_j - x_j * r^2 S / D),        dw_j += sum_i dout_ij x_ij r_i
// (the CPU op's form, so that the two differ only in the order of the sums).
// The N rows are cut into G groups of consecutive rows, one block per group, G a function of N
// only (so the result does not depend on the GPU). A block walks its rows in order: a block
// reduction gives S, then each thread updates dx for its columns and adds to its columns of a
// (D) dw partial in shared memory (columns are owned by one thread: no races, no atomics).
// The partials go to scratch (G,D); a second kernel adds them to dw in a fixed order.
enum { RMS_BWD_THREADS = 256 };
enum { RMS_BWD_MAX_GROUPS = 1024 }; // enough blocks to fill an H100 several times over
enum { DW_REDUCE_Y = 16 };          // group slices per column in the second pass

static int rms_bwd_rows_per_group_(int N) {
    return (N + RMS_BWD_MAX_GROUPS - 1) / RMS_BWD_MAX_GROUPS;
}

static int rms_bwd_groups_(int N) {
    const int rpg = rms_bwd_rows_per_group_(N);
    return (N + rpg - 1) / rpg;
}

size_t cuda_rmsnorm_backward_scratch_bytes(int N, int D) {
    if (N <= 0 || D <= 0) return 0;
    return (size_t)rms_bwd_groups_(N) * (size_t)D * sizeof(float);
}

// dx is (N,D) or NULL; dw_partial is (G,D) or NULL; dynamic shared memory is D floats when
// dw_partial is set.
static __global__ void rmsnorm_backward_kernel(float *dx, float *dw_partial, const float *dout,
                                               const float *x, const float *w, const float *rstd,
                                               int N, int D, int rows_per_group) {
    extern __shared__ float dw_acc[];
    __shared__ float red[32];
    const int r0 = blockIdx.x * rows_per_group;
    const int r1 = min(N, r0 + rows_per_group);
    if (dw_partial)
        for (int j = threadIdx.x; j < D; j += blockDim.x) dw_acc[j] = 0.0f;
    // r0, r1 are the same for the whole block, so every thread reaches block_sum_f32
    for (int i = r0; i < r1; i++) {
        const float *xr = x + (size_t)i * D, *gr = dout + (size_t)i * D;
        const float r = rstd[i];
        float k = 0.0f;
        if (dx) {
            float s = 0.0f;
            for (int j = threadIdx.x; j < D; j += blockDim.x) s += gr[j] * w[j] * xr[j];
            s = block_sum_f32(s, red);
            k = r * r * s / (float)D;
        }
        float *dxr = dx ? dx + (size_t)i * D : NULL;
        for (int j = threadIdx.x; j < D; j += blockDim.x) {
            const float g = gr[j], xv = xr[j];
            if (dxr) dxr[j] += r * (g * w[j] - xv * k);
            if (dw_partial) dw_acc[j] += g * xv * r;
        }
    }
    if (dw_partial) {
        float *part = dw_partial + (size_t)blockIdx.x * D;
        for (int j = threadIdx.x; j < D; j += blockDim.x) part[j] = dw_acc[j];
    }
}

// dw[j] += sum over g of partial[g, j]. Block (32, DW_REDUCE_Y): x picks the column (coalesced),
// y takes every DW_REDUCE_Y-th group in order; the y slices are then added in order 0, 1, ...
static __global__ void rmsnorm_dw_reduce_kernel(float *dw, const float *partial, int G, int D) {
    __shared__ float s[DW_REDUCE_Y][33];
    const int j = blockIdx.x * 32 + threadIdx.x;
    float acc = 0.0f;
    if (j < D)
        for (int g = threadIdx.y; g < G; g += DW_REDUCE_Y) acc += partial[(size_t)g * D + j];
    s[threadIdx.y][threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.y == 0 && j < D) {
        float t = 0.0f;
        for (int y = 0; y < DW_REDUCE_Y; y++) t += s[y][threadIdx.x];
        dw[j] += t;
    }
}

void cuda_rmsnorm_backward(float *dx, float *dw, const float *dout, const float *x, const float *w,
                           const float *rstd, int N, int D, void *scratch) {
    if (N <= 0 || D <= 0 || (!dx && !dw)) return;
    if (dw && !scratch)
        die_("cuda_rmsnorm_backward", "dw is set but scratch is NULL (allocate "
                                      "cuda_rmsnorm_backward_scratch_bytes(N, D) bytes)");
    const int rpg = rms_bwd_rows_per_group_(N), G = rms_bwd_groups_(N);
    float *partial = dw ? (float *)scratch : NULL;
    const size_t smem = dw ? (size_t)D * sizeof(float) : 0;
    // Beyond the default 48 KB per block (static memory included) the kernel must opt in.
    if (smem > 48 * 1024 - 256) {
        int dev = 0, optin = 0;
        CUDA_CHECK(cudaGetDevice(&dev));
        CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
        if (smem + 256 > (size_t)optin) {
            fprintf(stderr,
                    "moet: fatal: cuda_rmsnorm_backward: D = %d needs %zu bytes of shared "
                    "memory per block; this GPU allows %d\n",
                    D, smem, optin);
            exit(EXIT_FAILURE);
        }
        CUDA_CHECK(cudaFuncSetAttribute(rmsnorm_backward_kernel,
                                        cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    }
    rmsnorm_backward_kernel<<<(unsigned)G, RMS_BWD_THREADS, smem>>>(dx, partial, dout, x, w, rstd,
                                                                    N, D, rpg);
    CUDA_CHECK_LAUNCH();
    if (dw) {
        const dim3 block(32, DW_REDUCE_Y);
        rmsnorm_dw_reduce_kernel<<<(unsigned)((D + 31) / 32), block>>>(dw, partial, G, D);
        CUDA_CHECK_LAUNCH();
    }
}

// ---------------------------------------------------------------------------------------
// SwiGLU: out = silu(g) * u with silu(g) = g * s, s = sigmoid(g); d silu / dg =
// s * (1 + g * (1 - s)). Written as in the CPU op, operation for operation; the backward
// writes dg and du (kernels.h).
static __global__ void swiglu_forward_kernel(float *out, const float *g, const float *u, size_t n) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        const float gi = g[i];
        out[i] = gi / (1.0f + expf(-gi)) * u[i];
    }
}

static __global__ void swiglu_backward_kernel(float *dg, float *du, const float *dout,
                                              const float *g, const float *u, size_t n) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        const float gi = g[i], s = 1.0f / (1.0f + expf(-gi)), d = dout[i];
        if (dg) dg[i] = d * u[i] * s * (1.0f + gi * (1.0f - s));
        if (du) du[i] = d * gi * s;
    }
}

void cuda_swiglu_forward(float *out, const float *g, const float *u, size_t n) {
    if (n == 0) return;
    swiglu_forward_kernel<<<ew_blocks_(n), EW_THREADS>>>(out, g, u, n);
    CUDA_CHECK_LAUNCH();
}

void cuda_swiglu_backward(float *dg, float *du, const float *dout, const float *g, const float *u,
                          size_t n) {
    if (n == 0 || (!dg && !du)) return;
    swiglu_backward_kernel<<<ew_blocks_(n), EW_THREADS>>>(dg, du, dout, g, u, n);
    CUDA_CHECK_LAUNCH();
}

// ---------------------------------------------------------------------------------------
// Residual add
static __global__ void add_forward_kernel(float *out, const float *a, const float *b, size_t n) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        out[i] = a[i] + b[i];
}

void cuda_add_forward(float *out, const float *a, const float *b, size_t n) {
    if (n == 0) return;
    add_forward_kernel<<<ew_blocks_(n), EW_THREADS>>>(out, a, b, n);
    CUDA_CHECK_LAUNCH();
}

// ---------------------------------------------------------------------------------------
// AdamW, written as the CPU op: the reciprocal bias corrections 1 / (1 - b^t) are computed
// once on the host in double. Where p lies in the parameters' bf16 copy (weights.cu), pb gets
// the new values rounded to nearest even as well, so the copy stays valid (else NULL).
static __global__ void adamw_update_kernel(float *p, __nv_bfloat16 *pb, const float *grad, float *m,
                                           float *v, size_t n, float lr, float b1, float b2,
                                           float eps, float wd, float inv_bc1, float inv_bc2,
                                           float grad_scale) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        const float g = grad_scale * grad[i];
        const float mi = b1 * m[i] + (1.0f - b1) * g;
        const float vi = b2 * v[i] + (1.0f - b2) * g * g;
        m[i] = mi;
        v[i] = vi;
        const float mhat = mi * inv_bc1, vhat = vi * inv_bc2, pi = p[i];
        const float pn = pi - lr * (mhat / (sqrtf(vhat) + eps) + wd * pi);
        p[i] = pn;
        if (pb) pb[i] = __float2bfloat16_rn(pn);
    }
}

void cuda_adamw_update(float *p, const float *grad, float *m, float *v, size_t n, float lr,
                       float b1, float b2, float eps, float wd, int t, float grad_scale) {
    if (t < 1) die_("cuda_adamw_update", "the step t starts at 1 (bias correction 1 - b^t)");
    if (n == 0) return;
    const double inv_bc1 = 1.0 / (1.0 - pow((double)b1, (double)t));
    const double inv_bc2 = 1.0 / (1.0 - pow((double)b2, (double)t));
    __nv_bfloat16 *pb = weights_copy_for_update_(p, n);
    adamw_update_kernel<<<ew_blocks_(n), EW_THREADS>>>(p, pb, grad, m, v, n, lr, b1, b2, eps, wd,
                                                       (float)inv_bc1, (float)inv_bc2, grad_scale);
    CUDA_CHECK_LAUNCH();
}

// ---------------------------------------------------------------------------------------
// Sum of squares in two passes. Pass 1: G blocks (G a function of n only) each reduce a
// grid-stride share in double into partial[g]. Pass 2: one block adds the G partials in a
// fixed order into partial[G], which is copied to the host. Squares of fp32 are exact in
// double, so only the summation order differs from the CPU.
// Pass 1 reads four floats per 16-byte load: with one float per thread and iteration too few
// bytes were in flight to fill an H100's memory pipe (1.6 TB/s in round 9's profile, against
// ~3 TB/s for the other streaming kernels). The up to 3 floats before x's first 16-byte
// boundary (head) and after its last whole quad go to the first threads one by one.
enum { SS_THREADS = 256 };
enum { SS_MAX_BLOCKS = 1024 };
enum { SS_MIN_PER_BLOCK = 2048 }; // elements per block before a new block is worth it

static unsigned ss_blocks_(size_t n) {
    size_t b = (n + SS_MIN_PER_BLOCK - 1) / SS_MIN_PER_BLOCK;
    if (b < 1) b = 1;
    return (unsigned)(b < (size_t)SS_MAX_BLOCKS ? b : (size_t)SS_MAX_BLOCKS);
}

size_t cuda_sum_squares_scratch_bytes(size_t n) {
    return ((size_t)ss_blocks_(n) + 1) * sizeof(double);
}

static __global__ void sum_squares_partial_kernel(double *partial, const float *x, size_t n,
                                                  size_t head) {
    __shared__ double red[32];
    const size_t t = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    const size_t nq = (n - head) / 4, rest = head + 4 * nq; // quads; the floats after them
    const float4 *x4 = (const float4 *)(x + head);
    double acc = 0.0;
    for (size_t q = t; q < nq; q += stride) {
        const float4 f = x4[q];
        acc += (double)f.x * f.x;
        acc += (double)f.y * f.y;
        acc += (double)f.z * f.z;
        acc += (double)f.w * f.w;
    }
    if (t < head) acc += (double)x[t] * x[t];
    if (t < n - rest) acc += (double)x[rest + t] * x[rest + t];
    acc = block_sum_f64(acc, red);
    if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

// partial is (G + 1): reads [0, G), writes the total to partial[G].
static __global__ void sum_squares_final_kernel(double *partial, int G) {
    __shared__ double red[32];
    double acc = 0.0;
    for (int g = threadIdx.x; g < G; g += blockDim.x) acc += partial[g];
    acc = block_sum_f64(acc, red);
    if (threadIdx.x == 0) partial[G] = acc;
}

double cuda_sum_squares(const float *x, size_t n, void *scratch) {
    if (n == 0) return 0.0;
    if (!scratch)
        die_("cuda_sum_squares", "scratch is NULL (allocate cuda_sum_squares_scratch_bytes(n))");
    const unsigned G = ss_blocks_(n);
    double *partial = (double *)scratch;
    size_t head = (16 - (uintptr_t)x % 16) % 16 / sizeof(float); // floats to the 16-byte boundary
    if (head > n) head = n;
    sum_squares_partial_kernel<<<G, SS_THREADS>>>(partial, x, n, head);
    CUDA_CHECK_LAUNCH();
    sum_squares_final_kernel<<<1, SS_THREADS>>>(partial, (int)G);
    CUDA_CHECK_LAUNCH();
    double total = 0.0;
    cuda_memcpy_d2h(&total, partial + G, sizeof total);
    return total;
}

// ---------------------------------------------------------------------------------------
// bf16 casts. __float2bfloat16 is round-to-nearest-even (cvt.rn.bf16.f32 on sm_80+).
static __global__ void f32_to_bf16_kernel(__nv_bfloat16 *out, const float *in, size_t n) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        out[i] = __float2bfloat16(in[i]);
}

static __global__ void bf16_to_f32_kernel(float *out, const __nv_bfloat16 *in, size_t n) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        out[i] = __bfloat162float(in[i]);
}

void cuda_f32_to_bf16(uint16_t *out, const float *in, size_t n) {
    if (n == 0) return;
    f32_to_bf16_kernel<<<ew_blocks_(n), EW_THREADS>>>((__nv_bfloat16 *)out, in, n);
    CUDA_CHECK_LAUNCH();
}

void cuda_bf16_to_f32(float *out, const uint16_t *in, size_t n) {
    if (n == 0) return;
    bf16_to_f32_kernel<<<ew_blocks_(n), EW_THREADS>>>(out, (const __nv_bfloat16 *)in, n);
    CUDA_CHECK_LAUNCH();
}

// ---------------------------------------------------------------------------------------
// Scaling: x *= s (gradient averaging over micro-batches and ranks).
static __global__ void scale_kernel(float *x, float s, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        x[i] *= s;
}

void cuda_scale_inplace(float *x, float s, size_t n) {
    if (n == 0) return;
    scale_kernel<<<ew_blocks_(n), EW_THREADS>>>(x, s, n);
    CUDA_CHECK_LAUNCH();
}
