// test_ops: the CPU kernels of kernels/kernels.h. Forward results against naive references in
// double written here; every backward against central finite differences of its forward, and
// against itself called twice (a backward that accumulates gives twice the gradient, one that
// WRITES, kernels.h, the same bits over NaN); the MoE dispatch plan's invariants.
// Each op runs at a small size (every input element probed) and at a size above the kernels'
// OpenMP thresholds (random probes), so that both the serial and the parallel paths are tested.
#include "kernels/kernels.h"
#include "tests/testutil.h"

#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

// ---------------------------------------------------------------------------------------
// Helpers

// The buffers of one test case, freed together at its end.
typedef struct {
    void *p[64];
    int n;
} Arena;

static void *arena_alloc_(Arena *a, size_t bytes) {
    void *p = calloc(bytes ? bytes : 1, 1);
    if (!p || a->n == 64) {
        fprintf(stderr, "test_ops: out of memory (or arena full)\n");
        exit(1);
    }
    a->p[a->n++] = p;
    return p;
}

static void arena_free_(Arena *a) {
    while (a->n > 0) free(a->p[--a->n]);
}

static float *fa_(Arena *a, size_t n) {
    return arena_alloc_(a, n * sizeof(float));
}

static double *da_(Arena *a, size_t n) {
    return arena_alloc_(a, n * sizeof(double));
}

static int32_t *ia_(Arena *a, size_t n) {
    return arena_alloc_(a, n * sizeof(int32_t));
}

// uniform in [-scale, scale), from a fixed seed
static float *fr_(Arena *a, size_t n, uint64_t seed, float scale) {
    float *p = fa_(a, n);
    tu_fill_uniform(p, n, seed, scale);
    return p;
}

static float *fcopy_(Arena *a, const float *x, size_t n) {
    float *p = fa_(a, n);
    memcpy(p, x, n * sizeof(float));
    return p;
}

static int allclose_d_(const char *name, const float *got, const double *want, size_t n,
                       double atol, double rtol) {
    float *w = malloc(n * sizeof(float));
    for (size_t i = 0; i < n; i++) w[i] = (float)want[i];
    int ok = tu_allclose(name, got, w, n, atol, rtol);
    free(w);
    return ok;
}

// g2 holds the gradient of two identical backward calls into a zeroed buffer, g1 of one: it
// must be twice g1 (the backward accumulates). Exact up to the fp32 rounding of the second sum.
static int check_doubled_(const char *name, const float *g2, const float *g1, size_t n) {
    float *want = malloc(n * sizeof(float));
    for (size_t i = 0; i < n; i++) want[i] = 2.0f * g1[i];
    int ok = tu_allclose(name, g2, want, n, 1e-6 * tu_max_abs(g1, n) + 1e-30, 1e-5);
    free(want);
    return ok;
}

// A gradient buffer full of NaN, for the backward ops that WRITE their gradients: a NaN left
// over, or read and added to, shows.
static float *fnan_(Arena *a, size_t n) {
    float *p = fa_(a, n);
    for (size_t i = 0; i < n; i++) p[i] = NAN;
    return p;
}

// got: what a writing backward left in a NaN-filled buffer (called twice: the second call
// must not add); want: its result in a zeroed buffer. The same bits.
static int check_written_(const char *name, const float *got, const float *want, size_t n) {
    if (memcmp(got, want, n * sizeof(float)) == 0) return 1;
    size_t i = 0;
    while (i < n && memcmp(got + i, want + i, sizeof(float)) == 0) i++;
    fprintf(stderr, "  %s: element %zu is %g, want %g (not written, or accumulated)\n", name, i,
            got[i], want[i]);
    return 0;
}

// A writing backward with two outputs, one of them NULL: the other is still written (equal
// to want up to rounding: the loop may compile differently without the NULL one), and the
// NULL one's buffer `untouched` still holds only NaN.
static int check_alone_(const char *name, const float *got, const float *want, size_t n,
                        const float *untouched, size_t n_untouched) {
    int ok = tu_allclose(name, got, want, n, 1e-6 * tu_max_abs(want, n) + 1e-30, 1e-5);
    for (size_t i = 0; i < n_untouched; i++)
        if (!isnan(untouched[i])) {
            fprintf(stderr, "  %s: the NULL output's buffer was written at %zu\n", name, i);
            return 0;
        }
    return ok;
}

// Every probe of x when the check is small, else this many random ones.
#define PROBES_ALL   ((size_t)1 << 40)
#define PROBES_LARGE 100

// ---------------------------------------------------------------------------------------
// Finite differences.
// An op under test is wrapped as fwd(ctx): run the forward at the current inputs and return
// all its outputs as one flat fp32 vector of n_out (NULL: this probe is invalid, e.g. the
// router's top-k selection changed). The loss is L = sum(out * r) in double for a random
// projection r; the analytic gradient is the op's backward with dout = r. Each probed input
// element x_i gives numeric = (L(x_i + h) - L(x_i - h)) / (h+ + h-), with h+ and h- the steps
// actually taken after rounding x_i +- h to fp32. (An op with a double loss of its own, the
// cross-entropy, is wrapped as loss(ctx) instead, with bounds on that loss's roundoff.)
//
// Step: h = 1e-2. The roundoff of the quotient grows like eps_f32 / h and the truncation like
// h^2, so on O(1) inputs the best fp32 step is near (3 eps_f32)^(1/3) ~ 7e-3. (Measured: at
// h = 1e-3 the roundoff term is 10x larger; at h = 3e-2 the truncation of SwiGLU shows.)
//
// Tolerance of one probe: |numeric - analytic| <= FD_ROUND * noise / h + FD_ATOL
//                                                 + FD_RTOL * |analytic|, where
//  - noise = eps_f32 * ||out * r||_2 over the outputs that depend on x_i (found with a large
//    step FD_DEP_STEP; the other outputs are bit-identical between probes and cancel exactly,
//    as float*float is exact in double). Each dependent output carries an fp32 error of a few
//    eps relative to the terms it is computed from; these errors are independent, so they add
//    to L in quadrature. FD_ROUND = 32 covers the "few" and the cancellation inside dot
//    products (the worst ratio |numeric - analytic| / (noise / h) measured over this suite is
//    about 6) with a 5x margin.
//  - FD_ATOL, FD_RTOL: truncation, (h^2 / 6) * f''' ~ 2e-5 * f''', with the third derivative
//    O(1) and O(f') for these ops on O(1) inputs (exactly 0 for the linear ones); FD_RTOL also
//    covers the fp32 roundoff of the analytic gradient itself (~1e-6 relative).
// A wrong formula (a missing term, factor, transpose or mask) errs at O(1) relative and fails
// by orders of magnitude; the median roundoff term is 0.02% .. 3% of the gradient, by op (the
// loosest: attention dk, whose probes move every later row of the output).
#define FD_H        1e-2
#define FD_ROUND    32.0
#define FD_ATOL     1e-5
#define FD_RTOL     1e-3
#define FD_DEP_STEP 0.25f

typedef const float *(*FwdFn)(void *ctx);
typedef double (*LossFn)(void *ctx);

typedef struct {
    FwdFn fwd;
    void *ctx;
    const float *r; // (n_out), the projection of the outputs
    size_t n_out;
    double h;            // FD step
    LossFn loss;         // instead of fwd: the loss itself, in double
    const double *noise; // with loss: (n) bounds on its roundoff between the probes of x_i
} FdOp;

static double project_(const float *out, const float *r, size_t n) {
    double s = 0.0;
    for (size_t i = 0; i < n; i++) s += (double)out[i] * r[i];
    return s;
}

// Runs the op at the current inputs: the loss, and the outputs into out (fwd ops only).
// Returns 0 when the op says the probe is invalid.
static int fd_eval_(const FdOp *op, float *out, double *loss) {
    if (op->loss) {
        *loss = op->loss(op->ctx);
        return 1;
    }
    const float *o = op->fwd(op->ctx);
    if (!o) return 0;
    memcpy(out, o, op->n_out * sizeof(float));
    *loss = project_(out, op->r, op->n_out);
    return 1;
}

