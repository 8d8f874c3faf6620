// Argument checks shared by every op. Each message names the argument, and
// each raises the Python exception a caller would expect: ValueError for a
// bad probability, TypeError for a bad dtype, RuntimeError otherwise.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/MemoryOverlap.h>
#include <c10/util/OptionalArrayRef.h>
#include <c10/util/safe_numerics.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <optional>

#include "kernel_call.h"

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

// `other` must be a float tensor with `like`'s shape and device: the fused
// ops do not broadcast. Float dtypes may differ (the output promotes).
inline void check_matches(const at::Tensor& other, const char* name, const at::Tensor& like,
                          const char* like_name) {
  check_floating(other, name);
  TORCH_CHECK(other.device() == like.device(), name, " must be on the same device as ", like_name,
              " (", like.device(), "), got ", other.device());
  TORCH_CHECK(other.sizes() == like.sizes(), name, " must have the shape of ", like_name, " ",
              like.sizes(), ", got ", other.sizes(), " (broadcasting is not supported)");
}

// Whether `t`'s storage holds its elements: a resized or borrowed storage
// may not.
inline void check_storage(const at::Tensor& t, const char* name) {
  const int64_t needed = (t.storage_offset() + t.numel()) * static_cast<int64_t>(t.element_size());
  TORCH_CHECK(t.numel() == 0 || (t.has_storage() && static_cast<int64_t>(t.storage().nbytes()) >= needed),
              name, "'s storage holds fewer bytes than its ", t.numel(), " elements need");
}

// A bit mask for `units` units: uint8, 1-D, contiguous, ceil(units / 8) bytes.
// A mask's meaning is the forward call that returned it: a backward op needs
// the mask of a tensor of the same shape and layout. That cannot be proved
// from the mask; its size is checked here, and its padding bits, which
// forward ops leave 0, by check_mask_padding where the mask is in host memory.
inline void check_mask(const at::Tensor& mask, int64_t units, const at::Tensor& like,
                       const char* like_name) {
  TORCH_CHECK(mask.defined(), "mask must be a tensor, got None");
  TORCH_CHECK_TYPE(mask.scalar_type() == at::kByte, "mask must be uint8, got ", mask.scalar_type());
  TORCH_CHECK(mask.device() == like.device(), "mask must be on the same device as ", like_name,
              " (", like.device(), "), got ", mask.device());
  TORCH_CHECK(mask.dim() == 1 && mask.is_contiguous(),
              "mask must be a contiguous 1-D tensor, got shape ", mask.sizes(), " and strides ",
              mask.strides());
  TORCH_CHECK(mask.numel() == mask_bytes(units), "mask must have ceil(", units, " / 8) = ",
              mask_bytes(units), " bytes for ", like_name, ", got ", mask.numel());
  check_storage(mask, "mask");
}

// Bits past `units` in the last byte are 0 in every mask a forward op
// returns; one with such bits set was drawn for more units than `like` has.
inline void check_mask_padding(const at::Tensor& mask, int64_t units, const char* like_name) {
  if (units % 8 == 0) return;
  const uint8_t last = mask.const_data_ptr<uint8_t>()[mask.numel() - 1];
  TORCH_CHECK((last >> (units % 8)) == 0, "mask has bits set past the ", units, " units of ", like_name,
              ": it was returned for a tensor with more units (a mask belongs to the shape of its forward call)");
}

// The (seed, offset) a low-memory forward recorded: int64[2] on grad's device.
inline void check_rng_state(const at::Tensor& rng_state, const at::Tensor& like) {
  TORCH_CHECK(rng_state.defined(), "rng_state must be a tensor, got None");
  TORCH_CHECK_TYPE(rng_state.scalar_type() == at::kLong, "rng_state must be int64, got ",
                   rng_state.scalar_type());
  TORCH_CHECK(rng_state.device() == like.device(), "rng_state must be on the same device as grad (",
              like.device(), "), got ", rng_state.device());
  TORCH_CHECK(rng_state.dim() == 1 && rng_state.numel() == 2 && rng_state.is_contiguous(),
              "rng_state must be a contiguous int64 tensor of 2 elements (seed, offset), got shape ",
              rng_state.sizes());
  check_storage(rng_state, "rng_state");
}

// An rng_state in host memory: its offset lies in [0, 2^63), as forward
// requires of an offset. (On a GPU the values are read by the kernel, not
// here: checking them would wait for the device.)
inline void check_rng_state_values(const at::Tensor& rng_state) {
  const int64_t offset = rng_state.const_data_ptr<int64_t>()[1];
  TORCH_CHECK_VALUE(offset >= 0, "rng_state's offset must lie in [0, 2^63), got ", offset);
}

// shard = (first, run, stride), ShardMap's, for a call of `units` units:
// runs that do not overlap, and a last unit below 2^63.
inline void check_shard(at::OptionalIntArrayRef shard, int64_t units) {
  if (!shard.has_value()) return;
  TORCH_CHECK_VALUE(shard->size() == 3, "shard must be (first, run, stride), got ", *shard);
  const int64_t first = (*shard)[0], run = (*shard)[1], stride = (*shard)[2];
  TORCH_CHECK_VALUE(first >= 0 && run >= 1 && stride >= run,
                    "shard (first, run, stride) needs first >= 0, run >= 1 and stride >= run, got ", *shard);
  if (units == 0) return;
  int64_t rows_end = 0, last = 0;
  const bool overflows = c10::mul_overflows((units - 1) / run, stride, &rows_end) ||
                         c10::add_overflows(first, rows_end, &last) ||
                         c10::add_overflows(last, (units - 1) % run, &last);
  TORCH_CHECK_VALUE(!overflows, "shard ", *shard, " puts units past 2^63 - 1");
}

inline void check_rng_args(const std::optional<at::Generator>& generator,
                           const std::optional<int64_t>& seed, int64_t offset) {
  TORCH_CHECK(!(generator.has_value() && generator->defined() && seed.has_value()),
              "pass either generator or seed, not both");
  TORCH_CHECK_VALUE(offset >= 0, "offset must be non-negative, got ", offset);
  TORCH_CHECK_VALUE(seed.has_value() || offset == 0, "offset=", offset,
                    " needs seed= too: a generator chooses its own offset");
}

inline void check_writable(const at::Tensor& t, const char* name) {
  TORCH_CHECK(at::has_internal_overlap(t) != at::MemOverlap::Yes, name,
              " has elements that share memory (for example from expand()); an in-place op would "
              "write them more than once. Use the out-of-place op or call .clone() first");
}

}  // namespace regdrop
