// The regdrop ops for C++ programs: one function per op of csrc/schemas.h, with
// the same arguments, defaults, results and errors as torch.ops.regdrop.* in
// Python. Errors are c10::Error: c10::ValueError where Python raises
// ValueError (a bad p), c10::TypeError where it raises TypeError (a bad dtype).
//
// Link regdrop_ext::regdrop (CMake: find_package(regdrop_ext)). Each function
// calls its op through the dispatcher, as at:: functions do, which runs the
// CPU or CUDA kernel for the inputs' device; loading the library registers
// the ops.
//
// Masks are uint8 with ceil(units / 8) bytes: bit i % 8 of byte i / 8 keeps
// unit i, units in the memory order of `input` (README, "Ops"). Random ops
// draw from `generator` (default: the device's default generator) or, given
// `seed`, from the Philox stream (seed, offset), the same on every device
// (README, "The random mapping"). Given `shard` = (first, run, stride), a call
// is a shard of a larger one and draws its units where that call would: its
// unit i is the larger call's unit first + (i / run) * stride + i % run.
#pragma once

#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/OptionalArrayRef.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace regdrop {

namespace detail {

// The typed handle of op `name`. The dispatcher checks that Signature is the
// C++ type of the op's kernels (csrc/dropout_ops.h), so each function below
// takes exactly their parameter types: `Generator?` as
// const std::optional<at::Generator>&, and `Tensor(a!)` as const at::Tensor&.
template <class Signature>
c10::TypedOperatorHandle<Signature> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

}  // namespace detail

// Dropout: output = keep ? input / q : 0, and the mask of keep bits; q, the
// keep probability, is 1 - p quantized to 2^-16 steps (README, "Guarantees").
inline std::tuple<at::Tensor, at::Tensor> dropout(
    const at::Tensor& input, double p, const std::optional<at::Generator>& generator = std::nullopt,
    std::optional<int64_t> seed = std::nullopt, int64_t offset = 0,
    at::OptionalIntArrayRef shard = std::nullopt) {
  static const auto op = detail::find_op<decltype(dropout)>("regdrop::dropout");
  return op.call(input, p, generator, seed, offset, shard);
}

// In-place dropout: overwrites `input` and returns the mask.
inline at::Tensor dropout_(const at::Tensor& input, double p,
                           const std::optional<at::Generator>& generator = std::nullopt,
                           std::optional<int64_t> seed = std::nullopt, int64_t offset = 0,
    at::OptionalIntArrayRef shard = std::nullopt) {
  static const auto op = detail::find_op<decltype(dropout_)>("regdrop::dropout_");
  return op.call(input, p, generator, seed, offset, shard);
}

// The gradient of dropout: grad_input = keep ? grad / q : 0.
inline at::Tensor dropout_backward(const at::Tensor& grad, const at::Tensor& mask, double p) {
  static const auto op = detail::find_op<decltype(dropout_backward)>("regdrop::dropout_backward");
  return op.call(grad, mask, p);
}

// Dropout then a residual add: output = residual + dropout(input).
inline std::tuple<at::Tensor, at::Tensor> dropout_add(
    const at::Tensor& input, const at::Tensor& residual, double p,
    const std::optional<at::Generator>& generator = std::nullopt,
    std::optional<int64_t> seed = std::nullopt, int64_t offset = 0,
    at::OptionalIntArrayRef shard = std::nullopt) {
  static const auto op = detail::find_op<decltype(dropout_add)>("regdrop::dropout_add");
  return op.call(input, residual, p, generator, seed, offset, shard);
}

// output = residual + dropout(input + bias), `bias` along the last dimension.
inline std::tuple<at::Tensor, at::Tensor> bias_dropout_add(
    const at::Tensor& input, const at::Tensor& bias, const at::Tensor& residual, double p,
    const std::optional<at::Generator>& generator = std::nullopt,
    std::optional<int64_t> seed = std::nullopt, int64_t offset = 0,
    at::OptionalIntArrayRef shard = std::nullopt) {
  static const auto op = detail::find_op<decltype(bias_dropout_add)>("regdrop::bias_dropout_add");
  return op.call(input, bias, residual, p, generator, seed, offset, shard);
}

// The gradients of bias_dropout_add for input and bias (residual's is `grad`).
inline std::tuple<at::Tensor, at::Tensor> bias_dropout_add_backward(const at::Tensor& grad,
                                                                    const at::Tensor& mask,
                                                                    double p) {
  static const auto op =
      detail::find_op<decltype(bias_dropout_add_backward)>("regdrop::bias_dropout_add_backward");
  return op.call(grad, mask, p);
}

