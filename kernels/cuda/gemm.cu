// gemm.cu: the cuBLAS GEMMs of the CUDA backend: dense matmul (torch.nn.Linear without bias)
// and the grouped expert matmul, forward and backward, plus the process's cuBLAS handle, the
// GEMM precision switch that attention.cu shares, and the bf16 operand path (conversion
// workspace and kernel). Mirrors kernels/cpu/matmul.c op for op and is tested against it by
// tests/cuda/test_cuda_gemm.c.
//
// Row-major on column-major cuBLAS: a row-major (R,S) matrix X with row stride ld is, read
// column-major, the (S,R) matrix X^T with leading dimension ld. So every row-major product
// Y = A B is computed as the column-major product Y^T = B^T A^T, with no copies: the operands
// swap places and each keeps or flips its transpose. Each call below states the column-major
// equation it computes, in terms of the row-major names.
//
// bf16 operands (the default in bf16 mode). cuBLAS given fp32 operands and
// CUBLAS_COMPUTE_32F_FAST_16BF may pick TF32 kernels, and on the H100 it did for every GEMM of
// bench-gpu-olmoe (ncu, bench/results/2026-11-26-vs-pytorch.md): half of bf16's tensor-core
// rate. So each op converts its fp32 operands to bf16 (round to nearest even, one vectorised
// kernel) into a workspace owned by this file, and multiplies the copies with
// A, B = CUDA_R_16BF, C = CUDA_R_32F, CUBLAS_COMPUTE_32F: bf16 tensor cores, fp32 accumulation,
// fp32 outputs, and beta = 1 into the fp32 gradients that accumulate (the grouped ops' dinp is
// written: beta = 0 for its first product, kernels.h) exactly as before. The
// rounding is the one FAST_16BF was allowed to do, so the numerics are those the tests already
// bound. A/B switch for one device run: MOET_CUDA_GEMM_OPERANDS=fp32 in the environment (read
// at the first GEMM) restores the fp32 operands with FAST_16BF; =bf16 or unset is the default;
// anything else is fatal. See bench/results/2026-11-26-gpu-bf16-operands.md.
//
// The workspace grows to what one chunk of an op needs and stays allocated (like the cuBLAS
// handle) until the process ends; cuda_mem_stats counts it. Ops cut their work into chunks
// (rows, experts, heads) so that a chunk fits GEMM_WORKSPACE_LIMIT (1 GiB by default,
// cuda_set_gemm_workspace_limit); only a single weight matrix plus one row, or one sequence's
// q, k, v, dO plus one head's (T,T) scores, can exceed it, and then the workspace holds that.
#include <cublasLt.h>
#include <limits.h>
#include <string.h>

#include "kernels/cuda/cublas_util.cuh"
#include "kernels/cuda/kernels_cuda.h"

// ---------------------------------------------------------------------------------------
// GEMM precision and the cuBLAS handle

// 1: bf16 tensor cores with fp32 accumulation (the default), 0: exact fp32. See kernels_cuda.h.
static int bf16_mode_ = 1;

void cuda_set_gemm_bf16(int on) {
    bf16_mode_ = on != 0;
}

int cuda_gemm_bf16(void) {
    return bf16_mode_;
}

// 1: bf16 copies of the operands (the default), 0: fp32 operands with FAST_16BF, -1: not yet
// read from MOET_CUDA_GEMM_OPERANDS (read at the first GEMM, or by cuda_set_gemm_bf16_operands).
static int operands_bf16_ = -1;

static int operands_from_env_(void) {
    return kernels_env_switch(
        "MOET_CUDA_GEMM_OPERANDS", "bf16", "fp32",
        "the bf16-mode GEMMs take fp32 operands (CUBLAS_COMPUTE_32F_FAST_16BF; "
        "cuBLAS may run TF32)",
        "the bf16-mode GEMMs on fp32 operands");
}

void cuda_set_gemm_bf16_operands(int on) {
    operands_bf16_ = on < 0 ? operands_from_env_() : on != 0;
}

int cuda_gemm_bf16_operands(void) {
    if (operands_bf16_ < 0) operands_bf16_ = operands_from_env_();
    return operands_bf16_;
}

int gemm_bf16_operands_(void) {
    return bf16_mode_ && cuda_gemm_bf16_operands();
}

// The compute type of the fp32 entry points. CUBLAS_COMPUTE_32F_FAST_16BF lets cuBLAS round
// the fp32 operands to bf16 (or, where it prefers, to TF32, which is more precise: the H100 did
// for every GEMM) and accumulate in fp32; in bf16 mode the ops come here only with bf16
// operands off (MOET_CUDA_GEMM_OPERANDS=fp32). CUBLAS_COMPUTE_32F under CUBLAS_DEFAULT_MATH is
// plain fp32 FMA, no TF32 and no emulation. (gemm_bf16_ below: CUBLAS_COMPUTE_32F on bf16
// operands runs on the bf16 tensor cores under CUBLAS_DEFAULT_MATH.)
static cublasComputeType_t gemm_compute_type_(void) {
    return bf16_mode_ ? CUBLAS_COMPUTE_32F_FAST_16BF : CUBLAS_COMPUTE_32F;
}

// A cuBLAS handle that issues on `stream`.
static cublasHandle_t new_handle_(cudaStream_t stream) {
    cublasHandle_t handle;
    CUBLAS_CHECK(cublasCreate(&handle));
    CUBLAS_CHECK(cublasSetStream(handle, stream));
    // Explicit, though both are the defaults: the math mode must not allow TF32 or BF16x9
    // emulation behind CUBLAS_COMPUTE_32F, and no routine may use floating-point atomics
    // (determinism: cuBLAS is then bitwise reproducible on one GPU model; each stream has a
    // handle of its own, so no two streams share a handle's workspace).
    CUBLAS_CHECK(cublasSetMathMode(handle, CUBLAS_DEFAULT_MATH));
    CUBLAS_CHECK(cublasSetAtomicsMode(handle, CUBLAS_ATOMICS_NOT_ALLOWED));
    return handle;
}

cublasHandle_t cublas_handle_(void) {
    // the legacy default stream, where every other op of the backend runs (in call order). The
    // handle lives as long as the process (cuBLAS's default workspace included: it is not
    // counted by cuda_mem_stats).
    static cublasHandle_t handle = NULL;
    if (!handle) handle = new_handle_(0);
    return handle;
}

// Every GEMM entry point below counts its call and the host time it spends in the library
// (CudaHostStats): a cuBLAS call returns once its kernels are queued, so this is host work
// (argument checks, the algorithm heuristic, launches), not GPU time.
static void count_gemm_(double t0) {
    CudaHostStats *st = cuda_host_stats_acc_();
    st->gemm_calls++;
    st->gemm_host_s += cuda_host_now_() - t0;
}

