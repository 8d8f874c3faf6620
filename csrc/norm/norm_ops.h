// The device-generic bodies of the norm ops (dropout + residual + LayerNorm /
// RMSNorm over the last dimension): argument checks, operand dtypes and
// layouts, output allocation, and the NormForwardCall / NormBackwardCall
// they run. A NormBackend supplies what differs per device:
//
//   static PhiloxSource generator_source(const std::optional<at::Generator>&, at::Device);
//   static void run_norm_forward(const NormForwardCall&);
//   static void run_norm_backward(const NormBackwardCall&);
//   static constexpr bool kLaunches;     // as dropout_ops.h's Backend
//
// As dropout_ops.h's, the bodies run on the Meta key too (a backend with
// kLaunches false), for meta and fake tensors, symbolic sizes included: they
// check and allocate as for real and stop before any data pointer.
//
// Operands: input (..., H), contiguous rows of H (others are made
// contiguous); residual of input's shape; weight, bias and input_bias of
// shape (H). Dtypes: input is float32, float64, float16 or bfloat16; the
// residual stream (residual, residual_out) and the parameters are input's
// dtype, or float32 with a 16-bit input (an fp32 residual stream, fp32
// norm weights). Outputs: output in input's dtype; residual_out in the
// residual's dtype (without a residual: float32 if residual_in_fp32 and
// input is 16-bit, else input's); mean and rstd of shape input.shape[:-1]
// in the compute type (float32; float64 for float64). RMSNorm's mean is 0.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "../checks.h"
#include "../dropout_ops.h"  // RngArgs, keep_scale, scalar_kind
#include "norm_call.h"

