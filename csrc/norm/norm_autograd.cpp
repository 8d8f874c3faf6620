// Autograd for the norm ops, on the Autograd dispatch key, built from graph
// nodes as csrc/autograd.cpp builds the element family's (so torch.func's
// grad and vjp work): a forward op saves its residual_out (an output: with
// prenorm the caller holds it anyway), its mask (a bit per unit) or
// rng_state, the per-row mean and rstd, and the weight; its backward is one
// call of the backward op, with the parameter gradients it needs.
//
// Forward-mode AD (torch.autograd.forward_ad, torch.func.jvp): the tangent
// of the residual stream is ds = dr + keep * scale * (dx + db), through the
// same mask (the element family's backward ops apply it), and the output's
//   dz = rstd * (ds - mean(ds) - z * mean(z * ds))   (RMSNorm: no mean(ds) term)
//   dy = dz * weight + z * dweight + dbias
// computed with ATen ops in the compute type, so that they are themselves
// differentiable. mask, mean and rstd are not differentiable outputs.
//
// The backward ops are not differentiable (no double backward): a gradient
// through them raises when it reaches them.
#include <ATen/TensorOperators.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/VariableTypeUtils.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "../include/regdrop/regdrop.h"

namespace regdrop::norm {
namespace {

using torch::autograd::Node;
using torch::autograd::SavedVariable;
using torch::autograd::variable_list;
using Generator = std::optional<at::Generator>;
using OptTensor = std::optional<at::Tensor>;
using Seed = std::optional<int64_t>;
using Shard = at::OptionalIntArrayRef;
using Dtype = std::optional<at::ScalarType>;
using Tensors5 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

bool given(const OptTensor& t) { return t.has_value() && t->defined(); }
at::Tensor value(const OptTensor& t) { return given(t) ? *t : at::Tensor(); }

auto forward_op() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("regdrop::dropout_add_norm", "")
                       .typed<Tensors5(const at::Tensor&, const OptTensor&, const OptTensor&, const OptTensor&, double,
                                       double, bool, const OptTensor&, bool, bool, bool, const Generator&, Seed,
                                       int64_t, Shard)>();
  return op;
}

auto low_memory_forward_op() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("regdrop::dropout_add_norm_low_memory", "")
                       .typed<Tensors5(const at::Tensor&, const OptTensor&, const OptTensor&, const OptTensor&, double,
                                       double, bool, const OptTensor&, bool, const Generator&, Seed, int64_t, Shard)>();
  return op;
}

auto backward_op() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("regdrop::dropout_add_norm_backward", "")
                       .typed<Tensors5(const at::Tensor&, const OptTensor&, const at::Tensor&, const at::Tensor&,
                                       const at::Tensor&, const at::Tensor&, const OptTensor&, double, bool, bool, bool,
                                       bool, Dtype, Dtype, Dtype)>();
  return op;
}

auto low_memory_backward_op() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("regdrop::dropout_add_norm_low_memory_backward", "")
                       .typed<Tensors5(const at::Tensor&, const OptTensor&, const at::Tensor&, const at::Tensor&,
                                       const at::Tensor&, const at::Tensor&, const OptTensor&, double, bool, bool,
                                       Dtype, Dtype, Dtype, Shard)>();
  return op;
}

// What a forward call was: the backward op's arguments besides the tensors.
struct Config {
  double p = 0;
  bool rms = false;
  bool drop_path = false;
  bool scale_by_keep = true;
  bool low_memory = false;
  std::optional<std::vector<int64_t>> shard;  // low-memory: the shard its bits are drawn for
};

// The differentiable inputs, in edge order.
enum Input { kInput, kResidual, kWeight, kBias, kInputBias, kInputs };

struct NormGradient : Node {
  explicit NormGradient(std::string name) : name_(std::move(name)) {}

  variable_list apply(variable_list&& grads) override {
    variable_list out(kInputs);
    const at::Tensor& grad_output = grads[0];
    const at::Tensor& grad_residual_out = grads[1];
    if (!grad_output.defined() && !grad_residual_out.defined()) return out;
    const at::Tensor residual_out = saved_residual_out.unpack(getptr());
    const at::Tensor g = grad_output.defined() ? grad_output.to(dtypes[kInput])
                                               : at::zeros(residual_out.sizes(), residual_out.options().dtype(dtypes[kInput]));
    auto wanted = [&](Input i) { return present[i] && should_compute_output(i) ? Dtype(dtypes[i]) : Dtype(); };
    const bool residual_grad = present[kResidual] && should_compute_output(kResidual);
    const OptTensor go = grad_residual_out.defined() ? OptTensor(grad_residual_out) : std::nullopt;
    const at::Tensor w = saved_weight.unpack();
    const OptTensor weight = w.defined() ? OptTensor(w) : std::nullopt;
    Tensors5 r;
    if (config.low_memory) {
      r = low_memory_backward_op().call(g, go, residual_out, saved_mask.unpack(), saved_mean.unpack(),
                                        saved_rstd.unpack(), weight, config.p, config.rms, residual_grad,
                                        wanted(kWeight), wanted(kBias), wanted(kInputBias),
                                        config.shard ? Shard(*config.shard) : std::nullopt);
    } else {
      r = backward_op().call(g, go, residual_out, saved_mask.unpack(), saved_mean.unpack(), saved_rstd.unpack(),
                             weight, config.p, config.rms, config.drop_path, config.scale_by_keep, residual_grad,
                             wanted(kWeight), wanted(kBias), wanted(kInputBias));
    }
    auto [grad_input, grad_residual, grad_weight, grad_bias, grad_input_bias] = r;
    out[kInput] = grad_input;
    out[kResidual] = grad_residual;
    out[kWeight] = grad_weight;
    out[kBias] = grad_bias;
    out[kInputBias] = grad_input_bias;
    if (out[kResidual].defined() && out[kResidual].scalar_type() != dtypes[kResidual]) {
      out[kResidual] = out[kResidual].to(dtypes[kResidual]);
    }
    return out;
  }
  std::string name() const override { return name_; }
  void release_variables() override {
    saved_residual_out.reset_data();
    saved_mask.reset_data();
    saved_mean.reset_data();
    saved_rstd.reset_data();
    saved_weight.reset_data();
  }

