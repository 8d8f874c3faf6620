// The CPU backend: a Philox stream from the CPU generator, and a KernelCall
// split across threads with at::parallel_for and run by the kernel copy for
// the widest instruction set both this CPU and PyTorch use (kernels.h).
//
// Masks depend only on each group's index, so the split does not change
// them; bias gradients are summed over fixed chunks in a fixed order, so
// they do not depend on the thread count either.
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>

#include <mutex>
#include <vector>

#include "../dropout_ops.h"
#include "kernel_isa.h"

namespace regdrop::cpu {
namespace {

constexpr int64_t kGrainGroups = 4096;  // 32K elements: below this, one thread
constexpr int64_t kBiasGradChunks = 64;

// Follows at::get_cpu_capability(), which honours ATEN_CPU_CAPABILITY, so
// one environment variable selects PyTorch's kernels and these together.
RunGroupsFn select_kernels() {
#if defined(__x86_64__)
  const std::string capability = at::get_cpu_capability();
  __builtin_cpu_init();
  if (capability == "AVX512" && __builtin_cpu_supports("avx512f") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512dq")) {
    return avx512::run_groups;
  }
  if ((capability == "AVX512" || capability == "AVX2") && __builtin_cpu_supports("avx2") &&
      __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) {
    return avx2::run_groups;
  }
#endif
  return baseline::run_groups;
}

template <class Acc>
void run_with_bias_grad(RunGroupsFn run_groups, const KernelCall& c, int64_t groups) {
  const int64_t chunk = std::max(kGrainGroups, (groups + kBiasGradChunks - 1) / kBiasGradChunks);
  const int64_t chunks = (groups + chunk - 1) / chunk;
  std::vector<Acc> partial(static_cast<size_t>(chunks * c.bias_len), Acc(0));
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      run_groups(c, k * chunk, std::min(groups, (k + 1) * chunk), &partial[k * c.bias_len]);
    }
  });
  Acc* sums = static_cast<Acc*>(c.bias_grad);
  for (int64_t col = 0; col < c.bias_len; ++col) {
    Acc sum = 0;
    for (int64_t k = 0; k < chunks; ++k) sum += partial[k * c.bias_len + col];
    sums[col] = sum;
  }
}

}  // namespace

struct CpuBackend {
  // The CPU generator is a Mersenne Twister, not a Philox counter: each call
  // takes a fresh 64-bit seed from it and starts its stream at offset 0.
  static PhiloxSource generator_source(const std::optional<at::Generator>& generator, at::Device) {
    auto* gen = at::get_generator_or_default<at::CPUGeneratorImpl>(
        generator, at::detail::getDefaultCPUGenerator());
    std::lock_guard<std::mutex> lock(gen->mutex_);
    PhiloxSource source;
    source.seed = gen->random64();
    return source;
  }

  static void run(const KernelCall& c) {
    static const RunGroupsFn run_groups = select_kernels();
    if (c.rng_state_out != nullptr) {
      uint64_t seed, offset;
      c.rng.unpack(seed, offset);
      c.rng_state_out[0] = static_cast<int64_t>(seed);
      c.rng_state_out[1] = static_cast<int64_t>(offset);
    }
    const int64_t groups = mask_bytes(c.numel);
    if (c.bias_grad != nullptr) {
      if (c.dtype == ScalarKind::Double) {
        run_with_bias_grad<double>(run_groups, c, groups);
      } else {
        run_with_bias_grad<float>(run_groups, c, groups);
      }
      return;
    }
    at::parallel_for(0, groups, kGrainGroups,
                     [&](int64_t begin, int64_t end) { run_groups(c, begin, end, nullptr); });
  }
};

}  // namespace regdrop::cpu

TORCH_LIBRARY_IMPL(regdrop, CPU, m) { regdrop::register_ops<regdrop::cpu::CpuBackend>(m); }
