// test_cuda_gemm: the cuBLAS ops of kernels/cuda/gemm.cu and attention.cu (matmul, grouped
// expert matmul, causal attention; forward and backward) against the CPU ops of the same name
// in kernels.h, in both GEMM precisions (cuda_set_gemm_bf16 0 and 1; bf16 on bf16 copies of the
// operands, the default, through cuBLASLt or cublasGemmEx, and on fp32 operands,
// MOET_CUDA_GEMM_OPERANDS=fp32), the cuBLASLt algorithm cache, the bf16 operand
// path in chunks of a small workspace, its rounding checked exactly against bf16-rounded
// operands, plus run-to-run bitwise determinism. Exits 77 (ctest "skipped") where no CUDA device
// exists; never passes without one.
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/cuda/kernels_cuda.h"
#include "kernels/kernels.h"
#include "kernels/ops.h"
#include "tests/cuda/cudatest.h"
#include "tests/testutil.h"

// Tolerances. Inputs are uniform in [-1, 1) (pre-filled gradients in [-0.5, 0.5)), so every
// operand is bounded by amax = 1 unless a case says otherwise.
//
// fp32 mode (cuda_set_gemm_bf16(0): CUBLAS_COMPUTE_32F, no TF32). cuBLAS and OpenBLAS compute
// the same sums in fp32 in different orders (blocking, split-k, FMA). For a dot product of k
// terms the rounding errors add like a random walk over partial sums of size ~sqrt(j)*|ab|,
// ~0.3 * k * 2^-24 * rms|ab| per side, while max|result| is ~4.5 * sqrt(k) * rms|ab|: at
// k = 1024 the worst element differs by ~1.5e-6 of max|want|. FP32_ATOL_FRAC = 2e-5 of
// max|want| leaves 10x of margin for that and for the device's expf / logf / division in
// attention (a few ulp each, --use_fast_math), while a wrong index, transpose, mask or missing
// accumulation moves elements by O(max|want|).
#define FP32_RTOL      1e-5
#define FP32_ATOL_FRAC 2e-5
//
// bf16 mode (the default: gemm.cu rounds the operands to bf16 copies, or, with
// MOET_CUDA_GEMM_OPERANDS=fp32, CUBLAS_COMPUTE_32F_FAST_16BF lets cuBLAS do it). Both operands of
// every product are rounded to bf16, 8 significant bits: a relative error of at most 2^-9 each
// (round to nearest), so each product a_i b_i carries a relative error delta_i with |delta_i| <=
// 2^-8 and, as the two roundings are independent and uniform, a standard deviation of sqrt(2/3) *
// 2^-9. The fp32 accumulation adds only 2^-24-sized errors. The error of a k-term dot product,
// sum_i a_i b_i delta_i, is then a sum of k independent terms with standard deviation
//   sigma = sqrt(2/3) * 2^-9 * sqrt(sum_i (a_i b_i)^2) <= 0.82 * 2^-9 * sqrt(k) * amax * bmax.
// Over the ~4e5 elements of the largest case the worst one is within ~5 sigma, i.e. within
// 4.1 * 2^-9 * sqrt(k) * amax * bmax; twice that for margin gives
//   atol = 2^-6 * sqrt(k) * amax * bmax        (BF16_GEMM_K = 2^-6).
// The bound on sum (a_i b_i)^2 is itself 3x pessimistic for uniform inputs (rms|ab| = amax
// bmax / 3), so the real margin is ~6x. The result itself is ~sqrt(k) * amax * bmax / 3 in
// size, ~20x this tolerance: a wrong index still fails. (TF32, which FAST_16BF also allows,
// has 3 more bits and passes a fortiori.)
#define BF16_GEMM_K 0.015625
//
// bf16 attention chains GEMMs (S, then P V; dP, then dS K and dS^T Q), so each of its outputs
// is compared with an absolute tolerance BF16_ATTN_FRAC * max(max|want|, term scale). The
// term scale (1 here: every input is bounded by 1, and scale * sqrt(Dh) = 1) bounds the terms
// that cancel, so that an output that is ~0 by cancellation, like dq at T = 1 where
// dS = P (dP - D) vanishes, is not judged against its own rounding noise. Estimates, with the
// sigma formula above and 5 sigma for the worst element:
//   S = scale q.k over Dh terms: sigma = 0.82 * 2^-9 * scale * sqrt(Dh) / 3 ~ 5e-4, so the
//       error of S is <= ~3e-3, and lse = logsumexp(S) moves by at most as much.
//   P = exp(S - lse) has a relative error <= 2 * 3e-3; out = sum_j P_tj v_j with
//       sum_j P_tj = 1, plus the bf16 rounding of P and v (2^-8): |error| <= ~0.01 vmax.
//   dv_j = sum_i P_ij dO_i: the same relative errors over a column sum of P of at most
//       ~ln(T) + 1 ~ 5.4 at T = 128: <= 0.054 even with every sign aligned, ~0.005 in practice.
//   dP = dO.v over Dh terms: sigma ~ 4e-3. dq_t = scale sum_j P_tj (dP_tj - D_t) k_j: its error
//       is scale * sum_j P_tj err(dP_tj) k_j (random signs, sqrt(sum_j P_tj^2) <= 1) plus the
//       rounding of dS and k (2^-8 of |dS| |k| per term): ~1e-3 to 5e-3; dk the same over the
//       column sums of P.
// BF16_ATTN_FRAC = 2^-4 = 0.0625 is above the aligned-sign bound of every output and ~10x above
// the expected errors; index, head-stride or mask bugs move outputs by O(max|want|) and fail.
// (Should cuBLAS truncate to bf16 instead of rounding to nearest, delta_i lies in [-2^-8, 0]:
// the same variance, plus a bias of -2^-8 times the result, <= 1.5 * 2^-8 * sqrt(k) here, so
// the GEMM bound becomes ~3.5 * 2^-8 * sqrt(k), still inside 2^-6 * sqrt(k).)
#define BF16_ATTN_FRAC 0.0625

// ---------------------------------------------------------------------------------------
// Helpers

// Copies the device result back and compares: |got - want| <= atol + rtol * |want|.
static int check_(const char *name, const float *d_got, const float *want, size_t n, double atol,
                  double rtol) {
    float *got = tcu_host_from(d_got, n);
    int ok = tu_allclose(name, got, want, n, atol, rtol);
    free(got);
    return ok;
}

// Bitwise equality of a device buffer with a host one (outputs that must stay untouched, or
// equal another path's).
static int same_bits_(const char *name, const float *d_got, const float *want, size_t n) {
    float *got = tcu_host_from(d_got, n);
    int ok = memcmp(got, want, n * sizeof *got) == 0;
    if (!ok) fprintf(stderr, "  %s: not the same bits\n", name);
    free(got);
    return ok;
}

// Bitwise equality of a device result with the exact expected values.
static int equal_bits_(const char *name, const float *d_got, const float *want, size_t n) {
    float *got = tcu_host_from(d_got, n);
    size_t bad = 0, first = 0;
    for (size_t i = 0; i < n; i++)
        if (memcmp(&got[i], &want[i], sizeof *got) != 0 && bad++ == 0) first = i;
    if (bad)
        fprintf(stderr, "  %s: %zu of %zu elements differ; first [%zu] got %a want %a\n", name, bad,
                n, first, (double)got[first], (double)want[first]);
    free(got);
    return bad == 0;
}

// Tolerance of a GEMM result with k-term dot products of operands bounded by amax and bmax
// (see the top of the file); want is the CPU result.
static double gemm_atol_(int bf16, int k, double amax, double bmax, const float *want, size_t n) {
    if (bf16) return BF16_GEMM_K * sqrt((double)k) * amax * bmax;
    return FP32_ATOL_FRAC * tu_max_abs(want, n);
}

static double gemm_rtol_(int bf16) {
    return bf16 ? 0.0 : FP32_RTOL;
}

// Tolerance of an attention output: a fraction of max(max|want|, the scale of its terms).
static double attn_atol_(int bf16, const float *want, size_t n, double term_scale) {
    const double m = tu_max_abs(want, n);
    return (bf16 ? BF16_ATTN_FRAC : FP32_ATOL_FRAC) * (m > term_scale ? m : term_scale);
}

// The GEMM modes every case runs in: fp32 (cuda_set_gemm_bf16(0)); bf16 on bf16 copies of the
// operands through cuBLASLt with cached algorithms (the default); the same through cublasGemmEx
// (MOET_CUDA_GEMM_LT=0); bf16 on fp32 operands with CUBLAS_COMPUTE_32F_FAST_16BF (the
// MOET_CUDA_GEMM_OPERANDS=fp32 path). The bf16 modes have the bf16 tolerances.
enum { MODE_FP32, MODE_BF16, MODE_BF16_GEMMEX, MODE_BF16_F32_OPERANDS, N_MODES };

static void set_mode_(int mode) {
    cuda_set_gemm_bf16(mode != MODE_FP32);
    cuda_set_gemm_bf16_operands(mode != MODE_BF16_F32_OPERANDS);
    cuda_set_gemm_lt(mode != MODE_BF16_GEMMEX);
}

static const char *mode_name_(int mode) {
    return mode == MODE_FP32               ? "fp32"
           : mode == MODE_BF16             ? "bf16"
           : mode == MODE_BF16_GEMMEX      ? "bf16-gemmex"
                                           : "bf16-fp32-operands";
}

// ---------------------------------------------------------------------------------------
// Matmul

// Forward, then backward into gradients pre-filled with random values (the dense backward
// accumulates, the grouped one writes dinp: the CPU reference does the same), for the outputs
// selected by with_dinp / with_dw (the other is NULL and must stay
// untouched).
static void matmul_case_(int N, int C, int OC, int with_dinp, int with_dw, int mode,
                         uint64_t seed) {
    const int bf16 = mode != MODE_FP32;
    const size_t nc = (size_t)N * C, oc = (size_t)OC * C, no = (size_t)N * OC;
    float *inp = tcu_host_rand(nc, seed, 1.0f), *w = tcu_host_rand(oc, seed + 1, 1.0f);
    float *dout = tcu_host_rand(no, seed + 2, 1.0f);
    float *dinp0 = tcu_host_rand(nc, seed + 3, 0.5f), *dw0 = tcu_host_rand(oc, seed + 4, 0.5f);
    float *out = tcu_host_alloc(no);
    matmul_forward(out, inp, w, N, C, OC);
    float *want_dinp = tcu_host_copy(dinp0, nc), *want_dw = tcu_host_copy(dw0, oc);
    matmul_backward(with_dinp ? want_dinp : NULL, with_dw ? want_dw : NULL, dout, inp, w, N, C, OC);

    set_mode_(mode);
    float *d_inp = tcu_dev_from(inp, nc), *d_w = tcu_dev_from(w, oc),
          *d_dout = tcu_dev_from(dout, no);
    float *d_dinp = tcu_dev_from(dinp0, nc), *d_dw = tcu_dev_from(dw0, oc);
    float *d_out = cuda_malloc(no * sizeof(float));
    cuda_matmul_forward(d_out, d_inp, d_w, N, C, OC);
    cuda_matmul_backward(with_dinp ? d_dinp : NULL, with_dw ? d_dw : NULL, d_dout, d_inp, d_w, N, C,
                         OC);
    char name[128];
    snprintf(name, sizeof name, "matmul_forward %dx%dx%d %s", N, C, OC, mode_name_(mode));
    CU_ASSERT_TRUE(
        check_(name, d_out, out, no, gemm_atol_(bf16, C, 1, 1, out, no), gemm_rtol_(bf16)));
    snprintf(name, sizeof name, "matmul_backward dinp %dx%dx%d %s", N, C, OC, mode_name_(mode));
    CU_ASSERT_TRUE(with_dinp ? check_(name, d_dinp, want_dinp, nc,
                                      gemm_atol_(bf16, OC, 1, 1, want_dinp, nc), gemm_rtol_(bf16))
                             : same_bits_(name, d_dinp, dinp0, nc));
    snprintf(name, sizeof name, "matmul_backward dw %dx%dx%d %s", N, C, OC, mode_name_(mode));
    CU_ASSERT_TRUE(with_dw ? check_(name, d_dw, want_dw, oc, gemm_atol_(bf16, N, 1, 1, want_dw, oc),
                                    gemm_rtol_(bf16))
                           : same_bits_(name, d_dw, dw0, oc));

    cuda_free(d_inp), cuda_free(d_w), cuda_free(d_dout), cuda_free(d_dinp), cuda_free(d_dw);
    cuda_free(d_out);
    free(inp), free(w), free(dout), free(dinp0), free(dw0), free(out), free(want_dinp);
    free(want_dw);
}

