// config: the run configuration, from an INI file (inih) plus `--set section.key=value`.
// One table, KEYS, lists every key once (section, name, type, field, default, range, help);
// defaults, parsing, --set, range checks and config_to_ini all walk it, so a new key is one
// line here plus its field in config.h. Rules between keys live in config_validate.
#include "train/config.h"

#include <ctype.h>
#include <errno.h>
#include <float.h>
#include <inttypes.h>
#include <limits.h>
#include <math.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <ini.h>

// ---- the key table ----

typedef enum { K_INT, K_FLOAT, K_BOOL, K_STR, K_U64 } KeyType;
// REQ_DENSE / REQ_MOE: required only for a dense model (n_experts = 0) / an MoE model.
typedef enum { REQ_NO, REQ_YES, REQ_DENSE, REQ_MOE } KeyReq;

typedef struct {
    const char *section, *name;
    KeyType type;
    size_t offset, size; // the field in Config
    const char *def;     // default, as INI text; NULL: none (required or conditional key)
    KeyReq req;
    double lo, hi; // int, float: allowed range, inclusive unless lo_open / hi_open
    int lo_open, hi_open;
    const char *choices; // string: allowed values "a|b|c" (NULL: any)
    int nonempty;        // string: must not be empty
    const char *help;
} Key;

#define FIELD_(f)         .offset = offsetof(Config, f), .size = sizeof(((Config *)0)->f)
#define INT_(sec, nm, f)  .section = sec, .name = nm, .type = K_INT, FIELD_(f)
#define FLT_(sec, nm, f)  .section = sec, .name = nm, .type = K_FLOAT, FIELD_(f)
#define BOOL_(sec, nm, f) .section = sec, .name = nm, .type = K_BOOL, FIELD_(f), .lo = 0, .hi = 1
#define STR_(sec, nm, f)  .section = sec, .name = nm, .type = K_STR, FIELD_(f)
#define U64_(sec, nm, f)  .section = sec, .name = nm, .type = K_U64, FIELD_(f)
#define IGE_(n)           .lo = (n), .hi = INT_MAX               // int >= n
#define FGE_(n)           .lo = (n), .hi = FLT_MAX               // float >= n
#define FGT_(n)           .lo = (n), .lo_open = 1, .hi = FLT_MAX // float > n
#define FUNIT_            .lo = 0, .hi = 1, .hi_open = 1         // float in [0, 1)

