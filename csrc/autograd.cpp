// Autograd for the regdrop ops, on the Autograd dispatch key: for Python
// (torch.ops.regdrop.*) and C++ callers alike. Each forward saves only its
// mask (a bit per unit) or its 16-byte rng_state; its backward is one call of
// a backward op, and the residual's gradient is the incoming gradient itself.
// Backward ops are linear in `grad` and their own adjoints: double backward.
//
// In C++ rather than through torch.library.register_autograd: the Python
// layers cost about 60 us per forward+backward on the CPU (against 20 us for
// the kernels), the whole cost of a call below ~64K elements. The in-place
// ops' autograd stays in regdrop_ext/_ops.py, as a torch.autograd.Function.
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "include/regdrop/regdrop.h"

namespace regdrop {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::Function;
using torch::autograd::variable_list;
using Generator = std::optional<at::Generator>;
using Seed = std::optional<int64_t>;

// What every backward needs: the saved mask or rng_state, p, and the strides
// of the output whose memory order element masks follow.
void save(AutogradContext* ctx, const at::Tensor& out, const at::Tensor& saved, double p) {
  ctx->mark_non_differentiable({saved});
  ctx->save_for_backward({saved});
  ctx->saved_data["p"] = p;
  ctx->saved_data["strides"] = out.sym_strides();
}

at::Tensor saved_tensor(AutogradContext* ctx) { return ctx->get_saved_variables()[0]; }

double saved_p(AutogradContext* ctx) { return ctx->saved_data["p"].toDouble(); }

// `grad` laid out like the forward output, as element masks require.
at::Tensor in_output_order(AutogradContext* ctx, const at::Tensor& grad) {
  const std::vector<c10::SymInt> strides = ctx->saved_data["strides"].toSymIntVector();
  if (grad.sym_strides() == c10::SymIntArrayRef(strides)) return grad;
  return at::empty_strided_symint(grad.sym_sizes(), strides, grad.options()).copy_(grad);
}

std::tuple<at::Tensor, at::Tensor> pair(const variable_list& outputs) {
  return {outputs[0], outputs[1]};
}

// Gradients for (input, [residual,] then `rest` non-differentiable arguments).
variable_list gradients(at::Tensor input, std::optional<at::Tensor> residual, size_t rest) {
  variable_list grads{std::move(input)};
  if (residual) grads.push_back(*residual);
  grads.resize(grads.size() + rest);
  return grads;
}

// ------------------------------------------------------------- forward ops

using Forward = std::tuple<at::Tensor, at::Tensor> (*)(const at::Tensor&, double, const Generator&,
                                                       Seed, int64_t);
using ForwardAdd = std::tuple<at::Tensor, at::Tensor> (*)(const at::Tensor&, const at::Tensor&, double,
                                                          const Generator&, Seed, int64_t);
using Backward = at::Tensor (*)(const at::Tensor&, const at::Tensor&, double);

// Element masks follow the output's memory order; unit masks (a bit per
// channel) do not, and take `grad` in whatever layout it comes.
at::Tensor grad_for(AutogradContext* ctx, const at::Tensor& grad, bool element_order) {
  return element_order ? in_output_order(ctx, grad) : grad;
}

// (output, saved) = Op(input, p, ...); grad_input = Back(grad, saved, p):
// dropout, dropout_low_memory and channel_dropout.
template <Forward Op, Backward Back, bool kElementOrder>
struct Masked : Function<Masked<Op, Back, kElementOrder>> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input, double p,
                               const Generator& g, Seed seed, int64_t offset) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [out, saved] = Op(input, p, g, seed, offset);
    save(ctx, out, saved, p);
    return {out, saved};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined()) return gradients({}, std::nullopt, 4);
    return gradients(Back(grad_for(ctx, grads[0], kElementOrder), saved_tensor(ctx), saved_p(ctx)),
                     std::nullopt, 4);
  }
};

