// trace: training-data provenance (see trace.h).
//
// Steps. The trainer's step s (1-based) reads global batch b = s - 1 of a stream that runs
// epoch after epoch: with B = floor(instances / global_batch) batches per epoch, step s is batch
// b mod B of epoch b / B, i.e. positions [(b mod B) G, (b mod B + 1) G) of that epoch's order
// (loader.c's top comment), whatever the world size. Backwards, the instance at position p of
// epoch e was read at step e B + p / G + 1, unless p >= B G (dropped by that epoch).
//
// Documents. Each shard's .csv.gz is read whole on first use and its fields unescaped in place
// (CSV as Python's csv module writes it: a field with a comma, quote or line break is quoted,
// quotes doubled); rows are kept in token order, so that the documents overlapping a range
// are found by binary search.
//
// Search: see trace_find in trace.h.
#include "data/trace.h"

#include <errno.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <zlib.h>

typedef struct {
    int loaded, missing;
    char *path; // the .csv.gz
    char *text; // its decompressed text; the docs' strings point into it
    TraceDoc *docs;
    size_t n;
} Meta;

struct Trace {
    Loader *L;
    uint64_t G, B; // sequences per global batch, global batches per epoch
    int seq_len;
    Meta *meta; // one per file
};

int trace_open(Trace **out, const LoaderConfig *cfg, MoetErr *err) {
    *out = NULL;
    LoaderConfig lc = *cfg;
    lc.shuffle = 1;
    lc.rank = 0;
    lc.world = 1;
    lc.micro_batch = cfg->global_batch;
    lc.prefetch = 0;
    Loader *L;
    int rc = loader_open(&L, &lc, err);
    if (rc) return rc;
    Trace *t = calloc(1, sizeof *t);
    if (!t) moet_die("trace: out of memory");
    t->L = L;
    t->G = (uint64_t)cfg->global_batch;
    t->B = loader_batches_per_epoch(L);
    t->seq_len = cfg->seq_len;
    int nf = loader_num_files(L);
    t->meta = calloc((size_t)nf, sizeof(Meta));
    if (!t->meta) moet_die("trace: out of memory");
    for (int f = 0; f < nf; f++) {
        const char *p = loader_file_name(L, f);
        size_t n = strlen(p);
        if (n >= 4 && strcmp(p + n - 4, ".npy") == 0) n -= 4;
        t->meta[f].path = malloc(n + 8);
        if (!t->meta[f].path) moet_die("trace: out of memory");
        memcpy(t->meta[f].path, p, n);
        memcpy(t->meta[f].path + n, ".csv.gz", 8);
    }
    *out = t;
    return MOET_OK;
}

void trace_close(Trace *t) {
    if (!t) return;
    for (int f = 0; t->meta && f < loader_num_files(t->L); f++) {
        free(t->meta[f].path);
        free(t->meta[f].text);
        free(t->meta[f].docs);
    }
    free(t->meta);
    loader_close(t->L);
    free(t);
}

const Loader *trace_loader(const Trace *t) {
    return t->L;
}

// ---- steps ----

void trace_step(const Trace *t, int64_t step, TraceSeq *seqs, uint64_t *epoch, uint64_t *batch) {
    uint64_t b = (uint64_t)(step - 1);
    *epoch = b / t->B;
    *batch = b % t->B;
    for (uint64_t j = 0; j < t->G; j++) {
        seqs[j].position = *batch * t->G + j;
        loader_locate(t->L, *epoch, seqs[j].position, &seqs[j].file, &seqs[j].offset);
    }
}

int64_t trace_instance_step(const Trace *t, uint64_t epoch, int file, uint64_t inst_offset) {
    uint64_t p = loader_index_of(t->L, epoch, file, inst_offset);
    if (p >= t->B * t->G) return 0;
    return (int64_t)(epoch * t->B + p / t->G + 1);
}

// ---- documents ----

// Reads the whole (gzip, possibly multi-member) file into a NUL-terminated buffer.
static int read_gz_(const char *path, char **out, size_t *len, MoetErr *err) {
    gzFile g = gzopen(path, "rb");
    if (!g) return moet_errf(err, MOET_EFAIL, "%s: cannot open (%s)", path, strerror(errno));
    size_t cap = 1 << 16, n = 0;
    char *buf = malloc(cap);
    if (!buf) moet_die("trace: out of memory");
    for (;;) {
        if (cap - n < (1 << 15)) {
            cap *= 2;
            char *nb = realloc(buf, cap);
            if (!nb) moet_die("trace: out of memory reading %s", path);
            buf = nb;
        }
        int r = gzread(g, buf + n, (unsigned)(cap - n - 1));
        if (r < 0) {
            int zerr;
            const char *why = gzerror(g, &zerr);
            int rc = moet_errf(err, MOET_EFAIL, "%s: not a readable gzip file (%s)", path, why);
            gzclose(g);
            free(buf);
            return rc;
        }
        if (r == 0) break;
        n += (size_t)r;
    }
    gzclose(g);
    buf[n] = '\0';
    *out = buf;
    *len = n;
    return MOET_OK;
}

