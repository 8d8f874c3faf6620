// The regdrop ops for C++ programs: one function per op of the manifest
// (regdrop/manifest.h), with the same arguments, defaults, results and errors
// as torch.ops.regdrop.* in Python. Errors are c10::Error: c10::ValueError
// where Python raises ValueError (a bad p), c10::TypeError where it raises
// TypeError (a bad dtype).
//
// Link regdrop_ext::regdrop (CMake: find_package(regdrop_ext)). Each function
// calls its op through the dispatcher, as at:: functions do, which runs the
// CPU or CUDA kernel for the inputs' device; loading the library registers
// the ops. For each forward row `name` of the manifest:
//
//   std::tuple<at::Tensor, at::Tensor> name(input[, bias][, residual], p[, scale_by_keep = true],
//                                           generator = nullopt, seed = nullopt, offset = 0, shard = nullopt);
//       (output, mask): output = [residual +] keep ? (input [+ bias]) / q : 0, q the keep probability
//       (1 - p quantized to 2^-16 steps); mask: one bit per unit;
//   std::tuple<at::Tensor, at::Tensor> name_(input, mask, p, ...);       with IN_PLACE: (input, mask), both
//       written; mask: uint8, ceil(units / 8) bytes
//   std::tuple<at::Tensor, at::Tensor> name_low_memory(input, ..., p, ...);  with LOW_MEMORY: (output, rng_state)
//
// and for each backward row: name(grad, mask, p[, scale_by_keep = true], dtype = nullopt) ->
// grad_input (in `dtype`, default grad's), or (grad_input, grad_bias);
// dropout_low_memory_backward(grad, rng_state, p, shard = nullopt, dtype = nullopt).
//
// Masks are uint8 with ceil(units / 8) bytes: bit i % 8 of byte i / 8 keeps
// unit i (docs/semantics.md). Random ops draw from `generator` (default: the
// device's default generator) or, given `seed`, from the Philox stream
// (seed, offset), the same on every device. Given `shard` = (first, run,
// stride), a call is a shard of a larger one and draws its units where that
// call would: its unit i is the larger call's unit first + (i / run) * stride + i % run.
#pragma once

#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/op_registration/infer_schema.h>
#include <c10/util/OptionalArrayRef.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include "manifest.h"

