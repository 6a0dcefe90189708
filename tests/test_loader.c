// test_loader: the streaming data loader (ARCHITECTURE §4, §5). Shards with known content (token
// = tag + file * 5000 + position, so every instance names itself) prove: each instance once per
// epoch, the same global batches for any world size, exact resume (also at another world size),
// epoch rollover, read-ahead that changes nothing, loader_locate, and every error case.
#include "data/loader.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "tests/testutil.h"

static char tmpdir[] = "/tmp/moet-test-loader-XXXXXX";

// Data set A: uint16 (vocab 50304), seq_len 16, raw files plus one real .npy, unequal lengths
// with tails, one file too short for any instance. Sorted glob order = the index below.
#define A_T     16
#define A_VOCAB 50304
static const char *a_names[] = {"a0.bin", "a1.bin", "a2.bin", "a3.npy", "a4.bin"};
static const int a_len[] = {1000, 517, 10, 777, 333}; // 62 + 32 + 0 + 48 + 20 = 162 instances
#define A_FILES 5
#define A_INST  162
static char a_glob[600];

// Data set B: uint32 (vocab 100000), seq_len 10: a raw file and a '<u4' .npy (format 2.0).
#define B_T     10
#define B_VOCAB 100000
#define B_TAG   70000 // ids above 65535 prove 32-bit reads
static const char *b_names[] = {"b0.bin", "b1.npy"};
static const int b_len[] = {300, 253}; // 30 + 25 = 55 instances
#define B_FILES 2
#define B_INST  55
static char b_glob[600];

static int contains_(const char *msg, const char *sub) {
    return strstr(msg, sub) != NULL;
}

#define ASSERT_MSG_HAS(msg, sub)                                                                   \
    do {                                                                                           \
        int ok_ = contains_((msg), (sub));                                                         \
        if (!ok_) fprintf(stderr, "\n  message: %s\n  lacks:   %s\n", (msg), (sub));               \
        CU_ASSERT(ok_);                                                                            \
    } while (0)

// ---- writing shards ----

static void path_(char *out, size_t cap, const char *name) {
    snprintf(out, cap, "%s/%s", tmpdir, name);
}

static void write_bytes_(const char *name, const void *data, size_t n) {
    char path[600];
    path_(path, sizeof path, name);
    FILE *f = fopen(path, "wb");
    if (!f || fwrite(data, 1, n, f) != n) {
        fprintf(stderr, "cannot write %s\n", path);
        exit(1);
    }
    fclose(f);
}

// A NumPy .npy header: version `major`, the dict text padded with spaces so that the data starts
// at a multiple of 64, ending in '\n'. Returns its length.
static size_t npy_header_(uint8_t *out, int major, const char *dict) {
    size_t pre = major == 1 ? 10 : 12, n = strlen(dict);
    size_t total = (pre + n + 1 + 63) / 64 * 64, hlen = total - pre;
    memcpy(out, "\x93NUMPY", 6);
    out[6] = (uint8_t)major;
    out[7] = 0;
    for (size_t i = 0; i < (major == 1 ? 2u : 4u); i++) out[8 + i] = (uint8_t)(hlen >> (8 * i));
    memset(out + pre, ' ', hlen);
    memcpy(out + pre, dict, n);
    out[total - 1] = '\n';
    return total;
}

// Writes ids value(i) = base + i for i < n, as itemsize-byte ids, after an optional header.
static void write_ids_(const char *name, int itemsize, uint32_t base, int n, const uint8_t *hdr,
                       size_t hdr_len) {
    size_t bytes = hdr_len + (size_t)n * (size_t)itemsize;
    uint8_t *buf = malloc(bytes);
    if (hdr_len) memcpy(buf, hdr, hdr_len);
    for (int i = 0; i < n; i++) {
        uint32_t v = base + (uint32_t)i;
        if (itemsize == 2) {
            uint16_t w = (uint16_t)v;
            memcpy(buf + hdr_len + 2 * (size_t)i, &w, 2);
        } else {
            memcpy(buf + hdr_len + 4 * (size_t)i, &v, 4);
        }
    }
    write_bytes_(name, buf, bytes);
    free(buf);
}

