// The CUDA kernels: each computes its thread's (or block's) index and calls
// its body in thread_bodies.h; launch_plan.h decides the launches. No ATen
// here, so this file compiles in seconds and its machine code holds only the
// kernels (.ci/sass_gate.py reads it).
#include <string>

#include "kernels.h"
#include "launch_plan.h"

namespace regdrop::cuda {
namespace kernels {

template <class O, Epilogue E, BitSource S>
__global__ void __launch_bounds__(512) elementwise_kernel(const ElementwiseParams p) {
  elementwise_thread<O, E, S>(p, blockIdx.x * blockDim.x + threadIdx.x);
}

template <BitSource S>
__global__ void __launch_bounds__(256) draw_mask_kernel(const DrawMaskParams p) {
  draw_mask_thread<S>(p, blockIdx.x * blockDim.x + threadIdx.x);
}

template <class T>
__global__ void __launch_bounds__(kColumnSumThreads) column_sums_kernel(const ColumnSumParams p) {
  __shared__ ColumnSumShared<T> shared;
  column_sum_accumulate<T>(p, blockIdx.x, blockIdx.y, threadIdx.x, threadIdx.y, shared);
  __syncthreads();
  column_sum_fold_lanes<T>(p, blockIdx.x, blockIdx.y, threadIdx.x, threadIdx.y, shared);
}

template <class T>
__global__ void __launch_bounds__(256) fold_chunks_kernel(const void* partial, void* result,
                                                          const ColumnSumPlan plan) {
  fold_chunks_thread<T>(partial, result, plan, static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x);
}

void check_launch() {
  const cudaError_t error = cudaGetLastError();
  if (error != cudaSuccess) throw std::runtime_error(std::string("CUDA kernel launch failed: ") + cudaGetErrorString(error));
}

struct Launcher {
  cudaStream_t stream;
  const std::function<void*(size_t)>& allocate;

  template <class O, Epilogue E, BitSource S>
  void elementwise(const ElementwiseParams& p, Grid g) {
    elementwise_kernel<O, E, S><<<g.blocks_x, g.threads_x, 0, stream>>>(p);
    check_launch();
  }
  template <BitSource S>
  void draw_mask(const DrawMaskParams& p, Grid g) {
    draw_mask_kernel<S><<<g.blocks_x, g.threads_x, 0, stream>>>(p);
    check_launch();
  }
  template <class T>
  void column_sums(const ColumnSumParams& p, Grid g) {
    column_sums_kernel<T><<<dim3(g.blocks_x, g.blocks_y), dim3(g.threads_x, g.threads_y), 0, stream>>>(p);
    check_launch();
  }
  template <class T>
  void fold_chunks(const void* partial, void* result, const ColumnSumPlan& plan, Grid g) {
    fold_chunks_kernel<T><<<g.blocks_x, g.threads_x, 0, stream>>>(partial, result, plan);
    check_launch();
  }
  void* workspace(size_t bytes) { return allocate(bytes); }
};

}  // namespace kernels

void launch_kernels(const KernelCall& call, cudaStream_t stream,
                    const std::function<void*(size_t bytes)>& workspace) {
  kernels::Launcher launcher{stream, workspace};
  launch(call, launcher);
}

}  // namespace regdrop::cuda
