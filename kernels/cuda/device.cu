// device.cu: device discovery and selection for the CUDA backend, and the device memory
// helpers. cuda_device_count is safe on machines without a driver or GPU (it returns 0), so
// that callers and tests can fall back to the CPU backend or skip.
#include <string.h>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/kernels_cuda.h"

int cuda_device_count(void) {
    int n = 0;
    const cudaError_t e = cudaGetDeviceCount(&n);
    if (e == cudaSuccess) return n;
    (void)cudaGetLastError(); // leave no error behind for the next call to report
    // No driver (CPU-only machines, containers without the GPU mounted) or no device visible
    // (CUDA_VISIBLE_DEVICES="") are normal; anything else deserves a note.
    if (e != cudaErrorNoDevice && e != cudaErrorInsufficientDriver)
        fprintf(stderr, "moet: note: no usable CUDA device: cudaGetDeviceCount: %s (%s)\n",
                cudaGetErrorName(e), cudaGetErrorString(e));
    return 0;
}

// A kernel compiled like every other one in the backend: asking for its attributes fails
// when the build has no code for the device's architecture.
static __global__ void probe_kernel_(void) {}

int cuda_init(int device, char *info, int infolen) {
    const int n = cuda_device_count();
    if (n == 0)
        return cuda_errf_(info, infolen,
                          "no CUDA device found (no NVIDIA driver, no GPU, or "
                          "CUDA_VISIBLE_DEVICES is empty)\n---> HINT: run on the CPU backend, "
                          "or check nvidia-smi");
    if (device < 0 || device >= n)
        return cuda_errf_(info, infolen,
                          "CUDA device %d does not exist: this process sees %d "
                          "device%s (0..%d)\n---> HINT: check CUDA_VISIBLE_DEVICES and the "
                          "device number",
                          device, n, n == 1 ? "" : "s", n - 1);
    CUDA_TRY(cudaSetDevice(device), info, infolen);
    cudaDeviceProp prop;
    CUDA_TRY(cudaGetDeviceProperties(&prop, device), info, infolen);
    if (prop.major < 8)
        return cuda_errf_(info, infolen,
                          "CUDA device %d (%s) has compute capability %d.%d; "
                          "moet needs 8.0 or newer (bf16 tensor cores: A100, H100 and later)"
                          "\n---> HINT: pick another device or run on the CPU backend",
                          device, prop.name, prop.major, prop.minor);
    cudaFuncAttributes fa;
    const cudaError_t e = cudaFuncGetAttributes(&fa, probe_kernel_);
    if (e != cudaSuccess) {
        (void)cudaGetLastError();
        return cuda_errf_(info, infolen,
                          "CUDA device %d (%s, sm_%d%d): this build has no code "
                          "for it: %s (%s)\n---> HINT: reconfigure with "
                          "-DCMAKE_CUDA_ARCHITECTURES=%d%d and rebuild",
                          device, prop.name, prop.major, prop.minor, cudaGetErrorName(e),
                          cudaGetErrorString(e), prop.major, prop.minor);
    }
    size_t free_b = 0, total_b = 0;
    CUDA_TRY(cudaMemGetInfo(&free_b, &total_b), info, infolen);
    int drv = 0, rt = 0;
    CUDA_TRY(cudaDriverGetVersion(&drv), info, infolen);
    CUDA_TRY(cudaRuntimeGetVersion(&rt), info, infolen);
    const double gib = 1024.0 * 1024.0 * 1024.0;
    char line[512];
    snprintf(line, sizeof line,
             "cuda:%d %s, sm_%d%d, %d SMs, %.1f GiB (%.1f GiB free), driver "
             "%d.%d, runtime %d.%d",
             device, prop.name, prop.major, prop.minor, prop.multiProcessorCount,
             (double)total_b / gib, (double)free_b / gib, drv / 1000, (drv % 1000) / 10, rt / 1000,
             (rt % 1000) / 10);
    if (info && infolen > 0)
        snprintf(info, (size_t)infolen, "%s", line);
    else
        fprintf(stderr, "moet: %s\n", line);
    return 0;
}

// ---------------------------------------------------------------------------------------
// Host-side accounting (kernels_cuda.h): one set of counters for the process, as there is one
// host thread driving the device.
static CudaHostStats host_stats_;

CudaHostStats *cuda_host_stats_acc_(void) {
    return &host_stats_;
}

void cuda_host_stats(CudaHostStats *s) {
    *s = host_stats_;
}

void cuda_host_stats_reset(void) {
    memset(&host_stats_, 0, sizeof host_stats_);
}

// Counts the host time since t0 (cuda_host_now_) as waiting for the device.
static void add_wait_(double t0) {
    host_stats_.wait_s += cuda_host_now_() - t0;
}

void cuda_synchronize(void) {
    const double t0 = cuda_host_now_();
    CUDA_CHECK(cudaDeviceSynchronize());
    add_wait_(t0);
}

