// dolma: numbered lines from plain / gzip / zstd files, and Dolma JSON documents from lines.
#include "data/dolma.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>
#include <zstd.h>

enum { FMT_PLAIN, FMT_GZIP, FMT_ZSTD };
enum { IN_CHUNK = 1 << 18 };

struct DolmaReader {
    FILE *f;
    char *path;
    int fmt;
    uint64_t bytes_in;
    int file_eof;
    // compressed input
    unsigned char *in;
    size_t in_pos, in_len;
    // decoders
    z_stream z;
    int z_ended; // the last gzip member ended (only more members or EOF may follow)
    ZSTD_DStream *zs;
    size_t zs_hint; // ZSTD_decompressStream's last return: 0 = at a frame boundary
    // decompressed text: out[pos..len) not yet returned as lines
    char *out;
    size_t out_pos, out_len, out_cap;
    int out_eof;
    long lineno;
};

static int fill_in_(DolmaReader *r, MoetErr *err) {
    if (r->in_pos < r->in_len || r->file_eof) return 0;
    r->in_len = fread(r->in, 1, IN_CHUNK, r->f);
    r->in_pos = 0;
    r->bytes_in += r->in_len;
    if (r->in_len < IN_CHUNK) {
        if (ferror(r->f))
            return moet_errf(err, MOET_EFAIL, "%s: read error: %s", r->path, strerror(errno));
        r->file_eof = 1;
    }
    return 0;
}

// Decompresses up to cap bytes into dst; *got = 0 only at the end of the data.
static int decode_(DolmaReader *r, char *dst, size_t cap, size_t *got, MoetErr *err) {
    *got = 0;
    for (;;) {
        if (fill_in_(r, err)) return MOET_EFAIL;
        size_t avail = r->in_len - r->in_pos;
        if (r->fmt == FMT_PLAIN) {
            size_t n = avail < cap ? avail : cap;
            memcpy(dst, r->in + r->in_pos, n);
            r->in_pos += n;
            *got = n;
            return 0;
        }
        if (avail == 0 && r->file_eof) {
            if (r->fmt == FMT_GZIP && !r->z_ended)
                return moet_errf(err, MOET_EFAIL,
                                 "%s: truncated gzip data (unexpected end of file)", r->path);
            if (r->fmt == FMT_ZSTD && r->zs_hint != 0)
                return moet_errf(err, MOET_EFAIL,
                                 "%s: truncated zstd data (unexpected end of file)", r->path);
            return 0;
        }
        if (r->fmt == FMT_GZIP) {
            if (r->z_ended) {
                // another gzip member follows (concatenated .gz files are one stream to gzip -d)
                if (inflateReset(&r->z) != Z_OK)
                    return moet_errf(err, MOET_EFAIL, "%s: zlib inflateReset failed", r->path);
                r->z_ended = 0;
            }
            r->z.next_in = r->in + r->in_pos;
            r->z.avail_in = (uInt)avail;
            r->z.next_out = (Bytef *)dst;
            r->z.avail_out = (uInt)cap;
            int zr = inflate(&r->z, Z_NO_FLUSH);
            r->in_pos = r->in_len - r->z.avail_in;
            *got = cap - r->z.avail_out;
            if (zr == Z_STREAM_END)
                r->z_ended = 1;
            else if (zr != Z_OK && zr != Z_BUF_ERROR)
                return moet_errf(err, MOET_EFAIL, "%s: corrupt gzip data (%s)", r->path,
                                 r->z.msg ? r->z.msg : "inflate failed");
        } else {
            ZSTD_inBuffer ib = {r->in + r->in_pos, avail, 0};
            ZSTD_outBuffer ob = {dst, cap, 0};
            size_t zr = ZSTD_decompressStream(r->zs, &ob, &ib);
            if (ZSTD_isError(zr))
                return moet_errf(err, MOET_EFAIL, "%s: corrupt zstd data (%s)", r->path,
                                 ZSTD_getErrorName(zr));
            r->zs_hint = zr;
            r->in_pos += ib.pos;
            *got = ob.pos;
        }
        if (*got > 0) return 0;
    }
}

