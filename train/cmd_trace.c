// cmd_trace: `moet trace RUN --step N | --find TEXT`: training-data provenance. Which shard
// tokens and documents step N of a run read (its global batch, whatever the world size), and
// where a text occurs in the training shards and at which steps it was trained on. From a
// checkpoint (its config, step and data fingerprint) or from a config alone (data/trace.h).
#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "data/tokenizer.h"
#include "data/trace.h"
#include "train/ckpt.h"
#include "train/cli.h"
#include "train/config.h"

#define MAX_SETS_   64
#define MAX_EPOCHS_ 64 // epochs listed per --find hit

static const char *TRACE_HELP =
    "usage: moet trace RUN --step N [--json] [--chars C] [--set section.key=value]...\n"
    "       moet trace RUN --find TEXT [--max-hits N] [--json] [--set section.key=value]...\n"
    "       moet trace --config FILE (--step N | --find TEXT) [...]\n"
    "\n"
    "Training-data provenance. RUN is a checkpoint: a file, a run folder (its latest.h5) or\n"
    "latest.h5; trace reads its config, step and data fingerprint and opens its training shards\n"
    "([data] train; --set data.train=GLOB where they live elsewhere). The shards must be the\n"
    "ones the run recorded (same names, sizes, vocab_size and seq_len): else exit 2. With\n"
    "--config FILE, the order that configuration would train in (nothing is known trained).\n"
    "\n"
    "  --step N       step N's global batch (N as the trainer prints it: step 1 is the first):\n"
    "                 each sequence's shard, token range [start, end) and position in its\n"
    "                 epoch's order, and the documents it overlaps (id, source file:line from the\n"
    "                 shard's .csv.gz, the part inside the sequence) with their first\n"
    "                 characters, decoded with the run's [data] tokenizer. Sequence\n"
    "                 j went to rank (j / micro_batch) % world. A step after the checkpoint's is\n"
    "                 refused (it is not trained yet; trace the config to see it).\n"
    "  --find TEXT    TEXT's exact occurrences in the training shards, as token ids: TEXT as\n"
    "                 given and, unless it starts with whitespace, with one space before it\n"
    "                 (a word inside a text carries its space: \" truth\" is not \"truth\"). A\n"
    "                 match starts and ends where the tokenizer splits the document: at word,\n"
    "                 line and punctuation boundaries. For each: the document, and the steps\n"
    "                 that trained on it in every epoch of the run (trained, not yet trained\n"
    "                 on, or after max_steps), or why it never is (the shard's dropped tail, or\n"
    "                 split over two sequences). One scan of all the shards: the rate goes to\n"
    "                 stderr.\n"
    "  --chars C      characters shown of each document part (--step; default 60)\n"
    "  --max-hits N   hits reported, the first in shard order (default 20; all are counted)\n"
    "  --json         one JSON object instead of the text\n"
    "  --set k=v      override a key of the run's config (repeatable)\n";

typedef struct {
    const char *spec, *config, *find;
    int64_t step;
    int json, chars;
    size_t max_hits;
    char *sets[MAX_SETS_];
    int n_sets;
} TraceArgs;

// What trace needs from the checkpoint's /trainer group.
typedef struct {
    int64_t step;
    uint64_t seed, epoch, consumed;
    char fingerprint[17];
} RunState;

typedef struct {
    const TraceArgs *a;
    const Config *c;
    const char *origin; // the checkpoint path or the config file
    int have_ckpt;
    RunState rs;
    Trace *t;
    const Tokenizer *tok;
} Ctx;

// ---------------------------------------------------------------------------------------
// arguments

static int parse_count_(const char *opt, const char *s, long long lo, long long *out,
                        MoetErr *err) {
    char *endp;
    long long v = strtoll(s, &endp, 10);
    if (!*s || *endp || v < lo)
        return moet_errf(err, MOET_EUSAGE, "trace: %s needs a whole number >= %lld, not '%s'", opt,
                         lo, s);
    *out = v;
    return MOET_OK;
}

