// ckpt: HDF5 checkpoints (ARCHITECTURE §6): saving (temporary file, fsync, rename, latest.h5
// symlink, retention), loading with shape and checksum checks, verification, and the readers
// used by the HF parity tests (ckpt_load_model, ckpt_read_array).
//
// Every tensor is written and read as "this rank's hyperslab": expert tensors the rows
// [expert_lo, expert_lo + El) of dim 0, every other tensor whole. ckpt_save writes serially
// (H5P_DEFAULT transfer, sec2 driver; a rank holding every expert). ckpt_save_par, for ranks
// that split the experts, writes collectively: H5Pset_fapl_mpio on MPI_COMM_WORLD and a
// collective transfer list, replicated tensors written by rank 0 only and expert tensors by the
// ranks of EP group 0 (the others select nothing but still join every collective call).
// Loading reads each rank's hyperslab independently (sec2), for any world size and ep.
//
// Checksums: attribute `checksum` = "crc32:%08x", zlib's crc32 of the dataset's full contents
// as little-endian fp32 bytes in C order. Expert slices are contiguous in that order, so the
// writers compute the CRC of their slice and combine them in expert order with crc32_combine
// (crc(A||B) = crc32_combine(crc(A), crc(B), len(B))). With one rank the slice is the tensor.
#include "train/ckpt.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <hdf5.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <zlib.h>

#if MOET_MPI
#include <mpi.h>
#endif

#define CKPT_FORMAT "moet-checkpoint"
#define CKPT_FORMAT_VERSION 1
#define PATH_MAX_ 4096

// ---------------------------------------------------------------------------------------
// small helpers: checksums, HDF5 errors, attributes

static int little_endian_(void) {
    const uint32_t one = 1;
    return *(const uint8_t *)&one == 1;
}

// zlib crc32 continued over x[0..n) as little-endian fp32 bytes (zlib takes uInt lengths,
// hence the chunks; big-endian hosts byte-swap a copy).
static uLong crc_f32le_(uLong crc, const float *x, size_t n) {
    const size_t chunk = (size_t)1 << 24;  // floats
    if (little_endian_()) {
        for (size_t i = 0; i < n; i += chunk) {
            size_t c = n - i < chunk ? n - i : chunk;
            crc = crc32(crc, (const Bytef *)(x + i), (uInt)(c * sizeof(float)));
        }
        return crc;
    }
    uint8_t buf[4096];
    for (size_t i = 0; i < n;) {
        size_t c = 0;
        for (; c < sizeof buf / 4 && i < n; c++, i++) {
            uint8_t b[4];
            memcpy(b, &x[i], 4);
            for (int k = 0; k < 4; k++) buf[4 * c + k] = b[3 - k];
        }
        crc = crc32(crc, buf, (uInt)(4 * c));
    }
    return crc;
}

// The CRC of x[0..n): pieces of 16 MiB on all threads, joined in order with crc32_combine
// (the same value as one pass; zlib's crc32 runs at ~1 GB/s per core, which alone would be
// a third of a checkpoint's write time).
static uLong crc_of_(const float *x, size_t n) {
    const size_t piece = (size_t)1 << 22;  // floats
    const size_t np = (n + piece - 1) / piece;
    if (np <= 1) return crc_f32le_(crc32(0L, Z_NULL, 0), x, n);
    uLong *part = moet_malloc(np * sizeof *part);
#pragma omp parallel for schedule(dynamic, 1)
    for (size_t p = 0; p < np; p++) {
        const size_t i0 = p * piece, c = n - i0 < piece ? n - i0 : piece;
        part[p] = crc_f32le_(crc32(0L, Z_NULL, 0), x + i0, c);
    }
    uLong crc = part[0];
    for (size_t p = 1; p < np; p++) {
        const size_t c = n - p * piece < piece ? n - p * piece : piece;
        crc = crc32_combine(crc, part[p], (z_off_t)(c * sizeof(float)));
    }
    free(part);
    return crc;
}

// The innermost message of HDF5's error stack (e.g. the write(2) failure and its errno).
static herr_t walk_first_(unsigned n, const H5E_error2_t *e, void *data) {
    char *buf = data;
    if (n == 0 && e->desc) snprintf(buf, 512, "%s", e->desc);
    return 0;
}

// "what: reason": a system call's failure as strerror(errno) (HDF5's own text for it is a
// multi-line dump of buffers and offsets), anything else as HDF5's message on one line.
static void h5_reason_(char *buf, size_t size, const char *what) {
    char msg[512] = "";
    H5Ewalk2(H5E_DEFAULT, H5E_WALK_UPWARD, walk_first_, msg);
    const char *e = strstr(msg, "errno = ");
    if (e) {
        int code = atoi(e + 8);
        const char *call = strstr(msg, "write") ? "write" : strstr(msg, "read") ? "read" : "I/O";
        snprintf(buf, size, "%s: %s: %s", what, call, strerror(code));
        return;
    }
    for (char *c = msg; *c; c++)
        if (*c == '\n') *c = ' ';
    snprintf(buf, size, "%s%s%s", what, msg[0] ? ": " : "", msg);
}

static void quiet_hdf5_(void) { H5Eset_auto2(H5E_DEFAULT, NULL, NULL); }

static int attr_write_(hid_t loc, const char *name, hid_t ftype, hid_t mtype, const void *v) {
    hid_t s = H5Screate(H5S_SCALAR);
    hid_t a = H5Acreate2(loc, name, ftype, s, H5P_DEFAULT, H5P_DEFAULT);
    herr_t r = a < 0 ? -1 : H5Awrite(a, mtype, v);
    if (a >= 0) H5Aclose(a);
    H5Sclose(s);
    return r < 0 ? -1 : 0;
}

static int attr_i64_(hid_t loc, const char *name, int64_t v) {
    return attr_write_(loc, name, H5T_STD_I64LE, H5T_NATIVE_INT64, &v);
}
static int attr_u64_(hid_t loc, const char *name, uint64_t v) {
    return attr_write_(loc, name, H5T_STD_U64LE, H5T_NATIVE_UINT64, &v);
}
static int attr_f64_(hid_t loc, const char *name, double v) {
    return attr_write_(loc, name, H5T_IEEE_F64LE, H5T_NATIVE_DOUBLE, &v);
}
// Fixed-length, NUL-terminated ASCII string (readable by h5py and h5dump as a plain string).
static int attr_str_(hid_t loc, const char *name, const char *v) {
    hid_t t = H5Tcopy(H5T_C_S1);
    H5Tset_size(t, strlen(v) + 1);
    H5Tset_strpad(t, H5T_STR_NULLTERM);
    int r = attr_write_(loc, name, t, t, v);
    H5Tclose(t);
    return r;
}

// Reads a numeric attribute converted to mtype; -1 if absent or unreadable.
static int attr_read_(hid_t loc, const char *name, hid_t mtype, void *v) {
    if (H5Aexists(loc, name) <= 0) return -1;
    hid_t a = H5Aopen(loc, name, H5P_DEFAULT);
    if (a < 0) return -1;
    herr_t r = H5Aread(a, mtype, v);
    H5Aclose(a);
    return r < 0 ? -1 : 0;
}

