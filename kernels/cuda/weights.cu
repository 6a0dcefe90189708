// weights.cu: the bf16 copy of the model's parameters that the GEMMs on bf16 operands read
// (cuda_set_weight_copy).
//
// In bf16 mode every GEMM op converts its fp32 operands to bf16 (gemm.cu). The weights do not
// change between two optimizer steps, yet each op converted them again: in training twice per
// step (forward, and again for dinp), the LM head's once per chunk of rows each time, 6.65 G
// values per step of bench-gpu-olmoe; in `moet generate` once per decoded token, which
// doubles the weight traffic of a memory-bound step. Here the backend keeps one bf16 copy of the
// parameters the model registers (Ops.params_register: m->params), cut into blocks of WBLOCK
// floats with one valid flag each on the host (kernels/weight_blocks.h):
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
#include "kernels/weight_blocks.h"

static int copy_setting_ = -1;      // 1 on, 0 off, -1: not yet read from MOET_CUDA_WEIGHT_COPY
static WeightBlocks wb_ = {0};      // the registered parameters and the copy's valid blocks
static __nv_bfloat16 *copy_ = NULL; // their bf16 copy, allocated at its first use

static int copy_from_env_(void) {
    return kernels_env_switch(
        "MOET_CUDA_WEIGHT_COPY", "1", "0",
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
    copy_ = NULL;
    wblocks_clear(&wb_);
}

void cuda_weights_register(const float *p, size_t n) {
    forget_();
    if (p && n > 0 && cuda_weight_copy()) wblocks_set(&wb_, p, n);
}

void cuda_weights_freed(const void *p) {
    if (p && p == (const void *)wb_.base) forget_();
}

size_t cuda_weight_copy_bytes(void) {
    return copy_ ? wb_.n * sizeof(__nv_bfloat16) : 0;
}

void cuda_weights_written(const void *p, size_t bytes) {
    wblocks_written(&wb_, p, bytes);
}

const __nv_bfloat16 *weights_copy_(const float *w, size_t n) {
    size_t i;
    if (!gemm_bf16_operands_() || !wblocks_range(&wb_, w, n, &i)) return NULL;
    if (!copy_) copy_ = (__nv_bfloat16 *)cuda_malloc(wb_.n * sizeof(__nv_bfloat16));
    return copy_ + i;
}

void weights_copy_ensure_(const float *w, size_t n) {
    size_t i;
    if (n == 0 || !copy_ || !wblocks_range(&wb_, w, n, &i)) return;
    size_t b = i / WBLOCK, f0, f1;
    while (wblocks_next_stale(&wb_, i, n, &b, &f0, &f1)) { // a run of stale blocks: one launch
        f32_to_bf16_rn_(copy_ + f0, wb_.base + f0, f1 - f0);
        cuda_host_stats_acc_()->weight_converted += f1 - f0;
    }
}

__nv_bfloat16 *weights_copy_for_update_(const float *p, size_t n) {
    size_t i;
    if (n == 0 || !copy_ || !wblocks_range(&wb_, p, n, &i)) {
        cuda_weights_written(p, n * sizeof(float)); // a part outside the copy's reach
        return NULL;
    }
    // the blocks covered whole get every value new: valid from now on, whatever they were;
    // those covered in part keep their state (the rest of them is unchanged)
    const size_t b0 = (i + WBLOCK - 1) / WBLOCK;
    size_t b1 = (i + n) / WBLOCK;         // past the last covered whole
    if (i + n == wb_.n) b1 = wb_.nblocks; // the last block is short
    if (b1 > b0) memset(wb_.valid + b0, 1, b1 - b0);
    return copy_ + i;
}
