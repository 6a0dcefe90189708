// selftest_wmma.cu: the emulator's self-test of inc/mma.h (nvcuda::wmma, bf16 16x16x16) and
// of the warp votes (__any_sync, __all_sync, __ballot_sync). Run by `tools/cuda-emu/run.sh
// wmma`; it is not part of moet's build. It also builds with nvcc (nvcc -arch=sm_90
// selftest_wmma.cu), where only the tolerance is checked and the misuses are not detected.
//   selftest_wmma            D = alpha (A B + C) on 4 warps per block, A 32x48 and B 48x32 bf16
//                            from shared memory (row- and col-major each), C loaded row- or
//                            col-major or filled with 0, D stored row- and col-major; the
//                            votes. Prints PASS or FAIL (exit status 1).
//   selftest_wmma MODE       a misuse the GPU punishes, which must end in the emulator's fatal
//                            error: misaligned (a 16-byte aligned load), ldm (bf16 ldm 52),
//                            store_misaligned, oob (a tile past its __shared__ array),
//                            divergent (half the warp at a store, half at __syncwarp),
//                            exited (half the warp exited before mma_sync), vote_mask (a
//                            __ballot_sync whose mask does not name the calling lane).
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

using namespace nvcuda;

#define CK(x)                                                                                      \
    do {                                                                                           \
        cudaError_t e_ = (x);                                                                      \
        if (e_ != cudaSuccess) {                                                                   \
            fprintf(stderr, "%s:%d: %s failed (%d)\n", __FILE__, __LINE__, #x, (int)e_);           \
            exit(1);                                                                               \
        }                                                                                          \
    } while (0)

enum { M = 32, N = 32, K = 48, LDA_ROW = 56, LDA_COL = 40, LDB_ROW = 40, LDB_COL = 56 };
enum { SMEM_ELEMS = 48 * 40 }; // max(32 x 56, 48 x 40) bf16
enum { LDS_D = 36 };           // the padded row of the shared D tile (floats)

// One warp: D tile (wm, wn) = alpha (sum over kt of A(wm, kt) B(kt, wn) + C(wm, wn)).
template <class LA, class LB>
__device__ void tile_mma(const __nv_bfloat16 *sA, int ldsA, const __nv_bfloat16 *sB, int ldsB,
                         const float *C, int c_mode, float alpha, float *Drow, float *Dcol,
                         float *sD, int wm, int wn) {
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    if (c_mode == 0)
        wmma::load_matrix_sync(acc, C + (wm * 16) * N + wn * 16, N, wmma::mem_row_major);
    else if (c_mode == 1) // C stored column-major: C(i,j) at C[j M + i]
        wmma::load_matrix_sync(acc, C + (wn * 16) * M + wm * 16, M, wmma::mem_col_major);
    else
        wmma::fill_fragment(acc, 0.0f);
    for (int kt = 0; kt < K / 16; kt++) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, LA> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, LB> b;
        if (std::is_same_v<LA, wmma::row_major>)
            wmma::load_matrix_sync(a, sA + (wm * 16) * ldsA + kt * 16, ldsA);
        else
            wmma::load_matrix_sync(a, sA + (kt * 16) * ldsA + wm * 16, ldsA);
        if (std::is_same_v<LB, wmma::row_major>)
            wmma::load_matrix_sync(b, sB + (kt * 16) * ldsB + wn * 16, ldsB);
        else
            wmma::load_matrix_sync(b, sB + (wn * 16) * ldsB + kt * 16, ldsB);
        wmma::mma_sync(acc, a, b, acc);
    }
    for (int i = 0; i < acc.num_elements; i++) acc.x[i] *= alpha;
    wmma::store_matrix_sync(Drow + (wm * 16) * N + wn * 16, acc, N, wmma::mem_row_major);
    wmma::store_matrix_sync(Dcol + (wn * 16) * M + wm * 16, acc, M, wmma::mem_col_major);
    // and through shared memory with a padded row (the warp's own 16 x LDS_D slice)
    float *t = sD + (size_t)(wm * 2 + wn) * 16 * LDS_D;
    wmma::store_matrix_sync(t, acc, LDS_D, wmma::mem_row_major);
}

