// The device-generic body of every op: argument checks, memory layout,
// output allocation, and the KernelCall it runs. A Backend supplies what
// differs per device:
//
//   static PhiloxSource generator_source(const std::optional<at::Generator>&, at::Device);
//       locks the generator and reserves a Philox stream from it;
//   static void run(const KernelCall&);
//       runs the call on the current device (and stream).
//
// Each device's kernel file ends with
//   TORCH_LIBRARY_IMPL(regdrop, <Device>, m) { register_ops<Backend>(m); }
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "checks.h"
#include "kernel_call.h"

namespace regdrop {

inline ScalarKind scalar_kind(at::ScalarType t) {
  switch (t) {
    case at::kDouble:
      return ScalarKind::Double;
    case at::kHalf:
      return ScalarKind::Half;
    case at::kBFloat16:
      return ScalarKind::BFloat16;
    default:
      return ScalarKind::Float;
  }
}

// The tensor a kernel walks in memory order: `t` itself when its elements are
// dense in memory (contiguous, channels_last, transposed, ...), else a
// contiguous copy. empty_like() of the result has the same strides.
inline at::Tensor dense(const at::Tensor& t) {
  return t.is_non_overlapping_and_dense() ? t : t.contiguous();
}

// 1 / (1 - p); 0 for p == 1, where no element is kept and nothing may be inf.
inline double keep_scale(double p) { return p < 1.0 ? 1.0 / (1.0 - p) : 0.0; }

inline at::Tensor new_mask(int64_t units, const at::Tensor& like) {
  return at::empty({mask_bytes(units)}, like.options().dtype(at::kByte));
}

// A call that reads `in` and writes `out` element by element.
inline KernelCall elementwise_call(const at::Tensor& in, const at::Tensor& out, double scale) {
  KernelCall c;
  c.dtype = scalar_kind(in.scalar_type());
  c.numel = in.numel();
  c.in = in.const_data_ptr();
  c.out = out.mutable_data_ptr();
  c.scale = scale;
  return c;
}

template <class Backend>
PhiloxSource philox_source(const std::optional<at::Generator>& generator,
                           const std::optional<int64_t>& seed, int64_t offset, at::Device device) {
  if (!seed.has_value()) return Backend::generator_source(generator, device);
  PhiloxSource source;
  source.seed = static_cast<uint64_t>(*seed);
  source.offset = static_cast<uint64_t>(offset);
  return source;
}

// Draw a mask for the elements of `x`, write it to `mask` and x's dropout to `out`.
template <class Backend>
void draw_dropout(const at::Tensor& x, const at::Tensor& out, const at::Tensor& mask, double p,
                  const std::optional<at::Generator>& generator, const std::optional<int64_t>& seed,
                  int64_t offset) {
  if (x.numel() == 0) return;
  KernelCall c = elementwise_call(x, out, keep_scale(p));
  c.source = MaskSource::Draw;
  c.threshold = keep_threshold(p);
  c.mask_out = mask.mutable_data_ptr<uint8_t>();
  c.rng = philox_source<Backend>(generator, seed, offset, x.device());
  Backend::run(c);
}

template <class Backend>
std::tuple<at::Tensor, at::Tensor> dropout(const at::Tensor& input, double p,
                                           const std::optional<at::Generator>& generator,
                                           std::optional<int64_t> seed, int64_t offset) {
  check_floating(input, "input");
  check_probability(p);
  check_rng_args(generator, seed, offset);
  c10::DeviceGuard guard(input.device());
  const at::Tensor x = dense(input);
  at::Tensor out = at::empty_like(x);
  at::Tensor mask = new_mask(x.numel(), x);
  draw_dropout<Backend>(x, out, mask, p, generator, seed, offset);
  return {out, mask};
}

// In place: the kernel writes each element where it read it. An input whose
// elements are not dense goes through a contiguous copy, so its mask follows
// the contiguous (row-major) order.
template <class Backend>
at::Tensor dropout_inplace(const at::Tensor& input, double p,
                           const std::optional<at::Generator>& generator,
                           std::optional<int64_t> seed, int64_t offset) {
  check_floating(input, "input");
  check_probability(p);
  check_rng_args(generator, seed, offset);
  check_writable(input, "input");
  c10::DeviceGuard guard(input.device());
  const at::Tensor x = dense(input);
  at::Tensor mask = new_mask(x.numel(), x);
  draw_dropout<Backend>(x, x, mask, p, generator, seed, offset);
  if (!x.is_same(input)) input.copy_(x);
  return mask;
}

template <class Backend>
at::Tensor dropout_backward(const at::Tensor& grad, const at::Tensor& mask, double p) {
  check_floating(grad, "grad");
  check_probability(p);
  check_mask(mask, grad.numel(), grad, "grad");
  c10::DeviceGuard guard(grad.device());
  const at::Tensor g = dense(grad);
  at::Tensor out = at::empty_like(g);
  if (g.numel() == 0) return out;
  KernelCall c = elementwise_call(g, out, keep_scale(p));
  c.source = MaskSource::Elements;
  c.mask_in = mask.const_data_ptr<uint8_t>();
  Backend::run(c);
  return out;
}

template <class Backend>
void register_ops(torch::Library& m) {
  m.impl("dropout", TORCH_FN(dropout<Backend>));
  m.impl("dropout_", TORCH_FN(dropout_inplace<Backend>));
  m.impl("dropout_backward", TORCH_FN(dropout_backward<Backend>));
}

}  // namespace regdrop
