// The CUDA backend of the ops (dropout_ops.h): Philox streams from PyTorch's
// CUDA generators, and KernelCalls run on the current stream
// (cuda_backend.cpp). Declared here so that other op families (the norm
// family, norm_backend.cpp) take their streams the same way.
#pragma once

#include <ATen/core/Generator.h>
#include <c10/core/Device.h>

#include <optional>

#include "../kernel_call.h"

namespace regdrop::cuda {

struct CudaBackend {
  static constexpr bool kLaunches = true;

  // A graph-safe Philox state from the CUDA generator of `device`, or the
  // given one, which must belong to that very device. Each call asks for an
  // offset increment of 4 (PyTorch keeps offsets multiples of 4); the offset
  // lives in counter words 2-3, so calls never share a stream.
  static PhiloxSource generator_source(const std::optional<at::Generator>& generator, at::Device device);

  static void run(const KernelCall& c);
};

}  // namespace regdrop::cuda
