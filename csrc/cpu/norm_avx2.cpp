// The CPU norm kernels (norm_kernels.h) for x86-64 CPUs with AVX2, FMA and F16C (Haswell, Zen).
#include "norm_isa.h"

#if defined(__x86_64__)
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC target("avx2,fma,f16c")
#endif

#define REGDROP_CPU_ISA avx2
#define REGDROP_ISA_AVX2
#include "norm_kernels.h"

#if defined(__clang__)
#pragma clang attribute pop
#endif
#endif
