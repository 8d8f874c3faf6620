// The device-generic body of every op: argument checks, memory layout,
// output allocation, and the KernelCall it runs. A Backend supplies what
// differs per device:
//
//   static PhiloxSource generator_source(const std::optional<at::Generator>&, at::Device);
//       locks the generator and reserves a Philox stream from it;
//   static void run(const KernelCall&);
//       runs the call on the current device (and stream);
//   static constexpr bool kHostMemory;
//       whether tensors live in host memory, where checks may read a mask's
//       or an rng_state's values without waiting for a device.
//
// Each device's kernel file ends with
//   TORCH_LIBRARY_IMPL(regdrop, <Device>, m) { register_ops<Backend>(m); }
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "checks.h"
#include "kernel_call.h"
#include "walk.h"

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

// 1 / q for the keep probability q = 1 - round(p * 2^16) / 2^16 that the
// threshold gives (philox.h), so that E[output] = input for every p; 0 where
// nothing is kept (p within 2^-17 of 1), so that nothing may be inf.
inline double keep_scale(double p) {
  const uint32_t threshold = keep_threshold(p);
  return threshold < 65536 ? 65536.0 / (65536 - threshold) : 0.0;
}

inline double drop_path_scale(double p, bool scale_by_keep) {
  return scale_by_keep ? keep_scale(p) : 1.0;
}

inline at::Tensor new_mask(int64_t units, const at::Tensor& like) {
  return at::empty({mask_bytes(units)}, like.options().dtype(at::kByte));
}

// A checked shard argument (check_shard) as the kernels take it.
inline ShardMap to_shard_map(at::OptionalIntArrayRef shard) {
  if (!shard.has_value()) return {};
  return ShardMap{(*shard)[0], (*shard)[1], (*shard)[2]};
}

// Where a random op's Philox stream comes from: the generator, or an explicit
// (seed, offset); and, for a shard of a larger call, where its units lie.
struct RngArgs {
  const std::optional<at::Generator>& generator;
  std::optional<int64_t> seed;
  int64_t offset;
  at::OptionalIntArrayRef shard;  // (first, run, stride): kernel_call.h's ShardMap

  void check() const { check_rng_args(generator, seed, offset); }

  ShardMap shard_map() const { return to_shard_map(shard); }

  template <class Backend>
  PhiloxSource source(at::Device device) const {
    if (!seed.has_value()) return Backend::generator_source(generator, device);
    PhiloxSource s;
    s.seed = static_cast<uint64_t>(*seed);
    s.offset = static_cast<uint64_t>(offset);
    return s;
  }
};

// A call that reads the walk's operands and writes `out`, element by element.
inline KernelCall apply_call(const Walk& w, const at::Tensor& out, const at::Tensor& bias,
                             double scale) {
  KernelCall c;
  c.dtype = scalar_kind(w.input.scalar_type());
  c.residual_dtype = scalar_kind(w.residual.defined() ? w.residual.scalar_type() : w.input.scalar_type());
  c.bias_dtype = scalar_kind(bias.defined() ? bias.scalar_type() : w.input.scalar_type());
  c.out_dtype = scalar_kind(out.scalar_type());
  c.numel = w.input.numel();
  c.in = w.input.const_data_ptr();
  c.out = out.mutable_data_ptr();
  c.scale = scale;
  c.units = w.units;
  c.unit_count = w.unit_count;
  if (w.residual.defined()) {
    c.residual = w.residual.const_data_ptr();
    c.epilogue = Epilogue::AddResidual;
  }
  if (bias.defined()) {
    c.bias = bias.const_data_ptr();
    c.bias_len = bias.numel();
    c.epilogue = Epilogue::AddBiasResidual;
  }
  return c;
}

