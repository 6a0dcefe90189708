// weight_blocks: the host-side bookkeeping of a backend's bf16 copy of the registered
// parameters (Ops.params_register): which blocks of WBLOCK floats hold the bf16 of the current
// fp32 values. Shared by kernels/cpu/gemm_bf16.c and kernels/cuda/weights.cu (header-only, C
// and CUDA C); each backend owns its copy's memory and does the rounding itself.
#pragma once
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

// 65536 floats (256 KiB; 128 KiB of bf16): fine enough that a small write (the experts' bias,
// written every step with aux-loss-free balancing) costs one block's conversion, coarse enough
// that the flags of 7 G parameters take 105 KiB.
enum { WBLOCK = 1 << 16 };

typedef struct {
    const float *base;    // the registered parameters (NULL: none)
    size_t n;             // their count
    unsigned char *valid; // per block: 1 when the copy holds bf16(base) there
    size_t nblocks;
} WeightBlocks;

// Forgets the registration (all fields zero).
static inline void wblocks_clear(WeightBlocks *w) {
    free(w->valid);
    memset(w, 0, sizeof *w);
}

// Registers p[0..n), every block stale; fatal when out of memory.
static inline void wblocks_set(WeightBlocks *w, const float *p, size_t n) {
    wblocks_clear(w);
    w->nblocks = (n + WBLOCK - 1) / WBLOCK;
    w->valid = (unsigned char *)calloc(w->nblocks, 1);
    if (!w->valid) {
        fprintf(stderr, "moet: fatal: out of memory for the weight copy's flags\n");
        exit(EXIT_FAILURE);
    }
    w->base = p;
    w->n = n;
}

// The blocks that bytes written at p touch become stale (nothing where p is elsewhere).
static inline void wblocks_written(WeightBlocks *w, const void *p, size_t bytes) {
    if (!w->base || bytes == 0) return;
    const char *lo = (const char *)w->base, *hi = lo + w->n * sizeof(float);
    const char *a = (const char *)p, *b = a + bytes;
    if (b <= lo || a >= hi) return;
    if (a < lo) a = lo;
    if (b > hi) b = hi;
    const size_t f0 = (size_t)(a - lo) / sizeof(float);                       // first float touched
    const size_t f1 = ((size_t)(b - lo) + sizeof(float) - 1) / sizeof(float); // past the last
    memset(w->valid + f0 / WBLOCK, 0, (f1 - 1) / WBLOCK - f0 / WBLOCK + 1);
}

// 1 and *i = x - base when x[0..n) lies inside the registered parameters whole, else 0.
static inline int wblocks_range(const WeightBlocks *w, const float *x, size_t n, size_t *i) {
    if (!w->base || x < w->base || x >= w->base + w->n || n > w->n - (size_t)(x - w->base))
        return 0;
    *i = (size_t)(x - w->base);
    return 1;
}

// The next run of stale blocks under the floats [i, i + n), from block *b on: 1 and the floats
// [*f0, *f1) to convert, which are marked valid (the caller converts them now); 0 at the end.
// Start with *b = i / WBLOCK.
static inline int wblocks_next_stale(WeightBlocks *w, size_t i, size_t n, size_t *b, size_t *f0,
                                     size_t *f1) {
    if (n == 0) return 0;
    const size_t last = (i + n - 1) / WBLOCK;
    while (*b <= last && w->valid[*b]) (*b)++;
    if (*b > last) return 0;
    size_t e = *b + 1;
    while (e <= last && !w->valid[e]) e++;
    *f0 = *b * WBLOCK;
    *f1 = e * WBLOCK < w->n ? e * WBLOCK : w->n;
    memset(w->valid + *b, 1, e - *b);
    *b = e;
    return 1;
}
