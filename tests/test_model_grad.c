// test_model_grad: finite-difference check of the whole model's gradient (tiny dense and tiny
// MoE, norm_topk_prob off and on), every parameter tensor covered.
//
// For every tensor we compare d loss / d theta from model_backward with finite differences along
// (a) two random unit directions v (+-1/sqrt(n) on every element) and (b) three single elements,
// using Richardson-extrapolated central differences (4 D(h/2) - D(h)) / 3 with h = 1e-2, whose
// truncation error is O(h^4) and negligible here. The loss is ce + lb_coef*lb + z_coef*z with
// the coefficients raised to 0.5 and 0.1 so that the router's auxiliary-loss gradients are well
// above the noise floor.
//
// Tolerance. The loss (~6) is computed in fp32 with sums in double; its rounding noise is
// ~1e-6 absolute, which the difference quotients turn into ~1e-4 absolute noise (largest
// observed: 9e-5). We require |num - ana| <= 1e-3 * max(|num|, |ana|) + 2e-4: a missing or
// wrong gradient term (O(10%) or more of a tensor's gradient, which is 1e-2..1 here) fails.
//
// The sigmoid router with an expert bias and f_e fixed to global-batch counts (lb_scope =
// global_batch: the trainer's pre-pass gives them; here arbitrary counts) is checked the same
// way: the bias moves the selection, the fixed f must be what the lb gradient uses.
//
// Top-k routing is piecewise: a probe whose perturbation changes any token's expert selection
// measures a jump, not a derivative. Such probes are detected (the selection is compared) and
// retried with a smaller step; they are counted and must stay rare.
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tests/testutil.h"
#include "train/config.h"
#include "train/model.h"

#define FD_H 1e-2
#define FD_RTOL 1e-3
#define FD_ATOL 2e-4

static void tiny_config_(Config *c, int n_experts, int norm_topk, int sigmoid) {
    MoetErr err;
    config_defaults(c);
    const char *sets[] = {
        "model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.vocab_size=100",
        "model.max_seq_len=16", "model.d_ff=48", "model.init_std=0.2", "moe.expert_d_ff=24",
        "moe.top_k=2", "moe.lb_coef=0.5", "moe.z_coef=0.1", "train.seq_len=12",
        "train.micro_batch=2", "train.global_batch=2", "train.max_steps=1", "data.eos_id=0",
    };
    for (size_t i = 0; i < sizeof sets / sizeof sets[0]; i++)
        if (config_set(c, sets[i], &err)) fprintf(stderr, "%s\n", err.msg);
    char s[64];
    snprintf(s, sizeof s, "moe.n_experts=%d", n_experts);
    config_set(c, s, &err);
    config_set(c, norm_topk ? "moe.norm_topk_prob=true" : "moe.norm_topk_prob=false", &err);
    if (sigmoid) {
        config_set(c, "moe.router=sigmoid", &err);
        config_set(c, "moe.bias_update_rate=0.01", &err);
    }
    if (config_validate(c, "tiny", &err)) fprintf(stderr, "%s\n", err.msg);
}

// Loss at the current parameters; also copies every layer's top-k selection into sel. train:
// the training forward (model_backward may follow).
static double loss_at_(Model *m, const int32_t *tokens, int32_t *sel, int train) {
    if (train) model_forward_train(m, tokens);
    else model_forward(m, tokens);
    if (sel && m->E > 0) {
        size_t nk = (size_t)m->B * m->T * m->K;
        for (int l = 0; l < m->L; l++) memcpy(sel + l * nk, m->acts[l].topk_idx, nk * 4);
    }
    return m->loss;
}

static int same_sel_(const int32_t *a, const int32_t *b, size_t n) {
    return memcmp(a, b, n * sizeof(int32_t)) == 0;
}

