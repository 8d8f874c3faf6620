// The CUDA backend of the ops (dropout_ops.h): Philox streams from PyTorch's
// CUDA generators, and KernelCalls run on the current stream by the kernels
// of kernels.cu.
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAStream.h>

#include <mutex>

#include "../dropout_ops.h"
#include "cuda_backend.h"
#include "kernels.h"

namespace regdrop::cuda {

PhiloxSource CudaBackend::generator_source(const std::optional<at::Generator>& generator, at::Device device) {
  if (generator.has_value() && generator->defined()) {
    const at::Device own = generator->device();
    TORCH_CHECK(own.type() == at::kCUDA && own.index() == device.index(),
                "generator must belong to the device of input (", device, "), got a generator of ", own);
  }
  auto* gen = at::get_generator_or_default<at::CUDAGeneratorImpl>(
      generator, at::cuda::detail::getDefaultCUDAGenerator(device.index()));
  at::PhiloxCudaState state;
  {
    std::lock_guard<std::mutex> lock(gen->mutex_);
    state = gen->philox_cuda_state(4);
  }
  PhiloxSource source;
  if (state.captured_) {
    source.seed_ptr = state.seed_.ptr;
    source.offset_ptr = state.offset_.ptr;
    source.offset_increment = state.offset_intragraph_;
  } else {
    source.seed = state.seed_.val;
    source.offset = state.offset_.val;
  }
  return source;
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