// A and B as stored in global memory (a_col: A^T, 48 x 32; b_col: B^T, 32 x 48), copied into
// shared memory with padded rows; 4 warps, warp w computes the tile (w / 2, w % 2).
__global__ void wmma_kernel(const __nv_bfloat16 *gA, const __nv_bfloat16 *gB, const float *C,
                            float *Drow, float *Dcol, float *Dsh, int a_col, int b_col, int c_mode,
                            float alpha) {
    __shared__ __align__(32) __nv_bfloat16 sA[SMEM_ELEMS];
    __shared__ __align__(32) float sD[4 * 16 * LDS_D];
    extern __shared__ __align__(32) __nv_bfloat16 sB[];
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int a_rows = a_col ? K : M, a_cols = a_col ? M : K, ldsA = a_col ? LDA_COL : LDA_ROW;
    const int b_rows = b_col ? N : K, b_cols = b_col ? K : N, ldsB = b_col ? LDB_COL : LDB_ROW;
    for (int e = tid; e < a_rows * a_cols; e += blockDim.x)
        sA[(e / a_cols) * ldsA + e % a_cols] = gA[e];
    for (int e = tid; e < b_rows * b_cols; e += blockDim.x)
        sB[(e / b_cols) * ldsB + e % b_cols] = gB[e];
    __syncthreads();
    const int wm = warp / 2, wn = warp % 2;
    if (!a_col && !b_col)
        tile_mma<wmma::row_major, wmma::row_major>(sA, ldsA, sB, ldsB, C, c_mode, alpha, Drow, Dcol,
                                                   sD, wm, wn);
    else if (!a_col && b_col)
        tile_mma<wmma::row_major, wmma::col_major>(sA, ldsA, sB, ldsB, C, c_mode, alpha, Drow, Dcol,
                                                   sD, wm, wn);
    else if (a_col && !b_col)
        tile_mma<wmma::col_major, wmma::row_major>(sA, ldsA, sB, ldsB, C, c_mode, alpha, Drow, Dcol,
                                                   sD, wm, wn);
    else
        tile_mma<wmma::col_major, wmma::col_major>(sA, ldsA, sB, ldsB, C, c_mode, alpha, Drow, Dcol,
                                                   sD, wm, wn);
    __syncwarp();
    // the warp's shared tile, written back by its lanes (row-major, ld N)
    const float *t = sD + warp * 16 * LDS_D;
    for (int e = lane; e < 256; e += 32)
        Dsh[(wm * 16 + e / 16) * N + wn * 16 + e % 16] = t[(e / 16) * LDS_D + e % 16];
}

// Votes: per thread 8 results.
__global__ void vote_kernel(unsigned *out) {
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    unsigned *o = out + tid * 8;
    o[0] = __any_sync(0xffffffffu, lane == 7);
    o[1] = __any_sync(0xffffffffu, lane == 99);
    o[2] = __all_sync(0xffffffffu, lane < 32);
    o[3] = __all_sync(0xffffffffu, lane != 5);
    o[4] = __ballot_sync(0xffffffffu, lane & 1);
    o[5] = __ballot_sync(0xffffffffu, lane < 5);
    o[6] = __all_sync(0xffffffffu, warp != 1);
    o[7] = __any_sync(0xffffffffu, warp == 2 && lane == 3);
}

// Misuses (each must be fatal).
__global__ void bad_kernel(int mode, float *C) {
    __shared__ __align__(32) __nv_bfloat16 s[64 * 16];
    const int lane = threadIdx.x % 32;
    for (int e = threadIdx.x; e < 64 * 16; e += blockDim.x) s[e] = __float2bfloat16(1.0f);
    __syncthreads();
    wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> a;
    wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> b;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    wmma::fill_fragment(acc, 0.0f);
    switch (mode) {
    case 0:
        wmma::load_matrix_sync(a, s + 8, 16);
        break; // 16 bytes off
    case 1:
        wmma::load_matrix_sync(a, s, 52);
        break; // ldm not a multiple of 8
    case 2:
        wmma::store_matrix_sync(C + 4, acc, 32, wmma::mem_row_major);
        break;
    case 3:
        wmma::load_matrix_sync(b, s + 16 * 56, 16);
        break; // 16 rows from row 56 of 64
    case 4:
        if (lane < 16) wmma::store_matrix_sync(C, acc, 32, wmma::mem_row_major);
        __syncwarp();
        break;
    case 5:
        wmma::load_matrix_sync(a, s, 16);
        wmma::load_matrix_sync(b, s, 16);
        if (lane >= 16) return;
        wmma::mma_sync(acc, a, b, acc);
        break;
    case 6:
        C[threadIdx.x] = (float)__ballot_sync(0x0000ffffu, 1);
        break; // lanes 16.. unnamed
    }
}

