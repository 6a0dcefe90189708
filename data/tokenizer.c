// tokenizer: HF tokenizer.json byte-level BPE. Encode = split added tokens (raw, then after
// NFC the normalized ones) -> pre-tokenize (hand scanners for the GPT-2 and cl100k regexes,
// Oniguruma for any other pattern) -> BPE by merge rank on byte ids. Decode = id bytes + lossy
// UTF-8.
#include "data/tokenizer.h"

#include <cjson/cJSON.h>
#include <oniguruma.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <utf8proc.h>

// The two patterns that get a hand-written scanner (the text HF stores in tokenizer.json).
static const char GPT2_PATTERN_[] =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";
static const char CL100K_PATTERN_[] =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| "
    "?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";

enum { PRE_GPT2, PRE_CL100K, PRE_REGEX };
enum { C_O = 0, C_L = 1, C_N = 2, C_S = 3 }; // other, \p{L}, \p{N}, \s (Unicode White_Space)

// A byte trie of added-token contents for leftmost-longest matching.
typedef struct {
    int32_t (*next)[256]; // next[node][byte] = child node, 0 = none (node 0 is the root)
    int32_t *id;          // id[node] = token id ending here, or -1
    int n, cap;
} Trie;

typedef struct {
    uint64_t key; // (left << 32 | right) + 1; 0 = empty slot
    uint32_t rank;
    int32_t id;
} MergeSlot;

struct Tokenizer {
    int vocab_size;
    char **tok;     // tok[id] = token string as in the JSON (NUL-terminated) or NULL
    uint32_t *smap; // string -> id hash (id + 1, 0 = empty), open addressing
    size_t smap_cap;
    MergeSlot *merges;
    size_t merges_cap;
    int32_t byte_id[256]; // id of the one-byte token of each byte
    uint8_t *dec;         // decoded bytes of every id: dec[dec_off[id] .. dec_off[id+1])
    size_t *dec_off;
    Trie raw, norm; // added tokens with normalized false / true
    int nfc, ignore_merges, pre, keep_gaps, eos;
    OnigRegex re; // the file's pattern (always compiled: the generic path and tests)
    uint8_t cls_bmp[65536];
};

// ---- small helpers ----

static uint64_t hash_bytes_(const char *s, size_t n) { // FNV-1a
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < n; i++) h = (h ^ (uint8_t)s[i]) * 1099511628211ull;
    return h;
}

static inline uint64_t hash_u64_(uint64_t x) {
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdull;
    x ^= x >> 33;
    return x;
}

// Length of the valid UTF-8 sequence at s[i], or 0 if invalid; *vp = length of the longest
// valid prefix (>= 1), so that lossy decoding can replace exactly the maximal subpart.
static int utf8_seq_(const uint8_t *s, size_t i, size_t len, int *vp) {
    uint8_t b = s[i];
    *vp = 1;
    if (b < 0x80) return 1;
    int n;
    uint8_t lo = 0x80, hi = 0xBF;
    if (b >= 0xC2 && b <= 0xDF)
        n = 2;
    else if (b >= 0xE0 && b <= 0xEF) {
        n = 3;
        if (b == 0xE0) lo = 0xA0;
        if (b == 0xED) hi = 0x9F;
    } else if (b >= 0xF0 && b <= 0xF4) {
        n = 4;
        if (b == 0xF0) lo = 0x90;
        if (b == 0xF4) hi = 0x8F;
    } else
        return 0;
    for (int k = 1; k < n; k++) {
        if (i + k >= len) return 0;
        uint8_t c = s[i + k];
        if (c < (k == 1 ? lo : 0x80) || c > (k == 1 ? hi : 0xBF)) return 0;
        *vp = k + 1;
    }
    return n;
}

static size_t utf8_invalid_at_(const uint8_t *s, size_t len) { // len when valid
    size_t i = 0;
    while (i < len) {
        if (s[i] < 0x80) {
            i++;
            continue;
        }
        int vp, n = utf8_seq_(s, i, len, &vp);
        if (!n) return i;
        i += n;
    }
    return len;
}

// Code point at s[i] (input already validated); *n = its byte length.
static inline uint32_t cp_at_(const uint8_t *s, size_t i, int *n) {
    uint8_t b = s[i];
    if (b < 0x80) {
        *n = 1;
        return b;
    }
    if (b < 0xE0) {
        *n = 2;
        return ((uint32_t)(b & 0x1F) << 6) | (s[i + 1] & 0x3F);
    }
    if (b < 0xF0) {
        *n = 3;
        return ((uint32_t)(b & 0x0F) << 12) | ((uint32_t)(s[i + 1] & 0x3F) << 6) |
               (s[i + 2] & 0x3F);
    }
    *n = 4;
    return ((uint32_t)(b & 0x07) << 18) | ((uint32_t)(s[i + 1] & 0x3F) << 12) |
           ((uint32_t)(s[i + 2] & 0x3F) << 6) | (s[i + 3] & 0x3F);
}

