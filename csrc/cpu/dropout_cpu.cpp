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

#include <algorithm>
#include <memory>
#include <mutex>

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

// Memory kept per thread between calls, one buffer per use, so that repeated
// calls (one training step after another) allocate nothing. A thread keeps
// what its largest call needed: lanes x cols sums (at most kSumSlots), and
// for the calling thread the chunks' sums (at most 2^18 + cols accumulators
// by the plan: about 1 MB of floats).
enum class Scratch { Sums, ChunkSums };

template <Scratch kUse>
void* thread_scratch(size_t bytes) {
  thread_local std::unique_ptr<uint8_t[]> buffer;
  thread_local size_t size = 0;
  if (size < bytes) {
    buffer.reset(new uint8_t[bytes]);
    size = bytes;
  }
  return buffer.get();
}

// A bias gradient. Threads take whole rows, which memory streams best: each a
// run of chunks, whose sums wait in a chunks x cols buffer (bounded by the
// plan) to be added in order, column by column. With fewer chunks than
// threads they take columns instead, each adding all the chunks of its own.
void run_column_sums(const KernelSet& kernels, const KernelCall& c) {
  const ColumnSumPlan plan = ColumnSumPlan::make(c.numel / c.bias_len, c.bias_len);
  const size_t accumulator = c.dtype == ScalarKind::Double ? sizeof(double) : sizeof(float);
  auto sums = [&](const ColumnRange& range, void* partial) {
    const KeepSubnormals keep;
    void* scratch = thread_scratch<Scratch::Sums>(column_sum_slots(plan, range) * accumulator);
    kernels.column_sums(c, plan, range, partial, scratch);
  };
  const int64_t threads = c.numel < kGrainGroups * kUnitsPerGroup ? 1 : at::get_num_threads();
  if (plan.chunks < threads) {
    at::parallel_for(0, plan.cols, 1, [&](int64_t begin, int64_t end) {
      sums(ColumnRange{0, plan.chunks, begin, end}, nullptr);
    });
    return;
  }
  if (threads == 1) return sums(ColumnRange{0, plan.chunks, 0, plan.cols}, nullptr);
  void* partial = thread_scratch<Scratch::ChunkSums>(plan.chunks * plan.cols * accumulator);
  at::parallel_for(0, plan.chunks, 1, [&](int64_t begin, int64_t end) {
    sums(ColumnRange{begin, end, 0, plan.cols}, partial);
  });
  at::parallel_for(0, plan.cols, kGrainGroups, [&](int64_t begin, int64_t end) {
    const KeepSubnormals keep;
    kernels.fold_chunks(c, plan, partial, begin, end);
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
  // Threads start on whole blocks of 8 groups: at a 64-byte boundary of an
  // aligned output, whatever its dtype, for non-temporal stores (kernels.h).
  const int64_t groups = mask_bytes(c.numel);
  at::parallel_for(0, (groups + 7) / 8, kGrainGroups / 8, [&](int64_t begin, int64_t end) {
    const KeepSubnormals keep;
    kernels.run_groups(c, begin * 8, std::min(end * 8, groups));
  });
}

}  // namespace regdrop::cpu

TORCH_LIBRARY_IMPL(regdrop, CPU, m) { regdrop::register_ops<regdrop::cpu::CpuBackend>(m); }
