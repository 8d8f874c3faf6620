// The CUDA backend of the norm ops (norm/norm_ops.h): the CUDA generator's
// streams (CudaBackend), and norm calls run on the current stream by the
// kernels of norm_kernels.cu, with device memory from the caching allocator
// for their workspaces.
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAStream.h>

#include <functional>
#include <vector>

#include "../norm/norm_ops.h"
#include "cuda_backend.h"
#include "norm_kernels.h"

namespace regdrop::cuda {
namespace {

// Device memory for one call, freed (stream-ordered) when the call returns.
struct Workspaces {
  std::vector<at::Tensor> tensors;
  void* operator()(size_t bytes) {
    tensors.push_back(at::empty({static_cast<int64_t>(bytes)},
                                at::TensorOptions().dtype(at::kByte).device(at::kCUDA, c10::cuda::current_device())));
    return tensors.back().mutable_data_ptr();
  }
};

}  // namespace

struct CudaNormBackend : CudaBackend {
  static void run_norm_forward(const norm::NormForwardCall& c) {
    Workspaces workspaces;
    launch_norm_forward_kernels(c, c10::cuda::getCurrentCUDAStream(), std::ref(workspaces));
  }
  static void run_norm_backward(const norm::NormBackwardCall& c) {
    Workspaces workspaces;
    launch_norm_backward_kernels(c, c10::cuda::getCurrentCUDAStream(), std::ref(workspaces));
  }
};

}  // namespace regdrop::cuda

TORCH_LIBRARY_IMPL(regdrop, CUDA, m) { regdrop::norm::register_norm_ops<regdrop::cuda::CudaNormBackend>(m); }