// Oniguruma's \s for UTF-8 is the Unicode White_Space property.
static int is_space_cp_(uint32_t c) {
    return (c >= 0x09 && c <= 0x0D) || c == 0x20 || c == 0x85 || c == 0xA0 || c == 0x1680 ||
           (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F ||
           c == 0x205F || c == 0x3000;
}

static int class_of_cp_(uint32_t c) {
    if (is_space_cp_(c)) return C_S;
    utf8proc_category_t k = utf8proc_category((utf8proc_int32_t)c);
    if (k >= UTF8PROC_CATEGORY_LU && k <= UTF8PROC_CATEGORY_LO) return C_L;
    if (k >= UTF8PROC_CATEGORY_ND && k <= UTF8PROC_CATEGORY_NO) return C_N;
    return C_O;
}

static inline int cls_(const Tokenizer *t, uint32_t c) {
    return c < 65536 ? t->cls_bmp[c] : class_of_cp_(c);
}

// ---- hand scanners: each returns the end of the piece that starts at i (< end) ----

static size_t run_(const Tokenizer *t, const uint8_t *s, size_t j, size_t end, int k) {
    while (j < end) {
        int n;
        uint32_t c = cp_at_(s, j, &n);
        if (cls_(t, c) != k) break;
        j += n;
    }
    return j;
}

// \s+(?!\S)|\s+ from a whitespace char at i: all of a run that ends the text, else the run
// minus its last char (so that the last one can prefix the next word), else one char.
// With cl100k's \s*[\r\n]+ before them: up to and including the run's last \r or \n.
static size_t space_run_(const Tokenizer *t, const uint8_t *s, size_t i, size_t end, int crlf) {
    size_t j = i, last = i, nl = (size_t)-1;
    int count = 0;
    while (j < end) {
        int n;
        uint32_t c = cp_at_(s, j, &n);
        if (cls_(t, c) != C_S) break;
        if (c == '\r' || c == '\n') nl = j;
        last = j;
        j += n;
        count++;
    }
    if (crlf && nl != (size_t)-1) return nl + 1;
    if (j == end || count == 1) return j;
    return last;
}

static size_t scan_gpt2_(const Tokenizer *t, const uint8_t *s, size_t i, size_t end) {
    if (s[i] == '\'' && i + 1 < end) { // 's|'t|'re|'ve|'m|'ll|'d
        uint8_t c = s[i + 1];
        if (c == 's' || c == 't' || c == 'm' || c == 'd') return i + 2;
        if (i + 2 < end) {
            uint8_t d = s[i + 2];
            if ((c == 'r' && d == 'e') || (c == 'v' && d == 'e') || (c == 'l' && d == 'l'))
                return i + 3;
        }
    }
    int n;
    uint32_t c = cp_at_(s, i, &n);
    if (c == ' ' && i + 1 < end) { // ' ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+' with the space
        int n2;
        int k2 = cls_(t, cp_at_(s, i + 1, &n2));
        if (k2 != C_S) return run_(t, s, i + 1 + n2, end, k2);
    }
    int k = cls_(t, c);
    if (k != C_S) return run_(t, s, i + n, end, k);
    return space_run_(t, s, i, end, 0);
}

static inline uint32_t fold_(uint32_t c) { // the case folds that reach 's t re ve m ll d
    if (c >= 'A' && c <= 'Z') return c + 32;
    if (c == 0x17F) return 's'; // LATIN SMALL LETTER LONG S folds to s
    return c;
}

static size_t crlf_tail_(const uint8_t *s, size_t j, size_t end) {
    while (j < end && (s[j] == '\r' || s[j] == '\n')) j++;
    return j;
}

static size_t scan_cl100k_(const Tokenizer *t, const uint8_t *s, size_t i, size_t end) {
    if (s[i] == '\'' && i + 1 < end) { // (?i:'s|'t|'re|'ve|'m|'ll|'d)
        int n1;
        uint32_t c = fold_(cp_at_(s, i + 1, &n1));
        if (c == 's' || c == 't' || c == 'm' || c == 'd') return i + 1 + n1;
        if ((c == 'r' || c == 'v' || c == 'l') && i + 1 + n1 < end) {
            int n2;
            uint32_t d = fold_(cp_at_(s, i + 1 + n1, &n2));
            if ((c == 'r' && d == 'e') || (c == 'v' && d == 'e') || (c == 'l' && d == 'l'))
                return i + 1 + n1 + n2;
        }
    }
    int n;
    uint32_t c = cp_at_(s, i, &n);
    int k = cls_(t, c);
    if (k == C_L) return run_(t, s, i + n, end, C_L); // [^\r\n\p{L}\p{N}]?\p{L}+
    if (k != C_N && c != '\r' && c != '\n' && i + n < end) {
        int n2;
        if (cls_(t, cp_at_(s, i + n, &n2)) == C_L) return run_(t, s, i + n + n2, end, C_L);
    }
    if (k == C_N) { // \p{N}{1,3}
        size_t j = i + n;
        for (int m = 1; m < 3 && j < end; m++) {
            int n2;
            if (cls_(t, cp_at_(s, j, &n2)) != C_N) break;
            j += n2;
        }
        return j;
    }
    if (c == ' ' && i + 1 < end) { // ' ?[^\s\p{L}\p{N}]+[\r\n]*' with the space
        int n2;
        if (cls_(t, cp_at_(s, i + 1, &n2)) == C_O)
            return crlf_tail_(s, run_(t, s, i + 1 + n2, end, C_O), end);
    }
    if (k == C_O) return crlf_tail_(s, run_(t, s, i + n, end, C_O), end);
    return space_run_(t, s, i, end, 1);
}

// ---- BPE ----

static inline int merge_get_(const Tokenizer *t, int32_t a, int32_t b, uint32_t *rank,
                             int32_t *id) {
    uint64_t key = (((uint64_t)(uint32_t)a << 32) | (uint32_t)b) + 1;
    size_t mask = t->merges_cap - 1, h = hash_u64_(key) & mask;
    for (;;) {
        const MergeSlot *m = &t->merges[h];
        if (m->key == key) {
            *rank = m->rank;
            *id = m->id;
            return 1;
        }
        if (m->key == 0) return 0;
        h = (h + 1) & mask;
    }
}

static int str_lookup_(const Tokenizer *t, const char *s, size_t n) {
    size_t mask = t->smap_cap - 1, h = hash_bytes_(s, n) & mask;
    for (;;) {
        uint32_t v = t->smap[h];
        if (!v) return -1;
        const char *k = t->tok[v - 1];
        if (strlen(k) == n && memcmp(k, s, n) == 0) return (int)v - 1;
        h = (h + 1) & mask;
    }
}

static void ids_push_(TokIds *o, int32_t id) {
    if (o->n == o->cap) {
        o->cap = o->cap ? o->cap * 2 : 1024;
        o->ids = realloc(o->ids, o->cap * sizeof(int32_t));
        if (!o->ids) moet_die("tokenizer: out of memory");
    }
    o->ids[o->n++] = id;
}

void tokids_free(TokIds *b) {
    free(b->ids);
    b->ids = NULL;
    b->n = b->cap = 0;
}

enum { BPE_SMALL = 128 }; // pieces up to this many bytes: O(n^2) array merge; longer: heap

static void bpe_small_(const Tokenizer *t, const uint8_t *p, size_t n, TokIds *out) {
    int32_t sym[BPE_SMALL], mid[BPE_SMALL];
    uint32_t rk[BPE_SMALL];
    for (size_t i = 0; i < n; i++) sym[i] = t->byte_id[p[i]];
    for (size_t i = 0; i + 1 < n; i++)
        if (!merge_get_(t, sym[i], sym[i + 1], &rk[i], &mid[i])) rk[i] = UINT32_MAX;
    while (n > 1) {
        size_t best = 0;
        for (size_t i = 1; i + 1 < n; i++)
            if (rk[i] < rk[best]) best = i;
        if (rk[best] == UINT32_MAX) break;
        sym[best] = mid[best];
        size_t tail = n - best - 2; // entries after best + 1
        memmove(sym + best + 1, sym + best + 2, tail * sizeof(int32_t));
        memmove(rk + best + 1, rk + best + 2, tail * sizeof(uint32_t));
        memmove(mid + best + 1, mid + best + 2, tail * sizeof(int32_t));
        n--;
        if (best + 1 < n && !merge_get_(t, sym[best], sym[best + 1], &rk[best], &mid[best]))
            rk[best] = UINT32_MAX;
        if (best > 0 && !merge_get_(t, sym[best - 1], sym[best], &rk[best - 1], &mid[best - 1]))
            rk[best - 1] = UINT32_MAX;
    }
    for (size_t i = 0; i < n; i++) ids_push_(out, sym[i]);
}

// Min-heap of (rank << 32 | pos) with lazy invalidation: the same order as HF (rank, then pos).
static void heap_push_(uint64_t *h, size_t *n, uint64_t v) {
    size_t i = (*n)++;
    while (i > 0 && h[(i - 1) / 2] > v) {
        h[i] = h[(i - 1) / 2];
        i = (i - 1) / 2;
    }
    h[i] = v;
}

static uint64_t heap_pop_(uint64_t *h, size_t *n) {
    uint64_t top = h[0], v = h[--(*n)];
    size_t i = 0;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= *n) break;
        if (c + 1 < *n && h[c + 1] < h[c]) c++;
        if (h[c] >= v) break;
        h[i] = h[c];
        i = c;
    }
    h[i] = v;
    return top;
}

