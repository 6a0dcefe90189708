// test_cuda_moe_ops: every op of kernels/cuda/ops.cu (embedding, RoPE, router and its
// auxiliary sums, dispatch plan, permute / unpermute, cross-entropy) against the CPU op of the
// same name in kernels.h (the reference), forward and backward, plus run-to-run determinism.
// Exits 77 (ctest "skipped") where no CUDA device exists; never passes without one.
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/cuda/kernels_cuda.h"
#include "kernels/kernels.h"
#include "tests/cuda/cudatest.h"
#include "tests/testutil.h"

// Tolerances: what may differ between the two backends, op by op.
// - Exact (0): copies (embedding and permute forward), integer outputs (top-k indices, the
//   dispatch plan), and the ops that are pure sequences of fp32 additions done in the CPU's
//   order (embedding backward, permute backward): IEEE addition is correctly rounded, so the
//   same additions in the same order give the same bits on any device.
// - RoPE: the inverse frequencies are the host's (same expression, same libm) and the angle is
//   one double multiply on both sides; only cos / sin differ (CUDA's double versions are within
//   2 ulp of double, the CPU's within 1), which changes the float c or s by 1 ulp (6e-8
//   relative) in the rare case the double value sits next to a float rounding boundary. The
//   products and sums are unfused on both sides. An error of 1 ulp of c or s is at most
//   6e-8 * max|x|, so 1e-6 (relative and as a fraction of the largest output) is a 16x margin.
// - Router forward: the softmax is computed in double on both sides and rounded to float once;
//   the double sum's order and the device's exp / log (1-2 ulp of double) change the double
//   results by ~1e-15 relative, so each float output differs by at most 1 ulp (1.2e-7), and the
//   renormalised weights by 2. RTOL 1e-6 is an 8x margin; lse can be near 0, so also 1e-7 of
//   the largest |lse| absolutely.
// - Router backward, unpermute forward / backward: double formulas (or the same fp32 operations
//   as the CPU, unfused) rounded to float, then one fp32 addition into a pre-filled gradient:
//   1 ulp of the term plus 1 ulp of the sum, and up to K ulp where K terms are combined (or
//   where a host compiler fuses multiply-adds, as clang would). The sum can cancel against the
//   pre-filled value, so the bound is relative to the largest output: 1e-6 of it, with
//   RTOL 1e-6, is a margin of 8x at K = 8.
// - Router auxiliary sums: doubles of floats summed in another order: n * 2^-53 ~ 1e-13
//   relative at n = 5000, checked at 1e-12.
// - Cross-entropy: the build uses --use_fast_math, so expf is __expf, whose error is
//   2 + floor(1.173 |x|) ulp: 11 ulp (1.3e-6) at x = -8, the lowest x - max with logits in
//   [-4, 4). The sum of the exps (double on both sides) is then off by at most 1.3e-6
//   relative, log(sum) by 1.3e-6 absolutely, a loss of ~10.8 (log 50304) by 1.3e-7 relative;
//   a gradient element, exp * scale / sum, by at most 2.7e-6. RTOL 1e-5 for both keeps a 4x
//   margin on the gradient; any wrong index, missing term or wrong constant is O(1e-2) or
//   more. The summed loss is a sum of positive row losses: 1e-6 relative.
#define RTOL_ROPE         1e-6
#define ATOL_FRAC_ROPE    1e-6
#define RTOL_ROUTER       1e-6
#define ATOL_FRAC_ROUTER  1e-7
#define RTOL_COMBINE      1e-6
#define ATOL_FRAC_COMBINE 1e-6
#define RTOL_SUM64        1e-12
#define RTOL_CE           1e-5
#define ATOL_FRAC_CE      1e-6
#define RTOL_CE_SUM       1e-6

// ---------------------------------------------------------------------------------------
// Helpers

static int32_t *dev_i32_from_(const int32_t *h, size_t n) {
    int32_t *d = cuda_malloc(n * sizeof *d);
    cuda_memcpy_h2d(d, h, n * sizeof *d);
    return d;
}

// Integer outputs must be equal element for element.
static int check_i32_(const char *name, const int32_t *d_got, const int32_t *want, size_t n) {
    int32_t *got = tcu_xmalloc(n * sizeof *got);
    cuda_memcpy_d2h(got, d_got, n * sizeof *got);
    size_t bad = 0;
    for (size_t i = 0; i < n; i++) {
        if (got[i] == want[i]) continue;
        if (bad++ < 5)
            fprintf(stderr, "  %s [%zu]: got %d want %d\n", name, i, (int)got[i], (int)want[i]);
    }
    if (bad) fprintf(stderr, "  %s: %zu of %zu differ\n", name, bad, n);
    free(got);
    return bad == 0;
}

// Bitwise equality of two host buffers (the determinism checks).
static int same_bits_(const char *name, const void *a, const void *b, size_t bytes) {
    if (memcmp(a, b, bytes) == 0) return 1;
    fprintf(stderr, "  %s: two runs gave different bits\n", name);
    return 0;
}

static int check_f64_(const char *name, double got, double want, double rtol) {
    if (fabs(got - want) <= rtol * fabs(want)) return 1;
    fprintf(stderr, "  %s: got %.17g want %.17g (rtol %.1e)\n", name, got, want, rtol);
    return 0;
}

// ---------------------------------------------------------------------------------------
// Embedding

// tokens drawn from [0, n_ids) spread over [0, V) (n_ids small: many repeats), plus the two
// ends of the vocabulary
static int32_t *make_tokens_(int N, int V, int n_ids, uint64_t seed) {
    int32_t *tok = tcu_xmalloc((size_t)N * sizeof *tok);
    uint64_t s = seed;
    for (int i = 0; i < N; i++) {
        const uint64_t id = tu_rand_u64(&s) % (uint64_t)n_ids;
        tok[i] = (int32_t)(id * (uint64_t)(V - 1) / (uint64_t)(n_ids > 1 ? n_ids - 1 : 1));
    }
    if (N > 2) tok[1] = 0, tok[N - 1] = V - 1;
    return tok;
}