// Probes every element of x (n) when n <= max_probe, else max_probe random ones, and compares
// with ana (n). Returns 1 on success; prints the worst probe either way.
static int fd_check_(const char *name, const FdOp *op, float *x, const float *ana, size_t n,
                     size_t max_probe, uint64_t seed) {
    const size_t no = op->loss ? 1 : op->n_out;
    Arena A = {0};
    float *base = fa_(&A, no), *dep = fa_(&A, no), *plus = fa_(&A, no), *minus = fa_(&A, no);
    double l0, ld, lp, lm;
    fd_eval_(op, base, &l0);
    const int all = n <= max_probe;
    const size_t n_probe = all ? n : max_probe;
    uint64_t rng = seed;
    size_t bad = 0, skipped = 0, worst = 0;
    double worst_ratio = 0.0, worst_num = 0.0, worst_tol = 0.0;
    for (size_t p = 0; p < n_probe; p++) {
        const size_t i = all ? p : (size_t)(tu_rand_u64(&rng) % n);
        const float x0 = x[i];
        int dep_all = 1; // an invalid large step: count every output as dependent
        if (!op->loss) {
            x[i] = x0 + FD_DEP_STEP;
            dep_all = !fd_eval_(op, dep, &ld);
        }
        x[i] = (float)(x0 + op->h);
        const double hp = (double)x[i] - x0;
        const int ok_p = fd_eval_(op, plus, &lp);
        x[i] = (float)(x0 - op->h);
        const double hm = x0 - (double)x[i];
        const int ok_m = fd_eval_(op, minus, &lm);
        x[i] = x0;
        if (!ok_p || !ok_m) {
            skipped++;
            continue;
        }
        double noise = op->loss ? op->noise[i] : 0.0;
        if (!op->loss) {
            double s2 = 0.0;
            for (size_t k = 0; k < no; k++) {
                if (dep_all || dep[k] != base[k] || plus[k] != base[k] || minus[k] != base[k]) {
                    const double t = (double)base[k] * op->r[k];
                    s2 += t * t;
                }
            }
            noise = FLT_EPSILON * sqrt(s2);
        }
        const double num = (lp - lm) / (hp + hm);
        const double tol = FD_ROUND * noise / (0.5 * (hp + hm)) + FD_ATOL + FD_RTOL * fabs(ana[i]);
        const double ratio = fabs(num - ana[i]) / tol;
        if (!(ratio <= 1.0)) bad++;
        if (!(ratio <= worst_ratio)) {
            worst_ratio = ratio;
            worst = i;
            worst_num = num;
            worst_tol = tol;
        }
    }
    fd_eval_(op, base, &l0); // leave the context's outputs at the unperturbed inputs
    // the router's probes may flip a near-tie in the top-k: allow a few, not many
    const int too_many_skipped = skipped * 50 > n_probe;
    printf("\n    fd %-27s %4zu probes (%zu skipped), worst err/tol %.3f at [%zu]: num %.7g "
           "ana %.7g tol %.2g ",
           name, n_probe, skipped, worst_ratio, worst, worst_num, (double)ana[worst], worst_tol);
    if (bad || too_many_skipped) {
        fprintf(stderr, "  fd %s: %zu of %zu probes outside tolerance, %zu skipped\n", name, bad,
                n_probe, skipped);
    }
    arena_free_(&A);
    return bad == 0 && !too_many_skipped;
}

// ---------------------------------------------------------------------------------------
// Embedding

typedef struct {
    float *out, *wte;
    const int32_t *tokens;
    int N, D;
} EmbCtx;

static const float *emb_fwd_(void *p) {
    EmbCtx *c = p;
    embedding_forward(c->out, c->tokens, c->wte, c->N, c->D);
    return c->out;
}

static void embedding_case_(int N, int V, int D, size_t max_probe) {
    Arena A = {0};
    int32_t *tokens = ia_(&A, N);
    uint64_t s = 10 + N;
    // ids from [0, V-2): repeats, and two rows of wte that get no gradient
    for (int i = 0; i < N; i++) tokens[i] = (int32_t)(tu_rand_u64(&s) % (uint64_t)(V - 2));
    const size_t nw = (size_t)V * D, no = (size_t)N * D;
    float *wte = fr_(&A, nw, 11, 1.0f), *out = fa_(&A, no), *r = fr_(&A, no, 12, 1.0f);
    EmbCtx c = {out, wte, tokens, N, D};
    emb_fwd_(&c);
    int ok = 1;
    for (int i = 0; i < N; i++) {
        ok &= memcmp(out + (size_t)i * D, wte + (size_t)tokens[i] * D, D * sizeof(float)) == 0;
    }
    CU_ASSERT(ok);

    float *g1 = fa_(&A, nw), *g2 = fa_(&A, nw);
    embedding_backward(g1, r, tokens, N, D);
    embedding_backward(g2, r, tokens, N, D);
    embedding_backward(g2, r, tokens, N, D);
    CU_ASSERT(check_doubled_("embedding dwte doubled", g2, g1, nw));
    embedding_backward(NULL, r, tokens, N, D); // NULL gradient: skipped

    FdOp op = {.fwd = emb_fwd_, .ctx = &c, .r = r, .n_out = no, .h = FD_H};
    CU_ASSERT(fd_check_("embedding dwte", &op, wte, g1, nw, max_probe, 1));
    arena_free_(&A);
}

static void test_embedding(void) {
    embedding_case_(9, 7, 70, PROBES_ALL); // D > 64: more than one column slice in backward
    embedding_case_(64, 40, 1100, PROBES_LARGE);
}

// ---------------------------------------------------------------------------------------
// RMSNorm

typedef struct {
    float *out, *rstd, *x, *w;
    int N, D;
    float eps;
} RmsCtx;

static const float *rms_fwd_(void *p) {
    RmsCtx *c = p;
    rmsnorm_forward(c->out, c->rstd, c->x, c->w, c->N, c->D, c->eps);
    return c->out;
}

static void rmsnorm_case_(int N, int D, size_t max_probe) {
    Arena A = {0};
    const float eps = 1e-5f;
    const size_t n = (size_t)N * D;
    float *x = fr_(&A, n, 21, 1.0f), *w = fr_(&A, D, 22, 0.5f);
    for (int c = 0; c < D; c++) w[c] += 1.0f;
    float *out = fa_(&A, n), *rstd = fa_(&A, N), *r = fr_(&A, n, 23, 1.0f);
    RmsCtx c = {out, rstd, x, w, N, D, eps};
    rms_fwd_(&c);

    double *want = da_(&A, n), *want_rstd = da_(&A, N);
    for (int i = 0; i < N; i++) {
        const float *xi = x + (size_t)i * D;
        double ss = 0.0;
        for (int k = 0; k < D; k++) ss += (double)xi[k] * xi[k];
        want_rstd[i] = 1.0 / sqrt(ss / D + eps);
        for (int k = 0; k < D; k++) want[(size_t)i * D + k] = xi[k] * want_rstd[i] * w[k];
    }
    CU_ASSERT(allclose_d_("rmsnorm out", out, want, n, 1e-6, 1e-6));
    CU_ASSERT(allclose_d_("rmsnorm rstd", rstd, want_rstd, N, 0, 1e-6));

    float *dx1 = fa_(&A, n), *dw1 = fa_(&A, D), *dx2 = fa_(&A, n), *dw2 = fa_(&A, D);
    rmsnorm_backward(dx1, dw1, r, x, w, rstd, N, D);
    rmsnorm_backward(dx2, NULL, r, x, w, rstd, N, D);
    rmsnorm_backward(dx2, dw2, r, x, w, rstd, N, D);
    rmsnorm_backward(NULL, dw2, r, x, w, rstd, N, D);
    CU_ASSERT(check_doubled_("rmsnorm dx doubled", dx2, dx1, n));
    CU_ASSERT(check_doubled_("rmsnorm dw doubled", dw2, dw1, D));

    FdOp op = {.fwd = rms_fwd_, .ctx = &c, .r = r, .n_out = n, .h = FD_H};
    CU_ASSERT(fd_check_("rmsnorm dx", &op, x, dx1, n, max_probe, 2));
    CU_ASSERT(fd_check_("rmsnorm dw", &op, w, dw1, D, max_probe, 3));
    arena_free_(&A);
}

static void test_rmsnorm(void) {
    rmsnorm_case_(5, 80, PROBES_ALL);
    rmsnorm_case_(40, 1700, PROBES_LARGE);
}

// ---------------------------------------------------------------------------------------
// Matmul

typedef struct {
    float *out, *inp, *w;
    int N, C, OC;
} MmCtx;

static const float *mm_fwd_(void *p) {
    MmCtx *c = p;
    matmul_forward(c->out, c->inp, c->w, c->N, c->C, c->OC);
    return c->out;
}

