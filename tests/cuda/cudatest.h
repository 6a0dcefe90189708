// cudatest: host <-> device helpers shared by the CUDA tests (header only, so that every test
// stays one file). Allocation failures end the test with a message.
#pragma once
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/cuda/kernels_cuda.h"
#include "tests/testutil.h"

static inline void *tcu_xmalloc(size_t bytes) {
    void *p = malloc(bytes ? bytes : 1);
    if (!p) {
        fprintf(stderr, "cuda test: out of host memory (%zu bytes)\n", bytes);
        exit(1);
    }
    return p;
}

static inline float *tcu_host_alloc(size_t n) {
    return tcu_xmalloc(n * sizeof(float));
}

// n floats uniform in [-scale, scale) from seed (tu_fill_uniform)
static inline float *tcu_host_rand(size_t n, uint64_t seed, float scale) {
    float *p = tcu_host_alloc(n);
    tu_fill_uniform(p, n, seed, scale);
    return p;
}

static inline float *tcu_host_copy(const float *src, size_t n) {
    float *p = tcu_host_alloc(n);
    memcpy(p, src, n * sizeof *p);
    return p;
}

// a device copy of n host floats
static inline float *tcu_dev_from(const float *h, size_t n) {
    float *d = cuda_malloc(n * sizeof *d);
    cuda_memcpy_h2d(d, h, n * sizeof *d);
    return d;
}

// a host copy of n device floats (waits for the queued ops)
static inline float *tcu_host_from(const float *d, size_t n) {
    float *h = tcu_host_alloc(n);
    cuda_memcpy_d2h(h, d, n * sizeof *h);
    return h;
}

// Copies the device result back and compares it with the CPU result want:
// |got - want| <= atol_frac * max|want| + rtol * |want| for every element.
static inline int tcu_check(const char *name, const float *d_got, const float *want, size_t n,
                            double rtol, double atol_frac) {
    float *got = tcu_host_from(d_got, n);
    int ok = tu_allclose(name, got, want, n, atol_frac * tu_max_abs(want, n), rtol);
    free(got);
    return ok;
}

// The main() of a CUDA test: exits 77 (ctest "skipped") where no CUDA device exists, else opens
// device 0, prints its description and runs the tests as the CUnit suite `suite`.
static inline int tcu_main(const char *suite, const TuTest *tests, int n_tests) {
    if (cuda_device_count() == 0) {
        printf("skipped: no CUDA device\n");
        return TU_SKIP;
    }
    char info[512];
    if (cuda_init(0, info, sizeof info) != 0) {
        fprintf(stderr, "%s: %s\n", suite, info);
        return 1;
    }
    printf("%s\n", info);
    return tu_run(suite, tests, n_tests);
}
