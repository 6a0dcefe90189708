// cmd_hf: `moet export-hf CKPT DIR` writes a checkpoint as a Hugging Face OlmoeForCausalLM folder
// (config.json, model.safetensors in the hub's per-expert layout, tokenizer files), and
// `moet import-hf DIR OUT` reads such a folder (one file or sharded) into a step-0 checkpoint.
#include <cjson/cJSON.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "data/tokenizer.h"
#include "kernels/ops.h"
#include "train/ckpt.h"
#include "train/cli.h"
#include "train/config.h"
#include "train/model.h"
#include "train/safetensors.h"

#define MAX_SETS_ 64
#define PATH_MAX_ 4096

static const char *EXPORT_HELP =
    "usage: moet export-hf CKPT DIR [--dtype fp32|bf16] [--tokenizer FILE]\n"
    "\n"
    "Writes the model of CKPT (a checkpoint file, a run folder or its latest.h5) as a Hugging\n"
    "Face OlmoeForCausalLM folder DIR (created if needed), loadable with\n"
    "transformers' OlmoeForCausalLM.from_pretrained(DIR):\n"
    "  config.json              the architecture (vocab_size = the padded vocabulary)\n"
    "  model.safetensors        the weights, named as the published OLMoE checkpoints\n"
    "                           (per-expert mlp.experts.E.{gate,up,down}_proj.weight)\n"
    "  tokenizer.json, tokenizer_config.json, generation_config.json\n"
    "A dense checkpoint (n_experts = 0) is written as the same function in OLMoE form: one\n"
    "expert (its MLP), top-1, norm_topk_prob true, a zero router.\n"
    "pad_token_id is the tokenizer's padding token (<|padding|>, <|pad|> or <pad>; OLMo's\n"
    "tokenizer: 1, as OLMoE) when a tokenizer is written and has one, else null.\n"
    "\n"
    "  --dtype fp32|bf16   weight dtype in the file (default fp32: exact; bf16 rounds to\n"
    "                      nearest even, half the size)\n"
    "  --tokenizer FILE    the tokenizer.json to copy (default: the checkpoint's\n"
    "                      data.tokenizer, when that file exists)\n";

static const char *IMPORT_HELP =
    "usage: moet import-hf DIR OUT [--set section.key=value]...\n"
    "\n"
    "Reads a Hugging Face OLMoE folder DIR (config.json and model.safetensors, or\n"
    "model.safetensors.index.json with its shards; F32, BF16 or F16 weights, converted to\n"
    "fp32; the hub's per-expert layout or transformers' fused mlp.experts.gate_up_proj /\n"
    "down_proj) and writes a model-only step-0 checkpoint into the folder OUT\n"
    "(OUT/step00000000.h5 and OUT/latest.h5), for `moet train --init OUT`, `moet eval OUT`,\n"
    "`moet generate OUT`. Every tensor's shape is checked against config.json.\n"
    "\n"
    "The config comes from config.json ([model], [moe], data.eos_id; data.tokenizer =\n"
    "DIR/tokenizer.json when it exists); vocab_size is the tokenizer's vocabulary when it pads\n"
    "to config.json's vocab_size, else config.json's vocab_size (a multiple of 128). Keys HF does\n"
    "not have get placeholders: train.seq_len = max_seq_len, micro_batch = global_batch =\n"
    "max_steps = 1, checkpoint.dir = OUT; the rest keep moet's defaults.\n"
    "\n"
    "  --set k=v   override a key of that config, e.g. --set train.micro_batch=4 (repeatable)\n";

// ---------------------------------------------------------------------------------------
// small helpers: files, JSON

static char *read_text_(const char *path, size_t *len_out) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    size_t cap = 1 << 16, n = 0, r;
    char *buf = malloc(cap + 1);
    while ((r = fread(buf + n, 1, cap - n, f)) > 0) {
        n += r;
        if (n == cap) buf = realloc(buf, (cap *= 2) + 1);
    }
    fclose(f);
    buf[n] = 0;
    if (len_out) *len_out = n;
    return buf;
}

static int write_bytes_(const char *path, const char *data, size_t n, MoetErr *err) {
    FILE *f = fopen(path, "wb");
    if (!f) return moet_errf(err, MOET_EFAIL, "%s: cannot create: %s", path, strerror(errno));
    const int bad = fwrite(data, 1, n, f) != n;
    if (fclose(f) != 0 || bad)
        return moet_errf(err, MOET_EFAIL, "%s: writing failed (disk full?)", path);
    return MOET_OK;
}

static int write_json_(const char *path, const cJSON *j, MoetErr *err) {
    char *s = cJSON_Print(j);
    const size_t n = strlen(s);
    s = realloc(s, n + 2);
    s[n] = '\n';
    s[n + 1] = 0;
    int rc = write_bytes_(path, s, n + 1, err);
    free(s);
    return rc;
}

static cJSON *parse_json_file_(const char *path, MoetErr *err, int *rc) {
    char *text = read_text_(path, NULL);
    if (!text) {
        *rc = moet_errf(err, MOET_EFAIL, "%s: cannot read: %s", path, strerror(errno));
        return NULL;
    }
    cJSON *j = cJSON_Parse(text);
    free(text);
    if (!cJSON_IsObject(j)) {
        cJSON_Delete(j);
        *rc = moet_errf(err, MOET_EFAIL, "%s: not a JSON object (malformed JSON)", path);
        return NULL;
    }
    *rc = MOET_OK;
    return j;
}

static int file_exists_(const char *path) {
    struct stat sb;
    return stat(path, &sb) == 0 && S_ISREG(sb.st_mode);
}

