// attention_flash.cu: the training attention's forward as one fused kernel on bf16 tensor cores,
// FlashAttention-2's loop (Dao 2023), for the bf16-operand path of cuda_attention_forward.
//
// Why: the GEMM path of attention.cu writes the fp32 scores of each sequence to an (H,T,T)
// matrix in GPU memory, reads them back for the softmax and writes P before P V: at T = 4096,
// H = 16 about 2.5 GiB of traffic per sequence and layer, most of the forward's time on an H100
// (bench/results/2026-11-27-gpu-h100-round9.md). Here each block of 64 queries walks the key
// tiles up to the diagonal with its scores in shared memory and its output in registers: no
// (T,T) matrix, and only the causal half of the work.
//
// Per block (4 warps, one head, queries [q0, q0 + 64), 16 rows per warp), per key tile of 64:
//   K, V tile          bf16 from the sequence's bf16 copies into shared memory (all warps)
//   S = Q K^T          (16 x 64) per warp, WMMA 16x16x16, fp32 accumulation, into shared
//   online softmax     a reference max m per row and the sum l in the log2 domain (exp2 of
//                      scale*log2(e)*s), keys past the query masked (exactly 0); P rounded to
//                      bf16. m moves only when a tile's max passes it by more than FA_STALE
//                      (2^8), so that O is rarely rescaled
//   O = alpha O + P V  alpha = 2^(m_old - m_new); O stays in accumulator fragments, and goes
//                      through shared memory to be rescaled only on the tiles where a row's
//                      m moved (the fragments' element-to-row map is not documented)
// then out = O / l and lse = ln 2 * (m + log2 l), the natural log-sum-exp of the scaled scores
// that cuda_attention_backward reads.
//
// Numerics against the GEMM path: the same bf16 operands (q, k, v rounded to nearest), the
// scores accumulated in fp32 in another order, P rounded to bf16 before its normalisation
// rather than after (FlashAttention's choice; l sums the unrounded p). The tests bound both
// paths against the CPU with the same tolerances (tests/cuda/test_cuda_gemm.c).
// Determinism: fixed loops, no atomics; each output is written by one thread: bitwise the same
// from run to run.
//
// Head sizes 16, 32, 64 and 128 (one instantiation each); other sizes take the GEMM path.
//
// Status: opt-in (MOET_CUDA_ATTN_FLASH=1), because on an H100 it is no faster than the GEMM
// path (bench/results/2026-11-27-gpu-h100-round9.md): bench-gpu-olmoe's forward attention took
// 24.8 ms per step against 21.0 (first version, which rescaled O on every tile where a row's max
// grew), then 0.248 s against 0.247 s per step with the reference max of FA_STALE. WMMA keeps
// S and P in shared memory (its fragments' layout is not documented), so each tile moves S, P
// and sometimes O through shared memory besides the K and V fragments every warp loads: by an
// estimate of those bytes (not profiled with ncu) the kernel is bound by shared-memory
// bandwidth; it reached about 220 TFLOP/s on the causal half. Faster
// needs S and P in registers (mma.sync with a known layout, or wgmma), asynchronous K/V loads,
// and a flash backward (the backward, 42 ms, still goes through (H,T,T) matrices).
#include <math.h>
#include <mma.h>

#include "kernels/cuda/cublas_util.cuh"
#include "kernels/cuda/kernels_cuda.h"
#include "kernels/env_switch.h"

using namespace nvcuda;

enum { FA_BQ = 64, FA_BK = 64, FA_WARPS = 4, FA_THREADS = 32 * FA_WARPS, FA_PAD = 8 };
// How far (log2) a row's max may pass the reference m before O is rescaled: p <= 2^8 = 256,
// well inside fp32's and bf16's range, and l <= T * 256.
#define FA_STALE 8.0f

