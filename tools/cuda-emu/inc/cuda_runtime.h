// cuda_runtime.h of the CUDA host emulator (tools/cuda-emu): lets kernels/cuda/*.cu compile as
// C++20 with g++ and run on the CPU. See tools/cuda-emu/README.md.
//
// Execution model: a kernel launch (rewritten by convert.py into emu_launch) runs the blocks of
// the grid one after the other on the calling thread; within a block every CUDA thread is a
// user-space fiber with its own stack. A fiber runs until it reaches a barrier
// (__syncthreads, or a warp shuffle, which is a barrier of its warp) and yields; a barrier is
// released when every live thread of its scope has arrived. Divergent barriers (a warp whose
// lanes wait at different barriers, a shuffle with exited lanes, a deadlock) are reported and
// abort the program.
#pragma once
#include <cmath>
#include <math.h>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

#include "cuda_runtime_api.h" // the types and the runtime calls (C linkage)

cudaError_t emu_func_get_attributes(cudaFuncAttributes *a, const void *f);
cudaError_t emu_func_set_attribute(const void *f, cudaFuncAttribute a, int v);
template <class F> cudaError_t cudaFuncGetAttributes(cudaFuncAttributes *a, F *f) {
    return emu_func_get_attributes(a, (const void *)f);
}
template <class F> cudaError_t cudaFuncSetAttribute(F *f, cudaFuncAttribute a, int v) {
    return emu_func_set_attribute((const void *)f, a, v);
}