// out (M,N) = a @ b in double, with a (M,K) and b (K,N) read through strides, so that one loop
// serves the forward and both backward products. a[m,k] = a[m*as0 + k*as1], likewise b.
static void naive_mm_(double *out, const float *a, size_t as0, size_t as1, const float *b,
                      size_t bs0, size_t bs1, int M, int N, int K) {
    for (int m = 0; m < M; m++) {
        for (int n = 0; n < N; n++) {
            double s = 0.0;
            for (int k = 0; k < K; k++) s += (double)a[m * as0 + k * as1] * b[k * bs0 + n * bs1];
            out[(size_t)m * N + n] = s;
        }
    }
}

// out = inp @ w^T: inp (N,C), w (OC,C)
static void naive_matmul_(double *out, const float *inp, const float *w, int N, int C, int OC) {
    naive_mm_(out, inp, C, 1, w, 1, C, N, OC, C);
}

static void test_matmul(void) {
    Arena A = {0};
    enum { N = 7, C = 70, OC = 9 };
    float *inp = fr_(&A, N * C, 31, 1.0f), *w = fr_(&A, OC * C, 32, 0.5f);
    float *out = fa_(&A, N * OC), *r = fr_(&A, N * OC, 33, 1.0f);
    MmCtx c = {out, inp, w, N, C, OC};
    mm_fwd_(&c);
    double *want = da_(&A, N * OC);
    naive_matmul_(want, inp, w, N, C, OC);
    CU_ASSERT(allclose_d_("matmul out", out, want, N * OC, 1e-5, 1e-5));

    float *di1 = fa_(&A, N * C), *dw1 = fa_(&A, OC * C), *di2 = fa_(&A, N * C);
    float *dw2 = fa_(&A, OC * C);
    matmul_backward(di1, dw1, r, inp, w, N, C, OC);
    matmul_backward(di2, NULL, r, inp, w, N, C, OC); // NULL dw: skipped
    matmul_backward(di2, dw2, r, inp, w, N, C, OC);
    matmul_backward(NULL, dw2, r, inp, w, N, C, OC);
    CU_ASSERT(check_doubled_("matmul dinp doubled", di2, di1, N * C));
    CU_ASSERT(check_doubled_("matmul dw doubled", dw2, dw1, OC * C));

    FdOp op = {.fwd = mm_fwd_, .ctx = &c, .r = r, .n_out = N * OC, .h = FD_H};
    CU_ASSERT(fd_check_("matmul dinp", &op, inp, di1, N * C, PROBES_ALL, 4));
    CU_ASSERT(fd_check_("matmul dw", &op, w, dw1, OC * C, PROBES_ALL, 5));
    arena_free_(&A);
}

// Sizes where OpenBLAS threads itself: forward and both backward products against naive ones
// (the FD check above has proven the formulas).
static void test_matmul_large(void) {
    Arena A = {0};
    enum { N = 96, C = 160, OC = 200 };
    float *inp = fr_(&A, N * C, 34, 1.0f), *w = fr_(&A, OC * C, 35, 0.5f);
    float *dout = fr_(&A, N * OC, 36, 1.0f), *out = fa_(&A, N * OC);
    float *dinp = fa_(&A, N * C), *dw = fa_(&A, OC * C);
    double *want = da_(&A, N * OC), *want_di = da_(&A, N * C), *want_dw = da_(&A, OC * C);
    matmul_forward(out, inp, w, N, C, OC);
    matmul_backward(dinp, dw, dout, inp, w, N, C, OC);
    naive_matmul_(want, inp, w, N, C, OC);
    naive_mm_(want_di, dout, OC, 1, w, C, 1, N, C, OC);   // dout @ w
    naive_mm_(want_dw, dout, 1, OC, inp, C, 1, OC, C, N); // dout^T @ inp
    CU_ASSERT(allclose_d_("matmul large out", out, want, N * OC, 1e-4, 1e-5));
    CU_ASSERT(allclose_d_("matmul large dinp", dinp, want_di, N * C, 1e-4, 1e-5));
    CU_ASSERT(allclose_d_("matmul large dw", dw, want_dw, OC * C, 1e-4, 1e-5));
    arena_free_(&A);
}

// ---------------------------------------------------------------------------------------
// RoPE

typedef struct {
    float *out, *inp;
    int B, T, H, Dh;
    float theta;
} RopeCtx;

static const float *rope_fwd_(void *p) {
    RopeCtx *c = p;
    rope_forward(c->out, c->inp, c->B, c->T, c->H, c->Dh, c->theta);
    return c->out;
}

// HF: q * cos + rotate_half(q) * sin, rotate_half(x) = cat(-x2, x1), cos/sin of
// cat(freqs, freqs), freqs = t * inv_freq, inv_freq_i = theta^(-2i/Dh).
static void naive_rope_(double *out, const float *inp, int B, int T, int H, int Dh, double theta) {
    const int half = Dh / 2;
    for (int b = 0; b < B; b++) {
        for (int t = 0; t < T; t++) {
            for (int h = 0; h < H; h++) {
                const size_t o = (((size_t)b * T + t) * H + h) * Dh;
                for (int d = 0; d < Dh; d++) {
                    const int i = d % half;
                    const double ang = t * pow(theta, -2.0 * i / Dh);
                    const double rot = d < half ? -(double)inp[o + d + half] : inp[o + d - half];
                    out[o + d] = inp[o + d] * cos(ang) + rot * sin(ang);
                }
            }
        }
    }
}

static void rope_case_(int B, int T, int H, int Dh, size_t max_probe) {
    Arena A = {0};
    const float theta = 10000.0f;
    const size_t n = (size_t)B * T * H * Dh;
    float *inp = fr_(&A, n, 41, 1.0f), *out = fa_(&A, n), *r = fr_(&A, n, 42, 1.0f);
    RopeCtx c = {out, inp, B, T, H, Dh, theta};
    rope_fwd_(&c);
    double *want = da_(&A, n);
    naive_rope_(want, inp, B, T, H, Dh, theta);
    CU_ASSERT(allclose_d_("rope out", out, want, n, 1e-6, 1e-6));
    float *inplace = fcopy_(&A, inp, n);
    rope_forward(inplace, inplace, B, T, H, Dh, theta);
    CU_ASSERT(memcmp(inplace, out, n * sizeof(float)) == 0);

    float *g1 = fa_(&A, n), *g2 = fnan_(&A, n);
    rope_backward(g1, r, B, T, H, Dh, theta);
    rope_backward(g2, r, B, T, H, Dh, theta);
    rope_backward(g2, r, B, T, H, Dh, theta);
    CU_ASSERT(check_written_("rope dinp written", g2, g1, n));
    float *g3 = fcopy_(&A, r, n); // in place
    rope_backward(g3, g3, B, T, H, Dh, theta);
    CU_ASSERT(memcmp(g3, g1, n * sizeof(float)) == 0);

    FdOp op = {.fwd = rope_fwd_, .ctx = &c, .r = r, .n_out = n, .h = FD_H};
    CU_ASSERT(fd_check_("rope dinp", &op, inp, g1, n, max_probe, 6));
    arena_free_(&A);
}

static void test_rope(void) {
    rope_case_(2, 7, 3, 8, PROBES_ALL);
    rope_case_(2, 64, 4, 128, PROBES_LARGE);
}

// ---------------------------------------------------------------------------------------
// Attention

typedef struct {
    float *out, *lse, *q, *k, *v;
    int B, T, H, Dh;
} AttnCtx;

static const float *attn_fwd_(void *p) {
    AttnCtx *c = p;
    attention_forward(c->out, c->lse, c->q, c->k, c->v, c->B, c->T, c->H, c->Dh);
    return c->out;
}

// Full causal softmax, row by row, in double. out is (B,T,H,Dh), lse is (B,H,T)
static void naive_attention_(double *out, double *lse, const float *q, const float *k,
                             const float *v, int B, int T, int H, int Dh) {
    const double scale = 1.0 / sqrt((double)Dh);
    double *s = malloc((size_t)T * sizeof(double));
    for (int b = 0; b < B; b++) {
        for (int h = 0; h < H; h++) {
            for (int t = 0; t < T; t++) {
                const size_t qo = (((size_t)b * T + t) * H + h) * Dh;
                double m = -INFINITY;
                for (int j = 0; j <= t; j++) {
                    const size_t ko = (((size_t)b * T + j) * H + h) * Dh;
                    double d = 0.0;
                    for (int c = 0; c < Dh; c++) d += (double)q[qo + c] * k[ko + c];
                    s[j] = d * scale;
                    m = fmax(m, s[j]);
                }
                double z = 0.0;
                for (int j = 0; j <= t; j++) z += exp(s[j] - m);
                for (int c = 0; c < Dh; c++) {
                    double acc = 0.0;
                    for (int j = 0; j <= t; j++) {
                        acc += exp(s[j] - m) / z * v[(((size_t)b * T + j) * H + h) * Dh + c];
                    }
                    out[qo + c] = acc;
                }
                lse[((size_t)b * H + h) * T + t] = m + log(z);
            }
        }
    }
    free(s);
}

