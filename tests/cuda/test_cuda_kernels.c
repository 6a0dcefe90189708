// test_cuda_kernels: every op of kernels/cuda/basic.cu against the CPU op of the same name in
// kernels.h (the reference), forward and backward, plus the bf16 casts and run-to-run
// determinism. Exits 77 (ctest "skipped") where no CUDA device exists; never passes without one.
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/cuda/kernels_cuda.h"
#include "kernels/kernels.h"
#include "tests/cuda/cudatest.h"
#include "tests/testutil.h"

// Tolerances. The CUDA ops compute the same formulas as the CPU ops in fp32; what differs is
// the summation order (warp and block trees vs loops, double on the CPU), fused multiply-adds,
// and the device's expf / rsqrtf / division (a few ulp; the build uses --use_fast_math). Each
// of those costs a few units of 2^-24 ~ 6e-8 per operation, and the reductions here (D <= 2048
// terms, N <= 3000 rows) grow that to ~1e-6 in the worst case, so RTOL = 1e-5 leaves a
// margin of ~10x while any wrong index, missing term or wrong constant shows up as O(1e-2) or
// more. Where results can cancel (dx = a - b in RMSNorm, sums of mixed-sign terms, silu' near
// its zero) the error is relative to the size of the terms, not of the result, so each check
// also allows ATOL_FRAC * max|want| absolutely.
#define RTOL      1e-5
#define ATOL_FRAC 1e-6
// Sums of squares are squared and accumulated in double on both sides: only the order of the
// additions differs (~n * 2^-53 relative). 1e-7 would even tolerate a CPU that squares in fp32.
#define RTOL_SUMSQ 1e-7

// ---------------------------------------------------------------------------------------
// Helpers

// ---------------------------------------------------------------------------------------
// RMSNorm

static void rmsnorm_forward_case_(int N, int D, uint64_t seed) {
    const size_t nd = (size_t)N * D;
    const float eps = 1e-5f;
    float *x = tcu_host_rand(nd, seed, 2.0f), *w = tcu_host_rand(D, seed + 1, 0.5f);
    for (int j = 0; j < D; j++) w[j] += 1.0f;
    float *out = tcu_host_alloc(nd), *rstd = tcu_host_alloc(N);
    rmsnorm_forward(out, rstd, x, w, N, D, eps);

    float *d_x = tcu_dev_from(x, nd), *d_w = tcu_dev_from(w, D);
    float *d_out = cuda_malloc(nd * sizeof(float)), *d_rstd = cuda_malloc(N * sizeof(float));
    cuda_rmsnorm_forward(d_out, d_rstd, d_x, d_w, N, D, eps);
    CU_ASSERT_TRUE(tcu_check("rmsnorm_forward out", d_out, out, nd, RTOL, ATOL_FRAC));
    CU_ASSERT_TRUE(tcu_check("rmsnorm_forward rstd", d_rstd, rstd, N, RTOL, 0.0));

    // in place (out aliases x), rstd not saved
    cuda_rmsnorm_forward(d_x, NULL, d_x, d_w, N, D, eps);
    CU_ASSERT_TRUE(tcu_check("rmsnorm_forward in place", d_x, out, nd, RTOL, ATOL_FRAC));

    cuda_free(d_x), cuda_free(d_w), cuda_free(d_out), cuda_free(d_rstd);
    free(x), free(w), free(out), free(rstd);
}

static void test_rmsnorm_forward(void) {
    static const int shapes[][2] = {{1, 1}, {3, 7}, {64, 256}, {33, 1000}, {8, 2048}};
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++)
        rmsnorm_forward_case_(shapes[s][0], shapes[s][1], 100 + 10 * s);
}