// The shortest decimal that reads back as x, as a double: config.json then shows 1e-05, not
// 9.99999974737875e-06 (both give the same float).
static double short_float_(float x) {
    char buf[32];
    for (int p = 6; p <= 9; p++) {
        snprintf(buf, sizeof buf, "%.*g", p, (double)x);
        if (strtof(buf, NULL) == x) break;
    }
    return strtod(buf, NULL);
}

// The padding token of a tokenizer: OLMo's <|padding|> (id 1, what OLMoE's config uses), or
// the other usual spellings; -1 when it has none.
static int tok_pad_id_(const Tokenizer *tok) {
    static const char *names[] = {"<|padding|>", "<|pad|>", "<pad>"};
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        const int id = tokenizer_token_id(tok, names[i]);
        if (id >= 0) return id;
    }
    return -1;
}

// ---------------------------------------------------------------------------------------
// export-hf

typedef struct {
    const char *spec, *dir, *tokenizer;
    int bf16;
} ExportOpts;

static int parse_export_(int argc, char **argv, ExportOpts *o, MoetErr *err) {
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const int has_val = i + 1 < argc;
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
            fputs(EXPORT_HELP, stdout);
            return -1;
        } else if (strcmp(a, "--dtype") == 0 && has_val) {
            const char *d = argv[++i];
            if (strcmp(d, "fp32") != 0 && strcmp(d, "bf16") != 0)
                return moet_errf(err, MOET_EUSAGE, "export-hf: --dtype is fp32 or bf16, not %s", d);
            o->bf16 = strcmp(d, "bf16") == 0;
        } else if (strcmp(a, "--tokenizer") == 0 && has_val) {
            o->tokenizer = argv[++i];
        } else if (strcmp(a, "--dtype") == 0 || strcmp(a, "--tokenizer") == 0) {
            return moet_errf(err, MOET_EUSAGE,
                             "export-hf: %s needs a value (see moet export-hf "
                             "--help)",
                             a);
        } else if (a[0] == '-') {
            return moet_errf(err, MOET_EUSAGE,
                             "export-hf: unknown option %s (see moet "
                             "export-hf --help)",
                             a);
        } else if (!o->spec) {
            o->spec = a;
        } else if (!o->dir) {
            o->dir = a;
        } else {
            return moet_errf(err, MOET_EUSAGE,
                             "export-hf: unexpected argument %s (usage: moet "
                             "export-hf CKPT DIR)",
                             a);
        }
    }
    if (!o->spec || !o->dir)
        return moet_errf(err, MOET_EUSAGE,
                         "export-hf: needs CKPT and DIR (see moet export-hf "
                         "--help)");
    return MOET_OK;
}

// The checkpoint's config (one rank holds every expert) and its weights on the CPU.
static int load_ckpt_(const char *spec, char *path, size_t path_size, Config *c, Model *m,
                      MoetErr *err) {
    int rc = ckpt_resolve(spec, ".", path, path_size, err);
    if (rc) return rc;
    if ((rc = ckpt_load_config(path, 0, NULL, c, err))) return rc;
    if ((rc = model_create_inference(m, c, ops_cpu(), err))) return rc;
    if ((rc = ckpt_load_model(path, m, err))) model_free(m);
    return rc;
}

// HF OlmoeForCausalLM routes by softmax probabilities and has no expert bias: a sigmoid router
// or a non-zero bias (aux-loss-free balancing) computes what no HF OLMoE model can. A bias of
// zeros (a run at step 0) routes like none and is left out of the export.
static int hf_exportable_(const Config *c, const Model *m, const char *path, MoetErr *err) {
    if (strcmp(c->router, "sigmoid") == 0)
        return moet_errf(err, MOET_EUSAGE,
                         "export-hf: %s: [moe] router = sigmoid: HF OlmoeForCausalLM has only "
                         "the softmax router, so no HF OLMoE model computes what this checkpoint "
                         "does\n---> HINT: export runs trained with router = softmax and "
                         "bias_update_rate = 0; this one works with moet eval and moet generate",
                         path);
    for (int l = 0; l < m->L; l++) {
        const float *b = m->p.layers[l].expert_bias;
        for (int e = 0; b && e < m->E; e++)
            if (b[e] != 0.0f)
                return moet_errf(err, MOET_EUSAGE,
                                 "export-hf: %s: model.layers.%d.mlp.gate.expert_bias is not zero "
                                 "(aux-loss-free balancing, [moe] bias_update_rate = %g): HF "
                                 "OlmoeForCausalLM has no expert bias, and without it the router "
                                 "would choose other experts than this model does\n---> HINT: "
                                 "export runs balanced by the auxiliary loss (bias_update_rate = "
                                 "0, lb_coef > 0); this one works with moet eval and moet generate",
                                 path, l, (double)c->bias_update_rate);
    }
    return MOET_OK;
}

