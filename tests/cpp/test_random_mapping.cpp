// Seeded calls: reproducible, and their masks are docs/random-mapping.md's mapping
// computed with ATen's own Philox engine (at::Philox4_32).
#include <gtest/gtest.h>
#include <regdrop/regdrop.h>

#include <array>
#include <cstdint>
#include <limits>
#include <ostream>

#include "reference.h"

namespace {

// Known-answer vectors of Random123 (kat_vectors, philox4x32_10): counter,
// key, result. They check how philox_keep_bits drives at::Philox4_32.
struct KnownAnswer {
  std::array<uint32_t, 4> counter;
  std::array<uint32_t, 2> key;
  std::array<uint32_t, 4> result;
};

TEST(RandomMapping, AtenPhiloxIsDrivenAsPhilox4x32_10) {
  const KnownAnswer answers[] = {
      {{0, 0, 0, 0}, {0, 0}, {0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8}},
      {{0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344},
       {0xA4093822, 0x299F31D0},
       {0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1}},
  };
  const auto join = [](uint32_t lo, uint32_t hi) { return uint64_t{hi} << 32 | lo; };
  for (const KnownAnswer& a : answers) {
    at::Philox4_32 engine(join(a.key[0], a.key[1]), join(a.counter[2], a.counter[3]),
                          join(a.counter[0], a.counter[1]));
    for (uint32_t word : a.result) EXPECT_EQ(engine(), word);
  }
}

TEST(RandomMapping, SeededCallsAreReproducible) {
  const at::Tensor x = at::randn({4099});
  const auto [out, mask] = regdrop::dropout(x, 0.5, std::nullopt, /*seed=*/3, /*offset=*/4);
  const auto [again, same_mask] = regdrop::dropout(x, 0.5, std::nullopt, /*seed=*/3, /*offset=*/4);
  EXPECT_TRUE(at::equal(again, out));
  EXPECT_TRUE(at::equal(same_mask, mask));
  const at::Tensor other_offset =
      std::get<1>(regdrop::dropout(x, 0.5, std::nullopt, /*seed=*/3, /*offset=*/8));
  const at::Tensor other_seed =
      std::get<1>(regdrop::dropout(x, 0.5, std::nullopt, /*seed=*/4, /*offset=*/4));
  EXPECT_FALSE(at::equal(other_offset, mask));
  EXPECT_FALSE(at::equal(other_seed, mask));
}

struct Stream {
  int64_t seed;
  int64_t offset;
};

void PrintTo(const Stream& stream, std::ostream* out) {
  *out << "seed " << stream.seed << ", offset " << stream.offset;
}

class MasksFollowTheMapping : public testing::TestWithParam<Stream> {};

TEST_P(MasksFollowTheMapping, ForEverySizeAndP) {
  const auto [seed, offset] = GetParam();
  for (int64_t numel : {1, 7, 8, 9, 127, 4095, 100003}) {
    for (double p : {0.0, 0.1, 0.5, 0.97, 1.0}) {
      const at::Tensor mask =
          std::get<1>(regdrop::dropout(at::ones({numel}), p, std::nullopt, seed, offset));
      const at::Tensor expected =
          regdrop_test::pack_bits(regdrop_test::philox_keep_bits(seed, offset, numel, p));
      EXPECT_TRUE(at::equal(mask, expected)) << "numel " << numel << ", p " << p;
    }
  }
}

constexpr int64_t kMaxInt64 = std::numeric_limits<int64_t>::max();

INSTANTIATE_TEST_SUITE_P(Streams, MasksFollowTheMapping,
                         testing::Values(Stream{0, 0}, Stream{1, 4},
                                         Stream{-1, (int64_t{1} << 40) + 12},
                                         Stream{kMaxInt64, kMaxInt64 - 3},
                                         Stream{123456789, (int64_t{1} << 32) - 4}));

}  // namespace
