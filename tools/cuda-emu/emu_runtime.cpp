// emu_runtime.cpp: the CUDA host emulator's runtime (tools/cuda-emu/README.md): fibers and
// barriers for the kernels, checked "device" memory, the runtime API calls the backend makes,
// and a fake cuBLAS on OpenBLAS. x86-64 Linux only (the fiber switch is a few lines of asm).
#include <cblas.h>
#include <execinfo.h>
#include <signal.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include <cstdarg>
#include <algorithm>
#include <atomic>
#include <functional>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "inc/cublasLt.h"
#include "inc/cublas_v2.h"
#include "inc/cuda_runtime.h"

dim3 threadIdx, blockIdx, blockDim, gridDim;
char *emu_dyn_smem;

static int env_int_(const char *name, int def) {
    const char *s = getenv(name);
    return s && *s ? atoi(s) : def;
}

[[noreturn]] static void emu_fatal_(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

// Streams (see "Streams and events" below): run what created streams have queued; note an
// operation of the legacy stream.
static void flush_all_streams_(void);
static void legacy_op_(void);

// ---------------------------------------------------------------------------------------
// Options (environment)
//   EMU_ORDER   0: threads and blocks in increasing order (default), 1: decreasing,
//               2: a random permutation per block (seed EMU_SEED): results that depend on the
//               order are races between barriers.
//   EMU_PROTECT 1 (default): device memory is PROT_NONE outside kernels, memcpy, memset and
//               cuBLAS, so that host code touching a device pointer faults. 0: off.
//   EMU_ALIGN256 0 (default): allocations end exactly at a guard page; 1: 256-byte aligned.
//   EMU_POISON  byte that fills fresh device memory and shared memory (default 255: NaN floats,
//               -1 ints).
static int opt_order_ = -1, opt_protect_ = 1, opt_poison_ = 0xFF, opt_align256_ = 0;
static std::mt19937 rng_;

static void opts_(void) {
    if (opt_order_ >= 0) return;
    opt_order_ = env_int_("EMU_ORDER", 0);
    opt_protect_ = env_int_("EMU_PROTECT", 1);
    opt_poison_ = env_int_("EMU_POISON", 0xFF) & 0xFF;
    opt_align256_ = env_int_("EMU_ALIGN256", 0);
    rng_.seed((unsigned)env_int_("EMU_SEED", 1));
}

// ---------------------------------------------------------------------------------------
// Where we are (for the fault handler and the messages)
static const char *cur_kernel_ = nullptr; // kernel running, or null
static const char *cur_api_ = nullptr;    // runtime / cuBLAS call running, or null
static int cur_tid_ = -1;

// ---------------------------------------------------------------------------------------
// Device memory: one mapping per allocation, the allocation right-aligned against a
// PROT_NONE guard page (an overrun of the end by one element faults), 256-byte aligned.
struct Alloc {
    char *map;
    size_t map_len;
    size_t size; // as asked (>= 1)
    size_t user; // bytes from the start to the guard page (n, or n rounded to 256)
};
static std::map<uintptr_t, Alloc> allocs_; // by user pointer
static size_t in_use_;
static const size_t kTotalMem = (size_t)80 << 30; // an H100's 80 GB
static int dev_open_depth_;

static const Alloc *find_alloc_(const void *p, uintptr_t *base) {
    if (allocs_.empty()) return nullptr;
    uintptr_t a = (uintptr_t)p;
    auto it = allocs_.upper_bound(a);
    if (it == allocs_.begin()) return nullptr;
    --it;
    if (a > it->first + it->second.user) return nullptr; // one past the end is still "in"
    if (base) *base = it->first;
    return &it->second;
}

static void protect_all_(int prot) {
    if (!opt_protect_) return;
    for (auto &kv : allocs_)
        if (mprotect(kv.second.map, kv.second.map_len - (size_t)sysconf(_SC_PAGESIZE), prot))
            emu_fatal_("mprotect failed");
}

// Device access window: kernels, memcpy, memset and cuBLAS open it.
struct DevScope {
    const char *prev;
    explicit DevScope(const char *api) : prev(cur_api_) {
        opts_();
        cur_api_ = api;
        if (dev_open_depth_++ == 0) protect_all_(PROT_READ | PROT_WRITE);
    }
    ~DevScope() {
        if (--dev_open_depth_ == 0) protect_all_(PROT_NONE);
        cur_api_ = prev;
    }
};

// 1 when [p, p + n) lies inside one live allocation; where says what the range is for.
static bool dev_range_ok_(const void *p, size_t n) {
    uintptr_t base;
    const Alloc *a = find_alloc_(p, &base);
    return a && (uintptr_t)p + n <= base + a->size;
}

static bool is_device_(const void *p) { return find_alloc_(p, nullptr) != nullptr; }

// ---------------------------------------------------------------------------------------
// Fault handler: says whether the address is device memory, a guard page, and where.
static char sig_stack_[1 << 16];

static void segv_handler_(int sig, siginfo_t *si, void *) {
    char buf[512];
    const void *addr = si->si_addr;
    const char *what = "not device memory";
    for (auto &kv : allocs_) {
        const Alloc &a = kv.second;
        if ((char *)addr >= a.map && (char *)addr < a.map + a.map_len) {
            what = (uintptr_t)addr >= kv.first + a.user
                       ? "just past the end of a device allocation (guard page): OUT OF BOUNDS"
                   : (uintptr_t)addr < kv.first
                       ? "in the padding before a device allocation: OUT OF BOUNDS (below)"
                       : "inside a device allocation";
            break;
        }
    }
    int n = snprintf(buf, sizeof buf,
                     "\n*** cuda-emu: signal %d at address %p (%s)\n*** while in %s%s%s",
                     sig, addr, what,
                     cur_kernel_ ? "kernel " : cur_api_ ? "" : "HOST CODE (device memory is "
                                                               "not accessible from the host)",
                     cur_kernel_ ? cur_kernel_ : cur_api_ ? cur_api_ : "",
                     cur_kernel_ ? "" : "\n");
    if (write(2, buf, (size_t)n) < 0) _exit(3);
    if (cur_kernel_) {
        n = snprintf(buf, sizeof buf, ", block (%u,%u,%u) thread (%u,%u,%u)\n", blockIdx.x,
                     blockIdx.y, blockIdx.z, threadIdx.x, threadIdx.y, threadIdx.z);
        if (write(2, buf, (size_t)n) < 0) _exit(3);
    }
    void *bt[64];
    int nb = backtrace(bt, 64);
    backtrace_symbols_fd(bt, nb, 2);
    signal(sig, SIG_DFL);
    raise(sig);
}

__attribute__((constructor)) static void install_handler_(void) {
    stack_t ss;
    ss.ss_sp = sig_stack_;
    ss.ss_size = sizeof sig_stack_;
    ss.ss_flags = 0;
    sigaltstack(&ss, nullptr);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = segv_handler_;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigaction(SIGSEGV, &sa, nullptr);
    sigaction(SIGBUS, &sa, nullptr);
}

static void emu_fatal_(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "\n*** cuda-emu: ");
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    if (cur_kernel_)
        fprintf(stderr, "\n*** in kernel %s, block (%u,%u,%u) thread (%u,%u,%u)", cur_kernel_,
                blockIdx.x, blockIdx.y, blockIdx.z, threadIdx.x, threadIdx.y, threadIdx.z);
    fprintf(stderr, "\n");
    void *bt[64];
    int nb = backtrace(bt, 64);
    backtrace_symbols_fd(bt, nb, 2);
    abort();
}

// ---------------------------------------------------------------------------------------
// Runtime API
static cudaError_t last_error_ = cudaSuccess;
static int device_ = 0;

static cudaError_t set_err_(cudaError_t e) {
    if (e != cudaSuccess) last_error_ = e;
    return e;
}

const char *cudaGetErrorName(cudaError_t e) {
    switch (e) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorInvalidDevicePointer: return "cudaErrorInvalidDevicePointer";
    case cudaErrorInvalidMemcpyDirection: return "cudaErrorInvalidMemcpyDirection";
    case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
    case cudaErrorLaunchOutOfResources: return "cudaErrorLaunchOutOfResources";
    case cudaErrorInvalidResourceHandle: return "cudaErrorInvalidResourceHandle";
    case cudaErrorNotReady: return "cudaErrorNotReady";
    default: return "cudaError(emu)";
    }
}
const char *cudaGetErrorString(cudaError_t e) { return cudaGetErrorName(e); }
cudaError_t cudaGetLastError(void) {
    cudaError_t e = last_error_;
    last_error_ = cudaSuccess;
    return e;
}
cudaError_t cudaPeekAtLastError(void) { return last_error_; }
cudaError_t cudaDeviceSynchronize(void) {
    flush_all_streams_();
    return cudaSuccess;
}
cudaError_t cudaGetDeviceCount(int *n) {
    *n = env_int_("EMU_DEVICES", 1);
    return cudaSuccess;
}
cudaError_t cudaSetDevice(int d) {
    int n;
    cudaGetDeviceCount(&n);
    if (d < 0 || d >= n) return set_err_(cudaErrorInvalidDevice);
    device_ = d;
    return cudaSuccess;
}
cudaError_t cudaGetDevice(int *d) {
    *d = device_;
    return cudaSuccess;
}
cudaError_t cudaGetDeviceProperties(cudaDeviceProp *p, int d) {
    int n;
    cudaGetDeviceCount(&n);
    if (d < 0 || d >= n) return set_err_(cudaErrorInvalidDevice);
    memset(p, 0, sizeof *p);
    snprintf(p->name, sizeof p->name, "cuda-emu (host emulation of an H100)");
    p->totalGlobalMem = kTotalMem;
    p->sharedMemPerBlock = 48 * 1024;
    p->major = 9;
    p->minor = 0;
    p->multiProcessorCount = 132;
    p->warpSize = 32;
    p->maxThreadsPerBlock = 1024;
    return cudaSuccess;
}
static const int kSmemOptin = 227 * 1024; // sm_90
cudaError_t cudaDeviceGetAttribute(int *v, cudaDeviceAttr a, int) {
    if (a == cudaDevAttrMaxSharedMemoryPerBlockOptin) {
        *v = kSmemOptin;
        return cudaSuccess;
    }
    return set_err_(cudaErrorInvalidValue);
}
cudaError_t cudaMemGetInfo(size_t *f, size_t *t) {
    *t = kTotalMem;
    *f = kTotalMem - in_use_;
    return cudaSuccess;
}
cudaError_t cudaDriverGetVersion(int *v) {
    *v = 13000;
    return cudaSuccess;
}
cudaError_t cudaRuntimeGetVersion(int *v) {
    *v = 13000;
    return cudaSuccess;
}

