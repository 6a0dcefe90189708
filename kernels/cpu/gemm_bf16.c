// CPU kernels: the dense, expert and LM-head matmuls with bf16 operands and fp32 accumulation
// ([train] precision = bf16 on cpu), the CPU counterpart of kernels/cuda/gemm.cu's bf16 mode.
//
// Each fp32 operand is rounded to bf16 (round to nearest even, as __float2bfloat16_rn) into a
// workspace that grows by doubling (the weights: into the parameters' bf16 copy, below), and the
// product runs as a oneDNN matmul primitive, bf16 x bf16 -> f32, accumulating into fp32
// (beta = 1 is a sum post-op). Weights, gradients and activations stay fp32: only the GEMM
// inputs are rounded. On CPUs with AVX512-BF16 (Zen 4, Cooper Lake, Sapphire Rapids:
// vdpbf16ps) oneDNN's kernels do twice the multiply-adds per instruction of fp32 FMA. The
// primitives are created once per (transpose A, transpose B, beta) with runtime M, N, K, so
// that the per-expert row counts, which change every step, do not create primitives.
//
// Like sgemm, these are called outside our own parallel regions and use all threads
// themselves (oneDNN's OpenMP build). Attention's small per-head products stay in fp32
// sgemm (kernels/cpu/attention.c): the fp32 reference backend (ops_cpu) does not use this
// file at all.
#include "kernels/env_switch.h"
#include "kernels/kernels.h"
#include "kernels/weight_blocks.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define PAR_MIN (1 << 16)

void bf16_round(uint16_t *dst, const float *src, size_t n) {
#pragma omp parallel for simd schedule(static) if (n >= PAR_MIN)
    for (size_t i = 0; i < n; i++) {
        uint32_t u;
        memcpy(&u, &src[i], sizeof u);
        if ((u & 0x7fffffffu) > 0x7f800000u) {
            dst[i] = (uint16_t)((u >> 16) | 0x40u); // NaN stays a (quiet) NaN
        } else {
            u += 0x7fffu + ((u >> 16) & 1u); // round to nearest, ties to even
            dst[i] = (uint16_t)(u >> 16);
        }
    }
}

// ---------------------------------------------------------------------------------------
// The registered parameters' bf16 copy (Ops.params_register on ops_cpu_bf16()).
//
// The matmuls below round their weights like their other operands, yet the weights change only
// at the optimizer step: every weight was rounded twice per training step (forward, and for
// dinp), and the LM head's weight once per chunk of rows each time (bench-cpu-moe: 16 times,
// 412 M of the 520 M weight values rounded per step), and in decoding every weight once per
// token. As on the GPU (kernels/cuda/weights.cu), the backend keeps one bf16 copy of the
// parameters the model registers, in blocks of WBLOCK floats with a valid flag each
// (kernels/weight_blocks.h):
//   - a matmul whose weight lies in the registered range rounds those of its blocks that are not
//     valid, marks them valid and reads the copy (wcopy_get_);
//   - every write into the range through the op table (to_device, copy, zero, zero_fill,
//     scale_inplace, adamw_update: ops_cpu.c) or announced by the caller (Ops.params_written)
//     marks the blocks it touches not valid.
// So a training step rounds each weight once, at its first matmul after the optimizer step.
// (Unlike the GPU's, AdamW does not write the copy: its loop is bound by memory bandwidth here,
// and the extra store cost it more than the rounding it saves, 2026-11-27-cpu-weight-copy.md.)
// The copy holds bf16_round's values, so the products are the same bits as with per-call
// rounding. Cost: 2 bytes per parameter. A/B switch: MOET_CPU_WEIGHT_COPY=0.

static struct {
    int setting;                  // 1 on, 0 off, -1: not yet read from MOET_CPU_WEIGHT_COPY
    WeightBlocks wb;              // the registered parameters and the copy's valid blocks
    uint16_t *copy;               // their bf16 copy, allocated at its first use
    unsigned long long converted; // values rounded into the copy, ever
} wc_ = {.setting = -1};

void cpu_bf16_set_weight_copy(int on) {
    wc_.setting = on < 0 ? kernels_env_switch("MOET_CPU_WEIGHT_COPY", "1", "0",
                                              "the bf16 CPU matmuls round their weights in "
                                              "every op (no bf16 copy of the parameters)",
                                              "the bf16 CPU matmuls with their weights rounded "
                                              "in every op")
                         : on != 0;
}

