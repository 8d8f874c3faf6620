// What a kernel writes for one element: kept_value() where the element is
// kept, dropped_value() where it is dropped. Shared by the CPU kernels (V a
// GCC vector, one value per lane, selected with a bit mask) and the CUDA
// kernels (V a scalar, selected with `keep ? kept : dropped`).
//
// Dropped elements are selected, never multiplied by zero: a dropped NaN or
// Inf becomes exactly 0 (or exactly the residual), so the output agrees with
// the mask bits and p == 1 can never produce 0 * inf.
//
// Every product and sum is rounded on its own (mul_rn, add_rn), so both
// devices give the bits of IEEE arithmetic rounded at each step. On the host
// that is the plain operator: the CPU kernels are compiled with
// -ffp-contract=off. On a GPU it is PTX with an explicit rounding mode and
// no .ftz, which ptxas never fuses into an FMA nor flushes, whatever nvcc's
// --fmad, --ftz or -use_fast_math say (.ci/sass_gate.py refuses FFMA, DFMA
// and .FTZ in every kernel).
#pragma once

#include "kernel_call.h"

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

template <Epilogue E, class V>
REGDROP_HOST_DEVICE V kept_value(V x, V residual, V bias, V scale) {
  if constexpr (E == Epilogue::Scale) {
    return mul_rn(x, scale);
  } else if constexpr (E == Epilogue::AddResidual) {
    return add_rn(residual, mul_rn(x, scale));
  } else {
    return add_rn(residual, mul_rn(add_rn(x, bias), scale));
  }
}

template <Epilogue E, class V>
REGDROP_HOST_DEVICE V dropped_value(V residual) {
  if constexpr (E == Epilogue::Scale) {
    return V{};
  } else {
    return residual;
  }
}

}  // namespace regdrop
