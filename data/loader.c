// loader: streams fixed-length training instances from token shards (ARCHITECTURE §4, §5).
// Files are mmap'ed read-only; a Feistel permutation computed on the fly orders the instances
// (no O(n) memory); a pthread fills a ring of micro-batches ahead of the trainer.
//
// Instances. File f (in the order listed: each comma-separated pattern's glob(3) matches,
// sorted, patterns in the order given) holds n_tok[f] ids and floor(n_tok[f] / seq_len)
// instances; the tail is dropped. Instance ids are global and in file order: instance k of
// file f has id prefix[f] + k and covers the file's tokens [k * seq_len, (k + 1) * seq_len)
// (token offsets count ids from the first id, after any .npy header).
//
// Order. Position p (0 <= p < n) of epoch e holds instance perm_e(p) when shuffle is on, p when
// off. perm_e is a bijection of [0, n) that depends only on (seed, epoch, n), never on the world
// size or the batch shape:
//   mix(z)  = splitmix64's finalizer: z ^= z >> 30; z *= 0xbf58476d1ce4e5b9;
//             z ^= z >> 27; z *= 0x94d049bb133111eb; z ^= z >> 31   (all mod 2^64)
//   key[r]  = mix(mix(mix(seed) ^ epoch) + (r + 1) * 0x9e3779b97f4a7c15),  r = 0..5
//   h       = the smallest h >= 1 with 4^h >= n (the domain is 2h bits, fewer than 4n values)
//   F(x)    = L = x >> h, R = x & (2^h - 1); for r = 0..5:
//               (L, R) = (R, L ^ (mix(R ^ key[r]) & (2^h - 1)));
//             return (L << h) | R
//   perm_e(p) = x = F(p); while (x >= n) x = F(x); return x     (cycle walking)
// F is a 6-round balanced Feistel network, hence a bijection of [0, 4^h); cycle walking
// restricts it to a bijection of [0, n) in fewer than 4 applications on average.
// loader_index_of inverts perm_e (for `moet trace`): F's rounds undone in reverse order, with
// the same cycle walking.
//
// Batches (§4). Global batch b of an epoch is positions [b*G, (b+1)*G), G = global_batch; the
// epoch has floor(n / G) of them and drops its last n mod G positions. Global micro-batch j
// (0 <= j < accum*world, accum = G / (micro_batch*world)) covers positions
// [b*G + j*mb, b*G + (j+1)*mb) and is taken by rank j % world at accumulation step j / world.
// A resumed position may be any consumed count c (normally a multiple of G): the batches are
// then [c, c+G), [c+G, c+2G), ... while they fit in the epoch.
//
// Fingerprint: FNV-1a 64 (offset basis 0xcbf29ce484222325, prime 0x100000001b3) over, for each
// file in order, its base name and a NUL byte, its size in bytes as 8 little-endian bytes and
// its dtype ("<u2" or "<u4") and a NUL byte; then vocab_size and seq_len, 8 little-endian bytes
// each. Printed as 16 lowercase hex digits.
#include "data/loader.h"

#include <errno.h>
#include <fcntl.h>
#include <glob.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "loader.c reads little-endian token ids in place: a big-endian host needs byte swaps"
#endif

enum { FEISTEL_ROUNDS = 6 };

typedef struct {
    char *path;
    const char *base;   // points into path
    const uint8_t *map; // whole file (NULL when empty)
    size_t bytes;       // file size
    const uint8_t *ids; // first id (after any .npy header)
    uint64_t n_tokens;
    int itemsize; // 2 (<u2) or 4 (<u4)
} LFile;

// Where a rank's stream stands: epoch, first position of the current global batch, and the
// accumulation step inside it.
typedef struct {
    uint64_t epoch, p;
    int a;
} Cursor;

struct Loader {
    LoaderConfig cfg;
    char *glob;
    LFile *files;
    int n_files;
    uint64_t *prefix; // (n_files + 1) instance prefix sums
    uint64_t n_inst, n_tokens;
    uint64_t G;    // global batch (sequences)
    int accum;     // micro-batches per rank per global batch
    int half_bits; // Feistel half width h
    char fp[17];
    Cursor cur; // the consumer (trainer) side

