// The CUDA backend of the ops (dropout_ops.h, cuda_backend.h): Philox streams
// from PyTorch's CUDA generators, and KernelCalls run on the current stream
// by the kernels of kernels.cu.
#include "cuda_backend.h"

#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAStream.h>

#include "../dropout_ops.h"
#include "kernels.h"
#include "philox_state.h"

namespace regdrop::cuda {

// A graph-safe Philox stream from the CUDA generator of `device`, or the
// given one, which check_rng_args has found to belong to that very device
// (philox_state.h).
PhiloxSource CudaBackend::generator_source(const std::optional<at::Generator>& generator, at::Device device) {
  auto* gen = at::get_generator_or_default<at::CUDAGeneratorImpl>(
      generator, at::cuda::detail::getDefaultCUDAGenerator(device.index()));
  return next_philox_source(*gen);
}

void CudaBackend::run(const KernelCall& c) {
  at::Tensor workspace;
  launch_kernels(c, c10::cuda::getCurrentCUDAStream(), [&](size_t bytes) {
    workspace = at::empty({static_cast<int64_t>(bytes)},
                          at::TensorOptions().dtype(at::kByte).device(at::kCUDA, c10::cuda::current_device()));
    return workspace.mutable_data_ptr();
  });
}

}  // namespace regdrop::cuda

TORCH_LIBRARY_IMPL(regdrop, CUDA, m) { regdrop::register_ops<regdrop::cuda::CudaBackend>(m); }
