// The CPU kernels' narrowing mix (csrc/cpu/kernels.h), called directly with
// a KernelCall, as no op builds one yet: a float32 input (a gradient) through
// a mask, scaled, into a 16-bit output in one pass. It must give the bits of
// the same call with a float32 output cast to the 16-bit dtype afterwards
// (the two passes it replaces), NaNs aside: the kernels write every NaN as
// the canonical 0x7FFF, the cast keeps a quiet NaN. For element masks, unit
// masks (runs of a unit, and units shorter than a run) and masks drawn
// again from a seed, and for every kernel copy this CPU can run.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "../../csrc/cpu/kernel_isa.h"

namespace {

using regdrop::KernelCall;
using regdrop::MaskSource;
using regdrop::ScalarKind;

std::vector<std::pair<std::string, regdrop::cpu::KernelSet>> kernel_copies() {
  std::vector<std::pair<std::string, regdrop::cpu::KernelSet>> copies = {{"baseline", regdrop::cpu::baseline::kernels}};
#if defined(__x86_64__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) {
    copies.emplace_back("avx2", regdrop::cpu::avx2::kernels);
  }
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
    copies.emplace_back("avx512", regdrop::cpu::avx512::kernels);
  }
#endif
  return copies;
}

// A gradient with what rounds hard: ties, subnormals, values past fp16's
// range once scaled, infinities and NaNs with payloads.
at::Tensor hostile_grad(int64_t numel) {
  at::manual_seed(3);
  at::Tensor g = at::randn({numel}) * at::exp2(at::randint(-20, 20, {numel}).to(at::kFloat));
  const float specials[] = {std::numeric_limits<float>::quiet_NaN(), -std::numeric_limits<float>::infinity(),
                            1e-40f, -1e-45f, 70000.0f, 1.0f + 1.0f / 256, 1.0f + 3.0f / 256, -0.0f};
  for (int64_t i = 0; i < numel; i += 13) g[i] = specials[(i / 13) % 8];
  g.view(at::kInt)[1] = 0x7F800123;  // a signalling NaN with a payload
  return g;
}

// `call` into a 16-bit output, against the same call into float32 then cast.
void expect_one_rounding(const regdrop::cpu::KernelSet& kernels, KernelCall call, at::ScalarType dtype) {
  at::Tensor wide = at::empty({call.numel}, at::kFloat);
  at::Tensor narrow = at::empty({call.numel}, dtype);
  const int64_t groups = (call.numel + 7) / 8;
  KernelCall two_pass = call;
  two_pass.out = wide.data_ptr();
  kernels.run_groups(two_pass, 0, groups);
  call.out_dtype = dtype == at::kHalf ? ScalarKind::Half : ScalarKind::BFloat16;
  call.out = narrow.data_ptr();
  // Two ranges, as two threads would split it.
  kernels.run_groups(call, 0, groups / 2);
  kernels.run_groups(call, groups / 2, groups);

  const at::Tensor expected = wide.to(dtype).view(at::kShort);
  const at::Tensor is_nan = wide.isnan();
  const at::Tensor bits = narrow.view(at::kShort);
  EXPECT_TRUE(at::equal(bits.masked_select(is_nan.logical_not()), expected.masked_select(is_nan.logical_not())));
  EXPECT_TRUE(bits.masked_select(is_nan).eq(0x7FFF).all().item<bool>());
  EXPECT_GT(is_nan.sum().item<int64_t>(), 0);
}

KernelCall narrowing_call(const at::Tensor& grad, MaskSource source) {
  KernelCall c;
  c.dtype = c.residual_dtype = c.bias_dtype = c.out_dtype = ScalarKind::Float;
  c.source = source;
  c.numel = grad.numel();
  c.in = grad.data_ptr();
  c.scale = 1.0 / 0.7;
  return c;
}

class NarrowingKernels : public testing::TestWithParam<at::ScalarType> {};

TEST_P(NarrowingKernels, ElementMaskRoundsOnce) {
  for (int64_t numel : {int64_t{9}, int64_t{37}, int64_t{4096 + 13}}) {
    const at::Tensor grad = hostile_grad(numel);
    at::Tensor mask = at::randint(0, 256, {(numel + 7) / 8}, at::kByte);
    mask[0] = mask[0].bitwise_or(3);  // elements 0 and 1, NaNs, kept
    KernelCall c = narrowing_call(grad, MaskSource::Elements);
    c.mask_in = mask.data_ptr<uint8_t>();
    for (const auto& [name, kernels] : kernel_copies()) {
      SCOPED_TRACE(name + " " + std::to_string(numel));
      expect_one_rounding(kernels, c, GetParam());
    }
  }
}

TEST_P(NarrowingKernels, UnitMaskRoundsOnce) {
  // Samples of 300 elements (runs), and channels of 5 (shorter than a run).
  const std::vector<std::pair<regdrop::UnitLayout, int64_t>> layouts = {{{300, 1, 300}, 7}, {{5, 6, 30}, 42}};
  for (const auto& [layout, units] : layouts) {
    const at::Tensor grad = hostile_grad(units * layout.inner);
    at::Tensor mask = at::randint(0, 256, {(units + 7) / 8}, at::kByte);
    mask[0] = mask[0].bitwise_or(1);  // unit 0, with NaNs, kept
    KernelCall c = narrowing_call(grad, MaskSource::Units);
    c.mask_in = mask.data_ptr<uint8_t>();
    c.units = layout;
    c.unit_count = units;
    for (const auto& [name, kernels] : kernel_copies()) {
      SCOPED_TRACE(name + " inner " + std::to_string(layout.inner));
      expect_one_rounding(kernels, c, GetParam());
    }
  }
}

TEST_P(NarrowingKernels, MaskDrawnAgainRoundsOnce) {
  const at::Tensor grad = hostile_grad(1000);
  KernelCall c = narrowing_call(grad, MaskSource::Draw);
  c.rng.seed = 17;
  c.rng.offset = 8;
  c.threshold = regdrop::keep_threshold(0.3);
  for (const auto& [name, kernels] : kernel_copies()) {
    SCOPED_TRACE(name);
    expect_one_rounding(kernels, c, GetParam());
  }
}

INSTANTIATE_TEST_SUITE_P(HalfTypes, NarrowingKernels, testing::Values(at::kHalf, at::kBFloat16),
                         [](const auto& info) { return std::string(c10::toString(info.param)); });

}  // namespace