// Sections appear in this order in config_to_ini; keep each section's keys together.
static const Key KEYS[] = {
    {INT_("model", "d_model", d_model), .req = REQ_YES, IGE_(1), .help = "model width D"},
    {INT_("model", "n_layers", n_layers), .req = REQ_YES, IGE_(1), .help = "transformer blocks L"},
    {INT_("model", "n_heads", n_heads), .req = REQ_YES, IGE_(1),
     .help = "attention heads H; head_dim = d_model / n_heads must be even (RoPE)"},
    // padded_vocab = vocab_size rounded up to 128 must fit an int
    {INT_("model", "vocab_size", vocab_size), .req = REQ_YES, .lo = 1, .hi = INT_MAX - 127,
     .help = "tokenizer vocabulary; the embeddings are padded to a multiple of 128"},
    {INT_("model", "max_seq_len", max_seq_len), .req = REQ_YES, IGE_(1),
     .help = "longest sequence the model supports"},
    {FLT_("model", "rope_theta", rope_theta), .def = "10000", FGT_(0), .help = "RoPE base"},
    {FLT_("model", "norm_eps", norm_eps), .def = "1e-5", FGT_(0), .help = "RMSNorm epsilon"},
    {INT_("model", "d_ff", d_ff), .req = REQ_DENSE, IGE_(0),
     .help = "SwiGLU MLP width of a dense model"},
    {FLT_("model", "init_std", init_std), .def = "0.02", FGT_(0),
     .help = "init std of every matrix (truncated normal, cut at +-3 std)"},

    {INT_("moe", "n_experts", n_experts), .req = REQ_YES, IGE_(0),
     .help = "experts E per layer; 0 = a dense model"},
    {INT_("moe", "top_k", top_k), .req = REQ_MOE, IGE_(0), .help = "experts per token K"},
    {INT_("moe", "expert_d_ff", expert_d_ff), .req = REQ_MOE, IGE_(0),
     .help = "SwiGLU width F of each expert"},
    {BOOL_("moe", "norm_topk_prob", norm_topk_prob), .def = "false",
     .help = "renormalise the top-k router probabilities to sum 1 (OLMoE: false)"},
    {FLT_("moe", "lb_coef", lb_coef), .def = "0.01", FGE_(0), .help = "load-balancing loss weight"},
    {FLT_("moe", "z_coef", z_coef), .def = "0.001", FGE_(0), .help = "router z-loss weight"},
    {STR_("moe", "router", router), .def = "softmax", .choices = "softmax|sigmoid",
     .help = "router scores: softmax (OLMoE), or sigmoid (DeepSeek-V3: the top-k weights are "
             "the sigmoid scores renormalised over the top-k; needs norm_topk_prob = true)"},
    {STR_("moe", "lb_scope", lb_scope), .def = "micro_batch", .choices = "micro_batch|global_batch",
     .help = "load-balancing loss: f_e (the share of assignments to expert e) counted over each "
             "micro-batch (OLMoE) or over the whole global batch, all micro-batches and ranks "
             "(arXiv 2501.11873; costs a routing pre-pass with gradient accumulation)"},
    {FLT_("moe", "bias_update_rate", bias_update_rate), .def = "0", FGE_(0),
     .help = "aux-loss-free balancing (DeepSeek-V3): a per-expert bias added to the router "
             "scores for the top-k choice only, after each step bias += rate * sign(mean load - "
             "load); 0 = off"},

    {INT_("train", "seq_len", seq_len), .req = REQ_YES, IGE_(2),
     .help = "tokens per training sequence T"},
    {INT_("train", "micro_batch", micro_batch), .req = REQ_YES, IGE_(1),
     .help = "sequences per micro-batch per rank B"},
    {INT_("train", "global_batch", global_batch), .req = REQ_YES, IGE_(1),
     .help = "sequences per optimizer step over all ranks (micro_batch x accumulation x ranks)"},
    {INT_("train", "max_steps", max_steps), .req = REQ_YES, IGE_(1),
     .help = "optimizer steps to train"},
    {U64_("train", "seed", seed), .def = "42", .help = "seed for init and data order"},
    {STR_("train", "device", device), .def = "cpu", .choices = "cpu|cuda|cpu-shadow",
     .help = "backend: cpu or cuda (cpu-shadow: the CPU backend run like a GPU's, behind "
             "device pointers the host cannot touch; a test of the GPU code paths)"},
    {STR_("train", "precision", precision), .def = "auto", .choices = "auto|fp32|bf16",
     .help = "GEMM precision: bf16 operands with fp32 accumulation (tensor cores; on cpu "
             "oneDNN on AVX512-BF16), or exact fp32; auto = bf16 on cuda, fp32 on cpu"},
    {INT_("train", "eval_every", eval_every), .def = "0", IGE_(0),
     .help = "steps between evaluations on data.valid (0 = off)"},
    {INT_("train", "eval_batches", eval_batches), .def = "16", IGE_(1),
     .help = "micro-batches per evaluation"},
    {INT_("train", "log_every", log_every), .def = "1", IGE_(1),
     .help = "steps between metrics lines"},
    {STR_("train", "recompute", recompute), .def = "none", .choices = "none|full",
     .help = "activation recomputation: none, or full (keep each layer's input only and "
             "recompute the layer in backward: less memory, about 1/3 more compute)"},

    {FLT_("optim", "lr", lr), .def = "4e-4", FGE_(0), .help = "peak learning rate"},
    {FLT_("optim", "min_lr", min_lr), .def = "5e-5", FGE_(0),
     .help = "learning rate at the end of the schedule"},
    {INT_("optim", "warmup_steps", warmup_steps), .def = "2000", IGE_(0),
     .help = "linear warmup steps"},
    {STR_("optim", "schedule", schedule), .def = "cosine", .choices = "cosine|linear|constant",
     .help = "decay after warmup: cosine, linear or constant"},
    {FLT_("optim", "beta1", beta1), .def = "0.9", FUNIT_, .help = "AdamW beta1"},
    {FLT_("optim", "beta2", beta2), .def = "0.95", FUNIT_, .help = "AdamW beta2"},
    {FLT_("optim", "eps", eps), .def = "1e-8", FGT_(0), .help = "AdamW epsilon"},
    {FLT_("optim", "weight_decay", weight_decay), .def = "0.1", FGE_(0),
     .help = "AdamW decoupled weight decay"},
    {FLT_("optim", "grad_clip", grad_clip), .def = "1.0", FGE_(0),
     .help = "clip the global gradient norm to this (0 = off)"},

    {STR_("data", "train", train), .def = "", .help = "glob of training shards (*.npy)"},
    {STR_("data", "valid", valid), .def = "", .help = "glob of validation shards (may be empty)"},
    {STR_("data", "tokenizer", tokenizer), .def = "", .help = "HF tokenizer.json"},
    {INT_("data", "eos_id", eos_id), .def = "50279", IGE_(0),
     .help = "end-of-document token id (OLMo tokenizer: 50279)"},

    {STR_("checkpoint", "dir", ckpt_dir), .def = "checkpoints/run", .nonempty = 1,
     .help = "the run's output folder: checkpoints, latest.h5, metrics"},
    {INT_("checkpoint", "every", ckpt_every), .def = "1000", IGE_(1),
     .help = "steps between checkpoints"},
    {INT_("checkpoint", "keep_last", keep_last), .def = "3", IGE_(1),
     .help = "rotating checkpoints kept"},
    {INT_("checkpoint", "keep_every", keep_every), .def = "0", IGE_(0),
     .help = "every keep_every-th checkpoint is kept for good (0 = none)"},
    {BOOL_("checkpoint", "model_only", model_only), .def = "false",
     .help = "write the weights only, without optimizer state"},

    {INT_("parallel", "ep", ep), .def = "1", IGE_(1),
     .help = "expert-parallel degree (divides n_experts and the world size)"},
    {STR_("parallel", "comm", comm), .def = "auto", .choices = "auto|mpi|nccl",
     .help = "transport for gradients and expert rows: nccl (GPUs), mpi (device buffers "
             "staged through host memory; also several ranks per GPU), auto = nccl on cuda "
             "with one rank per GPU, else mpi"},
    {INT_("parallel", "zero", zero), .def = "0", .lo = 0, .hi = 1,
     .help = "ZeRO stage: 0, or 1 = AdamW moments and the update sharded over the "
             "data-parallel ranks (params all-gathered after the step)"},
    {INT_("parallel", "bucket_mb", bucket_mb), .def = "64", IGE_(1),
     .help = "gradient all-reduce bucket size in MB (buckets start while backward runs)"},
    {INT_("parallel", "timeout_s", timeout_s), .def = "600", IGE_(0),
     .help = "a collective unfinished after this many seconds aborts the job, naming the "
             "rank (0 = wait forever)"},
    {BOOL_("parallel", "a2a_overlap", a2a_overlap), .def = "true",
     .help = "ep > 1: the MoE backward sends the input gradients back to their ranks while it "
             "computes the expert weight gradients (same results; false: one after the other)"},

    {STR_("log", "metrics", metrics), .def = "metrics.jsonl", .nonempty = 1,
     .help = "metrics file (JSON lines) inside checkpoint.dir"},
};
enum { N_KEYS = (int)(sizeof KEYS / sizeof KEYS[0]) };
_Static_assert(N_KEYS <= (int)sizeof(((Config *)0)->given_), "Config.given_ is too small");

