// mma.h of the CUDA host emulator (tools/cuda-emu): the part of the WMMA API (nvcuda::wmma)
// for bf16 tensor-core tiles: the 16 x 16 x 16 shape, __nv_bfloat16 matrix_a / matrix_b
// (row_major or col_major), float accumulators. See tools/cuda-emu/README.md.
//
// Emulation model: every thread holds the WHOLE 16 x 16 tile in its fragment (num_elements is
// 256, not the hardware's 8 per lane; x[] is the tile in row-major order of the logical
// matrix: matrix_a (i,k) at x[16 i + k], matrix_b (k,j) at x[16 k + j], accumulator (i,j) at
// x[16 i + j]). Code that uses the API as documented (element-wise loops over x[] with one op
// for all elements) is exact; code that depends on which lane holds which element is not
// modelled. load_matrix_sync reads the whole tile in every lane, store_matrix_sync writes it
// from every lane (the same values), mma_sync computes the full product in every lane: fp32
// sums of the (exact) products of the bf16 values, k = 0 .. 15 in order onto c.
//
// load_matrix_sync, store_matrix_sync and mma_sync are barriers of the warp (after the lane's
// own load, store or product): every lane of the warp must reach the same call, as on the GPU
// (a lane elsewhere, exited lanes or a partial warp are fatal). The pointer must be 256-bit
// aligned, ldm a multiple of 16 bytes, and the tile inside one device allocation or shared
// array (fatal otherwise). A fragment is constructed full of NaN (0xFF bytes), so a fragment
// used before fill_fragment / load_matrix_sync shows.
#pragma once
#include <cstring>
#include <type_traits>

#include "cuda_bf16.h"

// emu_runtime.cpp
void emu_wmma_check(const char *api, const void *p, unsigned ldm, size_t esz);
void emu_wmma_sync(const char *api);

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <class Use, int M, int N, int K, class T, class Layout = void> struct fragment {
    static_assert(M == 16 && N == 16 && K == 16,
                  "cuda-emu wmma: only the m16n16k16 shape is emulated");
    static_assert(std::is_same_v<Use, matrix_a> || std::is_same_v<Use, matrix_b> ||
                      std::is_same_v<Use, accumulator>,
                  "cuda-emu wmma: Use must be matrix_a, matrix_b or accumulator");
    static_assert(!std::is_same_v<Use, accumulator> ||
                      (std::is_same_v<T, float> && std::is_void_v<Layout>),
                  "cuda-emu wmma: accumulators are float, without a layout");
    static_assert(std::is_same_v<Use, accumulator> ||
                      (std::is_same_v<T, __nv_bfloat16> &&
                       (std::is_same_v<Layout, row_major> || std::is_same_v<Layout, col_major>)),
                  "cuda-emu wmma: matrix_a / matrix_b are __nv_bfloat16, row_major or col_major");
    typedef T element_type;
    typedef T storage_element_type;
    enum { num_elements = 256, num_storage_elements = 256 };
    T x[num_elements];
    fragment() {
        memset(x, 0xFF, sizeof x);
    } // NaN until filled or loaded
};

template <class Use, int M, int N, int K, class T, class L, class V>
inline void fill_fragment(fragment<Use, M, N, K, T, L> &f, const V &v) {
    T e;
    if constexpr (std::is_same_v<T, __nv_bfloat16> && !std::is_same_v<V, __nv_bfloat16>)
        e = __float2bfloat16((float)v);
    else
        e = (T)v;
    for (int i = 0; i < f.num_elements; i++) f.x[i] = e;
}

// matrix_a: (i,k) at p[i * ldm + k] (row_major) or p[k * ldm + i] (col_major);
// matrix_b: (k,j) at p[k * ldm + j] (row_major) or p[j * ldm + k] (col_major).
template <class Use, int M, int N, int K, class T, class L>
inline void load_matrix_sync(fragment<Use, M, N, K, T, L> &f, const T *p, unsigned ldm) {
    static_assert(!std::is_same_v<Use, accumulator>,
                  "load_matrix_sync of an accumulator takes a layout_t");
    emu_wmma_check("wmma::load_matrix_sync", p, ldm, sizeof(T));
    constexpr bool row = std::is_same_v<L, row_major>;
    for (unsigned r = 0; r < 16; r++)
        for (unsigned c = 0; c < 16; c++) f.x[r * 16 + c] = row ? p[r * ldm + c] : p[c * ldm + r];
    emu_wmma_sync("wmma::load_matrix_sync");
}

// accumulator: (i,j) at p[i * ldm + j] (mem_row_major) or p[j * ldm + i] (mem_col_major).
template <int M, int N, int K, class T>
inline void load_matrix_sync(fragment<accumulator, M, N, K, T> &f, const T *p, unsigned ldm,
                             layout_t layout) {
    emu_wmma_check("wmma::load_matrix_sync", p, ldm, sizeof(T));
    const bool row = layout == mem_row_major;
    for (unsigned i = 0; i < 16; i++)
        for (unsigned j = 0; j < 16; j++) f.x[i * 16 + j] = row ? p[i * ldm + j] : p[j * ldm + i];
    emu_wmma_sync("wmma::load_matrix_sync");
}

template <int M, int N, int K, class T>
inline void store_matrix_sync(T *p, const fragment<accumulator, M, N, K, T> &f, unsigned ldm,
                              layout_t layout) {
    emu_wmma_check("wmma::store_matrix_sync", p, ldm, sizeof(T));
    const bool row = layout == mem_row_major;
    for (unsigned i = 0; i < 16; i++)
        for (unsigned j = 0; j < 16; j++) (row ? p[i * ldm + j] : p[j * ldm + i]) = f.x[i * 16 + j];
    emu_wmma_sync("wmma::store_matrix_sync");
}

// d = a b + c (d may be c): fp32, d(i,j) = c(i,j) + a(i,0) b(0,j) + ... + a(i,15) b(15,j) in
// that order (each bf16 x bf16 product is exact in fp32, so FMA contraction changes nothing).
template <int M, int N, int K, class LA, class LB>
inline void mma_sync(fragment<accumulator, M, N, K, float> &d,
                     const fragment<matrix_a, M, N, K, __nv_bfloat16, LA> &a,
                     const fragment<matrix_b, M, N, K, __nv_bfloat16, LB> &b,
                     const fragment<accumulator, M, N, K, float> &c) {
    float af[256], bf[256], t[256];
    for (int e = 0; e < 256; e++) {
        af[e] = __bfloat162float(a.x[e]);
        bf[e] = __bfloat162float(b.x[e]);
    }
    for (int i = 0; i < 16; i++)
        for (int j = 0; j < 16; j++) {
            float s = c.x[i * 16 + j];
            for (int k = 0; k < 16; k++) s += af[i * 16 + k] * bf[k * 16 + j];
            t[i * 16 + j] = s;
        }
    memcpy(d.x, t, sizeof t);
    emu_wmma_sync("wmma::mma_sync");
}

} // namespace wmma
} // namespace nvcuda