static void test_matmul(void) {
    // odd shapes (no multiple of 8 anywhere), a single row, and a larger square-ish case
    static const int shapes[][3] = {{37, 70, 45}, {1, 33, 7}, {5, 1, 3}, {512, 1024, 768}};
    for (int mode = 0; mode < N_MODES; mode++) {
        for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++)
            matmul_case_(shapes[s][0], shapes[s][1], shapes[s][2], 1, 1, mode, 1000 + 10 * s);
        matmul_case_(37, 70, 45, 1, 0, mode, 1100); // dw NULL
        matmul_case_(37, 70, 45, 0, 1, mode, 1110); // dinp NULL
    }
    set_mode_(MODE_BF16);
}

// ---------------------------------------------------------------------------------------
// Grouped expert matmul

// rows[e] routed rows per expert (some 0); gradients pre-filled; dw of an expert without rows
// must stay bitwise untouched.
static void grouped_case_(const int *rows, int E, int C, int OC, int mode, uint64_t seed) {
    const int bf16 = mode != MODE_FP32;
    int32_t *offsets = malloc((size_t)(E + 1) * sizeof *offsets);
    offsets[0] = 0;
    for (int e = 0; e < E; e++) offsets[e + 1] = offsets[e] + rows[e];
    const int R = offsets[E];
    int max_rows = 1;
    for (int e = 0; e < E; e++) max_rows = rows[e] > max_rows ? rows[e] : max_rows;
    const size_t rc = (size_t)R * C, ro = (size_t)R * OC, ew = (size_t)E * OC * C;
    float *inp = tcu_host_rand(rc, seed, 1.0f), *w = tcu_host_rand(ew, seed + 1, 1.0f);
    float *dout = tcu_host_rand(ro, seed + 2, 1.0f);
    float *dinp0 = tcu_host_rand(rc, seed + 3, 0.5f), *dw0 = tcu_host_rand(ew, seed + 4, 0.5f);
    float *out = tcu_host_alloc(ro);
    grouped_matmul_forward(out, inp, w, offsets, E, C, OC);
    float *want_dinp = tcu_host_copy(dinp0, rc), *want_dw = tcu_host_copy(dw0, ew);
    grouped_matmul_backward(want_dinp, want_dw, dout, inp, w, offsets, E, C, OC);

    set_mode_(mode);
    float *d_inp = tcu_dev_from(inp, rc), *d_w = tcu_dev_from(w, ew),
          *d_dout = tcu_dev_from(dout, ro);
    float *d_dinp = tcu_dev_from(dinp0, rc), *d_dw = tcu_dev_from(dw0, ew);
    float *d_out = cuda_malloc(ro * sizeof(float));
    cuda_grouped_matmul_forward(d_out, d_inp, d_w, offsets, E, C, OC);
    cuda_grouped_matmul_backward(d_dinp, d_dw, d_dout, d_inp, d_w, offsets, E, C, OC);
    char name[128];
    snprintf(name, sizeof name, "grouped_matmul_forward E=%d %s", E, mode_name_(mode));
    CU_ASSERT_TRUE(
        check_(name, d_out, out, ro, gemm_atol_(bf16, C, 1, 1, out, ro), gemm_rtol_(bf16)));
    snprintf(name, sizeof name, "grouped_matmul_backward dinp E=%d %s", E, mode_name_(mode));
    CU_ASSERT_TRUE(check_(name, d_dinp, want_dinp, rc, gemm_atol_(bf16, OC, 1, 1, want_dinp, rc),
                          gemm_rtol_(bf16)));
    snprintf(name, sizeof name, "grouped_matmul_backward dw E=%d %s", E, mode_name_(mode));
    CU_ASSERT_TRUE(check_(name, d_dw, want_dw, ew, gemm_atol_(bf16, max_rows, 1, 1, want_dw, ew),
                          gemm_rtol_(bf16)));
    for (int e = 0; e < E; e++) {
        if (rows[e] != 0) continue;
        snprintf(name, sizeof name, "grouped_matmul_backward dw of empty expert %d", e);
        float *d_dw_e = d_dw + (size_t)e * OC * C;
        CU_ASSERT_TRUE(same_bits_(name, d_dw_e, dw0 + (size_t)e * OC * C, (size_t)OC * C));
    }

    // dinp NULL: only dw changes
    cuda_memcpy_h2d(d_dw, dw0, ew * sizeof(float));
    cuda_grouped_matmul_backward(NULL, d_dw, d_dout, d_inp, d_w, offsets, E, C, OC);
    snprintf(name, sizeof name, "grouped_matmul_backward dw only E=%d %s", E, mode_name_(mode));
    CU_ASSERT_TRUE(check_(name, d_dw, want_dw, ew, gemm_atol_(bf16, max_rows, 1, 1, want_dw, ew),
                          gemm_rtol_(bf16)));

    cuda_free(d_inp), cuda_free(d_w), cuda_free(d_dout), cuda_free(d_dinp), cuda_free(d_dw);
    cuda_free(d_out);
    free(inp), free(w), free(dout), free(dinp0), free(dw0), free(out), free(want_dinp);
    free(want_dw), free(offsets);
}

static void test_grouped_matmul(void) {
    static const int rows5[5] = {7, 0, 33, 1, 19}; // E = 5, expert 1 empty, uneven
    static const int rows4[4] = {100, 3, 0, 250};  // larger, expert 2 empty
    static const int rows3[3] = {0, 0, 12};        // leading empty experts
    for (int mode = 0; mode < N_MODES; mode++) {
        grouped_case_(rows5, 5, 70, 45, mode, 2000);
        grouped_case_(rows4, 4, 256, 96, mode, 2010);
        grouped_case_(rows3, 3, 40, 24, mode, 2020);
    }
    set_mode_(MODE_BF16);
}

// ---------------------------------------------------------------------------------------
// Attention

// Forward against the CPU; then backward, with the CPU's out and lse given to both backends,
// into gradients pre-filled with random values, for the outputs selected by the mask
// (1 dq, 2 dk, 4 dv; the others are NULL and must stay untouched).
static float attn_q_scale_ = 1.0f; // |q| bound of attention_case_ (k, v, dO: 1)

static void attention_case_(int B, int T, int H, int Dh, int grads, int mode, uint64_t seed) {
    const int bf16 = mode != MODE_FP32;
    const size_t n = (size_t)B * T * H * Dh, nl = (size_t)B * H * T;
    float *q = tcu_host_rand(n, seed, attn_q_scale_), *k = tcu_host_rand(n, seed + 1, 1.0f);
    float *v = tcu_host_rand(n, seed + 2, 1.0f), *dout = tcu_host_rand(n, seed + 3, 1.0f);
    float *dq0 = tcu_host_rand(n, seed + 4, 0.5f), *dk0 = tcu_host_rand(n, seed + 5, 0.5f);
    float *dv0 = tcu_host_rand(n, seed + 6, 0.5f);
    float *out = tcu_host_alloc(n), *lse = tcu_host_alloc(nl);
    attention_forward(out, lse, q, k, v, B, T, H, Dh);
    float *want_dq = tcu_host_copy(dq0, n), *want_dk = tcu_host_copy(dk0, n);
    float *want_dv = tcu_host_copy(dv0, n);
    const int wq = grads & 1, wk = grads & 2, wv = grads & 4;
    attention_backward(wq ? want_dq : NULL, wk ? want_dk : NULL, wv ? want_dv : NULL, dout, out,
                       lse, q, k, v, B, T, H, Dh);

    set_mode_(mode);
    float *d_q = tcu_dev_from(q, n), *d_k = tcu_dev_from(k, n), *d_v = tcu_dev_from(v, n);
    float *d_dout = tcu_dev_from(dout, n);
    float *d_out = cuda_malloc(n * sizeof(float)), *d_lse = cuda_malloc(nl * sizeof(float));
    void *scratch = cuda_malloc(cuda_attention_scratch_bytes(T, H));
    cuda_attention_forward(d_out, d_lse, d_q, d_k, d_v, B, T, H, Dh, scratch);
    char name[128];
    const char *mname = mode_name_(mode);
    // term scales (see the top of the file): all inputs are bounded by 1, scale*sqrt(Dh) = 1
    snprintf(name, sizeof name, "attention_forward out T=%d Dh=%d %s", T, Dh, mname);
    CU_ASSERT_TRUE(check_(name, d_out, out, n, attn_atol_(bf16, out, n, 1.0), gemm_rtol_(bf16)));
    snprintf(name, sizeof name, "attention_forward lse T=%d Dh=%d %s", T, Dh, mname);
    CU_ASSERT_TRUE(check_(name, d_lse, lse, nl, attn_atol_(bf16, lse, nl, 1.0), gemm_rtol_(bf16)));

    // the backward reads the CPU's out and lse, like the CPU backward above
    float *d_dq = tcu_dev_from(dq0, n), *d_dk = tcu_dev_from(dk0, n), *d_dv = tcu_dev_from(dv0, n);
    cuda_memcpy_h2d(d_out, out, n * sizeof(float));
    cuda_memcpy_h2d(d_lse, lse, nl * sizeof(float));
    cuda_attention_backward(wq ? d_dq : NULL, wk ? d_dk : NULL, wv ? d_dv : NULL, d_dout, d_out,
                            d_lse, d_q, d_k, d_v, B, T, H, Dh, scratch);
    snprintf(name, sizeof name, "attention_backward dq T=%d Dh=%d %s", T, Dh, mname);
    CU_ASSERT_TRUE(
        wq ? check_(name, d_dq, want_dq, n, attn_atol_(bf16, want_dq, n, 1.0), gemm_rtol_(bf16))
           : same_bits_(name, d_dq, dq0, n));
    snprintf(name, sizeof name, "attention_backward dk T=%d Dh=%d %s", T, Dh, mname);
    CU_ASSERT_TRUE(
        wk ? check_(name, d_dk, want_dk, n, attn_atol_(bf16, want_dk, n, 1.0), gemm_rtol_(bf16))
           : same_bits_(name, d_dk, dk0, n));
    snprintf(name, sizeof name, "attention_backward dv T=%d Dh=%d %s", T, Dh, mname);
    CU_ASSERT_TRUE(
        wv ? check_(name, d_dv, want_dv, n, attn_atol_(bf16, want_dv, n, 1.0), gemm_rtol_(bf16))
           : same_bits_(name, d_dv, dv0, n));

    cuda_free(d_q), cuda_free(d_k), cuda_free(d_v), cuda_free(d_dout), cuda_free(d_out);
    cuda_free(d_lse), cuda_free(scratch), cuda_free(d_dq), cuda_free(d_dk), cuda_free(d_dv);
    free(q), free(k), free(v), free(dout), free(dq0), free(dk0), free(dv0), free(out), free(lse);
    free(want_dq), free(want_dk), free(want_dv);
}