static cJSON *hf_config_json_(const Config *c, int bf16, int pad_id) {
    const int dense = c->n_experts == 0;
    cJSON *j = cJSON_CreateObject();
    cJSON_AddItemToObject(j, "architectures",
                          cJSON_CreateStringArray((const char *[]){"OlmoeForCausalLM"}, 1));
    cJSON_AddStringToObject(j, "model_type", "olmoe");
    cJSON_AddNumberToObject(j, "vocab_size", c->padded_vocab);
    cJSON_AddNumberToObject(j, "hidden_size", c->d_model);
    cJSON_AddNumberToObject(j, "intermediate_size", dense ? c->d_ff : c->expert_d_ff);
    cJSON_AddNumberToObject(j, "num_hidden_layers", c->n_layers);
    cJSON_AddNumberToObject(j, "num_attention_heads", c->n_heads);
    cJSON_AddNumberToObject(j, "num_key_value_heads", c->n_heads);
    cJSON_AddStringToObject(j, "hidden_act", "silu");
    cJSON_AddNumberToObject(j, "max_position_embeddings", c->max_seq_len);
    cJSON_AddNumberToObject(j, "rms_norm_eps", short_float_(c->norm_eps));
    cJSON_AddNumberToObject(j, "rope_theta", short_float_(c->rope_theta));
    cJSON_AddNullToObject(j, "rope_scaling");
    cJSON_AddFalseToObject(j, "attention_bias");
    cJSON_AddNumberToObject(j, "attention_dropout", 0);
    cJSON_AddNullToObject(j, "clip_qkv");
    cJSON_AddFalseToObject(j, "tie_word_embeddings");
    cJSON_AddNumberToObject(j, "num_experts", dense ? 1 : c->n_experts);
    cJSON_AddNumberToObject(j, "num_experts_per_tok", dense ? 1 : c->top_k);
    cJSON_AddBoolToObject(j, "norm_topk_prob", dense || c->norm_topk_prob);
    cJSON_AddNumberToObject(j, "router_aux_loss_coef", short_float_(c->lb_coef));
    cJSON_AddFalseToObject(j, "output_router_logits");
    cJSON_AddNumberToObject(j, "eos_token_id", c->eos_id);
    if (pad_id >= 0)
        cJSON_AddNumberToObject(j, "pad_token_id", pad_id);
    else
        cJSON_AddNullToObject(j, "pad_token_id");
    cJSON_AddNullToObject(j, "bos_token_id");
    cJSON_AddNumberToObject(j, "initializer_range", short_float_(c->init_std));
    cJSON_AddStringToObject(j, "torch_dtype", bf16 ? "bfloat16" : "float32");
    cJSON_AddBoolToObject(j, "use_cache", 1);
    return j;
}

// The HF tensor list of model m: moet's stacked experts [E, ...] become E per-expert tensors
// (each a contiguous slice); a dense MLP becomes expert 0 plus a zero router [1, D]. Names are
// malloc'ed into names[] (the caller frees them); *zeros is the router's zero buffer.
static int hf_tensor_list_(const Model *m, int bf16, StWriteTensor **out, char ***names_out,
                           float **zeros) {
    const int per = m->E > 0 ? m->E : 1, cap = m->n_tensors * per + m->L;
    StWriteTensor *w = calloc((size_t)cap, sizeof *w);
    char **names = calloc((size_t)cap, sizeof *names);
    *zeros = moet_calloc((size_t)m->D * sizeof(float));
    int n = 0;
    for (int i = 0; i < m->n_tensors; i++) {
        const ParamTensor *t = &m->tensors[i];
        if (t->no_optim) continue; // the expert bias: all zeros (hf_exportable_)
        const float *data = m->params_h + t->offset;
        const char *ex = strstr(t->name, ".mlp.experts.");
        const char *mlp = strstr(t->name, ".mlp.");
        const int dense_mlp = m->E == 0 && mlp && strstr(t->name, "_proj.weight");
        if (ex || dense_mlp) {
            // "model.layers.N.mlp." + "experts.e." + "gate_proj.weight"
            const int plen = (int)(mlp - t->name) + 5;
            const char *suffix = ex ? ex + 13 : mlp + 5;
            const int ne = ex ? m->E : 1, nd = ex ? t->ndim - 1 : t->ndim;
            const int64_t *shape = ex ? t->shape + 1 : t->shape;
            if (dense_mlp && strcmp(suffix, "gate_proj.weight") == 0) { // the zero router
                names[n] = malloc(plen + 16);
                snprintf(names[n], plen + 16, "%.*sgate.weight", plen, t->name);
                w[n] = (StWriteTensor){names[n], bf16 ? ST_BF16 : ST_F32, 2, {1, m->D}, *zeros};
                n++;
            }
            for (int e = 0; e < ne; e++) {
                const size_t len = strlen(t->name) + 24;
                names[n] = malloc(len);
                snprintf(names[n], len, "%.*sexperts.%d.%s", plen, t->name, e, suffix);
                w[n] = (StWriteTensor){.name = names[n],
                                       .dtype = bf16 ? ST_BF16 : ST_F32,
                                       .ndim = nd,
                                       .data = data + (size_t)e * (t->numel / ne)};
                memcpy(w[n].shape, shape, (size_t)nd * sizeof(int64_t));
                n++;
            }
        } else {
            w[n] = (StWriteTensor){
                .name = t->name, .dtype = bf16 ? ST_BF16 : ST_F32, .ndim = t->ndim, .data = data};
            memcpy(w[n].shape, t->shape, (size_t)t->ndim * sizeof(int64_t));
            n++;
        }
    }
    *out = w;
    *names_out = names;
    return n;
}