// Reads a string attribute (fixed or variable length) into a malloc'ed string; -1 if absent.
static int attr_read_str_(hid_t loc, const char *name, char **out) {
    *out = NULL;
    if (H5Aexists(loc, name) <= 0) return -1;
    hid_t a = H5Aopen(loc, name, H5P_DEFAULT);
    if (a < 0) return -1;
    int rc = -1;
    hid_t type = H5Aget_type(a);
    if (H5Tget_class(type) != H5T_STRING) {
        // not a string
    } else if (H5Tis_variable_str(type) > 0) {
        char *s = NULL;
        hid_t mt = H5Tcopy(H5T_C_S1);
        H5Tset_size(mt, H5T_VARIABLE);
        H5Tset_cset(mt, H5Tget_cset(type));  // HDF5 does not convert ASCII <-> UTF-8
        if (H5Aread(a, mt, &s) >= 0 && s) {
            *out = strdup(s);
            rc = 0;
        }
        if (s) H5free_memory(s);
        H5Tclose(mt);
    } else {
        size_t len = H5Tget_size(type);
        char *s = calloc(len + 1, 1);
        hid_t mt = H5Tcopy(H5T_C_S1);
        H5Tset_size(mt, len);
        H5Tset_cset(mt, H5Tget_cset(type));
        if (H5Aread(a, mt, s) >= 0) {
            *out = s;
            rc = 0;
        } else {
            free(s);
        }
        H5Tclose(mt);
    }
    H5Tclose(type);
    H5Aclose(a);
    return rc;
}

// Opens path read-only with HDF5's own error printing off (we report errors ourselves).
static hid_t open_ro_(const char *path, MoetErr *err) {
    quiet_hdf5_();
    hid_t f = H5Fopen(path, H5F_ACC_RDONLY, H5P_DEFAULT);
    if (f < 0)
        moet_errf(err, MOET_EFAIL, "%s: cannot open as HDF5 (missing, unreadable or not an "
                  "HDF5 file)", path);
    return f;
}

// Opens a checkpoint written by ckpt_save: the file must exist, open, and carry the format.
static hid_t open_ckpt_(const char *path, MoetErr *err) {
    struct stat sb;
    if (stat(path, &sb) != 0) {
        moet_errf(err, MOET_EFAIL, "%s: no such checkpoint (%s)", path, strerror(errno));
        return -1;
    }
    quiet_hdf5_();
    hid_t f = H5Fopen(path, H5F_ACC_RDONLY, H5P_DEFAULT);
    if (f < 0) {
        moet_errf(err, MOET_EFAIL, "%s: cannot read (truncated or not a checkpoint)", path);
        return -1;
    }
    char *fmt = NULL;
    int64_t ver = -1;
    if (attr_read_str_(f, "format", &fmt) != 0 || strcmp(fmt, CKPT_FORMAT) != 0) {
        moet_errf(err, MOET_EFAIL, "%s: not a moet checkpoint (root attribute format is %s%s%s, "
                  "expected \"" CKPT_FORMAT "\")", path, fmt ? "\"" : "", fmt ? fmt : "missing",
                  fmt ? "\"" : "");
        free(fmt);
        H5Fclose(f);
        return -1;
    }
    free(fmt);
    if (attr_read_(f, "format_version", H5T_NATIVE_INT64, &ver) != 0 ||
        ver != CKPT_FORMAT_VERSION) {
        moet_errf(err, MOET_EFAIL, "%s: checkpoint format_version %lld, this moet reads version "
                  "%d ---> HINT: use the moet version that wrote it", path, (long long)ver,
                  CKPT_FORMAT_VERSION);
        H5Fclose(f);
        return -1;
    }
    return f;
}

int ckpt_read_config_text(const char *path, char **text, MoetErr *err) {
    hid_t f = open_ro_(path, err);
    if (f < 0) return MOET_EFAIL;
    int rc = MOET_OK;
    if (H5Aexists(f, "config") <= 0)
        rc = moet_errf(err, MOET_EFAIL, "%s: no `config` attribute on / (not a moet checkpoint?)",
                       path);
    else if (attr_read_str_(f, "config", text) != 0)
        rc = moet_errf(err, MOET_EFAIL, "%s: cannot read the config attribute", path);
    H5Fclose(f);
    return rc;
}

int ckpt_load_config(const char *path, int n_sets, char *const *sets, Config *c, MoetErr *err) {
    char *ini = NULL;
    int rc = ckpt_read_config_text(path, &ini, err);
    if (rc) return rc;
    config_defaults(c);
    rc = config_load_string(c, ini, path, err);
    free(ini);
    for (int i = 0; !rc && i < n_sets; i++) rc = config_set(c, sets[i], err);
    if (rc) return rc;
    c->ep = 1;
    return config_validate(c, path, err);
}

static hid_t mem_type_(CkptType t) {
    return t == CKPT_F32 ? H5T_NATIVE_FLOAT : t == CKPT_F64 ? H5T_NATIVE_DOUBLE : H5T_NATIVE_INT32;
}

int ckpt_read_array(const char *path, const char *name, CkptType type, void *buf, size_t n,
                    MoetErr *err) {
    hid_t f = open_ro_(path, err);
    if (f < 0) return MOET_EFAIL;
    int rc = MOET_OK;
    hid_t d = H5Dopen2(f, name, H5P_DEFAULT);
    if (d < 0) {
        rc = moet_errf(err, MOET_EFAIL, "%s: no dataset %s", path, name);
        goto done;
    }
    hid_t s = H5Dget_space(d);
    hssize_t count = H5Sget_simple_extent_npoints(s);
    if (count != (hssize_t)n) {
        rc = moet_errf(err, MOET_EFAIL, "%s: dataset %s has %lld elements, expected %zu", path,
                       name, (long long)count, n);
    } else if (H5Dread(d, mem_type_(type), H5S_ALL, H5S_ALL, H5P_DEFAULT, buf) < 0) {
        rc = moet_errf(err, MOET_EFAIL, "%s: cannot read dataset %s", path, name);
    } else if (type == CKPT_F32) {  // verified where the writer left a checksum
        char *want = NULL;
        if (attr_read_str_(d, "checksum", &want) == 0) {
            char got[32];
            snprintf(got, sizeof got, "crc32:%08lx", crc_of_(buf, n));
            if (strcmp(got, want) != 0)
                rc = moet_errf(err, MOET_EFAIL, "%s: tensor %s: checksum mismatch (file altered "
                               "or damaged); ---> HINT: use an earlier checkpoint", path, name);
            free(want);
        }
    }
    H5Sclose(s);
    H5Dclose(d);
done:
    H5Fclose(f);
    return rc;
}

// ---------------------------------------------------------------------------------------
// reading tensors

// The global shape as "a,b,c".
static void shape_str_(char *buf, size_t n, int nd, const hsize_t *dims) {
    buf[0] = 0;
    for (int i = 0; i < nd; i++)
        snprintf(buf + strlen(buf), n - strlen(buf), "%s%llu", i ? "," : "",
                 (unsigned long long)dims[i]);
}

// Compares the stored checksum of dataset d (named `name` in messages) with crc. require: a
// missing attribute is an error (files of ckpt_save) or accepted (HF fixture files).
static int check_crc_(hid_t d, const char *path, const char *name, uLong crc, int require,
                      MoetErr *err) {
    char *want = NULL;
    if (attr_read_str_(d, "checksum", &want) != 0) {
        if (!require) return MOET_OK;
        return moet_errf(err, MOET_EFAIL, "%s: tensor %s has no checksum attribute (not written "
                         "by moet, or damaged); ---> HINT: use an earlier checkpoint", path, name);
    }
    char got[32];
    snprintf(got, sizeof got, "crc32:%08lx", crc);
    int rc = MOET_OK;
    if (strcmp(got, want) != 0)
        rc = moet_errf(err, MOET_EFAIL, "%s: tensor %s: checksum mismatch (file altered or "
                       "damaged); ---> HINT: use an earlier checkpoint", path, name);
    free(want);
    return rc;
}

