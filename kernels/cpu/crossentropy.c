// CPU kernels: token cross-entropy over the full padded vocabulary, forward and fused
// forward + backward. Max-subtracted softmax, sums in double; rows with target < 0 have no
// loss and no gradient. The returned total is summed in a fixed order (thread-count free).
#include "kernels/kernels.h"

#include <math.h>
#include <string.h>

#include "kernels/cpu/simd_math.h"

// Loops over fewer elements than this run on the calling thread: waking the team costs more
// than it saves, and on a loaded machine a barrier can wait a whole time slice for a thread.
#define PAR_MIN 65536

// The rows are cut into a fixed number of chunks; each chunk sums its losses in row order and
// the chunk sums are added in order, so the total does not depend on the thread count.
#define CE_CHUNKS 256

// Loss of one row; with dl non-NULL also writes dl = scale * (softmax - onehot). dl may alias
// logits: the target logit is read before anything is written.
// logits, dl are (V)
static double ce_row_(float *dl, const float *logits, int target, int V, float scale) {
    if (target < 0) {
        if (dl) memset(dl, 0, (size_t)V * sizeof(float));
        return 0.0;
    }
    const float xt = logits[target];
    float m = logits[0];
#pragma omp simd reduction(max : m)
    for (int i = 1; i < V; i++) m = logits[i] > m ? logits[i] : m;
    double sum = 0.0;
    if (dl) {
        // unnormalised probabilities into dl, summed alongside (the order of the SIMD
        // reduction is fixed by the build: runs stay bitwise reproducible)
#pragma omp simd reduction(+ : sum)
        for (int i = 0; i < V; i++) {
            const float e = expf(logits[i] - m);
            dl[i] = e;
            sum += e;
        }
        const float k = (float)(scale / sum);
#pragma omp simd
        for (int i = 0; i < V; i++) dl[i] *= k;
        dl[target] -= scale;
    } else {
#pragma omp simd reduction(+ : sum)
        for (int i = 0; i < V; i++) sum += expf(logits[i] - m);
    }
    return (double)m + log(sum) - (double)xt;
}

static double ce_rows_(float *dlogits, float *losses, const float *logits, const int32_t *targets,
                       int N, int V, float scale) {
    double part[CE_CHUNKS];
#pragma omp parallel for schedule(dynamic, 1) if ((size_t)N * V >= PAR_MIN)
    for (int c = 0; c < CE_CHUNKS; c++) {
        const int i0 = (int)((int64_t)N * c / CE_CHUNKS);
        const int i1 = (int)((int64_t)N * (c + 1) / CE_CHUNKS);
        double s = 0.0;
        for (int i = i0; i < i1; i++) {
            const size_t o = (size_t)i * V;
            const double l =
                ce_row_(dlogits ? dlogits + o : NULL, logits + o, targets[i], V, scale);
            if (losses) losses[i] = (float)l;
            s += l;
        }
        part[c] = s;
    }
    double total = 0.0;
    for (int c = 0; c < CE_CHUNKS; c++) total += part[c];
    return total;
}

// losses is (N), logits is (N,V), targets is (N)
double crossentropy_forward(float *losses, const float *logits, const int32_t *targets, int N,
                            int V) {
    return ce_rows_(NULL, losses, logits, targets, N, V, 1.0f);
}

// dlogits is (N,V) and may alias logits; losses is (N), targets is (N)
double crossentropy_forward_backward(float *dlogits, float *losses, const float *logits,
                                     const int32_t *targets, int N, int V, float scale) {
    return ce_rows_(dlogits, losses, logits, targets, N, V, scale);
}