// given_[k]: how key k got its value (0 = default / not given).
enum { GIVEN_FILE = 1, GIVEN_SET = 2 };

// inih reads lines into a buffer of INI_MAX_LINE bytes, and this build cannot grow it, so a
// string value must fit one line with its key, " = " and quotes: paths up to 160 characters.
#define STR_MAX_ 160
_Static_assert(STR_MAX_ + 32 < INI_MAX_LINE, "STR_MAX_ must fit an INI line");

// ---- values: parse, check, store, read back, print ----

typedef struct {
    long long i; // K_INT, K_BOOL
    float f;
    uint64_t u;
    char s[1024];
} Value;

static void *field_(const Key *k, Config *c) {
    return (char *)c + k->offset;
}
static const void *cfield_(const Key *k, const Config *c) {
    return (const char *)c + k->offset;
}

static const char *type_name_(KeyType t) {
    switch (t) {
    case K_INT:
        return "an integer";
    case K_FLOAT:
        return "a number";
    case K_BOOL:
        return "true or false";
    case K_U64:
        return "a non-negative integer";
    default:
        return "text";
    }
}

// Parses text as key k's type into v. On failure writes the reason to why and returns -1.
static int parse_value_(const Key *k, const char *text, Value *v, char *why, size_t n) {
    char *end = NULL;
    errno = 0;
    memset(v, 0, offsetof(Value, s) + 1);
    switch (k->type) {
    case K_INT: {
        long long x = strtoll(text, &end, 10);
        if (end == text || *end) goto bad_type;
        if (errno == ERANGE || x < INT_MIN || x > INT_MAX) {
            snprintf(why, n, "out of range for an integer (at most %d)", INT_MAX);
            return -1;
        }
        v->i = x;
        return 0;
    }
    case K_FLOAT: {
        double x = strtod(text, &end);
        if (end == text || *end) goto bad_type;
        if (!isfinite(x)) {
            snprintf(why, n, "not a finite number");
            return -1;
        }
        if (fabs(x) > FLT_MAX) {
            snprintf(why, n, "out of range for a 32-bit float (|x| <= %.3g)", (double)FLT_MAX);
            return -1;
        }
        v->f = (float)x;
        return 0;
    }
    case K_BOOL:
        if (!strcasecmp(text, "true") || !strcasecmp(text, "yes") || !strcmp(text, "1"))
            v->i = 1;
        else if (!strcasecmp(text, "false") || !strcasecmp(text, "no") || !strcmp(text, "0"))
            v->i = 0;
        else {
            snprintf(why, n, "not a boolean (use true or false)");
            return -1;
        }
        return 0;
    case K_U64: {
        if (text[0] == '-') {
            snprintf(why, n, "must be >= 0");
            return -1;
        }
        unsigned long long x = strtoull(text, &end, 10);
        if (end == text || *end) goto bad_type;
        if (errno == ERANGE) {
            snprintf(why, n, "out of range (at most %" PRIu64 ")", UINT64_MAX);
            return -1;
        }
        v->u = (uint64_t)x;
        return 0;
    }
    case K_STR: {
        size_t len = strlen(text);
        // "..." keeps leading/trailing blanks and an empty value; the quotes are not part of it
        if (len >= 2 && text[0] == '"' && text[len - 1] == '"') {
            text++;
            len -= 2;
        }
        if (len >= sizeof v->s) len = sizeof v->s - 1; // too long anyway: check_value_ says so
        memcpy(v->s, text, len);
        v->s[len] = '\0';
        return 0;
    }
    }
bad_type:
    if (k->type == K_INT && strpbrk(text, ".eE") && strtod(text, &end) && !*end)
        snprintf(why, n, "not an integer (write it out in digits)");
    else
        snprintf(why, n, "not %s", k->type == K_INT ? "an integer" : type_name_(k->type));
    if (strchr(text, '#'))
        snprintf(why + strlen(why), n - strlen(why),
                 "; a comment after a value starts with ' ;' ('#' only at the start of a line)");
    return -1;
}