    // read-ahead: a ring of P micro-batches filled by `thread`
    int P;
    int32_t *ring; // (P, micro_batch, seq_len)
    int *slot_rc;
    Cursor *slot_cur;
    MoetErr *slot_err;
    int head, count; // slots [head, head + count) mod P are full
    uint64_t gen;    // bumped by set_pos: a fill begun before is thrown away
    Cursor prod;     // next micro-batch the thread fills
    int stopped, quit, thread_started;
    pthread_t thread;
    pthread_mutex_t mu;
    pthread_cond_t cv_prod, cv_cons;
};

// ---- permutation ----

static uint64_t mix_(uint64_t z) {
    z ^= z >> 30;
    z *= 0xbf58476d1ce4e5b9ull;
    z ^= z >> 27;
    z *= 0x94d049bb133111ebull;
    z ^= z >> 31;
    return z;
}

static void feistel_keys_(uint64_t seed, uint64_t epoch, uint64_t key[FEISTEL_ROUNDS]) {
    uint64_t base = mix_(mix_(seed) ^ epoch);
    for (int r = 0; r < FEISTEL_ROUNDS; r++)
        key[r] = mix_(base + (uint64_t)(r + 1) * 0x9e3779b97f4a7c15ull);
}

static uint64_t feistel_(uint64_t x, int h, const uint64_t key[FEISTEL_ROUNDS]) {
    uint64_t mask = (1ull << h) - 1, l = x >> h, r = x & mask;
    for (int i = 0; i < FEISTEL_ROUNDS; i++) {
        uint64_t t = l ^ (mix_(r ^ key[i]) & mask);
        l = r;
        r = t;
    }
    return (l << h) | r;
}

// The inverse of feistel_: the rounds undone in reverse order.
static uint64_t feistel_inverse_(uint64_t x, int h, const uint64_t key[FEISTEL_ROUNDS]) {
    uint64_t mask = (1ull << h) - 1, l = x >> h, r = x & mask;
    for (int i = FEISTEL_ROUNDS - 1; i >= 0; i--) {
        uint64_t t = r ^ (mix_(l ^ key[i]) & mask);
        r = l;
        l = t;
    }
    return (l << h) | r;
}

// Instance at position p of `epoch` (see the top of the file).
static uint64_t permute_(const Loader *L, uint64_t epoch, uint64_t p) {
    if (!L->cfg.shuffle) return p;
    uint64_t key[FEISTEL_ROUNDS];
    feistel_keys_(L->cfg.seed, epoch, key);
    uint64_t x = feistel_(p, L->half_bits, key);
    while (x >= L->n_inst) x = feistel_(x, L->half_bits, key);
    return x;
}

// Position of instance `id` in `epoch`: cycle walking with the inverse network retraces the
// forward walk backwards (every x >= n it meets is one the forward walk passed through).
static uint64_t unpermute_(const Loader *L, uint64_t epoch, uint64_t id) {
    if (!L->cfg.shuffle) return id;
    uint64_t key[FEISTEL_ROUNDS];
    feistel_keys_(L->cfg.seed, epoch, key);
    uint64_t x = feistel_inverse_(id, L->half_bits, key);
    while (x >= L->n_inst) x = feistel_inverse_(x, L->half_bits, key);
    return x;
}

// Instance id -> file (the one with prefix[f] <= id < prefix[f+1]) and first token.
static void instance_where_(const Loader *L, uint64_t id, int *file, uint64_t *offset) {
    int lo = 0, hi = L->n_files; // invariant: prefix[lo] <= id < prefix[hi]
    while (hi - lo > 1) {
        int mid = lo + (hi - lo) / 2;
        if (L->prefix[mid] <= id)
            lo = mid;
        else
            hi = mid;
    }
    *file = lo;
    *offset = (id - L->prefix[lo]) * (uint64_t)L->cfg.seq_len;
}

// ---- reading ----

