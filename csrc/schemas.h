// Every regdrop op schema, written once: define_ops() declares them in a
// library. ops.cpp calls it for TORCH_LIBRARY(regdrop); the host emulation of
// the CUDA kernels (tests/cuda_emulation) calls it for a namespace of its own,
// so that both run the very same ops. The kernels are registered per device
// at the end of cpu/dropout_cpu.cpp and cuda/cuda_backend.cpp, autograd in
// autograd.cpp, and fake kernels in regdrop_ext/_ops.py.
//
// Conventions shared by all ops:
//   * A mask is uint8 with ceil(units / 8) bytes; bit i % 8 of byte i / 8 is
//     the keep flag of unit i. Element units are numbered in the memory order
//     of `input` (operands without one shared dense layout are made
//     contiguous first, and the output is contiguous); samples by index n,
//     channels by n * C + c.
//   * Random ops draw from `generator` (default: the device's default
//     generator), or, given `seed`, from the Philox stream (seed, offset), the
//     same on every device (README, "The random mapping").
//   * Given `shard` = (first, run, stride), a random op is a shard of a
//     larger call (a DTensor's local part) and draws each unit where that
//     call would: unit i is the larger call's unit
//     first + (i / run) * stride + i % run. So shards of a tensor, drawn
//     apart, draw what the whole tensor draws. Backward ops need no shard,
//     but dropout_low_memory_backward, which draws again, takes the forward's.
//   * Backward ops read `grad` in the same memory order as the forward output.
#pragma once

#include <torch/library.h>

// The shared tail of every random op's arguments.
#define REGDROP_RNG_ARGS "Generator? generator=None, *, int? seed=None, int offset=0, int[]? shard=None)"

namespace regdrop {

inline void define_ops(torch::Library& m) {
  const std::vector<at::Tag> random = {at::Tag::nondeterministic_seeded};

  // Element dropout: y = keep ? x / (1 - p) : 0.
  m.def("dropout(Tensor input, float p, " REGDROP_RNG_ARGS " -> (Tensor output, Tensor mask)", random);
  m.def("dropout_(Tensor(a!) input, float p, " REGDROP_RNG_ARGS " -> Tensor mask", random);
  m.def("dropout_backward(Tensor grad, Tensor mask, float p) -> Tensor");

  // Fused residual forms: y = residual + dropout(input [+ bias]).
  m.def("dropout_add(Tensor input, Tensor residual, float p, " REGDROP_RNG_ARGS
            " -> (Tensor output, Tensor mask)",
        random);
  m.def("bias_dropout_add(Tensor input, Tensor bias, Tensor residual, float p, " REGDROP_RNG_ARGS
            " -> (Tensor output, Tensor mask)",
        random);
  m.def("bias_dropout_add_backward(Tensor grad, Tensor mask, float p)"
        " -> (Tensor grad_input, Tensor grad_bias)");

  // Channel dropout (Dropout1d/2d/3d): one bit per (n, c) of an (N, C, *) input.
  m.def("channel_dropout(Tensor input, float p, " REGDROP_RNG_ARGS " -> (Tensor output, Tensor mask)",
        random);
  m.def("channel_dropout_(Tensor(a!) input, float p, " REGDROP_RNG_ARGS " -> Tensor mask", random);
  m.def("channel_dropout_backward(Tensor grad, Tensor mask, float p) -> Tensor");

  // Drop-path (stochastic depth): one bit per sample along dim 0.
  m.def("drop_path(Tensor input, float p, bool scale_by_keep=True, " REGDROP_RNG_ARGS
            " -> (Tensor output, Tensor mask)",
        random);
  m.def("drop_path_add(Tensor input, Tensor residual, float p, bool scale_by_keep=True, " REGDROP_RNG_ARGS
            " -> (Tensor output, Tensor mask)",
        random);
  m.def("drop_path_backward(Tensor grad, Tensor mask, float p, bool scale_by_keep=True) -> Tensor");

  // Low-memory element dropout: no mask; rng_state = int64[2] (seed, offset)
  // on the input's device, from which backward draws the same bits again.
  m.def("dropout_low_memory(Tensor input, float p, " REGDROP_RNG_ARGS " -> (Tensor output, Tensor rng_state)",
        random);
  m.def("dropout_add_low_memory(Tensor input, Tensor residual, float p, " REGDROP_RNG_ARGS
            " -> (Tensor output, Tensor rng_state)",
        random);
  m.def("dropout_low_memory_backward(Tensor grad, Tensor rng_state, float p, *, int[]? shard=None) -> Tensor");
}

}  // namespace regdrop

#undef REGDROP_RNG_ARGS