// Generation: Tq queries over Tk cached keys against the CPU op, which itself must give the
// last Tq rows of the causal attention over the whole sequence.
static void attention_cached_case_(int Tq, int Tk, int H, int Dh, int mode, uint64_t seed) {
    const int bf16 = mode != MODE_FP32;
    const size_t nk = (size_t)Tk * H * Dh, nq = (size_t)Tq * H * Dh;
    float *q = tcu_host_rand(nk, seed, 1.0f), *k = tcu_host_rand(nk, seed + 1, 1.0f);
    float *v = tcu_host_rand(nk, seed + 2, 1.0f);
    float *full = tcu_host_alloc(nk), *lse = tcu_host_alloc((size_t)H * Tk);
    attention_forward(full, lse, q, k, v, 1, Tk, H, Dh);
    float *out = tcu_host_alloc(nq);
    const float *qlast = q + (nk - nq);
    attention_forward_cached(out, qlast, k, v, Tq, Tk, H, Dh);
    char name[128];
    snprintf(name, sizeof name, "CPU attention_forward_cached Tq=%d Tk=%d = the full rows", Tq, Tk);
    CU_ASSERT_TRUE(tu_allclose(name, out, full + (nk - nq), nq, 1e-6, 1e-5));

    set_mode_(mode);
    float *d_q = tcu_dev_from(qlast, nq), *d_k = tcu_dev_from(k, nk), *d_v = tcu_dev_from(v, nk);
    float *d_out = cuda_malloc(nq * sizeof(float));
    void *scratch = cuda_malloc(cuda_attention_cached_scratch_bytes(Tq, Tk, H));
    cuda_attention_forward_cached(d_out, d_q, d_k, d_v, Tq, Tk, H, Dh, scratch);
    snprintf(name, sizeof name, "attention_forward_cached Tq=%d Tk=%d Dh=%d %s", Tq, Tk, Dh,
             mode_name_(mode));
    CU_ASSERT_TRUE(check_(name, d_out, out, nq, attn_atol_(bf16, out, nq, 1.0), gemm_rtol_(bf16)));
    cuda_free(d_q), cuda_free(d_k), cuda_free(d_v), cuda_free(d_out), cuda_free(scratch);
    free(q), free(k), free(v), free(full), free(lse), free(out);
}

static void test_attention(void) {
    for (int mode = 0; mode < N_MODES; mode++) {
        attention_cached_case_(1, 1, 3, 16, mode, 3600);   // the first generated position
        attention_cached_case_(1, 130, 3, 64, mode, 3610); // one new token over a cache
        attention_cached_case_(17, 17, 2, 16, mode, 3620); // a prompt
        attention_cached_case_(5, 70, 2, 32, mode, 3630);  // a few tokens after a cache
    }
    static const int Ts[] = {1, 17, 128}, Dhs[] = {16, 64};
    for (int mode = 0; mode < N_MODES; mode++) {
        for (size_t i = 0; i < sizeof Ts / sizeof Ts[0]; i++)
            for (size_t j = 0; j < sizeof Dhs / sizeof Dhs[0]; j++)
                attention_case_(2, Ts[i], 3, Dhs[j], 7, mode, 3000 + 100 * i + 10 * j);
        attention_case_(2, 17, 3, 16, 4, mode, 3500); // dv only (no dP / dS pass)
        attention_case_(2, 17, 3, 16, 3, mode, 3510); // dq and dk, dv NULL
        attention_case_(2, 17, 3, 16, 2, mode, 3520); // dk only
    }
    set_mode_(MODE_BF16);
}

// Causal query blocks (cuda_set_attention_query_block): the default rule, and forced blocks
// that divide T unevenly (17 = 5 + 5 + 5 + 2) or evenly (128 = 4 x 32), with a forward and
// every backward subset; each against the CPU as above. Then the generation path, which must
// ignore the setting (one block over all Tk keys).
static void test_attention_query_blocks(void) {
    cuda_set_attention_flash(0); // the bf16 forward's blocks too (the flash kernel has none)
    CU_ASSERT_EQUAL(cuda_attention_query_block(128), 128); // below 512: one block
    CU_ASSERT_EQUAL(cuda_attention_query_block(512), 128);
    CU_ASSERT_EQUAL(cuda_attention_query_block(4096), 1024);
    CU_ASSERT_EQUAL(cuda_attention_query_block(1000), 256); // ceil(1000/4) = 250 -> 256
    cuda_set_attention_query_block(5);
    CU_ASSERT_EQUAL(cuda_attention_query_block(17), 5);
    CU_ASSERT_EQUAL(cuda_attention_query_block(3), 3);
    for (int mode = 0; mode < N_MODES; mode++) {
        cuda_set_attention_query_block(5);
        attention_case_(2, 17, 3, 16, 7, mode, 3700);
        attention_case_(2, 17, 3, 16, 4, mode, 3710); // dv only
        attention_case_(2, 17, 3, 16, 3, mode, 3720); // dq and dk
        attention_cached_case_(5, 70, 2, 32, mode, 3730);
        cuda_set_attention_query_block(32);
        attention_case_(1, 128, 2, 64, 7, mode, 3740);
    }
    // bf16 in chunks of one head (a small workspace) with blocks
    set_mode_(MODE_BF16);
    cuda_set_attention_query_block(5);
    cuda_set_gemm_workspace_limit(8192);
    attention_case_(2, 17, 3, 16, 7, MODE_BF16, 3750);
    cuda_set_gemm_workspace_limit(0);
    // -1: as MOET_CUDA_ATTN_QBLOCK says (N: blocks of N rows; 0 or unset: the default rule)
    const char *env = getenv("MOET_CUDA_ATTN_QBLOCK");
    char *saved = env ? strdup(env) : NULL;
    setenv("MOET_CUDA_ATTN_QBLOCK", "7", 1);
    cuda_set_attention_query_block(-1);
    CU_ASSERT_EQUAL(cuda_attention_query_block(17), 7);
    setenv("MOET_CUDA_ATTN_QBLOCK", "0", 1);
    cuda_set_attention_query_block(-1);
    CU_ASSERT_EQUAL(cuda_attention_query_block(4096), 1024);
    unsetenv("MOET_CUDA_ATTN_QBLOCK");
    cuda_set_attention_query_block(-1);
    CU_ASSERT_EQUAL(cuda_attention_query_block(4096), 1024);
    if (saved) setenv("MOET_CUDA_ATTN_QBLOCK", saved, 1);
    free(saved);
    cuda_set_attention_query_block(0);
    cuda_set_attention_flash(-1);
}

// ---------------------------------------------------------------------------------------
// GEMM precision switch

// An A/B switch read from the environment by setter(-1): each value in turn must give its
// setting (NULL: unset); the variable is restored afterwards.
typedef struct {
    const char *value;
    int want;
} EnvCase;

static void env_switch_cases_(const char *name, void (*setter)(int), int (*getter)(void),
                              const EnvCase *cases, int n) {
    const char *env = getenv(name);
    char *saved = env ? strdup(env) : NULL;
    for (int i = 0; i < n; i++) {
        if (cases[i].value)
            setenv(name, cases[i].value, 1);
        else
            unsetenv(name);
        setter(-1);
        CU_ASSERT_EQUAL(getter(), cases[i].want);
    }
    if (saved) setenv(name, saved, 1);
    free(saved);
}

// ---------------------------------------------------------------------------------------
// Flash attention forward

// The flash forward (attention_flash.cu, cuda_set_attention_flash): the head sizes it takes;
// each of them against the CPU, forward and the backward that reads its lse, over one tile,
// one row into a second tile, and several tiles with a partial last one (T = 200: 64 + 64 +
// 64 + 8 rows, the longest tile first), also with scores spread over tens (the kernel's
// rescaling of O), with the GEMM path (off) on the same cases; fp32 mode
// never takes it (its fp32 tolerance would fail on bf16 operands); the same bits twice; the
// switch as MOET_CUDA_ATTN_FLASH says (off by default).
static int same_run_(const char *name, const float *a, const float *b, size_t n); // below

static int flash128_(void) {
    return cuda_attention_flash(128);
}

static void test_attention_flash(void) {
    cuda_set_attention_flash(1);
    CU_ASSERT_TRUE(cuda_attention_flash(16) && cuda_attention_flash(32));
    CU_ASSERT_TRUE(cuda_attention_flash(64) && cuda_attention_flash(128));
    CU_ASSERT_FALSE(cuda_attention_flash(8) || cuda_attention_flash(48));
    CU_ASSERT_FALSE(cuda_attention_flash(256));
    for (int on = 1; on >= 0; on--) {
        cuda_set_attention_flash(on);
        CU_ASSERT_EQUAL(cuda_attention_flash(128), on);
        attention_case_(1, 64, 2, 16, 7, MODE_BF16, 3800);   // exactly one tile
        attention_case_(1, 65, 2, 64, 7, MODE_BF16, 3810);   // one row into a second tile
        attention_case_(2, 200, 2, 128, 7, MODE_BF16, 3820); // OLMoE's head size
        attention_case_(1, 130, 3, 32, 7, MODE_BF16_GEMMEX, 3830);
        // scores spread over tens (|q| up to 16): rows' maxima move on later tiles, so the
        // kernel rescales O there (with |q| <= 1 only the first tile sets them)
        attn_q_scale_ = 16.0f;
        attention_case_(1, 200, 2, 128, 7, MODE_BF16, 3850);
        attn_q_scale_ = 1.0f;
    }
    cuda_set_attention_flash(1);
    attention_case_(1, 130, 2, 32, 7, MODE_FP32, 3840);
    // deterministic: the same bits twice (out and lse), over 3 tiles
    set_mode_(MODE_BF16);
    {
        const int T = 130, H = 2, Dh = 64;
        const size_t n = (size_t)T * H * Dh, nl = (size_t)H * T;
        float *q = tcu_host_rand(n, 3860, 4.0f), *k = tcu_host_rand(n, 3861, 1.0f);
        float *v = tcu_host_rand(n, 3862, 1.0f);
        float *d_q = tcu_dev_from(q, n), *d_k = tcu_dev_from(k, n), *d_v = tcu_dev_from(v, n);
        float *d_out = cuda_malloc(n * sizeof(float)), *d_lse = cuda_malloc(nl * sizeof(float));
        void *scratch = cuda_malloc(cuda_attention_scratch_bytes(T, H));
        float *res[2][2];
        for (int r = 0; r < 2; r++) {
            cuda_zero(d_out, n * sizeof(float));
            cuda_attention_forward(d_out, d_lse, d_q, d_k, d_v, 1, T, H, Dh, scratch);
            res[r][0] = tcu_host_from(d_out, n), res[r][1] = tcu_host_from(d_lse, nl);
        }
        CU_ASSERT_TRUE(same_run_("flash attention_forward out", res[0][0], res[1][0], n));
        CU_ASSERT_TRUE(same_run_("flash attention_forward lse", res[0][1], res[1][1], nl));
        for (int r = 0; r < 2; r++) free(res[r][0]), free(res[r][1]);
        cuda_free(d_q), cuda_free(d_k), cuda_free(d_v), cuda_free(d_out), cuda_free(d_lse);
        cuda_free(scratch);
        free(q), free(k), free(v);
    }
    static const EnvCase env[] = {{"1", 1}, {"0", 0}, {"", 0}, {NULL, 0}};
    env_switch_cases_("MOET_CUDA_ATTN_FLASH", cuda_set_attention_flash, flash128_, env, 4);
    cuda_set_attention_flash(-1);
    set_mode_(MODE_BF16);
}

