// Autograd, both modes, for every op of the manifest, on the Autograd
// dispatch key: for Python (torch.ops.regdrop.*) and C++ callers alike.
//
// Reverse mode: a forward op saves only its mask (a bit per unit) or its
// 16-byte rng_state, and its gradient is one call of its backward op
// (manifest.h's backward_of); a residual's gradient is the incoming gradient
// itself. Backward ops are linear in `grad` and their own adjoints: double
// backward. Forward mode: every op is linear in its differentiable operands
// for a given mask, so a tangent goes through the same backward op (the
// residual's tangent is added, a bias's goes in with the input's): jvp,
// jacfwd and hessians (forward over reverse) work.
//
// The kernels build graph nodes the way PyTorch's generated VariableType
// code does (a Node per call, set_history, rebase_history, _set_fw_grad),
// not through torch::autograd::Function, which functorch refuses: so
// torch.func.grad, vjp, jvp and vmap-of-grad (per-sample gradients) work.
// In C++ rather than torch.library.register_autograd: the Python layers
// cost about 60 us per forward+backward on the CPU (against 20 us for the
// kernels), the whole cost of a call below ~64K elements.
//
// The in-place ops get what torch's own in-place ops get: autograd through
// the overwritten tensor (views included), the refusals of torch (a leaf that
// requires grad, a view of one, an inference tensor outside inference mode)
// made before anything is written, and a version-counter bump on the
// ADInplaceOrView key. They return their input, as torch's do.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/VariableTypeUtils.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/library.h>

#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "dropout_ops.h"

namespace regdrop {
namespace {

using torch::autograd::Node;
using torch::autograd::SavedVariable;
using torch::autograd::variable_list;
using Shard = std::optional<std::vector<int64_t>>;

const c10::OperatorHandle& handle_of(const OpSpec& op) {
  static const std::vector<c10::OperatorHandle> handles = [] {
    std::vector<c10::OperatorHandle> all;
    for (const OpSpec& spec : kOps) {
      all.push_back(c10::Dispatcher::singleton().findSchemaOrThrow((std::string("regdrop::") + spec.name).c_str(), ""));
    }
    return all;
  }();
  return handles[&op - kOps];
}

// `t` laid out as a tensor of `strides`, the dense layout an element mask's
// bits follow. A batched (vmap) tensor stays batched.
at::Tensor laid_out(const at::Tensor& t, c10::SymIntArrayRef strides) {
  if (t.sym_strides() == strides) return t;
  return t.new_empty_strided_symint(t.sym_sizes(), strides).copy_(t);
}

// The strides in whose memory order an op reads `t`: its own when dense,
// else dense ones in their order (walk.h).
std::vector<c10::SymInt> walked_strides(const at::Tensor& t) {
  if (t.is_non_overlapping_and_dense()) return t.sym_strides().vec();
  return walk_detail::dense_strides_like(t);
}

// What a gradient, or a tangent, needs from its forward call.
struct Saved {
  SavedVariable saved;  // the mask, or the rng_state
  double p = 0;
  bool scale_by_keep = true;
  std::vector<c10::SymInt> strides;  // the output's: element masks follow its memory order
  Shard shard;                       // low memory: the shard its bits are drawn for
};

// `grad` through backward op `op` (grad_input, in `dtype` or grad's, and
// grad_bias where it has one). Called through the dispatcher, with grad mode
// as the engine sets it, so a create_graph backward records these ops for
// double backward.
std::pair<at::Tensor, at::Tensor> through(const OpSpec& op, const Saved& s, const at::Tensor& grad,
                                          const at::Tensor& saved, std::optional<at::ScalarType> dtype = {}) {
  torch::jit::Stack stack{op.unit == UnitKind::Element ? laid_out(grad, s.strides) : grad, saved, s.p};
  if (op.scale_by_keep()) stack.emplace_back(s.scale_by_keep);
  if (op.variant == Variant::LowMemoryBackward) stack.emplace_back(s.shard ? c10::IValue(*s.shard) : c10::IValue());
  stack.emplace_back(dtype);
  handle_of(op).callBoxed(stack);
  return {stack[0].toTensor(), stack.size() > 1 ? stack[1].toTensor() : at::Tensor()};
}

// The backward op of `op`'s unit without a bias gradient: the adjoint of a
// backward op with one (mask * s * (a + b broadcast)), and the tangent map.
const OpSpec& without_bias(const OpSpec& op) {
  for (const OpSpec& other : kOps) {
    if (other.variant == op.variant && other.unit == op.unit && !other.bias) return other;
  }
  return op;
}

// The gradient of a forward op, whose differentiable inputs are, in schema
// order, input, then bias, then residual. Each gradient comes in its input's
// dtype: where dtypes mix (a bfloat16 input under a float32 residual), the
// input's in one pass by the backward op, the others cast.
struct ForwardGradient : Node {
  explicit ForwardGradient(const OpSpec& op) : op_(op) {}