// Draws one keep bit per unit of the walk into `mask` and writes the walk's
// epilogue into `out`. Element masks are drawn in the same pass (`mask` may
// then be null: low-memory mode, where `rng_state` records the stream
// instead); unit masks, a few bits per sample or channel, are drawn first by
// a drawing-only call, then applied.
//
// A call with no units takes no stream from the generator, unless it is a
// shard: the larger call it is part of takes one, and so must each of its
// shards, empty or not, for the ranks that hold them to stay in step.
template <class Backend>
void draw_and_apply(const Walk& w, Granularity g, const at::Tensor& out, const at::Tensor& bias,
                    double p, double scale, const RngArgs& rng, uint8_t* mask,
                    int64_t* rng_state = nullptr) {
  if (w.unit_count == 0 && !rng.shard.has_value()) return;
  const PhiloxSource source = rng.source<Backend>(w.input.device());
  if (w.unit_count == 0) return;
  auto drawing = [&](KernelCall c) {
    c.source = MaskSource::Draw;
    c.threshold = keep_threshold(p);
    c.rng = source;
    c.mask_out = mask;
    c.rng_state_out = rng_state;
    c.shard = rng.shard_map();
    return c;
  };
  if (g == Granularity::Element || g == Granularity::Rows) {
    return Backend::run(drawing(apply_call(w, out, bias, scale)));
  }
  KernelCall bits_only;
  bits_only.numel = w.unit_count;
  Backend::run(drawing(bits_only));
  if (w.input.numel() == 0) return;
  KernelCall c = apply_call(w, out, bias, scale);
  c.source = MaskSource::Units;
  c.mask_in = mask;
  Backend::run(c);
}

// Writes `mask`'s epilogue of the walk (backward: grad through the mask) into `out`.
inline KernelCall read_call(const Walk& w, Granularity g, const at::Tensor& out,
                            const at::Tensor& mask, double scale) {
  KernelCall c = apply_call(w, out, {}, scale);
  c.source = g == Granularity::Element || g == Granularity::Rows ? MaskSource::Elements
                                                                 : MaskSource::Units;
  c.mask_in = mask.const_data_ptr<uint8_t>();
  return c;
}

// Checked in torch's order: the probability first, then the tensors.
inline void check_forward(const at::Tensor& input, double p, const RngArgs& rng) {
  check_probability(p);
  check_floating(input, "input");
  rng.check();
}

// --------------------------------------------------------------- the ops

// The operands of a residual form, as the kernels take them. The output has
// eager's dtype, torch.result_type(input [, bias], residual). One dtype
// throughout, or the widening mix (a 16-bit input with float32 output and a
// float32 or input-dtype residual and bias: what autocast makes), runs as it
// is, in one pass; any other mix is cast to the output dtype first.
struct Operands {
  at::Tensor input, residual, bias;
  at::ScalarType out;
};

inline Operands promote(const at::Tensor& input, const at::Tensor& residual, const at::Tensor& bias) {
  at::ScalarType out = input.scalar_type();
  if (bias.defined()) out = c10::promoteTypes(out, bias.scalar_type());
  if (residual.defined()) out = c10::promoteTypes(out, residual.scalar_type());
  const at::ScalarType in = input.scalar_type();
  auto is = [&](const at::Tensor& t, at::ScalarType a, at::ScalarType b) {
    return !t.defined() || t.scalar_type() == a || t.scalar_type() == b;
  };
  const bool uniform = out == in && is(residual, in, in) && is(bias, in, in);
  const bool widening = (in == at::kHalf || in == at::kBFloat16) && out == at::kFloat &&
                        is(residual, in, out) && is(bias, in, out);
  if (uniform || widening) return {input, residual, bias, out};
  auto cast = [&](const at::Tensor& t) { return t.defined() ? t.to(out) : t; };
  return {cast(input), cast(residual), cast(bias), out};
}

// A forward op that returns (output, mask), for any granularity and epilogue.
template <class Backend>
std::tuple<at::Tensor, at::Tensor> masked_forward(Granularity g, const at::Tensor& input_,
                                                  const at::Tensor& residual_,
                                                  const at::Tensor& bias_, double p, double scale,
                                                  const RngArgs& rng) {
  c10::DeviceGuard guard(input_.device());
  const auto [input, residual, bias, out_dtype] = promote(input_, residual_, bias_);
  const Walk w = plan_walk(input, residual, g);
  check_shard(rng.shard, w.unit_count);
  at::Tensor out = at::empty_like(w.input, w.input.options().dtype(out_dtype));
  at::Tensor mask = new_mask(w.unit_count, w.input);
  draw_and_apply<Backend>(w, g, out, bias.defined() ? bias.contiguous() : bias, p, scale, rng,
                          mask.mutable_data_ptr<uint8_t>());
  return {out, mask};
}