static int parse_args_(int argc, char **argv, TraceArgs *a, int *help, MoetErr *err) {
    memset(a, 0, sizeof *a);
    a->chars = 60;
    a->max_hits = 20;
    *help = 0;
    for (int i = 1; i < argc; i++) {
        const char *o = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        long long x = 0;
        int rc = MOET_OK;
        if (strcmp(o, "--help") == 0 || strcmp(o, "-h") == 0) {
            *help = 1;
            return MOET_OK;
        } else if (strcmp(o, "--json") == 0) {
            a->json = 1;
            continue;
        } else if (o[0] != '-') {
            if (a->spec)
                return moet_errf(err, MOET_EUSAGE, "trace: one RUN only (got %s and %s)", a->spec,
                                 o);
            a->spec = o;
            continue;
        }
        if (!v)
            return moet_errf(err, MOET_EUSAGE, "trace: %s needs a value (see moet trace --help)",
                             o);
        i++;
        if (strcmp(o, "--step") == 0) {
            if (!(rc = parse_count_(o, v, 1, &x, err))) a->step = x;
        } else if (strcmp(o, "--find") == 0) {
            a->find = v;
        } else if (strcmp(o, "--config") == 0) {
            a->config = v;
        } else if (strcmp(o, "--max-hits") == 0) {
            if (!(rc = parse_count_(o, v, 0, &x, err))) a->max_hits = (size_t)x;
        } else if (strcmp(o, "--chars") == 0) {
            if (!(rc = parse_count_(o, v, 1, &x, err))) a->chars = x > 100000 ? 100000 : (int)x;
        } else if (strcmp(o, "--set") == 0) {
            if (a->n_sets == MAX_SETS_)
                return moet_errf(err, MOET_EUSAGE, "trace: too many --set options");
            a->sets[a->n_sets++] = (char *)v;
        } else {
            return moet_errf(err, MOET_EUSAGE, "trace: unknown option %s (see moet trace --help)",
                             o);
        }
        if (rc) return rc;
    }
    if (!a->spec == !a->config)
        return moet_errf(err, MOET_EUSAGE,
                         "trace: give a RUN (a checkpoint or run folder) or --config FILE, %s "
                         "(see moet trace --help)",
                         a->spec ? "not both" : "one of them");
    if (!a->step == !a->find)
        return moet_errf(err, MOET_EUSAGE, "trace: give --step N or --find TEXT, %s",
                         a->step ? "not both" : "one of them");
    if (a->find && !a->find[0])
        return moet_errf(err, MOET_EUSAGE, "trace: --find needs a non-empty TEXT");
    return MOET_OK;
}

// ---------------------------------------------------------------------------------------
// the checkpoint's /trainer state (ckpt_read_state: the model is not loaded)

static int read_state_(const char *path, RunState *rs, MoetErr *err) {
    memset(rs, 0, sizeof *rs);
    TrainState st;
    if (ckpt_read_state(path, &st, err)) {
        char why[sizeof err->msg];
        snprintf(why, sizeof why, "%s", err->msg);
        return moet_errf(err, MOET_EFAIL, "%s\n---> HINT: trace the order its config would "
                         "train in: moet trace --config FILE", why);
    }
    rs->step = st.step;
    rs->seed = st.data.seed;
    rs->epoch = st.data.epoch;
    rs->consumed = st.data.consumed;
    snprintf(rs->fingerprint, sizeof rs->fingerprint, "%s", st.data.fingerprint);
    return MOET_OK;
}

// ---------------------------------------------------------------------------------------
// text

// Writes s[0..n) between quotes with C escapes for quotes, backslashes and control bytes.
static void put_quoted_(const char *s, size_t n) {
    putchar('"');
    for (size_t i = 0; i < n; i++) {
        unsigned char ch = (unsigned char)s[i];
        if (ch == '"' || ch == '\\')
            printf("\\%c", ch);
        else if (ch == '\n')
            fputs("\\n", stdout);
        else if (ch == '\t')
            fputs("\\t", stdout);
        else if (ch == '\r')
            fputs("\\r", stdout);
        else if (ch < 0x20 || ch == 0x7f)
            printf("\\x%02x", ch);
        else
            putchar(ch);
    }
    putchar('"');
}

