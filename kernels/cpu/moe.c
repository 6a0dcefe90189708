// CPU kernels: the dropless MoE dispatch. moe_plan sorts the N*K (token, slot) assignments by
// expert (a stable counting sort); permute gathers token rows into expert order; unpermute
// gathers them back and combines the K expert outputs of each token with the top-k weights.
#include "kernels/kernels.h"

#include <string.h>

#include "kernels/cpu/lane_sums.h"

// Loops over fewer elements than this run on the calling thread: waking the team costs more
// than it saves, and on a loaded machine a barrier can wait a whole time slice for a thread.
#define PAR_MIN 65536

// counts is (E), offsets is (E+1), row_token is (R), assign_row is (N*K), topk_idx is (N,K)
void moe_plan(int32_t *counts, int32_t *offsets, int32_t *row_token, int32_t *assign_row,
              const int32_t *topk_idx, int N, int K, int E) {
    const size_t nk = (size_t)N * K;
    for (int e = 0; e < E; e++) counts[e] = 0;
    for (size_t a = 0; a < nk; a++) counts[topk_idx[a]]++;
    offsets[0] = 0;
    for (int e = 0; e < E; e++) offsets[e + 1] = offsets[e] + counts[e];
    // second pass in (t, j) order, counts reused as the fill cursor (it ends where it started)
    for (int e = 0; e < E; e++) counts[e] = 0;
    for (size_t a = 0; a < nk; a++) {
        const int e = topk_idx[a];
        const int32_t r = offsets[e] + counts[e]++;
        row_token[r] = (int32_t)(a / K);
        assign_row[a] = r;
    }
}

// xp is (R,D), x is (N,D), row_token is (R)
void permute_forward(float *xp, const float *x, const int32_t *row_token, int R, int D) {
#pragma omp parallel for schedule(static) if ((size_t)R * D >= PAR_MIN)
    for (int r = 0; r < R; r++) {
        memcpy(xp + (size_t)r * D, x + (size_t)row_token[r] * D, (size_t)D * sizeof(float));
    }
}

// Writes dx: 0 + the K rows in order (the same sums as accumulating into a zeroed dx).
// dx is (N,D), dxp is (R,D), assign_row is (N,K)
void permute_backward(float *dx, const float *dxp, const int32_t *assign_row, int N, int K, int D) {
    if (!dx) return;
#pragma omp parallel for schedule(static) if ((size_t)N * K * D >= PAR_MIN)
    for (int t = 0; t < N; t++) {
        float *dst = dx + (size_t)t * D;
        for (int c = 0; c < D; c++) dst[c] = 0.0f;
        for (int j = 0; j < K; j++) {
            const float *src = dxp + (size_t)assign_row[(size_t)t * K + j] * D;
            for (int c = 0; c < D; c++) dst[c] += src[c];
        }
    }
}

// out is (N,D), yp is (R,D), topk_w and assign_row are (N,K)
void unpermute_forward(float *out, const float *yp, const float *topk_w, const int32_t *assign_row,
                       int N, int K, int D) {
#pragma omp parallel for schedule(static) if ((size_t)N * K * D >= PAR_MIN)
    for (int t = 0; t < N; t++) {
        float *dst = out + (size_t)t * D;
        for (int c = 0; c < D; c++) dst[c] = 0.0f;
        for (int j = 0; j < K; j++) {
            const float w = topk_w[(size_t)t * K + j];
            const float *src = yp + (size_t)assign_row[(size_t)t * K + j] * D;
            for (int c = 0; c < D; c++) dst[c] += w * src[c];
        }
    }
}

// Every routed row belongs to exactly one (t, j), so the loop over tokens writes disjoint rows,
// each once.
// dyp is (R,D), dtopk_w is (N,K), dout is (N,D), yp is (R,D), topk_w and assign_row are (N,K)
void unpermute_backward(float *dyp, float *dtopk_w, const float *dout, const float *yp,
                        const float *topk_w, const int32_t *assign_row, int N, int K, int D) {
#pragma omp parallel for schedule(static) if ((size_t)N * K * D >= PAR_MIN)
    for (int t = 0; t < N; t++) {
        const float *g = dout + (size_t)t * D;
        for (int j = 0; j < K; j++) {
            const size_t a = (size_t)t * K + j;
            const size_t row = (size_t)assign_row[a] * D;
            if (dyp) {
                const float w = topk_w[a];
                for (int c = 0; c < D; c++) dyp[row + c] = w * g[c];
            }
            if (dtopk_w) {
                dtopk_w[a] = (float)lane_dot(g, yp + row, (size_t)D);
            }
        }
    }
}
