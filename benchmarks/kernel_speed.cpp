// The CPU kernels alone (csrc/cpu/kernels.h), without torch: one KernelCall
// into buffers allocated and touched beforehand, so no page fault, no
// allocation and no dispatch is timed; and a Philox-only call (the mask bytes
// drawn, nothing else read or written) as the limit of what a drawing kernel
// can reach on this machine. Built and run by kernel_speed.py.
//
//   kernel_speed <mode> <dtype> <elements> <threads> <repeats> [isa]
//
// mode: copy (memcpy), philox, dropout, dropout_add, backward, drop_path,
// drop_path_add, channel, bias_grad, and the norm rows (csrc/cpu/
// norm_kernels.h, rows of 768, BERT-base's hidden size): norm_forward
// (dropout + residual + LayerNorm, the mask drawn), norm_backward (the input
// and residual gradients from a mask; no parameter gradients, whose sums
// across rows norm_cpu.cpp adds). dtype: fp32, bf16, fp16. isa: avx512,
// avx2, baseline (default: the widest this CPU has). Threads split the work
// as dropout_cpu.cpp does: groups in contiguous runs of whole blocks of 8; a
// bias gradient (rows of 4096) in runs of chunks, then the chunks folded.
// Prints the median and the best of `repeats` runs, in milliseconds, of the
// wall time and of the process's CPU time (on a shared machine the time
// threads spent descheduled is in the first only).
#include <omp.h>
#include <sys/mman.h>
#include <time.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "../csrc/cpu/kernel_isa.h"
#include "../csrc/cpu/norm_isa.h"

using namespace regdrop;