namespace regdrop {

namespace detail {

// The typed handle of op `name`. The ops' kernels are boxed, so the
// dispatcher has no C++ signature to hold Signature against; this checks it
// against the schema, so a function below that falls out of step with its
// schema (a parameter added to one, not the other) fails on its first call
// with the difference, instead of calling the op with a misaligned stack.
template <class Signature>
c10::TypedOperatorHandle<Signature> find_op(const char* name) {
  const c10::OperatorHandle handle = c10::Dispatcher::singleton().findSchemaOrThrow(name, "");
  const std::optional<std::string> difference =
      c10::findSchemaDifferences(c10::inferFunctionSchemaFlattenedReturns<Signature>(), handle.schema());
  TORCH_CHECK(!difference, "regdrop.h: the function for ", name, " does not match its schema: ", *difference);
  return handle.typed<Signature>();
}

}  // namespace detail

// Parameter and argument lists, by the manifest's columns.
#define REGDROP_TENSORS_Input const at::Tensor &input
#define REGDROP_TENSORS_InputResidual const at::Tensor &input, const at::Tensor &residual
#define REGDROP_TENSORS_InputBiasResidual const at::Tensor &input, const at::Tensor &bias, const at::Tensor &residual
#define REGDROP_NAMES_Input input
#define REGDROP_NAMES_InputResidual input, residual
#define REGDROP_NAMES_InputBiasResidual input, bias, residual
#define REGDROP_UNIT_PARAMS_Element
#define REGDROP_UNIT_PARAMS_Channel
#define REGDROP_UNIT_PARAMS_Sample , bool scale_by_keep = true
#define REGDROP_UNIT_NAMES_Element
#define REGDROP_UNIT_NAMES_Channel
#define REGDROP_UNIT_NAMES_Sample , scale_by_keep
#define REGDROP_RNG_PARAMS                                                                                 \
  , const std::optional<at::Generator>&generator = std::nullopt, std::optional<int64_t> seed = std::nullopt, \
    int64_t offset = 0, at::OptionalIntArrayRef shard = std::nullopt
#define REGDROP_RNG_NAMES , generator, seed, offset, shard
#define REGDROP_RESULT_Grad at::Tensor
#define REGDROP_RESULT_GradBias std::tuple<at::Tensor, at::Tensor>
#define REGDROP_SAVED_PARAMS_Mask const at::Tensor &mask, double p
#define REGDROP_SAVED_PARAMS_RngState const at::Tensor &rng_state, double p
#define REGDROP_SAVED_NAMES_Mask mask, p
#define REGDROP_SAVED_NAMES_RngState rng_state, p
#define REGDROP_SAVED_TAIL_PARAMS_Mask
#define REGDROP_SAVED_TAIL_PARAMS_RngState , at::OptionalIntArrayRef shard = std::nullopt
#define REGDROP_SAVED_TAIL_NAMES_Mask
#define REGDROP_SAVED_TAIL_NAMES_RngState , shard

#define REGDROP_CALL(name, ...)                                                \
  static const auto op = detail::find_op<decltype(name)>("regdrop::" #name); \
  return op.call(__VA_ARGS__);

#define REGDROP_FORWARD_FUNCTIONS(name, unit, operands, in_place, low_memory)                                     \
  inline std::tuple<at::Tensor, at::Tensor> name(REGDROP_TENSORS_##operands,                                      \
                                                 double p REGDROP_UNIT_PARAMS_##unit REGDROP_RNG_PARAMS) {        \
    REGDROP_CALL(name, REGDROP_NAMES_##operands, p REGDROP_UNIT_NAMES_##unit REGDROP_RNG_NAMES)                   \
  }                                                                                                               \
  REGDROP_IF_##in_place(inline std::tuple<at::Tensor, at::Tensor> name##_(                                        \
      const at::Tensor& input, const at::Tensor& mask, double p REGDROP_UNIT_PARAMS_##unit REGDROP_RNG_PARAMS) {   \
    REGDROP_CALL(name##_, input, mask, p REGDROP_UNIT_NAMES_##unit REGDROP_RNG_NAMES)                             \
  })                                                                                                              \
  REGDROP_IF_##low_memory(inline std::tuple<at::Tensor, at::Tensor> name##_low_memory(                            \
      REGDROP_TENSORS_##operands, double p REGDROP_UNIT_PARAMS_##unit REGDROP_RNG_PARAMS) {                       \
    REGDROP_CALL(name##_low_memory, REGDROP_NAMES_##operands, p REGDROP_UNIT_NAMES_##unit REGDROP_RNG_NAMES)      \
  })

#define REGDROP_BACKWARD_FUNCTIONS(name, unit, gradients, saved)                                            \
  inline REGDROP_RESULT_##gradients name(const at::Tensor& grad, REGDROP_SAVED_PARAMS_##saved                \
                                             REGDROP_UNIT_PARAMS_##unit REGDROP_SAVED_TAIL_PARAMS_##saved,   \
                                         std::optional<at::ScalarType> dtype = std::nullopt) {               \
    REGDROP_CALL(name, grad, REGDROP_SAVED_NAMES_##saved REGDROP_UNIT_NAMES_##unit                          \
                                 REGDROP_SAVED_TAIL_NAMES_##saved, dtype)                                   \
  }

REGDROP_FORWARD_OPS(REGDROP_FORWARD_FUNCTIONS)
REGDROP_BACKWARD_OPS(REGDROP_BACKWARD_FUNCTIONS)

// The norm family (REGDROP_NORM_OPS): output = norm(residual + dropout(input
// [+ input_bias])) * weight [+ bias] over the last dimension, LayerNorm or
// (rms) RMSNorm, element dropout or (drop_path) per-sample units. Forward
// returns (output, residual_out, mask or rng_state, mean, rstd); backward
// (grad_input, grad_residual, grad_weight, grad_bias, grad_input_bias), each
// parameter's gradient in the dtype asked for, or undefined.
using NormForward = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using OptionalTensor = std::optional<at::Tensor>;
using OptionalDtype = std::optional<at::ScalarType>;

inline NormForward dropout_add_norm(const at::Tensor& input, const OptionalTensor& residual, const OptionalTensor& weight,
                                    const OptionalTensor& bias, double p, double eps = 1e-5, bool rms = false,
                                    const OptionalTensor& input_bias = std::nullopt, bool drop_path = false,
                                    bool scale_by_keep = true, bool residual_in_fp32 = false,
                                    const std::optional<at::Generator>& generator = std::nullopt,
                                    std::optional<int64_t> seed = std::nullopt, int64_t offset = 0,
                                    at::OptionalIntArrayRef shard = std::nullopt) {
  static const auto op = detail::find_op<decltype(dropout_add_norm)>("regdrop::dropout_add_norm");
  return op.call(input, residual, weight, bias, p, eps, rms, input_bias, drop_path, scale_by_keep, residual_in_fp32,
                 generator, seed, offset, shard);
}

inline NormForward dropout_add_norm_low_memory(const at::Tensor& input, const OptionalTensor& residual,
                                               const OptionalTensor& weight, const OptionalTensor& bias, double p,
                                               double eps = 1e-5, bool rms = false,
                                               const OptionalTensor& input_bias = std::nullopt,
                                               bool residual_in_fp32 = false,
                                               const std::optional<at::Generator>& generator = std::nullopt,
                                               std::optional<int64_t> seed = std::nullopt, int64_t offset = 0,
                                               at::OptionalIntArrayRef shard = std::nullopt) {
  static const auto op =
      detail::find_op<decltype(dropout_add_norm_low_memory)>("regdrop::dropout_add_norm_low_memory");
  return op.call(input, residual, weight, bias, p, eps, rms, input_bias, residual_in_fp32, generator, seed, offset,
                 shard);
}

inline NormForward dropout_add_norm_backward(const at::Tensor& grad_output, const OptionalTensor& grad_residual_out,
                                             const at::Tensor& residual_out, const at::Tensor& mask,
                                             const at::Tensor& mean, const at::Tensor& rstd,
                                             const OptionalTensor& weight, double p, bool rms = false,
                                             bool drop_path = false, bool scale_by_keep = true,
                                             bool residual_grad = true, OptionalDtype weight_grad = std::nullopt,
                                             OptionalDtype bias_grad = std::nullopt,
                                             OptionalDtype input_bias_grad = std::nullopt) {
  static const auto op = detail::find_op<decltype(dropout_add_norm_backward)>("regdrop::dropout_add_norm_backward");
  return op.call(grad_output, grad_residual_out, residual_out, mask, mean, rstd, weight, p, rms, drop_path,
                 scale_by_keep, residual_grad, weight_grad, bias_grad, input_bias_grad);
}

inline NormForward dropout_add_norm_low_memory_backward(
    const at::Tensor& grad_output, const OptionalTensor& grad_residual_out, const at::Tensor& residual_out,
    const at::Tensor& rng_state, const at::Tensor& mean, const at::Tensor& rstd, const OptionalTensor& weight, double p,
    bool rms = false, bool residual_grad = true, OptionalDtype weight_grad = std::nullopt,
    OptionalDtype bias_grad = std::nullopt, OptionalDtype input_bias_grad = std::nullopt,
    at::OptionalIntArrayRef shard = std::nullopt) {
  static const auto op = detail::find_op<decltype(dropout_add_norm_low_memory_backward)>(
      "regdrop::dropout_add_norm_low_memory_backward");
  return op.call(grad_output, grad_residual_out, residual_out, rng_state, mean, rstd, weight, p, rms, residual_grad,
                 weight_grad, bias_grad, input_bias_grad, shard);
}

#undef REGDROP_FORWARD_FUNCTIONS
#undef REGDROP_BACKWARD_FUNCTIONS
#undef REGDROP_CALL
#undef REGDROP_TENSORS_Input
#undef REGDROP_TENSORS_InputResidual
#undef REGDROP_TENSORS_InputBiasResidual
#undef REGDROP_NAMES_Input
#undef REGDROP_NAMES_InputResidual
#undef REGDROP_NAMES_InputBiasResidual
#undef REGDROP_UNIT_PARAMS_Element
#undef REGDROP_UNIT_PARAMS_Channel
#undef REGDROP_UNIT_PARAMS_Sample
#undef REGDROP_UNIT_NAMES_Element
#undef REGDROP_UNIT_NAMES_Channel
#undef REGDROP_UNIT_NAMES_Sample
#undef REGDROP_RNG_PARAMS
#undef REGDROP_RNG_NAMES
#undef REGDROP_RESULT_Grad
#undef REGDROP_RESULT_GradBias
#undef REGDROP_SAVED_PARAMS_Mask
#undef REGDROP_SAVED_PARAMS_RngState
#undef REGDROP_SAVED_NAMES_Mask
#undef REGDROP_SAVED_NAMES_RngState
#undef REGDROP_SAVED_TAIL_PARAMS_Mask
#undef REGDROP_SAVED_TAIL_PARAMS_RngState
#undef REGDROP_SAVED_TAIL_NAMES_Mask
#undef REGDROP_SAVED_TAIL_NAMES_RngState

}  // namespace regdrop