static void write_npy_(const char *name, int major, const char *descr, int itemsize, uint32_t base,
                       int n) {
    char dict[256];
    snprintf(dict, sizeof dict, "{'descr': '%s', 'fortran_order': False, 'shape': (%d,), }", descr,
             n);
    uint8_t hdr[256];
    size_t hl = npy_header_(hdr, major, dict);
    write_ids_(name, itemsize, base, n, hdr, hl);
}

static void make_shards_(void) {
    if (!mkdtemp(tmpdir)) {
        perror("mkdtemp");
        exit(1);
    }
    for (int f = 0; f < A_FILES; f++) {
        if (strstr(a_names[f], ".npy"))
            write_npy_(a_names[f], 1, "<u2", 2, 5000u * f, a_len[f]);
        else
            write_ids_(a_names[f], 2, 5000u * (uint32_t)f, a_len[f], NULL, 0);
    }
    write_ids_(b_names[0], 4, B_TAG, b_len[0], NULL, 0);
    write_npy_(b_names[1], 2, "<u4", 4, B_TAG + 5000u, b_len[1]);
    snprintf(a_glob, sizeof a_glob, "%s/a*", tmpdir);
    snprintf(b_glob, sizeof b_glob, "%s/b*", tmpdir);
}

// ---- reading ----

typedef struct {
    const char *glob;
    int T, vocab, n_files;
    const int *len;
    uint32_t tag;
} DataSet;

static const DataSet A = {a_glob, A_T, A_VOCAB, A_FILES, a_len, 0};
static const DataSet B = {b_glob, B_T, B_VOCAB, B_FILES, b_len, B_TAG};

static LoaderConfig config_(const DataSet *ds, int mb, int G, int rank, int world, int prefetch) {
    LoaderConfig c = {.glob = ds->glob,
                      .seq_len = ds->T,
                      .vocab_size = ds->vocab,
                      .seed = 1234,
                      .shuffle = 1,
                      .micro_batch = mb,
                      .global_batch = G,
                      .rank = rank,
                      .world = world,
                      .prefetch = prefetch};
    return c;
}

static Loader *open_(const LoaderConfig *c) {
    Loader *L = NULL;
    MoetErr err = {{0}};
    int rc = loader_open(&L, c, &err);
    if (rc) fprintf(stderr, "\n  loader_open: %s\n", err.msg);
    CU_ASSERT_FATAL(rc == 0 && L != NULL);
    return L;
}

static void next_(Loader *L, int32_t *tokens) {
    MoetErr err = {{0}};
    int rc = loader_next(L, tokens, &err);
    if (rc) fprintf(stderr, "\n  loader_next: %s\n", err.msg);
    CU_ASSERT_FATAL(rc == 0);
}

// The instance id whose tokens `x` (T ids) are, or -1 when they are not one whole instance of one
// file (a crossed file boundary, a tail, a wrong id).
static long instance_of_(const DataSet *ds, const int32_t *x) {
    long v0 = (long)x[0] - (long)ds->tag;
    if (v0 < 0) return -1;
    long f = v0 / 5000, t = v0 % 5000;
    if (f >= ds->n_files || t % ds->T != 0 || t + ds->T > ds->len[f]) return -1;
    for (int i = 1; i < ds->T; i++)
        if (x[i] != x[0] + i) return -1;
    long id = t / ds->T;
    for (long g = 0; g < f; g++) id += ds->len[g] / ds->T;
    return id;
}

// Reads `steps` global batches from `world` loaders (one per rank) in §4 order: for each
// accumulation step, rank 0's micro-batch, rank 1's, ... Returns (steps, G, T) tokens.
static int32_t *read_global_(const DataSet *ds, int mb, int G, int world, int prefetch, int steps) {
    Loader *L[8];
    for (int r = 0; r < world; r++) {
        LoaderConfig c = config_(ds, mb, G, r, world, prefetch);
        L[r] = open_(&c);
    }
    size_t mbn = (size_t)mb * (size_t)ds->T;
    int32_t *out = malloc((size_t)steps * (size_t)G * (size_t)ds->T * sizeof(int32_t));
    int32_t *w = out;
    int accum = G / (mb * world);
    for (int s = 0; s < steps; s++)
        for (int a = 0; a < accum; a++)
            for (int r = 0; r < world; r++, w += mbn) next_(L[r], w);
    for (int r = 0; r < world; r++) loader_close(L[r]);
    return out;
}

