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
// sqrt and division are correctly rounded on both: x86's sqrtss/divss and
// the device's __fsqrt_rn/__fdiv_rn (not the approximate sqrtf / '/' of
// -use_fast_math, and not rsqrt, which is approximate on both).
#pragma once

#include <cmath>

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

template <class V>
REGDROP_HOST_DEVICE V div_rn(V a, V b) {
#if defined(__CUDA_ARCH__)
  if constexpr (sizeof(V) == 4) {
    return __fdiv_rn(a, b);
  } else {
    return __ddiv_rn(a, b);
  }
#else
  return a / b;
#endif
}

template <class V>
REGDROP_HOST_DEVICE V sqrt_rn(V a) {
#if defined(__CUDA_ARCH__)
  if constexpr (sizeof(V) == 4) {
    return __fsqrt_rn(a);
  } else {
    return __dsqrt_rn(a);
  }
#else
  return std::sqrt(a);
#endif
}

}  // namespace regdrop::norm
