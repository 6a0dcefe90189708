// model: the OLMoE transformer of ARCHITECTURE §3: tensor table, init, forward, backward.
#include "train/model.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/kernels.h"  // kernels_blas_info
#include "train/dispatch.h"
#include "train/moe.h"

// ---------------------------------------------------------------------------------------
// the tensor table

// Per-layer tensors in table order. Dense and MoE layers differ only in the MLP.
enum { LT_LN1, LT_Q, LT_K, LT_V, LT_O, LT_QN, LT_KN, LT_LN2, LT_ROUTER, LT_GATE, LT_UP, LT_DOWN,
       LT_COUNT };

static void add_tensor_(ParamTensor *t, int *n, size_t *off, const char *name, int layer,
                        int is_expert, int ndim, int64_t d0, int64_t d1, int64_t d2,
                        int64_t local_d0) {
    ParamTensor *p = &t[(*n)++];
    memset(p, 0, sizeof *p);
    snprintf(p->name, sizeof p->name, "%s", name);
    p->ndim = ndim;
    int64_t g[3] = {d0, d1, d2};
    size_t numel = 1;
    for (int i = 0; i < ndim; i++) {
        p->global_shape[i] = g[i];
        p->shape[i] = (i == 0 && is_expert) ? local_d0 : g[i];
        numel *= (size_t)p->shape[i];
    }
    p->numel = numel;
    p->offset = *off;
    p->layer = layer;
    p->is_expert = is_expert;
    p->decay = ndim >= 2;
    // keep every tensor 16-float aligned so that vector loads never straddle tensors
    *off += (numel + 15) / 16 * 16;
}

int model_has_expert_bias(const Config *c) {
    return c->n_experts > 0 && (c->bias_update_rate > 0 || strcmp(c->router, "sigmoid") == 0);
}

int model_tensor_table(const Config *c, int ep_rank, int ep_size, ParamTensor **out, int *n_out,
                       size_t *n_params_out, MoetErr *err) {
    int L = c->n_layers, D = c->d_model, V = c->padded_vocab, E = c->n_experts;
    if (ep_size < 1 || (E > 0 && E % ep_size != 0) || ep_rank < 0 || ep_rank >= ep_size)
        return moet_errf(err, MOET_EUSAGE, "expert parallel degree %d does not divide %d experts",
                         ep_size, E);
    int El = E > 0 ? E / ep_size : 0;
    const int bias = model_has_expert_bias(c);
    int n_max = 3 + L * (LT_COUNT + 1);
    ParamTensor *t = calloc((size_t)n_max, sizeof *t);
    if (!t) return moet_errf(err, MOET_EFAIL, "out of memory building the tensor table");
    int n = 0;
    size_t off = 0;
    char name[MODEL_NAME_MAX];
    add_tensor_(t, &n, &off, "model.embed_tokens.weight", -1, 0, 2, V, D, 0, 0);
    for (int l = 0; l < L; l++) {
#define LNAME(s) (snprintf(name, sizeof name, "model.layers.%d." s, l), name)
        add_tensor_(t, &n, &off, LNAME("input_layernorm.weight"), l, 0, 1, D, 0, 0, 0);
        add_tensor_(t, &n, &off, LNAME("self_attn.q_proj.weight"), l, 0, 2, D, D, 0, 0);
        add_tensor_(t, &n, &off, LNAME("self_attn.k_proj.weight"), l, 0, 2, D, D, 0, 0);
        add_tensor_(t, &n, &off, LNAME("self_attn.v_proj.weight"), l, 0, 2, D, D, 0, 0);
        add_tensor_(t, &n, &off, LNAME("self_attn.o_proj.weight"), l, 0, 2, D, D, 0, 0);
        add_tensor_(t, &n, &off, LNAME("self_attn.q_norm.weight"), l, 0, 1, D, 0, 0, 0);
        add_tensor_(t, &n, &off, LNAME("self_attn.k_norm.weight"), l, 0, 1, D, 0, 0, 0);
        add_tensor_(t, &n, &off, LNAME("post_attention_layernorm.weight"), l, 0, 1, D, 0, 0, 0);
        if (E > 0) {
            int F = c->expert_d_ff;
            add_tensor_(t, &n, &off, LNAME("mlp.gate.weight"), l, 0, 2, E, D, 0, 0);
            if (bias) { // every rank holds all E biases (also under expert parallelism)
                add_tensor_(t, &n, &off, LNAME("mlp.gate.expert_bias"), l, 0, 1, E, 0, 0, 0);
                t[n - 1].no_optim = 1;
            }
            add_tensor_(t, &n, &off, LNAME("mlp.experts.gate_proj.weight"), l, 1, 3, E, F, D, El);
            add_tensor_(t, &n, &off, LNAME("mlp.experts.up_proj.weight"), l, 1, 3, E, F, D, El);
            add_tensor_(t, &n, &off, LNAME("mlp.experts.down_proj.weight"), l, 1, 3, E, D, F, El);
        } else {
            int F = c->d_ff;
            add_tensor_(t, &n, &off, LNAME("mlp.gate_proj.weight"), l, 0, 2, F, D, 0, 0);
            add_tensor_(t, &n, &off, LNAME("mlp.up_proj.weight"), l, 0, 2, F, D, 0, 0);
            add_tensor_(t, &n, &off, LNAME("mlp.down_proj.weight"), l, 0, 2, D, F, 0, 0);
        }
#undef LNAME
    }
    add_tensor_(t, &n, &off, "model.norm.weight", -1, 0, 1, D, 0, 0, 0);
    add_tensor_(t, &n, &off, "lm_head.weight", -1, 0, 2, V, D, 0, 0);
    *out = t;
    *n_out = n;
    *n_params_out = off;
    return MOET_OK;
}