// Backward with gradients pre-filled with random values (backward must accumulate), for the
// gradient outputs selected by with_dx / with_dw (the other is NULL).
static void rmsnorm_backward_case_(int N, int D, int with_dx, int with_dw, uint64_t seed) {
    const size_t nd = (size_t)N * D;
    float *x = tcu_host_rand(nd, seed, 2.0f), *w = tcu_host_rand(D, seed + 1, 0.5f);
    for (int j = 0; j < D; j++) w[j] += 1.0f;
    float *dout = tcu_host_rand(nd, seed + 2, 1.0f);
    float *dx0 = tcu_host_rand(nd, seed + 3, 0.5f), *dw0 = tcu_host_rand(D, seed + 4, 0.5f);
    float *out = tcu_host_alloc(nd), *rstd = tcu_host_alloc(N);
    rmsnorm_forward(out, rstd, x, w, N, D, 1e-5f); // both backends get the same rstd
    float *want_dx = tcu_host_copy(dx0, nd), *want_dw = tcu_host_copy(dw0, D);
    rmsnorm_backward(with_dx ? want_dx : NULL, with_dw ? want_dw : NULL, dout, x, w, rstd, N, D);

    float *d_x = tcu_dev_from(x, nd), *d_w = tcu_dev_from(w, D), *d_dout = tcu_dev_from(dout, nd);
    float *d_rstd = tcu_dev_from(rstd, N), *d_dx = tcu_dev_from(dx0, nd),
          *d_dw = tcu_dev_from(dw0, D);
    void *scratch = with_dw ? cuda_malloc(cuda_rmsnorm_backward_scratch_bytes(N, D)) : NULL;
    cuda_rmsnorm_backward(with_dx ? d_dx : NULL, with_dw ? d_dw : NULL, d_dout, d_x, d_w, d_rstd, N,
                          D, scratch);
    CU_ASSERT_TRUE(tcu_check("rmsnorm_backward dx", d_dx, want_dx, nd, RTOL, ATOL_FRAC));
    CU_ASSERT_TRUE(tcu_check("rmsnorm_backward dw", d_dw, want_dw, D, RTOL, ATOL_FRAC));

    cuda_free(d_x), cuda_free(d_w), cuda_free(d_dout), cuda_free(d_rstd), cuda_free(d_dx);
    cuda_free(d_dw), cuda_free(scratch);
    free(x), free(w), free(dout), free(dx0), free(dw0), free(out), free(rstd), free(want_dx);
    free(want_dw);
}

static void test_rmsnorm_backward(void) {
    // 1100 and 3000 rows exceed the 1024 row groups of the dw reduction: groups of 2-3 rows
    static const int shapes[][2] = {{1, 1}, {3, 7}, {64, 256}, {1100, 96}, {3000, 33}, {40, 2048}};
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++)
        rmsnorm_backward_case_(shapes[s][0], shapes[s][1], 1, 1, 200 + 10 * s);
    rmsnorm_backward_case_(50, 300, 1, 0, 300); // dw NULL
    rmsnorm_backward_case_(50, 300, 0, 1, 310); // dx NULL
}

// ---------------------------------------------------------------------------------------
// SwiGLU

static void swiglu_case_(size_t n, int with_dg, int with_du, uint64_t seed) {
    // g in [-8, 8) covers both saturated ends of the sigmoid and the zero of silu' (g ~ -1.28)
    float *g = tcu_host_rand(n, seed, 8.0f), *u = tcu_host_rand(n, seed + 1, 2.0f);
    float *dout = tcu_host_rand(n, seed + 2, 1.0f);
    // gradients pre-filled: the CPU op writes over them (kernels.h), so must the GPU op; a NULL
    // output's buffer stays as it was on both sides
    float *dg0 = tcu_host_rand(n, seed + 3, 0.5f), *du0 = tcu_host_rand(n, seed + 4, 0.5f);
    float *out = tcu_host_alloc(n);
    swiglu_forward(out, g, u, n);
    float *want_dg = tcu_host_copy(dg0, n), *want_du = tcu_host_copy(du0, n);
    swiglu_backward(with_dg ? want_dg : NULL, with_du ? want_du : NULL, dout, g, u, n);

    float *d_g = tcu_dev_from(g, n), *d_u = tcu_dev_from(u, n), *d_dout = tcu_dev_from(dout, n);
    float *d_out = cuda_malloc(n * sizeof(float));
    float *d_dg = tcu_dev_from(dg0, n), *d_du = tcu_dev_from(du0, n);
    cuda_swiglu_forward(d_out, d_g, d_u, n);
    CU_ASSERT_TRUE(tcu_check("swiglu_forward", d_out, out, n, RTOL, ATOL_FRAC));
    cuda_swiglu_backward(with_dg ? d_dg : NULL, with_du ? d_du : NULL, d_dout, d_g, d_u, n);
    CU_ASSERT_TRUE(tcu_check("swiglu_backward dg", d_dg, want_dg, n, RTOL, ATOL_FRAC));
    CU_ASSERT_TRUE(tcu_check("swiglu_backward du", d_du, want_du, n, RTOL, ATOL_FRAC));

    cuda_free(d_g), cuda_free(d_u), cuda_free(d_dout), cuda_free(d_out), cuda_free(d_dg);
    cuda_free(d_du);
    free(g), free(u), free(dout), free(dg0), free(du0), free(out), free(want_dg), free(want_du);
}