// Reads one tensor from dataset dname into dst: full tensors whole, expert tensors as the local
// slab of experts [expert_lo, expert_lo + El). Checks the shape against the global shape and
// the checksum (over the whole dataset: this rank's slab when it is the whole, else the
// dataset is read once more; the MPI version combines the ranks' slab CRCs instead).
// expert_reads (E counters, may be NULL) counts the expert rows read.
static int load_tensor_(hid_t f, const char *path, const Model *m, const ParamTensor *t,
                        const char *dname, const char *label, float *dst, int require_crc,
                        int *expert_reads, MoetErr *err) {
    if (H5Lexists(f, dname, H5P_DEFAULT) <= 0)
        return moet_errf(err, MOET_EFAIL, "%s: tensor %s is missing (checkpoint of another "
                         "model shape?)", path, label);
    hid_t d = H5Dopen2(f, dname, H5P_DEFAULT);
    if (d < 0)
        return moet_errf(err, MOET_EFAIL, "%s: tensor %s: cannot read (truncated or not a "
                         "checkpoint)", path, label);
    int rc = MOET_OK;
    hid_t s = H5Dget_space(d);
    int nd = H5Sget_simple_extent_ndims(s);
    hsize_t dims[8] = {0};
    if (nd > 8) nd = 8;
    H5Sget_simple_extent_dims(s, dims, NULL);
    int same = nd == t->ndim;
    for (int i = 0; same && i < nd; i++) same = (int64_t)dims[i] == t->global_shape[i];
    if (!same) {
        char got[96], want[96];
        hsize_t gs[MODEL_MAX_DIMS];
        for (int i = 0; i < t->ndim; i++) gs[i] = (hsize_t)t->global_shape[i];
        shape_str_(got, sizeof got, nd, dims);
        shape_str_(want, sizeof want, t->ndim, gs);
        rc = moet_errf(err, MOET_EFAIL, "%s: tensor %s has shape (%s) but the config needs "
                       "(%s)", path, label, got, want);
        goto done;
    }
    hsize_t lshape[MODEL_MAX_DIMS];
    for (int i = 0; i < t->ndim; i++) lshape[i] = (hsize_t)t->shape[i];
    hid_t ms = H5Screate_simple(t->ndim, lshape, NULL);
    int whole = 1;
    if (t->is_expert) {  // this rank's hyperslab: experts [expert_lo, expert_lo + El)
        hsize_t start[MODEL_MAX_DIMS] = {(hsize_t)m->expert_lo, 0, 0};
        H5Sselect_hyperslab(s, H5S_SELECT_SET, start, NULL, lshape, NULL);
        whole = t->shape[0] == t->global_shape[0];
    }
    if (H5Dread(d, H5T_NATIVE_FLOAT, ms, s, H5P_DEFAULT, dst) < 0) {
        rc = moet_errf(err, MOET_EFAIL, "%s: tensor %s: cannot read (truncated or not a "
                       "checkpoint)", path, label);
    } else if (whole) {
        rc = check_crc_(d, path, label, crc_of_(dst, t->numel), require_crc, err);
    } else {
        size_t n = (size_t)H5Sget_simple_extent_npoints(s);
        float *all = moet_malloc(n * sizeof(float));
        if (H5Dread(d, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, all) < 0)
            rc = moet_errf(err, MOET_EFAIL, "%s: tensor %s: cannot read (truncated or not a "
                           "checkpoint)", path, label);
        else
            rc = check_crc_(d, path, label, crc_of_(all, n), require_crc, err);
        free(all);
    }
    if (rc == MOET_OK && t->is_expert && expert_reads)
        for (int64_t e = 0; e < t->shape[0]; e++) expert_reads[m->expert_lo + e]++;
    H5Sclose(ms);
done:
    H5Sclose(s);
    H5Dclose(d);
    return rc;
}

// The expert bias (a no_optim tensor, in /model only) of a file that predates it, or of a run
// without it, is absent: the model starts from a zero bias, as a fresh run does. A file that
// has a non-zero bias for a model without one (softmax router, bias_update_rate 0) is refused:
// loading it would silently route differently from the run that wrote it.
static int check_dropped_bias_(hid_t f, const char *path, const Model *m, MoetErr *err) {
    if (m->E == 0 || m->p.layers[0].expert_bias) return MOET_OK;
    float *b = moet_malloc((size_t)m->E * sizeof(float));
    int rc = MOET_OK;
    for (int l = 0; l < m->L && rc == MOET_OK; l++) {
        char dname[MODEL_NAME_MAX + 32];
        snprintf(dname, sizeof dname, "/model/model.layers.%d.mlp.gate.expert_bias", l);
        if (H5Lexists(f, dname, H5P_DEFAULT) <= 0) continue;
        hid_t d = H5Dopen2(f, dname, H5P_DEFAULT);
        hid_t s = d >= 0 ? H5Dget_space(d) : -1;
        int ok = s >= 0 && H5Sget_simple_extent_npoints(s) == m->E &&
                 H5Dread(d, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, b) >= 0;
        if (s >= 0) H5Sclose(s);
        if (d >= 0) H5Dclose(d);
        int nonzero = 0;
        for (int e = 0; ok && e < m->E; e++) nonzero |= b[e] != 0.0f;
        if (!ok || nonzero)
            rc = moet_errf(err, MOET_EUSAGE,
                           "%s: tensor %s: the checkpoint's router has a non-zero expert bias, "
                           "which this configuration would ignore ([moe] router = softmax and "
                           "bias_update_rate = 0: no bias)\n---> HINT: use the [moe] settings "
                           "of the run that wrote it (bias_update_rate > 0, or router = sigmoid)",
                           path, dname + 7);
    }
    free(b);
    return rc;
}

// Reads every tensor of m from GROUP/<name> (group "/model", "/optim/exp_avg", ...) into buf
// (laid out like m->params), then checks that every expert index of this rank was read exactly
// once per expert tensor (the MPI version sums the counters over the ranks and checks all E).
// no_optim tensors (the expert bias) are in /model only; a missing one reads as zeros.
static int load_group_(hid_t f, const char *path, const Model *m, const char *group, float *buf,
                       int require_crc, MoetErr *err) {
    int n_expert_tensors = 0;
    int *reads = m->E > 0 ? calloc((size_t)m->E, sizeof(int)) : NULL;
    const int model_group = strcmp(group, "/model") == 0;
    int rc = model_group ? check_dropped_bias_(f, path, m, err) : MOET_OK;
    for (int i = 0; i < m->n_tensors && rc == MOET_OK; i++) {
        const ParamTensor *t = &m->tensors[i];
        char dname[MODEL_NAME_MAX + 32], label[MODEL_NAME_MAX + 32];
        snprintf(dname, sizeof dname, "%s/%s", group, t->name);
        if (t->no_optim && (!model_group || H5Lexists(f, dname, H5P_DEFAULT) <= 0)) {
            memset(buf + t->offset, 0, t->numel * sizeof(float));
            continue;
        }
        if (strcmp(group, "/model") == 0) snprintf(label, sizeof label, "%s", t->name);
        else snprintf(label, sizeof label, "%s", dname + 1);
        n_expert_tensors += t->is_expert;
        rc = load_tensor_(f, path, m, t, dname, label, buf + t->offset, require_crc, reads, err);
    }
    for (int e = 0; rc == MOET_OK && e < m->E; e++) {
        int local = e >= m->expert_lo && e < m->expert_lo + m->n_local_experts;
        if (reads[e] != (local ? n_expert_tensors : 0))
            rc = moet_errf(err, MOET_EFAIL, "%s: expert %d was read %d times in %s, expected "
                           "once per expert tensor (%d)", path, e, reads[e], group,
                           n_expert_tensors);
    }
    free(reads);
    return rc;
}