// tokenizer.json copied, tokenizer_config.json and generation_config.json written. tok_path
// NULL: no tokenizer (a note says so); generation_config.json is written anyway.
static int write_tokenizer_(const char *dir, const char *tok_path, const Config *c,
                            const Tokenizer *tok, const char *tok_text, size_t tok_len, int pad_id,
                            int *n_files, MoetErr *err) {
    char p[PATH_MAX_];
    int rc;
    if (tok) {
        snprintf(p, sizeof p, "%s/tokenizer.json", dir);
        if ((rc = write_bytes_(p, tok_text, tok_len, err))) return rc;
        cJSON *tc = cJSON_CreateObject();
        cJSON_AddStringToObject(tc, "tokenizer_class", "PreTrainedTokenizerFast");
        const char *eos = tokenizer_token_string(tok, c->eos_id);
        if (eos)
            cJSON_AddStringToObject(tc, "eos_token", eos);
        else
            fprintf(stderr,
                    "moet export-hf: note: %s has no token %d (data.eos_id): no "
                    "eos_token in tokenizer_config.json\n",
                    tok_path, c->eos_id);
        if (pad_id >= 0) cJSON_AddStringToObject(tc, "pad_token", tokenizer_token_string(tok, pad_id));
        cJSON_AddNumberToObject(tc, "model_max_length", c->max_seq_len);
        cJSON_AddFalseToObject(tc, "clean_up_tokenization_spaces");
        snprintf(p, sizeof p, "%s/tokenizer_config.json", dir);
        rc = write_json_(p, tc, err);
        cJSON_Delete(tc);
        if (rc) return rc;
        *n_files += 2;
    }
    cJSON *g = cJSON_CreateObject();
    cJSON_AddNumberToObject(g, "eos_token_id", c->eos_id);
    if (pad_id >= 0) cJSON_AddNumberToObject(g, "pad_token_id", pad_id);
    snprintf(p, sizeof p, "%s/generation_config.json", dir);
    rc = write_json_(p, g, err);
    cJSON_Delete(g);
    *n_files += 1;
    return rc;
}

// Reads the tokenizer to copy (--tokenizer, else data.tokenizer when it exists): *tok NULL and a
// note when there is none.
static int load_tokenizer_json_(const ExportOpts *o, const Config *c, const char **tok_path,
                                Tokenizer **tok, char **text, size_t *len, MoetErr *err) {
    *tok_path = o->tokenizer ? o->tokenizer : c->tokenizer[0] ? c->tokenizer : NULL;
    *tok = NULL;
    *text = NULL;
    if (!o->tokenizer && *tok_path && !file_exists_(*tok_path)) *tok_path = NULL;
    if (!*tok_path) {
        if (c->tokenizer[0])
            fprintf(stderr,
                    "moet export-hf: note: no tokenizer written (the checkpoint's "
                    "data.tokenizer %s does not exist here; pass --tokenizer FILE)\n",
                    c->tokenizer);
        else
            fprintf(stderr, "moet export-hf: note: no tokenizer written (the checkpoint names "
                            "no data.tokenizer; pass --tokenizer FILE)\n");
        return MOET_OK;
    }
    if (!(*text = read_text_(*tok_path, len)))
        return moet_errf(err, MOET_EFAIL, "%s: cannot read the tokenizer: %s", *tok_path,
                         strerror(errno));
    int rc = tokenizer_load(tok, *tok_path, err);
    if (rc) return rc;
    const int vt = tokenizer_vocab_size(*tok);
    if (vt > c->padded_vocab)
        return moet_errf(err, MOET_EFAIL,
                         "%s: the tokenizer has %d tokens, more than the "
                         "model's %d embedding rows: wrong --tokenizer?",
                         *tok_path, vt, c->padded_vocab);
    return MOET_OK;
}

int cmd_export_hf(int argc, char **argv, MoetErr *err) {
    ExportOpts o = {0};
    int rc = parse_export_(argc, argv, &o, err);
    if (rc) return rc < 0 ? MOET_OK : rc;
    const double t0 = moet_time();
    char path[PATH_MAX_], p[PATH_MAX_];
    Config c;
    Model m;
    memset(&m, 0, sizeof m);
    if ((rc = load_ckpt_(o.spec, path, sizeof path, &c, &m, err))) return rc;
    if ((rc = hf_exportable_(&c, &m, path, err))) {
        model_free(&m);
        return rc;
    }
    const char *tok_path;
    Tokenizer *tok = NULL;
    cJSON *cfg = NULL;
    char *tok_text = NULL, **names = NULL;
    size_t tok_len = 0;
    StWriteTensor *w = NULL;
    float *zeros = NULL;
    int nw = 0, n_files = 2;
    if ((rc = load_tokenizer_json_(&o, &c, &tok_path, &tok, &tok_text, &tok_len, err))) goto done;
    if ((rc = moet_mkdirs(o.dir, err))) goto done;
    const int pad_id = tok ? tok_pad_id_(tok) : -1;
    cfg = hf_config_json_(&c, o.bf16, pad_id);
    snprintf(p, sizeof p, "%s/config.json", o.dir);
    if ((rc = write_json_(p, cfg, err))) goto done;
    const double t1 = moet_time();
    nw = hf_tensor_list_(&m, o.bf16, &w, &names, &zeros);
    uint64_t bytes = 0;
    snprintf(p, sizeof p, "%s/model.safetensors", o.dir);
    if ((rc = st_write(p, w, nw, &bytes, err))) goto done;
    const double t2 = moet_time();
    if ((rc = write_tokenizer_(o.dir, tok_path, &c, tok, tok_text, tok_len, pad_id, &n_files, err)))
        goto done;
    printf("export-hf %s -> %s: %d files (config.json, model.safetensors%s), %d tensors, "
           "%.3f GB %s in model.safetensors (%.2f GB/s), %.2f s\n",
           path, o.dir, n_files,
           tok ? ", tokenizer.json, tokenizer_config.json, "
                 "generation_config.json"
               : ", generation_config.json",
           nw, (double)bytes / 1e9, o.bf16 ? "bf16" : "fp32",
           (double)bytes / 1e9 / (t2 - t1 > 1e-9 ? t2 - t1 : 1e-9), moet_time() - t0);
done:
    for (int i = 0; names && i < nw; i++) free(names[i]);
    free(names);
    free(w);
    free(zeros);
    cJSON_Delete(cfg);
    tokenizer_free(tok);
    free(tok_text);
    model_free(&m);
    return rc;
}