static void test_swiglu(void) {
    static const size_t sizes[] = {1, 1000, 100003};
    for (size_t s = 0; s < sizeof sizes / sizeof sizes[0]; s++)
        swiglu_case_(sizes[s], 1, 1, 400 + 10 * s);
    swiglu_case_(5000, 1, 0, 450); // du NULL
    swiglu_case_(5000, 0, 1, 460); // dg NULL
}

// ---------------------------------------------------------------------------------------
// Residual add: one rounded addition on both sides, so the results must be identical.

static void test_add(void) {
    static const size_t sizes[] = {1, 1000, 100003};
    for (size_t s = 0; s < sizeof sizes / sizeof sizes[0]; s++) {
        size_t n = sizes[s];
        float *a = tcu_host_rand(n, 500 + 10 * s, 3.0f), *b = tcu_host_rand(n, 501 + 10 * s, 3.0f);
        float *out = tcu_host_alloc(n);
        add_forward(out, a, b, n);
        float *d_a = tcu_dev_from(a, n), *d_b = tcu_dev_from(b, n);
        float *d_out = cuda_malloc(n * sizeof(float));
        cuda_add_forward(d_out, d_a, d_b, n);
        CU_ASSERT_TRUE(tcu_check("add_forward", d_out, out, n, 0.0, 0.0));
        cuda_add_forward(d_a, d_a, d_b, n); // out aliases a, as in x = x + attn(x)
        CU_ASSERT_TRUE(tcu_check("add_forward in place", d_a, out, n, 0.0, 0.0));
        cuda_free(d_a), cuda_free(d_b), cuda_free(d_out);
        free(a), free(b), free(out);
    }
}

// ---------------------------------------------------------------------------------------
// AdamW: three steps from zero moments, so that the bias corrections change between steps.

static void test_adamw(void) {
    const size_t n = 100003;
    const float lr = 3e-3f, b1 = 0.9f, b2 = 0.95f, eps = 1e-8f, wd = 0.1f, grad_scale = 0.5f;
    float *p = tcu_host_rand(n, 600, 1.0f), *m = tcu_host_alloc(n), *v = tcu_host_alloc(n);
    memset(m, 0, n * sizeof *m);
    memset(v, 0, n * sizeof *v);
    float *d_p = tcu_dev_from(p, n), *d_m = tcu_dev_from(m, n), *d_v = tcu_dev_from(v, n);
    float *d_grad = cuda_malloc(n * sizeof(float));
    for (int t = 1; t <= 3; t++) {
        float *grad = tcu_host_rand(n, 610 + (uint64_t)t, 2.0f);
        adamw_update(p, grad, m, v, n, lr, b1, b2, eps, wd, t, grad_scale);
        cuda_memcpy_h2d(d_grad, grad, n * sizeof(float));
        cuda_adamw_update(d_p, d_grad, d_m, d_v, n, lr, b1, b2, eps, wd, t, grad_scale);
        CU_ASSERT_TRUE(tcu_check("adamw_update p", d_p, p, n, RTOL, ATOL_FRAC));
        CU_ASSERT_TRUE(tcu_check("adamw_update m", d_m, m, n, RTOL, ATOL_FRAC));
        CU_ASSERT_TRUE(tcu_check("adamw_update v", d_v, v, n, RTOL, ATOL_FRAC));
        free(grad);
    }
    cuda_free(d_p), cuda_free(d_m), cuda_free(d_v), cuda_free(d_grad);
    free(p), free(m), free(v);
}

// ---------------------------------------------------------------------------------------
// Sum of squares