// Central difference of the loss along v (NULL: unit vector at element `elem`) with step h.
// Returns 0 and the quotient in *d, or -1 when the step changed some token's expert selection.
static int central_diff_(Model *m, const int32_t *tokens, const ParamTensor *t, const float *v,
                         size_t elem, double h, const int32_t *sel0, int32_t *sel, double *d) {
    float *w = m->params + t->offset;
    size_t nsel = (size_t)m->L * m->B * m->T * (m->K ? m->K : 1);
    float *saved = malloc(t->numel * sizeof(float));
    memcpy(saved, w, t->numel * sizeof(float));
    if (v) for (size_t i = 0; i < t->numel; i++) w[i] = saved[i] + (float)(h * v[i]);
    else w[elem] = saved[elem] + (float)h;
    double lp = loss_at_(m, tokens, sel, 0);
    int changed = m->E > 0 && !same_sel_(sel, sel0, nsel);
    if (v) for (size_t i = 0; i < t->numel; i++) w[i] = saved[i] - (float)(h * v[i]);
    else w[elem] = saved[elem] - (float)h;
    double lm = loss_at_(m, tokens, sel, 0);
    changed |= m->E > 0 && !same_sel_(sel, sel0, nsel);
    memcpy(w, saved, t->numel * sizeof(float));
    free(saved);
    *d = (lp - lm) / (2.0 * h);
    return changed ? -1 : 0;
}

// Checks the gradient of tensor t along v (NULL: element `elem`) against Richardson-extrapolated
// central differences (4 D(h/2) - D(h)) / 3, whose truncation error is O(h^4).
// Returns 1 pass, 0 fail, -1 when every step size changed the routing.
static int probe_(Model *m, const int32_t *tokens, const ParamTensor *t, const float *v,
                  size_t elem, const int32_t *sel0, int32_t *sel, double *num_out,
                  double *ana_out) {
    const float *g = m->grads + t->offset;
    double ana = 0.0;
    if (v) for (size_t i = 0; i < t->numel; i++) ana += (double)g[i] * v[i];
    else ana = g[elem];
    for (double h = FD_H; h > 1e-4; h /= 4) {  // h: the step in L2 norm
        double d1, d2;
        if (central_diff_(m, tokens, t, v, elem, h, sel0, sel, &d1) ||
            central_diff_(m, tokens, t, v, elem, h / 2, sel0, sel, &d2))
            continue;
        double num = (4.0 * d2 - d1) / 3.0;
        *num_out = num;
        *ana_out = ana;
        // the noise floor scales as 1/h: widen the absolute part for smaller steps
        double atol = FD_ATOL * (FD_H / h);
        if (getenv("FD_VERBOSE"))
            printf("      %-50s %s num %+.6e ana %+.6e rel %.2e\n", t->name, v ? "dir" : "elt",
                   num, ana, fabs(num - ana) / fmax(fabs(num), 1e-12));
        return fabs(num - ana) <= FD_RTOL * fmax(fabs(num), fabs(ana)) + atol;
    }
    return -1;
}