// Checks v against key k's range / choices. On failure writes the reason to why.
static int check_value_(const Key *k, const Value *v, char *why, size_t n) {
    switch (k->type) {
    case K_INT:
    case K_BOOL:
        if (v->i < k->lo)
            snprintf(why, n, "must be >= %.0f", k->lo);
        else if (v->i > k->hi)
            snprintf(why, n, "must be <= %.0f", k->hi);
        else
            return 0;
        return -1;
    case K_FLOAT: {
        double x = v->f;
        if (k->lo_open ? !(x > k->lo) : !(x >= k->lo))
            snprintf(why, n, "must be %s %g", k->lo_open ? ">" : ">=", k->lo);
        else if (k->hi_open ? !(x < k->hi) : !(x <= k->hi))
            snprintf(why, n, "must be %s %g", k->hi_open ? "<" : "<=", k->hi);
        else
            return 0;
        return -1;
    }
    case K_U64:
        return 0;
    case K_STR: {
        size_t len = strlen(v->s);
        size_t cap = k->size - 1 < STR_MAX_ ? k->size - 1 : STR_MAX_;
        if (len > cap) {
            snprintf(why, n, "too long (%zu characters; at most %zu)%s", len, cap,
                     cap == STR_MAX_ ? ": use a shorter path or a symlink" : "");
            return -1;
        }
        for (size_t i = 0; i < len; i++) {
            unsigned char ch = (unsigned char)v->s[i];
            if (ch < 0x20 || ch == 0x7f) {
                snprintf(why, n, "contains a control character (byte 0x%02x)", ch);
                return -1;
            }
            if (ch == ';' && i > 0 && isspace((unsigned char)v->s[i - 1])) {
                snprintf(why, n, "contains ' ;', which an INI file reads as a comment");
                return -1;
            }
        }
        if (k->nonempty && len == 0) {
            snprintf(why, n, "must not be empty");
            return -1;
        }
        if (k->choices) {
            const char *p = k->choices;
            while (*p) {
                size_t m = strcspn(p, "|");
                if (m == len && !strncmp(p, v->s, m)) return 0;
                p += m + (p[m] == '|');
            }
            snprintf(why, n, "must be one of %s", k->choices);
            return -1;
        }
        return 0;
    }
    }
    return 0;
}

static void store_value_(const Key *k, const Value *v, Config *c) {
    void *p = field_(k, c);
    switch (k->type) {
    case K_INT:
    case K_BOOL:
        *(int *)p = (int)v->i;
        break;
    case K_FLOAT:
        *(float *)p = v->f;
        break;
    case K_U64:
        *(uint64_t *)p = v->u;
        break;
    case K_STR:
        // zero the whole field, so that equal configurations are equal byte for byte
        memset(p, 0, k->size);
        memcpy(p, v->s, strnlen(v->s, k->size - 1));
        break;
    }
}

static void load_value_(const Key *k, const Config *c, Value *v) {
    const void *p = cfield_(k, c);
    memset(v, 0, offsetof(Value, s) + 1);
    switch (k->type) {
    case K_INT:
    case K_BOOL:
        v->i = *(const int *)p;
        break;
    case K_FLOAT:
        v->f = *(const float *)p;
        break;
    case K_U64:
        v->u = *(const uint64_t *)p;
        break;
    case K_STR: {
        size_t len = strnlen((const char *)p, k->size);
        if (len >= sizeof v->s) len = sizeof v->s - 1;
        memcpy(v->s, p, len);
        v->s[len] = '\0';
        break;
    }
    }
}

// The shortest %.Ng (N <= 9) that reads back as the same float: exact, and 4e-4 stays "0.0004".
// Whole numbers print in digits (10000, not 1e+04) and exponents short (1e-5, not 1e-05).
static void format_float_(float x, char *out, size_t n) {
    if (x == floorf(x) && fabsf(x) < 1e9f) {
        snprintf(out, n, "%.0f", (double)x);
        if (signbit(x) && x == 0) snprintf(out, n, "-0");
        return;
    }
    for (int prec = 1; prec <= 9; prec++) {
        snprintf(out, n, "%.*g", prec, (double)x);
        if ((float)strtod(out, NULL) == x) break;
    }
    char *e = strchr(out, 'e');
    if (e) {
        char *d = e + 1, *src = d;
        if (*src == '+')
            src++;
        else if (*src == '-')
            *d++ = *src++;
        while (src[0] == '0' && src[1]) src++;
        memmove(d, src, strlen(src) + 1);
    }
}

// The value as text, unquoted (strings as they are).
static void format_value_(const Key *k, const Value *v, char *out, size_t n) {
    switch (k->type) {
    case K_INT:
        snprintf(out, n, "%lld", v->i);
        break;
    case K_BOOL:
        snprintf(out, n, "%s", v->i ? "true" : "false");
        break;
    case K_FLOAT:
        format_float_(v->f, out, n);
        break;
    case K_U64:
        snprintf(out, n, "%" PRIu64, v->u);
        break;
    case K_STR:
        snprintf(out, n, "%s", v->s);
        break;
    }
}

// ---- key lookup and its messages ----

static int find_section_(const char *section) {
    for (int i = 0; i < N_KEYS; i++)
        if (!strcmp(KEYS[i].section, section)) return i;
    return -1;
}

static int find_key_(const char *section, const char *name) {
    for (int i = 0; i < N_KEYS; i++)
        if (!strcmp(KEYS[i].section, section) && !strcmp(KEYS[i].name, name)) return i;
    return -1;
}

// The first key called name in any section, or -1.
static int find_name_(const char *name) {
    for (int i = 0; i < N_KEYS; i++)
        if (!strcmp(KEYS[i].name, name)) return i;
    return -1;
}

// Levenshtein distance, for "did you mean"; long names count as far apart.
static int edit_distance_(const char *a, const char *b) {
    size_t na = strlen(a), nb = strlen(b);
    if (na > 63 || nb > 63) return 99;
    int row[64];
    for (size_t j = 0; j <= nb; j++) row[j] = (int)j;
    for (size_t i = 1; i <= na; i++) {
        int diag = row[0];
        row[0] = (int)i;
        for (size_t j = 1; j <= nb; j++) {
            int up = row[j];
            int best = diag + (a[i - 1] != b[j - 1]);
            if (up + 1 < best) best = up + 1;
            if (row[j - 1] + 1 < best) best = row[j - 1] + 1;
            row[j] = best;
            diag = up;
        }
    }
    return row[nb];
}