  SavedVariable saved_residual_out, saved_mask, saved_mean, saved_rstd, saved_weight;
  Config config;
  bool present[kInputs] = {};
  at::ScalarType dtypes[kInputs] = {};

 private:
  std::string name_;
};

at::Tensor tangent(const OptTensor& t) { return given(t) ? t->_fw_grad(/*level=*/0) : at::Tensor(); }

at::Tensor plus(const at::Tensor& a, const at::Tensor& b) {
  if (!a.defined()) return b;
  if (!b.defined()) return a;
  return a + b;
}

// The forward-mode tangents of (output, residual_out), set on them.
void set_tangents(const at::Tensor& input, const OptTensor& residual, const OptTensor& weight, const OptTensor& bias,
                  const OptTensor& input_bias, const Config& config, const Tensors5& result) {
  const at::Tensor dx = tangent(input), dr = tangent(residual), dw = tangent(weight), db = tangent(bias),
                   dib = tangent(input_bias);
  if (!dx.defined() && !dr.defined() && !dw.defined() && !db.defined() && !dib.defined()) return;
  const auto& [output, residual_out, mask, mean, rstd] = result;
  const at::ScalarType c = mean.scalar_type();
  auto in_c = [&](const at::Tensor& t) { return t.defined() ? t.to(c) : t; };

  // ds = dr + keep * scale * (dx + dib), through the forward's mask.
  at::Tensor branch = plus(in_c(dx), in_c(dib).defined() ? in_c(dib).expand(input.sizes()) : at::Tensor());
  if (branch.defined() && config.p > 0) {
    branch = branch.contiguous();
    if (config.low_memory) {
      branch = dropout_low_memory_backward(branch, mask, config.p,
                                           config.shard ? Shard(*config.shard) : std::nullopt);
    } else if (config.drop_path) {
      branch = drop_path_backward(branch, mask, config.p, config.scale_by_keep);
    } else {
      branch = dropout_backward(branch, mask, config.p);
    }
  }
  const at::Tensor ds = plus(in_c(dr), branch);

  const at::Tensor mean_ = mean.unsqueeze(-1), rstd_ = rstd.unsqueeze(-1);
  const at::Tensor z = (residual_out.to(c) - mean_) * rstd_;
  at::Tensor dy;
  if (ds.defined()) {
    at::Tensor centred = ds - z * (z * ds).mean(-1, true);
    if (!config.rms) centred = centred - ds.mean(-1, true);
    dy = rstd_ * centred;
    if (given(weight)) dy = dy * weight->_fw_primal(/*level=*/0).to(c);
    residual_out._set_fw_grad(ds.to(residual_out.scalar_type()), /*level=*/0, /*is_inplace_op=*/false);
  }
  if (dw.defined()) dy = plus(dy, z * in_c(dw));
  if (db.defined()) dy = plus(dy, in_c(db).expand(output.sizes()));
  output._set_fw_grad(dy.to(output.scalar_type()), /*level=*/0, /*is_inplace_op=*/false);
}

// A forward op: `call` runs it below autograd and returns its five outputs.
template <class Call>
Tensors5 forward(const char* name, const at::Tensor& input, const OptTensor& residual, const OptTensor& weight,
                 const OptTensor& bias, const OptTensor& input_bias, Config config, Call&& call) {
  const std::vector<at::Tensor> inputs = {input, value(residual), value(weight), value(bias), value(input_bias)};
  c10::intrusive_ptr<NormGradient> node;
  if (torch::autograd::compute_requires_grad(inputs)) {
    node = c10::make_intrusive<NormGradient>(name);
    node->set_next_edges(torch::autograd::collect_next_edges(inputs));
    for (int i = 0; i < kInputs; ++i) {
      node->present[i] = inputs[i].defined();
      node->dtypes[i] = inputs[i].defined() ? inputs[i].scalar_type() : input.scalar_type();
    }
  }
  Tensors5 result;
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    result = call();
  }
  if (node) {
    auto& [output, residual_out, mask, mean, rstd] = result;
    torch::autograd::set_history({output, residual_out}, node);
    node->saved_residual_out = SavedVariable(residual_out, true);
    node->saved_mask = SavedVariable(mask, false);
    node->saved_mean = SavedVariable(mean, false);
    node->saved_rstd = SavedVariable(rstd, false);
    node->saved_weight = SavedVariable(value(weight), false);
    node->config = std::move(config);
  }
  set_tangents(input, residual, weight, bias, input_bias, node ? node->config : config, result);
  return result;
}