// Parses one CSV field at *p (quoted or not), unescapes it in place and NUL-terminates it;
// *p moves past the field's delimiter, *end_of_row says whether that was a line break.
// Returns the field, or NULL when a quoted field is not closed.
static char *csv_field_(char **p, int *end_of_row) {
    char *s = *p, *field = s;
    if (*s == '"') {
        char *w = s;
        field = w;
        s++;
        for (;;) {
            if (*s == '\0') return NULL;
            if (*s == '"') {
                if (s[1] != '"') break;
                s++; // a doubled quote is one quote
            }
            *w++ = *s++;
        }
        s++; // the closing quote
        *w = '\0';
        if (*s == '\r') s++;
    } else {
        while (*s && *s != ',' && *s != '\n') s++;
        char *e = s;
        if (e > field && e[-1] == '\r') e--;
        if (*s == '\0') {
            *end_of_row = 1;
            *p = s;
            *e = '\0';
            return field;
        }
        char d = *s;
        *e = '\0';
        *end_of_row = d == '\n';
        *p = s + 1;
        return field;
    }
    *end_of_row = *s != ',';
    if (*s) s++;
    *p = s;
    return field;
}

static int parse_u64_(const char *s, uint64_t *v) {
    if (!*s) return 0;
    char *e;
    errno = 0;
    unsigned long long x = strtoull(s, &e, 10);
    if (*e || errno || s[0] == '-') return 0;
    *v = x;
    return 1;
}

static int load_meta_(Trace *t, int file, MoetErr *err) {
    Meta *M = &t->meta[file];
    struct stat sb;
    if (stat(M->path, &sb) != 0) {
        M->loaded = M->missing = 1;
        return MOET_OK;
    }
    size_t len;
    int rc = read_gz_(M->path, &M->text, &len, err);
    if (rc) return rc;
    size_t cap = 1024;
    M->docs = malloc(cap * sizeof(TraceDoc));
    if (!M->docs) moet_die("trace: out of memory");
    const uint64_t n_tok = loader_file_tokens(t->L, file);
    char *p = M->text;
    long row = 0;
    uint64_t prev_end = 0;
    while (*p) {
        row++;
        char *fields[5];
        int nf = 0, eor = 0;
        while (nf < 5 && !eor) {
            fields[nf] = csv_field_(&p, &eor);
            if (!fields[nf]) break;
            nf++;
        }
        TraceDoc d;
        char *endp = NULL;
        int ok = nf == 5 && eor && parse_u64_(fields[0], &d.start) &&
                 parse_u64_(fields[1], &d.end) && d.start < d.end;
        if (ok) {
            d.loc = strtol(fields[4], &endp, 10);
            ok = endp != fields[4] && *endp == '\0';
        }
        if (!ok)
            return moet_errf(err, MOET_EFAIL,
                             "%s: row %ld is not start,end,id,src,loc with start < end\n---> "
                             "HINT: the file is damaged or not a token shard's metadata; "
                             "re-run `moet tokenize`",
                             M->path, row);
        if (d.start < prev_end || d.end > n_tok)
            return moet_errf(err, MOET_EFAIL,
                             "%s: row %ld covers tokens [%llu, %llu), %s\n---> HINT: this "
                             "metadata does not belong to %s (%llu tokens); re-run `moet "
                             "tokenize`",
                             M->path, row, (unsigned long long)d.start, (unsigned long long)d.end,
                             d.start < prev_end ? "before the end of the row above"
                                                : "beyond the end of the shard",
                             loader_file_name(t->L, file), (unsigned long long)n_tok);
        d.id = fields[2];
        d.src = fields[3];
        prev_end = d.end;
        if (M->n == cap) {
            cap *= 2;
            TraceDoc *nd = realloc(M->docs, cap * sizeof(TraceDoc));
            if (!nd) moet_die("trace: out of memory");
            M->docs = nd;
        }
        M->docs[M->n++] = d;
    }
    if (prev_end != n_tok)
        return moet_errf(err, MOET_EFAIL,
                         "%s: its %zu rows end at token %llu but %s has %llu tokens\n---> HINT: "
                         "this metadata does not belong to that shard; re-run `moet tokenize`",
                         M->path, M->n, (unsigned long long)prev_end, loader_file_name(t->L, file),
                         (unsigned long long)n_tok);
    M->loaded = 1;
    return MOET_OK;
}

