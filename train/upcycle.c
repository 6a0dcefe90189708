// upcycle: a dense model -> an MoE model with the same output at step 0 (see upcycle.h).
//
// Why the output is unchanged, with G slices of width F = d_ff / G and norm_topk_prob = true:
// the dense MLP is down(silu(gate x) * up x) = sum_s down[:, slice s] (silu(gate_s x) * up_s x),
// a sum over the G column blocks of down. Expert e = j*G + s computes slice s of copy j with
// down scaled by G. The router gives the G experts of a copy the same row ("virtual groups"),
// so they get bit-identical logits and probabilities; top-k (k a multiple of G, ties taken in
// index order, the slices of a copy adjacent) picks whole copies, and after renormalisation the
// weights of one slice s sum to 1/G over the picked copies: sum_e w_e * G * slice_s(e) = dense.
#include "train/upcycle.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

// ---------------------------------------------------------------------------------------
// checks

static int is_mlp_(const char *name) {
    return strstr(name, ".mlp.") != NULL;
}

static void shape_str_(const ParamTensor *t, char *buf, size_t size) {
    int n = snprintf(buf, size, "[");
    for (int i = 0; i < t->ndim && n < (int)size; i++)
        n += snprintf(buf + n, size - (size_t)n, "%s%lld", i ? ", " : "",
                      (long long)t->global_shape[i]);
    if (n < (int)size) snprintf(buf + n, size - (size_t)n, "]");
}

static const ParamTensor *find_(const ParamTensor *t, int n, const char *name) {
    for (int i = 0; i < n; i++)
        if (strcmp(t[i].name, name) == 0) return &t[i];
    return NULL;
}

// The [model] keys that differ and decide the non-MLP shapes, for the shape error's hint.
static void shape_keys_hint_(const Config *d, const Config *m, const UpcycleOpts *o, char *buf,
                             size_t size) {
    int n = 0;
    buf[0] = '\0';
#define KEY_(field, key)                                                                           \
    if (d->field != m->field && n < (int)size)                                                     \
        n += snprintf(buf + n, size - (size_t)n, "%s[model] " key " is %d in %s but %d in %s",     \
                      n ? "; " : "", d->field, o->dense_name, m->field, o->moe_name);
    KEY_(d_model, "d_model")
    KEY_(n_layers, "n_layers")
    KEY_(padded_vocab, "vocab_size (padded)")
#undef KEY_
    if (!n) snprintf(buf, size, "the [model] keys of %s and %s differ", o->dense_name, o->moe_name);
}

// Every non-MLP tensor of either model must exist in the other with the same shape.
static int check_shapes_(const Config *dc, const Config *mc, const UpcycleOpts *o, MoetErr *err) {
    ParamTensor *dt = NULL, *mt = NULL;
    int nd = 0, nm = 0, rc;
    size_t np;
    if ((rc = model_tensor_table(dc, 0, 1, &dt, &nd, &np, err))) return rc;
    if ((rc = model_tensor_table(mc, 0, 1, &mt, &nm, &np, err))) {
        free(dt);
        return rc;
    }
    char hint[600], sd[64], sm[64];
    shape_keys_hint_(dc, mc, o, hint, sizeof hint);
    for (int pass = 0; pass < 2 && !rc; pass++) {
        // pass 0: the dense model's tensors; pass 1: tensors only the MoE model has
        const ParamTensor *a = pass ? mt : dt, *b = pass ? dt : mt;
        int na = pass ? nm : nd, nb = pass ? nd : nm;
        for (int i = 0; i < na && !rc; i++) {
            if (is_mlp_(a[i].name)) continue;
            const ParamTensor *t = find_(b, nb, a[i].name);
            const ParamTensor *d = pass ? t : &a[i], *m = pass ? &a[i] : t;
            if (!t) {
                rc = moet_errf(err, MOET_EUSAGE, "upcycle: %s exists in %s but not in %s (%s)",
                               a[i].name, pass ? o->moe_name : o->dense_name,
                               pass ? o->dense_name : o->moe_name, hint);
            } else if (d->ndim != m->ndim ||
                       memcmp(d->global_shape, m->global_shape, sizeof d->global_shape)) {
                shape_str_(d, sd, sizeof sd);
                shape_str_(m, sm, sizeof sm);
                rc = moet_errf(err, MOET_EUSAGE,
                               "upcycle: %s is %s in %s but the MoE config %s wants %s (%s)",
                               d->name, sd, o->dense_name, o->moe_name, sm, hint);
            }
        }
    }
    free(dt);
    free(mt);
    return rc;
}

