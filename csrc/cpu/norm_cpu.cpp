// The CPU backend of the norm ops (norm/norm_ops.h): the CPU generator's
// streams (CpuBackend), and each call's rows split across threads with
// at::parallel_for, run by the copy of the norm kernels for the widest
// instruction set (norm_kernels.h).
//
// Keep bits: the forward row kernels draw element masks as they go. Unit
// masks (drop-path: a bit per sample), the element masks of a shard of a
// larger call, and every mask a backward draws (low-memory mode) are drawn
// first, by the element family's drawing kernels (a bit-only KernelCall),
// then read, as on CUDA (cuda/norm_launch.h's prepare_bits).
//
// Parameter gradients: each chunk of the column plan (row_order.h) is one
// task, whose rows add into its lanes in row order; the lanes are folded in
// order into the chunk's partial sums, and the chunks in order into each
// gradient, rounded once to its dtype (fold_chunks_thread, the CUDA fold
// body, compiled here for the host). So the gradients depend on the shape
// alone, not on the thread count.
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "../cuda/thread_bodies.h"
#include "../norm/norm_ops.h"
#include "cpu_backend.h"
#include "norm_isa.h"

namespace regdrop::cpu {
namespace {

constexpr int64_t kGrainElements = 32768;  // below this, one thread

const NormKernelSet& norm_kernels() {
#if defined(__x86_64__)
  static const NormKernelSet& kernels = select_isa(baseline::norm_kernels, avx2::norm_kernels, avx512::norm_kernels);
#else
  static const NormKernelSet& kernels = baseline::norm_kernels;
#endif
  return kernels;
}

int64_t grain_rows(int64_t hidden) { return std::max<int64_t>(1, kGrainElements / hidden); }

// Draws the bits the row kernels do not draw themselves (unit masks and a
// shard's element masks) into the mask, or into `scratch` where there is
// none (low-memory mode), and makes the call read them. Records the stream.
void draw_ahead(norm::RowBits& b, std::vector<uint8_t>& scratch) {
  if (b.rng_state_out != nullptr) {
    uint64_t seed, offset;
    b.rng.unpack(seed, offset);
    b.rng_state_out[0] = static_cast<int64_t>(seed);
    b.rng_state_out[1] = static_cast<int64_t>(offset);
  }
  if (!b.draw || (b.element_units && !b.shard.sharded())) return;
  uint8_t* mask = b.mask_out;
  if (mask == nullptr) {
    scratch.assign(static_cast<size_t>(mask_bytes(b.units)), 0);
    mask = scratch.data();
  }
  KernelCall d;
  d.numel = b.units;
  d.rng = b.rng;
  d.threshold = b.threshold;
  d.mask_out = mask;
  d.shard = b.shard;
  CpuBackend::run(d);
  b.draw = false;
  b.mask_in = mask;
}

// Each column's lanes added in lane order, from +0; the loops run along the
// columns, which the compiler vectorizes without changing any column's order.
template <class C>
void fold_lanes_into(const C* lane_sums, uint32_t lanes, int64_t width, int64_t hidden, C* partial) {
  std::fill(partial, partial + hidden, C(0));
  for (uint32_t l = 0; l < lanes; ++l) {
    const C* lane = lane_sums + l * width;
    for (int64_t col = 0; col < hidden; ++col) partial[col] = norm::add_rn(partial[col], lane[col]);
  }
}

// A column's fold adds its chunks' partial sums: columns are split across
// threads by that work, not by their count.
template <class T>
void fold_chunks(const ColumnSumPlan& plan, const void* partial, void* result) {
  const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, plan.chunks));
  at::parallel_for(0, plan.cols, grain, [&](int64_t begin, int64_t end) {
    for (int64_t col = begin; col < end; ++col) cuda::fold_chunks_thread<T>(partial, result, plan, col);
  });
}

template <class C>
void fold_chunks_as(ScalarKind dtype, const ColumnSumPlan& plan, const void* partial, void* result) {
  if constexpr (std::is_same_v<C, double>) {
    return fold_chunks<double>(plan, partial, result);
  } else {
    switch (dtype) {
      case ScalarKind::Half:
        return fold_chunks<cuda::Half>(plan, partial, result);
      case ScalarKind::BFloat16:
        return fold_chunks<cuda::BFloat16>(plan, partial, result);
      default:
        return fold_chunks<float>(plan, partial, result);
    }
  }
}

// Backward with parameter gradients: chunks as tasks, then the folds.
template <class C>
void backward_with_parameter_grads(const norm::NormBackwardCall& c) {
  const ColumnSumPlan plan = norm::norm_column_plan(c.rows, c.hidden);
  const int64_t width = 8 * norm::row_groups(c.hidden);
  void* const grads[3] = {c.grad_weight, c.grad_bias, c.grad_input_bias};
  const ScalarKind dtypes[3] = {c.weight_dtype, c.bias_dtype, c.input_bias_dtype};
  std::vector<C> partial(static_cast<size_t>(3 * plan.chunks * plan.cols));
  at::parallel_for(0, plan.chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<C> lane_sums(static_cast<size_t>(3 * plan.lanes * width));
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      for (int k = 0; k < 3; ++k) {  // the wanted gradients' lanes start at +0
        if (grads[k] != nullptr) std::fill_n(lane_sums.data() + k * plan.lanes * width, plan.lanes * width, C(0));
      }
      const int64_t first = chunk * plan.chunk_rows;
      norm_kernels().backward_rows(c, first, std::min(c.rows, first + plan.chunk_rows), plan.lanes, lane_sums.data());
      for (int k = 0; k < 3; ++k) {
        if (grads[k] == nullptr) continue;
        fold_lanes_into(lane_sums.data() + k * plan.lanes * width, plan.lanes, width, plan.cols,
                        partial.data() + (k * plan.chunks + chunk) * plan.cols);
      }
    }
  });
  for (int k = 0; k < 3; ++k) {
    if (grads[k] != nullptr) fold_chunks_as<C>(dtypes[k], plan, partial.data() + k * plan.chunks * plan.cols, grads[k]);
  }
}

}  // namespace

struct CpuNormBackend : CpuBackend {
  static void run_norm_forward(norm::NormForwardCall c) {
    std::vector<uint8_t> scratch;
    draw_ahead(c.bits, scratch);
    at::parallel_for(0, c.rows, grain_rows(c.hidden),
                     [&](int64_t begin, int64_t end) { norm_kernels().forward_rows(c, begin, end); });
  }

  static void run_norm_backward(norm::NormBackwardCall c) {
    std::vector<uint8_t> scratch;
    draw_ahead(c.bits, scratch);
    if (norm::wants_parameter_gradients(c)) {
      return c.dtype == ScalarKind::Double ? backward_with_parameter_grads<double>(c)
                                           : backward_with_parameter_grads<float>(c);
    }
    at::parallel_for(0, c.rows, grain_rows(c.hidden),
                     [&](int64_t begin, int64_t end) { norm_kernels().backward_rows(c, begin, end, 1, nullptr); });
  }
};

}  // namespace regdrop::cpu

TORCH_LIBRARY_IMPL(regdrop, CPU, m) { regdrop::norm::register_norm_ops<regdrop::cpu::CpuNormBackend>(m); }