int trace_docs(Trace *t, int file, uint64_t lo, uint64_t hi, const TraceDoc **first, size_t *n,
               MoetErr *err) {
    *first = NULL;
    *n = 0;
    Meta *M = &t->meta[file];
    if (!M->loaded) {
        int rc = load_meta_(t, file, err);
        if (rc) {
            free(M->text);
            free(M->docs);
            M->text = NULL;
            M->docs = NULL;
            M->n = 0;
            return rc;
        }
    }
    if (M->missing || lo >= hi) return MOET_OK;
    size_t a = 0, b = M->n; // the first document with end > lo
    while (a < b) {
        size_t mid = a + (b - a) / 2;
        if (M->docs[mid].end <= lo)
            a = mid + 1;
        else
            b = mid;
    }
    size_t e = a;
    while (e < M->n && M->docs[e].start < hi) e++;
    *first = M->docs + a;
    *n = e - a;
    return MOET_OK;
}

int trace_docs_missing(const Trace *t, int file) {
    return t->meta[file].missing;
}

const char *trace_docs_path(const Trace *t, int file) {
    return t->meta[file].path;
}

// ---- search ----

typedef struct {
    const int32_t *ids;
    size_t len;
    uint32_t anchor; // ids[at], the pattern's largest id
    size_t at;
} Pattern;

typedef struct {
    int file;
    uint64_t lo, hi; // anchor positions scanned: [lo, hi) of the file
    TraceHit *hits;  // the first max_hits found
    size_t n, cap;
    uint64_t count; // all found
} Chunk;

enum { BLOCK = 256 }; // ids compared before one branch: long enough to vectorize well

static inline uint32_t id_at_(const uint8_t *ids, int itemsize, uint64_t i) {
    if (itemsize == 2) {
        uint16_t v;
        memcpy(&v, ids + 2 * i, 2);
        return v;
    }
    uint32_t v;
    memcpy(&v, ids + 4 * i, 4);
    return v;
}

// 1 when any of ids [i, i + n) equals one of the anchors a[0..4) (unused ones repeat a[0]).
static int block_has_u16_(const uint8_t *ids, uint64_t i, int n, const uint32_t a[4]) {
    const uint16_t a0 = (uint16_t)a[0], a1 = (uint16_t)a[1], a2 = (uint16_t)a[2],
                   a3 = (uint16_t)a[3];
    unsigned any = 0;
    for (int j = 0; j < n; j++) {
        uint16_t v;
        memcpy(&v, ids + 2 * (i + (uint64_t)j), 2);
        any |=
            (unsigned)(v == a0) | (unsigned)(v == a1) | (unsigned)(v == a2) | (unsigned)(v == a3);
    }
    return any != 0;
}

static int block_has_u32_(const uint8_t *ids, uint64_t i, int n, const uint32_t a[4]) {
    unsigned any = 0;
    for (int j = 0; j < n; j++) {
        uint32_t v;
        memcpy(&v, ids + 4 * (i + (uint64_t)j), 4);
        any |= (unsigned)(v == a[0]) | (unsigned)(v == a[1]) | (unsigned)(v == a[2]) |
               (unsigned)(v == a[3]);
    }
    return any != 0;
}

static void add_hit_(Chunk *c, size_t max_hits, int pattern, uint64_t offset) {
    c->count++;
    if (c->n == max_hits) return;
    if (c->n == c->cap) {
        c->cap = c->cap ? 2 * c->cap : 16;
        if (c->cap > max_hits) c->cap = max_hits;
        TraceHit *nh = realloc(c->hits, c->cap * sizeof(TraceHit));
        if (!nh) moet_die("trace: out of memory");
        c->hits = nh;
    }
    c->hits[c->n++] = (TraceHit){.file = c->file, .pattern = pattern, .offset = offset};
}