static void embedding_case_(int N, int D, int V, int n_ids, uint64_t seed) {
    const size_t nd = (size_t)N * D, vd = (size_t)V * D;
    int32_t *tok = make_tokens_(N, V, n_ids, seed);
    float *wte = tcu_host_rand(vd, seed + 1, 1.0f), *dout = tcu_host_rand(nd, seed + 2, 1.0f);
    float *dwte0 = tcu_host_rand(vd, seed + 3, 0.5f); // pre-filled: backward must accumulate
    float *out = tcu_host_alloc(nd), *want_dwte = tcu_host_copy(dwte0, vd);
    embedding_forward(out, tok, wte, N, D);
    embedding_backward(want_dwte, dout, tok, N, D);

    int32_t *d_tok = dev_i32_from_(tok, N);
    float *d_wte = tcu_dev_from(wte, vd), *d_dout = tcu_dev_from(dout, nd);
    float *d_out = cuda_malloc(nd * sizeof(float)), *d_dwte = tcu_dev_from(dwte0, vd);
    void *scratch = cuda_malloc(cuda_embedding_backward_scratch_bytes(N));
    cuda_embedding_forward(d_out, d_tok, d_wte, N, D);
    CU_ASSERT_TRUE(tcu_check("embedding_forward", d_out, out, nd, 0.0, 0.0));
    cuda_embedding_backward(d_dwte, d_dout, tok, N, D, scratch); // tokens from the HOST
    CU_ASSERT_TRUE(tcu_check("embedding_backward", d_dwte, want_dwte, vd, 0.0, 0.0));

    cuda_free(d_tok), cuda_free(d_wte), cuda_free(d_dout), cuda_free(d_out), cuda_free(d_dwte);
    cuda_free(scratch);
    free(tok), free(wte), free(dout), free(dwte0), free(out), free(want_dwte);
}

static void test_embedding(void) {
    embedding_case_(1, 1, 1, 1, 1000);
    embedding_case_(37, 48, 50304, 50304, 1010); // mostly distinct ids, 2 radix passes
    embedding_case_(300, 2048, 512, 23, 1020);   // 23 ids: every one repeats ~13 times
    embedding_case_(1000, 8, 70000, 40, 1030);   // ids above 65535: 3 radix passes
    embedding_case_(300, 48, 1000, 1, 1040);     // all but the last position hold id 0
}

// ---------------------------------------------------------------------------------------
// RoPE

static void rope_case_(int B, int T, int H, int Dh, float theta, uint64_t seed) {
    const size_t n = (size_t)B * T * H * Dh;
    float *x = tcu_host_rand(n, seed, 2.0f), *dout = tcu_host_rand(n, seed + 1, 1.0f);
    float *dx0 = tcu_host_rand(n, seed + 2, 0.5f); // written over by backward (kernels.h)
    float *out = tcu_host_alloc(n), *want_dx = tcu_host_copy(dx0, n);
    rope_forward(out, x, B, T, H, Dh, theta);
    rope_backward(want_dx, dout, B, T, H, Dh, theta);

    float *d_x = tcu_dev_from(x, n), *d_out = cuda_malloc(n * sizeof(float));
    float *d_dout = tcu_dev_from(dout, n), *d_dx = tcu_dev_from(dx0, n);
    cuda_rope_forward(d_out, d_x, B, T, H, Dh, theta);
    CU_ASSERT_TRUE(tcu_check("rope_forward", d_out, out, n, RTOL_ROPE, ATOL_FRAC_ROPE));
    cuda_rope_forward(d_x, d_x, B, T, H, Dh, theta); // in place, as the model applies it to q, k
    CU_ASSERT_TRUE(tcu_check("rope_forward in place", d_x, out, n, RTOL_ROPE, ATOL_FRAC_ROPE));
    cuda_rope_backward(d_dx, d_dout, B, T, H, Dh, theta);
    CU_ASSERT_TRUE(tcu_check("rope_backward", d_dx, want_dx, n, RTOL_ROPE, ATOL_FRAC_ROPE));
    cuda_rope_backward(d_dout, d_dout, B, T, H, Dh, theta); // in place
    CU_ASSERT_TRUE(
        tcu_check("rope_backward in place", d_dout, want_dx, n, RTOL_ROPE, ATOL_FRAC_ROPE));

    cuda_free(d_x), cuda_free(d_out), cuda_free(d_dout), cuda_free(d_dx);
    free(x), free(dout), free(dx0), free(out), free(want_dx);
}

// Generation: T rows at positions pos0 .. against the CPU op, and (on the CPU) against the rows
// pos0 .. of rope_forward over the whole sequence, which must be the same rotation.
static void rope_at_case_(int T, int H, int Dh, float theta, int pos0, uint64_t seed) {
    const int Tall = pos0 + T;
    const size_t n = (size_t)T * H * Dh, nall = (size_t)Tall * H * Dh;
    float *xall = tcu_host_rand(nall, seed, 2.0f), *outall = tcu_host_alloc(nall);
    rope_forward(outall, xall, 1, Tall, H, Dh, theta);
    const float *x = xall + (nall - n);
    float *out = tcu_host_alloc(n);
    rope_forward_at(out, x, T, H, Dh, theta, pos0);
    CU_ASSERT_TRUE(memcmp(out, outall + (nall - n), n * sizeof(float)) == 0);
    float *d_x = tcu_dev_from(x, n), *d_out = cuda_malloc(n * sizeof(float));
    cuda_rope_forward_at(d_out, d_x, T, H, Dh, theta, pos0);
    CU_ASSERT_TRUE(tcu_check("rope_forward_at", d_out, out, n, RTOL_ROPE, ATOL_FRAC_ROPE));
    cuda_free(d_x), cuda_free(d_out);
    free(xall), free(outall), free(out);
}

