// cmd_tokenize: `moet tokenize`: Dolma JSONL documents -> token shards (.npy + .csv.gz).
// A pipeline: one reader thread cuts the input into batches of lines, N workers parse and
// encode batches in parallel, and the calling thread writes them in input order, so that the
// output is byte-identical for any --threads. Under mpirun / srun, rank r takes the inputs
// i with i % world == r and writes group r.
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "data/dolma.h"
#include "data/shards.h"
#include "data/tokenizer.h"
#include "train/cli.h"
#include "train/common.h"

static const char *TOKENIZE_HELP =
    "usage: moet tokenize --tokenizer FILE --out DIR [--threads N] [--skip-bad]\n"
    "                     [--max-tokens-per-file N] [--eos-id N] [--quiet] INPUT...\n"
    "\n"
    "Tokenizes Dolma documents (JSONL: one {\"id\", \"text\", \"source\", ...} object a line;\n"
    "plain, .gz or .zst) into Dolma / OLMo token shards:\n"
    "  DIR/part-<G>-<NNNNN>.npy     raw little-endian token ids, no header (np.memmap);\n"
    "                               uint16 when the vocabulary has <= 65536 ids, else uint32;\n"
    "                               each document's tokens followed by EOS (no BOS)\n"
    "  DIR/part-<G>-<NNNNN>.csv.gz  one row a document: start,end,id,src,loc (token offsets,\n"
    "                               end exclusive and including the EOS; src = the input path\n"
    "                               as given; loc = the 1-based line in it), as `dolma tokens`\n"
    "Text is stripped of leading/trailing whitespace and empty documents are skipped.\n"
    "Files appear under their final names only when complete (written as *.tmp, renamed).\n"
    "\n"
    "  --tokenizer FILE          HF tokenizer.json (e.g. "
    "data/tokenizers/gpt-neox-olmo-dolma-v1_5.json)\n"
    "  --out DIR                 output directory (created; must not hold parts of this group)\n"
    "  --threads N               encoding threads (default: the online CPUs, at most 16); the\n"
    "                            output is identical for any N\n"
    "  --skip-bad                skip (and count) bad lines instead of failing on the first\n"
    "  --max-tokens-per-file N   start a new part before exceeding N tokens (default 2^30, as\n"
    "                            `dolma tokens`); documents never span parts\n"
    "  --eos-id N                EOS id (default: the tokenizer's <|endoftext|>)\n"
    "  --quiet                   no progress line\n"
    "\n"
    "Under mpirun / srun (OMPI_COMM_WORLD_RANK/SIZE, PMI_RANK/SIZE or SLURM_PROCID/NTASKS),\n"
    "rank r tokenizes the inputs i with i % world == r and writes part-<r>-*.\n"
    "Exit status: 0 done, 1 bad input (FILE:LINE: reason; nothing left under a final name),\n"
    "2 usage error.\n";

enum { BATCH_LINES = 256, BATCH_BYTES = 1 << 20, MAX_SHOWN_BAD = 20 };
enum { KIND_TOKENIZER = DOLMA_N_KINDS, N_KINDS }; // encode failed (beyond the parse kinds)

typedef struct {
    int file; // index into Job.files
    long lineno;
    size_t off, len; // the line, in Batch.arena
    // filled by a worker
    int kind;              // DolmaKind or KIND_TOKENIZER
    size_t ids_off, ids_n; // the tokens with EOS, in Batch.ids
    char *id;              // the document id (DOLMA_DOC)
    char *why;             // the reason (bad kinds)
} Line;

enum { SLOT_EMPTY, SLOT_FILLED, SLOT_DONE };

typedef struct {
    int state;
    char *arena;
    size_t arena_len, arena_cap;
    Line *lines;
    int n_lines, cap_lines;
    uint64_t bytes_in; // input bytes (on disk) consumed up to the end of this batch
    int read_rc;       // a read error after these lines
    MoetErr read_err;
    int32_t *ids;
    size_t n_ids, cap_ids;
} Batch;

