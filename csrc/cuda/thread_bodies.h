// What one thread of each CUDA kernel does, and, for the bias gradient, what
// one block does between barriers. nvcc compiles these functions into the
// kernels (kernels.cu only computes indices and calls them); the host
// compiler compiles the very same source for the emulation that runs every
// block and thread of a launch on the CPU (tests/cuda_emulation), so the CPU
// test suite checks the CUDA kernels bit for bit.
//
// Layout: elements in memory order, in groups of 8 that share a mask byte.
//   elementwise_thread   one group per thread: loads its 8 elements, gets
//                        their keep bits (a Philox call, a mask byte, or its
//                        units' bits), writes the epilogue and, when drawing,
//                        the mask byte. Each thread takes one of two copies
//                        of the group's code, chosen once: the vector path
//                        (8 elements, every operand 16-byte aligned, and a
//                        shard's group one group of the larger call: 128-bit
//                        accesses, no tail or stretch logic), or the general
//                        one (element by element, for misaligned operands,
//                        the last partial group and unaligned shards).
//   draw_mask_thread     one mask byte per thread: unit masks, drawn before
//                        elementwise_thread applies them.
//   column_sum_*         bias gradient: grad through the mask, and its
//                        column sums in the order column_sums.h fixes.
#pragma once

#include <cstdint>
#include <type_traits>

#include "../column_sums.h"
#include "../epilogue.h"
#include "../kernel_call.h"
#include "primitives.h"

namespace regdrop::cuda {

// --------------------------------------------------------------- elements

template <class T>
struct Element;  // Bits: the storage word; Compute: the arithmetic type
template <>
struct Element<float> {
  using Bits = uint32_t;
  using Compute = float;
};
template <>
struct Element<double> {
  using Bits = uint64_t;
  using Compute = double;
};
template <>
struct Element<Half> {
  using Bits = uint16_t;
  using Compute = float;
};
template <>
struct Element<BFloat16> {
  using Bits = uint16_t;
  using Compute = float;
};

template <class T>
using Compute = typename Element<T>::Compute;

template <class C>
REGDROP_HOST_DEVICE C scale_as(float scale_f, double scale_d) {
  if constexpr (std::is_same_v<C, double>) {
    return scale_d;
  } else {
    return scale_f;
  }
}

// The 8 elements of a group as 32-bit words: 4 for 16-bit types, 8 for
// float, 16 for double; 1, 2 or 4 128-bit accesses.
template <class T>
struct Group {
  using Bits = typename Element<T>::Bits;
  using C = Compute<T>;
  static constexpr int kWords = 2 * static_cast<int>(sizeof(Bits));
  uint32_t w[kWords];

  // Elements 0 .. n-1 from p; the rest are 0. `vector`: n == 8 and p is
  // 16-byte aligned.
  REGDROP_HOST_DEVICE void load(const void* p, int n, bool vector) {
    if (vector) {
#pragma unroll
      for (int i = 0; i < kWords / 4; ++i) load16(w + 4 * i, static_cast<const uint8_t*>(p) + 16 * i);
      return;
    }
#pragma unroll
    for (int i = 0; i < kWords; ++i) w[i] = 0;
    const Bits* src = static_cast<const Bits*>(p);
#pragma unroll
    for (int j = 0; j < kUnitsPerGroup; ++j) {
      if (j < n) set_bits(j, src[j]);
    }
  }

  REGDROP_HOST_DEVICE void store(void* p, int n, bool vector) const {
    if (vector) {
#pragma unroll
      for (int i = 0; i < kWords / 4; ++i) store16(static_cast<uint8_t*>(p) + 16 * i, w + 4 * i);
      return;
    }
    Bits* dst = static_cast<Bits*>(p);
#pragma unroll
    for (int j = 0; j < kUnitsPerGroup; ++j) {
      if (j < n) dst[j] = bits(j);
    }
  }

  REGDROP_HOST_DEVICE C get(int j) const {
    if constexpr (std::is_same_v<T, float>) {
      return float_from_bits(w[j]);
    } else if constexpr (std::is_same_v<T, double>) {
      return double_from_bits(w[2 * j], w[2 * j + 1]);
    } else {
      return half_to_float<T>(w[j / 2], j % 2);
    }
  }