static void test_gemm_mode(void) {
    // main() checks the defaults (1, 1, 1) before any test runs; here the setters and getters
    cuda_set_gemm_bf16(0);
    CU_ASSERT_EQUAL(cuda_gemm_bf16(), 0);
    cuda_set_gemm_bf16(5); // any non-zero value means on
    CU_ASSERT_EQUAL(cuda_gemm_bf16(), 1);
    cuda_set_gemm_bf16_operands(0);
    CU_ASSERT_EQUAL(cuda_gemm_bf16_operands(), 0);
    cuda_set_gemm_bf16_operands(7);
    CU_ASSERT_EQUAL(cuda_gemm_bf16_operands(), 1);
    cuda_set_gemm_lt(0);
    CU_ASSERT_EQUAL(cuda_gemm_lt(), 0);
    cuda_set_gemm_lt(3);
    CU_ASSERT_EQUAL(cuda_gemm_lt(), 1);
    // -1: as the environment says (MOET_CUDA_GEMM_OPERANDS: fp32 -> 0; bf16, empty or unset
    // -> 1. MOET_CUDA_GEMM_LT: 0 -> 0; 1, empty or unset -> 1)
    static const EnvCase operands[] = {{"fp32", 0}, {"bf16", 1}, {"", 1}, {NULL, 1}};
    env_switch_cases_("MOET_CUDA_GEMM_OPERANDS", cuda_set_gemm_bf16_operands,
                      cuda_gemm_bf16_operands, operands, 4);
    static const EnvCase lt[] = {{"0", 0}, {"1", 1}, {"", 1}, {NULL, 1}};
    env_switch_cases_("MOET_CUDA_GEMM_LT", cuda_set_gemm_lt, cuda_gemm_lt, lt, 4);
    set_mode_(MODE_BF16);
}

// ---------------------------------------------------------------------------------------
// The cuBLASLt algorithm cache (gemm.cu): one heuristic query per shape class, where an
// expert's row count is rounded up to 8 steps per octave. Every result is checked against the
// CPU as in the other cases; the counters of CudaHostStats show what the cache did. C = OC =
// 64 and even start rows keep every operand 256-byte aligned, so that the classes differ only
// where the row counts do.

// Runs grouped_case_ and returns the host counters it added.
static CudaHostStats grouped_counted_(const int *rows, int E, int mode, uint64_t seed) {
    cuda_host_stats_reset();
    grouped_case_(rows, E, 64, 64, mode, seed);
    CudaHostStats st;
    cuda_host_stats(&st);
    return st;
}

static void test_lt_cache(void) {
    // 70, 66, 68 -> class 72; 100, 98 -> 104; 200 -> 208 (and the dense dw of grouped_case_'s
    // "dw only" pass has the same classes)
    static const int first[5] = {70, 0, 66, 100, 68}, same[5] = {68, 0, 70, 98, 66};
    static const int other[5] = {70, 0, 66, 200, 68};
    // EMU_LT_REFUSE=1 makes the host emulator's cublasLtMatmul refuse every algorithm
    // (tools/cuda-emu/run.sh gemm_lt_refused): every call must then fall back to cublasGemmEx,
    // with the same results
    const char *refuse = getenv("EMU_LT_REFUSE");
    const int refused = refuse && strcmp(refuse, "1") == 0;
    CudaHostStats a = grouped_counted_(first, 5, MODE_BF16, 7000);
    if (refused)
        CU_ASSERT_TRUE(a.gemm_calls > 0 && a.lt_calls == 0 && a.lt_fallbacks == a.gemm_calls);
    if (!refused)
        CU_ASSERT_TRUE(a.lt_calls > 0 && a.lt_calls == a.gemm_calls && a.lt_fallbacks == 0);
    // other row counts in the same classes: every algorithm comes from the cache
    CudaHostStats b = grouped_counted_(same, 5, MODE_BF16, 7010);
    CU_ASSERT_EQUAL(b.lt_queries, 0);
    CU_ASSERT_TRUE(b.lt_calls == a.lt_calls && b.gemm_calls == a.gemm_calls);
    // a row count in a new class: new queries, for that expert's GEMMs only
    CudaHostStats c = grouped_counted_(other, 5, MODE_BF16, 7020);
    CU_ASSERT_TRUE(c.lt_queries > 0 && c.lt_queries < a.lt_queries);
    // the same again: cached
    CudaHostStats d = grouped_counted_(other, 5, MODE_BF16, 7030);
    CU_ASSERT_EQUAL(d.lt_queries, 0);
    // MOET_CUDA_GEMM_LT=0: the same GEMMs, none through cuBLASLt
    CudaHostStats e = grouped_counted_(first, 5, MODE_BF16_GEMMEX, 7040);
    CU_ASSERT_TRUE(e.gemm_calls == a.gemm_calls && e.lt_calls == 0 && e.lt_queries == 0);
    // the host time is measured (every call takes some)
    CU_ASSERT_TRUE(a.gemm_host_s > 0.0 && e.gemm_host_s > 0.0);
    if (b.lt_queries != 0 || d.lt_queries != 0 || c.lt_queries == 0)
        fprintf(stderr, "  heuristic queries: first %llu, same classes %llu, new class %llu, "
                        "again %llu\n", a.lt_queries, b.lt_queries, c.lt_queries, d.lt_queries);
    set_mode_(MODE_BF16);
}

// ---------------------------------------------------------------------------------------
// The bf16 operand path in chunks: with a workspace limit of 8 KiB the matmuls go in pieces of
// a few rows (and one expert per chunk, or pieces of one row where a single weight matrix is
// already over the limit), attention in chunks of one head; every result as above, and the
// workspace within the limit where the smallest chunk fits.

static void test_workspace_chunks(void) {
    set_mode_(MODE_BF16);
    const size_t limit = 8192;
    cuda_set_gemm_workspace_limit(limit); // frees the larger workspace of the tests before
    CU_ASSERT_EQUAL(cuda_gemm_workspace_bytes(), 0);
    // 37x70x45: the weights (3150 bf16 values) leave room for pieces of 10 rows of inp in the
    // forward, of 5 rows of dout and inp in the backward
    matmul_case_(37, 70, 45, 1, 1, MODE_BF16, 5000);
    const size_t ws = cuda_gemm_workspace_bytes();
    CU_ASSERT_TRUE(ws > 0 && ws <= limit);
    if (!(ws > 0 && ws <= limit)) fprintf(stderr, "  workspace %zu bytes, limit %zu\n", ws, limit);
    static const int rows5[5] = {7, 0, 33, 1, 19}, rows4[4] = {100, 3, 0, 250};
    grouped_case_(rows5, 5, 70, 45, MODE_BF16, 5010);   // one expert per chunk, pieces of rows
    grouped_case_(rows4, 4, 256, 96, MODE_BF16, 5020);  // weights over the limit: rows one by one
    attention_case_(2, 17, 3, 16, 7, MODE_BF16, 5030);  // backward: one head per chunk
    attention_case_(2, 17, 3, 16, 4, MODE_BF16, 5040);  // dv only (P alone): all heads at once
    attention_case_(1, 128, 3, 16, 7, MODE_BF16, 5060); // forward too: one head per chunk
    attention_cached_case_(5, 70, 2, 32, MODE_BF16, 5050);
    cuda_set_gemm_workspace_limit(0); // the default again
}

// The workspace grows by whole MiB and at least doubles (so that needs that creep up, as the
// experts' rows do from step to step, reallocate a few times, not at every op), within the
// limit. Backward of a (N,256) x (256,256)^T matmul: 256*256 + N*512 bf16 values.
static void test_workspace_growth(void) {
    set_mode_(MODE_BF16);
    cuda_set_gemm_workspace_limit(1); // frees the workspace of the tests before
    CU_ASSERT_EQUAL(cuda_gemm_workspace_bytes(), 0);
    cuda_set_gemm_workspace_limit((size_t)3 << 20);
    matmul_case_(1024, 256, 256, 1, 1, MODE_BF16, 5100); // 1.125 MiB: 2 MiB
    CU_ASSERT_EQUAL(cuda_gemm_workspace_bytes(), (size_t)2 << 20);
    matmul_case_(1536, 256, 256, 1, 1, MODE_BF16, 5110); // 1.625 MiB: fits
    CU_ASSERT_EQUAL(cuda_gemm_workspace_bytes(), (size_t)2 << 20);
    matmul_case_(2048, 256, 256, 1, 1, MODE_BF16, 5120); // 2.125 MiB: doubling, capped at 3 MiB
    CU_ASSERT_EQUAL(cuda_gemm_workspace_bytes(), (size_t)3 << 20);
    cuda_set_gemm_workspace_limit((size_t)64 << 20);
    matmul_case_(4096, 256, 256, 1, 1, MODE_BF16, 5130); // 4.125 MiB: twice 3 MiB = 6 MiB
    CU_ASSERT_EQUAL(cuda_gemm_workspace_bytes(), (size_t)6 << 20);
    cuda_set_gemm_workspace_limit(0);
}

// ---------------------------------------------------------------------------------------
// bf16 operands, exactly. With bf16 operands a GEMM is the fp32 sum of exact products (8 x 8
// significant bits fit fp32's 24) of the operands rounded to nearest even: it must equal a
// double-precision reference on those rounded operands up to fp32 summation, whatever the
// order: |err| <= (k + 1) * 2^-24 * sum |terms| for k terms, and for positive terms
// sum |terms| = |result|, so the check is relative: RTOL_SUM(k) = (2k + 4) * 2^-24 (twice that,
// plus the rounding of the reference to float and of the beta = 1 accumulations, and of the sums
// over pieces of rows when dw is chunked).
// The inputs are built so that a wrong rounding moves every product the same way:
//   ABOVE_HALF: positive values in [0.5, 2) whose bits below bf16 are 0.55 to 0.7 of a bf16
//     ulp: nearest rounds them up. Truncation would give every operand 1 ulp less (a relative
//     error of at least 2^-8 per operand, 2^-7 per product, in the same direction), unrounded
//     fp32 or TF32 operands 0.25 to 0.45 ulp less (TF32 keeps 3 of the 0.55 - 0.7 ulp's bits).
//   TIE_EVEN: exact ties (half an ulp) above an even bf16: nearest-even rounds them down,
//     rounding half up (or away from zero) and unrounded operands give half an ulp more.
// Either way the result moves by >= ~2^-9 * |result| = 2e-3 |result|, against RTOL_SUM(k) <=
// 6.1e-5 at k <= 512: a wrong conversion, or operands left in fp32, fail by 30x or more. (The
// emulator models FAST_16BF as rounding to nearest even, so there the fp32-operand mode passes
// too; on a GPU, where cuBLAS picks TF32 for it, it would not: only MODE_BF16 is checked.)
#define RTOL_SUM(k) ((2.0 * (k) + 4.0) * 0x1.0p-24)
enum { ABOVE_HALF, TIE_EVEN };

// n such values into x, and in r the bf16 values they must round to (as floats).
static void probe_fill_(float *x, float *r, size_t n, int kind, uint64_t seed) {
    uint64_t st = seed;
    for (size_t i = 0; i < n; i++) {
        const uint64_t z = tu_rand_u64(&st);
        uint32_t hi = (uint32_t)(126 + (z & 1)) << 23 | (uint32_t)(z >> 1 & 0x7f) << 16;
        uint32_t lo = 0x8000, up = 0; // tie
        if (kind == TIE_EVEN) {
            hi &= ~0x10000u; // the even bf16 below: nearest-even keeps it
        } else {
            lo = 0x8ccd + (uint32_t)(z >> 8 & 0xffff) % (0xb333 - 0x8ccd + 1); // 0.55 - 0.7 ulp
            up = 0x10000;                                                      // rounds up
        }
        const uint32_t xb = hi | lo, rb = hi + up;
        memcpy(&x[i], &xb, 4);
        memcpy(&r[i], &rb, 4);
    }
}