// ---------------------------------------------------------------------------------------
// Timing marks (Ops.mark / mark_ms, for kernels/cpu/ops_profile.c): one event per mark number,
// recorded on the legacy stream, where every op runs and where the side streams of the expert
// GEMMs join before their op returns. The events are created on first use and kept.
static cudaEvent_t *marks_;
static int n_marks_;

void cuda_mark(int i) {
    if (i >= n_marks_) {
        int n = n_marks_ ? n_marks_ : 1024;
        while (n <= i) n *= 2;
        cudaEvent_t *m = (cudaEvent_t *)realloc(marks_, (size_t)n * sizeof *m);
        if (!m) {
            fprintf(stderr, "moet: fatal: cuda_mark: out of host memory\n");
            exit(EXIT_FAILURE);
        }
        for (int j = n_marks_; j < n; j++)
            CUDA_CHECK(cudaEventCreateWithFlags(&m[j], cudaEventDefault));
        marks_ = m;
        n_marks_ = n;
    }
    CUDA_CHECK(cudaEventRecord(marks_[i], 0));
}

double cuda_mark_ms(int i, int j) {
    const double t0 = cuda_host_now_();
    CUDA_CHECK(cudaEventSynchronize(marks_[j]));
    add_wait_(t0);
    float ms = 0.0f;
    CUDA_CHECK(cudaEventElapsedTime(&ms, marks_[i], marks_[j]));
    return (double)ms;
}

// ---------------------------------------------------------------------------------------
// Device memory
// Bytes handed out by cuda_malloc and not yet freed (for `moet bench` and the logs). The live
// allocations sit in a small table searched linearly: the backend makes a few hundred at most,
// at set-up, so the search costs nothing that matters.
enum { MEM_SLOTS = 4096 };
static void *mem_ptr_[MEM_SLOTS];
static size_t mem_size_[MEM_SLOTS];
static size_t mem_in_use_, mem_peak_;

static void mem_track_(void *p, size_t bytes) {
    for (int i = 0; i < MEM_SLOTS; i++)
        if (!mem_ptr_[i]) {
            mem_ptr_[i] = p;
            mem_size_[i] = bytes;
            mem_in_use_ += bytes;
            if (mem_in_use_ > mem_peak_) mem_peak_ = mem_in_use_;
            return;
        }
    // a full table only leaves this allocation out of the accounting, never stops the program
}

static void mem_untrack_(void *p) {
    for (int i = 0; i < MEM_SLOTS; i++)
        if (mem_ptr_[i] == p) {
            mem_in_use_ -= mem_size_[i];
            mem_ptr_[i] = NULL;
            mem_size_[i] = 0;
            return;
        }
}

void cuda_mem_stats(size_t *in_use, size_t *peak) {
    if (in_use) *in_use = mem_in_use_;
    if (peak) *peak = mem_peak_;
}

void cuda_mem_reset_peak(void) { mem_peak_ = mem_in_use_; }

void *cuda_malloc(size_t bytes) {
    void *p = NULL;
    const cudaError_t e = cudaMalloc(&p, bytes ? bytes : 256);
    if (e != cudaSuccess) {
        size_t free_b = 0, total_b = 0;
        (void)cudaGetLastError();
        if (cudaMemGetInfo(&free_b, &total_b) != cudaSuccess) (void)cudaGetLastError();
        fprintf(stderr,
                "moet: fatal: cudaMalloc of %zu bytes (%.2f GiB) failed; %.2f GiB of "
                "%.2f GiB free\n",
                bytes, (double)bytes / (1 << 30), (double)free_b / (1 << 30),
                (double)total_b / (1 << 30));
        cuda_check_(e, "cudaMalloc", __FILE__, __LINE__);
    }
    mem_track_(p, bytes ? bytes : 256);
    return p;
}

void cuda_free(void *dptr) {
    if (!dptr) return;
    mem_untrack_(dptr);
    CUDA_CHECK(cudaFree(dptr));
}

void cuda_zero(void *dptr, size_t bytes) {
    if (bytes) CUDA_CHECK(cudaMemset(dptr, 0, bytes));
}

// From pageable host memory the copy starts after the ops before it ("API synchronization
// behavior" in the CUDA runtime docs), so its time counts as waiting too.
void cuda_memcpy_h2d(void *dst, const void *src, size_t bytes) {
    if (!bytes) return;
    const double t0 = cuda_host_now_();
    CUDA_CHECK(cudaMemcpy(dst, src, bytes, cudaMemcpyHostToDevice));
    add_wait_(t0);
}

void cuda_memcpy_d2d(void *dst, const void *src, size_t bytes) {
    if (bytes) CUDA_CHECK(cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToDevice));
}

// Waits for every op before it (the legacy default stream), so its time counts as waiting.
void cuda_memcpy_d2h(void *dst, const void *src, size_t bytes) {
    if (!bytes) return;
    const double t0 = cuda_host_now_();
    CUDA_CHECK(cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToHost));
    add_wait_(t0);
}