static void attention_forward_case_(int B, int T, int H, int Dh, uint64_t seed) {
    Arena A = {0};
    const size_t n = (size_t)B * T * H * Dh, nl = (size_t)B * H * T;
    float *q = fr_(&A, n, seed, 1.5f), *k = fr_(&A, n, seed + 1, 1.5f);
    float *v = fr_(&A, n, seed + 2, 1.0f), *out = fa_(&A, n), *lse = fa_(&A, nl);
    double *want = da_(&A, n), *want_lse = da_(&A, nl);
    attention_forward(out, lse, q, k, v, B, T, H, Dh);
    naive_attention_(want, want_lse, q, k, v, B, T, H, Dh);
    char name[80];
    snprintf(name, sizeof(name), "attention out B=%d T=%d H=%d Dh=%d", B, T, H, Dh);
    CU_ASSERT(allclose_d_(name, out, want, n, 1e-5, 1e-4));
    snprintf(name, sizeof(name), "attention lse B=%d T=%d H=%d Dh=%d", B, T, H, Dh);
    CU_ASSERT(allclose_d_(name, lse, want_lse, nl, 1e-5, 1e-5));
    arena_free_(&A);
}

static void test_attention_forward(void) {
    // the CPU kernel's query block is 64 rows: T crosses 0, 1 and 2 block boundaries; the last
    // size is above the kernel's OpenMP threshold
    const int Ts[] = {1, 5, 64, 65, 160};
    for (int i = 0; i < 5; i++) attention_forward_case_(2, Ts[i], 2, 16, 51 + 3 * i);
    attention_forward_case_(2, 200, 4, 32, 71);
}

static void attention_backward_case_(int B, int T, int H, int Dh, size_t max_probe) {
    Arena A = {0};
    const size_t n = (size_t)B * T * H * Dh;
    float *q = fr_(&A, n, 81, 1.5f), *k = fr_(&A, n, 82, 1.5f), *v = fr_(&A, n, 83, 1.0f);
    float *out = fa_(&A, n), *lse = fa_(&A, (size_t)B * H * T), *r = fr_(&A, n, 84, 1.0f);
    AttnCtx c = {out, lse, q, k, v, B, T, H, Dh};
    attn_fwd_(&c);

    float *dq = fa_(&A, n), *dk = fa_(&A, n), *dv = fa_(&A, n);
    attention_backward(dq, dk, dv, r, out, lse, q, k, v, B, T, H, Dh);
    float *dq2 = fa_(&A, n), *dk2 = fa_(&A, n), *dv2 = fa_(&A, n);
    for (int rep = 0; rep < 2; rep++) {
        attention_backward(dq2, dk2, dv2, r, out, lse, q, k, v, B, T, H, Dh);
    }
    CU_ASSERT(check_doubled_("attention dq doubled", dq2, dq, n));
    CU_ASSERT(check_doubled_("attention dk doubled", dk2, dk, n));
    CU_ASSERT(check_doubled_("attention dv doubled", dv2, dv, n));
    // one gradient at a time (NULL others) gives the same values
    zero_fill(dq2, n);
    zero_fill(dk2, n);
    zero_fill(dv2, n);
    attention_backward(dq2, NULL, NULL, r, out, lse, q, k, v, B, T, H, Dh);
    attention_backward(NULL, dk2, NULL, r, out, lse, q, k, v, B, T, H, Dh);
    attention_backward(NULL, NULL, dv2, r, out, lse, q, k, v, B, T, H, Dh);
    CU_ASSERT(tu_allclose("attention dq alone", dq2, dq, n, 0, 0));
    CU_ASSERT(tu_allclose("attention dk alone", dk2, dk, n, 0, 0));
    CU_ASSERT(tu_allclose("attention dv alone", dv2, dv, n, 0, 0));

    FdOp op = {.fwd = attn_fwd_, .ctx = &c, .r = r, .n_out = n, .h = FD_H};
    CU_ASSERT(fd_check_("attention dq", &op, q, dq, n, max_probe, 7));
    CU_ASSERT(fd_check_("attention dk", &op, k, dk, n, max_probe, 8));
    CU_ASSERT(fd_check_("attention dv", &op, v, dv, n, max_probe, 9));
    arena_free_(&A);
}

static void test_attention_backward(void) {
    // T = 160 = 2.5 query blocks of 64: full blocks, a partial last block, and keys beyond each
    // block's end that the kernel skips; 10240 elements per tensor, 400 random probes of each
    attention_backward_case_(2, 160, 2, 16, 400);
    // above the OpenMP threshold: (b,h) pairs on different threads
    attention_backward_case_(2, 200, 4, 32, 50);
}

// ---------------------------------------------------------------------------------------
// SwiGLU and add

typedef struct {
    float *out, *g, *u;
    size_t n;
} SwiCtx;

static const float *swi_fwd_(void *p) {
    SwiCtx *c = p;
    swiglu_forward(c->out, c->g, c->u, c->n);
    return c->out;
}

static void swiglu_case_(size_t n, size_t max_probe) {
    Arena A = {0};
    float *g = fr_(&A, n, 91, 4.0f), *u = fr_(&A, n, 92, 1.0f);
    float *out = fa_(&A, n), *r = fr_(&A, n, 93, 1.0f);
    SwiCtx c = {out, g, u, n};
    swi_fwd_(&c);
    double *want = da_(&A, n);
    for (size_t i = 0; i < n; i++) want[i] = g[i] / (1.0 + exp(-(double)g[i])) * u[i];
    CU_ASSERT(allclose_d_("swiglu out", out, want, n, 1e-7, 1e-6));

    float *dg = fa_(&A, n), *du = fa_(&A, n), *dg2 = fnan_(&A, n), *du2 = fnan_(&A, n);
    swiglu_backward(dg, du, r, g, u, n);
    swiglu_backward(dg2, du2, r, g, u, n);
    swiglu_backward(dg2, du2, r, g, u, n);
    CU_ASSERT(check_written_("swiglu dg written", dg2, dg, n));
    CU_ASSERT(check_written_("swiglu du written", du2, du, n));
    float *dg3 = fnan_(&A, n), *du3 = fnan_(&A, n);
    swiglu_backward(dg3, NULL, r, g, u, n);
    CU_ASSERT(check_alone_("swiglu dg alone", dg3, dg, n, du3, n));
    swiglu_backward(NULL, du3, r, g, u, n);
    CU_ASSERT(check_alone_("swiglu du alone", du3, du, n, NULL, 0));

    FdOp op = {.fwd = swi_fwd_, .ctx = &c, .r = r, .n_out = n, .h = FD_H};
    CU_ASSERT(fd_check_("swiglu dg", &op, g, dg, n, max_probe, 10));
    CU_ASSERT(fd_check_("swiglu du", &op, u, du, n, max_probe, 11));
    arena_free_(&A);
}

static void test_swiglu(void) {
    swiglu_case_(300, PROBES_ALL);
    swiglu_case_(70000, PROBES_LARGE);
}

static void test_add(void) {
    const size_t sizes[] = {100, 70000};
    for (int s = 0; s < 2; s++) {
        Arena A = {0};
        const size_t n = sizes[s];
        float *a = fr_(&A, n, 95, 1.0f), *b = fr_(&A, n, 96, 1.0f), *out = fa_(&A, n);
        add_forward(out, a, b, n);
        int ok = 1;
        for (size_t i = 0; i < n; i++) ok &= out[i] == a[i] + b[i];
        CU_ASSERT(ok);
        add_forward(a, a, b, n); // out aliases a
        CU_ASSERT(memcmp(a, out, n * sizeof(float)) == 0);
        arena_free_(&A);
    }
}

// ---------------------------------------------------------------------------------------
// Router