// Reference of the grouped forward and backward on the rounded operands (double sums), as
// kernels.h defines the ops: out = inp @ w_e^T; dinp = dinp0 + dout @ w_e (dinp0 NULL: the
// grouped op, which writes dinp); dw_e = dw0_e + dout^T @ inp over the expert's rows.
static void grouped_ref_(float *out, float *dinp, float *dw, const float *rin, const float *rw,
                         const float *rdout, const float *dinp0, const float *dw0,
                         const int32_t *off, int E, int C, int OC) {
    for (int e = 0; e < E; e++) {
        const float *we = rw + (size_t)e * OC * C;
        for (int r = off[e]; r < off[e + 1]; r++)
            for (int o = 0; o < OC; o++) {
                double acc = 0;
                for (int c = 0; c < C; c++)
                    acc += (double)rin[(size_t)r * C + c] * we[(size_t)o * C + c];
                out[(size_t)r * OC + o] = (float)acc;
            }
        for (int r = off[e]; r < off[e + 1]; r++)
            for (int c = 0; c < C; c++) {
                double acc = dinp0 ? dinp0[(size_t)r * C + c] : 0.0;
                for (int o = 0; o < OC; o++)
                    acc += (double)rdout[(size_t)r * OC + o] * we[(size_t)o * C + c];
                dinp[(size_t)r * C + c] = (float)acc;
            }
        for (int o = 0; o < OC; o++)
            for (int c = 0; c < C; c++) {
                const size_t i = (size_t)e * OC * C + (size_t)o * C + c;
                double acc = dw0[i];
                for (int r = off[e]; r < off[e + 1]; r++)
                    acc += (double)rdout[(size_t)r * OC + o] * rin[(size_t)r * C + c];
                dw[i] = (float)acc;
            }
    }
}

// The grouped matmul (dense = 1 expert through cuda_matmul_*) on probe inputs of one kind,
// forward and backward (dinp, dw pre-filled with positive values), against grouped_ref_.
static void exact_matmul_case_(const int *rows, int E, int C, int OC, int kind, int dense,
                               uint64_t seed) {
    int32_t off[16] = {0};
    for (int e = 0; e < E; e++) off[e + 1] = off[e] + rows[e];
    const int R = off[E];
    int kmax = 1;
    for (int e = 0; e < E; e++) kmax = rows[e] > kmax ? rows[e] : kmax;
    const size_t rc = (size_t)R * C, ro = (size_t)R * OC, ew = (size_t)E * OC * C;
    float *in = tcu_host_alloc(rc), *rin = tcu_host_alloc(rc), *w = tcu_host_alloc(ew);
    float *rw = tcu_host_alloc(ew), *dout = tcu_host_alloc(ro), *rdout = tcu_host_alloc(ro);
    probe_fill_(in, rin, rc, kind, seed);
    probe_fill_(w, rw, ew, kind, seed + 1);
    probe_fill_(dout, rdout, ro, kind, seed + 2);
    // gradients pre-filled with positive values (any: they are accumulated in fp32, not
    // rounded; the grouped op writes over dinp's)
    float *dinp0 = tcu_host_alloc(rc), *dw0 = tcu_host_alloc(ew);
    float *unused = tcu_host_alloc(rc > ew ? rc : ew);
    probe_fill_(dinp0, unused, rc, ABOVE_HALF, seed + 3);
    probe_fill_(dw0, unused, ew, ABOVE_HALF, seed + 4);
    float *out = tcu_host_alloc(ro), *dinp = tcu_host_alloc(rc), *dw = tcu_host_alloc(ew);
    grouped_ref_(out, dinp, dw, rin, rw, rdout, dense ? dinp0 : NULL, dw0, off, E, C, OC);

    float *d_in = tcu_dev_from(in, rc), *d_w = tcu_dev_from(w, ew),
          *d_dout = tcu_dev_from(dout, ro);
    float *d_dinp = tcu_dev_from(dinp0, rc), *d_dw = tcu_dev_from(dw0, ew);
    float *d_out = cuda_malloc(ro * sizeof(float));
    if (dense) {
        cuda_matmul_forward(d_out, d_in, d_w, R, C, OC);
        cuda_matmul_backward(d_dinp, d_dw, d_dout, d_in, d_w, R, C, OC);
    } else {
        cuda_grouped_matmul_forward(d_out, d_in, d_w, off, E, C, OC);
        cuda_grouped_matmul_backward(d_dinp, d_dw, d_dout, d_in, d_w, off, E, C, OC);
    }
    char name[128];
    const char *what = dense ? "matmul" : "grouped_matmul",
               *how = kind == TIE_EVEN ? "ties" : "above-half";
    snprintf(name, sizeof name, "bf16-exact %s_forward %s %dx%dx%d", what, how, R, C, OC);
    CU_ASSERT_TRUE(check_(name, d_out, out, ro, 0.0, RTOL_SUM(C)));
    snprintf(name, sizeof name, "bf16-exact %s_backward dinp %s %dx%dx%d", what, how, R, C, OC);
    CU_ASSERT_TRUE(check_(name, d_dinp, dinp, rc, 0.0, RTOL_SUM(OC)));
    snprintf(name, sizeof name, "bf16-exact %s_backward dw %s %dx%dx%d", what, how, R, C, OC);
    CU_ASSERT_TRUE(check_(name, d_dw, dw, ew, 0.0, RTOL_SUM(kmax)));
    cuda_free(d_in), cuda_free(d_w), cuda_free(d_dout), cuda_free(d_dinp), cuda_free(d_dw);
    cuda_free(d_out);
    free(in), free(rin), free(w), free(rw), free(dout), free(rdout), free(dinp0), free(dw0);
    free(unused), free(out), free(dinp), free(dw);
}

// Attention at T = 1 on probe inputs: the one probability is exactly 1, so out = P V must be
// v rounded to bf16, bit for bit; lse = the one score = scale * q.k over the rounded q and k
// (scale = 2^-3 at Dh = 64: exact); the backward's dv += P^T dO is dv0 + dO rounded to bf16.
// The cached attention (Tq = Tk = 1) must give the same out.
static void exact_attention_case_(int kind, uint64_t seed) {
    const int B = 2, T = 1, H = 3, Dh = 64;
    const size_t n = (size_t)B * T * H * Dh, nl = (size_t)B * H * T;
    float *q = tcu_host_alloc(n), *rq = tcu_host_alloc(n), *k = tcu_host_alloc(n);
    float *rk = tcu_host_alloc(n), *v = tcu_host_alloc(n), *rv = tcu_host_alloc(n);
    float *dout = tcu_host_alloc(n), *rdout = tcu_host_alloc(n), *dv0 = tcu_host_alloc(n);
    probe_fill_(q, rq, n, kind, seed);
    probe_fill_(k, rk, n, kind, seed + 1);
    probe_fill_(v, rv, n, kind, seed + 2);
    probe_fill_(dout, rdout, n, kind, seed + 3);
    tu_fill_uniform(dv0, n, seed + 4, 0.5f);
    float *lse = tcu_host_alloc(nl), *dv = tcu_host_alloc(n);
    for (size_t i = 0; i < nl; i++) { // row (b, h): q and k at (b*H + h)*Dh
        double acc = 0;
        for (int d = 0; d < Dh; d++) acc += (double)rq[i * Dh + d] * rk[i * Dh + d];
        lse[i] = (float)(acc / 8.0);
    }
    for (size_t i = 0; i < n; i++) dv[i] = dv0[i] + rdout[i]; // one fp32 rounding, as cuBLAS
    const char *how = kind == TIE_EVEN ? "ties" : "above-half";
    float *d_q = tcu_dev_from(q, n), *d_k = tcu_dev_from(k, n), *d_v = tcu_dev_from(v, n);
    float *d_do = tcu_dev_from(dout, n), *d_dv = tcu_dev_from(dv0, n);
    float *d_out = cuda_malloc(n * sizeof(float)), *d_lse = cuda_malloc(nl * sizeof(float));
    void *scratch = cuda_malloc(cuda_attention_scratch_bytes(T, H));
    cuda_attention_forward(d_out, d_lse, d_q, d_k, d_v, B, T, H, Dh, scratch);
    char name[128];
    snprintf(name, sizeof name, "bf16-exact attention_forward out = bf16(v) %s", how);
    CU_ASSERT_TRUE(equal_bits_(name, d_out, rv, n));
    snprintf(name, sizeof name, "bf16-exact attention_forward lse %s", how);
    CU_ASSERT_TRUE(check_(name, d_lse, lse, nl, 0.0, RTOL_SUM(Dh)));
    cuda_attention_backward(NULL, NULL, d_dv, d_do, d_out, d_lse, d_q, d_k, d_v, B, T, H, Dh,
                            scratch);
    snprintf(name, sizeof name, "bf16-exact attention_backward dv %s", how);
    CU_ASSERT_TRUE(check_(name, d_dv, dv, n, 0.0, 0x1.0p-23)); // one rounding: within an ulp
    cuda_zero(d_out, n * sizeof(float));
    cuda_attention_forward_cached(d_out, d_q, d_k, d_v, 1, 1, H, Dh, scratch); // sequence 0
    snprintf(name, sizeof name, "bf16-exact attention_forward_cached out = bf16(v) %s", how);
    CU_ASSERT_TRUE(equal_bits_(name, d_out, rv, (size_t)H * Dh));
    cuda_free(d_q), cuda_free(d_k), cuda_free(d_v), cuda_free(d_do), cuda_free(d_dv);
    cuda_free(d_out), cuda_free(d_lse), cuda_free(scratch);
    free(q), free(rq), free(k), free(rk), free(v), free(rv), free(dout), free(rdout), free(dv0);
    free(lse), free(dv);
}

static void test_bf16_operands_exact(void) {
    // dense, 16-byte aligned operands with sizes in multiples of 4 (the vectorised conversion)
    static const int one[1] = {64}, rows[4] = {20, 0, 45, 3};
    for (int m = 0; m < 2; m++) // through cuBLASLt (the default) and through cublasGemmEx
    for (int kind = ABOVE_HALF; kind <= TIE_EVEN; kind++) {
        set_mode_(m == 0 ? MODE_BF16 : MODE_BF16_GEMMEX);
        exact_matmul_case_(one, 1, 512, 48, kind, 1, 6000 + 10 * kind);
        // experts of odd sizes (45 x 33 weights: the conversion's tail), in the default
        // workspace, then one expert per chunk in pieces of 8 (forward) and 3 (backward) rows
        // that start at odd rows (unaligned: element by element); the dense case in pieces of
        // one row (its weights alone are over the limit)
        exact_matmul_case_(rows, 4, 45, 33, kind, 0, 6100 + 10 * kind);
        cuda_set_gemm_workspace_limit(4096);
        exact_matmul_case_(rows, 4, 45, 33, kind, 0, 6200 + 10 * kind);
        exact_matmul_case_(one, 1, 512, 48, kind, 1, 6300 + 10 * kind);
        cuda_set_gemm_workspace_limit(0);
        for (int flash = 0; flash <= 1; flash++) { // the GEMM path and the flash kernel
            cuda_set_attention_flash(flash);
            exact_attention_case_(kind, 6400 + 10 * kind);
        }
        cuda_set_attention_flash(-1);
    }
    set_mode_(MODE_BF16);
}

// ---------------------------------------------------------------------------------------
// Determinism: every op twice from the same inputs, in both precisions; the bits must match.

static int same_run_(const char *name, const float *a, const float *b, size_t n) {
    int ok = memcmp(a, b, n * sizeof *a) == 0;
    if (!ok) fprintf(stderr, "  %s: two runs differ\n", name);
    return ok;
}