static void test_sum_squares(void) {
    // 3000001 elements fill all 1024 blocks of the first pass with a grid-stride share
    static const size_t sizes[] = {0, 1, 2, 5, 7, 100003, 3000001};
    for (size_t s = 0; s < sizeof sizes / sizeof sizes[0]; s++) {
        size_t n = sizes[s];
        float *x = tcu_host_rand(n, 700 + 10 * s, 3.0f);
        double want = sum_squares(x, n);
        float *d_x = tcu_dev_from(x, n);
        void *scratch = cuda_malloc(cuda_sum_squares_scratch_bytes(n));
        double got = cuda_sum_squares(d_x, n, scratch);
        if (!(fabs(got - want) <= RTOL_SUMSQ * fabs(want)))
            fprintf(stderr, "  sum_squares n=%zu: got %.17g want %.17g\n", n, got, want);
        CU_ASSERT_TRUE(fabs(got - want) <= RTOL_SUMSQ * fabs(want));
        // from o floats past the start and `cut` short of the end (a tensor inside the
        // gradients: whatever the allocation's alignment, some of these start and end between
        // 16-byte boundaries): the kernel's head and tail, taken one by one around the quads
        for (size_t o = 0; o <= 3; o++)
            for (size_t cut = 0; cut <= 3; cut++) {
                if (o + cut == 0 || o + cut > n) continue;
                const size_t m = n - o - cut;
                const double w = sum_squares(x + o, m);
                const double g = cuda_sum_squares(d_x + o, m, scratch);
                if (!(fabs(g - w) <= RTOL_SUMSQ * fabs(w)))
                    fprintf(stderr, "  sum_squares of x[%zu, %zu): got %.17g want %.17g\n", o,
                            o + m, g, w);
                CU_ASSERT_TRUE(fabs(g - w) <= RTOL_SUMSQ * fabs(w));
            }
        cuda_free(d_x), cuda_free(scratch);
        free(x);
    }
}

// ---------------------------------------------------------------------------------------
// bf16 casts