// Bytes of the first `chars` UTF-8 characters of s[0..n) (from_end: of the last ones).
static size_t utf8_prefix_(const char *s, size_t n, int chars, int from_end) {
    int seen = 0;
    if (!from_end) {
        for (size_t i = 0; i < n; i++)
            if (((unsigned char)s[i] & 0xc0) != 0x80 && seen++ == chars) return i;
        return n;
    }
    for (size_t i = n; i-- > 0;)
        if (((unsigned char)s[i] & 0xc0) != 0x80 && ++seen == chars) return n - i;
    return n;
}

// The text of tokens [lo, hi) of `file`, at most `chars` characters: the first ones, or the
// last ones with from_end (the ids beyond what that needs are not decoded). malloc'ed; *cut
// (may be NULL) says whether characters were left out.
static int decode_(const Ctx *x, int file, uint64_t lo, uint64_t hi, int chars, int from_end,
                   char **out, int *cut, MoetErr *err) {
    *out = NULL;
    // a token decodes to at least one byte and a character takes at most four
    uint64_t want = 4 * (uint64_t)chars + 8;
    int trimmed = hi - lo > want;
    if (trimmed) {
        if (from_end)
            lo = hi - want;
        else
            hi = lo + want;
    }
    int n = (int)(hi - lo);
    int32_t *ids = moet_malloc((size_t)(n ? n : 1) * sizeof(int32_t));
    int rc = loader_read(trace_loader(x->t), file, lo, n, ids, err);
    size_t len = 0;
    char *s = rc ? NULL : tokenizer_decode(x->tok, ids, (size_t)n, &len);
    free(ids);
    if (rc) return rc;
    size_t keep = utf8_prefix_(s, len, chars, from_end);
    if (from_end) memmove(s, s + len - keep, keep);
    s[keep] = '\0';
    if (cut) *cut = trimmed || keep < len;
    *out = s;
    return MOET_OK;
}

static const char *status_(const Ctx *x, int64_t step) {
    if (step == 0) return "dropped";
    if (step > x->c->max_steps && (!x->have_ckpt || step > x->rs.step)) return "after max_steps";
    if (!x->have_ckpt) return "planned";
    return step <= x->rs.step ? "trained" : "not yet trained on";
}

static const char *base_(const char *path) {
    const char *s = strrchr(path, '/');
    return s ? s + 1 : path;
}

// ---------------------------------------------------------------------------------------
// --step