int upcycle_check(const Config *dc, const Config *mc, const UpcycleOpts *o, MoetErr *err) {
    const int G = o->granularity, E = mc->n_experts, K = mc->top_k, F = mc->expert_d_ff;
    if (dc->n_experts != 0)
        return moet_errf(err, MOET_EUSAGE,
                         "upcycle: %s is an MoE model ([moe] n_experts = %d): upcycling starts "
                         "from a dense model (n_experts = 0)",
                         o->dense_name, dc->n_experts);
    if (E <= 0)
        return moet_errf(err, MOET_EUSAGE,
                         "upcycle: %s is a dense config ([moe] n_experts = 0): give an MoE config "
                         "(n_experts > 0), e.g. configs/tiny-moe.ini",
                         o->moe_name);
    if (G < 1) return moet_errf(err, MOET_EUSAGE, "upcycle: granularity %d: it must be >= 1", G);
    if (!(o->router_std >= 0.0f) || !isfinite(o->router_std))
        return moet_errf(err, MOET_EUSAGE, "upcycle: router std %g: it must be finite and >= 0",
                         (double)o->router_std);
    int rc = check_shapes_(dc, mc, o, err);
    if (rc) return rc;
    if (dc->d_ff != G * F) {
        char fix[240];
        int n = 0;
        const int g = F > 0 && dc->d_ff % F == 0 ? dc->d_ff / F : 0; // the G that would fit
        if (g && E % g == 0 && K % g == 0)
            n = snprintf(fix, sizeof fix, "granularity %d, or ", g);
        else if (g)
            n = snprintf(fix, sizeof fix,
                         "granularity %d (with n_experts and top_k multiples of %d), or ", g, g);
        if (dc->d_ff % G == 0)
            snprintf(fix + n, sizeof fix - (size_t)n, "set moe.expert_d_ff=%d", dc->d_ff / G);
        else
            snprintf(fix + n, sizeof fix - (size_t)n, "granularity 1 with moe.expert_d_ff=%d",
                     dc->d_ff);
        return moet_errf(err, MOET_EUSAGE,
                         "upcycle: the dense MLP of %s has d_ff = %d but %s has [moe] expert_d_ff "
                         "= %d and the granularity is %d: each expert is a 1/G slice of the dense "
                         "MLP, so d_ff must equal G x expert_d_ff; use %s",
                         o->dense_name, dc->d_ff, o->moe_name, F, G, fix);
    }
    if (E % G != 0)
        return moet_errf(err, MOET_EUSAGE,
                         "upcycle: granularity %d does not divide [moe] n_experts = %d of %s: the "
                         "experts are E/G copies of the G slices of the dense MLP",
                         G, E, o->moe_name);
    if (K % G != 0)
        return moet_errf(err, MOET_EUSAGE,
                         "upcycle: [moe] top_k = %d of %s is not a multiple of granularity %d: "
                         "top-k must pick all G slices of a copy for the layer to equal the dense "
                         "MLP (set moe.top_k to a multiple of %d)",
                         K, o->moe_name, G, G);
    return MOET_OK;
}

// ---------------------------------------------------------------------------------------
// the copy

// dst is (E,F,D) gate_proj or up_proj; src is (G*F,D) the dense one: expert e gets rows
// [s*F, (s+1)*F) with s = e % G.
static void slice_rows_(float *dst, const float *src, int E, int G, int F, int D) {
    const size_t blk = (size_t)F * D;
    for (int e = 0; e < E; e++) memcpy(dst + e * blk, src + (size_t)(e % G) * blk, blk * 4);
}

