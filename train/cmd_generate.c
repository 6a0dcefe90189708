// cmd_generate: `moet generate CKPT --prompt TEXT [...]`: text sampled from a checkpoint's model
// with a KV cache (model_forward_cached): the prompt runs through the model once, then each new
// token once. Greedy at temperature 0, else temperature + nucleus (top-p) sampling from a
// seeded generator: the same command gives the same text.
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "data/tokenizer.h"
#include "train/ckpt.h"
#include "train/cli.h"
#include "train/config.h"
#include "train/model.h"

#define MAX_SETS_ 64

static const char *GENERATE_HELP =
    "usage: moet generate CKPT --prompt TEXT [--tokenizer FILE] [--max-new-tokens N]\n"
    "                     [--temperature T] [--top-p P] [--seed S] [--json] [--set k=v]...\n"
    "\n"
    "Continues TEXT with the model in CKPT (a file, a run folder or its latest.h5), one token at\n"
    "a time with a KV cache, and prints the prompt and its continuation as they come. Stops at\n"
    "the end-of-text token, after N new tokens, or at the model's [model] max_seq_len.\n"
    "\n"
    "  --prompt TEXT        the text to continue (encoded without a BOS token, as in training)\n"
    "  --tokenizer FILE     HF tokenizer.json (default: the checkpoint's [data] tokenizer)\n"
    "  --max-new-tokens N   default 64\n"
    "  --temperature T      0 = greedy (the most likely token each time); default 0.8\n"
    "  --top-p P            sample from the smallest set of tokens whose probabilities add up to\n"
    "                       P or more (0 < P <= 1; default 0.95; 1 = the whole vocabulary)\n"
    "  --seed S             the sampler's seed (default 0): same seed, same text\n"
    "  --json               one JSON object (prompt_ids, ids, text, timings) instead of the text\n"
    "  --set k=v            override a key of the checkpoint's config, e.g. --set "
    "train.device=cuda\n"
    "\n"
    "Token ids beyond the tokenizer's vocabulary (the padding rows of the embedding) are never\n"
    "sampled. Statistics go to stderr.\n";

typedef struct {
    const char *spec, *prompt, *tokenizer;
    int max_new, json;
    double temperature, top_p;
    uint64_t seed;
    char *sets[MAX_SETS_];
    int n_sets;
} GenArgs;

static int parse_num_(const char *opt, const char *s, double lo, double hi, double *out,
                      MoetErr *err) {
    char *endp;
    double v = strtod(s, &endp);
    if (*endp || endp == s || !(v >= lo && v <= hi))
        return moet_errf(err, MOET_EUSAGE, "generate: %s needs a number in [%g, %g], not '%s'",
                         opt, lo, hi, s);
    *out = v;
    return MOET_OK;
}

static int parse_args_(int argc, char **argv, GenArgs *g, int *help, MoetErr *err) {
    memset(g, 0, sizeof *g);
    g->max_new = 64;
    g->temperature = 0.8;
    g->top_p = 0.95;
    *help = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        double x = 0;
        int rc = MOET_OK;
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
            *help = 1;
            return MOET_OK;
        } else if (strcmp(a, "--json") == 0) {
            g->json = 1;
            continue;
        } else if (a[0] != '-') {
            if (g->spec)
                return moet_errf(err, MOET_EUSAGE, "generate: one CKPT only (got %s and %s)",
                                 g->spec, a);
            g->spec = a;
            continue;
        }
        if (!v)
            return moet_errf(err, MOET_EUSAGE,
                             "generate: %s needs a value (see moet generate --help)", a);
        i++;
        if (strcmp(a, "--prompt") == 0) {
            g->prompt = v;
        } else if (strcmp(a, "--tokenizer") == 0) {
            g->tokenizer = v;
        } else if (strcmp(a, "--max-new-tokens") == 0) {
            if (!(rc = parse_num_(a, v, 1, 1e9, &x, err))) g->max_new = (int)x;
        } else if (strcmp(a, "--temperature") == 0) {
            if (!(rc = parse_num_(a, v, 0, 100, &x, err))) g->temperature = x;
        } else if (strcmp(a, "--top-p") == 0) {
            if (!(rc = parse_num_(a, v, 1e-9, 1, &x, err))) g->top_p = x;
        } else if (strcmp(a, "--seed") == 0) {
            if (!(rc = parse_num_(a, v, 0, 9007199254740992.0, &x, err))) g->seed = (uint64_t)x;
        } else if (strcmp(a, "--set") == 0) {
            if (g->n_sets == MAX_SETS_)
                return moet_errf(err, MOET_EUSAGE, "generate: too many --set options");
            g->sets[g->n_sets++] = (char *)v;
        } else {
            return moet_errf(err, MOET_EUSAGE,
                             "generate: unknown option %s (see moet generate --help)", a);
        }
        if (rc) return rc;
    }
    if (!g->spec)
        return moet_errf(err, MOET_EUSAGE, "generate: missing CKPT (see moet generate --help)");
    if (!g->prompt)
        return moet_errf(err, MOET_EUSAGE,
                         "generate: missing --prompt TEXT (the text to continue)");
    return MOET_OK;
}