static void bpe_large_(const Tokenizer *t, const uint8_t *p, size_t n, TokIds *out) {
    int32_t *sym = malloc(n * sizeof(int32_t)), *nx = malloc(n * sizeof(int32_t)),
            *pv = malloc(n * sizeof(int32_t));
    uint64_t *h = malloc(n * 2 * sizeof(uint64_t));
    if (!sym || !nx || !pv || !h) moet_die("tokenizer: out of memory");
    size_t hn = 0;
    for (size_t i = 0; i < n; i++) {
        sym[i] = t->byte_id[p[i]];
        nx[i] = i + 1 < n ? (int32_t)(i + 1) : -1;
        pv[i] = (int32_t)i - 1;
    }
    uint32_t r;
    int32_t id;
    for (size_t i = 0; i + 1 < n; i++)
        if (merge_get_(t, sym[i], sym[i + 1], &r, &id)) heap_push_(h, &hn, ((uint64_t)r << 32) | i);
    while (hn) {
        uint64_t top = heap_pop_(h, &hn);
        uint32_t rank = (uint32_t)(top >> 32);
        int32_t i = (int32_t)(uint32_t)top;
        if (sym[i] < 0 || nx[i] < 0) continue; // merged away, or now last
        int32_t j = nx[i];
        if (!merge_get_(t, sym[i], sym[j], &r, &id) || r != rank) continue; // stale
        sym[i] = id;
        sym[j] = -1;
        nx[i] = nx[j];
        if (nx[j] >= 0) pv[nx[j]] = i;
        if (pv[i] >= 0 && merge_get_(t, sym[pv[i]], sym[i], &r, &id))
            heap_push_(h, &hn, ((uint64_t)r << 32) | (uint32_t)pv[i]);
        if (nx[i] >= 0 && merge_get_(t, sym[i], sym[nx[i]], &r, &id))
            heap_push_(h, &hn, ((uint64_t)r << 32) | (uint32_t)i);
    }
    for (int32_t i = 0; i >= 0; i = nx[i]) ids_push_(out, sym[i]);
    free(sym);
    free(nx);
    free(pv);
    free(h);
}

// The byte-level token string (GPT-2's byte-to-unicode characters) of raw bytes, for the
// ignore_merges whole-piece lookup.
static size_t byte_level_(const uint8_t *p, size_t n, char *dst);

static void bpe_piece_(const Tokenizer *t, const uint8_t *p, size_t n, TokIds *out) {
    if (n == 1) {
        ids_push_(out, t->byte_id[p[0]]);
        return;
    }
    if (t->ignore_merges) {
        char *bl = malloc(n * 2); // a rare option: no effort spent on allocations
        if (!bl) moet_die("tokenizer: out of memory");
        size_t bn = byte_level_(p, n, bl);
        int id = str_lookup_(t, bl, bn);
        free(bl);
        if (id >= 0) {
            ids_push_(out, id);
            return;
        }
    }
    if (n <= BPE_SMALL)
        bpe_small_(t, p, n, out);
    else
        bpe_large_(t, p, n, out);
}

