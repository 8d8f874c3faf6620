// The CUDA kernels, run on the host. Every regdrop op is registered a second
// time, as torch.ops.regdrop_cuda_emulation.*, with the device-generic op
// bodies (dropout_ops.h) unchanged and a backend whose run() executes the
// CUDA launch plan (cuda/launch_plan.h) by calling the kernels' thread
// bodies (cuda/thread_bodies.h) for every block and thread of every launch,
// block-level phases in order. tests/test_cuda_emulation.py compares the
// results bit for bit with the CPU kernels.
//
// Built by the tests with torch.utils.cpp_extension.load; not part of the
// package.
#include <ATen/CPUGeneratorImpl.h>
#include <torch/library.h>

#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <vector>

#include "cuda/launch_plan.h"
#include "cuda/philox_state.h"
#include "dropout_ops.h"
#include "schemas.h"
#include "subnormals.h"

namespace regdrop::cuda_emulation {
namespace {

using cuda::Grid;

// Lowered by set_launch_limits to reach the multi-launch and large-divisor
// paths with small tensors.
cuda::LaunchLimits limits;

// The kernels the emulation has run, named as .ci/sass_gate.py labels them,
// so that a test can check every kernel the ops launch is covered.
std::set<std::string> kernels_run;
std::mutex kernels_run_mutex;

template <class T>
const char* dtype_name() {
  if constexpr (std::is_same_v<T, float>) return "fp32";
  if constexpr (std::is_same_v<T, double>) return "fp64";
  if constexpr (std::is_same_v<T, cuda::Half>) return "fp16";
  if constexpr (std::is_same_v<T, cuda::BFloat16>) return "bf16";
}

// "bf16", or for the widening mix "bf16/fp32/bf16->fp32": input/residual/bias->output.
template <class O>
std::string operands_name() {
  using In = typename O::InT;
  if constexpr (std::is_same_v<O, OperandTypes<In>>) {
    return dtype_name<In>();
  } else {
    return std::string(dtype_name<In>()) + "/" + dtype_name<typename O::ResidualT>() + "/" +
           dtype_name<typename O::BiasT>() + "->" + dtype_name<typename O::OutT>();
  }
}

void record(const std::string& kernel) {
  std::lock_guard<std::mutex> lock(kernels_run_mutex);
  kernels_run.insert(kernel);
}

const char* const kEpilogues[] = {"Scale", "AddResidual", "AddBiasResidual"};
const char* const kBitSources[] = {"Draw", "Elements", "UnitPerGroup", "UnitRuns", "UnitChannelsLast", "DrawShard"};

// An Executor (launch_plan.h) that runs each launch's threads in turn.
struct Emulator {
  std::vector<std::unique_ptr<uint8_t[]>> buffers;

  template <class O, Epilogue E, cuda::BitSource S>
  void elementwise(const cuda::ElementwiseParams& p, Grid g) {
    record("elementwise " + operands_name<O>() + " " + kEpilogues[static_cast<int>(E)] + " " +
           kBitSources[static_cast<int>(S)]);
    for (uint32_t block = 0; block < g.blocks_x; ++block) {
      for (uint32_t thread = 0; thread < g.threads_x; ++thread) {
        cuda::elementwise_thread<O, E, S>(p, block * g.threads_x + thread);
      }
    }
  }

  template <cuda::BitSource S>
  void draw_mask(const cuda::DrawMaskParams& p, Grid g) {
    record(std::string("draw_mask ") + kBitSources[static_cast<int>(S)]);
    for (uint32_t block = 0; block < g.blocks_x; ++block) {
      for (uint32_t thread = 0; thread < g.threads_x; ++thread) {
        cuda::draw_mask_thread<S>(p, block * g.threads_x + thread);
      }
    }
  }

  template <class T>
  void column_sums(const cuda::ColumnSumParams& p, Grid g) {
    record(std::string("column_sums ") + dtype_name<T>());
    for (uint32_t chunk = 0; chunk < g.blocks_y; ++chunk) {
      for (uint32_t tile = 0; tile < g.blocks_x; ++tile) {
        // Shared memory starts as NaN: a sum read before it is written shows.
        cuda::ColumnSumShared<T> shared;
        std::fill(std::begin(shared.sums), std::end(shared.sums),
                  std::numeric_limits<cuda::Accumulator<T>>::quiet_NaN());
        for (uint32_t y = 0; y < g.threads_y; ++y) {
          for (uint32_t x = 0; x < g.threads_x; ++x) cuda::column_sum_accumulate<T>(p, tile, chunk, x, y, shared);
        }
        // __syncthreads()
        for (uint32_t y = 0; y < g.threads_y; ++y) {
          for (uint32_t x = 0; x < g.threads_x; ++x) cuda::column_sum_fold_lanes<T>(p, tile, chunk, x, y, shared);
        }
      }
    }
  }

  template <class T>
  void fold_chunks(const void* partial, void* result, const ColumnSumPlan& plan, Grid g) {
    record(std::string("fold_chunks ") + dtype_name<T>());
    for (uint32_t block = 0; block < g.blocks_x; ++block) {
      for (uint32_t thread = 0; thread < g.threads_x; ++thread) {
        cuda::fold_chunks_thread<T>(partial, result, plan, static_cast<int64_t>(block) * g.threads_x + thread);
      }
    }
  }

