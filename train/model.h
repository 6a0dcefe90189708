// model: the OLMoE transformer of ARCHITECTURE §3 (dense when n_experts = 0).
// Parameters live in one buffer described by a table of named tensors (HF names), gradients in a
// second buffer with the same layout, activations in one arena; forward/backward call the backend's ops
// (kernels/ops.h), so the same code runs on the CPU and on a GPU.
#pragma once
#include <stddef.h>
#include <stdint.h>

#include "kernels/ops.h"
#include "train/comm.h"
#include "train/common.h"
#include "train/config.h"

struct Dispatcher;

#define MODEL_NAME_MAX 96
#define MODEL_MAX_DIMS 3

// Keys (after k_norm and RoPE) and values of the positions a sequence has so far, per layer,
// for generation: k, v are (L, cap, D) backend memory; positions [0, len) are filled.
typedef struct {
    int cap, len;
    float *k, *v;
} KVCache;

typedef struct {
    char name[MODEL_NAME_MAX];  // HF name, e.g. "model.layers.3.mlp.experts.up_proj.weight"
    int ndim;
    int64_t shape[MODEL_MAX_DIMS];  // local shape (experts: this rank's experts only)
    int64_t global_shape[MODEL_MAX_DIMS];
    size_t offset;               // in floats, into params and grads
    size_t numel;                // local element count
    int layer;                   // -1 outside the layers
    int is_expert;               // 1: the first dim indexes experts (sharded by ep)
    int decay;                   // 1: weight decay applies (matrices; not norms)
    int no_optim;                // 1: a buffer, not a trained parameter (the expert bias): no
                                 // gradient, not in AdamW, the gradient norm, the gradient
                                 // all-reduce nor /optim of checkpoints; saved in /model
} ParamTensor;

// Pointers into the parameter (or gradient) buffer for one layer.
typedef struct {
    float *ln1;                  // input_layernorm (D)
    float *wq, *wk, *wv, *wo;    // (D,D)
    float *q_norm, *k_norm;      // (D)
    float *ln2;                  // post_attention_layernorm (D)
    float *router;               // (E,D); NULL for dense
    float *expert_bias;          // (E) added to the router scores for the top-k choice only
                                 // (aux-loss-free balancing); NULL when the model has none
    float *w_gate, *w_up;        // experts (El,F,D) or dense (F,D)
    float *w_down;               // experts (El,D,F) or dense (D,F)
} LayerParams;

typedef struct {
    float *embed;                // (V,D)
    float *norm;                 // (D)
    float *lm_head;              // (V,D)
    LayerParams *layers;         // (L)
} ParamPointers;

// Saved activations of one layer (pointers into the arena). Shapes with N = B*T tokens and
// R = N*K routed rows (dense: R = N, no routing). With [train] recompute = full only x is the
// layer's own: every other pointer of every layer is the same working set, which holds the
// activations of the layer that ran last (forward: each layer in turn, ending with the last;
// backward: each layer is rerun right before its backward). g, u, a are NULL under expert
// parallelism (n_local_experts < E): the dispatcher keeps the rows its experts receive.
typedef struct {
    float *x;                    // (N,D) layer input (residual stream)
    float *ln1, *ln1_rstd;       // (N,D), (N)
    float *q, *k, *v;            // (N,D) projections; q, k before q_norm / k_norm
    float *qr, *kr;              // (N,D) after q_norm / k_norm and RoPE
    float *qn_rstd, *kn_rstd;    // (N)
    float *att, *att_lse;        // (N,D), (B,H,T)
    float *h;                    // (N,D) residual after attention
    float *ln2, *ln2_rstd;       // (N,D), (N)
    float *rlogits, *rprobs;     // (N,E) router logits and softmax
    float *rlse;                 // (N) router logsumexp (z-loss)
    float *topk_w;               // (N,K)
    int32_t *topk_idx;           // (N,K)
    int32_t *counts, *offsets;   // (E), (E+1)
    int32_t *row_token;          // (R)
    int32_t *assign_row;         // (N*K)
    float *xp;                   // (R,D) permuted input rows (dense: = ln2)
    float *g, *u, *a;            // (R,F) gate, up, silu(gate)*up
    float *yp;                   // (R,D) expert outputs, permuted order (dense: mlp output)
    float *mlp_out;              // (N,D)
} LayerActs;