void gemm_f32_(cublasOperation_t transa, cublasOperation_t transb, int m, int n, int k, float alpha,
               const float *A, int lda, const float *B, int ldb, float beta, float *C, int ldc) {
    const double t0 = cuda_host_now_();
    CUBLAS_CHECK(cublasGemmEx(cublas_handle_(), transa, transb, m, n, k, &alpha, A, CUDA_R_32F, lda,
                              B, CUDA_R_32F, ldb, &beta, C, CUDA_R_32F, ldc, gemm_compute_type_(),
                              CUBLAS_GEMM_DEFAULT));
    count_gemm_(t0);
}

void gemm_f32_strided_batched_(cublasOperation_t transa, cublasOperation_t transb, int m, int n,
                               int k, float alpha, const float *A, int lda, long long strideA,
                               const float *B, int ldb, long long strideB, float beta, float *C,
                               int ldc, long long strideC, int batch_count) {
    const double t0 = cuda_host_now_();
    CUBLAS_CHECK(cublasGemmStridedBatchedEx(cublas_handle_(), transa, transb, m, n, k, &alpha, A,
                                            CUDA_R_32F, lda, strideA, B, CUDA_R_32F, ldb, strideB,
                                            &beta, C, CUDA_R_32F, ldc, strideC, batch_count,
                                            gemm_compute_type_(), CUBLAS_GEMM_DEFAULT));
    count_gemm_(t0);
}

// ---------------------------------------------------------------------------------------
// Expert GEMMs on several streams (cuda_set_gemm_streams).
//
// One expert's GEMM in bench-gpu-olmoe (about 2560 rows against a 1024 x 2048 weight) is 80 to
// 160 output tiles of cuBLAS's 128 x 256 kind for the H100's 132 SMs: a wave or a wave and a
// fraction, so one GEMM after the other leaves SMs idle at the end of each. The grouped ops
// therefore issue the experts of a piece of rows round-robin on n side streams ("lanes" 1..n,
// non-blocking streams of this file), each with its own cuBLAS handle and cuBLASLt workspace
// (GEMMs that may run at the same time must not share one). Lane 0 is the legacy stream
// (cublas_handle_, lt_ws_), where everything else runs; it takes no part in a batch, so that
// nothing is issued on the legacy stream between a fork and its join. Around each batch:
//   fork: an event recorded on the legacy stream after the piece's conversions, waited on by
//         every side lane, so the GEMMs read finished operands;
//   join: an event per side lane after its GEMMs, waited on by the legacy stream, so the next
//         conversion into the workspace, and every later op, comes after all of them.
// The experts' outputs are disjoint (their rows of out and dinp, their own dw_e) and a GEMM's
// algorithm does not depend on its stream, so the results are the same bits for any number of
// lanes. Dense matmuls (one expert) and attention stay on the legacy stream, and so do pieces
// whose experts have fewer than LANES_MIN_ROWS rows on average (decoding: one row each): their
// GEMMs are too small for the fork and join (2n + 1 event calls on the host, and n waits) to
// pay.

// The setting n: 1, every GEMM on the legacy stream (as before 2026-11-27); 2 to
// GEMM_LANES_MAX, the batches on n side streams.
enum { GEMM_LANES_MAX = 8, GEMM_LANES_DEFAULT = 4, LANES_MIN_ROWS = 16 };

typedef struct {
    cudaStream_t stream;   // non-blocking; lane 0 (the legacy stream) has no entry here
    cublasHandle_t handle; // issues on stream
    void *lt_ws;           // cuBLASLt workspace (LT_WORKSPACE_BYTES, counted by cuda_mem_stats)
    cudaEvent_t done;      // the join: recorded on stream, waited on by the legacy stream
} GemmLane;

static GemmLane lanes_[GEMM_LANES_MAX + 1]; // [1, lanes_made_) exist; kept until the process ends
static int lanes_made_ = 1;
static int lanes_setting_ = -1; // -1: not yet read from MOET_CUDA_GEMM_STREAMS
static int lane_ = 0;           // the lane gemm_bf16_ issues on
static cudaEvent_t fork_ = NULL;

static int lanes_from_env_(void) {
    const char *v = getenv("MOET_CUDA_GEMM_STREAMS");
    if (!v || !*v) return GEMM_LANES_DEFAULT;
    char *end;
    const long n = strtol(v, &end, 10);
    if (*end || n < 1 || n > GEMM_LANES_MAX) {
        fprintf(stderr,
                "moet: MOET_CUDA_GEMM_STREAMS=%s: expected a number of streams from 1 to %d "
                "for the expert GEMMs (1: all on one stream, as before; unset: %d)\n",
                v, GEMM_LANES_MAX, GEMM_LANES_DEFAULT);
        exit(1);
    }
    if (n != GEMM_LANES_DEFAULT)
        fprintf(stderr, "moet: note: MOET_CUDA_GEMM_STREAMS=%ld: the expert GEMMs go on %ld "
                        "stream%s (default %d)\n",
                n, n, n == 1 ? "" : "s", GEMM_LANES_DEFAULT);
    return (int)n;
}

void cuda_set_gemm_streams(int n) {
    if (n == -1) lanes_setting_ = lanes_from_env_();
    else lanes_setting_ = n < 1 ? 1 : n > GEMM_LANES_MAX ? GEMM_LANES_MAX : n;
}

int cuda_gemm_streams(void) {
    if (lanes_setting_ < 0) lanes_setting_ = lanes_from_env_();
    return lanes_setting_;
}

// Starts a batch of the GEMMs of `experts` experts with `rows` rows in all, which may run at
// the same time; returns the number of side lanes it gets, 0 for none (the batch then runs on
// the legacy stream). Each of lanes 1..n waits for the legacy stream's work so far. Expert i of
// the batch goes on lane_of_(i, n).
static int lanes_fork_(int experts, int rows) {
    int n = cuda_gemm_streams();
    if (n > experts) n = experts;
    if (n <= 1 || rows < LANES_MIN_ROWS * experts) return 0;
    if (!fork_) CUDA_CHECK(cudaEventCreateWithFlags(&fork_, cudaEventDisableTiming));
    for (; lanes_made_ <= n; lanes_made_++) {
        GemmLane *l = &lanes_[lanes_made_];
        CUDA_CHECK(cudaStreamCreateWithFlags(&l->stream, cudaStreamNonBlocking));
        l->handle = new_handle_(l->stream);
        l->lt_ws = NULL; // allocated at its first cuBLASLt call
        CUDA_CHECK(cudaEventCreateWithFlags(&l->done, cudaEventDisableTiming));
    }
    CUDA_CHECK(cudaEventRecord(fork_, 0));
    for (int i = 1; i <= n; i++) CUDA_CHECK(cudaStreamWaitEvent(lanes_[i].stream, fork_, 0));
    return n;
}