typedef struct {
    // inputs
    char **files;
    int n_files;
    const Tokenizer *tok;
    int eos;
    // the pipeline
    pthread_mutex_t mu;
    pthread_cond_t cv_reader, cv_worker, cv_writer;
    Batch *slots;
    int n_slots;
    long n_read, n_taken, n_written;
    int reader_done, abort;
} Job;

// ---------------------------------------------------------------------------------------
// reader: lines -> batches

static int batch_add_line_(Batch *b, int file, long lineno, const char *s, size_t n) {
    if (b->arena_len + n + 1 > b->arena_cap) {
        b->arena_cap = (b->arena_len + n + 1) * 2;
        b->arena = realloc(b->arena, b->arena_cap);
        if (!b->arena) moet_die("out of memory");
    }
    if (b->n_lines == b->cap_lines) {
        b->cap_lines = b->cap_lines ? 2 * b->cap_lines : BATCH_LINES;
        b->lines = realloc(b->lines, (size_t)b->cap_lines * sizeof *b->lines);
        if (!b->lines) moet_die("out of memory");
    }
    memcpy(b->arena + b->arena_len, s, n);
    b->arena[b->arena_len + n] = '\0';
    b->lines[b->n_lines++] = (Line){.file = file, .lineno = lineno, .off = b->arena_len, .len = n};
    b->arena_len += n + 1;
    return b->n_lines >= BATCH_LINES || b->arena_len >= BATCH_BYTES;
}

// Waits for the next free slot; returns it, or NULL when the job is aborted.
static Batch *reader_slot_(Job *j) {
    pthread_mutex_lock(&j->mu);
    while (!j->abort && j->n_read - j->n_written >= j->n_slots)
        pthread_cond_wait(&j->cv_reader, &j->mu);
    Batch *b = j->abort ? NULL : &j->slots[j->n_read % j->n_slots];
    pthread_mutex_unlock(&j->mu);
    if (b) {
        b->arena_len = 0;
        b->n_lines = 0;
        b->n_ids = 0;
        b->read_rc = 0;
    }
    return b;
}

static void reader_publish_(Job *j, Batch *b, int last) {
    pthread_mutex_lock(&j->mu);
    b->state = SLOT_FILLED;
    j->n_read++;
    if (last) j->reader_done = 1;
    pthread_cond_broadcast(&j->cv_worker);
    pthread_cond_broadcast(&j->cv_writer);
    pthread_mutex_unlock(&j->mu);
}

static void *reader_main_(void *arg) {
    Job *j = arg;
    Batch *b = reader_slot_(j);
    uint64_t bytes_before = 0; // input bytes of the files already read
    for (int f = 0; b && f < j->n_files; f++) {
        DolmaReader *r = NULL;
        MoetErr err = {{0}};
        int rc = dolma_open(&r, j->files[f], &err);
        const char *s;
        size_t n;
        long lineno;
        while (rc == 0) {
            int got = dolma_next_line(r, &s, &n, &lineno, &err);
            if (got < 0) rc = MOET_EFAIL;
            if (got <= 0) break;
            if (batch_add_line_(b, f, lineno, s, n)) {
                b->bytes_in = bytes_before + dolma_bytes_in(r);
                reader_publish_(j, b, 0);
                if (!(b = reader_slot_(j))) break;
            }
        }
        if (r) bytes_before += dolma_bytes_in(r);
        dolma_close(r);
        if (rc && b) { // the error travels in order, after the lines read before it
            b->read_rc = rc;
            b->read_err = err;
            b->bytes_in = bytes_before;
            reader_publish_(j, b, 1);
            return NULL;
        }
    }
    if (b) {
        b->bytes_in = bytes_before;
        reader_publish_(j, b, 1); // the last batch, possibly empty
    } else {
        pthread_mutex_lock(&j->mu);
        j->reader_done = 1;
        pthread_cond_broadcast(&j->cv_worker);
        pthread_mutex_unlock(&j->mu);
    }
    return NULL;
}

// ---------------------------------------------------------------------------------------
// workers: parse + encode a batch