// ---- tests ----

static void check_epoch_coverage_(const DataSet *ds, int n_inst, int mb, int G) {
    LoaderConfig c = config_(ds, mb, G, 0, 1, 2);
    Loader *L = open_(&c);
    CU_ASSERT_EQUAL(loader_num_instances(L), (uint64_t)n_inst);
    CU_ASSERT_EQUAL(loader_num_files(L), ds->n_files);
    CU_ASSERT_EQUAL(loader_batches_per_epoch(L), (uint64_t)(n_inst / G));
    uint64_t tokens = 0;
    for (int f = 0; f < ds->n_files; f++) tokens += (uint64_t)ds->len[f];
    CU_ASSERT_EQUAL(loader_num_tokens(L), tokens);

    int *seen = calloc((size_t)n_inst, sizeof(int));
    int32_t *x = malloc((size_t)mb * (size_t)ds->T * sizeof(int32_t));
    int calls = n_inst / G * (G / mb), bad = 0, moved = 0;
    for (int k = 0; k < calls; k++) {
        next_(L, x);
        for (int s = 0; s < mb; s++) {
            long id = instance_of_(ds, x + (size_t)s * (size_t)ds->T);
            if (id < 0)
                bad++;
            else
                seen[id]++;
            if (id != k * mb + s) moved++;
        }
    }
    CU_ASSERT_EQUAL(bad, 0);
    int once = 0, twice = 0;
    for (int i = 0; i < n_inst; i++) once += seen[i] == 1, twice += seen[i] > 1;
    CU_ASSERT_EQUAL(once, n_inst / G * G);
    CU_ASSERT_EQUAL(twice, 0);
    CU_ASSERT(moved > calls * mb / 2); // shuffled, not file order
    // The permutation is a bijection, and the dropped tail is what was not seen.
    memset(seen, 0, (size_t)n_inst * sizeof(int));
    for (int p = 0; p < n_inst; p++) {
        int f;
        uint64_t off;
        loader_locate(L, 0, (uint64_t)p, &f, &off);
        long id = off / (uint64_t)ds->T;
        for (int g = 0; g < f; g++) id += ds->len[g] / ds->T;
        seen[id]++;
    }
    once = 0;
    for (int i = 0; i < n_inst; i++) once += seen[i] == 1;
    CU_ASSERT_EQUAL(once, n_inst);
    free(seen);
    free(x);
    loader_close(L);
}

static void test_epoch_covers_every_instance(void) {
    check_epoch_coverage_(&A, A_INST, 2, 8);
    check_epoch_coverage_(&A, A_INST, 3, 3); // n % G == 0: nothing dropped
    check_epoch_coverage_(&B, B_INST, 1, 5); // uint32 ids, '<u4' .npy
}

static void test_world_sizes_same_global_batches(void) {
    int steps = 30; // 20 per epoch: crosses into epoch 1
    size_t n = (size_t)steps * 8 * A_T;
    int32_t *ref = read_global_(&A, 2, 8, 1, 0, steps);
    int cases[][3] = {{2, 2, 2}, {2, 4, 0}, {1, 2, 3}, {1, 4, 1}, {4, 2, 0}, {8, 1, 2}};
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        int32_t *got = read_global_(&A, cases[i][0], 8, cases[i][1], cases[i][2], steps);
        int same = memcmp(got, ref, n * sizeof(int32_t)) == 0;
        if (!same)
            fprintf(stderr, "\n  micro_batch %d world %d: global batches differ from world 1\n",
                    cases[i][0], cases[i][1]);
        CU_ASSERT(same);
        free(got);
    }
    free(ref);
}

