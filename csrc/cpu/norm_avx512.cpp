// The CPU norm kernels (norm_kernels.h) for x86-64 CPUs with AVX-512 F/BW/VL/DQ (Skylake-SP, Zen 4),
// the set PyTorch itself requires for its AVX512 kernels.
#include "norm_isa.h"

#if defined(__x86_64__)
// GCC 12 warns inside its own AVX-512 intrinsics (_mm512_undefined_epi32, GCC bug 105593).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
#endif

#define REGDROP_CPU_ISA avx512
#define REGDROP_ISA_AVX512
#include "norm_kernels.h"

#if defined(__clang__)
#pragma clang attribute pop
#endif
#endif