static void test_rope(void) {
    rope_at_case_(1, 3, 48, 10000.0f, 4000, 1150);
    rope_at_case_(9, 2, 64, 500000.0f, 17, 1160);
    rope_case_(1, 1, 1, 2, 10000.0f, 1100);
    rope_case_(2, 37, 3, 48, 10000.0f, 1110);
    rope_case_(3, 5, 2, 6, 500000.0f, 1120);
    rope_case_(1, 4096, 2, 128, 10000.0f, 1130); // angles up to 4095 radians
    rope_case_(2, 300, 4, 64, 1000000.0f, 1140);
}

// ---------------------------------------------------------------------------------------
// Router

// Logits in [-2, 2) with ties: rows t % 5 == 0 are constant (every expert ties), rows
// t % 5 == 1 have three experts tied at the top, rows t % 5 == 2 have two pairs of equal values.
static float *make_router_logits_(int N, int E, uint64_t seed) {
    float *l = tcu_host_rand((size_t)N * E, seed, 2.0f);
    for (int t = 0; t < N; t++) {
        float *r = l + (size_t)t * E;
        if (t % 5 == 0) {
            for (int e = 0; e < E; e++) r[e] = 0.25f;
        } else if (t % 5 == 1 && E >= 4) {
            r[E - 1] = r[E / 2] = r[1] = 2.5f;
        } else if (t % 5 == 2 && E >= 4) {
            r[0] = r[E - 2];
            r[2] = r[E - 1];
        }
    }
    return l;
}

typedef struct {
    float *probs, *lse, *topk_w;
    int32_t *topk_idx;
} RouterOut;

// The CPU router with every option: bias (E) or NULL, score_fn ROUTER_SOFTMAX / ROUTER_SIGMOID.
static RouterOut router_cpu_ext_(const float *logits, const float *bias, int N, int E, int K,
                                 int norm_topk, int score_fn) {
    RouterOut r;
    r.probs = tcu_host_alloc((size_t)N * E);
    r.lse = tcu_host_alloc(N);
    r.topk_w = tcu_host_alloc((size_t)N * K);
    r.topk_idx = tcu_xmalloc((size_t)N * K * sizeof(int32_t));
    router_forward(r.probs, r.lse, r.topk_idx, r.topk_w, logits, bias, N, E, K, norm_topk,
                   score_fn);
    return r;
}

static RouterOut router_cpu_(const float *logits, int N, int E, int K, int norm_topk) {
    return router_cpu_ext_(logits, NULL, N, E, K, norm_topk, ROUTER_SOFTMAX);
}

static void router_free_(RouterOut *r) {
    free(r->probs), free(r->lse), free(r->topk_w), free(r->topk_idx);
}

static void router_forward_case_(int N, int E, int K, int norm_topk, uint64_t seed) {
    const size_t ne = (size_t)N * E, nk = (size_t)N * K;
    float *logits = make_router_logits_(N, E, seed);
    RouterOut want = router_cpu_(logits, N, E, K, norm_topk);

    float *d_logits = tcu_dev_from(logits, ne);
    float *d_probs = cuda_malloc(ne * sizeof(float)), *d_lse = cuda_malloc(N * sizeof(float));
    float *d_w = cuda_malloc(nk * sizeof(float));
    int32_t *d_idx = cuda_malloc(nk * sizeof(int32_t));
    cuda_router_forward(d_probs, d_lse, d_idx, d_w, d_logits, N, E, K, norm_topk);
    CU_ASSERT_TRUE(check_i32_("router_forward topk_idx", d_idx, want.topk_idx, nk));
    CU_ASSERT_TRUE(tcu_check("router_forward probs", d_probs, want.probs, ne, RTOL_ROUTER, 0.0));
    CU_ASSERT_TRUE(
        tcu_check("router_forward lse", d_lse, want.lse, N, RTOL_ROUTER, ATOL_FRAC_ROUTER));
    CU_ASSERT_TRUE(tcu_check("router_forward topk_w", d_w, want.topk_w, nk, RTOL_ROUTER, 0.0));

    cuda_free(d_logits), cuda_free(d_probs), cuda_free(d_lse), cuda_free(d_w), cuda_free(d_idx);
    router_free_(&want);
    free(logits);
}

static const int router_shapes_[][3] = { // N, E, K
    {1, 1, 1},    {37, 1, 1},   {37, 8, 2},    {300, 8, 8}, {300, 64, 1},
    {300, 64, 8}, {37, 64, 64}, {300, 256, 8}, {300, 33, 2}};

static void test_router_forward(void) {
    for (size_t s = 0; s < sizeof router_shapes_ / sizeof router_shapes_[0]; s++)
        for (int norm = 0; norm <= 1; norm++)
            router_forward_case_(router_shapes_[s][0], router_shapes_[s][1], router_shapes_[s][2],
                                 norm, 1200 + 10 * s + norm);
}

// Both backends get the CPU's forward outputs, so only the backward is compared. with_dw /
// with_bias select the optional inputs; dz_coef 0 skips the z-loss term.
static void router_backward_case_(int N, int E, int K, int norm_topk, int with_dw, int with_bias,
                                  float dz_coef, uint64_t seed) {
    const size_t ne = (size_t)N * E, nk = (size_t)N * K;
    float *logits = make_router_logits_(N, E, seed);
    RouterOut f = router_cpu_(logits, N, E, K, norm_topk);
    float *dw = tcu_host_rand(nk, seed + 1, 1.0f), *bias = tcu_host_rand(E, seed + 2, 0.1f);
    float *dl0 = tcu_host_rand(ne, seed + 3, 0.5f), *want = tcu_host_copy(dl0, ne);
    router_backward(want, with_dw ? dw : NULL, with_bias ? bias : NULL, dz_coef, f.probs, f.lse,
                    NULL, f.topk_idx, f.topk_w, N, E, K, norm_topk, ROUTER_SOFTMAX);

    float *d_probs = tcu_dev_from(f.probs, ne), *d_lse = tcu_dev_from(f.lse, N);
    float *d_w = tcu_dev_from(f.topk_w, nk), *d_dw = tcu_dev_from(dw, nk),
          *d_bias = tcu_dev_from(bias, E);
    float *d_dl = tcu_dev_from(dl0, ne);
    int32_t *d_idx = dev_i32_from_(f.topk_idx, nk);
    cuda_router_backward(d_dl, with_dw ? d_dw : NULL, with_bias ? d_bias : NULL, dz_coef, d_probs,
                         d_lse, d_idx, d_w, N, E, K, norm_topk);
    CU_ASSERT_TRUE(
        tcu_check("router_backward dlogits", d_dl, want, ne, RTOL_COMBINE, ATOL_FRAC_COMBINE));

    cuda_free(d_probs), cuda_free(d_lse), cuda_free(d_w), cuda_free(d_dw), cuda_free(d_bias);
    cuda_free(d_dl), cuda_free(d_idx);
    router_free_(&f);
    free(logits), free(dw), free(bias), free(dl0), free(want);
}