// Channel dropout (Dropout1d/2d/3d): one keep bit per (sample, channel) of an
// (N, C, ...) input.
inline std::tuple<at::Tensor, at::Tensor> channel_dropout(
    const at::Tensor& input, double p, const std::optional<at::Generator>& generator = std::nullopt,
    std::optional<int64_t> seed = std::nullopt, int64_t offset = 0,
    at::OptionalIntArrayRef shard = std::nullopt) {
  static const auto op = detail::find_op<decltype(channel_dropout)>("regdrop::channel_dropout");
  return op.call(input, p, generator, seed, offset, shard);
}

// In-place channel dropout: overwrites `input` and returns the mask.
inline at::Tensor channel_dropout_(const at::Tensor& input, double p,
                                   const std::optional<at::Generator>& generator = std::nullopt,
                                   std::optional<int64_t> seed = std::nullopt, int64_t offset = 0,
    at::OptionalIntArrayRef shard = std::nullopt) {
  static const auto op = detail::find_op<decltype(channel_dropout_)>("regdrop::channel_dropout_");
  return op.call(input, p, generator, seed, offset, shard);
}

// The gradient of channel_dropout.
inline at::Tensor channel_dropout_backward(const at::Tensor& grad, const at::Tensor& mask,
                                           double p) {
  static const auto op =
      detail::find_op<decltype(channel_dropout_backward)>("regdrop::channel_dropout_backward");
  return op.call(grad, mask, p);
}

// Drop-path (stochastic depth): one keep bit per sample; kept samples are
// scaled by 1 / q only if `scale_by_keep`.
inline std::tuple<at::Tensor, at::Tensor> drop_path(
    const at::Tensor& input, double p, bool scale_by_keep = true,
    const std::optional<at::Generator>& generator = std::nullopt,
    std::optional<int64_t> seed = std::nullopt, int64_t offset = 0,
    at::OptionalIntArrayRef shard = std::nullopt) {
  static const auto op = detail::find_op<decltype(drop_path)>("regdrop::drop_path");
  return op.call(input, p, scale_by_keep, generator, seed, offset, shard);
}

// Drop-path then a residual add: output = residual + drop_path(input).
inline std::tuple<at::Tensor, at::Tensor> drop_path_add(
    const at::Tensor& input, const at::Tensor& residual, double p, bool scale_by_keep = true,
    const std::optional<at::Generator>& generator = std::nullopt,
    std::optional<int64_t> seed = std::nullopt, int64_t offset = 0,
    at::OptionalIntArrayRef shard = std::nullopt) {
  static const auto op = detail::find_op<decltype(drop_path_add)>("regdrop::drop_path_add");
  return op.call(input, residual, p, scale_by_keep, generator, seed, offset, shard);
}

// The gradient of drop_path and drop_path_add (for input).
inline at::Tensor drop_path_backward(const at::Tensor& grad, const at::Tensor& mask, double p,
                                     bool scale_by_keep = true) {
  static const auto op =
      detail::find_op<decltype(drop_path_backward)>("regdrop::drop_path_backward");
  return op.call(grad, mask, p, scale_by_keep);
}

// Dropout that saves no mask: returns the stream it drew from, rng_state =
// int64 (seed, offset), from which dropout_low_memory_backward draws the same
// bits again.
inline std::tuple<at::Tensor, at::Tensor> dropout_low_memory(
    const at::Tensor& input, double p, const std::optional<at::Generator>& generator = std::nullopt,
    std::optional<int64_t> seed = std::nullopt, int64_t offset = 0,
    at::OptionalIntArrayRef shard = std::nullopt) {
  static const auto op =
      detail::find_op<decltype(dropout_low_memory)>("regdrop::dropout_low_memory");
  return op.call(input, p, generator, seed, offset, shard);
}

// dropout_add that saves no mask, as dropout_low_memory.
inline std::tuple<at::Tensor, at::Tensor> dropout_add_low_memory(
    const at::Tensor& input, const at::Tensor& residual, double p,
    const std::optional<at::Generator>& generator = std::nullopt,
    std::optional<int64_t> seed = std::nullopt, int64_t offset = 0,
    at::OptionalIntArrayRef shard = std::nullopt) {
  static const auto op =
      detail::find_op<decltype(dropout_add_low_memory)>("regdrop::dropout_add_low_memory");
  return op.call(input, residual, p, generator, seed, offset, shard);
}

// The gradient of dropout_low_memory and dropout_add_low_memory (for input).
inline at::Tensor dropout_low_memory_backward(const at::Tensor& grad, const at::Tensor& rng_state,
                                              double p, at::OptionalIntArrayRef shard = std::nullopt) {
  static const auto op = detail::find_op<decltype(dropout_low_memory_backward)>(
      "regdrop::dropout_low_memory_backward");
  return op.call(grad, rng_state, p, shard);
}

}  // namespace regdrop
