// The few operations whose code differs between a CUDA GPU and the host that
// emulates it (tests/cuda_emulation): 128-bit memory access, bit casts,
// conversions to and from the 16-bit float types, and a 32-bit multiply-high.
// Everything else in the kernel bodies (thread_bodies.h) is the same source
// on both. Each host version is written to give the bits the GPU instruction
// gives, so the emulation checks the kernels' logic, not a look-alike.
#pragma once

#include <cstdint>
#include <cstring>

#include "../philox.h"  // REGDROP_HOST_DEVICE

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#else
#include <stdexcept>
#endif

namespace regdrop::cuda {

// ------------------------------------------------------------- 128-bit access

// 16 bytes from / to a 16-byte aligned address: one LDG.E.128 / STG.E.128.
// The host emulation refuses a misaligned address, which on a GPU would fault:
// the launch plan must never hand the vector path such a pointer.
REGDROP_HOST_DEVICE void load16(uint32_t* dst, const void* src) {
#if defined(__CUDA_ARCH__)
  const uint4 v = *static_cast<const uint4*>(src);
  dst[0] = v.x;
  dst[1] = v.y;
  dst[2] = v.z;
  dst[3] = v.w;
#else
  if (reinterpret_cast<uintptr_t>(src) % 16 != 0) throw std::logic_error("misaligned 128-bit load");
  std::memcpy(dst, src, 16);
#endif
}

REGDROP_HOST_DEVICE void store16(void* dst, const uint32_t* src) {
#if defined(__CUDA_ARCH__)
  *static_cast<uint4*>(dst) = make_uint4(src[0], src[1], src[2], src[3]);
#else
  if (reinterpret_cast<uintptr_t>(dst) % 16 != 0) throw std::logic_error("misaligned 128-bit store");
  std::memcpy(dst, src, 16);
#endif
}

// ------------------------------------------------------------------ bit casts

REGDROP_HOST_DEVICE float float_from_bits(uint32_t bits) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(bits);
#else
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
#endif
}

REGDROP_HOST_DEVICE uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  return bits;
#endif
}

REGDROP_HOST_DEVICE double double_from_bits(uint32_t lo, uint32_t hi) {
#if defined(__CUDA_ARCH__)
  return __hiloint2double(static_cast<int>(hi), static_cast<int>(lo));
#else
  const uint64_t bits = (static_cast<uint64_t>(hi) << 32) | lo;
  double d;
  std::memcpy(&d, &bits, 8);
  return d;
#endif
}

REGDROP_HOST_DEVICE void double_bits(double d, uint32_t& lo, uint32_t& hi) {
#if defined(__CUDA_ARCH__)
  lo = static_cast<uint32_t>(__double2loint(d));
  hi = static_cast<uint32_t>(__double2hiint(d));
#else
  uint64_t bits;
  std::memcpy(&bits, &d, 8);
  lo = static_cast<uint32_t>(bits);
  hi = static_cast<uint32_t>(bits >> 32);
#endif
}

// --------------------------------------------------- NaN: one bit pattern
//
// A kept element that is NaN is written as the dtype's canonical NaN, on both
// devices (docs/semantics.md): 0x7FFF for float16 and bfloat16 (what the
// GPU's float -> 16-bit conversions produce for any NaN), 0x7FFFFFFF for
// float32 and 0x7FFFFFFFFFFFFFFF for float64. The CPU kernels and the GPU
// bodies both say so explicitly, whatever their arithmetic would propagate.

constexpr uint16_t kCanonicalNaN16 = 0x7FFF;
constexpr uint32_t kCanonicalNaN32 = 0x7FFFFFFFu;
constexpr uint32_t kCanonicalNaN64Hi = 0x7FFFFFFFu;

REGDROP_HOST_DEVICE float canonical_nan(float v) {
  return v != v ? float_from_bits(kCanonicalNaN32) : v;
}

REGDROP_HOST_DEVICE double canonical_nan(double v) {
  return v != v ? double_from_bits(0xFFFFFFFFu, kCanonicalNaN64Hi) : v;
}

// ------------------------------------------------------ 16-bit float types

struct Half {};      // float16 elements: IEEE binary16 bits
struct BFloat16 {};  // bfloat16 elements: the high half of a float32

// Half h (0 = low, 1 = high) of a 32-bit word holding two elements, as float.
template <class T>
REGDROP_HOST_DEVICE float half_to_float(uint32_t word, int h);

template <>
REGDROP_HOST_DEVICE float half_to_float<BFloat16>(uint32_t word, int h) {
  return float_from_bits(h == 0 ? word << 16 : word & 0xFFFF0000u);
}

