// The CUDA norm kernels: each runs its block program (norm_bodies.h) with
// the block's threads and shared memory; norm_launch.h decides the launches.
// No ATen here, as in kernels.cu, so that .ci/sass_gate.py reads only
// kernels. The unit-mask draw and the chunk fold run the element family's
// thread bodies (draw_mask_thread, fold_chunks_thread) in kernels of their own.
#include <string>

#include "norm_kernels.h"
#include "norm_launch.h"

namespace regdrop::cuda {
namespace norm_kernels {

// One thread of a block program: its registers and the barrier.
template <class State>
struct DeviceBlock {
  State state;
  template <class F>
  __device__ __forceinline__ void each(F&& f) {
    f(threadIdx.x, state);
  }
  __device__ __forceinline__ void sync() { __syncthreads(); }
};

// Row kernels ask for one resident block per SM, no more: left to its
// occupancy heuristic, ptxas trimmed some of them (sm_80's 16-bit forward
// and streamed backward, float64's forward) to the register count of the
// next occupancy step by spilling 4 to 8 bytes to local memory on their
// scalar paths, which .ci/sass_gate.py rejects. The price is that some may
// hold fewer blocks per SM (the gate's table gives their registers).
template <class T, class R, RowSource S, bool kCached>
__global__ void __launch_bounds__(kRowBlockThreads, 1) norm_forward_kernel(const NormForwardParams p) {
  using Body = NormForwardBlock<T, R, S, kCached>;
  __shared__ typename Body::Shared shared;
  DeviceBlock<typename Body::State> block;
  Body::run(p, blockIdx.x, block, shared);
}

template <class T, class R, bool kCached>
__global__ void __launch_bounds__(kRowBlockThreads, 1) norm_backward_kernel(const NormBackwardParams p) {
  using Body = NormBackwardBlock<T, R, kCached>;
  __shared__ typename Body::Shared shared;
  DeviceBlock<typename Body::State> block;
  Body::run(p, blockIdx.x, block, shared);
}

template <class T>
__global__ void __launch_bounds__(256) norm_fold_chunks_kernel(const void* partial, void* result,
                                                               const ColumnSumPlan plan) {
  fold_chunks_thread<T>(partial, result, plan, static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x);
}

template <BitSource S>
__global__ void __launch_bounds__(256) norm_draw_mask_kernel(const DrawMaskParams p) {
  draw_mask_thread<S>(p, blockIdx.x * blockDim.x + threadIdx.x);
}

void check_launch() {
  const cudaError_t error = cudaGetLastError();
  if (error != cudaSuccess) throw std::runtime_error(std::string("CUDA kernel launch failed: ") + cudaGetErrorString(error));
}

struct Launcher {
  cudaStream_t stream;
  const std::function<void*(size_t)>& allocate;

  template <class T, class R, RowSource S, bool kCached>
  void norm_forward(const NormForwardParams& p, Grid g) {
    norm_forward_kernel<T, R, S, kCached><<<g.blocks_x, g.threads_x, 0, stream>>>(p);
    check_launch();
  }
  template <class T, class R, bool kCached>
  void norm_backward(const NormBackwardParams& p, Grid g) {
    norm_backward_kernel<T, R, kCached><<<g.blocks_x, g.threads_x, 0, stream>>>(p);
    check_launch();
  }
  template <class T>
  void fold_chunks(const void* partial, void* result, const ColumnSumPlan& plan, Grid g) {
    norm_fold_chunks_kernel<T><<<g.blocks_x, g.threads_x, 0, stream>>>(partial, result, plan);
    check_launch();
  }
  template <BitSource S>
  void draw_mask(const DrawMaskParams& p, Grid g) {
    norm_draw_mask_kernel<S><<<g.blocks_x, g.threads_x, 0, stream>>>(p);
    check_launch();
  }
  void* workspace(size_t bytes) { return allocate(bytes); }
};

}  // namespace norm_kernels

void launch_norm_forward_kernels(const norm::NormForwardCall& call, cudaStream_t stream,
                                 const std::function<void*(size_t bytes)>& workspace) {
  norm_kernels::Launcher launcher{stream, workspace};
  launch_norm_forward(call, launcher);
}

void launch_norm_backward_kernels(const norm::NormBackwardCall& call, cudaStream_t stream,
                                  const std::function<void*(size_t bytes)>& workspace) {
  norm_kernels::Launcher launcher{stream, workspace};
  launch_norm_backward(call, launcher);
}

}  // namespace regdrop::cuda