static int do_step_(Ctx *x, MoetErr *err) {
    const Config *c = x->c;
    const int64_t N = x->a->step;
    if (x->have_ckpt && N > x->rs.step)
        return moet_errf(
            err, MOET_EUSAGE,
            "trace: step %lld is beyond the run: %s is at step %lld, the last step "
            "it trained\n---> HINT: trace a step <= %lld, or a later checkpoint; "
            "the order of the steps to come: moet trace --config FILE --step %lld with the run's "
            "configuration",
            (long long)N, x->origin, (long long)x->rs.step, (long long)x->rs.step, (long long)N);
    if (!x->have_ckpt && N > c->max_steps)
        fprintf(stderr,
                "moet trace: note: step %lld is after max_steps %d: a run of this config "
                "stops before it\n",
                (long long)N, c->max_steps);
    const Loader *L = trace_loader(x->t);
    const int G = c->global_batch, T = c->seq_len;
    TraceSeq *seqs = moet_malloc((size_t)G * sizeof(TraceSeq));
    uint64_t epoch, batch;
    trace_step(x->t, N, seqs, &epoch, &batch);
    const char *status = status_(x, N);
    const uint64_t B = loader_batches_per_epoch(L);

    cJSON *root = NULL, *jseqs = NULL;
    if (x->a->json) {
        root = cJSON_CreateObject();
        cJSON_AddStringToObject(root, x->have_ckpt ? "checkpoint" : "config", x->origin);
        if (x->have_ckpt) cJSON_AddNumberToObject(root, "checkpoint_step", (double)x->rs.step);
        cJSON_AddNumberToObject(root, "step", (double)N);
        cJSON_AddStringToObject(root, "status", status);
        cJSON_AddNumberToObject(root, "epoch", (double)epoch);
        cJSON_AddNumberToObject(root, "batch", (double)batch);
        cJSON_AddNumberToObject(root, "batches_per_epoch", (double)B);
        cJSON_AddNumberToObject(root, "global_batch", G);
        cJSON_AddNumberToObject(root, "seq_len", T);
        cJSON_AddStringToObject(root, "fingerprint", loader_fingerprint(L));
        jseqs = cJSON_AddArrayToObject(root, "sequences");
    } else {
        char at[64] = "";
        if (x->have_ckpt)
            snprintf(at, sizeof at, "; the checkpoint is at step %lld", (long long)x->rs.step);
        printf("step %lld of %s (%s%s): epoch %llu, global batch %llu of %llu; %d sequences x %d "
               "tokens; data %s, fingerprint %s\n",
               (long long)N, x->origin, status, at, (unsigned long long)epoch,
               (unsigned long long)batch, (unsigned long long)B, G, T, c->train,
               loader_fingerprint(L));
    }
    int rc = MOET_OK;
    for (int j = 0; j < G && !rc; j++) {
        const TraceSeq *q = &seqs[j];
        const uint64_t lo = q->offset, hi = q->offset + (uint64_t)T;
        const char *fname = loader_file_name(L, q->file);
        const TraceDoc *docs;
        size_t nd;
        if ((rc = trace_docs(x->t, q->file, lo, hi, &docs, &nd, err))) break;
        // no metadata: the whole sequence as one part of an unknown document
        const int missing = trace_docs_missing(x->t, q->file);
        TraceDoc whole = {.start = lo, .end = hi, .id = NULL, .src = NULL, .loc = 0};
        if (missing) {
            docs = &whole;
            nd = 1;
        }
        cJSON *jdocs = NULL;
        if (root) {
            cJSON *js = cJSON_CreateObject();
            cJSON_AddNumberToObject(js, "index", j);
            cJSON_AddStringToObject(js, "file", fname);
            cJSON_AddNumberToObject(js, "start", (double)lo);
            cJSON_AddNumberToObject(js, "end", (double)hi);
            cJSON_AddNumberToObject(js, "position", (double)q->position);
            cJSON_AddBoolToObject(js, "documents_known", !missing);
            jdocs = cJSON_AddArrayToObject(js, "documents");
            cJSON_AddItemToArray(jseqs, js);
        } else {
            printf("\nseq %d: %s tokens [%llu, %llu), position %llu of epoch %llu\n", j, fname,
                   (unsigned long long)lo, (unsigned long long)hi, (unsigned long long)q->position,
                   (unsigned long long)epoch);
            if (missing) printf("  (no %s: documents unknown)\n", trace_docs_path(x->t, q->file));
        }
        for (size_t k = 0; k < nd && !rc; k++) {
            const TraceDoc *d = &docs[k];
            uint64_t plo = d->start > lo ? d->start : lo, phi = d->end < hi ? d->end : hi;
            char *text = NULL;
            int cut = 0;
            if ((rc = decode_(x, q->file, plo, phi, x->a->chars, 0, &text, &cut, err))) break;
            if (root) {
                cJSON *jd = cJSON_CreateObject();
                if (d->id) {
                    cJSON_AddStringToObject(jd, "id", d->id);
                    cJSON_AddStringToObject(jd, "src", d->src);
                    cJSON_AddNumberToObject(jd, "loc", (double)d->loc);
                    cJSON_AddNumberToObject(jd, "doc_start", (double)d->start);
                    cJSON_AddNumberToObject(jd, "doc_end", (double)d->end);
                }
                cJSON_AddNumberToObject(jd, "start", (double)plo);
                cJSON_AddNumberToObject(jd, "end", (double)phi);
                cJSON_AddStringToObject(jd, "text", text);
                cJSON_AddItemToArray(jdocs, jd);
            } else {
                if (d->id)
                    printf("  %s (%s:%ld) tokens [%llu, %llu) of its %llu: ", d->id, d->src, d->loc,
                           (unsigned long long)(plo - d->start),
                           (unsigned long long)(phi - d->start),
                           (unsigned long long)(d->end - d->start));
                else
                    printf("  ");
                put_quoted_(text, strlen(text));
                printf("%s\n", cut ? "..." : "");
            }
            free(text);
        }
    }
    if (root) {
        if (!rc) {
            char *s = cJSON_PrintUnformatted(root);
            puts(s);
            free(s);
        }
        cJSON_Delete(root);
    }
    free(seqs);
    return rc;
}

