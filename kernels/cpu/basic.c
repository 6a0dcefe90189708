// CPU kernels, elementwise and row-wise: embedding, RMSNorm, residual add, SwiGLU, AdamW,
// reductions over flat buffers, and the backend description. fp32 storage, double where a
// reduction needs it, OpenMP over rows (or over column slices where rows would race).
#include "kernels/kernels.h"

#include <cblas.h>
#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <string.h>

#include "kernels/cpu/lane_sums.h"
#include "kernels/cpu/simd_math.h"

// Column slice that one thread owns in the backward passes that sum over rows (embedding, the
// RMSNorm weight): owning columns instead of rows needs no atomics and keeps the summation
// order fixed (row order), so the result is bitwise the same for any thread count.
#define COL_SLICE 64

// Loops over fewer elements than this run on the calling thread: waking the team costs more
// than it saves, and on a loaded machine a barrier can wait a whole time slice for a thread.
#define PAR_MIN 65536

// ---------------------------------------------------------------------------------------
// Embedding

// out is (N,D), tokens is (N), wte is (V,D)
void embedding_forward(float *out, const int32_t *tokens, const float *wte, int N, int D) {
#pragma omp parallel for schedule(static) if ((size_t)N * D >= PAR_MIN)
    for (int i = 0; i < N; i++) {
        memcpy(out + (size_t)i * D, wte + (size_t)tokens[i] * D, (size_t)D * sizeof(float));
    }
}

// dwte is (V,D), dout is (N,D), tokens is (N)
void embedding_backward(float *dwte, const float *dout, const int32_t *tokens, int N, int D) {
    if (!dwte) return;
    const int n_slices = (D + COL_SLICE - 1) / COL_SLICE;
#pragma omp parallel for schedule(static) if ((size_t)N * D >= PAR_MIN)
    for (int s = 0; s < n_slices; s++) {
        const int c0 = s * COL_SLICE;
        const int c1 = c0 + COL_SLICE < D ? c0 + COL_SLICE : D;
        for (int i = 0; i < N; i++) { // token order: repeated tokens sum deterministically
            float *dst = dwte + (size_t)tokens[i] * D;
            const float *src = dout + (size_t)i * D;
            for (int c = c0; c < c1; c++) dst[c] += src[c];
        }
    }
}

// ---------------------------------------------------------------------------------------
// RMSNorm

// out, x are (N,D), w is (D), rstd is (N)
void rmsnorm_forward(float *out, float *rstd, const float *x, const float *w, int N, int D,
                     float eps) {
#pragma omp parallel for schedule(static) if ((size_t)N * D >= PAR_MIN)
    for (int i = 0; i < N; i++) {
        const float *xi = x + (size_t)i * D;
        float *oi = out + (size_t)i * D;
        const double ss = lane_sum_sq(xi, (size_t)D);
        const float r = (float)(1.0 / sqrt(ss / D + (double)eps));
        for (int c = 0; c < D; c++) oi[c] = xi[c] * r * w[c];
        rstd[i] = r;
    }
}

// With out_c = x_c * r * w_c and r = (mean(x^2) + eps)^-1/2, dr/dx_c = -r^3 x_c / D, so
//   dx_c = r * (dout_c w_c - x_c * r^2 * mean_j(dout_j w_j x_j)),   dw_c = sum_i dout_ic x_ic r_i.
// dx, dout, x are (N,D), dw, w are (D), rstd is (N)
void rmsnorm_backward(float *dx, float *dw, const float *dout, const float *x, const float *w,
                      const float *rstd, int N, int D) {
    if (dx) {
#pragma omp parallel for schedule(static) if ((size_t)N * D >= PAR_MIN)
        for (int i = 0; i < N; i++) {
            const float *xi = x + (size_t)i * D, *gi = dout + (size_t)i * D;
            float *dxi = dx + (size_t)i * D;
            const double r = rstd[i];
            const double dot = lane_dot3(gi, w, xi, (size_t)D);
            const float k = (float)(r * r * dot / D);
            const float rf = (float)r;
            for (int c = 0; c < D; c++) dxi[c] += rf * (gi[c] * w[c] - xi[c] * k);
        }
    }
    if (dw) {
        const int n_slices = (D + COL_SLICE - 1) / COL_SLICE;
#pragma omp parallel for schedule(static) if ((size_t)N * D >= PAR_MIN)
        for (int s = 0; s < n_slices; s++) {
            const int c0 = s * COL_SLICE;
            const int nc = c0 + COL_SLICE < D ? COL_SLICE : D - c0;
            double acc[COL_SLICE] = {0};
            for (int i = 0; i < N; i++) {
                const float *xi = x + (size_t)i * D + c0, *gi = dout + (size_t)i * D + c0;
                const double r = rstd[i];
                for (int c = 0; c < nc; c++) acc[c] += (double)gi[c] * xi[c] * r;
            }
            for (int c = 0; c < nc; c++) dw[c0 + c] += (float)acc[c];
        }
    }
}