  // Elements 2k and 2k + 1: a pair, as 16-bit types are rounded and packed.
  REGDROP_HOST_DEVICE void set_pair(int k, C a, C b) {
    if constexpr (std::is_same_v<T, float>) {
      w[2 * k] = float_bits(a);
      w[2 * k + 1] = float_bits(b);
    } else if constexpr (std::is_same_v<T, double>) {
      double_bits(a, w[4 * k], w[4 * k + 1]);
      double_bits(b, w[4 * k + 2], w[4 * k + 3]);
    } else {
      w[k] = pack_pair<T>(a, b);
    }
  }

 private:
  REGDROP_HOST_DEVICE Bits bits(int j) const {
    if constexpr (sizeof(Bits) == 2) {
      return static_cast<Bits>(w[j / 2] >> (16 * (j % 2)));
    } else if constexpr (sizeof(Bits) == 4) {
      return w[j];
    } else {
      return (static_cast<uint64_t>(w[2 * j + 1]) << 32) | w[2 * j];
    }
  }

  REGDROP_HOST_DEVICE void set_bits(int j, Bits v) {
    if constexpr (sizeof(Bits) == 2) {
      w[j / 2] |= static_cast<uint32_t>(v) << (16 * (j % 2));
    } else if constexpr (sizeof(Bits) == 4) {
      w[j] = v;
    } else {
      w[2 * j] = static_cast<uint32_t>(v);
      w[2 * j + 1] = static_cast<uint32_t>(v >> 32);
    }
  }
};

// A kept value, with the canonical NaN (primitives.h). The 16-bit types get
// it from their conversion, float and double here.
template <class T, class C>
REGDROP_HOST_DEVICE C kept_canonical(C v) {
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
    return canonical_nan(v);
  } else {
    return v;
  }
}

// ------------------------------------------------------------ bit sources

// Where a group's keep bits come from on the GPU: the KernelCall's mask
// source, with unit masks split by how their units lie in a group.
enum class BitSource : uint8_t {
  Draw,              // Philox group g (MaskSource::Draw)
  Elements,          // mask byte g (MaskSource::Elements)
  UnitPerGroup,      // a whole group lies in one unit: one bit, read once
  UnitRuns,          // units are runs of `inner` elements, not a multiple of 8
  UnitChannelsLast,  // unit = (element / block) * channels + element % channels, 8+ channels
  DrawShard,         // MaskSource::Draw for a shard of a larger call: its Philox groups (ShardWalk)
};

REGDROP_HOST_DEVICE constexpr bool draws(BitSource s) { return s == BitSource::Draw || s == BitSource::DrawShard; }

// Unit bits of one launch, in 32-bit arithmetic. The launch plan folds the
// launch's first unit into the mask pointer and `unit_offset` (< 8) and the
// position of its first element into the *_rem / channel0 fields; divisors
// of 2^31 and more are replaced by 2^31 with the remainders shifted to keep
// every quotient (launches are at most 2^30 elements).
struct UnitWalk {
  uint32_t unit_offset = 0;
  FastDivmod inner;       // UnitPerGroup, UnitRuns: unit = element / inner
  uint32_t inner_rem = 0;
  FastDivmod channels;    // UnitChannelsLast
  uint32_t channel0 = 0;
  FastDivmod block;
  uint32_t block_rem = 0;
  uint32_t last_byte = 0;  // of the mask, from its advanced pointer
};

REGDROP_HOST_DEVICE uint32_t bit_at(const uint8_t* bits, uint32_t i) {
  return (bits[i >> 3] >> (i & 7)) & 1u;
}

// Bits u .. u + 7 of a mask whose last byte is `last_byte`, from the two
// bytes they lie in (bits past the mask's end read as its last byte's).
REGDROP_HOST_DEVICE uint32_t bits_from(const uint8_t* mask, uint32_t u, uint32_t last_byte) {
  const uint32_t byte = u >> 3;
  const uint32_t next = byte + 1 < last_byte ? byte + 1 : last_byte;
  return ((mask[byte] | (static_cast<uint32_t>(mask[next]) << 8)) >> (u & 7)) & 0xFFu;
}

