// shards: the token shard writer (.npy + .csv.gz parts, written as .tmp and renamed when whole).
#include "data/shards.h"

#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <zlib.h>

struct ShardWriter {
    char *dir;
    int group, digits, vocab, dtype_bytes;
    uint64_t max_tokens;
    // the open part
    int part; // index of the open part, or of the next one when none is open
    int open;
    FILE *npy;
    gzFile csv;
    char npy_tmp[4096], csv_tmp[4096];
    uint64_t part_tokens;
    unsigned char *buf; // conversion buffer for one document
    size_t buf_cap;
    // totals
    int parts_done;
    uint64_t tokens;
};

static void part_name_(const ShardWriter *w, char *buf, size_t n, const char *ext) {
    snprintf(buf, n, "%s/part-%0*d-%05d%s", w->dir, w->digits, w->group, w->part, ext);
}

int shards_open(ShardWriter **out, const char *dir, int group, int group_digits, int vocab_size,
                uint64_t max_tokens, MoetErr *err) {
    *out = NULL;
    if (vocab_size <= 0) return moet_errf(err, MOET_EUSAGE, "shards: vocab size %d", vocab_size);
    if (max_tokens == 0) return moet_errf(err, MOET_EUSAGE, "shards: max tokens per part is 0");
    int rc = moet_mkdirs(dir, err);
    if (rc) return rc;
    // Refuse to mix with the parts of an earlier run of this group.
    char prefix[64];
    snprintf(prefix, sizeof prefix, "part-%0*d-", group_digits, group);
    DIR *d = opendir(dir);
    if (!d) return moet_errf(err, MOET_EFAIL, "%s: cannot list: %s", dir, strerror(errno));
    struct dirent *e;
    while ((e = readdir(d))) {
        size_t n = strlen(e->d_name);
        int is_part = strncmp(e->d_name, prefix, strlen(prefix)) == 0 &&
                      ((n > 4 && strcmp(e->d_name + n - 4, ".npy") == 0) ||
                       (n > 7 && strcmp(e->d_name + n - 7, ".csv.gz") == 0));
        if (is_part) {
            rc = moet_errf(err, MOET_EUSAGE,
                           "%s/%s exists: the output directory already holds parts of group %d\n"
                           "---> HINT: remove them (rm %s/%s*) or choose another --out",
                           dir, e->d_name, group, dir, prefix);
            break;
        }
    }
    closedir(d);
    if (rc) return rc;
    ShardWriter *w = calloc(1, sizeof *w);
    if (!w) moet_die("out of memory");
    w->dir = strdup(dir);
    if (!w->dir) moet_die("out of memory");
    w->group = group;
    w->digits = group_digits;
    w->vocab = vocab_size;
    w->dtype_bytes = vocab_size <= 65536 ? 2 : 4;
    w->max_tokens = max_tokens;
    *out = w;
    return 0;
}

static int open_part_(ShardWriter *w, MoetErr *err) {
    part_name_(w, w->npy_tmp, sizeof w->npy_tmp, ".npy.tmp");
    part_name_(w, w->csv_tmp, sizeof w->csv_tmp, ".csv.gz.tmp");
    w->npy = fopen(w->npy_tmp, "wb");
    if (!w->npy)
        return moet_errf(err, MOET_EFAIL, "%s: cannot create: %s", w->npy_tmp, strerror(errno));
    w->csv = gzopen(w->csv_tmp, "wb6");
    if (!w->csv) {
        fclose(w->npy);
        w->npy = NULL;
        remove(w->npy_tmp);
        return moet_errf(err, MOET_EFAIL, "%s: cannot create: %s", w->csv_tmp, strerror(errno));
    }
    w->open = 1;
    w->part_tokens = 0;
    return 0;
}

static void drop_part_(ShardWriter *w) {
    if (!w->open) return;
    if (w->npy) fclose(w->npy);
    if (w->csv) gzclose(w->csv);
    w->npy = NULL;
    w->csv = NULL;
    remove(w->npy_tmp);
    remove(w->csv_tmp);
    w->open = 0;
}

