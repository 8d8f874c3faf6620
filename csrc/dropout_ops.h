// The device-generic body of every op of the manifest (regdrop/manifest.h):
// argument checks, memory layout (walk.h), output allocation, and the
// KernelCall it runs. One body per variant (forward, in place, low memory,
// backward, low-memory backward), read off the op's row, and registered for a
// device by register_ops<Backend>() as a boxed kernel per op. A Backend
// supplies what differs per device:
//
//   static constexpr bool kLaunches;
//       whether it runs kernels. The Meta backend does not: the very same
//       bodies, run on meta and fake tensors (under torch.compile, symbolic
//       sizes included), make every check and give every output's shape,
//       dtype and strides, so there is no second copy of them to keep in step;
//   static PhiloxSource generator_source(const std::optional<at::Generator>&, at::Device);
//       locks the generator and reserves a Philox stream from it;
//   static void run(const KernelCall&);
//       runs the call on the current device (and stream).
//
// Each device's kernel file ends with
//   TORCH_LIBRARY_IMPL(regdrop, <Device>, m) { register_ops<Backend>(m); }
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/isnan.h>
#include <ATen/ops/zeros.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <memory>
#include <optional>
#include <tuple>
#include <vector>

#include "checks.h"
#include "include/regdrop/manifest.h"
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

// Kept units' scale: 1 / q, but 1 for drop-path without scale_by_keep.
inline double unit_scale(const OpSpec& op, double p, bool scale_by_keep) {
  return op.scale_by_keep() && !scale_by_keep ? 1.0 : keep_scale(p);
}

inline at::Tensor new_mask(const c10::SymInt& units, const at::Tensor& like) {
  return at::empty_symint({mask_bytes(units)}, like.options().dtype(at::kByte));
}

