// common.cuh: private helpers shared by kernels/cuda/*.cu (not part of the public API):
// the CUDA error checks described in kernels_cuda.h, launch sizing, and deterministic warp /
// block reductions.
#pragma once
#include <cuda_runtime.h>
#include <math.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

struct CudaHostStats; // kernels_cuda.h

// ---------------------------------------------------------------------------------------
// Host-side accounting (CudaHostStats in kernels_cuda.h): the process's counters, defined in
// device.cu, and a monotonic clock in seconds for the timed sections.
struct CudaHostStats *cuda_host_stats_acc_(void);
static inline double cuda_host_now_(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

// ---------------------------------------------------------------------------------------
// Error checks
// CUDA_CHECK(call): for everything but cuda_init. On error prints file:line, the call and the
// CUDA error name and string, then exits with status 1 (see "Errors" in kernels_cuda.h).
#define CUDA_CHECK(call) cuda_check_((call), #call, __FILE__, __LINE__)
// CUDA_CHECK_LAUNCH(): after every <<<>>> launch. Catches bad launch configurations at once;
// with -DMOET_CUDA_SYNC_CHECK also waits for the kernel, so that a fault names its op.
#define CUDA_CHECK_LAUNCH() cuda_check_launch_(__FILE__, __LINE__)
// CUDA_TRY(call, info, infolen): for functions that return an error code (cuda_init). On
// error clears the runtime's last error, writes the message into info and returns 1 from the
// calling function.
#define CUDA_TRY(call, info, infolen)                                                              \
    do {                                                                                           \
        cudaError_t e_ = (call);                                                                   \
        if (e_ != cudaSuccess) {                                                                   \
            (void)cudaGetLastError();                                                              \
            return cuda_errf_((info), (infolen), "CUDA error at %s:%d: %s: %s (%s)", __FILE__,     \
                              __LINE__, #call, cudaGetErrorName(e_), cudaGetErrorString(e_));      \
        }                                                                                          \
    } while (0)

static inline void cuda_check_(cudaError_t e, const char *call, const char *file, int line) {
    if (e == cudaSuccess) return;
    fprintf(stderr, "moet: fatal: CUDA error at %s:%d: %s: %s (%s)\n", file, line, call,
            cudaGetErrorName(e), cudaGetErrorString(e));
    if (e == cudaErrorMemoryAllocation)
        fprintf(stderr, "---> HINT: the GPU is out of memory: reduce the micro-batch or the "
                        "sequence length, or spread the experts over more ranks\n");
    else if (e == cudaErrorNoKernelImageForDevice || e == cudaErrorInvalidDeviceFunction)
        fprintf(stderr, "---> HINT: this build has no code for this GPU: reconfigure with "
                        "-DCMAKE_CUDA_ARCHITECTURES=<its sm number> and rebuild\n");
    else
        fprintf(stderr, "---> HINT: errors from kernels are reported by the next CUDA call; "
                        "rebuild with -DMOET_CUDA_SYNC_CHECK to find the op that failed, or "
                        "run under compute-sanitizer\n");
    exit(EXIT_FAILURE);
}

static inline void cuda_check_launch_(const char *file, int line) {
    cuda_check_(cudaGetLastError(), "kernel launch", file, line);
#ifdef MOET_CUDA_SYNC_CHECK
    cuda_check_(cudaDeviceSynchronize(), "kernel execution (MOET_CUDA_SYNC_CHECK)", file, line);
#endif
}

// Writes a message into info (or to stderr when info is NULL or infolen <= 0); returns 1.
static inline int cuda_errf_(char *info, int infolen, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    if (info && infolen > 0) {
        vsnprintf(info, (size_t)infolen, fmt, ap);
    } else {
        fprintf(stderr, "moet: ");
        vfprintf(stderr, fmt, ap);
        fprintf(stderr, "\n");
    }
    va_end(ap);
    return 1;
}

// ---------------------------------------------------------------------------------------
// Launch sizing
enum { EW_THREADS = 256 };      // threads per block of the elementwise kernels
enum { EW_MAX_BLOCKS = 65536 }; // grid-stride loops cover the rest

// Blocks for an elementwise kernel over n > 0 elements with a grid-stride loop.
static inline unsigned ew_blocks_(size_t n) {
    size_t b = (n + EW_THREADS - 1) / EW_THREADS;
    return (unsigned)(b < (size_t)EW_MAX_BLOCKS ? b : (size_t)EW_MAX_BLOCKS);
}

// ---------------------------------------------------------------------------------------
// Reductions. All are fixed trees: the result depends only on the inputs and blockDim, never
// on timing, so the kernels built on them are bitwise reproducible. The xor butterfly leaves
// the same bits in every lane because a + b == b + a exactly.
__device__ __forceinline__ float warp_sum_f32(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ double warp_sum_f64(double v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Sum of v over a 1-D block, returned to every thread. blockDim.x must be a multiple of 32
// (at most 1024) and every thread of the block must call it; buf is a __shared__ array of 32.
// It may be called again with the same buf (the first barrier protects the previous readers).
__device__ __forceinline__ float block_sum_f32(float v, float *buf) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    v = warp_sum_f32(v);
    __syncthreads();
    if (lane == 0) buf[warp] = v;
    __syncthreads();
    return warp_sum_f32(lane < nwarps ? buf[lane] : 0.0f);
}

__device__ __forceinline__ double block_sum_f64(double v, double *buf) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    v = warp_sum_f64(v);
    __syncthreads();
    if (lane == 0) buf[warp] = v;
    __syncthreads();
    return warp_sum_f64(lane < nwarps ? buf[lane] : 0.0);
}

// Max of v over a 1-D block, returned to every thread; the same contract as block_sum_f32
// (blockDim.x a multiple of 32, every thread calls it, buf is __shared__ [32] and may be reused
// by the next reduction). The max is exact, so its order does not matter.
__device__ __forceinline__ float block_max_f32(float v, float *buf) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    __syncthreads();
    if (lane == 0) buf[warp] = v;
    __syncthreads();
    v = lane < nwarps ? buf[lane] : -INFINITY;
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