static void test_world2_accum1_is_world1_accum2(void) {
    LoaderConfig c1 = config_(&A, 2, 4, 0, 1, 0);
    Loader *one = open_(&c1), *two[2];
    for (int r = 0; r < 2; r++) {
        LoaderConfig c = config_(&A, 2, 4, r, 2, 1);
        two[r] = open_(&c);
    }
    int32_t x[2 * A_T], y[2 * A_T];
    int differ = 0;
    for (int step = 0; step < 50; step++) // 40 steps per epoch
        for (int r = 0; r < 2; r++) {     // accumulation step r of world 1 = rank r
            next_(one, x);
            next_(two[r], y);
            differ += memcmp(x, y, sizeof x) != 0;
        }
    CU_ASSERT_EQUAL(differ, 0);
    loader_close(one);
    loader_close(two[0]);
    loader_close(two[1]);
}

static void test_resume_continues_exactly(void) {
    int steps = 27, G = 8, mb = 2;
    size_t per_step = (size_t)G * A_T;
    int32_t *ref = read_global_(&A, mb, G, 1, 0, steps);
    int stops[] = {7, 20, 19}; // mid-epoch, exactly at the epoch end, just before it
    int worlds[] = {2, 4, 1};
    for (int i = 0; i < 3; i++) {
        int k = stops[i];
        LoaderConfig c = config_(&A, mb, G, 0, 1, 3);
        Loader *L = open_(&c);
        int32_t x[2 * A_T];
        for (int s = 0; s < k * 4 + 1; s++) next_(L, x); // k steps and one micro-batch more
        LoaderPos pos;
        loader_get_pos(L, &pos);
        CU_ASSERT_EQUAL(pos.seed, 1234);
        CU_ASSERT_EQUAL(pos.epoch, (uint64_t)(k / 20));
        CU_ASSERT_EQUAL(pos.consumed, (uint64_t)(k % 20) * (uint64_t)G);
        CU_ASSERT_STRING_EQUAL(pos.fingerprint, loader_fingerprint(L));
        loader_close(L);

        // Resume on another world size and compare the global batches that follow.
        int world = worlds[i];
        Loader *R[4];
        for (int r = 0; r < world; r++) {
            LoaderConfig cr = config_(&A, mb, G, r, world, r % 2 ? 0 : 2);
            R[r] = open_(&cr);
            MoetErr err = {{0}};
            int rc = loader_set_pos(R[r], &pos, 0, &err);
            if (rc) fprintf(stderr, "\n  loader_set_pos: %s\n", err.msg);
            CU_ASSERT_FATAL(rc == 0);
        }
        int32_t *got = malloc(per_step * sizeof(int32_t));
        int differ = 0;
        for (int s = k; s < steps; s++) {
            int32_t *w = got;
            for (int a = 0; a < G / (mb * world); a++)
                for (int r = 0; r < world; r++, w += (size_t)mb * A_T) next_(R[r], w);
            differ += memcmp(got, ref + (size_t)s * per_step, per_step * sizeof(int32_t)) != 0;
        }
        if (differ)
            fprintf(stderr, "\n  resume after %d steps at world %d: %d steps differ\n", k, world,
                    differ);
        CU_ASSERT_EQUAL(differ, 0);
        free(got);
        for (int r = 0; r < world; r++) loader_close(R[r]);
    }
    free(ref);
}

static void test_set_pos_mid_stream_restarts_batch(void) {
    // set_pos on a loader that is partway through a batch with a full read-ahead ring.
    LoaderConfig c = config_(&A, 2, 8, 0, 1, 4);
    Loader *L = open_(&c), *M = open_(&c);
    int32_t x[2 * A_T], y[2 * A_T];
    for (int s = 0; s < 13; s++) next_(L, x);
    LoaderPos pos;
    loader_get_pos(L, &pos);
    CU_ASSERT_EQUAL(pos.consumed, 24); // 13 micro-batches = 3 steps + 1
    for (int s = 0; s < 3; s++) next_(L, x);
    MoetErr err;
    CU_ASSERT_EQUAL(loader_set_pos(L, &pos, 0, &err), 0);
    for (int s = 0; s < 12; s++) next_(M, y);
    int differ = 0;
    for (int s = 0; s < 30; s++) {
        next_(L, x);
        next_(M, y);
        differ += memcmp(x, y, sizeof x) != 0;
    }
    CU_ASSERT_EQUAL(differ, 0);
    loader_close(L);
    loader_close(M);
}