// Well-separated logits: each token's E values are a random permutation of a grid with
// spacing 0.8 below 0.3, jittered by +-0.2, so no two are closer than 0.4 and no FD step (nor
// the large dependency step) can reorder the top-k. lse ~ 1: the fp32 rounding of lse, which
// bounds how finely FD resolves the z term (noise ~ eps * lse^2), stays small.
static void separated_logits_(float *logits, int N, int E, uint64_t seed) {
    uint64_t s = seed;
    for (int t = 0; t < N; t++) {
        float *l = logits + (size_t)t * E;
        for (int e = 0; e < E; e++) l[e] = 0.8f * (e - (E - 1)) + 0.3f;
        for (int e = E - 1; e > 0; e--) {
            const int j = (int)(tu_rand_u64(&s) % (uint64_t)(e + 1));
            const float tmp = l[e];
            l[e] = l[j];
            l[j] = tmp;
        }
        for (int e = 0; e < E; e++) {
            l[e] += 0.4f * ((float)((tu_rand_u64(&s) >> 11) * 0x1.0p-53) - 0.5f);
        }
    }
}

// Naive: scores in double (softmax, or sigmoid with probs = s / sum s); top-k by repeatedly
// taking the largest remaining key s + bias (in double), lower index first on ties.
// probs is (N,E), lse is (N), idx and w are (N,K); bias is (E) or NULL
static void naive_router_(double *probs, double *lse, int32_t *idx, double *w, const float *logits,
                          const float *bias, int N, int E, int K, int norm, int sig) {
    for (int t = 0; t < N; t++) {
        const float *l = logits + (size_t)t * E;
        double m = -INFINITY, z = 0.0;
        for (int e = 0; e < E; e++) m = fmax(m, l[e]);
        for (int e = 0; e < E; e++) z += exp(l[e] - m);
        lse[t] = m + log(z);
        double *p = probs + (size_t)t * E, s[64], S = 0.0;
        for (int e = 0; e < E; e++) {
            s[e] = sig ? 1.0 / (1.0 + exp(-(double)l[e])) : exp(l[e] - m) / z;
            S += s[e];
        }
        for (int e = 0; e < E; e++) p[e] = sig ? s[e] / S : s[e];
        int used[64] = {0};
        double sum = 0.0;
        for (int j = 0; j < K; j++) {
            int best = -1;
            double best_key = 0.0;
            for (int e = 0; e < E; e++) {
                const double key = s[e] + (bias ? bias[e] : 0.0);
                if (!used[e] && (best < 0 || key > best_key)) {
                    best = e;
                    best_key = key;
                }
            }
            used[best] = 1;
            idx[t * K + j] = best;
            sum += s[best];
        }
        for (int j = 0; j < K; j++) w[t * K + j] = s[idx[t * K + j]] / (norm ? sum : 1.0);
    }
}

static void router_forward_case_(int N, int E, int K, int ties) {
    Arena A = {0};
    float *logits = fr_(&A, (size_t)N * E, 101, 3.0f);
    if (ties) {
        // row 0 all equal -> experts 0,1,2; row 1 has three equal maxima at 1, 2, 5
        for (int e = 0; e < E; e++) logits[e] = 0.25f;
        for (int e = 0; e < E; e++) logits[E + e] = (e == 1 || e == 2 || e == 5) ? 2.0f : -1.0f;
    }
    // a selection bias: random, or with two equal largest entries (experts 3 and 6) for the ties
    float *bias = fr_(&A, E, 102, 0.2f);
    if (ties) {
        for (int e = 0; e < E; e++) bias[e] = 0.0f;
        bias[3] = bias[6] = 0.5f;
        bias[4] = -0.5f;
    }
    float *probs = fa_(&A, (size_t)N * E), *lse = fa_(&A, N), *w = fa_(&A, (size_t)N * K);
    int32_t *idx = ia_(&A, (size_t)N * K), *want_idx = ia_(&A, (size_t)N * K);
    double *want_p = da_(&A, (size_t)N * E), *want_lse = da_(&A, N);
    double *want_w = da_(&A, (size_t)N * K);
    for (int sig = 0; sig <= 1; sig++)
        for (int biased = 0; biased <= 1; biased++)
            for (int norm = 0; norm <= 1; norm++) {
                const float *b = biased ? bias : NULL;
                router_forward(probs, lse, idx, w, logits, b, N, E, K, norm,
                               sig ? ROUTER_SIGMOID : ROUTER_SOFTMAX);
                naive_router_(want_p, want_lse, want_idx, want_w, logits, b, N, E, K, norm, sig);
                CU_ASSERT(allclose_d_("router probs", probs, want_p, (size_t)N * E, 1e-7, 1e-6));
                CU_ASSERT(allclose_d_("router lse", lse, want_lse, N, 1e-6, 1e-6));
                CU_ASSERT(allclose_d_("router topk_w", w, want_w, (size_t)N * K, 1e-7, 1e-6));
                CU_ASSERT(memcmp(idx, want_idx, (size_t)N * K * sizeof(int32_t)) == 0);
                double psum = 0.0; // probs sum to 1 per token, softmax and sigmoid alike
                for (int e = 0; e < E; e++) psum += probs[E * (N - 1) + e];
                CU_ASSERT(fabs(psum - 1.0) < 1e-6);
                if (ties && !biased) {
                    CU_ASSERT(idx[0] == 0 && idx[1] == 1 && idx[2] == 2);
                    CU_ASSERT(idx[K] == 1 && idx[K + 1] == 2 && idx[K + 2] == 5);
                }
                if (ties && biased) { // equal scores: the bias decides, ties to the lower index
                    CU_ASSERT(idx[0] == 3 && idx[1] == 6 && idx[2] == 0);
                    // the bias chooses but does not weigh: equal scores, equal weights
                    CU_ASSERT(w[0] == w[1] && w[1] == w[2]);
                }
            }
    arena_free_(&A);
}

static void test_router_forward(void) {
    router_forward_case_(16, 8, 3, 1);
    router_forward_case_(2048, 8, 4, 0);
}

typedef struct {
    float *probs, *lse, *w, *logits;
    int32_t *idx, *idx0; // current and unperturbed top-k choice
    float *packed;       // (N*K + N*E + N): topk_w, probs, lse^2
    int N, E, K, norm;
    const float *sel_bias; // the selection bias (E) or NULL
    int score_fn;
} RouterCtx;

// Outputs topk_w, probs and lse^2, so that sum(out * r) with r = (dtopk_w, dprob_bias per
// token, dz_coef per token) is the loss whose gradient router_backward computes.
static const float *router_fwd_(void *p) {
    RouterCtx *c = p;
    const size_t N = c->N, E = c->E, K = c->K;
    router_forward(c->probs, c->lse, c->idx, c->w, c->logits, c->sel_bias, c->N, c->E, c->K,
                   c->norm, c->score_fn);
    if (memcmp(c->idx, c->idx0, N * K * sizeof(int32_t)) != 0) return NULL;
    memcpy(c->packed, c->w, N * K * sizeof(float));
    memcpy(c->packed + N * K, c->probs, N * E * sizeof(float));
    for (size_t t = 0; t < N; t++) c->packed[N * K + N * E + t] = c->lse[t] * c->lse[t];
    return c->packed;
}

// terms: bit 0 the top-k weights, bit 1 the per-expert probability bias, bit 2 the z term.
// sig: the sigmoid router; biased: a selection bias (it changes which experts are chosen, not
// the formulas: the gradient must follow the chosen ones).
static void router_backward_case_(int N, int E, int K, int norm, int terms, size_t max_probe,
                                  int sig, int biased) {
    Arena A = {0};
    const size_t NK = (size_t)N * K, NE = (size_t)N * E, NO = NK + NE + N;
    float *logits = fa_(&A, NE);
    separated_logits_(logits, N, E, 111);
    float *dw = fr_(&A, NK, 112, 1.0f), *bias = fr_(&A, E, 113, 1.0f);
    float *sel = biased ? fr_(&A, E, 114, sig ? 0.3f : 0.05f) : NULL;
    const float zc = 0.7f;
    const int fn = sig ? ROUTER_SIGMOID : ROUTER_SOFTMAX;
    float *probs = fa_(&A, NE), *lse = fa_(&A, N), *w = fa_(&A, NK), *packed = fa_(&A, NO);
    float *r = fa_(&A, NO);
    int32_t *idx = ia_(&A, NK), *idx0 = ia_(&A, NK);
    const int use_w = terms & 1, use_b = terms & 2, use_z = terms & 4;
    RouterCtx c = {probs, lse, w, logits, idx, idx0, packed, N, E, K, norm, sel, fn};
    router_forward(probs, lse, idx0, w, logits, sel, N, E, K, norm, fn);
    for (size_t i = 0; i < NK; i++) r[i] = use_w ? dw[i] : 0.0f;
    for (size_t i = 0; i < NE; i++) r[NK + i] = use_b ? bias[i % E] : 0.0f;
    for (int t = 0; t < N; t++) r[NK + NE + t] = use_z ? zc : 0.0f;
    router_fwd_(&c);

    float *dl = fa_(&A, NE), *dl2 = fa_(&A, NE);
    for (int rep = 0; rep < 3; rep++) {
        router_backward(rep == 0 ? dl : dl2, use_w ? dw : NULL, use_b ? bias : NULL,
                        use_z ? zc : 0.0f, probs, lse, logits, idx, w, N, E, K, norm, fn);
    }
    CU_ASSERT(check_doubled_("router dlogits doubled", dl2, dl, NE));
    const char *what = terms == 1 ? "topk_w" : terms == 2 ? "prob_bias" : terms == 4 ? "z" : "all";
    char name[64];
    snprintf(name, sizeof(name), "router%s%s %s norm=%d", sig ? " sigmoid" : "",
             biased ? " +bias" : "", what, norm);
    FdOp op = {.fwd = router_fwd_, .ctx = &c, .r = r, .n_out = NO, .h = FD_H};
    CU_ASSERT(fd_check_(name, &op, logits, dl, NE, max_probe, 12 + terms));
    arena_free_(&A);
}

