// lane_sums: sums of products in double for the CPU kernels, SUM_LANES running sums. One sum in
// order waits for each addition (~4 cycles), which held sum_squares to 9 GB/s and the RMSNorm
// rows to 15-20 GB/s on a Zen 4 core (bench/results/2026-11-27-profile.md); SUM_LANES sums, lane
// j taking every SUM_LANES-th term from j, fill one vector register and run at memory speed. The
// lanes are added by a fixed tree, then the tail in order: the same bits on any ISA and thread
// count (each caller fixes how it splits the work).
#pragma once
#include <stddef.h>

#define SUM_LANES 8
_Static_assert(SUM_LANES == 8, "lanes_total_ adds a tree of 8");

static inline double lanes_total_(const double *s) {
    return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}

// sum a_i b_i
static inline double lane_dot(const float *a, const float *b, size_t n) {
    double s[SUM_LANES] = {0.0}, tail = 0.0;
    size_t i = 0;
    for (; i + SUM_LANES <= n; i += SUM_LANES)
        for (int j = 0; j < SUM_LANES; j++) s[j] += (double)a[i + j] * b[i + j];
    for (; i < n; i++) tail += (double)a[i] * b[i];
    return lanes_total_(s) + tail;
}

// sum a_i b_i c_i, each product ((double)a_i * b_i) * c_i
static inline double lane_dot3(const float *a, const float *b, const float *c, size_t n) {
    double s[SUM_LANES] = {0.0}, tail = 0.0;
    size_t i = 0;
    for (; i + SUM_LANES <= n; i += SUM_LANES)
        for (int j = 0; j < SUM_LANES; j++) s[j] += (double)a[i + j] * b[i + j] * c[i + j];
    for (; i < n; i++) tail += (double)a[i] * b[i] * c[i];
    return lanes_total_(s) + tail;
}

// sum x_i^2
static inline double lane_sum_sq(const float *x, size_t n) {
    return lane_dot(x, x, n);
}
