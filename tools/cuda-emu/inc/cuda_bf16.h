// cuda_bf16.h of the CUDA host emulator (tools/cuda-emu): the bits of __nv_bfloat16 that the
// backend uses. __float2bfloat16 and __float2bfloat16_rn round to nearest even like
// cvt.rn.bf16.f32 (NaN -> 0x7FFF).
#pragma once
#include <cstdint>
#include <cstring>

#include "cuda_runtime.h"

struct __nv_bfloat16 {
    unsigned short __x;
};

inline __nv_bfloat16 __float2bfloat16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    __nv_bfloat16 r;
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        r.__x = 0x7fff; // canonical NaN, as cvt.rn.bf16.f32
        return r;
    }
    u += 0x7fffu + ((u >> 16) & 1u);
    r.__x = (unsigned short)(u >> 16);
    return r;
}

inline float __bfloat162float(__nv_bfloat16 b) {
    uint32_t u = (uint32_t)b.__x << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    return __float2bfloat16(f);
}

inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 b) {
    return b.__x;
}