static void test_router_backward(void) {
    // each term alone and all together, with and without renormalised top-k weights
    const int terms[] = {1, 2, 4, 7};
    for (int norm = 0; norm <= 1; norm++) {
        for (int i = 0; i < 4; i++)
            router_backward_case_(16, 8, 3, norm, terms[i], PROBES_ALL, 0, 0);
        router_backward_case_(2048, 8, 4, norm, 7, PROBES_LARGE, 0, 0);
    }
}

// The sigmoid router (DeepSeek-V3) and the selection bias of aux-loss-free balancing.
static void test_router_backward_sigmoid_bias(void) {
    const int terms[] = {1, 2, 4, 7};
    for (int norm = 0; norm <= 1; norm++) {
        for (int i = 0; i < 4; i++)
            router_backward_case_(16, 8, 3, norm, terms[i], PROBES_ALL, 1, 0);
        router_backward_case_(2048, 8, 4, norm, 7, PROBES_LARGE, 1, 0);
        router_backward_case_(16, 8, 3, norm, 7, PROBES_ALL, 1, 1);
        router_backward_case_(16, 8, 3, norm, 7, PROBES_ALL, 0, 1);
        router_backward_case_(2048, 8, 4, norm, 7, PROBES_LARGE, 1, 1);
    }
}

// ---------------------------------------------------------------------------------------
// MoE dispatch: plan, permute, unpermute

// K distinct experts per token, never expert `skip` (so that one expert has no rows).
static void random_topk_(int32_t *idx, int N, int K, int E, int skip, uint64_t seed) {
    uint64_t s = seed;
    for (int t = 0; t < N; t++) {
        for (int j = 0; j < K; j++) {
            int e, dup;
            do {
                e = (int)(tu_rand_u64(&s) % (uint64_t)E);
                dup = e == skip;
                for (int jj = 0; jj < j; jj++) dup |= idx[t * K + jj] == e;
            } while (dup);
            idx[t * K + j] = e;
        }
    }
}

// A plan for random routing. idx, row_token, assign_row are (N*K); offsets is (E+1)
static void random_plan_(int32_t *idx, int32_t *offsets, int32_t *row_token, int32_t *assign_row,
                         int N, int K, int E, uint64_t seed) {
    int32_t counts[64];
    random_topk_(idx, N, K, E, -1, seed);
    moe_plan(counts, offsets, row_token, assign_row, idx, N, K, E);
}

static void test_moe_plan(void) {
    enum { N = 37, K = 4, E = 9, R = N * K };
    int32_t idx[R], counts[E], offsets[E + 1], row_token[R], assign_row[R];
    random_topk_(idx, N, K, E, 5, 121);
    moe_plan(counts, offsets, row_token, assign_row, idx, N, K, E);

    // direct loop: expert by expert, assignments in (t, j) order
    int32_t want_counts[E] = {0}, want_row_token[R], want_assign[R];
    int r = 0;
    for (int e = 0; e < E; e++) {
        for (int a = 0; a < R; a++) {
            if (idx[a] != e) continue;
            want_counts[e]++;
            want_row_token[r] = a / K;
            want_assign[a] = r++;
        }
    }
    CU_ASSERT(memcmp(counts, want_counts, sizeof(counts)) == 0);
    CU_ASSERT(memcmp(row_token, want_row_token, sizeof(row_token)) == 0);
    CU_ASSERT(memcmp(assign_row, want_assign, sizeof(assign_row)) == 0);

    // properties: counts sum to N*K, offsets are their prefix sums, expert 5 is empty,
    // assign_row is a permutation whose rows hold the right token inside the right expert,
    // and rows within an expert are in (t, j) order (stable)
    int sum = 0, ok = offsets[0] == 0;
    for (int e = 0; e < E; e++) {
        sum += counts[e];
        ok &= offsets[e + 1] == offsets[e] + counts[e];
    }
    CU_ASSERT(sum == R && ok && offsets[E] == R && counts[5] == 0);
    int seen[R] = {0}, inv[R];
    ok = 1;
    for (int a = 0; a < R; a++) {
        const int row = assign_row[a], e = idx[a];
        ok &= row >= 0 && row < R && !seen[row];
        if (!(row >= 0 && row < R)) break;
        seen[row] = 1;
        inv[row] = a;
        ok &= row_token[row] == a / K && offsets[e] <= row && row < offsets[e + 1];
    }
    CU_ASSERT(ok);
    for (int e = 0; e < E && ok; e++) {
        for (int rr = offsets[e] + 1; rr < offsets[e + 1]; rr++) ok &= inv[rr] > inv[rr - 1];
    }
    CU_ASSERT(ok);
}

typedef struct {
    float *out, *in;
    const int32_t *map;
    int n, D;
} PermCtx;

static const float *perm_fwd_(void *p) {
    PermCtx *c = p;
    permute_forward(c->out, c->in, c->map, c->n, c->D);
    return c->out;
}

static void permute_case_(int N, int K, int E, int D, size_t max_probe) {
    Arena A = {0};
    const int R = N * K;
    int32_t *idx = ia_(&A, R), *offsets = ia_(&A, E + 1), *row_token = ia_(&A, R);
    int32_t *assign_row = ia_(&A, R);
    random_plan_(idx, offsets, row_token, assign_row, N, K, E, 131);
    float *x = fr_(&A, (size_t)N * D, 132, 1.0f), *xp = fa_(&A, (size_t)R * D);
    float *r = fr_(&A, (size_t)R * D, 133, 1.0f);
    PermCtx c = {xp, x, row_token, R, D};
    perm_fwd_(&c);
    int ok = 1;
    for (int a = 0; a < R; a++) {
        ok &=
            memcmp(xp + (size_t)assign_row[a] * D, x + (size_t)(a / K) * D, D * sizeof(float)) == 0;
    }
    CU_ASSERT(ok);

    float *dx = fa_(&A, (size_t)N * D), *dx2 = fnan_(&A, (size_t)N * D);
    permute_backward(dx, r, assign_row, N, K, D);
    permute_backward(dx2, r, assign_row, N, K, D);
    permute_backward(dx2, r, assign_row, N, K, D);
    CU_ASSERT(check_written_("permute dx written", dx2, dx, (size_t)N * D));
    FdOp op = {.fwd = perm_fwd_, .ctx = &c, .r = r, .n_out = (size_t)R * D, .h = FD_H};
    CU_ASSERT(fd_check_("permute dx", &op, x, dx, (size_t)N * D, max_probe, 20));
    arena_free_(&A);
}

static void test_permute(void) {
    permute_case_(11, 3, 5, 6, PROBES_ALL);
    permute_case_(64, 4, 8, 256, PROBES_LARGE);
}

typedef struct {
    float *out, *yp, *w;
    const int32_t *assign_row;
    int N, K, D;
} UnpermCtx;

static const float *unperm_fwd_(void *p) {
    UnpermCtx *c = p;
    unpermute_forward(c->out, c->yp, c->w, c->assign_row, c->N, c->K, c->D);
    return c->out;
}