void model_param_counts(const Config *c, ParamCounts *pc) {
    memset(pc, 0, sizeof *pc);
    int64_t L = c->n_layers, D = c->d_model, V = c->padded_vocab, E = c->n_experts;
    pc->embed = V * D;
    pc->lm_head = V * D;
    pc->attention = L * 4 * D * D;
    pc->norms = L * 4 * D + D;  // ln1, q_norm, k_norm, ln2 per layer + final norm
    int64_t per_expert = 3 * D * (int64_t)c->expert_d_ff;
    if (E > 0) {
        pc->router = L * E * D;
        pc->experts = L * E * per_expert;
    } else {
        pc->dense_mlp = L * 3 * D * (int64_t)c->d_ff;
    }
    pc->total = pc->embed + pc->lm_head + pc->attention + pc->norms + pc->router + pc->experts +
                pc->dense_mlp;
    int64_t active_mlp = E > 0 ? L * (int64_t)c->top_k * per_expert : pc->dense_mlp;
    pc->active = pc->embed + pc->lm_head + pc->attention + pc->norms + pc->router + active_mlp;
    pc->active_flops = pc->attention + pc->router + active_mlp + pc->lm_head;
}

double model_flops_per_token(const Config *c) {
    ParamCounts pc;
    model_param_counts(c, &pc);
    return 6.0 * (double)pc.active_flops + 12.0 * c->n_layers * c->d_model * (double)c->seq_len;
}

// ---------------------------------------------------------------------------------------
// the activation arena: one pass that either counts (base == NULL) or carves.

static int recompute_full_(const Config *c) { return strcmp(c->recompute, "full") == 0; }

typedef struct {
    float *fbase;
    int32_t *ibase;
    size_t nf, ni;
} Carver;

static float *carve_f_(Carver *cv, size_t n) {
    float *p = cv->fbase ? cv->fbase + cv->nf : NULL;
    cv->nf += (n + 15) / 16 * 16;
    return p;
}

static int32_t *carve_i_(Carver *cv, size_t n) {
    int32_t *p = cv->ibase ? cv->ibase + cv->ni : NULL;
    cv->ni += (n + 15) / 16 * 16;
    return p;
}

// Carves one layer's activations other than its input x (LayerActs). expert_rows 0: the routed
// (R,F) expert activations g, u, a are not carved (expert parallelism: the dispatcher keeps its
// own for the rows it receives).
static void carve_layer_(Carver *cv, LayerActs *a, int D, int H, int E, int K, int F, int B,
                         int T, int expert_rows) {
    size_t N = (size_t)B * T, R = E > 0 ? N * K : N;
    a->ln1 = carve_f_(cv, N * D);
    a->ln1_rstd = carve_f_(cv, N);
    a->q = carve_f_(cv, N * D);
    a->k = carve_f_(cv, N * D);
    a->v = carve_f_(cv, N * D);
    a->qr = carve_f_(cv, N * D);
    a->kr = carve_f_(cv, N * D);
    a->qn_rstd = carve_f_(cv, N);
    a->kn_rstd = carve_f_(cv, N);
    a->att = carve_f_(cv, N * D);
    a->att_lse = carve_f_(cv, (size_t)B * H * T);
    a->h = carve_f_(cv, N * D);
    a->ln2 = carve_f_(cv, N * D);
    a->ln2_rstd = carve_f_(cv, N);
    if (E > 0) {
        a->rlogits = carve_f_(cv, N * E);
        a->rprobs = carve_f_(cv, N * E);
        a->rlse = carve_f_(cv, N);
        a->topk_w = carve_f_(cv, N * K);
        a->topk_idx = carve_i_(cv, N * K);
        a->counts = carve_i_(cv, E);
        a->offsets = carve_i_(cv, E + 1);
        a->row_token = carve_i_(cv, R);
        a->assign_row = carve_i_(cv, N * K);
        a->xp = carve_f_(cv, R * D);
        a->yp = carve_f_(cv, R * D);
    } else {
        a->rlogits = a->rprobs = a->rlse = a->topk_w = NULL;
        a->topk_idx = a->counts = a->offsets = a->row_token = a->assign_row = NULL;
        a->xp = a->yp = NULL;
    }
    a->g = expert_rows ? carve_f_(cv, R * F) : NULL;
    a->u = expert_rows ? carve_f_(cv, R * F) : NULL;
    a->a = expert_rows ? carve_f_(cv, R * F) : NULL;
    a->mlp_out = carve_f_(cv, N * D);
}

// Logits of one LM head chunk: at most 64 Mi floats (256 MiB), the rows split evenly.
#define HEAD_CHUNK_FLOATS ((size_t)1 << 26)

// Rows per LM head chunk for N rows of V logits: all of them with keep_all, else chunks of at
// most HEAD_CHUNK_FLOATS (and at most max_rows rows when max_rows > 0) of equal size.
static int head_rows_(size_t N, int V, int keep_all, int max_rows) {
    if (keep_all || N == 0) return (int)N;
    size_t cap = HEAD_CHUNK_FLOATS / (size_t)V;
    if (max_rows > 0 && (size_t)max_rows < cap) cap = (size_t)max_rows;
    if (cap < 1) cap = 1;
    size_t chunks = (N + cap - 1) / cap;
    return (int)((N + chunks - 1) / chunks);
}

