// The entry point of the CUDA kernels (kernels.cu) for host code: runs a
// KernelCall on a stream. Kept free of ATen so that kernels.cu compiles
// without it; `workspace` lends device memory for the call (the bias
// gradient's per-chunk sums), valid until the kernels are done.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <functional>

#include "../kernel_call.h"

namespace regdrop::cuda {

void launch_kernels(const KernelCall& call, cudaStream_t stream,
                    const std::function<void*(size_t bytes)>& workspace);

}  // namespace regdrop::cuda
