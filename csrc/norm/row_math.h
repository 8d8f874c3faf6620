// The norm family's arithmetic, written once for the CPU kernels (V a GCC
// vector, one element per lane) and the CUDA bodies (V a scalar); norm_call.h
// states the formulas. Every operation is rounded on its own (arith.h), in
// the order written here, so both devices give the same bits. Where an
// element is kept or dropped, the caller selects between the two values:
// dropped elements are never multiplied by zero.
//
// RMSNorm is LayerNorm with the mean (and backward's row mean of dz) fixed
// at +0: s - (+0) is s, bit for bit, -0 and NaN included.
#pragma once

#include "arith.h"

namespace regdrop::norm {

// v = input [+ input_bias]
template <bool kInputBias, class V>
REGDROP_HOST_DEVICE V branch_value(V x, V input_bias) {
  if constexpr (kInputBias) {
    return add_rn(x, input_bias);
  } else {
    return x;
  }
}

// The residual stream where the element is kept; where it is dropped it is
// the residual (or +0 without one).
template <bool kResidual, class V>
REGDROP_HOST_DEVICE V kept_sum(V v, V residual, V scale) {
  if constexpr (kResidual) {
    return add_rn(residual, mul_rn(v, scale));
  } else {
    return mul_rn(v, scale);
  }
}

// (s - mean)^2, the variance's term (s^2 for RMSNorm, whose mean is +0).
template <class V>
REGDROP_HOST_DEVICE V squared_deviation(V s, V mean) {
  const V d = sub_rn(s, mean);
  return mul_rn(d, d);
}

template <class V>
REGDROP_HOST_DEVICE V normalized(V s, V mean, V rstd) {
  return mul_rn(sub_rn(s, mean), rstd);
}

// output = z * weight + bias
template <class V>
REGDROP_HOST_DEVICE V affine(V z, V weight, V bias) {
  return add_rn(mul_rn(z, weight), bias);
}

// A row's mean from its sum: sum / H, correctly rounded.
template <class C>
REGDROP_HOST_DEVICE C row_mean(C sum, int64_t hidden) {
  return div_rn(sum, static_cast<C>(hidden));
}

// 1 / sqrt(var + eps): each step correctly rounded (not rsqrt, which is
// approximate on both devices and differs between them).
template <class C>
REGDROP_HOST_DEVICE C inverse_std(C var, C eps) {
  return div_rn(C(1), sqrt_rn(add_rn(var, eps)));
}

// ds = rstd * ((dz - a) - z * b), a = row mean of dz (+0 for RMSNorm), b = row mean of dz * z.
template <class V>
REGDROP_HOST_DEVICE V sum_gradient(V dz, V z, V a, V b, V rstd) {
  return mul_rn(rstd, sub_rn(sub_rn(dz, a), mul_rn(z, b)));
}

}  // namespace regdrop::norm
