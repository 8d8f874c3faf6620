// Where an op's output lies in memory, and how the kernels walk its operands.
//
// The output takes the layout torch gives the op it replaces: that of
// empty_like(input), i.e. the input's strides when it is dense (any
// permutation: contiguous, channels_last, transposed), and when it is not (a
// sliced view, an expanded tensor) dense strides in the order of its own
// (channels-last for a sliced channels-last tensor, contiguous for an
// expanded one). Residual
// forms do the same when input and residual share their strides, as eager
// `residual + dropout(input)` does; operands with different layouts give a
// contiguous output.
//
// A kernel reads and writes its tensors element by element in memory order,
// so the operands it walks share the output's layout, where the unit kind
// allows walking it (UnitLayout): element units walk any dense layout;
// samples need dim 0 outermost; channels a contiguous layout, or a
// channels-last-like one with 8 to 2^31 - 1 channels (whose groups of 8
// elements span at most two runs of channels, as the CUDA kernels need);
// a bias (along the last dim) contiguous rows. Elsewhere the kernels walk
// contiguous copies, and the result is copied into the output's layout.
//
// So element units are numbered in the memory order of the output, but for
// bias_dropout_add, whose units are numbered row-major (its kernels walk
// contiguous rows); samples by index n, channels by n * C + c, whatever the
// layout.
//
// Sizes are SymInts: the op bodies run on the Meta key too (csrc/dropout_ops.h).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/empty_strided.h>
#include <c10/util/safe_numerics.h>

#include <optional>
#include <vector>

#include "include/regdrop/manifest.h"
#include "kernel_call.h"

namespace regdrop {

struct Walk {
  at::Tensor input;     // as the kernels walk it
  at::Tensor residual;  // undefined when the op has none
  c10::SymInt unit_count = 0;
  // The output's strides where they differ from the walked operands' (the
  // result is then copied into them), else none.
  std::optional<std::vector<c10::SymInt>> output_strides;

  // A new tensor in the walked layout: the operands' strides, those of
  // size-1 dimensions included (empty_like would normalize them under a fake
  // tensor, and the meta kernels must give the real ones' strides).
  at::Tensor new_output(at::ScalarType dtype) const {
    return at::empty_strided_symint(input.sym_sizes(), input.sym_strides(), input.options().dtype(dtype));
  }

