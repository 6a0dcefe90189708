// cmd_inspect: `moet inspect CKPT [--verify] [--config]`: what a checkpoint holds (root and
// /trainer attributes, tensor table with shapes and checksums), optionally checking every
// checksum (ckpt_verify_count) or printing the run's INI text.
#include <hdf5.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "train/ckpt.h"
#include "train/cli.h"

static const char *INSPECT_HELP =
    "usage: moet inspect CKPT [--verify] [--config]\n"
    "\n"
    "Prints what the checkpoint CKPT holds: its step, tokens seen, creation time and format,\n"
    "the trainer state (/trainer: optimizer step, learning rate, data position and dataset\n"
    "fingerprint), the number of tensors and parameters, and a table of every tensor (name,\n"
    "shape, dtype, checksum). CKPT is a file, a run folder (its latest.h5) or latest.h5.\n"
    "\n"
    "  --verify   recompute every dataset's checksum; exit 1 naming the first bad tensor\n"
    "  --config   also print the run's configuration (INI text stored in the file)\n";

// Prints one attribute as "  name  value" (integers, floats, strings; others by class).
static herr_t print_attr_(hid_t loc, const char *name, const H5A_info_t *info, void *data) {
    (void)info;
    (void)data;
    if (strcmp(name, "config") == 0) return 0;  // printed by --config
    hid_t a = H5Aopen(loc, name, H5P_DEFAULT);
    if (a < 0) return 0;
    hid_t t = H5Aget_type(a);
    H5T_class_t c = H5Tget_class(t);
    printf("  %-18s ", name);
    if (c == H5T_INTEGER) {
        if (H5Tget_sign(t) == H5T_SGN_NONE) {
            uint64_t v = 0;
            H5Aread(a, H5T_NATIVE_UINT64, &v);
            printf("%llu\n", (unsigned long long)v);
        } else {
            int64_t v = 0;
            H5Aread(a, H5T_NATIVE_INT64, &v);
            printf("%lld\n", (long long)v);
        }
    } else if (c == H5T_FLOAT) {
        double v = 0;
        H5Aread(a, H5T_NATIVE_DOUBLE, &v);
        printf("%.9g\n", v);
    } else if (c == H5T_STRING && H5Tis_variable_str(t) > 0) {
        char *s = NULL;
        hid_t mt = H5Tcopy(H5T_C_S1);
        H5Tset_size(mt, H5T_VARIABLE);
        H5Tset_cset(mt, H5Tget_cset(t));
        if (H5Aread(a, mt, &s) >= 0 && s) printf("%s\n", s);
        else printf("(unreadable)\n");
        if (s) H5free_memory(s);
        H5Tclose(mt);
    } else if (c == H5T_STRING) {
        size_t len = H5Tget_size(t);
        char *s = calloc(len + 1, 1);
        hid_t mt = H5Tcopy(H5T_C_S1);
        H5Tset_size(mt, len);
        H5Tset_cset(mt, H5Tget_cset(t));
        if (H5Aread(a, mt, s) >= 0) printf("%s\n", s);
        else printf("(unreadable)\n");
        H5Tclose(mt);
        free(s);
    } else {
        printf("(HDF5 type class %d)\n", (int)c);
    }
    H5Tclose(t);
    H5Aclose(a);
    return 0;
}

typedef struct {
    int only_count;      // 1: count tensors and parameters of /model, 0: print the table
    int n_model;
    long long n_params;
    int n_datasets;
} TableCtx;