static void batch_push_ids_(Batch *b, const int32_t *ids, size_t n, int32_t eos) {
    if (b->n_ids + n + 1 > b->cap_ids) {
        b->cap_ids = (b->n_ids + n + 1) * 2;
        b->ids = realloc(b->ids, b->cap_ids * sizeof *b->ids);
        if (!b->ids) moet_die("out of memory");
    }
    memcpy(b->ids + b->n_ids, ids, n * sizeof *ids);
    b->ids[b->n_ids + n] = eos;
    b->n_ids += n + 1;
}

static void encode_batch_(Job *j, Batch *b, TokIds *tmp) {
    char why[sizeof(MoetErr) + 64];
    for (int i = 0; i < b->n_lines; i++) {
        Line *l = &b->lines[i];
        DolmaDoc doc;
        l->kind = dolma_parse(b->arena + l->off, l->len, &doc, why, sizeof why);
        if (l->kind == DOLMA_DOC) {
            MoetErr err = {{0}};
            tmp->n = 0;
            if (tokenizer_encode(j->tok, doc.text, doc.text_len, tmp, &err)) {
                l->kind = KIND_TOKENIZER;
                snprintf(why, sizeof why, "tokenizer: %s", err.msg);
            } else {
                l->ids_off = b->n_ids;
                l->ids_n = tmp->n + 1;
                batch_push_ids_(b, tmp->ids, tmp->n, j->eos);
                l->id = doc.id;
                doc.id = NULL;
            }
            dolma_doc_free(&doc);
        }
        if (l->kind != DOLMA_DOC && l->kind != DOLMA_EMPTY) {
            l->why = strdup(why);
            if (!l->why) moet_die("out of memory");
        }
    }
}

static void *worker_main_(void *arg) {
    Job *j = arg;
    TokIds tmp = {0};
    for (;;) {
        pthread_mutex_lock(&j->mu);
        while (!j->abort && j->n_taken == j->n_read && !j->reader_done)
            pthread_cond_wait(&j->cv_worker, &j->mu);
        if (j->abort || j->n_taken == j->n_read) {
            pthread_mutex_unlock(&j->mu);
            break;
        }
        Batch *b = &j->slots[j->n_taken++ % j->n_slots];
        pthread_mutex_unlock(&j->mu);
        encode_batch_(j, b, &tmp);
        pthread_mutex_lock(&j->mu);
        b->state = SLOT_DONE;
        pthread_cond_broadcast(&j->cv_writer);
        pthread_mutex_unlock(&j->mu);
    }
    tokids_free(&tmp);
    return NULL;
}

// ---------------------------------------------------------------------------------------
// the command

static int parse_long_(const char *opt, const char *s, long long lo, long long *out, MoetErr *err) {
    char *end = NULL;
    errno = 0;
    long long v = strtoll(s, &end, 10);
    if (!*s || *end || errno || v < lo)
        return moet_errf(err, MOET_EUSAGE, "%s: expected an integer >= %lld, got '%s'", opt, lo, s);
    *out = v;
    return 0;
}

// The rank and world size from the launcher's environment (no MPI calls needed).
static void detect_rank_(int *rank, int *world) {
    static const char *vars[][2] = {{"OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"},
                                    {"PMI_RANK", "PMI_SIZE"},
                                    {"SLURM_PROCID", "SLURM_NTASKS"}};
    *rank = 0;
    *world = 1;
    for (size_t i = 0; i < sizeof vars / sizeof vars[0]; i++) {
        const char *r = getenv(vars[i][0]), *w = getenv(vars[i][1]);
        if (r && w && atoi(w) >= 1 && atoi(r) >= 0 && atoi(r) < atoi(w)) {
            *rank = atoi(r);
            *world = atoi(w);
            return;
        }
    }
}

static void free_lines_(Batch *b) {
    for (int i = 0; i < b->n_lines; i++) {
        free(b->lines[i].id);
        free(b->lines[i].why);
        b->lines[i].id = b->lines[i].why = NULL;
    }
}