  variable_list apply(variable_list&& grads) override {
    variable_list out(num_outputs());
    const at::Tensor& grad = grads[0];
    if (!grad.defined()) return out;
    auto [grad_input, grad_bias] = through(backward_of(op_), saved, grad, saved.saved.unpack(), dtypes[0]);
    size_t k = 0;
    out[k++] = grad_input;
    if (op_.bias) out[k++] = grad_bias;
    if (op_.residual) out[k] = grad;
    for (size_t i = 0; i < out.size(); ++i) {
      if (out[i].defined() && out[i].scalar_type() != dtypes[i]) out[i] = out[i].to(dtypes[i]);
    }
    return out;
  }
  std::string name() const override { return std::string("Regdrop_") + op_.name + "_Backward"; }
  void release_variables() override { saved.saved.reset_data(); }

  Saved saved;
  std::vector<at::ScalarType> dtypes;  // of the differentiable inputs

 private:
  const OpSpec& op_;
};

// The gradient of a backward op (double backward): the same op again, which
// is its own adjoint; for one with a bias gradient, the adjoint of
// (mask * s * g, its row sums) sends (a, b) to mask * s * (a + b broadcast).
struct BackwardGradient : Node {
  explicit BackwardGradient(const OpSpec& op) : op_(op) {}

  variable_list apply(variable_list&& grads) override {
    variable_list out(num_outputs());
    at::Tensor total = grads[0];
    if (op_.bias && grads.size() > 1 && grads[1].defined()) {
      total = total.defined() ? total.add(grads[1]) : grads[1].expand_symint(sizes);
    }
    if (!total.defined()) return out;
    out[0] = through(without_bias(op_), saved, total, saved.saved.unpack(), grad_dtype).first;
    return out;
  }
  std::string name() const override { return std::string("Regdrop_") + op_.name + "_Backward"; }
  void release_variables() override { saved.saved.reset_data(); }

  Saved saved;
  std::vector<c10::SymInt> sizes;  // of grad (ops with a bias gradient)
  at::ScalarType grad_dtype = at::kFloat;

