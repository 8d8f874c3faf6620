// The norm family's arithmetic, written once for the CPU kernels (V a GCC
// vector, one element per lane) and the CUDA bodies (V a scalar); norm_call.h
// states the formulas. Every operation is rounded on its own (rounding.h), in
// the order written here, so both devices give the same bits. Where an
// element is kept or dropped, the caller selects between the two values:
// dropped elements are never multiplied by zero.
//
// RMSNorm is LayerNorm with the mean (and backward's row mean of dz) fixed
// at +0: s - (+0) is s, bit for bit, -0 and NaN included.
#pragma once

#include <cstdint>

#include "../rounding.h"

namespace regdrop::norm {

// norm::add_rn and the others: callers in other namespaces name them so.
using regdrop::add_rn;
using regdrop::mul_rn;
using regdrop::sub_rn;

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

// A row's mean from its sum: sum * (1 / H), the inverse rounded once from
// double on the host (inverse_hidden), so that no device divides.
template <class C>
REGDROP_HOST_DEVICE C row_mean(C sum, C inverse_hidden) {
  return mul_rn(sum, inverse_hidden);
}

template <class C>
inline C inverse_hidden(int64_t hidden) {
  return static_cast<C>(1.0 / static_cast<double>(hidden));
}

REGDROP_HOST_DEVICE double double_from_bits64(uint64_t bits) {
#if defined(__CUDA_ARCH__)
  return __longlong_as_double(static_cast<long long>(bits));
#else
  double d;
  __builtin_memcpy(&d, &bits, 8);
  return d;
#endif
}

REGDROP_HOST_DEVICE uint64_t double_bits64(double d) {
#if defined(__CUDA_ARCH__)
  return static_cast<uint64_t>(__double_as_longlong(d));
#else
  uint64_t bits;
  __builtin_memcpy(&bits, &d, 8);
  return bits;
#endif
}

// 1 / sqrt(x) in double: the bit-level estimate (exponent halved, within
// 3.5%), then four Newton steps y *= 1.5 - (x / 2) y^2, each operation
// rounded once, to a relative error of about 2^-52: the same bits on the
// host and on a device, which a correctly rounded sqrt and division would
// give only through slow-path subroutines on the device. 0 gives +inf,
// +inf gives 0, negative values and NaN give NaN.
REGDROP_HOST_DEVICE double inverse_sqrt(double x) {
  if (!(x > 0.0)) return x == 0.0 ? double_from_bits64(0x7FF0000000000000ull) : double_from_bits64(0x7FF8000000000000ull);
  if (x == double_from_bits64(0x7FF0000000000000ull)) return 0.0;
  const double half = mul_rn(x, 0.5);
  double y = double_from_bits64(0x5FE6EB50C7B537A9ull - (double_bits64(x) >> 1));
#pragma unroll
  for (int step = 0; step < 4; ++step) y = mul_rn(y, sub_rn(1.5, mul_rn(mul_rn(half, y), y)));
  return y;
}

// rstd = 1 / sqrt(var + eps), rounded once to the compute type. A LayerNorm
// variance that overflows (a finite row such as [1, 1e30] in float32) gives
// NaN, as torch's layer_norm does, rather than rstd 0, which would quietly
// turn the row into its bias; an RMSNorm mean square that overflows gives 0,
// as torch's rms_norm does (its finite elements normalize to zeros). An
// infinite eps over a finite variance gives rstd 0 for both: the row is its
// bias, as torch gives it.
template <class C>
REGDROP_HOST_DEVICE C inverse_std(C var, C eps, bool layer) {
  const double sum = to_double(add_rn(var, eps));
  if (layer && to_double(var) == double_from_bits64(0x7FF0000000000000ull)) {
    return from_double<C>(double_from_bits64(0x7FF8000000000000ull));
  }
  return from_double<C>(inverse_sqrt(sum));
}

// ds = rstd * ((dz - a) - z * b), a = row mean of dz (+0 for RMSNorm), b = row mean of dz * z.
template <class V>
REGDROP_HOST_DEVICE V sum_gradient(V dz, V z, V a, V b, V rstd) {
  return mul_rn(rstd, sub_rn(sub_rn(dz, a), mul_rn(z, b)));
}

}  // namespace regdrop::norm