// ---------------------------------------------------------------------------------------
// --find

// One trained piece of a hit: tokens [lo, hi) of the file, inside the instance at inst.
typedef struct {
    uint64_t lo, hi, inst;
} Piece;

// Reports hit number `number` (len tokens, found as `variant`): its document, context and the
// step of each of its pieces in every epoch, as text or into the JSON array jhits.
static int report_hit_(Ctx *x, const TraceHit *hit, size_t number, uint64_t len,
                       const char *variant, uint64_t n_epochs, cJSON *jhits, MoetErr *err) {
    const Loader *L = trace_loader(x->t);
    const uint64_t T = (uint64_t)x->c->seq_len;
    const int f = hit->file;
    const uint64_t lo = hit->offset, hi = lo + len;
    const uint64_t n_inst = loader_file_instances(L, f);
    const TraceDoc *docs;
    size_t nd;
    int rc = trace_docs(x->t, f, lo, lo + 1, &docs, &nd, err);
    if (rc) return rc;
    const TraceDoc *d = nd ? docs : NULL;
    // context: up to 30 characters either side, inside the document
    uint64_t dlo = d ? d->start : 0, dhi = d ? d->end : loader_file_tokens(L, f);
    char *before = NULL, *match = NULL, *after = NULL;
    int cut_b = 0, cut_a = 0;
    if ((rc = decode_(x, f, dlo, lo, 30, 1, &before, &cut_b, err)) ||
        (rc = decode_(x, f, lo, hi, 1 << 20, 0, &match, NULL, err)) ||
        (rc = decode_(x, f, hi, dhi, 30, 0, &after, &cut_a, err))) {
        free(before);
        free(match);
        return rc;
    }
    // the trained pieces: instances k0..k1 of the file, those below n_inst (the rest is the
    // dropped tail)
    const uint64_t k0 = lo / T, k1 = (hi - 1) / T;
    const char *place = k0 >= n_inst ? "tail" : k0 == k1 ? "instance" : "across";
    Piece *pieces = moet_malloc((size_t)(k1 - k0 + 1) * sizeof(Piece));
    int np = 0;
    for (uint64_t k = k0; k <= k1 && k < n_inst; k++) {
        pieces[np].lo = lo > k * T ? lo : k * T;
        pieces[np].hi = hi < (k + 1) * T ? hi : (k + 1) * T;
        pieces[np].inst = k * T;
        np++;
    }
    const int tail_part = k1 >= n_inst;
    cJSON *jh = NULL, *jsteps = NULL;
    if (jhits) {
        jh = cJSON_CreateObject();
        cJSON_AddStringToObject(jh, "file", loader_file_name(L, f));
        cJSON_AddNumberToObject(jh, "start", (double)lo);
        cJSON_AddNumberToObject(jh, "end", (double)hi);
        cJSON_AddStringToObject(jh, "variant", variant);
        if (d) {
            cJSON *jd = cJSON_AddObjectToObject(jh, "document");
            cJSON_AddStringToObject(jd, "id", d->id);
            cJSON_AddStringToObject(jd, "src", d->src);
            cJSON_AddNumberToObject(jd, "loc", (double)d->loc);
            cJSON_AddNumberToObject(jd, "doc_start", (double)d->start);
            cJSON_AddNumberToObject(jd, "doc_end", (double)d->end);
        } else {
            cJSON_AddNullToObject(jh, "document");
        }
        cJSON_AddStringToObject(jh, "placement", place);
        cJSON_AddBoolToObject(jh, "tail_part", tail_part);
        cJSON_AddStringToObject(jh, "before", before);
        cJSON_AddStringToObject(jh, "match", match);
        cJSON_AddStringToObject(jh, "after", after);
        jsteps = cJSON_AddArrayToObject(jh, "steps");
        cJSON_AddItemToArray(jhits, jh);
    } else {
        printf("\nhit %zu: ", number);
        if (d)
            printf("%s (%s:%ld), its tokens [%llu, %llu); ", d->id, d->src, d->loc,
                   (unsigned long long)(lo - d->start), (unsigned long long)(hi - d->start));
        printf("%s tokens [%llu, %llu), %s\n  %s", base_(loader_file_name(L, f)),
               (unsigned long long)lo, (unsigned long long)hi, variant, cut_b ? "..." : "");
        put_quoted_(before, strlen(before));
        printf(" + ");
        put_quoted_(match, strlen(match));
        printf(" + ");
        put_quoted_(after, strlen(after));
        printf("%s\n", cut_a ? "..." : "");
        if (k0 >= n_inst)
            printf("  in the shard's dropped tail (tokens [%llu, %llu) fill no sequence of "
                   "%llu): never trained on\n",
                   (unsigned long long)(n_inst * T), (unsigned long long)loader_file_tokens(L, f),
                   (unsigned long long)T);
        else if (k0 != k1 || tail_part)
            printf("  split over %d sequence%s%s: never seen whole in one context\n", np,
                   np == 1 ? "" : "s", tail_part ? " and the shard's dropped tail" : "");
    }
    for (uint64_t e = 0; e < n_epochs; e++) {
        if (!jhits && np) printf("  epoch %llu:", (unsigned long long)e);
        for (int p = 0; p < np; p++) {
            int64_t s = trace_instance_step(x->t, e, f, pieces[p].inst);
            const char *stat = status_(x, s);
            if (jhits) {
                cJSON *js = cJSON_CreateObject();
                cJSON_AddNumberToObject(js, "epoch", (double)e);
                if (s)
                    cJSON_AddNumberToObject(js, "step", (double)s);
                else
                    cJSON_AddNullToObject(js, "step");
                cJSON_AddStringToObject(js, "status", stat);
                cJSON_AddNumberToObject(js, "start", (double)pieces[p].lo);
                cJSON_AddNumberToObject(js, "end", (double)pieces[p].hi);
                cJSON_AddNumberToObject(js, "sequence_start", (double)pieces[p].inst);
                cJSON_AddItemToArray(jsteps, js);
                continue;
            }
            if (np > 1)
                printf(" tokens [%llu, %llu)", (unsigned long long)pieces[p].lo,
                       (unsigned long long)pieces[p].hi);
            if (s)
                printf(" step %lld (%s)", (long long)s, stat);
            else
                printf(" dropped (in the epoch's last, incomplete global batch)");
            printf("%s", p + 1 < np ? ";" : "\n");
        }
    }
    free(before);
    free(match);
    free(after);
    free(pieces);
    return MOET_OK;
}

