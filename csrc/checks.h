// Argument checks shared by every op. Each message names the argument, and
// each raises the Python exception a caller would expect: ValueError for a
// bad probability, TypeError for a bad dtype, RuntimeError otherwise.
//
// The op bodies run on the Meta key too, for meta tensors and under
// torch.compile (fake tensors, symbolic sizes included): sizes are read as
// SymInts, and a check on a symbolic size is a runtime assertion
// (TORCH_SYM_CHECK), as torch's own meta kernels make it.
#pragma once

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/core/SymInt.h>
#include <c10/util/Exception.h>
#include <c10/util/OptionalArrayRef.h>
#include <c10/util/safe_numerics.h>

#include <optional>

#include "include/regdrop/manifest.h"

namespace regdrop {

inline void check_probability(double p, const char* name = "p") {
  TORCH_CHECK_VALUE(p >= 0.0 && p <= 1.0, name, " must be a probability in [0, 1], got ", p);
}

inline bool is_supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

inline void check_floating(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.defined(), name, " must be a tensor, got None");
  TORCH_CHECK_TYPE(is_supported_dtype(t.scalar_type()), name,
                   " must be float32, float64, float16 or bfloat16, got ", t.scalar_type());
  TORCH_CHECK(t.layout() == at::kStrided, name, " must be a strided (dense) tensor, got ", t.layout());
}

inline void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& like, const char* like_name) {
  TORCH_CHECK(t.device() == like.device(), name, " must be on the same device as ", like_name, " (", like.device(),
              "), got ", t.device());
}

// `other` must be a float tensor with `like`'s shape and device: the fused
// ops do not broadcast. Float dtypes may differ (the output promotes).
inline void check_matches(const at::Tensor& other, const char* name, const at::Tensor& like,
                          const char* like_name) {
  check_floating(other, name);
  check_same_device(other, name, like, like_name);
  TORCH_CHECK(other.sym_sizes() == like.sym_sizes(), name, " must have the shape of ", like_name, " ",
              like.sym_sizes(), ", got ", other.sym_sizes(), " (broadcasting is not supported)");
}

// The dimensions an op's unit needs: a sample dimension (dim 0) for
// drop-path, (N, C, *) for channel dropout.
inline void check_unit_dims(UnitKind unit, const at::Tensor& t, const char* name) {
  if (unit == UnitKind::Sample) {
    TORCH_CHECK(t.dim() >= 1, name, " must have a sample dimension (dim 0) for drop-path, got a 0-d tensor");
  } else if (unit == UnitKind::Channel) {
    TORCH_CHECK(t.dim() >= 2, name, " must have shape (N, C, *) for channel dropout, got ", t.sym_sizes());
  }
}

inline void check_bias(const at::Tensor& input, const at::Tensor& bias) {
  TORCH_CHECK(input.dim() >= 1, "input must have at least 1 dimension for a bias, got a 0-d tensor");
  check_floating(bias, "bias");
  check_same_device(bias, "bias", input, "input");
  TORCH_CHECK(bias.dim() == 1 && bias.sym_size(0) == input.sym_size(-1),
              "bias must be 1-D with the size of input's last dimension (", input.sym_size(-1), "), got shape ",
              bias.sym_sizes());
}

// Whether `t`'s storage holds its elements: a resized or borrowed storage
// may not. Only kernels that read memory need it (not the meta kernels).
inline void check_storage(const at::Tensor& t, const char* name) {
  const int64_t needed = (t.storage_offset() + t.numel()) * static_cast<int64_t>(t.element_size());
  TORCH_CHECK(t.numel() == 0 || (t.has_storage() && static_cast<int64_t>(t.storage().nbytes()) >= needed),
              name, "'s storage holds fewer bytes than its ", t.numel(), " elements need");
}

// ceil(units / 8): the bytes of a mask.
inline c10::SymInt mask_bytes(const c10::SymInt& units) { return (units + 7) / 8; }

