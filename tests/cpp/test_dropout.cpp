// dropout, dropout_ and dropout_backward against references computed with
// ATen ops from the masks: the kernels must apply exactly the bits they
// return, in the memory order of their input.
#include <gtest/gtest.h>
#include <regdrop/regdrop.h>

#include "reference.h"

namespace {

using regdrop_test::dropout_reference;
using regdrop_test::element_keep;

class Dropout : public testing::TestWithParam<at::ScalarType> {
 protected:
  void SetUp() override { at::manual_seed(0); }
  at::Tensor randn(at::IntArrayRef shape) const { return at::randn(shape).to(GetParam()); }
};

// The output is the reference of the mask, with the input's strides; the
// mask has ceil(n / 8) bytes, zero padding bits, and keeps about 1 - p.
void expect_dropout_of(const at::Tensor& x, double p) {
  const auto [out, mask] = regdrop::dropout(x, p);
  const at::Tensor dense = x.is_non_overlapping_and_dense() ? x : x.contiguous();
  ASSERT_EQ(mask.scalar_type(), at::kByte);
  ASSERT_EQ(mask.numel(), regdrop_test::mask_bytes(x.numel()));
  EXPECT_TRUE(at::equal(mask, regdrop_test::pack_bits(regdrop_test::unpack_bits(mask, x.numel()))))
      << "padding bits must be 0";
  EXPECT_EQ(out.strides(), dense.strides());
  EXPECT_TRUE(at::equal(out, dropout_reference(x, element_keep(mask, dense), p)));
  const double kept =
      regdrop_test::unpack_bits(mask, x.numel()).to(at::kDouble).mean().item<double>();
  EXPECT_NEAR(kept, 1 - p, 0.05);
}

TEST_P(Dropout, ContiguousInput) { expect_dropout_of(randn({37, 29}), 0.3); }

TEST_P(Dropout, TransposedInputKeepsItsLayout) { expect_dropout_of(randn({29, 37}).t(), 0.3); }

TEST_P(Dropout, NonDenseInputIsMadeContiguous) {
  expect_dropout_of(randn({37, 58}).slice(1, 0, 58, 2), 0.6);
}

TEST_P(Dropout, NothingIsKeptAtPOne) {
  const auto [out, mask] = regdrop::dropout(randn({100}), 1.0);
  EXPECT_TRUE(at::equal(out, at::zeros_like(out)));
  EXPECT_TRUE(at::equal(mask, at::zeros_like(mask)));
}

TEST_P(Dropout, InPlaceMatchesOutOfPlace) {
  const at::Tensor x = randn({1003});
  const auto [out, mask] = regdrop::dropout(x, 0.25, std::nullopt, /*seed=*/5, /*offset=*/8);
  const at::Tensor y = x.clone();
  const at::Tensor written = at::empty_like(mask);
  const auto [returned, inplace_mask] =
      regdrop::dropout_(y, written, 0.25, std::nullopt, /*seed=*/5, /*offset=*/8);
  EXPECT_TRUE(returned.is_same(y));
  EXPECT_TRUE(inplace_mask.is_same(written));
  EXPECT_TRUE(at::equal(inplace_mask, mask));
  EXPECT_TRUE(at::equal(y, out));
}

TEST_P(Dropout, BackwardAppliesTheMaskBits) {
  for (const at::Tensor& grad : {randn({41, 23}), randn({23, 41}).t()}) {
    const at::Tensor mask = regdrop_test::random_mask(grad.numel());
    const at::Tensor expected = dropout_reference(grad, element_keep(mask, grad), 0.4);
    EXPECT_TRUE(at::equal(regdrop::dropout_backward(grad, mask, 0.4), expected));
  }
}

INSTANTIATE_TEST_SUITE_P(Dtypes, Dropout,
                         testing::Values(at::kFloat, at::kDouble, at::kHalf, at::kBFloat16),
                         [](const auto& info) { return std::string(c10::toString(info.param)); });

}  // namespace