// "; did you mean X?" for the closest candidate within 2 edits, else "".
static void suggest_(const char *got, const char **cands, int n, const char *pre, const char *post,
                     char *out, size_t cap) {
    int best = -1, bestd = 3;
    for (int i = 0; i < n; i++) {
        int d = edit_distance_(got, cands[i]);
        if (d < bestd && d < (int)strlen(cands[i])) {
            bestd = d;
            best = i;
        }
    }
    if (best >= 0)
        snprintf(out, cap, "; did you mean %s%s%s?", pre, cands[best], post);
    else
        out[0] = '\0';
}

static void list_sections_(char *out, size_t cap, const char **names, int *n) {
    size_t len = 0;
    *n = 0;
    out[0] = '\0';
    for (int i = 0; i < N_KEYS; i++) {
        if (i > 0 && !strcmp(KEYS[i].section, KEYS[i - 1].section)) continue;
        names[(*n)++] = KEYS[i].section;
        len += (size_t)snprintf(out + len, len < cap ? cap - len : 0, "%s%s", *n > 1 ? ", " : "",
                                KEYS[i].section);
        if (len >= cap) len = cap - 1;
    }
}

static void list_keys_(const char *section, char *out, size_t cap, const char **names, int *n) {
    size_t len = 0;
    *n = 0;
    out[0] = '\0';
    for (int i = 0; i < N_KEYS; i++) {
        if (strcmp(KEYS[i].section, section)) continue;
        names[(*n)++] = KEYS[i].name;
        len += (size_t)snprintf(out + len, len < cap ? cap - len : 0, "%s%s", *n > 1 ? ", " : "",
                                KEYS[i].name);
        if (len >= cap) len = cap - 1;
    }
}

// Finds [section] name; loc ("file:line" or "--set ...") starts the message if there is none.
static int lookup_(const char *loc, const char *section, const char *name, int *ki, MoetErr *err) {
    const char *names[N_KEYS];
    char list[1024], hint[128];
    int n;
    *ki = find_key_(section, name);
    if (*ki >= 0) return MOET_OK;
    if (!section[0]) {
        int other = find_name_(name);
        if (other >= 0)
            return moet_errf(err, MOET_EUSAGE,
                             "%s: %s: key outside any [section]; it belongs "
                             "under [%s]",
                             loc, name, KEYS[other].section);
        list_sections_(list, sizeof list, names, &n);
        return moet_errf(err, MOET_EUSAGE, "%s: %s: key outside any [section] (sections: %s)", loc,
                         name, list);
    }
    if (find_section_(section) < 0) {
        list_sections_(list, sizeof list, names, &n);
        suggest_(section, names, n, "[", "]", hint, sizeof hint);
        return moet_errf(err, MOET_EUSAGE,
                         "%s: [%s] %s: unknown section [%s] (known sections: "
                         "%s)%s",
                         loc, section, name, section, list, hint);
    }
    list_keys_(section, list, sizeof list, names, &n);
    int other = find_name_(name);
    if (other >= 0)
        snprintf(hint, sizeof hint, "; %s belongs in [%s]", name, KEYS[other].section);
    else
        suggest_(name, names, n, "", "", hint, sizeof hint);
    return moet_errf(err, MOET_EUSAGE, "%s: [%s] %s: unknown key (known keys in [%s]: %s)%s", loc,
                     section, name, section, list, hint);
}

// Parses, checks and stores text as key ki; `how` records where it came from.
static int apply_(Config *c, int ki, const char *text, const char *loc, unsigned char how,
                  MoetErr *err) {
    const Key *k = &KEYS[ki];
    Value v;
    char why[256];
    if (k->type != K_STR && !text[0])
        return moet_errf(err, MOET_EUSAGE, "%s: [%s] %s: empty value (expected %s)", loc,
                         k->section, k->name, type_name_(k->type));
    if (parse_value_(k, text, &v, why, sizeof why) || check_value_(k, &v, why, sizeof why))
        return moet_errf(err, MOET_EUSAGE, "%s: [%s] %s = %s: %s", loc, k->section, k->name,
                         text[0] ? text : "\"\"", why);
    store_value_(k, &v, c);
    c->given_[ki] = how;
    return MOET_OK;
}

// ---- defaults and INI input ----

// The value of a key without a default until it is given: below its range for a required key
// (0, or -1 for n_experts), so that "unset" shows even where code fills the fields itself
// instead of going through given_; 0 for a conditional key (d_ff, top_k, expert_d_ff).
static int unset_value_(const Key *k) {
    return k->req == REQ_YES && k->lo <= 0 ? (int)k->lo - 1 : 0;
}

void config_defaults(Config *c) {
    memset(c, 0, sizeof *c);
    for (int i = 0; i < N_KEYS; i++) {
        const Key *k = &KEYS[i];
        Value v;
        char why[256];
        if (!k->def) {
            if (k->type != K_INT) moet_die("config: [%s] %s needs a default", k->section, k->name);
            memset(&v, 0, sizeof v);
            v.i = unset_value_(k);
        } else if (parse_value_(k, k->def, &v, why, sizeof why) ||
                   check_value_(k, &v, why, sizeof why)) {
            moet_die("config: bad default for [%s] %s: %s", k->section, k->name, why);
        }
        store_value_(k, &v, c);
    }
}

typedef struct {
    Config *c;
    const char *origin;
    const char *pos;        // the next line to hand to inih
    int line;               // number of the line inih is parsing
    int first_line[N_KEYS]; // where each key was given, for duplicate errors
    int err_code, err_line; // the first error found by the handler or the reader
    MoetErr *err;
} IniParse;