 private:
  const OpSpec& op_;
};

at::Tensor tangent_of(const at::Tensor& t) { return t.defined() ? t._fw_grad(/*level=*/0) : at::Tensor(); }

// ------------------------------------------------------------ forward ops

// The forward op's output tangent: mask * s * (t_input + t_bias) + t_residual,
// computed as the kernels compute the output (in float32, float64 for
// float64) and rounded once to its dtype; undefined where no operand has a
// tangent.
at::Tensor forward_tangent(const OpSpec& op, const ForwardArgs& a, const Saved& s, const at::Tensor& out,
                           const at::Tensor& saved) {
  const at::Tensor t_input = tangent_of(a.input), t_bias = tangent_of(a.bias), t_residual = tangent_of(a.residual);
  if (!t_input.defined() && !t_bias.defined() && !t_residual.defined()) return {};
  const at::ScalarType compute = out.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor tangent;
  if (t_input.defined() || t_bias.defined()) {
    at::Tensor shifted = t_input.defined() ? t_input.to(compute) : at::zeros_like(out, out.options().dtype(compute));
    if (t_bias.defined()) shifted = shifted.add(t_bias.to(compute));
    tangent = through(without_bias(backward_of(op)), s, shifted, saved).first;
  }
  if (t_residual.defined()) {
    const at::Tensor r = t_residual.to(compute);
    tangent = tangent.defined() ? r.add(tangent) : r;
  }
  return tangent.to(out.scalar_type());
}

void forward_op(const OpSpec& op, const c10::OperatorHandle& handle, torch::jit::Stack* stack, size_t count) {
  const ForwardArgs a = forward_args(op, *stack, count);
  std::vector<at::Tensor> inputs{a.input};
  if (op.bias) inputs.push_back(a.bias);
  if (op.residual) inputs.push_back(a.residual);
  c10::intrusive_ptr<ForwardGradient> node;
  if (torch::autograd::compute_requires_grad(inputs)) {
    node = c10::make_intrusive<ForwardGradient>(op);
    node->set_next_edges(torch::autograd::collect_next_edges(inputs));
    for (const at::Tensor& t : inputs) node->dtypes.push_back(t.scalar_type());
  }
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    handle.callBoxed(stack);
  }
  const at::Tensor out = (*stack)[stack->size() - 2].toTensor();
  const at::Tensor saved = (*stack)[stack->size() - 1].toTensor();
  Saved s{SavedVariable(), a.p, a.scale_by_keep, out.sym_strides().vec(), a.shard};
  const at::Tensor tangent = forward_tangent(op, a, s, out, saved);
  if (node) {
    torch::autograd::set_history(out, node);
    s.saved = SavedVariable(saved, true);
    node->saved = std::move(s);
  }
  if (tangent.defined()) out._set_fw_grad(tangent, /*level=*/0, /*is_inplace_op=*/false);
}

// An in-place op: torch's checks first, then the op (the ADInplaceOrView
// kernel bumps the version), then `input`'s history rebased on the node
// (through CopySlices for a view), and its tangent, if it has one, through
// the mask in place. Element masks follow the memory order the op walked
// `input` in.
void in_place_op(const OpSpec& op, const c10::OperatorHandle& handle, torch::jit::Stack* stack, size_t count) {
  const ForwardArgs a = forward_args(op, *stack, count);
  const bool requires_grad = torch::autograd::compute_requires_grad(a.input);
  torch::autograd::check_inplace(a.input, requires_grad);
  c10::intrusive_ptr<ForwardGradient> node;
  if (requires_grad) {
    node = c10::make_intrusive<ForwardGradient>(op);
    node->set_next_edges(torch::autograd::collect_next_edges(a.input));
    node->dtypes = {a.input.scalar_type()};
  }
  const at::Tensor tangent = tangent_of(a.input);
  Saved s{SavedVariable(), a.p, a.scale_by_keep,
          op.unit == UnitKind::Element && (node || tangent.defined()) ? walked_strides(a.input)
                                                                      : std::vector<c10::SymInt>{}};
  {
    at::AutoDispatchBelowAutograd below_autograd;
    handle.callBoxed(stack);
  }
  // The op returns `input` itself, as VariableType's in-place kernels do,
  // whatever the layers below returned: a functorch transform wraps a
  // redispatched result anew, which would leave the history on `input` alone.
  (*stack)[stack->size() - 2] = a.input;
  // The mask as the op returned it: the argument it wrote, or what a
  // DTensor handler returns in its place (the shards' masks).
  const at::Tensor mask = (*stack)[stack->size() - 1].toTensor();
  if (tangent.defined()) {
    tangent.copy_(through(backward_of(op), s, tangent, mask).first);
  }
  if (node) {
    torch::autograd::rebase_history(a.input, node);
    s.saved = SavedVariable(mask, true);
    node->saved = std::move(s);
  }
}

// ----------------------------------------------------------- backward ops

void backward_op(const OpSpec& op, const c10::OperatorHandle& handle, torch::jit::Stack* stack, size_t count) {
  const BackwardArgs a = backward_args(op, *stack, count);
  c10::intrusive_ptr<BackwardGradient> node;
  if (torch::autograd::compute_requires_grad(a.grad)) {
    node = c10::make_intrusive<BackwardGradient>(op);
    node->set_next_edges(torch::autograd::collect_next_edges(a.grad, a.saved));
  }
  const size_t returns = handle.schema().returns().size();
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    handle.callBoxed(stack);
  }
  const size_t first = stack->size() - returns;
  const at::Tensor grad_input = (*stack)[first].toTensor();
  Saved s{SavedVariable(), a.p, a.scale_by_keep, walked_strides(a.grad), a.shard};
  // Linear in grad: the tangent goes through the same op.
  if (const at::Tensor t = tangent_of(a.grad); t.defined()) {
    auto [t_input, t_bias] = through(op, s, t, a.saved, a.dtype);
    grad_input._set_fw_grad(t_input, /*level=*/0, /*is_inplace_op=*/false);
    if (returns == 2) (*stack)[first + 1].toTensor()._set_fw_grad(t_bias, /*level=*/0, /*is_inplace_op=*/false);
  }
  if (node) {
    if (returns == 1) {
      torch::autograd::set_history(grad_input, node);
    } else {
      torch::autograd::set_history({grad_input, (*stack)[first + 1].toTensor()}, node);
      node->sizes = a.grad.sym_sizes().vec();
    }
    node->grad_dtype = a.grad.scalar_type();
    s.strides = grad_input.sym_strides().vec();
    s.saved = SavedVariable(a.saved, false);
    node->saved = std::move(s);
  }
}

