// Explicitly rounded arithmetic for the norm family, the same bits on the
// host and on a CUDA device.
//
// The CPU kernels are compiled with -ffp-contract=off and the CUDA kernels
// with --fmad=false, so a * b + c is never fused there either; these
// functions say so at each use as well: on the device each is one
// correctly rounded instruction (__fadd_rn, __fmul_rn, ...), which nvcc
// never contracts, whatever the flags; on the host each is the plain IEEE
// operation. They are templates so that the CPU kernels can call them on
// GCC vectors (one lane per element) as the CUDA bodies call them on scalars.
//
// No division or square root: their correctly rounded device forms branch
// to slow-path subroutines (CALLs, and FMAs inside), and rsqrt is
// approximate and differs between devices. A row's mean multiplies by 1 / H
// (computed on the host, in double), and norm/row_math.h's inverse_sqrt
// is a Newton iteration of these four operations.
#pragma once

#include "../philox.h"  // REGDROP_HOST_DEVICE

namespace regdrop::norm {

template <class V>
REGDROP_HOST_DEVICE V add_rn(V a, V b) {
#if defined(__CUDA_ARCH__)
  if constexpr (sizeof(V) == 4) {
    return __fadd_rn(a, b);
  } else {
    return __dadd_rn(a, b);
  }
#else
  return a + b;
#endif
}

template <class V>
REGDROP_HOST_DEVICE V sub_rn(V a, V b) {
#if defined(__CUDA_ARCH__)
  if constexpr (sizeof(V) == 4) {
    return __fsub_rn(a, b);
  } else {
    return __dsub_rn(a, b);
  }
#else
  return a - b;
#endif
}

template <class V>
REGDROP_HOST_DEVICE V mul_rn(V a, V b) {
#if defined(__CUDA_ARCH__)
  if constexpr (sizeof(V) == 4) {
    return __fmul_rn(a, b);
  } else {
    return __dmul_rn(a, b);
  }
#else
  return a * b;
#endif
}

}  // namespace regdrop::norm