  // Device memory a call borrows; NaN-filled bytes (0xFF), 16-byte aligned.
  void* workspace(size_t bytes) {
    buffers.emplace_back(new uint8_t[bytes + 16]);
    uint8_t* base = buffers.back().get();
    std::memset(base, 0xFF, bytes + 16);
    return base + (16 - reinterpret_cast<uintptr_t>(base) % 16) % 16;
  }
};

// Stand-ins for at::PhiloxCudaState and for what at::CUDAGeneratorImpl's
// philox_cuda_state does with it, eager and under graph capture, so that
// the CUDA backend's generator code (cuda/philox_state.h) runs here.
struct PhiloxCudaStateStandIn {
  union Payload {
    uint64_t val;
    int64_t* ptr;
  };
  Payload seed_{};
  Payload offset_{};
  uint32_t offset_intragraph_ = 0;
  bool captured_ = false;
};

struct CudaGeneratorStandIn {
  std::mutex mutex_;
  uint64_t seed = 0;
  uint64_t offset = 0;  // the next eager call's
  bool capturing = false;
  // Under capture: the tensors a replay fills with the seed and offset
  // before running the graph, and the next call's offset within the graph.
  int64_t seed_extragraph = 0;
  int64_t offset_extragraph = 0;
  uint32_t offset_intragraph = 0;

  PhiloxCudaStateStandIn philox_cuda_state(uint64_t increment) {
    PhiloxCudaStateStandIn state;
    if (capturing) {
      state.seed_.ptr = &seed_extragraph;
      state.offset_.ptr = &offset_extragraph;
      state.offset_intragraph_ = offset_intragraph;
      state.captured_ = true;
      offset_intragraph += static_cast<uint32_t>(increment);
    } else {
      state.seed_.val = seed;
      state.offset_.val = offset;
      offset += increment;
    }
    return state;
  }
};

// Where the emulated ops take a stream when the call names no seed: the CPU
// generator (the default), or the CUDA generator stand-in.
bool use_cuda_generator_stand_in = false;
CudaGeneratorStandIn cuda_generator;

struct EmulatedCudaBackend {
  static constexpr bool kLaunches = true;

  // By default as the CPU backend, a fresh 64-bit seed from the CPU
  // generator and offset 0, so that a generator gives both backends the same
  // stream; or the CUDA backend's way, from the CUDA generator stand-in.
  static PhiloxSource generator_source(const std::optional<at::Generator>& generator, at::Device) {
    if (use_cuda_generator_stand_in) return cuda::next_philox_source(cuda_generator);
    auto* gen = at::get_generator_or_default<at::CPUGeneratorImpl>(generator, at::detail::getDefaultCPUGenerator());
    std::lock_guard<std::mutex> lock(gen->mutex_);
    PhiloxSource source;
    source.seed = gen->random64();
    return source;
  }

  // Subnormals kept, as on a GPU (subnormals.h).
  static void run(const KernelCall& c) {
    const KeepSubnormals keep;
    Emulator emulator;
    cuda::launch(c, emulator, limits);
  }
};

void set_launch_limits(int64_t max_launch_elements, int64_t divisor_limit) {
  TORCH_CHECK(max_launch_elements > 0 && max_launch_elements % 8 == 0 && max_launch_elements <= divisor_limit &&
                  divisor_limit <= (int64_t{1} << 31),
              "launch limits: a multiple of 8, at most divisor_limit <= 2^31");
  limits.max_launch_elements = max_launch_elements;
  limits.divisor_limit = static_cast<uint32_t>(divisor_limit);
}

// Calls that name no seed draw from the CUDA generator stand-in, at `seed`
// and `offset`: eager, or as the kernels of one captured graph replayed with
// that seed and offset (graph = true).
void use_cuda_generator(int64_t seed, int64_t offset, bool graph) {
  std::lock_guard<std::mutex> lock(cuda_generator.mutex_);
  cuda_generator.seed = static_cast<uint64_t>(seed);
  cuda_generator.offset = static_cast<uint64_t>(offset);
  cuda_generator.capturing = graph;
  cuda_generator.seed_extragraph = seed;
  cuda_generator.offset_extragraph = offset;
  cuda_generator.offset_intragraph = 0;
  use_cuda_generator_stand_in = true;
}

void use_cpu_generator() { use_cuda_generator_stand_in = false; }

std::vector<std::string> take_kernels_run() {
  std::lock_guard<std::mutex> lock(kernels_run_mutex);
  std::vector<std::string> names(kernels_run.begin(), kernels_run.end());
  kernels_run.clear();
  return names;
}

}  // namespace
}  // namespace regdrop::cuda_emulation

TORCH_LIBRARY(regdrop_cuda_emulation, m) {
  regdrop::define_ops(m);
  m.def("set_launch_limits(int max_launch_elements=1073741824, int divisor_limit=2147483648) -> ()",
        &regdrop::cuda_emulation::set_launch_limits);
  // The kernels run since the last call, by name.
  m.def("take_kernels_run() -> str[]", &regdrop::cuda_emulation::take_kernels_run);
  m.def("use_cuda_generator(int seed, int offset, bool graph) -> ()", &regdrop::cuda_emulation::use_cuda_generator);
  m.def("use_cpu_generator() -> ()", &regdrop::cuda_emulation::use_cpu_generator);
}

TORCH_LIBRARY_IMPL(regdrop_cuda_emulation, CPU, m) {
  regdrop::register_ops<regdrop::cuda_emulation::EmulatedCudaBackend>(m);
}