static void test_epoch_rollover(void) {
    int G = 8, mb = 4, per_epoch = A_INST / G;
    LoaderConfig c = config_(&A, mb, G, 0, 1, 3);
    Loader *L = open_(&c);
    long order[3][A_INST];
    int32_t x[4 * A_T];
    for (int e = 0; e < 3; e++) {
        int seen[A_INST] = {0}, bad = 0, n = 0;
        for (int s = 0; s < per_epoch * (G / mb); s++) {
            next_(L, x);
            for (int i = 0; i < mb; i++) {
                long id = instance_of_(&A, x + i * A_T);
                if (id < 0)
                    bad++;
                else
                    seen[id]++;
                order[e][n++] = id;
            }
        }
        int once = 0;
        for (int i = 0; i < A_INST; i++) once += seen[i] == 1;
        CU_ASSERT_EQUAL(bad, 0);
        CU_ASSERT_EQUAL(once, per_epoch * G);
        LoaderPos pos;
        loader_get_pos(L, &pos);
        CU_ASSERT_EQUAL(pos.epoch, (uint64_t)e + 1);
        CU_ASSERT_EQUAL(pos.consumed, 0);
    }
    int same01 = 0, same12 = 0;
    for (int i = 0; i < per_epoch * G; i++) {
        same01 += order[0][i] == order[1][i];
        same12 += order[1][i] == order[2][i];
    }
    CU_ASSERT(same01 < 20); // a fresh permutation each epoch (chance: about 1 in 162 each)
    CU_ASSERT(same12 < 20);
    loader_close(L);
}

static void test_prefetch_changes_nothing(void) {
    int steps = 45;
    size_t n = (size_t)steps * 8 * A_T;
    int32_t *p0 = read_global_(&A, 2, 8, 2, 0, steps);
    int32_t *p1 = read_global_(&A, 2, 8, 2, 1, steps);
    int32_t *p4 = read_global_(&A, 2, 8, 2, 4, steps);
    CU_ASSERT(memcmp(p0, p1, n * sizeof(int32_t)) == 0);
    CU_ASSERT(memcmp(p0, p4, n * sizeof(int32_t)) == 0);
    free(p0);
    free(p1);
    free(p4);
}

static void test_locate_matches_data(void) {
    const DataSet *sets[] = {&A, &B};
    for (int d = 0; d < 2; d++) {
        const DataSet *ds = sets[d];
        int mb = 2, G = 8, world = 2, rank = 1, accum = G / (mb * world);
        LoaderConfig c = config_(ds, mb, G, rank, world, 2);
        Loader *L = open_(&c);
        int per_epoch = (int)loader_batches_per_epoch(L), bad = 0;
        int32_t x[2 * 16];
        for (int e = 0; e < 2; e++)
            for (int b = 0; b < per_epoch; b++)
                for (int a = 0; a < accum; a++) {
                    next_(L, x);
                    for (int s = 0; s < mb; s++) {
                        uint64_t p = (uint64_t)(b * G + (a * world + rank) * mb + s), off;
                        int f;
                        loader_locate(L, (uint64_t)e, p, &f, &off);
                        for (int i = 0; i < ds->T; i++)
                            bad += x[s * ds->T + i] !=
                                   (int32_t)(ds->tag + 5000u * (uint32_t)f + off + (uint64_t)i);
                    }
                }
        CU_ASSERT_EQUAL(bad, 0);
        loader_close(L);
    }
}

static void test_no_shuffle_is_file_order(void) {
    LoaderConfig c = config_(&A, 4, 8, 0, 1, 2);
    c.shuffle = 0;
    char glob2[1300]; // two patterns, in the order given
    snprintf(glob2, sizeof glob2, "%s/a3*, %s/a[0124]*", tmpdir, tmpdir);
    c.glob = glob2;
    Loader *L = open_(&c);
    CU_ASSERT_EQUAL(loader_num_files(L), 5);
    CU_ASSERT(contains_(loader_file_name(L, 0), "a3.npy"));
    CU_ASSERT(contains_(loader_file_name(L, 1), "a0.bin"));
    CU_ASSERT(contains_(loader_file_name(L, 4), "a4.bin"));
    // File order a3, a0, a1, a2, a4: instance k of a3 comes first.
    int32_t x[4 * A_T];
    next_(L, x);
    CU_ASSERT_EQUAL(x[0], 3 * 5000);
    CU_ASSERT_EQUAL(x[A_T], 3 * 5000 + A_T);
    for (int s = 1; s < 13; s++) next_(L, x); // instances 48..51: a0's first four
    CU_ASSERT_EQUAL(x[0], 0);
    CU_ASSERT_EQUAL(x[3 * A_T + A_T - 1], 4 * A_T - 1);
    loader_close(L);
}