inline at::OptionalIntArrayRef as_ref(const std::optional<std::vector<int64_t>>& list) {
  return list.has_value() ? at::OptionalIntArrayRef(*list) : std::nullopt;
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

  void check(const at::Tensor& input) const { check_rng_args(generator, seed, offset, input); }

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
inline KernelCall apply_call(const Walk& w, UnitKind unit, const at::Tensor& out, const at::Tensor& bias,
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
  c.units = unit_layout(w.input, unit);
  c.unit_count = w.unit_count.expect_int();
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
void draw_and_apply(const Walk& w, UnitKind unit, const at::Tensor& out, const at::Tensor& bias, double p,
                    double scale, const RngArgs& rng, uint8_t* mask, int64_t* rng_state = nullptr) {
  const int64_t units = w.unit_count.expect_int();
  if (units == 0 && !rng.shard.has_value()) return;
  const PhiloxSource source = rng.source<Backend>(w.input.device());
  if (units == 0) return;
  auto drawing = [&](KernelCall c) {
    c.source = MaskSource::Draw;
    c.threshold = keep_threshold(p);
    c.rng = source;
    c.mask_out = mask;
    c.rng_state_out = rng_state;
    c.shard = rng.shard_map();
    return c;
  };
  if (unit == UnitKind::Element) return Backend::run(drawing(apply_call(w, unit, out, bias, scale)));
  KernelCall bits_only;
  bits_only.numel = units;
  Backend::run(drawing(bits_only));
  if (w.input.numel() == 0) return;
  KernelCall c = apply_call(w, unit, out, bias, scale);
  c.source = MaskSource::Units;
  c.mask_in = mask;
  Backend::run(c);
}

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

// A value cast to another float type is a new value: its NaNs become the
// canonical NaN, as the kernels write every NaN they compute
// (docs/semantics.md).
inline void canonical_nans_(at::Tensor& t) {
  if (t.scalar_type() == at::kFloat) {
    t.view(at::kInt).masked_fill_(t.isnan(), int64_t{0x7FFFFFFF});
  } else if (t.scalar_type() == at::kDouble) {
    t.view(at::kLong).masked_fill_(t.isnan(), int64_t{0x7FFFFFFFFFFFFFFF});
  } else {
    t.view(at::kShort).masked_fill_(t.isnan(), int64_t{0x7FFF});
  }
}

// ------------------------------------------------------------- the bodies

struct ForwardArgs {
  at::Tensor input, bias, residual;
  at::Tensor mask;  // in place: the caller's, written
  double p = 0;
  bool scale_by_keep = true;
  std::optional<at::Generator> generator;
  std::optional<int64_t> seed;
  int64_t offset = 0;
  std::optional<std::vector<int64_t>> shard;

  RngArgs rng() const { return RngArgs{generator, seed, offset, as_ref(shard)}; }
};

// Checked in torch's order: the probability first, then the tensors.
inline void check_forward(const OpSpec& op, const ForwardArgs& a) {
  check_probability(a.p);
  check_floating(a.input, "input");
  a.rng().check(a.input);
  check_unit_dims(op.unit, a.input, "input");
  if (op.bias) check_bias(a.input, a.bias);
  if (op.residual) check_matches(a.residual, "residual", a.input, "input");
  if (op.variant == Variant::InPlace) check_writable(a.input, "input");
}

// A forward op: (output, mask), (output, rng_state) in low-memory mode, or,
// in place, (input, mask) with each element written where it was read.
template <class Backend>
std::tuple<at::Tensor, at::Tensor> forward(const OpSpec& op, const ForwardArgs& a) {
  check_forward(op, a);
  c10::DeviceGuard guard(a.input.device());
  const RngArgs rng = a.rng();
  const double scale = unit_scale(op, a.p, a.scale_by_keep);
  if (op.variant == Variant::InPlace) {
    const Walk w = plan_walk(a.input, {}, op.unit);
    check_mask(a.mask, w.unit_count, a.input, "input");
    check_writable(a.mask, "mask");
    check_shard(rng.shard, w.unit_count);
    if constexpr (Backend::kLaunches) {
      check_storage(a.mask, "mask");
      draw_and_apply<Backend>(w, op.unit, w.input, {}, a.p, scale, rng, a.mask.mutable_data_ptr<uint8_t>());
    }
    if (!w.input.is_same(a.input)) a.input.copy_(w.input);
    return {a.input, a.mask};
  }
  auto [input, residual, bias, out_dtype] = promote(a.input, a.residual, a.bias);
  const Walk w = plan_walk(input, residual, op.unit, op.bias);
  check_shard(rng.shard, w.unit_count);
  at::Tensor out = w.new_output(out_dtype);
  const bool low_memory = op.variant == Variant::LowMemory;
  at::Tensor saved = low_memory ? at::zeros({2}, a.input.options().dtype(at::kLong)) : new_mask(w.unit_count, w.input);
  if constexpr (Backend::kLaunches) {
    at::Tensor walked_residual = w.residual;
    if (residual.defined() && a.residual.scalar_type() != out_dtype && !residual.is_same(a.residual)) {
      canonical_nans_(walked_residual);  // a copy of its own: cast, or laid out
    }
    Walk launched = w;
    launched.residual = walked_residual;
    draw_and_apply<Backend>(launched, op.unit, out, bias.defined() ? bias.contiguous() : bias, a.p, scale, rng,
                            low_memory ? nullptr : saved.mutable_data_ptr<uint8_t>(),
                            low_memory ? saved.mutable_data_ptr<int64_t>() : nullptr);
  }
  return {w.output(out), saved};
}

struct BackwardArgs {
  at::Tensor grad, saved;  // saved: the mask, or the rng_state
  double p = 0;
  bool scale_by_keep = true;
  std::optional<std::vector<int64_t>> shard;  // low-memory: the forward's
  std::optional<at::ScalarType> dtype;        // grad_input's; default grad's
};

// Whether the kernels write a gradient of `dtype` from `grad` in one pass:
// in grad's dtype, or narrowing a float32 gradient into a 16-bit input's
// (kernel_call.h), the backward of the widening mix. A bias gradient is
// summed in grad's dtype, so its ops compute in grad's and then cast.
inline bool one_pass(const OpSpec& op, at::ScalarType grad, at::ScalarType dtype) {
  return dtype == grad || (!op.bias && grad == at::kFloat && (dtype == at::kHalf || dtype == at::kBFloat16));
}

// A backward op: grad through the mask of its unit, with the bias gradient
// (its sums over all but the last dimension, added in the order
// column_sums.h fixes, in float32, float64 for float64, and rounded once to
// grad's dtype) where the row has a bias; the low-memory backward draws its
// element mask again from the rng_state. grad_input comes in `dtype`.
template <class Backend>
std::tuple<at::Tensor, at::Tensor> backward(const OpSpec& op, const BackwardArgs& a) {
  check_probability(a.p);
  check_floating(a.grad, "grad");
  check_unit_dims(op.unit, a.grad, "grad");
  if (op.bias) TORCH_CHECK(a.grad.dim() >= 1, "grad must have at least 1 dimension for a bias, got a 0-d tensor");
  c10::DeviceGuard guard(a.grad.device());
  const Walk w = plan_walk(a.grad, {}, op.unit, op.bias);
  const bool low_memory = op.variant == Variant::LowMemoryBackward;
  if (low_memory) {
    check_rng_state(a.saved, a.grad);
    check_shard(as_ref(a.shard), w.unit_count);
  } else {
    check_mask(a.saved, w.unit_count, a.grad, "grad");
  }
  const at::ScalarType dtype = a.dtype.value_or(a.grad.scalar_type());
  TORCH_CHECK_TYPE(is_supported_dtype(dtype), "dtype must be float32, float64, float16 or bfloat16, got ", dtype);
  const bool in_one_pass = one_pass(op, a.grad.scalar_type(), dtype);
  at::Tensor out = w.new_output(in_one_pass ? dtype : a.grad.scalar_type());
  at::Tensor sums = op.bias ? at::zeros_symint({a.grad.sym_size(-1)}, a.grad.options()) : at::Tensor();
  if constexpr (Backend::kLaunches) {
    check_storage(a.saved, low_memory ? "rng_state" : "mask");
    if (w.input.numel() > 0) {
      KernelCall c = apply_call(w, op.unit, out, {}, unit_scale(op, a.p, a.scale_by_keep));
      if (low_memory) {
        c.source = MaskSource::Draw;
        c.threshold = keep_threshold(a.p);
        c.rng.seed_ptr = a.saved.const_data_ptr<int64_t>();
        c.rng.offset_ptr = c.rng.seed_ptr + 1;
        c.shard = to_shard_map(as_ref(a.shard));
      } else {
        c.source = op.unit == UnitKind::Element ? MaskSource::Elements : MaskSource::Units;
        c.mask_in = a.saved.const_data_ptr<uint8_t>();
      }
      if (op.bias) {
        c.bias_len = a.grad.size(-1);
        c.bias_grad = sums.mutable_data_ptr();
      }
      Backend::run(c);
    }
  }
  at::Tensor grad_input = w.output(out);
  if (!in_one_pass) {
    grad_input = grad_input.to(dtype);
    canonical_nans_(grad_input);
  }
  return {grad_input, sums};
}

// ------------------------------------------------------ boxed registration

// The arguments of a call, read off the stack in schema order (schemas.h).
class StackArgs {
 public:
  StackArgs(const torch::jit::Stack& stack, size_t count) : stack_(stack), next_(stack.size() - count) {}
  const c10::IValue& next() { return stack_[next_++]; }
  at::Tensor tensor() { return next().toTensor(); }
  std::optional<std::vector<int64_t>> int_list() {
    const c10::IValue& v = next();
    if (v.isNone()) return std::nullopt;
    return v.toIntVector();
  }

 private:
  const torch::jit::Stack& stack_;
  size_t next_;
};

inline ForwardArgs forward_args(const OpSpec& op, const torch::jit::Stack& stack, size_t count) {
  StackArgs s(stack, count);
  ForwardArgs a;
  a.input = s.tensor();
  if (op.variant == Variant::InPlace) a.mask = s.tensor();
  if (op.bias) a.bias = s.tensor();
  if (op.residual) a.residual = s.tensor();
  a.p = s.next().toDouble();
  if (op.scale_by_keep()) a.scale_by_keep = s.next().toBool();
  a.generator = s.next().toOptional<at::Generator>();
  a.seed = s.next().toOptional<int64_t>();
  a.offset = s.next().toInt();
  a.shard = s.int_list();
  return a;
}

inline BackwardArgs backward_args(const OpSpec& op, const torch::jit::Stack& stack, size_t count) {
  StackArgs s(stack, count);
  BackwardArgs a;
  a.grad = s.tensor();
  a.saved = s.tensor();
  a.p = s.next().toDouble();
  if (op.scale_by_keep()) a.scale_by_keep = s.next().toBool();
  if (op.variant == Variant::LowMemoryBackward) a.shard = s.int_list();
  a.dtype = s.next().toOptional<at::ScalarType>();
  return a;
}

template <class Backend>
class OpKernel final : public c10::OperatorKernel {
 public:
  explicit OpKernel(const OpSpec& op) : op_(op) {}

  void operator()(const c10::OperatorHandle& handle, c10::DispatchKeySet, torch::jit::Stack* stack) {
    const size_t count = handle.schema().arguments().size();
    at::Tensor first, second;
    if (op_.is_forward()) {
      std::tie(first, second) = forward<Backend>(op_, forward_args(op_, *stack, count));
    } else {
      std::tie(first, second) = backward<Backend>(op_, backward_args(op_, *stack, count));
    }
    torch::jit::drop(*stack, count);
    torch::jit::push(*stack, std::move(first));
    if (handle.schema().returns().size() == 2) torch::jit::push(*stack, std::move(second));
  }

 private:
  const OpSpec& op_;
};

// The element-wise family's kernels (the norm family registers its own:
// norm/norm_ops.h).
template <class Backend>
void register_ops(torch::Library& m) {
  for (const OpSpec& op : kOps) {
    if (op.family != Family::Elementwise) continue;
    m.impl(op.name, torch::CppFunction::makeFromBoxedFunctor(std::make_unique<OpKernel<Backend>>(op)));
  }
}

}  // namespace regdrop