// Lays out the arena of a model with the given sizes; with m == NULL only counts.
// recompute 0: every layer keeps all of its activations. recompute 1: every layer keeps only
// its input x; the rest of LayerActs of every layer points into ONE working set, which forward
// fills for each layer in turn and backward refills by rerunning the layer's forward.
// El < E (expert parallelism): no routed (R,F) expert activations nor their gradients.
static void layout_arena_(Model *m, Carver *cv, int L, int D, int H, int V, int E, int K, int F,
                          int El, int B, int T, int recompute, int head_rows) {
    size_t N = (size_t)B * T, R = E > 0 ? N * K : N;
    int expert_rows = E == 0 || El == E;
    LayerActs dummy, ws;
    for (int l = 0; l < L; l++) {
        LayerActs *a = m ? &m->acts[l] : &dummy;
        a->x = carve_f_(cv, N * D);
        if (!recompute) carve_layer_(cv, a, D, H, E, K, F, B, T, expert_rows);
    }
    if (recompute) {
        carve_layer_(cv, &ws, D, H, E, K, F, B, T, expert_rows);
        for (int l = 0; m && l < L; l++) {
            float *x = m->acts[l].x;
            m->acts[l] = ws;
            m->acts[l].x = x;
        }
    }
    float *x_final = carve_f_(cv, N * D);
    float *lnf = carve_f_(cv, N * D);
    float *lnf_rstd = carve_f_(cv, N);
    float *logits = carve_f_(cv, (size_t)head_rows * V);
    float *losses = carve_f_(cv, N);
    int32_t *tokens = carve_i_(cv, N);
    int32_t *targets = carve_i_(cv, N);
    // backward scratch, shared by all layers
    float *d[8];
    for (int i = 0; i < 8; i++) d[i] = carve_f_(cv, N * D);
    float *d_xp = E > 0 ? carve_f_(cv, R * D) : NULL;
    float *d_yp = E > 0 ? carve_f_(cv, R * D) : NULL;
    float *d_g = expert_rows ? carve_f_(cv, R * F) : NULL;
    float *d_u = expert_rows ? carve_f_(cv, R * F) : NULL;
    float *d_a = expert_rows ? carve_f_(cv, R * F) : NULL;
    float *d_rlogits = E > 0 ? carve_f_(cv, N * E) : NULL;
    float *d_topk_w = E > 0 ? carve_f_(cv, N * K) : NULL;
    float *d_prob_bias = E > 0 ? carve_f_(cv, E) : NULL;
    if (!m) return;
    m->x_final = x_final;
    m->lnf = lnf;
    m->lnf_rstd = lnf_rstd;
    m->logits = logits;
    m->losses = losses;
    m->tokens = tokens;
    m->targets = targets;
    m->d_res = d[0];
    m->d_ln = d[1];
    m->d_q = d[2];
    m->d_k = d[3];
    m->d_v = d[4];
    m->d_qr = d[5];
    m->d_kr = d[6];
    m->d_att = d[7];
    m->d_xp = d_xp;
    m->d_yp = d_yp;
    m->d_g = d_g;
    m->d_u = d_u;
    m->d_a = d_a;
    m->d_rlogits = d_rlogits;
    m->d_topk_w = d_topk_w;
    m->d_prob_bias = d_prob_bias;
}

int model_head_rows(const Config *c, int B, int T) {
    return head_rows_((size_t)B * T, c->padded_vocab, 0, 0);
}

size_t model_activation_floats(const Config *c, int B, int T, int n_local_experts) {
    // (with ep the dispatcher's received rows vary per step, N*K on average: not counted here)
    Carver cv = {0};
    int E = c->n_experts, F = E > 0 ? c->expert_d_ff : c->d_ff;
    layout_arena_(NULL, &cv, c->n_layers, c->d_model, c->n_heads, c->padded_vocab, E, c->top_k,
                  F, n_local_experts, B, T, recompute_full_(c),
                  head_rows_((size_t)B * T, c->padded_vocab, 0, 0));
    return cv.nf + cv.ni;  // int32 and float are both 4 bytes
}

int model_set_batch(Model *m, int B, int T, MoetErr *err) {
    if (T > m->cfg.max_seq_len)
        return moet_errf(err, MOET_EUSAGE, "sequence length %d exceeds [model] max_seq_len %d", T,
                         m->cfg.max_seq_len);
    if (m->B == B && m->T == T && m->arena_recompute == m->recompute &&
        m->arena_keep_logits == m->keep_logits && m->arena_head_rows_max == m->head_rows_max)
        return MOET_OK;
    m->ops->free(m->arena);
    m->ops->free(m->iarena);
    free(m->tokens_h);
    free(m->targets_h);
    const int head_rows = head_rows_((size_t)B * T, m->V, m->keep_logits, m->head_rows_max);
    Carver cv = {0};
    layout_arena_(NULL, &cv, m->L, m->D, m->H, m->V, m->E, m->K, m->F, m->n_local_experts, B, T,
                  m->recompute, head_rows);
    m->arena_floats = cv.nf;
    m->iarena_ints = cv.ni;
    m->arena = m->ops->alloc(cv.nf * sizeof(float));
    m->iarena = m->ops->alloc(cv.ni * sizeof(int32_t));
    m->tokens_h = moet_calloc((size_t)B * T * sizeof(int32_t));
    m->targets_h = moet_calloc((size_t)B * T * sizeof(int32_t));
    Carver carve = {.fbase = m->arena, .ibase = m->iarena};
    layout_arena_(m, &carve, m->L, m->D, m->H, m->V, m->E, m->K, m->F, m->n_local_experts, B, T,
                  m->recompute, head_rows);
    m->arena_recompute = m->recompute;
    m->arena_keep_logits = m->keep_logits;
    m->arena_head_rows_max = m->head_rows_max;
    m->head_rows = head_rows;
    m->B = B;
    m->T = T;
    return MOET_OK;
}