static void test_determinism(void) {
    const int N = 300, C = 256, OC = 192;
    const int B = 2, T = 128, H = 3, Dh = 64;
    cuda_set_attention_query_block(48); // blocks of 48, 48, 32: dK, dV summed over blocks
    static const int rows[4] = {120, 0, 100, 80}; // R = N
    int32_t offsets[5] = {0};
    for (int e = 0; e < 4; e++) offsets[e + 1] = offsets[e] + rows[e];
    const size_t nc = (size_t)N * C, oc = (size_t)OC * C, no = (size_t)N * OC;
    const size_t na = (size_t)B * T * H * Dh, nl = (size_t)B * H * T;
    float *h_inp = tcu_host_rand(nc, 4000, 1.0f), *h_w = tcu_host_rand(4 * oc, 4001, 1.0f);
    float *h_dout = tcu_host_rand(no, 4002, 1.0f), *h_q = tcu_host_rand(na, 4003, 1.0f);
    float *h_k = tcu_host_rand(na, 4004, 1.0f), *h_v = tcu_host_rand(na, 4005, 1.0f);
    float *h_do = tcu_host_rand(na, 4006, 1.0f);
    float *d_inp = tcu_dev_from(h_inp, nc), *d_w = tcu_dev_from(h_w, 4 * oc);
    float *d_dout = tcu_dev_from(h_dout, no), *d_q = tcu_dev_from(h_q, na),
          *d_k = tcu_dev_from(h_k, na);
    float *d_v = tcu_dev_from(h_v, na), *d_do = tcu_dev_from(h_do, na);
    float *d_out = cuda_malloc(no * sizeof(float)), *d_dinp = cuda_malloc(nc * sizeof(float));
    float *d_dw = cuda_malloc(4 * oc * sizeof(float));
    float *d_aout = cuda_malloc(na * sizeof(float)), *d_lse = cuda_malloc(nl * sizeof(float));
    float *d_dq = cuda_malloc(na * sizeof(float)), *d_dk = cuda_malloc(na * sizeof(float));
    float *d_dv = cuda_malloc(na * sizeof(float));
    void *scratch = cuda_malloc(cuda_attention_scratch_bytes(T, H));

    enum { NOUT = 11 };
    static const char *names[NOUT] = {"matmul out",   "matmul dinp", "matmul dw", "grouped out",
                                      "grouped dinp", "grouped dw",  "attn out",  "attn lse",
                                      "attn dq",      "attn dk",     "attn dv"};
    const size_t sizes[NOUT] = {no, nc, oc, no, nc, 4 * oc, na, nl, na, na, na};
    for (int mode = 0; mode < N_MODES; mode++) {
        set_mode_(mode);
        float *res[2][NOUT];
        for (int r = 0; r < 2; r++) {
            int i = 0;
            cuda_zero(d_dinp, nc * sizeof(float));
            cuda_zero(d_dw, 4 * oc * sizeof(float));
            cuda_matmul_forward(d_out, d_inp, d_w, N, C, OC);
            cuda_matmul_backward(d_dinp, d_dw, d_dout, d_inp, d_w, N, C, OC);
            res[r][i++] = tcu_host_from(d_out, no);
            res[r][i++] = tcu_host_from(d_dinp, nc);
            res[r][i++] = tcu_host_from(d_dw, oc);
            cuda_zero(d_dinp, nc * sizeof(float));
            cuda_zero(d_dw, 4 * oc * sizeof(float));
            cuda_grouped_matmul_forward(d_out, d_inp, d_w, offsets, 4, C, OC);
            cuda_grouped_matmul_backward(d_dinp, d_dw, d_dout, d_inp, d_w, offsets, 4, C, OC);
            res[r][i++] = tcu_host_from(d_out, no);
            res[r][i++] = tcu_host_from(d_dinp, nc);
            res[r][i++] = tcu_host_from(d_dw, 4 * oc);
            cuda_zero(d_dq, na * sizeof(float));
            cuda_zero(d_dk, na * sizeof(float));
            cuda_zero(d_dv, na * sizeof(float));
            cuda_attention_forward(d_aout, d_lse, d_q, d_k, d_v, B, T, H, Dh, scratch);
            cuda_attention_backward(d_dq, d_dk, d_dv, d_do, d_aout, d_lse, d_q, d_k, d_v, B, T, H,
                                    Dh, scratch);
            res[r][i++] = tcu_host_from(d_aout, na);
            res[r][i++] = tcu_host_from(d_lse, nl);
            res[r][i++] = tcu_host_from(d_dq, na);
            res[r][i++] = tcu_host_from(d_dk, na);
            res[r][i++] = tcu_host_from(d_dv, na);
        }
        for (int i = 0; i < NOUT; i++) {
            char name[96];
            snprintf(name, sizeof name, "%s %s", names[i], mode_name_(mode));
            CU_ASSERT_TRUE(same_run_(name, res[0][i], res[1][i], sizes[i]));
            free(res[0][i]), free(res[1][i]);
        }
    }
    set_mode_(MODE_BF16);

    cuda_free(d_inp), cuda_free(d_w), cuda_free(d_dout), cuda_free(d_q), cuda_free(d_k);
    cuda_free(d_v), cuda_free(d_do), cuda_free(d_out), cuda_free(d_dinp), cuda_free(d_dw);
    cuda_free(d_aout), cuda_free(d_lse), cuda_free(d_dq), cuda_free(d_dk), cuda_free(d_dv);
    cuda_free(scratch);
    free(h_inp), free(h_w), free(h_dout), free(h_q), free(h_k), free(h_v), free(h_do);
    cuda_set_attention_query_block(0);
}

// ---------------------------------------------------------------------------------------
// The expert GEMMs on several streams (gemm.cu, cuda_set_gemm_streams): 1, 2, 3, 4 and 8
// streams give the same bits, also in chunks of experts (a 48 KiB workspace: a fork and a join
// per chunk), and the counters say how many GEMMs went to side streams (none with one row per
// expert, as in decoding). Under the host emulator a
// side stream's GEMMs run only when something waits for that stream (the latest schedule CUDA
// allows), so a missing join shows as stale or wrong results here, and a GEMM queued without a
// fork is fatal (tools/cuda-emu, "Streams and events").

enum { ST_E = 8, ST_C = 72, ST_OC = 64 }; // sums of 64 and more: the emulated cuBLASLt's
                                          // algorithms then use workspace (one per stream)

// The experts of this test and of test_pair: 6 of the 8 with rows, uneven.
static const int st_rows_[ST_E] = {37, 0, 50, 3, 70, 12, 0, 90};

// off (ST_E + 1): the row offsets of rows[0..ST_E).
static void st_offsets_(int32_t *off, const int *rows) {
    off[0] = 0;
    for (int e = 0; e < ST_E; e++) off[e + 1] = off[e] + rows[e];
}

// Runs forward and backward (dinp and dw from dinp0, dw0) on n streams; returns the host
// counters of the two calls.
static CudaHostStats streams_run_(int n, const int32_t *off, float *d_out, float *d_dinp,
                                  float *d_dw, const float *dinp0, const float *dw0,
                                  const float *d_inp, const float *d_w, const float *d_dout) {
    const int R = off[ST_E];
    cuda_set_gemm_streams(n);
    cuda_memcpy_h2d(d_dinp, dinp0, (size_t)R * ST_C * sizeof(float));
    cuda_memcpy_h2d(d_dw, dw0, (size_t)ST_E * ST_OC * ST_C * sizeof(float));
    cuda_host_stats_reset();
    cuda_grouped_matmul_forward(d_out, d_inp, d_w, off, ST_E, ST_C, ST_OC);
    cuda_grouped_matmul_backward(d_dinp, d_dw, d_dout, d_inp, d_w, off, ST_E, ST_C, ST_OC);
    CudaHostStats st;
    cuda_host_stats(&st);
    return st;
}

static void test_gemm_streams(void) {
    const int with_rows = 6;
    int32_t off[ST_E + 1];
    st_offsets_(off, st_rows_);
    const int R = off[ST_E];
    const size_t rc = (size_t)R * ST_C, ro = (size_t)R * ST_OC, ew = (size_t)ST_E * ST_OC * ST_C;
    float *inp = tcu_host_rand(rc, 9000, 1.0f), *w = tcu_host_rand(ew, 9001, 1.0f);
    float *dout = tcu_host_rand(ro, 9002, 1.0f);
    float *dinp0 = tcu_host_rand(rc, 9003, 0.5f), *dw0 = tcu_host_rand(ew, 9004, 0.5f);
    float *d_inp = tcu_dev_from(inp, rc), *d_w = tcu_dev_from(w, ew);
    float *d_dout = tcu_dev_from(dout, ro);
    float *d_out = cuda_malloc(ro * sizeof(float)), *d_dinp = cuda_malloc(rc * sizeof(float));
    float *d_dw = cuda_malloc(ew * sizeof(float));
    set_mode_(MODE_BF16);
    for (int chunked = 0; chunked < 2; chunked++) {
        // chunked: 48 KiB, chunks of 2 or 3 experts (a fork and a join each)
        cuda_set_gemm_workspace_limit(chunked ? 48 << 10 : 0);
        CudaHostStats one =
            streams_run_(1, off, d_out, d_dinp, d_dw, dinp0, dw0, d_inp, d_w, d_dout);
        CU_ASSERT_EQUAL(one.side_calls, 0);
        CU_ASSERT_TRUE(one.gemm_calls >= 3 * (unsigned long long)with_rows);
        float *ref_out = tcu_host_from(d_out, ro), *ref_dinp = tcu_host_from(d_dinp, rc);
        float *ref_dw = tcu_host_from(d_dw, ew);
        static const int counts[] = {2, 3, 4, 8};
        for (size_t i = 0; i < sizeof counts / sizeof counts[0]; i++) {
            const int n = counts[i];
            CudaHostStats st =
                streams_run_(n, off, d_out, d_dinp, d_dw, dinp0, dw0, d_inp, d_w, d_dout);
            char name[96];
            snprintf(name, sizeof name, "grouped out, %d streams%s", n, chunked ? ", chunks" : "");
            CU_ASSERT_TRUE(same_bits_(name, d_out, ref_out, ro));
            snprintf(name, sizeof name, "grouped dinp, %d streams%s", n, chunked ? ", chunks" : "");
            CU_ASSERT_TRUE(same_bits_(name, d_dinp, ref_dinp, rc));
            snprintf(name, sizeof name, "grouped dw, %d streams%s", n, chunked ? ", chunks" : "");
            CU_ASSERT_TRUE(same_bits_(name, d_dw, ref_dw, ew));
            CU_ASSERT_EQUAL(st.gemm_calls, one.gemm_calls);
            // one piece: every GEMM on a side stream; in chunks of 2 or 3 experts, those of
            // the chunks with more than one expert with rows
            if (!chunked) CU_ASSERT_EQUAL(st.side_calls, st.gemm_calls);
            if (chunked) CU_ASSERT_TRUE(st.side_calls > 0 && st.side_calls < st.gemm_calls);
        }
        free(ref_out), free(ref_dinp), free(ref_dw);
    }
    cuda_set_gemm_workspace_limit(0);
    // one row per expert (decoding a token): too little work per GEMM for side streams
    static const int one_each[ST_E] = {1, 1, 1, 1, 1, 1, 1, 1};
    int32_t off1[ST_E + 1];
    st_offsets_(off1, one_each);
    CudaHostStats dec = streams_run_(4, off1, d_out, d_dinp, d_dw, dinp0, dw0, d_inp, d_w, d_dout);
    CU_ASSERT_TRUE(dec.gemm_calls >= 3 * ST_E && dec.side_calls == 0);
    cuda_set_gemm_streams(-1); // back to the environment's (the default: checked in main)
    cuda_free(d_inp), cuda_free(d_w), cuda_free(d_dout), cuda_free(d_out), cuda_free(d_dinp);
    cuda_free(d_dw);
    free(inp), free(w), free(dout), free(dinp0), free(dw0);
}