typedef struct {
    Config cfg;
    // the backend (kernels/ops.h): params, grads and the arena are its memory (device memory
    // on a GPU); the *_h buffers below are host memory
    const Ops *ops;
    int L, D, H, Dh, V, E, K, F; // F = expert_d_ff (MoE) or d_ff (dense)
    int n_local_experts, expert_lo;  // experts held here: [expert_lo, expert_lo + El)
    // expert parallelism (model_set_comm): the EP group and its token dispatcher; NULL when
    // this rank holds every expert (ep 1), and then the MoE layer runs locally
    Comm *ep_comm;
    struct Dispatcher *disp;

    int n_tensors;
    ParamTensor *tensors;
    size_t n_params;             // floats in params (local)
    float *params, *grads;       // backend memory
    // host copy of params for init and checkpoints (= params on the CPU): model_upload_params
    // and model_download_params move it
    float *params_h;
    ParamPointers p, g;          // views of params and grads

    // activation arena, sized for (B,T) by model_set_batch
    int recompute;               // 1: [train] recompute = full (from cfg; set it before
                                 // model_set_batch, which lays out the arena for it)
    int arena_recompute;         // the setting the arena was laid out for
    // LM head + cross-entropy run head_rows rows at a time, so that neither the (N,V) logits
    // nor their gradient exist at once (256 MiB of logits per chunk at most). keep_logits = 1
    // (set before model_set_batch) keeps all N rows of logits instead, for callers that read
    // them (eval --save-logits, parity tests); head_rows_max > 0 caps the rows of a chunk
    // (tests). Both are laid out by model_set_batch.
    int keep_logits, head_rows_max;
    int arena_keep_logits, arena_head_rows_max;
    int head_rows;
    int B, T;
    float *arena;
    int32_t *iarena;
    size_t arena_floats, iarena_ints;
    LayerActs *acts;             // (L)
    float *x_final;              // (N,D) output of the last layer
    float *lnf, *lnf_rstd;       // (N,D), (N) final norm
    float *logits;               // (head_rows,V): the last chunk's logits (dlogits after
                                 // model_forward_train); (N,V) all of them with keep_logits
    float *losses;               // (N)
    int32_t *tokens, *targets;   // (N)
    // backward scratch
    float *d_res, *d_ln, *d_q, *d_k, *d_v, *d_qr, *d_kr, *d_att; // (N,D)
    float *d_xp, *d_yp;          // (R,D)
    float *d_g, *d_u, *d_a;      // (R,F); NULL under expert parallelism
    float *d_rlogits;            // (N,E)
    float *d_topk_w;             // (N,K)
    float *d_prob_bias;          // (E) load-balancing gradient per expert probability
    // host copies (host memory on every backend)
    int32_t *tokens_h, *targets_h;   // (N)
    int32_t *counts_h, *offsets_h;   // (L,E), (L,E+1): the dispatch plan's row counts and
                                     // their prefix sums

    // gradient hook (may be NULL): model_backward calls grad_hook(grad_hook_ctx, part) as soon
    // as a part's gradients are final for this backward: part = L for the final norm and
    // lm_head, then l = L-1 .. 0 for layer l's tensors, then -1 for the embedding. The trainer
    // starts the all-reduce of the gradient buckets there (overlapping the rest of backward).
    void (*grad_hook)(void *ctx, int part);
    void *grad_hook_ctx;

    // results of the last forward
    int logits_are_grads;        // 1 after model_forward_train overwrote logits with dlogits
    int head_backward_done;      // 1 from model_forward_train until model_backward
    int n_targets;
    double ce, lb, z, loss;
    double *layer_lb, *layer_z;  // (L)
    int64_t *expert_tokens;      // (L,E) assignments per expert in the last forward (this
                                 // rank's tokens, to all E experts)

    // load balancing ([moe] lb_scope, router)
    int score_fn;                // ROUTER_SOFTMAX or ROUTER_SIGMOID (kernels.h)
    int64_t *lb_counts;          // (L,E) the counts behind f_e of the lb loss in the last
                                 // forward: this micro-batch's, or the global batch's below
    // lb_scope = global_batch: the trainer sets one of these around its training passes (NULL
    // otherwise, also for evaluation); the MoE layers then take f_e from the counts of the whole
    // global batch. Forward and backward of a micro-batch must see the same setting.
    const int64_t *lb_global_counts; // (L,E) the step's counts over every micro-batch of every
                                     // rank (a routing pre-pass, model_forward_route), or NULL
    Comm *lb_global_comm;        // or: each MoE layer sums its counts over this group inside
                                 // forward (one small all-reduce per layer; accumulation 1)
} Model;

