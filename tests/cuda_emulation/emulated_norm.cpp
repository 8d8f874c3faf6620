// The CUDA norm kernels, run on the host: the norm ops (norm/norm_ops.h) are
// registered a second time, as torch.ops.regdrop_cuda_emulation.*, with a
// backend whose run_norm_*() executes the CUDA launch plan
// (cuda/norm_launch.h) by running the block programs of cuda/norm_bodies.h
// for every block of every launch, each phase for every thread in turn.
// tests/test_norm_emulation.py compares the results bit for bit with the CPU
// kernels. Built with emulated_backend.cpp into one test extension.
#include <ATen/CPUGeneratorImpl.h>
#include <torch/library.h>

#include <cstring>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <vector>

#include "cuda/norm_launch.h"
#include "norm/norm_ops.h"
#include "norm/norm_schemas.h"

namespace regdrop::cuda_emulation_norm {
namespace {

using cuda::Grid;
using cuda::RowSource;

// The kernels run, named as .ci/sass_gate.py labels them.
std::set<std::string> kernels_run;
std::mutex kernels_run_mutex;

void record(const std::string& kernel) {
  std::lock_guard<std::mutex> lock(kernels_run_mutex);
  kernels_run.insert(kernel);
}

template <class T>
std::string dtype_name() {
  if constexpr (std::is_same_v<T, float>) return "fp32";
  if constexpr (std::is_same_v<T, double>) return "fp64";
  if constexpr (std::is_same_v<T, cuda::Half>) return "fp16";
  if constexpr (std::is_same_v<T, cuda::BFloat16>) return "bf16";
}

// "bf16", or "bf16/fp32" for a 16-bit input with a float32 residual stream.
template <class T, class R>
std::string operands_name() {
  return std::is_same_v<T, R> ? dtype_name<T>() : dtype_name<T>() + "/" + dtype_name<R>();
}

template <RowSource S, bool kCached>
std::string variant_name() {
  return std::string(S == RowSource::Draw ? " Draw" : " Read") + (kCached ? " cached" : " streamed");
}

// A block of threads whose phases run thread after thread; each thread's
// registers are kept between phases. They start as 0xFF bytes (NaN), so
// that a value read before it is written shows.
template <class State>
struct HostBlock {
  std::vector<State> states;
  HostBlock() : states(static_cast<size_t>(norm::kRowBlockThreads)) {
    std::memset(static_cast<void*>(states.data()), 0xFF, sizeof(State) * states.size());
  }
  template <class F>
  void each(F&& f) {
    for (uint32_t t = 0; t < states.size(); ++t) f(t, states[t]);
  }
  void sync() {}
};

template <class Shared>
std::unique_ptr<Shared> nan_shared() {
  auto shared = std::make_unique<Shared>();
  std::memset(static_cast<void*>(shared.get()), 0xFF, sizeof(Shared));
  return shared;
}

// An Executor (cuda/norm_launch.h) that runs each launch's blocks in turn.
struct NormEmulator {
  std::vector<std::unique_ptr<uint8_t[]>> buffers;

  template <class T, class R, RowSource S, bool kCached>
  void norm_forward(const cuda::NormForwardParams& p, Grid g) {
    record("norm_forward " + operands_name<T, R>() + variant_name<S, kCached>());
    using Body = cuda::NormForwardBlock<T, R, S, kCached>;
    for (uint32_t block = 0; block < g.blocks_x; ++block) {
      HostBlock<typename Body::State> threads;
      auto shared = nan_shared<typename Body::Shared>();
      Body::run(p, block, threads, *shared);
    }
  }

  template <class T, class R, bool kCached>
  void norm_backward(const cuda::NormBackwardParams& p, Grid g) {
    record("norm_backward " + operands_name<T, R>() + variant_name<RowSource::Read, kCached>());
    using Body = cuda::NormBackwardBlock<T, R, kCached>;
    for (uint32_t block = 0; block < g.blocks_x; ++block) {
      HostBlock<typename Body::State> threads;
      auto shared = nan_shared<typename Body::Shared>();
      Body::run(p, block, threads, *shared);
    }
  }

  template <class T>
  void fold_chunks(const void* partial, void* result, const ColumnSumPlan& plan, Grid g) {
    record("norm_fold_chunks " + dtype_name<T>());
    for (uint32_t block = 0; block < g.blocks_x; ++block) {
      for (uint32_t thread = 0; thread < g.threads_x; ++thread) {
        cuda::fold_chunks_thread<T>(partial, result, plan, static_cast<int64_t>(block) * g.threads_x + thread);
      }
    }
  }

  template <cuda::BitSource S>
  void draw_mask(const cuda::DrawMaskParams& p, Grid g) {
    record(std::string("norm_draw_mask ") + (S == cuda::BitSource::Draw ? "Draw" : "DrawShard"));
    for (uint32_t block = 0; block < g.blocks_x; ++block) {
      for (uint32_t thread = 0; thread < g.threads_x; ++thread) {
        cuda::draw_mask_thread<S>(p, block * g.threads_x + thread);
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

struct EmulatedNormBackend {
  static constexpr bool kLaunches = true;

  // As the CPU backend: a fresh 64-bit seed from the CPU generator, offset 0,
  // so that a generator gives both backends the same stream.
  static PhiloxSource generator_source(const std::optional<at::Generator>& generator, at::Device) {
    auto* gen = at::get_generator_or_default<at::CPUGeneratorImpl>(generator, at::detail::getDefaultCPUGenerator());
    std::lock_guard<std::mutex> lock(gen->mutex_);
    PhiloxSource source;
    source.seed = gen->random64();
    return source;
  }

  static void run_norm_forward(const norm::NormForwardCall& c) {
    NormEmulator emulator;
    cuda::launch_norm_forward(c, emulator);
  }

  static void run_norm_backward(const norm::NormBackwardCall& c) {
    NormEmulator emulator;
    cuda::launch_norm_backward(c, emulator);
  }
};

std::vector<std::string> take_norm_kernels_run() {
  std::lock_guard<std::mutex> lock(kernels_run_mutex);
  std::vector<std::string> names(kernels_run.begin(), kernels_run.end());
  kernels_run.clear();
  return names;
}

}  // namespace
}  // namespace regdrop::cuda_emulation_norm

TORCH_LIBRARY_FRAGMENT(regdrop_cuda_emulation, m) {
  // The norm kernels run since the last call, by name (the ops are
  // emulated_backend.cpp's define_ops(), the norm family's included).
  m.def("take_norm_kernels_run() -> str[]", &regdrop::cuda_emulation_norm::take_norm_kernels_run);
}

TORCH_LIBRARY_IMPL(regdrop_cuda_emulation, CPU, m) {
  regdrop::norm::register_norm_ops<regdrop::cuda_emulation_norm::EmulatedNormBackend>(m);
}