// Copies n ids of file F from token offset `off` into out, checking each against the vocab.
// Checks after the copy so that the loop vectorizes; the error path re-scans for the first bad id.
static int copy_ids_(const Loader *L, const LFile *F, uint64_t off, int n, int32_t *out,
                     MoetErr *err) {
    uint32_t vocab = (uint32_t)L->cfg.vocab_size, bad = 0;
    if (F->itemsize == 2) {
        const uint8_t *src = F->ids + off * 2;
        for (int i = 0; i < n; i++) {
            uint16_t v;
            memcpy(&v, src + 2 * (size_t)i, 2);
            bad |= (uint32_t)(v >= vocab);
            out[i] = (int32_t)v;
        }
    } else {
        const uint8_t *src = F->ids + off * 4;
        for (int i = 0; i < n; i++) {
            uint32_t v;
            memcpy(&v, src + 4 * (size_t)i, 4);
            bad |= (uint32_t)(v >= vocab);
            out[i] = (int32_t)v;
        }
    }
    if (!bad) return 0;
    for (int i = 0; i < n; i++) {
        uint32_t v = (uint32_t)out[i];
        if (v >= vocab)
            return moet_errf(err, MOET_EFAIL,
                             "%s: token id %u at token offset %llu >= vocab_size %d\n"
                             "---> HINT: the shards were tokenized with a larger vocabulary; set "
                             "vocab_size to the tokenizer's (or re-tokenize)",
                             F->path, v, (unsigned long long)(off + (uint64_t)i),
                             L->cfg.vocab_size);
    }
    return 0;
}

// Fills out (micro_batch, seq_len) with the micro-batch of this rank at cursor c.
static int fill_(const Loader *L, Cursor c, int32_t *out, MoetErr *err) {
    const LoaderConfig *cfg = &L->cfg;
    uint64_t j = (uint64_t)c.a * (uint64_t)cfg->world + (uint64_t)cfg->rank;
    uint64_t first = c.p + j * (uint64_t)cfg->micro_batch;
    // Ask for every instance of the micro-batch first, so that data not in the page cache is
    // read with the micro-batch's I/Os in flight together rather than one page fault at a time.
    long page = sysconf(_SC_PAGESIZE);
    for (int s = 0; s < cfg->micro_batch; s++) {
        int f;
        uint64_t off;
        instance_where_(L, permute_(L, c.epoch, first + (uint64_t)s), &f, &off);
        const LFile *F = &L->files[f];
        uintptr_t a = (uintptr_t)(F->ids + off * (uint64_t)F->itemsize);
        uintptr_t b = a + (uintptr_t)cfg->seq_len * (uintptr_t)F->itemsize;
        a -= a % (uintptr_t)page;
        posix_madvise((void *)a, b - a, POSIX_MADV_WILLNEED);
    }
    for (int s = 0; s < cfg->micro_batch; s++) {
        int f;
        uint64_t off;
        instance_where_(L, permute_(L, c.epoch, first + (uint64_t)s), &f, &off);
        int rc = copy_ids_(L, &L->files[f], off, cfg->seq_len,
                           out + (size_t)s * (size_t)cfg->seq_len, err);
        if (rc) return rc;
    }
    return 0;
}

// Moves c past one micro-batch of this rank; a global batch that no longer fits starts the next
// epoch.
static void advance_(const Loader *L, Cursor *c) {
    if (++c->a < L->accum) return;
    c->a = 0;
    c->p += L->G;
    if (c->p + L->G > L->n_inst) {
        c->epoch++;
        c->p = 0;
    }
}

// ---- read-ahead thread ----

static void *prefetch_main_(void *arg) {
    Loader *L = arg;
    size_t slot_n = (size_t)L->cfg.micro_batch * (size_t)L->cfg.seq_len;
    pthread_mutex_lock(&L->mu);
    for (;;) {
        while (!L->quit && (L->count == L->P || L->stopped)) pthread_cond_wait(&L->cv_prod, &L->mu);
        if (L->quit) break;
        // The slot after the full ones: the consumer never reads it until count covers it, and
        // only this thread writes slots, so it is filled without the lock.
        int slot = (L->head + L->count) % L->P;
        Cursor c = L->prod;
        uint64_t gen = L->gen;
        advance_(L, &L->prod);
        pthread_mutex_unlock(&L->mu);

        MoetErr err;
        int rc = fill_(L, c, L->ring + (size_t)slot * slot_n, &err);

        pthread_mutex_lock(&L->mu);
        if (gen != L->gen) continue; // set_pos moved the stream meanwhile
        L->slot_rc[slot] = rc;
        L->slot_cur[slot] = c;
        if (rc) {
            L->slot_err[slot] = err;
            L->stopped = 1; // until set_pos: the consumer keeps getting this error
        }
        L->count++;
        pthread_cond_signal(&L->cv_cons);
    }
    pthread_mutex_unlock(&L->mu);
    return NULL;
}

// ---- opening ----