// The keep bits of elements e0 .. e0 + n - 1 (bit j for e0 + j) from their
// units' bits; bits past n are not cleared.
template <BitSource S>
REGDROP_HOST_DEVICE uint32_t unit_bits(const UnitWalk& u, const uint8_t* mask, uint32_t e0, int n) {
  if constexpr (S == BitSource::UnitPerGroup) {
    return bit_at(mask, u.unit_offset + u.inner.div(u.inner_rem + e0)) ? 0xFFu : 0u;
  } else if constexpr (S == BitSource::UnitRuns) {
    // Units rise by one at each run boundary: the group's units lie within
    // two mask bytes, read once.
    uint32_t run, in_run;
    u.inner.divmod(u.inner_rem + e0, run, in_run);
    const uint32_t first = u.unit_offset + run;
    const uint32_t last = u.unit_offset + u.inner.div(u.inner_rem + e0 + n - 1);
    const uint32_t window = mask[first >> 3] | (static_cast<uint32_t>(mask[last >> 3]) << 8);
    uint32_t bits = 0, shift = first & 7;
#pragma unroll
    for (int j = 0; j < kUnitsPerGroup; ++j) {
      bits |= ((window >> shift) & 1u) << j;
      if (++in_run == u.inner.divisor) {
        in_run = 0;
        ++shift;
      }
    }
    return bits;
  } else {
    // Channels-last, 8 channels or more: consecutive elements are
    // consecutive channels, so a group's units are one run, or two where the
    // channels wrap: back to channel 0 of the same sample, or on to the next.
    uint32_t q, channel, blocks, in_block;
    u.channels.divmod(u.channel0 + e0, q, channel);
    u.block.divmod(u.block_rem + e0, blocks, in_block);
    const uint32_t channels = u.channels.divisor;
    const uint32_t first = u.unit_offset + blocks * channels + channel;
    const uint32_t before_wrap = channels - channel;  // elements
    if (before_wrap >= kUnitsPerGroup) return bits_from(mask, first, u.last_byte);
    const bool next_sample = u.block.divisor - in_block == before_wrap;
    const uint32_t second = first + before_wrap - (next_sample ? 0 : channels);
    const uint32_t low = (1u << before_wrap) - 1;
    return (bits_from(mask, first, u.last_byte) & low) | ((bits_from(mask, second, u.last_byte) << before_wrap) & ~low);
  }
}

// ------------------------------------------------------------------ shards

// A drawing call that is a shard of a larger one (kernel_call.h's ShardMap)
// draws unit e of a launch where the larger call draws unit
//   unit0 + e + q * gap,
// q being the runs ended before e: unit0 is the larger call's unit of the
// launch's unit 0, and gap = stride - run the units between two runs. q
// comes from rem + e, with divisors normalized as UnitWalk's are.
struct ShardWalk {
  uint64_t unit0 = 0;
  uint64_t gap = 0;
  FastDivmod runs;
  uint32_t rem = 0;
};

// The keep bits of a shard's units e0 .. e0 + n - 1 (n <= 8): stretches of
// the larger call's groups, one Philox call each; a stretch ends where a run
// or a group of the larger call does. Bits past n may be set.
REGDROP_HOST_DEVICE uint32_t shard_keep_bits(const PhiloxKeys& keys, uint64_t offset, const ShardWalk& s,
                                             uint32_t e0, int n, uint32_t threshold) {
  uint32_t ended, in_run;
  s.runs.divmod(s.rem + e0, ended, in_run);
  uint64_t unit = s.unit0 + e0 + static_cast<uint64_t>(ended) * s.gap;
  uint32_t shift = static_cast<uint32_t>(unit % kUnitsPerGroup);
  uint32_t left = s.runs.divisor - in_run;  // in the run
  uint32_t len = left < kUnitsPerGroup - shift ? left : kUnitsPerGroup - shift;
  uint32_t bits = group_keep_bits(keys, offset, unit / kUnitsPerGroup, threshold) >> shift;
  if (len >= static_cast<uint32_t>(n)) return bits;  // one stretch: bits past n need no clearing
  bits &= (1u << len) - 1;
  for (uint32_t j = len; j < static_cast<uint32_t>(n); j += len) {
    s.runs.divmod(s.rem + e0 + j, ended, in_run);
    unit = s.unit0 + e0 + j + static_cast<uint64_t>(ended) * s.gap;
    shift = static_cast<uint32_t>(unit % kUnitsPerGroup);
    left = s.runs.divisor - in_run;
    len = left < kUnitsPerGroup - shift ? left : kUnitsPerGroup - shift;
    const uint32_t drawn = group_keep_bits(keys, offset, unit / kUnitsPerGroup, threshold) >> shift;
    bits |= (drawn & ((1u << len) - 1)) << j;
  }
  return bits;
}

