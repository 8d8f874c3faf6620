// The regdrop ops, declared once. Every layer reads these two tables: the
// schemas (csrc/schemas.h), the kernels of every device and the meta kernels
// (csrc/dropout_ops.h), autograd (csrc/autograd.cpp), the C++ API
// (regdrop/regdrop.h), and, through regdrop_ext._C.manifest(), the Python
// layers: vmap and DTensor rules and the tests' parametrization.
//
// A forward op is one row:
//
//   X(name, unit, operands, in_place, low_memory)
//
//   unit        the unit one mask bit stands for: Element, Sample (drop-path:
//               a slice along dim 0) or Channel (an (n, c) of an (N, C, *)
//               tensor). Sample ops also take timm's `scale_by_keep`.
//   operands    Input: y = dropout(input);
//               InputResidual: y = residual + dropout(input);
//               InputBiasResidual: y = residual + dropout(input + bias), bias
//               along the last dim.
//   in_place    IN_PLACE: also `<name>_`, which overwrites its input (Input
//               ops only) and returns it with the mask; or NONE.
//   low_memory  LOW_MEMORY: also `<name>_low_memory`, which saves no mask, only
//               the (seed, offset) its backward draws again from (Element
//               units only); or NONE.
//
// It returns (output, mask). Its gradient goes through the backward op of
// its unit (and bias gradient): a row of the second table,
//
//   X(name, unit, gradients, saved)
//
//   gradients   Grad: grad_input; GradBias: (grad_input, grad_bias).
//   saved       Mask: takes (grad, mask, p); RngState: (grad, rng_state, p,
//               *, shard), the low-memory ops' backward.
//
// A residual's gradient is the incoming gradient itself: no op.
//
// The norm family (csrc/norm/: dropout + residual + LayerNorm / RMSNorm over
// the last dimension, in one pass over each row) is a third table,
//
//   X(name, variant)
//
// whose ops take their unit kind (element, or sample with drop_path=True),
// norm and operands as arguments; their schemas are csrc/norm/norm_schemas.h's.
#pragma once

#include <cstdint>
#include <cstring>

// clang-format off
#define REGDROP_FORWARD_OPS(X)                                           \
  X(dropout,          Element, Input,             IN_PLACE, LOW_MEMORY)  \
  X(dropout_add,      Element, InputResidual,     NONE,     LOW_MEMORY)  \
  X(bias_dropout_add, Element, InputBiasResidual, NONE,     NONE)        \
  X(channel_dropout,  Channel, Input,             IN_PLACE, NONE)        \
  X(drop_path,        Sample,  Input,             NONE,     NONE)        \
  X(drop_path_add,    Sample,  InputResidual,     NONE,     NONE)

#define REGDROP_BACKWARD_OPS(X)                                  \
  X(dropout_backward,            Element, Grad,     Mask)        \
  X(bias_dropout_add_backward,   Element, GradBias, Mask)        \
  X(channel_dropout_backward,    Channel, Grad,     Mask)        \
  X(drop_path_backward,          Sample,  Grad,     Mask)        \
  X(dropout_low_memory_backward, Element, Grad,     RngState)

#define REGDROP_NORM_OPS(X)                                          \
  X(dropout_add_norm,                     Masked)                    \
  X(dropout_add_norm_low_memory,          LowMemory)                 \
  X(dropout_add_norm_backward,            Backward)                  \
  X(dropout_add_norm_low_memory_backward, LowMemoryBackward)
// clang-format on

// REGDROP_IF_<flag>(text): the text for IN_PLACE or LOW_MEMORY, nothing for NONE.
#define REGDROP_IF_IN_PLACE(...) __VA_ARGS__
#define REGDROP_IF_LOW_MEMORY(...) __VA_ARGS__
#define REGDROP_IF_NONE(...)

