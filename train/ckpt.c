// ckpt: HDF5 checkpoints (ARCHITECTURE §6): reading the model group.
#include "train/ckpt.h"

#include <hdf5.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

// Opens path read-only with HDF5's own error printing off (we report errors ourselves).
static hid_t open_ro_(const char *path, MoetErr *err) {
    H5Eset_auto2(H5E_DEFAULT, NULL, NULL);
    hid_t f = H5Fopen(path, H5F_ACC_RDONLY, H5P_DEFAULT);
    if (f < 0)
        moet_errf(err, MOET_EFAIL, "%s: cannot open as HDF5 (missing, unreadable or not an "
                  "HDF5 file)", path);
    return f;
}

int ckpt_read_config_text(const char *path, char **text, MoetErr *err) {
    hid_t f = open_ro_(path, err);
    if (f < 0) return MOET_EFAIL;
    int rc = MOET_OK;
    hid_t a = H5Aopen(f, "config", H5P_DEFAULT);
    if (a < 0) {
        rc = moet_errf(err, MOET_EFAIL, "%s: no `config` attribute on / (not a moet checkpoint?)",
                       path);
        goto done;
    }
    hid_t type = H5Aget_type(a);
    if (H5Tis_variable_str(type) > 0) {
        char *s = NULL;
        hid_t mt = H5Tcopy(H5T_C_S1);
        H5Tset_size(mt, H5T_VARIABLE);
        H5Tset_cset(mt, H5Tget_cset(type));  // HDF5 does not convert ASCII <-> UTF-8
        if (H5Aread(a, mt, &s) < 0 || !s) rc = moet_errf(err, MOET_EFAIL, "%s: cannot read "
                                                         "the config attribute", path);
        else *text = strdup(s);
        if (s) H5free_memory(s);
        H5Tclose(mt);
    } else {
        size_t len = H5Tget_size(type);
        char *s = calloc(len + 1, 1);
        hid_t mt = H5Tcopy(H5T_C_S1);
        H5Tset_size(mt, len);
        H5Tset_cset(mt, H5Tget_cset(type));
        if (H5Aread(a, mt, s) < 0) {
            free(s);
            rc = moet_errf(err, MOET_EFAIL, "%s: cannot read the config attribute", path);
        } else {
            *text = s;
        }
        H5Tclose(mt);
    }
    H5Tclose(type);
    H5Aclose(a);
done:
    H5Fclose(f);
    return rc;
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
    if (count != (hssize_t)n)
        rc = moet_errf(err, MOET_EFAIL, "%s: dataset %s has %lld elements, expected %zu", path,
                       name, (long long)count, n);
    else if (H5Dread(d, mem_type_(type), H5S_ALL, H5S_ALL, H5P_DEFAULT, buf) < 0)
        rc = moet_errf(err, MOET_EFAIL, "%s: cannot read dataset %s", path, name);
    H5Sclose(s);
    H5Dclose(d);
done:
    H5Fclose(f);
    return rc;
}

// Reads one model tensor: full tensors whole, expert tensors as the local slab of experts.
static int load_tensor_(hid_t f, const char *path, const Model *m, const ParamTensor *t,
                        float *dst, MoetErr *err) {
    char dname[MODEL_NAME_MAX + 16];
    snprintf(dname, sizeof dname, "/model/%s", t->name);
    hid_t d = H5Dopen2(f, dname, H5P_DEFAULT);
    if (d < 0)
        return moet_errf(err, MOET_EFAIL, "%s: tensor %s is missing (checkpoint of another "
                         "model shape?)", path, t->name);
    int rc = MOET_OK;
    hid_t s = H5Dget_space(d);
    int nd = H5Sget_simple_extent_ndims(s);
    hsize_t dims[8] = {0};
    H5Sget_simple_extent_dims(s, dims, NULL);
    int same = nd == t->ndim;
    for (int i = 0; same && i < nd; i++) same = (int64_t)dims[i] == t->global_shape[i];
    if (!same) {
        char got[96] = "", want[96] = "";
        for (int i = 0; i < nd && i < 8; i++)
            snprintf(got + strlen(got), sizeof got - strlen(got), "%s%llu", i ? "," : "",
                     (unsigned long long)dims[i]);
        for (int i = 0; i < t->ndim; i++)
            snprintf(want + strlen(want), sizeof want - strlen(want), "%s%lld", i ? "," : "",
                     (long long)t->global_shape[i]);
        rc = moet_errf(err, MOET_EFAIL, "%s: tensor %s has shape (%s) but the config needs "
                       "(%s)", path, t->name, got, want);
        goto done;
    }
    hid_t ms = H5Screate_simple(t->ndim, (const hsize_t[]){t->shape[0], t->shape[1],
                                t->shape[2]}, NULL);
    if (t->is_expert) {
        hsize_t start[3] = {(hsize_t)m->expert_lo, 0, 0};
        hsize_t count[3] = {(hsize_t)t->shape[0], (hsize_t)t->shape[1], (hsize_t)t->shape[2]};
        H5Sselect_hyperslab(s, H5S_SELECT_SET, start, NULL, count, NULL);
    }
    if (H5Dread(d, H5T_NATIVE_FLOAT, ms, s, H5P_DEFAULT, dst) < 0)
        rc = moet_errf(err, MOET_EFAIL, "%s: cannot read tensor %s (file truncated or "
                       "damaged?)", path, t->name);
    H5Sclose(ms);
done:
    H5Sclose(s);
    H5Dclose(d);
    return rc;
}

int ckpt_load_model(const char *path, Model *m, MoetErr *err) {
    hid_t f = open_ro_(path, err);
    if (f < 0) return MOET_EFAIL;
    int rc = MOET_OK;
    for (int i = 0; i < m->n_tensors && rc == MOET_OK; i++)
        rc = load_tensor_(f, path, m, &m->tensors[i], m->params + m->tensors[i].offset, err);
    H5Fclose(f);
    return rc;
}
