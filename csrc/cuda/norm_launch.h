// How a norm call becomes CUDA launches: host code with no CUDA or ATen
// types, run by the real launcher (norm_kernels.cu) and by the host
// emulation (tests/cuda_emulation/emulated_norm.cpp), as launch_plan.h is
// for the element family. An Executor provides
//
//   template <class T, class R, RowSource S, bool kCached>   // T: input/output, R: residual stream
//   void norm_forward(const NormForwardParams&, Grid);        // block = rows [block * slots, + slots)
//   template <class T, class R, bool kCached>
//   void norm_backward(const NormBackwardParams&, Grid);      // block = a chunk of the column plan
//   template <class T>
//   void fold_chunks(const void* partial, void* result, const ColumnSumPlan&, Grid);
//   template <BitSource S>
//   void draw_mask(const DrawMaskParams&, Grid);              // launch_plan.h's unit-mask draw
//   void* workspace(size_t bytes);
//
// Keep bits: the forward row kernels draw element bits themselves
// (RowSource::Draw). Unit masks (drop-path), a shard's element masks and a
// low-memory backward's are drawn first by the element family's draw_mask
// kernels, then read, as a backward call's mask is.
#pragma once

#include <cstdint>
#include <stdexcept>

#include "../norm/norm_call.h"
#include "../norm/row_order.h"
#include "launch_plan.h"
#include "norm_bodies.h"