cudaError_t cudaMalloc(void **p, size_t n) {
    opts_();
    if (!p) return set_err_(cudaErrorInvalidValue);
    if (n == 0) { // as the real runtime: success and a NULL pointer
        *p = nullptr;
        return cudaSuccess;
    }
    if (n > kTotalMem - in_use_) return set_err_(cudaErrorMemoryAllocation);
    const size_t pg = (size_t)sysconf(_SC_PAGESIZE);
    // The allocation ends exactly where the guard page begins, so that reading the first
    // element past the end faults: its start is aligned to the largest power of two that
    // divides n, at most 256 (EMU_ALIGN256=1: always 256, the end rounded up to 256 bytes).
    const size_t user = opt_align256_ ? (n + 255) / 256 * 256 : n;
    const size_t data_pages = (user + pg - 1) / pg * pg;
    const size_t len = data_pages + pg; // + the guard page
    // large allocations start on a 2 MB boundary and ask for transparent huge pages, which
    // makes the mprotect calls of the protection window cheap (one PMD per 2 MB)
    const size_t huge = (size_t)2 << 20;
    const bool big = data_pages >= 2 * huge;
    const size_t over = big ? len + huge : len;
    char *m0 = (char *)mmap(nullptr, over, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                            -1, 0);
    if (m0 == MAP_FAILED) return set_err_(cudaErrorMemoryAllocation);
    char *m = m0;
    if (big) {
        m = (char *)(((uintptr_t)m0 + huge - 1) & ~(uintptr_t)(huge - 1));
        if (m > m0) munmap(m0, (size_t)(m - m0));
        if (m0 + over > m + len) munmap(m + len, (size_t)(m0 + over - (m + len)));
        madvise(m, data_pages, MADV_HUGEPAGE);
    }
    if (mprotect(m + data_pages, pg, PROT_NONE)) emu_fatal_("mprotect (guard)");
    char *u = m + data_pages - user;
    memset(u, opt_poison_, user);
    allocs_[(uintptr_t)u] = Alloc{m, len, n, user};
    in_use_ += n;
    if (opt_protect_ && dev_open_depth_ == 0) mprotect(m, data_pages, PROT_NONE);
    *p = u;
    return cudaSuccess;
}

cudaError_t cudaFree(void *p) {
    if (!p) return cudaSuccess;
    flush_all_streams_(); // cudaFree synchronizes the device
    auto it = allocs_.find((uintptr_t)p);
    if (it == allocs_.end()) {
        fprintf(stderr, "*** cuda-emu: cudaFree(%p): not a live allocation's start\n", p);
        return set_err_(cudaErrorInvalidValue);
    }
    in_use_ -= it->second.size;
    munmap(it->second.map, it->second.map_len); // a later use faults
    allocs_.erase(it);
    return cudaSuccess;
}

static const char *kind_name_(cudaMemcpyKind k) {
    static const char *n[] = {"HostToHost", "HostToDevice", "DeviceToHost", "DeviceToDevice",
                              "Default"};
    return (unsigned)k < 5 ? n[k] : "?";
}

cudaError_t cudaMemcpy(void *d, const void *s, size_t n, cudaMemcpyKind k) {
    if (n == 0) return cudaSuccess;
    const bool dd = k == cudaMemcpyHostToDevice || k == cudaMemcpyDeviceToDevice;
    const bool sd = k == cudaMemcpyDeviceToHost || k == cudaMemcpyDeviceToDevice;
    if (k == cudaMemcpyDefault || k == cudaMemcpyHostToHost) {
        // nothing to check
    } else {
        if (dd && !dev_range_ok_(d, n))
            emu_fatal_("cudaMemcpy%s: destination [%p, +%zu) is not inside one device "
                       "allocation%s",
                       kind_name_(k), d, n,
                       is_device_(d) ? " (it runs past the end)" : " (a host pointer?)");
        if (sd && !dev_range_ok_(s, n))
            emu_fatal_("cudaMemcpy%s: source [%p, +%zu) is not inside one device allocation%s",
                       kind_name_(k), s, n,
                       is_device_(s) ? " (it runs past the end)" : " (a host pointer?)");
        if (!dd && is_device_(d))
            emu_fatal_("cudaMemcpy%s: the destination %p is a DEVICE pointer", kind_name_(k), d);
        if (!sd && is_device_(s))
            emu_fatal_("cudaMemcpy%s: the source %p is a DEVICE pointer", kind_name_(k), s);
    }
    if ((char *)d < (char *)s + n && (char *)s < (char *)d + n && d != s)
        emu_fatal_("cudaMemcpy: overlapping ranges %p and %p (%zu bytes)", d, s, n);
    legacy_op_();
    DevScope scope("cudaMemcpy");
    memmove(d, s, n);
    return cudaSuccess;
}

cudaError_t cudaMemcpyAsync(void *d, const void *s, size_t n, cudaMemcpyKind k, cudaStream_t) {
    return cudaMemcpy(d, s, n, k);
}

cudaError_t cudaMemset(void *d, int v, size_t n) {
    if (n == 0) return cudaSuccess;
    if (!dev_range_ok_(d, n))
        emu_fatal_("cudaMemset: [%p, +%zu) is not inside one device allocation%s", d, n,
                   is_device_(d) ? " (it runs past the end)" : " (a host pointer?)");
    legacy_op_();
    DevScope scope("cudaMemset");
    memset(d, v, n);
    return cudaSuccess;
}
cudaError_t cudaMemsetAsync(void *d, int v, size_t n, cudaStream_t) { return cudaMemset(d, v, n); }