static void unpermute_case_(int N, int K, int E, int D, size_t max_probe) {
    Arena A = {0};
    const int R = N * K;
    const size_t no = (size_t)N * D, ny = (size_t)R * D;
    int32_t *idx = ia_(&A, R), *offsets = ia_(&A, E + 1), *row_token = ia_(&A, R);
    int32_t *assign_row = ia_(&A, R);
    random_plan_(idx, offsets, row_token, assign_row, N, K, E, 141);
    float *yp = fr_(&A, ny, 142, 1.0f), *w = fr_(&A, R, 143, 1.0f);
    float *out = fa_(&A, no), *r = fr_(&A, no, 144, 1.0f);
    UnpermCtx c = {out, yp, w, assign_row, N, K, D};
    unperm_fwd_(&c);
    double *want = da_(&A, no);
    for (int t = 0; t < N; t++) {
        for (int d = 0; d < D; d++) {
            double s = 0.0;
            for (int j = 0; j < K; j++) {
                s += (double)w[t * K + j] * yp[(size_t)assign_row[t * K + j] * D + d];
            }
            want[(size_t)t * D + d] = s;
        }
    }
    CU_ASSERT(allclose_d_("unpermute out", out, want, no, 1e-6, 1e-6));

    float *dyp = fa_(&A, ny), *dw = fa_(&A, R), *dyp2 = fnan_(&A, ny), *dw2 = fnan_(&A, R);
    unpermute_backward(dyp, dw, r, yp, w, assign_row, N, K, D);
    unpermute_backward(dyp2, dw2, r, yp, w, assign_row, N, K, D);
    unpermute_backward(dyp2, dw2, r, yp, w, assign_row, N, K, D);
    CU_ASSERT(check_written_("unpermute dyp written", dyp2, dyp, ny));
    CU_ASSERT(check_written_("unpermute dtopk_w written", dw2, dw, R));
    float *dyp3 = fnan_(&A, ny), *dw3 = fnan_(&A, R);
    unpermute_backward(dyp3, NULL, r, yp, w, assign_row, N, K, D);
    CU_ASSERT(check_alone_("unpermute dyp alone", dyp3, dyp, ny, dw3, R));
    unpermute_backward(NULL, dw3, r, yp, w, assign_row, N, K, D);
    CU_ASSERT(check_alone_("unpermute dtopk_w alone", dw3, dw, R, NULL, 0));
    FdOp op = {.fwd = unperm_fwd_, .ctx = &c, .r = r, .n_out = no, .h = FD_H};
    CU_ASSERT(fd_check_("unpermute dyp", &op, yp, dyp, ny, max_probe, 21));
    CU_ASSERT(fd_check_("unpermute dtopk_w", &op, w, dw, R, max_probe, 22));
    arena_free_(&A);
}

static void test_unpermute(void) {
    unpermute_case_(11, 3, 5, 6, PROBES_ALL);
    unpermute_case_(64, 4, 8, 256, PROBES_LARGE);
}

// ---------------------------------------------------------------------------------------
// Grouped expert matmul

typedef struct {
    float *out, *inp, *w;
    const int32_t *offsets;
    int E, C, OC;
} GmmCtx;

static const float *gmm_fwd_(void *p) {
    GmmCtx *c = p;
    grouped_matmul_forward(c->out, c->inp, c->w, c->offsets, c->E, c->C, c->OC);
    return c->out;
}

static void test_grouped_matmul(void) {
    Arena A = {0};
    enum { E = 4, R = 12, C = 10, OC = 7 };
    const int32_t offsets[E + 1] = {0, 3, 8, 8, 12}; // expert 2 has no rows
    float *inp = fr_(&A, R * C, 151, 1.0f), *w = fr_(&A, E * OC * C, 152, 0.5f);
    float *out = fa_(&A, R * OC), *r = fr_(&A, R * OC, 153, 1.0f);
    GmmCtx c = {out, inp, w, offsets, E, C, OC};
    gmm_fwd_(&c);
    double *want = da_(&A, R * OC);
    for (int e = 0; e < E; e++) {
        const int r0 = offsets[e], n = offsets[e + 1] - r0;
        naive_matmul_(want + r0 * OC, inp + r0 * C, w + (size_t)e * OC * C, n, C, OC);
    }
    CU_ASSERT(allclose_d_("grouped_matmul out", out, want, R * OC, 1e-5, 1e-5));

    // dinp is written, dw accumulates
    float *di = fa_(&A, R * C), *dw = fa_(&A, E * OC * C), *di2 = fnan_(&A, R * C);
    float *dw2 = fa_(&A, E * OC * C);
    grouped_matmul_backward(di, dw, r, inp, w, offsets, E, C, OC);
    grouped_matmul_backward(di2, NULL, r, inp, w, offsets, E, C, OC);
    grouped_matmul_backward(di2, dw2, r, inp, w, offsets, E, C, OC);
    grouped_matmul_backward(NULL, dw2, r, inp, w, offsets, E, C, OC);
    CU_ASSERT(check_written_("grouped_matmul dinp written", di2, di, R * C));
    CU_ASSERT(check_doubled_("grouped_matmul dw doubled", dw2, dw, E * OC * C));
    // the empty expert's gradient is left alone, whatever it holds
    float *dw3 = fa_(&A, E * OC * C);
    for (int i = 0; i < E * OC * C; i++) dw3[i] = 3.0f;
    grouped_matmul_backward(NULL, dw3, r, inp, w, offsets, E, C, OC);
    int ok = 1;
    for (int i = 2 * OC * C; i < 3 * OC * C; i++) ok &= dw3[i] == 3.0f && dw[i] == 0.0f;
    CU_ASSERT(ok);

    FdOp op = {.fwd = gmm_fwd_, .ctx = &c, .r = r, .n_out = R * OC, .h = FD_H};
    CU_ASSERT(fd_check_("grouped_matmul dinp", &op, inp, di, R * C, PROBES_ALL, 23));
    CU_ASSERT(fd_check_("grouped_matmul dw", &op, w, dw, E * OC * C, PROBES_ALL, 24));

    // The pair (gate and up of the same input): dinp = a's + b's gradient, written over NaN;
    // each dw accumulates as in the single op; with dinp NULL only the dw.
    float *wb = fr_(&A, E * OC * C, 154, 0.5f), *rb = fr_(&A, R * OC, 155, 1.0f);
    float *dib = fa_(&A, R * C), *dwb = fa_(&A, E * OC * C);
    grouped_matmul_backward(dib, dwb, rb, inp, wb, offsets, E, C, OC);
    float *dip = fnan_(&A, R * C), *dwpa = fa_(&A, E * OC * C), *dwpb = fa_(&A, E * OC * C);
    grouped_matmul_backward_pair(dip, dwpa, dwpb, r, rb, inp, w, wb, offsets, E, C, OC);
    grouped_matmul_backward_pair(dip, NULL, NULL, r, rb, inp, w, wb, offsets, E, C, OC);
    float *sum = fa_(&A, R * C);
    for (int i = 0; i < R * C; i++) sum[i] = di[i] + dib[i];
    CU_ASSERT(tu_allclose("pair dinp", dip, sum, R * C, 1e-6 * tu_max_abs(sum, R * C), 1e-5));
    CU_ASSERT(memcmp(dwpa, dw, sizeof(float) * E * OC * C) == 0);
    CU_ASSERT(memcmp(dwpb, dwb, sizeof(float) * E * OC * C) == 0);
    grouped_matmul_backward_pair(NULL, dwpa, dwpb, r, rb, inp, w, wb, offsets, E, C, OC);
    CU_ASSERT(check_doubled_("pair dw_a doubled", dwpa, dw, E * OC * C));
    CU_ASSERT(check_doubled_("pair dw_b doubled", dwpb, dwb, E * OC * C));
    arena_free_(&A);
}

// ---------------------------------------------------------------------------------------
// Cross-entropy

typedef struct {
    float *losses, *logits;
    const int32_t *targets;
    int N, V;
    double scale;
} CeCtx;

static double ce_loss_(void *p) {
    CeCtx *c = p;
    return c->scale * crossentropy_forward(c->losses, c->logits, c->targets, c->N, c->V);
}