// inih's line reader, over the text in memory; counts lines for the messages.
static char *read_line_(char *buf, int num, void *stream) {
    IniParse *p = stream;
    if (p->err_code || !*p->pos) return NULL;
    const char *s = p->pos;
    const char *eol = strchr(s, '\n');
    size_t len = eol ? (size_t)(eol - s) : strlen(s);
    p->pos = eol ? eol + 1 : s + len;
    p->line++;
    // inih reads an indented line as the continuation of the previous value (multi-line
    // values), which would turn a stray indent into a wrong value: drop leading blanks.
    while (len > 0 && (*s == ' ' || *s == '\t')) {
        s++;
        len--;
    }
    if (len >= (size_t)num) {
        p->err_code = moet_errf(p->err, MOET_EUSAGE,
                                "%s:%d: line is %zu characters long; the "
                                "INI reader takes at most %d: shorten it",
                                p->origin, p->line, len, num - 1);
        p->err_line = p->line;
        return NULL;
    }
    memcpy(buf, s, len);
    buf[len] = '\0';
    return buf;
}

static int on_key_(void *user, const char *section, const char *name, const char *value) {
    IniParse *p = user;
    if (p->err_code) return 1;
    char loc[1100];
    snprintf(loc, sizeof loc, "%s:%d", p->origin, p->line);
    int ki, rc = lookup_(loc, section, name, &ki, p->err);
    if (!rc && p->first_line[ki])
        rc = moet_errf(p->err, MOET_EUSAGE,
                       "%s: [%s] %s: duplicate key (first given on line %d); "
                       "give each key once",
                       loc, section, name, p->first_line[ki]);
    if (!rc) rc = apply_(p->c, ki, value ? value : "", loc, GIVEN_FILE, p->err);
    if (rc) {
        p->err_code = rc;
        p->err_line = p->line;
        return 0;
    }
    p->first_line[ki] = p->line;
    return 1;
}

int config_load_string(Config *c, const char *text, const char *origin, MoetErr *err) {
    IniParse p;
    memset(&p, 0, sizeof p);
    p.c = c;
    p.origin = origin ? origin : "config";
    p.pos = text ? text : "";
    p.err = err;
    config_defaults(c);
    int r = ini_parse_stream(read_line_, &p, on_key_, &p);
    if (r > 0 && (!p.err_code || r < p.err_line)) {
        // a line inih could not read, before any error of ours: quote it
        const char *s = text;
        for (int i = 1; i < r && s; i++) {
            s = strchr(s, '\n');
            if (s) s++;
        }
        if (!s) s = "";
        while (*s == ' ' || *s == '\t') s++;
        int len = (int)strcspn(s, "\r\n");
        return moet_errf(err, MOET_EUSAGE,
                         "%s:%d: cannot parse '%.*s%s': expected '[section]', "
                         "'key = value' or a comment ('#' or ';' at the start of the line)",
                         p.origin, r, len > 60 ? 60 : len, s, len > 60 ? "..." : "");
    }
    if (p.err_code) return p.err_code;
    if (r != 0) return moet_errf(err, MOET_EFAIL, "%s: the INI reader failed (%d)", p.origin, r);
    return MOET_OK;
}

int config_load_file(Config *c, const char *path, MoetErr *err) {
    enum { MAX_BYTES = 1 << 20 };
    FILE *f = fopen(path, "rb");
    if (!f) {
        int e = errno;
        config_defaults(c);
        return moet_errf(err, MOET_EUSAGE, "cannot read config %s: %s", path, strerror(e));
    }
    char *text = malloc(MAX_BYTES + 1);
    if (!text) moet_die("out of memory reading %s", path);
    size_t n = fread(text, 1, MAX_BYTES + 1, f);
    int read_error = ferror(f) ? (errno ? errno : EIO) : 0;
    fclose(f);
    int rc;
    config_defaults(c);
    if (read_error) {
        rc = moet_errf(err, MOET_EUSAGE, "cannot read config %s: %s", path, strerror(read_error));
    } else if (n > MAX_BYTES) {
        rc = moet_errf(err, MOET_EUSAGE, "%s: larger than 1 MiB; is it a config file?", path);
    } else if (memchr(text, '\0', n)) {
        rc = moet_errf(err, MOET_EUSAGE, "%s: contains a NUL byte; is it a config file?", path);
    } else {
        text[n] = '\0';
        rc = config_load_string(c, text, path, err);
    }
    free(text);
    return rc;
}

static void trim_(const char **s, size_t *len) {
    while (*len > 0 && isspace((unsigned char)**s)) {
        (*s)++;
        (*len)--;
    }
    while (*len > 0 && isspace((unsigned char)(*s)[*len - 1])) (*len)--;
}

int config_set(Config *c, const char *assignment, MoetErr *err) {
    char loc[1100], section[64], name[64], value[1100];
    snprintf(loc, sizeof loc, "--set %s", assignment);
    const char *eq = strchr(assignment, '=');
    const char *lhs = assignment, *rhs = eq ? eq + 1 : "";
    size_t nl = eq ? (size_t)(eq - assignment) : strlen(assignment), nr = strlen(rhs);
    trim_(&lhs, &nl);
    trim_(&rhs, &nr);
    const char *dot = memchr(lhs, '.', nl);
    if (!eq || !dot || dot == lhs || dot == lhs + nl - 1) {
        char shown[64];
        snprintf(shown, sizeof shown, "%.*s", (int)(nl < 63 ? nl : 63), lhs);
        int other = dot ? -1 : find_name_(shown);
        if (eq && other >= 0)
            return moet_errf(err, MOET_EUSAGE,
                             "%s: expected section.key=value; did you mean "
                             "--set %s.%s=%.*s?",
                             loc, KEYS[other].section, shown, (int)nr, rhs);
        return moet_errf(err, MOET_EUSAGE,
                         "%s: expected section.key=value (e.g. --set "
                         "optim.lr=3e-4)",
                         loc);
    }
    size_t ns = (size_t)(dot - lhs), nk = nl - ns - 1;
    if (ns >= sizeof section || nk >= sizeof name || nr >= sizeof value)
        return moet_errf(err, MOET_EUSAGE, "%s: too long", loc);
    memcpy(section, lhs, ns);
    section[ns] = '\0';
    memcpy(name, dot + 1, nk);
    name[nk] = '\0';
    memcpy(value, rhs, nr);
    value[nr] = '\0';
    int ki, rc = lookup_(loc, section, name, &ki, err);
    if (rc) return rc;
    return apply_(c, ki, value, loc, GIVEN_SET, err);
}