class AutogradKernel final : public c10::OperatorKernel {
 public:
  explicit AutogradKernel(const OpSpec& op) : op_(op) {}

  void operator()(const c10::OperatorHandle& handle, c10::DispatchKeySet, torch::jit::Stack* stack) {
    const size_t count = handle.schema().arguments().size();
    switch (op_.variant) {
      case Variant::Masked:
      case Variant::LowMemory:
        return forward_op(op_, handle, stack, count);
      case Variant::InPlace:
        return in_place_op(op_, handle, stack, count);
      case Variant::Backward:
      case Variant::LowMemoryBackward:
        return backward_op(op_, handle, stack, count);
    }
  }

 private:
  const OpSpec& op_;
};

// The ADInplaceOrView kernel of an in-place op: the op, then the
// version-counter bumps that tell autograd the input and the mask changed. An inference
// tensor outside inference mode has no version counter to bump: refused
// before it is written.
void bump_version_after(const c10::OperatorHandle& handle, torch::jit::Stack* stack) {
  const size_t count = handle.schema().arguments().size();
  const at::Tensor input = torch::jit::peek(*stack, 0, count).toTensor();
  const at::Tensor mask = torch::jit::peek(*stack, 1, count).toTensor();
  TORCH_CHECK(!input.is_inference() || c10::InferenceMode::is_enabled(),
              "Inplace update to inference tensor outside InferenceMode is not allowed. "
              "You can make a clone to get a normal tensor before doing inplace update.");
  {
    at::AutoDispatchBelowADInplaceOrView below;
    handle.callBoxed(stack);
  }
  torch::autograd::increment_version(input);
  torch::autograd::increment_version(mask);
}

}  // namespace
}  // namespace regdrop

TORCH_LIBRARY_IMPL(regdrop, Autograd, m) {
  for (const regdrop::OpSpec& op : regdrop::kOps) {
    if (op.family != regdrop::Family::Elementwise) continue;  // the norm family's: norm/norm_autograd.cpp
    m.impl(op.name, torch::CppFunction::makeFromBoxedFunctor(std::make_unique<regdrop::AutogradKernel>(op)));
  }
}

TORCH_LIBRARY_IMPL(regdrop, ADInplaceOrView, m) {
  for (const regdrop::OpSpec& op : regdrop::kOps) {
    if (op.variant == regdrop::Variant::InPlace) {
      m.impl(op.name, torch::CppFunction::makeFromBoxedFunction<&regdrop::bump_version_after>());
    }
  }
}