// ---- byte-to-unicode ----

static void byte_to_unicode_(uint32_t map[256]) {
    int k = 0;
    for (int b = 0; b < 256; b++) {
        int printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174);
        map[b] = printable ? (uint32_t)b : (uint32_t)(256 + k++);
    }
}

static size_t byte_level_(const uint8_t *p, size_t n, char *dst) {
    uint32_t map[256];
    byte_to_unicode_(map);
    size_t o = 0;
    for (size_t i = 0; i < n; i++) {
        uint32_t c = map[p[i]];
        if (c < 0x80)
            dst[o++] = (char)c;
        else {
            dst[o++] = (char)(0xC0 | (c >> 6));
            dst[o++] = (char)(0x80 | (c & 0x3F));
        }
    }
    return o;
}

// ---- pre-tokenize + encode ----

typedef size_t (*ScanFn)(const Tokenizer *, const uint8_t *, size_t, size_t);

// Calls emit(piece) for every pre-token of s[0..n). Returns nonzero on a regex error.
static int pretok_(const Tokenizer *t, const uint8_t *s, size_t n, int force_regex,
                   void (*emit)(const Tokenizer *, const uint8_t *, size_t, size_t, void *),
                   void *ctx) {
    if (t->pre != PRE_REGEX && !force_regex) {
        ScanFn scan = t->pre == PRE_GPT2 ? scan_gpt2_ : scan_cl100k_;
        for (size_t i = 0; i < n;) {
            size_t j = scan(t, s, i, n);
            emit(t, s, i, j, ctx);
            i = j;
        }
        return 0;
    }
    OnigRegion *reg = onig_region_new();
    size_t i = 0;
    while (i < n) {
        int r = onig_search(t->re, s, s + n, s + i, s + n, reg, ONIG_OPTION_NONE);
        if (r == ONIG_MISMATCH) break;
        if (r < 0) {
            onig_region_free(reg, 1);
            return 1;
        }
        size_t ms = (size_t)reg->beg[0], me = (size_t)reg->end[0];
        if (ms > i && t->keep_gaps) emit(t, s, i, ms, ctx);
        if (me == ms) { // an empty match: the next char goes with the gap
            if (me >= n) break;
            int cn;
            cp_at_(s, me, &cn);
            if (t->keep_gaps) emit(t, s, me, me + (size_t)cn, ctx);
            i = me + (size_t)cn;
            continue;
        }
        emit(t, s, ms, me, ctx);
        i = me;
    }
    if (i < n && t->keep_gaps) emit(t, s, i, n, ctx);
    onig_region_free(reg, 1);
    return 0;
}

static void emit_bpe_(const Tokenizer *t, const uint8_t *s, size_t a, size_t b, void *ctx) {
    bpe_piece_(t, s + a, b - a, ctx);
}

// Leftmost-longest added-token match in s[from..n): returns the token id, -1 when none.
static int trie_find_(const Trie *tr, const uint8_t *s, size_t from, size_t n, size_t *ms,
                      size_t *me) {
    if (tr->n <= 1) return -1;
    const int32_t *root = tr->next[0];
    for (size_t i = from; i < n; i++) {
        int32_t node = root[s[i]];
        if (!node) continue;
        int best = -1;
        size_t bend = 0;
        for (size_t j = i + 1;; j++) {
            if (tr->id[node] >= 0) {
                best = tr->id[node];
                bend = j;
            }
            if (j >= n || !(node = tr->next[node][s[j]])) break;
        }
        if (best >= 0) {
            *ms = i;
            *me = bend;
            return best;
        }
    }
    return -1;
}

// NFC of s[0..n) into *buf (only the non-ASCII runs, each with the ASCII char before it, go
// through utf8proc: every ASCII char starts an NFC-stable segment). Returns the length.
static int nfc_(const uint8_t *s, size_t n, uint8_t **buf, size_t *cap, size_t *out_len) {
    size_t o = 0, i = 0;
    while (i < n) {
        size_t a = i;
        while (i < n && s[i] < 0x80) i++;
        size_t b = i; // [a, b) ASCII; then the non-ASCII run [b, c)
        while (i < n && s[i] >= 0x80) i++;
        size_t c = i;
        size_t start = (b > a && c > b) ? b - 1 : b;
        size_t need = o + (start - a) + (c - start) * 3 + 16;
        if (need > *cap) {
            *cap = need * 2;
            *buf = realloc(*buf, *cap);
            if (!*buf) moet_die("tokenizer: out of memory");
        }
        memcpy(*buf + o, s + a, start - a);
        o += start - a;
        if (c > start) {
            utf8proc_uint8_t *d = NULL;
            utf8proc_ssize_t r = utf8proc_map(s + start, (utf8proc_ssize_t)(c - start), &d,
                                              UTF8PROC_STABLE | UTF8PROC_COMPOSE);
            if (r < 0) return 1;
            if (o + (size_t)r > *cap) {
                *cap = (o + (size_t)r) * 2;
                *buf = realloc(*buf, *cap);
                if (!*buf) moet_die("tokenizer: out of memory");
            }
            memcpy(*buf + o, d, (size_t)r);
            o += (size_t)r;
            free(d);
        }
    }
    *out_len = o;
    return 0;
}

typedef struct {
    uint8_t *nfc;
    size_t nfc_cap;
} Scratch;