// ---------------------------------------------------------------------------------------
// import-hf: the HF folder's tensors (one file, or shards listed by the index)

typedef struct {
    const char *dir;
    int n;                // files
    SafeTensors **st;     // (n)
    unsigned char **used; // (n) per tensor of each file: read by the import
    cJSON *index;         // model.safetensors.index.json, or NULL
    char index_path[PATH_MAX_];
} HfSource;

static void src_close_(HfSource *s) {
    for (int i = 0; i < s->n; i++) {
        st_close(s->st[i]);
        free(s->used[i]);
    }
    free(s->st);
    free(s->used);
    cJSON_Delete(s->index);
}

static int src_add_file_(HfSource *s, const char *name, MoetErr *err) {
    char p[PATH_MAX_];
    snprintf(p, sizeof p, "%s/%s", s->dir, name);
    for (int i = 0; i < s->n; i++)
        if (strcmp(s->st[i]->path, p) == 0) return MOET_OK;
    s->st = realloc(s->st, (size_t)(s->n + 1) * sizeof *s->st);
    s->used = realloc(s->used, (size_t)(s->n + 1) * sizeof *s->used);
    int rc = st_open(&s->st[s->n], p, err);
    if (rc) return rc;
    s->used[s->n] = calloc((size_t)s->st[s->n]->n + 1, 1);
    s->n++;
    return MOET_OK;
}

// Opens DIR/model.safetensors, or every shard that DIR/model.safetensors.index.json names.
static int src_open_(HfSource *s, const char *dir, MoetErr *err) {
    memset(s, 0, sizeof *s);
    s->dir = dir;
    char p[PATH_MAX_];
    snprintf(p, sizeof p, "%s/model.safetensors", dir);
    snprintf(s->index_path, sizeof s->index_path, "%s/model.safetensors.index.json", dir);
    if (file_exists_(p)) return src_add_file_(s, "model.safetensors", err);
    if (!file_exists_(s->index_path))
        return moet_errf(err, MOET_EFAIL,
                         "%s: neither model.safetensors nor "
                         "model.safetensors.index.json: not an HF model folder (or the weights "
                         "are in another format: save them with safe_serialization=True)",
                         dir);
    int rc;
    if (!(s->index = parse_json_file_(s->index_path, err, &rc))) return rc;
    const cJSON *wm = cJSON_GetObjectItemCaseSensitive(s->index, "weight_map"), *e;
    if (!cJSON_IsObject(wm))
        return moet_errf(err, MOET_EFAIL, "%s: no \"weight_map\" object", s->index_path);
    cJSON_ArrayForEach(e, wm) {
        if (!cJSON_IsString(e) || strchr(e->valuestring, '/'))
            return moet_errf(err, MOET_EFAIL,
                             "%s: weight_map entry %s is not a file name in "
                             "the folder",
                             s->index_path, e->string);
        if ((rc = src_add_file_(s, e->valuestring, err))) return rc;
    }
    return MOET_OK;
}

// Where tensor `name` is (via the index when there is one): the file's position in s->st and
// the entry, or -1 when no file holds it.
static int src_locate_(const HfSource *s, const char *name, const StTensor **t) {
    for (int i = 0; i < s->n; i++) {
        if (s->index) {
            const cJSON *wm = cJSON_GetObjectItemCaseSensitive(s->index, "weight_map");
            const cJSON *f = cJSON_GetObjectItemCaseSensitive(wm, name);
            if (!cJSON_IsString(f)) return -1;
            char p[PATH_MAX_];
            snprintf(p, sizeof p, "%s/%s", s->dir, f->valuestring);
            if (strcmp(p, s->st[i]->path) != 0) continue;
        }
        // a shard that lacks what the index says it holds: reported as missing
        return (*t = st_find(s->st[i], name)) ? i : -1;
    }
    return -1;
}

// src_locate_ for reading: marks the tensor as imported.
static const StTensor *src_find_(HfSource *s, const char *name, const SafeTensors **file) {
    const StTensor *t;
    const int i = src_locate_(s, name, &t);
    if (i < 0) return NULL;
    s->used[i][t - s->st[i]->t] = 1;
    *file = s->st[i];
    return t;
}

// The tensors the folder offers (the index's names, else the file's) that the model left.
static void note_unused_(const HfSource *s) {
    int unused = 0;
    const char *first = NULL;
    const StTensor *t;
    const cJSON *e;
    if (s->index) {
        cJSON_ArrayForEach(e, cJSON_GetObjectItemCaseSensitive(s->index, "weight_map")) {
            const int i = src_locate_(s, e->string, &t);
            if ((i < 0 || !s->used[i][t - s->st[i]->t]) && unused++ == 0) first = e->string;
        }
    } else {
        for (int i = 0; i < s->st[0]->n; i++)
            if (!s->used[0][i] && unused++ == 0) first = s->st[0]->t[i].name;
    }
    if (unused)
        fprintf(stderr,
                "moet import-hf: note: %d tensors of %s are not part of the model and "
                "were not imported (e.g. %s)\n",
                unused, s->dir, first);
}

static const char *src_where_(const HfSource *s) {
    return s->index ? s->index_path : s->st[0]->path;
}

static void shape_str_(char *buf, size_t size, int nd, const int64_t *d) {
    int w = snprintf(buf, size, "[");
    for (int i = 0; i < nd; i++)
        w += snprintf(buf + w, size - (size_t)w, "%s%lld", i ? ", " : "", (long long)d[i]);
    snprintf(buf + w, size - (size_t)w, "]");
}