namespace {

struct Buffer {
  void* data = nullptr;
  explicit Buffer(size_t bytes) {
    const size_t size = std::max<size_t>(bytes, 64);
    const size_t huge = 2 << 20;
    data = std::aligned_alloc(huge, (size + huge - 1) / huge * huge);
    madvise(data, size, MADV_HUGEPAGE);  // as THP_MEM_ALLOC_ENABLE=1 does for torch
    std::memset(data, 0x3C, size);       // touched: no page fault is timed
  }
  ~Buffer() { std::free(data); }
};

ScalarKind kind_of(const std::string& dtype) {
  if (dtype == "bf16") return ScalarKind::BFloat16;
  if (dtype == "fp16") return ScalarKind::Half;
  return ScalarKind::Float;
}

// The copies (element and norm kernels) of one instruction set.
template <class Set>
Set for_isa(const std::string& isa, const Set& baseline, const Set& avx2, const Set& avx512) {
  __builtin_cpu_init();
  if (isa == "baseline") return baseline;
  if (isa == "avx2" || !__builtin_cpu_supports("avx512bw")) return avx2;
  return avx512;
}

constexpr int64_t kNormHidden = 768;

// Groups [0, groups) in `threads` contiguous ranges, as at::parallel_for splits them.
template <class F>
void split(int64_t groups, F&& body) {
#pragma omp parallel
  {
    const int64_t n = omp_get_num_threads(), t = omp_get_thread_num();
    const int64_t per = (groups + n - 1) / n;
    const int64_t begin = std::min(groups, t * per), end = std::min(groups, begin + per);
    if (begin < end) body(begin, end);
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 6) {
    std::fprintf(stderr, "usage: %s mode dtype elements threads repeats [isa]\n", argv[0]);
    return 2;
  }
  const std::string mode = argv[1], dtype = argv[2];
  const int64_t numel = std::atoll(argv[3]);
  omp_set_num_threads(std::atoi(argv[4]));
  const int repeats = std::atoi(argv[5]);
  const std::string isa = argc > 6 ? argv[6] : "";
  const cpu::KernelSet kernels = for_isa(isa, cpu::baseline::kernels, cpu::avx2::kernels, cpu::avx512::kernels);
  const cpu::NormKernelSet norm_kernels =
      for_isa(isa, cpu::baseline::norm_kernels, cpu::avx2::norm_kernels, cpu::avx512::norm_kernels);
  const size_t element = dtype == "fp32" ? 4 : 2;
  const size_t bytes = static_cast<size_t>(numel) * element;

  const bool norm_rows = mode == "norm_forward" || mode == "norm_backward";
  Buffer in(bytes), out(bytes), residual(bytes), mask(static_cast<size_t>(mask_bytes(numel)));
  Buffer residual_out(norm_rows ? bytes : 0);
  std::memset(mask.data, 0xB7, static_cast<size_t>(mask_bytes(numel)));  // 6 of 8 kept
  KernelCall c;
  c.dtype = c.residual_dtype = c.bias_dtype = c.out_dtype = kind_of(dtype);
  c.numel = numel;
  c.in = in.data;
  c.out = out.data;
  c.scale = 1.0 / 0.9;
  c.threshold = keep_threshold(0.1);
  c.rng.seed = 12345;
  const int64_t samples = 16, hidden = 4096;
  if (mode == "philox") {
    c.out = nullptr;
    c.mask_out = static_cast<uint8_t*>(mask.data);
  } else if (mode == "dropout" || mode == "dropout_add") {
    c.mask_out = static_cast<uint8_t*>(mask.data);
    if (mode == "dropout_add") c.residual = residual.data, c.epilogue = Epilogue::AddResidual;
  } else if (mode == "backward" || mode == "bias_grad") {
    c.source = MaskSource::Elements;
    c.mask_in = static_cast<const uint8_t*>(mask.data);
  } else if (mode == "drop_path" || mode == "drop_path_add") {
    c.source = MaskSource::Units;
    c.mask_in = static_cast<const uint8_t*>(mask.data);
    c.units = UnitLayout{numel / samples, 1, numel / samples};
    c.unit_count = samples;
    if (mode == "drop_path_add") c.residual = residual.data, c.epilogue = Epilogue::AddResidual;
  } else if (mode == "channel") {
    c.source = MaskSource::Units;
    c.mask_in = static_cast<const uint8_t*>(mask.data);
    c.units = UnitLayout{hidden, numel / samples / hidden, numel / samples};
    c.unit_count = numel / hidden;
  } else if (mode != "copy" && !norm_rows) {
    std::fprintf(stderr, "unknown mode %s\n", mode.c_str());
    return 2;
  }
  std::vector<uint8_t> bias_grad(hidden * 8);
  ColumnSumPlan plan;
  std::vector<float> partial;
  if (mode == "bias_grad") {
    c.bias_len = hidden;
    c.bias_grad = bias_grad.data();
    plan = ColumnSumPlan::make(numel / hidden, hidden);
    partial.resize(plan.chunks * plan.cols);
  }

  // The norm rows: weight and bias (and the statistics) in float, the
  // compute type of every dtype here.
  const int64_t rows = numel / kNormHidden;
  std::vector<float> weight(kNormHidden, 1.25f), bias(kNormHidden, 0.5f), mean(rows), rstd(rows);
  auto rows_of = [&](auto& call) {  // what the forward and backward calls share
    call.dtype = call.residual_dtype = kind_of(dtype);
    call.rows = rows;
    call.hidden = kNormHidden;
    call.weight = weight.data();
    call.mean = mean.data();
    call.rstd = rstd.data();
    call.scale = c.scale;
    call.bits.units = rows * kNormHidden;
  };
  norm::NormForwardCall forward;
  rows_of(forward);
  forward.input = in.data;
  forward.residual = residual.data;
  forward.bias = bias.data();
  forward.output = out.data;
  forward.residual_out = residual_out.data;
  forward.bits.draw = true;
  forward.bits.rng = c.rng;
  forward.bits.threshold = c.threshold;
  forward.bits.mask_out = static_cast<uint8_t*>(mask.data);
  norm::NormBackwardCall backward;
  rows_of(backward);
  backward.grad_output = in.data;
  backward.residual_out = residual.data;
  backward.grad_input = out.data;
  backward.grad_residual = residual_out.data;
  backward.bits.mask_in = static_cast<const uint8_t*>(mask.data);
  if (mode == "norm_backward") norm_kernels.forward_rows(forward, 0, rows);  // the statistics and the mask

  auto run = [&] {
    if (mode == "norm_forward") {
      split(rows, [&](int64_t begin, int64_t end) { norm_kernels.forward_rows(forward, begin, end); });
    } else if (mode == "norm_backward") {
      split(rows, [&](int64_t begin, int64_t end) { norm_kernels.backward_rows(backward, begin, end, 1, nullptr); });
    } else if (mode == "copy") {
      split(numel / 8, [&](int64_t begin, int64_t end) {
        std::memcpy(static_cast<char*>(out.data) + begin * 8 * element,
                    static_cast<const char*>(in.data) + begin * 8 * element, (end - begin) * 8 * element);
      });
    } else if (mode == "bias_grad") {  // rows of 4096, chunks >= threads: as dropout_cpu.cpp splits them
      std::vector<float> scratch[64];
      split(plan.chunks, [&](int64_t begin, int64_t end) {
        const cpu::ColumnRange range{begin, end, 0, plan.cols};
        std::vector<float>& sums = scratch[omp_get_thread_num()];
        sums.resize(cpu::column_sum_slots(plan, range));
        kernels.column_sums(c, plan, range, omp_get_num_threads() > 1 ? partial.data() : nullptr, sums.data());
      });
      if (omp_get_max_threads() > 1) {
        split(plan.cols, [&](int64_t begin, int64_t end) { kernels.fold_chunks(c, plan, partial.data(), begin, end); });
      }
    } else {
      const int64_t groups = mask_bytes(numel);  // in blocks of 8 groups, as dropout_cpu.cpp splits them
      split((groups + 7) / 8, [&](int64_t begin, int64_t end) {
        kernels.run_groups(c, begin * 8, std::min(end * 8, groups));
      });
    }
  };
  run();  // warm-up
  // Wall time, and the process's CPU time (on a shared machine, time the
  // threads were descheduled is in the first, not the second).
  auto cpu_ms = [] {
    timespec t;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
    return t.tv_sec * 1e3 + t.tv_nsec * 1e-6;
  };
  std::vector<double> ms, cpu;
  for (int r = 0; r < repeats; ++r) {
    const auto start = std::chrono::steady_clock::now();
    const double cpu_start = cpu_ms();
    run();
    cpu.push_back(cpu_ms() - cpu_start);
    ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count());
  }
  std::sort(ms.begin(), ms.end());
  std::sort(cpu.begin(), cpu.end());
  std::printf("%s %s %lld %d median_ms %.4f best_ms %.4f cpu_median_ms %.4f cpu_best_ms %.4f\n", mode.c_str(),
              dtype.c_str(), static_cast<long long>(numel), omp_get_max_threads(), ms[ms.size() / 2], ms[0],
              cpu[cpu.size() / 2], cpu[0]);
  return 0;
}