int ckpt_load_model(const char *path, Model *m, MoetErr *err) {
    hid_t f = open_ro_(path, err);
    if (f < 0) return MOET_EFAIL;
    int rc = load_group_(f, path, m, "/model", m->params_h, 0, err);
    H5Fclose(f);
    if (!rc) model_upload_params(m);
    return rc;
}

static int read_trainer_(hid_t f, const char *path, TrainState *st, MoetErr *err) {
    memset(st, 0, sizeof *st);
    hid_t g = H5Lexists(f, "/trainer", H5P_DEFAULT) > 0 ? H5Gopen2(f, "/trainer", H5P_DEFAULT)
                                                        : -1;
    if (g < 0) return moet_errf(err, MOET_EFAIL, "%s: no /trainer group (not a training "
                                "checkpoint?)", path);
    char *fp = NULL;
    const char *bad = NULL;
    if (attr_read_(g, "step", H5T_NATIVE_INT64, &st->step)) bad = "step";
    else if (attr_read_(g, "tokens_seen", H5T_NATIVE_INT64, &st->tokens_seen)) bad = "tokens_seen";
    else if (attr_read_(g, "optim_step", H5T_NATIVE_INT64, &st->optim_step)) bad = "optim_step";
    else if (attr_read_(g, "data_seed", H5T_NATIVE_UINT64, &st->data.seed)) bad = "data_seed";
    else if (attr_read_(g, "data_epoch", H5T_NATIVE_UINT64, &st->data.epoch)) bad = "data_epoch";
    else if (attr_read_(g, "data_consumed", H5T_NATIVE_UINT64, &st->data.consumed))
        bad = "data_consumed";
    else if (attr_read_str_(g, "data_fingerprint", &fp)) bad = "data_fingerprint";
    else if (attr_read_(g, "rng_state", H5T_NATIVE_UINT64, &st->rng_state)) bad = "rng_state";
    else if (attr_read_(g, "lr", H5T_NATIVE_DOUBLE, &st->lr)) bad = "lr";
    if (fp) snprintf(st->data.fingerprint, sizeof st->data.fingerprint, "%s", fp);
    free(fp);
    H5Gclose(g);
    if (bad) return moet_errf(err, MOET_EFAIL, "%s: /trainer attribute %s is missing or "
                              "unreadable", path, bad);
    return MOET_OK;
}

int ckpt_load(const char *path, Model *m, float *exp_avg, float *exp_avg_sq, TrainState *st,
              MoetErr *err) {
    hid_t f = open_ckpt_(path, err);
    if (f < 0) return MOET_EFAIL;
    int rc = MOET_OK;
    int64_t model_only = 0;
    attr_read_(f, "model_only", H5T_NATIVE_INT64, &model_only);
    if ((exp_avg || exp_avg_sq) && (model_only || H5Lexists(f, "/optim", H5P_DEFAULT) <= 0)) {
        rc = moet_errf(err, MOET_EFAIL, "%s: model-only checkpoint: use --init, not --resume "
                       "(it has no optimizer state)", path);
        goto done;
    }
    if ((rc = load_group_(f, path, m, "/model", m->params_h, 1, err))) goto done;
    model_upload_params(m);
    if (exp_avg && (rc = load_group_(f, path, m, "/optim/exp_avg", exp_avg, 1, err))) goto done;
    if (exp_avg_sq && (rc = load_group_(f, path, m, "/optim/exp_avg_sq", exp_avg_sq, 1, err)))
        goto done;
    if (st) rc = read_trainer_(f, path, st, err);
done:
    H5Fclose(f);
    return rc;
}

int ckpt_read_state(const char *path, TrainState *st, MoetErr *err) {
    hid_t f = open_ckpt_(path, err);
    if (f < 0) return MOET_EFAIL;
    int rc = read_trainer_(f, path, st, err);
    H5Fclose(f);
    return rc;
}

// ---------------------------------------------------------------------------------------
// verification of every dataset (no model needed)

typedef struct {
    const char *path;
    MoetErr *err;
    int rc, n;
} VerifyCtx;

static herr_t verify_visit_(hid_t f, const char *name, const H5O_info_t *info, void *data) {
    VerifyCtx *v = data;
    if (info->type != H5O_TYPE_DATASET) return 0;
    const char *label = strncmp(name, "model/", 6) == 0 ? name + 6 : name;
    hid_t d = H5Dopen2(f, name, H5P_DEFAULT);
    if (d < 0) {
        v->rc = moet_errf(v->err, MOET_EFAIL, "%s: tensor %s: cannot read (truncated or not a "
                          "checkpoint)", v->path, label);
        return 1;
    }
    hid_t s = H5Dget_space(d);
    size_t n = (size_t)H5Sget_simple_extent_npoints(s);
    float *buf = moet_malloc((n ? n : 1) * sizeof(float));
    if (H5Dread(d, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, buf) < 0)
        v->rc = moet_errf(v->err, MOET_EFAIL, "%s: tensor %s: cannot read (truncated or not a "
                          "checkpoint)", v->path, label);
    else
        v->rc = check_crc_(d, v->path, label, crc_of_(buf, n), 1, v->err);
    free(buf);
    H5Sclose(s);
    H5Dclose(d);
    if (v->rc) return 1;
    v->n++;
    return 0;
}

int ckpt_verify_count(const char *path, int *n_verified, MoetErr *err) {
    if (n_verified) *n_verified = 0;
    hid_t f = open_ckpt_(path, err);
    if (f < 0) return MOET_EFAIL;
    VerifyCtx v = {path, err, MOET_OK, 0};
    herr_t r = H5Ovisit(f, H5_INDEX_NAME, H5_ITER_INC, verify_visit_, &v);
    if (r < 0 && v.rc == MOET_OK)
        v.rc = moet_errf(err, MOET_EFAIL, "%s: cannot read (truncated or not a checkpoint)",
                         path);
    H5Fclose(f);
    if (n_verified) *n_verified = v.n;
    return v.rc;
}

int ckpt_verify(const char *path, MoetErr *err) { return ckpt_verify_count(path, NULL, err); }

// ---------------------------------------------------------------------------------------
// resolving "latest", a run folder or a file

