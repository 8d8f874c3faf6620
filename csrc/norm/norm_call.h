// One call of the norm family (dropout + residual + LayerNorm/RMSNorm over
// the last dimension), as plain data that host and device code both read.
// The op layer (norm_ops.h) fills it; the CPU driver (cpu/norm_cpu.cpp) and
// the CUDA launch plan (cuda/norm_launch.h) run it. No ATen types here.
//
// A call is `rows` contiguous rows of `hidden` elements. Forward, per element
// (in the compute type: float, or double for float64):
//   v = input [+ input_bias[col]]
//   s = keep ? residual + v * scale : residual   (no residual: keep ? v * scale : 0)
//   residual_out = s rounded to the residual type; the norm reads it back widened,
//                  so that what backward recomputes from residual_out is what forward saw
//   mean = row_sum(s) / H (LayerNorm; 0 for RMSNorm)
//   var  = row_sum((s - mean)^2) / H
//   rstd = 1 / sqrt(var + eps)
//   output = (s - mean) * rstd * weight[col] + bias[col], rounded to the input type
// Backward, with z = (s - mean) * rstd and dz = grad_output * weight:
//   a = row_sum(dz) / H (LayerNorm; 0 for RMSNorm), b = row_sum(dz * z) / H
//   ds = rstd * ((dz - a) - z * b) [+ grad_residual_out]
//   grad_residual = ds;  grad_input = keep ? ds * scale : 0
//   grad_weight = col_sum(grad_output * z), grad_bias = col_sum(grad_output),
//   grad_input_bias = col_sum(grad_input before rounding)
// in the order row_order.h fixes, each operation rounded once (rounding.h).
#pragma once

#include <cstdint>

#include "../kernel_call.h"

namespace regdrop::norm {

enum class NormKind : uint8_t { Layer, RMS };

// Where each element's keep bit comes from.
struct RowBits {
  // Elements: a bit per element e (= row * hidden + col), the mapping of
  // dropout_add. Rows: a bit per run of rows_per_unit rows (drop-path: a
  // sample); with neither a draw nor mask_in, every element is kept (p == 0).
  bool element_units = true;
  bool draw = false;              // draw the units' bits, else read mask_in
  PhiloxSource rng;               // draw
  uint32_t threshold = 0;         // draw: keep iff u16 >= threshold
  ShardMap shard;                 // draw: the units' place in a larger call
  uint8_t* mask_out = nullptr;    // draw: the bits drawn, or null (low-memory mode, element units)
  int64_t* rng_state_out = nullptr;  // draw: receives the unpacked (seed, offset), or null
  const uint8_t* mask_in = nullptr;
  int64_t rows_per_unit = 1;      // Rows
  int64_t units = 0;              // bits of the mask
};

struct NormForwardCall {
  ScalarKind dtype = ScalarKind::Float;           // input and output
  ScalarKind residual_dtype = ScalarKind::Float;  // residual and residual_out
  NormKind kind = NormKind::Layer;
  int64_t rows = 0;
  int64_t hidden = 0;
  const void* input = nullptr;
  const void* residual = nullptr;    // or null: none
  const void* input_bias = nullptr;  // hidden values of the compute type, or null
  const void* weight = nullptr;      // hidden values of the compute type (the op passes 1 for none)
  const void* bias = nullptr;        // hidden values of the compute type (the op passes -0 for none)
  void* output = nullptr;
  void* residual_out = nullptr;
  void* mean = nullptr;  // rows values of the compute type
  void* rstd = nullptr;
  double scale = 1.0;
  double eps = 1e-5;
  RowBits bits;
};

struct NormBackwardCall {
  ScalarKind dtype = ScalarKind::Float;           // grad_output and grad_input
  ScalarKind residual_dtype = ScalarKind::Float;  // residual_out, grad_residual_out, grad_residual
  NormKind kind = NormKind::Layer;
  int64_t rows = 0;
  int64_t hidden = 0;
  const void* grad_output = nullptr;
  const void* grad_residual_out = nullptr;  // or null: none
  const void* residual_out = nullptr;
  const void* mean = nullptr;
  const void* rstd = nullptr;
  const void* weight = nullptr;  // hidden values of the compute type
  void* grad_input = nullptr;
  void* grad_residual = nullptr;  // or null: not wanted
  // Parameter gradients, each in its own dtype, or null where not wanted.
  void* grad_weight = nullptr;
  void* grad_bias = nullptr;
  void* grad_input_bias = nullptr;
  ScalarKind weight_dtype = ScalarKind::Float;
  ScalarKind bias_dtype = ScalarKind::Float;
  ScalarKind input_bias_dtype = ScalarKind::Float;
  double scale = 1.0;
  RowBits bits;
};

inline bool wants_parameter_gradients(const NormBackwardCall& c) {
  return c.grad_weight != nullptr || c.grad_bias != nullptr || c.grad_input_bias != nullptr;
}

}  // namespace regdrop::norm