// dst is (E,D,F) down_proj; src is (D,G*F) the dense one: expert e gets columns
// [s*F, (s+1)*F) with s = e % G, times G (the slice's routing weights sum to 1/G).
static void slice_cols_(float *dst, const float *src, int E, int G, int F, int D) {
    for (int e = 0; e < E; e++) {
        const int s = e % G;
        for (int d = 0; d < D; d++) {
            float *o = dst + ((size_t)e * D + d) * F;
            const float *i = src + (size_t)d * G * F + (size_t)s * F;
            for (int f = 0; f < F; f++) o[f] = (float)G * i[f];
        }
    }
}

// w is (E,D): row e = j*G + s is the draw of row j (elements j*D .. j*D + D-1), so that the G
// experts of copy j have identical rows.
static void draw_router_(float *w, const char *name, int E, int G, int D, float std,
                         uint64_t seed) {
    for (int e = 0; e < E; e++) {
        const uint64_t base = (uint64_t)(e / G) * D;
        for (int d = 0; d < D; d++)
            w[(size_t)e * D + d] = (float)(std * model_normal_draw(seed, name, base + d));
    }
}

// The dense MLP tensor `which` (gate_proj, up_proj, down_proj) of layer l.
static const float *dense_mlp_(const Model *dense, int l, const char *which) {
    char name[MODEL_NAME_MAX];
    snprintf(name, sizeof name, "model.layers.%d.mlp.%s.weight", l, which);
    const ParamTensor *t = model_find_tensor(dense, name);
    return t ? dense->params_h + t->offset : NULL;
}

static int fill_tensor_(const Model *dense, Model *moe, const ParamTensor *t, const UpcycleOpts *o,
                        MoetErr *err) {
    const int G = o->granularity, E = moe->E, F = moe->F, D = moe->D;
    float *w = moe->params_h + t->offset;
    const char *suffix = strstr(t->name, ".mlp.");
    const float *src = NULL;
    if (!suffix) {
        const ParamTensor *d = model_find_tensor(dense, t->name);
        if (!d || d->numel != t->numel) // upcycle_check rules this out
            return moet_errf(err, MOET_EFAIL, "upcycle: %s: no tensor of its size in %s", t->name,
                             o->dense_name);
        memcpy(w, dense->params_h + d->offset, t->numel * sizeof(float));
        return MOET_OK;
    }
    if (t->no_optim) { // the expert bias: zero, routing by the scores alone
        memset(w, 0, t->numel * sizeof(float));
        return MOET_OK;
    }
    if (strcmp(suffix, ".mlp.gate.weight") == 0) {
        draw_router_(w, t->name, E, G, D, o->router_std, o->seed);
        return MOET_OK;
    }
    if (strcmp(suffix, ".mlp.experts.gate_proj.weight") == 0) {
        if ((src = dense_mlp_(dense, t->layer, "gate_proj"))) slice_rows_(w, src, E, G, F, D);
    } else if (strcmp(suffix, ".mlp.experts.up_proj.weight") == 0) {
        if ((src = dense_mlp_(dense, t->layer, "up_proj"))) slice_rows_(w, src, E, G, F, D);
    } else if (strcmp(suffix, ".mlp.experts.down_proj.weight") == 0) {
        if ((src = dense_mlp_(dense, t->layer, "down_proj"))) slice_cols_(w, src, E, G, F, D);
    }
    if (!src)
        return moet_errf(err, MOET_EFAIL, "upcycle: %s: no dense MLP tensor for it in %s", t->name,
                         o->dense_name);
    return MOET_OK;
}

int upcycle_model(const Model *dense, Model *moe, const UpcycleOpts *o, MoetErr *err) {
    int rc = upcycle_check(&dense->cfg, &moe->cfg, o, err);
    if (rc) return rc;
    if (moe->n_local_experts != moe->E)
        return moet_errf(err, MOET_EFAIL,
                         "upcycle: the MoE model holds %d of its %d experts: build it with "
                         "ep_size 1 (every expert on this rank)",
                         moe->n_local_experts, moe->E);
    for (int i = 0; i < moe->n_tensors && !rc; i++)
        rc = fill_tensor_(dense, moe, &moe->tensors[i], o, err);
    if (!rc) model_upload_params(moe);
    return rc;
}