static void check_model_(int n_experts, int norm_topk, int sigmoid) {
    Config c;
    tiny_config_(&c, n_experts, norm_topk, sigmoid);
    Model m;
    MoetErr err;
    CU_ASSERT_EQUAL_FATAL(model_create(&m, &c, 0, 1, &err), 0);
    m.head_rows_max = 5;  // the LM head in chunks of 5, 5, 5, 5, 4 rows
    CU_ASSERT_EQUAL_FATAL(model_set_batch(&m, c.micro_batch, c.seq_len, &err), 0);
    CU_ASSERT_EQUAL(m.head_rows, 5);
    model_init_weights(&m, 1234);
    int N = m.B * m.T;
    int64_t *gcounts = NULL;
    if (sigmoid) {
        // a selection bias that changes the choice, and f_e from "global" counts
        for (int l = 0; l < m.L; l++)
            for (int e = 0; e < m.E; e++)
                m.p.layers[l].expert_bias[e] = 0.02f * (float)(e % 3) - 0.02f;
        gcounts = malloc(sizeof(int64_t) * m.L * m.E);
        for (int i = 0; i < m.L * m.E; i++) gcounts[i] = 10 + 7 * (i % 5);
        m.lb_global_counts = gcounts;
    }
    int32_t *tokens = malloc(sizeof(int32_t) * N);
    uint64_t s = 99;
    for (int i = 0; i < N; i++) tokens[i] = (int32_t)(tu_rand_u64(&s) % (uint64_t)c.vocab_size);

    size_t nsel = (size_t)m.L * N * (m.K ? m.K : 1);
    int32_t *sel0 = calloc(nsel, sizeof(int32_t)), *sel = calloc(nsel, sizeof(int32_t));
    model_zero_grad(&m);
    loss_at_(&m, tokens, sel0, 1);
    const char *what = sigmoid     ? "moe, sigmoid + bias + global f"
                       : n_experts ? (norm_topk ? "moe, norm_topk" : "moe")
                                   : "dense";
    printf("\n    %s: loss %.6f (ce %.6f lb %.6f z %.6f)\n", what, m.loss, m.ce, m.lb, m.z);
    model_backward(&m);
    // Backward consumed the logits; the probes below re-run forward only.

    int fails = 0, probes = 0, skipped = 0;
    for (int i = 0; i < m.n_tensors; i++) {
        const ParamTensor *t = &m.tensors[i];
        if (t->no_optim) { // the expert bias: no gradient by design (it only selects)
            const float *g = m.grads + t->offset;
            for (size_t j = 0; j < t->numel; j++) CU_ASSERT(g[j] == 0.0f);
            continue;
        }
        float *v = malloc(t->numel * sizeof(float));
        int tensor_fail = 0;
        for (int k = 0; k < 5; k++) {
            double num = 0, ana = 0;
            int r;
            size_t elem = 0;
            if (k < 2) {
                uint64_t vs = 1000 + 17 * i + k;
                // +-1/sqrt(n): a unit vector, so that h moves the tensor by h in L2 norm
                float a = (float)(1.0 / sqrt((double)t->numel));
                for (size_t j = 0; j < t->numel; j++) v[j] = (tu_rand_u64(&vs) & 1) ? a : -a;
                r = probe_(&m, tokens, t, v, 0, sel0, sel, &num, &ana);
            } else {
                uint64_t es = 77 + 31 * i + k;
                elem = tu_rand_u64(&es) % t->numel;
                // the embedding's gradient is zero off the tokens used: probe a used row
                if (strcmp(t->name, "model.embed_tokens.weight") == 0)
                    elem = (size_t)tokens[elem % N] * m.D + elem % m.D;
                r = probe_(&m, tokens, t, NULL, elem, sel0, sel, &num, &ana);
            }
            probes++;
            if (r < 0) {
                skipped++;
                continue;
            }
            if (!r) {
                tensor_fail = 1;
                printf("    FD mismatch %s (%s%zu): numeric %.7g analytic %.7g\n", t->name,
                       k < 2 ? "direction " : "element ", k < 2 ? (size_t)k : elem, num, ana);
            }
        }
        fails += tensor_fail;
        free(v);
    }
    printf("    %d tensors, %d probes, %d skipped for routing changes, %d tensors failed\n",
           m.n_tensors, probes, skipped, fails);
    CU_ASSERT_EQUAL(fails, 0);
    CU_ASSERT(skipped * 10 <= probes);  // routing flips must stay rare
    free(sel0);
    free(sel);
    free(tokens);
    free(gcounts);
    model_free(&m);
}

// The same weights must come out of model_init_weights for any expert layout (§3).
static void test_init_layout_independent(void) {
    Config c;
    tiny_config_(&c, 4, 0, 0);
    Model full, half;
    MoetErr err;
    CU_ASSERT_EQUAL_FATAL(model_create(&full, &c, 0, 1, &err), 0);
    CU_ASSERT_EQUAL_FATAL(model_create(&half, &c, 1, 2, &err), 0);  // experts 2 and 3
    model_init_weights(&full, 7);
    model_init_weights(&half, 7);
    int same = 1;
    double sum2 = 0.0;
    size_t cnt = 0;
    for (int i = 0; i < full.n_tensors; i++) {
        const ParamTensor *a = &full.tensors[i], *b = &half.tensors[i];
        const float *wa = full.params + a->offset, *wb = half.params + b->offset;
        size_t off = a->is_expert ? 2 * (a->numel / a->shape[0]) : 0;
        same &= memcmp(wa + off, wb, b->numel * sizeof(float)) == 0;
        for (size_t j = 0; a->ndim > 1 && j < a->numel; j++) {
            CU_ASSERT(fabsf(wa[j]) <= 3.0f * c.init_std * 1.0001f);
            sum2 += (double)wa[j] * wa[j];
            cnt++;
        }
    }
    CU_ASSERT(same);
    // truncation at 3 sigma leaves a std of 0.9866 sigma
    double std = sqrt(sum2 / cnt);
    printf("\n    init std %.5f (expected %.5f)\n", std, 0.98657 * c.init_std);
    CU_ASSERT(fabs(std - 0.98657 * c.init_std) < 0.01 * c.init_std);
    model_free(&full);
    model_free(&half);
}