// Scans the anchor positions [c->lo, c->hi) of one file for every pattern.
static void scan_chunk_(const Trace *t, const Pattern *pats, int n_pats, size_t max_hits,
                        Chunk *c) {
    int itemsize;
    const uint8_t *ids = loader_file_ids(t->L, c->file, &itemsize);
    const uint64_t n_tok = loader_file_tokens(t->L, c->file);
    uint32_t a[4];
    for (int k = 0; k < 4; k++) a[k] = pats[k < n_pats ? k : 0].anchor;
    for (uint64_t i = c->lo; i < c->hi; i += BLOCK) {
        int n = c->hi - i < BLOCK ? (int)(c->hi - i) : BLOCK;
        int any = itemsize == 2 ? block_has_u16_(ids, i, n, a) : block_has_u32_(ids, i, n, a);
        if (!any) continue;
        for (uint64_t j = i; j < i + (uint64_t)n; j++) {
            uint32_t v = id_at_(ids, itemsize, j);
            for (int k = 0; k < n_pats; k++) {
                const Pattern *P = &pats[k];
                if (v != P->anchor || j < P->at || j - P->at + P->len > n_tok) continue;
                uint64_t s = j - P->at;
                size_t q = 0;
                while (q < P->len && id_at_(ids, itemsize, s + q) == (uint32_t)P->ids[q]) q++;
                if (q == P->len) add_hit_(c, max_hits, k, s);
            }
        }
    }
}

static int cmp_hit_(const void *x, const void *y) {
    const TraceHit *a = x, *b = y;
    if (a->file != b->file) return a->file < b->file ? -1 : 1;
    if (a->offset != b->offset) return a->offset < b->offset ? -1 : 1;
    return (a->pattern > b->pattern) - (a->pattern < b->pattern);
}

int trace_find(const Trace *t, const TraceFindOpts *o, const int32_t *const *pats_in,
               const size_t *lens, int n_pats, TraceHit **hits_out, size_t *n_out,
               TraceFindStats *st, MoetErr *err) {
    *hits_out = NULL;
    *n_out = 0;
    memset(st, 0, sizeof *st);
    if (n_pats < 1 || n_pats > TRACE_MAX_PATTERNS)
        return moet_errf(err, MOET_EUSAGE, "trace: 1 to %d patterns, not %d", TRACE_MAX_PATTERNS,
                         n_pats);
    Pattern pats[TRACE_MAX_PATTERNS];
    for (int k = 0; k < n_pats; k++) {
        if (lens[k] < 1) return moet_errf(err, MOET_EUSAGE, "trace: an empty search pattern");
        pats[k] = (Pattern){.ids = pats_in[k], .len = lens[k], .anchor = 0, .at = 0};
        for (size_t q = 0; q < lens[k]; q++) {
            if (pats_in[k][q] < 0)
                return moet_errf(err, MOET_EUSAGE, "trace: negative token id in a pattern");
            if ((uint32_t)pats_in[k][q] > pats[k].anchor) {
                pats[k].anchor = (uint32_t)pats_in[k][q];
                pats[k].at = q;
            }
        }
    }
    const uint64_t chunk = o->chunk_tokens ? o->chunk_tokens : (uint64_t)4 << 20;
    const int nf = loader_num_files(t->L);
    size_t n_chunks = 0;
    for (int f = 0; f < nf; f++)
        n_chunks += (size_t)((loader_file_tokens(t->L, f) + chunk - 1) / chunk);
    Chunk *chunks = calloc(n_chunks ? n_chunks : 1, sizeof(Chunk));
    if (!chunks) moet_die("trace: out of memory");
    size_t c = 0;
    for (int f = 0; f < nf; f++) {
        uint64_t n = loader_file_tokens(t->L, f);
        for (uint64_t lo = 0; lo < n; lo += chunk, c++) {
            chunks[c].file = f;
            chunks[c].lo = lo;
            chunks[c].hi = n - lo < chunk ? n : lo + chunk;
        }
    }
    const size_t max_hits = o->max_hits;
    double t0 = moet_time();
#pragma omp parallel for schedule(dynamic, 1)
    for (size_t i = 0; i < n_chunks; i++) scan_chunk_(t, pats, n_pats, max_hits, &chunks[i]);
    st->seconds = moet_time() - t0;
    st->threads = omp_get_max_threads();
    st->tokens = loader_num_tokens(t->L);

    size_t kept = 0;
    for (size_t i = 0; i < n_chunks; i++) {
        st->hits += chunks[i].count;
        kept += chunks[i].n;
    }
    TraceHit *all = malloc((kept ? kept : 1) * sizeof(TraceHit));
    if (!all) moet_die("trace: out of memory");
    size_t k = 0;
    for (size_t i = 0; i < n_chunks; i++) {
        if (chunks[i].n) memcpy(all + k, chunks[i].hits, chunks[i].n * sizeof(TraceHit));
        k += chunks[i].n;
        free(chunks[i].hits);
    }
    free(chunks);
    qsort(all, kept, sizeof(TraceHit), cmp_hit_);
    *hits_out = all;
    *n_out = kept < max_hits ? kept : max_hits;
    return MOET_OK;
}