// ---------------------------------------------------------------------------------------
// The pair op (the experts' gate and up of the same rows, cuda_grouped_matmul_*_pair): against
// the CPU's pair (dinp written: the sum of both products), also in chunks of a 48 KiB workspace
// and in fp32 mode; in one chunk out_a, out_b, dw_a, dw_b the same bits as the two single calls
// (the same GEMMs on the same converted values, in the same order), and the dinp-only and
// dw-only calls of expert parallelism the same bits as the one call.

enum { P_OUTS = 5 }; // out_a, out_b, dinp, dw_a, dw_b

typedef struct {
    const int32_t *off;
    size_t rc, ro, ew;
    const float *inp, *wa, *wb, *da, *db, *dinp0, *dw0; // host
    float *d_in[5];                                       // inp, wa, wb, da, db on the device
    float *d_out[P_OUTS];
} PairCase;

// Runs the pair (pair = 1; split = 1: dinp first, then the dw of both, as moe_backward_ep_) or
// the two calls (pair = 0) from the initial gradients; returns the outputs on the host.
static void pair_run_(PairCase *c, int pair, int split, float **got) {
    float **o = c->d_out, **in = c->d_in;
    cuda_memcpy_h2d(o[2], c->dinp0, c->rc * sizeof(float));
    cuda_memcpy_h2d(o[3], c->dw0, c->ew * sizeof(float));
    cuda_memcpy_h2d(o[4], c->dw0, c->ew * sizeof(float));
    if (pair) {
        cuda_grouped_matmul_forward_pair(o[0], o[1], in[0], in[1], in[2], c->off, ST_E, ST_C,
                                         ST_OC);
        if (split) {
            cuda_grouped_matmul_backward_pair(o[2], NULL, NULL, in[3], in[4], in[0], in[1], in[2],
                                              c->off, ST_E, ST_C, ST_OC);
            cuda_grouped_matmul_backward_pair(NULL, o[3], o[4], in[3], in[4], in[0], in[1], in[2],
                                              c->off, ST_E, ST_C, ST_OC);
        } else {
            cuda_grouped_matmul_backward_pair(o[2], o[3], o[4], in[3], in[4], in[0], in[1], in[2],
                                              c->off, ST_E, ST_C, ST_OC);
        }
    } else {
        cuda_grouped_matmul_forward(o[0], in[0], in[1], c->off, ST_E, ST_C, ST_OC);
        cuda_grouped_matmul_forward(o[1], in[0], in[2], c->off, ST_E, ST_C, ST_OC);
        cuda_grouped_matmul_backward(o[2], o[3], in[3], in[0], in[1], c->off, ST_E, ST_C, ST_OC);
        cuda_grouped_matmul_backward(o[2], o[4], in[4], in[0], in[2], c->off, ST_E, ST_C, ST_OC);
    }
    const size_t n[P_OUTS] = {c->ro, c->ro, c->rc, c->ew, c->ew};
    for (int i = 0; i < P_OUTS; i++) got[i] = tcu_host_from(o[i], n[i]);
}

static void test_pair(void) {
    static const char *names[P_OUTS] = {"out_a", "out_b", "dinp", "dw_a", "dw_b"};
    int32_t off[ST_E + 1];
    st_offsets_(off, st_rows_);
    const int R = off[ST_E];
    PairCase c = {.off = off,
                  .rc = (size_t)R * ST_C,
                  .ro = (size_t)R * ST_OC,
                  .ew = (size_t)ST_E * ST_OC * ST_C};
    float *inp = tcu_host_rand(c.rc, 9100, 1.0f), *wa = tcu_host_rand(c.ew, 9101, 1.0f);
    float *wb = tcu_host_rand(c.ew, 9102, 1.0f), *da = tcu_host_rand(c.ro, 9103, 1.0f);
    float *db = tcu_host_rand(c.ro, 9104, 1.0f), *dinp0 = tcu_host_rand(c.rc, 9105, 0.5f);
    float *dw0 = tcu_host_rand(c.ew, 9106, 0.5f);
    c.inp = inp, c.wa = wa, c.wb = wb, c.da = da, c.db = db, c.dinp0 = dinp0, c.dw0 = dw0;
    const float *h_in[5] = {inp, wa, wb, da, db};
    const size_t n_in[5] = {c.rc, c.ew, c.ew, c.ro, c.ro};
    for (int i = 0; i < 5; i++) c.d_in[i] = tcu_dev_from(h_in[i], n_in[i]);
    const size_t n[P_OUTS] = {c.ro, c.ro, c.rc, c.ew, c.ew};
    for (int i = 0; i < P_OUTS; i++) c.d_out[i] = cuda_malloc(n[i] * sizeof(float));
    // the CPU: the two forward calls, the backward pair
    float *want[P_OUTS] = {tcu_host_alloc(c.ro), tcu_host_alloc(c.ro), tcu_host_copy(dinp0, c.rc),
                           tcu_host_copy(dw0, c.ew), tcu_host_copy(dw0, c.ew)};
    grouped_matmul_forward(want[0], inp, wa, off, ST_E, ST_C, ST_OC);
    grouped_matmul_forward(want[1], inp, wb, off, ST_E, ST_C, ST_OC);
    grouped_matmul_backward_pair(want[2], want[3], want[4], da, db, inp, wa, wb, off, ST_E, ST_C,
                                 ST_OC);
    // sums of C (forward), 2 OC (dinp: both products) and up to 90 rows (dw)
    const int k[P_OUTS] = {ST_C, ST_C, 2 * ST_OC, 90, 90};

    static const int modes[2] = {MODE_BF16, MODE_FP32};
    for (int mi = 0; mi < 2; mi++) {
        set_mode_(modes[mi]);
        const int bf16 = modes[mi] != MODE_FP32;
        for (int chunked = 0; chunked < 2; chunked++) {
            cuda_set_gemm_workspace_limit(chunked ? 48 << 10 : 0);
            float *two[P_OUTS], *pair[P_OUTS], *split[P_OUTS];
            pair_run_(&c, 0, 0, two);
            pair_run_(&c, 1, 0, pair);
            pair_run_(&c, 1, 1, split); // the last run: its outputs stay on the device
            for (int i = 0; i < P_OUTS; i++) {
                char name[96];
                snprintf(name, sizeof name, "pair %s %s%s", names[i], mode_name_(modes[mi]),
                         chunked ? ", chunks" : "");
                CU_ASSERT_TRUE(check_(name, c.d_out[i], want[i], n[i],
                                      gemm_atol_(bf16, k[i], 1, 1, want[i], n[i]),
                                      gemm_rtol_(bf16)));
                if (!chunked) { // in chunks, dw-only calls have room for more rows per piece
                    snprintf(name, sizeof name, "pair %s %s = split in dinp and dw", names[i],
                             mode_name_(modes[mi]));
                    CU_ASSERT_TRUE(same_bits_(name, c.d_out[i], pair[i], n[i]));
                    if (i != 2) // dinp: the two calls would each write it
                        CU_ASSERT_TRUE(memcmp(pair[i], two[i], n[i] * sizeof(float)) == 0);
                }
                free(two[i]), free(pair[i]), free(split[i]);
            }
        }
    }
    cuda_set_gemm_workspace_limit(0);
    set_mode_(MODE_BF16);
    for (int i = 0; i < 5; i++) cuda_free(c.d_in[i]);
    for (int i = 0; i < P_OUTS; i++) cuda_free(c.d_out[i]), free(want[i]);
    free(inp), free(wa), free(wb), free(da), free(db), free(dinp0), free(dw0);
}

// ---------------------------------------------------------------------------------------
// The parameters' bf16 copy (kernels/cuda/weights.cu): GEMM ops whose weights lie in the
// registered parameters (Ops.params_register) read the copy instead of converting them. In one
// buffer laid out like a model's: a dense weight, then the experts' gate and up weights, over
// two of the copy's blocks of 65536 floats. Every run of the ops (dense forward and backward,
// the pair forward and backward) must give the same bits as the same ops on an unregistered
// buffer with the same values (converted per op), and convert only the stale blocks: each way
// of writing the parameters (the op table's to_device, copy, zero_fill, scale_inplace and
// adamw_update, and params_written after a write outside the table) must make the next GEMMs
// read the new values.

enum { WC_BLOCK = 65536, WC_OUTS = 7 }; // out, dinp, dw, out_a, out_b, dinp (pair), dw_a+dw_b
static const int wc_rows_[ST_E] = {0, 37, 50, 3, 70, 12, 0, 90}; // expert 0 without rows

typedef struct {
    int32_t off[ST_E + 1];
    int R;
    size_t rc, ro, ew, wd, n; // wd: the dense weight's floats and padding; n: all parameters
    size_t nout[WC_OUTS + 1]; // the outputs' floats
    float *d_inp, *d_dout, *d_dinp0, *d_dw0, *d_out[WC_OUTS + 1];
} WcCase;

// The ops on the parameters at base (dense weight at 0, gate at wd, up at wd + ew); returns
// the outputs on the host and the parameters converted into the copy meanwhile.
static unsigned long long wc_run_(WcCase *c, const float *base, float **got) {
    float **o = c->d_out;
    const float *w = base, *wa = base + c->wd, *wb = wa + c->ew;
    cuda_memcpy_d2d(o[1], c->d_dinp0, c->rc * sizeof(float));
    cuda_memcpy_d2d(o[2], c->d_dw0, (size_t)ST_OC * ST_C * sizeof(float));
    cuda_memcpy_d2d(o[5], c->d_dinp0, c->rc * sizeof(float));
    cuda_memcpy_d2d(o[6], c->d_dw0, c->ew * sizeof(float));
    cuda_memcpy_d2d(o[7], c->d_dw0, c->ew * sizeof(float));
    cuda_host_stats_reset();
    cuda_matmul_forward(o[0], c->d_inp, w, c->R, ST_C, ST_OC);
    cuda_matmul_backward(o[1], o[2], c->d_dout, c->d_inp, w, c->R, ST_C, ST_OC);
    cuda_grouped_matmul_forward_pair(o[3], o[4], c->d_inp, wa, wb, c->off, ST_E, ST_C, ST_OC);
    cuda_grouped_matmul_backward_pair(o[5], o[6], o[7], c->d_dout, c->d_dout, c->d_inp, wa, wb,
                                      c->off, ST_E, ST_C, ST_OC);
    CudaHostStats st;
    cuda_host_stats(&st);
    for (int i = 0; i <= WC_OUTS; i++) got[i] = tcu_host_from(o[i], c->nout[i]);
    return st.weight_converted;
}

// Runs the ops on the registered parameters d_p and on an unregistered copy of them; the
// outputs must be the same bits (tol 0) or within the bf16 GEMM tolerance of the latter.
// Returns the parameters converted into the copy, -1 on a difference.
static long long wc_check_(WcCase *c, const char *what, float *d_p, float *d_ref, int tol) {
    static const char *names[WC_OUTS + 1] = {"out",   "dinp",  "dw",   "out_a",
                                             "out_b", "dinp2", "dw_a", "dw_b"};
    const int k[WC_OUTS + 1] = {ST_C, ST_OC, c->R, ST_C, ST_C, 2 * ST_OC, 90, 90};
    const size_t *n = c->nout;
    cuda_memcpy_d2d(d_ref, d_p, c->n * sizeof(float)); // outside the op table: d_ref is no
                                                       // parameter
    float *want[WC_OUTS + 1], *got[WC_OUTS + 1];
    if (tol) cuda_set_gemm_workspace_limit(0);
    wc_run_(c, d_ref, want);
    if (tol) cuda_set_gemm_workspace_limit(48 << 10);
    const unsigned long long conv = wc_run_(c, d_p, got);
    if (tol) cuda_set_gemm_workspace_limit(0);
    int ok = 1;
    for (int i = 0; i <= WC_OUTS; i++) {
        char name[128];
        snprintf(name, sizeof name, "weight copy, %s: %s", what, names[i]);
        if (tol) {
            ok &= tu_allclose(name, got[i], want[i], n[i], gemm_atol_(1, k[i], 1, 1, want[i], n[i]),
                              0.0);
        } else if (memcmp(got[i], want[i], n[i] * sizeof(float)) != 0) {
            fprintf(stderr, "  %s: not the bits of the weights converted per op\n", name);
            ok = 0;
        }
        free(want[i]), free(got[i]);
    }
    return ok ? (long long)conv : -1;
}