// A bit mask for `units` units: uint8, 1-D, contiguous, ceil(units / 8) bytes.
// A mask's meaning is the forward call that returned it: a backward op needs
// the mask of a tensor of the same shape and layout. Only its size can be
// checked (without reading device memory, which would wait for a GPU): its
// values are the caller's, on every device; bits past the units are ignored.
inline void check_mask(const at::Tensor& mask, const c10::SymInt& units, const at::Tensor& like,
                       const char* like_name) {
  TORCH_CHECK(mask.defined(), "mask must be a tensor, got None");
  TORCH_CHECK_TYPE(mask.scalar_type() == at::kByte, "mask must be uint8, got ", mask.scalar_type());
  check_same_device(mask, "mask", like, like_name);
  TORCH_CHECK(mask.dim() == 1 && mask.is_contiguous(), "mask must be a contiguous 1-D tensor, got shape ",
              mask.sym_sizes(), " and strides ", mask.sym_strides());
  TORCH_SYM_CHECK(mask.sym_numel().sym_eq(mask_bytes(units)),
                  "mask must have ceil(", units, " / 8) = ", mask_bytes(units), " bytes for ", like_name, ", got ",
                  mask.sym_numel());
}

// The (seed, offset) a low-memory forward recorded: int64[2] on grad's
// device. Its values, as a mask's, are the caller's: the kernels take the
// offset modulo 2^63 (philox.h), on every device.
inline void check_rng_state(const at::Tensor& rng_state, const at::Tensor& like) {
  TORCH_CHECK(rng_state.defined(), "rng_state must be a tensor, got None");
  TORCH_CHECK_TYPE(rng_state.scalar_type() == at::kLong, "rng_state must be int64, got ", rng_state.scalar_type());
  check_same_device(rng_state, "rng_state", like, "grad");
  TORCH_CHECK(rng_state.dim() == 1 && rng_state.sym_numel() == 2 && rng_state.is_contiguous(),
              "rng_state must be a contiguous int64 tensor of 2 elements (seed, offset), got shape ",
              rng_state.sym_sizes());
}

// shard = (first, run, stride), ShardMap's (kernel_call.h), for a call of
// `units` units: runs that do not overlap, and a last unit below 2^63.
inline void check_shard(at::OptionalIntArrayRef shard, const c10::SymInt& units) {
  if (!shard.has_value()) return;
  TORCH_CHECK_VALUE(shard->size() == 3, "shard must be (first, run, stride), got ", *shard);
  const int64_t first = (*shard)[0], run = (*shard)[1], stride = (*shard)[2];
  TORCH_CHECK_VALUE(first >= 0 && run >= 1 && stride >= run,
                    "shard (first, run, stride) needs first >= 0, run >= 1 and stride >= run, got ", *shard);
  const std::optional<int64_t> count = units.maybe_as_int();
  if (!count.has_value() || *count == 0) return;  // a symbolic count: a shard's runs never reach 2^63
  int64_t rows_end = 0, last = 0;
  const bool overflows = c10::mul_overflows((*count - 1) / run, stride, &rows_end) ||
                         c10::add_overflows(first, rows_end, &last) ||
                         c10::add_overflows(last, (*count - 1) % run, &last);
  TORCH_CHECK_VALUE(!overflows, "shard ", *shard, " puts units past 2^63 - 1");
}

// A generator draws for its own device: a CPU generator for CPU tensors, a
// CUDA one of the input's GPU for CUDA tensors.
inline void check_rng_args(const std::optional<at::Generator>& generator, const std::optional<int64_t>& seed,
                           int64_t offset, const at::Tensor& input) {
  const bool has_generator = generator.has_value() && generator->defined();
  TORCH_CHECK(!(has_generator && seed.has_value()), "pass either generator or seed, not both");
  TORCH_CHECK_VALUE(offset >= 0, "offset must be non-negative, got ", offset);
  TORCH_CHECK_VALUE(seed.has_value() || offset == 0, "offset=", offset,
                    " needs seed= too: a generator chooses its own offset");
  if (has_generator && input.device().type() != at::kMeta) {
    const at::Device own = generator->device();
    const at::Device device = input.device();
    TORCH_CHECK(own.type() == device.type() && (!own.has_index() || !device.has_index() || own.index() == device.index()),
                "generator must be a generator of input's device (", device, "), got a generator of ", own);
  }
}

inline void check_writable(const at::Tensor& t, const char* name) {
  TORCH_CHECK(at::has_internal_overlap(t) != at::MemOverlap::Yes, name,
              " has elements that share memory (for example from expand()); an in-place op would "
              "write them more than once. Use the out-of-place op or call .clone() first");
}

}  // namespace regdrop