static void test_router_backward(void) {
    for (size_t s = 0; s < sizeof router_shapes_ / sizeof router_shapes_[0]; s++)
        for (int norm = 0; norm <= 1; norm++)
            router_backward_case_(router_shapes_[s][0], router_shapes_[s][1], router_shapes_[s][2],
                                  norm, 1, 1, 1e-3f, 1300 + 10 * s + norm);
    router_backward_case_(300, 64, 8, 1, 0, 1, 1e-3f, 1400); // dtopk_w NULL
    router_backward_case_(300, 64, 8, 1, 1, 0, 0.0f, 1410);  // dprob_bias NULL, no z-loss
    router_backward_case_(300, 64, 8, 0, 0, 0, 2e-3f, 1420); // z-loss alone
}

// The router's options of issue 11 through cuda_router_forward_ext / cuda_router_backward_ext:
// the sigmoid scores (probs = s / sum s, weights renormalised or not) and a selection bias
// (added to the scores for the top-k only). The bias has ties of its own (experts 1 and E-1
// share the largest value), so with the tied logit rows the lower-index rule decides through
// the key s + bias. Same tolerances as above: the sigmoid is a double exp rounded to float once
// on both sides (1 ulp), the normalisation by sum s another double division.
static void router_ext_case_(int N, int E, int K, int norm_topk, int score_fn, int biased,
                             uint64_t seed) {
    const size_t ne = (size_t)N * E, nk = (size_t)N * K;
    float *logits = make_router_logits_(N, E, seed);
    float *bias = tcu_host_rand(E, seed + 1, score_fn == ROUTER_SIGMOID ? 0.2f : 0.05f);
    if (E >= 2) bias[1] = bias[E - 1] = 0.3f;
    const float *b = biased ? bias : NULL;
    RouterOut want = router_cpu_ext_(logits, b, N, E, K, norm_topk, score_fn);

    float *d_logits = tcu_dev_from(logits, ne), *d_bias = tcu_dev_from(bias, E);
    float *d_probs = cuda_malloc(ne * sizeof(float)), *d_lse = cuda_malloc(N * sizeof(float));
    float *d_w = cuda_malloc(nk * sizeof(float));
    int32_t *d_idx = cuda_malloc(nk * sizeof(int32_t));
    cuda_router_forward_ext(d_probs, d_lse, d_idx, d_w, d_logits, biased ? d_bias : NULL, N, E, K,
                            norm_topk, score_fn);
    CU_ASSERT_TRUE(check_i32_("router_forward_ext topk_idx", d_idx, want.topk_idx, nk));
    CU_ASSERT_TRUE(
        tcu_check("router_forward_ext probs", d_probs, want.probs, ne, RTOL_ROUTER, 0.0));
    CU_ASSERT_TRUE(
        tcu_check("router_forward_ext lse", d_lse, want.lse, N, RTOL_ROUTER, ATOL_FRAC_ROUTER));
    CU_ASSERT_TRUE(tcu_check("router_forward_ext topk_w", d_w, want.topk_w, nk, RTOL_ROUTER, 0.0));

    // backward from the CPU's forward outputs, every term
    float *dw = tcu_host_rand(nk, seed + 2, 1.0f), *pb = tcu_host_rand(E, seed + 3, 0.1f);
    float *dl0 = tcu_host_rand(ne, seed + 4, 0.5f), *dl = tcu_host_copy(dl0, ne);
    router_backward(dl, dw, pb, 1e-3f, want.probs, want.lse, logits, want.topk_idx, want.topk_w, N,
                    E, K, norm_topk, score_fn);
    float *d_probs_w = tcu_dev_from(want.probs, ne), *d_lse_w = tcu_dev_from(want.lse, N);
    float *d_dw = tcu_dev_from(dw, nk), *d_pb = tcu_dev_from(pb, E), *d_dl = tcu_dev_from(dl0, ne);
    int32_t *d_idx_w = dev_i32_from_(want.topk_idx, nk);
    cuda_router_backward_ext(d_dl, d_dw, d_pb, 1e-3f, d_probs_w, d_lse_w, d_logits, d_idx_w, NULL,
                             N, E, K, norm_topk, score_fn);
    CU_ASSERT_TRUE(
        tcu_check("router_backward_ext dlogits", d_dl, dl, ne, RTOL_COMBINE, ATOL_FRAC_COMBINE));

    cuda_free(d_logits), cuda_free(d_bias), cuda_free(d_probs), cuda_free(d_lse), cuda_free(d_w);
    cuda_free(d_idx), cuda_free(d_probs_w), cuda_free(d_lse_w), cuda_free(d_dw), cuda_free(d_pb);
    cuda_free(d_dl), cuda_free(d_idx_w);
    router_free_(&want);
    free(logits), free(bias), free(dw), free(pb), free(dl0), free(dl);
}

static void test_router_ext(void) {
    for (size_t s = 0; s < sizeof router_shapes_ / sizeof router_shapes_[0]; s++)
        for (int v = 0; v < 4; v++) { // sigmoid / softmax x biased / not
            const int sig = v & 1, biased = v >> 1;
            if (!sig && !biased) continue; // test_router_forward / _backward
            for (int norm = 0; norm <= 1; norm++)
                router_ext_case_(router_shapes_[s][0], router_shapes_[s][1], router_shapes_[s][2],
                                 norm, sig ? ROUTER_SIGMOID : ROUTER_SOFTMAX, biased,
                                 1600 + 40 * s + 10 * v + norm);
        }
}