int cpu_bf16_weight_copy(void) {
    if (wc_.setting < 0) cpu_bf16_set_weight_copy(-1);
    return wc_.setting;
}

static void wcopy_forget_(void) {
    free(wc_.copy);
    wc_.copy = NULL;
    wblocks_clear(&wc_.wb);
}

void cpu_bf16_weights_register(const float *p, size_t n) {
    wcopy_forget_();
    if (p && n > 0 && cpu_bf16_weight_copy()) wblocks_set(&wc_.wb, p, n);
}

void cpu_bf16_weights_freed(const void *p) {
    if (p && p == (const void *)wc_.wb.base) wcopy_forget_();
}

size_t cpu_bf16_weight_copy_bytes(void) {
    return wc_.copy ? wc_.wb.n * sizeof(uint16_t) : 0;
}

unsigned long long cpu_bf16_weight_converted(void) {
    return wc_.converted;
}

void cpu_bf16_weights_written(const void *p, size_t bytes) {
    wblocks_written(&wc_.wb, p, bytes);
}

#ifdef MOET_DNNL
#include <oneapi/dnnl/dnnl.h>
#include <pthread.h>

static struct {
    pthread_once_t once;
    int ok;
    char why[256];
    dnnl_engine_t engine;
    dnnl_stream_t stream;
    dnnl_primitive_t prim[2][2][2]; // [transpose A][transpose B][beta]
    uint16_t *ws[2];                // the rounded A and B
    size_t ws_cap[2];               // elements
} g_ = {.once = PTHREAD_ONCE_INIT};

static void init_(void) {
    if (dnnl_engine_create(&g_.engine, dnnl_cpu, 0) != dnnl_success ||
        dnnl_stream_create(&g_.stream, g_.engine, dnnl_stream_default_flags) != dnnl_success) {
        snprintf(g_.why, sizeof g_.why, "oneDNN could not create its CPU engine");
        return;
    }
    // bf16 dot products in hardware: AVX512-BF16 (0xe7 is avx512_core_bf16's bits; the AMX
    // ISAs contain them). Without them oneDNN emulates bf16 at a fraction of sgemm's speed.
    const unsigned isa = (unsigned)dnnl_get_effective_cpu_isa();
    if ((isa & (unsigned)dnnl_cpu_isa_avx512_core_bf16) != (unsigned)dnnl_cpu_isa_avx512_core_bf16) {
        const char *cap = getenv("ONEDNN_MAX_CPU_ISA");
        if (!cap || !*cap) cap = getenv("DNNL_MAX_CPU_ISA");
        char capped[96] = "";
        if (cap && *cap) snprintf(capped, sizeof capped, ", capped by ONEDNN_MAX_CPU_ISA=%.40s", cap);
        snprintf(g_.why, sizeof g_.why,
                 "this CPU has no bf16 dot-product instructions (AVX512-BF16 or AMX; oneDNN "
                 "reports ISA 0x%x%s): set [train] precision = auto or fp32",
                 isa, capped);
        return;
    }
    const dnnl_dim_t RT = DNNL_RUNTIME_DIM_VAL;
    for (int ta = 0; ta < 2; ta++)
        for (int tb = 0; tb < 2; tb++)
            for (int beta = 0; beta < 2; beta++) {
                dnnl_dims_t dims = {RT, RT};
                dnnl_memory_desc_t a, b, c;
                dnnl_matmul_desc_t md;
                dnnl_primitive_attr_t attr = NULL;
                dnnl_post_ops_t po = NULL;
                dnnl_primitive_desc_t pd = NULL;
                int bad = dnnl_memory_desc_init_by_tag(&a, 2, dims, dnnl_bf16,
                                                       ta ? dnnl_ba : dnnl_ab) ||
                          dnnl_memory_desc_init_by_tag(&b, 2, dims, dnnl_bf16,
                                                       tb ? dnnl_ba : dnnl_ab) ||
                          dnnl_memory_desc_init_by_tag(&c, 2, dims, dnnl_f32, dnnl_ab) ||
                          dnnl_matmul_desc_init(&md, &a, &b, NULL, &c) ||
                          dnnl_primitive_attr_create(&attr);
                if (!bad && beta)
                    bad = dnnl_post_ops_create(&po) || dnnl_post_ops_append_sum(po, 1.0f) ||
                          dnnl_primitive_attr_set_post_ops(attr, po);
                if (!bad) bad = dnnl_primitive_desc_create(&pd, &md, attr, g_.engine, NULL);
                if (!bad) bad = dnnl_primitive_create(&g_.prim[ta][tb][beta], pd);
                if (pd) dnnl_primitive_desc_destroy(pd);
                if (po) dnnl_post_ops_destroy(po);
                if (attr) dnnl_primitive_attr_destroy(attr);
                if (bad) {
                    snprintf(g_.why, sizeof g_.why,
                             "oneDNN has no bf16 matmul with runtime shapes here (transpose %d/%d)",
                             ta, tb);
                    return;
                }
            }
    g_.ok = 1;
}