namespace regdrop {

enum class UnitKind : uint8_t { Element, Sample, Channel };

// The kernel family an op belongs to: element-wise (one kernel call per op,
// dropout_ops.h), or rows (dropout + residual + norm, csrc/norm/).
enum class Family : uint8_t { Elementwise, Norm };

enum class Variant : uint8_t {
  Masked,             // a forward op: (output, mask)
  InPlace,            // <name>_: (input, mask), input overwritten
  LowMemory,          // <name>_low_memory: (output, rng_state)
  Backward,           // (grad, mask, p[, scale_by_keep])
  LowMemoryBackward,  // (grad, rng_state, p, *, shard)
};

// One op as every layer reads it.
struct OpSpec {
  const char* name;
  Variant variant;
  UnitKind unit;
  bool residual;  // forward: takes a residual
  bool bias;      // forward: takes a bias; backward: returns its gradient
  const char* forward;  // the row it comes from (backward ops: themselves)
  Family family = Family::Elementwise;

  constexpr bool is_forward() const { return variant != Variant::Backward && variant != Variant::LowMemoryBackward; }
  // timm's scale_by_keep argument, after p.
  constexpr bool scale_by_keep() const { return unit == UnitKind::Sample; }
};

namespace manifest_detail {

constexpr bool kResidual_Input = false, kResidual_InputResidual = true, kResidual_InputBiasResidual = true;
constexpr bool kBias_Input = false, kBias_InputResidual = false, kBias_InputBiasResidual = true;
constexpr bool kBias_Grad = false, kBias_GradBias = true;
constexpr Variant kVariant_Mask = Variant::Backward, kVariant_RngState = Variant::LowMemoryBackward;

#define REGDROP_FORWARD_SPECS(name, unit, operands, in_place, low_memory)                            \
  OpSpec{#name, Variant::Masked, UnitKind::unit, kResidual_##operands, kBias_##operands, #name},     \
  REGDROP_IF_##in_place(OpSpec{#name "_", Variant::InPlace, UnitKind::unit, false, false, #name},)   \
  REGDROP_IF_##low_memory(OpSpec{#name "_low_memory", Variant::LowMemory, UnitKind::unit,            \
                                 kResidual_##operands, kBias_##operands, #name},)
#define REGDROP_BACKWARD_SPECS(name, unit, gradients, saved) \
  OpSpec{#name, kVariant_##saved, UnitKind::unit, false, kBias_##gradients, #name},
#define REGDROP_NORM_SPECS(name, variant) \
  OpSpec{#name, Variant::variant, UnitKind::Element, true, true, #name, Family::Norm},

inline constexpr OpSpec kOps[] = {REGDROP_FORWARD_OPS(REGDROP_FORWARD_SPECS) REGDROP_BACKWARD_OPS(
    REGDROP_BACKWARD_SPECS) REGDROP_NORM_OPS(REGDROP_NORM_SPECS)};

#undef REGDROP_FORWARD_SPECS
#undef REGDROP_BACKWARD_SPECS
#undef REGDROP_NORM_SPECS

constexpr bool same(const char* a, const char* b) {
  while (*a != '\0' && *a == *b) ++a, ++b;
  return *a == *b;
}

}  // namespace manifest_detail

// Every op, forward ops (and their variants) first.
inline constexpr const auto& kOps = manifest_detail::kOps;

inline const OpSpec* find_op_spec(const char* name) {
  for (const OpSpec& op : kOps) {
    if (std::strcmp(op.name, name) == 0) return &op;
  }
  return nullptr;
}

// The backward op a forward op's gradient goes through: its unit's, with a
// bias gradient if it has a bias; the low-memory ops' draws its mask again.
constexpr const OpSpec& backward_of(const OpSpec& forward) {
  const Variant want = forward.variant == Variant::LowMemory ? Variant::LowMemoryBackward : Variant::Backward;
  for (const OpSpec& op : kOps) {
    if (op.family == forward.family && op.variant == want && op.unit == forward.unit && op.bias == forward.bias) {
      return op;
    }
  }
  return forward;  // never: a static_assert below checks every row
}

namespace manifest_detail {
constexpr bool every_forward_op_has_a_backward() {
  for (const OpSpec& op : kOps) {
    if (op.is_forward() && backward_of(op).is_forward()) return false;
  }
  return true;
}
static_assert(every_forward_op_has_a_backward(), "a forward op's (unit, bias) has no backward op");
}  // namespace manifest_detail

}  // namespace regdrop