#if !defined(__CUDA_ARCH__)
// IEEE binary16 -> float32, exact.
inline float half_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1Fu, mantissa = h & 0x3FFu;
  if (exponent == 0x1F) return float_from_bits(sign | 0x7F800000u | (mantissa << 13));
  if (exponent != 0) return float_from_bits(sign | ((exponent + 112) << 23) | (mantissa << 13));
  const float magnitude = static_cast<float>(mantissa) * 0x1p-24f;  // subnormal or zero: exact
  return float_from_bits(sign | float_bits(magnitude));
}
#endif

template <>
REGDROP_HOST_DEVICE float half_to_float<Half>(uint32_t word, int h) {
  const uint16_t bits = static_cast<uint16_t>(h == 0 ? word : word >> 16);
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(bits));
#else
  return half_bits_to_float(bits);
#endif
}

// Two floats rounded to nearest even and packed into one word (a in the low
// half): one F2FP instruction on the GPU. Any NaN becomes 0x7FFF.
template <class T>
REGDROP_HOST_DEVICE uint32_t pack_pair(float a, float b);

#if !defined(__CUDA_ARCH__)
inline uint16_t bfloat16_bits_rne(float f) {
  const uint32_t u = float_bits(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return kCanonicalNaN16;
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

// float32 -> IEEE binary16, rounded to nearest even (overflow to infinity).
inline uint16_t half_bits_rne(float f) {
  const uint32_t u = float_bits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7FFFFFFFu;
  if (a > 0x7F800000u) return kCanonicalNaN16;
  if (a >= 0x477FF000u) return sign | 0x7C00u;  // at or past 65520: infinity
  if (a >= 0x38800000u) {                       // normal: drop 13 mantissa bits
    return sign | static_cast<uint16_t>((a - 0x38000000u + 0xFFFu + ((a >> 13) & 1u)) >> 13);
  }
  // Subnormal or zero: the magnitude in units of 2^-24, an exact product,
  // rounded to the nearest even integer (1024 is the smallest normal).
  const float units = float_from_bits(a) * 0x1p24f;
  uint32_t n = static_cast<uint32_t>(units);
  const float rest = units - static_cast<float>(n);
  if (rest > 0.5f || (rest == 0.5f && (n & 1u))) ++n;
  return sign | static_cast<uint16_t>(n);
}
#endif

template <>
REGDROP_HOST_DEVICE uint32_t pack_pair<BFloat16>(float a, float b) {
#if defined(__CUDA_ARCH__)
  const __nv_bfloat162 v = __floats2bfloat162_rn(a, b);
  return *reinterpret_cast<const uint32_t*>(&v);
#else
  return bfloat16_bits_rne(a) | (static_cast<uint32_t>(bfloat16_bits_rne(b)) << 16);
#endif
}

template <>
REGDROP_HOST_DEVICE uint32_t pack_pair<Half>(float a, float b) {
#if defined(__CUDA_ARCH__)
  const __half2 v = __floats2half2_rn(a, b);
  return *reinterpret_cast<const uint32_t*>(&v);
#else
  return half_bits_rne(a) | (static_cast<uint32_t>(half_bits_rne(b)) << 16);
#endif
}

// ------------------------------------------------------- 32-bit division

REGDROP_HOST_DEVICE uint32_t mulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// n / d and n % d for any 32-bit n, by a divisor d in [1, 2^31] fixed per
// launch: a multiply-high, a 33-bit add and a shift instead of the ~40
// instructions of a division (Granlund and Montgomery's round-up method,
// with the magic number's 33rd bit folded into the add).
struct FastDivmod {
  uint32_t divisor = 1;
  uint32_t magic = 1;
  uint32_t shift = 0;

  FastDivmod() = default;
  explicit FastDivmod(uint32_t d) : divisor(d) {
    while ((uint64_t{1} << shift) < d) ++shift;  // ceil(log2 d)
    magic = static_cast<uint32_t>(((uint64_t{1} << 32) * ((uint64_t{1} << shift) - d)) / d + 1);
  }

  REGDROP_HOST_DEVICE uint32_t div(uint32_t n) const {
    return static_cast<uint32_t>((static_cast<uint64_t>(mulhi32(n, magic)) + n) >> shift);
  }

  REGDROP_HOST_DEVICE void divmod(uint32_t n, uint32_t& q, uint32_t& r) const {
    q = div(n);
    r = n - q * divisor;
  }
};

}  // namespace regdrop::cuda