// Closes the open part and renames it: the .csv.gz first, so that a reader that sees the .npy
// (what loaders glob for) also finds its metadata.
static int finish_part_(ShardWriter *w, MoetErr *err) {
    if (!w->open) return 0;
    int bad_npy = fflush(w->npy) != 0 || ferror(w->npy);
    bad_npy |= fclose(w->npy) != 0;
    w->npy = NULL;
    int bad_csv = gzclose(w->csv) != Z_OK;
    w->csv = NULL;
    if (bad_npy || bad_csv) {
        int e = errno;
        drop_part_(w);
        return moet_errf(err, MOET_EFAIL, "%s: write failed: %s (disk full?)",
                         bad_npy ? w->npy_tmp : w->csv_tmp, strerror(e));
    }
    char npy[4096], csv[4096];
    part_name_(w, npy, sizeof npy, ".npy");
    part_name_(w, csv, sizeof csv, ".csv.gz");
    if (rename(w->csv_tmp, csv) != 0 || rename(w->npy_tmp, npy) != 0) {
        int e = errno;
        w->open = 1; // so that drop_part_ removes what is left
        drop_part_(w);
        remove(csv);
        return moet_errf(err, MOET_EFAIL, "%s: cannot rename: %s", npy, strerror(e));
    }
    w->open = 0;
    w->part++;
    w->parts_done++;
    return 0;
}

// Writes one CSV field, quoted as Python's csv module does (QUOTE_MINIMAL) when it holds a
// comma, a quote or a line break.
static void csv_field_(gzFile f, const char *s) {
    if (!strpbrk(s, ",\"\r\n")) {
        gzputs(f, s);
        return;
    }
    gzputc(f, '"');
    for (; *s; s++) {
        if (*s == '"') gzputc(f, '"');
        gzputc(f, *s);
    }
    gzputc(f, '"');
}

int shards_write_doc(ShardWriter *w, const int32_t *ids, size_t n, const char *id, const char *src,
                     long loc, MoetErr *err) {
    int rc;
    if (w->open && w->part_tokens > 0 && w->part_tokens + n > w->max_tokens) {
        if ((rc = finish_part_(w, err))) return rc;
    }
    if (!w->open && (rc = open_part_(w, err))) return rc;
    size_t bytes = n * (size_t)w->dtype_bytes;
    if (bytes > w->buf_cap) {
        w->buf_cap = bytes * 2;
        free(w->buf);
        w->buf = malloc(w->buf_cap);
        if (!w->buf) moet_die("out of memory");
    }
    // explicit little-endian bytes: the format is LE whatever the host is
    for (size_t i = 0; i < n; i++) {
        int32_t t = ids[i];
        if (t < 0 || t >= w->vocab)
            return moet_errf(err, MOET_EFAIL,
                             "document %s (%s:%ld): token id %d outside the vocabulary [0, %d)", id,
                             src, loc, (int)t, w->vocab);
        unsigned char *p = w->buf + i * (size_t)w->dtype_bytes;
        p[0] = (unsigned char)t;
        p[1] = (unsigned char)(t >> 8);
        if (w->dtype_bytes == 4) {
            p[2] = (unsigned char)(t >> 16);
            p[3] = (unsigned char)(t >> 24);
        }
    }
    if (fwrite(w->buf, 1, bytes, w->npy) != bytes)
        return moet_errf(err, MOET_EFAIL, "%s: write failed: %s (disk full?)", w->npy_tmp,
                         strerror(errno));
    gzprintf(w->csv, "%llu,%llu,", (unsigned long long)w->part_tokens,
             (unsigned long long)(w->part_tokens + n));
    csv_field_(w->csv, id);
    gzputc(w->csv, ',');
    csv_field_(w->csv, src);
    if (gzprintf(w->csv, ",%ld\n", loc) <= 0)
        return moet_errf(err, MOET_EFAIL, "%s: write failed", w->csv_tmp);
    w->part_tokens += n;
    w->tokens += n;
    return 0;
}

int shards_close(ShardWriter *w, MoetErr *err) {
    int rc = finish_part_(w, err);
    if (rc) drop_part_(w);
    return rc;
}

void shards_free(ShardWriter *w) {
    if (!w) return;
    drop_part_(w);
    free(w->buf);
    free(w->dir);
    free(w);
}

void shards_discard(ShardWriter *w) {
    if (!w) return;
    drop_part_(w);
    char path[4096];
    for (w->part = 0; w->part < w->parts_done; w->part++) {
        part_name_(w, path, sizeof path, ".npy");
        remove(path);
        part_name_(w, path, sizeof path, ".csv.gz");
        remove(path);
    }
    shards_free(w);
}

int shards_parts_done(const ShardWriter *w) {
    return w->parts_done;
}
uint64_t shards_tokens(const ShardWriter *w) {
    return w->tokens;
}
int shards_dtype_bytes(const ShardWriter *w) {
    return w->dtype_bytes;
}