static void check_bad_id_(int prefetch) {
    // c1.bin: 200 ids of 7, but id 60000 at token offset 123.
    uint16_t ids[200];
    for (int i = 0; i < 200; i++) ids[i] = 7;
    ids[123] = 60000;
    write_bytes_("c0.bin", ids, 64); // 32 clean ids
    write_bytes_("c1.bin", ids, sizeof ids);
    char glob[700];
    snprintf(glob, sizeof glob, "%s/c*.bin", tmpdir);
    DataSet C = {glob, 8, A_VOCAB, 2, NULL, 0};
    LoaderConfig c = config_(&C, 1, 2, 0, 1, prefetch);
    Loader *L = open_(&c);
    int32_t x[8];
    MoetErr err = {{0}};
    int rc = 0, calls = 0;
    while (rc == 0 && calls < 200) rc = loader_next(L, x, &err), calls++;
    CU_ASSERT_EQUAL(rc, MOET_EFAIL);
    ASSERT_MSG_HAS(err.msg, "c1.bin: token id 60000 at token offset 123 >= vocab_size 50304");
    MoetErr again = {{0}}; // the error stays until the position is reset
    CU_ASSERT_EQUAL(loader_next(L, x, &again), MOET_EFAIL);
    ASSERT_MSG_HAS(again.msg, "token offset 123");
    LoaderPos pos;
    loader_get_pos(L, &pos);
    pos.consumed = 0;
    CU_ASSERT_EQUAL(loader_set_pos(L, &pos, 0, &err), 0);
    loader_close(L);
    char p[700];
    path_(p, sizeof p, "c0.bin");
    unlink(p);
    path_(p, sizeof p, "c1.bin");
    unlink(p);
}

static void test_id_out_of_vocab(void) {
    check_bad_id_(0);
    check_bad_id_(4);
}

// Expects loader_open on `glob` to fail with a message containing want1 and want2.
static void expect_open_error_(const char *glob, int vocab, int T, int G, const char *want1,
                               const char *want2) {
    DataSet D = {glob, T, vocab, 1, NULL, 0};
    LoaderConfig c = config_(&D, 1, G, 0, 1, 2);
    Loader *L = NULL;
    MoetErr err = {{0}};
    int rc = loader_open(&L, &c, &err);
    CU_ASSERT(rc != 0);
    CU_ASSERT(L == NULL);
    if (rc == 0) loader_close(L);
    ASSERT_MSG_HAS(err.msg, want1);
    if (want2) ASSERT_MSG_HAS(err.msg, want2);
}

static void expect_bad_file_(const char *name, const void *data, size_t n, int vocab,
                             const char *want) {
    write_bytes_(name, data, n);
    char p[700];
    path_(p, sizeof p, name);
    expect_open_error_(p, vocab, 4, 1, name, want);
    unlink(p);
}