// Parameter counts by component (global, i.e. all experts), for `moet info`.
typedef struct {
    int64_t embed, lm_head, attention, norms, router, experts, dense_mlp;
    int64_t total;
    int64_t active;          // with k of E experts per token (embedding included)
    int64_t active_flops;    // N_active of §10: attention + router + k experts + lm_head
                             // (+ dense MLP), embedding lookup excluded
} ParamCounts;

// 1 when cfg's model has an expert bias tensor per layer (model.layers.N.mlp.gate.expert_bias,
// E floats): MoE with [moe] bias_update_rate > 0 or router = sigmoid. Without one (OLMoE) the
// tensor table, and so every checkpoint, is what it was before the bias existed.
int model_has_expert_bias(const Config *cfg);

// Builds the tensor table for cfg without allocating anything (used by `moet info` for models
// far larger than memory). ep_rank/ep_size select the local experts. The caller frees *out.
int model_tensor_table(const Config *cfg, int ep_rank, int ep_size, ParamTensor **out,
                       int *n_out, size_t *n_params_out, MoetErr *err);
void model_param_counts(const Config *cfg, ParamCounts *pc);
// Training FLOPs per token, §10: 6*N_active + 12*L*D*seq_len.
double model_flops_per_token(const Config *cfg);
// Floats (and int32s) the activation arena plus backward scratch needs for a micro-batch of
// (B,T): what model_set_batch allocates for cfg's [train] recompute with n_local_experts of the
// experts on this rank (fewer than n_experts: expert parallelism, whose dispatcher buffers the
// received rows apart and is not counted here).
size_t model_activation_floats(const Config *cfg, int B, int T, int n_local_experts);
// Rows per LM head chunk of a training forward over B x T tokens (model_forward_train).
int model_head_rows(const Config *cfg, int B, int T);

// Allocates the parameter and gradient buffers (zeroed) on the CPU backend.
int model_create(Model *m, const Config *cfg, int ep_rank, int ep_size, MoetErr *err);
// Opens the backend that [train] device names: ops_cpu(), or ops_cuda() on GPU
// local_rank % (GPUs visible), with the GEMM precision of [train] precision. info receives a
// one-line description for the log (the BLAS library, or the GPU). Errors: a CUDA device in a
// build without CUDA or on a machine without a GPU, with what to do.
int model_open_backend(const Config *c, int local_rank, const Ops **ops, char *info, int infolen,
                       MoetErr *err);
// The rank of this process among those on its node, from the launcher's environment
// (OMPI_COMM_WORLD_LOCAL_RANK, SLURM_LOCALID, MPI_LOCALRANKID, LOCAL_RANK); 0 when none is set.
int model_local_rank(void);
// The peak in GFLOP/s that MFU divides by (ARCHITECTURE §10) for the backend `ops`: the GPU's
// dense bf16 peak (989 TFLOP/s on H100 / H200); on the CPU the measured sgemm peak is the
// caller's (cpu_sgemm_peak_gflops), and this returns 0.
double model_peak_gflops(const Ops *ops);
// model_create on the backend `ops` (ops_cpu() or an opened ops_cuda()).
int model_create_ops(Model *m, const Config *cfg, const Ops *ops, int ep_rank, int ep_size,
                     MoetErr *err);
