// Arithmetic rounded at each operation, the same bits on the host and on a
// CUDA device: what lets a CPU kernel and its CUDA twin agree bit for bit.
//
// On the host each is the plain operator (on a scalar, or on a GCC vector,
// one lane per element); the CPU kernels are compiled with -ffp-contract=off.
// On a GPU each is PTX with an explicit rounding mode and no .ftz, which
// ptxas never fuses into an FMA nor flushes to zero, whatever nvcc's --fmad,
// --ftz or -use_fast_math say (.ci/sass_gate.py refuses FFMA, DFMA and .FTZ
// in every kernel, and CI builds the kernels with -use_fast_math to show it).
// The intrinsics __fadd_rn and friends would not do: under --ftz=true they
// flush subnormals.
#pragma once

#include "philox.h"  // REGDROP_HOST_DEVICE

namespace regdrop {

template <class V>
REGDROP_HOST_DEVICE V mul_rn(V a, V b) {
#if defined(__CUDA_ARCH__)
  V d;
  if constexpr (sizeof(V) == 8) {
    asm("mul.rn.f64 %0, %1, %2;" : "=d"(d) : "d"(a), "d"(b));
  } else {
    asm("mul.rn.f32 %0, %1, %2;" : "=f"(d) : "f"(a), "f"(b));
  }
  return d;
#else
  return a * b;
#endif
}

template <class V>
REGDROP_HOST_DEVICE V add_rn(V a, V b) {
#if defined(__CUDA_ARCH__)
  V d;
  if constexpr (sizeof(V) == 8) {
    asm("add.rn.f64 %0, %1, %2;" : "=d"(d) : "d"(a), "d"(b));
  } else {
    asm("add.rn.f32 %0, %1, %2;" : "=f"(d) : "f"(a), "f"(b));
  }
  return d;
#else
  return a + b;
#endif
}

template <class V>
REGDROP_HOST_DEVICE V sub_rn(V a, V b) {
#if defined(__CUDA_ARCH__)
  V d;
  if constexpr (sizeof(V) == 8) {
    asm("sub.rn.f64 %0, %1, %2;" : "=d"(d) : "d"(a), "d"(b));
  } else {
    asm("sub.rn.f32 %0, %1, %2;" : "=f"(d) : "f"(a), "f"(b));
  }
  return d;
#else
  return a - b;
#endif
}

// float <-> double. On a GPU, PTX without .ftz: nvcc's own conversions flush
// a subnormal float under --ftz=true, and may move a comparison of the
// double back onto the float, with .FTZ too.
REGDROP_HOST_DEVICE double to_double(double d) { return d; }

REGDROP_HOST_DEVICE double to_double(float f) {
#if defined(__CUDA_ARCH__)
  double d;
  asm("cvt.f64.f32 %0, %1;" : "=d"(d) : "f"(f));
  return d;
#else
  return static_cast<double>(f);
#endif
}

// double -> C (float or double), rounded to nearest even.
template <class C>
REGDROP_HOST_DEVICE C from_double(double d) {
  if constexpr (sizeof(C) == 8) {
    return d;
  } else {
#if defined(__CUDA_ARCH__)
    float f;
    asm("cvt.rn.f32.f64 %0, %1;" : "=f"(f) : "d"(d));
    return f;
#else
    return static_cast<float>(d);
#endif
  }
}

}  // namespace regdrop