int cpu_bf16_gemm_open(char *why, int len) {
    pthread_once(&g_.once, init_);
    if (!g_.ok && why) snprintf(why, (size_t)len, "%s", g_.why);
    return g_.ok ? 0 : 1;
}

const char *cpu_bf16_gemm_info(void) {
    static char info[128];
    const dnnl_version_t *v = dnnl_version();
    snprintf(info, sizeof info, "oneDNN %d.%d.%d bf16 matmul", v->major, v->minor, v->patch);
    return info;
}

// The workspace `which` (0: A, 1: B) with room for n elements; grows by at least doubling.
static uint16_t *ws_(int which, size_t n) {
    if (n > g_.ws_cap[which]) {
        size_t cap = g_.ws_cap[which] * 2;
        if (cap < n) cap = n;
        free(g_.ws[which]);
        g_.ws[which] = malloc(cap * sizeof(uint16_t));
        if (!g_.ws[which]) {
            fprintf(stderr, "moet: fatal: out of memory allocating the bf16 GEMM workspace "
                            "(%.2f GiB)\n", (double)(cap * sizeof(uint16_t)) / (1 << 30));
            exit(1);
        }
        g_.ws_cap[which] = cap;
    }
    return g_.ws[which];
}

// C (M,N) [+]= op(A) op(B) on rounded operands. A is stored (M,K), or (K,M) when ta; B is
// stored (K,N), or (N,K) when tb; all contiguous.
static void gemm_(int ta, int tb, int64_t M, int64_t N, int64_t K, const uint16_t *A,
                  const uint16_t *B, int beta, float *C) {
    dnnl_memory_desc_t a, b, c;
    dnnl_dims_t ad = {M, K}, bd = {K, N}, cd = {M, N};
    dnnl_memory_t ma = NULL, mb = NULL, mc = NULL;
    int bad = dnnl_memory_desc_init_by_tag(&a, 2, ad, dnnl_bf16, ta ? dnnl_ba : dnnl_ab) ||
              dnnl_memory_desc_init_by_tag(&b, 2, bd, dnnl_bf16, tb ? dnnl_ba : dnnl_ab) ||
              dnnl_memory_desc_init_by_tag(&c, 2, cd, dnnl_f32, dnnl_ab) ||
              dnnl_memory_create(&ma, &a, g_.engine, (void *)A) ||
              dnnl_memory_create(&mb, &b, g_.engine, (void *)B) ||
              dnnl_memory_create(&mc, &c, g_.engine, C);
    if (!bad) {
        dnnl_exec_arg_t args[3] = {
            {DNNL_ARG_SRC, ma}, {DNNL_ARG_WEIGHTS, mb}, {DNNL_ARG_DST, mc}};
        bad = dnnl_primitive_execute(g_.prim[ta][tb][beta], g_.stream, 3, args) ||
              dnnl_stream_wait(g_.stream);
    }
    if (ma) dnnl_memory_destroy(ma);
    if (mb) dnnl_memory_destroy(mb);
    if (mc) dnnl_memory_destroy(mc);
    if (bad) {
        fprintf(stderr, "moet: fatal: oneDNN bf16 matmul %lldx%lldx%lld failed\n", (long long)M,
                (long long)N, (long long)K);
        exit(1);
    }
}