static void test_bad_files(void) {
    uint8_t buf[1024];
    memset(buf, 1, sizeof buf);
    expect_bad_file_("odd.bin", buf, 1001, A_VOCAB, "not a multiple of 2");
    expect_bad_file_("odd32.bin", buf, 1002, B_VOCAB, "not a multiple of 4");
    struct {
        const char *name, *dict, *want;
        int major, itemsize, n;
    } bad[] = {
        {"f4.npy", "{'descr': '<f4', 'fortran_order': False, 'shape': (100,), }", "'<f4'", 1, 4,
         100},
        {"be.npy", "{'descr': '>u2', 'fortran_order': False, 'shape': (100,), }", "'>u2'", 1, 2,
         100},
        {"fo.npy", "{'descr': '<u2', 'fortran_order': True, 'shape': (100,), }", "fortran_order", 1,
         2, 100},
        {"2d.npy", "{'descr': '<u2', 'fortran_order': False, 'shape': (10, 10), }", "not 1-D", 1, 2,
         100},
        {"len.npy", "{'descr': '<u2', 'fortran_order': False, 'shape': (99,), }", "shape (99,)", 1,
         2, 100},
        {"ver.npy", "{'descr': '<u2', 'fortran_order': False, 'shape': (100,), }", "version 9", 9,
         2, 100},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        size_t hl = npy_header_(buf, bad[i].major == 9 ? 1 : bad[i].major, bad[i].dict);
        if (bad[i].major == 9) buf[6] = 9;
        memset(buf + hl, 0, (size_t)bad[i].n * (size_t)bad[i].itemsize);
        expect_bad_file_(bad[i].name, buf, hl + (size_t)bad[i].n * (size_t)bad[i].itemsize, A_VOCAB,
                         bad[i].want);
    }
    // A header length that runs past the end of the file, and a bare magic.
    size_t hl = npy_header_(buf, 1, "{'descr': '<u2', 'fortran_order': False, 'shape': (1,), }");
    buf[8] = 0xff, buf[9] = 0x7f;
    expect_bad_file_("long.npy", buf, hl, A_VOCAB, "runs past the end");
    expect_bad_file_("short.npy", "\x93NUMPY\x01", 7, A_VOCAB, "truncated");
}

static void test_empty_and_too_small(void) {
    char glob[700], p[700];
    write_bytes_("e0.bin", "", 0);
    write_bytes_("e1.bin", "", 0);
    snprintf(glob, sizeof glob, "%s/e*.bin", tmpdir);
    expect_open_error_(glob, A_VOCAB, 4, 1, "has 0 instances of seq_len 4",
                       "fewer than one global batch of 1");
    path_(p, sizeof p, "e0.bin");
    unlink(p);
    path_(p, sizeof p, "e1.bin");
    unlink(p);
    // Data set A has 162 instances of 16 tokens: not one global batch of 200.
    expect_open_error_(a_glob, A_VOCAB, A_T, 200, "has 162 instances of seq_len 16",
                       "fewer than one global batch of 200");
    snprintf(glob, sizeof glob, "%s/a*,%s/nothing*.npy", tmpdir, tmpdir);
    expect_open_error_(glob, A_VOCAB, A_T, 8, "nothing*.npy' matches no file", NULL);
}

