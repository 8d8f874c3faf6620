// How a KernelCall becomes CUDA launches: which kernel instantiation, which
// grid, and each launch's parameters. Host code with no CUDA or ATen types,
// run by two executors: the real launcher (kernels.cu) and the host
// emulation (tests/cuda_emulation), which thereby checks the launch shapes
// as well as the thread bodies. An Executor provides
//
//   template <class O, Epilogue E, BitSource S>              // O: OperandTypes<In, Residual, Bias, Out>
//   void elementwise(const ElementwiseParams&, Grid);   // thread = blockIdx.x * threads_x + threadIdx.x
//   template <BitSource S>                                 // Draw, or DrawShard for a shard
//   void draw_mask(const DrawMaskParams&, Grid);
//   template <class T>
//   void column_sums(const ColumnSumParams&, Grid);     // block (tile, chunk), thread (column group, lane)
//   template <class T>
//   void fold_chunks(const void* partial, void* result, const ColumnSumPlan&, Grid);
//   void* workspace(size_t bytes);                       // device memory for this call
//
// Only the combinations the ops launch are instantiated: drawing with every
// epilogue (forward), plainly or as a shard of a larger call (DrawShard: a
// kernel of its own, so that the plain ones carry no shard arithmetic),
// reading element masks with Scale (backward), reading unit masks with Scale
// (channel dropout, drop-path, their backward) and with the epilogues the
// manifest's unit ops have (drop_path_add: sample units with AddResidual);
// and the two mixes of dtypes for the residual forms: widening forward,
// narrowing (Scale) backward. So a new row of the manifest brings the
// kernels it needs.
#pragma once

#include <cstdint>
#include <algorithm>
#include <stdexcept>
#include <type_traits>

#include "../column_sums.h"
#include "../include/regdrop/manifest.h"
#include "../kernel_call.h"
#include "thread_bodies.h"