namespace regdrop::norm {

using Tensors5 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

inline at::ScalarType compute_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

inline bool is_16_bit(at::ScalarType t) { return t == at::kHalf || t == at::kBFloat16; }

// A residual-stream or parameter dtype that runs as it is: that of the
// operand `of` (input, or a backward's grad_output), or float32 beside a
// 16-bit one.
inline void check_companion_dtype(const at::Tensor& t, const char* name, at::ScalarType dtype, const char* of) {
  TORCH_CHECK_TYPE(t.scalar_type() == dtype || (t.scalar_type() == at::kFloat && is_16_bit(dtype)), name,
                   " must have ", of, "'s dtype (", dtype, "), or float32 with a float16 or bfloat16 ", of, ", got ",
                   t.scalar_type());
}

// (H) values of the parameter `name`, or None; `of` names the operand `ref`.
inline void check_parameter(const std::optional<at::Tensor>& t, const char* name, const at::Tensor& ref,
                            const char* of) {
  if (!t.has_value() || !t->defined()) return;
  check_floating(*t, name);
  TORCH_CHECK(t->device() == ref.device(), name, " must be on the same device as ", of, " (", ref.device(),
              "), got ", t->device());
  TORCH_CHECK(t->dim() == 1 && t->sym_size(0) == ref.sym_size(-1), name, " must be 1-D with the size of ", of,
              "'s last dimension (", ref.sym_size(-1), "), got shape ", t->sym_sizes());
  check_companion_dtype(*t, name, ref.scalar_type(), of);
}

inline bool given(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// The normalized rows of `t`: (..., H) with H >= 1.
inline void check_rows(const at::Tensor& t, const char* name, bool drop_path) {
  TORCH_CHECK(t.dim() >= 1, name, " must have at least 1 dimension (the normalized one), got a 0-d tensor");
  TORCH_SYM_CHECK(t.sym_size(-1).sym_gt(0), name,
                  "'s last dimension (the normalized one) must not be empty, got shape ", t.sym_sizes());
  TORCH_CHECK(!drop_path || t.dim() >= 2, name,
              " must have a sample dimension (dim 0) besides the normalized one for drop-path, got shape ",
              t.sym_sizes());
}

// A parameter as the kernels read it: H values of the compute type, or
// `absent` (1 for a weight, -0 for a bias: x * 1 and x + -0 are x, bit for bit).
inline at::Tensor parameter_values(const std::optional<at::Tensor>& t, const at::Tensor& input, double absent) {
  const at::ScalarType c = compute_dtype(input.scalar_type());
  if (given(t)) return t->to(c).contiguous();
  return at::full_symint({input.sym_size(-1)}, absent, input.options().dtype(c));
}

// What each unit is and how its bits are had, for a forward call.
struct Dropout {
  double p;
  bool drop_path;
  bool scale_by_keep;

  bool active() const { return p > 0; }
  double scale() const {
    if (!active()) return 1.0;
    return drop_path && !scale_by_keep ? 1.0 : keep_scale(p);
  }
  c10::SymInt units(const at::Tensor& input) const {
    if (!active()) return 0;
    return drop_path ? input.sym_size(0) : input.sym_numel();
  }
};

// The keep bits of a call with `units` units: none (p == 0: all kept), the
// mask `mask` (read), or a draw.
inline RowBits row_bits(const Dropout& d, const at::Tensor& input, const at::Tensor& mask) {
  RowBits b;
  b.units = d.units(input).expect_int();
  if (!d.active()) {
    b.element_units = false;
    return b;
  }
  b.element_units = !d.drop_path;
  // Drop-path: a sample's rows. A divisor of row numbers, so at least 1: a tensor without rows
  // (N == 0, or a dim of 0) runs no row.
  const int64_t rows = input.numel() / input.size(-1);
  b.rows_per_unit = d.drop_path && rows > 0 ? rows / input.size(0) : 1;
  if (mask.defined() && mask.scalar_type() == at::kByte) b.mask_in = mask.const_data_ptr<uint8_t>();
  return b;
}

template <class Backend>
void draw_into(RowBits& b, const Dropout& d, const RngArgs& rng, at::Device device, uint8_t* mask,
               int64_t* rng_state) {
  b.mask_in = nullptr;
  if (b.units == 0 && !rng.shard.has_value()) return;
  b.rng = rng.source<Backend>(device);
  b.draw = b.units > 0;
  b.threshold = keep_threshold(d.p);
  b.shard = rng.shard_map();
  b.mask_out = mask;
  b.rng_state_out = rng_state;
}

// The forward op: (output, residual_out, mask or rng_state, mean, rstd).
template <class Backend>
Tensors5 norm_forward(const at::Tensor& input_, const std::optional<at::Tensor>& residual_,
                      const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                      const std::optional<at::Tensor>& input_bias, const Dropout& d, double eps, bool rms,
                      bool residual_in_fp32, const RngArgs& rng, bool low_memory) {
  check_probability(d.p);
  check_floating(input_, "input");
  rng.check(input_);
  check_rows(input_, "input", d.drop_path);
  if (given(residual_)) {
    check_matches(*residual_, "residual", input_, "input");
    check_companion_dtype(*residual_, "residual", input_.scalar_type(), "input");
  }
  check_parameter(weight, "weight", input_, "input");
  check_parameter(bias, "bias", input_, "input");
  check_parameter(input_bias, "input_bias", input_, "input");
  check_shard(rng.shard, d.units(input_));
  c10::DeviceGuard guard(input_.device());

  const at::Tensor input = input_.contiguous();
  const at::Tensor residual = given(residual_) ? residual_->contiguous() : at::Tensor();
  const at::ScalarType dtype = input.scalar_type();
  const at::ScalarType stream = residual.defined()                          ? residual.scalar_type()
                                : residual_in_fp32 && is_16_bit(dtype) ? at::kFloat
                                                                            : dtype;
  const at::Tensor w = parameter_values(weight, input, 1.0);
  const at::Tensor b = parameter_values(bias, input, -0.0);
  const at::Tensor ib = given(input_bias) ? input_bias->to(compute_dtype(dtype)).contiguous() : at::Tensor();
  const c10::SymIntArrayRef row_shape = input.sym_sizes().slice(0, input.dim() - 1);

  at::Tensor output = at::empty_symint(input.sym_sizes(), input.options());
  at::Tensor residual_out = at::empty_symint(input.sym_sizes(), input.options().dtype(stream));
  at::Tensor mean = at::empty_symint(row_shape, input.options().dtype(compute_dtype(dtype)));
  at::Tensor rstd = at::empty_symint(row_shape, input.options().dtype(compute_dtype(dtype)));
  at::Tensor mask = low_memory ? at::zeros({2}, input.options().dtype(at::kLong))
                               : new_mask(d.units(input), input);
  if constexpr (!Backend::kLaunches) return {output, residual_out, mask, mean, rstd};  // meta: shapes only

  NormForwardCall c;
  c.dtype = scalar_kind(dtype);
  c.residual_dtype = scalar_kind(stream);
  c.kind = rms ? NormKind::RMS : NormKind::Layer;
  c.hidden = input.size(-1);
  c.rows = input.numel() / c.hidden;
  c.input = input.const_data_ptr();
  c.residual = residual.defined() ? residual.const_data_ptr() : nullptr;
  c.input_bias = ib.defined() ? ib.const_data_ptr() : nullptr;
  c.weight = w.const_data_ptr();
  c.bias = b.const_data_ptr();
  c.output = output.mutable_data_ptr();
  c.residual_out = residual_out.mutable_data_ptr();
  c.mean = mean.mutable_data_ptr();
  c.rstd = rstd.mutable_data_ptr();
  c.scale = d.scale();
  c.eps = eps;
  c.bits = row_bits(d, input, at::Tensor());
  if (d.active()) {
    draw_into<Backend>(c.bits, d, rng, input.device(), low_memory ? nullptr : mask.mutable_data_ptr<uint8_t>(),
                       low_memory ? mask.mutable_data_ptr<int64_t>() : nullptr);
  }
  Backend::run_norm_forward(c);  // with no rows too: a drop-path call's samples still draw their bits
  return {output, residual_out, mask, mean, rstd};
}

// The gradients a backward call is asked for: each parameter's in its dtype, or none.
struct ParameterGrads {
  std::optional<at::ScalarType> weight, bias, input_bias;
};

template <class Backend>
Tensors5 norm_backward(const at::Tensor& grad_output_, const std::optional<at::Tensor>& grad_residual_out_,
                       const at::Tensor& residual_out_, const at::Tensor& mask, const at::Tensor& mean,
                       const at::Tensor& rstd, const std::optional<at::Tensor>& weight, const Dropout& d, bool rms,
                       bool residual_grad, const ParameterGrads& wanted, bool low_memory, at::OptionalIntArrayRef shard) {
  check_probability(d.p);
  check_floating(grad_output_, "grad_output");
  check_rows(grad_output_, "grad_output", d.drop_path);
  check_matches(residual_out_, "residual_out", grad_output_, "grad_output");
  check_companion_dtype(residual_out_, "residual_out", grad_output_.scalar_type(), "grad_output");
  if (given(grad_residual_out_)) check_matches(*grad_residual_out_, "grad_residual_out", grad_output_, "grad_output");
  check_parameter(weight, "weight", grad_output_, "grad_output");
  const at::ScalarType dtype = grad_output_.scalar_type();
  const at::ScalarType c_dtype = compute_dtype(dtype);
  const c10::SymInt hidden = grad_output_.sym_size(-1), rows = grad_output_.sym_numel() / hidden;
  for (const auto& [t, name] : {std::pair{&mean, "mean"}, std::pair{&rstd, "rstd"}}) {
    TORCH_CHECK(t->defined() && t->scalar_type() == c_dtype && t->device() == grad_output_.device(), name,
                " must be the ", c_dtype, " tensor of the row statistics forward returned, got ",
                t->defined() ? t->toString() : "None");
    TORCH_SYM_CHECK(t->sym_numel().sym_eq(rows), name, " must hold ", rows, " row statistics, got shape ",
                    t->sym_sizes());
  }
  for (const auto& [t, name] : {std::pair{wanted.weight, "weight_grad"}, std::pair{wanted.bias, "bias_grad"},
                                std::pair{wanted.input_bias, "input_bias_grad"}}) {
    TORCH_CHECK_TYPE(!t.has_value() || *t == dtype || (*t == at::kFloat && is_16_bit(dtype)), name,
                     " must be grad_output's dtype (", dtype, "), or float32 with a float16 or bfloat16 grad_output, got ",
                     t.has_value() ? c10::toString(*t) : "None");
  }
  const c10::SymInt units = d.units(grad_output_);
  if (low_memory) {
    check_rng_state(mask, grad_output_);
    check_shard(shard, units);
  } else if (d.active()) {
    check_mask(mask, units, grad_output_, "grad_output");
  }
  c10::DeviceGuard guard(grad_output_.device());

  const at::Tensor grad_output = grad_output_.contiguous();
  const at::Tensor residual_out = residual_out_.contiguous();
  const at::ScalarType stream = residual_out.scalar_type();
  const at::Tensor grad_residual_out =
      given(grad_residual_out_) ? grad_residual_out_->to(stream).contiguous() : at::Tensor();
  const at::Tensor w = parameter_values(weight, grad_output, 1.0);
  const at::Tensor mean_c = mean.contiguous(), rstd_c = rstd.contiguous();

  at::Tensor grad_input = at::empty_symint(grad_output.sym_sizes(), grad_output.options());
  at::Tensor grad_residual =
      residual_grad ? at::empty_symint(grad_output.sym_sizes(), grad_output.options().dtype(stream)) : at::Tensor();
  auto parameter_grad = [&](std::optional<at::ScalarType> t) {
    return t.has_value() ? at::empty_symint({hidden}, grad_output.options().dtype(*t)) : at::Tensor();
  };
  at::Tensor grad_weight = parameter_grad(wanted.weight);
  at::Tensor grad_bias = parameter_grad(wanted.bias);
  at::Tensor grad_input_bias = parameter_grad(wanted.input_bias);
  if constexpr (!Backend::kLaunches) return {grad_input, grad_residual, grad_weight, grad_bias, grad_input_bias};

  NormBackwardCall c;
  c.dtype = scalar_kind(dtype);
  c.residual_dtype = scalar_kind(stream);
  c.kind = rms ? NormKind::RMS : NormKind::Layer;
  c.hidden = hidden.expect_int();
  c.rows = rows.expect_int();
  c.grad_output = grad_output.const_data_ptr();
  c.grad_residual_out = grad_residual_out.defined() ? grad_residual_out.const_data_ptr() : nullptr;
  c.residual_out = residual_out.const_data_ptr();
  c.mean = mean_c.const_data_ptr();
  c.rstd = rstd_c.const_data_ptr();
  c.weight = w.const_data_ptr();
  c.grad_input = grad_input.mutable_data_ptr();
  c.grad_residual = grad_residual.defined() ? grad_residual.mutable_data_ptr() : nullptr;
  c.grad_weight = grad_weight.defined() ? grad_weight.mutable_data_ptr() : nullptr;
  c.grad_bias = grad_bias.defined() ? grad_bias.mutable_data_ptr() : nullptr;
  c.grad_input_bias = grad_input_bias.defined() ? grad_input_bias.mutable_data_ptr() : nullptr;
  c.weight_dtype = scalar_kind(wanted.weight.value_or(c_dtype));
  c.bias_dtype = scalar_kind(wanted.bias.value_or(c_dtype));
  c.input_bias_dtype = scalar_kind(wanted.input_bias.value_or(c_dtype));
  c.scale = d.scale();
  c.bits = row_bits(d, grad_output, low_memory ? at::Tensor() : mask);
  if (low_memory && d.active()) {
    // Drawn again from the saved (seed, offset), where forward drew them.
    c.bits.draw = true;
    c.bits.threshold = keep_threshold(d.p);
    c.bits.rng.seed_ptr = mask.const_data_ptr<int64_t>();
    c.bits.rng.offset_ptr = c.bits.rng.seed_ptr + 1;
    c.bits.shard = to_shard_map(shard);
  }
  if (c.rows > 0) {
    Backend::run_norm_backward(c);
  } else {  // column sums over no rows (an empty shard's, say): zeros, which no kernel writes
    for (at::Tensor* t : {&grad_weight, &grad_bias, &grad_input_bias}) {
      if (t->defined()) t->zero_();
    }
  }
  return {grad_input, grad_residual, grad_weight, grad_bias, grad_input_bias};
}

// ------------------------------------------------------------ the ops

template <class Backend>
Tensors5 dropout_add_norm(const at::Tensor& input, const std::optional<at::Tensor>& residual,
                          const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, double p,
                          double eps, bool rms, const std::optional<at::Tensor>& input_bias, bool drop_path,
                          bool scale_by_keep, bool residual_in_fp32, const std::optional<at::Generator>& generator,
                          std::optional<int64_t> seed, int64_t offset, at::OptionalIntArrayRef shard) {
  return norm_forward<Backend>(input, residual, weight, bias, input_bias, Dropout{p, drop_path, scale_by_keep}, eps,
                               rms, residual_in_fp32, RngArgs{generator, seed, offset, shard}, false);
}

template <class Backend>
Tensors5 dropout_add_norm_low_memory(const at::Tensor& input, const std::optional<at::Tensor>& residual,
                                     const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                                     double p, double eps, bool rms, const std::optional<at::Tensor>& input_bias,
                                     bool residual_in_fp32, const std::optional<at::Generator>& generator,
                                     std::optional<int64_t> seed, int64_t offset, at::OptionalIntArrayRef shard) {
  return norm_forward<Backend>(input, residual, weight, bias, input_bias, Dropout{p, false, true}, eps, rms,
                               residual_in_fp32, RngArgs{generator, seed, offset, shard}, true);
}

template <class Backend>
Tensors5 dropout_add_norm_backward(const at::Tensor& grad_output, const std::optional<at::Tensor>& grad_residual_out,
                                   const at::Tensor& residual_out, const at::Tensor& mask, const at::Tensor& mean,
                                   const at::Tensor& rstd, const std::optional<at::Tensor>& weight, double p, bool rms,
                                   bool drop_path, bool scale_by_keep, bool residual_grad,
                                   std::optional<at::ScalarType> weight_grad, std::optional<at::ScalarType> bias_grad,
                                   std::optional<at::ScalarType> input_bias_grad) {
  return norm_backward<Backend>(grad_output, grad_residual_out, residual_out, mask, mean, rstd, weight,
                                Dropout{p, drop_path, scale_by_keep}, rms, residual_grad,
                                ParameterGrads{weight_grad, bias_grad, input_bias_grad}, false, std::nullopt);
}

template <class Backend>
Tensors5 dropout_add_norm_low_memory_backward(const at::Tensor& grad_output,
                                              const std::optional<at::Tensor>& grad_residual_out,
                                              const at::Tensor& residual_out, const at::Tensor& rng_state,
                                              const at::Tensor& mean, const at::Tensor& rstd,
                                              const std::optional<at::Tensor>& weight, double p, bool rms,
                                              bool residual_grad, std::optional<at::ScalarType> weight_grad,
                                              std::optional<at::ScalarType> bias_grad,
                                              std::optional<at::ScalarType> input_bias_grad,
                                              at::OptionalIntArrayRef shard) {
  return norm_backward<Backend>(grad_output, grad_residual_out, residual_out, rng_state, mean, rstd, weight,
                                Dropout{p, false, true}, rms, residual_grad,
                                ParameterGrads{weight_grad, bias_grad, input_bias_grad}, true, shard);
}

template <class Backend>
void register_norm_ops(torch::Library& m) {
  m.impl("dropout_add_norm", TORCH_FN(dropout_add_norm<Backend>));
  m.impl("dropout_add_norm_low_memory", TORCH_FN(dropout_add_norm_low_memory<Backend>));
  m.impl("dropout_add_norm_backward", TORCH_FN(dropout_add_norm_backward<Backend>));
  m.impl("dropout_add_norm_low_memory_backward", TORCH_FN(dropout_add_norm_low_memory_backward<Backend>));
}

}  // namespace regdrop::norm