// ---------------------------------------------------------------------------------------
// Router auxiliary sums (returned to the host)

static void test_router_aux_sums(void) {
    static const int shapes[][2] = {{1, 1}, {37, 8}, {300, 64}, {5000, 64}, {300, 256}};
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        const int N = shapes[s][0], E = shapes[s][1];
        float *logits = make_router_logits_(N, E, 1500 + 10 * s);
        RouterOut f = router_cpu_(logits, N, E, 1, 0);
        double *want = tcu_xmalloc((size_t)E * sizeof(double)), want_z = 0.0;
        double *got = tcu_xmalloc((size_t)E * sizeof(double)), got_z = 0.0;
        router_aux_sums(want, &want_z, f.probs, f.lse, N, E);

        float *d_probs = tcu_dev_from(f.probs, (size_t)N * E), *d_lse = tcu_dev_from(f.lse, N);
        void *scratch = cuda_malloc(cuda_router_aux_sums_scratch_bytes(N, E));
        cuda_router_aux_sums(got, &got_z, d_probs, d_lse, N, E, scratch);
        int ok = 1;
        for (int e = 0; e < E; e++)
            ok &= check_f64_("router_aux_sums prob_sum", got[e], want[e], RTOL_SUM64);
        CU_ASSERT_TRUE(ok);
        CU_ASSERT_TRUE(check_f64_("router_aux_sums lse_sq_sum", got_z, want_z, RTOL_SUM64));

        cuda_free(d_probs), cuda_free(d_lse), cuda_free(scratch);
        router_free_(&f);
        free(logits), free(want), free(got);
    }
}

// ---------------------------------------------------------------------------------------
// Dispatch plan

// kind 0: topk_idx from the router (K distinct experts per token); 1: uniform random experts
// (repeats within a token allowed, as moe_plan allows); 2: skewed: 90% to expert 5 % E, the
// rest to E - 1, every other expert empty.
static int32_t *make_topk_(int N, int K, int E, int kind, uint64_t seed) {
    const size_t nk = (size_t)N * K;
    int32_t *idx = tcu_xmalloc(nk * sizeof *idx);
    if (kind == 0) {
        float *logits = make_router_logits_(N, E, seed);
        RouterOut f = router_cpu_(logits, N, E, K, 0);
        memcpy(idx, f.topk_idx, nk * sizeof *idx);
        router_free_(&f);
        free(logits);
        return idx;
    }
    uint64_t s = seed;
    for (size_t a = 0; a < nk; a++) {
        const uint64_t u = tu_rand_u64(&s);
        idx[a] = kind == 1 ? (int32_t)(u % (uint64_t)E) : (u % 10 ? 5 % E : E - 1);
    }
    return idx;
}

typedef struct {
    int32_t *counts, *offsets, *row_token, *assign_row;
} Plan;

static Plan plan_cpu_(const int32_t *topk, int N, int K, int E) {
    const size_t nk = (size_t)N * K;
    Plan p = {tcu_xmalloc((size_t)E * sizeof(int32_t)),
              tcu_xmalloc(((size_t)E + 1) * sizeof(int32_t)), tcu_xmalloc(nk * sizeof(int32_t)),
              tcu_xmalloc(nk * sizeof(int32_t))};
    moe_plan(p.counts, p.offsets, p.row_token, p.assign_row, topk, N, K, E);
    return p;
}

static void plan_free_(Plan *p) {
    free(p->counts), free(p->offsets), free(p->row_token), free(p->assign_row);
}

static void moe_plan_case_(int N, int K, int E, int kind, uint64_t seed) {
    const size_t nk = (size_t)N * K;
    int32_t *topk = make_topk_(N, K, E, kind, seed);
    Plan want = plan_cpu_(topk, N, K, E);

    int32_t *d_topk = dev_i32_from_(topk, nk);
    int32_t *d_counts = cuda_malloc((size_t)E * sizeof(int32_t));
    int32_t *d_offsets = cuda_malloc(((size_t)E + 1) * sizeof(int32_t));
    int32_t *d_row_token = cuda_malloc(nk * sizeof(int32_t));
    int32_t *d_assign_row = cuda_malloc(nk * sizeof(int32_t));
    void *scratch = cuda_malloc(cuda_moe_plan_scratch_bytes(N, K, E));
    cuda_moe_plan(d_counts, d_offsets, d_row_token, d_assign_row, d_topk, N, K, E, scratch);
    CU_ASSERT_TRUE(check_i32_("moe_plan counts", d_counts, want.counts, E));
    CU_ASSERT_TRUE(check_i32_("moe_plan offsets", d_offsets, want.offsets, (size_t)E + 1));
    CU_ASSERT_TRUE(check_i32_("moe_plan row_token", d_row_token, want.row_token, nk));
    CU_ASSERT_TRUE(check_i32_("moe_plan assign_row", d_assign_row, want.assign_row, nk));

    cuda_free(d_topk), cuda_free(d_counts), cuda_free(d_offsets), cuda_free(d_row_token);
    cuda_free(d_assign_row), cuda_free(scratch);
    plan_free_(&want);
    free(topk);
}

static void test_moe_plan(void) {
    moe_plan_case_(1, 1, 1, 1, 1600);
    moe_plan_case_(37, 1, 1, 1, 1610);
    moe_plan_case_(37, 2, 8, 0, 1620);
    moe_plan_case_(300, 8, 64, 0, 1630);   // 2400 assignments: 5 chunks of 512
    moe_plan_case_(4096, 8, 64, 1, 1640);  // 64 chunks
    moe_plan_case_(3000, 2, 256, 1, 1650); // more experts than threads per block
    moe_plan_case_(1000, 8, 64, 2, 1660);  // 62 empty experts
    moe_plan_case_(300, 8, 8, 0, 1670);    // K = E: every token goes to every expert
}

// ---------------------------------------------------------------------------------------
// Permute / unpermute, on the CPU's plan for router top-k