// The backward ops' outputs get an Error node where a gradient could flow
// through them: a double backward raises when it reaches it, never returning zeros.
void mark_not_differentiable(const char* op, const std::vector<at::Tensor>& inputs, const Tensors5& result) {
  if (!torch::autograd::compute_requires_grad(inputs)) return;
  auto node = c10::make_intrusive<torch::autograd::Error>(
      std::string(op) + " is not differentiable: a gradient through the norm ops' backward (double backward, "
                        "create_graph=True, gradgradcheck) is not supported",
      torch::autograd::collect_next_edges(inputs));
  const auto& [a, b, c, d, e] = result;
  std::vector<at::Tensor> outputs;
  for (const at::Tensor& t : {a, b, c, d, e}) {
    if (t.defined()) outputs.push_back(t);
  }
  torch::autograd::set_history(outputs, node);
}

}  // namespace
}  // namespace regdrop::norm

TORCH_LIBRARY_IMPL(regdrop, Autograd, m) {
  using namespace regdrop::norm;
  m.impl("dropout_add_norm",
         [](const at::Tensor& input, const OptTensor& residual, const OptTensor& weight, const OptTensor& bias,
            double p, double eps, bool rms, const OptTensor& input_bias, bool drop_path, bool scale_by_keep,
            bool residual_in_fp32, const Generator& g, Seed seed, int64_t offset, Shard shard) {
           return forward("RegdropDropoutAddNormBackward", input, residual, weight, bias, input_bias,
                          Config{p, rms, drop_path, scale_by_keep, false, std::nullopt}, [&] {
                            return forward_op().call(input, residual, weight, bias, p, eps, rms, input_bias,
                                                     drop_path, scale_by_keep, residual_in_fp32, g, seed, offset,
                                                     shard);
                          });
         });
  m.impl("dropout_add_norm_low_memory",
         [](const at::Tensor& input, const OptTensor& residual, const OptTensor& weight, const OptTensor& bias,
            double p, double eps, bool rms, const OptTensor& input_bias, bool residual_in_fp32, const Generator& g,
            Seed seed, int64_t offset, Shard shard) {
           Config config{p, rms, false, true, true,
                         shard.has_value() ? std::optional(shard->vec()) : std::nullopt};
           return forward("RegdropDropoutAddNormLowMemoryBackward", input, residual, weight, bias, input_bias,
                          std::move(config), [&] {
                            return low_memory_forward_op().call(input, residual, weight, bias, p, eps, rms,
                                                                input_bias, residual_in_fp32, g, seed, offset, shard);
                          });
         });
  m.impl("dropout_add_norm_backward",
         [](const at::Tensor& grad_output, const OptTensor& grad_residual_out, const at::Tensor& residual_out,
            const at::Tensor& mask, const at::Tensor& mean, const at::Tensor& rstd, const OptTensor& weight, double p,
            bool rms, bool drop_path, bool scale_by_keep, bool residual_grad, Dtype weight_grad, Dtype bias_grad,
            Dtype input_bias_grad) {
           Tensors5 result;
           {
             at::AutoDispatchBelowADInplaceOrView below_autograd;
             result = backward_op().call(grad_output, grad_residual_out, residual_out, mask, mean, rstd, weight, p,
                                         rms, drop_path, scale_by_keep, residual_grad, weight_grad, bias_grad,
                                         input_bias_grad);
           }
           mark_not_differentiable("dropout_add_norm_backward",
                                   {grad_output, value(grad_residual_out), residual_out, value(weight)}, result);
           return result;
         });
  m.impl("dropout_add_norm_low_memory_backward",
         [](const at::Tensor& grad_output, const OptTensor& grad_residual_out, const at::Tensor& residual_out,
            const at::Tensor& rng_state, const at::Tensor& mean, const at::Tensor& rstd, const OptTensor& weight,
            double p, bool rms, bool residual_grad, Dtype weight_grad, Dtype bias_grad, Dtype input_bias_grad,
            Shard shard) {
           Tensors5 result;
           {
             at::AutoDispatchBelowADInplaceOrView below_autograd;
             result = low_memory_backward_op().call(grad_output, grad_residual_out, residual_out, rng_state, mean,
                                                    rstd, weight, p, rms, residual_grad, weight_grad, bias_grad,
                                                    input_bias_grad, shard);
           }
           mark_not_differentiable("dropout_add_norm_low_memory_backward",
                                   {grad_output, value(grad_residual_out), residual_out, value(weight)}, result);
           return result;
         });
}