// The same for a whole group of an aligned shard (its first unit, run and
// stride multiples of 8, so that e0 / 8 is one group of the larger call):
// one Philox call, found with one division.
REGDROP_HOST_DEVICE uint32_t aligned_shard_keep_bits(const PhiloxKeys& keys, uint64_t offset, const ShardWalk& s,
                                                     uint32_t e0, uint32_t threshold) {
  const uint64_t unit = s.unit0 + e0 + static_cast<uint64_t>(s.runs.div(s.rem + e0)) * s.gap;
  return group_keep_bits(keys, offset, unit / kUnitsPerGroup, threshold);
}

// ------------------------------------------------------------------ streams

// The stream a drawing launch draws from: its seed's round keys, and its
// offset. A seed given by value comes with its keys precomputed by the launch
// plan, as kernel parameters (which the uniform datapath reads: no
// per-thread work). A seed behind a pointer (CUDA graph capture, a saved
// rng_state) is read when the kernel runs and its keys computed then: a
// captured graph replays its kernels with the parameters they were captured
// with, so a replay's seed and offset can only come through the pointers.
struct DrawStream {
  PhiloxKeys keys;
  uint64_t seed = 0;
  uint64_t offset = 0;
};

REGDROP_HOST_DEVICE DrawStream draw_stream(const PhiloxSource& rng, const PhiloxKeys& keys_by_value) {
  DrawStream stream;
  if (rng.seed_ptr != nullptr) {
    rng.unpack(stream.seed, stream.offset);
    stream.keys = philox_keys(stream.seed);
  } else {
    stream.seed = rng.seed;
    stream.offset = rng.offset;
    stream.keys = keys_by_value;
  }
  return stream;
}

// ------------------------------------------------------------- elementwise

// One launch of elementwise_thread: elements [0, numel) of the pointers,
// which the launch plan has advanced to the launch's first element.
struct ElementwiseParams {
  const void* in = nullptr;
  const void* residual = nullptr;
  void* out = nullptr;
  uint8_t* __restrict__ mask_out = nullptr;       // Draw: byte g, or null (low-memory mode)
  const uint8_t* __restrict__ mask_in = nullptr;  // Elements: byte g; units: their bits
  int64_t* __restrict__ rng_state_out = nullptr;  // Draw, first launch: (seed, offset), or null
  PhiloxSource rng;
  PhiloxKeys keys;          // of rng.seed, when given by value
  uint32_t threshold = 0;
  uint64_t group_base = 0;  // Philox group index of group 0
  ShardWalk shard;          // DrawShard: where the launch's units lie
  float scale_f = 1.0f;
  double scale_d = 1.0;
  uint32_t numel = 0;
  uint32_t groups = 0;
  // in, residual and out are 16-byte aligned, and a shard's groups are
  // groups of the larger call: full groups take the vector path.
  bool vector = false;
  // AddBiasResidual: element e takes bias[(c0 + e) % bias_len], c0 the
  // launch's first column. bias_row = bias + c0; rows counts row ends
  // crossed (bias_rows divides bias_rem + e, normalized as UnitWalk is).
  const void* bias_row = nullptr;
  int64_t bias_len = 1;
  FastDivmod bias_rows;
  uint32_t bias_rem = 0;
  bool bias_vector = false;  // bias_len % 8 == 0 and bias 16-byte aligned
  UnitWalk units;
};

// The group's bias values (AddBiasResidual): one or more 128-bit loads when
// rows are whole groups, else element by element, wrapping at row ends.
template <class T>
REGDROP_HOST_DEVICE void load_bias(Group<T>& b, const ElementwiseParams& p, uint32_t e0, bool vector) {
  using Bits = typename Element<T>::Bits;
  uint32_t rows, in_row;
  p.bias_rows.divmod(p.bias_rem + e0, rows, in_row);
  const Bits* col = static_cast<const Bits*>(p.bias_row) + e0 - static_cast<int64_t>(rows) * p.bias_len;
  if (vector && p.bias_vector) {
    b.load(col, kUnitsPerGroup, true);
    return;
  }
  Bits values[kUnitsPerGroup];
#pragma unroll
  for (int j = 0; j < kUnitsPerGroup; ++j) {
    values[j] = *col++;
    if (++in_row == p.bias_rows.divisor) {
      in_row = 0;
      col -= p.bias_len;
    }
  }
  b.load(values, kUnitsPerGroup, false);
}