// model_create_ops for evaluation and generation: every expert, no gradient buffer (half the
// memory; model_backward and model_zero_grad must not be called).
int model_create_inference(Model *m, const Config *cfg, const Ops *ops, MoetErr *err);
// Copies params_h to the backend's params, or back (no-ops on the CPU, where they are one
// buffer). Init and checkpoint loads write params_h and upload; saves download first.
void model_upload_params(Model *m);
void model_download_params(Model *m);
// Attaches the EP group (ARCHITECTURE §4) of a model created with ep_rank = comm_rank(ep) and
// ep_size = comm_size(ep): the MoE layers then exchange their routed rows with the group's
// ranks (every rank of the group must run forward / backward together). ep NULL or of size 1:
// the local path. Checks that the group matches the model's expert layout.
int model_set_comm(Model *m, Comm *ep, MoetErr *err);
void model_free(Model *m);
// Initialises every parameter per §3 from a counter-based generator keyed by
// (seed, tensor name, global element index): identical weights for any rank count or ep, and
// on any backend (drawn on the host, then uploaded).
void model_init_weights(Model *m, uint64_t seed);
// A standard normal draw (not truncated) from the generator of model_init_weights, keyed by
// (seed, tensor name, element index): for weights drawn outside init (the upcycled router).
double model_normal_draw(uint64_t seed, const char *name, uint64_t index);
// Sizes the activation arena for micro-batches of B sequences of T tokens (and m->recompute).
int model_set_batch(Model *m, int B, int T, MoetErr *err);

// Forward pass over tokens (B,T). Targets are the tokens shifted by one (position t predicts
// t+1; the last position of each sequence has none). Sets m->ce, lb, z, loss and the per-row
// losses; m->logits holds the logits of all rows with keep_logits, else only the last chunk's.
void model_forward(Model *m, const int32_t *tokens);
// The routing pre-pass of lb_scope = global_batch: embedding and every layer (no LM head, no
// loss), for m->expert_tokens only (this micro-batch's assignments per layer and expert). The
// training forward of the same tokens then routes identically. Under expert parallelism every
// rank of the EP group must call it together (the layers exchange their rows).
void model_forward_route(Model *m, const int32_t *tokens);
// Aux-loss-free balancing, after an optimizer step: per layer, with load (L,E) the step's
// assignments per expert over the global batch (the same on every rank) and mean = their mean,
// bias_e += rate * sign(mean - load_e) (0 at the mean), in fp32, on the host copy and the
// backend's. No-op for a model without an expert bias.
void model_update_expert_bias(Model *m, const int64_t *load, float rate);
// model_forward for training: the same losses, and the LM head's backward is done chunk by
// chunk as its logits are made (dlogits over the chunk's logits, d lnf into d_ln, and
// ACCUMULATES lm_head's gradient), so that the (N,V) logits and dlogits never exist at once.
// model_backward must follow before anything else runs on m.
void model_forward_train(Model *m, const int32_t *tokens);
// Backward pass of the last model_forward_train: ACCUMULATES d(loss)/d(theta) into m->grads.
// With recompute = full it reruns each layer's forward but the last (bit-identical results,
// including their collectives under expert parallelism) before that layer's backward; losses
// and expert_tokens stay as forward left them.
void model_backward(Model *m);
void model_zero_grad(Model *m);

// Generation (one sequence; ep 1). model_kv_create allocates a cache of cap positions
// (<= max_seq_len). model_forward_cached runs n new tokens at positions kv->len ..
// kv->len+n-1 (the prompt at once, then one token at a time) through every layer, appends
// their keys and values to the cache, and leaves the logits of the LAST of them in m->logits
// (padded vocabulary V, backend memory). The arena must hold n tokens: model_set_batch(m, 1,
// T >= n) (or any B*T >= n). Same ops as model_forward, so the logits equal model_forward's
// at that position up to the summation order of attention.
int model_kv_create(Model *m, KVCache *kv, int cap, MoetErr *err);
void model_kv_free(Model *m, KVCache *kv);
void model_forward_cached(Model *m, KVCache *kv, const int32_t *tokens, int n);

const ParamTensor *model_find_tensor(const Model *m, const char *name);