static int lane_of_(int i, int n) {
    return n ? 1 + i % n : 0;
}

// Ends the batch: the legacy stream waits for every side lane; later GEMMs go on lane 0.
static void lanes_join_(int n) {
    for (int i = 1; i <= n; i++) {
        CUDA_CHECK(cudaEventRecord(lanes_[i].done, lanes_[i].stream));
        CUDA_CHECK(cudaStreamWaitEvent(0, lanes_[i].done, 0));
    }
    lane_ = 0;
}

// ---------------------------------------------------------------------------------------
// bf16-operand GEMMs through cuBLASLt with a cache of algorithms (cuda_set_gemm_lt).
//
// cublasGemmEx chooses an algorithm for each call on the host: a heuristic query, cached by
// cuBLAS per exact shape. The experts' row counts change every step, so in training nearly
// every expert GEMM is a new shape (64 experts x 6 GEMMs x layers per step); on the H100 the
// steps of bench-gpu-olmoe took 0.32-0.54 s of wall time for 0.28 s of kernels, the time
// shrinking as cuBLAS's cache filled (bench/results/2026-11-26-gpu-bf16-operands.md).
//
// Here the algorithm is chosen once per shape class: the exact shape, leading dimensions and
// operand alignments, with each dimension that no leading dimension bounds rounded up by
// lt_bucket_ (the heuristic is asked for that larger shape; an algorithm runs any smaller
// problem of the same layout, and cublasLtMatmul checks that it can). For the row-major ops
// of this file that dimension is the row count: n of the forward and dinp GEMMs, k of the dw
// GEMM. Which algorithm a call gets depends on its class alone, never on the calls before it,
// so two runs (or a run and its resume) compute the same bits.

// 1: cuBLASLt with cached algorithms (the default), 0: cublasGemmEx, -1: not yet read from
// MOET_CUDA_GEMM_LT (read at the first bf16-operand GEMM, or by cuda_set_gemm_lt(-1)).
static int lt_mode_ = -1;

static int lt_from_env_(void) {
    return kernels_env_switch(
        "MOET_CUDA_GEMM_LT", "1", "0",
        "the bf16-operand GEMMs go through cublasGemmEx (an algorithm heuristic "
        "per new shape)",
        "the bf16-operand GEMMs through cublasGemmEx");
}

void cuda_set_gemm_lt(int on) {
    lt_mode_ = on < 0 ? lt_from_env_() : on != 0;
}

int cuda_gemm_lt(void) {
    if (lt_mode_ < 0) lt_mode_ = lt_from_env_();
    return lt_mode_;
}

// x rounded up to 8 steps per octave: exact up to 64, then to a multiple of 2^(floor(log2(x-1))-3)
// (65 -> 72, 129 -> 144, 2560 -> 2560, 2561 -> 2816): at most 12.5 % above x.
static int lt_bucket_(int x) {
    if (x <= 64) return x;
    int lg = 0;
    while (((long long)(x - 1) >> (lg + 1)) != 0) lg++; // floor(log2(x - 1))
    const long long step = 1LL << (lg - 3);
    const long long r = ((long long)x + step - 1) / step * step;
    return r > INT_MAX ? INT_MAX : (int)r;
}

// The alignment class of a pointer for cuBLASLt's preferences: its largest power-of-two
// divisor, at most 256 (cuBLASLt's default assumption).
static uint32_t lt_align_(const void *p) {
    const uintptr_t u = (uintptr_t)p;
    const uintptr_t low = u & (~u + 1);
    return low == 0 || low > 256 ? 256u : (uint32_t)low;
}

typedef struct {
    int32_t ta, tb, m, n, k, lda, ldb, ldc; // n and k as classes (lt_bucket_) where free
    uint32_t align_a, align_b, align_c;
} LtKey;

typedef struct {
    LtKey key;
    int used;  // 0: an empty slot
    int ok;    // 1: algo below; 0: the heuristic had none, cublasGemmEx runs this class
    cublasLtMatmulAlgo_t algo;
} LtEntry;

// Open addressing, linear probing. A table 3/4 full stops caching: every further new class
// queries the heuristic at each call, still getting the same algorithm. At about 150 classes
// per model shape it never fills in practice.
enum { LT_SLOTS = 4096 };
static LtEntry lt_cache_[LT_SLOTS];
static int lt_used_ = 0;

// 32 MiB, the workspace the cuBLAS documentation recommends for Hopper (cublasSetWorkspace):
// split-k and stream-k algorithms need some.
#define LT_WORKSPACE_BYTES ((size_t)32 << 20)
static void *lt_ws_ = NULL;

static cublasLtHandle_t lt_handle_(void) {
    static cublasLtHandle_t h = NULL;
    if (!h) {
        CUBLAS_CHECK(cublasLtCreate(&h));
        lt_ws_ = cuda_malloc(LT_WORKSPACE_BYTES); // counted by cuda_mem_stats; kept like h
    }
    return h;
}

// The cuBLASLt workspace of a lane (lane 0: lt_ws_); a side lane's is allocated at its first use.
static void *lt_workspace_(int lane) {
    lt_handle_();
    if (lane == 0) return lt_ws_;
    if (!lanes_[lane].lt_ws) lanes_[lane].lt_ws = cuda_malloc(LT_WORKSPACE_BYTES);
    return lanes_[lane].lt_ws;
}

static uint64_t lt_hash_(const LtKey *k) {
    uint64_t h = 1469598103934665603ull; // FNV-1a over the key's bytes
    const unsigned char *b = (const unsigned char *)k;
    for (size_t i = 0; i < sizeof *k; i++) h = (h ^ b[i]) * 1099511628211ull;
    return h;
}

// The descriptors of one call: op(A) (m,k) and op(B) (k,n) bf16, C = D (m,n) fp32, column-major;
// a layout describes the stored matrix (before the transpose).
typedef struct {
    cublasLtMatmulDescOpaque_t op;
    cublasLtMatrixLayoutOpaque_t a, b, c;
} LtDescs;