// Shared memory of one block, in bytes from its start: K and V tiles (FA_BK x DH bf16, rows
// padded by FA_PAD against bank conflicts), per warp an fp32 staging area (its 16 rows of S,
// or of O to rescale or write out, or at the start its Q rows in bf16) and its P (16 x FA_BK
// bf16). Every WMMA pointer below is a multiple of 32 bytes from the start, as WMMA requires.
template <int DH> struct FaShape {
    static constexpr int LDB = DH + FA_PAD;                     // K, V, Q rows (bf16)
    static constexpr int SW = (DH > FA_BK ? DH : FA_BK) + 4;    // staging rows (fp32)
    static constexpr int LDP = FA_BK + FA_PAD;                  // P rows (bf16)
    static constexpr size_t KV_BYTES = (size_t)FA_BK * LDB * 2; // one of K, V
    static constexpr size_t ST_BYTES = (size_t)FA_WARPS * 16 * SW * 4;
    static constexpr size_t P_BYTES = (size_t)FA_WARPS * 16 * LDP * 2;
    static constexpr size_t SMEM = 2 * KV_BYTES + ST_BYTES + P_BYTES;
};

typedef wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> FragA;
typedef wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> FragBt;
typedef wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::row_major> FragB;
typedef wmma::fragment<wmma::accumulator, 16, 16, 16, float> FragC;

// Copies rows [r0, r0 + nrows) of a (T, ld) bf16 matrix's DH columns at src into dst (row
// stride ldd), 8 values (16 bytes) per step, threads i0, i0 + di, ...; rows at or past T get
// zeros (their keys are masked, their queries never written out).
template <int DH>
static __device__ __forceinline__ void fa_load_rows_(__nv_bfloat16 *dst, int ldd,
                                                     const __nv_bfloat16 *src, int ld, int r0,
                                                     int nrows, int T, int i0, int di) {
    for (int i = i0; i < nrows * (DH / 8); i += di) {
        const int r = i / (DH / 8), c = i % (DH / 8) * 8;
        float4 val; // 8 bf16 as 16 bytes, bits unchanged
        val.x = val.y = val.z = val.w = 0.0f;
        if (r0 + r < T) val = *(const float4 *)(src + (size_t)(r0 + r) * ld + c);
        *(float4 *)(dst + r * ldd + c) = val;
    }
}

