// Every op's schema, written from the manifest (regdrop/manifest.h):
// define_ops() declares them in a library. ops.cpp calls it for
// TORCH_LIBRARY(regdrop); the host emulation of the CUDA kernels
// (tests/cuda_emulation) calls it for a namespace of its own, so that both
// run the very same ops.
//
// The argument lists, by the row's operands and unit:
//   forward      (input[, bias][, residual], p[, scale_by_keep], <rng>) -> (output, mask)
//   in place     (input!, mask!, p[, scale_by_keep], <rng>) -> (input!, mask!): the caller's mask
//                of ceil(units / 8) bytes is written (torch.compile supports no op that returns
//                both an alias of its input and a new tensor)
//   low memory   (input[, bias][, residual], p, <rng>) -> (output, rng_state)
//   backward     (grad, mask, p[, scale_by_keep], *, dtype) -> grad_input[, grad_bias]
//                (grad, rng_state, p, *, shard, dtype) for the low-memory ops; grad_input
//                in dtype (default grad's): a 16-bit input's gradient under a float32
//                output, in one pass
//   <rng>        Generator? generator=None, *, int? seed=None, int offset=0, int[]? shard=None
//
// Conventions shared by all ops (docs/semantics.md, docs/random-mapping.md):
//   * A mask is uint8 with ceil(units / 8) bytes; bit i % 8 of byte i / 8 is
//     the keep flag of unit i. Element units are numbered in the memory order
//     of the output; samples by index n, channels by n * C + c.
//   * Random ops draw from `generator` (default: the device's default
//     generator), or, given `seed`, from the Philox stream (seed, offset), the
//     same on every device.
//   * Given `shard` = (first, run, stride), a random op is a shard of a
//     larger call (a DTensor's local part) and draws each unit where that
//     call would: unit i is the larger call's unit
//     first + (i / run) * stride + i % run.
//   * Kept units are scaled by 1 / q, q the keep probability the 16-bit
//     threshold gives (philox.h), so that E[output] = input for every p.
#pragma once

#include <torch/library.h>

#include <string>

#include "include/regdrop/manifest.h"
#include "norm/norm_schemas.h"

namespace regdrop {

inline std::string schema_of(const OpSpec& op) {
  if (op.family == Family::Norm) return norm::schema_of(op.name);
  const std::string rng = "Generator? generator=None, *, int? seed=None, int offset=0, int[]? shard=None";
  const std::string keep = op.scale_by_keep() ? ", bool scale_by_keep=True" : "";
  const std::string dtype = "ScalarType? dtype=None";  // a backward's grad_input: grad's by default
  std::string tensors = "Tensor input";
  if (op.bias) tensors += ", Tensor bias";
  if (op.residual) tensors += ", Tensor residual";
  switch (op.variant) {
    case Variant::Masked:
      return std::string(op.name) + "(" + tensors + ", float p" + keep + ", " + rng + ") -> (Tensor output, Tensor mask)";
    case Variant::InPlace:
      return std::string(op.name) + "(Tensor(a!) input, Tensor(b!) mask, float p" + keep + ", " + rng +
             ") -> (Tensor(a!), Tensor(b!))";
    case Variant::LowMemory:
      return std::string(op.name) + "(" + tensors + ", float p" + keep + ", " + rng +
             ") -> (Tensor output, Tensor rng_state)";
    case Variant::Backward:
      return std::string(op.name) + "(Tensor grad, Tensor mask, float p" + keep + ", *, " + dtype + ") -> " +
             (op.bias ? "(Tensor grad_input, Tensor grad_bias)" : "Tensor");
    case Variant::LowMemoryBackward:
      return std::string(op.name) + "(Tensor grad, Tensor rng_state, float p" + keep + ", *, int[]? shard=None, " + dtype + ") -> Tensor";
  }
  return {};
}

inline void define_ops(torch::Library& m) {
  for (const OpSpec& op : kOps) {
    if (op.is_forward()) {
      m.def(schema_of(op).c_str(), {at::Tag::nondeterministic_seeded});
    } else {
      m.def(schema_of(op).c_str());
    }
  }
}

}  // namespace regdrop
