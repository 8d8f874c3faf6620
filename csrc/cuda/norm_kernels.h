// The entry points of the CUDA norm kernels (norm_kernels.cu) for host code:
// run a norm call on a stream. Kept free of ATen, as kernels.h is;
// `workspace` lends device memory for the call (parameter-gradient partial
// sums, a low-memory shard's mask), valid until the kernels are done.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <functional>

#include "../norm/norm_call.h"

namespace regdrop::cuda {

void launch_norm_forward_kernels(const norm::NormForwardCall& call, cudaStream_t stream,
                                 const std::function<void*(size_t bytes)>& workspace);

void launch_norm_backward_kernels(const norm::NormBackwardCall& call, cudaStream_t stream,
                                  const std::function<void*(size_t bytes)>& workspace);

}  // namespace regdrop::cuda
