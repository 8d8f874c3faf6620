// The low-memory ops save the stream they drew from (rng_state) instead of a
// mask: they must draw dropout's bits, and their backward must draw the same
// bits again from rng_state.
#include <gtest/gtest.h>
#include <regdrop/regdrop.h>

#include "reference.h"

namespace {

constexpr int64_t kSeed = 21;
constexpr int64_t kOffset = 12;
constexpr double kP = 0.3;

class LowMemory : public testing::TestWithParam<at::ScalarType> {
 protected:
  void SetUp() override { at::manual_seed(0); }
  at::Tensor randn(at::IntArrayRef shape) const { return at::randn(shape).to(GetParam()); }
};

TEST_P(LowMemory, DropoutDrawsDropoutsBits) {
  const at::Tensor x = randn({37, 29});
  const at::Tensor out =
      std::get<0>(regdrop::dropout_low_memory(x, kP, std::nullopt, kSeed, kOffset));
  EXPECT_TRUE(at::equal(out, std::get<0>(regdrop::dropout(x, kP, std::nullopt, kSeed, kOffset))));
}

TEST_P(LowMemory, DropoutAddDrawsDropoutsBits) {
  const at::Tensor x = randn({37, 29});
  const at::Tensor residual = randn({37, 29});
  const at::Tensor out =
      std::get<0>(regdrop::dropout_add_low_memory(x, residual, kP, std::nullopt, kSeed, kOffset));
  const at::Tensor mask = std::get<1>(regdrop::dropout(x, kP, std::nullopt, kSeed, kOffset));
  const at::Tensor expected =
      regdrop_test::add_reference(x, residual, regdrop_test::element_keep(mask, x), kP);
  EXPECT_TRUE(at::equal(out, expected));
}

// The backward of x itself is x's forward output: the same bits, the same scale.
TEST_P(LowMemory, BackwardRedrawsTheForwardBits) {
  const at::Tensor x = randn({37, 29});
  const auto [seeded, seeded_state] =
      regdrop::dropout_low_memory(x, kP, std::nullopt, kSeed, kOffset);
  EXPECT_TRUE(at::equal(regdrop::dropout_low_memory_backward(x, seeded_state, kP), seeded));
  const auto [drawn, drawn_state] = regdrop::dropout_low_memory(x, kP);  // the default generator
  EXPECT_TRUE(at::equal(regdrop::dropout_low_memory_backward(x, drawn_state, kP), drawn));
}

INSTANTIATE_TEST_SUITE_P(Dtypes, LowMemory, testing::Values(at::kFloat, at::kDouble, at::kHalf),
                         [](const auto& info) { return std::string(c10::toString(info.param)); });

}  // namespace
