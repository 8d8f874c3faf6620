// The norm family's op schemas (the manifest's third table), written once:
// schemas.h's define_ops() declares them with every other op. Conventions as
// schemas.h's: the same RNG arguments and shard= as every random op, masks
// of a bit per unit (element units numbered as dropout_add numbers them,
// samples by index along dim 0), and backward ops that read grad_output in
// the forward output's (contiguous) order.
//
//   dropout_add_norm: output = norm(residual + dropout(input [+ input_bias])) * weight + bias
//     over the last dimension, LayerNorm or (rms=True) RMSNorm; returns the
//     normalized output, the residual stream residual_out (what the norm
//     normalized, in the residual stream's dtype), the mask (empty for
//     p == 0), and the per-row mean (0 for RMSNorm) and rstd.
//   dropout_add_norm_low_memory: the same with element units and an int64[2]
//     rng_state (seed, offset) in place of the mask.
//   *_backward: the gradients of input, residual (residual_grad), and of
//     weight, bias and input_bias in the dtype each *_grad names (None: not
//     computed); grad_residual_out is the gradient reaching residual_out
//     from elsewhere (a pre-norm block's next residual add), or None.
#pragma once

#include <string>

#define REGDROP_NORM_RNG_ARGS "Generator? generator=None, *, int? seed=None, int offset=0, int[]? shard=None)"
#define REGDROP_NORM_OUTPUTS "(Tensor output, Tensor residual_out, Tensor mask, Tensor mean, Tensor rstd)"
#define REGDROP_NORM_GRADS \
  "(Tensor grad_input, Tensor grad_residual, Tensor grad_weight, Tensor grad_bias, Tensor grad_input_bias)"
#define REGDROP_NORM_WANTED \
  "bool residual_grad=True, ScalarType? weight_grad=None, ScalarType? bias_grad=None, ScalarType? input_bias_grad=None"

namespace regdrop::norm {

// The schema of norm op `name` (a row of REGDROP_NORM_OPS), or "".
inline std::string schema_of(const std::string& name) {
  if (name == "dropout_add_norm") {
    return "dropout_add_norm(Tensor input, Tensor? residual, Tensor? weight, Tensor? bias, float p, float eps=1e-05, "
           "bool rms=False, Tensor? input_bias=None, bool drop_path=False, bool scale_by_keep=True, "
           "bool residual_in_fp32=False, " REGDROP_NORM_RNG_ARGS " -> " REGDROP_NORM_OUTPUTS;
  }
  if (name == "dropout_add_norm_low_memory") {
    return "dropout_add_norm_low_memory(Tensor input, Tensor? residual, Tensor? weight, Tensor? bias, float p, "
           "float eps=1e-05, bool rms=False, Tensor? input_bias=None, bool residual_in_fp32=False, "
           REGDROP_NORM_RNG_ARGS " -> (Tensor output, Tensor residual_out, Tensor rng_state, Tensor mean, Tensor rstd)";
  }
  if (name == "dropout_add_norm_backward") {
    return "dropout_add_norm_backward(Tensor grad_output, Tensor? grad_residual_out, Tensor residual_out, Tensor mask, "
           "Tensor mean, Tensor rstd, Tensor? weight, float p, bool rms=False, bool drop_path=False, "
           "bool scale_by_keep=True, *, " REGDROP_NORM_WANTED ") -> " REGDROP_NORM_GRADS;
  }
  if (name == "dropout_add_norm_low_memory_backward") {
    return "dropout_add_norm_low_memory_backward(Tensor grad_output, Tensor? grad_residual_out, Tensor residual_out, "
           "Tensor rng_state, Tensor mean, Tensor rstd, Tensor? weight, float p, bool rms=False, *, "
           REGDROP_NORM_WANTED ", int[]? shard=None) -> " REGDROP_NORM_GRADS;
  }
  return "";
}

}  // namespace regdrop::norm

#undef REGDROP_NORM_RNG_ARGS
#undef REGDROP_NORM_OUTPUTS
#undef REGDROP_NORM_GRADS
#undef REGDROP_NORM_WANTED