static void permute_case_(int N, int K, int E, int D, uint64_t seed) {
    const size_t nd = (size_t)N * D, nk = (size_t)N * K, R = nk, rd = R * D;
    int32_t *topk = make_topk_(N, K, E, 0, seed);
    Plan plan = plan_cpu_(topk, N, K, E);
    float *x = tcu_host_rand(nd, seed + 1, 1.0f), *dxp = tcu_host_rand(rd, seed + 2, 1.0f);
    float *dx0 = tcu_host_rand(nd, seed + 3, 0.5f); // written over by backward (kernels.h)
    float *xp = tcu_host_alloc(rd), *want_dx = tcu_host_copy(dx0, nd);
    permute_forward(xp, x, plan.row_token, (int)R, D);
    permute_backward(want_dx, dxp, plan.assign_row, N, K, D);

    int32_t *d_row_token = dev_i32_from_(plan.row_token, R);
    int32_t *d_assign_row = dev_i32_from_(plan.assign_row, nk);
    float *d_x = tcu_dev_from(x, nd), *d_dxp = tcu_dev_from(dxp, rd), *d_dx = tcu_dev_from(dx0, nd);
    float *d_xp = cuda_malloc(rd * sizeof(float));
    cuda_permute_forward(d_xp, d_x, d_row_token, (int)R, D);
    CU_ASSERT_TRUE(tcu_check("permute_forward", d_xp, xp, rd, 0.0, 0.0));
    cuda_permute_backward(d_dx, d_dxp, d_assign_row, N, K, D);
    CU_ASSERT_TRUE(tcu_check("permute_backward", d_dx, want_dx, nd, 0.0, 0.0));
    cuda_permute_backward(NULL, d_dxp, d_assign_row, N, K, D); // NULL gradient: skipped
    // K = 0: no routed rows, dx written with the empty sum (as the CPU op writes it)
    permute_backward(want_dx, dxp, plan.assign_row, N, 0, D);
    cuda_permute_backward(d_dx, d_dxp, d_assign_row, N, 0, D);
    CU_ASSERT_TRUE(tcu_check("permute_backward K=0", d_dx, want_dx, nd, 0.0, 0.0));
    CU_ASSERT_TRUE(want_dx[0] == 0.0f && want_dx[nd - 1] == 0.0f);

    cuda_free(d_row_token), cuda_free(d_assign_row), cuda_free(d_x), cuda_free(d_dxp);
    cuda_free(d_dx), cuda_free(d_xp);
    plan_free_(&plan);
    free(topk), free(x), free(dxp), free(dx0), free(xp), free(want_dx);
}

static void unpermute_case_(int N, int K, int E, int D, int with_dyp, int with_dw, uint64_t seed) {
    const size_t nd = (size_t)N * D, nk = (size_t)N * K, rd = nk * D;
    int32_t *topk = make_topk_(N, K, E, 0, seed);
    Plan plan = plan_cpu_(topk, N, K, E);
    float *yp = tcu_host_rand(rd, seed + 1, 1.0f), *w = tcu_host_rand(nk, seed + 2, 1.0f);
    float *dout = tcu_host_rand(nd, seed + 3, 1.0f);
    // written over by backward (kernels.h); a NULL output's buffer stays as it was
    float *dyp0 = tcu_host_rand(rd, seed + 4, 0.5f), *dw0 = tcu_host_rand(nk, seed + 5, 0.5f);
    float *out = tcu_host_alloc(nd), *want_dyp = tcu_host_copy(dyp0, rd),
          *want_dw = tcu_host_copy(dw0, nk);
    unpermute_forward(out, yp, w, plan.assign_row, N, K, D);
    unpermute_backward(with_dyp ? want_dyp : NULL, with_dw ? want_dw : NULL, dout, yp, w,
                       plan.assign_row, N, K, D);

    int32_t *d_assign_row = dev_i32_from_(plan.assign_row, nk);
    float *d_yp = tcu_dev_from(yp, rd), *d_w = tcu_dev_from(w, nk),
          *d_dout = tcu_dev_from(dout, nd);
    float *d_dyp = tcu_dev_from(dyp0, rd), *d_dw = tcu_dev_from(dw0, nk);
    float *d_out = cuda_malloc(nd * sizeof(float));
    cuda_unpermute_forward(d_out, d_yp, d_w, d_assign_row, N, K, D);
    CU_ASSERT_TRUE(tcu_check("unpermute_forward", d_out, out, nd, RTOL_COMBINE, ATOL_FRAC_COMBINE));
    cuda_unpermute_backward(with_dyp ? d_dyp : NULL, with_dw ? d_dw : NULL, d_dout, d_yp, d_w,
                            d_assign_row, N, K, D);
    CU_ASSERT_TRUE(
        tcu_check("unpermute_backward dyp", d_dyp, want_dyp, rd, RTOL_COMBINE, ATOL_FRAC_COMBINE));
    CU_ASSERT_TRUE(tcu_check("unpermute_backward dtopk_w", d_dw, want_dw, nk, RTOL_COMBINE,
                             ATOL_FRAC_COMBINE));

    cuda_free(d_assign_row), cuda_free(d_yp), cuda_free(d_w), cuda_free(d_dout);
    cuda_free(d_dyp), cuda_free(d_dw), cuda_free(d_out);
    plan_free_(&plan);
    free(topk), free(yp), free(w), free(dout), free(dyp0), free(dw0), free(out), free(want_dyp);
    free(want_dw);
}

static const int permute_shapes_[][4] = { // N, K, E, D
    {1, 1, 1, 1},     {37, 1, 1, 48},    {37, 2, 8, 48},
    {300, 8, 64, 48}, {300, 2, 8, 2048}, {37, 8, 64, 2048}};

static void test_permute(void) {
    for (size_t s = 0; s < sizeof permute_shapes_ / sizeof permute_shapes_[0]; s++)
        permute_case_(permute_shapes_[s][0], permute_shapes_[s][1], permute_shapes_[s][2],
                      permute_shapes_[s][3], 1700 + 10 * s);
}