// ---------------------------------------------------------------------------------------
// create / free

static void bind_pointers_(Model *m, float *base, ParamPointers *pp) {
    int t = 0;
    pp->embed = base + m->tensors[t++].offset;
    for (int l = 0; l < m->L; l++) {
        LayerParams *lp = &pp->layers[l];
        lp->ln1 = base + m->tensors[t++].offset;
        lp->wq = base + m->tensors[t++].offset;
        lp->wk = base + m->tensors[t++].offset;
        lp->wv = base + m->tensors[t++].offset;
        lp->wo = base + m->tensors[t++].offset;
        lp->q_norm = base + m->tensors[t++].offset;
        lp->k_norm = base + m->tensors[t++].offset;
        lp->ln2 = base + m->tensors[t++].offset;
        lp->router = m->E > 0 ? base + m->tensors[t++].offset : NULL;
        lp->expert_bias = m->E > 0 && m->tensors[t].no_optim ? base + m->tensors[t++].offset : NULL;
        lp->w_gate = base + m->tensors[t++].offset;
        lp->w_up = base + m->tensors[t++].offset;
        lp->w_down = base + m->tensors[t++].offset;
    }
    pp->norm = base + m->tensors[t++].offset;
    pp->lm_head = base + m->tensors[t++].offset;
}

int model_open_backend(const Config *c, int local_rank, const Ops **ops, char *info, int infolen,
                       MoetErr *err) {
    if (strcmp(c->device, "cpu") == 0 && strcmp(c->precision, "bf16") == 0) {
        char why[512];
        if (ops_cpu_bf16_open(why, sizeof why))
            return moet_errf(err, MOET_EFAIL, "[train] precision = bf16 on cpu: %s", why);
        *ops = ops_cpu_bf16();
        snprintf(info, (size_t)infolen, "cpu: %s; GEMMs in bf16 with fp32 accumulation (%s), "
                 "attention in fp32", kernels_blas_info(), why);
        return MOET_OK;
    }
    if (strcmp(c->device, "cuda") != 0) {
        int shadow = strcmp(c->device, "cpu-shadow") == 0;
        *ops = shadow ? ops_cpu_shadow() : ops_cpu();
        snprintf(info, (size_t)infolen, "%s: %s", shadow ? "cpu-shadow" : "cpu",
                 kernels_blas_info());
        return MOET_OK;
    }
    const int bf16 = strcmp(c->precision, "fp32") != 0;
    char why[512];
    if (ops_cuda_open(local_rank, bf16, why, sizeof why))
        return moet_errf(err, MOET_EFAIL, "[train] device = cuda: %s", why);
    *ops = ops_cuda();
    snprintf(info, (size_t)infolen, "%s; GEMMs in %s", why,
             bf16 ? "bf16 with fp32 accumulation" : "fp32");
    return MOET_OK;
}

int model_local_rank(void) {
    const char *vars[] = {"OMPI_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID", "MPI_LOCALRANKID",
                          "LOCAL_RANK"};
    for (size_t i = 0; i < sizeof vars / sizeof vars[0]; i++) {
        const char *v = getenv(vars[i]);
        if (v && *v) return atoi(v);
    }
    return 0;
}

double model_peak_gflops(const Ops *ops) {
    if (strcmp(ops->name, "cuda") != 0) return 0.0;
    double tf = ops_cuda_peak_tflops();
    return (tf > 0 ? tf : 989.0) * 1e3;  // unknown GPUs are measured against an H100
}

int model_create(Model *m, const Config *c, int ep_rank, int ep_size, MoetErr *err) {
    return model_create_ops(m, c, ops_cpu(), ep_rank, ep_size, err);
}

static int create_(Model *m, const Config *c, const Ops *ops, int ep_rank, int ep_size,
                   int with_grads, MoetErr *err);

int model_create_ops(Model *m, const Config *c, const Ops *ops, int ep_rank, int ep_size,
                     MoetErr *err) {
    return create_(m, c, ops, ep_rank, ep_size, 1, err);
}

int model_create_inference(Model *m, const Config *c, const Ops *ops, MoetErr *err) {
    return create_(m, c, ops, 0, 1, 0, err);
}

