// Every regdrop op schema, written once. The kernels are registered per
// device at the end of cpu/dropout_cpu.cpp and cuda/dropout_cuda.cu; fake
// kernels and autograd formulas in regdrop_ext/_ops.py.
//
// Conventions shared by all ops:
//   * A mask is uint8 with ceil(units / 8) bytes; bit i % 8 of byte i / 8 is
//     the keep flag of unit i, units numbered in the memory order of `input`
//     (a tensor whose elements are not dense in memory is made contiguous
//     first, and the output is contiguous).
//   * Random ops draw from `generator` (default: the device's default
//     generator), or, given `seed`, from the Philox stream (seed, offset), the
//     same on every device (README, "The random mapping").
//   * Backward ops read `grad` in the same memory order as the forward output.
#include <torch/library.h>

TORCH_LIBRARY(regdrop, m) {
  const std::vector<at::Tag> random = {at::Tag::nondeterministic_seeded};

  m.def(
      "dropout(Tensor input, float p, Generator? generator=None, *, int? seed=None, int offset=0)"
      " -> (Tensor output, Tensor mask)",
      random);
  m.def(
      "dropout_(Tensor(a!) input, float p, Generator? generator=None, *, int? seed=None, "
      "int offset=0) -> Tensor mask",
      random);
  m.def("dropout_backward(Tensor grad, Tensor mask, float p) -> Tensor");
}