int ckpt_resolve(const char *spec, const char *dir, char *path, size_t path_size, MoetErr *err) {
    struct stat sb;
    const char *d = NULL;
    if (strcmp(spec, "latest") == 0) {
        if (!dir || !dir[0])
            return moet_errf(err, MOET_EUSAGE, "\"latest\" needs a checkpoint directory "
                             "([checkpoint] dir)");
        d = dir;
    } else if (stat(spec, &sb) == 0 && S_ISDIR(sb.st_mode)) {
        d = spec;
    }
    if (!d) {
        if (stat(spec, &sb) != 0)
            return moet_errf(err, MOET_EFAIL, "%s: no such checkpoint (%s)", spec,
                             strerror(errno));
        if ((size_t)snprintf(path, path_size, "%s", spec) >= path_size)
            return moet_errf(err, MOET_EFAIL, "%s: path too long", spec);
        return MOET_OK;
    }
    // DIR/latest.h5 -> DIR/stepNNNNNNNN.h5, so that logs name the step and a concurrent
    // rotation of latest.h5 cannot change the file under the loader
    char link[PATH_MAX_], target[PATH_MAX_];
    snprintf(link, sizeof link, "%s/latest.h5", d);
    if (stat(link, &sb) != 0)
        return moet_errf(err, MOET_EFAIL, "no checkpoint in %s yet (%s missing)", d, link);
    ssize_t n = readlink(link, target, sizeof target - 1);
    int w;
    if (n > 0) {
        target[n] = 0;
        w = target[0] == '/' ? snprintf(path, path_size, "%s", target)
                             : snprintf(path, path_size, "%s/%s", d, target);
    } else {
        w = snprintf(path, path_size, "%s", link);  // a plain file copied in by hand
    }
    if (w < 0 || (size_t)w >= path_size) return moet_errf(err, MOET_EFAIL, "%s: path too long", d);
    return MOET_OK;
}

// ---------------------------------------------------------------------------------------
// saving

static int mkdir_p_(const char *dir) {
    char p[PATH_MAX_];
    if (snprintf(p, sizeof p, "%s", dir) >= (int)sizeof p) {
        errno = ENAMETOOLONG;
        return -1;
    }
    for (char *c = p + 1; *c; c++) {
        if (*c != '/') continue;
        *c = 0;
        if (mkdir(p, 0777) != 0 && errno != EEXIST) return -1;
        *c = '/';
    }
    if (mkdir(p, 0777) != 0 && errno != EEXIST) return -1;
    struct stat sb;
    if (stat(p, &sb) != 0) return -1;
    if (!S_ISDIR(sb.st_mode)) {
        errno = ENOTDIR;
        return -1;
    }
    return 0;
}

static int fsync_path_(const char *p, int directory) {
    int fd = open(p, directory ? O_RDONLY | O_DIRECTORY : O_RDONLY);
    if (fd < 0) return -1;
    int r = fsync(fd);
    int e = errno;
    close(fd);
    errno = e;
    return r;
}

// The file access list. Parallel version: H5Pset_fapl_mpio(fapl, comm, info) here.
static hid_t fapl_(void) {
    hid_t fapl = H5Pcreate(H5P_FILE_ACCESS);
    // close every object with the file, also on error paths
    H5Pset_fclose_degree(fapl, H5F_CLOSE_STRONG);
    // 1.8 object headers: attributes larger than 64 KiB (a long config) go to dense storage
    H5Pset_libver_bounds(fapl, H5F_LIBVER_V18, H5F_LIBVER_LATEST);
    return fapl;
}