// ---------------------------------------------------------------------------------------
// Streams and events.
//
// The legacy (NULL) stream runs eagerly: its kernels, copies and GEMMs finish before the call
// returns. Work on a created stream is queued instead (emu_stream_defer) and runs only when
// something waits for that stream: cudaStreamWaitEvent, cudaEventSynchronize or cudaEventQuery
// on an event recorded on it, cudaStreamSynchronize, cudaDeviceSynchronize, cudaFree (which
// synchronizes the device) or cudaStreamDestroy. That is the latest schedule CUDA allows, so a
// missing join shows: the legacy stream reading a result too early reads the old values, and
// overwriting an operand too early changes what the queued GEMM reads.
//
// The other direction, a missing fork, cannot show that way (the legacy stream's work is
// always done), so it is a rule: work queued on a non-blocking stream must follow an event
// recorded on the legacy stream after the legacy stream's latest operation, waited on by that
// stream (legacy_epoch_ counts the legacy stream's operations). A blocking stream (flags
// cudaStreamDefault) synchronizes with the legacy stream implicitly, as in CUDA: its queue
// runs before each legacy operation, and it needs no fork.
//
// emu_stall_streams(1) models a hung collective (emu_nccl.cpp): events recorded then never
// complete. Handles are checked.
struct CUstream_st {
    unsigned flags;
    std::vector<std::function<void()>> pending; // queued work, in issue order
    uint64_t forked;                            // legacy_epoch_ of the last fork it waited on
    std::vector<std::pair<uintptr_t, size_t>> ws; // GEMM workspaces its queued work uses
};
static double now_s_() {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

struct CUevent_st {
    bool stalled;
    cudaStream_t stream; // where it was last recorded (null: the legacy stream)
    uint64_t epoch;      // legacy_epoch_ when recorded on the legacy stream
    unsigned flags;      // cudaEventDisableTiming: no timestamps (cudaEventElapsedTime refuses)
    double t;            // host seconds when recorded on the legacy stream (whose work is done
                         // by then); -1: never recorded, or last recorded on a created stream
};
static std::map<const void *, int> streams_, events_; // live handles
static uint64_t legacy_epoch_ = 1;
static size_t deferred_; // work items that ran from a queue (EMU_STATS)

static bool is_legacy_(cudaStream_t s) {
    return s == nullptr || s == cudaStreamLegacy || s == cudaStreamPerThread;
}

int emu_stream_ok(cudaStream_t s) {
    return is_legacy_(s) || streams_.count(s);
}
static bool stalled_;
void emu_stall_streams(int stalled) { stalled_ = stalled != 0; }

static void flush_(cudaStream_t s) {
    if (is_legacy_(s) || !streams_.count(s)) return;
    // items may queue more work on other streams, never on this one while it runs
    std::vector<std::function<void()>> run;
    run.swap(s->pending);
    s->ws.clear();
    for (auto &f : run) {
        f();
        deferred_++;
    }
}
static void flush_all_streams_(void) {
    for (auto &kv : streams_) flush_((cudaStream_t)kv.first);
}
static void legacy_op_(void) {
    for (auto &kv : streams_) {
        cudaStream_t s = (cudaStream_t)kv.first;
        if (s->flags == cudaStreamDefault) flush_(s); // implicit synchronization
    }
    legacy_epoch_++;
}

// Runs fn now (legacy stream) or queues it on s. what names the call for the fork rule.
static void emu_stream_defer(cudaStream_t s, const char *what, std::function<void()> fn) {
    if (is_legacy_(s)) {
        legacy_op_();
        fn();
        return;
    }
    if (!streams_.count(s)) emu_fatal_("%s on stream %p: not a live stream", what, (void *)s);
    if (s->flags != cudaStreamDefault && s->forked != legacy_epoch_)
        emu_fatal_("%s queued on the non-blocking stream %p without waiting for the legacy "
                   "stream's latest work (no cudaEventRecord on the legacy stream + "
                   "cudaStreamWaitEvent since its last operation): it could run before the "
                   "kernels that produce its inputs",
                   what, (void *)s);
    s->pending.push_back(std::move(fn));
}

void emu_launch_stream(const char *name, cudaStream_t s) {
    if (!is_legacy_(s))
        emu_fatal_("launch of %s on the created stream %p: kernels on created streams are not "
                   "modelled (the backend launches every kernel on the legacy stream)",
                   name, (void *)s);
    legacy_op_();
}

// A GEMM on stream s (legacy: runs now) uses [ws, ws + n) as its workspace: no queued GEMM of
// another stream, which may run at the same time, may use any of it.
static void emu_stream_workspace(const char *what, cudaStream_t s, const void *ws, size_t n) {
    if (n == 0) return;
    const uintptr_t a = (uintptr_t)ws;
    for (auto &kv : streams_) {
        cudaStream_t o = (cudaStream_t)kv.first;
        if (o == s) continue;
        for (auto &r : o->ws)
            if (a < r.first + r.second && r.first < a + n)
                emu_fatal_("%s: its workspace [%p, +%zu) on stream %p overlaps the workspace of "
                           "a GEMM queued on stream %p: the two may run at the same time (one "
                           "workspace per stream)",
                           what, ws, n, (void *)s, (void *)o);
    }
    if (!is_legacy_(s)) s->ws.emplace_back(a, n);
}

cudaError_t cudaStreamCreateWithFlags(cudaStream_t *s, unsigned flags) {
    if (!s) return set_err_(cudaErrorInvalidValue);
    *s = new CUstream_st{flags, {}, 0, {}};
    streams_[*s] = 1;
    return cudaSuccess;
}
cudaError_t cudaStreamDestroy(cudaStream_t s) {
    if (!streams_.count(s)) return set_err_(cudaErrorInvalidResourceHandle);
    flush_(s); // its work completes first
    streams_.erase(s);
    delete s;
    return cudaSuccess;
}
cudaError_t cudaStreamSynchronize(cudaStream_t s) {
    if (!emu_stream_ok(s)) return set_err_(cudaErrorInvalidResourceHandle);
    flush_(s);
    return cudaSuccess;
}
cudaError_t cudaEventCreateWithFlags(cudaEvent_t *e, unsigned flags) {
    if (!e) return set_err_(cudaErrorInvalidValue);
    *e = new CUevent_st{false, nullptr, 0, flags, -1.0};
    events_[*e] = 1;
    return cudaSuccess;
}
cudaError_t cudaEventDestroy(cudaEvent_t e) {
    if (!events_.erase(e)) return set_err_(cudaErrorInvalidResourceHandle);
    delete e;
    return cudaSuccess;
}
cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t s) {
    if (!events_.count(e) || !emu_stream_ok(s)) return set_err_(cudaErrorInvalidResourceHandle);
    e->stalled = stalled_;
    e->stream = is_legacy_(s) ? nullptr : s;
    e->epoch = is_legacy_(s) ? legacy_epoch_ : 0;
    e->t = is_legacy_(s) ? now_s_() : -1.0;
    return cudaSuccess;
}
// Timestamps exist for events recorded on the legacy stream only (the backend's marks); an event
// without one is refused as CUDA refuses an event that has not completed or cannot time.
cudaError_t cudaEventElapsedTime(float *ms, cudaEvent_t start, cudaEvent_t end) {
    if (!ms || !events_.count(start) || !events_.count(end))
        return set_err_(cudaErrorInvalidResourceHandle);
    if ((start->flags | end->flags) & cudaEventDisableTiming)
        return set_err_(cudaErrorInvalidResourceHandle);
    if (start->t < 0.0 || end->t < 0.0)
        emu_fatal_("cudaEventElapsedTime on an event never recorded, or recorded on a created "
                   "stream (not modelled: the backend times on the legacy stream)");
    *ms = (float)(1e3 * (end->t - start->t));
    return cudaSuccess;
}
cudaError_t cudaStreamWaitEvent(cudaStream_t s, cudaEvent_t e, unsigned) {
    if (!events_.count(e) || !emu_stream_ok(s)) return set_err_(cudaErrorInvalidResourceHandle);
    if (e->stream) flush_(e->stream); // the work before the record runs now (and what followed)
    if (!e->stream && !is_legacy_(s) && e->epoch > s->forked) s->forked = e->epoch; // a fork
    return cudaSuccess;
}
cudaError_t cudaEventQuery(cudaEvent_t e) {
    if (!events_.count(e)) return set_err_(cudaErrorInvalidResourceHandle);
    if (e->stalled) return cudaErrorNotReady; // not an error: not sticky
    if (e->stream) flush_(e->stream);
    return cudaSuccess;
}
cudaError_t cudaEventSynchronize(cudaEvent_t e) {
    if (!events_.count(e)) return set_err_(cudaErrorInvalidResourceHandle);
    if (e->stalled) emu_fatal_("cudaEventSynchronize on an event that never completes (a hung "
                               "collective): the real program would hang here");
    if (e->stream) flush_(e->stream);
    return cudaSuccess;
}

// The device access window and range check for emu_nccl.cpp.
const char *emu_dev_open(const char *api) {
    const char *prev = cur_api_;
    opts_();
    cur_api_ = api;
    if (dev_open_depth_++ == 0) protect_all_(PROT_READ | PROT_WRITE);
    return prev;
}
void emu_dev_close(const char *prev_api) {
    if (--dev_open_depth_ == 0) protect_all_(PROT_NONE);
    cur_api_ = prev_api;
}
int emu_dev_range_ok(const void *p, size_t n) { return dev_range_ok_(p, n); }

// per-kernel attributes: the dynamic shared memory opt-in, and the static shared memory seen
static std::map<const void *, int> func_dyn_smem_;
static std::map<const void *, size_t> func_static_smem_;
static const void *cur_kernel_fn_ = nullptr;

cudaError_t emu_func_get_attributes(cudaFuncAttributes *a, const void *f) {
    memset(a, 0, sizeof *a);
    a->maxThreadsPerBlock = 1024;
    a->sharedSizeBytes = func_static_smem_.count(f) ? func_static_smem_[f] : 0;
    a->maxDynamicSharedSizeBytes = func_dyn_smem_.count(f) ? func_dyn_smem_[f] : 48 * 1024;
    return cudaSuccess;
}
cudaError_t emu_func_set_attribute(const void *f, cudaFuncAttribute a, int v) {
    if (a != cudaFuncAttributeMaxDynamicSharedMemorySize) return set_err_(cudaErrorInvalidValue);
    const size_t st = func_static_smem_.count(f) ? func_static_smem_[f] : 0;
    if (v < 0 || (size_t)v + st > (size_t)kSmemOptin) return set_err_(cudaErrorInvalidValue);
    func_dyn_smem_[f] = v;
    return cudaSuccess;
}

// ---------------------------------------------------------------------------------------
// Fibers
extern "C" void emu_ctx_swap(void **save_sp, void *next_sp);
extern "C" void emu_ctx_tramp(void);
asm(R"(
    .text
    .globl emu_ctx_swap
    .type emu_ctx_swap,@function
emu_ctx_swap:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size emu_ctx_swap, .-emu_ctx_swap
    .globl emu_ctx_tramp
    .type emu_ctx_tramp,@function
emu_ctx_tramp:
    movq %r12, %rdi
    callq *%r13
    ud2
    .size emu_ctx_tramp, .-emu_ctx_tramp
    .section .note.GNU-stack,"",@progbits
    .text
)");

enum { F_READY, F_BLOCK_BAR, F_WARP_BAR, F_DONE };
struct Fiber {
    void *sp;
    char *stack;
    int state;
    unsigned tid;
    unsigned xchg_n;     // warp exchanges done in this block
    int xchg_src;        // source lane of the pending exchange
    const char *wsync;   // the wmma call at the pending warp barrier (null: shuffle or vote)
    const void *bar_at;  // call site of the pending __syncthreads
};
static const size_t kStack = 256 * 1024;
static std::vector<Fiber> fibers_;
static void *sched_sp_;
static Fiber *cur_;
static EmuKernelCall call_;
static unsigned nthreads_;
// warp exchange buffers: [warp][parity][lane]; the lanes released from each exchange
static uint64_t xbuf_[32][2][32];
static unsigned xmask_[32][2];

static void fiber_main_(void *arg) {
    Fiber *f = (Fiber *)arg;
    for (;;) {
        call_.invoke(call_.ctx);
        f->state = F_DONE;
        emu_ctx_swap(&f->sp, sched_sp_);
    }
}

