// testutil: shared helpers for the CUnit suites.
#include "tests/testutil.h"

#include <CUnit/Basic.h>
#include <dirent.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int tu_run(const char *suite, const TuTest *tests, int n_tests) {
    if (CU_initialize_registry() != CUE_SUCCESS) return 1;
    CU_pSuite s = CU_add_suite(suite, NULL, NULL);
    // TU_ONLY=text: only the tests whose name holds text (e.g. one test under a sanitizer)
    const char *only = getenv("TU_ONLY");
    unsigned added = 0;
    for (int i = 0; i < n_tests; i++)
        if (!only || strstr(tests[i].name, only))
            CU_add_test(s, tests[i].name, tests[i].fn), added++;
    if (only) printf("TU_ONLY=%s: %u of %d tests\n", only, added, n_tests);
    CU_basic_set_mode(CU_BRM_VERBOSE);
    CU_basic_run_tests();
    unsigned failed = CU_get_number_of_failures() + CU_get_number_of_tests_failed();
    unsigned ran = CU_get_number_of_tests_run();
    CU_cleanup_registry();
    return (failed == 0 && added > 0 && ran == added) ? 0 : 1;
}

uint64_t tu_rand_u64(uint64_t *state) {
    uint64_t z = (*state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

void tu_fill_uniform(float *x, size_t n, uint64_t seed, float scale) {
    uint64_t s = seed;
    for (size_t i = 0; i < n; i++) {
        double u = (double)(tu_rand_u64(&s) >> 11) * 0x1.0p-53;
        x[i] = (float)((2.0 * u - 1.0) * scale);
    }
}

double tu_max_abs(const float *x, size_t n) {
    double m = 0;
    for (size_t i = 0; i < n; i++) m = fmax(m, fabs((double)x[i]));
    return m;
}

int tu_allclose(const char *name, const float *got, const float *want, size_t n, double atol,
                double rtol) {
    size_t worst = 0, bad = 0;
    double worst_excess = -INFINITY, worst_ratio = 0.0;
    for (size_t i = 0; i < n; i++) {
        double g = got[i], w = want[i];
        double tol = atol + rtol * fabs(w);
        double excess = fabs(g - w) - tol;
        if (tol > 0) worst_ratio = fmax(worst_ratio, fabs(g - w) / tol);
        if (!(excess <= 0)) bad++;   // NaN counts as bad
        if (!(excess <= worst_excess)) {
            worst_excess = excess;
            worst = i;
        }
    }
    if (getenv("TU_VERBOSE"))
        printf("      %-48s worst |err|/tol = %.3f\n", name, worst_ratio);
    if (bad) {
        fprintf(stderr, "  %s: %zu of %zu elements differ; worst [%zu] got %.8g want %.8g "
                "(atol %.1e, rtol %.1e)\n", name, bad, n, worst, (double)got[worst],
                (double)want[worst], atol, rtol);
        return 0;
    }
    return 1;
}

void tu_remove_dir(const char *dir) {
    DIR *d = opendir(dir);
    if (!d) return;
    struct dirent *e;
    char path[4200];
    while ((e = readdir(d)) != NULL) {
        if (e->d_name[0] == '.') continue;
        snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
        unlink(path);
    }
    closedir(d);
    rmdir(dir);
}
