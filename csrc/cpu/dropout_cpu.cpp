// The CPU backend: a Philox stream from the CPU generator, and a KernelCall
// split across threads with at::parallel_for and run by the kernel copy for
// the widest instruction set both this CPU and PyTorch use (kernels.h).
//
// Masks depend only on each group's index, so the split does not change
// them; bias gradients are summed in the order column_sums.h fixes, so they
// depend neither on the thread count nor on the device. Every thread keeps
// subnormals while it runs a kernel (subnormals.h), as a GPU does.
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>

#include <mutex>
#include <vector>

#include "../dropout_ops.h"
#include "../subnormals.h"
#include "cpu_backend.h"
#include "kernel_isa.h"

namespace regdrop::cpu {
namespace {

constexpr int64_t kGrainGroups = 4096;  // 32K elements: below this, one thread

KernelSet select_kernels() {
#if defined(__x86_64__)
  return select_isa(baseline::kernels, avx2::kernels, avx512::kernels);
#else
  return baseline::kernels;
#endif
}

// A bias gradient: the plan's (chunk, tile) tasks in parallel, each writing
// its own accumulators, then the chunks added in order, column by column.
void run_column_sums(const KernelSet& kernels, const KernelCall& c) {
  const ColumnSumPlan plan = ColumnSumPlan::make(c.numel / c.bias_len, c.bias_len);
  const size_t accumulator = c.dtype == ScalarKind::Double ? sizeof(double) : sizeof(float);
  std::vector<uint8_t> partial(plan.chunks > 1 ? static_cast<size_t>(plan.chunks * plan.cols) * accumulator : 0);
  void* target = plan.chunks > 1 ? static_cast<void*>(partial.data()) : c.bias_grad;
  at::parallel_for(0, plan.chunks * plan.tiles, 1, [&](int64_t begin, int64_t end) {
    const KeepSubnormals keep;
    for (int64_t task = begin; task < end; ++task) kernels.column_sums(c, plan, task, target);
  });
  if (plan.chunks == 1) return;
  at::parallel_for(0, plan.cols, kGrainGroups, [&](int64_t begin, int64_t end) {
    const KeepSubnormals keep;
    kernels.fold_chunks(c, plan, partial.data(), begin, end);
  });
}

}  // namespace

PhiloxSource CpuBackend::generator_source(const std::optional<at::Generator>& generator, at::Device) {
  auto* gen = at::get_generator_or_default<at::CPUGeneratorImpl>(generator, at::detail::getDefaultCPUGenerator());
  std::lock_guard<std::mutex> lock(gen->mutex_);
  PhiloxSource source;
  source.seed = gen->random64();
  return source;
}

void CpuBackend::run(const KernelCall& c) {
  static const KernelSet kernels = select_kernels();
  if (c.rng_state_out != nullptr) {
    uint64_t seed, offset;
    c.rng.unpack(seed, offset);
    c.rng_state_out[0] = static_cast<int64_t>(seed);
    c.rng_state_out[1] = static_cast<int64_t>(offset);
  }
  if (c.bias_grad != nullptr) return run_column_sums(kernels, c);
  at::parallel_for(0, mask_bytes(c.numel), kGrainGroups, [&](int64_t begin, int64_t end) {
    const KeepSubnormals keep;
    kernels.run_groups(c, begin, end);
  });
}

}  // namespace regdrop::cpu

TORCH_LIBRARY_IMPL(regdrop, CPU, m) { regdrop::register_ops<regdrop::cpu::CpuBackend>(m); }