// The same with a residual added, whose gradient is `grad` itself:
// dropout_add and dropout_add_low_memory.
template <ForwardAdd Op, Backward Back>
struct MaskedAdd : Function<MaskedAdd<Op, Back>> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input,
                               const at::Tensor& residual, double p, const Generator& g, Seed seed,
                               int64_t offset) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [out, saved] = Op(input, residual, p, g, seed, offset);
    save(ctx, out, saved, p);
    return {out, saved};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined()) return gradients({}, at::Tensor(), 4);
    return gradients(Back(in_output_order(ctx, grads[0]), saved_tensor(ctx), saved_p(ctx)), grads[0],
                     4);
  }
};

// Drop-path masks are a bit per sample: any layout of `grad` will do.
struct DropPath : Function<DropPath> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input, double p,
                               bool scale_by_keep, const Generator& g, Seed seed, int64_t offset) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [out, mask] = regdrop::drop_path(input, p, scale_by_keep, g, seed, offset);
    save(ctx, out, mask, p);
    ctx->saved_data["scale_by_keep"] = scale_by_keep;
    return {out, mask};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined()) return gradients({}, std::nullopt, 5);
    return gradients(drop_path_backward(grads[0], saved_tensor(ctx), saved_p(ctx),
                                        ctx->saved_data["scale_by_keep"].toBool()),
                     std::nullopt, 5);
  }
};

struct DropPathAdd : Function<DropPathAdd> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input,
                               const at::Tensor& residual, double p, bool scale_by_keep,
                               const Generator& g, Seed seed, int64_t offset) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [out, mask] = regdrop::drop_path_add(input, residual, p, scale_by_keep, g, seed, offset);
    save(ctx, out, mask, p);
    ctx->saved_data["scale_by_keep"] = scale_by_keep;
    return {out, mask};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined()) return gradients({}, at::Tensor(), 5);
    return gradients(drop_path_backward(grads[0], saved_tensor(ctx), saved_p(ctx),
                                        ctx->saved_data["scale_by_keep"].toBool()),
                     grads[0], 5);
  }
};

struct BiasDropoutAdd : Function<BiasDropoutAdd> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& bias,
                               const at::Tensor& residual, double p, const Generator& g, Seed seed,
                               int64_t offset) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [out, mask] = regdrop::bias_dropout_add(input, bias, residual, p, g, seed, offset);
    save(ctx, out, mask, p);
    return {out, mask};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined()) return variable_list(7);
    auto [grad_input, grad_bias] =
        bias_dropout_add_backward(in_output_order(ctx, grads[0]), saved_tensor(ctx), saved_p(ctx));
    return {grad_input, grad_bias, grads[0], {}, {}, {}, {}};
  }
};

// ------------------------------------------------------------ backward ops

// grad_input = Op(grad, saved, ...): linear in grad, and its own adjoint.
template <Backward Op, bool kElementOrder>
struct SelfAdjoint : Function<SelfAdjoint<Op, kElementOrder>> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& grad, const at::Tensor& saved,
                            double p) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    at::Tensor out = Op(grad, saved, p);
    ctx->save_for_backward({saved});
    ctx->saved_data["p"] = p;
    ctx->saved_data["strides"] = out.sym_strides();
    return out;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined()) return variable_list(3);
    return {Op(grad_for(ctx, grads[0], kElementOrder), saved_tensor(ctx), saved_p(ctx)), {}, {}};
  }
};

struct DropPathBackward : Function<DropPathBackward> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& grad, const at::Tensor& mask,
                            double p, bool scale_by_keep) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    ctx->save_for_backward({mask});
    ctx->saved_data["p"] = p;
    ctx->saved_data["scale_by_keep"] = scale_by_keep;
    return drop_path_backward(grad, mask, p, scale_by_keep);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined()) return variable_list(4);
    return {drop_path_backward(grads[0], saved_tensor(ctx), saved_p(ctx),
                               ctx->saved_data["scale_by_keep"].toBool()),
            {}, {}, {}};
  }
};