// In place: each element is written where it was read. An input whose
// elements are not dense (or not in a supported order) goes through a
// contiguous copy, so its mask follows the contiguous order.
template <class Backend>
at::Tensor masked_forward_inplace(Granularity g, const at::Tensor& input, double p,
                                  const RngArgs& rng) {
  check_writable(input, "input");
  c10::DeviceGuard guard(input.device());
  const Walk w = plan_walk(input, {}, g);
  check_shard(rng.shard, w.unit_count);
  at::Tensor mask = new_mask(w.unit_count, w.input);
  draw_and_apply<Backend>(w, g, w.input, {}, p, keep_scale(p), rng,
                          mask.mutable_data_ptr<uint8_t>());
  if (!w.input.is_same(input)) input.copy_(w.input);
  return mask;
}

// A backward op: grad through the mask of `g` units.
template <class Backend>
at::Tensor masked_backward(Granularity g, const at::Tensor& grad, const at::Tensor& mask,
                           double scale) {
  c10::DeviceGuard guard(grad.device());
  const Walk w = plan_walk(grad, {}, g);
  check_mask(mask, w.unit_count, grad, "grad");
  if constexpr (Backend::kHostMemory) check_mask_padding(mask, w.unit_count, "grad");
  at::Tensor out = at::empty_like(w.input);
  if (w.input.numel() > 0) Backend::run(read_call(w, g, out, mask, scale));
  return out;
}

// A residual: input's shape and device, any float dtype (the output takes
// eager's result dtype; see promote()).
inline void check_residual(const at::Tensor& input, const at::Tensor& residual) {
  check_matches(residual, "residual", input, "input");
}

inline void check_bias(const at::Tensor& input, const at::Tensor& bias) {
  TORCH_CHECK(input.dim() >= 1, "input must have at least 1 dimension for a bias, got a 0-d tensor");
  check_floating(bias, "bias");
  TORCH_CHECK(bias.device() == input.device(), "bias must be on the same device as input (",
              input.device(), "), got ", bias.device());
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == input.size(-1),
              "bias must be 1-D with the size of input's last dimension (", input.size(-1),
              "), got shape ", bias.sizes());
}

inline void check_channels(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() >= 2, name, " must have shape (N, C, *) for channel dropout, got ", t.sizes());
}

inline void check_samples(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() >= 1, name, " must have a sample dimension (dim 0) for drop-path, got a 0-d tensor");
}

template <class Backend>
std::tuple<at::Tensor, at::Tensor> dropout(const at::Tensor& input, double p,
                                           const std::optional<at::Generator>& generator,
                                           std::optional<int64_t> seed, int64_t offset, at::OptionalIntArrayRef shard) {
  const RngArgs rng{generator, seed, offset, shard};
  check_forward(input, p, rng);
  return masked_forward<Backend>(Granularity::Element, input, {}, {}, p, keep_scale(p), rng);
}

template <class Backend>
at::Tensor dropout_inplace(const at::Tensor& input, double p,
                           const std::optional<at::Generator>& generator,
                           std::optional<int64_t> seed, int64_t offset, at::OptionalIntArrayRef shard) {
  const RngArgs rng{generator, seed, offset, shard};
  check_forward(input, p, rng);
  return masked_forward_inplace<Backend>(Granularity::Element, input, p, rng);
}

template <class Backend>
at::Tensor dropout_backward(const at::Tensor& grad, const at::Tensor& mask, double p) {
  check_probability(p);
  check_floating(grad, "grad");
  return masked_backward<Backend>(Granularity::Element, grad, mask, keep_scale(p));
}

template <class Backend>
std::tuple<at::Tensor, at::Tensor> dropout_add(const at::Tensor& input, const at::Tensor& residual,
                                               double p,
                                               const std::optional<at::Generator>& generator,
                                               std::optional<int64_t> seed, int64_t offset, at::OptionalIntArrayRef shard) {
  const RngArgs rng{generator, seed, offset, shard};
  check_forward(input, p, rng);
  check_residual(input, residual);
  return masked_forward<Backend>(Granularity::Element, input, residual, {}, p, keep_scale(p), rng);
}

template <class Backend>
std::tuple<at::Tensor, at::Tensor> bias_dropout_add(const at::Tensor& input, const at::Tensor& bias,
                                                    const at::Tensor& residual, double p,
                                                    const std::optional<at::Generator>& generator,
                                                    std::optional<int64_t> seed, int64_t offset, at::OptionalIntArrayRef shard) {
  const RngArgs rng{generator, seed, offset, shard};
  check_forward(input, p, rng);
  check_bias(input, bias);
  check_residual(input, residual);
  return masked_forward<Backend>(Granularity::Rows, input, residual, bias, p, keep_scale(p), rng);
}

