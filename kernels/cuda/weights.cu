// weights.cu: the bf16 copy of the model's parameters that the GEMMs on bf16 operands read
// (cuda_set_weight_copy).
//
// In bf16 mode every GEMM op converts its fp32 operands to bf16 (gemm.cu). The weights do not
// change between two optimizer steps, yet each op converted them again: in training twice per
// step (forward, and again for dinp), the LM head's once per chunk of rows each time, 6.65 G
// values per step of bench-gpu-olmoe; in `moet generate` once per decoded token, which
// doubles the weight traffic of a memory-bound step. Here the backend keeps one bf16 copy of the
// parameters the model registers (Ops.params_register: m->params), cut into blocks of WCOPY_BLOCK
// floats with one valid flag each on the host:
//   - a GEMM whose weight lies in the registered range converts those of its blocks that are not
//     valid (only the experts with rows), marks them valid and reads the copy
//     (weights_copy_ensure_);
//   - cuda_adamw_update on the parameters writes the copy too, from the same new values: the
//     blocks it covers whole become valid, and the copy needs no conversion after a step;
//   - every other write into the range through the op table (to_device, copy, zero, zero_fill,
//     scale_inplace, see ops_cuda.cu) or announced by the caller (Ops.params_written, after a
//     collective wrote into them) marks the blocks it touches not valid.
// The copy holds the values the per-call conversion made (f32_to_bf16_rn_, round to nearest
// even), so the GEMMs compute the same products; only the chunking of gemm.cu's ops changes
// (the weights no longer take workspace), which may change the summation order of a weight
// gradient summed over pieces of rows. Cost: 2 bytes per parameter of device memory
// (bench-gpu-olmoe: 3.5 GiB), and AdamW writes 2 more bytes per parameter. A/B switch:
// MOET_CUDA_WEIGHT_COPY=0 (read at the first registration) converts the weights in every op,
// as before 2026-11-27.
#include <cuda_runtime.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/cuda/cublas_util.cuh"
#include "kernels/cuda/kernels_cuda.h"

// 65536 floats (256 KiB, 128 KiB of bf16): fine enough that the few floats of a small write
// (the experts' bias, written every step with aux-loss-free balancing) cost one block's
// conversion, coarse enough that the flags of 7 G parameters take 105 KiB of host memory.
enum { WCOPY_BLOCK = 1 << 16 };

static int copy_setting_ = -1;       // 1 on, 0 off, -1: not yet read from MOET_CUDA_WEIGHT_COPY
static const float *base_ = NULL;    // the registered parameters
static size_t n_ = 0;                // their count
static __nv_bfloat16 *copy_ = NULL;  // their bf16 copy, allocated at its first use
static unsigned char *valid_ = NULL; // per block: 1 when copy_ holds bf16(base_) there
static size_t nblocks_ = 0;

static int copy_from_env_(void) {
    return env_switch_("MOET_CUDA_WEIGHT_COPY", "1", "0",
                       "the bf16-operand GEMMs convert their weights in every op (no bf16 copy "
                       "of the parameters)",
                       "the GEMMs with their weights converted in every op");
}

void cuda_set_weight_copy(int on) {
    copy_setting_ = on < 0 ? copy_from_env_() : on != 0;
}

int cuda_weight_copy(void) {
    if (copy_setting_ < 0) copy_setting_ = copy_from_env_();
    return copy_setting_;
}

static void forget_(void) {
    if (copy_) {
        CUDA_CHECK(cudaDeviceSynchronize()); // GEMMs queued on side streams may still read it
        cuda_free(copy_);
    }
    free(valid_);
    base_ = NULL;
    n_ = 0;
    copy_ = NULL;
    valid_ = NULL;
    nblocks_ = 0;
}

void cuda_weights_register(const float *p, size_t n) {
    forget_();
    if (!p || n == 0 || !cuda_weight_copy()) return;
    base_ = p;
    n_ = n;
    nblocks_ = (n + WCOPY_BLOCK - 1) / WCOPY_BLOCK;
    valid_ = (unsigned char *)calloc(nblocks_, 1);
    if (!valid_) {
        fprintf(stderr, "moet: fatal: out of host memory for the weight copy's flags\n");
        exit(EXIT_FAILURE);
    }
}

void cuda_weights_freed(const void *p) {
    if (p && p == (const void *)base_) forget_();
}

size_t cuda_weight_copy_bytes(void) {
    return copy_ ? n_ * sizeof(__nv_bfloat16) : 0;
}

void cuda_weights_written(const void *p, size_t bytes) {
    if (!base_ || bytes == 0) return;
    const char *lo = (const char *)base_, *hi = lo + n_ * sizeof(float);
    const char *a = (const char *)p, *b = a + bytes;
    if (b <= lo || a >= hi) return;
    if (a < lo) a = lo;
    if (b > hi) b = hi;
    const size_t f0 = (size_t)(a - lo) / sizeof(float);                       // first float touched
    const size_t f1 = ((size_t)(b - lo) + sizeof(float) - 1) / sizeof(float); // past the last
    memset(valid_ + f0 / WCOPY_BLOCK, 0, (f1 - 1) / WCOPY_BLOCK - f0 / WCOPY_BLOCK + 1);
}

// The floats [i, i + n) of the registered parameters, when w lies there whole.
static int range_(const float *w, size_t n, size_t *i) {
    if (!base_ || w < base_ || w >= base_ + n_ || n > n_ - (size_t)(w - base_)) return 0;
    *i = (size_t)(w - base_);
    return 1;
}

const __nv_bfloat16 *weights_copy_(const float *w, size_t n) {
    size_t i;
    if (!gemm_bf16_operands_() || !range_(w, n, &i)) return NULL;
    if (!copy_) copy_ = (__nv_bfloat16 *)cuda_malloc(n_ * sizeof(__nv_bfloat16));
    return copy_ + i;
}

void weights_copy_ensure_(const float *w, size_t n) {
    size_t i;
    if (n == 0 || !copy_ || !range_(w, n, &i)) return;
    const size_t b1 = (i + n - 1) / WCOPY_BLOCK;
    for (size_t b = i / WCOPY_BLOCK; b <= b1;) {
        if (valid_[b]) {
            b++;
            continue;
        }
        size_t e = b + 1; // a run of blocks that are not valid: one launch
        while (e <= b1 && !valid_[e]) e++;
        const size_t f0 = b * WCOPY_BLOCK, f1 = e * WCOPY_BLOCK < n_ ? e * WCOPY_BLOCK : n_;
        f32_to_bf16_rn_(copy_ + f0, base_ + f0, f1 - f0);
        cuda_host_stats_acc_()->weight_converted += f1 - f0;
        memset(valid_ + b, 1, e - b);
        b = e;
    }
}

__nv_bfloat16 *weights_copy_for_update_(const float *p, size_t n) {
    size_t i;
    if (n == 0 || !copy_ || !range_(p, n, &i)) {
        cuda_weights_written(p, n * sizeof(float)); // a part outside the copy's reach
        return NULL;
    }
    // the blocks covered whole get every value new: valid from now on, whatever they were;
    // those covered in part keep their state (the rest of them is unchanged)
    const size_t b0 = (i + WCOPY_BLOCK - 1) / WCOPY_BLOCK;
    size_t b1 = (i + n) / WCOPY_BLOCK; // past the last covered whole
    if (i + n == n_) b1 = nblocks_;    // the last block is short
    if (b1 > b0) memset(valid_ + b0, 1, b1 - b0);
    return copy_ + i;
}