// Finds `name`, checks its shape against want[0..nd), reads elements [first, first+count).
static int src_read_(HfSource *s, const char *name, int nd, const int64_t *want, uint64_t first,
                     uint64_t count, float *dst, MoetErr *err) {
    const SafeTensors *f = NULL;
    const StTensor *t = src_find_(s, name, &f);
    if (!t)
        return moet_errf(err, MOET_EFAIL,
                         "%s: missing tensor %s (the model that config.json "
                         "describes needs it)",
                         src_where_(s), name);
    int same = t->ndim == nd;
    for (int i = 0; same && i < nd; i++) same = t->shape[i] == want[i];
    if (!same) {
        char got[128], exp[128];
        shape_str_(got, sizeof got, t->ndim, t->shape);
        shape_str_(exp, sizeof exp, nd, want);
        return moet_errf(err, MOET_EFAIL,
                         "%s: tensor %s has shape %s, but config.json implies "
                         "%s",
                         f->path, name, got, exp);
    }
    return st_read_f32(f, t, first, count, dst, err);
}

// One expert tensor of moet ([E,F,D] gate/up or [E,D,F] down), from the hub's per-expert
// tensors or from transformers' fused gate_up_proj [E,2F,D] (gate rows first) / down_proj.
static int load_experts_(HfSource *s, const Model *m, const ParamTensor *t, float *dst,
                         MoetErr *err) {
    const char *ex = strstr(t->name, ".mlp.experts.") + 13; // "gate_proj.weight"
    const int plen = (int)(ex - t->name);
    const size_t per = t->numel / (size_t)m->E;
    char name[256];
    snprintf(name, sizeof name, "%.*s0.%s", plen, t->name, ex);
    const SafeTensors *f;
    if (src_find_(s, name, &f)) {
        for (int e = 0; e < m->E; e++) {
            snprintf(name, sizeof name, "%.*s%d.%s", plen, t->name, e, ex);
            int rc = src_read_(s, name, 2, t->shape + 1, 0, per, dst + (size_t)e * per, err);
            if (rc) return rc;
        }
        return MOET_OK;
    }
    const int down = strncmp(ex, "down_proj", 9) == 0, up = strncmp(ex, "up_proj", 7) == 0;
    snprintf(name, sizeof name, "%.*s%s", plen, t->name, down ? "down_proj" : "gate_up_proj");
    if (!src_find_(s, name, &f)) {
        snprintf(name, sizeof name, "%.*s0.%s", plen, t->name, ex);
        return moet_errf(err, MOET_EFAIL, "%s: missing tensor %s (nor the fused %.*s%s)",
                         src_where_(s), name, plen, t->name, down ? "down_proj" : "gate_up_proj");
    }
    if (down) return src_read_(s, name, 3, t->shape, 0, t->numel, dst, err);
    const int64_t want[3] = {m->E, 2 * t->shape[1], t->shape[2]};
    for (int e = 0; e < m->E; e++) {
        int rc = src_read_(s, name, 3, want, (2 * (size_t)e + (size_t)up) * per, per,
                           dst + (size_t)e * per, err);
        if (rc) return rc;
    }
    return MOET_OK;
}

static int load_weights_(HfSource *s, Model *m, MoetErr *err) {
    for (int i = 0; i < m->n_tensors; i++) {
        const ParamTensor *t = &m->tensors[i];
        float *dst = m->params_h + t->offset;
        int rc = strstr(t->name, ".mlp.experts.")
                     ? load_experts_(s, m, t, dst, err)
                     : src_read_(s, t->name, t->ndim, t->shape, 0, t->numel, dst, err);
        if (rc) return rc;
    }
    note_unused_(s);
    return MOET_OK;
}

// ---------------------------------------------------------------------------------------
// import-hf: config.json -> Config

static int set_(Config *c, const char *key, const char *value, MoetErr *err) {
    char a[PATH_MAX_ + 64];
    snprintf(a, sizeof a, "%s=%s", key, value);
    return config_set(c, a, err);
}

// config.json key k as a config_set value of moet key `key` (numbers exactly, booleans as
// true/false); missing or of another type: an error naming both, unless optional.
static int set_from_(Config *c, const cJSON *j, const char *path, const char *k, const char *key,
                     int optional, MoetErr *err) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(j, k);
    char buf[64];
    if (cJSON_IsNumber(v))
        snprintf(buf, sizeof buf, "%.17g", v->valuedouble);
    else if (cJSON_IsBool(v))
        snprintf(buf, sizeof buf, "%s", cJSON_IsTrue(v) ? "true" : "false");
    else if (!v && optional)
        return MOET_OK;
    else
        return moet_errf(err, MOET_EUSAGE, "%s: \"%s\" is %s (a number%s is needed for [%s])", path,
                         k, v ? "not a number" : "missing",
                         strstr(key, "norm_topk") ? " or boolean" : "", key);
    int rc = set_(c, key, buf, err);
    if (rc) {
        char why[sizeof err->msg];
        snprintf(why, sizeof why, "%s", err->msg);
        return moet_errf(err, MOET_EUSAGE, "%s: \"%s\" = %s: %s", path, k, buf, why);
    }
    return MOET_OK;
}