// ---- validation: required keys, ranges, and the rules between keys ----

static int missing_(const Config *c, int ki) {
    const Key *k = &KEYS[ki];
    if (c->given_[ki]) return 0;
    return *(const int *)cfield_(k, c) == unset_value_(k); // only int keys lack a default
}

static int need_(const Config *c, const char *o, const char *section, const char *name,
                 const char *when, MoetErr *err) {
    int ki = find_key_(section, name);
    if (ki < 0) moet_die("config: no key [%s] %s", section, name);
    if (!missing_(c, ki)) return MOET_OK;
    return moet_errf(err, MOET_EUSAGE,
                     "%s: [%s] %s: missing (required%s): add '%s = ...' under "
                     "[%s] (%s)",
                     o, section, name, when, name, section, KEYS[ki].help);
}

int config_validate(Config *c, const char *origin, MoetErr *err) {
    const char *o = origin ? origin : "config";
    int rc;
    for (int i = 0; i < N_KEYS; i++)
        if (KEYS[i].req == REQ_YES && (rc = need_(c, o, KEYS[i].section, KEYS[i].name, "", err)))
            return rc;
    for (int i = 0; i < N_KEYS; i++) {
        const Key *k = &KEYS[i];
        Value v;
        char why[256], text[1100];
        load_value_(k, c, &v);
        if (check_value_(k, &v, why, sizeof why)) {
            format_value_(k, &v, text, sizeof text);
            return moet_errf(err, MOET_EUSAGE, "%s: [%s] %s = %s: %s", o, k->section, k->name, text,
                             why);
        }
    }

    if (c->n_experts == 0) {
        if ((rc = need_(c, o, "model", "d_ff", " when [moe] n_experts = 0, a dense model", err)))
            return rc;
        if (c->d_ff < 1)
            return moet_errf(err, MOET_EUSAGE,
                             "%s: [model] d_ff = %d: must be >= 1 for a dense "
                             "model ([moe] n_experts = 0)",
                             o, c->d_ff);
    } else {
        if ((rc = need_(c, o, "moe", "top_k", " when n_experts > 0", err))) return rc;
        if ((rc = need_(c, o, "moe", "expert_d_ff", " when n_experts > 0", err))) return rc;
        if (c->top_k < 1)
            return moet_errf(err, MOET_EUSAGE,
                             "%s: [moe] top_k = %d: must be >= 1 for an MoE "
                             "model",
                             o, c->top_k);
        if (c->top_k > c->n_experts)
            return moet_errf(err, MOET_EUSAGE, "%s: [moe] top_k = %d must be <= n_experts = %d", o,
                             c->top_k, c->n_experts);
        if (c->expert_d_ff < 1)
            return moet_errf(err, MOET_EUSAGE,
                             "%s: [moe] expert_d_ff = %d: must be >= 1 for an "
                             "MoE model",
                             o, c->expert_d_ff);
        if (strcmp(c->router, "sigmoid") == 0 && !c->norm_topk_prob)
            return moet_errf(err, MOET_EUSAGE,
                             "%s: [moe] router = sigmoid needs norm_topk_prob = true: sigmoid "
                             "scores do not sum to 1, and the top-k weights are the chosen "
                             "scores renormalised over the top-k (DeepSeek-V3); set "
                             "norm_topk_prob = true",
                             o);
    }
    if (c->n_experts == 0) { // routing options of a model without experts: a mistake
        const char *key = strcmp(c->router, "softmax") != 0         ? "router"
                          : strcmp(c->lb_scope, "micro_batch") != 0 ? "lb_scope"
                          : c->bias_update_rate != 0.0f             ? "bias_update_rate"
                                                                    : NULL;
        if (key)
            return moet_errf(err, MOET_EUSAGE,
                             "%s: [moe] %s is set, but [moe] n_experts = 0 (a dense model has no "
                             "router): remove it or set n_experts",
                             o, key);
    }
    if (c->d_model % c->n_heads)
        return moet_errf(err, MOET_EUSAGE,
                         "%s: [model] d_model = %d is not divisible by n_heads "
                         "= %d",
                         o, c->d_model, c->n_heads);
    int hd = c->d_model / c->n_heads;
    if (hd % 2)
        return moet_errf(err, MOET_EUSAGE,
                         "%s: [model] head_dim = d_model / n_heads = %d / %d = "
                         "%d is odd: RoPE rotates pairs of dimensions, so it must be even",
                         o, c->d_model, c->n_heads, hd);
    if (c->seq_len > c->max_seq_len)
        return moet_errf(err, MOET_EUSAGE,
                         "%s: [train] seq_len = %d must be <= [model] "
                         "max_seq_len = %d",
                         o, c->seq_len, c->max_seq_len);
    if (c->global_batch % c->micro_batch)
        return moet_errf(err, MOET_EUSAGE,
                         "%s: [train] global_batch = %d is not divisible by "
                         "micro_batch = %d (global_batch = micro_batch x accumulation steps x "
                         "ranks)",
                         o, c->global_batch, c->micro_batch);
    if (c->eval_every > 0 && !c->valid[0])
        return moet_errf(err, MOET_EUSAGE,
                         "%s: [train] eval_every = %d needs [data] valid (a "
                         "glob of validation shards); set it, or eval_every = 0",
                         o, c->eval_every);
    if (c->min_lr > c->lr) {
        char a[32], b[32];
        format_float_(c->min_lr, a, sizeof a);
        format_float_(c->lr, b, sizeof b);
        return moet_errf(err, MOET_EUSAGE, "%s: [optim] min_lr = %s must be <= lr = %s", o, a, b);
    }
    if (strcmp(c->device, "cpu-shadow") == 0 && strcmp(c->precision, "bf16") == 0)
        return moet_errf(err, MOET_EUSAGE,
                         "%s: [train] precision = bf16 needs device = cuda or cpu: cpu-shadow "
                         "runs the fp32 reference (set precision = auto or fp32)",
                         o);
    if (strcmp(c->device, "cuda") != 0 && strcmp(c->comm, "nccl") == 0)
        return moet_errf(err, MOET_EUSAGE,
                         "%s: [parallel] comm = nccl needs [train] device = cuda (NCCL moves GPU "
                         "memory): set comm = auto or mpi",
                         o);
    if (c->eos_id >= c->vocab_size)
        return moet_errf(err, MOET_EUSAGE,
                         "%s: [data] eos_id = %d must be < [model] vocab_size "
                         "= %d",
                         o, c->eos_id, c->vocab_size);
    if (c->n_experts > 0 && c->n_experts % c->ep)
        return moet_errf(err, MOET_EUSAGE,
                         "%s: [parallel] ep = %d does not divide [moe] "
                         "n_experts = %d (each rank of an EP group holds n_experts / ep experts)",
                         o, c->ep, c->n_experts);
    if (c->n_experts == 0 && c->ep > 1)
        return moet_errf(err, MOET_EUSAGE,
                         "%s: [parallel] ep = %d needs experts, but [moe] "
                         "n_experts = 0 (a dense model): use ep = 1",
                         o, c->ep);

    c->padded_vocab = (int)(((long long)c->vocab_size + 127) / 128 * 128);
    c->head_dim = hd;
    return MOET_OK;
}

