// dropout_add and bias_dropout_add: residual + dropout(input [+ bias]), one
// keep bit per element drawn as dropout draws them, against ATen references
// from their masks.
#include <gtest/gtest.h>
#include <regdrop/regdrop.h>

#include "reference.h"

namespace {

using regdrop_test::add_reference;
using regdrop_test::element_keep;

constexpr int64_t kSeed = 5;
constexpr int64_t kOffset = 8;

class DropoutAdd : public testing::TestWithParam<at::ScalarType> {
 protected:
  void SetUp() override { at::manual_seed(0); }
  at::Tensor randn(at::IntArrayRef shape) const { return at::randn(shape).to(GetParam()); }
};

TEST_P(DropoutAdd, IsResidualPlusDropout) {
  const at::Tensor x = randn({37, 29});
  const at::Tensor residual = randn({37, 29});
  const auto [out, mask] = regdrop::dropout_add(x, residual, 0.3, std::nullopt, kSeed, kOffset);
  EXPECT_TRUE(at::equal(mask, std::get<1>(regdrop::dropout(x, 0.3, std::nullopt, kSeed, kOffset))));
  EXPECT_TRUE(at::equal(out, add_reference(x, residual, element_keep(mask, x), 0.3)));
}

TEST_P(DropoutAdd, BiasIsAddedAlongTheLastDimension) {
  const at::Tensor x = randn({4, 9, 16});
  const at::Tensor bias = randn({16});
  const at::Tensor residual = randn({4, 9, 16});
  const auto [out, mask] =
      regdrop::bias_dropout_add(x, bias, residual, 0.3, std::nullopt, kSeed, kOffset);
  EXPECT_TRUE(at::equal(mask, std::get<1>(regdrop::dropout(x, 0.3, std::nullopt, kSeed, kOffset))));
  // x + bias in the compute type, as the kernels add it.
  const at::Tensor biased =
      x.to(regdrop_test::compute_type(x)) + bias.to(regdrop_test::compute_type(x));
  const at::Tensor expected = add_reference(biased, residual, element_keep(mask, x), 0.3);
  EXPECT_TRUE(at::equal(out, expected.to(x.scalar_type())));
}

TEST_P(DropoutAdd, BiasGradientSumsTheInputGradient) {
  const at::Tensor grad = randn({4, 9, 16});
  const at::Tensor mask = regdrop_test::random_mask(grad.numel());
  const auto [grad_input, grad_bias] = regdrop::bias_dropout_add_backward(grad, mask, 0.3);
  const at::Tensor expected = regdrop_test::dropout_reference(grad, element_keep(mask, grad), 0.3);
  EXPECT_TRUE(at::equal(grad_input, expected));
  const at::Tensor expected_bias = expected.to(at::kDouble).sum({0, 1});
  EXPECT_TRUE(at::allclose(grad_bias.to(at::kDouble), expected_bias, 1e-2, 1e-2));
}

INSTANTIATE_TEST_SUITE_P(Dtypes, DropoutAdd, testing::Values(at::kFloat, at::kDouble, at::kHalf),
                         [](const auto& info) { return std::string(c10::toString(info.param)); });

}  // namespace
