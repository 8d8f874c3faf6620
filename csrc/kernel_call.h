// One call of the dropout kernel family, as plain data that host and device
// code both read. The op layer (dropout_ops.h) fills it; the CPU driver and
// the CUDA launcher run it. No ATen types here, so .cu files stay lean.
//
// The family has three axes:
//   * dtype:       float, double, half, bfloat16 (half types compute in float),
//                  one for every operand, or one of two mixes: the one
//                  autocast makes, a 16-bit input with a float32 output and a
//                  float32 or 16-bit residual and bias (the "widening" mix),
//                  and its gradient's, a float32 grad through the mask into
//                  the 16-bit input's gradient (the "narrowing" mix, Scale);
//   * mask source: draw each element's bit from Philox (element dropout),
//                  read element bits, or read the bit of the element's unit
//                  (channel dropout: one unit per (n, c); drop-path: one per sample);
//   * epilogue:    what is written for a kept / dropped element.
#pragma once

#include <cstdint>

#include "philox.h"

namespace regdrop {

enum class ScalarKind : uint8_t { Float, Double, Half, BFloat16 };

enum class MaskSource : uint8_t {
  Draw,      // element i's bit from Philox group i / 8; written to mask_out if set
  Elements,  // element i's bit is bit i of mask_in
  Units,     // element i's bit is bit unit(i) of mask_in (see UnitLayout)
};

enum class Epilogue : uint8_t {
  Scale,            // y = keep ? x * s           : 0
  AddResidual,      // y = keep ? r + x * s       : r
  AddBiasResidual,  // y = keep ? r + (x + b) * s : r, b = bias[i % bias_len]
};

// Which unit element i (in memory order) belongs to:
//   unit(i) = (i / block) * channels + (i / inner) % channels
//   element dropout         {1, 1, 1}
//   drop-path               {S, 1, S}      S = numel / N, one unit per sample
//   channel, contiguous     {S, C, C * S}  S = spatial size
//   channel, channels-last  {1, C, C * S}
struct UnitLayout {
  int64_t inner = 1;
  int64_t channels = 1;
  int64_t block = 1;
};

// Where a drawing kernel takes its seed and offset: values, or (for CUDA
// graph capture and for a saved rng_state tensor) pointers read when the
// kernel runs, plus an increment. Mirrors at::PhiloxCudaState.
struct PhiloxSource {
  uint64_t seed = 0;
  uint64_t offset = 0;
  const int64_t* seed_ptr = nullptr;
  const int64_t* offset_ptr = nullptr;
  uint64_t offset_increment = 0;

  REGDROP_HOST_DEVICE void unpack(uint64_t& seed_out, uint64_t& offset_out) const {
    if (seed_ptr != nullptr) {
      seed_out = static_cast<uint64_t>(*seed_ptr);
      offset_out = static_cast<uint64_t>(*offset_ptr) + offset_increment;
    } else {
      seed_out = seed;
      offset_out = offset;
    }
  }
};

// The element types of a kernel's operands, for the CPU's and the CUDA
// kernels' element types alike: one type throughout, or a mix (above). All
// compute in one type (float, or double throughout), so every operand loads
// into and stores from the same registers.
template <class In, class Residual = In, class Bias = In, class Out = In>
struct OperandTypes {
  using InT = In;
  using ResidualT = Residual;
  using BiasT = Bias;
  using OutT = Out;
};

// Where a call's units lie in the stream of a larger call it is a shard of
// (a DTensor's local tensor): unit i is that call's unit
//   first + (i / run) * stride + i % run,
// runs of `run` consecutive units, `stride` apart. run == 0: no shard, unit
// i is unit i. A drawing call draws its units' bits where the larger call
// would, so the shards of a tensor draw together what the whole draws.
struct ShardMap {
  int64_t first = 0;
  int64_t run = 0;
  int64_t stride = 0;

  bool sharded() const { return run > 0; }
};

struct KernelCall {
  ScalarKind dtype = ScalarKind::Float;  // of the input, and of every operand but in a mix:
  ScalarKind residual_dtype = ScalarKind::Float;
  ScalarKind bias_dtype = ScalarKind::Float;
  ScalarKind out_dtype = ScalarKind::Float;
  MaskSource source = MaskSource::Draw;
  Epilogue epilogue = Epilogue::Scale;

  // Elements (or, with out == nullptr, units whose bits are only drawn).
  int64_t numel = 0;
  void* out = nullptr;
  const void* in = nullptr;
  const void* residual = nullptr;
  const void* bias = nullptr;
  int64_t bias_len = 1;
  double scale = 1.0;  // kept elements are multiplied by it

  // MaskSource::Draw
  PhiloxSource rng;
  uint32_t threshold = 0;           // keep iff u16 >= threshold
  uint8_t* mask_out = nullptr;      // ceil(numel / 8) bytes, or null (low-memory mode)
  int64_t* rng_state_out = nullptr; // receives the unpacked (seed, offset), or null
  ShardMap shard;                   // the units' place in a larger call

  // MaskSource::Elements and MaskSource::Units
  const uint8_t* mask_in = nullptr;
  UnitLayout units;
  int64_t unit_count = 0;  // bits of mask_in (MaskSource::Units)

  // Bias gradient: the column sums (over i % bias_len) of what is written to
  // out, in the order column_sums.h fixes, as bias_len values of the dtype.
  void* bias_grad = nullptr;
};

inline int64_t mask_bytes(int64_t units) { return units / 8 + (units % 8 != 0); }

}  // namespace regdrop