static void test_bad_config(void) {
    struct {
        int T, mb, G, rank, world, prefetch;
        const char *want;
    } bad[] = {
        {1, 1, 1, 0, 1, 0, "seq_len 1 must be >= 2"},
        {16, 0, 1, 0, 1, 0, "micro_batch 0"},
        {16, 2, 6, 0, 2, 0, "global_batch 6 is not a positive multiple of micro_batch 2 x world 2"},
        {16, 2, 8, 2, 2, 0, "rank 2 is not in [0, world 2)"},
        {16, 2, 8, -1, 2, 0, "rank -1"},
        {16, 2, 8, 0, 2, -1, "prefetch -1"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        LoaderConfig c =
            config_(&A, bad[i].mb, bad[i].G, bad[i].rank, bad[i].world, bad[i].prefetch);
        c.seq_len = bad[i].T;
        Loader *L = NULL;
        MoetErr err = {{0}};
        CU_ASSERT_EQUAL(loader_open(&L, &c, &err), MOET_EUSAGE);
        ASSERT_MSG_HAS(err.msg, bad[i].want);
    }
}

static void test_fingerprint_and_seed(void) {
    LoaderConfig c = config_(&A, 2, 8, 0, 1, 2);
    Loader *L = open_(&c);
    const char *fp = loader_fingerprint(L);
    CU_ASSERT_EQUAL(strlen(fp), 16);
    LoaderConfig c2 = config_(&A, 1, 8, 1, 4, 0); // another world: the same fingerprint
    Loader *L2 = open_(&c2);
    CU_ASSERT_STRING_EQUAL(loader_fingerprint(L2), fp);
    loader_close(L2);

    LoaderConfig cs = c; // another seq_len, vocab or file set: another fingerprint
    cs.seq_len = 8;
    Loader *Ls = open_(&cs);
    CU_ASSERT_STRING_NOT_EQUAL(loader_fingerprint(Ls), fp);
    LoaderConfig cv = c;
    cv.vocab_size = 60000;
    Loader *Lv = open_(&cv);
    CU_ASSERT_STRING_NOT_EQUAL(loader_fingerprint(Lv), fp);
    loader_close(Lv);
    char sub[700];
    snprintf(sub, sizeof sub, "%s/a[0-3]*", tmpdir);
    LoaderConfig cf = c;
    cf.glob = sub;
    Loader *Lf = open_(&cf);
    CU_ASSERT_STRING_NOT_EQUAL(loader_fingerprint(Lf), fp);
    loader_close(Lf);

    int32_t x[2 * A_T];
    for (int s = 0; s < 8; s++) next_(L, x);
    LoaderPos pos;
    loader_get_pos(L, &pos);
    MoetErr err = {{0}};
    CU_ASSERT_EQUAL(loader_set_pos(Ls, &pos, 0, &err), MOET_EUSAGE);
    ASSERT_MSG_HAS(err.msg, "fingerprint");
    ASSERT_MSG_HAS(err.msg, fp);
    CU_ASSERT_EQUAL(loader_set_pos(Ls, &pos, 1, &err), 0); // forced: continues at 16
    LoaderPos got;
    loader_get_pos(Ls, &got);
    CU_ASSERT_EQUAL(got.consumed, 16);
    loader_close(Ls);

    LoaderConfig cseed = c;
    cseed.seed = 99;
    Loader *Lseed = open_(&cseed);
    CU_ASSERT_EQUAL(loader_set_pos(Lseed, &pos, 0, &err), MOET_EUSAGE);
    ASSERT_MSG_HAS(err.msg, "seed 1234");
    CU_ASSERT_EQUAL(loader_set_pos(Lseed, &pos, 1, &err), 0);
    loader_close(Lseed);

    LoaderPos far = pos;
    far.consumed = 1000;
    CU_ASSERT_EQUAL(loader_set_pos(L, &far, 0, &err), MOET_EUSAGE);
    ASSERT_MSG_HAS(err.msg, "consumed 1000");
    loader_close(L);
}

static void test_close_while_reading_ahead(void) {
    for (int i = 0; i < 20; i++) {
        LoaderConfig c = config_(&A, 2, 8, i % 2, 2, 1 + i % 4);
        Loader *L = open_(&c);
        int32_t x[2 * A_T];
        for (int s = 0; s < i; s++) next_(L, x);
        loader_close(L); // the thread may be mid-fill or waiting
    }
}

int main(void) {
    make_shards_();
    static const TuTest tests[] = {
        {"every instance once per epoch (uint16, .npy, uint32)", test_epoch_covers_every_instance},
        {"the same global batches at world 1, 2, 4, 8", test_world_sizes_same_global_batches},
        {"world 2 accum 1 = world 1 accum 2", test_world2_accum1_is_world1_accum2},
        {"resume continues exactly, also at another world size", test_resume_continues_exactly},
        {"set_pos mid-batch with a full read-ahead ring", test_set_pos_mid_stream_restarts_batch},
        {"epoch rollover: a new permutation, every instance once", test_epoch_rollover},
        {"prefetch 0, 1, 4 give the same stream", test_prefetch_changes_nothing},
        {"loader_locate agrees with the data", test_locate_matches_data},
        {"shuffle 0 is file order; patterns in the order given", test_no_shuffle_is_file_order},
        {"id >= vocab names the file and offset", test_id_out_of_vocab},
        {"bad files: size, .npy header", test_bad_files},
        {"empty data set, too few instances, no match", test_empty_and_too_small},
        {"bad configuration", test_bad_config},
        {"fingerprint and seed checks on set_pos", test_fingerprint_and_seed},
        {"close while the read-ahead thread runs", test_close_while_reading_ahead},
    };
    int rc = tu_run("loader", tests, (int)(sizeof tests / sizeof tests[0]));
    tu_remove_dir(tmpdir);
    return rc;
}