int dolma_open(DolmaReader **out, const char *path, MoetErr *err) {
    *out = NULL;
    FILE *f = fopen(path, "rb");
    if (!f) return moet_errf(err, MOET_EFAIL, "%s: cannot open: %s", path, strerror(errno));
    DolmaReader *r = calloc(1, sizeof *r);
    if (!r) moet_die("out of memory");
    r->f = f;
    r->path = strdup(path);
    r->in = malloc(IN_CHUNK);
    r->out_cap = 1 << 20;
    r->out = malloc(r->out_cap);
    if (!r->path || !r->in || !r->out) moet_die("out of memory");
    if (fill_in_(r, err)) {
        dolma_close(r);
        return MOET_EFAIL;
    }
    const unsigned char *m = r->in;
    if (r->in_len >= 2 && m[0] == 0x1f && m[1] == 0x8b) {
        r->fmt = FMT_GZIP;
        if (inflateInit2(&r->z, 15 + 16) != Z_OK) moet_die("zlib inflateInit2 failed");
    } else if (r->in_len >= 4 && m[0] == 0x28 && m[1] == 0xb5 && m[2] == 0x2f && m[3] == 0xfd) {
        r->fmt = FMT_ZSTD;
        r->zs = ZSTD_createDStream();
        if (!r->zs) moet_die("ZSTD_createDStream failed");
        ZSTD_initDStream(r->zs);
    } else {
        r->fmt = FMT_PLAIN;
    }
    *out = r;
    return 0;
}

void dolma_close(DolmaReader *r) {
    if (!r) return;
    if (r->fmt == FMT_GZIP) inflateEnd(&r->z);
    if (r->zs) ZSTD_freeDStream(r->zs);
    if (r->f) fclose(r->f);
    free(r->in);
    free(r->out);
    free(r->path);
    free(r);
}

uint64_t dolma_bytes_in(const DolmaReader *r) {
    return r->bytes_in - (r->in_len - r->in_pos);
}

int dolma_next_line(DolmaReader *r, const char **line, size_t *len, long *lineno, MoetErr *err) {
    size_t scanned = r->out_pos; // bytes before this offset hold no '\n'
    for (;;) {
        char *nl = memchr(r->out + scanned, '\n', r->out_len - scanned);
        if (nl || (r->out_eof && r->out_pos < r->out_len)) {
            char *s = r->out + r->out_pos;
            size_t n = nl ? (size_t)(nl - s) : r->out_len - r->out_pos;
            if (!nl) { // a last line without '\n': make room for the NUL
                if (r->out_len == r->out_cap) {
                    r->out_cap *= 2;
                    r->out = realloc(r->out, r->out_cap);
                    if (!r->out) moet_die("out of memory");
                    s = r->out + r->out_pos;
                }
            }
            s[n] = '\0';
            r->out_pos += n + (nl ? 1 : 0);
            if (!nl) r->out_pos = r->out_len;
            *line = s;
            *len = n;
            *lineno = ++r->lineno;
            return 1;
        }
        if (r->out_eof) return 0;
        // keep the unfinished line, move it to the front, and read more
        if (r->out_pos > 0) {
            memmove(r->out, r->out + r->out_pos, r->out_len - r->out_pos);
            r->out_len -= r->out_pos;
            r->out_pos = 0;
        }
        scanned = r->out_len;
        if (r->out_cap - r->out_len < (1 << 16)) {
            r->out_cap *= 2;
            r->out = realloc(r->out, r->out_cap);
            if (!r->out) moet_die("out of memory");
        }
        size_t got = 0;
        // one byte spare, so that a last line without '\n' can always be NUL-terminated
        if (decode_(r, r->out + r->out_len, r->out_cap - r->out_len - 1, &got, err)) return -1;
        if (got == 0) r->out_eof = 1;
        r->out_len += got;
    }
}