// What a group of elementwise_thread reads: its input, residual and bias.
template <class O, Epilogue E>
struct GroupOperands {
  Group<typename O::InT> x;
  Group<typename O::ResidualT> r;
  Group<typename O::BiasT> b;

  // Elements e0 .. e0 + n - 1. `Vector`: n == 8 and the vector path's
  // 128-bit accesses.
  template <bool Vector>
  REGDROP_HOST_DEVICE void load(const ElementwiseParams& p, uint32_t e0, int n) {
    x.load(static_cast<const typename Element<typename O::InT>::Bits*>(p.in) + e0, n, Vector);
    if constexpr (E != Epilogue::Scale) {
      r.load(static_cast<const typename Element<typename O::ResidualT>::Bits*>(p.residual) + e0, n, Vector);
    }
    if constexpr (E == Epilogue::AddBiasResidual) load_bias(b, p, e0, Vector);
  }
};

// The rest of a group of elementwise_thread once its operands are loaded:
// its keep bits, the mask byte, the epilogue and the output.
template <class O, Epilogue E, BitSource S, bool Vector>
REGDROP_HOST_DEVICE void finish_group(const ElementwiseParams& p, const DrawStream& stream,
                                      const GroupOperands<O, E>& in, uint32_t g, uint32_t e0, int n) {
  using R = typename O::ResidualT;
  using Y = typename O::OutT;
  using C = Compute<typename O::InT>;
  static_assert(std::is_same_v<C, Compute<Y>>, "operands compute in one type");
  uint32_t bits;
  if constexpr (S == BitSource::Draw) {
    bits = group_keep_bits(stream.keys, stream.offset, p.group_base + g, p.threshold);
  } else if constexpr (S == BitSource::DrawShard && Vector) {
    bits = aligned_shard_keep_bits(stream.keys, stream.offset, p.shard, e0, p.threshold);
  } else if constexpr (S == BitSource::DrawShard) {
    bits = shard_keep_bits(stream.keys, stream.offset, p.shard, e0, n, p.threshold);
  } else if constexpr (S == BitSource::Elements) {
    bits = p.mask_in[g];
  } else {
    bits = unit_bits<S>(p.units, p.mask_in, e0, n);
  }
  if constexpr (!Vector && S != BitSource::Elements) bits &= (1u << n) - 1;
  if constexpr (draws(S)) {
    if (p.mask_out != nullptr) p.mask_out[g] = static_cast<uint8_t>(bits);
  }

  const C scale = scale_as<C>(p.scale_f, p.scale_d);
  Group<Y> y;
#pragma unroll
  for (int k = 0; k < kUnitsPerGroup / 2; ++k) {
    C pair[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int j = 2 * k + h;
      C rv = 0, bv = 0;
      if constexpr (E != Epilogue::Scale) rv = in.r.get(j);
      if constexpr (E == Epilogue::AddBiasResidual) bv = in.b.get(j);
      const C kept = kept_canonical<Y>(kept_value<E>(in.x.get(j), rv, bv, scale));
      // A residual widened to the output's type is a new value: its NaNs canonical too.
      const C dropped = std::is_same_v<R, Y> ? dropped_value<E>(rv) : kept_canonical<Y>(dropped_value<E>(rv));
      pair[h] = ((bits >> j) & 1u) ? kept : dropped;
    }
    y.set_pair(k, pair[0], pair[1]);
  }
  y.store(static_cast<typename Element<Y>::Bits*>(p.out) + e0, n, Vector);
}

// The operands load first, in a branch of their own, ahead of the Philox
// rounds, so that memory latency overlaps the arithmetic (in one branch with
// the rest, ptxas would sink the loads to their use). The rest then takes
// the same path, vector or general.
template <class O, Epilogue E, BitSource S>
REGDROP_HOST_DEVICE void elementwise_thread(const ElementwiseParams& p, uint32_t g) {
  DrawStream stream;
  if constexpr (draws(S)) {
    stream = draw_stream(p.rng, p.keys);
    if (g == 0 && p.rng_state_out != nullptr) {
      p.rng_state_out[0] = static_cast<int64_t>(stream.seed);
      p.rng_state_out[1] = static_cast<int64_t>(stream.offset);
    }
  }
  if (g >= p.groups) return;
  const uint32_t e0 = g * kUnitsPerGroup;
  const uint32_t left = p.numel - e0;
  const bool vector = p.vector && left >= kUnitsPerGroup;
  const int n = left < kUnitsPerGroup ? static_cast<int>(left) : kUnitsPerGroup;
  GroupOperands<O, E> in;
  if (vector) {
    in.template load<true>(p, e0, kUnitsPerGroup);
  } else {
    in.template load<false>(p, e0, n);
  }
  if (vector) {
    finish_group<O, E, S, true>(p, stream, in, g, e0, kUnitsPerGroup);
  } else {
    finish_group<O, E, S, false>(p, stream, in, g, e0, n);
  }
}