static void free_files_(Loader *L) {
    for (int i = 0; i < L->n_files; i++) {
        if (L->files[i].map) munmap((void *)L->files[i].map, L->files[i].bytes);
        free(L->files[i].path);
    }
    free(L->files);
    L->files = NULL;
    L->n_files = 0;
}

static int add_path_(Loader *L, const char *path, int *cap) {
    if (L->n_files == *cap) {
        *cap = *cap ? 2 * *cap : 16;
        LFile *nf = realloc(L->files, (size_t)*cap * sizeof(LFile));
        if (!nf) moet_die("loader: out of memory listing files");
        L->files = nf;
    }
    LFile *F = &L->files[L->n_files++];
    memset(F, 0, sizeof *F);
    F->path = strdup(path);
    if (!F->path) moet_die("loader: out of memory listing files");
    const char *slash = strrchr(F->path, '/');
    F->base = slash ? slash + 1 : F->path;
    return 0;
}

// Splits the comma-separated patterns and globs each (matches sorted, as glob(3) returns them).
static int list_files_(Loader *L, MoetErr *err) {
    char *patterns = strdup(L->glob);
    if (!patterns) moet_die("loader: out of memory");
    int cap = 0, rc = 0;
    char *save = NULL;
    for (char *pat = strtok_r(patterns, ",", &save); pat && !rc; pat = strtok_r(NULL, ",", &save)) {
        while (*pat == ' ' || *pat == '\t') pat++;
        size_t len = strlen(pat);
        while (len > 0 && (pat[len - 1] == ' ' || pat[len - 1] == '\t')) pat[--len] = '\0';
        if (len == 0) continue;
        glob_t g;
        int grc = glob(pat, 0, NULL, &g);
        if (grc == GLOB_NOMATCH)
            rc = moet_errf(err, MOET_EUSAGE,
                           "data: pattern '%s' matches no file\n"
                           "---> HINT: check the path (relative paths start from the working "
                           "directory) or run `moet tokenize` first",
                           pat);
        else if (grc != 0)
            rc = moet_errf(err, MOET_EFAIL, "data: glob('%s') failed (%s)", pat,
                           grc == GLOB_NOSPACE ? "out of memory" : "read error");
        else
            for (size_t i = 0; i < g.gl_pathc; i++) add_path_(L, g.gl_pathv[i], &cap);
        if (grc != GLOB_NOMATCH) globfree(&g);
    }
    free(patterns);
    if (!rc && L->n_files == 0)
        rc = moet_errf(err, MOET_EUSAGE, "data: empty file pattern '%s'", L->glob);
    return rc;
}

// Finds `'key':` in a .npy header dict and returns a pointer past the colon and any spaces.
static const char *npy_value_(const char *hdr, const char *key) {
    char quoted[64];
    const char *quotes = "'\"";
    for (int q = 0; q < 2; q++) {
        snprintf(quoted, sizeof quoted, "%c%s%c", quotes[q], key, quotes[q]);
        const char *s = strstr(hdr, quoted);
        if (!s) continue;
        s += strlen(quoted);
        while (*s == ' ') s++;
        if (*s != ':') return NULL;
        s++;
        while (*s == ' ') s++;
        return s;
    }
    return NULL;
}

