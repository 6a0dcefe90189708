// safetensors: the reader (mmap + header checks + conversion to fp32) and the writer (fp32 data
// as F32 or BF16, large sequential writes). Format: https://github.com/huggingface/safetensors.
#include "train/safetensors.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

// The safetensors library refuses headers above 100 MB; so do we (a corrupt length field
// would otherwise make us parse gigabytes of tensor data as JSON).
#define ST_MAX_HEADER_ (100u << 20)
// Conversion buffer of the writer: large writes, bounded memory.
#define ST_WRITE_CHUNK_ (16u << 20)

static int little_endian_(void) {
    const uint16_t one = 1;
    return *(const uint8_t *)&one == 1;
}

// ---------------------------------------------------------------------------------------
// conversions

uint16_t st_f32_to_bf16(float x) {
    uint32_t u;
    memcpy(&u, &x, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x0040u); // quiet NaN
    u += 0x7fffu + ((u >> 16) & 1u); // round to nearest, ties to even
    return (uint16_t)(u >> 16);
}

float st_bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float x;
    memcpy(&x, &u, 4);
    return x;
}

float st_f16_to_f32(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, u;
    if (exp == 0x1f) {
        u = sign | 0x7f800000u | (man << 13); // inf, NaN
    } else if (exp != 0) {
        u = sign | ((exp + 112) << 23) | (man << 13); // rebias 15 -> 127
    } else if (man == 0) {
        u = sign;
    } else { // subnormal half: a normal float
        int e = -1;
        do {
            man <<= 1;
            e++;
        } while (!(man & 0x400u));
        u = sign | ((uint32_t)(112 - e) << 23) | ((man & 0x3ffu) << 13);
    }
    float x;
    memcpy(&x, &u, 4);
    return x;
}

// ---------------------------------------------------------------------------------------
// reader

static int dtype_size_(const char *d) {
    static const struct {
        const char *name;
        int size;
    } T[] = {{"F64", 8}, {"F32", 4}, {"F16", 2},  {"BF16", 2},    {"I64", 8},
             {"U64", 8}, {"I32", 4}, {"U32", 4},  {"I16", 2},     {"U16", 2},
             {"I8", 1},  {"U8", 1},  {"BOOL", 1}, {"F8_E4M3", 1}, {"F8_E5M2", 1}};
    for (size_t i = 0; i < sizeof T / sizeof T[0]; i++)
        if (strcmp(d, T[i].name) == 0) return T[i].size;
    return 0;
}

static int is_count_(const cJSON *v) {
    return cJSON_IsNumber(v) && v->valuedouble >= 0 && v->valuedouble <= 9007199254740992.0 &&
           v->valuedouble == floor(v->valuedouble);
}

// Fills t from one header entry; the checks that need the file size are the caller's.
static int parse_entry_(const SafeTensors *st, const cJSON *e, StTensor *t, MoetErr *err) {
    const cJSON *dt = cJSON_GetObjectItemCaseSensitive(e, "dtype");
    const cJSON *sh = cJSON_GetObjectItemCaseSensitive(e, "shape");
    const cJSON *off = cJSON_GetObjectItemCaseSensitive(e, "data_offsets");
    if (!cJSON_IsObject(e) || !cJSON_IsString(dt) || !cJSON_IsArray(sh) || !cJSON_IsArray(off) ||
        cJSON_GetArraySize(off) != 2)
        return moet_errf(err, MOET_EFAIL,
                         "%s: tensor %s: header entry malformed (needs dtype, "
                         "shape and data_offsets [begin, end]); the file is not a valid "
                         "safetensors file",
                         st->path, e->string);
    snprintf(t->dtype_name, sizeof t->dtype_name, "%s", dt->valuestring);
    t->dtype = strcmp(dt->valuestring, "F32") == 0    ? ST_F32
               : strcmp(dt->valuestring, "BF16") == 0 ? ST_BF16
               : strcmp(dt->valuestring, "F16") == 0  ? ST_F16
                                                      : ST_OTHER;
    t->ndim = cJSON_GetArraySize(sh);
    if (t->ndim > ST_MAX_DIMS)
        return moet_errf(err, MOET_EFAIL,
                         "%s: tensor %s has %d dimensions (at most %d "
                         "supported)",
                         st->path, e->string, t->ndim, ST_MAX_DIMS);
    t->numel = 1;
    int d = 0;
    const cJSON *v;
    cJSON_ArrayForEach(v, sh) {
        if (!is_count_(v))
            return moet_errf(err, MOET_EFAIL,
                             "%s: tensor %s: shape holds a value that is not "
                             "a dimension",
                             st->path, e->string);
        t->shape[d++] = (int64_t)v->valuedouble;
        t->numel *= (uint64_t)v->valuedouble;
    }
    if (!is_count_(off->child) || !is_count_(off->child->next))
        return moet_errf(err, MOET_EFAIL, "%s: tensor %s: data_offsets are not byte offsets",
                         st->path, e->string);
    t->begin = (uint64_t)off->child->valuedouble;
    t->end = (uint64_t)off->child->next->valuedouble;
    const uint64_t data_bytes = st->size - st->data_start;
    if (t->begin > t->end || t->end > data_bytes)
        return moet_errf(err, MOET_EFAIL,
                         "%s: tensor %s: data_offsets [%llu, %llu] out of the "
                         "file's data range (%llu bytes): the file is truncated or corrupt",
                         st->path, e->string, (unsigned long long)t->begin,
                         (unsigned long long)t->end, (unsigned long long)data_bytes);
    const int es = dtype_size_(t->dtype_name);
    if (es && t->end - t->begin != t->numel * (uint64_t)es)
        return moet_errf(err, MOET_EFAIL,
                         "%s: tensor %s: data_offsets span %llu bytes, but its "
                         "shape and dtype %s need %llu",
                         st->path, e->string, (unsigned long long)(t->end - t->begin),
                         t->dtype_name, (unsigned long long)(t->numel * (uint64_t)es));
    t->name = strdup(e->string);
    return MOET_OK;
}