// ---------------------------------------------------------------------------------------
// documents

const char *dolma_kind_name(DolmaKind k) {
    switch (k) {
    case DOLMA_DOC:
        return "document";
    case DOLMA_EMPTY:
        return "empty document";
    case DOLMA_BAD_JSON:
        return "malformed JSON";
    case DOLMA_BAD_FIELD:
        return "missing or mistyped field";
    case DOLMA_BAD_UTF8:
        return "invalid UTF-8";
    default:
        return "?";
    }
}

int dolma_utf8_valid(const char *str, size_t n, size_t *bad_at) {
    const unsigned char *s = (const unsigned char *)str;
    size_t i = 0;
    while (i < n) {
        unsigned c = s[i];
        if (c < 0x80) {
            i++;
            continue;
        }
        size_t k;
        unsigned cp, min;
        if (c >= 0xc2 && c <= 0xdf)
            k = 1, cp = c & 0x1f, min = 0x80;
        else if (c >= 0xe0 && c <= 0xef)
            k = 2, cp = c & 0x0f, min = 0x800;
        else if (c >= 0xf0 && c <= 0xf4)
            k = 3, cp = c & 0x07, min = 0x10000;
        else
            goto bad;
        for (size_t j = 1; j <= k; j++) {
            if (i + j >= n || (s[i + j] & 0xc0) != 0x80) goto bad;
            cp = (cp << 6) | (s[i + j] & 0x3f);
        }
        if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) goto bad;
        i += k + 1;
    }
    return 1;
bad:
    if (bad_at) *bad_at = i;
    return 0;
}

// Python's str.isspace() set: the ASCII whitespace and separators \t\n\v\f\r \x1c-\x1f, and
// U+0085, U+00A0, U+1680, U+2000..U+200A, U+2028, U+2029, U+202F, U+205F, U+3000.
static int is_py_space_(unsigned cp) {
    return (cp >= 0x09 && cp <= 0x0d) || (cp >= 0x1c && cp <= 0x20) || cp == 0x85 || cp == 0xa0 ||
           cp == 0x1680 || (cp >= 0x2000 && cp <= 0x200a) || cp == 0x2028 || cp == 0x2029 ||
           cp == 0x202f || cp == 0x205f || cp == 0x3000;
}

// Decodes the (valid) UTF-8 character at s[i]; returns its length.
static size_t utf8_at_(const unsigned char *s, size_t i, unsigned *cp) {
    unsigned c = s[i];
    if (c < 0x80) return *cp = c, 1;
    if (c < 0xe0) return *cp = ((c & 0x1f) << 6) | (s[i + 1] & 0x3f), 2;
    if (c < 0xf0) return *cp = ((c & 0x0f) << 12) | ((s[i + 1] & 0x3f) << 6) | (s[i + 2] & 0x3f), 3;
    *cp = ((c & 0x07) << 18) | ((s[i + 1] & 0x3f) << 12) | ((s[i + 2] & 0x3f) << 6) |
          (s[i + 3] & 0x3f);
    return 4;
}

size_t dolma_strip(const char *str, size_t n, size_t *start) {
    const unsigned char *s = (const unsigned char *)str;
    size_t a = 0, b = n;
    unsigned cp;
    while (a < b) {
        size_t k = utf8_at_(s, a, &cp);
        if (!is_py_space_(cp)) break;
        a += k;
    }
    while (b > a) {
        size_t j = b - 1; // back up to the lead byte of the last character
        while (j > a && (s[j] & 0xc0) == 0x80) j--;
        utf8_at_(s, j, &cp);
        if (!is_py_space_(cp)) break;
        b = j;
    }
    *start = a;
    return b - a;
}

void dolma_doc_free(DolmaDoc *doc) {
    free(doc->id);
    free(doc->source);
    free(doc->text_owned_);
    memset(doc, 0, sizeof *doc);
}