static void test_unpermute(void) {
    for (size_t s = 0; s < sizeof permute_shapes_ / sizeof permute_shapes_[0]; s++)
        unpermute_case_(permute_shapes_[s][0], permute_shapes_[s][1], permute_shapes_[s][2],
                        permute_shapes_[s][3], 1, 1, 1800 + 10 * s);
    unpermute_case_(300, 8, 64, 48, 1, 0, 1900); // dtopk_w NULL
    unpermute_case_(300, 8, 64, 48, 0, 1, 1910); // dyp NULL
}

// ---------------------------------------------------------------------------------------
// Cross-entropy

// Targets in [0, V), with the two ends of the vocabulary, and no target (-1) at t % 7 == 3
// and at the last position.
static int32_t *make_targets_(int N, int V, uint64_t seed) {
    int32_t *tg = tcu_xmalloc((size_t)N * sizeof *tg);
    uint64_t s = seed;
    for (int i = 0; i < N; i++) tg[i] = (int32_t)(tu_rand_u64(&s) % (uint64_t)V);
    if (N > 2) tg[0] = 0, tg[1] = V - 1;
    for (int i = 3; i < N; i += 7) tg[i] = -1;
    tg[N - 1] = -1;
    return tg;
}

static void crossentropy_case_(int N, int V, uint64_t seed) {
    const size_t nv = (size_t)N * V;
    float *logits = tcu_host_rand(nv, seed, 4.0f); // logits in [-4, 4): see the tolerances
    int32_t *tg = make_targets_(N, V, seed + 1);
    int n_valid = 0;
    for (int i = 0; i < N; i++) n_valid += tg[i] >= 0;
    const float scale = 1.0f / (float)(n_valid > 0 ? n_valid : 1);
    float *losses = tcu_host_alloc(N), *losses_fb = tcu_host_alloc(N), *dl = tcu_host_alloc(nv);
    const double want = crossentropy_forward(losses, logits, tg, N, V);
    const double want_fb = crossentropy_forward_backward(dl, losses_fb, logits, tg, N, V, scale);

    float *d_logits = tcu_dev_from(logits, nv), *d_dl = cuda_malloc(nv * sizeof(float));
    float *d_losses = cuda_malloc(N * sizeof(float));
    int32_t *d_tg = dev_i32_from_(tg, N);
    void *scratch = cuda_malloc(cuda_crossentropy_scratch_bytes(N));
    double got = cuda_crossentropy_forward(d_losses, d_logits, d_tg, N, V, scratch);
    CU_ASSERT_TRUE(check_f64_("crossentropy_forward sum", got, want, RTOL_CE_SUM));
    CU_ASSERT_TRUE(tcu_check("crossentropy_forward losses", d_losses, losses, N, RTOL_CE, 0.0));
    const double got_nl = cuda_crossentropy_forward(NULL, d_logits, d_tg, N, V, scratch);
    CU_ASSERT_TRUE(same_bits_("crossentropy_forward without losses", &got_nl, &got, sizeof got));

    got = cuda_crossentropy_forward_backward(d_dl, d_losses, d_logits, d_tg, N, V, scale, scratch);
    CU_ASSERT_TRUE(check_f64_("crossentropy_forward_backward sum", got, want_fb, RTOL_CE_SUM));
    CU_ASSERT_TRUE(
        tcu_check("crossentropy_forward_backward losses", d_losses, losses_fb, N, RTOL_CE, 0.0));
    CU_ASSERT_TRUE(
        tcu_check("crossentropy_forward_backward dlogits", d_dl, dl, nv, RTOL_CE, ATOL_FRAC_CE));
    // in place (dlogits aliases logits, as the model does with the (N,V) buffer), no losses
    got = cuda_crossentropy_forward_backward(d_logits, NULL, d_logits, d_tg, N, V, scale, scratch);
    CU_ASSERT_TRUE(
        check_f64_("crossentropy_forward_backward in place sum", got, want_fb, RTOL_CE_SUM));
    CU_ASSERT_TRUE(tcu_check("crossentropy_forward_backward in place", d_logits, dl, nv, RTOL_CE,
                             ATOL_FRAC_CE));

    cuda_free(d_logits), cuda_free(d_dl), cuda_free(d_losses), cuda_free(d_tg), cuda_free(scratch);
    free(logits), free(tg), free(losses), free(losses_fb), free(dl);
}

static void test_crossentropy(void) {
    crossentropy_case_(1, 1, 2000); // the one row has no target
    crossentropy_case_(3, 7, 2010);
    crossentropy_case_(37, 50304, 2020);
    crossentropy_case_(5, 50257, 2030); // V not a multiple of anything useful
    crossentropy_case_(300, 50304, 2040);
}

// ---------------------------------------------------------------------------------------
// Determinism: the ops with reductions or plans must give the same bits on every run.

