// CPU kernels: rotary position embedding, rotate-half layout (HF convention): for i < Dh/2,
// the pair (x_i, x_{i+Dh/2}) is rotated by the angle t * theta^(-2i/Dh), t = position in the
// sequence. Angles, cos and sin in double (exact to fp32), once per (t, i) for all B and H.
#include "kernels/kernels.h"

#include <math.h>

// Loops over fewer elements than this run on the calling thread: waking the team costs more
// than it saves, and on a loaded machine a barrier can wait a whole time slice for a thread.
#define PAR_MIN 65536

// Rotates every (b, t, h) row of src by +angle (dir = 1, forward) or -angle (dir = -1, the
// transpose, backward): dst = R src. Both elements of a pair are read before either is
// written, so dst may alias src.
// Per position t the cos and sin of ROPE_CHUNK pairs go into small arrays first; then every
// (b, h) row takes them in a loop over consecutive pairs, which vectorizes (a loop over the
// rows for one pair at a time, stride Dh, did not: 13-15 GB/s).
// Row t is at position pos0 + t. dst, src are (B,T,H,Dh)
enum { ROPE_CHUNK = 64 };

static void rope_apply_(float *dst, const float *src, int B, int T, int H, int Dh, float theta,
                        float dir, int pos0) {
    const int half = Dh / 2;
    const size_t ld = (size_t)H * Dh;
#pragma omp parallel for schedule(static) if ((size_t)B * T * H * Dh >= PAR_MIN)
    for (int t = 0; t < T; t++) {
        for (int i0 = 0; i0 < half; i0 += ROPE_CHUNK) {
            const int ni = half - i0 < ROPE_CHUNK ? half - i0 : ROPE_CHUNK;
            float c[ROPE_CHUNK], s[ROPE_CHUNK];
            for (int i = 0; i < ni; i++) {
                const double inv_freq = pow((double)theta, -2.0 * (i0 + i) / Dh);
                const double ang = (double)(pos0 + t) * inv_freq;
                c[i] = (float)cos(ang);
                s[i] = dir * (float)sin(ang);
            }
            for (int b = 0; b < B; b++) {
                for (int h = 0; h < H; h++) {
                    const size_t o = ((size_t)b * T + t) * ld + (size_t)h * Dh + (size_t)i0;
                    const float *x1 = src + o, *x2 = src + o + half;
                    float *y1 = dst + o, *y2 = dst + o + half;
#pragma omp simd
                    for (int i = 0; i < ni; i++) {
                        const float a = x1[i], e = x2[i];
                        y1[i] = a * c[i] - e * s[i];
                        y2[i] = e * c[i] + a * s[i];
                    }
                }
            }
        }
    }
}

// out, inp are (B,T,H,Dh) and may be the same buffer
void rope_forward(float *out, const float *inp, int B, int T, int H, int Dh, float theta) {
    rope_apply_(out, inp, B, T, H, Dh, theta, 1.0f, 0);
}

void rope_forward_at(float *out, const float *inp, int T, int H, int Dh, float theta, int pos0) {
    rope_apply_(out, inp, 1, T, H, Dh, theta, 1.0f, pos0);
}

// The rotation is orthogonal: dinp = R^T dout = R(-angle) dout (written, not accumulated).
// dinp, dout are (B,T,H,Dh) and may be the same buffer
void rope_backward(float *dinp, const float *dout, int B, int T, int H, int Dh, float theta) {
    if (!dinp) return;
    rope_apply_(dinp, dout, B, T, H, Dh, theta, -1.0f, 0);
}
