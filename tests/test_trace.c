// test_trace: training-data provenance (data/trace.h). Shards whose ids name their own place
// (id = file * 5000 + token offset) and .csv.gz document rows prove: the sequences trace_step
// reports for every step are what loader_next gives each rank, at world 1 and 2, into the next
// epoch; over an epoch every instance appears once (the rest are the dropped ones, for which
// trace_instance_step says 0); the documents reported cover each sequence exactly; the
// inverse of the order (loader_index_of) undoes loader_locate; trace_find equals a naive search
// (uint16 and uint32 ids, chunk boundaries, two patterns, --max-hits); metadata errors.
#include "data/trace.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <zlib.h>

#include "tests/testutil.h"

static char tmpdir[] = "/tmp/moet-test-trace-XXXXXX";

// Data set A: three uint16 files (vocab 50304), seq_len 16, tails of 3, 0 and 9 tokens: 27 + 20
// + 12 = 59 instances; global batch 8: 7 batches an epoch, 3 instances dropped each epoch.
#define A_T     16
#define A_VOCAB 50304
#define A_FILES 3
static const int a_len[A_FILES] = {435, 320, 201};
#define A_INST 59
static char a_glob[600];

// Document rows of file f of A: boundaries at the multiples of doc_step[f] plus the file end.
static const int doc_step[A_FILES] = {23, 7, 64};

#define ASSERT_MSG_HAS(msg, sub)                                                                   \
    do {                                                                                           \
        int ok_ = strstr((msg), (sub)) != NULL;                                                    \
        if (!ok_) fprintf(stderr, "\n  message: %s\n  lacks:   %s\n", (msg), (sub));               \
        CU_ASSERT(ok_);                                                                            \
    } while (0)

// ---- writing shards ----

static void path_(char *out, size_t cap, const char *name) {
    snprintf(out, cap, "%s/%s", tmpdir, name);
}

static void write_ids_(const char *name, int itemsize, const uint32_t *ids, int n) {
    char path[700];
    path_(path, sizeof path, name);
    FILE *f = fopen(path, "wb");
    if (!f) {
        perror(path);
        exit(1);
    }
    for (int i = 0; i < n; i++) {
        uint8_t b[4] = {(uint8_t)ids[i], (uint8_t)(ids[i] >> 8), (uint8_t)(ids[i] >> 16),
                        (uint8_t)(ids[i] >> 24)};
        fwrite(b, 1, (size_t)itemsize, f);
    }
    fclose(f);
}

// Writes text as NAME (gzip).
static void write_gz_(const char *name, const char *text) {
    char path[700];
    path_(path, sizeof path, name);
    gzFile g = gzopen(path, "wb");
    if (!g) {
        perror(path);
        exit(1);
    }
    gzputs(g, text);
    gzclose(g);
}

// The document rows of file f of A, as moet tokenize writes them; document 1 of each file has
// an id that needs quoting (a comma, a quote, a line break).
static void a_csv_(int f, char *out, size_t cap) {
    size_t n = 0;
    int k = 0;
    for (int s = 0; s < a_len[f]; s += doc_step[f], k++) {
        int e = s + doc_step[f] < a_len[f] ? s + doc_step[f] : a_len[f];
        if (k == 1)
            n += (size_t)snprintf(out + n, cap - n,
                                  "%d,%d,\"f%d, \"\"quoted\"\"\nd%d\",src%d.jsonl,%d\n", s, e, f, k,
                                  f, k + 1);
        else
            n += (size_t)snprintf(out + n, cap - n, "%d,%d,f%d-d%d,src%d.jsonl,%d\n", s, e, f, k, f,
                                  k + 1);
    }
}

static void make_shards_(void) {
    if (!mkdtemp(tmpdir)) {
        perror("mkdtemp");
        exit(1);
    }
    static char csv[1 << 16];
    uint32_t ids[1000];
    for (int f = 0; f < A_FILES; f++) {
        for (int i = 0; i < a_len[f]; i++) ids[i] = 5000u * (uint32_t)f + (uint32_t)i;
        char name[32];
        snprintf(name, sizeof name, "a%d.npy", f);
        write_ids_(name, 2, ids, a_len[f]);
        a_csv_(f, csv, sizeof csv);
        snprintf(name, sizeof name, "a%d.csv.gz", f);
        write_gz_(name, csv);
    }
    snprintf(a_glob, sizeof a_glob, "%s/a*.npy", tmpdir);
}

static LoaderConfig a_config_(int mb, int G, int rank, int world) {
    LoaderConfig c = {.glob = a_glob,
                      .seq_len = A_T,
                      .vocab_size = A_VOCAB,
                      .seed = 77,
                      .shuffle = 1,
                      .micro_batch = mb,
                      .global_batch = G,
                      .rank = rank,
                      .world = world,
                      .prefetch = 2};
    return c;
}