namespace regdrop::cuda {

struct Grid {
  uint32_t blocks_x = 1, blocks_y = 1;
  uint32_t threads_x = 1, threads_y = 1;
};

// Launches cover at most max_launch_elements elements, so that every index,
// and every remainder plus index, of a launch fits in 32 bits; divisors of
// divisor_limit and more are normalized (see normalize()). The emulation
// lowers both to reach these paths with small tensors.
struct LaunchLimits {
  int64_t max_launch_elements = int64_t{1} << 30;  // a multiple of 8, at most divisor_limit
  uint32_t divisor_limit = uint32_t{1} << 31;
};

namespace plan_detail {

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

inline int element_size(ScalarKind t) {
  return t == ScalarKind::Double ? 8 : t == ScalarKind::Float ? 4 : 2;
}

// (rem + e) / divisor for the elements e of a launch, as a 32-bit divisor
// and remainder. A divisor of `limit` or more, which a launch (at most
// `limit` elements) crosses at most once, becomes `limit`, with the
// remainder shifted so that quotients and the crossing stay put.
inline void normalize(int64_t divisor, int64_t rem, uint32_t limit, FastDivmod& div, uint32_t& rem32) {
  if (divisor < limit) {
    div = FastDivmod(static_cast<uint32_t>(divisor));
    rem32 = static_cast<uint32_t>(rem);
    return;
  }
  div = FastDivmod(limit);
  const int64_t before_limit = divisor - limit;
  rem32 = rem >= before_limit ? static_cast<uint32_t>(rem - before_limit) : 0;
}

inline uint32_t threads_for(ScalarKind t) { return element_size(t) == 2 ? 256 : 512; }

inline uint32_t blocks_for(int64_t threads_needed, uint32_t threads) {
  return static_cast<uint32_t>((threads_needed + threads - 1) / threads);
}

// How units lie in memory order (kernel_call.h): runs of `inner` elements
// (element, sample and contiguous channel units), or channels-last.
inline bool unit_runs(const UnitLayout& u) { return u.inner * u.channels == u.block; }

inline BitSource unit_source(const UnitLayout& u) {
  if (!unit_runs(u)) return BitSource::UnitChannelsLast;
  return u.inner % kUnitsPerGroup == 0 ? BitSource::UnitPerGroup : BitSource::UnitRuns;
}

// The unit walk of the launch whose first element is `first`, over a mask of
// `units` bits; advances `mask` to the byte of the launch's first unit.
inline UnitWalk unit_walk(const UnitLayout& u, int64_t units, int64_t first, uint32_t limit,
                          const uint8_t*& mask) {
  UnitWalk w;
  int64_t first_unit;
  if (unit_runs(u)) {
    first_unit = first / u.inner;
    normalize(u.inner, first % u.inner, limit, w.inner, w.inner_rem);
  } else {
    if (u.channels < kUnitsPerGroup || u.channels >= limit) {
      throw std::logic_error("a channels-last walk needs 8 to 2^31 - 1 channels (walk.h)");
    }
    first_unit = first / u.block * u.channels;
    w.channels = FastDivmod(static_cast<uint32_t>(u.channels));
    w.channel0 = static_cast<uint32_t>(first % u.channels);
    normalize(u.block, first % u.block, limit, w.block, w.block_rem);
  }
  mask += first_unit / 8;
  w.unit_offset = static_cast<uint32_t>(first_unit % 8);
  w.last_byte = static_cast<uint32_t>(std::min<int64_t>((units - 1) / 8 - first_unit / 8, UINT32_MAX));
  return w;
}

// A shard whose groups are groups of the larger call (thread_bodies.h's
// aligned_shard_keep_bits): launches start at multiples of 8 units.
inline bool aligned_shard(const ShardMap& m) {
  return m.first % kUnitsPerGroup == 0 && m.run % kUnitsPerGroup == 0 && m.stride % kUnitsPerGroup == 0;
}

// The shard walk of the launch whose first unit is `first`.
inline ShardWalk shard_walk(const ShardMap& m, int64_t first, uint32_t limit) {
  ShardWalk s;
  if (!m.sharded()) return s;
  const int64_t pos = first % m.run;
  s.unit0 = static_cast<uint64_t>(m.first + first / m.run * m.stride + pos);
  s.gap = static_cast<uint64_t>(m.stride - m.run);
  normalize(m.run, pos, limit, s.runs, s.rem);
  return s;
}

template <class O, Epilogue E, BitSource S, class Executor>
void launch_elementwise(const KernelCall& c, Executor& exec, const LaunchLimits& limits) {
  const int in_size = element_size(c.dtype), out_size = element_size(c.out_dtype);
  const int residual_size = element_size(c.residual_dtype), bias_size = element_size(c.bias_dtype);
  const uint32_t threads = threads_for(c.dtype);
  for (int64_t first = 0; first < c.numel; first += limits.max_launch_elements) {
    const int64_t count = std::min(limits.max_launch_elements, c.numel - first);
    ElementwiseParams p;
    p.in = static_cast<const uint8_t*>(c.in) + first * in_size;
    p.out = static_cast<uint8_t*>(c.out) + first * out_size;
    if (c.residual != nullptr) p.residual = static_cast<const uint8_t*>(c.residual) + first * residual_size;
    p.numel = static_cast<uint32_t>(count);
    p.groups = static_cast<uint32_t>(mask_bytes(count));
    p.scale_f = static_cast<float>(c.scale);
    p.scale_d = c.scale;
    p.vector = aligned16(p.in) && aligned16(p.out) && (p.residual == nullptr || aligned16(p.residual));
    if constexpr (draws(S)) {
      p.rng = c.rng;
      p.keys = philox_keys(c.rng.seed);
      p.threshold = c.threshold;
      p.group_base = static_cast<uint64_t>(first / kUnitsPerGroup);
      p.shard = shard_walk(c.shard, first, limits.divisor_limit);
      if constexpr (S == BitSource::DrawShard) p.vector = p.vector && aligned_shard(c.shard);
      if (c.mask_out != nullptr) p.mask_out = c.mask_out + first / kUnitsPerGroup;
      if (first == 0) p.rng_state_out = c.rng_state_out;
    } else if constexpr (S == BitSource::Elements) {
      p.mask_in = c.mask_in + first / kUnitsPerGroup;
    } else {
      const uint8_t* mask = c.mask_in;
      p.units = unit_walk(c.units, c.unit_count, first, limits.divisor_limit, mask);
      p.mask_in = mask;
    }
    if constexpr (E == Epilogue::AddBiasResidual) {
      const int64_t col = first % c.bias_len;
      p.bias_row = static_cast<const uint8_t*>(c.bias) + col * bias_size;
      p.bias_len = c.bias_len;
      normalize(c.bias_len, col, limits.divisor_limit, p.bias_rows, p.bias_rem);
      p.bias_vector = c.bias_len % kUnitsPerGroup == 0 && aligned16(c.bias);
    }
    exec.template elementwise<O, E, S>(p, Grid{blocks_for(p.groups, threads), 1, threads, 1});
  }
}

// A drawing call's kernels: a shard's, or the plain ones.
template <class O, Epilogue E, class Executor>
void launch_drawing(const KernelCall& c, Executor& exec, const LaunchLimits& limits) {
  if (c.shard.sharded()) return launch_elementwise<O, E, BitSource::DrawShard>(c, exec, limits);
  launch_elementwise<O, E, BitSource::Draw>(c, exec, limits);
}

// Whether a forward op of the manifest reads `unit` units with epilogue E:
// only those kernels are built (Scale always: every unit's backward).
constexpr bool manifest_reads_units(UnitKind unit, Epilogue e) {
  if (e == Epilogue::Scale) return true;
  for (const OpSpec& op : kOps) {
    const Epilogue epilogue = op.bias ? Epilogue::AddBiasResidual : op.residual ? Epilogue::AddResidual : Epilogue::Scale;
    if (op.is_forward() && op.unit == unit && epilogue == e) return true;
  }
  return false;
}

// Whether a backward op of the manifest narrows through `unit` units: that
// of a residual form, whose 16-bit input under a float32 residual gets its
// gradient from the float32 output's.
constexpr bool manifest_narrows_units(UnitKind unit) {
  for (const OpSpec& op : kOps) {
    if (op.is_forward() && op.unit == unit && op.residual) return true;
  }
  return false;
}

template <class O>
constexpr bool narrowing_operands() {
  return std::is_same_v<typename O::InT, float> && !std::is_same_v<typename O::OutT, float>;
}

template <class O, Epilogue E>
constexpr bool launches_units(UnitKind unit) {
  return narrowing_operands<O>() ? manifest_narrows_units(unit) : manifest_reads_units(unit, E);
}

// Units in runs of elements (samples, contiguous channels), or channels-last.
template <class O, Epilogue E, class Executor>
void launch_unit_source(const KernelCall& c, Executor& exec, const LaunchLimits& limits) {
  constexpr bool runs = launches_units<O, E>(UnitKind::Sample) || launches_units<O, E>(UnitKind::Channel);
  constexpr bool channels_last = launches_units<O, E>(UnitKind::Channel);
  const BitSource source = unit_source(c.units);
  if constexpr (runs) {
    if (source == BitSource::UnitPerGroup) return launch_elementwise<O, E, BitSource::UnitPerGroup>(c, exec, limits);
    if (source == BitSource::UnitRuns) return launch_elementwise<O, E, BitSource::UnitRuns>(c, exec, limits);
  }
  if constexpr (channels_last) {
    if (source == BitSource::UnitChannelsLast) {
      return launch_elementwise<O, E, BitSource::UnitChannelsLast>(c, exec, limits);
    }
  }
  throw std::logic_error("no CUDA kernel for these units with this epilogue (no op of the manifest reads them so)");
}

// The widening mix (kernel_call.h): 16-bit input T, float output; only the
// residual forms (drawn element masks, and drop_path_add's sample units).
template <class T, class Executor>
void launch_widening(const KernelCall& c, Executor& exec, const LaunchLimits& limits) {
  const bool float_residual = c.residual_dtype == ScalarKind::Float;
  const bool float_bias = c.bias_dtype == ScalarKind::Float;
  if (c.epilogue == Epilogue::AddResidual && c.source == MaskSource::Draw) {
    return launch_drawing<OperandTypes<T, float, T, float>, Epilogue::AddResidual>(c, exec, limits);
  }
  if (c.epilogue == Epilogue::AddResidual && c.source == MaskSource::Units) {
    return launch_unit_source<OperandTypes<T, float, T, float>, Epilogue::AddResidual>(c, exec, limits);
  }
  if (c.epilogue == Epilogue::AddBiasResidual && c.source == MaskSource::Units) {
    constexpr Epilogue E = Epilogue::AddBiasResidual;
    if (c.residual_dtype == ScalarKind::Float && c.bias_dtype == ScalarKind::Float) {
      return launch_unit_source<OperandTypes<T, float, float, float>, E>(c, exec, limits);
    }
    if (c.residual_dtype == ScalarKind::Float) return launch_unit_source<OperandTypes<T, float, T, float>, E>(c, exec, limits);
    return launch_unit_source<OperandTypes<T, T, float, float>, E>(c, exec, limits);
  }
  if (c.epilogue == Epilogue::AddBiasResidual && c.source == MaskSource::Draw) {
    constexpr Epilogue E = Epilogue::AddBiasResidual;
    if (float_residual && float_bias) {
      return launch_drawing<OperandTypes<T, float, float, float>, E>(c, exec, limits);
    }
    if (float_residual) return launch_drawing<OperandTypes<T, float, T, float>, E>(c, exec, limits);
    return launch_drawing<OperandTypes<T, T, float, float>, E>(c, exec, limits);
  }
  throw std::logic_error("no CUDA kernel for this mix of dtypes");
}

// The narrowing mix (kernel_call.h): a float32 grad through a mask into a
// 16-bit T gradient; the backward ops of the residual forms without a bias.
template <class T, class Executor>
void launch_narrowing(const KernelCall& c, Executor& exec, const LaunchLimits& limits) {
  using O = OperandTypes<float, float, float, T>;
  if (c.epilogue == Epilogue::Scale && c.bias_grad == nullptr) {
    switch (c.source) {
      case MaskSource::Draw:
        return launch_drawing<O, Epilogue::Scale>(c, exec, limits);
      case MaskSource::Elements:
        return launch_elementwise<O, Epilogue::Scale, BitSource::Elements>(c, exec, limits);
      case MaskSource::Units:
        return launch_unit_source<O, Epilogue::Scale>(c, exec, limits);
    }
  }
  throw std::logic_error("no CUDA kernel for this mix of dtypes");
}

template <class T, class Executor>
void launch_column_sums(const KernelCall& c, Executor& exec) {
  using Acc = Accumulator<T>;
  ColumnSumParams p;
  p.plan = ColumnSumPlan::make(c.numel / c.bias_len, c.bias_len);
  p.grad = c.in;
  p.out = c.out;
  p.mask = c.mask_in;
  p.scale_f = static_cast<float>(c.scale);
  p.scale_d = c.scale;
  p.vector = c.bias_len % kUnitsPerGroup == 0 && aligned16(c.in) && aligned16(c.out);
  const ColumnSumPlan& plan = p.plan;
  p.partial = plan.chunks == 1 ? c.bias_grad
                               : exec.workspace(static_cast<size_t>(plan.chunks * plan.cols) * sizeof(Acc));
  exec.template column_sums<T>(p, Grid{static_cast<uint32_t>(plan.tiles), static_cast<uint32_t>(plan.chunks),
                                       plan.column_groups, plan.lanes});
  if (plan.chunks > 1) {
    exec.template fold_chunks<T>(p.partial, c.bias_grad, plan,
                                 Grid{blocks_for(plan.cols, 256), 1, 256, 1});
  }
}

template <class T, class Executor>
void launch_typed(const KernelCall& c, Executor& exec, const LaunchLimits& limits) {
  using O = OperandTypes<T>;
  if (c.bias_grad != nullptr) return launch_column_sums<T>(c, exec);
  switch (c.source) {
    case MaskSource::Draw:
      switch (c.epilogue) {
        case Epilogue::Scale:
          return launch_drawing<O, Epilogue::Scale>(c, exec, limits);
        case Epilogue::AddResidual:
          return launch_drawing<O, Epilogue::AddResidual>(c, exec, limits);
        case Epilogue::AddBiasResidual:
          return launch_drawing<O, Epilogue::AddBiasResidual>(c, exec, limits);
      }
      break;
    case MaskSource::Elements:
      if (c.epilogue == Epilogue::Scale) {
        return launch_elementwise<O, Epilogue::Scale, BitSource::Elements>(c, exec, limits);
      }
      break;
    case MaskSource::Units:
      switch (c.epilogue) {
        case Epilogue::Scale:
          return launch_unit_source<O, Epilogue::Scale>(c, exec, limits);
        case Epilogue::AddResidual:
          return launch_unit_source<O, Epilogue::AddResidual>(c, exec, limits);
        case Epilogue::AddBiasResidual:
          return launch_unit_source<O, Epilogue::AddBiasResidual>(c, exec, limits);
      }
      break;
  }
  throw std::logic_error("no CUDA kernel for this mask source and epilogue");
}

template <class Executor>
void launch_draw_mask(const KernelCall& c, Executor& exec, const LaunchLimits& limits) {
  for (int64_t first = 0; first < c.numel; first += limits.max_launch_elements) {
    DrawMaskParams p;
    p.mask_out = c.mask_out + first / kUnitsPerGroup;
    p.rng = c.rng;
    p.keys = philox_keys(c.rng.seed);
    p.threshold = c.threshold;
    p.group_base = static_cast<uint64_t>(first / kUnitsPerGroup);
    p.shard = shard_walk(c.shard, first, limits.divisor_limit);
    p.units = static_cast<uint32_t>(std::min(limits.max_launch_elements, c.numel - first));
    const Grid grid{blocks_for(mask_bytes(p.units), 256), 1, 256, 1};
    if (c.shard.sharded()) {
      exec.template draw_mask<BitSource::DrawShard>(p, grid);
    } else {
      exec.template draw_mask<BitSource::Draw>(p, grid);
    }
  }
}

}  // namespace plan_detail

// Runs `c` through `exec`: element-wise kernels, a unit-mask draw (a call
// with a mask to draw and no output), or a bias gradient.
template <class Executor>
void launch(const KernelCall& c, Executor& exec, const LaunchLimits& limits = {}) {
  using namespace plan_detail;
  if (c.numel == 0) return;
  if (c.out == nullptr) return launch_draw_mask(c, exec, limits);
  if (c.out_dtype != c.dtype && c.dtype == ScalarKind::Float) {
    return c.out_dtype == ScalarKind::Half ? launch_narrowing<Half>(c, exec, limits)
                                           : launch_narrowing<BFloat16>(c, exec, limits);
  }
  if (c.out_dtype != c.dtype) {
    return c.dtype == ScalarKind::Half ? launch_widening<Half>(c, exec, limits)
                                       : launch_widening<BFloat16>(c, exec, limits);
  }
  switch (c.dtype) {
    case ScalarKind::Float:
      return launch_typed<float>(c, exec, limits);
    case ScalarKind::Double:
      return launch_typed<double>(c, exec, limits);
    case ScalarKind::Half:
      return launch_typed<Half>(c, exec, limits);
    case ScalarKind::BFloat16:
      return launch_typed<BFloat16>(c, exec, limits);
  }
}

}  // namespace regdrop::cuda