static void lt_descs_(LtDescs *d, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                      int lda, int ldb, int ldc) {
    CUBLAS_CHECK(cublasLtMatmulDescInit(&d->op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    const int32_t opa = (int32_t)ta, opb = (int32_t)tb;
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(&d->op, CUBLASLT_MATMUL_DESC_TRANSA, &opa,
                                                sizeof opa));
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(&d->op, CUBLASLT_MATMUL_DESC_TRANSB, &opb,
                                                sizeof opb));
    CUBLAS_CHECK(cublasLtMatrixLayoutInit(&d->a, CUDA_R_16BF, ta == CUBLAS_OP_N ? m : k,
                                          ta == CUBLAS_OP_N ? k : m, lda));
    CUBLAS_CHECK(cublasLtMatrixLayoutInit(&d->b, CUDA_R_16BF, tb == CUBLAS_OP_N ? k : n,
                                          tb == CUBLAS_OP_N ? n : k, ldb));
    CUBLAS_CHECK(cublasLtMatrixLayoutInit(&d->c, CUDA_R_32F, m, n, ldc));
}

// The cache entry of the key, asking cuBLASLt's heuristic on a miss.
static const LtEntry *lt_lookup_(const LtKey *key) {
    size_t i = (size_t)(lt_hash_(key) % LT_SLOTS);
    for (int probe = 0; probe < LT_SLOTS && lt_cache_[i].used; probe++) {
        if (memcmp(&lt_cache_[i].key, key, sizeof *key) == 0) return &lt_cache_[i];
        i = (i + 1) % LT_SLOTS;
    }
    static LtEntry miss; // the table is full: answer without storing
    LtEntry *e = lt_used_ < LT_SLOTS * 3 / 4 ? &lt_cache_[i] : &miss;
    memset(e, 0, sizeof *e);
    e->key = *key;
    LtDescs d;
    lt_descs_(&d, (cublasOperation_t)key->ta, (cublasOperation_t)key->tb, key->m, key->n, key->k,
              key->lda, key->ldb, key->ldc);
    cublasLtMatmulPreferenceOpaque_t pref;
    CUBLAS_CHECK(cublasLtMatmulPreferenceInit(&pref));
    const uint64_t ws = LT_WORKSPACE_BYTES;
    CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(
        &pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof ws));
    CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(
        &pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &key->align_a, sizeof key->align_a));
    CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(
        &pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &key->align_b, sizeof key->align_b));
    CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(
        &pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &key->align_c, sizeof key->align_c));
    CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(
        &pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &key->align_c, sizeof key->align_c));
    cublasLtMatmulHeuristicResult_t res;
    memset(&res, 0, sizeof res);
    int got = 0;
    const cublasStatus_t s = cublasLtMatmulAlgoGetHeuristic(
        lt_handle_(), &d.op, &d.a, &d.b, &d.c, &d.c, &pref, 1, &res, &got);
    cuda_host_stats_acc_()->lt_queries++;
    e->ok = s == CUBLAS_STATUS_SUCCESS && got > 0 && res.state == CUBLAS_STATUS_SUCCESS;
    if (e->ok) e->algo = res.algo;
    else if (s != CUBLAS_STATUS_SUCCESS && s != CUBLAS_STATUS_NOT_SUPPORTED)
        CUBLAS_CHECK(s);
    if (e != &miss) {
        e->used = 1;
        lt_used_++;
    }
    return e;
}

// C (m,n) = alpha op(A) op(B) + beta C through cuBLASLt with the class's cached algorithm.
// Returns 1 when done; 0 when the class has no algorithm or cuBLASLt refused it for this
// shape: the caller then runs cublasGemmEx.
static int lt_gemm_bf16_(cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                         float alpha, const __nv_bfloat16 *A, int lda, const __nv_bfloat16 *B,
                         int ldb, float beta, float *C, int ldc) {
    LtKey key;
    memset(&key, 0, sizeof key); // no padding bytes left undefined: the key is hashed bytewise
    key.ta = (int32_t)ta;
    key.tb = (int32_t)tb;
    key.m = m; // ldc >= m: never rounded
    key.n = tb == CUBLAS_OP_N ? lt_bucket_(n) : n;                       // else ldb >= n
    key.k = ta == CUBLAS_OP_N && tb == CUBLAS_OP_T ? lt_bucket_(k) : k; // else lda or ldb >= k
    key.lda = lda;
    key.ldb = ldb;
    key.ldc = ldc;
    key.align_a = lt_align_(A);
    key.align_b = lt_align_(B);
    key.align_c = lt_align_(C);
    const LtEntry *e = lt_lookup_(&key);
    if (!e->ok) return 0;
    LtDescs d;
    lt_descs_(&d, ta, tb, m, n, k, lda, ldb, ldc);
    void *ws = lt_workspace_(lane_);
    const cublasStatus_t s =
        cublasLtMatmul(lt_handle_(), &d.op, &alpha, A, &d.a, B, &d.b, &beta, C, &d.c, C, &d.c,
                       &e->algo, ws, LT_WORKSPACE_BYTES, lane_ ? lanes_[lane_].stream : 0);
    if (s == CUBLAS_STATUS_SUCCESS) {
        cuda_host_stats_acc_()->lt_calls++;
        return 1;
    }
    if (s != CUBLAS_STATUS_NOT_SUPPORTED && s != CUBLAS_STATUS_INVALID_VALUE) CUBLAS_CHECK(s);
    cuda_host_stats_acc_()->lt_fallbacks++;
    static int noted = 0; // once per process (the counters are reset between measurements)
    if (!noted++)
        fprintf(stderr,
                "moet: note: cuBLASLt refused the cached algorithm for a %c%c GEMM m %d n %d k %d "
                "(class n %d k %d): %s; that call ran through cublasGemmEx (counted in moet "
                "bench's host line)\n",
                ta == CUBLAS_OP_N ? 'N' : 'T', tb == CUBLAS_OP_N ? 'N' : 'T', m, n, k, key.n,
                key.k, cublasGetStatusName(s));
    return 0;
}