// (grad_input, grad_bias) = (mask * s * grad, its row sums): the adjoint
// sends (a, b) to mask * s * (a + b broadcast over the rows).
struct BiasDropoutAddBackward : Function<BiasDropoutAddBackward> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& grad, const at::Tensor& mask,
                               double p) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [grad_input, grad_bias] = bias_dropout_add_backward(grad, mask, p);
    save(ctx, grad_input, mask, p);
    ctx->saved_data["sizes"] = grad.sym_sizes();
    return {grad_input, grad_bias};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    at::Tensor total = grads[0];
    if (grads[1].defined()) {
      const auto sizes = ctx->saved_data["sizes"].toSymIntVector();
      total = total.defined() ? total.add(grads[1]) : grads[1].expand_symint(sizes);
    }
    if (!total.defined()) return variable_list(3);
    return {dropout_backward(in_output_order(ctx, total), saved_tensor(ctx), saved_p(ctx)), {}, {}};
  }
};

}  // namespace
}  // namespace regdrop

TORCH_LIBRARY_IMPL(regdrop, Autograd, m) {
  using namespace regdrop;
  using Dropout = Masked<&dropout, &dropout_backward, true>;
  using DropoutLowMemory = Masked<&dropout_low_memory, &dropout_low_memory_backward, true>;
  using ChannelDropout = Masked<&channel_dropout, &channel_dropout_backward, false>;
  using DropoutAdd = MaskedAdd<&dropout_add, &dropout_backward>;
  using DropoutAddLowMemory = MaskedAdd<&dropout_add_low_memory, &dropout_low_memory_backward>;
  m.impl("dropout", [](const at::Tensor& input, double p, const Generator& g, Seed seed,
                       int64_t offset) { return pair(Dropout::apply(input, p, g, seed, offset)); });
  m.impl("dropout_low_memory", [](const at::Tensor& input, double p, const Generator& g, Seed seed,
                                  int64_t offset) {
    return pair(DropoutLowMemory::apply(input, p, g, seed, offset));
  });
  m.impl("channel_dropout", [](const at::Tensor& input, double p, const Generator& g, Seed seed,
                               int64_t offset) {
    return pair(ChannelDropout::apply(input, p, g, seed, offset));
  });
  m.impl("dropout_add", [](const at::Tensor& input, const at::Tensor& residual, double p,
                           const Generator& g, Seed seed, int64_t offset) {
    return pair(DropoutAdd::apply(input, residual, p, g, seed, offset));
  });
  m.impl("dropout_add_low_memory", [](const at::Tensor& input, const at::Tensor& residual, double p,
                                      const Generator& g, Seed seed, int64_t offset) {
    return pair(DropoutAddLowMemory::apply(input, residual, p, g, seed, offset));
  });
  m.impl("bias_dropout_add", [](const at::Tensor& input, const at::Tensor& bias,
                                const at::Tensor& residual, double p, const Generator& g, Seed seed,
                                int64_t offset) {
    return pair(BiasDropoutAdd::apply(input, bias, residual, p, g, seed, offset));
  });
  m.impl("drop_path", [](const at::Tensor& input, double p, bool scale_by_keep, const Generator& g,
                         Seed seed, int64_t offset) {
    return pair(DropPath::apply(input, p, scale_by_keep, g, seed, offset));
  });
  m.impl("drop_path_add", [](const at::Tensor& input, const at::Tensor& residual, double p,
                             bool scale_by_keep, const Generator& g, Seed seed, int64_t offset) {
    return pair(DropPathAdd::apply(input, residual, p, scale_by_keep, g, seed, offset));
  });
  m.impl("dropout_backward", [](const at::Tensor& grad, const at::Tensor& mask, double p) {
    return SelfAdjoint<&dropout_backward, true>::apply(grad, mask, p);
  });
  m.impl("dropout_low_memory_backward", [](const at::Tensor& grad, const at::Tensor& rng_state,
                                           double p) {
    return SelfAdjoint<&dropout_low_memory_backward, true>::apply(grad, rng_state, p);
  });
  m.impl("channel_dropout_backward", [](const at::Tensor& grad, const at::Tensor& mask, double p) {
    return SelfAdjoint<&channel_dropout_backward, false>::apply(grad, mask, p);
  });
  m.impl("drop_path_backward", [](const at::Tensor& grad, const at::Tensor& mask, double p,
                                  bool scale_by_keep) {
    return DropPathBackward::apply(grad, mask, p, scale_by_keep);
  });
  m.impl("bias_dropout_add_backward", [](const at::Tensor& grad, const at::Tensor& mask, double p) {
    return pair(BiasDropoutAddBackward::apply(grad, mask, p));
  });
}