static int encode_segment_(const Tokenizer *t, const uint8_t *s, size_t n, TokIds *out,
                           Scratch *sc) {
    if (t->nfc) {
        size_t i = 0;
        while (i < n && s[i] < 0x80) i++;
        if (i < n) {
            size_t m;
            if (nfc_(s, n, &sc->nfc, &sc->nfc_cap, &m)) return 1;
            s = sc->nfc;
            n = m;
        }
    }
    size_t pos = 0, ms, me;
    for (;;) {
        int id = trie_find_(&t->norm, s, pos, n, &ms, &me);
        size_t stop = id >= 0 ? ms : n;
        if (pretok_(t, s + pos, stop - pos, 0, emit_bpe_, out)) return 1;
        if (id < 0) break;
        ids_push_(out, id);
        pos = me;
    }
    return 0;
}

int tokenizer_encode(const Tokenizer *t, const char *text, size_t len, TokIds *out, MoetErr *err) {
    const uint8_t *s = (const uint8_t *)text;
    size_t bad = utf8_invalid_at_(s, len);
    if (bad < len)
        return moet_errf(err, MOET_EFAIL, "tokenizer_encode: invalid UTF-8 at byte %zu (0x%02x)",
                         bad, s[bad]);
    size_t n0 = out->n, pos = 0, ms, me;
    Scratch sc = {0};
    int rc = 0;
    for (;;) {
        int id = trie_find_(&t->raw, s, pos, len, &ms, &me);
        size_t stop = id >= 0 ? ms : len;
        if (stop > pos && (rc = encode_segment_(t, s + pos, stop - pos, out, &sc))) break;
        if (id < 0) break;
        ids_push_(out, id);
        pos = me;
    }
    free(sc.nfc);
    if (rc) {
        out->n = n0;
        return moet_errf(err, MOET_EFAIL, "tokenizer_encode: normalization or regex failed");
    }
    return 0;
}

static void emit_end_(const Tokenizer *t, const uint8_t *s, size_t a, size_t b, void *ctx) {
    (void)t;
    (void)s;
    (void)a;
    ids_push_(ctx, (int32_t)b);
}

int tokenizer_pretokenize(const Tokenizer *t, const char *text, size_t len, int force_regex,
                          TokIds *ends, MoetErr *err) {
    if (len >= (size_t)INT32_MAX || utf8_invalid_at_((const uint8_t *)text, len) < len)
        return moet_errf(err, MOET_EFAIL, "tokenizer_pretokenize: invalid UTF-8 or too long");
    if (pretok_(t, (const uint8_t *)text, len, force_regex, emit_end_, ends))
        return moet_errf(err, MOET_EFAIL, "tokenizer_pretokenize: regex search failed");
    return 0;
}

// ---- decode ----

char *tokenizer_decode(const Tokenizer *t, const int32_t *ids, size_t n, size_t *len_out) {
    size_t total = 0;
    for (size_t i = 0; i < n; i++)
        if (ids[i] >= 0 && ids[i] < t->vocab_size)
            total += t->dec_off[ids[i] + 1] - t->dec_off[ids[i]];
    uint8_t *raw = malloc(total + 1);
    char *res = malloc(total * 3 + 1); // each invalid byte becomes 3 bytes of U+FFFD at most
    if (!raw || !res) moet_die("tokenizer: out of memory");
    size_t o = 0;
    for (size_t i = 0; i < n; i++) {
        if (ids[i] < 0 || ids[i] >= t->vocab_size) continue; // HF skips unknown ids
        size_t a = t->dec_off[ids[i]], b = t->dec_off[ids[i] + 1];
        memcpy(raw + o, t->dec + a, b - a);
        o += b - a;
    }
    size_t r = 0;
    for (size_t i = 0; i < o;) {
        int vp, k = utf8_seq_(raw, i, o, &vp);
        if (k) {
            memcpy(res + r, raw + i, (size_t)k);
            r += (size_t)k;
            i += (size_t)k;
        } else { // one U+FFFD per maximal invalid subpart, as Rust's from_utf8_lossy
            memcpy(res + r, "\xEF\xBF\xBD", 3);
            r += 3;
            i += (size_t)vp;
        }
    }
    res[r] = 0;
    free(raw);
    if (len_out) *len_out = r;
    return res;
}

// ---- accessors ----

int tokenizer_vocab_size(const Tokenizer *t) {
    return t->vocab_size;
}

int tokenizer_token_id(const Tokenizer *t, const char *token) {
    return str_lookup_(t, token, strlen(token));
}

const char *tokenizer_token_string(const Tokenizer *t, int id) {
    return id >= 0 && id < t->vocab_size ? t->tok[id] : NULL;
}

int tokenizer_eos_id(const Tokenizer *t) {
    return t->eos;
}

// ---- loading ----

static void trie_free_(Trie *tr) {
    free(tr->next);
    free(tr->id);
}

static void trie_add_(Trie *tr, const char *s, int id) {
    if (tr->n == 0) tr->n = 1; // the root
    int node = 0;
    for (size_t i = 0;; i++) {
        if (tr->n + 1 > tr->cap) {
            int cap = tr->cap ? tr->cap * 2 : 64;
            tr->next = realloc(tr->next, (size_t)cap * sizeof *tr->next);
            tr->id = realloc(tr->id, (size_t)cap * sizeof(int32_t));
            if (!tr->next || !tr->id) moet_die("tokenizer: out of memory");
            if (tr->cap == 0) {
                memset(tr->next[0], 0, sizeof tr->next[0]);
                tr->id[0] = -1;
            }
            tr->cap = cap;
        }
        if (!s[i]) break;
        uint8_t b = (uint8_t)s[i];
        if (!tr->next[node][b]) {
            memset(tr->next[tr->n], 0, sizeof tr->next[0]);
            tr->id[tr->n] = -1;
            tr->next[node][b] = tr->n++;
        }
        node = tr->next[node][b];
    }
    tr->id[node] = id;
}

void tokenizer_free(Tokenizer *t) {
    if (!t) return;
    if (t->tok)
        for (int i = 0; i < t->vocab_size; i++) free(t->tok[i]);
    free(t->tok);
    free(t->smap);
    free(t->merges);
    free(t->dec);
    free(t->dec_off);
    trie_free_(&t->raw);
    trie_free_(&t->norm);
    if (t->re) onig_free(t->re);
    free(t);
}