static int create_(Model *m, const Config *c, const Ops *ops, int ep_rank, int ep_size,
                   int with_grads, MoetErr *err) {
    memset(m, 0, sizeof *m);
    m->cfg = *c;
    m->ops = ops;
    m->L = c->n_layers;
    m->D = c->d_model;
    m->H = c->n_heads;
    m->Dh = c->d_model / c->n_heads;
    m->V = c->padded_vocab;
    m->E = c->n_experts;
    m->K = c->n_experts > 0 ? c->top_k : 0;
    m->F = c->n_experts > 0 ? c->expert_d_ff : c->d_ff;
    m->recompute = recompute_full_(c);
    m->score_fn = strcmp(c->router, "sigmoid") == 0 ? ROUTER_SIGMOID : ROUTER_SOFTMAX;
    int rc = model_tensor_table(c, ep_rank, ep_size, &m->tensors, &m->n_tensors, &m->n_params, err);
    if (rc) return rc;
    m->n_local_experts = m->E / ep_size;
    m->expert_lo = ep_rank * m->n_local_experts;
    m->params = ops->alloc(m->n_params * sizeof(float));
    if (ops->params_register) ops->params_register(m->params, m->n_params);
    m->grads = with_grads ? ops->alloc(m->n_params * sizeof(float)) : NULL;
    m->params_h = ops->on_device ? moet_calloc(m->n_params * sizeof(float)) : m->params;
    if (m->E > 0) {
        m->counts_h = moet_calloc((size_t)m->L * m->E * sizeof(int32_t));
        m->offsets_h = moet_calloc((size_t)m->L * (m->E + 1) * sizeof(int32_t));
        m->lb_counts = moet_calloc((size_t)m->L * m->E * sizeof(int64_t));
    }
    m->p.layers = calloc((size_t)m->L, sizeof(LayerParams));
    m->g.layers = calloc((size_t)m->L, sizeof(LayerParams));
    m->acts = calloc((size_t)m->L, sizeof(LayerActs));
    m->layer_lb = calloc((size_t)m->L, sizeof(double));
    m->layer_z = calloc((size_t)m->L, sizeof(double));
    m->expert_tokens = calloc((size_t)m->L * (m->E > 0 ? m->E : 1), sizeof(int64_t));
    if (!m->p.layers || !m->g.layers || !m->acts || !m->layer_lb || !m->layer_z ||
        !m->expert_tokens)
        moet_die("out of memory creating the model");
    bind_pointers_(m, m->params, &m->p);
    if (m->grads) bind_pointers_(m, m->grads, &m->g);
    return MOET_OK;
}

int model_set_comm(Model *m, Comm *ep, MoetErr *err) {
    dispatch_free(m->disp);
    m->disp = NULL;
    m->ep_comm = NULL;
    if (!ep || comm_size(ep) == 1) {
        if (m->E > 0 && m->n_local_experts != m->E)
            return moet_errf(err, MOET_EUSAGE,
                             "model holds %d of %d experts but its EP group has one rank",
                             m->n_local_experts, m->E);
        return MOET_OK;
    }
    int n = comm_size(ep), r = comm_rank(ep);
    if (m->E <= 0)
        return moet_errf(err, MOET_EUSAGE, "expert parallelism (ep %d) needs a MoE model", n);
    if (m->E % n != 0 || m->n_local_experts != m->E / n || m->expert_lo != r * (m->E / n))
        return moet_errf(err, MOET_EUSAGE,
                         "EP group (rank %d of %d) does not match the model's experts [%d, %d) "
                         "of %d", r, n, m->expert_lo, m->expert_lo + m->n_local_experts, m->E);
    int rc = dispatch_create(&m->disp, ep, m->ops, m->L, m->E, m->D, m->F, m->recompute, err);
    if (rc) return rc;
    m->ep_comm = ep;
    return MOET_OK;
}

void model_free(Model *m) {
    if (!m->ops) return;  // never created
    dispatch_free(m->disp);
    free(m->tensors);
    if (m->params_h != m->params) free(m->params_h);
    m->ops->free(m->params);
    m->ops->free(m->grads);
    free(m->p.layers);
    free(m->g.layers);
    free(m->acts);
    m->ops->free(m->arena);
    m->ops->free(m->iarena);
    free(m->tokens_h);
    free(m->targets_h);
    free(m->counts_h);
    free(m->offsets_h);
    free(m->layer_lb);
    free(m->layer_z);
    free(m->expert_tokens);
    free(m->lb_counts);
    memset(m, 0, sizeof *m);
}

const ParamTensor *model_find_tensor(const Model *m, const char *name) {
    for (int i = 0; i < m->n_tensors; i++)
        if (strcmp(m->tensors[i].name, name) == 0) return &m->tensors[i];
    return NULL;
}

void model_zero_grad(Model *m) { m->ops->zero_fill(m->grads, m->n_params); }

void model_upload_params(Model *m) {
    m->ops->to_device(m->params, m->params_h, m->n_params * sizeof(float));
}

void model_download_params(Model *m) {
    m->ops->to_host(m->params_h, m->params, m->n_params * sizeof(float));
}

// ---------------------------------------------------------------------------------------
// init: truncated normal from a counter-based generator (§3)