static Trace *open_trace_(const LoaderConfig *c) {
    Trace *t = NULL;
    MoetErr err = {{0}};
    int rc = trace_open(&t, c, &err);
    if (rc) fprintf(stderr, "\n  trace_open: %s\n", err.msg);
    CU_ASSERT_FATAL(rc == 0 && t != NULL);
    return t;
}

// ---- steps against the loaders ----

// Checks the documents trace reports for tokens [lo, hi) of file f against A's rows: they tile
// the range (each the next one, the first starting at or before lo, the last ending at or after
// hi) and are exactly the rows that overlap it.
static void check_docs_(Trace *t, int f, uint64_t lo, uint64_t hi) {
    const TraceDoc *d;
    size_t n;
    MoetErr err = {{0}};
    int rc = trace_docs(t, f, lo, hi, &d, &n, &err);
    if (rc) fprintf(stderr, "\n  trace_docs: %s\n", err.msg);
    CU_ASSERT_FATAL(rc == 0);
    uint64_t want_first = lo / (uint64_t)doc_step[f] * (uint64_t)doc_step[f];
    uint64_t want_n = (hi - 1) / (uint64_t)doc_step[f] - lo / (uint64_t)doc_step[f] + 1;
    CU_ASSERT_EQUAL_FATAL(n, want_n);
    CU_ASSERT_EQUAL(d[0].start, want_first);
    CU_ASSERT(d[n - 1].end >= hi);
    for (size_t k = 0; k < n; k++) {
        int idx = (int)(d[k].start / (uint64_t)doc_step[f]);
        char want_id[64];
        if (idx == 1)
            snprintf(want_id, sizeof want_id, "f%d, \"quoted\"\nd1", f);
        else
            snprintf(want_id, sizeof want_id, "f%d-d%d", f, idx);
        CU_ASSERT_STRING_EQUAL(d[k].id, want_id);
        CU_ASSERT_EQUAL(d[k].loc, idx + 1);
        if (k) CU_ASSERT_EQUAL(d[k].start, d[k - 1].end);
    }
}

// Runs one epoch and 3 steps of the next through `world` loaders (rank order within each
// accumulation step, as ARCHITECTURE §4) and checks every micro-batch row against the sequence
// trace_step names for its slot; over epoch 0, every instance at most once, exactly B*G of them,
// and trace_instance_step gives back each one's step (0 for the dropped ones).
static void check_world_(int world, int mb, int G) {
    LoaderConfig c0 = a_config_(mb, G, 0, world);
    Trace *t = open_trace_(&c0);
    Loader *L[4];
    for (int r = 0; r < world; r++) {
        LoaderConfig c = a_config_(mb, G, r, world);
        MoetErr err = {{0}};
        CU_ASSERT_FATAL(loader_open(&L[r], &c, &err) == 0);
    }
    const int accum = G / (mb * world);
    const uint64_t B = loader_batches_per_epoch(L[0]);
    CU_ASSERT_EQUAL(B, (uint64_t)(A_INST / G));
    int32_t *tok = malloc((size_t)mb * A_T * sizeof(int32_t));
    TraceSeq *seqs = malloc((size_t)G * sizeof(TraceSeq));
    int64_t seen_step[A_FILES][64];
    memset(seen_step, 0, sizeof seen_step);
    int n_seen = 0, bad = 0;
    for (int64_t step = 1; step <= (int64_t)B + 3; step++) {
        uint64_t epoch, batch;
        trace_step(t, step, seqs, &epoch, &batch);
        CU_ASSERT_EQUAL(epoch, (uint64_t)(step - 1) / B);
        CU_ASSERT_EQUAL(batch, (uint64_t)(step - 1) % B);
        for (int a = 0; a < accum; a++)
            for (int r = 0; r < world; r++) {
                MoetErr err = {{0}};
                CU_ASSERT_FATAL(loader_next(L[r], tok, &err) == 0);
                for (int s = 0; s < mb; s++) {
                    const TraceSeq *q = &seqs[(a * world + r) * mb + s];
                    const int32_t *row = tok + (size_t)s * A_T;
                    for (int i = 0; i < A_T; i++)
                        bad += row[i] !=
                               (int32_t)(5000u * (uint32_t)q->file + q->offset + (uint64_t)i);
                }
            }
        for (int j = 0; j < G; j++) {
            const TraceSeq *q = &seqs[j];
            CU_ASSERT_EQUAL(q->position, batch * (uint64_t)G + (uint64_t)j);
            check_docs_(t, q->file, q->offset, q->offset + A_T);
            if (epoch == 0) {
                CU_ASSERT_EQUAL(seen_step[q->file][q->offset / A_T], 0);
                seen_step[q->file][q->offset / A_T] = step;
                n_seen++;
            }
            CU_ASSERT_EQUAL(trace_instance_step(t, epoch, q->file, q->offset), step);
        }
    }
    CU_ASSERT_EQUAL(bad, 0);
    CU_ASSERT_EQUAL(n_seen, (int)B * G);
    int dropped = 0;
    for (int f = 0; f < A_FILES; f++)
        for (int k = 0; k < a_len[f] / A_T; k++) {
            int64_t s = trace_instance_step(t, 0, f, (uint64_t)k * A_T);
            CU_ASSERT_EQUAL(s, seen_step[f][k]);
            dropped += s == 0;
        }
    CU_ASSERT_EQUAL(dropped, A_INST - (int)B * G);
    free(tok);
    free(seqs);
    for (int r = 0; r < world; r++) loader_close(L[r]);
    trace_close(t);
}