// Parses a NumPy .npy header (format versions 1-3): dtype '<u2' or '<u4', fortran_order False,
// a 1-D shape that matches the bytes that follow.
static int parse_npy_(LFile *F, MoetErr *err) {
    const uint8_t *m = F->map;
    if (F->bytes < 10)
        return moet_errf(err, MOET_EFAIL, "%s: truncated .npy header (%zu bytes)", F->path,
                         F->bytes);
    int major = m[6];
    uint64_t hlen, start;
    if (major == 1) {
        hlen = (uint64_t)m[8] | (uint64_t)m[9] << 8;
        start = 10;
    } else if (major == 2 || major == 3) {
        if (F->bytes < 12) return moet_errf(err, MOET_EFAIL, "%s: truncated .npy header", F->path);
        hlen = (uint64_t)m[8] | (uint64_t)m[9] << 8 | (uint64_t)m[10] << 16 | (uint64_t)m[11] << 24;
        start = 12;
    } else {
        return moet_errf(err, MOET_EFAIL, "%s: unsupported .npy format version %d.%d", F->path,
                         major, m[7]);
    }
    if (start + hlen > F->bytes || hlen > (1u << 20))
        return moet_errf(err, MOET_EFAIL,
                         "%s: .npy header length %llu runs past the end of the file (%zu bytes)",
                         F->path, (unsigned long long)hlen, F->bytes);
    char *hdr = malloc(hlen + 1);
    if (!hdr) moet_die("loader: out of memory");
    memcpy(hdr, m + start, hlen);
    hdr[hlen] = '\0';

    int rc = 0;
    const char *v = npy_value_(hdr, "descr");
    char descr[16] = "";
    if (v && (*v == '\'' || *v == '"')) {
        char q = *v++;
        size_t n = 0;
        while (v[n] && v[n] != q && n + 1 < sizeof descr) n++;
        memcpy(descr, v, n);
        descr[n] = '\0';
    }
    if (!strcmp(descr, "<u2"))
        F->itemsize = 2;
    else if (!strcmp(descr, "<u4"))
        F->itemsize = 4;
    else
        rc = moet_errf(err, MOET_EFAIL,
                       "%s: .npy dtype '%s' is not '<u2' or '<u4' (little-endian unsigned token "
                       "ids)\n---> HINT: save the ids as np.uint16 or np.uint32",
                       F->path, v ? descr : "(missing)");
    if (!rc) {
        v = npy_value_(hdr, "fortran_order");
        if (!v || strncmp(v, "False", 5) != 0)
            rc =
                moet_errf(err, MOET_EFAIL, "%s: .npy header lacks 'fortran_order': False", F->path);
    }
    unsigned long long dim = 0;
    if (!rc) {
        v = npy_value_(hdr, "shape");
        char *end = NULL;
        if (v && *v == '(') {
            v++;
            while (*v == ' ') v++;
            errno = 0;
            dim = strtoull(v, &end, 10);
            if (end == v || errno) end = NULL;
        }
        if (end) {
            while (*end == ' ') end++;
            if (*end == ',') end++;
            while (*end == ' ') end++;
        }
        if (!end || *end != ')')
            rc = moet_errf(err, MOET_EFAIL, "%s: .npy shape is not 1-D: %s", F->path,
                           v ? v - 1 : "(missing)");
    }
    free(hdr);
    if (rc) return rc;
    uint64_t data_bytes = F->bytes - (start + hlen);
    if (data_bytes != dim * (uint64_t)F->itemsize)
        return moet_errf(err, MOET_EFAIL,
                         "%s: .npy header says shape (%llu,) of %d-byte ids but %llu data bytes "
                         "follow it at byte offset %llu; the file is truncated or corrupt",
                         F->path, dim, F->itemsize, (unsigned long long)data_bytes,
                         (unsigned long long)(start + hlen));
    F->ids = m + start + hlen;
    F->n_tokens = dim;
    return 0;
}