static uint64_t mix64_(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static uint64_t hash_name_(const char *s) {  // FNV-1a
    uint64_t h = 0xCBF29CE484222325ull;
    for (; *s; s++) h = (h ^ (unsigned char)*s) * 0x100000001B3ull;
    return h;
}

// Uniform in (0, 1) from (key, element, draw): a pure function of its arguments.
static double uniform_(uint64_t key, uint64_t index, uint64_t draw) {
    uint64_t bits = mix64_(key ^ mix64_(index * 0x9E3779B97F4A7C15ull + draw));
    return ((double)(bits >> 11) + 0.5) * 0x1.0p-53;
}

// Standard normal, attempt j: Box-Muller on draws 2j and 2j+1.
static double normal_(uint64_t key, uint64_t index, uint64_t j) {
    double u1 = uniform_(key, index, 2 * j), u2 = uniform_(key, index, 2 * j + 1);
    return sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
}

// Standard normal truncated to [-3, 3] by rejection.
static double trunc_normal_(uint64_t key, uint64_t index) {
    for (uint64_t j = 0;; j++) {
        double z = normal_(key, index, j);
        if (fabs(z) <= 3.0) return z;
    }
}

double model_normal_draw(uint64_t seed, const char *name, uint64_t index) {
    return normal_(mix64_(seed ^ hash_name_(name)), index, 0);
}

void model_init_weights(Model *m, uint64_t seed) {
    float std = m->cfg.init_std;
    for (int i = 0; i < m->n_tensors; i++) {
        const ParamTensor *t = &m->tensors[i];
        float *w = m->params_h + t->offset;
        if (t->no_optim) { // the expert bias starts at 0: routing by the scores alone
            memset(w, 0, t->numel * sizeof(float));
            continue;
        }
        if (t->ndim == 1) {  // norm weights
            for (size_t j = 0; j < t->numel; j++) w[j] = 1.0f;
            continue;
        }
        uint64_t key = mix64_(seed ^ hash_name_(t->name));
        // the global index of local element j: experts are offset by the first local expert
        uint64_t base = t->is_expert ? (uint64_t)m->expert_lo * (t->numel / t->shape[0]) : 0;
#pragma omp parallel for schedule(static)
        for (size_t j = 0; j < t->numel; j++) w[j] = (float)(std * trunc_normal_(key, base + j));
    }
    model_upload_params(m);
}

// ---------------------------------------------------------------------------------------
// forward

// One layer without its final residual add: reads a->x, fills the layer's activations up to
// a->mlp_out (N,D) (the output is a->h + a->mlp_out) and, for MoE, *ll and the layer's
// m->expert_tokens, counts_h and offsets_h (set, not accumulated: a rerun leaves them as they
// were). Backward reruns it under recompute = full: it must stay a pure function of x and the
// parameters. kv (generation; NULL in training): the T rows of the one sequence are positions
// kv->len .. kv->len+T-1, their keys and values are appended to layer l's cache and the queries
// attend over the whole cache.
static void layer_forward_(Model *m, int l, MoeLayerLoss *ll, const KVCache *kv) {
    int B = m->B, T = m->T, D = m->D, H = m->H, Dh = m->Dh;
    int N = B * T;
    float eps = m->cfg.norm_eps, theta = m->cfg.rope_theta;
    const Ops *k = m->ops;
    LayerActs *a = &m->acts[l];
    LayerParams *p = &m->p.layers[l];
    // attention block: h = x + o_proj(attn(rope(q_norm(q)), rope(k_norm(k)), v))
    k->rmsnorm_forward(a->ln1, a->ln1_rstd, a->x, p->ln1, N, D, eps);
    k->matmul_forward(a->q, a->ln1, p->wq, N, D, D);
    k->matmul_forward(a->k, a->ln1, p->wk, N, D, D);
    k->matmul_forward(a->v, a->ln1, p->wv, N, D, D);
    k->rmsnorm_forward(a->qr, a->qn_rstd, a->q, p->q_norm, N, D, eps);
    k->rmsnorm_forward(a->kr, a->kn_rstd, a->k, p->k_norm, N, D, eps);
    if (kv) {
        float *kc = kv->k + (size_t)l * kv->cap * D, *vc = kv->v + (size_t)l * kv->cap * D;
        k->rope_forward_at(a->qr, a->qr, T, H, Dh, theta, kv->len);
        k->rope_forward_at(kc + (size_t)kv->len * D, a->kr, T, H, Dh, theta, kv->len);
        k->copy(vc + (size_t)kv->len * D, a->v, (size_t)T * D * sizeof(float));
        k->attention_forward_cached(a->att, a->qr, kc, vc, T, kv->len + T, H, Dh);
    } else {
        k->rope_forward(a->qr, a->qr, B, T, H, Dh, theta);
        k->rope_forward(a->kr, a->kr, B, T, H, Dh, theta);
        k->attention_forward(a->att, a->att_lse, a->qr, a->kr, a->v, B, T, H, Dh);
    }
    k->matmul_forward(a->h, a->att, p->wo, N, D, D);
    k->add_forward(a->h, a->h, a->x, (size_t)N * D);
    // MLP block: out = h + moe(ln2(h))
    k->rmsnorm_forward(a->ln2, a->ln2_rstd, a->h, p->ln2, N, D, eps);
    ll->lb = ll->z = 0.0;
    if (m->E > 0) moe_forward(m, l, ll);
    else mlp_forward(m, l);
}

// The LM head and the cross-entropy over the final norm's output, head_rows rows at a time;
// returns the summed loss. train: each chunk's backward follows at once (dlogits over its
// logits, d lnf into its rows of d_ln, lm_head's gradient accumulated).
static double head_(Model *m, int train) {
    const int N = m->B * m->T, D = m->D, V = m->V;
    const Ops *k = m->ops;
    const float scale = m->n_targets > 0 ? 1.0f / (float)m->n_targets : 0.0f;
    if (train) k->zero_fill(m->d_ln, (size_t)N * D);
    double ce_sum = 0.0;
    for (int r0 = 0; r0 < N; r0 += m->head_rows) {
        const int n = N - r0 < m->head_rows ? N - r0 : m->head_rows;
        float *logits = m->keep_logits ? m->logits + (size_t)r0 * V : m->logits;
        const float *x = m->lnf + (size_t)r0 * D;
        k->matmul_forward(logits, x, m->p.lm_head, n, D, V);
        if (!train) {
            ce_sum += k->crossentropy_forward(m->losses + r0, logits, m->targets + r0, n, V);
            continue;
        }
        ce_sum += k->crossentropy_forward_backward(logits, m->losses + r0, logits,
                                                   m->targets + r0, n, V, scale);
        k->matmul_backward(m->d_ln + (size_t)r0 * D, m->g.lm_head, logits, x, m->p.lm_head, n, D,
                           V);
    }
    m->logits_are_grads = train;
    m->head_backward_done = train;
    return ce_sum;
}

// Embedding and every layer: fills the activations up to x_final and returns the sums over
// the layers of the MoE losses (they also go to layer_lb, layer_z). Sets the targets.
static void body_forward_(Model *m, const int32_t *tokens, double *lb_out, double *z_out) {
    int B = m->B, T = m->T, D = m->D;
    int N = B * T;
    const Ops *k = m->ops;

    memcpy(m->tokens_h, tokens, (size_t)N * sizeof(int32_t));
    m->n_targets = 0;
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++) {
            int i = b * T + t;
            m->targets_h[i] = t + 1 < T ? tokens[i + 1] : -1;
            m->n_targets += t + 1 < T;
        }
    k->to_device(m->tokens, m->tokens_h, (size_t)N * sizeof(int32_t));
    k->to_device(m->targets, m->targets_h, (size_t)N * sizeof(int32_t));

    k->embedding_forward(m->acts[0].x, m->tokens, m->p.embed, N, D);
    double lb = 0.0, z = 0.0;
    for (int l = 0; l < m->L; l++) {
        LayerActs *a = &m->acts[l];
        MoeLayerLoss ll;
        layer_forward_(m, l, &ll, NULL);
        if (m->E > 0) {
            m->layer_lb[l] = ll.lb;
            m->layer_z[l] = ll.z;
            lb += ll.lb;
            z += ll.z;
        }
        float *out = l + 1 < m->L ? m->acts[l + 1].x : m->x_final;
        k->add_forward(out, a->h, a->mlp_out, (size_t)N * D);
    }
    *lb_out = lb;
    *z_out = z;
}

