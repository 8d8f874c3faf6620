// The CPU backend of the ops (dropout_ops.h): Philox streams from the CPU
// generator, and KernelCalls split across threads (dropout_cpu.cpp). Declared
// here so that other op families (the norm family, norm_cpu.cpp) draw from
// the same generator and run the same drawing kernels.
#pragma once

#include <ATen/core/Generator.h>
#include <c10/core/Device.h>

#include <optional>

#include "../kernel_call.h"
#include "isa_select.h"

namespace regdrop::cpu {

struct CpuBackend {
  static constexpr bool kLaunches = true;

  // The CPU generator is a Mersenne Twister, not a Philox counter: each call
  // takes a fresh 64-bit seed from it and starts its stream at offset 0.
  static PhiloxSource generator_source(const std::optional<at::Generator>& generator, at::Device);

  static void run(const KernelCall& c);
};

}  // namespace regdrop::cpu