// What moet's model cannot represent: an error naming the key and the value it needs.
static int check_supported_(const cJSON *j, const char *path, MoetErr *err) {
    const cJSON *mt = cJSON_GetObjectItemCaseSensitive(j, "model_type");
    if (!cJSON_IsString(mt) || strcmp(mt->valuestring, "olmoe") != 0)
        return moet_errf(err, MOET_EUSAGE,
                         "%s: \"model_type\" is %s%s%s, not \"olmoe\": moet "
                         "imports OLMoE models (OlmoeForCausalLM) only",
                         path, cJSON_IsString(mt) ? "\"" : "",
                         cJSON_IsString(mt) ? mt->valuestring : "missing",
                         cJSON_IsString(mt) ? "\"" : "");
    const cJSON *kv = cJSON_GetObjectItemCaseSensitive(j, "num_key_value_heads");
    const cJSON *h = cJSON_GetObjectItemCaseSensitive(j, "num_attention_heads");
    if (cJSON_IsNumber(kv) && cJSON_IsNumber(h) && kv->valueint != h->valueint)
        return moet_errf(err, MOET_EUSAGE,
                         "%s: \"num_key_value_heads\" = %d differs from "
                         "num_attention_heads = %d: moet has full multi-head attention only",
                         path, kv->valueint, h->valueint);
    static const struct {
        const char *key, *why;
        int bad_true; // 1: true is unsupported; 0: any non-null value is
    } R[] = {{"attention_bias", "moet's attention has no biases", 1},
             {"tie_word_embeddings", "moet's embedding and lm_head are separate tensors", 1},
             {"clip_qkv", "moet does not clip q, k, v", 0},
             {"rope_scaling", "moet has plain RoPE", 0}};
    for (size_t i = 0; i < sizeof R / sizeof R[0]; i++) {
        const cJSON *v = cJSON_GetObjectItemCaseSensitive(j, R[i].key);
        if (R[i].bad_true ? cJSON_IsTrue(v) : (v && !cJSON_IsNull(v)))
            return moet_errf(err, MOET_EUSAGE, "%s: \"%s\" is %s: unsupported (%s)", path, R[i].key,
                             R[i].bad_true ? "true" : "set", R[i].why);
    }
    const cJSON *act = cJSON_GetObjectItemCaseSensitive(j, "hidden_act");
    if (act && (!cJSON_IsString(act) || strcmp(act->valuestring, "silu") != 0))
        return moet_errf(err, MOET_EUSAGE,
                         "%s: \"hidden_act\" is not \"silu\": moet's experts "
                         "are SwiGLU",
                         path);
    const cJSON *rp = cJSON_GetObjectItemCaseSensitive(j, "rope_parameters");
    const cJSON *rt = cJSON_GetObjectItemCaseSensitive(rp, "rope_type");
    if (rt && (!cJSON_IsString(rt) || strcmp(rt->valuestring, "default") != 0))
        return moet_errf(err, MOET_EUSAGE,
                         "%s: \"rope_parameters\".\"rope_type\" is not "
                         "\"default\": moet has plain RoPE",
                         path);
    return MOET_OK;
}

// vocab_size: HF's is the padded size; moet's is the tokenizer's, padded to 128 by the model.
static int set_vocab_(Config *c, const cJSON *j, const char *dir, const char *path, MoetErr *err) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(j, "vocab_size");
    if (!cJSON_IsNumber(v) || v->valueint < 1)
        return moet_errf(err, MOET_EUSAGE, "%s: \"vocab_size\" missing or not a count", path);
    int vocab = v->valueint, rc;
    char p[PATH_MAX_], buf[32];
    snprintf(p, sizeof p, "%s/tokenizer.json", dir);
    Tokenizer *tok = NULL;
    if (file_exists_(p) && (rc = tokenizer_load(&tok, p, err))) return rc;
    if (tok) {
        const int vt = tokenizer_vocab_size(tok);
        if (vt > 0 && (vt + 127) / 128 * 128 == vocab) vocab = vt;
        tokenizer_free(tok);
        if ((rc = set_(c, "data.tokenizer", p, err))) return rc;
    }
    if ((vocab + 127) / 128 * 128 != v->valueint)
        return moet_errf(err, MOET_EUSAGE,
                         "%s: \"vocab_size\" = %d is not a multiple of 128: "
                         "moet pads the vocabulary to one (ARCHITECTURE §3); pad embed_tokens "
                         "and lm_head to %d rows before importing",
                         path, v->valueint, (v->valueint + 127) / 128 * 128);
    snprintf(buf, sizeof buf, "%d", vocab);
    return set_(c, "model.vocab_size", buf, err);
}

static int set_rope_theta_(Config *c, const cJSON *j, const char *path, MoetErr *err) {
    if (cJSON_GetObjectItemCaseSensitive(j, "rope_theta"))
        return set_from_(c, j, path, "rope_theta", "model.rope_theta", 0, err);
    // transformers 5 writes it inside rope_parameters
    const cJSON *rp = cJSON_GetObjectItemCaseSensitive(j, "rope_parameters");
    return set_from_(c, rp, path, "rope_theta", "model.rope_theta", 1, err);
}

static int set_eos_(Config *c, const cJSON *j, const char *path, MoetErr *err) {
    const cJSON *e = cJSON_GetObjectItemCaseSensitive(j, "eos_token_id");
    if (cJSON_IsArray(e)) e = e->child; // several: the first is the document separator
    if (!e || cJSON_IsNull(e)) {
        fprintf(stderr,
                "moet import-hf: note: %s has no eos_token_id: data.eos_id keeps its "
                "default %d\n",
                path, c->eos_id);
        return MOET_OK;
    }
    if (!cJSON_IsNumber(e))
        return moet_errf(err, MOET_EUSAGE, "%s: \"eos_token_id\" is not a token id", path);
    char buf[32];
    snprintf(buf, sizeof buf, "%d", e->valueint);
    return set_(c, "data.eos_id", buf, err);
}