static int do_find_(Ctx *x, MoetErr *err) {
    const Config *c = x->c;
    const Loader *L = trace_loader(x->t);
    const uint64_t B = loader_batches_per_epoch(L);
    const char *text = x->a->find;

    // TEXT as given, and with a space before it (how it tokenizes after a word)
    TokIds ids[2] = {{0}, {0}};
    const char *variant[2] = {"as given", "after a space"};
    int n_pats = 1, rc;
    if ((rc = tokenizer_encode(x->tok, text, strlen(text), &ids[0], err))) return rc;
    if (text[0] != ' ' && text[0] != '\t' && text[0] != '\n' && text[0] != '\r') {
        size_t n = strlen(text);
        char *spaced = moet_malloc(n + 2);
        spaced[0] = ' ';
        memcpy(spaced + 1, text, n + 1);
        rc = tokenizer_encode(x->tok, spaced, n + 1, &ids[1], err);
        free(spaced);
        if (rc) goto out;
        n_pats = 2;
    }
    if (ids[0].n == 0) {
        rc = moet_errf(err, MOET_EUSAGE, "trace: --find TEXT encodes to no tokens");
        goto out;
    }
    const int32_t *pats[2] = {ids[0].ids, ids[1].ids};
    size_t lens[2] = {ids[0].n, ids[1].n};
    TraceFindOpts fo = {.max_hits = x->a->max_hits, .chunk_tokens = 0};
    TraceHit *hits = NULL;
    size_t n_hits = 0;
    TraceFindStats st;
    if ((rc = trace_find(x->t, &fo, pats, lens, n_pats, &hits, &n_hits, &st, err))) goto out;
    const double rate = (double)st.tokens / (st.seconds > 0 ? st.seconds : 1e-9);
    fprintf(stderr,
            "moet trace: scanned %llu tokens of %d file%s in %.3f s: %.0fM tokens/s (%d "
            "thread%s)\n",
            (unsigned long long)st.tokens, loader_num_files(L), loader_num_files(L) == 1 ? "" : "s",
            st.seconds, rate / 1e6, st.threads, st.threads == 1 ? "" : "s");

    // epochs of the run: up to max_steps (or the checkpoint's step, if later)
    int64_t run_steps = c->max_steps;
    if (x->have_ckpt && x->rs.step > run_steps) run_steps = x->rs.step;
    uint64_t n_epochs = ((uint64_t)run_steps + B - 1) / B;
    if (n_epochs < 1) n_epochs = 1;
    if (n_epochs > MAX_EPOCHS_) {
        fprintf(stderr,
                "moet trace: note: the run spans %llu epochs; the steps of the first %d "
                "are listed\n",
                (unsigned long long)n_epochs, MAX_EPOCHS_);
        n_epochs = MAX_EPOCHS_;
    }

    cJSON *root = NULL, *jhits = NULL;
    if (x->a->json) {
        root = cJSON_CreateObject();
        cJSON_AddStringToObject(root, x->have_ckpt ? "checkpoint" : "config", x->origin);
        if (x->have_ckpt) cJSON_AddNumberToObject(root, "checkpoint_step", (double)x->rs.step);
        cJSON_AddStringToObject(root, "text", text);
        cJSON *jp = cJSON_AddArrayToObject(root, "patterns");
        for (int k = 0; k < n_pats; k++) {
            cJSON *o = cJSON_CreateObject();
            cJSON_AddStringToObject(o, "variant", variant[k]);
            cJSON *a = cJSON_AddArrayToObject(o, "ids");
            for (size_t q = 0; q < ids[k].n; q++)
                cJSON_AddItemToArray(a, cJSON_CreateNumber(ids[k].ids[q]));
            cJSON_AddItemToArray(jp, o);
        }
        cJSON_AddNumberToObject(root, "tokens_scanned", (double)st.tokens);
        cJSON_AddNumberToObject(root, "seconds", st.seconds);
        cJSON_AddNumberToObject(root, "tokens_per_s", rate);
        cJSON_AddNumberToObject(root, "threads", st.threads);
        cJSON_AddNumberToObject(root, "hits_total", (double)st.hits);
        jhits = cJSON_AddArrayToObject(root, "hits");
    } else {
        printf("find \"%s\" in the training data of %s (%s, %llu tokens; ", text, x->origin,
               c->train, (unsigned long long)st.tokens);
        if (x->have_ckpt)
            printf("trained to step %lld of %d", (long long)x->rs.step, c->max_steps);
        else
            printf("a run of %d steps", c->max_steps);
        printf("): %llu hit%s", (unsigned long long)st.hits, st.hits == 1 ? "" : "s");
        if (st.hits > n_hits && n_hits)
            printf(", the first %zu shown (--max-hits)", n_hits);
        else if (st.hits > n_hits)
            printf(", none shown (--max-hits 0)");
        printf("\n");
        for (int k = 0; k < n_pats; k++) {
            printf("  %s: %zu tokens [", variant[k], ids[k].n);
            for (size_t q = 0; q < ids[k].n; q++) printf("%s%d", q ? " " : "", ids[k].ids[q]);
            printf("]\n");
        }
    }

    for (size_t h = 0; h < n_hits && !rc; h++)
        rc = report_hit_(x, &hits[h], h + 1, lens[hits[h].pattern], variant[hits[h].pattern],
                         n_epochs, jhits, err);
    if (root) {
        if (!rc) {
            char *s = cJSON_PrintUnformatted(root);
            puts(s);
            free(s);
        }
        cJSON_Delete(root);
    }
    free(hits);
out:
    tokids_free(&ids[0]);
    tokids_free(&ids[1]);
    return rc;
}