static herr_t tensor_visit_(hid_t f, const char *name, const H5O_info_t *info, void *data) {
    TableCtx *c = data;
    if (info->type != H5O_TYPE_DATASET) return 0;
    hid_t d = H5Dopen2(f, name, H5P_DEFAULT);
    if (d < 0) {
        if (!c->only_count) printf("  %-60s (cannot open)\n", name);
        return 0;
    }
    hid_t s = H5Dget_space(d);
    int nd = H5Sget_simple_extent_ndims(s);
    hsize_t dims[8] = {0};
    if (nd > 8) nd = 8;
    H5Sget_simple_extent_dims(s, dims, NULL);
    long long n = (long long)H5Sget_simple_extent_npoints(s);
    c->n_datasets++;
    if (strncmp(name, "model/", 6) == 0) {
        c->n_model++;
        c->n_params += n;
    }
    if (!c->only_count) {
        char shape[96] = "(";
        for (int i = 0; i < nd; i++)
            snprintf(shape + strlen(shape), sizeof shape - strlen(shape), "%s%llu",
                     i ? ", " : "", (unsigned long long)dims[i]);
        strncat(shape, ")", sizeof shape - strlen(shape) - 1);
        hid_t t = H5Dget_type(d);
        const char *dtype = "other";
        if (H5Tget_class(t) == H5T_FLOAT) dtype = H5Tget_size(t) == 4 ? "f32" : "f64";
        else if (H5Tget_class(t) == H5T_INTEGER) dtype = H5Tget_size(t) == 4 ? "i32" : "i64";
        H5Tclose(t);
        char sum[64] = "-";
        if (H5Aexists(d, "checksum") > 0) {
            hid_t a = H5Aopen(d, "checksum", H5P_DEFAULT);
            hid_t at = H5Aget_type(a);
            size_t len = H5Tget_size(at);
            if (H5Tis_variable_str(at) <= 0 && len < sizeof sum) {
                hid_t mt = H5Tcopy(H5T_C_S1);
                H5Tset_size(mt, len);
                memset(sum, 0, sizeof sum);
                if (H5Aread(a, mt, sum) < 0) snprintf(sum, sizeof sum, "(unreadable)");
                H5Tclose(mt);
            }
            H5Tclose(at);
            H5Aclose(a);
        }
        printf("  %-60s %-18s %-5s %s\n", name, shape, dtype, sum);
    }
    H5Sclose(s);
    H5Dclose(d);
    return 0;
}

int cmd_inspect(int argc, char **argv, MoetErr *err) {
    const char *spec = NULL;
    int verify = 0, show_config = 0;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
            fputs(INSPECT_HELP, stdout);
            return MOET_OK;
        } else if (strcmp(argv[i], "--verify") == 0) {
            verify = 1;
        } else if (strcmp(argv[i], "--config") == 0) {
            show_config = 1;
        } else if (argv[i][0] == '-') {
            return moet_errf(err, MOET_EUSAGE, "inspect: unknown option %s (see moet inspect "
                             "--help)", argv[i]);
        } else if (!spec) {
            spec = argv[i];
        } else {
            return moet_errf(err, MOET_EUSAGE, "inspect: one CKPT only (got %s and %s)", spec,
                             argv[i]);
        }
    }
    if (!spec) return moet_errf(err, MOET_EUSAGE, "inspect: missing CKPT (see --help)");
    char path[4096];
    int rc = ckpt_resolve(spec, NULL, path, sizeof path, err);
    if (rc) return rc;

    H5Eset_auto2(H5E_DEFAULT, NULL, NULL);
    hid_t f = H5Fopen(path, H5F_ACC_RDONLY, H5P_DEFAULT);
    if (f < 0)
        return moet_errf(err, MOET_EFAIL, "%s: cannot read (truncated or not a checkpoint)",
                         path);
    printf("checkpoint %s\n", path);
    H5Aiterate2(f, H5_INDEX_NAME, H5_ITER_INC, NULL, print_attr_, NULL);
    if (H5Lexists(f, "/trainer", H5P_DEFAULT) > 0) {
        hid_t g = H5Gopen2(f, "/trainer", H5P_DEFAULT);
        printf("trainer:\n");
        H5Aiterate2(g, H5_INDEX_NAME, H5_ITER_INC, NULL, print_attr_, NULL);
        H5Gclose(g);
    }
    TableCtx c = {1, 0, 0, 0};
    H5Ovisit(f, H5_INDEX_NAME, H5_ITER_INC, tensor_visit_, &c);
    printf("tensors: %d in /model, %lld parameters; %d datasets in all%s\n", c.n_model,
           c.n_params, c.n_datasets,
           H5Lexists(f, "/optim", H5P_DEFAULT) > 0 ? " (with /optim)" : " (no /optim)");
    printf("\n  %-60s %-18s %-5s %s\n", "dataset", "shape", "dtype", "checksum");
    c.only_count = 0;
    H5Ovisit(f, H5_INDEX_NAME, H5_ITER_INC, tensor_visit_, &c);
    H5Fclose(f);

    if (show_config) {
        char *ini = NULL;
        if ((rc = ckpt_read_config_text(path, &ini, err))) return rc;
        printf("\n# configuration\n%s", ini);
        if (ini[0] && ini[strlen(ini) - 1] != '\n') printf("\n");
        free(ini);
    }
    if (verify) {
        int n = 0;
        fflush(stdout);
        if ((rc = ckpt_verify_count(path, &n, err))) return rc;
        printf("\nverified %d datasets: OK\n", n);
    }
    return MOET_OK;
}