static void test_weight_copy(void) {
    const Ops *o = ops_cuda();
    WcCase c;
    st_offsets_(c.off, wc_rows_);
    c.R = c.off[ST_E];
    c.rc = (size_t)c.R * ST_C, c.ro = (size_t)c.R * ST_OC, c.ew = (size_t)ST_E * ST_OC * ST_C;
    c.wd = (size_t)ST_OC * ST_C + 16;
    c.n = c.wd + 2 * c.ew; // 78352: block 0 whole, block 1 in part
    const size_t n = c.n, b1 = n - WC_BLOCK;
    float *inp = tcu_host_rand(c.rc, 9200, 1.0f), *dout = tcu_host_rand(c.ro, 9201, 1.0f);
    float *dinp0 = tcu_host_rand(c.rc, 9202, 0.5f), *dw0 = tcu_host_rand(c.ew, 9203, 0.5f);
    float *hp = tcu_host_rand(n, 9204, 1.0f);
    c.d_inp = tcu_dev_from(inp, c.rc), c.d_dout = tcu_dev_from(dout, c.ro);
    c.d_dinp0 = tcu_dev_from(dinp0, c.rc), c.d_dw0 = tcu_dev_from(dw0, c.ew);
    const size_t nout[WC_OUTS + 1] = {c.ro, c.rc, (size_t)ST_OC * ST_C, c.ro, c.ro, c.rc,
                                      c.ew, c.ew};
    memcpy(c.nout, nout, sizeof nout);
    for (int i = 0; i <= WC_OUTS; i++) c.d_out[i] = cuda_malloc(nout[i] * sizeof(float));
    float *d_p = o->alloc(n * sizeof(float)), *d_ref = cuda_malloc(n * sizeof(float));
    o->to_device(d_p, hp, n * sizeof(float));
    set_mode_(MODE_BF16);
    o->params_register(d_p, n);
    CU_ASSERT_EQUAL(cuda_weight_copy_bytes(), 0); // allocated at its first use

    // first use: every block under the weights read (both) is converted, once
    CU_ASSERT_EQUAL(wc_check_(&c, "first use", d_p, d_ref, 0), (long long)n);
    CU_ASSERT_EQUAL(cuda_weight_copy_bytes(), n * 2);
    CU_ASSERT_EQUAL(wc_check_(&c, "valid", d_p, d_ref, 0), 0);
    // the writes through the table, each into one block: that block is converted again
    float *src = tcu_host_rand(c.ew, 9205, 1.0f), *d_src = tcu_dev_from(src, c.ew);
    o->to_device(d_p + n - 10, src, 10 * sizeof(float)); // the last floats of up
    CU_ASSERT_EQUAL(wc_check_(&c, "to_device", d_p, d_ref, 0), (long long)b1);
    o->copy(d_p + 100, d_src, 300 * sizeof(float)); // in the dense weight
    CU_ASSERT_EQUAL(wc_check_(&c, "copy", d_p, d_ref, 0), WC_BLOCK);
    o->zero_fill(d_p + c.wd + 1000, 2000); // in gate
    CU_ASSERT_EQUAL(wc_check_(&c, "zero_fill", d_p, d_ref, 0), WC_BLOCK);
    o->scale_inplace(d_p + WC_BLOCK - 8, 0.5f, 16); // across the two blocks
    CU_ASSERT_EQUAL(wc_check_(&c, "scale_inplace", d_p, d_ref, 0), (long long)n);
    o->zero(d_p + WC_BLOCK + 5, 4); // one float, in bytes
    CU_ASSERT_EQUAL(wc_check_(&c, "zero", d_p, d_ref, 0), (long long)b1);
    // a write outside the table (a collective's), announced
    cuda_memcpy_h2d(d_p + c.wd + c.ew + 7, src, 64 * sizeof(float)); // in up, block 0
    o->params_written(d_p + c.wd + c.ew + 7, 64 * sizeof(float));
    CU_ASSERT_EQUAL(wc_check_(&c, "params_written", d_p, d_ref, 0), WC_BLOCK);

    // AdamW writes the copy as it writes the parameters: over all of them, the copy is valid
    // after it even where it was stale before
    float *g = tcu_host_rand(n, 9206, 1.0f), *d_g = tcu_dev_from(g, n);
    float *d_m = o->alloc(n * sizeof(float)), *d_v = o->alloc(n * sizeof(float));
    o->to_device(d_p, hp, n * sizeof(float)); // all stale
    o->adamw_update(d_p, d_g, d_m, d_v, n, 1e-2f, 0.9f, 0.95f, 1e-8f, 0.1f, 1, 1.0f);
    CU_ASSERT_EQUAL(wc_check_(&c, "adamw, all", d_p, d_ref, 0), 0);
    // per tensor, as optim_step calls it: blocks covered in part keep their state (valid here)
    o->adamw_update(d_p, d_g, d_m, d_v, c.wd - 16, 1e-2f, 0.9f, 0.95f, 1e-8f, 0.1f, 2, 1.0f);
    o->adamw_update(d_p + c.wd, d_g, d_m, d_v, c.ew, 1e-2f, 0.9f, 0.95f, 1e-8f, 0.1f, 2, 1.0f);
    o->adamw_update(d_p + c.wd + c.ew, d_g, d_m, d_v, c.ew, 1e-2f, 0.9f, 0.95f, 1e-8f, 0.1f, 2,
                    1.0f);
    CU_ASSERT_EQUAL(wc_check_(&c, "adamw, per tensor", d_p, d_ref, 0), 0);
    // ... and stale where they were stale: only block 1 is covered whole (to its short end)
    o->to_device(d_p, hp, n * sizeof(float));
    o->adamw_update(d_p + c.wd, d_g, d_m, d_v, 2 * c.ew, 1e-2f, 0.9f, 0.95f, 1e-8f, 0.1f, 3, 1.0f);
    CU_ASSERT_EQUAL(wc_check_(&c, "adamw, part", d_p, d_ref, 0), WC_BLOCK);

    // in chunks of a 48 KiB workspace (the weights no longer take any of it): within the bf16
    // GEMM tolerance of the whole ops on converted weights
    CU_ASSERT_EQUAL(wc_check_(&c, "48 KiB workspace", d_p, d_ref, 1), 0);

    // freeing the parameters forgets them and their copy
    o->free(d_p);
    CU_ASSERT_EQUAL(cuda_weight_copy_bytes(), 0);
    d_p = o->alloc(n * sizeof(float));
    o->to_device(d_p, hp, n * sizeof(float));
    // nothing registered, or the copy switched off: every op converts its weights
    CU_ASSERT_EQUAL(wc_check_(&c, "not registered", d_p, d_ref, 0), 0);
    cuda_set_weight_copy(0);
    o->params_register(d_p, n);
    CU_ASSERT_EQUAL(wc_check_(&c, "switched off", d_p, d_ref, 0), 0);
    CU_ASSERT_EQUAL(cuda_weight_copy_bytes(), 0);
    cuda_set_weight_copy(-1);
    static const EnvCase wcopy[] = {{"0", 0}, {"1", 1}, {"", 1}, {NULL, 1}};
    env_switch_cases_("MOET_CUDA_WEIGHT_COPY", cuda_set_weight_copy, cuda_weight_copy, wcopy, 4);
    // registered again (the setting takes effect there): the copy in use
    o->params_register(d_p, n);
    CU_ASSERT_EQUAL(wc_check_(&c, "registered again", d_p, d_ref, 0), (long long)n);
    o->params_register(NULL, 0);
    CU_ASSERT_EQUAL(cuda_weight_copy_bytes(), 0);

    o->free(d_p), o->free(d_m), o->free(d_v);
    cuda_free(d_ref), cuda_free(d_g), cuda_free(d_src), cuda_free(c.d_inp), cuda_free(c.d_dout);
    cuda_free(c.d_dinp0), cuda_free(c.d_dw0);
    for (int i = 0; i <= WC_OUTS; i++) cuda_free(c.d_out[i]);
    free(inp), free(dout), free(dinp0), free(dw0), free(hp), free(src), free(g);
}

int main(void) {
    if (cuda_gemm_bf16() != 1) {
        fprintf(stderr, "test_cuda_gemm: the GEMM precision must default to bf16 (1)\n");
        return 1;
    }
    if (getenv("MOET_CUDA_ATTN_QBLOCK")) {
        fprintf(stderr, "test_cuda_gemm: unset MOET_CUDA_ATTN_QBLOCK (the tests set the attention "
                        "query blocks themselves)\n");
        return 1;
    }
    if (cuda_gemm_lt() != 1) {
        fprintf(stderr, "test_cuda_gemm: the bf16-operand GEMMs must default to cuBLASLt (1)%s\n",
                getenv("MOET_CUDA_GEMM_LT") ? ": unset MOET_CUDA_GEMM_LT" : "");
        return 1;
    }
    if (cuda_gemm_bf16_operands() != 1) {
        fprintf(stderr, "test_cuda_gemm: the bf16 GEMMs must default to bf16 operands (1)%s\n",
                getenv("MOET_CUDA_GEMM_OPERANDS") ? ": unset MOET_CUDA_GEMM_OPERANDS" : "");
        return 1;
    }
    if (cuda_gemm_streams() != 4) {
        fprintf(stderr, "test_cuda_gemm: the expert GEMMs must default to 4 streams%s\n",
                getenv("MOET_CUDA_GEMM_STREAMS") ? ": unset MOET_CUDA_GEMM_STREAMS" : "");
        return 1;
    }
    if (cuda_attention_flash(128)) {
        fprintf(stderr,
                "test_cuda_gemm: the bf16 attention forward must default to the GEMM "
                "path (the flash kernel is opt-in)%s\n",
                getenv("MOET_CUDA_ATTN_FLASH") ? ": unset MOET_CUDA_ATTN_FLASH" : "");
        return 1;
    }
    if (cuda_weight_copy() != 1) {
        fprintf(stderr, "test_cuda_gemm: the GEMMs must default to the weight copy (1)%s\n",
                getenv("MOET_CUDA_WEIGHT_COPY") ? ": unset MOET_CUDA_WEIGHT_COPY" : "");
        return 1;
    }
    static const TuTest tests[] = {
        {"gemm precision switch", test_gemm_mode},
        {"matmul forward and backward", test_matmul},
        {"grouped matmul forward and backward", test_grouped_matmul},
        {"attention forward and backward", test_attention},
        {"attention in causal query blocks", test_attention_query_blocks},
        {"attention forward as one flash kernel", test_attention_flash},
        {"bf16 operands in chunks of a small workspace", test_workspace_chunks},
        {"bf16 operand workspace: grows by at least doubling", test_workspace_growth},
        {"bf16 operands rounded to nearest even, exactly", test_bf16_operands_exact},
        {"determinism of the GEMM ops", test_determinism},
        {"cuBLASLt algorithms cached per shape class", test_lt_cache},
        {"expert GEMMs on several streams: the same bits", test_gemm_streams},
        {"gate and up as one pair op", test_pair},
        {"the parameters' bf16 copy", test_weight_copy},
    };
    return tcu_main("cuda_gemm", tests, (int)(sizeof tests / sizeof tests[0]));
}