static void forward_(Model *m, const int32_t *tokens, int train) {
    int N = m->B * m->T, D = m->D;
    double lb, z;
    body_forward_(m, tokens, &lb, &z);
    m->ops->rmsnorm_forward(m->lnf, m->lnf_rstd, m->x_final, m->p.norm, N, D, m->cfg.norm_eps);
    double ce_sum = head_(m, train);
    m->ce = m->n_targets > 0 ? ce_sum / m->n_targets : 0.0;
    m->lb = m->E > 0 ? lb / m->L : 0.0;
    m->z = m->E > 0 ? z / m->L : 0.0;
    m->loss = m->ce + m->cfg.lb_coef * m->lb + m->cfg.z_coef * m->z;
}

void model_forward_route(Model *m, const int32_t *tokens) {
    double lb, z;
    body_forward_(m, tokens, &lb, &z);
}

void model_update_expert_bias(Model *m, const int64_t *load, float rate) {
    for (int l = 0; l < m->L; l++) {
        float *b = m->p.layers[l].expert_bias;
        if (!b) return;
        float *bh = m->params_h + (b - m->params); // the host copy (= b on the CPU)
        const int64_t *c = load + (size_t)l * m->E;
        int64_t sum = 0;
        for (int e = 0; e < m->E; e++) sum += c[e];
        // sign(mean - load_e) = sign(sum - E * load_e): integers, exact
        for (int e = 0; e < m->E; e++) {
            const int64_t d = sum - (int64_t)m->E * c[e];
            bh[e] += d > 0 ? rate : d < 0 ? -rate : 0.0f;
        }
        m->ops->to_device(b, bh, (size_t)m->E * sizeof(float));
    }
}

void model_forward(Model *m, const int32_t *tokens) {
    forward_(m, tokens, 0);
}

void model_forward_train(Model *m, const int32_t *tokens) {
    if (!m->grads) moet_die("model_forward_train: a model without gradients (inference)");
    forward_(m, tokens, 1);
}

// ---------------------------------------------------------------------------------------
// generation: the forward of one sequence a few tokens at a time over a KV cache

int model_kv_create(Model *m, KVCache *kv, int cap, MoetErr *err) {
    memset(kv, 0, sizeof *kv);
    if (cap < 1 || cap > m->cfg.max_seq_len)
        return moet_errf(err, MOET_EUSAGE, "KV cache of %d positions: the model takes 1 to %d "
                         "([model] max_seq_len)", cap, m->cfg.max_seq_len);
    if (m->disp)
        return moet_errf(err, MOET_EUSAGE, "generation runs on one rank holding every expert");
    const size_t n = (size_t)m->L * cap * m->D;
    kv->cap = cap;
    kv->k = m->ops->alloc(n * sizeof(float));
    kv->v = m->ops->alloc(n * sizeof(float));
    return MOET_OK;
}

void model_kv_free(Model *m, KVCache *kv) {
    m->ops->free(kv->k);
    m->ops->free(kv->v);
    memset(kv, 0, sizeof *kv);
}