static void crossentropy_case_(int N, int V, size_t max_probe) {
    Arena A = {0};
    const float scale = 2.5f;
    const size_t n = (size_t)N * V;
    int32_t *targets = ia_(&A, N);
    uint64_t s = 160 + N;
    for (int i = 0; i < N; i++) targets[i] = (int32_t)(tu_rand_u64(&s) % (uint64_t)V);
    targets[1] = targets[N - 1] = -1; // no target: no loss, no gradient
    targets[0] = 0;
    targets[2] = V - 1;
    float *logits = fr_(&A, n, 161, 4.0f), *losses = fa_(&A, N);
    double *want = da_(&A, N), *want_dl = da_(&A, n), want_sum = 0.0;
    for (int i = 0; i < N; i++) {
        const float *l = logits + (size_t)i * V;
        double m = -INFINITY, z = 0.0;
        for (int j = 0; j < V; j++) m = fmax(m, l[j]);
        for (int j = 0; j < V; j++) z += exp(l[j] - m);
        want[i] = targets[i] < 0 ? 0.0 : m + log(z) - l[targets[i]];
        want_sum += want[i];
        for (int j = 0; j < V; j++) {
            const double onehot = j == targets[i] ? 1.0 : 0.0;
            want_dl[(size_t)i * V + j] =
                targets[i] < 0 ? 0.0 : scale * (exp(l[j] - m) / z - onehot);
        }
    }
    const double sum = crossentropy_forward(losses, logits, targets, N, V);
    CU_ASSERT(allclose_d_("crossentropy losses", losses, want, N, 1e-6, 1e-6));
    CU_ASSERT(fabs(sum - want_sum) <= 1e-6 * fabs(want_sum));

    float *dl = fa_(&A, n), *losses2 = fa_(&A, N);
    for (size_t i = 0; i < n; i++) dl[i] = 123.0f; // written, not accumulated
    const double sum2 = crossentropy_forward_backward(dl, losses2, logits, targets, N, V, scale);
    CU_ASSERT(sum2 == sum);
    CU_ASSERT(memcmp(losses2, losses, N * sizeof(float)) == 0);
    CU_ASSERT(allclose_d_("crossentropy dlogits", dl, want_dl, n, 1e-7, 1e-5));
    float *alias = fcopy_(&A, logits, n); // dlogits may alias logits
    const double sum3 = crossentropy_forward_backward(alias, losses2, alias, targets, N, V, scale);
    CU_ASSERT(sum3 == sum);
    CU_ASSERT(memcmp(alias, dl, n * sizeof(float)) == 0);

    // FD of scale * crossentropy_forward's total (double). Its roundoff between two probes of
    // logit j: only j's fp32 exp term is recomputed (every term when j is the row max, as the
    // max is subtracted), so the sum errs by <= eps_f32 * p_j relative and the loss by
    // <= eps_f32 * scale * (p_j + [j is the row max]); the target logit enters exactly.
    double *noise = da_(&A, n);
    for (int i = 0; i < N; i++) {
        const float *l = logits + (size_t)i * V;
        int jmax = 0;
        for (int j = 1; j < V; j++) jmax = l[j] > l[jmax] ? j : jmax;
        for (int j = 0; j < V; j++) {
            const double p = want_dl[(size_t)i * V + j] / scale + (j == targets[i]);
            noise[(size_t)i * V + j] = FLT_EPSILON * scale * (fabs(p) + (j == jmax));
        }
    }
    CeCtx c = {losses, logits, targets, N, V, scale};
    FdOp op = {.ctx = &c, .h = FD_H, .loss = ce_loss_, .noise = noise};
    CU_ASSERT(fd_check_("crossentropy dlogits", &op, logits, dl, n, max_probe, 25));
    arena_free_(&A);
}

static void test_crossentropy(void) {
    crossentropy_case_(6, 37, PROBES_ALL);
    crossentropy_case_(8, 8200, PROBES_LARGE);
}

// ---------------------------------------------------------------------------------------
// AdamW and reductions

static void test_adamw(void) {
    // lr 0.01, b1 0.9, b2 0.95, eps 1e-8, wd 0.1, step t = 3, grad_scale 0.5. Element 0 by hand:
    //   g = 0.5 * 0.1 = 0.05; m = 0.9*0.01 + 0.1*0.05 = 0.014; v = 0.95*0.001 + 0.05*0.0025
    //   = 0.001075; mhat = 0.014 / (1 - 0.9^3) = 0.0516605166; vhat = 0.001075 / (1 - 0.95^3)
    //   = 0.00753724803; p = 1 - 0.01 * (0.0516605166 / 0.0868173 + 0.1 * 1) = 0.993049516.
    float p[4] = {1.0f, -0.5f, 0.25f, 0.0f}, g[4] = {0.1f, -0.2f, 0.0f, 0.3f};
    float m[4] = {0.01f, 0.0f, 0.02f, -0.01f}, v[4] = {0.001f, 0.002f, 0.0004f, 0.0001f};
    const float want_p[4] = {0.993049516f, -0.496655389f, 0.236882056f, -0.00239386594f};
    const float want_m[4] = {0.014f, -0.01f, 0.018f, 0.006f};
    const float want_v[4] = {0.001075f, 0.0024f, 0.00038f, 0.00122f};
    adamw_update(p, g, m, v, 4, 0.01f, 0.9f, 0.95f, 1e-8f, 0.1f, 3, 0.5f);
    CU_ASSERT(tu_allclose("adamw p", p, want_p, 4, 1e-7, 1e-6));
    CU_ASSERT(tu_allclose("adamw m", m, want_m, 4, 1e-9, 1e-6));
    CU_ASSERT(tu_allclose("adamw v", v, want_v, 4, 1e-10, 1e-6));

    // above the OpenMP threshold, against the same formula in double
    Arena A = {0};
    const size_t n = 70000;
    float *pp = fr_(&A, n, 172, 1.0f), *gg = fr_(&A, n, 173, 1.0f), *mm = fr_(&A, n, 174, 0.1f);
    float *vv = fr_(&A, n, 175, 0.01f);
    for (size_t i = 0; i < n; i++) vv[i] = fabsf(vv[i]);
    double *wp = da_(&A, n);
    for (size_t i = 0; i < n; i++) {
        const double gi = 0.5 * gg[i], mi = 0.9 * mm[i] + 0.1 * gi;
        const double vi = 0.95 * vv[i] + 0.05 * gi * gi;
        const double mhat = mi / (1 - pow(0.9, 3)), vhat = vi / (1 - pow(0.95, 3));
        wp[i] = pp[i] - 0.01 * (mhat / (sqrt(vhat) + 1e-8) + 0.1 * pp[i]);
    }
    adamw_update(pp, gg, mm, vv, n, 0.01f, 0.9f, 0.95f, 1e-8f, 0.1f, 3, 0.5f);
    CU_ASSERT(allclose_d_("adamw large p", pp, wp, n, 1e-6, 1e-6));
    arena_free_(&A);
}

static void test_reductions(void) {
    Arena A = {0};
    const size_t n = 100003; // above the parallel threshold, not a multiple of the chunks
    float *x = fr_(&A, n, 171, 2.0f);
    double want = 0.0;
    for (size_t i = 0; i < n; i++) want += (double)x[i] * x[i];
    CU_ASSERT(fabs(sum_squares(x, n) - want) <= 1e-12 * want);
    CU_ASSERT(sum_squares(x, 3) == (double)x[0] * x[0] + (double)x[1] * x[1] + (double)x[2] * x[2]);
    CU_ASSERT(sum_squares(x, 0) == 0.0);
    float *y = fcopy_(&A, x, n);
    scale_inplace(y, 0.5f, n);
    int ok = 1;
    for (size_t i = 0; i < n; i++) ok &= y[i] == 0.5f * x[i];
    CU_ASSERT(ok);
    zero_fill(y, n);
    CU_ASSERT(tu_max_abs(y, n) == 0.0);
    arena_free_(&A);
}

static void test_info(void) {
    const char *info = kernels_blas_info();
    printf("\n    %s, kernels_num_threads %d ", info, kernels_num_threads());
    CU_ASSERT(strstr(info, "OpenBLAS") != NULL);
    CU_ASSERT(kernels_num_threads() >= 1);
}

int main(void) {
    const TuTest tests[] = {
        {"embedding", test_embedding},
        {"rmsnorm", test_rmsnorm},
        {"matmul", test_matmul},
        {"matmul_large", test_matmul_large},
        {"rope", test_rope},
        {"attention_forward", test_attention_forward},
        {"attention_backward", test_attention_backward},
        {"swiglu", test_swiglu},
        {"add", test_add},
        {"router_forward", test_router_forward},
        {"router_backward", test_router_backward},
        {"router_backward sigmoid, selection bias", test_router_backward_sigmoid_bias},
        {"moe_plan", test_moe_plan},
        {"permute", test_permute},
        {"unpermute", test_unpermute},
        {"grouped_matmul", test_grouped_matmul},
        {"crossentropy", test_crossentropy},
        {"adamw", test_adamw},
        {"reductions", test_reductions},
        {"info", test_info},
    };
    return tu_run("ops", tests, (int)(sizeof(tests) / sizeof(tests[0])));
}