static int parse_header_(SafeTensors *st, MoetErr *err) {
    uint64_t n = 0;
    for (int i = 0; i < 8; i++) n |= (uint64_t)st->map[i] << (8 * i);
    if (n > ST_MAX_HEADER_ || n > st->size - 8)
        return moet_errf(err, MOET_EFAIL,
                         "%s: header length %llu is beyond the file's %zu "
                         "bytes (or above 100 MB): the file is truncated or not safetensors",
                         st->path, (unsigned long long)n, st->size);
    st->data_start = 8 + (size_t)n;
    cJSON *h = cJSON_ParseWithLength((const char *)st->map + 8, (size_t)n);
    if (!cJSON_IsObject(h)) {
        cJSON_Delete(h);
        return moet_errf(err, MOET_EFAIL,
                         "%s: the header is not a JSON object (malformed "
                         "JSON): the file is corrupt or not safetensors",
                         st->path);
    }
    st->t = calloc((size_t)cJSON_GetArraySize(h) + 1, sizeof *st->t);
    int rc = MOET_OK;
    const cJSON *e;
    cJSON_ArrayForEach(e, h) {
        if (strcmp(e->string, "__metadata__") == 0) continue;
        if ((rc = parse_entry_(st, e, &st->t[st->n], err))) break;
        st->n++;
    }
    cJSON_Delete(h);
    return rc;
}

int st_open(SafeTensors **out, const char *path, MoetErr *err) {
    *out = NULL;
    if (!little_endian_())
        return moet_errf(err, MOET_EFAIL,
                         "%s: safetensors data is little-endian; this host is "
                         "big-endian (unsupported)",
                         path);
    int fd = open(path, O_RDONLY);
    if (fd < 0) return moet_errf(err, MOET_EFAIL, "%s: cannot open: %s", path, strerror(errno));
    struct stat sb;
    if (fstat(fd, &sb) != 0 || sb.st_size < 8) {
        close(fd);
        return moet_errf(err, MOET_EFAIL,
                         "%s: shorter than the 8-byte header length: truncated "
                         "or not a safetensors file",
                         path);
    }
    void *map = mmap(NULL, (size_t)sb.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd); // the mapping keeps the file
    if (map == MAP_FAILED) return moet_errf(err, MOET_EFAIL, "%s: mmap: %s", path, strerror(errno));
    SafeTensors *st = calloc(1, sizeof *st);
    st->path = strdup(path);
    st->map = map;
    st->size = (size_t)sb.st_size;
    int rc = parse_header_(st, err);
    if (rc) {
        st_close(st);
        return rc;
    }
    *out = st;
    return MOET_OK;
}

void st_close(SafeTensors *st) {
    if (!st) return;
    for (int i = 0; i < st->n; i++) free(st->t[i].name);
    free(st->t);
    if (st->map) munmap((void *)st->map, st->size);
    free(st->path);
    free(st);
}

const StTensor *st_find(const SafeTensors *st, const char *name) {
    for (int i = 0; i < st->n; i++)
        if (strcmp(st->t[i].name, name) == 0) return &st->t[i];
    return NULL;
}

int st_read_f32(const SafeTensors *st, const StTensor *t, uint64_t first, uint64_t count,
                float *dst, MoetErr *err) {
    if (t->dtype == ST_OTHER)
        return moet_errf(err, MOET_EFAIL,
                         "%s: tensor %s has dtype %s; only F32, BF16 and F16 "
                         "are supported (convert the checkpoint, e.g. to bfloat16)",
                         st->path, t->name, t->dtype_name);
    if (first > t->numel || count > t->numel - first)
        return moet_errf(err, MOET_EFAIL, "%s: tensor %s: elements [%llu, +%llu) asked of %llu",
                         st->path, t->name, (unsigned long long)first, (unsigned long long)count,
                         (unsigned long long)t->numel);
    const uint8_t *src = st->map + st->data_start + t->begin;
    if (t->dtype == ST_F32) {
        memcpy(dst, src + 4 * first, 4 * count);
        return MOET_OK;
    }
    // half widths: 2-byte elements, possibly unaligned in the mapping (header length % 2)
    src += 2 * first;
    const int bf = t->dtype == ST_BF16;
#pragma omp parallel for schedule(static) if (count > (1u << 20))
    for (uint64_t i = 0; i < count; i++) {
        const uint16_t h = (uint16_t)(src[2 * i] | (src[2 * i + 1] << 8));
        dst[i] = bf ? st_bf16_to_f32(h) : st_f16_to_f32(h);
    }
    return MOET_OK;
}