void model_forward_cached(Model *m, KVCache *kv, const int32_t *tokens, int n) {
    if (n < 1 || n > m->B * m->T || kv->len + n > kv->cap)
        moet_die("model_forward_cached: %d tokens after %d cached (cache %d, arena %d rows)", n,
                 kv->len, kv->cap, m->B * m->T);
    const int B = m->B, T = m->T, D = m->D;
    const Ops *k = m->ops;
    // the arena was laid out for (B,T); one sequence of n rows uses the first n of each buffer
    m->B = 1;
    m->T = n;
    memcpy(m->tokens_h, tokens, (size_t)n * sizeof(int32_t));
    k->to_device(m->tokens, m->tokens_h, (size_t)n * sizeof(int32_t));
    k->embedding_forward(m->acts[0].x, m->tokens, m->p.embed, n, D);
    for (int l = 0; l < m->L; l++) {
        LayerActs *a = &m->acts[l];
        MoeLayerLoss ll;
        layer_forward_(m, l, &ll, kv);
        float *out = l + 1 < m->L ? m->acts[l + 1].x : m->x_final;
        k->add_forward(out, a->h, a->mlp_out, (size_t)n * D);
    }
    kv->len += n;
    // only the last position's next-token distribution is wanted
    k->rmsnorm_forward(m->lnf, m->lnf_rstd, m->x_final + (size_t)(n - 1) * D, m->p.norm, 1, D,
                       m->cfg.norm_eps);
    k->matmul_forward(m->logits, m->lnf, m->p.lm_head, 1, D, m->V);
    m->logits_are_grads = 0;
    m->B = B;
    m->T = T;
}

// ---------------------------------------------------------------------------------------
// backward: the forward in reverse; d_res carries the gradient of the residual stream.

void model_backward(Model *m) {
    int B = m->B, T = m->T, D = m->D, H = m->H, Dh = m->Dh;
    int N = B * T;
    size_t ND = (size_t)N * D;
    float theta = m->cfg.rope_theta;
    const Ops *k = m->ops;

    // the LM head's backward ran in model_forward_train: d_ln holds d lnf
    if (!m->head_backward_done)
        moet_die("model_backward without model_forward_train before it (model_forward computes "
                 "no gradient)");
    m->head_backward_done = 0;
    k->zero_fill(m->d_res, ND);
    k->rmsnorm_backward(m->d_res, m->g.norm, m->d_ln, m->x_final, m->p.norm, m->lnf_rstd, N, D);
    if (m->grad_hook) m->grad_hook(m->grad_hook_ctx, m->L);

    // loss = ce + lb_coef * (1/L) sum_l lb_l + z_coef * (1/L) sum_l z_l
    double lb_scale = m->cfg.lb_coef / m->L, z_scale = m->cfg.z_coef / m->L;
    for (int l = m->L - 1; l >= 0; l--) {
        LayerActs *a = &m->acts[l];
        LayerParams *p = &m->p.layers[l];
        LayerParams *gp = &m->g.layers[l];
        // recompute = full: refill the working set with this layer's activations (the last
        // layer's are still there from forward). Its losses were counted by forward.
        if (m->arena_recompute && l < m->L - 1) {
            MoeLayerLoss rerun;
            layer_forward_(m, l, &rerun, NULL);
        }
        // MLP block; d_res is d out = d h (residual) + the path through the MLP (both write d_ln)
        if (m->E > 0) moe_backward(m, l, m->d_res, m->d_ln, lb_scale, z_scale);
        else mlp_backward(m, l, m->d_res, m->d_ln);
        k->rmsnorm_backward(m->d_res, gp->ln2, m->d_ln, a->h, p->ln2, a->ln2_rstd, N, D);
        // attention block; d_res is now d h = d x (residual) + the path through attention
        k->zero_fill(m->d_att, ND);
        k->matmul_backward(m->d_att, gp->wo, m->d_res, a->att, p->wo, N, D, D);
        k->zero_fill(m->d_qr, ND);
        k->zero_fill(m->d_kr, ND);
        k->zero_fill(m->d_v, ND);
        k->attention_backward(m->d_qr, m->d_kr, m->d_v, m->d_att, a->att, a->att_lse, a->qr, a->kr,
                           a->v, B, T, H, Dh);
        // RoPE backward into d_att (free again; it writes), then q_norm backward into d_q
        k->rope_backward(m->d_att, m->d_qr, B, T, H, Dh, theta);
        k->zero_fill(m->d_q, ND);
        k->rmsnorm_backward(m->d_q, gp->q_norm, m->d_att, a->q, p->q_norm, a->qn_rstd, N, D);
        k->rope_backward(m->d_att, m->d_kr, B, T, H, Dh, theta);
        k->zero_fill(m->d_k, ND);
        k->rmsnorm_backward(m->d_k, gp->k_norm, m->d_att, a->k, p->k_norm, a->kn_rstd, N, D);
        k->zero_fill(m->d_ln, ND);
        k->matmul_backward(m->d_ln, gp->wq, m->d_q, a->ln1, p->wq, N, D, D);
        k->matmul_backward(m->d_ln, gp->wk, m->d_k, a->ln1, p->wk, N, D, D);
        k->matmul_backward(m->d_ln, gp->wv, m->d_v, a->ln1, p->wv, N, D, D);
        k->rmsnorm_backward(m->d_res, gp->ln1, m->d_ln, a->x, p->ln1, a->ln1_rstd, N, D);
        if (m->grad_hook) m->grad_hook(m->grad_hook_ctx, l);
    }
    k->embedding_backward(m->g.embed, m->d_res, m->tokens_h, N, D);
    if (m->grad_hook) m->grad_hook(m->grad_hook_ctx, -1);
}
