// Philox4x32-10 and the one mapping from (seed, offset, unit index) to keep bits.
//
// This header is the only random-number generator in regdrop. It compiles for
// the host (the CPU kernels, and the host emulation of the CUDA kernels) and
// for CUDA devices, so both devices draw bit-identical masks. The tests check
// it against an independent NumPy implementation (tests/reference.py).
//
// The mapping (docs/random-mapping.md):
//   * Units (elements, (n, c) pairs or samples) are numbered in memory order
//     and grouped by 8. Group g is one Philox4x32-10 evaluation with
//       counter = (g.lo, g.hi, offset.lo, offset.hi | kStreamTag)
//       key     = (seed.lo, seed.hi)
//   * Its four 32-bit words give eight 16-bit uniforms: unit 8g + j takes the
//     low (j even) or high (j odd) half of word j / 2. All 128 bits are used.
//   * Unit 8g + j is kept iff its uniform u16 >= keep_threshold(p), which makes
//     P(keep) = 1 - round(p * 2^16) / 2^16: within 2^-17 of 1 - p.
//   * Bit j of mask byte g is that keep flag.
// A group's bits depend on g alone, never on threads or launch shape.
#pragma once

#include <cmath>
#include <cstdint>

// Always inlined on the host too: the CPU kernels are compiled once per
// instruction set, and an inlined call is compiled for its caller's.
#if defined(__CUDACC__)
#define REGDROP_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define REGDROP_HOST_DEVICE inline __attribute__((always_inline))
#endif

namespace regdrop {

// Multipliers and Weyl key increments from Salmon et al., "Parallel random
// numbers: as easy as 1, 2, 3" (SC'11), the Random123 Philox4x32 constants.
constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;
constexpr int kPhiloxRounds = 10;

// The top bit of the counter's last word is always set. PyTorch's CUDA RNG
// (curand and ATen's Philox engine) puts a thread's subsequence number in
// counter words 2-3, and subsequence numbers never reach 2^63, so regdrop's
// streams cannot coincide with those of native ops sharing a generator.
// Offsets are therefore limited to [0, 2^63).
constexpr uint32_t kStreamTag = 0x80000000u;

constexpr int kUnitsPerGroup = 8;

struct PhiloxBlock {
  uint32_t w[4];
};

REGDROP_HOST_DEVICE void philox_mulhilo(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
#if defined(__CUDA_ARCH__)
  lo = a * b;
  hi = __umulhi(a, b);
#else
  const uint64_t product = static_cast<uint64_t>(a) * b;
  lo = static_cast<uint32_t>(product);
  hi = static_cast<uint32_t>(product >> 32);
#endif
}

// The key schedule of a seed: round r mixes in (seed.lo + r W0, seed.hi + r W1).
// It depends on the seed alone, so a kernel that knows the seed at launch
// takes it precomputed (as kernel parameters) instead of computing it in
// every thread.
struct PhiloxKeys {
  uint32_t k0[kPhiloxRounds];
  uint32_t k1[kPhiloxRounds];
};

REGDROP_HOST_DEVICE PhiloxKeys philox_keys(uint64_t seed) {
  PhiloxKeys keys;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < kPhiloxRounds; ++round) {
    keys.k0[round] = static_cast<uint32_t>(seed) + static_cast<uint32_t>(round) * kPhiloxW0;
    keys.k1[round] = static_cast<uint32_t>(seed >> 32) + static_cast<uint32_t>(round) * kPhiloxW1;
  }
  return keys;
}

REGDROP_HOST_DEVICE PhiloxBlock philox4x32_10(PhiloxBlock ctr, const PhiloxKeys& keys) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < kPhiloxRounds; ++round) {
    uint32_t hi0, lo0, hi1, lo1;
    philox_mulhilo(kPhiloxM0, ctr.w[0], hi0, lo0);
    philox_mulhilo(kPhiloxM1, ctr.w[2], hi1, lo1);
    ctr = PhiloxBlock{{hi1 ^ ctr.w[1] ^ keys.k0[round], lo1, hi0 ^ ctr.w[3] ^ keys.k1[round], lo0}};
  }
  return ctr;
}

REGDROP_HOST_DEVICE PhiloxBlock philox4x32_10(PhiloxBlock ctr, uint32_t k0, uint32_t k1) {
  return philox4x32_10(ctr, philox_keys((static_cast<uint64_t>(k1) << 32) | k0));
}

REGDROP_HOST_DEVICE PhiloxBlock group_counter(uint64_t group, uint64_t offset) {
  return PhiloxBlock{{static_cast<uint32_t>(group), static_cast<uint32_t>(group >> 32),
                      static_cast<uint32_t>(offset),
                      static_cast<uint32_t>(offset >> 32) | kStreamTag}};
}

// round(p * 2^16) in [0, 2^16]. Compared in 32 bits, the threshold 2^16
// (p == 1, and p within 2^-17 of it) keeps nothing without a special case.
inline uint32_t keep_threshold(double p) {
  return static_cast<uint32_t>(std::llround(p * 65536.0));
}

// The eight keep flags of one group, bit j for unit 8g + j.
REGDROP_HOST_DEVICE uint32_t keep_bits(const PhiloxBlock& words, uint32_t threshold) {
  uint32_t bits = 0;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int k = 0; k < 4; ++k) {
    bits |= static_cast<uint32_t>((words.w[k] & 0xFFFFu) >= threshold) << (2 * k);
    bits |= static_cast<uint32_t>((words.w[k] >> 16) >= threshold) << (2 * k + 1);
  }
  return bits;
}

REGDROP_HOST_DEVICE uint32_t group_keep_bits(const PhiloxKeys& keys, uint64_t offset, uint64_t group,
                                            uint32_t threshold) {
  return keep_bits(philox4x32_10(group_counter(group, offset), keys), threshold);
}

REGDROP_HOST_DEVICE uint32_t group_keep_bits(uint64_t seed, uint64_t offset, uint64_t group,
                                            uint32_t threshold) {
  return group_keep_bits(philox_keys(seed), offset, group, threshold);
}

}  // namespace regdrop