// ------------------------------------------------------------- unit masks

struct DrawMaskParams {
  uint8_t* __restrict__ mask_out = nullptr;
  PhiloxSource rng;
  PhiloxKeys keys;  // of rng.seed, when given by value
  uint32_t threshold = 0;
  uint64_t group_base = 0;
  ShardWalk shard;     // DrawShard
  uint32_t units = 0;  // bits in this launch
};

template <BitSource S>
REGDROP_HOST_DEVICE void draw_mask_thread(const DrawMaskParams& p, uint32_t g) {
  if (g * kUnitsPerGroup >= p.units) return;
  const DrawStream stream = draw_stream(p.rng, p.keys);
  const uint32_t left = p.units - g * kUnitsPerGroup;
  const int n = left >= kUnitsPerGroup ? kUnitsPerGroup : static_cast<int>(left);
  uint32_t bits;
  if constexpr (S == BitSource::Draw) {
    bits = group_keep_bits(stream.keys, stream.offset, p.group_base + g, p.threshold);
  } else {
    bits = shard_keep_bits(stream.keys, stream.offset, p.shard, g * kUnitsPerGroup, n, p.threshold);
  }
  p.mask_out[g] = static_cast<uint8_t>(bits & ((1u << n) - 1));
}

// ----------------------------------------------------------- bias gradient
//
// grad_input = keep ? grad * s : 0 for a (rows, cols) tensor, and its column
// sums. A block covers `column_groups` groups of 8 columns (a tile) and the
// rows of one chunk, dealt round-robin to `lanes` rows of threads; thread
// (x, y) = (column group, lane). Phase 1: each thread adds its rows' values
// in row order and leaves its 8 sums in shared memory. Phase 2, after a
// barrier: each column's lane sums are added in lane order and written to
// `partial` (one row per chunk), or, with a single chunk, rounded to the
// bias dtype as the result. fold_chunks_thread then adds the chunks in order.
// The order is column_sums.h's, which the CPU kernels follow too.

struct ColumnSumParams {
  const void* grad = nullptr;
  void* out = nullptr;
  const uint8_t* __restrict__ mask = nullptr;
  void* partial = nullptr;  // Acc[chunks][cols], or the T[cols] result when chunks == 1
  float scale_f = 1.0f;
  double scale_d = 1.0;
  ColumnSumPlan plan;
  bool vector = false;  // cols % 8 == 0, grad and out 16-byte aligned
};

template <class T>
using Accumulator = Compute<T>;

// Shared memory of one block: lanes x (8 * column_groups) <= 8 * kColumnSumThreads sums.
template <class T>
struct ColumnSumShared {
  Accumulator<T> sums[kUnitsPerGroup * kColumnSumThreads];
};

// The sum of grad_input over a column, rounded to T (RNE, canonical NaN).
template <class T, class Acc>
REGDROP_HOST_DEVICE void store_sum(void* result, int64_t col, Acc sum) {
  using Bits = typename Element<T>::Bits;
  if constexpr (sizeof(Bits) == 2) {
    static_cast<Bits*>(result)[col] = static_cast<Bits>(pack_pair<T>(sum, 0.0f));
  } else {
    static_cast<Acc*>(result)[col] = canonical_nan(sum);
  }
}