static uint32_t f32_bits_(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

// The bf16 bits of f rounded to nearest even (the reference for finite values).
static uint16_t bf16_rne_(float f) {
    uint32_t u = f32_bits_(f);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static int bf16_is_nan_(uint16_t b) {
    return (b & 0x7fffu) > 0x7f80u;
}

static void test_bf16_roundtrip(void) {
    // Random signs and magnitudes 2^-30 .. 2^30 (normal in both formats; subnormals excluded),
    // then the special cases: zeros, exact ties (to even: down, then up), the largest float
    // (rounds to inf), infinities and NaN.
    enum { NRAND = 100000, NSPECIAL = 9 };
    const size_t n = NRAND + NSPECIAL;
    float *x = tcu_host_rand(n, 800, 1.0f);
    uint64_t state = 801;
    for (size_t i = 0; i < NRAND; i++) x[i] = ldexpf(x[i], (int)(tu_rand_u64(&state) % 61) - 30);
    const uint32_t special[NSPECIAL] = {0x00000000u, 0x80000000u, 0x3f808000u,
                                        0x3f818000u, 0x7f7fffffu, 0x7f800000u,
                                        0xff800000u, 0x7fc00000u, 0xbf7fffffu};
    for (int k = 0; k < NSPECIAL; k++) memcpy(&x[NRAND + k], &special[k], sizeof(float));

    float *d_x = tcu_dev_from(x, n), *d_back = cuda_malloc(n * sizeof(float));
    uint16_t *d_bf = cuda_malloc(n * sizeof(uint16_t));
    cuda_f32_to_bf16(d_bf, d_x, n);
    cuda_bf16_to_f32(d_back, d_bf, n);
    uint16_t *bf = malloc(n * sizeof *bf);
    float *back = tcu_host_from(d_back, n);
    cuda_memcpy_d2h(bf, d_bf, n * sizeof *bf);

    size_t bad_bits = 0, bad_rel = 0, bad_back = 0;
    for (size_t i = 0; i < n; i++) {
        uint16_t want = bf16_rne_(x[i]);
        int nan_in = isnan(x[i]);
        if (nan_in ? !bf16_is_nan_(bf[i]) : bf[i] != want) {
            if (bad_bits++ < 5)
                fprintf(stderr, "  f32_to_bf16 [%zu] %.9g (0x%08x): got 0x%04x want 0x%04x\n", i,
                        (double)x[i], (unsigned)f32_bits_(x[i]), bf[i], want);
        }
        // bf16 -> fp32 must be exact: the bf16 bits followed by 16 zero bits
        if (nan_in ? !isnan(back[i]) : f32_bits_(back[i]) != ((uint32_t)bf[i] << 16)) bad_back++;
        // the round trip of a finite value within range is within half a bf16 ulp: 2^-8 relative
        if (isfinite(x[i]) && isfinite(back[i]) &&
            !(fabs((double)back[i] - (double)x[i]) <= ldexp(1.0, -8) * fabs((double)x[i])))
            bad_rel++;
    }
    if (bad_bits || bad_back || bad_rel)
        fprintf(stderr,
                "  bf16: %zu wrong roundings, %zu inexact widenings, %zu round trips "
                "beyond 2^-8 relative (of %zu)\n",
                bad_bits, bad_back, bad_rel, n);
    CU_ASSERT_EQUAL(bad_bits, 0);
    CU_ASSERT_EQUAL(bad_back, 0);
    CU_ASSERT_EQUAL(bad_rel, 0);
    CU_ASSERT_TRUE(isinf(back[NRAND + 4]) && back[NRAND + 4] > 0); // FLT_MAX -> +inf

    cuda_free(d_x), cuda_free(d_back), cuda_free(d_bf);
    free(x), free(bf), free(back);
}

// ---------------------------------------------------------------------------------------
// Determinism: the reductions must give the same bits on every run.

static void test_determinism(void) {
    const int N = 3000, D = 384;
    const size_t nd = (size_t)N * D;
    float *x = tcu_host_rand(nd, 900, 2.0f), *w = tcu_host_rand(D, 901, 1.0f);
    float *dout = tcu_host_rand(nd, 902, 1.0f), *rstd = tcu_host_rand(N, 903, 1.0f);
    for (int i = 0; i < N; i++) rstd[i] = 1.0f + fabsf(rstd[i]);
    float *d_x = tcu_dev_from(x, nd), *d_w = tcu_dev_from(w, D), *d_dout = tcu_dev_from(dout, nd);
    float *d_rstd = tcu_dev_from(rstd, N);
    float *d_dx = cuda_malloc(nd * sizeof(float)), *d_dw = cuda_malloc(D * sizeof(float));
    void *scratch = cuda_malloc(cuda_rmsnorm_backward_scratch_bytes(N, D));
    void *ss_scratch = cuda_malloc(cuda_sum_squares_scratch_bytes(nd));
    float *dx[2], *dw[2];
    double ss[2];
    for (int r = 0; r < 2; r++) {
        cuda_zero(d_dx, nd * sizeof(float));
        cuda_zero(d_dw, D * sizeof(float));
        cuda_rmsnorm_backward(d_dx, d_dw, d_dout, d_x, d_w, d_rstd, N, D, scratch);
        dx[r] = tcu_host_from(d_dx, nd);
        dw[r] = tcu_host_from(d_dw, D);
        ss[r] = cuda_sum_squares(d_dx, nd, ss_scratch);
    }
    CU_ASSERT_EQUAL(memcmp(dx[0], dx[1], nd * sizeof(float)), 0);
    CU_ASSERT_EQUAL(memcmp(dw[0], dw[1], D * sizeof(float)), 0);
    CU_ASSERT_EQUAL(memcmp(&ss[0], &ss[1], sizeof(double)), 0);

    cuda_free(d_x), cuda_free(d_w), cuda_free(d_dout), cuda_free(d_rstd), cuda_free(d_dx);
    cuda_free(d_dw), cuda_free(scratch), cuda_free(ss_scratch);
    for (int r = 0; r < 2; r++) free(dx[r]), free(dw[r]);
    free(x), free(w), free(dout), free(rstd);
}

int main(void) {
    static const TuTest tests[] = {
        {"rmsnorm_forward", test_rmsnorm_forward},
        {"rmsnorm_backward", test_rmsnorm_backward},
        {"swiglu forward and backward", test_swiglu},
        {"add_forward", test_add},
        {"adamw_update", test_adamw},
        {"sum_squares", test_sum_squares},
        {"bf16 round trip", test_bf16_roundtrip},
        {"determinism of the reductions", test_determinism},
    };
    return tcu_main("cuda_kernels", tests, (int)(sizeof tests / sizeof tests[0]));
}