int config_from_cli(Config *c, const char *path, int n_sets, char *const *sets, MoetErr *err) {
    int rc = path ? config_load_file(c, path, err) : (config_defaults(c), MOET_OK);
    for (int i = 0; !rc && i < n_sets; i++) rc = config_set(c, sets[i], err);
    return rc ? rc : config_validate(c, path ? path : "--set", err);
}

// ---- output ----

typedef struct {
    char *buf;
    int cap, len;
} Out;

static void put_(Out *o, const char *s) {
    size_t n = strlen(s);
    if (o->len < o->cap) {
        size_t room = (size_t)(o->cap - o->len - 1);
        memcpy(o->buf + o->len, s, n < room ? n : room);
        o->buf[o->len + (int)(n < room ? n : room)] = '\0';
    }
    o->len += (int)n;
}

// Must a string be written in quotes to read back the same? (empty, edge blanks, "...", ;...)
static int needs_quotes_(const char *s) {
    size_t n = strlen(s);
    return n == 0 || isspace((unsigned char)s[0]) || isspace((unsigned char)s[n - 1]) ||
           s[0] == ';' || (n >= 2 && s[0] == '"' && s[n - 1] == '"');
}

int config_to_ini(const Config *c, char *buf, int bufsize) {
    Out o = {buf, buf ? bufsize : 0, 0};
    if (o.cap > 0) buf[0] = '\0';
    for (int i = 0; i < N_KEYS; i++) {
        const Key *k = &KEYS[i];
        Value v;
        char text[1100];
        if (i == 0 || strcmp(k->section, KEYS[i - 1].section)) {
            put_(&o, i ? "\n[" : "[");
            put_(&o, k->section);
            put_(&o, "]\n");
        }
        load_value_(k, c, &v);
        format_value_(k, &v, text, sizeof text);
        int quote = k->type == K_STR && needs_quotes_(text);
        put_(&o, k->name);
        put_(&o, quote ? " = \"" : " = ");
        put_(&o, text);
        put_(&o, quote ? "\"\n" : "\n");
    }
    return o.len;
}

void config_print(const Config *c, FILE *f) {
    int n = config_to_ini(c, NULL, 0);
    char *text = malloc((size_t)n + 1);
    if (!text) moet_die("out of memory");
    config_to_ini(c, text, n + 1);
    fputs(text, f);
    fprintf(f, "# derived: padded_vocab = %d, head_dim = %d\n", c->padded_vocab, c->head_dim);
    free(text);
}

void config_print_keys(FILE *f) {
    for (int i = 0; i < N_KEYS; i++) {
        const Key *k = &KEYS[i];
        char key[64];
        snprintf(key, sizeof key, "%s.%s", k->section, k->name);
        const char *def = k->def                ? (k->def[0] ? k->def : "\"\"")
                          : k->req == REQ_YES   ? "(required)"
                          : k->req == REQ_DENSE ? "(if dense)"
                                                : "(if MoE)";
        fprintf(f, "  %-24s %-14s %s\n", key, def, k->help);
    }
}