// ---------------------------------------------------------------------------------------
// Device-side built-ins
struct dim3 {
    unsigned x, y, z;
    constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
typedef dim3 uint3;
// The vector types the backend loads and stores whole, with their CUDA alignment (a misaligned
// pointer faults on the GPU; here g++ may then use aligned moves, which fault too)
struct __attribute__((aligned(16))) float4 {
    float x, y, z, w;
};
struct __attribute__((aligned(8))) uint2 {
    unsigned x, y;
};
extern dim3 threadIdx, blockIdx, blockDim, gridDim;
extern char *emu_dyn_smem;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__ __restrict
#ifndef __align__
#define __align__(n) __attribute__((aligned(n)))
#endif

void emu_syncthreads(const char *file, int line);
#define __syncthreads() emu_syncthreads(__FILE__, __LINE__)
void emu_warp_exchange(const void *in, void *out, size_t size, int src_lane);
void emu_syncwarp(void);
void emu_shared_register(void *p, size_t n);

template <class T> T emu_shfl_(T v, int src) {
    static_assert(sizeof(T) <= 8, "shuffle of more than 8 bytes");
    T r;
    emu_warp_exchange(&v, &r, sizeof(T), src);
    return r;
}
// Lanes outside the warp or out of range give the caller's own value, as on the GPU
// (__shfl_up_sync with lane - delta < 0, __shfl_down_sync beyond width).
template <class T> T __shfl_xor_sync(unsigned, T v, int lm, int w = 32) {
    const int lane = (int)(threadIdx.x + threadIdx.y * blockDim.x) & 31;
    int src = lane ^ lm;
    if ((src & ~(w - 1)) != (lane & ~(w - 1))) src = lane;
    return emu_shfl_(v, src);
}
template <class T> T __shfl_sync(unsigned, T v, int s, int w = 32) {
    const int lane = (int)(threadIdx.x + threadIdx.y * blockDim.x) & 31;
    return emu_shfl_(v, (lane & ~(w - 1)) + (s & (w - 1)));
}
template <class T> T __shfl_up_sync(unsigned, T v, unsigned d, int w = 32) {
    const int lane = (int)(threadIdx.x + threadIdx.y * blockDim.x) & 31;
    const int src = (lane & (w - 1)) - (int)d;
    return emu_shfl_(v, src < 0 ? lane : lane - (int)d);
}
template <class T> T __shfl_down_sync(unsigned, T v, unsigned d, int w = 32) {
    const int lane = (int)(threadIdx.x + threadIdx.y * blockDim.x) & 31;
    const int src = (lane & (w - 1)) + (int)d;
    return emu_shfl_(v, src >= w ? lane : lane + (int)d);
}
inline void __syncwarp(unsigned = 0xffffffffu) { emu_syncwarp(); }

// Warp votes: a barrier of the warp like a shuffle (every lane posts its predicate, then each
// reads all), over the lanes that take part (exited lanes do not). The mask must name the
// calling lane (fatal otherwise); like the shuffles, partial masks are not modelled: every
// live lane of the warp must reach the vote, and the result covers them all, as on an H100.
unsigned emu_warp_vote(const char *api, unsigned mask, int pred, unsigned *active);
inline unsigned __ballot_sync(unsigned mask, int pred) {
    unsigned active;
    return emu_warp_vote("__ballot_sync", mask, pred, &active);
}
inline int __any_sync(unsigned mask, int pred) {
    unsigned active;
    return emu_warp_vote("__any_sync", mask, pred, &active) != 0;
}
inline int __all_sync(unsigned mask, int pred) {
    unsigned active;
    return emu_warp_vote("__all_sync", mask, pred, &active) == active;
}

// Math: plain libm (no --use_fast_math approximations, no FMA contraction).
inline float __fmul_rn(float a, float b) { volatile float r = a * b; return r; }
inline float __fadd_rn(float a, float b) { volatile float r = a + b; return r; }
inline float __fsub_rn(float a, float b) { volatile float r = a - b; return r; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __saturatef(float x) { return x < 0.f ? 0.f : x > 1.f ? 1.f : x; }

// CUDA's global min / max accept mixed integer types (the usual arithmetic conversions).
template <class A, class B,
          class = std::enable_if_t<std::is_arithmetic_v<A> && std::is_arithmetic_v<B>>>
inline auto min(A a, B b) -> std::common_type_t<A, B> {
    using C = std::common_type_t<A, B>;
    return (C)a < (C)b ? (C)a : (C)b;
}
template <class A, class B,
          class = std::enable_if_t<std::is_arithmetic_v<A> && std::is_arithmetic_v<B>>>
inline auto max(A a, B b) -> std::common_type_t<A, B> {
    using C = std::common_type_t<A, B>;
    return (C)a > (C)b ? (C)a : (C)b;
}

// ---------------------------------------------------------------------------------------
// Launch
struct EmuKernelCall {
    void (*invoke)(void *);
    void *ctx;
};
// Checks the configuration, the pointer arguments and runs the grid. name: the kernel's name.
void emu_run_grid(const char *name, const void *kernel, dim3 grid, dim3 block, size_t smem,
                  EmuKernelCall call);
void emu_check_kernel_pointer(const char *kernel, int arg, const void *p);
// A launch on stream s: the legacy stream's ordering (emu_runtime.cpp, "Streams and events");
// a created stream is refused (not modelled).
void emu_launch_stream(const char *name, cudaStream_t s);

template <class A> inline void emu_check_arg_(const char *k, int i, const A &a) {
    if constexpr (std::is_pointer_v<A>) emu_check_kernel_pointer(k, i, (const void *)a);
}

template <class... KA, class... A>
void emu_launch(const char *name, void (*k)(KA...), dim3 grid, dim3 block, size_t smem,
                cudaStream_t stream, A &&...args) {
    static_assert(sizeof...(KA) == sizeof...(A), "kernel argument count");
    emu_launch_stream(name, stream);
    // the arguments are converted to the parameter types and copied, as cudaLaunchKernel does
    std::tuple<std::decay_t<KA>...> params((KA)args...);
    int i = 0;
    std::apply([&](auto &...p) { (emu_check_arg_(name, i++, p), ...); }, params);
    struct Ctx {
        void (*k)(KA...);
        std::tuple<std::decay_t<KA>...> *p;
    } ctx{k, &params};
    EmuKernelCall call{[](void *c) {
                           Ctx *x = (Ctx *)c;
                           std::apply([&](auto... p) { x->k(p...); }, *x->p); // per-thread copy
                       },
                       &ctx};
    emu_run_grid(name, (const void *)k, grid, block, smem, call);
}
