// How an op walks its operands: in memory order, with one keep bit per unit.
//
// A kernel reads and writes its tensors element by element in memory order,
// so the input, the residual and the output must share one dense layout.
// Where they do (contiguous, channels_last, transposed, ...), they are used
// as they are and the output gets the same strides; otherwise the operands
// are made contiguous. The walk also says which unit each element belongs to
// (UnitLayout), which depends on the granularity and the layout:
//
//   Element  one unit per element, numbered in memory order;
//   Sample   one unit per slice along dim 0 (drop-path), numbered by index;
//   Channel  one unit per (n, c) of an (N, C, *) tensor, numbered n * C + c;
//            native for contiguous layouts, and for channels-last-like ones
//            with 8 to 2^31 - 1 channels, whose groups of 8 elements then
//            span at most two runs of channels (what the CUDA kernels use);
//   Rows     element units, contiguous layout (bias broadcast over the last dim).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/safe_numerics.h>

#include "kernel_call.h"

namespace regdrop {

enum class Granularity { Element, Sample, Channel, Rows };

struct Walk {
  at::Tensor input;
  at::Tensor residual;  // undefined when the op has none
  UnitLayout units;
  int64_t unit_count = 0;
};

namespace detail {

inline bool same_layout(const at::Tensor& a, const at::Tensor& b) {
  return !b.defined() || a.strides() == b.strides();
}

// The unit layout of `x` walked in memory order, if `x`'s layout allows it.
inline bool unit_layout(const at::Tensor& x, Granularity g, UnitLayout& out) {
  if (!x.is_non_overlapping_and_dense()) return false;
  switch (g) {
    case Granularity::Element:
      out = UnitLayout{};
      return true;
    case Granularity::Rows:
      out = UnitLayout{};
      return x.is_contiguous();
    case Granularity::Sample: {
      const int64_t n = x.size(0);
      const int64_t per_sample = n == 0 ? 0 : x.numel() / n;
      out = UnitLayout{per_sample, 1, per_sample};
      return n <= 1 || x.stride(0) == per_sample;  // dim 0 outermost in memory
    }
    case Granularity::Channel: {
      const int64_t n = x.size(0), c = x.size(1);
      const int64_t spatial = n * c == 0 ? 0 : x.numel() / (n * c);
      if (x.is_contiguous()) {
        out = UnitLayout{spatial, c, c * spatial};
        return true;
      }
      out = UnitLayout{1, c, c * spatial};
      return c >= 8 && c < (int64_t{1} << 31) && x.movedim(1, -1).is_contiguous();  // (N, *, C) in memory
    }
  }
  return false;
}

inline int64_t unit_count(const at::Tensor& x, Granularity g) {
  switch (g) {
    case Granularity::Sample:
      return x.size(0);
    case Granularity::Channel: {
      int64_t units = 0;
      TORCH_CHECK(!c10::mul_overflows(x.size(0), x.size(1), &units), "input of shape ", x.sizes(),
                  " has more than 2^63 - 1 channels (N * C)");
      return units;
    }
    default:
      return x.numel();
  }
}

}  // namespace detail

// `residual`, when defined, has been checked to match `input` in shape.
inline Walk plan_walk(const at::Tensor& input, const at::Tensor& residual, Granularity g) {
  Walk w;
  w.unit_count = detail::unit_count(input, g);
  if (detail::same_layout(input, residual) && detail::unit_layout(input, g, w.units)) {
    w.input = input;
    w.residual = residual;
    return w;
  }
  w.input = input.contiguous();
  w.residual = residual.defined() ? residual.contiguous() : residual;
  detail::unit_layout(w.input, g, w.units);
  return w;
}

}  // namespace regdrop