static void fibers_reserve_(unsigned n) {
    const size_t pg = (size_t)sysconf(_SC_PAGESIZE);
    while (fibers_.size() < n) {
        Fiber f;
        memset(&f, 0, sizeof f);
        f.stack = (char *)mmap(nullptr, kStack, PROT_READ | PROT_WRITE,
                               MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (f.stack == MAP_FAILED) emu_fatal_("mmap of a fiber stack");
        mprotect(f.stack, pg, PROT_NONE); // stack overflow guard
        fibers_.push_back(f);
    }
}

static void fiber_start_(Fiber *f) {
    // stack for emu_ctx_swap's pops: [mxcsr|fpcw] r15 r14 r13 r12 rbx rbp ret
    uint64_t *sp = (uint64_t *)(f->stack + kStack - 80);
    sp[0] = 0x037F00001F80ull; // mxcsr 0x1F80 (low 4 bytes), x87 control word 0x037F
    sp[1] = 0;
    sp[2] = 0;
    sp[3] = (uint64_t)(uintptr_t)&fiber_main_;
    sp[4] = (uint64_t)(uintptr_t)f;
    sp[5] = 0;
    sp[6] = 0;
    sp[7] = (uint64_t)(uintptr_t)&emu_ctx_tramp;
    f->sp = sp;
}

static void set_thread_idx_(unsigned tid) {
    threadIdx.x = tid % blockDim.x;
    threadIdx.y = tid / blockDim.x % blockDim.y;
    threadIdx.z = tid / (blockDim.x * blockDim.y);
}

static void yield_(int state) {
    Fiber *f = cur_;
    f->state = state;
    emu_ctx_swap(&f->sp, sched_sp_);
    // resumed by the scheduler (which has set threadIdx)
}

void emu_syncthreads(const char *file, int line) {
    if (!cur_) emu_fatal_("__syncthreads outside a kernel");
    cur_->bar_at = file + line; // a site key
    yield_(F_BLOCK_BAR);
}

void emu_warp_exchange(const void *in, void *out, size_t size, int src) {
    if (!cur_) emu_fatal_("warp shuffle outside a kernel");
    Fiber *f = cur_;
    const unsigned w = f->tid >> 5, lane = f->tid & 31, par = f->xchg_n & 1;
    uint64_t v = 0;
    memcpy(&v, in, size);
    xbuf_[w][par][lane] = v;
    f->xchg_src = src;
    f->wsync = nullptr;
    yield_(F_WARP_BAR);
    f->xchg_n++;
    v = xbuf_[w][par][src];
    memcpy(out, &v, size);
}

void emu_syncwarp(void) {
    if (!cur_) emu_fatal_("__syncwarp outside a kernel");
    int dummy = 0, r;
    emu_warp_exchange(&dummy, &r, sizeof dummy, (int)(cur_->tid & 31));
}

// Warp votes (__ballot_sync, __any_sync, __all_sync): a barrier of the warp like a shuffle;
// each lane posts its predicate and reads every lane's. Returns the ballot of the lanes that
// took part (bit = lane), *active the lanes that took part (not exited, inside the block). As
// on the GPU the mask does not filter the result (an H100 gives __ballot_sync(0xffff, 1) ==
// 0xffffffff when the whole warp calls it), but a lane must name itself in it.
unsigned emu_warp_vote(const char *api, unsigned mask, int pred, unsigned *active) {
    if (!cur_) emu_fatal_("%s outside a kernel", api);
    Fiber *f = cur_;
    const unsigned w = f->tid >> 5, lane = f->tid & 31, par = f->xchg_n & 1;
    if (!(mask >> lane & 1))
        emu_fatal_("%s: lane %u calls it with mask %#x, which does not name the lane "
                   "(undefined on the GPU)",
                   api, lane, mask);
    xbuf_[w][par][lane] = pred != 0;
    f->xchg_src = (int)lane;
    f->wsync = nullptr;
    yield_(F_WARP_BAR);
    f->xchg_n++;
    const unsigned m = xmask_[w][par];
    unsigned bits = 0;
    for (unsigned l = 0; l < 32; l++)
        if ((m >> l & 1) && xbuf_[w][par][l]) bits |= 1u << l;
    *active = m;
    return bits;
}

// The warp barrier of a wmma *_sync call (inc/mma.h): every lane of the warp must reach the
// same call; exited lanes or a partial warp are fatal (the GPU needs the whole warp).
void emu_wmma_sync(const char *api) {
    if (!cur_) emu_fatal_("%s outside a kernel", api);
    Fiber *f = cur_;
    f->xchg_src = (int)(f->tid & 31);
    f->wsync = api;
    yield_(F_WARP_BAR);
    f->xchg_n++;
    f->wsync = nullptr;
}

// static __shared__ arrays: poisoned before every block
static std::vector<std::pair<void *, size_t>> shared_regs_;
void emu_shared_register(void *p, size_t n) {
    shared_regs_.push_back({p, n});
    if (cur_kernel_fn_) func_static_smem_[cur_kernel_fn_] += n;
}

static std::vector<char> dyn_smem_buf_;
static size_t dyn_smem_size_; // the launch's dynamic shared memory (bytes)

// The operand checks of wmma::load_matrix_sync / store_matrix_sync (inc/mma.h): the pointer
// 256-bit aligned, ldm a multiple of 16 bytes (8 bf16 or 4 floats), the 16 x 16 tile (the
// elements p[0 .. 15 * ldm + 15]) inside one device allocation or one shared array (or the
// thread's own stack).
void emu_wmma_check(const char *api, const void *p, unsigned ldm, size_t esz) {
    if (!cur_) emu_fatal_("%s outside a kernel", api);
    if ((uintptr_t)p % 32)
        emu_fatal_("%s: the pointer %p is not 256-bit (32-byte) aligned", api, p);
    const unsigned mult = (unsigned)(16 / esz);
    if (ldm % mult)
        emu_fatal_("%s: ldm %u is not a multiple of %u (%zu-byte elements: ldm must be a "
                   "multiple of 16 bytes)",
                   api, ldm, mult, esz);
    const uintptr_t a = (uintptr_t)p, end = a + ((size_t)15 * ldm + 16) * esz;
    // true when the tile starts in [lo, lo + size); fatal when it starts there and runs past
    auto inside = [&](const char *what, uintptr_t lo, size_t size) {
        if (a < lo || a >= lo + size) return false;
        if (end > lo + size)
            emu_fatal_("%s: the 16 x 16 tile at %p (ldm %u: %zu bytes from it) runs past the end "
                       "of %s (%zu bytes at %p): OUT OF BOUNDS",
                       api, p, ldm, (size_t)(end - a), what, size, (void *)lo);
        return true;
    };
    uintptr_t base;
    if (const Alloc *al = find_alloc_(p, &base)) {
        inside("its device allocation", base, al->size);
        return;
    }
    if (inside("the dynamic shared memory", (uintptr_t)emu_dyn_smem, dyn_smem_size_)) return;
    for (auto &r : shared_regs_)
        if (inside("its __shared__ array", (uintptr_t)r.first, r.second)) return;
    const uintptr_t k0 = (uintptr_t)cur_->stack;
    if (a >= k0 && end <= k0 + kStack) return; // the thread's local memory
    emu_fatal_("%s: %p is neither device memory nor shared memory (a host pointer, freed, or "
               "out of bounds)",
               api, p);
}

static std::map<std::string, int> warned_;

static void warn_once_(const char *kernel, const char *what) {
    std::string key = std::string(kernel) + what;
    if (warned_[key]++) return;
    fprintf(stderr, "*** cuda-emu: WARNING: kernel %s: %s\n", kernel, what);
}

// Runs one block to completion.
static void run_block_(const char *name, std::vector<unsigned> &order) {
    const unsigned nt = nthreads_;
    for (auto &r : shared_regs_) memset(r.first, opt_poison_, r.second);
    memset(dyn_smem_buf_.data(), opt_poison_, dyn_smem_buf_.size());
    for (unsigned t = 0; t < nt; t++) {
        Fiber &f = fibers_[t];
        f.tid = t;
        f.state = F_READY;
        f.xchg_n = 0;
        f.wsync = nullptr;
        fiber_start_(&f);
    }
    if (opt_order_ == 2) std::shuffle(order.begin(), order.end(), rng_);
    unsigned done = 0;
    const unsigned nwarps = (nt + 31) / 32;
    for (;;) {
        bool ran = false;
        for (unsigned t : order) {
            Fiber &f = fibers_[t];
            if (f.state != F_READY) continue;
            cur_ = &f;
            set_thread_idx_(t);
            cur_tid_ = (int)t;
            emu_ctx_swap(&sched_sp_, f.sp);
            ran = true;
            if (f.state == F_DONE) done++;
        }
        cur_ = nullptr;
        if (done == nt) return;
        (void)ran;
        // release the warp exchanges whose live lanes have all arrived
        bool released = false;
        for (unsigned w = 0; w < nwarps; w++) {
            const unsigned l0 = w * 32, l1 = std::min(nt, l0 + 32);
            unsigned at = 0, gone = 0, other = 0;
            for (unsigned t = l0; t < l1; t++) {
                int s = fibers_[t].state;
                at += s == F_WARP_BAR;
                gone += s == F_DONE;
                other += s == F_BLOCK_BAR;
            }
            if (!at || other) continue;
            // a wmma call: every lane of the warp at the same call
            const char *api = nullptr;
            unsigned api_lane = 0;
            for (unsigned t = l0; t < l1 && !api; t++)
                if (fibers_[t].state == F_WARP_BAR && fibers_[t].wsync) {
                    api = fibers_[t].wsync;
                    api_lane = t - l0;
                }
            if (api) {
                for (unsigned t = l0; t < l1; t++) {
                    const Fiber &f = fibers_[t];
                    if (f.state == F_WARP_BAR && (!f.wsync || strcmp(f.wsync, api) != 0))
                        emu_fatal_("kernel %s block %u warp %u: lane %u is at %s while lane %u "
                                   "is at %s (divergent warp-synchronous code)",
                                   name, blockIdx.x, w, t - l0,
                                   f.wsync ? f.wsync : "a shuffle, vote or __syncwarp", api_lane,
                                   api);
                }
                if (gone || l1 - l0 < 32)
                    emu_fatal_("kernel %s block %u warp %u: %s with %s (every lane of the warp "
                               "must call it)",
                               name, blockIdx.x, w, api,
                               gone ? "exited lanes"
                                    : "a partial warp (block size not a "
                                      "multiple of 32)");
            }
            if (gone || l1 - l0 < 32) {
                // a full-mask shuffle with exited or missing lanes: undefined on the GPU
                for (unsigned t = l0; t < l1; t++) {
                    const Fiber &f = fibers_[t];
                    if (f.state != F_WARP_BAR) continue;
                    if (f.xchg_src < 0 || (unsigned)f.xchg_src >= l1 - l0)
                        emu_fatal_("kernel %s block %u warp %u: lane %u reads lane %d, which "
                                   "does not exist", name, blockIdx.x, w, t - l0, f.xchg_src);
                    if (fibers_[l0 + f.xchg_src].state == F_DONE)
                        emu_fatal_("kernel %s block %u warp %u: lane %u shuffles with lane %d, "
                                   "which has exited (full-mask shuffle with inactive lanes "
                                   "is undefined)",
                                   name, blockIdx.x, w, t - l0, f.xchg_src);
                }
                warn_once_(name, "warp shuffle while some lanes of the warp have exited (mask "
                                 "0xffffffff names them: undefined behaviour on the GPU)");
            }
            unsigned n0 = ~0u;
            for (unsigned t = l0; t < l1; t++) {
                Fiber &f = fibers_[t];
                if (f.state != F_WARP_BAR) continue;
                if (n0 == ~0u) n0 = f.xchg_n;
                if (f.xchg_n != n0)
                    emu_fatal_("kernel %s block %u warp %u: lanes at different shuffles, votes "
                               "or wmma calls (divergent warp-synchronous code)",
                               name, blockIdx.x, w);
                f.state = F_READY;
            }
            unsigned m = 0;
            for (unsigned t = l0; t < l1; t++)
                if (fibers_[t].state == F_READY) m |= 1u << (t - l0);
            xmask_[w][n0 & 1] = m;
            released = true;
        }
        if (released) continue;
        // release the block barrier when every live thread is there
        unsigned at = 0;
        const void *site = nullptr;
        bool same_site = true;
        for (unsigned t = 0; t < nt; t++)
            if (fibers_[t].state == F_BLOCK_BAR) {
                if (at++ == 0) site = fibers_[t].bar_at;
                else if (fibers_[t].bar_at != site) same_site = false;
            }
        if (at && at + done == nt) {
            if (done)
                warn_once_(name, "__syncthreads reached after some threads of the block exited");
            if (!same_site)
                warn_once_(name, "threads of one block wait at DIFFERENT __syncthreads calls "
                                 "(divergent barrier: undefined on the GPU)");
            for (unsigned t = 0; t < nt; t++)
                if (fibers_[t].state == F_BLOCK_BAR) fibers_[t].state = F_READY;
            continue;
        }
        // nothing can run: a deadlock
        unsigned nb = 0, nw = 0;
        for (unsigned t = 0; t < nt; t++) {
            nb += fibers_[t].state == F_BLOCK_BAR;
            nw += fibers_[t].state == F_WARP_BAR;
        }
        emu_fatal_("kernel %s block (%u,%u,%u): DEADLOCK: %u threads at __syncthreads, %u at a "
                   "warp shuffle, %u exited (divergent barrier)",
                   name, blockIdx.x, blockIdx.y, blockIdx.z, nb, nw, done);
    }
}

void emu_check_kernel_pointer(const char *kernel, int arg, const void *p) {
    if (!p) return;
    if (!is_device_(p))
        emu_fatal_("launch of %s: pointer argument %d (%p) is not device memory (a host "
                   "pointer, or freed)",
                   kernel, arg, p);
}

static size_t launches_;

void emu_run_grid(const char *name, const void *kernel, dim3 grid, dim3 block, size_t smem,
                  EmuKernelCall call) {
    opts_();
    launches_++;
    const unsigned long long nt = (unsigned long long)block.x * block.y * block.z;
    if (nt == 0 || nt > 1024 || block.z > 64 || grid.x == 0 || grid.y == 0 || grid.z == 0 ||
        grid.x > 0x7fffffffu || grid.y > 65535 || grid.z > 65535) {
        fprintf(stderr,
                "*** cuda-emu: launch of %s with grid (%u,%u,%u) block (%u,%u,%u): invalid "
                "configuration\n",
                name, grid.x, grid.y, grid.z, block.x, block.y, block.z);
        set_err_(cudaErrorInvalidConfiguration);
        return;
    }
    const size_t st = func_static_smem_.count(kernel) ? func_static_smem_[kernel] : 0;
    const size_t lim = func_dyn_smem_.count(kernel) ? (size_t)func_dyn_smem_[kernel]
                                                     : (st < 48 * 1024 ? 48 * 1024 - st : 0);
    if (smem > lim) {
        fprintf(stderr,
                "*** cuda-emu: launch of %s asks %zu bytes of dynamic shared memory; the "
                "limit is %zu (static %zu; opt in with cudaFuncSetAttribute)\n",
                name, smem, lim, st);
        set_err_(cudaErrorInvalidValue);
        return;
    }
    if (nt % 32) warn_once_(name, "block size is not a multiple of 32");
    DevScope scope("kernel");
    cur_kernel_ = name;
    cur_kernel_fn_ = kernel;
    call_ = call;
    nthreads_ = (unsigned)nt;
    blockDim = block;
    gridDim = grid;
    fibers_reserve_(nthreads_);
    // 128-byte aligned (wmma wants 32, cp.async.bulk / TMA 128)
    dyn_smem_buf_.assign(smem + 16 + 128, 0);
    emu_dyn_smem = (char *)(((uintptr_t)dyn_smem_buf_.data() + 127) & ~(uintptr_t)127);
    dyn_smem_size_ = smem;
    std::vector<unsigned> order(nthreads_);
    for (unsigned t = 0; t < nthreads_; t++) order[t] = opt_order_ == 1 ? nthreads_ - 1 - t : t;
    const unsigned long long nblocks = (unsigned long long)grid.x * grid.y * grid.z;
    for (unsigned long long b0 = 0; b0 < nblocks; b0++) {
        const unsigned long long b = opt_order_ == 1 ? nblocks - 1 - b0 : b0;
        blockIdx.x = (unsigned)(b % grid.x);
        blockIdx.y = (unsigned)(b / grid.x % grid.y);
        blockIdx.z = (unsigned)(b / ((unsigned long long)grid.x * grid.y));
        run_block_(name, order);
    }
    cur_kernel_ = nullptr;
    cur_kernel_fn_ = nullptr;
    cur_tid_ = -1;
}

// ---------------------------------------------------------------------------------------
// Fake cuBLAS
struct EmuCublasContext {
    int magic;
    cublasMath_t math;
    cudaStream_t stream; // cublasSetStream's (null: the legacy stream)
};

cublasStatus_t cublasCreate(cublasHandle_t *h) {
    *h = new EmuCublasContext{0x6375626c, CUBLAS_DEFAULT_MATH, nullptr};
    return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasDestroy(cublasHandle_t h) {
    delete h;
    return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasSetStream(cublasHandle_t h, cudaStream_t s) {
    if (!h || h->magic != 0x6375626c) return CUBLAS_STATUS_NOT_INITIALIZED;
    if (!emu_stream_ok(s)) emu_fatal_("cublasSetStream: %p is not a live stream", (void *)s);
    h->stream = s;
    return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasSetMathMode(cublasHandle_t h, cublasMath_t m) {
    if (!h || h->magic != 0x6375626c) return CUBLAS_STATUS_NOT_INITIALIZED;
    h->math = m;
    return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasSetAtomicsMode(cublasHandle_t h, cublasAtomicsMode_t) {
    if (!h || h->magic != 0x6375626c) return CUBLAS_STATUS_NOT_INITIALIZED;
    return CUBLAS_STATUS_SUCCESS;
}
const char *cublasGetStatusName(cublasStatus_t s) {
    switch (s) {
    case CUBLAS_STATUS_SUCCESS: return "CUBLAS_STATUS_SUCCESS";
    case CUBLAS_STATUS_NOT_INITIALIZED: return "CUBLAS_STATUS_NOT_INITIALIZED";
    case CUBLAS_STATUS_INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "CUBLAS_STATUS_NOT_SUPPORTED";
    default: return "CUBLAS_STATUS_(emu)";
    }
}
const char *cublasGetStatusString(cublasStatus_t s) { return cublasGetStatusName(s); }

static float bf16_round_(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return f;
    u += 0x7fffu + ((u >> 16) & 1u);
    u &= 0xffff0000u;
    memcpy(&f, &u, 4);
    return f;
}

static size_t type_size_(cudaDataType t) {
    return t == CUDA_R_16BF ? 2 : 4;
}

static const char *type_name_(cudaDataType t) {
    switch (t) {
    case CUDA_R_32F:
        return "CUDA_R_32F";
    case CUDA_R_64F:
        return "CUDA_R_64F";
    case CUDA_R_16F:
        return "CUDA_R_16F";
    case CUDA_R_16BF:
        return "CUDA_R_16BF";
    default:
        return "(unknown type)";
    }
}

static const char *compute_name_(cublasComputeType_t c) {
    switch (c) {
    case CUBLAS_COMPUTE_16F:
        return "CUBLAS_COMPUTE_16F";
    case CUBLAS_COMPUTE_32F:
        return "CUBLAS_COMPUTE_32F";
    case CUBLAS_COMPUTE_32F_PEDANTIC:
        return "CUBLAS_COMPUTE_32F_PEDANTIC";
    case CUBLAS_COMPUTE_32F_FAST_16F:
        return "CUBLAS_COMPUTE_32F_FAST_16F";
    case CUBLAS_COMPUTE_32F_FAST_16BF:
        return "CUBLAS_COMPUTE_32F_FAST_16BF";
    case CUBLAS_COMPUTE_32F_FAST_TF32:
        return "CUBLAS_COMPUTE_32F_FAST_TF32";
    case CUBLAS_COMPUTE_64F:
        return "CUBLAS_COMPUTE_64F";
    default:
        return "(unknown compute type)";
    }
}

// Bytes spanned by the stored (rows, cols) column-major matrix with leading dimension ld.
static size_t extent_bytes_(int rows, int cols, int ld, size_t esize) {
    return ((size_t)(cols - 1) * (size_t)ld + (size_t)rows) * esize;
}

// Checks that the (rows, cols) column-major matrix at p with leading dimension ld and elements
// of esize bytes lies inside one device allocation; what names it in the message.
static void gemm_operand_check_(const char *api, const char *what, const void *p, int rows,
                                int cols, int ld, size_t esize) {
    if (rows == 0 || cols == 0) return;
    const size_t last = extent_bytes_(rows, cols, ld, esize);
    if (!dev_range_ok_(p, last))
        emu_fatal_("%s: operand %s at %p (%d x %d, ld %d, %zu bytes) is not inside one device "
                   "allocation%s",
                   api, what, p, rows, cols, ld, last,
                   is_device_(p) ? " (it runs past the end)" : " (a host pointer?)");
}

// Copy of the stored (rows, cols) operand as fp32, compact (ld = rows): bf16 elements widened
// (exact), fp32 elements rounded to bf16 (nearest even: FAST_16BF's arithmetic).
static std::vector<float> operand_f32_(const void *p, cudaDataType t, int rows, int cols, int ld) {
    std::vector<float> r((size_t)rows * cols);
    for (int c = 0; c < cols; c++)
        for (int i = 0; i < rows; i++) {
            const size_t at = (size_t)c * ld + i;
            float f;
            if (t == CUDA_R_16BF) {
                const uint32_t u = (uint32_t)((const uint16_t *)p)[at] << 16;
                memcpy(&f, &u, 4);
            } else {
                f = bf16_round_(((const float *)p)[at]);
            }
            r[(size_t)c * rows + i] = f;
        }
    return r;
}

static size_t gemms_, gemms_bf16_;

// One GEMM, C fp32. A and B are fp32 (at == CUDA_R_32F; rounded to bf16 first with fast_bf16)
// or bf16 (CUDA_R_16BF, read exactly); the products are summed in fp32 by cblas_sgemm.
static cublasStatus_t gemm_one_(const char *api, cublasOperation_t ta, cublasOperation_t tb, int m,
                                int n, int k, float alpha, const void *A, int lda, const void *B,
                                int ldb, cudaDataType at, float beta, float *C, int ldc,
                                bool fast_bf16) {
    const int ar = ta == CUBLAS_OP_N ? m : k, ac = ta == CUBLAS_OP_N ? k : m;
    const int br = tb == CUBLAS_OP_N ? k : n, bc = tb == CUBLAS_OP_N ? n : k;
    const size_t es = type_size_(at);
    gemm_operand_check_(api, "A", A, ar, ac, lda, es);
    gemm_operand_check_(api, "B", B, br, bc, ldb, es);
    gemm_operand_check_(api, "C", C, m, n, ldc, sizeof(float));
    // C must not overlap A or B (cuBLAS does not support in-place products)
    auto span = [](const void *p, int rows, int cols, int ld, size_t esize) {
        return std::make_pair((const char *)p,
                              (const char *)p + extent_bytes_(rows, cols, ld, esize));
    };
    if (m && n && k) {
        auto sc = span(C, m, n, ldc, sizeof(float)), sa = span(A, ar, ac, lda, es),
             sb = span(B, br, bc, ldb, es);
        if ((sc.first < sa.second && sa.first < sc.second) ||
            (sc.first < sb.second && sb.first < sc.second))
            emu_fatal_("%s: the output C overlaps an input", api);
    }
    if (m == 0 || n == 0) return CUBLAS_STATUS_SUCCESS;
    if (beta == 0.0f) // C is not read
        for (int j = 0; j < n; j++) memset(C + (size_t)j * ldc, 0, (size_t)m * sizeof(float));
    if (k == 0) {
        if (beta != 0.0f)
            for (int j = 0; j < n; j++)
                for (int i = 0; i < m; i++) C[(size_t)j * ldc + i] *= beta;
        return CUBLAS_STATUS_SUCCESS;
    }
    const CBLAS_TRANSPOSE cta = ta == CUBLAS_OP_N ? CblasNoTrans : CblasTrans;
    const CBLAS_TRANSPOSE ctb = tb == CUBLAS_OP_N ? CblasNoTrans : CblasTrans;
    if (at == CUDA_R_16BF || fast_bf16) {
        std::vector<float> a = operand_f32_(A, at, ar, ac, lda),
                           b = operand_f32_(B, at, br, bc, ldb);
        cblas_sgemm(CblasColMajor, cta, ctb, m, n, k, alpha, a.data(), ar, b.data(), br, beta, C,
                    ldc);
    } else {
        cblas_sgemm(CblasColMajor, cta, ctb, m, n, k, alpha, (const float *)A, lda,
                    (const float *)B, ldb, beta, C, ldc);
    }
    gemms_++;
    gemms_bf16_ += at == CUDA_R_16BF;
    return CUBLAS_STATUS_SUCCESS;
}

// cuBLAS's argument rules for the two calls. The type combinations are the ones the emulation
// computes, a subset of cuBLAS's table: A = B = C = CUDA_R_32F with CUBLAS_COMPUTE_32F or
// CUBLAS_COMPUTE_32F_FAST_16BF, and A = B = CUDA_R_16BF, C = CUDA_R_32F with CUBLAS_COMPUTE_32F.
// Anything else is CUBLAS_STATUS_NOT_SUPPORTED (the caller prints the call), though cuBLAS
// itself may accept it: the emulation must not guess arithmetic it does not model.
static cublasStatus_t gemm_args_check_(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb,
                                       int m, int n, int k, int lda, int ldb, int ldc,
                                       cudaDataType at, cudaDataType bt, cudaDataType ct,
                                       cublasComputeType_t comp, const void *alpha,
                                       const void *beta) {
    if (!h || h->magic != 0x6375626c) return CUBLAS_STATUS_NOT_INITIALIZED;
    if ((ta != CUBLAS_OP_N && ta != CUBLAS_OP_T) || (tb != CUBLAS_OP_N && tb != CUBLAS_OP_T))
        return CUBLAS_STATUS_INVALID_VALUE;
    if (m < 0 || n < 0 || k < 0) return CUBLAS_STATUS_INVALID_VALUE;
    const int ar = ta == CUBLAS_OP_N ? m : k, br = tb == CUBLAS_OP_N ? k : n;
    if (lda < std::max(1, ar) || ldb < std::max(1, br) || ldc < std::max(1, m))
        return CUBLAS_STATUS_INVALID_VALUE;
    const bool f32 = at == CUDA_R_32F && bt == CUDA_R_32F && ct == CUDA_R_32F &&
                     (comp == CUBLAS_COMPUTE_32F || comp == CUBLAS_COMPUTE_32F_FAST_16BF);
    const bool bf16 =
        at == CUDA_R_16BF && bt == CUDA_R_16BF && ct == CUDA_R_32F && comp == CUBLAS_COMPUTE_32F;
    if (!f32 && !bf16) return CUBLAS_STATUS_NOT_SUPPORTED;
    if (!alpha || !beta || is_device_(alpha) || is_device_(beta))
        return CUBLAS_STATUS_INVALID_VALUE; // pointer mode host: alpha, beta on the host
    if (f32 && comp == CUBLAS_COMPUTE_32F && h->math != CUBLAS_DEFAULT_MATH &&
        h->math != CUBLAS_PEDANTIC_MATH)
        fprintf(stderr,
                "*** cuda-emu: note: CUBLAS_COMPUTE_32F with math mode %d may use TF32 "
                "on a GPU; the emulation computes fp32\n",
                h->math);
    return CUBLAS_STATUS_SUCCESS;
}

// "A CUDA_R_16BF, B CUDA_R_16BF, C CUDA_R_32F, CUBLAS_COMPUTE_32F" for the failure messages.
static std::string types_(cudaDataType at, cudaDataType bt, cudaDataType ct,
                          cublasComputeType_t comp) {
    return std::string("A ") + type_name_(at) + ", B " + type_name_(bt) + ", C " + type_name_(ct) +
           ", " + compute_name_(comp);
}

cublasStatus_t cublasGemmEx(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m,
                            int n, int k, const void *alpha, const void *A, cudaDataType at,
                            int lda, const void *B, cudaDataType bt, int ldb, const void *beta,
                            void *C, cudaDataType ct, int ldc, cublasComputeType_t comp,
                            cublasGemmAlgo_t) {
    cublasStatus_t s =
        gemm_args_check_(h, ta, tb, m, n, k, lda, ldb, ldc, at, bt, ct, comp, alpha, beta);
    if (s != CUBLAS_STATUS_SUCCESS) {
        fprintf(stderr,
                "*** cuda-emu: cublasGemmEx(%c%c, m %d n %d k %d, lda %d ldb %d ldc %d, %s): %s\n",
                ta ? 'T' : 'N', tb ? 'T' : 'N', m, n, k, lda, ldb, ldc,
                types_(at, bt, ct, comp).c_str(), cublasGetStatusName(s));
        return s;
    }
    // the scalars are read now (pointer mode host); the product runs in stream order
    const float al = *(const float *)alpha, be = *(const float *)beta;
    const bool fast = comp == CUBLAS_COMPUTE_32F_FAST_16BF;
    emu_stream_defer(h->stream, "cublasGemmEx", [=] {
        DevScope scope("cublasGemmEx");
        gemm_one_("cublasGemmEx", ta, tb, m, n, k, al, A, lda, B, ldb, at, be, (float *)C, ldc,
                  fast);
    });
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasGemmStridedBatchedEx(cublasHandle_t h, cublasOperation_t ta,
                                          cublasOperation_t tb, int m, int n, int k,
                                          const void *alpha, const void *A, cudaDataType at,
                                          int lda, long long sA, const void *B, cudaDataType bt,
                                          int ldb, long long sB, const void *beta, void *C,
                                          cudaDataType ct, int ldc, long long sC, int batch,
                                          cublasComputeType_t comp, cublasGemmAlgo_t) {
    cublasStatus_t s =
        gemm_args_check_(h, ta, tb, m, n, k, lda, ldb, ldc, at, bt, ct, comp, alpha, beta);
    if (s == CUBLAS_STATUS_SUCCESS && batch < 0) s = CUBLAS_STATUS_INVALID_VALUE;
    if (s != CUBLAS_STATUS_SUCCESS) {
        fprintf(stderr,
                "*** cuda-emu: cublasGemmStridedBatchedEx(%c%c, m %d n %d k %d, lda %d ldb %d "
                "ldc %d, batch %d, %s): %s\n",
                ta ? 'T' : 'N', tb ? 'T' : 'N', m, n, k, lda, ldb, ldc, batch,
                types_(at, bt, ct, comp).c_str(), cublasGetStatusName(s));
        return s;
    }
    // the output matrices of the batch must not share elements: C_i's columns are m wide,
    // at stride sC; with ldc > sC they interleave, which is fine while sC >= m
    if (batch > 1 && m > 0 && n > 0 && sC < m && !(n == 1 && sC >= m))
        emu_fatal_("cublasGemmStridedBatchedEx: the batch's outputs overlap (strideC %lld < m "
                   "%d)",
                   sC, m);
    const float al = *(const float *)alpha, be = *(const float *)beta;
    const bool fast = comp == CUBLAS_COMPUTE_32F_FAST_16BF;
    emu_stream_defer(h->stream, "cublasGemmStridedBatchedEx", [=] {
        DevScope scope("cublasGemmStridedBatchedEx");
        const size_t es = type_size_(at);
        for (int i = 0; i < batch; i++)
            gemm_one_("cublasGemmStridedBatchedEx", ta, tb, m, n, k, al,
                      (const char *)A + (size_t)(i * sA) * es, lda,
                      (const char *)B + (size_t)(i * sB) * es, ldb, at, be, (float *)C + i * sC,
                      ldc, fast);
    });
    return CUBLAS_STATUS_SUCCESS;
}

// ---------------------------------------------------------------------------------------
// Fake cuBLASLt (inc/cublasLt.h): descriptors live in the caller's opaque structs, written
// and read here through memcpy of the structs below; a magic number marks an initialised one.
struct EmuCublasLtContext {
    int magic;
};
enum : uint32_t { LT_DESC_MAGIC = 0x6c746d64, LT_LAYOUT_MAGIC = 0x6c746c79,
                  LT_PREF_MAGIC = 0x6c747066, LT_ALGO_MAGIC = 0x6c74616c };
struct LtDesc {
    uint32_t magic;
    int compute, scale, ta, tb;
};
struct LtLayout {
    uint32_t magic;
    int type;
    uint64_t rows, cols;
    int64_t ld;
};
struct LtPref {
    uint32_t magic;
    uint32_t align[4]; // A, B, C, D
    uint64_t max_ws;
};
struct LtAlgo { // what the heuristic chose the algorithm for (64 bytes at most)
    uint32_t magic;
    int ta, tb, m, n, k;
    int32_t lda, ldb, ldc;
    uint32_t align[4];
    uint32_t ws; // workspace it needs, bytes
};
static_assert(sizeof(LtDesc) <= sizeof(cublasLtMatmulDescOpaque_t), "LtDesc");
static_assert(sizeof(LtLayout) <= sizeof(cublasLtMatrixLayoutOpaque_t), "LtLayout");
static_assert(sizeof(LtPref) <= sizeof(cublasLtMatmulPreferenceOpaque_t), "LtPref");
static_assert(sizeof(LtAlgo) <= sizeof(cublasLtMatmulAlgo_t), "LtAlgo");
static size_t lt_queries_, lt_matmuls_;

template <class T, class O> static T lt_read_(const O *o) {
    T t;
    memcpy(&t, o, sizeof t);
    return t;
}

cublasStatus_t cublasLtCreate(cublasLtHandle_t *h) {
    *h = new EmuCublasLtContext{0x63424c74};
    return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtDestroy(cublasLtHandle_t h) {
    delete h;
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatrixLayoutInit_internal(cublasLtMatrixLayout_t l, size_t size,
                                                 cudaDataType type, uint64_t rows, uint64_t cols,
                                                 int64_t ld) {
    if (!l || size != sizeof *l) return CUBLAS_STATUS_INVALID_VALUE;
    // column-major: ld >= rows (cuBLASLt rejects less)
    if (ld < (int64_t)std::max<uint64_t>(rows, 1)) {
        fprintf(stderr, "*** cuda-emu: cublasLtMatrixLayoutInit: ld %lld < rows %llu\n",
                (long long)ld, (unsigned long long)rows);
        return CUBLAS_STATUS_INVALID_VALUE;
    }
    LtLayout v{LT_LAYOUT_MAGIC, (int)type, rows, cols, ld};
    memset(l, 0, sizeof *l);
    memcpy(l, &v, sizeof v);
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmulDescInit_internal(cublasLtMatmulDesc_t d, size_t size,
                                               cublasComputeType_t compute,
                                               cudaDataType_t scale) {
    if (!d || size != sizeof *d) return CUBLAS_STATUS_INVALID_VALUE;
    LtDesc v{LT_DESC_MAGIC, (int)compute, (int)scale, CUBLAS_OP_N, CUBLAS_OP_N};
    memset(d, 0, sizeof *d);
    memcpy(d, &v, sizeof v);
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmulDescSetAttribute(cublasLtMatmulDesc_t d,
                                              cublasLtMatmulDescAttributes_t attr, const void *buf,
                                              size_t size) {
    LtDesc v = lt_read_<LtDesc>(d);
    if (v.magic != LT_DESC_MAGIC) emu_fatal_("cublasLtMatmulDescSetAttribute: not initialised");
    if ((attr != CUBLASLT_MATMUL_DESC_TRANSA && attr != CUBLASLT_MATMUL_DESC_TRANSB) ||
        size != sizeof(int32_t)) {
        fprintf(stderr, "*** cuda-emu: cublasLtMatmulDescSetAttribute: attribute %d (size %zu) is "
                        "not modelled (TRANSA, TRANSB: int32_t)\n", (int)attr, size);
        return CUBLAS_STATUS_INVALID_VALUE;
    }
    int32_t op;
    memcpy(&op, buf, sizeof op);
    if (op != CUBLAS_OP_N && op != CUBLAS_OP_T) return CUBLAS_STATUS_INVALID_VALUE;
    (attr == CUBLASLT_MATMUL_DESC_TRANSA ? v.ta : v.tb) = op;
    memcpy(d, &v, sizeof v);
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmulPreferenceInit_internal(cublasLtMatmulPreference_t p, size_t size) {
    if (!p || size != sizeof *p) return CUBLAS_STATUS_INVALID_VALUE;
    LtPref v{LT_PREF_MAGIC, {256, 256, 256, 256}, 0}; // cuBLASLt's defaults
    memset(p, 0, sizeof *p);
    memcpy(p, &v, sizeof v);
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmulPreferenceSetAttribute(cublasLtMatmulPreference_t p,
                                                    cublasLtMatmulPreferenceAttributes_t attr,
                                                    const void *buf, size_t size) {
    LtPref v = lt_read_<LtPref>(p);
    if (v.magic != LT_PREF_MAGIC)
        emu_fatal_("cublasLtMatmulPreferenceSetAttribute: not initialised");
    if (attr == CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES && size == sizeof(uint64_t)) {
        memcpy(&v.max_ws, buf, size);
    } else if (attr >= CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES &&
               attr <= CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES && size == sizeof(uint32_t)) {
        uint32_t a;
        memcpy(&a, buf, size);
        if (a == 0 || (a & (a - 1)) != 0) return CUBLAS_STATUS_INVALID_VALUE;
        v.align[attr - CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES] = a;
    } else {
        fprintf(stderr, "*** cuda-emu: cublasLtMatmulPreferenceSetAttribute: attribute %d (size "
                        "%zu) is not modelled\n", (int)attr, size);
        return CUBLAS_STATUS_INVALID_VALUE;
    }
    memcpy(p, &v, sizeof v);
    return CUBLAS_STATUS_SUCCESS;
}

// The problem the descriptors describe, or CUBLAS_STATUS_NOT_SUPPORTED / INVALID_VALUE.
struct LtProblem {
    int ta, tb, m, n, k;
    int64_t lda, ldb, ldc;
};
static cublasStatus_t lt_problem_(const char *api, cublasLtHandle_t h, cublasLtMatmulDesc_t d,
                                  cublasLtMatrixLayout_t a, cublasLtMatrixLayout_t b,
                                  cublasLtMatrixLayout_t c, cublasLtMatrixLayout_t dd,
                                  LtProblem *pr) {
    if (!h || h->magic != 0x63424c74) return CUBLAS_STATUS_NOT_INITIALIZED;
    const LtDesc v = lt_read_<LtDesc>(d);
    const LtLayout la = lt_read_<LtLayout>(a), lb = lt_read_<LtLayout>(b),
                   lc = lt_read_<LtLayout>(c), ld = lt_read_<LtLayout>(dd);
    if (v.magic != LT_DESC_MAGIC || la.magic != LT_LAYOUT_MAGIC || lb.magic != LT_LAYOUT_MAGIC ||
        lc.magic != LT_LAYOUT_MAGIC || ld.magic != LT_LAYOUT_MAGIC)
        emu_fatal_("%s: a descriptor is not initialised", api);
    if (v.compute != CUBLAS_COMPUTE_32F || v.scale != CUDA_R_32F || la.type != CUDA_R_16BF ||
        lb.type != CUDA_R_16BF || lc.type != CUDA_R_32F) {
        fprintf(stderr, "*** cuda-emu: %s: only A, B CUDA_R_16BF, C CUDA_R_32F, "
                        "CUBLAS_COMPUTE_32F, scale CUDA_R_32F is modelled\n", api);
        return CUBLAS_STATUS_NOT_SUPPORTED;
    }
    if (memcmp(&lc, &ld, sizeof lc) != 0) {
        fprintf(stderr, "*** cuda-emu: %s: Cdesc != Ddesc is not modelled\n", api);
        return CUBLAS_STATUS_NOT_SUPPORTED;
    }
    // op(A) (m,k), op(B) (k,n), C (m,n)
    const uint64_t am = v.ta == CUBLAS_OP_N ? la.rows : la.cols,
                   ak = v.ta == CUBLAS_OP_N ? la.cols : la.rows;
    const uint64_t bk = v.tb == CUBLAS_OP_N ? lb.rows : lb.cols,
                   bn = v.tb == CUBLAS_OP_N ? lb.cols : lb.rows;
    if (am != lc.rows || bn != lc.cols || ak != bk || am == 0 || bn == 0 || ak == 0) {
        fprintf(stderr, "*** cuda-emu: %s: inconsistent shapes: op(A) %llux%llu, op(B) "
                        "%llux%llu, C %llux%llu\n", api, (unsigned long long)am,
                (unsigned long long)ak, (unsigned long long)bk, (unsigned long long)bn,
                (unsigned long long)lc.rows, (unsigned long long)lc.cols);
        return CUBLAS_STATUS_INVALID_VALUE;
    }
    *pr = LtProblem{v.ta, v.tb, (int)am, (int)bn, (int)ak, la.ld, lb.ld, lc.ld};
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmulAlgoGetHeuristic(cublasLtHandle_t h, cublasLtMatmulDesc_t d,
                                              cublasLtMatrixLayout_t a, cublasLtMatrixLayout_t b,
                                              cublasLtMatrixLayout_t c, cublasLtMatrixLayout_t dd,
                                              cublasLtMatmulPreference_t p, int requested,
                                              cublasLtMatmulHeuristicResult_t res[], int *got) {
    if (requested <= 0 || !res || !got) return CUBLAS_STATUS_INVALID_VALUE;
    LtProblem pr;
    cublasStatus_t s = lt_problem_("cublasLtMatmulAlgoGetHeuristic", h, d, a, b, c, dd, &pr);
    if (s != CUBLAS_STATUS_SUCCESS) return s;
    const LtPref pf = lt_read_<LtPref>(p);
    if (pf.magic != LT_PREF_MAGIC) emu_fatal_("cublasLtMatmulAlgoGetHeuristic: preference not "
                                              "initialised");
    lt_queries_++;
    // a split-k algorithm, with workspace, for sums of 64 or more when the preference allows
    // 4 MiB (a low bar, so that the tests' small GEMMs use workspaces too: emu_stream_workspace
    // checks that no two streams share one)
    const uint64_t want_ws = pr.k >= 64 && pf.max_ws >= ((uint64_t)4 << 20) ? (4u << 20) : 0;
    LtAlgo al{LT_ALGO_MAGIC, pr.ta, pr.tb, pr.m, pr.n, pr.k, (int32_t)pr.lda, (int32_t)pr.ldb,
              (int32_t)pr.ldc, {pf.align[0], pf.align[1], pf.align[2], pf.align[3]},
              (uint32_t)want_ws};
    memset(&res[0], 0, sizeof res[0]);
    memcpy(&res[0].algo, &al, sizeof al);
    res[0].workspaceSize = want_ws;
    res[0].state = CUBLAS_STATUS_SUCCESS;
    res[0].wavesCount = 1.0f;
    *got = 1;
    return CUBLAS_STATUS_SUCCESS;
}

static uint32_t lt_align_of_(const void *p) {
    const uintptr_t u = (uintptr_t)p;
    const uintptr_t low = u & (~u + 1);
    return low == 0 || low > 256 ? 256u : (uint32_t)low;
}

cublasStatus_t cublasLtMatmul(cublasLtHandle_t h, cublasLtMatmulDesc_t d, const void *alpha,
                              const void *A, cublasLtMatrixLayout_t a, const void *B,
                              cublasLtMatrixLayout_t b, const void *beta, const void *C,
                              cublasLtMatrixLayout_t c, void *D, cublasLtMatrixLayout_t dd,
                              const cublasLtMatmulAlgo_t *algo, void *ws, size_t ws_bytes,
                              cudaStream_t stream) {
    LtProblem pr;
    cublasStatus_t s = lt_problem_("cublasLtMatmul", h, d, a, b, c, dd, &pr);
    if (s != CUBLAS_STATUS_SUCCESS) return s;
    if (!algo) emu_fatal_("cublasLtMatmul: algo NULL (the heuristic's choice is not modelled)");
    const LtAlgo al = lt_read_<LtAlgo>(algo);
    if (al.magic != LT_ALGO_MAGIC) emu_fatal_("cublasLtMatmul: algo not from the heuristic");
    if (!emu_stream_ok(stream))
        emu_fatal_("cublasLtMatmul: stream %p is not a live stream", (void *)stream);
    if (!alpha || !beta || is_device_(alpha) || is_device_(beta))
        return CUBLAS_STATUS_INVALID_VALUE; // pointer mode host
    if (C != D) {
        fprintf(stderr, "*** cuda-emu: cublasLtMatmul: C != D is not modelled\n");
        return CUBLAS_STATUS_NOT_SUPPORTED;
    }
    // stricter than cuBLASLt: the algorithm must come from this layout, with n, k no larger
    if (al.ta != pr.ta || al.tb != pr.tb || al.m != pr.m || al.lda != pr.lda ||
        al.ldb != pr.ldb || al.ldc != pr.ldc || pr.n > al.n || pr.k > al.k)
        emu_fatal_("cublasLtMatmul: the algorithm was chosen for %c%c m %d n %d k %d lda %lld "
                   "ldb %lld ldc %lld, not for this %c%c m %d n %d k %d lda %lld ldb %lld "
                   "ldc %lld (a wrong algorithm cache key?)",
                   al.ta ? 'T' : 'N', al.tb ? 'T' : 'N', al.m, al.n, al.k, (long long)al.lda,
                   (long long)al.ldb, (long long)al.ldc, pr.ta ? 'T' : 'N', pr.tb ? 'T' : 'N',
                   pr.m, pr.n, pr.k, (long long)pr.lda, (long long)pr.ldb, (long long)pr.ldc);
    // as cuBLASLt: buffers less aligned than the algorithm was chosen for are refused
    if (lt_align_of_(A) < al.align[0] || lt_align_of_(B) < al.align[1] ||
        lt_align_of_(C) < al.align[2] || lt_align_of_(D) < al.align[3])
        return CUBLAS_STATUS_NOT_SUPPORTED;
    if (ws_bytes < al.ws) return CUBLAS_STATUS_INVALID_VALUE;
    if (al.ws > 0 && !dev_range_ok_(ws, al.ws))
        emu_fatal_("cublasLtMatmul: the workspace (%zu bytes at %p) is not device memory the "
                   "algorithm can use", ws_bytes, ws);
    const char *refuse = getenv("EMU_LT_REFUSE");
    if (refuse && strcmp(refuse, "1") == 0) return CUBLAS_STATUS_NOT_SUPPORTED;
    lt_matmuls_++;
    emu_stream_workspace("cublasLtMatmul", stream, ws, al.ws);
    const float alv = *(const float *)alpha, bev = *(const float *)beta;
    emu_stream_defer(stream, "cublasLtMatmul", [=] {
        DevScope scope("cublasLtMatmul");
        gemm_one_("cublasLtMatmul", (cublasOperation_t)pr.ta, (cublasOperation_t)pr.tb, pr.m,
                  pr.n, pr.k, alv, A, (int)pr.lda, B, (int)pr.ldb, CUDA_R_16BF, bev, (float *)D,
                  (int)pr.ldc, false);
    });
    return CUBLAS_STATUS_SUCCESS;
}

__attribute__((destructor)) static void stats_(void) {
    if (getenv("EMU_STATS"))
        fprintf(stderr,
                "cuda-emu: %zu kernel launches, %zu GEMMs (%zu on bf16 operands; %zu by "
                "cublasLtMatmul after %zu heuristic queries; %zu queued on created streams), "
                "%zu bytes still allocated\n",
                launches_, gemms_, gemms_bf16_, lt_matmuls_, lt_queries_, deferred_, in_use_);
}