static void fmt_secs_(char *buf, size_t n, double s) {
    if (s >= 3600)
        snprintf(buf, n, "%dh%02dm", (int)(s / 3600), (int)(s / 60) % 60);
    else if (s >= 60)
        snprintf(buf, n, "%dm%02ds", (int)(s / 60), (int)s % 60);
    else
        snprintf(buf, n, "%.0fs", s);
}

int cmd_tokenize(int argc, char **argv, MoetErr *err) {
    const char *tok_path = NULL, *out_dir = NULL;
    long long threads = 0, max_tokens = (long long)SHARDS_DEFAULT_MAX_TOKENS, eos_opt = -1;
    int skip_bad = 0, quiet = 0, n_inputs = 0;
    char **inputs = calloc((size_t)argc + 1, sizeof *inputs);
    if (!inputs) moet_die("out of memory");
    int rc = 0;
    for (int i = 1; i < argc && !rc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
            fputs(TOKENIZE_HELP, stdout);
            free(inputs);
            return 0;
        }
        int takes = strcmp(a, "--tokenizer") == 0 || strcmp(a, "--out") == 0 ||
                    strcmp(a, "--threads") == 0 || strcmp(a, "--max-tokens-per-file") == 0 ||
                    strcmp(a, "--eos-id") == 0;
        if (takes && i + 1 >= argc) {
            rc = moet_errf(err, MOET_EUSAGE, "%s needs a value (moet tokenize --help)", a);
            break;
        }
        if (strcmp(a, "--tokenizer") == 0)
            tok_path = argv[++i];
        else if (strcmp(a, "--out") == 0)
            out_dir = argv[++i];
        else if (strcmp(a, "--threads") == 0)
            rc = parse_long_(a, argv[++i], 1, &threads, err);
        else if (strcmp(a, "--max-tokens-per-file") == 0)
            rc = parse_long_(a, argv[++i], 1, &max_tokens, err);
        else if (strcmp(a, "--eos-id") == 0)
            rc = parse_long_(a, argv[++i], 0, &eos_opt, err);
        else if (strcmp(a, "--skip-bad") == 0)
            skip_bad = 1;
        else if (strcmp(a, "--quiet") == 0)
            quiet = 1;
        else if (a[0] == '-' && a[1] != '\0')
            rc = moet_errf(err, MOET_EUSAGE, "unknown option '%s' (moet tokenize --help)", a);
        else
            inputs[n_inputs++] = argv[i];
    }
    if (!rc && !tok_path) rc = moet_errf(err, MOET_EUSAGE, "--tokenizer FILE is required");
    if (!rc && !out_dir) rc = moet_errf(err, MOET_EUSAGE, "--out DIR is required");
    if (!rc && n_inputs == 0) rc = moet_errf(err, MOET_EUSAGE, "no INPUT files given");
    for (int i = 0; !rc && i < n_inputs; i++) {
        struct stat st;
        FILE *f = fopen(inputs[i], "rb");
        if (!f)
            rc = moet_errf(err, MOET_EUSAGE, "%s: cannot read: %s", inputs[i], strerror(errno));
        else if (fstat(fileno(f), &st) == 0 && S_ISDIR(st.st_mode))
            rc = moet_errf(err, MOET_EUSAGE, "%s: is a directory, not a JSONL file", inputs[i]);
        if (f) fclose(f);
    }
    if (rc) {
        free(inputs);
        return rc;
    }
    if (threads == 0) {
        long n = sysconf(_SC_NPROCESSORS_ONLN);
        threads = n < 1 ? 1 : n > 16 ? 16 : n;
    }
    int rank, world;
    detect_rank_(&rank, &world);
    moet_set_log_rank(rank, world);

    // this rank's inputs and their size on disk (for the ETA)
    Job j = {0};
    j.files = calloc((size_t)n_inputs, sizeof *j.files);
    if (!j.files) moet_die("out of memory");
    uint64_t total_in = 0;
    for (int i = rank; i < n_inputs; i += world) {
        struct stat st;
        if (stat(inputs[i], &st) == 0) total_in += (uint64_t)st.st_size;
        j.files[j.n_files++] = inputs[i];
    }

    Tokenizer *tok = NULL;
    ShardWriter *sw = NULL;
    if ((rc = tokenizer_load(&tok, tok_path, err))) goto out;
    int eos = eos_opt >= 0 ? (int)eos_opt : tokenizer_eos_id(tok);
    if (eos < 0) {
        rc = moet_errf(err, MOET_EUSAGE,
                       "%s has no <|endoftext|> token: give the EOS id with --eos-id N", tok_path);
        goto out;
    }
    int vocab = tokenizer_vocab_size(tok);
    if (eos >= vocab) vocab = eos + 1;
    char digits[16];
    int group_digits = snprintf(digits, sizeof digits, "%d", world);
    if ((rc = shards_open(&sw, out_dir, rank, group_digits, vocab, (uint64_t)max_tokens, err)))
        goto out;
    j.tok = tok;
    j.eos = eos;

    // start the pipeline
    j.n_slots = 4 * (int)threads + 4;
    j.slots = calloc((size_t)j.n_slots, sizeof *j.slots);
    if (!j.slots) moet_die("out of memory");
    pthread_mutex_init(&j.mu, NULL);
    pthread_cond_init(&j.cv_reader, NULL);
    pthread_cond_init(&j.cv_worker, NULL);
    pthread_cond_init(&j.cv_writer, NULL);
    pthread_t reader, *workers = calloc((size_t)threads, sizeof *workers);
    if (!workers) moet_die("out of memory");
    pthread_create(&reader, NULL, reader_main_, &j);
    for (int t = 0; t < threads; t++) pthread_create(&workers[t], NULL, worker_main_, &j);
    moet_log("tokenize: %d of %d input files (%.1f MB) -> %s/part-%0*d-*.npy (uint%d, EOS %d), "
             "%lld threads",
             j.n_files, n_inputs, total_in / 1e6, out_dir, group_digits, rank,
             vocab <= 65536 ? 16 : 32, eos, threads);

    // the writer: batches in input order
    double t0 = moet_time(), t_last = t0;
    uint64_t n_docs = 0, text_bytes = 0, bytes_in = 0, n_lines = 0;
    uint64_t kinds[N_KINDS] = {0};
    int shown_bad = 0, progress_shown = 0;
    int tty = isatty(fileno(stderr));
    for (;;) {
        pthread_mutex_lock(&j.mu);
        Batch *b = &j.slots[j.n_written % j.n_slots];
        while (b->state != SLOT_DONE && !(j.reader_done && j.n_written == j.n_read))
            pthread_cond_wait(&j.cv_writer, &j.mu);
        int finished = b->state != SLOT_DONE;
        pthread_mutex_unlock(&j.mu);
        if (finished) break;

        for (int i = 0; !rc && i < b->n_lines; i++) {
            const Line *l = &b->lines[i];
            const char *path = j.files[l->file];
            n_lines++;
            text_bytes += l->len + 1;
            kinds[l->kind]++;
            if (l->kind == DOLMA_DOC) {
                rc = shards_write_doc(sw, b->ids + l->ids_off, l->ids_n, l->id, path, l->lineno,
                                      err);
                n_docs++;
            } else if (l->kind != DOLMA_EMPTY) {
                if (!skip_bad) {
                    rc = moet_errf(err, MOET_EFAIL,
                                   "%s:%ld: %s\n---> HINT: fix the line, or pass --skip-bad to "
                                   "skip and count bad lines",
                                   path, l->lineno, l->why);
                } else if (shown_bad++ < MAX_SHOWN_BAD) {
                    moet_log("tokenize: skipped %s:%ld: %s%s", path, l->lineno, l->why,
                             shown_bad == MAX_SHOWN_BAD ? " (further bad lines not shown)" : "");
                }
            }
        }
        if (!rc && b->read_rc) {
            rc = b->read_rc;
            *err = b->read_err;
        }
        bytes_in = b->bytes_in;
        free_lines_(b);

        pthread_mutex_lock(&j.mu);
        b->state = SLOT_EMPTY;
        j.n_written++;
        if (rc) j.abort = 1;
        pthread_cond_broadcast(&j.cv_reader);
        pthread_cond_broadcast(&j.cv_worker);
        pthread_mutex_unlock(&j.mu);
        if (rc) break;

        double now = moet_time();
        if (!quiet && now - t_last >= 1.0) {
            t_last = now;
            double el = now - t0, frac = total_in ? (double)bytes_in / (double)total_in : 0;
            char eta[32];
            fmt_secs_(eta, sizeof eta, frac > 0 ? el * (1 - frac) / frac : 0);
            char who[32] = "";
            if (world > 1) snprintf(who, sizeof who, "[rank %d] ", rank);
            fprintf(stderr,
                    "%s%stokenize: %llu docs, %.2fM tokens, %.1f MB/s, %.0f%% of input, "
                    "ETA %s%s",
                    tty ? "\r" : "", who, (unsigned long long)n_docs, shards_tokens(sw) / 1e6,
                    text_bytes / 1e6 / el, 100 * frac, eta, tty ? "   " : "\n");
            progress_shown = 1;
        }
    }
    pthread_mutex_lock(&j.mu);
    j.abort = j.abort || rc;
    pthread_cond_broadcast(&j.cv_reader);
    pthread_cond_broadcast(&j.cv_worker);
    pthread_mutex_unlock(&j.mu);
    pthread_join(reader, NULL);
    for (int t = 0; t < threads; t++) pthread_join(workers[t], NULL);
    for (int s = 0; s < j.n_slots; s++) {
        free_lines_(&j.slots[s]);
        free(j.slots[s].arena);
        free(j.slots[s].lines);
        free(j.slots[s].ids);
    }
    free(j.slots);
    free(workers);
    pthread_mutex_destroy(&j.mu);
    pthread_cond_destroy(&j.cv_reader);
    pthread_cond_destroy(&j.cv_worker);
    pthread_cond_destroy(&j.cv_writer);
    if (progress_shown && tty) fputc('\n', stderr);

    if (!rc) rc = shards_close(sw, err);
    if (!rc) {
        double el = moet_time() - t0;
        uint64_t bad = kinds[DOLMA_BAD_JSON] + kinds[DOLMA_BAD_FIELD] + kinds[DOLMA_BAD_UTF8] +
                       kinds[KIND_TOKENIZER];
        moet_log("tokenize: %llu documents, %llu tokens from %llu lines (%.1f MB of JSONL, %.1f MB "
                 "on disk) in %.1f s: %.1f MB/s, %.2fM tokens/s",
                 (unsigned long long)n_docs, (unsigned long long)shards_tokens(sw),
                 (unsigned long long)n_lines, text_bytes / 1e6, bytes_in / 1e6, el,
                 el > 0 ? text_bytes / 1e6 / el : 0, el > 0 ? shards_tokens(sw) / 1e6 / el : 0);
        moet_log(
            "tokenize: skipped %llu empty documents and %llu bad lines (malformed JSON %llu, "
            "missing/mistyped field %llu, invalid UTF-8 %llu, tokenizer error %llu)",
            (unsigned long long)kinds[DOLMA_EMPTY], (unsigned long long)bad,
            (unsigned long long)kinds[DOLMA_BAD_JSON], (unsigned long long)kinds[DOLMA_BAD_FIELD],
            (unsigned long long)kinds[DOLMA_BAD_UTF8], (unsigned long long)kinds[KIND_TOKENIZER]);
        moet_log("tokenize: wrote %d part%s (.npy + .csv.gz) to %s", shards_parts_done(sw),
                 shards_parts_done(sw) == 1 ? "" : "s", out_dir);
    }
out:
    if (rc)
        shards_discard(sw); // a failed run leaves no parts under final names
    else
        shards_free(sw);
    if (tok) tokenizer_free(tok);
    free(j.files);
    free(inputs);
    return rc;
}