// The emulator sums k = 0 .. 15 in order onto c in fp32 (inc/mma.h): bitwise equal to the host
// loop below. Tensor cores do not promise that order, so under nvcc only the tolerance counts.
#ifdef __NVCC__
static const bool exact_order = false;
#else
static const bool exact_order = true;
#endif

static float bf16_round(float f) {
    return __bfloat162float(__float2bfloat16(f));
}

int main(int argc, char **argv) {
    static const char *modes[] = {"misaligned", "ldm",    "store_misaligned", "oob",
                                  "divergent",  "exited", "vote_mask"};
    if (argc > 1) {
        int mode = -1;
        for (int i = 0; i < 7; i++)
            if (!strcmp(argv[1], modes[i])) mode = i;
        if (mode < 0) {
            fprintf(stderr, "unknown mode %s\n", argv[1]);
            return 2;
        }
        float *C;
        CK(cudaMalloc((void **)&C, 32 * 32 * sizeof(float)));
        bad_kernel<<<1, 64>>>(mode, C);
        CK(cudaDeviceSynchronize());
        printf("FAIL: %s: no fatal error\n", argv[1]);
        return 1;
    }
    srand(12345);
    auto rnd = [] { return (float)rand() / RAND_MAX * 2.0f - 1.0f; };
    std::vector<float> A(M * K), B(K * N), C(M * N); // A(i,k) = A[i K + k], B(k,j) = B[k N + j]
    for (auto &v : A) v = bf16_round(rnd());
    for (auto &v : B) v = bf16_round(rnd());
    for (auto &v : C) v = rnd();
    std::vector<__nv_bfloat16> hA(M * K), hAt(M * K), hB(K * N), hBt(K * N);
    for (int i = 0; i < M; i++)
        for (int k = 0; k < K; k++) {
            hA[i * K + k] = __float2bfloat16(A[i * K + k]);
            hAt[k * M + i] = hA[i * K + k];
        }
    for (int k = 0; k < K; k++)
        for (int j = 0; j < N; j++) {
            hB[k * N + j] = __float2bfloat16(B[k * N + j]);
            hBt[j * K + k] = hB[k * N + j];
        }
    std::vector<float> Ccol(M * N);
    for (int i = 0; i < M; i++)
        for (int j = 0; j < N; j++) Ccol[j * M + i] = C[i * N + j];
    __nv_bfloat16 *dA, *dAt, *dB, *dBt;
    float *dC, *dCcol, *dDrow, *dDcol, *dDsh;
    CK(cudaMalloc((void **)&dA, M * K * 2));
    CK(cudaMalloc((void **)&dAt, M * K * 2));
    CK(cudaMalloc((void **)&dB, K * N * 2));
    CK(cudaMalloc((void **)&dBt, K * N * 2));
    CK(cudaMalloc((void **)&dC, M * N * 4));
    CK(cudaMalloc((void **)&dCcol, M * N * 4));
    CK(cudaMalloc((void **)&dDrow, M * N * 4));
    CK(cudaMalloc((void **)&dDcol, M * N * 4));
    CK(cudaMalloc((void **)&dDsh, M * N * 4));
    CK(cudaMemcpy(dA, hA.data(), M * K * 2, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(dAt, hAt.data(), M * K * 2, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(dB, hB.data(), K * N * 2, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(dBt, hBt.data(), K * N * 2, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(dC, C.data(), M * N * 4, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(dCcol, Ccol.data(), M * N * 4, cudaMemcpyHostToDevice));
    const float alpha = 0.75f;
    int fails = 0;
    double worst = 0;
    const char *lname[2] = {"row_major", "col_major"},
               *cname[3] = {"load mem_row_major", "load mem_col_major", "fill 0"};
    for (int a_col = 0; a_col < 2; a_col++)
        for (int b_col = 0; b_col < 2; b_col++)
            for (int c_mode = 0; c_mode < 3; c_mode++) {
                wmma_kernel<<<1, 128, SMEM_ELEMS * sizeof(__nv_bfloat16)>>>(
                    a_col ? dAt : dA, b_col ? dBt : dB, c_mode == 1 ? dCcol : dC, dDrow, dDcol,
                    dDsh, a_col, b_col, c_mode, alpha);
                CK(cudaGetLastError());
                std::vector<float> Drow(M * N), Dcol(M * N), Dsh(M * N);
                CK(cudaMemcpy(Drow.data(), dDrow, M * N * 4, cudaMemcpyDeviceToHost));
                CK(cudaMemcpy(Dcol.data(), dDcol, M * N * 4, cudaMemcpyDeviceToHost));
                CK(cudaMemcpy(Dsh.data(), dDsh, M * N * 4, cudaMemcpyDeviceToHost));
                int bad = 0, inexact = 0;
                double w = 0;
                for (int i = 0; i < M; i++)
                    for (int j = 0; j < N; j++) {
                        const float c0 = c_mode == 2 ? 0.f : C[i * N + j];
                        double ref = c0, mag = fabs(c0);
                        float f = c0; // the emulator's order: k = 0 .. 47 onto c, in fp32
                        for (int k = 0; k < K; k++) {
                            ref += (double)A[i * K + k] * B[k * N + j];
                            mag += fabs((double)A[i * K + k] * B[k * N + j]);
                            f += A[i * K + k] * B[k * N + j];
                        }
                        ref *= alpha;
                        mag *= alpha;
                        f *= alpha;
                        const float got[3] = {Drow[i * N + j], Dcol[j * M + i], Dsh[i * N + j]};
                        for (int g = 0; g < 3; g++) {
                            const double e = fabs(got[g] - ref) / (1e-5 * (mag > 1 ? mag : 1));
                            if (!(e <= 1)) bad++;
                            if (e > w) w = e;
                            if (exact_order && got[g] != f) inexact++;
                        }
                    }
                printf("  A %s, B %s, C %s: worst |err|/tol %.3f (tol 1e-5 rel), %d of %d "
                       "outside, %d not bitwise equal to fp32 k-order%s\n",
                       lname[a_col], lname[b_col], cname[c_mode], w, bad, 3 * M * N, inexact,
                       bad || inexact ? "  FAIL" : "");
                if (bad || inexact) fails++;
                if (w > worst) worst = w;
            }
    // votes: 4 warps
    unsigned *dv;
    CK(cudaMalloc((void **)&dv, 128 * 8 * sizeof(unsigned)));
    vote_kernel<<<1, 128>>>(dv);
    CK(cudaGetLastError());
    std::vector<unsigned> v(128 * 8);
    CK(cudaMemcpy(v.data(), dv, v.size() * sizeof(unsigned), cudaMemcpyDeviceToHost));
    int vbad = 0;
    for (int t = 0; t < 128; t++) {
        const unsigned want[8] = {
            1, 0, 1, 0, 0xaaaaaaaau, 0x1fu, t / 32 != 1 ? 1u : 0u, t / 32 == 2 ? 1u : 0u};
        for (int q = 0; q < 8; q++)
            if (v[t * 8 + q] != want[q]) {
                if (vbad++ < 10)
                    printf("  vote %d thread %d: got %#x, want %#x  FAIL\n", q, t, v[t * 8 + q],
                           want[q]);
            }
    }
    printf("  votes (__any_sync, __all_sync, __ballot_sync; 4 warps, 8 predicates): %d wrong\n",
           vbad);
    if (vbad) fails++;
    CK(cudaFree(dA));
    CK(cudaFree(dAt));
    CK(cudaFree(dB));
    CK(cudaFree(dBt));
    CK(cudaFree(dC));
    CK(cudaFree(dCcol));
    CK(cudaFree(dDrow));
    CK(cudaFree(dDcol));
    CK(cudaFree(dDsh));
    CK(cudaFree(dv));
    printf("%s (wmma: 12 layout / C combinations, worst |err|/tol %.3f; votes)\n",
           fails ? "FAIL" : "PASS", worst);
    return fails ? 1 : 0;
}