// grad_input = grad through the mask; grad_bias = its sums over all but the
// last dimension, added in the order column_sums.h fixes (in float; double
// for float64) and rounded once to grad's dtype.
template <class Backend>
std::tuple<at::Tensor, at::Tensor> bias_dropout_add_backward(const at::Tensor& grad,
                                                             const at::Tensor& mask, double p) {
  check_probability(p);
  check_floating(grad, "grad");
  TORCH_CHECK(grad.dim() >= 1, "grad must have at least 1 dimension for a bias, got a 0-d tensor");
  c10::DeviceGuard guard(grad.device());
  const Walk w = plan_walk(grad, {}, Granularity::Rows);
  check_mask(mask, w.unit_count, grad, "grad");
  if constexpr (Backend::kHostMemory) check_mask_padding(mask, w.unit_count, "grad");
  at::Tensor out = at::empty_like(w.input);
  at::Tensor sums = at::zeros({grad.size(-1)}, grad.options());
  if (w.input.numel() > 0) {
    KernelCall c = read_call(w, Granularity::Rows, out, mask, keep_scale(p));
    c.bias_len = grad.size(-1);
    c.bias_grad = sums.mutable_data_ptr();
    Backend::run(c);
  }
  return {out, sums};
}

template <class Backend>
std::tuple<at::Tensor, at::Tensor> channel_dropout(const at::Tensor& input, double p,
                                                   const std::optional<at::Generator>& generator,
                                                   std::optional<int64_t> seed, int64_t offset, at::OptionalIntArrayRef shard) {
  const RngArgs rng{generator, seed, offset, shard};
  check_forward(input, p, rng);
  check_channels(input, "input");
  return masked_forward<Backend>(Granularity::Channel, input, {}, {}, p, keep_scale(p), rng);
}

template <class Backend>
at::Tensor channel_dropout_inplace(const at::Tensor& input, double p,
                                   const std::optional<at::Generator>& generator,
                                   std::optional<int64_t> seed, int64_t offset, at::OptionalIntArrayRef shard) {
  const RngArgs rng{generator, seed, offset, shard};
  check_forward(input, p, rng);
  check_channels(input, "input");
  return masked_forward_inplace<Backend>(Granularity::Channel, input, p, rng);
}

template <class Backend>
at::Tensor channel_dropout_backward(const at::Tensor& grad, const at::Tensor& mask, double p) {
  check_probability(p);
  check_floating(grad, "grad");
  check_channels(grad, "grad");
  return masked_backward<Backend>(Granularity::Channel, grad, mask, keep_scale(p));
}

template <class Backend>
std::tuple<at::Tensor, at::Tensor> drop_path(const at::Tensor& input, double p, bool scale_by_keep,
                                             const std::optional<at::Generator>& generator,
                                             std::optional<int64_t> seed, int64_t offset, at::OptionalIntArrayRef shard) {
  const RngArgs rng{generator, seed, offset, shard};
  check_forward(input, p, rng);
  check_samples(input, "input");
  return masked_forward<Backend>(Granularity::Sample, input, {}, {}, p,
                                 drop_path_scale(p, scale_by_keep), rng);
}

template <class Backend>
std::tuple<at::Tensor, at::Tensor> drop_path_add(const at::Tensor& input, const at::Tensor& residual,
                                                 double p, bool scale_by_keep,
                                                 const std::optional<at::Generator>& generator,
                                                 std::optional<int64_t> seed, int64_t offset, at::OptionalIntArrayRef shard) {
  const RngArgs rng{generator, seed, offset, shard};
  check_forward(input, p, rng);
  check_samples(input, "input");
  check_residual(input, residual);
  return masked_forward<Backend>(Granularity::Sample, input, residual, {}, p,
                                 drop_path_scale(p, scale_by_keep), rng);
}

template <class Backend>
at::Tensor drop_path_backward(const at::Tensor& grad, const at::Tensor& mask, double p,
                              bool scale_by_keep) {
  check_probability(p);
  check_floating(grad, "grad");
  check_samples(grad, "grad");
  return masked_backward<Backend>(Granularity::Sample, grad, mask, drop_path_scale(p, scale_by_keep));
}