// w[0..n) in bf16 from the copy, its stale blocks rounded first; NULL when w is not inside the
// registered parameters whole (or the copy is off): the caller rounds it itself.
static const uint16_t *wcopy_get_(const float *w, size_t n) {
    size_t i;
    if (n == 0 || !wblocks_range(&wc_.wb, w, n, &i)) return NULL;
    if (!wc_.copy) {
        wc_.copy = malloc(wc_.wb.n * sizeof(uint16_t));
        if (!wc_.copy) {
            fprintf(stderr,
                    "moet: fatal: out of memory allocating the parameters' bf16 copy "
                    "(%.2f GiB; MOET_CPU_WEIGHT_COPY=0 rounds the weights per op)\n",
                    (double)(wc_.wb.n * sizeof(uint16_t)) / (1 << 30));
            exit(1);
        }
    }
    size_t b = i / WBLOCK, f0, f1;
    while (wblocks_next_stale(&wc_.wb, i, n, &b, &f0, &f1)) { // a run of stale blocks at a time
        bf16_round(wc_.copy + f0, wc_.wb.base + f0, f1 - f0);
        wc_.converted += f1 - f0;
    }
    return wc_.copy + i;
}

// The weight w[0..n) in bf16: from the parameters' copy, or rounded into workspace B.
static const uint16_t *weight_(const float *w, size_t n) {
    const uint16_t *c = wcopy_get_(w, n);
    if (c) return c;
    uint16_t *b = ws_(1, n);
    bf16_round(b, w, n);
    return b;
}

static void ensure_open_(void) {
    char why[256];
    if (cpu_bf16_gemm_open(why, sizeof why)) {
        fprintf(stderr, "moet: fatal: bf16 GEMMs on the CPU: %s\n", why);
        exit(1);
    }
}

// out is (N,OC), inp is (N,C), w is (OC,C)
void matmul_forward_bf16(float *out, const float *inp, const float *w, int N, int C, int OC) {
    if (N <= 0 || OC <= 0) return;
    if (C <= 0) {
        memset(out, 0, (size_t)N * OC * sizeof(float));
        return;
    }
    ensure_open_();
    uint16_t *a = ws_(0, (size_t)N * C);
    bf16_round(a, inp, (size_t)N * C);
    gemm_(0, 1, N, OC, C, a, weight_(w, (size_t)OC * C), 0, out);
}

// dinp += dout @ w; dw += dout^T @ inp. dout is rounded once for both products.
void matmul_backward_bf16(float *dinp, float *dw, const float *dout, const float *inp,
                          const float *w, int N, int C, int OC) {
    if (N <= 0 || C <= 0 || OC <= 0 || (!dinp && !dw)) return;
    ensure_open_();
    uint16_t *g = ws_(0, (size_t)N * OC);
    bf16_round(g, dout, (size_t)N * OC);
    if (dinp) gemm_(0, 0, N, C, OC, g, weight_(w, (size_t)OC * C), 1, dinp);
    if (dw) {
        uint16_t *b = ws_(1, (size_t)N * C);
        bf16_round(b, inp, (size_t)N * C);
        gemm_(1, 0, OC, C, N, g, b, 1, dw);
    }
}

#else // a build without oneDNN: precision = bf16 on cpu is refused at open

int cpu_bf16_gemm_open(char *why, int len) {
    if (why)
        snprintf(why, (size_t)len,
                 "this moet was built without oneDNN, which the CPU's bf16 GEMMs use: install "
                 "libdnnl-dev (launch/setup-deps.sh) and rebuild, or set [train] precision = "
                 "auto or fp32");
    return 1;
}
const char *cpu_bf16_gemm_info(void) {
    return "no oneDNN";
}
static void absent_(void) {
    fprintf(stderr, "moet: fatal: bf16 GEMMs on the CPU: built without oneDNN\n");
    exit(1);
}
void matmul_forward_bf16(float *out, const float *inp, const float *w, int N, int C, int OC) {
    (void)out, (void)inp, (void)w, (void)N, (void)C, (void)OC;
    absent_();
}
void matmul_backward_bf16(float *dinp, float *dw, const float *dout, const float *inp,
                          const float *w, int N, int C, int OC) {
    (void)dinp, (void)dw, (void)dout, (void)inp, (void)w, (void)N, (void)C, (void)OC;
    absent_();
}
#endif
