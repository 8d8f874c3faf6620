// FastDivmod (csrc/cuda/primitives.h), the CUDA kernels' division by a
// launch-constant divisor, against the division operator: every divisor up
// to 4096, powers of two and their neighbours up to 2^31, and numerators at
// the edges of each quotient and of the 32-bit range.
#include <gtest/gtest.h>

#include <cstdint>
#include <random>
#include <vector>

#include "../../csrc/cuda/primitives.h"

namespace {

void check(uint32_t d, uint32_t n) {
  const regdrop::cuda::FastDivmod div(d);
  uint32_t q, r;
  div.divmod(n, q, r);
  ASSERT_EQ(q, n / d) << n << " / " << d;
  ASSERT_EQ(r, n % d) << n << " % " << d;
}

TEST(FastDivmod, MatchesDivisionAcrossDivisorsAndNumerators) {
  std::vector<uint32_t> divisors;
  for (uint32_t d = 1; d <= 4096; ++d) divisors.push_back(d);
  for (int k = 12; k <= 31; ++k) {
    const uint32_t p = uint32_t{1} << k;
    divisors.insert(divisors.end(), {p - 1, p, p + 1});
  }
  std::mt19937 rng(7);
  for (int k = 0; k < 2000; ++k) divisors.push_back(1 + rng() % (uint32_t{1} << 31));
  for (uint32_t d : divisors) {
    if (d > (uint32_t{1} << 31)) continue;
    for (uint32_t n : {0u, 1u, d - 1, d, d + 1, 2 * d - 1, 2 * d, UINT32_MAX, UINT32_MAX - 1, uint32_t{1} << 31,
                       (uint32_t{1} << 31) + (uint32_t{1} << 30)}) {
      check(d, n);
    }
    for (int k = 0; k < 64; ++k) {
      const uint32_t n = rng();
      check(d, n);
      check(d, n - n % d);            // a multiple
      check(d, n - n % d + (d - 1));  // its last remainder, when it fits
    }
  }
}

}  // namespace
