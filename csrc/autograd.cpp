// Autograd for the regdrop ops, on the Autograd dispatch key: for Python
// (torch.ops.regdrop.*) and C++ callers alike. Each forward saves only its
// mask (a bit per unit) or its 16-byte rng_state; its backward is one call of
// a backward op, and the residual's gradient is the incoming gradient itself.
// Backward ops are linear in `grad` and their own adjoints: double backward.
//
// The kernels build graph nodes the way PyTorch's generated VariableType
// code does (a Node per call, set_history, rebase_history), not through
// torch::autograd::Function, which functorch refuses: so torch.func.grad,
// vjp and vmap-of-grad (per-sample gradients) work on every op. In C++
// rather than torch.library.register_autograd: the Python layers cost about
// 60 us per forward+backward on the CPU (against 20 us for the kernels), the
// whole cost of a call below ~64K elements.
//
// The in-place ops (dropout_, channel_dropout_) get what torch's own in-place
// ops get: autograd through the overwritten tensor (views included), the
// refusals of torch (a leaf that requires grad, a view of one, an inference
// tensor outside inference mode) made before anything is written, and a
// version-counter bump on the ADInplaceOrView key.
#include <torch/autograd.h>
#include <torch/csrc/autograd/VariableTypeUtils.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "include/regdrop/regdrop.h"

namespace regdrop {
namespace {

using torch::autograd::Node;
using torch::autograd::SavedVariable;
using torch::autograd::variable_list;
using Generator = std::optional<at::Generator>;
using Seed = std::optional<int64_t>;
using Shard = at::OptionalIntArrayRef;

// Which backward op a gradient goes through.
enum class MaskKind : uint8_t {
  Elements,   // dropout_backward: element masks, in the forward output's memory order
  LowMemory,  // dropout_low_memory_backward: drawn again from the saved rng_state
  Channels,   // channel_dropout_backward
  Samples,    // drop_path_backward
  Rows,       // bias_dropout_add_backward: element masks, and the bias gradient
};

bool element_order(MaskKind kind) {
  return kind == MaskKind::Elements || kind == MaskKind::LowMemory || kind == MaskKind::Rows;
}

// What a gradient needs from its forward call.
struct Saved {
  SavedVariable mask;  // or the rng_state
  double p = 0;
  bool scale_by_keep = true;
  std::vector<c10::SymInt> strides;  // the forward output's, for element masks
  std::optional<std::vector<int64_t>> shard;  // low-memory: the shard its bits are drawn for
};

// `grad` laid out like the forward output, as element masks require.
at::Tensor in_output_order(const at::Tensor& grad, c10::SymIntArrayRef strides) {
  if (grad.sym_strides() == strides) return grad;
  return grad.new_empty_strided_symint(grad.sym_sizes(), strides).copy_(grad);  // a batched grad stays batched
}

// Contiguous strides for `t`'s sizes, from a meta tensor: nothing is allocated.
std::vector<c10::SymInt> contiguous_strides(const at::Tensor& t) {
  return at::empty_symint(t.sym_sizes(), t.options().device(at::kMeta)).sym_strides().vec();
}

// grad through the mask of `kind` (the bias gradient too, for Rows). Called
// through the dispatcher with grad mode as the engine sets it, so a
// create_graph backward records these ops for double backward.
std::pair<at::Tensor, at::Tensor> through_mask(MaskKind kind, const Saved& s, const at::Tensor& grad) {
  const at::Tensor g = element_order(kind) ? in_output_order(grad, s.strides) : grad;
  const at::Tensor mask = s.mask.unpack();
  switch (kind) {
    case MaskKind::Elements:
      return {dropout_backward(g, mask, s.p), {}};
    case MaskKind::LowMemory:
      return {dropout_low_memory_backward(g, mask, s.p, s.shard ? Shard(*s.shard) : std::nullopt), {}};
    case MaskKind::Channels:
      return {channel_dropout_backward(g, mask, s.p), {}};
    case MaskKind::Samples:
      return {drop_path_backward(g, mask, s.p, s.scale_by_keep), {}};
    case MaskKind::Rows: {
      auto [grad_input, grad_bias] = bias_dropout_add_backward(g, mask, s.p);
      return {grad_input, grad_bias};
    }
  }
  return {};
}

// The gradient of a forward op, whose differentiable inputs are, in order,
// input, then bias (Rows), then residual (the residual forms). Each gradient
// comes in its input's dtype: where dtypes mix (a bfloat16 input under a
// float32 residual), the output's gradient is cast back to each.
struct ForwardGradient : Node {
  ForwardGradient(std::string name, MaskKind kind, bool has_residual)
      : name_(std::move(name)), kind_(kind), has_residual_(has_residual) {}