// ---------------------------------------------------------------------------------------
// writer

static uint64_t numel_(const StWriteTensor *t) {
    uint64_t n = 1;
    for (int d = 0; d < t->ndim; d++) n *= (uint64_t)t->shape[d];
    return n;
}

// The JSON header, padded with spaces to a multiple of 8 (aligned data; HF does the same).
static char *build_header_(const StWriteTensor *t, int n, uint64_t *len_out) {
    cJSON *h = cJSON_CreateObject(), *meta = cJSON_AddObjectToObject(h, "__metadata__");
    cJSON_AddStringToObject(meta, "format", "pt");
    uint64_t off = 0;
    for (int i = 0; i < n; i++) {
        cJSON *e = cJSON_AddObjectToObject(h, t[i].name);
        cJSON_AddStringToObject(e, "dtype", t[i].dtype == ST_BF16 ? "BF16" : "F32");
        cJSON *sh = cJSON_AddArrayToObject(e, "shape");
        for (int d = 0; d < t[i].ndim; d++)
            cJSON_AddItemToArray(sh, cJSON_CreateNumber((double)t[i].shape[d]));
        const uint64_t bytes = numel_(&t[i]) * (t[i].dtype == ST_BF16 ? 2 : 4);
        cJSON *o = cJSON_AddArrayToObject(e, "data_offsets");
        cJSON_AddItemToArray(o, cJSON_CreateNumber((double)off));
        cJSON_AddItemToArray(o, cJSON_CreateNumber((double)(off + bytes)));
        off += bytes;
    }
    char *json = cJSON_PrintUnformatted(h);
    cJSON_Delete(h);
    const size_t len = strlen(json), padded = (len + 7) / 8 * 8;
    char *out = malloc(padded + 1);
    memcpy(out, json, len);
    memset(out + len, ' ', padded - len);
    out[padded] = 0;
    free(json);
    *len_out = padded;
    return out;
}

static int write_all_(int fd, const void *buf, size_t n) {
    const char *p = buf;
    while (n > 0) {
        ssize_t w = write(fd, p, n > (1u << 30) ? (1u << 30) : n);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) return -1;
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

// One tensor's data: fp32 straight from the source, bf16 through the conversion buffer.
static int write_data_(int fd, const StWriteTensor *t, uint16_t *buf) {
    const uint64_t n = numel_(t);
    if (t->dtype != ST_BF16) return write_all_(fd, t->data, n * 4);
    const uint64_t chunk = ST_WRITE_CHUNK_ / 2;
    for (uint64_t i = 0; i < n; i += chunk) {
        const uint64_t c = n - i < chunk ? n - i : chunk;
#pragma omp parallel for schedule(static) if (c > (1u << 20))
        for (uint64_t j = 0; j < c; j++) buf[j] = st_f32_to_bf16(t->data[i + j]);
        if (write_all_(fd, buf, c * 2)) return -1;
    }
    return 0;
}

int st_write(const char *path, const StWriteTensor *t, int n, uint64_t *bytes_out, MoetErr *err) {
    if (!little_endian_())
        return moet_errf(err, MOET_EFAIL,
                         "%s: safetensors data is little-endian; this host is "
                         "big-endian (unsupported)",
                         path);
    char tmp[4096];
    if (snprintf(tmp, sizeof tmp, "%s.tmp", path) >= (int)sizeof tmp)
        return moet_errf(err, MOET_EFAIL, "%s: path too long", path);
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) return moet_errf(err, MOET_EFAIL, "%s: cannot create: %s", tmp, strerror(errno));
    uint64_t hlen;
    char *header = build_header_(t, n, &hlen);
    uint8_t len8[8];
    for (int i = 0; i < 8; i++) len8[i] = (uint8_t)(hlen >> (8 * i));
    uint16_t *buf = moet_malloc(ST_WRITE_CHUNK_);
    int bad = write_all_(fd, len8, 8) || write_all_(fd, header, hlen);
    for (int i = 0; !bad && i < n; i++) bad = write_data_(fd, &t[i], buf);
    const int e = errno;
    free(buf);
    free(header);
    if (close(fd) != 0 && !bad) bad = 1;
    if (bad || rename(tmp, path) != 0) {
        unlink(tmp);
        return moet_errf(err, MOET_EFAIL, "%s: writing failed: %s (disk full?)", path,
                         strerror(bad ? e : errno));
    }
    if (bytes_out) {
        struct stat sb;
        *bytes_out = stat(path, &sb) == 0 ? (uint64_t)sb.st_size : 0;
    }
    return MOET_OK;
}
