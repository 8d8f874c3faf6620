// Bad arguments raise c10::Error (ValueError and TypeError where Python
// raises those) with a message that names the argument.
#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>
#include <regdrop/regdrop.h>

#include <limits>
#include <string>

#include "reference.h"

namespace {

using regdrop_test::error_message;

void expect_contains(const std::string& message, const std::string& part) {
  EXPECT_NE(message.find(part), std::string::npos) << "message: " << message;
}

TEST(Errors, PMustBeAProbability) {
  const at::Tensor x = at::ones({10});
  const at::Tensor mask = at::zeros({2}, at::kByte);
  for (double p : {1.5, -0.1, std::numeric_limits<double>::quiet_NaN()}) {
    const char* expected = "p must be a probability in [0, 1]";
    expect_contains(error_message<c10::ValueError>([&] { regdrop::dropout(x, p); }), expected);
    expect_contains(error_message<c10::ValueError>([&] { regdrop::dropout_(x.clone(), mask.clone(), p); }),
                    expected);
    expect_contains(error_message<c10::ValueError>([&] { regdrop::dropout_backward(x, mask, p); }),
                    expected);
  }
}

TEST(Errors, InputMustBeFloatingPoint) {
  expect_contains(
      error_message<c10::TypeError>([] { regdrop::dropout(at::ones({4}, at::kInt), 0.5); }),
      "input must be float32, float64, float16 or bfloat16, got Int");
}

TEST(Errors, MaskMustFitTheGradient) {
  const at::Tensor grad = at::ones({10});
  expect_contains(
      error_message([&] { regdrop::dropout_backward(grad, at::zeros({1}, at::kByte), 0.5); }),
      "mask must have ceil(10 / 8) = 2 bytes for grad, got 1");
  expect_contains(error_message<c10::TypeError>(
                      [&] { regdrop::dropout_backward(grad, at::zeros({2}, at::kInt), 0.5); }),
                  "mask must be uint8");
  expect_contains(
      error_message([&] { regdrop::dropout_backward(grad, at::zeros({1, 2}, at::kByte), 0.5); }),
      "mask must be a contiguous 1-D tensor");
}

TEST(Errors, GeneratorAndSeedExcludeEachOther) {
  const at::Generator generator = at::make_generator<at::CPUGeneratorImpl>(7);
  expect_contains(
      error_message([&] { regdrop::dropout(at::ones({4}), 0.5, generator, /*seed=*/1); }),
      "pass either generator or seed, not both");
}

TEST(Errors, OffsetMustBeNonNegative) {
  expect_contains(error_message<c10::ValueError>([] {
                    regdrop::dropout(at::ones({4}), 0.5, std::nullopt, /*seed=*/1, /*offset=*/-4);
                  }),
                  "offset must be non-negative, got -4");
}

TEST(Errors, InPlaceRefusesElementsThatShareMemory) {
  const at::Tensor expanded = at::ones({1}).expand({8});
  expect_contains(error_message([&] { regdrop::dropout_(expanded, at::zeros({1}, at::kByte), 0.5); }),
                  "input has elements that share memory");
}

TEST(Errors, FusedOpsCheckTheirOperands) {
  const at::Tensor x = at::ones({4, 6});
  expect_contains(error_message([&] { regdrop::dropout_add(x, at::ones({4, 5}), 0.5); }),
                  "residual must have the shape of input");
  expect_contains(error_message([&] { regdrop::bias_dropout_add(x, at::ones({4}), x, 0.5); }),
                  "bias must be 1-D with the size of input's last dimension (6)");
  expect_contains(error_message([&] { regdrop::channel_dropout(at::ones({6}), 0.5); }),
                  "input must have shape (N, C, *) for channel dropout");
  expect_contains(error_message([&] {
                    regdrop::dropout_low_memory_backward(x, at::zeros({3}, at::kLong), 0.5);
                  }),
                  "rng_state must be a contiguous int64 tensor of 2 elements (seed, offset)");
}

}  // namespace