static void test_determinism(void) {
    // embedding backward: 3000 positions over 50 ids
    {
        const int N = 3000, D = 384, V = 1000;
        const size_t nd = (size_t)N * D, vd = (size_t)V * D;
        int32_t *tok = make_tokens_(N, V, 50, 3000);
        float *dout = tcu_host_rand(nd, 3001, 1.0f);
        float *d_dout = tcu_dev_from(dout, nd), *d_dwte = cuda_malloc(vd * sizeof(float));
        void *scratch = cuda_malloc(cuda_embedding_backward_scratch_bytes(N));
        float *r[2];
        for (int k = 0; k < 2; k++) {
            cuda_zero(d_dwte, vd * sizeof(float));
            cuda_embedding_backward(d_dwte, d_dout, tok, N, D, scratch);
            r[k] = tcu_host_from(d_dwte, vd);
        }
        CU_ASSERT_TRUE(same_bits_("embedding_backward", r[0], r[1], vd * sizeof(float)));
        cuda_free(d_dout), cuda_free(d_dwte), cuda_free(scratch);
        free(tok), free(dout), free(r[0]), free(r[1]);
    }
    // dispatch plan, then unpermute backward on it
    {
        const int N = 4096, K = 8, E = 64, D = 256;
        const size_t nk = (size_t)N * K, nd = (size_t)N * D, rd = nk * D;
        int32_t *topk = make_topk_(N, K, E, 1, 3010);
        int32_t *d_topk = dev_i32_from_(topk, nk);
        int32_t *d_plan = cuda_malloc(((size_t)2 * E + 1 + 2 * nk) * sizeof(int32_t));
        int32_t *d_counts = d_plan, *d_offsets = d_plan + E, *d_row_token = d_plan + 2 * E + 1;
        int32_t *d_assign_row = d_row_token + nk;
        void *scratch = cuda_malloc(cuda_moe_plan_scratch_bytes(N, K, E));
        const size_t plan_bytes = ((size_t)2 * E + 1 + 2 * nk) * sizeof(int32_t);
        int32_t *plan[2];
        for (int k = 0; k < 2; k++) {
            cuda_zero(d_plan, plan_bytes);
            cuda_moe_plan(d_counts, d_offsets, d_row_token, d_assign_row, d_topk, N, K, E, scratch);
            plan[k] = tcu_xmalloc(plan_bytes);
            cuda_memcpy_d2h(plan[k], d_plan, plan_bytes);
        }
        CU_ASSERT_TRUE(same_bits_("moe_plan", plan[0], plan[1], plan_bytes));

        float *yp = tcu_host_rand(rd, 3011, 1.0f), *w = tcu_host_rand(nk, 3012, 1.0f);
        float *dout = tcu_host_rand(nd, 3013, 1.0f);
        float *d_yp = tcu_dev_from(yp, rd), *d_w = tcu_dev_from(w, nk),
              *d_dout = tcu_dev_from(dout, nd);
        float *d_dyp = cuda_malloc(rd * sizeof(float)), *d_dw = cuda_malloc(nk * sizeof(float));
        float *dyp[2], *dw[2];
        for (int k = 0; k < 2; k++) {
            cuda_zero(d_dyp, rd * sizeof(float));
            cuda_zero(d_dw, nk * sizeof(float));
            cuda_unpermute_backward(d_dyp, d_dw, d_dout, d_yp, d_w, d_assign_row, N, K, D);
            dyp[k] = tcu_host_from(d_dyp, rd);
            dw[k] = tcu_host_from(d_dw, nk);
        }
        CU_ASSERT_TRUE(same_bits_("unpermute_backward dyp", dyp[0], dyp[1], rd * sizeof(float)));
        CU_ASSERT_TRUE(same_bits_("unpermute_backward dtopk_w", dw[0], dw[1], nk * sizeof(float)));

        cuda_free(d_topk), cuda_free(d_plan), cuda_free(scratch), cuda_free(d_yp), cuda_free(d_w);
        cuda_free(d_dout), cuda_free(d_dyp), cuda_free(d_dw);
        free(topk), free(yp), free(w), free(dout);
        for (int k = 0; k < 2; k++) free(plan[k]), free(dyp[k]), free(dw[k]);
    }
    // cross-entropy: the summed loss and the gradient
    {
        const int N = 200, V = 50304;
        const size_t nv = (size_t)N * V;
        float *logits = tcu_host_rand(nv, 3020, 4.0f);
        int32_t *tg = make_targets_(N, V, 3021);
        float *d_logits = tcu_dev_from(logits, nv), *d_dl = cuda_malloc(nv * sizeof(float));
        int32_t *d_tg = dev_i32_from_(tg, N);
        void *scratch = cuda_malloc(cuda_crossentropy_scratch_bytes(N));
        double sum[2];
        float *dl[2];
        for (int k = 0; k < 2; k++) {
            sum[k] = cuda_crossentropy_forward_backward(d_dl, NULL, d_logits, d_tg, N, V, 0.01f,
                                                        scratch);
            dl[k] = tcu_host_from(d_dl, nv);
        }
        CU_ASSERT_TRUE(same_bits_("crossentropy sum", &sum[0], &sum[1], sizeof(double)));
        CU_ASSERT_TRUE(same_bits_("crossentropy dlogits", dl[0], dl[1], nv * sizeof(float)));
        cuda_free(d_logits), cuda_free(d_dl), cuda_free(d_tg), cuda_free(scratch);
        free(logits), free(tg), free(dl[0]), free(dl[1]);
    }
    // router auxiliary sums
    {
        const int N = 5000, E = 64;
        float *probs = tcu_host_rand((size_t)N * E, 3030, 1.0f),
              *lse = tcu_host_rand(N, 3031, 3.0f);
        float *d_probs = tcu_dev_from(probs, (size_t)N * E), *d_lse = tcu_dev_from(lse, N);
        void *scratch = cuda_malloc(cuda_router_aux_sums_scratch_bytes(N, E));
        double ps[2][64], z[2];
        for (int k = 0; k < 2; k++)
            cuda_router_aux_sums(ps[k], &z[k], d_probs, d_lse, N, E, scratch);
        CU_ASSERT_TRUE(same_bits_("router_aux_sums prob_sum", ps[0], ps[1], sizeof ps[0]));
        CU_ASSERT_TRUE(same_bits_("router_aux_sums lse_sq_sum", &z[0], &z[1], sizeof z[0]));
        cuda_free(d_probs), cuda_free(d_lse), cuda_free(scratch);
        free(probs), free(lse);
    }
}

int main(void) {
    static const TuTest tests[] = {
        {"embedding forward and backward", test_embedding},
        {"rope forward and backward", test_rope},
        {"router_forward", test_router_forward},
        {"router_backward", test_router_backward},
        {"router: sigmoid scores and the selection bias", test_router_ext},
        {"router_aux_sums", test_router_aux_sums},
        {"moe_plan", test_moe_plan},
        {"permute forward and backward", test_permute},
        {"unpermute forward and backward", test_unpermute},
        {"crossentropy", test_crossentropy},
        {"determinism of the reductions and plans", test_determinism},
    };
    return tcu_main("cuda_moe_ops", tests, (int)(sizeof tests / sizeof tests[0]));
}