static int config_from_hf_(Config *c, const char *dir, const char *out, int n_sets,
                           char *const *sets, MoetErr *err) {
    char path[PATH_MAX_];
    snprintf(path, sizeof path, "%s/config.json", dir);
    int rc;
    cJSON *j = parse_json_file_(path, err, &rc);
    if (!j) return rc;
    static const struct {
        const char *hf, *moet;
        int optional;
    } K[] = {{"hidden_size", "model.d_model", 0},
             {"num_hidden_layers", "model.n_layers", 0},
             {"num_attention_heads", "model.n_heads", 0},
             {"max_position_embeddings", "model.max_seq_len", 0},
             {"max_position_embeddings", "train.seq_len", 0},
             {"rms_norm_eps", "model.norm_eps", 1},
             {"initializer_range", "model.init_std", 1},
             {"num_experts", "moe.n_experts", 0},
             {"num_experts_per_tok", "moe.top_k", 0},
             {"intermediate_size", "moe.expert_d_ff", 0},
             {"norm_topk_prob", "moe.norm_topk_prob", 1},
             {"router_aux_loss_coef", "moe.lb_coef", 1}};
    config_defaults(c);
    rc = check_supported_(j, path, err);
    for (size_t i = 0; !rc && i < sizeof K / sizeof K[0]; i++)
        rc = set_from_(c, j, path, K[i].hf, K[i].moet, K[i].optional, err);
    if (!rc) rc = set_rope_theta_(c, j, path, err);
    if (!rc) rc = set_vocab_(c, j, dir, path, err);
    if (!rc) rc = set_eos_(c, j, path, err);
    cJSON_Delete(j);
    const char *fill[] = {"train.micro_batch=1", "train.global_batch=1", "train.max_steps=1"};
    for (int i = 0; !rc && i < 3; i++) rc = config_set(c, fill[i], err);
    if (!rc) rc = set_(c, "checkpoint.dir", out, err);
    for (int i = 0; !rc && i < n_sets; i++) rc = config_set(c, sets[i], err);
    c->ep = 1;
    if (!rc) rc = config_validate(c, path, err);
    return rc;
}

// ---------------------------------------------------------------------------------------
// import-hf: the command

static int parse_import_(int argc, char **argv, const char **dir, const char **out, char **sets,
                         int *n_sets, MoetErr *err) {
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
            fputs(IMPORT_HELP, stdout);
            return -1;
        } else if (strcmp(a, "--set") == 0 && i + 1 < argc) {
            if (*n_sets == MAX_SETS_)
                return moet_errf(err, MOET_EUSAGE, "import-hf: too many --set options");
            sets[(*n_sets)++] = argv[++i];
        } else if (strcmp(a, "--set") == 0) {
            return moet_errf(err, MOET_EUSAGE, "import-hf: --set needs section.key=value");
        } else if (a[0] == '-') {
            return moet_errf(err, MOET_EUSAGE,
                             "import-hf: unknown option %s (see moet "
                             "import-hf --help)",
                             a);
        } else if (!*dir) {
            *dir = a;
        } else if (!*out) {
            *out = a;
        } else {
            return moet_errf(err, MOET_EUSAGE,
                             "import-hf: unexpected argument %s (usage: moet "
                             "import-hf DIR OUT)",
                             a);
        }
    }
    if (!*dir || !*out)
        return moet_errf(err, MOET_EUSAGE,
                         "import-hf: needs DIR and OUT (see moet import-hf "
                         "--help)");
    return MOET_OK;
}

int cmd_import_hf(int argc, char **argv, MoetErr *err) {
    const char *dir = NULL, *out = NULL;
    char *sets[MAX_SETS_];
    int n_sets = 0;
    int rc = parse_import_(argc, argv, &dir, &out, sets, &n_sets, err);
    if (rc) return rc < 0 ? MOET_OK : rc;
    char p[PATH_MAX_];
    snprintf(p, sizeof p, "%s/latest.h5", out);
    struct stat sb;
    if (lstat(p, &sb) == 0)
        return moet_errf(err, MOET_EUSAGE,
                         "import-hf: %s already holds a checkpoint (%s): "
                         "import into a new folder",
                         out, p);
    const double t0 = moet_time();
    Config c;
    if ((rc = config_from_hf_(&c, dir, out, n_sets, sets, err))) return rc;
    HfSource src;
    Model m;
    memset(&m, 0, sizeof m);
    char *ini = NULL;
    int have_model = 0;
    if ((rc = src_open_(&src, dir, err))) goto done;
    if ((rc = model_create_inference(&m, &c, ops_cpu(), err))) goto done;
    have_model = 1;
    if ((rc = load_weights_(&src, &m, err))) goto done;
    const double t1 = moet_time();
    const int len = config_to_ini(&c, NULL, 0);
    ini = malloc((size_t)len + 1);
    config_to_ini(&c, ini, len + 1);
    CkptSaveOpts so = {.dir = out, .keep_last = 1, .keep_every = 0, .model_only = 1};
    TrainState st;
    memset(&st, 0, sizeof st);
    char saved[PATH_MAX_];
    if ((rc = ckpt_save(&so, &m, NULL, NULL, &st, ini, saved, sizeof saved, err))) goto done;
    printf("import-hf %s -> %s: %d tensors, %zu parameters (%s), read in %.2f s, %.2f s in "
           "all\n",
           dir, saved, m.n_tensors, m.n_params,
           src.n > 1 || src.index ? "sharded" : "model.safetensors", t1 - t0, moet_time() - t0);
done:
    src_close_(&src);
    free(ini);
    if (have_model) model_free(&m);
    return rc;
}