  variable_list apply(variable_list&& grads) override {
    variable_list out(num_outputs());
    const at::Tensor& grad = grads[0];
    if (!grad.defined()) return out;
    auto [grad_input, grad_bias] = through_mask(kind_, saved, grad);
    size_t k = 0;
    out[k++] = grad_input;
    if (kind_ == MaskKind::Rows) out[k++] = grad_bias;
    if (has_residual_) out[k] = grad;
    for (size_t i = 0; i < out.size(); ++i) {
      if (out[i].defined() && out[i].scalar_type() != dtypes[i]) out[i] = out[i].to(dtypes[i]);
    }
    return out;
  }
  std::string name() const override { return name_; }
  void release_variables() override { saved.mask.reset_data(); }

  Saved saved;
  std::vector<at::ScalarType> dtypes;  // of the differentiable inputs

 private:
  std::string name_;
  MaskKind kind_;
  bool has_residual_;
};

// The gradient of a backward op (double backward): the same op again, which
// is its own adjoint; for bias_dropout_add_backward, the adjoint of
// (mask * s * g, its row sums) sends (a, b) to mask * s * (a + b broadcast).
struct BackwardGradient : Node {
  BackwardGradient(std::string name, MaskKind kind) : name_(std::move(name)), kind_(kind) {}

  variable_list apply(variable_list&& grads) override {
    variable_list out(num_outputs());
    at::Tensor total = grads[0];
    if (kind_ == MaskKind::Rows && grads.size() > 1 && grads[1].defined()) {
      total = total.defined() ? total.add(grads[1]) : grads[1].expand_symint(sizes);
    }
    if (!total.defined()) return out;
    out[0] = through_mask(kind_ == MaskKind::Rows ? MaskKind::Elements : kind_, saved, total).first;
    return out;
  }
  std::string name() const override { return name_; }
  void release_variables() override { saved.mask.reset_data(); }

  Saved saved;
  std::vector<c10::SymInt> sizes;  // of grad (Rows)

 private:
  std::string name_;
  MaskKind kind_;
};

// A forward op: `call` runs it below autograd and returns (output, mask or
// rng_state); `inputs` are its differentiable tensors, in argument order.
template <class Call>
std::tuple<at::Tensor, at::Tensor> forward(const char* name, MaskKind kind, std::vector<at::Tensor> inputs,
                                           bool has_residual, double p, bool scale_by_keep, Shard shard,
                                           Call&& call) {
  c10::intrusive_ptr<ForwardGradient> node;
  if (torch::autograd::compute_requires_grad(inputs)) {
    node = c10::make_intrusive<ForwardGradient>(name, kind, has_residual);
    node->set_next_edges(torch::autograd::collect_next_edges(inputs));
    for (const at::Tensor& t : inputs) node->dtypes.push_back(t.scalar_type());
  }
  at::Tensor out, saved;
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    std::tie(out, saved) = call();
  }
  if (node) {
    torch::autograd::set_history(out, node);
    node->saved = Saved{SavedVariable(saved, true), p, scale_by_keep,
                        element_order(kind) ? out.sym_strides().vec() : std::vector<c10::SymInt>{},
                        shard.has_value() ? std::optional(shard->vec()) : std::nullopt};
  }
  return {out, saved};
}

// An in-place op: torch's checks first, then the op (the ADInplaceOrView
// kernel bumps the version), then `input`'s history rebased on the node
// (through CopySlices for a view). Element masks follow the memory order the
// op walked `input` in: its own, or, for an input that is not dense, a
// contiguous copy's.
template <class Call>
at::Tensor forward_inplace(const char* name, MaskKind kind, const at::Tensor& input, double p, Call&& call) {
  const bool requires_grad = torch::autograd::compute_requires_grad(input);
  torch::autograd::check_inplace(input, requires_grad);
  c10::intrusive_ptr<ForwardGradient> node;
  std::vector<c10::SymInt> strides;
  if (requires_grad) {
    node = c10::make_intrusive<ForwardGradient>(name, kind, false);
    node->set_next_edges(torch::autograd::collect_next_edges(input));
    node->dtypes = {input.scalar_type()};
    if (element_order(kind)) {
      strides = input.is_non_overlapping_and_dense() ? input.sym_strides().vec() : contiguous_strides(input);
    }
  }
  at::Tensor mask;
  {
    at::AutoDispatchBelowAutograd below_autograd;
    mask = call();
  }
  if (node) {
    torch::autograd::rebase_history(input, node);
    node->saved = Saved{SavedVariable(mask, true), p, true, std::move(strides)};
  }
  return mask;
}

// A backward op: `call` runs it below autograd.
template <class Call>
auto backward(const char* name, MaskKind kind, const at::Tensor& grad, const at::Tensor& mask, double p,
              bool scale_by_keep, Shard shard, Call&& call) {
  c10::intrusive_ptr<BackwardGradient> node;
  if (torch::autograd::compute_requires_grad(grad)) {
    node = c10::make_intrusive<BackwardGradient>(name, kind);
    node->set_next_edges(torch::autograd::collect_next_edges(grad, mask));
  }
  decltype(call()) result;
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    result = call();
  }
  if (node) {
    at::Tensor grad_input;
    if constexpr (std::is_same_v<decltype(result), at::Tensor>) {
      grad_input = result;
      torch::autograd::set_history(result, node);
    } else {
      grad_input = std::get<0>(result);
      torch::autograd::set_history({std::get<0>(result), std::get<1>(result)}, node);
      node->sizes = grad.sym_sizes().vec();
    }
    node->saved = Saved{SavedVariable(mask, false), p, scale_by_keep,
                        element_order(kind) ? grad_input.sym_strides().vec() : std::vector<c10::SymInt>{},
                        shard.has_value() ? std::optional(shard->vec()) : std::nullopt};
  }
  return result;
}