namespace regdrop::cuda {

namespace norm_plan {

using norm::NormBackwardCall;
using norm::NormForwardCall;

inline RowShape row_shape(int64_t rows, int64_t hidden, norm::NormKind kind) {
  RowShape s;
  s.rows = rows;
  s.hidden = hidden;
  s.groups = static_cast<uint32_t>(norm::row_groups(hidden));
  s.threads = norm::threads_per_row(hidden);
  while ((1u << s.thread_shift) < s.threads) ++s.thread_shift;
  s.slots = norm::rows_per_block(hidden);
  s.inverse_hidden_f = norm::inverse_hidden<float>(hidden);
  s.inverse_hidden_d = norm::inverse_hidden<double>(hidden);
  s.layer = kind == norm::NormKind::Layer;
  return s;
}

// Rows of up to kRowGroupsPerThread groups per thread stay in registers.
inline bool cached(const RowShape& s) { return s.groups <= kRowGroupsPerThread * s.threads; }

inline bool aligned(const void* p) { return p == nullptr || plan_detail::aligned16(p); }

// The bits the row kernels read rather than draw: drawn here first, into
// the mask or (low-memory mode) a workspace. Forward kernels draw element
// bits themselves (`drawing_rows`); backward kernels always read them: a
// low-memory backward draws its mask again into a workspace (a byte per 8
// elements, for the call), which keeps Philox out of the backward kernels.
template <class Executor>
RowSource prepare_bits(const norm::RowBits& bits, RowBitsParams& out, int64_t numel, bool drawing_rows,
                       Executor& exec, const LaunchLimits& limits) {
  out.element_units = bits.element_units;
  out.rng = bits.rng;
  out.threshold = bits.threshold;
  out.mask_out = bits.mask_out;
  out.rng_state_out = bits.rng_state_out;
  out.mask_in = bits.mask_in;
  if (!bits.element_units) out.rows_per_unit = FastDivmod(static_cast<uint32_t>(bits.rows_per_unit));
  out.numel = numel;
  if (!bits.draw) return RowSource::Read;
  if (drawing_rows && bits.element_units && !bits.shard.sharded()) return RowSource::Draw;
  KernelCall d;
  d.numel = bits.units;
  d.rng = bits.rng;
  d.threshold = bits.threshold;
  d.shard = bits.shard;
  d.mask_out = bits.mask_out != nullptr ? bits.mask_out : static_cast<uint8_t*>(exec.workspace(mask_bytes(bits.units)));
  plan_detail::launch_draw_mask(d, exec, limits);
  out.mask_out = nullptr;
  out.mask_in = d.mask_out;
  return RowSource::Read;
}

template <class T, class R, class Executor>
void forward_typed(const NormForwardCall& c, Executor& exec, const LaunchLimits& limits) {
  NormForwardParams p;
  p.shape = row_shape(c.rows, c.hidden, c.kind);
  p.input = c.input;
  p.residual = c.residual;
  p.input_bias = c.input_bias;
  p.weight = c.weight;
  p.bias = c.bias;
  p.output = c.output;
  p.residual_out = c.residual_out;
  p.mean = c.mean;
  p.rstd = c.rstd;
  p.scale_f = static_cast<float>(c.scale);
  p.scale_d = c.scale;
  p.eps_f = static_cast<float>(c.eps);
  p.eps_d = c.eps;
  p.shape.vector = c.hidden % 8 == 0 && aligned(c.input) && aligned(c.residual) && aligned(c.output) &&
                   aligned(c.residual_out);
  p.shape.parameter_vector = c.hidden % 8 == 0 && aligned(c.input_bias) && aligned(c.weight) && aligned(c.bias);
  const RowSource source = prepare_bits(c.bits, p.bits, c.rows * c.hidden, true, exec, limits);
  if (c.rows == 0) return;  // samples without rows: their bits drawn, no row to run
  const Grid grid{static_cast<uint32_t>((c.rows + p.shape.slots - 1) / p.shape.slots), 1,
                  static_cast<uint32_t>(kRowBlockThreads), 1};
  const bool registers = cached(p.shape);
  if (source == RowSource::Draw) {
    if (registers) return exec.template norm_forward<T, R, RowSource::Draw, true>(p, grid);
    return exec.template norm_forward<T, R, RowSource::Draw, false>(p, grid);
  }
  if (registers) return exec.template norm_forward<T, R, RowSource::Read, true>(p, grid);
  exec.template norm_forward<T, R, RowSource::Read, false>(p, grid);
}

template <class C, class Executor>
void fold_parameter_grads(const NormBackwardCall& c, const ColumnSumPlan& plan, const void* partial, Executor& exec) {
  void* const grads[3] = {c.grad_weight, c.grad_bias, c.grad_input_bias};
  const ScalarKind dtypes[3] = {c.weight_dtype, c.bias_dtype, c.input_bias_dtype};
  const Grid grid{plan_detail::blocks_for(plan.cols, 256), 1, 256, 1};
  for (int k = 0; k < 3; ++k) {
    if (grads[k] == nullptr) continue;
    const void* sums = static_cast<const C*>(partial) + k * plan.chunks * plan.cols;
    if constexpr (std::is_same_v<C, double>) {
      exec.template fold_chunks<double>(sums, grads[k], plan, grid);
    } else if (dtypes[k] == ScalarKind::Half) {
      exec.template fold_chunks<Half>(sums, grads[k], plan, grid);
    } else if (dtypes[k] == ScalarKind::BFloat16) {
      exec.template fold_chunks<BFloat16>(sums, grads[k], plan, grid);
    } else {
      exec.template fold_chunks<float>(sums, grads[k], plan, grid);
    }
  }
}

template <class T, class R, class Executor>
void backward_typed(const NormBackwardCall& c, Executor& exec, const LaunchLimits& limits) {
  using C = Compute<T>;
  NormBackwardParams p;
  p.shape = row_shape(c.rows, c.hidden, c.kind);
  p.grad_output = c.grad_output;
  p.grad_residual_out = c.grad_residual_out;
  p.residual_out = c.residual_out;
  p.mean = c.mean;
  p.rstd = c.rstd;
  p.weight = c.weight;
  p.grad_input = c.grad_input;
  p.grad_residual = c.grad_residual;
  p.scale_f = static_cast<float>(c.scale);
  p.scale_d = c.scale;
  p.shape.vector = c.hidden % 8 == 0 && aligned(c.grad_output) && aligned(c.grad_residual_out) &&
                   aligned(c.residual_out) && aligned(c.grad_input) && aligned(c.grad_residual);
  p.shape.parameter_vector = c.hidden % 8 == 0 && aligned(c.weight);
  prepare_bits(c.bits, p.bits, c.rows * c.hidden, false, exec, limits);
  // float64 rows keep their parameter-gradient sums in global memory: in
  // registers, with the row, they would spill.
  constexpr bool kMayCache = !std::is_same_v<C, double>;
  const bool registers = kMayCache && cached(p.shape);
  // With parameter gradients, blocks are the column plan's chunks; without,
  // each holds one batch of rows.
  ColumnSumPlan plan;
  if (norm::wants_parameter_gradients(c)) {
    plan = norm::norm_column_plan(c.rows, c.hidden);
    p.partial = exec.workspace(static_cast<size_t>(3 * plan.chunks * plan.cols) * sizeof(C));
    p.chunk_rows = plan.chunk_rows;
    p.chunks = plan.chunks;
    if (!registers) {
      p.lane_sums = exec.workspace(static_cast<size_t>(3 * plan.chunks * p.shape.slots * 8 * p.shape.groups) * sizeof(C));
    }
  } else {
    p.chunk_rows = p.shape.slots;
    p.chunks = (c.rows + p.shape.slots - 1) / p.shape.slots;
  }
  const Grid grid{static_cast<uint32_t>(p.chunks), 1, static_cast<uint32_t>(kRowBlockThreads), 1};
  if constexpr (kMayCache) {
    if (registers) exec.template norm_backward<T, R, true>(p, grid);
  }
  if (!registers) exec.template norm_backward<T, R, false>(p, grid);
  if (p.partial != nullptr) fold_parameter_grads<C>(c, plan, p.partial, exec);
}

// The operand types: one dtype throughout, or a 16-bit input with a float32
// residual stream.
template <template <class, class> class Body, class Call, class Executor>
void dispatch(const Call& c, Executor& exec, const LaunchLimits& limits) {
  const bool wide = c.residual_dtype != c.dtype;
  switch (c.dtype) {
    case ScalarKind::Float:
      return Body<float, float>::run(c, exec, limits);
    case ScalarKind::Double:
      return Body<double, double>::run(c, exec, limits);
    case ScalarKind::Half:
      return wide ? Body<Half, float>::run(c, exec, limits) : Body<Half, Half>::run(c, exec, limits);
    case ScalarKind::BFloat16:
      return wide ? Body<BFloat16, float>::run(c, exec, limits) : Body<BFloat16, BFloat16>::run(c, exec, limits);
  }
}

template <class T, class R>
struct Forward {
  template <class Executor>
  static void run(const NormForwardCall& c, Executor& exec, const LaunchLimits& limits) {
    forward_typed<T, R>(c, exec, limits);
  }
};

template <class T, class R>
struct Backward {
  template <class Executor>
  static void run(const NormBackwardCall& c, Executor& exec, const LaunchLimits& limits) {
    backward_typed<T, R>(c, exec, limits);
  }
};

}  // namespace norm_plan

// Rows are numbered in 32 bits on the device (drop-path's sample of a row).
inline void check_rows(int64_t rows) {
  if (rows >= (int64_t{1} << 31)) throw std::invalid_argument("the CUDA norm kernels take fewer than 2^31 rows");
}

template <class Executor>
void launch_norm_forward(const norm::NormForwardCall& c, Executor& exec, const LaunchLimits& limits = {}) {
  check_rows(c.rows);
  norm_plan::dispatch<norm_plan::Forward>(c, exec, limits);
}

template <class Executor>
void launch_norm_backward(const norm::NormBackwardCall& c, Executor& exec, const LaunchLimits& limits = {}) {
  if (c.rows == 0) return;
  check_rows(c.rows);
  norm_plan::dispatch<norm_plan::Backward>(c, exec, limits);
}

}  // namespace regdrop::cuda