template <class T>
REGDROP_HOST_DEVICE void column_sum_accumulate(const ColumnSumParams& p, uint32_t tile, uint32_t chunk,
                                               uint32_t x, uint32_t y, ColumnSumShared<T>& shared) {
  using Acc = Accumulator<T>;
  using Bits = typename Element<T>::Bits;
  const ColumnSumPlan& plan = p.plan;
  const int64_t col = (static_cast<int64_t>(tile) * plan.column_groups + x) * kUnitsPerGroup;
  Acc acc[kUnitsPerGroup];
#pragma unroll
  for (int j = 0; j < kUnitsPerGroup; ++j) acc[j] = 0;
  if (col < plan.cols) {
    const int n = plan.cols - col < kUnitsPerGroup ? static_cast<int>(plan.cols - col) : kUnitsPerGroup;
    const bool vector = p.vector && n == kUnitsPerGroup;
    const Acc scale = scale_as<Acc>(p.scale_f, p.scale_d);
    const int64_t begin = static_cast<int64_t>(chunk) * plan.chunk_rows;
    const int64_t end = begin + plan.chunk_rows < plan.rows ? begin + plan.chunk_rows : plan.rows;
    // kColumnSumUnroll rows are loaded before any is added: several loads in flight.
    for (int64_t row = begin + y; row < end; row += kColumnSumUnroll * plan.lanes) {
      Group<T> g[kColumnSumUnroll];
      uint32_t bits[kColumnSumUnroll];
#pragma unroll
      for (int u = 0; u < kColumnSumUnroll; ++u) {
        const int64_t r = row + u * plan.lanes;
        if (r < end) {
          const int64_t i = r * plan.cols + col;
          g[u].load(static_cast<const Bits*>(p.grad) + i, n, vector);
          if (vector) {  // i is a multiple of 8: one mask byte
            bits[u] = p.mask[i >> 3];
          } else {  // elements i .. i + n - 1 lie in the bytes of the first and the last
            const uint32_t window = p.mask[i >> 3] | (static_cast<uint32_t>(p.mask[(i + n - 1) >> 3]) << 8);
            bits[u] = (window >> (i & 7)) & ((1u << n) - 1);
          }
        }
      }
#pragma unroll
      for (int u = 0; u < kColumnSumUnroll; ++u) {
        const int64_t r = row + u * plan.lanes;
        if (r < end) {
          Group<T> out;
#pragma unroll
          for (int k = 0; k < kUnitsPerGroup / 2; ++k) {
            Acc pair[2];
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              const int j = 2 * k + h;
              const Acc kept = kept_canonical<T>(kept_value<Epilogue::Scale>(g[u].get(j), Acc(0), Acc(0), scale));
              pair[h] = ((bits[u] >> j) & 1u) ? kept : Acc(0);
              acc[j] = add_rn(acc[j], pair[h]);
            }
            out.set_pair(k, pair[0], pair[1]);
          }
          out.store(static_cast<Bits*>(p.out) + r * plan.cols + col, n, vector);
        }
      }
    }
  }
  const uint32_t width = plan.column_groups * kUnitsPerGroup;
#pragma unroll
  for (int j = 0; j < kUnitsPerGroup; ++j) shared.sums[y * width + x * kUnitsPerGroup + j] = acc[j];
}

template <class T>
REGDROP_HOST_DEVICE void column_sum_fold_lanes(const ColumnSumParams& p, uint32_t tile, uint32_t chunk,
                                               uint32_t x, uint32_t y, const ColumnSumShared<T>& shared) {
  using Acc = Accumulator<T>;
  const ColumnSumPlan& plan = p.plan;
  const uint32_t width = plan.column_groups * kUnitsPerGroup;
  const uint32_t threads = plan.column_groups * plan.lanes;
  for (uint32_t c = y * plan.column_groups + x; c < width; c += threads) {
    const int64_t col = static_cast<int64_t>(tile) * width + c;
    if (col >= plan.cols) continue;
    Acc sum = 0;
    for (uint32_t lane = 0; lane < plan.lanes; ++lane) sum = add_rn(sum, shared.sums[lane * width + c]);
    if (plan.chunks == 1) {
      store_sum<T>(p.partial, col, sum);
    } else {
      static_cast<Acc*>(p.partial)[static_cast<int64_t>(chunk) * plan.cols + col] = sum;
    }
  }
}

template <class T>
REGDROP_HOST_DEVICE void fold_chunks_thread(const void* partial, void* result, const ColumnSumPlan& plan,
                                            int64_t col) {
  using Acc = Accumulator<T>;
  if (col >= plan.cols) return;
  const Acc* sums = static_cast<const Acc*>(partial);
  Acc sum = 0;
  for (int64_t k = 0; k < plan.chunks; ++k) sum = add_rn(sum, sums[k * plan.cols + col]);
  store_sum<T>(result, col, sum);
}

}  // namespace regdrop::cuda
