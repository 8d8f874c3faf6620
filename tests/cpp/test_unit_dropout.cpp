// channel_dropout and drop_path: one keep bit per unit, a (sample, channel)
// pair or a sample, numbered n * C + c or n whatever the memory layout, and
// drawn from the random mapping; outputs against ATen references.
#include <gtest/gtest.h>
#include <regdrop/regdrop.h>

#include "reference.h"

namespace {

using regdrop_test::dropout_reference;
using regdrop_test::pack_bits;
using regdrop_test::philox_keep_bits;
using regdrop_test::unpack_bits;

constexpr int64_t kSeed = 9;
constexpr int64_t kOffset = 4;
constexpr double kP = 0.4;

// Drop-path without scale_by_keep scales nothing, as dropout with p = 0 would.
double drop_path_scale_p(bool scale_by_keep) { return scale_by_keep ? kP : 0.0; }

class UnitDropout : public testing::TestWithParam<at::ScalarType> {
 protected:
  void SetUp() override { at::manual_seed(0); }
  at::Tensor randn(at::IntArrayRef shape) const { return at::randn(shape).to(GetParam()); }
};

// Channels-last with 8 channels or more is walked natively (fewer go through
// a contiguous copy).
TEST_P(UnitDropout, ChannelDropoutKeepsWholeChannels) {
  const at::Tensor contiguous = randn({3, 9, 4, 6});
  for (const at::Tensor& x : {contiguous, contiguous.contiguous(at::MemoryFormat::ChannelsLast)}) {
    const auto [out, mask] = regdrop::channel_dropout(x, kP, std::nullopt, kSeed, kOffset);
    EXPECT_TRUE(at::equal(mask, pack_bits(philox_keep_bits(kSeed, kOffset, 3 * 9, kP))));
    const at::Tensor keep = unpack_bits(mask, 3 * 9).view({3, 9, 1, 1});
    EXPECT_EQ(out.strides(), x.strides());
    EXPECT_TRUE(at::equal(out, dropout_reference(x, keep, kP)));
  }
}

TEST_P(UnitDropout, InPlaceChannelDropoutMatchesOutOfPlace) {
  const at::Tensor x = randn({3, 5, 4, 6});
  const auto [out, mask] = regdrop::channel_dropout(x, kP, std::nullopt, kSeed, kOffset);
  const at::Tensor y = x.clone();
  EXPECT_TRUE(at::equal(std::get<1>(regdrop::channel_dropout_(y, at::empty_like(mask), kP, std::nullopt, kSeed, kOffset)),
                        mask));
  EXPECT_TRUE(at::equal(y, out));
}

TEST_P(UnitDropout, ChannelDropoutBackwardKeepsWholeChannels) {
  const at::Tensor grad = randn({3, 5, 4, 6});
  const at::Tensor mask = regdrop_test::random_mask(3 * 5);
  const at::Tensor keep = unpack_bits(mask, 3 * 5).view({3, 5, 1, 1});
  EXPECT_TRUE(at::equal(regdrop::channel_dropout_backward(grad, mask, kP),
                        dropout_reference(grad, keep, kP)));
}

TEST_P(UnitDropout, DropPathKeepsWholeSamples) {
  const at::Tensor x = randn({11, 5, 7});
  for (bool scale_by_keep : {true, false}) {
    const auto [out, mask] = regdrop::drop_path(x, kP, scale_by_keep, std::nullopt, kSeed, kOffset);
    EXPECT_TRUE(at::equal(mask, pack_bits(philox_keep_bits(kSeed, kOffset, 11, kP))));
    const at::Tensor keep = unpack_bits(mask, 11).view({11, 1, 1});
    EXPECT_TRUE(at::equal(out, dropout_reference(x, keep, drop_path_scale_p(scale_by_keep))));
  }
}

TEST_P(UnitDropout, DropPathAddIsResidualPlusDropPath) {
  const at::Tensor x = randn({11, 5, 7});
  const at::Tensor residual = randn({11, 5, 7});
  for (bool scale_by_keep : {true, false}) {
    const auto [out, mask] =
        regdrop::drop_path_add(x, residual, kP, scale_by_keep, std::nullopt, kSeed, kOffset);
    EXPECT_TRUE(at::equal(mask, pack_bits(philox_keep_bits(kSeed, kOffset, 11, kP))));
    const at::Tensor keep = unpack_bits(mask, 11).view({11, 1, 1});
    const at::Tensor expected =
        regdrop_test::add_reference(x, residual, keep, drop_path_scale_p(scale_by_keep));
    EXPECT_TRUE(at::equal(out, expected));
  }
}

TEST_P(UnitDropout, DropPathBackwardKeepsWholeSamples) {
  const at::Tensor grad = randn({11, 5, 7});
  const at::Tensor mask = regdrop_test::random_mask(11);
  const at::Tensor keep = unpack_bits(mask, 11).view({11, 1, 1});
  for (bool scale_by_keep : {true, false}) {
    const at::Tensor expected = dropout_reference(grad, keep, drop_path_scale_p(scale_by_keep));
    EXPECT_TRUE(at::equal(regdrop::drop_path_backward(grad, mask, kP, scale_by_keep), expected));
  }
}

INSTANTIATE_TEST_SUITE_P(Dtypes, UnitDropout,
                         testing::Values(at::kFloat, at::kDouble, at::kBFloat16),
                         [](const auto& info) { return std::string(c10::toString(info.param)); });

}  // namespace