DolmaKind dolma_parse(const char *line, size_t len, DolmaDoc *doc, char *why, size_t why_n) {
    memset(doc, 0, sizeof *doc);
    why[0] = '\0';
    size_t bad_at = 0;
    if (!dolma_utf8_valid(line, len, &bad_at)) {
        snprintf(why, why_n, "invalid UTF-8 at byte %zu of the line", bad_at + 1);
        return DOLMA_BAD_UTF8;
    }
    size_t ws = 0;
    if (dolma_strip(line, len, &ws) == 0) return DOLMA_EMPTY; // a blank line
    const char *end = NULL;
    cJSON *o = cJSON_ParseWithLengthOpts(line, len, &end, 0);
    if (!o) {
        size_t at = end && end >= line ? (size_t)(end - line) + 1 : 1;
        snprintf(why, why_n, "malformed JSON near byte %zu", at);
        return DOLMA_BAD_JSON;
    }
    DolmaKind kind = DOLMA_BAD_FIELD;
    while (end < line + len && (*end == ' ' || *end == '\t' || *end == '\r' || *end == '\n')) end++;
    if (end != line + len) {
        snprintf(why, why_n, "malformed JSON: trailing characters at byte %zu",
                 (size_t)(end - line) + 1);
        kind = DOLMA_BAD_JSON;
        goto done;
    }
    if (!cJSON_IsObject(o)) {
        snprintf(why, why_n, "malformed JSON: not an object");
        kind = DOLMA_BAD_JSON;
        goto done;
    }
    const cJSON *id = cJSON_GetObjectItemCaseSensitive(o, "id");
    const cJSON *text = cJSON_GetObjectItemCaseSensitive(o, "text");
    const cJSON *src = cJSON_GetObjectItemCaseSensitive(o, "source");
    if (!text) {
        snprintf(why, why_n, "no \"text\" field");
        goto done;
    }
    if (!cJSON_IsString(text)) {
        snprintf(why, why_n, "\"text\" is not a string");
        goto done;
    }
    if (!id) {
        snprintf(why, why_n, "no \"id\" field");
        goto done;
    }
    if (!cJSON_IsString(id) && !cJSON_IsNumber(id)) {
        snprintf(why, why_n, "\"id\" is neither a string nor a number");
        goto done;
    }
    if (!src) {
        snprintf(why, why_n, "no \"source\" field");
        goto done;
    }
    if (!cJSON_IsString(src)) {
        snprintf(why, why_n, "\"source\" is not a string");
        goto done;
    }
    // cJSON decodes \u escapes to UTF-8 (a lone surrogate fails the parse), so the decoded text
    // of a valid line is valid UTF-8; check anyway, the tokenizer would refuse it too.
    const char *t = text->valuestring;
    size_t tn = strlen(t);
    if (!dolma_utf8_valid(t, tn, &bad_at)) {
        snprintf(why, why_n, "invalid UTF-8 in \"text\" at byte %zu", bad_at + 1);
        kind = DOLMA_BAD_UTF8;
        goto done;
    }
    size_t a = 0, n = dolma_strip(t, tn, &a);
    if (n == 0) {
        kind = DOLMA_EMPTY;
        goto done;
    }
    doc->text_owned_ = strdup(t);
    doc->source = strdup(src->valuestring);
    if (cJSON_IsString(id)) {
        doc->id = strdup(id->valuestring);
    } else {
        char *p = cJSON_PrintUnformatted(id); // 17 -> "17", 1.5 -> "1.5"
        doc->id = strdup(p ? p : "");
        cJSON_free(p);
    }
    if (!doc->text_owned_ || !doc->source || !doc->id) moet_die("out of memory");
    doc->text = doc->text_owned_ + a;
    doc->text_len = n;
    kind = DOLMA_DOC;
done:
    cJSON_Delete(o);
    return kind;
}