// The LM head in chunks (model_forward_train) against one chunk: the same losses and gradients
// up to rounding (sgemm may block a product of 6 rows differently from one of 24, and lm_head's
// gradient is summed chunk by chunk). A chunk's rows misplaced, a gradient chunk dropped or
// applied twice all fail by far more.
static void test_head_chunks(void) {
    Config c;
    tiny_config_(&c, 4, 0, 0);
    Model one, chunked;
    MoetErr err;
    CU_ASSERT_EQUAL_FATAL(model_create(&one, &c, 0, 1, &err), 0);
    CU_ASSERT_EQUAL_FATAL(model_create(&chunked, &c, 0, 1, &err), 0);
    chunked.head_rows_max = 7;  // 24 rows: 4 chunks of 6
    CU_ASSERT_EQUAL_FATAL(model_set_batch(&one, c.micro_batch, c.seq_len, &err), 0);
    CU_ASSERT_EQUAL_FATAL(model_set_batch(&chunked, c.micro_batch, c.seq_len, &err), 0);
    const int N = one.B * one.T;
    CU_ASSERT_EQUAL(one.head_rows, N);
    CU_ASSERT_EQUAL(chunked.head_rows, 6);
    CU_ASSERT(chunked.arena_floats < one.arena_floats);
    model_init_weights(&one, 55);
    model_init_weights(&chunked, 55);
    int32_t *tokens = malloc(sizeof(int32_t) * N);
    uint64_t s = 5;
    for (int i = 0; i < N; i++) tokens[i] = (int32_t)(tu_rand_u64(&s) % (uint64_t)c.vocab_size);
    model_zero_grad(&one);
    model_zero_grad(&chunked);
    // twice: the second accumulates onto the first (as gradient accumulation does)
    for (int rep = 0; rep < 2; rep++) {
        model_forward_train(&one, tokens);
        model_forward_train(&chunked, tokens);
        double dl = 0.0;
        for (int i = 0; i < N; i++) dl = fmax(dl, fabs((double)one.losses[i] - chunked.losses[i]));
        printf("\n    pass %d: loss %.9f vs %.9f, max row loss difference %.3g", rep, one.loss,
               chunked.loss, dl);
        CU_ASSERT(fabs(one.loss - chunked.loss) <= 1e-6 * fabs(one.loss));
        CU_ASSERT(dl <= 1e-5);
        model_backward(&one);
        model_backward(&chunked);
    }
    // an eval forward gives the training forward's loss, and leaves the gradients alone
    double train_loss = chunked.loss;
    float g0 = chunked.grads[0];
    model_forward(&chunked, tokens);
    CU_ASSERT(fabs(chunked.loss - train_loss) <= 1e-12 * fabs(train_loss));
    CU_ASSERT(chunked.grads[0] == g0);
    double worst = 0.0;
    for (int t = 0; t < one.n_tensors; t++) {
        const ParamTensor *pt = &one.tensors[t];
        const float *a = one.grads + pt->offset, *b = chunked.grads + pt->offset;
        double amax = 0.0, dmax = 0.0;
        for (size_t j = 0; j < pt->numel; j++) {
            amax = fmax(amax, fabs(a[j]));
            dmax = fmax(dmax, fabs((double)a[j] - b[j]));
        }
        const double rel = amax > 0 ? dmax / amax : dmax;
        worst = fmax(worst, rel);
        if (rel > 1e-5) printf("    %s: max |diff| / max |grad| = %.3g\n", pt->name, rel);
    }
    printf("\n    loss %.9f; worst gradient difference / max |grad| of a tensor: %.3g\n",
           one.loss, worst);
    CU_ASSERT(worst <= 1e-5);
    free(tokens);
    model_free(&one);
    model_free(&chunked);
}

static void test_dense(void) { check_model_(0, 0, 0); }
static void test_moe(void) { check_model_(4, 0, 0); }
static void test_moe_norm_topk(void) { check_model_(4, 1, 0); }
static void test_moe_sigmoid_bias_global(void) { check_model_(4, 1, 1); }

int main(void) {
    const TuTest tests[] = {
        {"dense model gradient (finite differences)", test_dense},
        {"MoE model gradient (finite differences)", test_moe},
        {"MoE model gradient, norm_topk_prob (finite differences)", test_moe_norm_topk},
        {"MoE gradient, sigmoid router, expert bias, global f (finite differences)",
         test_moe_sigmoid_bias_global},
        {"init is identical for any expert layout", test_init_layout_independent},
        {"LM head in chunks = in one chunk", test_head_chunks},
    };
    return tu_run("model_grad", tests, (int)(sizeof tests / sizeof tests[0]));
}