void gemm_bf16_(cublasOperation_t transa, cublasOperation_t transb, int m, int n, int k,
                float alpha, const __nv_bfloat16 *A, int lda, const __nv_bfloat16 *B, int ldb,
                float beta, float *C, int ldc) {
    const double t0 = cuda_host_now_();
    if (!(cuda_gemm_lt() &&
          lt_gemm_bf16_(transa, transb, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc)))
        CUBLAS_CHECK(cublasGemmEx(lane_ ? lanes_[lane_].handle : cublas_handle_(), transa, transb,
                                  m, n, k, &alpha, A, CUDA_R_16BF, lda, B, CUDA_R_16BF, ldb, &beta,
                                  C, CUDA_R_32F, ldc, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    if (lane_) cuda_host_stats_acc_()->side_calls++;
    count_gemm_(t0);
}

void gemm_bf16_strided_batched_(cublasOperation_t transa, cublasOperation_t transb, int m, int n,
                                int k, float alpha, const __nv_bfloat16 *A, int lda,
                                long long strideA, const __nv_bfloat16 *B, int ldb,
                                long long strideB, float beta, float *C, int ldc, long long strideC,
                                int batch_count) {
    const double t0 = cuda_host_now_();
    CUBLAS_CHECK(cublasGemmStridedBatchedEx(cublas_handle_(), transa, transb, m, n, k, &alpha, A,
                                            CUDA_R_16BF, lda, strideA, B, CUDA_R_16BF, ldb, strideB,
                                            &beta, C, CUDA_R_32F, ldc, strideC, batch_count,
                                            CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    count_gemm_(t0);
}

// ---------------------------------------------------------------------------------------
// The bf16 conversion workspace and kernel

// 1 GiB: bench-gpu-olmoe's lm_head backward then goes in three pieces of rows and the expert
// backward in two chunks of experts, everything else in one; the workspace peaks at 1007 MiB,
// 1.3% of an 80 GB GPU (bench/results/2026-11-26-gpu-bf16-operands.md).
#define GEMM_WORKSPACE_LIMIT ((size_t)1 << 30)
static size_t ws_limit_ = GEMM_WORKSPACE_LIMIT; // bytes
static void *ws_ = NULL;
static size_t ws_bytes_ = 0;

void cuda_set_gemm_workspace_limit(size_t bytes) {
    ws_limit_ = bytes ? bytes : GEMM_WORKSPACE_LIMIT;
    if (ws_bytes_ > ws_limit_) { // shrink: the next op allocates what it needs under the limit
        CUDA_CHECK(cudaDeviceSynchronize());
        cuda_free(ws_);
        ws_ = NULL;
        ws_bytes_ = 0;
    }
}

size_t cuda_gemm_workspace_bytes(void) {
    return ws_bytes_;
}

size_t gemm_workspace_limit_elems_(void) {
    return ws_limit_ / sizeof(__nv_bfloat16);
}

__nv_bfloat16 *gemm_workspace_(size_t elems) {
    const size_t bytes = elems * sizeof(__nv_bfloat16);
    if (bytes > ws_bytes_) {
        // whole MiB and at least twice the old size (never past the limit unless the need
        // itself is): the needs of training steps creep up with the experts' rows as the
        // routing changes, and every growth waits for the GPU and reallocates. (On the H100,
        // growing by whole MiB alone kept bench-gpu-olmoe's steps 2-4 at 0.43-0.50 s against
        // 0.35-0.37 s once the buffer had settled.)
        size_t grow = (bytes + ((size_t)1 << 20) - 1) & ~(((size_t)1 << 20) - 1);
        if (grow < 2 * ws_bytes_) grow = 2 * ws_bytes_;
        if (grow > ws_limit_) grow = bytes > ws_limit_ ? bytes : ws_limit_;
        // the GEMMs queued on the old buffer must finish before it goes (cudaFree would wait
        // too, but not by contract)
        CUDA_CHECK(cudaDeviceSynchronize());
        cuda_free(ws_);
        ws_ = cuda_malloc(grow);
        ws_bytes_ = grow;
    }
    return (__nv_bfloat16 *)ws_;
}

enum { CVT_THREADS = 256, CVT_MAX_BLOCKS = 1024 }; // 1024 x 256 threads: one wave on an H100

// Grid-stride: with vec4, thread i converts the quads i, i + stride, ... (a 16-byte load and
// an 8-byte store each), then the n % 4 tail one by one; without, every element one by one.
static __global__ void f32_to_bf16_rn_kernel(__nv_bfloat16 *out, const float *in, size_t n,
                                             int vec4) {
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    const size_t t = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    size_t done = 0;
    if (vec4) {
        const size_t nq = n / 4;
        const float4 *in4 = (const float4 *)in;
        uint2 *out4 = (uint2 *)out;
        for (size_t q = t; q < nq; q += stride) {
            const float4 f = in4[q];
            uint2 b;
            b.x = (unsigned)__bfloat16_as_ushort(__float2bfloat16_rn(f.x)) |
                  (unsigned)__bfloat16_as_ushort(__float2bfloat16_rn(f.y)) << 16;
            b.y = (unsigned)__bfloat16_as_ushort(__float2bfloat16_rn(f.z)) |
                  (unsigned)__bfloat16_as_ushort(__float2bfloat16_rn(f.w)) << 16;
            out4[q] = b;
        }
        done = nq * 4;
    }
    for (size_t i = done + t; i < n; i += stride) out[i] = __float2bfloat16_rn(in[i]);
}

void f32_to_bf16_rn_(__nv_bfloat16 *out, const float *in, size_t n) {
    if (n == 0) return;
    const int vec4 = (uintptr_t)in % 16 == 0 && (uintptr_t)out % 8 == 0;
    const size_t items = vec4 ? (n + 3) / 4 : n;
    size_t blocks = (items + CVT_THREADS - 1) / CVT_THREADS;
    if (blocks > CVT_MAX_BLOCKS) blocks = CVT_MAX_BLOCKS;
    f32_to_bf16_rn_kernel<<<(unsigned)blocks, CVT_THREADS>>>(out, in, n, vec4);
    CUDA_CHECK_LAUNCH();
}

// ---------------------------------------------------------------------------------------
// The matmuls on bf16 operands. The dense matmul is the grouped one with a single expert
// (offsets {0, N}). The work goes in chunks of whole experts [e0,e1) whose bf16 weights and
// rows fit the workspace limit together (an expert whose rows alone do not fit gets a chunk of
// its own, walked in pieces of rows). Per chunk: the weights of its experts with rows are
// converted (contiguous runs in one launch), then per piece of rows the rows' operands, then
// one GEMM per expert on its rows of the piece, in expert order (on the side streams above).
// Weights that lie in the parameters' bf16 copy (weights.cu: the model's weights, registered)
// are read from there instead, take no workspace, and convert only the copy's stale blocks.
// The experts' gate and up projections go through as one pair (nmat = 2: two weight tensors,
// one input, its rows converted once). Forward:
//   out (R,OC) = inp (R,C) @ w_e^T per expert; workspace: weights, inp rows.
// Backward (each output optional): dinp = dout @ w_e (grouped: written, beta = 0; dense:
// accumulated); dw_e += dout^T @ inp, summed over the pieces (beta = 1). Workspace: weights
// (dinp only), dout rows, inp rows (dw only).
// cuBLAS cannot take the experts in one call here: cublasGemmGroupedBatchedEx (cuBLAS 12.5+)
// accepts bf16 A and B only with a bf16 C, and the outputs must stay fp32.

// What a chunk needs in the workspace: nmat weight tensors of nw experts' weights of wsz
// elements each (wsz 0: none), each block 256-byte aligned, and `rows` rows of the slices of
// widths width[0..nwidth).
static size_t ws_need_(int nmat, size_t nw, size_t wsz, size_t rows, const size_t *width,
                       int nwidth) {
    size_t need = (size_t)nmat * ws_align_(nw * wsz);
    for (int i = 0; i < nwidth; i++) need += ws_align_(rows * width[i]);
    return need;
}

// The chunk that starts at expert e0: returns e1 (> e0) and the rows per piece (*piece, >= 1).
// Greedy: as many experts as fit with all their rows; an expert that does not fit alone gets
// pieces of rows as even as the fewest that fit make them.
static int plan_chunk_(const int32_t *off, int e0, int E, int nmat, size_t wsz,
                       const size_t *width, int nwidth, size_t *piece) {
    const size_t limit = gemm_workspace_limit_elems_();
    int e1 = e0 + 1;
    while (e1 < E && ws_need_(nmat, (size_t)(e1 + 1 - e0), wsz, (size_t)(off[e1 + 1] - off[e0]),
                              width, nwidth) <= limit)
        e1++;
    const size_t rows = (size_t)(off[e1] - off[e0]);
    *piece = rows > 0 ? rows : 1;
    if (e1 == e0 + 1 && ws_need_(nmat, 1, wsz, rows, width, nwidth) > limit) {
        // one expert whose rows do not fit: as many rows per piece as the limit leaves room for
        size_t per_row = 0;
        for (int i = 0; i < nwidth; i++) per_row += width[i];
        const size_t fixed = (size_t)nmat * ws_align_(wsz) + 128 * (size_t)nwidth; // alignment
        size_t r = limit > fixed ? (limit - fixed) / per_row : 0;
        if (r < 1) r = 1;
        const size_t pieces = (rows + r - 1) / r; // then evened out: no small last piece
        *piece = (rows + pieces - 1) / pieces;
    }
    return e1;
}

// The bf16 weights of the experts of [e0,e1) for a chunk's GEMMs, expert e's at the returned
// pointer + (e - e0) * wsz. `copied`: w lies in the parameters' bf16 copy (weights.cu), whose
// stale blocks under the experts with rows are converted first; else those experts' weights
// are converted into wb. Either way only the experts with rows, one launch per run of
// consecutive such experts: all of them in training, the few routed ones when a handful of
// tokens is decoded.
static const __nv_bfloat16 *weights_bf16_(__nv_bfloat16 *wb, const float *w, int copied,
                                          const int32_t *off, int e0, int e1, size_t wsz) {
    for (int a = e0; a < e1;) {
        if (off[a + 1] == off[a]) {
            a++;
            continue;
        }
        int b = a + 1;
        while (b < e1 && off[b + 1] > off[b]) b++;
        if (copied)
            weights_copy_ensure_(w + (size_t)a * wsz, (size_t)(b - a) * wsz);
        else
            f32_to_bf16_rn_(wb + (size_t)(a - e0) * wsz, w + (size_t)a * wsz,
                            (size_t)(b - a) * wsz);
        a = b;
    }
    return copied ? weights_copy_(w + (size_t)e0 * wsz, (size_t)(e1 - e0) * wsz) : wb;
}

// How many of the nmat weight tensors w[m] (E experts of wsz elements) need converting into
// the workspace, copied[m] saying which lie in the weight copy instead.
static int weights_to_convert_(int *copied, const float *const *w, int nmat, int E, size_t wsz) {
    int n = 0;
    for (int m = 0; m < nmat; m++) {
        copied[m] = wsz > 0 && weights_copy_(w[m], (size_t)E * wsz) != NULL;
        n += wsz > 0 && !copied[m];
    }
    return n;
}

// The experts of [e0,e1) with rows in [a,b): the GEMMs of one piece.
static int experts_in_(const int32_t *off, int e0, int e1, int a, int b) {
    int n = 0;
    for (int e = e0; e < e1; e++)
        n += (off[e + 1] < b ? off[e + 1] : b) > (off[e] > a ? off[e] : a);
    return n;
}

// The grouped matmul of nmat (1 or 2) weight tensors w[m] on the same input: the pair is the
// experts' gate and up projections, whose input rows are then converted once. Per expert, the
// GEMMs of w[0] come before those of w[1], as in two calls one after the other, on the same
// stream.
//   out[m] (R,OC) = inp (R,C) @ w[m]_e^T per expert.
static void grouped_forward_bf16_(float *const *out, const float *inp, const float *const *w,
                                  int nmat, const int32_t *off, int E, int C, int OC) {
    const size_t wsz = (size_t)OC * C, width[1] = {(size_t)C};
    int copied[2];
    const int nconv = weights_to_convert_(copied, w, nmat, E, wsz); // weights in the workspace
    for (int e0 = 0; e0 < E;) {
        if (off[e0 + 1] == off[e0]) { // no rows: nothing to convert or compute
            e0++;
            continue;
        }
        size_t piece;
        const int e1 = plan_chunk_(off, e0, E, nconv, wsz, width, 1, &piece);
        const size_t rows = (size_t)(off[e1] - off[e0]);
        const size_t pr = piece < rows ? piece : rows;
        const size_t wblock = ws_align_((size_t)(e1 - e0) * wsz); // one weight tensor's
        __nv_bfloat16 *wb = gemm_workspace_(ws_need_(nconv, (size_t)(e1 - e0), wsz, pr, width, 1));
        __nv_bfloat16 *xb = wb + nconv * wblock;
        const __nv_bfloat16 *wsrc[2];
        for (int m = 0, k = 0; m < nmat; m++)
            wsrc[m] = weights_bf16_(wb + (copied[m] ? 0 : k++) * wblock, w[m], copied[m], off, e0,
                                    e1, wsz);
        for (int a = off[e0]; a < off[e1]; a += (int)pr) {
            const int b = a + (int)pr < off[e1] ? a + (int)pr : off[e1];
            f32_to_bf16_rn_(xb, inp + (size_t)a * C, (size_t)(b - a) * C);
            const int lanes = lanes_fork_(experts_in_(off, e0, e1, a, b), b - a);
            for (int e = e0, i = 0; e < e1; e++) {
                const int r0 = off[e] > a ? off[e] : a, r1 = off[e + 1] < b ? off[e + 1] : b;
                if (r1 <= r0) continue;
                lane_ = lane_of_(i++, lanes);
                // column-major: out^T (OC,n) = w_e (OC,C) * inp^T (C,n), as cuda_matmul_forward
                for (int m = 0; m < nmat; m++)
                    gemm_bf16_(CUBLAS_OP_T, CUBLAS_OP_N, OC, r1 - r0, C, 1.0f,
                               wsrc[m] + (size_t)(e - e0) * wsz, C, xb + (size_t)(r0 - a) * C, C,
                               0.0f, out[m] + (size_t)r0 * OC, OC);
            }
            lanes_join_(lanes);
        }
        e0 = e1;
    }
}

// The backward of grouped_forward_bf16_ (each output optional, NULL: skipped):
//   dinp = dinp_beta * dinp + dout[0] @ w[0]_e (+ dout[1] @ w[1]_e, added after), so with
//   dinp_beta = 0 every row of an expert is written (kernels.h), with 1 accumulated (the dense
//   matmul); dw[m]_e += dout[m]^T @ inp, summed over the pieces (beta = 1).
// Workspace: the weights (dinp only), the dout[m] rows, the inp rows (dw only).
static void grouped_backward_bf16_(float *dinp, float *const *dw, const float *const *dout,
                                   const float *inp, const float *const *w, int nmat,
                                   const int32_t *off, int E, int C, int OC, float dinp_beta) {
    int with_dw = 0; // any dw[m]: the inp rows are converted
    for (int m = 0; m < nmat; m++) with_dw |= dw[m] != NULL;
    const size_t wsz = dinp ? (size_t)OC * C : 0; // the weights only for dinp
    size_t width[3];                               // dout[m] rows; inp rows only for dw
    int nwidth = 0;
    for (int m = 0; m < nmat; m++) width[nwidth++] = (size_t)OC;
    if (with_dw) width[nwidth++] = (size_t)C;
    int copied[2];
    const int nconv = weights_to_convert_(copied, w, nmat, E, wsz); // weights in the workspace
    for (int e0 = 0; e0 < E;) {
        if (off[e0 + 1] == off[e0]) { // no rows: dw_e stays untouched
            e0++;
            continue;
        }
        size_t piece;
        const int e1 = plan_chunk_(off, e0, E, nconv, wsz, width, nwidth, &piece);
        const size_t rows = (size_t)(off[e1] - off[e0]);
        const size_t pr = piece < rows ? piece : rows;
        const size_t wblock = ws_align_((size_t)(e1 - e0) * wsz);
        __nv_bfloat16 *wb =
            gemm_workspace_(ws_need_(nconv, (size_t)(e1 - e0), wsz, pr, width, nwidth));
        __nv_bfloat16 *gb[2];
        gb[0] = wb + nconv * wblock;
        gb[1] = gb[0] + ws_align_(pr * OC);
        __nv_bfloat16 *xb = gb[nmat - 1] + ws_align_(pr * OC);
        const __nv_bfloat16 *wsrc[2] = {NULL, NULL};
        if (dinp)
            for (int m = 0, k = 0; m < nmat; m++)
                wsrc[m] = weights_bf16_(wb + (copied[m] ? 0 : k++) * wblock, w[m], copied[m], off,
                                        e0, e1, wsz);
        for (int a = off[e0]; a < off[e1]; a += (int)pr) {
            const int b = a + (int)pr < off[e1] ? a + (int)pr : off[e1];
            for (int m = 0; m < nmat; m++)
                f32_to_bf16_rn_(gb[m], dout[m] + (size_t)a * OC, (size_t)(b - a) * OC);
            if (with_dw) f32_to_bf16_rn_(xb, inp + (size_t)a * C, (size_t)(b - a) * C);
            const int lanes = lanes_fork_(experts_in_(off, e0, e1, a, b), b - a);
            for (int e = e0, i = 0; e < e1; e++) {
                const int r0 = off[e] > a ? off[e] : a, r1 = off[e + 1] < b ? off[e + 1] : b;
                if (r1 <= r0) continue;
                lane_ = lane_of_(i++, lanes); // an expert's GEMMs on one lane, in order
                for (int m = 0; m < nmat; m++) {
                    const __nv_bfloat16 *g = gb[m] + (size_t)(r0 - a) * OC;
                    if (dinp) // column-major: dinp^T (C,n) = w_e^T (C,OC) * dout^T (OC,n) + beta
                        gemm_bf16_(CUBLAS_OP_N, CUBLAS_OP_N, C, r1 - r0, OC, 1.0f,
                                   wsrc[m] + (size_t)(e - e0) * wsz, C, g, OC,
                                   m == 0 ? dinp_beta : 1.0f, dinp + (size_t)r0 * C, C);
                    if (dw[m]) // column-major: dw_e^T (C,OC) += inp^T (C,n) * dout (n,OC)
                        gemm_bf16_(CUBLAS_OP_N, CUBLAS_OP_T, C, OC, r1 - r0, 1.0f,
                                   xb + (size_t)(r0 - a) * C, C, g, OC, 1.0f,
                                   dw[m] + (size_t)e * OC * C, C);
                }
            }
            lanes_join_(lanes);
        }
        e0 = e1;
    }
}

// ---------------------------------------------------------------------------------------
// Matmul

// out is (N,OC), inp is (N,C), w is (OC,C)
void cuda_matmul_forward(float *out, const float *inp, const float *w, int N, int C, int OC) {
    if (N <= 0 || OC <= 0) return;
    if (C <= 0) { // an empty sum, as on the CPU (cuBLAS would reject lda = 0)
        CUDA_CHECK(cudaMemsetAsync(out, 0, (size_t)N * OC * sizeof(float), 0));
        return;
    }
    if (gemm_bf16_operands_()) {
        const int32_t off[2] = {0, N};
        grouped_forward_bf16_(&out, inp, &w, 1, off, 1, C, OC);
        return;
    }
    // column-major: out^T (OC,N) = w (OC,C) * inp^T (C,N)
    // (w is stored as the column-major (C,OC) w^T, hence op T; inp as the column-major inp^T)
    gemm_f32_(CUBLAS_OP_T, CUBLAS_OP_N, OC, N, C, 1.0f, w, C, inp, C, 0.0f, out, OC);
}

// The fp32 matmul backward: dinp = dinp_beta * dinp + dout @ w; dw += dout^T @ inp.
static void matmul_backward_f32_(float *dinp, float *dw, const float *dout, const float *inp,
                                 const float *w, int N, int C, int OC, float dinp_beta) {
    if (dinp) {
        // column-major: dinp^T (C,N) = w^T (C,OC) * dout^T (OC,N) + beta dinp^T
        // (w stored as the column-major (C,OC) w^T: op N; dout as the column-major dout^T: op N)
        gemm_f32_(CUBLAS_OP_N, CUBLAS_OP_N, C, N, OC, 1.0f, w, C, dout, OC, dinp_beta, dinp, C);
    }
    if (dw) {
        // column-major: dw^T (C,OC) += inp^T (C,N) * dout (N,OC)
        // (inp stored as the column-major (C,N) inp^T: op N; dout as the column-major (OC,N)
        // dout^T, transposed back: op T)
        gemm_f32_(CUBLAS_OP_N, CUBLAS_OP_T, C, OC, N, 1.0f, inp, C, dout, OC, 1.0f, dw, C);
    }
}

// dinp += dout @ w; dw += dout^T @ inp (beta = 1: backward accumulates); NULL outputs skipped.
// dinp is (N,C), dw is (OC,C), dout is (N,OC), inp is (N,C), w is (OC,C)
void cuda_matmul_backward(float *dinp, float *dw, const float *dout, const float *inp,
                          const float *w, int N, int C, int OC) {
    if (N <= 0 || C <= 0 || OC <= 0 || (!dinp && !dw)) return;
    if (gemm_bf16_operands_()) {
        const int32_t off[2] = {0, N};
        grouped_backward_bf16_(dinp, &dw, &dout, inp, &w, 1, off, 1, C, OC, 1.0f);
        return;
    }
    matmul_backward_f32_(dinp, dw, dout, inp, w, N, C, OC, 1.0f);
}

// ---------------------------------------------------------------------------------------
// Grouped expert matmul: one cuBLAS GEMM per expert with rows, over its contiguous row range,
// in expert order; on bf16 operands, the whole input and weights converted once per call (in
// chunks, see above) and one GEMM per expert on the copies.
// out is (R,OC), inp is (R,C), w is (E,OC,C), offsets_host is (E+1), a HOST array

void cuda_grouped_matmul_forward(float *out, const float *inp, const float *w,
                                 const int32_t *offsets_host, int E, int C, int OC) {
    if (E > 0 && C > 0 && OC > 0 && gemm_bf16_operands_()) {
        grouped_forward_bf16_(&out, inp, &w, 1, offsets_host, E, C, OC);
        return;
    }
    for (int e = 0; e < E; e++) {
        const int r0 = offsets_host[e], n = offsets_host[e + 1] - r0;
        if (n <= 0) continue;
        cuda_matmul_forward(out + (size_t)r0 * OC, inp + (size_t)r0 * C, w + (size_t)e * OC * C, n,
                            C, OC);
    }
}

// The fp32 grouped backward: per expert with rows, matmul_backward_f32_ with dinp_beta.
static void grouped_backward_f32_(float *dinp, float *dw, const float *dout, const float *inp,
                                  const float *w, const int32_t *off, int E, int C, int OC,
                                  float dinp_beta) {
    for (int e = 0; e < E; e++) {
        const int r0 = off[e], n = off[e + 1] - r0;
        if (n <= 0) continue;
        matmul_backward_f32_(dinp ? dinp + (size_t)r0 * C : NULL,
                             dw ? dw + (size_t)e * OC * C : NULL, dout + (size_t)r0 * OC,
                             inp + (size_t)r0 * C, w + (size_t)e * OC * C, n, C, OC, dinp_beta);
    }
}

// 1 where a grouped backward has no GEMM to run: no rows, C = 0, or OC = 0, where dinp, which
// the op writes (kernels.h), is the empty sum: its rows are zeroed.
static int grouped_backward_trivial_(float *dinp, const int32_t *off, int E, int C, int OC) {
    if (E <= 0 || C <= 0 || off[E] <= 0) return 1;
    if (OC > 0) return 0;
    if (dinp) CUDA_CHECK(cudaMemsetAsync(dinp, 0, (size_t)off[E] * C * sizeof(float), 0));
    return 1;
}

// dinp (R,C) written; dw (E,OC,C) accumulated, experts without rows keep theirs untouched;
// dout is (R,OC).
void cuda_grouped_matmul_backward(float *dinp, float *dw, const float *dout, const float *inp,
                                  const float *w, const int32_t *offsets_host, int E, int C,
                                  int OC) {
    if ((!dinp && !dw) || grouped_backward_trivial_(dinp, offsets_host, E, C, OC)) return;
    if (gemm_bf16_operands_())
        grouped_backward_bf16_(dinp, &dw, &dout, inp, &w, 1, offsets_host, E, C, OC, 0.0f);
    else
        grouped_backward_f32_(dinp, dw, dout, inp, w, offsets_host, E, C, OC, 0.0f);
}

// The experts' gate and up projections of the same rows (Ops.grouped_matmul_forward_pair):
// the results of cuda_grouped_matmul_forward on (out_a, w_a) and then on (out_b, w_b), with
// the input rows converted to bf16 once instead of twice.
void cuda_grouped_matmul_forward_pair(float *out_a, float *out_b, const float *inp,
                                      const float *w_a, const float *w_b,
                                      const int32_t *offsets_host, int E, int C, int OC) {
    if (E > 0 && C > 0 && OC > 0 && gemm_bf16_operands_()) {
        float *out[2] = {out_a, out_b};
        const float *w[2] = {w_a, w_b};
        grouped_forward_bf16_(out, inp, w, 2, offsets_host, E, C, OC);
        return;
    }
    cuda_grouped_matmul_forward(out_a, inp, w_a, offsets_host, E, C, OC);
    cuda_grouped_matmul_forward(out_b, inp, w_b, offsets_host, E, C, OC);
}

// Its backward (Ops.grouped_matmul_backward_pair, kernels.h): dinp = dout_a @ w_a + dout_b @
// w_b per expert (written: a's GEMM with beta = 0, b's added), dw_a and dw_b accumulated.
void cuda_grouped_matmul_backward_pair(float *dinp, float *dw_a, float *dw_b, const float *dout_a,
                                       const float *dout_b, const float *inp, const float *w_a,
                                       const float *w_b, const int32_t *offsets_host, int E,
                                       int C, int OC) {
    if ((!dinp && !dw_a && !dw_b) || grouped_backward_trivial_(dinp, offsets_host, E, C, OC))
        return;
    if (gemm_bf16_operands_()) {
        float *dw[2] = {dw_a, dw_b};
        const float *dout[2] = {dout_a, dout_b}, *w[2] = {w_a, w_b};
        grouped_backward_bf16_(dinp, dw, dout, inp, w, 2, offsets_host, E, C, OC, 0.0f);
        return;
    }
    grouped_backward_f32_(dinp, dw_a, dout_a, inp, w_a, offsets_host, E, C, OC, 0.0f);
    grouped_backward_f32_(dinp, dw_b, dout_b, inp, w_b, offsets_host, E, C, OC, 1.0f);
}