static void test_steps_are_the_loaders_batches_world1(void) {
    check_world_(1, 2, 8);
    check_world_(1, 8, 8);
}

static void test_steps_are_the_loaders_batches_world2(void) {
    check_world_(2, 2, 8);
    check_world_(2, 4, 8);
    check_world_(2, 1, 6); // 9 batches of 6: 5 instances dropped each epoch
}

// loader_index_of inverts loader_locate for every position of several epochs and data sizes
// (n not a power of 4: the cycle walking runs both ways).
static void test_index_of_inverts_locate(void) {
    for (int G = 1; G <= 8; G += 7) {
        LoaderConfig c = a_config_(1, G, 0, 1);
        c.prefetch = 0;
        Loader *L;
        MoetErr err = {{0}};
        CU_ASSERT_FATAL(loader_open(&L, &c, &err) == 0);
        int bad = 0;
        for (uint64_t e = 0; e < 5; e++)
            for (uint64_t p = 0; p < A_INST; p++) {
                int f;
                uint64_t off;
                loader_locate(L, e, p, &f, &off);
                bad += loader_index_of(L, e, f, off) != p;
            }
        CU_ASSERT_EQUAL(bad, 0);
        loader_close(L);
    }
}

// ---- search ----

// Naive search: every (file, offset, pattern) where the pattern's ids follow, in order.
static size_t naive_(uint32_t *const *files, const int *lens, int nf, const int32_t *const *pats,
                     const size_t *plens, int np, TraceHit *out) {
    size_t n = 0;
    for (int f = 0; f < nf; f++)
        for (int i = 0; i < lens[f]; i++)
            for (int k = 0; k < np; k++) {
                if ((size_t)i + plens[k] > (size_t)lens[f]) continue;
                size_t q = 0;
                while (q < plens[k] && files[f][i + (int)q] == (uint32_t)pats[k][q]) q++;
                if (q == plens[k])
                    out[n++] = (TraceHit){.file = f, .pattern = k, .offset = (uint64_t)i};
            }
    return n;
}

// Random ids from a small alphabet (many matches), some above 65535 for the uint32 set; every
// chunk size from 1 token up, every max_hits.
static void check_find_(int itemsize, uint32_t base) {
    enum { NF = 3 };
    const int lens[NF] = {1200, 35, 777};
    uint32_t *ids[NF];
    uint64_t rng = 5 + (uint64_t)itemsize;
    char name[32];
    for (int f = 0; f < NF; f++) {
        ids[f] = malloc((size_t)lens[f] * sizeof(uint32_t));
        for (int i = 0; i < lens[f]; i++) ids[f][i] = base + (uint32_t)(tu_rand_u64(&rng) % 4);
        snprintf(name, sizeof name, "s%d-%d.bin", itemsize, f);
        write_ids_(name, itemsize, ids[f], lens[f]);
    }
    char glob[700];
    snprintf(glob, sizeof glob, "%s/s%d-*.bin", tmpdir, itemsize);
    LoaderConfig c = {.glob = glob,
                      .seq_len = 8,
                      .vocab_size = itemsize == 2 ? 1000 : 100000,
                      .seed = 1,
                      .shuffle = 1,
                      .micro_batch = 1,
                      .global_batch = 1,
                      .rank = 0,
                      .world = 1};
    Trace *t = open_trace_(&c);
    const int32_t p0[] = {(int32_t)base + 1, (int32_t)base + 2, (int32_t)base + 3};
    const int32_t p1[] = {(int32_t)base + 3, (int32_t)base};
    const int32_t p2[] = {(int32_t)base + 2};
    const int32_t p3[] = {(int32_t)base, (int32_t)base + 9}; // absent
    const int32_t *pats[] = {p0, p1, p2, p3};
    const size_t plens[] = {3, 2, 1, 2};
    TraceHit *want = malloc(4 * 2100 * sizeof(TraceHit));
    for (int np = 1; np <= 4; np++) {
        size_t n_want = naive_(ids, lens, NF, pats, plens, np, want);
        const uint64_t chunks[] = {1, 7, 64, 1000, 0};
        for (int ci = 0; ci < 5; ci++) {
            const size_t maxes[] = {0, 1, 5, 100000};
            for (int mi = 0; mi < 4; mi++) {
                TraceFindOpts o = {.max_hits = maxes[mi], .chunk_tokens = chunks[ci]};
                TraceHit *got;
                size_t n_got;
                TraceFindStats st;
                MoetErr err = {{0}};
                CU_ASSERT_FATAL(trace_find(t, &o, pats, plens, np, &got, &n_got, &st, &err) == 0);
                CU_ASSERT_EQUAL(st.hits, n_want);
                CU_ASSERT_EQUAL(st.tokens, (uint64_t)(lens[0] + lens[1] + lens[2]));
                size_t n_exp = n_want < maxes[mi] ? n_want : maxes[mi];
                CU_ASSERT_EQUAL(n_got, n_exp);
                int diff = 0;
                for (size_t h = 0; h < n_got && h < n_exp; h++)
                    diff += got[h].file != want[h].file || got[h].offset != want[h].offset ||
                            got[h].pattern != want[h].pattern;
                CU_ASSERT_EQUAL(diff, 0);
                free(got);
            }
        }
    }
    free(want);
    for (int f = 0; f < NF; f++) free(ids[f]);
    trace_close(t);
}