// Writes this rank's part of tensor t (buffer src, laid out like m->params) to dataset `name`
// of group g: expert tensors rows [expert_lo, expert_lo + El) of dim 0, other tensors whole.
// Sets the checksum attribute (one rank: the CRC of the slab is the CRC of the tensor; several
// ranks combine their slab CRCs in rank order with crc32_combine before rank 0 writes it).
static int write_tensor_(hid_t g, const Model *m, const ParamTensor *t, const float *src,
                         char *why, size_t why_size) {
    hsize_t gdims[MODEL_MAX_DIMS], ldims[MODEL_MAX_DIMS];
    for (int i = 0; i < t->ndim; i++) {
        gdims[i] = (hsize_t)t->global_shape[i];
        ldims[i] = (hsize_t)t->shape[i];
    }
    int rc = -1;
    hid_t fs = H5Screate_simple(t->ndim, gdims, NULL);
    hid_t ms = H5Screate_simple(t->ndim, ldims, NULL);
    hid_t d = H5Dcreate2(g, t->name, H5T_IEEE_F32LE, fs, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    if (d < 0) {
        h5_reason_(why, why_size, "cannot create dataset");
        goto done;
    }
    if (t->is_expert) {
        hsize_t start[MODEL_MAX_DIMS] = {(hsize_t)m->expert_lo, 0, 0};
        H5Sselect_hyperslab(fs, H5S_SELECT_SET, start, NULL, ldims, NULL);
    }
    if (H5Dwrite(d, H5T_NATIVE_FLOAT, ms, fs, H5P_DEFAULT, src + t->offset) < 0) {
        h5_reason_(why, why_size, "cannot write tensor data");
        goto done;
    }
    char crc[32];
    snprintf(crc, sizeof crc, "crc32:%08lx", crc_of_(src + t->offset, t->numel));
    if (attr_str_(d, "checksum", crc) != 0) {
        h5_reason_(why, why_size, "cannot write the checksum attribute");
        goto done;
    }
    rc = 0;
done:
    if (d >= 0) H5Dclose(d);
    H5Sclose(ms);
    H5Sclose(fs);
    return rc;
}

static int write_group_(hid_t f, const char *group, const Model *m, const float *buf, char *why,
                        size_t why_size) {
    hid_t lcpl = H5Pcreate(H5P_LINK_CREATE);
    H5Pset_create_intermediate_group(lcpl, 1);
    hid_t g = H5Gcreate2(f, group, lcpl, H5P_DEFAULT, H5P_DEFAULT);
    H5Pclose(lcpl);
    if (g < 0) {
        h5_reason_(why, why_size, "cannot create group");
        return -1;
    }
    int rc = 0;
    for (int i = 0; i < m->n_tensors && rc == 0; i++) {
        char reason[512];
        if (m->tensors[i].no_optim && strcmp(group, "/model") != 0) continue; // no moments
        if ((rc = write_tensor_(g, m, &m->tensors[i], buf, reason, sizeof reason)))
            snprintf(why, why_size, "%s/%s: %s", group, m->tensors[i].name, reason);
    }
    H5Gclose(g);
    return rc;
}

static int write_attrs_(hid_t f, const TrainState *st, const char *config_ini, int model_only,
                        time_t now, char *why, size_t why_size) {
    char created[32];
    struct tm tm;
    gmtime_r(&now, &tm);
    strftime(created, sizeof created, "%Y-%m-%dT%H:%M:%SZ", &tm);
    int bad = attr_str_(f, "format", CKPT_FORMAT) || attr_i64_(f, "format_version",
              CKPT_FORMAT_VERSION) || attr_i64_(f, "step", st->step) ||
              attr_i64_(f, "tokens_seen", st->tokens_seen) ||
              attr_str_(f, "config", config_ini ? config_ini : "") ||
              attr_str_(f, "created", created) || attr_i64_(f, "model_only", model_only ? 1 : 0);
    if (bad) {
        h5_reason_(why, why_size, "cannot write the root attributes");
        return -1;
    }
    hid_t g = H5Gcreate2(f, "/trainer", H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    if (g < 0) {
        h5_reason_(why, why_size, "cannot create /trainer");
        return -1;
    }
    bad = attr_i64_(g, "step", st->step) || attr_i64_(g, "tokens_seen", st->tokens_seen) ||
          attr_i64_(g, "optim_step", st->optim_step) ||
          attr_u64_(g, "data_seed", st->data.seed) || attr_u64_(g, "data_epoch", st->data.epoch) ||
          attr_u64_(g, "data_consumed", st->data.consumed) ||
          attr_str_(g, "data_fingerprint", st->data.fingerprint) ||
          attr_u64_(g, "rng_state", st->rng_state) || attr_f64_(g, "lr", st->lr);
    H5Gclose(g);
    if (bad) {
        h5_reason_(why, why_size, "cannot write the /trainer attributes");
        return -1;
    }
    return 0;
}

// An upper bound of the file's size: the tensors plus generous room for the metadata (object
// headers with their checksum attributes, group indexes, the root and /trainer attributes).
static off_t estimate_bytes_(const Model *m, int model_only, const char *config_ini) {
    off_t groups = model_only ? 1 : 3;
    return groups * ((off_t)m->n_params * 4 + (off_t)m->n_tensors * 1024) + 64 * 1024 +
           2 * (off_t)(config_ini ? strlen(config_ini) : 0);
}

// Reserves the disk space of the file before HDF5 writes to it. Why: in HDF5 1.10 a write that
// fails during a flush (ENOSPC) leaves the metadata cache broken ("slist already enabled"), the
// file cannot be closed any more and the library crashes at exit. With the blocks allocated
// up front, a full disk is an error here, before HDF5 has written anything; HDF5 truncates the
// file to its real size when it closes it. File systems without fallocate go unreserved.
// (MPI-IO: MPI_File_preallocate, or rank 0 reserving before the collective open.)
static int reserve_space_(const char *tmp, off_t bytes, char *why, size_t why_size) {
    int fd = open(tmp, O_WRONLY);
    if (fd < 0) {
        snprintf(why, why_size, "cannot reopen the file: %s", strerror(errno));
        return -1;
    }
    int e = posix_fallocate(fd, 0, bytes);
    if (e == ENOSPC || e == EFBIG || e == EIO) {
        if (ftruncate(fd, 0) != 0) { /* the caller removes the file */ }
        close(fd);
        snprintf(why, why_size, "cannot reserve %.1f MiB: %s", (double)bytes / (1 << 20),
                 strerror(e));
        return -1;
    }
    close(fd);  // EINVAL / EOPNOTSUPP: no fallocate here, write without a reservation
    return 0;
}

// Writes the whole checkpoint to tmp, flushed, closed and fsync'ed. why receives the reason.
static int write_file_(const char *tmp, const Model *m, const float *exp_avg,
                       const float *exp_avg_sq, const TrainState *st, const char *config_ini,
                       int model_only, char *why, size_t why_size) {
    hid_t fapl = fapl_();
    hid_t f = H5Fcreate(tmp, H5F_ACC_TRUNC, H5P_DEFAULT, fapl);
    H5Pclose(fapl);
    if (f < 0) {
        h5_reason_(why, why_size, "cannot create the file");
        return -1;
    }
    int rc = reserve_space_(tmp, estimate_bytes_(m, model_only, config_ini), why, why_size);
    if (!rc) rc = write_attrs_(f, st, config_ini, model_only, time(NULL), why, why_size);
    if (!rc) rc = write_group_(f, "/model", m, m->params_h, why, why_size);
    if (!rc && !model_only) rc = write_group_(f, "/optim/exp_avg", m, exp_avg, why, why_size);
    if (!rc && !model_only)
        rc = write_group_(f, "/optim/exp_avg_sq", m, exp_avg_sq, why, why_size);
    if (!rc && H5Fflush(f, H5F_SCOPE_GLOBAL) < 0) {
        h5_reason_(why, why_size, "cannot flush the file");
        rc = -1;
    }
    // Should a write still fail, HDF5 holds dirty metadata that H5Fclose cannot write either;
    // free the space this file took so that the close has room (best effort, see above).
    if (rc && truncate(tmp, 0) != 0) { /* nothing more to free */ }
    if (H5Fclose(f) < 0 && !rc) {
        h5_reason_(why, why_size, "cannot close the file");
        rc = -1;
    }
    if (!rc && fsync_path_(tmp, 0) != 0) {
        snprintf(why, why_size, "fsync: %s", strerror(errno));
        rc = -1;
    }
    return rc;
}

typedef struct {
    int64_t step;
    char name[32];
} StepFile;

static int cmp_step_desc_(const void *a, const void *b) {
    int64_t x = ((const StepFile *)a)->step, y = ((const StepFile *)b)->step;
    return (x < y) - (x > y);
}

// Parses "stepNNNNNNNN.h5" (exactly 8 digits or more for steps >= 1e8); -1 otherwise.
static int64_t parse_step_name_(const char *name) {
    size_t n = strlen(name);
    if (n < 15 || strncmp(name, "step", 4) != 0 || strcmp(name + n - 3, ".h5") != 0) return -1;
    int64_t s = 0;
    for (size_t i = 4; i < n - 3; i++) {
        if (name[i] < '0' || name[i] > '9') return -1;
        s = s * 10 + (name[i] - '0');
    }
    return s;
}

// Keeps the newest keep_last checkpoints, every step % keep_every == 0, the one just written
// and the one latest.h5 points to; deletes the other DIR/step*.h5. Failures only warn.
static void apply_retention_(const CkptSaveOpts *o, int64_t just_written) {
    DIR *dd = opendir(o->dir);
    if (!dd) return;
    StepFile *files = NULL;
    size_t n = 0, cap = 0;
    struct dirent *de;
    while ((de = readdir(dd))) {
        int64_t s = parse_step_name_(de->d_name);
        size_t len = strlen(de->d_name);
        if (s < 0 || len >= sizeof files[0].name) continue;
        if (n == cap) {
            cap = cap ? 2 * cap : 64;
            files = realloc(files, cap * sizeof *files);
        }
        files[n].step = s;
        memcpy(files[n].name, de->d_name, len + 1);
        n++;
    }
    closedir(dd);
    char link[PATH_MAX_], latest[PATH_MAX_] = "";
    snprintf(link, sizeof link, "%s/latest.h5", o->dir);
    ssize_t ln = readlink(link, latest, sizeof latest - 1);
    latest[ln > 0 ? ln : 0] = 0;
    const char *latest_base = strrchr(latest, '/') ? strrchr(latest, '/') + 1 : latest;
    if (n) qsort(files, n, sizeof *files, cmp_step_desc_);
    int keep_last = o->keep_last < 1 ? 1 : o->keep_last;
    for (size_t i = 0; i < n; i++) {
        int keep = (int)i < keep_last || files[i].step == just_written ||
                   (o->keep_every > 0 && files[i].step % o->keep_every == 0) ||
                   strcmp(files[i].name, latest_base) == 0;
        if (keep) continue;
        char p[PATH_MAX_];
        snprintf(p, sizeof p, "%s/%s", o->dir, files[i].name);
        if (unlink(p) != 0) moet_log("warning: retention: cannot delete %s: %s\n", p,
                                     strerror(errno));
    }
    free(files);
}

int ckpt_save(const CkptSaveOpts *o, const Model *m, const float *exp_avg,
              const float *exp_avg_sq, const TrainState *st, const char *config_ini,
              char *path_out, size_t path_out_size, MoetErr *err) {
    char tmp[PATH_MAX_], final[PATH_MAX_], name[32], why[1024] = "";
    snprintf(name, sizeof name, "step%08lld.h5", (long long)st->step);
    if (snprintf(final, sizeof final, "%s/%s", o->dir, name) >= (int)sizeof final ||
        snprintf(tmp, sizeof tmp, "%s/%s.tmp", o->dir, name) >= (int)sizeof tmp)
        return moet_errf(err, MOET_EFAIL, "saving checkpoint step %lld to %s failed: path too "
                         "long", (long long)st->step, o->dir);
    if (!o->model_only && (!exp_avg || !exp_avg_sq))
        return moet_errf(err, MOET_EFAIL, "saving checkpoint step %lld: no optimizer state "
                         "given (set model_only)", (long long)st->step);
    if (m->E > 0 && m->n_local_experts != m->E)
        return moet_errf(err, MOET_EFAIL, "saving checkpoint step %lld: this model holds %d of "
                         "%d experts; writing from expert-parallel ranks needs the MPI-IO writer",
                         (long long)st->step, m->n_local_experts, m->E);
    quiet_hdf5_();
    if (mkdir_p_(o->dir) != 0)
        return moet_errf(err, MOET_EFAIL, "saving checkpoint step %lld to %s failed: cannot "
                         "create the directory: %s; the previous checkpoints are intact",
                         (long long)st->step, o->dir, strerror(errno));
    unlink(tmp);  // a leftover of a crash
    if (write_file_(tmp, m, exp_avg, exp_avg_sq, st, config_ini, o->model_only, why,
                    sizeof why) != 0) {
        unlink(tmp);
        return moet_errf(err, MOET_EFAIL, "saving checkpoint step %lld to %s failed: %s; the "
                         "previous checkpoints are intact", (long long)st->step, o->dir, why);
    }
    if (rename(tmp, final) != 0) {
        int e = errno;
        unlink(tmp);
        return moet_errf(err, MOET_EFAIL, "saving checkpoint step %lld to %s failed: rename: "
                         "%s; the previous checkpoints are intact", (long long)st->step, o->dir,
                         strerror(e));
    }
    // latest.h5: a new symlink renamed over the old one, so that readers see one or the other
    char ltmp[PATH_MAX_], link[PATH_MAX_];
    snprintf(ltmp, sizeof ltmp, "%s/.latest.h5.tmp", o->dir);
    snprintf(link, sizeof link, "%s/latest.h5", o->dir);
    unlink(ltmp);
    if (symlink(name, ltmp) != 0 || rename(ltmp, link) != 0) {
        int e = errno;
        unlink(ltmp);
        return moet_errf(err, MOET_EFAIL, "checkpoint step %lld saved as %s, but updating %s "
                         "failed: %s", (long long)st->step, final, link, strerror(e));
    }
    fsync_path_(o->dir, 1);  // make the renames durable
    apply_retention_(o, st->step);
    if (path_out) snprintf(path_out, path_out_size, "%s", final);
    return MOET_OK;
}

// ---------------------------------------------------------------------------------------
// the collective writer (expert parallelism, ARCHITECTURE §6)

#if MOET_MPI
// Agrees on a failure: 1 when any rank of the world has bad != 0.
static int any_bad_(Parallel *par, int bad) {
    double f = bad ? 1.0 : 0.0;
    MoetErr e;
    if (comm_allreduce_max_f64(par->world, &f, 1, &e)) return 1;
    return f != 0.0;
}

// Writes tensor t collectively: every rank creates the dataset with the global shape; a
// replicated tensor is written by rank 0, an expert tensor by the ranks of EP group 0 (EDP rank
// 0), each its rows [expert_lo, expert_lo + El); the other ranks select nothing but still take
// part in the collective write. The checksum is the crc32 of the whole dataset: the writers'
// slice CRCs combined in expert order with crc32_combine; every rank writes the same attribute.
static int write_tensor_par_(hid_t g, hid_t dxpl, const Model *m, const ParamTensor *t,
                             const float *src, Parallel *par, char *why, size_t why_size) {
    hsize_t gdims[MODEL_MAX_DIMS], ldims[MODEL_MAX_DIMS];
    for (int i = 0; i < t->ndim; i++) {
        gdims[i] = (hsize_t)t->global_shape[i];
        ldims[i] = (hsize_t)t->shape[i];
    }
    const int ep = par->ep_size;
    const int writer = t->is_expert ? comm_rank(par->edp) == 0 : par->rank == 0;
    int rc = -1, bad = 0;
    hid_t fs = H5Screate_simple(t->ndim, gdims, NULL);
    hid_t ms = H5Screate_simple(t->ndim, ldims, NULL);
    hid_t d = H5Dcreate2(g, t->name, H5T_IEEE_F32LE, fs, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    if (d < 0) {
        h5_reason_(why, why_size, "cannot create dataset");
        bad = 1;
    }
    if (!bad) {
        if (!writer) {
            H5Sselect_none(fs);
            H5Sselect_none(ms);
        } else if (t->is_expert) {
            hsize_t start[MODEL_MAX_DIMS] = {(hsize_t)m->expert_lo, 0, 0};
            H5Sselect_hyperslab(fs, H5S_SELECT_SET, start, NULL, ldims, NULL);
        }
        if (H5Dwrite(d, H5T_NATIVE_FLOAT, ms, fs, dxpl, src + t->offset) < 0) {
            h5_reason_(why, why_size, "cannot write tensor data");
            bad = 1;
        }
    }
    // slot i < ep: the CRC of expert slice i (or of the whole tensor in slot 0); slot ep: errors
    double crcs[MOET_CKPT_MAX_EP + 1];
    const int slots = t->is_expert ? ep : 1;
    memset(crcs, 0, sizeof crcs);
    if (writer) crcs[t->is_expert ? par->ep_rank : 0] = (double)crc_of_(src + t->offset, t->numel);
    crcs[slots] = bad;
    MoetErr e;
    if (comm_allreduce_sum_f64(par->world, crcs, (size_t)slots + 1, &e)) {
        snprintf(why, why_size, "%.400s", e.msg);
        goto done;
    }
    if (crcs[slots] != 0) {
        if (!bad) snprintf(why, why_size, "the write failed on another rank");
        goto done;
    }
    uLong crc = (uLong)crcs[0];
    const z_off_t slice = (z_off_t)(t->numel * sizeof(float));
    for (int i = 1; i < slots; i++) crc = crc32_combine(crc, (uLong)crcs[i], slice);
    char txt[32];
    snprintf(txt, sizeof txt, "crc32:%08lx", crc);
    if (any_bad_(par, attr_str_(d, "checksum", txt) != 0)) {
        h5_reason_(why, why_size, "cannot write the checksum attribute");
        goto done;
    }
    rc = 0;
done:
    if (d >= 0) H5Dclose(d);
    H5Sclose(ms);
    H5Sclose(fs);
    return rc;
}

static int write_group_par_(hid_t f, hid_t dxpl, const char *group, const Model *m,
                            const float *buf, Parallel *par, char *why, size_t why_size) {
    hid_t lcpl = H5Pcreate(H5P_LINK_CREATE);
    H5Pset_create_intermediate_group(lcpl, 1);
    hid_t g = H5Gcreate2(f, group, lcpl, H5P_DEFAULT, H5P_DEFAULT);
    H5Pclose(lcpl);
    if (any_bad_(par, g < 0)) {
        h5_reason_(why, why_size, "cannot create group");
        if (g >= 0) H5Gclose(g);
        return -1;
    }
    int rc = 0;
    for (int i = 0; i < m->n_tensors && rc == 0; i++) {
        char reason[512];
        if (m->tensors[i].no_optim && strcmp(group, "/model") != 0) continue; // no moments
        if ((rc = write_tensor_par_(g, dxpl, m, &m->tensors[i], buf, par, reason,
                                    sizeof reason)))
            snprintf(why, why_size, "%s/%s: %s", group, m->tensors[i].name, reason);
    }
    H5Gclose(g);
    return rc;
}

// The collective write_file_: every rank calls it; rank 0 reserves the space and fsyncs.
static int write_file_par_(const char *tmp, const Model *m, const float *exp_avg,
                           const float *exp_avg_sq, const TrainState *st, const char *config_ini,
                           int model_only, Parallel *par, char *why, size_t why_size) {
    hid_t fapl = fapl_();
    H5Pset_fapl_mpio(fapl, MPI_COMM_WORLD, MPI_INFO_NULL);
    hid_t f = H5Fcreate(tmp, H5F_ACC_TRUNC, H5P_DEFAULT, fapl);
    H5Pclose(fapl);
    if (any_bad_(par, f < 0)) {
        h5_reason_(why, why_size, "cannot create the file");
        if (f >= 0) H5Fclose(f);
        return -1;
    }
    int rc = 0;
    // rank 0 reserves the blocks once the file exists (the collective create truncates it)
    if (par->rank == 0)
        rc = reserve_space_(tmp, estimate_bytes_(m, model_only, config_ini), why, why_size);
    if (any_bad_(par, rc)) {
        if (!rc) snprintf(why, why_size, "rank 0 could not reserve the disk space");
        rc = -1;
    }
    double now = par->rank == 0 ? (double)time(NULL) : 0; // one `created` for every rank
    MoetErr e;
    if (!rc && comm_allreduce_sum_f64(par->world, &now, 1, &e)) {
        snprintf(why, why_size, "%.400s", e.msg);
        rc = -1;
    }
    if (!rc && any_bad_(par, write_attrs_(f, st, config_ini, model_only, (time_t)now, why,
                                          why_size) != 0)) {
        rc = -1;
        if (!why[0]) snprintf(why, why_size, "writing the attributes failed on another rank");
    }
    hid_t dxpl = H5Pcreate(H5P_DATASET_XFER);
    H5Pset_dxpl_mpio(dxpl, H5FD_MPIO_COLLECTIVE);
    if (!rc) rc = write_group_par_(f, dxpl, "/model", m, m->params_h, par, why, why_size);
    if (!rc && !model_only)
        rc = write_group_par_(f, dxpl, "/optim/exp_avg", m, exp_avg, par, why, why_size);
    if (!rc && !model_only)
        rc = write_group_par_(f, dxpl, "/optim/exp_avg_sq", m, exp_avg_sq, par, why, why_size);
    H5Pclose(dxpl);
    if (!rc && any_bad_(par, H5Fflush(f, H5F_SCOPE_GLOBAL) < 0)) {
        h5_reason_(why, why_size, "cannot flush the file");
        rc = -1;
    }
    if (H5Fclose(f) < 0 && !rc) {
        h5_reason_(why, why_size, "cannot close the file");
        rc = -1;
    }
    if (any_bad_(par, rc)) rc = -1;
    if (!rc && par->rank == 0 && fsync_path_(tmp, 0) != 0) {
        snprintf(why, why_size, "fsync: %s", strerror(errno));
        rc = -1;
    }
    if (any_bad_(par, rc)) {
        if (!why[0]) snprintf(why, why_size, "the write failed on another rank");
        rc = -1;
    }
    return rc;
}
#endif

int ckpt_save_par(const CkptSaveOpts *o, const Model *m, const float *exp_avg,
                  const float *exp_avg_sq, const TrainState *st, const char *config_ini,
                  Parallel *par, char *path_out, size_t path_out_size, MoetErr *err) {
#if MOET_MPI
    if (par && par->world_size > 1 && m->E > 0 && m->n_local_experts != m->E) {
        char tmp[PATH_MAX_], final[PATH_MAX_], name[32], why[1024] = "";
        snprintf(name, sizeof name, "step%08lld.h5", (long long)st->step);
        if (snprintf(final, sizeof final, "%s/%s", o->dir, name) >= (int)sizeof final ||
            snprintf(tmp, sizeof tmp, "%s/%s.tmp", o->dir, name) >= (int)sizeof tmp)
            return moet_errf(err, MOET_EFAIL, "saving checkpoint step %lld to %s failed: path "
                             "too long", (long long)st->step, o->dir);
        if (!o->model_only && (!exp_avg || !exp_avg_sq))
            return moet_errf(err, MOET_EFAIL, "saving checkpoint step %lld: no optimizer state "
                             "given (set model_only)", (long long)st->step);
        if (par->ep_size > MOET_CKPT_MAX_EP)
            return moet_errf(err, MOET_EFAIL, "saving checkpoint step %lld: ep %d > %d",
                             (long long)st->step, par->ep_size, MOET_CKPT_MAX_EP);
        quiet_hdf5_();
        int bad = 0;
        if (par->rank == 0) {
            if (mkdir_p_(o->dir) != 0) {
                snprintf(why, sizeof why, "cannot create the directory: %s", strerror(errno));
                bad = 1;
            }
            unlink(tmp);  // a leftover of a crash
        }
        if (any_bad_(par, bad)) {
            if (!why[0]) snprintf(why, sizeof why, "rank 0 could not create the directory");
            bad = 1;
        }
        if (!bad && write_file_par_(tmp, m, exp_avg, exp_avg_sq, st, config_ini, o->model_only,
                                    par, why, sizeof why) != 0)
            bad = 1;
        if (bad) {
            if (par->rank == 0) unlink(tmp);
            return moet_errf(err, MOET_EFAIL, "saving checkpoint step %lld to %s failed: %s; "
                             "the previous checkpoints are intact", (long long)st->step, o->dir,
                             why);
        }
        // rank 0 renames, points latest.h5 at the file and applies retention; all learn it
        if (par->rank == 0) {
            if (rename(tmp, final) != 0) {
                snprintf(why, sizeof why, "rename: %s", strerror(errno));
                unlink(tmp);
                bad = 1;
            }
            char ltmp[PATH_MAX_], link[PATH_MAX_];
            snprintf(ltmp, sizeof ltmp, "%s/.latest.h5.tmp", o->dir);
            snprintf(link, sizeof link, "%s/latest.h5", o->dir);
            unlink(ltmp);
            if (!bad && (symlink(name, ltmp) != 0 || rename(ltmp, link) != 0)) {
                snprintf(why, sizeof why, "updating latest.h5: %s", strerror(errno));
                unlink(ltmp);
                bad = 1;
            }
            if (!bad) {
                fsync_path_(o->dir, 1);
                apply_retention_(o, st->step);
            }
        }
        if (any_bad_(par, bad))
            return moet_errf(err, MOET_EFAIL, "saving checkpoint step %lld to %s failed: %s",
                             (long long)st->step, o->dir,
                             why[0] ? why : "rank 0 could not rename the file");
        if (path_out) snprintf(path_out, path_out_size, "%s", final);
        return MOET_OK;
    }
#endif
    if (par && par->rank != 0) return MOET_OK;  // replicated weights: rank 0 writes
    return ckpt_save(o, m, exp_avg, exp_avg_sq, st, config_ini, path_out, path_out_size, err);
}