  // `out`, written in the walked layout, in the output's.
  at::Tensor output(const at::Tensor& out) const {
    if (!output_strides.has_value()) return out;
    return at::empty_strided_symint(out.sym_sizes(), *output_strides, out.options()).copy_(out);
  }
};

namespace walk_detail {

// Whether the kernels can walk dense `x` in memory order with `unit` units
// (rows: a bias along the last dim).
inline bool walkable(const at::Tensor& x, UnitKind unit, bool rows) {
  if (rows) return x.is_contiguous();
  switch (unit) {
    case UnitKind::Element:
      return true;
    case UnitKind::Sample: {
      const c10::SymInt n = x.sym_size(0);
      return n <= 1 || x.sym_stride(0) * n == x.sym_numel();  // dim 0 outermost in memory
    }
    case UnitKind::Channel: {
      if (x.is_contiguous()) return true;
      const c10::SymInt c = x.sym_size(1);
      return c >= 8 && c < (int64_t{1} << 31) && x.movedim(1, -1).is_contiguous();  // (N, *, C) in memory
    }
  }
  return false;
}

// The strides of a contiguous tensor of `like`'s sizes in `format`, read off
// a meta tensor: nothing is allocated.
inline std::vector<c10::SymInt> strides_in(const at::Tensor& like, at::MemoryFormat format) {
  return at::empty_symint(like.sym_sizes(), like.options().device(at::kMeta), format).sym_strides().vec();
}

// Dense strides that keep the order of `t`'s strides: what empty_like(t)
// gives a strided tensor that is not dense (ATen's infer_dense_strides, and
// TensorIterator's order: dims sorted by stride, a stride of 0 ambiguous,
// equal strides by size; size-1 dims take strides but no room), here on
// SymInts.
inline std::vector<c10::SymInt> dense_strides_like(const at::Tensor& t) {
  const size_t ndim = static_cast<size_t>(t.dim());
  const c10::SymIntArrayRef sizes = t.sym_sizes(), strides = t.sym_strides();
  std::vector<size_t> perm(ndim);  // innermost first: n - 1, ..., 0 before sorting
  for (size_t i = 0; i < ndim; ++i) perm[i] = ndim - 1 - i;
  auto should_swap = [&](size_t a, size_t b) {  // 1: a goes after b; -1: before; 0: ambiguous
    if (strides[a] == 0 || strides[b] == 0) return 0;
    if (strides[a] < strides[b]) return -1;
    if (strides[a] > strides[b]) return 1;
    return sizes[a] > sizes[b] ? 1 : 0;
  };
  for (size_t i = 1; i < ndim; ++i) {  // a stable insertion sort, as ATen's
    size_t b = i;
    for (size_t j = 1; j <= i; ++j) {
      const size_t a = i - j;
      const int comparison = should_swap(perm[a], perm[b]);
      if (comparison > 0) {
        std::swap(perm[a], perm[b]);
        b = a;
      } else if (comparison < 0) {
        break;
      }
    }
  }
  std::vector<c10::SymInt> out(ndim);
  c10::SymInt next = 1;
  for (size_t k : perm) {
    out[k] = next;
    if (sizes[k] > 1) next = next * sizes[k];
  }
  return out;
}

// `t` with `strides`: itself, or a copy.
inline at::Tensor with_strides(const at::Tensor& t, c10::SymIntArrayRef strides) {
  if (t.sym_strides() == strides) return t;
  return at::empty_strided_symint(t.sym_sizes(), strides, t.options()).copy_(t);
}

inline c10::SymInt unit_count(const at::Tensor& x, UnitKind unit) {
  switch (unit) {
    case UnitKind::Sample:
      return x.sym_size(0);
    case UnitKind::Channel: {
      const c10::SymInt n = x.sym_size(0), c = x.sym_size(1);
      const std::optional<int64_t> n_int = n.maybe_as_int(), c_int = c.maybe_as_int();
      int64_t units = 0;
      TORCH_CHECK(!n_int || !c_int || !c10::mul_overflows(*n_int, *c_int, &units), "input of shape ",
                  x.sym_sizes(), " has more than 2^63 - 1 channels (N * C)");
      return n * c;
    }
    case UnitKind::Element:
      return x.sym_numel();
  }
  return 0;
}

}  // namespace walk_detail

// `residual`, when defined, has been checked to match `input` in shape.
inline Walk plan_walk(const at::Tensor& input, const at::Tensor& residual, UnitKind unit, bool rows = false) {
  using namespace walk_detail;
  Walk w;
  w.unit_count = unit_count(input, unit);
  const bool shared = !residual.defined() || residual.sym_strides() == input.sym_strides();
  const bool dense = input.is_non_overlapping_and_dense();
  if (shared && dense && walkable(input, unit, rows)) {  // the common case: as they are
    w.input = input;
    w.residual = residual;
    return w;
  }
  std::vector<c10::SymInt> output = !shared ? strides_in(input, at::MemoryFormat::Contiguous)
                                    : dense ? input.sym_strides().vec()
                                            : dense_strides_like(input);
  const at::Tensor layout = at::empty_strided_symint(input.sym_sizes(), output, input.options().device(at::kMeta));
  std::vector<c10::SymInt> walked =
      walkable(layout, unit, rows) ? output : strides_in(input, at::MemoryFormat::Contiguous);
  w.input = with_strides(input, walked);
  w.residual = residual.defined() ? with_strides(residual, walked) : residual;
  if (walked != output) w.output_strides = std::move(output);
  return w;
}

// Which unit each element of a walked tensor belongs to (kernel_call.h), for
// kernels that read memory: sizes are concrete there.
inline UnitLayout unit_layout(const at::Tensor& x, UnitKind unit) {
  switch (unit) {
    case UnitKind::Element:
      return UnitLayout{};
    case UnitKind::Sample: {
      const int64_t n = x.size(0);
      const int64_t per_sample = n == 0 ? 0 : x.numel() / n;
      return UnitLayout{per_sample, 1, per_sample};
    }
    case UnitKind::Channel: {
      const int64_t n = x.size(0), c = x.size(1);
      const int64_t spatial = n * c == 0 ? 0 : x.numel() / (n * c);
      if (x.is_contiguous()) return UnitLayout{spatial, c, c * spatial};
      return UnitLayout{1, c, c * spatial};  // channels-last-like (walkable)
    }
  }
  return UnitLayout{};
}

}  // namespace regdrop
