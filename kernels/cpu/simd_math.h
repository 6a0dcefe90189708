// simd_math: the SIMD variants of expf in glibc's libmvec (_ZGVeN16v_expf with AVX-512,
// _ZGVdN8v_expf with AVX2, ...), declared for the loops of kernels/cpu that run under
// `#pragma omp simd`: glibc's <math.h> declares them under -ffast-math only, and this takes
// the vector exponentials without -ffast-math's other licences. libmvec's expf is within a few
// ulp of the scalar one; the order of a SIMD reduction is fixed by the build, so runs stay
// bitwise reproducible. (The vocabulary-wide exponentials of the cross-entropy were 12 % of a
// bench-cpu-moe training step in scalar expf.)
#pragma once
#include <math.h>

#pragma omp declare simd notinbranch
float expf(float x);