// One sequence: q16, k16, v16 its (T, H*DH) bf16 copies, out (T, H*DH), lse (H, T). Grid
// (ceil(T / 64), H), the longest query tiles (most key tiles) first.
template <int DH>
__global__ void __launch_bounds__(FA_THREADS)
    flash_forward_kernel(float *out, float *lse, const __nv_bfloat16 *q16, const __nv_bfloat16 *k16,
                         const __nv_bfloat16 *v16, int T, int H, float scale_log2) {
    typedef FaShape<DH> S;
    extern __shared__ __align__(128) unsigned char fa_smem[];
    __nv_bfloat16 *ks = (__nv_bfloat16 *)fa_smem;
    __nv_bfloat16 *vs = (__nv_bfloat16 *)(fa_smem + S::KV_BYTES);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    float *st = (float *)(fa_smem + 2 * S::KV_BYTES) + (size_t)warp * 16 * S::SW;
    __nv_bfloat16 *ps =
        (__nv_bfloat16 *)(fa_smem + 2 * S::KV_BYTES + S::ST_BYTES) + (size_t)warp * 16 * S::LDP;
    const int h = blockIdx.y, qt = gridDim.x - 1 - blockIdx.x;
    const int ld = H * DH, q0 = qt * FA_BQ, w0 = q0 + 16 * warp; // block's, warp's first query
    const __nv_bfloat16 *qh = q16 + h * DH, *kh = k16 + h * DH, *vh = v16 + h * DH;

    // the warp's 16 query rows into its staging area (as bf16), then into fragments
    __nv_bfloat16 *qs = (__nv_bfloat16 *)st;
    fa_load_rows_<DH>(qs, S::LDB, qh, ld, w0, 16, T, lane, 32);
    __syncwarp();
    FragA qa[DH / 16];
    for (int kk = 0; kk < DH / 16; kk++) wmma::load_matrix_sync(qa[kk], qs + kk * 16, S::LDB);
    FragC o[DH / 16];
    for (int n = 0; n < DH / 16; n++) wmma::fill_fragment(o[n], 0.0f);
    __syncwarp(); // every lane has its Q: the staging area takes S next

    // lane: row r of the warp's 16 (query t), keys [32 half, 32 half + 32) of each tile
    const int r = lane / 2, half = lane % 2, t = w0 + r;
    float m = -INFINITY, l = 0.0f; // the row's running max (log2 domain) and sum of p
    for (int kt = 0; kt <= qt; kt++) {
        const int k0 = kt * FA_BK;
        __syncthreads(); // every warp is done with the previous K and V
        fa_load_rows_<DH>(ks, S::LDB, kh, ld, k0, FA_BK, T, threadIdx.x, FA_THREADS);
        fa_load_rows_<DH>(vs, S::LDB, vh, ld, k0, FA_BK, T, threadIdx.x, FA_THREADS);
        __syncthreads();

        // S (16 x FA_BK) = Q K^T; K^T's (d, key) is ks[key * LDB + d]: column-major K^T
        for (int n = 0; n < FA_BK / 16; n++) {
            FragC s;
            wmma::fill_fragment(s, 0.0f);
            for (int kk = 0; kk < DH / 16; kk++) {
                FragBt kb;
                wmma::load_matrix_sync(kb, ks + n * 16 * S::LDB + kk * 16, S::LDB);
                wmma::mma_sync(s, qa[kk], kb, s);
            }
            wmma::store_matrix_sync(st + n * 16, s, S::SW, wmma::mem_row_major);
        }
        __syncwarp();

        // online softmax of the lane's 32 scores; keys past t (only on the diagonal tile) are 0.
        // x = scale log2(e) s is rounded once (__fmul_rn: no fused multiply-add), so the max
        // term is exactly 2^0 = 1 (a single key gives P = 1 and out = v exactly).
        const float *sr = st + r * S::SW + 32 * half;
        const int j0 = k0 + 32 * half;
        float mx = -INFINITY;
        for (int j = 0; j < 32; j++)
            if (j0 + j <= t) mx = fmaxf(mx, __fmul_rn(sr[j], scale_log2));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        // the reference m moves only when the tile's max passes it by more than FA_STALE
        // (or at the first tile, m = -inf): terms stay below 2^FA_STALE, and O is rescaled
        // on few tiles (random scores: the first only)
        const float m_new = mx > m + FA_STALE ? mx : m; // finite: key 0 is in every first tile
        const float alpha = exp2f(m - m_new); // 0 at the first tile, else 1 or below 2^-FA_STALE
        float sum = 0.0f;
        __nv_bfloat16 *pr = ps + r * S::LDP + 32 * half;
        for (int j = 0; j < 32; j++) {
            const float p = j0 + j <= t ? exp2f(__fmul_rn(sr[j], scale_log2) - m_new) : 0.0f;
            sum += p;
            pr[j] = __float2bfloat16_rn(p);
        }
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        l = l * alpha + sum;
        m = m_new;
        const int grew = __any_sync(0xffffffffu, alpha != 1.0f); // some row's m moved
        __syncwarp(); // S is read; P is written

        // O = alpha O, through the staging area, where some row's max grew
        if (grew) {
            for (int n = 0; n < DH / 16; n++)
                wmma::store_matrix_sync(st + n * 16, o[n], S::SW, wmma::mem_row_major);
            __syncwarp();
            float *orow = st + r * S::SW + half * (DH / 2);
            for (int c = 0; c < DH / 2; c++) orow[c] *= alpha;
            __syncwarp();
            for (int n = 0; n < DH / 16; n++)
                wmma::load_matrix_sync(o[n], st + n * 16, S::SW, wmma::mem_row_major);
        }
        // O += P V; V's (key, d) is vs[key * LDB + d]: row-major
        FragA pa[FA_BK / 16];
        for (int kk = 0; kk < FA_BK / 16; kk++)
            wmma::load_matrix_sync(pa[kk], ps + kk * 16, S::LDP);
        for (int n = 0; n < DH / 16; n++)
            for (int kk = 0; kk < FA_BK / 16; kk++) {
                FragB vb;
                wmma::load_matrix_sync(vb, vs + kk * 16 * S::LDB + n * 16, S::LDB);
                wmma::mma_sync(o[n], pa[kk], vb, o[n]);
            }
        __syncwarp(); // P and the staging area are free for the next tile
    }

    // out = O / l (l >= 1: the row's max term is at least 2^0), lse = ln 2 (m + log2 l)
    for (int n = 0; n < DH / 16; n++)
        wmma::store_matrix_sync(st + n * 16, o[n], S::SW, wmma::mem_row_major);
    __syncwarp();
    if (t < T) {
        const float inv = 1.0f / l;
        const float *srow = st + r * S::SW + half * (DH / 2);
        float *orow = out + (size_t)t * ld + h * DH + half * (DH / 2);
        for (int c = 0; c < DH / 2; c++) orow[c] = srow[c] * inv;
        if (half == 0) lse[(size_t)h * T + t] = (m + log2f(l)) * 0.69314718055994531f;
    }
}