static char *read_file_(const char *path, size_t *n) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long sz = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *buf = sz >= 0 ? malloc((size_t)sz + 1) : NULL;
    if (buf && fread(buf, 1, (size_t)sz, f) != (size_t)sz) {
        free(buf);
        buf = NULL;
    }
    fclose(f);
    if (buf) buf[sz] = 0;
    *n = (size_t)sz;
    return buf;
}

static int is_null_(const cJSON *j) {
    return !j || cJSON_IsNull(j);
}

static int set_token_(Tokenizer *t, int id, const char *s, const char *path, MoetErr *err) {
    if (id < 0 || id >= t->vocab_size)
        return moet_errf(err, MOET_EUSAGE, "%s: token id %d out of range", path, id);
    if (t->tok[id]) {
        if (strcmp(t->tok[id], s) != 0)
            return moet_errf(err, MOET_EUSAGE, "%s: id %d is both \"%s\" and \"%s\"", path, id,
                             t->tok[id], s);
        return 0;
    }
    t->tok[id] = strdup(s);
    if (!t->tok[id]) moet_die("tokenizer: out of memory");
    return 0;
}

static int load_pre_(Tokenizer *t, const cJSON *pre, const char **pattern, const char *path,
                     MoetErr *err) {
    const cJSON *split = NULL, *bl = NULL;
    const char *type = cJSON_GetStringValue(cJSON_GetObjectItem(pre, "type"));
    if (type && strcmp(type, "ByteLevel") == 0)
        bl = pre;
    else if (type && strcmp(type, "Sequence") == 0) {
        const cJSON *seq = cJSON_GetObjectItem(pre, "pretokenizers");
        if (cJSON_GetArraySize(seq) == 2) {
            split = cJSON_GetArrayItem(seq, 0);
            bl = cJSON_GetArrayItem(seq, 1);
            const char *t0 = cJSON_GetStringValue(cJSON_GetObjectItem(split, "type"));
            const char *t1 = cJSON_GetStringValue(cJSON_GetObjectItem(bl, "type"));
            if (!t0 || strcmp(t0, "Split") != 0 || !t1 || strcmp(t1, "ByteLevel") != 0) bl = NULL;
        }
    }
    if (!bl)
        return moet_errf(
            err, MOET_EUSAGE,
            "%s: pre_tokenizer: only ByteLevel or Sequence[Split, ByteLevel] is supported", path);
    if (cJSON_IsTrue(cJSON_GetObjectItem(bl, "add_prefix_space")))
        return moet_errf(err, MOET_EUSAGE,
                         "%s: pre_tokenizer: ByteLevel add_prefix_space=true is unsupported", path);
    const cJSON *ur = cJSON_GetObjectItem(bl, "use_regex");
    int use_regex = !ur || cJSON_IsTrue(ur);
    if (!split) {
        if (!use_regex)
            return moet_errf(err, MOET_EUSAGE,
                             "%s: pre_tokenizer: ByteLevel without regex is unsupported", path);
        *pattern = GPT2_PATTERN_;
        t->keep_gaps = 1;
    } else {
        if (use_regex)
            return moet_errf(
                err, MOET_EUSAGE,
                "%s: pre_tokenizer: Split followed by a regex ByteLevel is unsupported", path);
        *pattern = cJSON_GetStringValue(
            cJSON_GetObjectItem(cJSON_GetObjectItem(split, "pattern"), "Regex"));
        const char *beh = cJSON_GetStringValue(cJSON_GetObjectItem(split, "behavior"));
        int inv = cJSON_IsTrue(cJSON_GetObjectItem(split, "invert"));
        if (!*pattern || !beh)
            return moet_errf(err, MOET_EUSAGE,
                             "%s: pre_tokenizer: Split needs a Regex pattern and a behavior", path);
        if (strcmp(beh, "Removed") == 0 && inv)
            t->keep_gaps = 0;
        else if (strcmp(beh, "Isolated") == 0 && !inv)
            t->keep_gaps = 1;
        else
            return moet_errf(err, MOET_EUSAGE,
                             "%s: pre_tokenizer: Split behavior %s invert=%d is unsupported", path,
                             beh, inv);
    }
    if (strcmp(*pattern, GPT2_PATTERN_) == 0)
        t->pre = PRE_GPT2;
    else if (strcmp(*pattern, CL100K_PATTERN_) == 0)
        t->pre = PRE_CL100K;
    else
        t->pre = PRE_REGEX;
    OnigErrorInfo einfo;
    const OnigUChar *pat = (const OnigUChar *)*pattern;
    int r = onig_new(&t->re, pat, pat + strlen(*pattern), ONIG_OPTION_NONE, ONIG_ENCODING_UTF8,
                     ONIG_SYNTAX_ONIGURUMA, &einfo);
    if (r != ONIG_NORMAL) {
        OnigUChar msg[ONIG_MAX_ERROR_MESSAGE_LEN];
        onig_error_code_to_str(msg, r, &einfo);
        t->re = NULL;
        return moet_errf(err, MOET_EUSAGE, "%s: pre_tokenizer pattern: %s", path, (char *)msg);
    }
    return 0;
}

