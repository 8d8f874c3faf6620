// What the tests compare the ops against, built from ATen ops and ATen's own
// Philox engine only: no code of regdrop's.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/PhiloxRNGEngine.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <string>

namespace regdrop_test {

// The message of the `Error` that `call` raises. A test fails if it raises
// none, or an exception of another type.
template <class Error = c10::Error, class Call>
std::string error_message(Call&& call) {
  try {
    call();
  } catch (const Error& e) {
    return e.what_without_backtrace();
  }
  ADD_FAILURE() << "no exception raised";
  return "";
}

inline int64_t mask_bytes(int64_t units) { return (units + 7) / 8; }

// The first `units` keep flags of a mask: bit i % 8 of byte i / 8.
inline at::Tensor unpack_bits(const at::Tensor& mask, int64_t units) {
  const at::Tensor shifts = at::arange(8, mask.options());
  const at::Tensor bits = mask.unsqueeze(1).bitwise_right_shift(shifts).bitwise_and(1);
  return bits.to(at::kBool).flatten().slice(0, 0, units);
}

// The mask of `bits`: bit i % 8 of byte i / 8 is bits[i]; padding bits are 0.
inline at::Tensor pack_bits(const at::Tensor& bits) {
  const int64_t bytes = mask_bytes(bits.numel());
  at::Tensor padded = at::zeros({bytes * 8}, at::kByte);
  padded.slice(0, 0, bits.numel()).copy_(bits);
  return padded.view({bytes, 8})
      .bitwise_left_shift(at::arange(8, at::kByte))
      .sum(1, false, at::kByte);
}

// A mask of random keep flags for `units` units (padding bits 0, as the ops require).
inline at::Tensor random_mask(int64_t units) { return pack_bits(at::randint(0, 2, {units}, at::kBool)); }

// Keep flags shaped and laid out like `like` (dense), from a mask whose bits
// follow the memory order of `like`.
inline at::Tensor element_keep(const at::Tensor& mask, const at::Tensor& like) {
  at::Tensor keep = at::empty_like(like, like.options().dtype(at::kBool));  // like's strides
  keep.as_strided({like.numel()}, {1}).copy_(unpack_bits(mask, like.numel()));
  return keep;
}

// Half types compute in float, as the kernels do.
inline at::ScalarType compute_type(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// 1 / q for the keep probability q = 1 - round(p * 2^16) / 2^16 the kernels
// use, as a 0-dim tensor of t's compute type; 0 where nothing is kept.
inline at::Tensor keep_scale(double p, const at::Tensor& t) {
  const double q = 1.0 - static_cast<double>(std::llround(p * 65536.0)) / 65536.0;
  return at::scalar_tensor(q > 0 ? 1 / q : 0.0, at::TensorOptions(compute_type(t)));
}

// keep ? x * keep_scale(p) : 0, in x's compute type; `keep` broadcasts.
inline at::Tensor dropout_reference(const at::Tensor& x, const at::Tensor& keep, double p) {
  const at::Tensor zero = at::zeros({}, compute_type(x));
  return at::where(keep, x.to(compute_type(x)) * keep_scale(p, x), zero).to(x.scalar_type());
}

// keep ? residual + x * keep_scale(p) : residual, in x's compute type.
inline at::Tensor add_reference(const at::Tensor& x, const at::Tensor& residual,
                                const at::Tensor& keep, double p) {
  const at::Tensor r = residual.to(compute_type(x));
  return at::where(keep, r + x.to(compute_type(x)) * keep_scale(p, x), r).to(x.scalar_type());
}

// The keep flags of units [0, units) drawn from the stream (seed, offset),
// following docs/random-mapping.md, with ATen's Philox4x32-10 engine.
inline at::Tensor philox_keep_bits(int64_t seed, int64_t offset, int64_t units, double p) {
  const int64_t threshold = std::llround(p * 65536.0);
  // Group g's counter is (g lo, g hi, offset lo, offset hi | 2^31).
  // at::Philox4_32(seed, subsequence, n) sets the counter to
  // (0, 0, subsequence lo, subsequence hi), then skips n blocks, adding n to
  // words 0-1; its calls return the block's four words in order.
  const uint64_t subsequence = static_cast<uint64_t>(offset) | (uint64_t{1} << 63);
  at::Tensor keep = at::empty({units}, at::kBool);
  bool* flags = keep.data_ptr<bool>();
  for (int64_t group = 0; group < mask_bytes(units); ++group) {
    at::Philox4_32 engine(static_cast<uint64_t>(seed), subsequence, group);
    for (int64_t word = 0; word < 4; ++word) {
      const uint32_t bits = engine();
      // Unit 8g + j takes the low (j even) or high (j odd) half of word j / 2.
      for (int64_t half = 0; half < 2; ++half) {
        const int64_t unit = 8 * group + 2 * word + half;
        if (unit < units) flags[unit] = ((bits >> (16 * half)) & 0xFFFFu) >= threshold;
      }
    }
  }
  return keep;
}

}  // namespace regdrop_test