static void test_find_equals_naive_search(void) {
    check_find_(2, 100);
    check_find_(4, 70000);
}

// ---- metadata ----

static void test_metadata(void) {
    uint32_t ids[40];
    for (int i = 0; i < 40; i++) ids[i] = (uint32_t)i;
    write_ids_("m0.npy", 2, ids, 40);
    write_ids_("m1.npy", 2, ids, 40);
    write_ids_("m2.npy", 2, ids, 40);
    write_ids_("m3.npy", 2, ids, 40);
    write_gz_("m0.csv.gz", "0,10,x,s,1\n10,40,y,s,2\n"); // good
    write_gz_("m1.csv.gz", "0,10,x,s,1\n10,39,y,s,2\n"); // ends before the shard does
    write_gz_("m2.csv.gz", "0,10,x,s,1\n5,40,y,s,2\n");  // overlapping rows
    // m3: no metadata
    char glob[700];
    snprintf(glob, sizeof glob, "%s/m*.npy", tmpdir);
    LoaderConfig c = {.glob = glob,
                      .seq_len = 8,
                      .vocab_size = 1000,
                      .seed = 1,
                      .shuffle = 1,
                      .micro_batch = 1,
                      .global_batch = 1,
                      .rank = 0,
                      .world = 1};
    Trace *t = open_trace_(&c);
    const TraceDoc *d;
    size_t n;
    MoetErr err = {{0}};
    CU_ASSERT(trace_docs(t, 0, 8, 12, &d, &n, &err) == 0);
    CU_ASSERT_EQUAL_FATAL(n, 2);
    CU_ASSERT_STRING_EQUAL(d[0].id, "x");
    CU_ASSERT_STRING_EQUAL(d[1].id, "y");
    CU_ASSERT(trace_docs(t, 0, 10, 11, &d, &n, &err) == 0 && n == 1 && d[0].start == 10);
    CU_ASSERT_FALSE(trace_docs_missing(t, 0));

    CU_ASSERT_EQUAL(trace_docs(t, 1, 0, 8, &d, &n, &err), MOET_EFAIL);
    ASSERT_MSG_HAS(err.msg, "m1.csv.gz");
    ASSERT_MSG_HAS(err.msg, "end at token 39");
    CU_ASSERT_EQUAL(trace_docs(t, 2, 0, 8, &d, &n, &err), MOET_EFAIL);
    ASSERT_MSG_HAS(err.msg, "m2.csv.gz: row 2");
    CU_ASSERT(trace_docs(t, 3, 0, 8, &d, &n, &err) == 0 && n == 0);
    CU_ASSERT_TRUE(trace_docs_missing(t, 3));
    ASSERT_MSG_HAS(trace_docs_path(t, 3), "m3.csv.gz");
    trace_close(t);
}

int main(void) {
    make_shards_();
    static const TuTest tests[] = {
        {"steps = the loader's global batches, world 1", test_steps_are_the_loaders_batches_world1},
        {"steps = the loader's global batches, world 2", test_steps_are_the_loaders_batches_world2},
        {"loader_index_of inverts loader_locate", test_index_of_inverts_locate},
        {"trace_find = a naive search (uint16, uint32)", test_find_equals_naive_search},
        {"document rows: quoting, lookup, errors, missing", test_metadata},
    };
    int rc = tu_run("trace", tests, (int)(sizeof tests / sizeof tests[0]));
    tu_remove_dir(tmpdir);
    return rc;
}