// The ADInplaceOrView kernel of an in-place op: the op, then the
// version-counter bump that tells autograd the tensor changed. An inference
// tensor outside inference mode has no version counter to bump: refused
// before it is written.
template <class Call>
at::Tensor bump_version_after(const at::Tensor& input, Call&& call) {
  TORCH_CHECK(!input.is_inference() || c10::InferenceMode::is_enabled(),
              "Inplace update to inference tensor outside InferenceMode is not allowed. "
              "You can make a clone to get a normal tensor before doing inplace update.");
  at::Tensor mask;
  {
    at::AutoDispatchBelowADInplaceOrView below;
    mask = call();
  }
  torch::autograd::increment_version(input);
  return mask;
}

}  // namespace
}  // namespace regdrop

TORCH_LIBRARY_IMPL(regdrop, Autograd, m) {
  using namespace regdrop;
  m.impl("dropout", [](const at::Tensor& input, double p, const Generator& g, Seed seed, int64_t offset, Shard shard) {
    return forward("RegdropDropoutBackward", MaskKind::Elements, {input}, false, p, true, shard,
                   [&] { return dropout(input, p, g, seed, offset, shard); });
  });
  m.impl("dropout_low_memory", [](const at::Tensor& input, double p, const Generator& g, Seed seed,
                                  int64_t offset, Shard shard) {
    return forward("RegdropDropoutLowMemoryBackward", MaskKind::LowMemory, {input}, false, p, true, shard,
                   [&] { return dropout_low_memory(input, p, g, seed, offset, shard); });
  });
  m.impl("channel_dropout", [](const at::Tensor& input, double p, const Generator& g, Seed seed,
                               int64_t offset, Shard shard) {
    return forward("RegdropChannelDropoutBackward", MaskKind::Channels, {input}, false, p, true, shard,
                   [&] { return channel_dropout(input, p, g, seed, offset, shard); });
  });
  m.impl("dropout_add", [](const at::Tensor& input, const at::Tensor& residual, double p, const Generator& g,
                           Seed seed, int64_t offset, Shard shard) {
    return forward("RegdropDropoutAddBackward", MaskKind::Elements, {input, residual}, true, p, true, shard,
                   [&] { return dropout_add(input, residual, p, g, seed, offset, shard); });
  });
  m.impl("dropout_add_low_memory", [](const at::Tensor& input, const at::Tensor& residual, double p,
                                      const Generator& g, Seed seed, int64_t offset, Shard shard) {
    return forward("RegdropDropoutAddLowMemoryBackward", MaskKind::LowMemory, {input, residual}, true, p, true, shard,
                   [&] { return dropout_add_low_memory(input, residual, p, g, seed, offset, shard); });
  });
  m.impl("bias_dropout_add", [](const at::Tensor& input, const at::Tensor& bias, const at::Tensor& residual,
                                double p, const Generator& g, Seed seed, int64_t offset, Shard shard) {
    return forward("RegdropBiasDropoutAddBackward", MaskKind::Rows, {input, bias, residual}, true, p, true, shard,
                   [&] { return bias_dropout_add(input, bias, residual, p, g, seed, offset, shard); });
  });
  m.impl("drop_path", [](const at::Tensor& input, double p, bool scale_by_keep, const Generator& g, Seed seed,
                         int64_t offset, Shard shard) {
    return forward("RegdropDropPathBackward", MaskKind::Samples, {input}, false, p, scale_by_keep, shard,
                   [&] { return drop_path(input, p, scale_by_keep, g, seed, offset, shard); });
  });
  m.impl("drop_path_add", [](const at::Tensor& input, const at::Tensor& residual, double p, bool scale_by_keep,
                             const Generator& g, Seed seed, int64_t offset, Shard shard) {
    return forward("RegdropDropPathAddBackward", MaskKind::Samples, {input, residual}, true, p, scale_by_keep, shard,
                   [&] { return drop_path_add(input, residual, p, scale_by_keep, g, seed, offset, shard); });
  });
  m.impl("dropout_", [](const at::Tensor& input, double p, const Generator& g, Seed seed, int64_t offset, Shard shard) {
    return forward_inplace("RegdropDropoutBackward", MaskKind::Elements, input, p,
                           [&] { return dropout_(input, p, g, seed, offset, shard); });
  });
  m.impl("channel_dropout_", [](const at::Tensor& input, double p, const Generator& g, Seed seed,
                                int64_t offset, Shard shard) {
    return forward_inplace("RegdropChannelDropoutBackward", MaskKind::Channels, input, p,
                           [&] { return channel_dropout_(input, p, g, seed, offset, shard); });
  });
  m.impl("dropout_backward", [](const at::Tensor& grad, const at::Tensor& mask, double p) {
    return backward("RegdropDropoutBackwardBackward", MaskKind::Elements, grad, mask, p, true, std::nullopt,
                    [&] { return dropout_backward(grad, mask, p); });
  });
  m.impl("dropout_low_memory_backward", [](const at::Tensor& grad, const at::Tensor& rng_state, double p,
                                           Shard shard) {
    return backward("RegdropDropoutLowMemoryBackwardBackward", MaskKind::LowMemory, grad, rng_state, p, true, shard,
                    [&] { return dropout_low_memory_backward(grad, rng_state, p, shard); });
  });
  m.impl("channel_dropout_backward", [](const at::Tensor& grad, const at::Tensor& mask, double p) {
    return backward("RegdropChannelDropoutBackwardBackward", MaskKind::Channels, grad, mask, p, true, std::nullopt,
                    [&] { return channel_dropout_backward(grad, mask, p); });
  });
  m.impl("drop_path_backward", [](const at::Tensor& grad, const at::Tensor& mask, double p, bool scale_by_keep) {
    return backward("RegdropDropPathBackwardBackward", MaskKind::Samples, grad, mask, p, scale_by_keep, std::nullopt,
                    [&] { return drop_path_backward(grad, mask, p, scale_by_keep); });
  });
  m.impl("bias_dropout_add_backward", [](const at::Tensor& grad, const at::Tensor& mask, double p) {
    return backward("RegdropBiasDropoutAddBackwardBackward", MaskKind::Rows, grad, mask, p, true, std::nullopt,
                    [&] { return bias_dropout_add_backward(grad, mask, p); });
  });
}

TORCH_LIBRARY_IMPL(regdrop, ADInplaceOrView, m) {
  using namespace regdrop;
  m.impl("dropout_", [](const at::Tensor& input, double p, const Generator& g, Seed seed, int64_t offset, Shard shard) {
    return bump_version_after(input, [&] { return dropout_(input, p, g, seed, offset, shard); });
  });
  m.impl("channel_dropout_", [](const at::Tensor& input, double p, const Generator& g, Seed seed,
                                int64_t offset, Shard shard) {
    return bump_version_after(input, [&] { return channel_dropout_(input, p, g, seed, offset, shard); });
  });
}