// Low-memory mode: no mask; the kernel records the (seed, offset) it drew
// with in a 2-element int64 tensor on the input's device, and backward draws
// the same bits again from it.
template <class Backend>
std::tuple<at::Tensor, at::Tensor> low_memory_forward(const at::Tensor& input_,
                                                      const at::Tensor& residual_, double p,
                                                      const RngArgs& rng) {
  c10::DeviceGuard guard(input_.device());
  const auto [input, residual, bias, out_dtype] = promote(input_, residual_, {});
  const Walk w = plan_walk(input, residual, Granularity::Element);
  check_shard(rng.shard, w.unit_count);
  at::Tensor out = at::empty_like(w.input, w.input.options().dtype(out_dtype));
  at::Tensor rng_state = at::zeros({2}, input_.options().dtype(at::kLong));
  draw_and_apply<Backend>(w, Granularity::Element, out, {}, p, keep_scale(p), rng, nullptr,
                          rng_state.mutable_data_ptr<int64_t>());
  return {out, rng_state};
}

template <class Backend>
std::tuple<at::Tensor, at::Tensor> dropout_low_memory(const at::Tensor& input, double p,
                                                      const std::optional<at::Generator>& generator,
                                                      std::optional<int64_t> seed, int64_t offset, at::OptionalIntArrayRef shard) {
  const RngArgs rng{generator, seed, offset, shard};
  check_forward(input, p, rng);
  return low_memory_forward<Backend>(input, {}, p, rng);
}

template <class Backend>
std::tuple<at::Tensor, at::Tensor> dropout_add_low_memory(
    const at::Tensor& input, const at::Tensor& residual, double p,
    const std::optional<at::Generator>& generator, std::optional<int64_t> seed, int64_t offset, at::OptionalIntArrayRef shard) {
  const RngArgs rng{generator, seed, offset, shard};
  check_forward(input, p, rng);
  check_residual(input, residual);
  return low_memory_forward<Backend>(input, residual, p, rng);
}

template <class Backend>
at::Tensor dropout_low_memory_backward(const at::Tensor& grad, const at::Tensor& rng_state,
                                       double p, at::OptionalIntArrayRef shard) {
  check_probability(p);
  check_floating(grad, "grad");
  check_rng_state(rng_state, grad);
  if constexpr (Backend::kHostMemory) check_rng_state_values(rng_state);
  c10::DeviceGuard guard(grad.device());
  const Walk w = plan_walk(grad, {}, Granularity::Element);
  check_shard(shard, w.unit_count);
  at::Tensor out = at::empty_like(w.input);
  if (w.input.numel() == 0) return out;
  KernelCall c = apply_call(w, out, {}, keep_scale(p));
  c.source = MaskSource::Draw;
  c.threshold = keep_threshold(p);
  c.rng.seed_ptr = rng_state.const_data_ptr<int64_t>();
  c.rng.offset_ptr = c.rng.seed_ptr + 1;
  c.shard = to_shard_map(shard);
  Backend::run(c);
  return out;
}

template <class Backend>
void register_ops(torch::Library& m) {
  m.impl("dropout", TORCH_FN(dropout<Backend>));
  m.impl("dropout_", TORCH_FN(dropout_inplace<Backend>));
  m.impl("dropout_backward", TORCH_FN(dropout_backward<Backend>));
  m.impl("dropout_add", TORCH_FN(dropout_add<Backend>));
  m.impl("bias_dropout_add", TORCH_FN(bias_dropout_add<Backend>));
  m.impl("bias_dropout_add_backward", TORCH_FN(bias_dropout_add_backward<Backend>));
  m.impl("channel_dropout", TORCH_FN(channel_dropout<Backend>));
  m.impl("channel_dropout_", TORCH_FN(channel_dropout_inplace<Backend>));
  m.impl("channel_dropout_backward", TORCH_FN(channel_dropout_backward<Backend>));
  m.impl("drop_path", TORCH_FN(drop_path<Backend>));
  m.impl("drop_path_add", TORCH_FN(drop_path_add<Backend>));
  m.impl("drop_path_backward", TORCH_FN(drop_path_backward<Backend>));
  m.impl("dropout_low_memory", TORCH_FN(dropout_low_memory<Backend>));
  m.impl("dropout_add_low_memory", TORCH_FN(dropout_add_low_memory<Backend>));
  m.impl("dropout_low_memory_backward", TORCH_FN(dropout_low_memory_backward<Backend>));
}

}  // namespace regdrop