// 1 on, 0 off (the default: not faster than the GEMM path on an H100, see the top), -1: not yet
// read from MOET_CUDA_ATTN_FLASH
static int flash_setting_ = -1;

static int flash_from_env_(void) {
    // a default-off switch: kernels_env_switch's "on" value is the default ("0"), so it
    // returns 0 when MOET_CUDA_ATTN_FLASH=1 asks for the kernel
    return !kernels_env_switch("MOET_CUDA_ATTN_FLASH", "0", "1",
                               "the bf16 training attention's forward runs as one flash kernel "
                               "(attention_flash.cu)",
                               "the attention forward as one flash kernel");
}

void cuda_set_attention_flash(int on) {
    flash_setting_ = on < 0 ? flash_from_env_() : on != 0;
}

int cuda_attention_flash(int Dh) {
    if (flash_setting_ < 0) flash_setting_ = flash_from_env_();
    return flash_setting_ && (Dh == 16 || Dh == 32 || Dh == 64 || Dh == 128);
}

template <int DH>
static void flash_launch_(float *out, float *lse, const __nv_bfloat16 *q16,
                          const __nv_bfloat16 *k16, const __nv_bfloat16 *v16, int T, int H,
                          float scale_log2) {
    const size_t smem = FaShape<DH>::SMEM;
    void (*kern)(float *, float *, const __nv_bfloat16 *, const __nv_bfloat16 *,
                 const __nv_bfloat16 *, int, int, float) = flash_forward_kernel<DH>;
    static int opted_in = 0; // once per instantiation (and per process: one GPU per rank)
    if (!opted_in && smem > 48 * 1024) {
        CUDA_CHECK(
            cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
        opted_in = 1;
    }
    const dim3 grid((unsigned)((T + FA_BQ - 1) / FA_BQ), (unsigned)H);
    kern<<<grid, FA_THREADS, smem>>>(out, lse, q16, k16, v16, T, H, scale_log2);
    CUDA_CHECK_LAUNCH();
}

void cuda_attention_flash_forward_(float *out, float *lse, const __nv_bfloat16 *q16,
                                   const __nv_bfloat16 *k16, const __nv_bfloat16 *v16, int T, int H,
                                   int Dh) {
    const float scale_log2 = 1.4426950408889634f / sqrtf((float)Dh);
    switch (Dh) {
    case 16:
        flash_launch_<16>(out, lse, q16, k16, v16, T, H, scale_log2);
        break;
    case 32:
        flash_launch_<32>(out, lse, q16, k16, v16, T, H, scale_log2);
        break;
    case 64:
        flash_launch_<64>(out, lse, q16, k16, v16, T, H, scale_log2);
        break;
    case 128:
        flash_launch_<128>(out, lse, q16, k16, v16, T, H, scale_log2);
        break;
    default:
        fprintf(stderr,
                "moet: fatal: cuda_attention_flash_forward_: head size %d (16, 32, 64 "
                "or 128; cuda_attention_flash(Dh) says which)\n",
                Dh);
        exit(EXIT_FAILURE);
    }
}
