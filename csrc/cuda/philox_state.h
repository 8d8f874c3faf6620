// How a CUDA generator's Philox state becomes the PhiloxSource a drawing
// kernel reads. Host code without ATen: templates over the generator and its
// state (at::CUDAGeneratorImpl and at::PhiloxCudaState for the CUDA backend),
// so that the host emulation of the CUDA kernels (tests/cuda_emulation) runs
// the very same code with stand-ins for both.
//
// Eager, the generator hands out its seed and offset as values. Under CUDA
// graph capture it hands out pointers to its seed and offset tensors, which
// each replay fills before the graph runs, plus the call's offset within the
// graph (offset_intragraph_, advanced by each call's increment), so that two
// draws in one graph read different streams, and a replay reads the streams
// eager calls at that offset would.
#pragma once

#include <cstdint>
#include <mutex>

#include "../kernel_call.h"

namespace regdrop::cuda {

// What each call asks of its generator's offset: PyTorch keeps offsets
// multiples of 4. The offset lies in Philox counter words 2-3, apart from
// the group index, so any increment keeps two calls' streams apart.
constexpr uint64_t kPhiloxOffsetIncrement = 4;

template <class PhiloxCudaState>
PhiloxSource philox_source(const PhiloxCudaState& state) {
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

// The next call's stream from `generator`, which advances by the increment.
template <class CudaGenerator>
PhiloxSource next_philox_source(CudaGenerator& generator) {
  std::lock_guard<std::mutex> lock(generator.mutex_);
  return philox_source(generator.philox_cuda_state(kPhiloxOffsetIncrement));
}

}  // namespace regdrop::cuda