// ---------------------------------------------------------------------------------------
// sampling

static uint64_t splitmix64_(uint64_t *s) {
    uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

typedef struct {
    int id;
    double p;
} Cand;

static int cand_desc_(const void *a, const void *b) {
    const Cand *x = a, *y = b;
    if (x->p != y->p) return x->p < y->p ? 1 : -1;
    return x->id - y->id;  // ties: the lower id first, as greedy picks
}

// The next token from the logits of the first n ids (the tokenizer's vocabulary). Greedy:
// the highest logit, the lowest id among equals. Else p = softmax(logits / temperature) in
// double, cut to the nucleus (the most likely tokens whose mass reaches top_p), renormalised,
// and drawn with one uniform number. The nucleus is a prefix of the tokens sorted by p; only
// the candidates above a threshold are sorted, the threshold lowered (by 2^-20 of the top p
// each time) until their mass reaches top_p: exact, and a few hundred candidates instead of
// the whole vocabulary for a trained model. cand and pv are scratch for n entries.
static int sample_(const float *logits, int n, double temperature, double top_p, uint64_t *rng,
                   Cand *cand, double *pv) {
    int best = 0;
    for (int i = 1; i < n; i++)
        if (logits[i] > logits[best]) best = i;
    if (temperature == 0.0) return best;
    double sum = 0.0;
    for (int i = 0; i < n; i++) {
        pv[i] = exp(((double)logits[i] - logits[best]) / temperature);
        sum += pv[i];
    }
    int m = 0;
    for (double thr = 0x1.0p-20;; thr *= 0x1.0p-20) {  // p of the best token = 1 (unnormalised)
        double above = 0.0;
        m = 0;
        for (int i = 0; i < n; i++) {
            if (pv[i] >= thr || thr < 1e-300) {
                cand[m].id = i;
                cand[m++].p = pv[i];
                above += pv[i];
            }
        }
        if (above >= top_p * sum || m == n) break;
    }
    qsort(cand, (size_t)m, sizeof *cand, cand_desc_);
    int keep = 0;
    double mass = 0.0;
    while (keep < m && (keep == 0 || mass < top_p * sum)) mass += cand[keep++].p;
    const double u = (double)(splitmix64_(rng) >> 11) * 0x1.0p-53 * mass;
    double c = 0.0;
    for (int i = 0; i < keep; i++) {
        c += cand[i].p;
        if (u < c) return cand[i].id;
    }
    return cand[keep - 1].id;
}

// ---------------------------------------------------------------------------------------
// output

static void json_string_(FILE *f, const char *s, size_t n) {
    fputc('"', f);
    for (size_t i = 0; i < n; i++) {
        unsigned char ch = (unsigned char)s[i];
        if (ch == '"' || ch == '\\') fprintf(f, "\\%c", ch);
        else if (ch == '\n') fputs("\\n", f);
        else if (ch == '\t') fputs("\\t", f);
        else if (ch == '\r') fputs("\\r", f);
        else if (ch < 0x20) fprintf(f, "\\u%04x", ch);
        else fputc(ch, f);
    }
    fputc('"', f);
}

static void json_ids_(FILE *f, const int32_t *ids, size_t n) {
    fputc('[', f);
    for (size_t i = 0; i < n; i++) fprintf(f, "%s%d", i ? "," : "", ids[i]);
    fputc(']', f);
}

// Prints the text of ids[0..n) beyond the *printed bytes already out (a token may end in the
// middle of a UTF-8 character: decoding the whole continuation each time keeps it whole).
static void stream_(const Tokenizer *tok, const int32_t *ids, size_t n, size_t *printed) {
    size_t len;
    char *text = tokenizer_decode(tok, ids, n, &len);
    if (!text) return;
    if (len > *printed) {
        fwrite(text + *printed, 1, len - *printed, stdout);
        fflush(stdout);
        *printed = len;
    }
    free(text);
}

// ---------------------------------------------------------------------------------------

int cmd_generate(int argc, char **argv, MoetErr *err) {
    GenArgs g;
    int help;
    int rc = parse_args_(argc, argv, &g, &help, err);
    if (rc) return rc;
    if (help) {
        fputs(GENERATE_HELP, stdout);
        return MOET_OK;
    }
    char path[1100];
    Config c;
    if ((rc = ckpt_resolve(g.spec, ".", path, sizeof path, err))) return rc;
    if ((rc = ckpt_load_config(path, g.n_sets, g.sets, &c, err))) return rc;
    const char *tok_path = g.tokenizer ? g.tokenizer : c.tokenizer;
    if (!tok_path || !*tok_path)
        return moet_errf(err, MOET_EUSAGE, "generate: the checkpoint names no [data] tokenizer: "
                         "give one with --tokenizer FILE");

    Tokenizer *tok = NULL;
    Model m;
    memset(&m, 0, sizeof m);
    KVCache kv;
    memset(&kv, 0, sizeof kv);
    TokIds prompt = {0};
    int32_t *ids = NULL;
    float *logits = NULL;
    Cand *cand = NULL;
    double *pv = NULL;
    const Ops *ops;
    char binfo[512];
    if ((rc = tokenizer_load(&tok, tok_path, err))) return rc;
    if ((rc = tokenizer_encode(tok, g.prompt, strlen(g.prompt), &prompt, err))) goto done;
    const int P = (int)prompt.n;
    if (P == 0) {
        rc = moet_errf(err, MOET_EUSAGE, "generate: the prompt is empty");
        goto done;
    }
    if (P >= c.max_seq_len) {
        rc = moet_errf(err, MOET_EUSAGE,
                       "generate: the prompt is %d tokens; the model takes %d positions "
                       "([model] max_seq_len): shorten it", P, c.max_seq_len);
        goto done;
    }
    const int vocab = tokenizer_vocab_size(tok) < c.vocab_size ? tokenizer_vocab_size(tok)
                                                               : c.vocab_size;
    for (int i = 0; i < P; i++)
        if (prompt.ids[i] >= c.vocab_size) {
            rc = moet_errf(err, MOET_EUSAGE, "generate: token id %d of the prompt is beyond the "
                           "model's vocabulary (%d): is %s the model's tokenizer?",
                           prompt.ids[i], c.vocab_size, tok_path);
            goto done;
        }
    int cap = P + g.max_new;
    if (cap > c.max_seq_len) cap = c.max_seq_len;
    const int eos = c.eos_id >= 0 ? c.eos_id : tokenizer_eos_id(tok);

    if ((rc = model_open_backend(&c, model_local_rank(), &ops, binfo, sizeof binfo, err)))
        goto done;
    if ((rc = model_create_inference(&m, &c, ops, err))) goto done;
    m.recompute = 0;  // no backward: one working set would do, but the arena is small here
    if ((rc = model_set_batch(&m, 1, P, err))) goto done;
    if ((rc = ckpt_load_model(path, &m, err))) goto done;
    if ((rc = model_kv_create(&m, &kv, cap, err))) goto done;

    ids = moet_malloc((size_t)cap * sizeof(int32_t));
    memcpy(ids, prompt.ids, (size_t)P * sizeof(int32_t));
    logits = moet_malloc((size_t)m.V * sizeof(float));
    cand = moet_malloc((size_t)vocab * sizeof(Cand));
    pv = moet_malloc((size_t)vocab * sizeof(double));
    uint64_t rng = g.seed;
    size_t printed = 0;
    if (!g.json) stream_(tok, ids, (size_t)P, &printed);

    double t0 = moet_time();
    model_forward_cached(&m, &kv, ids, P);
    ops->to_host(logits, m.logits, (size_t)m.V * sizeof(float));
    const double t_prompt = moet_time() - t0;
    int n = P, stop_eos = 0;
    while (n < P + g.max_new && n < cap) {
        const int next = sample_(logits, vocab, g.temperature, g.top_p, &rng, cand, pv);
        if (next == eos) {
            stop_eos = 1;
            break;
        }
        ids[n++] = next;
        if (!g.json) stream_(tok, ids, (size_t)n, &printed);
        if (n == cap) break;
        model_forward_cached(&m, &kv, &ids[n - 1], 1);
        ops->to_host(logits, m.logits, (size_t)m.V * sizeof(float));
    }
    const double dt = moet_time() - t0, t_new = dt - t_prompt;
    const int n_new = n - P;
    if (g.json) {
        size_t len;
        char *text = tokenizer_decode(tok, ids + P, (size_t)n_new, &len);
        printf("{\"checkpoint\":\"%s\",\"device\":\"%s\",\"prompt_ids\":", path, ops->name);
        json_ids_(stdout, ids, (size_t)P);
        printf(",\"ids\":");
        json_ids_(stdout, ids + P, (size_t)n_new);
        printf(",\"text\":");
        json_string_(stdout, text ? text : "", text ? len : 0);
        printf(",\"stop\":\"%s\",\"prompt_s\":%.6f,\"new_s\":%.6f}\n",
               stop_eos ? "eos" : n == c.max_seq_len ? "max_seq_len" : "max_new_tokens",
               t_prompt, t_new);
        free(text);
    } else {
        fputc('\n', stdout);
        fflush(stdout);
        fprintf(stderr,
                "moet generate: %d prompt tokens in %.3f s, %d new tokens in %.3f s (%.1f tok/s) "
                "on %s; stopped at %s\n",
                P, t_prompt, n_new, t_new, n_new > 0 && t_new > 0 ? n_new / t_new : 0.0,
                ops->name,
                stop_eos ? "the end-of-text token"
                         : n == c.max_seq_len ? "[model] max_seq_len" : "--max-new-tokens");
    }
done:
    free(cand);
    free(pv);
    free(logits);
    free(ids);
    if (kv.k) model_kv_free(&m, &kv);
    if (m.ops) model_free(&m);
    tokids_free(&prompt);
    tokenizer_free(tok);
    return rc;
}