// ---------------------------------------------------------------------------------------

int cmd_trace(int argc, char **argv, MoetErr *err) {
    TraceArgs a;
    int help, rc;
    if ((rc = parse_args_(argc, argv, &a, &help, err))) return rc;
    if (help) {
        fputs(TRACE_HELP, stdout);
        return MOET_OK;
    }
    Config c;
    char path[1100];
    Ctx x = {.a = &a, .c = &c};
    if (a.spec) {
        if ((rc = ckpt_resolve(a.spec, NULL, path, sizeof path, err))) {
            if (strstr(err->msg, "no checkpoint in"))
                snprintf(err->msg + strlen(err->msg), sizeof err->msg - strlen(err->msg),
                         "\n---> HINT: a run without a checkpoint yet: moet trace --config FILE");
            return rc;
        }
        if ((rc = ckpt_load_config(path, a.n_sets, a.sets, &c, err))) return rc;
        if ((rc = read_state_(path, &x.rs, err))) return rc;
        x.have_ckpt = 1;
        x.origin = path;
    } else {
        if ((rc = config_from_cli(&c, a.config, a.n_sets, a.sets, err))) return rc;
        x.origin = a.config;
    }

    LoaderConfig lc = {.glob = c.train,
                       .seq_len = c.seq_len,
                       .vocab_size = c.vocab_size,
                       .seed = c.seed,
                       .shuffle = 1,
                       .micro_batch = c.global_batch,
                       .global_batch = c.global_batch,
                       .rank = 0,
                       .world = 1,
                       .prefetch = 0};
    Tokenizer *tok = NULL;
    if ((rc = trace_open(&x.t, &lc, err))) return rc;
    const Loader *L = trace_loader(x.t);
    if (x.have_ckpt) {
        // the shards, seed and batch must be the run's, or the order would be another one
        const uint64_t B = loader_batches_per_epoch(L), S = (uint64_t)x.rs.step;
        if (strcmp(loader_fingerprint(L), x.rs.fingerprint) != 0) {
            rc = moet_errf(err, MOET_EUSAGE,
                           "trace: the shards' fingerprint %s (%s: %d file%s, %llu tokens, "
                           "vocab_size %d, seq_len %d) differs from %s, the one the run recorded "
                           "in %s: these are not the shards it trained on (a file added, removed, "
                           "renamed or resized)\n---> HINT: point [data] train at the run's "
                           "shards: --set data.train=GLOB",
                           loader_fingerprint(L), c.train, loader_num_files(L),
                           loader_num_files(L) == 1 ? "" : "s",
                           (unsigned long long)loader_num_tokens(L), c.vocab_size, c.seq_len,
                           x.rs.fingerprint, path);
        } else if (x.rs.seed != c.seed) {
            rc = moet_errf(err, MOET_EUSAGE,
                           "trace: [train] seed %llu differs from the data seed %llu that %s "
                           "recorded\n---> HINT: drop --set train.seed",
                           (unsigned long long)c.seed, (unsigned long long)x.rs.seed, path);
        } else if (x.rs.epoch != S / B || x.rs.consumed != (S % B) * (uint64_t)c.global_batch) {
            rc = moet_errf(err, MOET_EFAIL,
                           "trace: %s recorded the data position epoch %llu, instance %llu after "
                           "step %lld, but a run of global_batch %d is at epoch %llu, instance "
                           "%llu then: the run changed its global_batch (or its data) on a "
                           "resume, and its order cannot be retraced\n---> HINT: with --set "
                           "train.global_batch, give the run's",
                           path, (unsigned long long)x.rs.epoch, (unsigned long long)x.rs.consumed,
                           (long long)x.rs.step, c.global_batch, (unsigned long long)(S / B),
                           (unsigned long long)((S % B) * (uint64_t)c.global_batch));
        }
    }
    if (!rc && (rc = tokenizer_load(&tok, c.tokenizer, err)))
        snprintf(err->msg + strlen(err->msg), sizeof err->msg - strlen(err->msg),
                 "\n---> HINT: trace decodes and encodes with the run's [data] tokenizer; "
                 "--set data.tokenizer=FILE where it lives elsewhere");
    if (!rc) {
        x.tok = tok;
        rc = a.find ? do_find_(&x, err) : do_step_(&x, err);
    }
    tokenizer_free(tok);
    trace_close(x.t);
    return rc;
}
