// CPU kernels: dense matmul (torch.nn.Linear without bias) and the grouped expert matmul over
// rows permuted by expert. Every product is one OpenBLAS sgemm on row-major storage; called
// outside our own parallel regions, sgemm uses all threads itself. The grouped loop also
// serves the bf16 matmuls of gemm_bf16.c.
#include "kernels/kernels.h"

#include <cblas.h>
#include <string.h>

// out is (N,OC), inp is (N,C), w is (OC,C)
void matmul_forward(float *out, const float *inp, const float *w, int N, int C, int OC) {
    if (N <= 0 || OC <= 0) return;
    if (C <= 0) { // an empty sum: sgemm would reject lda = 0
        for (size_t i = 0; i < (size_t)N * OC; i++) out[i] = 0.0f;
        return;
    }
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, N, OC, C, 1.0f, inp, C, w, C, 0.0f, out,
                OC);
}

// dinp += dout @ w; dw += dout^T @ inp (beta = 1: backward accumulates).
// dinp is (N,C), dw is (OC,C), dout is (N,OC), inp is (N,C), w is (OC,C)
void matmul_backward(float *dinp, float *dw, const float *dout, const float *inp, const float *w,
                     int N, int C, int OC) {
    if (N <= 0 || C <= 0 || OC <= 0) return;
    if (dinp) {
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, N, C, OC, 1.0f, dout, OC, w, C, 1.0f,
                    dinp, C);
    }
    if (dw) {
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, OC, C, N, 1.0f, dout, OC, inp, C, 1.0f,
                    dw, C);
    }
}

// The grouped matmuls, fp32 and bf16: one matmul per expert over its contiguous row range;
// experts without rows are skipped.
typedef void (*MatmulFwd)(float *out, const float *inp, const float *w, int N, int C, int OC);
typedef void (*MatmulBwd)(float *dinp, float *dw, const float *dout, const float *inp,
                          const float *w, int N, int C, int OC);

// out is (R,OC), inp is (R,C), w is (E,OC,C), offsets is (E+1)
static void grouped_forward_(MatmulFwd mm, float *out, const float *inp, const float *w,
                             const int32_t *offsets, int E, int C, int OC) {
    for (int e = 0; e < E; e++) {
        const int r0 = offsets[e], n = offsets[e + 1] - r0;
        if (n <= 0) continue;
        mm(out + (size_t)r0 * OC, inp + (size_t)r0 * C, w + (size_t)e * OC * C, n, C, OC);
    }
}

// dinp_written: dinp's rows [0, offsets[E]) are zeroed first, so that the matmuls' sums into
// them (beta = 1) write them (kernels.h); else they accumulate onto what is there. dw
// accumulates.
// dinp is (R,C), dw is (E,OC,C), dout is (R,OC), inp is (R,C), w is (E,OC,C)
static void grouped_backward_(MatmulBwd mm, float *dinp, float *dw, const float *dout,
                              const float *inp, const float *w, const int32_t *offsets, int E,
                              int C, int OC, int dinp_written) {
    if (dinp && dinp_written && offsets[E] > 0)
        memset(dinp, 0, (size_t)offsets[E] * C * sizeof(float));
    for (int e = 0; e < E; e++) {
        const int r0 = offsets[e], n = offsets[e + 1] - r0;
        if (n <= 0) continue;
        mm(dinp ? dinp + (size_t)r0 * C : NULL, dw ? dw + (size_t)e * OC * C : NULL,
           dout + (size_t)r0 * OC, inp + (size_t)r0 * C, w + (size_t)e * OC * C, n, C, OC);
    }
}

void grouped_matmul_forward(float *out, const float *inp, const float *w, const int32_t *offsets,
                            int E, int C, int OC) {
    grouped_forward_(matmul_forward, out, inp, w, offsets, E, C, OC);
}

void grouped_matmul_backward(float *dinp, float *dw, const float *dout, const float *inp,
                             const float *w, const int32_t *offsets, int E, int C, int OC) {
    grouped_backward_(matmul_backward, dinp, dw, dout, inp, w, offsets, E, C, OC, 1);
}

// dinp = dout_a @ w_a + dout_b @ w_b (written), dw_a and dw_b accumulate
void grouped_matmul_backward_pair(float *dinp, float *dw_a, float *dw_b, const float *dout_a,
                                  const float *dout_b, const float *inp, const float *w_a,
                                  const float *w_b, const int32_t *offsets, int E, int C, int OC) {
    grouped_backward_(matmul_backward, dinp, dw_a, dout_a, inp, w_a, offsets, E, C, OC, 1);
    grouped_backward_(matmul_backward, dinp, dw_b, dout_b, inp, w_b, offsets, E, C, OC, 0);
}

void grouped_matmul_forward_bf16(float *out, const float *inp, const float *w,
                                 const int32_t *offsets, int E, int C, int OC) {
    grouped_forward_(matmul_forward_bf16, out, inp, w, offsets, E, C, OC);
}

void grouped_matmul_backward_bf16(float *dinp, float *dw, const float *dout, const float *inp,
                                  const float *w, const int32_t *offsets, int E, int C, int OC) {
    grouped_backward_(matmul_backward_bf16, dinp, dw, dout, inp, w, offsets, E, C, OC, 1);
}

void grouped_matmul_backward_pair_bf16(float *dinp, float *dw_a, float *dw_b, const float *dout_a,
                                       const float *dout_b, const float *inp, const float *w_a,
                                       const float *w_b, const int32_t *offsets, int E, int C,
                                       int OC) {
    grouped_backward_(matmul_backward_bf16, dinp, dw_a, dout_a, inp, w_a, offsets, E, C, OC, 1);
    grouped_backward_(matmul_backward_bf16, dinp, dw_b, dout_b, inp, w_b, offsets, E, C, OC, 0);
}