// ---------------------------------------------------------------------------------------
// Residual add and SwiGLU

void add_forward(float *out, const float *a, const float *b, size_t n) {
#pragma omp parallel for schedule(static) if (n >= PAR_MIN)
    for (size_t i = 0; i < n; i++) out[i] = a[i] + b[i];
}

// out, g, u are (n)
void swiglu_forward(float *out, const float *g, const float *u, size_t n) {
#pragma omp parallel for simd schedule(static) if (n >= PAR_MIN)
    for (size_t i = 0; i < n; i++) {
        const float x = g[i];
        out[i] = x / (1.0f + expf(-x)) * u[i];
    }
}

// silu(g) = g * s with s = sigmoid(g); d silu / dg = s * (1 + g * (1 - s)). Writes dg, du.
void swiglu_backward(float *dg, float *du, const float *dout, const float *g, const float *u,
                     size_t n) {
#pragma omp parallel for simd schedule(static) if (n >= PAR_MIN)
    for (size_t i = 0; i < n; i++) {
        const float x = g[i];
        const float s = 1.0f / (1.0f + expf(-x));
        if (dg) dg[i] = dout[i] * u[i] * s * (1.0f + x * (1.0f - s));
        if (du) du[i] = dout[i] * x * s;
    }
}

// ---------------------------------------------------------------------------------------
// AdamW and reductions

// p, grad, m, v are (n)
void adamw_update(float *p, const float *grad, float *m, float *v, size_t n, float lr, float b1,
                  float b2, float eps, float wd, int t, float grad_scale) {
    const float inv_bc1 = (float)(1.0 / (1.0 - pow((double)b1, t)));
    const float inv_bc2 = (float)(1.0 / (1.0 - pow((double)b2, t)));
#pragma omp parallel for schedule(static) if (n >= PAR_MIN)
    for (size_t i = 0; i < n; i++) {
        const float g = grad_scale * grad[i];
        const float mi = b1 * m[i] + (1.0f - b1) * g;
        const float vi = b2 * v[i] + (1.0f - b2) * g * g;
        m[i] = mi;
        v[i] = vi;
        const float mhat = mi * inv_bc1, vhat = vi * inv_bc2;
        p[i] -= lr * (mhat / (sqrtf(vhat) + eps) + wd * p[i]);
    }
}

// A fixed number of chunks (lane_sum_sq each), then the chunk sums in order: the result does not
// depend on the thread count (bitwise-reproducible gradient norms).
#define SUMSQ_CHUNKS 256

double sum_squares(const float *x, size_t n) {
    double part[SUMSQ_CHUNKS];
#pragma omp parallel for schedule(static) if (n >= PAR_MIN)
    for (int c = 0; c < SUMSQ_CHUNKS; c++) {
        const size_t i0 = n * c / SUMSQ_CHUNKS, i1 = n * (c + 1) / SUMSQ_CHUNKS;
        part[c] = lane_sum_sq(x + i0, i1 - i0);
    }
    double total = 0.0;
    for (int c = 0; c < SUMSQ_CHUNKS; c++) total += part[c];
    return total;
}

void scale_inplace(float *x, float s, size_t n) {
#pragma omp parallel for schedule(static) if (n >= PAR_MIN)
    for (size_t i = 0; i < n; i++) x[i] *= s;
}

void zero_fill(float *x, size_t n) {
    memset(x, 0, n * sizeof(float));
}

// ---------------------------------------------------------------------------------------
// Backend information

int kernels_num_threads(void) {
    return omp_get_max_threads();
}

const char *kernels_blas_info(void) {
    static char info[512];
    const char *cfg = openblas_get_config();
    while (*cfg == ' ') cfg++;
    size_t len = strlen(cfg);
    while (len > 0 && cfg[len - 1] == ' ') len--;
    const int par = openblas_get_parallel();
    const char *kind = par == OPENBLAS_OPENMP   ? "OpenMP build"
                       : par == OPENBLAS_THREAD ? "pthreads build"
                                                : "sequential build";
    snprintf(info, sizeof(info), "%.*s (%s, %d threads)", (int)len, cfg, kind,
             openblas_get_num_threads());
    return info;
}
