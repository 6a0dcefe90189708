// testutil: shared helpers for the CUnit suites: a main() runner that fails the process on any
// failed assertion, deterministic random fills, and array comparison that reports the worst
// element. Exit status 77 means "skipped" to ctest (used where no GPU exists).
#pragma once
#include <CUnit/CUnit.h>
#include <stddef.h>
#include <stdint.h>

#define TU_SKIP 77

typedef struct {
    const char *name;
    void (*fn)(void);
} TuTest;

// Runs the tests as one CUnit suite named `suite`; returns 0 when all pass, 1 otherwise.
// TU_ONLY=text in the environment runs only the tests whose name holds text (none: 1).
int tu_run(const char *suite, const TuTest *tests, int n_tests);

// Fills x with uniform values in [-scale, scale) from a fixed seed (splitmix64).
void tu_fill_uniform(float *x, size_t n, uint64_t seed, float scale);
uint64_t tu_rand_u64(uint64_t *state);

// Compares got against want: |got - want| <= atol + rtol * |want| for every element.
// On failure prints the name, the worst index and both values, and returns 0.
int tu_allclose(const char *name, const float *got, const float *want, size_t n, double atol,
                double rtol);
// Max |x| over n elements.
double tu_max_abs(const float *x, size_t n);
// Removes the files of a flat folder (names starting with '.' are left) and then the folder;
// a folder that does not exist is fine.
void tu_remove_dir(const char *dir);