static int load_json_(Tokenizer *t, const cJSON *root, const char *path, MoetErr *err) {
    const cJSON *model = cJSON_GetObjectItem(root, "model");
    const char *mtype = cJSON_GetStringValue(cJSON_GetObjectItem(model, "type"));
    if (!mtype || strcmp(mtype, "BPE") != 0)
        return moet_errf(err, MOET_EUSAGE, "%s: model.type must be BPE", path);
    const cJSON *x;
    if ((x = cJSON_GetObjectItem(model, "dropout")) && !is_null_(x) && x->valuedouble != 0)
        return moet_errf(err, MOET_EUSAGE, "%s: model.dropout is unsupported", path);
    if (cJSON_IsTrue(cJSON_GetObjectItem(model, "byte_fallback")))
        return moet_errf(err, MOET_EUSAGE, "%s: model.byte_fallback is unsupported", path);
    const char *keys[] = {"continuing_subword_prefix", "end_of_word_suffix"};
    for (int k = 0; k < 2; k++) {
        const char *v = cJSON_GetStringValue(cJSON_GetObjectItem(model, keys[k]));
        if (v && *v)
            return moet_errf(err, MOET_EUSAGE, "%s: model.%s is unsupported", path, keys[k]);
    }
    t->ignore_merges = cJSON_IsTrue(cJSON_GetObjectItem(model, "ignore_merges"));

    const cJSON *norm = cJSON_GetObjectItem(root, "normalizer");
    if (!is_null_(norm)) {
        const char *nt = cJSON_GetStringValue(cJSON_GetObjectItem(norm, "type"));
        if (!nt || strcmp(nt, "NFC") != 0)
            return moet_errf(err, MOET_EUSAGE,
                             "%s: normalizer %s is unsupported (only NFC or null)", path,
                             nt ? nt : "?");
        t->nfc = 1;
    }
    const cJSON *dec = cJSON_GetObjectItem(root, "decoder");
    const char *dt = is_null_(dec) ? NULL : cJSON_GetStringValue(cJSON_GetObjectItem(dec, "type"));
    if (dt && strcmp(dt, "ByteLevel") != 0)
        return moet_errf(err, MOET_EUSAGE, "%s: decoder %s is unsupported (only ByteLevel)", path,
                         dt);
    const char *pattern = NULL;
    int rc = load_pre_(t, cJSON_GetObjectItem(root, "pre_tokenizer"), &pattern, path, err);
    if (rc) return rc;

    // Ids: model.vocab and added_tokens (which model.vocab may omit).
    const cJSON *vocab = cJSON_GetObjectItem(model, "vocab");
    const cJSON *added = cJSON_GetObjectItem(root, "added_tokens");
    if (!cJSON_IsObject(vocab)) return moet_errf(err, MOET_EUSAGE, "%s: model.vocab missing", path);
    int maxid = -1;
    for (const cJSON *v = vocab->child; v; v = v->next)
        if (v->valueint > maxid) maxid = v->valueint;
    for (const cJSON *a = added ? added->child : NULL; a; a = a->next) {
        int id = cJSON_GetObjectItem(a, "id") ? cJSON_GetObjectItem(a, "id")->valueint : -1;
        if (id > maxid) maxid = id;
    }
    t->vocab_size = maxid + 1;
    t->tok = calloc((size_t)t->vocab_size, sizeof(char *));
    if (!t->tok) moet_die("tokenizer: out of memory");
    for (const cJSON *v = vocab->child; v; v = v->next)
        if ((rc = set_token_(t, v->valueint, v->string, path, err))) return rc;
    t->eos = -1;
    for (const cJSON *a = added ? added->child : NULL; a; a = a->next) {
        const char *content = cJSON_GetStringValue(cJSON_GetObjectItem(a, "content"));
        const cJSON *idj = cJSON_GetObjectItem(a, "id");
        if (!content || !*content || !cJSON_IsNumber(idj))
            return moet_errf(err, MOET_EUSAGE, "%s: added_tokens: each needs id and content", path);
        const char *flags[] = {"single_word", "lstrip", "rstrip"};
        for (int k = 0; k < 3; k++)
            if (cJSON_IsTrue(cJSON_GetObjectItem(a, flags[k])))
                return moet_errf(err, MOET_EUSAGE, "%s: added token \"%s\": %s=true is unsupported",
                                 path, content, flags[k]);
        if ((rc = set_token_(t, idj->valueint, content, path, err))) return rc;
        const cJSON *nz = cJSON_GetObjectItem(a, "normalized");
        // HF's default: normalized = !special.
        int normalized = nz ? cJSON_IsTrue(nz) : !cJSON_IsTrue(cJSON_GetObjectItem(a, "special"));
        if (normalized && t->nfc) {
            char *nc = (char *)utf8proc_NFC((const utf8proc_uint8_t *)content);
            if (!nc)
                return moet_errf(err, MOET_EUSAGE, "%s: added token \"%s\": bad UTF-8", path,
                                 content);
            trie_add_(&t->norm, nc, idj->valueint);
            free(nc);
        } else
            trie_add_(normalized ? &t->norm : &t->raw, content, idj->valueint);
        if (strcmp(content, "<|endoftext|>") == 0) t->eos = idj->valueint;
    }

    // string -> id map
    t->smap_cap = 1;
    while (t->smap_cap < (size_t)t->vocab_size * 2) t->smap_cap *= 2;
    t->smap = calloc(t->smap_cap, sizeof(uint32_t));
    if (!t->smap) moet_die("tokenizer: out of memory");
    for (int id = 0; id < t->vocab_size; id++) {
        if (!t->tok[id]) continue;
        size_t n = strlen(t->tok[id]), h = hash_bytes_(t->tok[id], n) & (t->smap_cap - 1);
        while (t->smap[h]) h = (h + 1) & (t->smap_cap - 1);
        t->smap[h] = (uint32_t)id + 1;
    }

    // byte ids and decoded bytes of every id (HF's ByteLevel decoder: a token whose chars are
    // all byte-level chars becomes those bytes, any other token its own UTF-8).
    uint32_t map[256];
    byte_to_unicode_(map);
    int16_t inv[512];
    for (int i = 0; i < 512; i++) inv[i] = -1;
    for (int b = 0; b < 256; b++) inv[map[b]] = (int16_t)b;
    for (int b = 0; b < 256; b++) {
        char s[3];
        s[byte_level_((const uint8_t *)&(uint8_t){(uint8_t)b}, 1, s)] = 0;
        t->byte_id[b] = str_lookup_(t, s, strlen(s));
        // GPT-NeoX lacks the bytes that never occur in UTF-8 (0xC0, 0xC1, 0xF5..0xFF): fine.
        int utf8_byte = b != 0xC0 && b != 0xC1 && b < 0xF5;
        if (t->byte_id[b] < 0 && utf8_byte)
            return moet_errf(err, MOET_EUSAGE,
                             "%s: the vocab lacks the byte-level token of byte %d", path, b);
    }
    size_t total = 0;
    for (int id = 0; id < t->vocab_size; id++) total += t->tok[id] ? strlen(t->tok[id]) : 0;
    t->dec = malloc(total + 1);
    t->dec_off = malloc(((size_t)t->vocab_size + 1) * sizeof(size_t));
    if (!t->dec || !t->dec_off) moet_die("tokenizer: out of memory");
    size_t o = 0;
    for (int id = 0; id < t->vocab_size; id++) {
        t->dec_off[id] = o;
        const uint8_t *s = (const uint8_t *)t->tok[id];
        if (!s) continue;
        size_t n = strlen((const char *)s), start = o;
        int all = 1;
        for (size_t i = 0; i < n && all;) {
            int vp, k = utf8_seq_(s, i, n, &vp);
            uint32_t c = k ? cp_at_(s, i, &k) : 0xFFFFFFFF;
            if (!k || c >= 512 || inv[c] < 0)
                all = 0;
            else
                t->dec[o++] = (uint8_t)inv[c];
            i += k ? (size_t)k : 1;
        }
        if (!all) {
            memcpy(t->dec + start, s, n);
            o = start + n;
        }
    }
    t->dec_off[t->vocab_size] = o;

    // merges: (left id, right id) -> (rank, merged id)
    const cJSON *merges = cJSON_GetObjectItem(model, "merges");
    size_t nm = (size_t)cJSON_GetArraySize(merges);
    t->merges_cap = 16;
    while (t->merges_cap < nm * 2) t->merges_cap *= 2;
    t->merges = calloc(t->merges_cap, sizeof(MergeSlot));
    if (!t->merges) moet_die("tokenizer: out of memory");
    char *buf = NULL, *ab = NULL;
    uint32_t rank = 0;
    for (const cJSON *m = merges ? merges->child : NULL; m; m = m->next, rank++) {
        const char *a, *b;
        char *sp = NULL;
        if (cJSON_IsString(m)) {
            free(buf);
            buf = strdup(m->valuestring);
            if (!buf) moet_die("tokenizer: out of memory");
            sp = strchr(buf, ' ');
            if (!sp || strchr(sp + 1, ' ')) {
                rc = moet_errf(err, MOET_EUSAGE, "%s: merge %u \"%s\" is not \"a b\"", path, rank,
                               buf);
                break;
            }
            *sp = 0;
            a = buf;
            b = sp + 1;
        } else if (cJSON_GetArraySize(m) == 2) {
            a = cJSON_GetStringValue(cJSON_GetArrayItem(m, 0));
            b = cJSON_GetStringValue(cJSON_GetArrayItem(m, 1));
            if (!a || !b) {
                rc = moet_errf(err, MOET_EUSAGE, "%s: merge %u is not two strings", path, rank);
                break;
            }
        } else {
            rc = moet_errf(err, MOET_EUSAGE, "%s: merge %u is neither \"a b\" nor [a, b]", path,
                           rank);
            break;
        }
        size_t la = strlen(a), lb = strlen(b);
        int ia = str_lookup_(t, a, la), ib = str_lookup_(t, b, lb);
        free(ab);
        ab = malloc(la + lb + 1);
        if (!ab) moet_die("tokenizer: out of memory");
        memcpy(ab, a, la);
        memcpy(ab + la, b, lb + 1);
        int iab = str_lookup_(t, ab, la + lb);
        if (ia < 0 || ib < 0 || iab < 0) {
            rc = moet_errf(err, MOET_EUSAGE,
                           "%s: merge %u (\"%s\" \"%s\") uses a token not in the vocab", path, rank,
                           a, b);
            break;
        }
        uint64_t key = (((uint64_t)(uint32_t)ia << 32) | (uint32_t)ib) + 1;
        size_t h = hash_u64_(key) & (t->merges_cap - 1);
        while (t->merges[h].key && t->merges[h].key != key) h = (h + 1) & (t->merges_cap - 1);
        if (t->merges[h].key) continue; // a repeated merge keeps its first (lowest) rank
        t->merges[h] = (MergeSlot){key, rank, iab};
    }
    free(buf);
    free(ab);
    if (rc) return rc;
    for (uint32_t c = 0; c < 65536; c++) t->cls_bmp[c] = (uint8_t)class_of_cp_(c);
    return 0;
}

int tokenizer_load(Tokenizer **out, const char *path, MoetErr *err) {
    *out = NULL;
    size_t n;
    char *text = read_file_(path, &n);
    if (!text) return moet_errf(err, MOET_EFAIL, "%s: cannot read the tokenizer file", path);
    cJSON *root = cJSON_ParseWithLength(text, n);
    free(text);
    if (!root) return moet_errf(err, MOET_EUSAGE, "%s: not valid JSON", path);
    static OnigEncoding enc[1] = {ONIG_ENCODING_UTF8};
    onig_initialize(enc, 1); // idempotent
    Tokenizer *t = calloc(1, sizeof *t);
    if (!t) moet_die("tokenizer: out of memory");
    int rc = load_json_(t, root, path, err);
    cJSON_Delete(root);
    if (rc) {
        tokenizer_free(t);
        return rc;
    }
    *out = t;
    return 0;
}