// mmaps one file and works out where its ids are and how wide they are.
static int map_file_(Loader *L, LFile *F, MoetErr *err) {
    int fd = open(F->path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return moet_errf(err, MOET_EFAIL, "%s: cannot open (%s)", F->path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        close(fd);
        return moet_errf(err, MOET_EFAIL, "%s: not a regular file", F->path);
    }
    F->bytes = (size_t)st.st_size;
    if (F->bytes > 0) {
        void *p = mmap(NULL, F->bytes, PROT_READ, MAP_PRIVATE, fd, 0);
        if (p == MAP_FAILED) {
            int e = errno;
            close(fd);
            return moet_errf(err, MOET_EFAIL, "%s: mmap failed (%s)", F->path, strerror(e));
        }
        F->map = p;
        // Validation reads files in order; a shuffled run touches instances at random, where
        // the kernel's default read-around (an instance is a few pages) is what we want.
        posix_madvise(p, F->bytes, L->cfg.shuffle ? POSIX_MADV_NORMAL : POSIX_MADV_SEQUENTIAL);
    }
    close(fd);

    if (F->bytes >= 6 && memcmp(F->map, "\x93NUMPY", 6) == 0) return parse_npy_(F, err);
    F->itemsize = L->cfg.vocab_size <= 65536 ? 2 : 4;
    if (F->bytes % (size_t)F->itemsize != 0)
        return moet_errf(err, MOET_EFAIL,
                         "%s: size %zu bytes is not a multiple of %d (raw uint%d ids, since "
                         "vocab_size %d %s 65536); the last id would start at byte offset %zu\n"
                         "---> HINT: the file is truncated, or was written for another "
                         "vocabulary size",
                         F->path, F->bytes, F->itemsize, 8 * F->itemsize, L->cfg.vocab_size,
                         F->itemsize == 2 ? "<=" : ">", F->bytes - F->bytes % (size_t)F->itemsize);
    F->ids = F->map;
    F->n_tokens = F->bytes / (size_t)F->itemsize;
    return 0;
}

static void fnv_(uint64_t *h, const void *data, size_t n) {
    const uint8_t *p = data;
    for (size_t i = 0; i < n; i++) {
        *h ^= p[i];
        *h *= 0x100000001b3ull;
    }
}

static void fnv_u64_(uint64_t *h, uint64_t v) {
    uint8_t b[8];
    for (int i = 0; i < 8; i++) b[i] = (uint8_t)(v >> (8 * i));
    fnv_(h, b, 8);
}

static void fingerprint_(Loader *L) {
    uint64_t h = 0xcbf29ce484222325ull;
    for (int i = 0; i < L->n_files; i++) {
        const LFile *F = &L->files[i];
        fnv_(&h, F->base, strlen(F->base) + 1);
        fnv_u64_(&h, (uint64_t)F->bytes);
        fnv_(&h, F->itemsize == 2 ? "<u2" : "<u4", 4);
    }
    fnv_u64_(&h, (uint64_t)L->cfg.vocab_size);
    fnv_u64_(&h, (uint64_t)L->cfg.seq_len);
    snprintf(L->fp, sizeof L->fp, "%016llx", (unsigned long long)h);
}

static int check_config_(const LoaderConfig *c, MoetErr *err) {
    if (!c->glob || !c->glob[0])
        return moet_errf(err, MOET_EUSAGE, "data: no shard files given (an empty glob)");
    if (c->seq_len < 2)
        return moet_errf(err, MOET_EUSAGE,
                         "data: seq_len %d must be >= 2 (position t predicts token t+1)",
                         c->seq_len);
    if (c->vocab_size < 1)
        return moet_errf(err, MOET_EUSAGE, "data: vocab_size %d must be >= 1", c->vocab_size);
    if (c->micro_batch < 1)
        return moet_errf(err, MOET_EUSAGE, "data: micro_batch %d must be >= 1", c->micro_batch);
    if (c->world < 1 || c->rank < 0 || c->rank >= c->world)
        return moet_errf(err, MOET_EUSAGE, "data: rank %d is not in [0, world %d)", c->rank,
                         c->world);
    if (c->global_batch < 1 || c->global_batch % (c->micro_batch * c->world) != 0)
        return moet_errf(err, MOET_EUSAGE,
                         "data: global_batch %d is not a positive multiple of micro_batch %d x "
                         "world %d\n---> HINT: choose global_batch = micro_batch x world x "
                         "grad_accum",
                         c->global_batch, c->micro_batch, c->world);
    if (c->prefetch < 0)
        return moet_errf(err, MOET_EUSAGE, "data: prefetch %d must be >= 0", c->prefetch);
    return 0;
}

static void start_prefetch_(Loader *L, Cursor from) {
    L->head = L->count = 0;
    L->stopped = 0;
    L->gen++;
    L->prod = from;
}

int loader_open(Loader **out, const LoaderConfig *cfg, MoetErr *err) {
    *out = NULL;
    int rc = check_config_(cfg, err);
    if (rc) return rc;
    Loader *L = calloc(1, sizeof *L);
    if (!L) moet_die("loader: out of memory");
    L->cfg = *cfg;
    L->glob = strdup(cfg->glob);
    if (!L->glob) moet_die("loader: out of memory");
    L->cfg.glob = L->glob;
    L->G = (uint64_t)cfg->global_batch;
    L->accum = cfg->global_batch / (cfg->micro_batch * cfg->world);

    rc = list_files_(L, err);
    for (int i = 0; !rc && i < L->n_files; i++) rc = map_file_(L, &L->files[i], err);
    if (rc) {
        loader_close(L);
        return rc;
    }
    L->prefix = malloc((size_t)(L->n_files + 1) * sizeof(uint64_t));
    if (!L->prefix) moet_die("loader: out of memory");
    L->prefix[0] = 0;
    for (int i = 0; i < L->n_files; i++) {
        L->n_tokens += L->files[i].n_tokens;
        L->prefix[i + 1] = L->prefix[i] + L->files[i].n_tokens / (uint64_t)cfg->seq_len;
    }
    L->n_inst = L->prefix[L->n_files];
    if (L->n_inst < L->G) {
        rc = moet_errf(err, MOET_EUSAGE,
                       "data set %s has %llu instances of seq_len %d, fewer than one global "
                       "batch of %d (%d files, %llu tokens)\n---> HINT: add data, or lower "
                       "seq_len or global_batch",
                       cfg->glob, (unsigned long long)L->n_inst, cfg->seq_len, cfg->global_batch,
                       L->n_files, (unsigned long long)L->n_tokens);
        loader_close(L);
        return rc;
    }
    L->half_bits = 1;
    while (L->half_bits < 32 && (1ull << (2 * L->half_bits)) < L->n_inst) L->half_bits++;
    fingerprint_(L);

    L->P = cfg->prefetch;
    if (L->P > 0) {
        size_t slot_n = (size_t)cfg->micro_batch * (size_t)cfg->seq_len;
        L->ring = moet_malloc((size_t)L->P * slot_n * sizeof(int32_t));
        L->slot_rc = moet_calloc((size_t)L->P * sizeof(int));
        L->slot_cur = moet_calloc((size_t)L->P * sizeof(Cursor));
        L->slot_err = moet_calloc((size_t)L->P * sizeof(MoetErr));
        pthread_mutex_init(&L->mu, NULL);
        pthread_cond_init(&L->cv_prod, NULL);
        pthread_cond_init(&L->cv_cons, NULL);
        start_prefetch_(L, L->cur);
        int e = pthread_create(&L->thread, NULL, prefetch_main_, L);
        if (e != 0) {
            rc = moet_errf(err, MOET_EFAIL, "data: cannot start the read-ahead thread (%s)",
                           strerror(e));
            loader_close(L);
            return rc;
        }
        L->thread_started = 1;
    }
    *out = L;
    return 0;
}

void loader_close(Loader *L) {
    if (!L) return;
    if (L->thread_started) {
        pthread_mutex_lock(&L->mu);
        L->quit = 1;
        pthread_cond_broadcast(&L->cv_prod);
        pthread_mutex_unlock(&L->mu);
        pthread_join(L->thread, NULL);
    }
    if (L->P > 0 && L->ring) {
        pthread_mutex_destroy(&L->mu);
        pthread_cond_destroy(&L->cv_prod);
        pthread_cond_destroy(&L->cv_cons);
    }
    free(L->ring);
    free(L->slot_rc);
    free(L->slot_cur);
    free(L->slot_err);
    free_files_(L);
    free(L->prefix);
    free(L->glob);
    free(L);
}

// ---- stream ----

int loader_next(Loader *L, int32_t *tokens, MoetErr *err) {
    if (L->P == 0) {
        int rc = fill_(L, L->cur, tokens, err);
        if (rc) return rc;
        advance_(L, &L->cur);
        return 0;
    }
    size_t slot_n = (size_t)L->cfg.micro_batch * (size_t)L->cfg.seq_len;
    pthread_mutex_lock(&L->mu);
    while (L->count == 0) pthread_cond_wait(&L->cv_cons, &L->mu);
    int slot = L->head, rc = L->slot_rc[slot];
    Cursor c = L->slot_cur[slot];
    if (rc) {
        if (err) *err = L->slot_err[slot];
        pthread_mutex_unlock(&L->mu);
        return rc;
    }
    pthread_mutex_unlock(&L->mu);
    if (c.epoch != L->cur.epoch || c.p != L->cur.p || c.a != L->cur.a)
        moet_die("loader: read-ahead slot out of order (epoch %llu pos %llu step %d)",
                 (unsigned long long)c.epoch, (unsigned long long)c.p, c.a);
    // The slot at head is full and the thread only writes slots outside [head, head+count).
    memcpy(tokens, L->ring + (size_t)slot * slot_n, slot_n * sizeof(int32_t));
    pthread_mutex_lock(&L->mu);
    L->head = (L->head + 1) % L->P;
    L->count--;
    advance_(L, &L->cur);
    pthread_cond_signal(&L->cv_prod);
    pthread_mutex_unlock(&L->mu);
    return 0;
}

void loader_get_pos(const Loader *L, LoaderPos *pos) {
    memset(pos, 0, sizeof *pos);
    pos->seed = L->cfg.seed;
    pos->epoch = L->cur.epoch;
    pos->consumed = L->cur.p; // a mid-batch cursor reports the batch's start
    memcpy(pos->fingerprint, L->fp, sizeof pos->fingerprint);
}

int loader_set_pos(Loader *L, const LoaderPos *pos, int force, MoetErr *err) {
    char fp[17];
    memcpy(fp, pos->fingerprint, 16);
    fp[16] = '\0';
    if (!force && strcmp(fp, L->fp) != 0)
        return moet_errf(err, MOET_EUSAGE,
                         "data: the checkpoint's data set fingerprint %s differs from this data "
                         "set's %s (%s: %d files, vocab_size %d, seq_len %d)\n---> HINT: resume "
                         "with the same shards, vocab_size and seq_len, or override to continue "
                         "on the new data",
                         fp, L->fp, L->cfg.glob, L->n_files, L->cfg.vocab_size, L->cfg.seq_len);
    if (!force && pos->seed != L->cfg.seed)
        return moet_errf(err, MOET_EUSAGE,
                         "data: the checkpoint's data seed %llu differs from the configured %llu"
                         "\n---> HINT: set the seed to the checkpoint's, or override",
                         (unsigned long long)pos->seed, (unsigned long long)L->cfg.seed);
    if (pos->consumed > L->n_inst)
        return moet_errf(err, MOET_EUSAGE,
                         "data: the checkpoint consumed %llu instances of epoch %llu, more than "
                         "the %llu this data set has",
                         (unsigned long long)pos->consumed, (unsigned long long)pos->epoch,
                         (unsigned long long)L->n_inst);
    Cursor c = {.epoch = pos->epoch, .p = pos->consumed, .a = 0};
    if (c.p + L->G > L->n_inst) { // the epoch had no complete global batch left
        c.epoch++;
        c.p = 0;
    }
    if (L->P > 0) {
        pthread_mutex_lock(&L->mu);
        L->cur = c;
        start_prefetch_(L, c);
        pthread_cond_signal(&L->cv_prod);
        pthread_mutex_unlock(&L->mu);
    } else {
        L->cur = c;
    }
    return 0;
}

// ---- facts ----

uint64_t loader_num_instances(const Loader *L) {
    return L->n_inst;
}
uint64_t loader_num_tokens(const Loader *L) {
    return L->n_tokens;
}
uint64_t loader_batches_per_epoch(const Loader *L) {
    return L->n_inst / L->G;
}
int loader_num_files(const Loader *L) {
    return L->n_files;
}
const char *loader_file_name(const Loader *L, int file) {
    return L->files[file].path;
}
const char *loader_fingerprint(const Loader *L) {
    return L->fp;
}

void loader_locate(const Loader *L, uint64_t epoch, uint64_t index, int *file,
                   uint64_t *token_offset) {
    instance_where_(L, permute_(L, epoch, index), file, token_offset);
}

uint64_t loader_index_of(const Loader *L, uint64_t epoch, int file, uint64_t token_offset) {
    return unpermute_(L, epoch, L->prefix[file] + token_offset / (uint64_t)L->cfg.seq_len);
}
uint64_t loader_file_tokens(const Loader *L, int file) {
    return L->files[file].n_tokens;
}
uint64_t loader_file_instances(const Loader *L, int file) {
    return L->prefix[file + 1] - L->prefix[file];
}
const uint8_t *loader_file_ids(const Loader *L, int file, int *itemsize) {
    *itemsize = L->files[file].itemsize;
    return L->files[file].n_tokens ? L->files[file].ids : NULL;
}
int loader_read(const Loader *L, int file, uint64_t offset, int n, int32_t *out, MoetErr *err) {
    const LFile *F = &L->files[file];
    if (n < 0 || offset > F->n_tokens || (uint64_t)n > F->n_tokens - offset)
        return moet_errf(err, MOET_EFAIL, "%s: tokens [%llu, %llu) are beyond its %llu tokens",
                         F->path, (unsigned long long)offset,
                         (unsigned long long)(offset + (uint64_t)(n < 0 ? 0 : n)),
                         (unsigned long long)F->n_tokens);
    return copy_ids_(L, F, offset, n, out, err);
}
